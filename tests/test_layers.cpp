// Layers and ResNet builders: module backward against finite differences, parameter counts
// and names, and a whole ResNet-20 step against a plain composition of the reference kernels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "engine/network.h"
#include "engine/op_profile.h"
#include "engine/ops.h"
#include "engine/trainer.h"
#include "kernels/common/error.h"
#include "kernels/cpu/ops.h"
#include "layers/layers.h"
#include "layers/resnet.h"

using namespace sp;
using namespace sp::layers;
namespace kc = sp::kernels::cpu;

namespace {

Tensor random_tensor(const Shape& shape, std::mt19937_64& rng, float scale = 1.f) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::normal_distribution<float> n(0.f, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.at<float>(i) = n(rng);
  return t;
}

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += double(a.at<float>(i)) * double(b.at<float>(i));
  return s;
}

Tensor clone(const Tensor& t) {
  Tensor c = Tensor::empty(t.shape(), t.dtype());
  std::memcpy(c.raw_data(), t.raw_data(), t.nbytes());
  return c;
}

// Checks a module's backward against central finite differences of L(x, theta) = <w, f(x, theta)>
// on sampled coordinates of the input and of every parameter. The modules compute in fp32 and
// ReLU/max-pool are not smooth, so each coordinate is tried with h = 1e-2, 1e-3, 1e-4 and 3e-5
// and passes when one of them agrees: a kink within h of the point spoils the larger steps, fp32
// noise the smallest. The tolerance is relative: `tol` times the coordinate's own derivative
// plus the root mean square of its tensor's (a scale that small derivatives are judged by).
// All data are seeded, so the outcome is the same on every run.
void check_module_gradients(Module& m, const Shape& x_shape, uint64_t seed, double tol = 2e-3) {
  auto s = make_stream(Device::cpu());
  std::mt19937_64 rng(seed);
  Tensor x = random_tensor(x_shape, rng);
  m.set_training(true);
  Context ctx;
  Tensor y = m.forward(*s, x, ctx);
  s->synchronize();
  Tensor w = random_tensor(y.shape(), rng);
  Tensor dx = m.backward(*s, clone(w), ctx, true);
  s->synchronize();
  ModuleState st;
  m.collect("", st);

  auto loss = [&]() {
    Context c;
    Tensor out = m.forward(*s, x, c);
    s->synchronize();
    return dot(w, out);
  };
  auto check = [&](Tensor& z, const Tensor& grad, const std::string& what) {
    const int64_t n = z.numel(), samples = std::min<int64_t>(n, 32);
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) sq += double(grad.at<float>(i)) * grad.at<float>(i);
    const double rms = std::sqrt(sq / double(n));
    ASSERT_GT(rms, 0) << m.type() << ": the gradient of " << what << " is all zeros";
    for (int64_t j = 0; j < samples; ++j) {
      const int64_t i = samples == n ? j : int64_t(rng() % uint64_t(n));
      const float z0 = z.at<float>(i);
      const double analytic = grad.at<float>(i);
      double best = INFINITY;
      for (float h : {1e-2f, 1e-3f, 1e-4f, 3e-5f}) {
        z.at<float>(i) = z0 + h;
        const double plus = loss();
        z.at<float>(i) = z0 - h;
        const double minus = loss();
        z.at<float>(i) = z0;
        best = std::min(best, std::abs((plus - minus) / (2.0 * double(h)) - analytic));
      }
      EXPECT_LE(best, tol * (rms + std::abs(analytic)))
          << m.type() << ": d/d " << what << "[" << i << "] = " << analytic << " disagrees with finite differences";
    }
  };
  check(x, dx, "input");
  for (auto& [name, p] : st.params) check(p->value, p->grad, name);
}

TEST(ModuleGradients, Conv2d) {
  Rng rng(1);
  Conv2d conv(3, 10, 3, 2, 1, true, rng);
  check_module_gradients(conv, {2, 7, 6, 3}, 11);
  Conv2d pointwise(5, 4, 1, 1, 0, false, rng);
  check_module_gradients(pointwise, {1, 4, 4, 5}, 12);
}

TEST(ModuleGradients, BatchNorm2d) {
  BatchNorm2d bn(6);
  check_module_gradients(bn, {3, 4, 5, 6}, 13);
  BatchNorm2d bn_relu(6, /*fuse_relu=*/true);
  check_module_gradients(bn_relu, {3, 4, 5, 6}, 17);
}

TEST(ModuleGradients, ReluPoolingLinear) {
  ReLU relu;
  check_module_gradients(relu, {2, 3, 3, 4}, 14);
  MaxPool2d pool(3, 2, 1);
  check_module_gradients(pool, {2, 7, 7, 3}, 15);
  GlobalAvgPool gap;
  check_module_gradients(gap, {3, 4, 4, 5}, 16);
  Rng rng(2);
  Linear fc(7, 10, rng);
  check_module_gradients(fc, {5, 7}, 17);
}

// A layer's geometry is checked when it is built, not first as a division by zero in a forward.
TEST(Layers, ConvolutionAndPoolingRefuseGeometryTheyCannotRun) {
  Rng rng(4);
  EXPECT_THROW(Conv2d(3, 16, 3, 0, 1, false, rng), Error);
  EXPECT_THROW(Conv2d(3, 16, 3, 1, -1, false, rng), Error);
  EXPECT_THROW(Conv2d(0, 16, 3, 1, 1, false, rng), Error);
  EXPECT_THROW(MaxPool2d(3, 0, 1), Error);
  EXPECT_THROW(MaxPool2d(3, 2, 3), Error);  // pad as large as the window
  EXPECT_NO_THROW(Conv2d(3, 16, 1, 2, 0, false, rng));
  EXPECT_NO_THROW(MaxPool2d(3, 2, 1));
  // An input smaller than the window is refused by name, before its output (of size -2) is made.
  MaxPool2d wide(5, 1, 0);
  auto s = make_stream(Device::cpu());
  Context ctx;
  try {
    wide.forward(*s, Tensor::empty({1, 2, 2, 3}, DType::F32), ctx);
    ADD_FAILURE() << "a 5x5 window over a 2x2 input was not refused";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("must fit the padded input"), std::string::npos) << e.what();
  }
  Shape y;
  EXPECT_THROW(wide.forward_flops({1, 2, 2, 3}, &y), ShapeError);
  EXPECT_EQ(wide.forward_flops({1, 6, 5, 3}, &y), 2 * 1 * 3 * 25.0);  // 25 taps per output
  EXPECT_EQ(y, (Shape{1, 2, 1, 3}));
}

// A block's weights move many ReLU inputs at once, so some cross the kink at every step size
// fp32 can resolve: blocks are held to a looser tolerance (their exact agreement with the
// reference ops composed by hand is checked bit for bit below, on ResNet-20).
constexpr double kBlockTol = 1e-2;

TEST(ModuleGradients, ResidualBlocks) {
  Rng rng(3);
  BasicBlock identity(8, 8, 1, Shortcut::A, rng);
  check_module_gradients(identity, {2, 6, 6, 8}, 18, kBlockTol);
  BasicBlock option_a(4, 8, 2, Shortcut::A, rng);
  check_module_gradients(option_a, {2, 6, 6, 4}, 19, kBlockTol);
  BasicBlock option_b(4, 8, 2, Shortcut::B, rng);
  check_module_gradients(option_b, {2, 5, 5, 4}, 20, kBlockTol);
  Bottleneck bottleneck(8, 4, 2, rng);
  check_module_gradients(bottleneck, {2, 6, 6, 8}, 21, kBlockTol);
  Bottleneck bottleneck_identity(16, 4, 1, rng);  // in = 4 x mid, stride 1: no projection
  check_module_gradients(bottleneck_identity, {2, 5, 5, 16}, 22, kBlockTol);
  Bottleneck bottleneck_widening(8, 4, 1, rng);  // a projection without a stride (ResNet-50's layer1.0)
  check_module_gradients(bottleneck_widening, {2, 5, 5, 8}, 23, kBlockTol);
}

// Every module the pipeline keeps several batches in flight through (FDG: module k backpropagates
// the batch it forwarded 2(K - k) ticks before): forward x1, forward x2, backward of x2, backward
// of x1 gives, bit for bit, the gradients and dx of a twin that ran x1 alone, and those of x2 of
// a twin that ran x2 alone. So a backward uses its own batch's saved tensors and writes the
// parameter gradients afresh (they held the other batch's).
TEST(ModuleGradients, SeveralBatchesInFlightEachBackpropagateWithTheirOwnSavedTensors) {
  const std::vector<std::pair<std::function<std::unique_ptr<Module>()>, Shape>> kinds = {
      {[] {
         Rng r(1);
         return std::make_unique<Conv2d>(3, 5, 3, 2, 1, true, r);
       },
       Shape{2, 7, 6, 3}},
      {[] { return std::make_unique<BatchNorm2d>(4); }, Shape{2, 3, 3, 4}},
      {[] { return std::make_unique<BatchNorm2d>(4, true); }, Shape{2, 3, 3, 4}},
      {[] { return std::make_unique<ReLU>(); }, Shape{2, 3, 3, 4}},
      {[] { return std::make_unique<MaxPool2d>(3, 2, 1); }, Shape{2, 7, 7, 3}},
      {[] { return std::make_unique<GlobalAvgPool>(); }, Shape{3, 4, 4, 5}},
      {[] {
         Rng r(2);
         return std::make_unique<Linear>(7, 10, r);
       },
       Shape{5, 7}},
      {[] {
         Rng r(3);
         return std::make_unique<BasicBlock>(8, 8, 1, Shortcut::A, r);
       },
       Shape{2, 6, 6, 8}},
      {[] {
         Rng r(4);
         return std::make_unique<BasicBlock>(4, 8, 2, Shortcut::A, r);
       },
       Shape{2, 6, 6, 4}},
      {[] {
         Rng r(5);
         return std::make_unique<BasicBlock>(4, 8, 2, Shortcut::B, r);
       },
       Shape{2, 5, 5, 4}},
      {[] {
         Rng r(6);
         return std::make_unique<Bottleneck>(8, 4, 2, r);
       },
       Shape{2, 6, 6, 8}},
      {[] {
         Rng r(7);
         return std::make_unique<Bottleneck>(16, 4, 1, r);
       },
       Shape{2, 5, 5, 16}},
  };
  auto s = make_stream(Device::cpu());
  std::mt19937_64 data(13);
  struct Result {
    Tensor dx;
    std::vector<Tensor> grads;
  };
  auto backward = [&](Module& m, const Tensor& w, Context& ctx) {
    Result r{m.backward(*s, clone(w), ctx, true), {}};
    s->synchronize();
    ModuleState st;
    m.collect("", st);
    for (auto& [name, p] : st.params) r.grads.push_back(clone(p->grad));
    return r;
  };
  auto expect_same = [](const Result& a, const Result& b, const std::string& what) {
    ASSERT_EQ(a.dx.shape(), b.dx.shape()) << what;
    EXPECT_EQ(std::memcmp(a.dx.raw_data(), b.dx.raw_data(), a.dx.nbytes()), 0) << what << ": dx";
    ASSERT_EQ(a.grads.size(), b.grads.size()) << what;
    for (size_t i = 0; i < a.grads.size(); ++i)
      EXPECT_EQ(std::memcmp(a.grads[i].raw_data(), b.grads[i].raw_data(), a.grads[i].nbytes()), 0)
          << what << ": gradient " << i;
  };
  for (const auto& [make, shape] : kinds) {
    const Tensor x1 = random_tensor(shape, data), x2 = random_tensor(shape, data);
    std::unique_ptr<Module> m = make(), alone1 = make(), alone2 = make();
    Context c1, c2;
    const Tensor y1 = m->forward(*s, x1, c1);
    m->forward(*s, x2, c2);
    const Tensor w1 = random_tensor(y1.shape(), data), w2 = random_tensor(y1.shape(), data);
    const Result r2 = backward(*m, w2, c2);
    const Result r1 = backward(*m, w1, c1);
    Context a1, a2;
    alone1->forward(*s, x1, a1);
    alone2->forward(*s, x2, a2);
    expect_same(r1, backward(*alone1, w1, a1), m->type() + ", the batch forwarded first");
    expect_same(r2, backward(*alone2, w2, a2), m->type() + ", the batch forwarded second");
  }
}

// In evaluation mode a network's batch norms, those inside the residual blocks' tails and
// projections too, use their running statistics: each image's output is its own (as one image
// alone gives it), the running statistics and counters stay, nothing is saved, and there is no
// backward.
TEST(ModuleGradients, EvaluationModeUsesTheRunningStatisticsAndChangesNothing) {
  std::mt19937_64 data(14);
  {
    BatchNorm2d bn(3);
    auto s = make_stream(Device::cpu());
    bn.running_mean = random_tensor({3}, data);
    bn.running_var = random_tensor({3}, data, 0.5f);
    for (int64_t i = 0; i < 3; ++i) bn.running_var.at<float>(i) = 0.5f + std::fabs(bn.running_var.at<float>(i));
    for (int64_t i = 0; i < 3; ++i) bn.gamma.value.at<float>(i) = 0.5f + 0.25f * float(i);
    for (int64_t i = 0; i < 3; ++i) bn.beta.value.at<float>(i) = 0.1f * float(i) - 0.1f;
    bn.set_training(false);
    const Tensor x = random_tensor({2, 2, 2, 3}, data);
    Context ctx;
    const Tensor y = bn.forward(*s, x, ctx);
    s->synchronize();
    for (int64_t i = 0; i < x.numel(); ++i) {
      const int64_t ch = i % 3;
      const double want = (double(x.at<float>(i)) - bn.running_mean.at<float>(ch)) /
                              std::sqrt(double(bn.running_var.at<float>(ch)) + 1e-5) * bn.gamma.value.at<float>(ch) +
                          bn.beta.value.at<float>(ch);
      EXPECT_NEAR(y.at<float>(i), want, 1e-5 * (1 + std::fabs(want))) << i;
    }
    EXPECT_TRUE(ctx.saved.empty());
    EXPECT_EQ(bn.num_batches_tracked, 0);
  }
  Rng rng(8);
  std::vector<std::pair<std::unique_ptr<Module>, Shape>> blocks;
  blocks.emplace_back(std::make_unique<BasicBlock>(4, 8, 2, Shortcut::B, rng), Shape{3, 6, 6, 4});
  blocks.emplace_back(std::make_unique<BasicBlock>(4, 8, 2, Shortcut::A, rng), Shape{3, 6, 6, 4});
  blocks.emplace_back(std::make_unique<Bottleneck>(8, 4, 2, rng), Shape{3, 6, 6, 8});
  auto s = make_stream(Device::cpu());
  for (auto& [m, shape] : blocks) {
    // Train a step first, so that the running statistics are no longer 0 and 1.
    Context warm;
    m->forward(*s, random_tensor(shape, data, 2.f), warm);
    s->synchronize();
    ModuleState st;
    m->collect("", st);
    std::vector<Tensor> buffers;
    for (auto& [name, b] : st.buffers) buffers.push_back(clone(*b));
    std::vector<int64_t> counters;
    for (auto& [name, c] : st.counters) counters.push_back(*c);
    ASSERT_FALSE(buffers.empty());

    m->set_training(false);
    const Tensor x = random_tensor(shape, data);
    Context ctx;
    const Tensor y = m->forward(*s, x, ctx);
    Shape one = shape;
    one[0] = 1;
    const Tensor first = Tensor::empty(one, DType::F32);
    std::memcpy(first.raw_data(), x.raw_data(), first.nbytes());
    Context alone;
    const Tensor y_first = m->forward(*s, first, alone);
    s->synchronize();
    for (int64_t i = 0; i < y_first.numel(); ++i)
      ASSERT_NEAR(y_first.at<float>(i), y.at<float>(i), 1e-5 * (1 + std::fabs(y.at<float>(i))))
          << m->type() << ": image 0 depends on the others in evaluation mode, element " << i;
    for (size_t i = 0; i < buffers.size(); ++i)
      EXPECT_EQ(std::memcmp(buffers[i].raw_data(), st.buffers[i].second->raw_data(), buffers[i].nbytes()), 0)
          << m->type() << " " << st.buffers[i].first << " changed in evaluation mode";
    for (size_t i = 0; i < counters.size(); ++i)
      EXPECT_EQ(*st.counters[i].second, counters[i]) << m->type() << " " << st.counters[i].first;
    EXPECT_THROW(m->backward(*s, random_tensor(y.shape(), data), ctx, true), Error) << m->type();
    // And back in training mode the batch's statistics are used again: image 0 depends on the rest.
    m->set_training(true);
    Context t_all, t_one;
    const Tensor ty = m->forward(*s, x, t_all), ty_first = m->forward(*s, first, t_one);
    s->synchronize();
    double diff = 0;
    for (int64_t i = 0; i < ty_first.numel(); ++i)
      diff = std::max(diff, double(std::fabs(ty_first.at<float>(i) - ty.at<float>(i))));
    EXPECT_GT(diff, 1e-3) << m->type();
  }
}

// backward_accumulate adds the module's dx to its target: the bits of backward then an add,
// the same parameter gradients. A convolution adds in its data-gradient op (beta 1), a
// Sequential through its first module, any other module by the default backward + add.
TEST(ModuleGradients, BackwardAccumulateAddsDxToItsTarget) {
  set_dgrad_accumulates(true);  // whatever the environment says
  Rng rng(4);
  std::vector<std::pair<std::unique_ptr<Module>, Shape>> cases;
  cases.emplace_back(std::make_unique<Conv2d>(3, 5, 3, 2, 1, false, rng), Shape{2, 7, 6, 3});
  auto seq = std::make_unique<Sequential>();
  seq->add("0", std::make_unique<Conv2d>(4, 6, 1, 2, 0, false, rng));
  seq->add("1", std::make_unique<BatchNorm2d>(6, true));
  cases.emplace_back(std::move(seq), Shape{2, 6, 6, 4});
  cases.emplace_back(std::make_unique<BatchNorm2d>(4), Shape{2, 3, 3, 4});
  auto s = make_stream(Device::cpu());
  std::mt19937_64 data(11);
  for (auto& [m, shape] : cases) {
    const Tensor x = random_tensor(shape, data);
    Context ctx;
    const Tensor y = m->forward(*s, x, ctx);
    const Tensor w = random_tensor(y.shape(), data), into = random_tensor(shape, data);
    const Tensor dx = m->backward(*s, clone(w), ctx, true);
    s->synchronize();
    ModuleState st;
    m->collect("", st);
    std::vector<Tensor> grads;
    for (auto& [name, p] : st.params) grads.push_back(clone(p->grad));
    Tensor want = clone(into);
    sp::kernels::cpu::add<float>(want.numel(), into.data<float>(), dx.data<float>(), want.data<float>());
    // Every gradient poisoned: the accumulating pass must write them all again.
    for (auto& [name, p] : st.params) {
      float* g = p->grad.data<float>();
      std::fill(g, g + p->grad.numel(), std::numeric_limits<float>::quiet_NaN());
    }
    Context again;
    m->forward(*s, x, again);
    m->backward_accumulate(*s, clone(w), again, into);
    s->synchronize();
    EXPECT_EQ(std::memcmp(into.raw_data(), want.raw_data(), want.nbytes()), 0) << m->type();
    for (size_t i = 0; i < grads.size(); ++i)
      EXPECT_EQ(std::memcmp(st.params[i].second->grad.raw_data(), grads[i].raw_data(), grads[i].nbytes()), 0)
          << m->type() << " " << st.params[i].first;
  }
}

// A residual block sums its two gradients without a separate add: every kind of shortcut adds
// inside a convolution's data gradient (op profile of the backward). With the switch off
// (STALEPROP_DGRAD_ACCUMULATE=0) an add runs instead, for the same fp32 bits.
TEST(ModuleGradients, ResidualBlocksSumTheirGradientsInTheConvolutions) {
  Rng rng(5);
  std::vector<std::pair<std::unique_ptr<Module>, Shape>> blocks;
  blocks.emplace_back(std::make_unique<BasicBlock>(8, 8, 1, Shortcut::A, rng), Shape{2, 6, 6, 8});
  blocks.emplace_back(std::make_unique<BasicBlock>(4, 8, 2, Shortcut::A, rng), Shape{2, 6, 6, 4});
  blocks.emplace_back(std::make_unique<BasicBlock>(4, 8, 2, Shortcut::B, rng), Shape{2, 6, 6, 4});
  blocks.emplace_back(std::make_unique<Bottleneck>(8, 4, 2, rng), Shape{2, 6, 6, 8});
  auto s = make_stream(Device::cpu());
  std::mt19937_64 data(12);
  for (auto& [m, shape] : blocks) {
    const Tensor x = random_tensor(shape, data);
    Tensor dy;
    auto run = [&](bool accumulate, int64_t* adds) {
      set_dgrad_accumulates(accumulate);
      Context ctx;
      const Tensor y = m->forward(*s, x, ctx);
      if (!dy.defined()) dy = random_tensor(y.shape(), data);
      s->synchronize();
      OpProfile profile;
      const Tensor dx = m->backward(*s, clone(dy), ctx, true);
      s->synchronize();
      set_dgrad_accumulates(true);
      *adds = 0;
      int64_t dgrads = 0;
      for (const OpTime& t : profile.collect()) {
        if (t.op == "add") *adds += t.calls;
        if (t.op == "conv2d_backward_data") dgrads += t.calls;
      }
      EXPECT_GE(dgrads, 2) << m->type();
      return clone(dx);
    };
    int64_t fused_adds = 0, separate_adds = 0;
    const Tensor fused = run(true, &fused_adds), separate = run(false, &separate_adds);
    EXPECT_EQ(fused.shape(), shape) << m->type();
    EXPECT_EQ(fused_adds, 0) << m->type();
    EXPECT_EQ(separate_adds, 1) << m->type();
    EXPECT_EQ(std::memcmp(fused.raw_data(), separate.raw_data(), fused.nbytes()), 0) << m->type();
  }
}

TEST(ResNets, ParameterCountsMatchThePublishedModels) {
  // He et al. 2016 (CIFAR, option A: 0.27M ... 1.7M) and the CIFAR ResNet-18, as the common
  // PyTorch implementations count them.
  const std::map<std::string, int64_t> expected = {{"resnet20", 269722}, {"resnet32", 464154},
                                                   {"resnet44", 658586}, {"resnet56", 853018},
                                                   {"resnet110", 1727962}, {"resnet18", 11173962}};
  for (auto& [name, count] : expected) EXPECT_EQ(build_resnet(name).num_parameters(), count) << name;
  EXPECT_THROW(build_resnet("resnet21"), Error);
}

TEST(ResNets, BlocksAndPyTorchStateNames) {
  Network r20 = build_resnet("resnet20");
  EXPECT_EQ(r20.size(), 11u);  // stem, 9 blocks, head: the cut points of the decoupled trainer
  std::map<std::string, Shape> names;
  for (auto& [n, p] : r20.state().params) names[n] = p->value.shape();
  EXPECT_EQ(names.at("conv1.weight"), (Shape{16, 3, 3, 3}));
  EXPECT_EQ(names.at("layer2.0.conv1.weight"), (Shape{32, 3, 3, 16}));
  EXPECT_EQ(names.at("layer3.2.bn2.bias"), (Shape{64}));
  EXPECT_EQ(names.at("linear.weight"), (Shape{10, 64}));
  EXPECT_EQ(r20.state().buffers.size(), 2u * 19);  // 19 BNs, running mean and var each
  EXPECT_EQ(r20.state().counters.size(), 19u);
  Network r18 = build_resnet("resnet18");
  std::map<std::string, Shape> n18;
  for (auto& [n, p] : r18.state().params) n18[n] = p->value.shape();
  EXPECT_EQ(n18.at("layer2.0.shortcut.0.weight"), (Shape{128, 1, 1, 64}));
  EXPECT_EQ(n18.count("layer2.0.shortcut.1.weight"), 1u);
  EXPECT_EQ(n18.count("layer1.0.shortcut.0.weight"), 0u);  // identity where the shape is kept
  // The same seed gives the same initial weights; another seed does not.
  Network a = build_resnet("resnet20", 10, 7), b = build_resnet("resnet20", 10, 7), c = build_resnet("resnet20", 10, 8);
  const Tensor& wa = a.state().params[0].second->value;
  EXPECT_EQ(std::memcmp(wa.raw_data(), b.state().params[0].second->value.raw_data(), wa.nbytes()), 0);
  EXPECT_NE(std::memcmp(wa.raw_data(), c.state().params[0].second->value.raw_data(), wa.nbytes()), 0);
}

// He et al.'s initialisation: convolution and linear weights Kaiming normal with fan-in
// (std sqrt(2 / fan_in), mean 0), each layer drawn apart; BN gamma 1 and beta 0; biases 0;
// running statistics mean 0 and variance 1. The sample moments of each tensor are checked
// within 4.5 standard errors (about 1 in 150,000 to fail by chance per tensor).
TEST(ResNets, InitialisationFollowsHeEtAl) {
  for (const std::string model : {"resnet20", "resnet18"}) {
    SCOPED_TRACE(model);
    Network net = build_resnet(model, 10, 11);
    int weights = 0, gammas = 0, zeros = 0;
    std::set<std::vector<float>> firsts;  // first elements of each weight: no two layers share a draw
    for (auto& [name, p] : net.state().params) {
      const Tensor& t = p->value;
      const Shape& sh = t.shape();
      const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
      if (sh.size() == 1) {
        const float want = is_bias ? 0.f : 1.f;  // BN beta and linear bias 0, BN gamma 1
        for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t.at<float>(i), want) << name << " [" << i << "]";
        (is_bias ? zeros : gammas) += 1;
        continue;
      }
      ASSERT_FALSE(is_bias) << name;
      // Conv weights are KRSC (fan-in R*S*C), linear weights [out, in] (fan-in in).
      int64_t fan_in = 1;
      for (size_t d = 1; d < sh.size(); ++d) fan_in *= sh[d];
      const double n = double(t.numel()), sigma = std::sqrt(2.0 / double(fan_in));
      double sum = 0, sq = 0;
      for (int64_t i = 0; i < t.numel(); ++i) sum += t.at<float>(i), sq += double(t.at<float>(i)) * t.at<float>(i);
      const double mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
      EXPECT_LT(std::fabs(mean), 4.5 * sigma / std::sqrt(n)) << name << " mean " << mean;
      // The standard error of a normal sample's standard deviation is about sigma / sqrt(2n).
      EXPECT_LT(std::fabs(sd - sigma), 4.5 * sigma / std::sqrt(2 * n)) << name << " std " << sd << ", want " << sigma;
      std::vector<float> first(size_t(std::min<int64_t>(8, t.numel())));
      for (size_t i = 0; i < first.size(); ++i) first[i] = t.at<float>(int64_t(i));
      EXPECT_TRUE(firsts.insert(first).second) << name << " repeats another layer's draw";
      ++weights;
    }
    for (auto& [name, b] : net.state().buffers) {
      const bool var = name.find("running_var") != std::string::npos;
      ASSERT_TRUE(var || name.find("running_mean") != std::string::npos) << name;
      for (int64_t i = 0; i < b->numel(); ++i) ASSERT_EQ(b->at<float>(i), var ? 1.f : 0.f) << name;
    }
    // ResNet-20: 19 convolutions and the linear layer; 19 BNs (gamma, beta), the linear bias.
    // ResNet-18: 17 convolutions, 3 projections and the linear layer; 20 BNs.
    EXPECT_EQ(weights, model == "resnet20" ? 20 : 21);
    EXPECT_EQ(gammas, model == "resnet20" ? 19 : 20);
    EXPECT_EQ(zeros, gammas + 1);
  }
}

// FDG's published cuts (--split-at fdg) fall where its reference code cuts (model_list in
// DG_models.py of github.com/ZHUANGHP/FDG): each module after the first begins at the residual
// block named there.
TEST(ResNets, FdgPresetCutsBeginModulesAtFdgsBlocks) {
  const std::vector<std::tuple<std::string, int, std::vector<std::string>>> expected = {
      {"resnet20", 2, {"layer2.1."}},
      {"resnet20", 3, {"layer2.0.", "layer3.0."}},
      {"resnet56", 2, {"layer2.4."}},
      {"resnet56", 3, {"layer2.0.", "layer3.0."}},
      {"resnet56", 4, {"layer1.6.", "layer2.4.", "layer3.2."}},
      {"resnet110", 2, {"layer2.9."}},
      {"resnet110", 3, {"layer2.0.", "layer3.0."}},
      {"resnet110", 4, {"layer1.13.", "layer2.9.", "layer3.5."}},
      {"resnet110", 5, {"layer1.10.", "layer2.3.", "layer2.14.", "layer3.7."}},
      {"resnet18", 2, {"layer3.0."}},
      {"resnet18", 3, {"layer2.0.", "layer3.1."}},
  };
  for (const auto& [model, k, starts] : expected) {
    Network net = build_resnet(model);
    const std::vector<size_t> cuts = fdg_preset_cuts(model, k);
    ASSERT_EQ(cuts.size(), starts.size()) << model << " K=" << k;
    for (size_t i = 0; i < cuts.size(); ++i) {
      ASSERT_LT(cuts[i], net.size() - 1) << model << " K=" << k;  // the head is never a module alone
      const std::string first = net.state(cuts[i], cuts[i] + 1).params.at(0).first;
      EXPECT_EQ(first.rfind(starts[i], 0), 0u)
          << model << " K=" << k << ": module " << i + 2 << " begins at " << first << ", not " << starts[i];
    }
  }
  // No preset: the error says which exist and that K comes from --split.
  try {
    fdg_preset_cuts("resnet20", 1);
    ADD_FAILURE() << "resnet20 K=1 has no preset";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("K given by --split"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("resnet56 K=2-4"), std::string::npos) << e.what();
  }
}

// ---- ResNet-20 against the reference kernels, composed by hand -----------------------------

using Vec = std::vector<float>;

struct Ref {
  std::map<std::string, Parameter*> p;
  std::map<std::string, Tensor*> b;
  const float* w(const std::string& n) { return p.at(n)->value.data<float>(); }
};

struct ConvSave {
  kernels::Conv2dShape sh;
  Vec x;
};
struct BnSave {
  Vec x, mean, invstd;
  int64_t m, c;
};

Vec conv_f(Ref& r, const std::string& name, const Vec& x, int n, int h, int w, int c, int k, int stride,
           ConvSave& save) {
  save.sh = {n, h, w, c, k, 3, 3, stride, 1};
  save.x = x;
  Vec y(size_t(save.sh.y_size()));
  kc::conv2d_forward<float>(save.sh, x.data(), r.w(name), nullptr, y.data());
  return y;
}
Vec bn_f(Ref& r, const std::string& name, const Vec& x, int64_t c, BnSave& save) {
  save = {x, Vec(size_t(c)), Vec(size_t(c)), int64_t(x.size()) / c, c};
  Vec y(x.size());
  kc::batchnorm_forward_training<float>(save.m, c, x.data(), r.w(name + ".weight"), r.w(name + ".bias"), 1e-5f, 0.1f,
                                        r.b.at(name + ".running_mean")->data<float>(),
                                        r.b.at(name + ".running_var")->data<float>(), y.data(), save.mean.data(),
                                        save.invstd.data());
  return y;
}
Vec conv_b(Ref& r, const std::string& name, const Vec& dy, const ConvSave& save, std::map<std::string, Vec>& grads) {
  Vec dw(size_t(save.sh.w_size())), dx(size_t(save.sh.x_size()));
  kc::conv2d_backward_weight<float>(save.sh, save.x.data(), dy.data(), dw.data(), nullptr);
  kc::conv2d_backward_data<float>(save.sh, dy.data(), r.w(name), dx.data());
  grads[name] = dw;
  return dx;
}
Vec bn_b(Ref& r, const std::string& name, const Vec& dy, const BnSave& s, std::map<std::string, Vec>& grads) {
  Vec dx(dy.size()), dg(size_t(s.c)), db(size_t(s.c));
  kc::batchnorm_backward<float>(s.m, s.c, s.x.data(), dy.data(), r.w(name + ".weight"), s.mean.data(),
                                s.invstd.data(), dx.data(), dg.data(), db.data());
  grads[name + ".weight"] = dg;
  grads[name + ".bias"] = db;
  return dx;
}
Vec relu(const Vec& x) {
  Vec y(x.size());
  kc::relu_forward<float>(int64_t(x.size()), x.data(), y.data());
  return y;
}
Vec relu_b(const Vec& y, const Vec& dy) {
  Vec dx(y.size());
  kc::relu_backward<float>(int64_t(y.size()), y.data(), dy.data(), dx.data());
  return dx;
}
Vec add(const Vec& a, const Vec& b) {
  Vec y(a.size());
  kc::add<float>(int64_t(a.size()), a.data(), b.data(), y.data());
  return y;
}

// The FLOPs model of --split-by flops, against the same counts written out for ResNet-20 and
// ResNet-18 on one image: a convolution 2 * output elements * R*S*C, BN 4 per element (5 with
// its ReLU), a residual block's tail 6 per element (BN, add, ReLU), option A's copy 1, global
// pooling 1 per input element, the linear layer 2 * in * out plus its bias.
TEST(ResNets, BlockFlopsFollowTheCostModel) {
  const auto conv = [](double out_elems, double rsc) { return 2 * out_elems * rsc; };
  const Network r20 = build_resnet("resnet20", 10, 0);
  const std::vector<double> f20 = r20.block_forward_flops({1, 32, 32, 3});
  ASSERT_EQ(f20.size(), 11u);  // stem, 9 blocks, head
  const double e1 = 32 * 32 * 16, e2 = 16 * 16 * 32, e3 = 8 * 8 * 64;  // output elements per stage
  EXPECT_EQ(f20[0], conv(e1, 27) + 5 * e1);
  for (int b : {1, 2, 3}) EXPECT_EQ(f20[size_t(b)], 2 * conv(e1, 144) + 5 * e1 + 6 * e1) << b;
  EXPECT_EQ(f20[4], conv(e2, 144) + conv(e2, 288) + 5 * e2 + e2 + 6 * e2);  // stride 2, option A
  for (int b : {5, 6}) EXPECT_EQ(f20[size_t(b)], 2 * conv(e2, 288) + 5 * e2 + 6 * e2) << b;
  EXPECT_EQ(f20[7], conv(e3, 288) + conv(e3, 576) + 5 * e3 + e3 + 6 * e3);
  for (int b : {8, 9}) EXPECT_EQ(f20[size_t(b)], 2 * conv(e3, 576) + 5 * e3 + 6 * e3) << b;
  EXPECT_EQ(f20[10], e3 + 2 * 64 * 10 + 10);
  // A batch of 4 costs 4 times one image.
  const std::vector<double> f20x4 = r20.block_forward_flops({4, 32, 32, 3});
  for (size_t i = 0; i < f20.size(); ++i) EXPECT_EQ(f20x4[i], 4 * f20[i]) << i;

  // ResNet-18: option-B projections (a 1x1 convolution and its BN) where the shape changes.
  const Network r18 = build_resnet("resnet18", 10, 0);
  const std::vector<double> f18 = r18.block_forward_flops({1, 32, 32, 3});
  ASSERT_EQ(f18.size(), 10u);  // stem, 8 blocks, head
  const double o2 = 16 * 16 * 128;
  EXPECT_EQ(f18[3], conv(o2, 9 * 64) + conv(o2, 9 * 128) + 5 * o2 + (conv(o2, 64) + 4 * o2) + 6 * o2);
}

// Every module's FLOPs count names the output shape its forward really produces (odd sizes,
// strides, padding, a biased convolution, pooling, both shortcuts, the bottleneck), and the
// counts of the modules no ResNet block above covers follow the model.
TEST(ResNets, FlopsCountsNameTheShapesTheForwardsProduce) {
  Rng rng(9);
  std::vector<std::pair<std::unique_ptr<Module>, Shape>> cases;
  cases.emplace_back(std::make_unique<Conv2d>(3, 8, 3, 2, 1, true, rng), Shape{2, 9, 7, 3});
  cases.emplace_back(std::make_unique<Conv2d>(4, 6, 1, 1, 0, false, rng), Shape{1, 5, 5, 4});
  cases.emplace_back(std::make_unique<MaxPool2d>(3, 2, 1), Shape{2, 9, 8, 5});
  cases.emplace_back(std::make_unique<GlobalAvgPool>(), Shape{3, 4, 4, 6});
  cases.emplace_back(std::make_unique<Linear>(6, 10, rng), Shape{3, 6});
  cases.emplace_back(std::make_unique<BatchNorm2d>(4, true), Shape{2, 3, 3, 4});
  cases.emplace_back(std::make_unique<BasicBlock>(8, 16, 2, Shortcut::A, rng), Shape{2, 7, 7, 8});
  cases.emplace_back(std::make_unique<BasicBlock>(8, 16, 2, Shortcut::B, rng), Shape{2, 7, 7, 8});
  cases.emplace_back(std::make_unique<BasicBlock>(8, 8, 1, Shortcut::B, rng), Shape{1, 6, 6, 8});
  cases.emplace_back(std::make_unique<Bottleneck>(16, 4, 2, rng), Shape{1, 9, 9, 16});
  auto s = make_stream(Device::cpu());
  std::mt19937_64 data(10);
  for (auto& [m, x_shape] : cases) {
    Context ctx;
    const Tensor y = m->forward(*s, random_tensor(x_shape, data), ctx);
    s->synchronize();
    Shape counted;
    const double flops = m->forward_flops(x_shape, &counted);
    EXPECT_EQ(counted, y.shape()) << m->type();
    EXPECT_GT(flops, 0) << m->type();
  }
  Shape y;
  // A biased 3x3 stride-2 convolution, 3 -> 8 channels on 9 x 7: 5 x 4 outputs per image.
  EXPECT_EQ(cases[0].first->forward_flops({2, 9, 7, 3}, &y), 2 * (2 * 5 * 4 * 8.0) * 27 + 2 * 5 * 4 * 8);
  EXPECT_EQ(cases[2].first->forward_flops({2, 9, 8, 5}, &y), (2 * 5 * 4 * 5.0) * 9);  // 3x3/2 pad 1: 5 x 4
  // The bottleneck: 1x1 16 -> 4, 3x3/2 4 -> 4 (9 -> 5), 1x1 4 -> 16, the projection 1x1/2 16 -> 16.
  const double mid1 = 9 * 9 * 4, mid2 = 5 * 5 * 4, out = 5 * 5 * 16;
  EXPECT_EQ(cases[9].first->forward_flops({1, 9, 9, 16}, &y),
            2 * mid1 * 16 + 5 * mid1 + 2 * mid2 * 36 + 5 * mid2 + 2 * out * 4 + (2 * out * 16 + 4 * out) + 6 * out);
  // A module without a count says which.
  struct Opaque final : Module {
    std::string type() const override { return "Opaque"; }
    Tensor forward(Stream&, const Tensor& x, Context&) override { return x; }
    Tensor backward(Stream&, const Tensor& dy, Context&, bool) override { return dy; }
    void collect(const std::string&, ModuleState&) override {}
  } opaque;
  EXPECT_THROW(
      {
        try {
          opaque.forward_flops({1}, &y);
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("modules of type Opaque have no FLOPs count"), std::string::npos)
              << e.what();
          throw;
        }
      },
      Error);
}

TEST(ResNets, ResNet20StepMatchesTheReferenceOpsComposedByHand) {
  const int N = 2, H = 16, W = 16, classes = 10;
  Network net = build_resnet("resnet20", classes, 5);
  Network twin = build_resnet("resnet20", classes, 5);  // same weights, driven by hand
  Ref r;
  for (auto& [n, p] : twin.state().params) r.p[n] = p;
  for (auto& [n, b] : twin.state().buffers) r.b[n] = b;
  std::mt19937_64 rng(9);
  Tensor x = random_tensor({N, H, W, 3}, rng);
  Tensor labels = Tensor::empty({N}, DType::I32);
  labels.at<int32_t>(0) = 3;
  labels.at<int32_t>(1) = 8;

  // The network through the Module interface.
  auto s = make_stream(Device::cpu());
  std::vector<Context> ctx(net.size());
  Tensor h = x;
  for (size_t i = 0; i < net.size(); ++i) h = net.block(i).forward(*s, h, ctx[i]);
  s->synchronize();
  Vec logits(h.data<float>(), h.data<float>() + h.numel());
  Vec dlogits(logits.size());
  float loss = 0;
  int64_t correct = 0;
  kc::softmax_cross_entropy<float>(N, classes, logits.data(), labels.data<int32_t>(), 0.f, &loss, dlogits.data(),
                                   &correct);
  Tensor g = Tensor::empty(h.shape(), DType::F32);
  std::memcpy(g.raw_data(), dlogits.data(), dlogits.size() * 4);
  for (size_t i = net.size(); i-- > 0;) g = net.block(i).backward(*s, g, ctx[i], i > 0);
  s->synchronize();

  // The same computation written out layer by layer.
  std::map<std::string, Vec> grads;
  Vec a(x.data<float>(), x.data<float>() + x.numel());
  ConvSave c0;
  BnSave b0;
  Vec stem_y = relu(bn_f(r, "bn1", conv_f(r, "conv1.weight", a, N, H, W, 3, 16, 1, c0), 16, b0));
  struct BlockSave {
    ConvSave c1, c2;
    BnSave b1, b2;
    Vec r1, out;
    int in_c, out_c, stride, h, w;
  };
  std::vector<BlockSave> saves;
  Vec cur = stem_y;
  int cur_c = 16, cur_h = H, cur_w = W;
  for (int stage = 0; stage < 3; ++stage)
    for (int b = 0; b < 3; ++b) {
      const std::string p = "layer" + std::to_string(stage + 1) + "." + std::to_string(b);
      const int out_c = 16 << stage, stride = (stage > 0 && b == 0) ? 2 : 1;
      BlockSave bs;
      bs.in_c = cur_c, bs.out_c = out_c, bs.stride = stride, bs.h = cur_h, bs.w = cur_w;
      Vec t = conv_f(r, p + ".conv1.weight", cur, N, cur_h, cur_w, cur_c, out_c, stride, bs.c1);
      const int oh = bs.c1.sh.p(), ow = bs.c1.sh.q();
      bs.r1 = relu(bn_f(r, p + ".bn1", t, out_c, bs.b1));
      t = bn_f(r, p + ".bn2", conv_f(r, p + ".conv2.weight", bs.r1, N, oh, ow, out_c, out_c, 1, bs.c2), out_c, bs.b2);
      Vec sc = cur;
      if (stride != 1 || cur_c != out_c) {
        kernels::ShortcutAShape ssh{N, cur_h, cur_w, cur_c, out_c, stride};
        sc.assign(size_t(ssh.y_size()), 0.f);
        kc::shortcut_a_forward<float>(ssh, cur.data(), sc.data());
      }
      bs.out = relu(add(t, sc));
      cur = bs.out, cur_c = out_c, cur_h = oh, cur_w = ow;
      saves.push_back(bs);
    }
  Vec pooled(size_t(N * 64));
  kc::global_avgpool_forward<float>(N, cur_h * cur_w, 64, cur.data(), pooled.data());
  Vec ref_logits(size_t(N * classes));
  kc::linear_forward<float>(N, 64, classes, pooled.data(), r.w("linear.weight"), r.w("linear.bias"), ref_logits.data());
  EXPECT_EQ(logits, ref_logits);

  Vec dpooled(pooled.size()), dw(static_cast<size_t>(classes * 64)), db(static_cast<size_t>(classes));
  kc::linear_backward<float>(N, 64, classes, pooled.data(), r.w("linear.weight"), dlogits.data(), dpooled.data(),
                             dw.data(), db.data());
  grads["linear.weight"] = dw, grads["linear.bias"] = db;
  Vec dcur(cur.size());
  kc::global_avgpool_backward<float>(N, cur_h * cur_w, 64, dpooled.data(), dcur.data());
  for (int i = 8; i >= 0; --i) {
    const BlockSave& bs = saves[size_t(i)];
    const std::string p = "layer" + std::to_string(i / 3 + 1) + "." + std::to_string(i % 3);
    Vec dsum = relu_b(bs.out, dcur);
    Vec t = bn_b(r, p + ".bn2", dsum, bs.b2, grads);
    t = conv_b(r, p + ".conv2.weight", t, bs.c2, grads);
    t = bn_b(r, p + ".bn1", relu_b(bs.r1, t), bs.b1, grads);
    t = conv_b(r, p + ".conv1.weight", t, bs.c1, grads);
    if (bs.stride != 1 || bs.in_c != bs.out_c) {
      kernels::ShortcutAShape ssh{N, bs.h, bs.w, bs.in_c, bs.out_c, bs.stride};
      Vec dsc(size_t(ssh.x_size()));
      kc::shortcut_a_backward<float>(ssh, dsum.data(), dsc.data());
      dcur = add(t, dsc);
    } else {
      dcur = add(t, dsum);
    }
  }
  Vec t = bn_b(r, "bn1", relu_b(stem_y, dcur), b0, grads);
  Vec dw0(size_t(c0.sh.w_size()));
  kc::conv2d_backward_weight<float>(c0.sh, c0.x.data(), t.data(), dw0.data(), nullptr);
  grads["conv1.weight"] = dw0;

  size_t checked = 0;
  for (auto& [name, p] : net.state().params) {
    ASSERT_TRUE(grads.count(name)) << name;
    EXPECT_EQ(Vec(p->grad.data<float>(), p->grad.data<float>() + p->grad.numel()), grads[name]) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 59u);  // 19 conv weights, 19 BN (weight, bias) pairs, linear weight and bias
  for (auto& [name, buf] : net.state().buffers) {
    const Tensor* twin_buf = r.b.at(name);
    EXPECT_EQ(std::memcmp(buf->raw_data(), twin_buf->raw_data(), buf->nbytes()), 0) << name;
  }
}

}  // namespace

namespace {

// Mixed precision: the same ResNet-20 step with bf16 activations, gradients and weight
// copies stays within bf16 rounding of the fp32 step; master weights and their gradients stay
// fp32, and every activation the network keeps is bf16 (half the bytes).
// The gradients of a freshly initialised network on noise are sensitive: rounding only the
// input to bf16 (relative change 2^-9) already moves them by over 10%. So the bf16 gradient is
// judged against that intrinsic sensitivity, measured in the same test.
TEST(ResNets, Bf16StepTracksTheFp32Step) {
  const int N = 8, H = 16, W = 16, classes = 10;
  std::mt19937_64 rng(19);
  const Tensor x = random_tensor({N, H, W, 3}, rng);
  Tensor labels = Tensor::empty({N}, DType::I32);
  for (int i = 0; i < N; ++i) labels.at<int32_t>(i) = (7 * i) % classes;

  struct Result {
    std::vector<float> logits, grads;  // grads: every parameter gradient, concatenated
    std::vector<std::pair<std::string, std::vector<float>>> by_param;  // and each on its own
    size_t saved_bytes = 0;
  };
  // dt: activation dtype; round_input: an fp32 run on the input rounded to bf16.
  auto run = [&](DType dt, bool round_input) {
    Network net = build_resnet("resnet20", classes, 5);
    auto s = make_stream(Device::cpu());
    std::vector<Context> ctx(net.size());
    Tensor h = network_input(*s, x, dt);
    if (round_input) {
      h = Tensor::empty(x.shape(), DType::F32);
      ops::cast(*s, network_input(*s, x, DType::BF16), h);
    }
    for (size_t i = 0; i < net.size(); ++i) h = net.block(i).forward(*s, h, ctx[i]);
    EXPECT_EQ(h.dtype(), dt);
    Tensor loss = Tensor::empty({1}, DType::F32), dl = Tensor::empty(h.shape(), dt),
           hits = Tensor::empty({1}, DType::I32);
    ops::softmax_cross_entropy(*s, h, labels, 0.f, loss, dl, hits);
    Tensor g = dl;
    for (size_t i = net.size(); i-- > 0;) g = net.block(i).backward(*s, g, ctx[i], i > 0);
    Tensor logits = Tensor::empty(h.shape(), DType::F32);
    if (dt == DType::F32)
      ops::copy(*s, h, logits);
    else
      ops::cast(*s, h, logits);
    s->synchronize();
    Result r;
    r.logits.assign(logits.data<float>(), logits.data<float>() + logits.numel());
    for (auto& [name, p] : net.state().params) {
      EXPECT_EQ(p->value.dtype(), DType::F32) << name;
      EXPECT_EQ(p->grad.dtype(), DType::F32) << name;
      r.grads.insert(r.grads.end(), p->grad.data<float>(), p->grad.data<float>() + p->grad.numel());
      r.by_param.emplace_back(name, std::vector<float>(p->grad.data<float>(), p->grad.data<float>() + p->grad.numel()));
    }
    std::set<const void*> seen;
    for (const Context& c : ctx) r.saved_bytes += c.saved_bytes(&seen);
    return r;
  };
  const Result f32 = run(DType::F32, false), bf16 = run(DType::BF16, false), nudged = run(DType::F32, true);
  auto rel = [](const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
      den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
  };
  const double logit_err = rel(bf16.logits, f32.logits);
  EXPECT_GT(logit_err, 0.0);  // really computed in bf16
  EXPECT_LE(logit_err, 2e-2);
  const double grad_err = rel(bf16.grads, f32.grads), sensitivity = rel(nudged.grads, f32.grads);
  EXPECT_GT(sensitivity, 0.0);
  EXPECT_LE(grad_err, 3 * sensitivity) << "bf16 gradient error " << grad_err << ", input-rounding sensitivity "
                                       << sensitivity;
  EXPECT_LE(grad_err, 0.5);
  // And each parameter's gradient on its own, against its own sensitivity: the whole vector's
  // norm is carried by the large tensors, so a small one (the stem, a BN's gamma or beta, the
  // linear bias) could be wrong or zero (an error of 1) without moving it. Each tensor's error
  // stays within 3x its own sensitivity plus 0.05 (measured: at most 2.7x where that sensitivity
  // is over 0.02; the floor covers the smaller ones, up to 5.8x for the linear bias: 0.0019
  // against 0.0003).
  ASSERT_EQ(bf16.by_param.size(), f32.by_param.size());
  ASSERT_EQ(nudged.by_param.size(), f32.by_param.size());
  for (size_t t = 0; t < f32.by_param.size(); ++t) {
    const std::string& name = f32.by_param[t].first;
    const double err = rel(bf16.by_param[t].second, f32.by_param[t].second);
    const double own = rel(nudged.by_param[t].second, f32.by_param[t].second);
    EXPECT_LE(err, 3 * own + 0.05) << name << ": bf16 gradient error " << err << ", its sensitivity " << own;
    EXPECT_LE(err, 0.5) << name;
  }
  // Saved activations: bf16 halves them (the f32 BN statistics are a sliver).
  EXPECT_LT(double(bf16.saved_bytes), 0.55 * double(f32.saved_bytes));
}

}  // namespace
