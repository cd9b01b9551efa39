// The tensor-level op contract (engine/ops.h) on CPU streams: each op, dispatched through a
// stream, gives bit for bit what the CPU reference kernel gives when called directly, so the
// dispatch passes every argument to the right place. Also: ops run asynchronously in stream
// order, and queued work holds no storage (as CUDA kernels hold none): memory goes back to the
// allocator when the host lets go of it, and stream ordering alone protects queued readers.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <future>
#include <limits>
#include <random>

#include "engine/allocator.h"
#include "engine/device.h"
#include "engine/ops.h"
#include "kernels/common/error.h"
#include "kernels/cpu/ops.h"
#include "tests/error_testing.h"

using namespace sp;
namespace kc = sp::kernels::cpu;

namespace {

Tensor random_tensor(const Shape& shape, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.at<float>(i) = u(rng);
  return t;
}

std::vector<float> values(const Tensor& t) { return std::vector<float>(t.data<float>(), t.data<float>() + t.numel()); }

class OpsDispatch : public ::testing::Test {
 protected:
  std::unique_ptr<Stream> s = make_stream(Device::cpu());
};

TEST_F(OpsDispatch, ConvolutionThreeWays) {
  kernels::Conv2dShape sh;
  sh.n = 3, sh.h = 9, sh.w = 7, sh.c = 5, sh.k = 6, sh.r = 3, sh.s = 3, sh.stride = 2, sh.pad = 1;
  Tensor x = random_tensor({3, 9, 7, 5}, 1), w = random_tensor({6, 3, 3, 5}, 2), b = random_tensor({6}, 3);
  const Shape yshape = ops::conv2d_output_shape(x.shape(), w.shape(), 2, 1);
  ASSERT_EQ(yshape, (Shape{3, sh.p(), sh.q(), 6}));
  Tensor y = Tensor::empty(yshape, DType::F32), dy = random_tensor(yshape, 4);
  Tensor dx = Tensor::empty(x.shape(), DType::F32), dw = Tensor::empty(w.shape(), DType::F32);
  Tensor db = Tensor::empty({6}, DType::F32);
  ops::conv2d_forward(*s, x, w, b, y, 2, 1);
  ops::conv2d_backward_data(*s, dy, w, dx, 2, 1);
  ops::conv2d_backward_weight(*s, x, dy, dw, db, 2, 1);
  Tensor acc = random_tensor(x.shape(), 5);
  std::vector<float> racc = values(acc);
  ops::conv2d_backward_data(*s, dy, w, acc, 2, 1, 0.25f);
  s->synchronize();
  kc::conv2d_backward_data<float>(sh, dy.data<float>(), w.data<float>(), racc.data(), 0.25f);
  EXPECT_EQ(values(acc), racc);
  std::vector<float> ry(size_t(y.numel())), rdx(size_t(x.numel())), rdw(size_t(w.numel())), rdb(6);
  kc::conv2d_forward<float>(sh, x.data<float>(), w.data<float>(), b.data<float>(), ry.data());
  kc::conv2d_backward_data<float>(sh, dy.data<float>(), w.data<float>(), rdx.data());
  kc::conv2d_backward_weight<float>(sh, x.data<float>(), dy.data<float>(), rdw.data(), rdb.data());
  EXPECT_EQ(values(y), ry);
  EXPECT_EQ(values(dx), rdx);
  EXPECT_EQ(values(dw), rdw);
  EXPECT_EQ(values(db), rdb);
}

// ---- bf16 tensors: the reference semantics (widen, fp32 op, round) -------------------------

Tensor to_bf16(const Tensor& f) {
  Tensor b = Tensor::empty(f.shape(), DType::BF16);
  kc::f32_to_bf16(f.numel(), f.data<float>(), b.data<uint16_t>());
  return b;
}
std::vector<float> widened(const Tensor& b) {
  std::vector<float> v(size_t(b.numel()));
  kc::bf16_to_f32(b.numel(), b.data<uint16_t>(), v.data());
  return v;
}
std::vector<float> rounded(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  kc::f32_to_bf16(int64_t(v.size()), v.data(), b.data());
  std::vector<float> r(v.size());
  kc::bf16_to_f32(int64_t(v.size()), b.data(), r.data());
  return r;
}

TEST_F(OpsDispatch, Bf16TensorsAreWidenedComputedInFp32AndRounded) {
  kernels::Conv2dShape sh;
  sh.n = 2, sh.h = 6, sh.w = 5, sh.c = 4, sh.k = 3, sh.r = 3, sh.s = 3, sh.stride = 1, sh.pad = 1;
  const Tensor x = to_bf16(random_tensor({2, 6, 5, 4}, 31)), w = to_bf16(random_tensor({3, 3, 3, 4}, 32));
  const Tensor dy = to_bf16(random_tensor({2, 6, 5, 3}, 33));
  Tensor y = Tensor::empty({2, 6, 5, 3}, DType::BF16), dx = Tensor::empty(x.shape(), DType::BF16);
  Tensor dw = Tensor::empty(w.shape(), DType::F32);  // fp32 gradient for the fp32 master weight
  ops::conv2d_forward(*s, x, w, Tensor(), y, 1, 1);
  ops::conv2d_backward_data(*s, dy, w, dx, 1, 1);
  ops::conv2d_backward_weight(*s, x, dy, dw, Tensor(), 1, 1);
  s->synchronize();
  const std::vector<float> xf = widened(x), wf = widened(w), dyf = widened(dy);
  std::vector<float> ry(size_t(y.numel())), rdx(size_t(x.numel())), rdw(size_t(w.numel()));
  kc::conv2d_forward<float>(sh, xf.data(), wf.data(), nullptr, ry.data());
  kc::conv2d_backward_data<float>(sh, dyf.data(), wf.data(), rdx.data());
  kc::conv2d_backward_weight<float>(sh, xf.data(), dyf.data(), rdw.data(), nullptr);
  EXPECT_EQ(widened(y), rounded(ry));
  EXPECT_EQ(widened(dx), rounded(rdx));
  EXPECT_EQ(values(dw), rdw);
  EXPECT_NE(widened(y), ry) << "the output must really be rounded to bf16";
  // The data gradient added to dx (beta 1): dx widened in place, the sum rounded once.
  const Tensor acc = to_bf16(random_tensor(x.shape(), 39));
  const std::vector<float> acc0 = widened(acc);
  ops::conv2d_backward_data(*s, dy, w, acc, 1, 1, 1.f);
  s->synchronize();
  std::vector<float> racc = acc0;
  kc::conv2d_backward_data<float>(sh, dyf.data(), wf.data(), racc.data(), 1.f);
  EXPECT_EQ(widened(acc), rounded(racc));
  EXPECT_NE(widened(acc), rounded(rdx)) << "dx was added to";

  // Fused BN+add+ReLU with bf16 activations and fp32 parameters and statistics; its backward
  // writes dresidual over dy in place (one temporary shared by input and output).
  const int64_t m = 2 * 6 * 5, c = 3;
  const Tensor res = to_bf16(random_tensor(y.shape(), 34));
  Tensor g = random_tensor({c}, 35, 0.5f, 1.5f), be = random_tensor({c}, 36);
  Tensor rm = random_tensor({c}, 37), rv = random_tensor({c}, 38, 0.5f, 2.f);
  const std::vector<float> rm0 = values(rm), rv0 = values(rv);
  Tensor out = Tensor::empty(y.shape(), DType::BF16), sm = Tensor::empty({c}, DType::F32),
         si = Tensor::empty({c}, DType::F32);
  ops::batchnorm_add_relu_forward_training(*s, y, res, g, be, rm, rv, out, sm, si, 1e-5f, 0.1f);
  Tensor gy = to_bf16(random_tensor(y.shape(), 39)), gx = Tensor::empty(y.shape(), DType::BF16);
  const std::vector<float> gyf = widened(gy);
  Tensor dg = Tensor::empty({c}, DType::F32), db = Tensor::empty({c}, DType::F32);
  ops::batchnorm_add_relu_backward(*s, y, out, gy, g, sm, si, gx, gy, dg, db);
  s->synchronize();
  const std::vector<float> yf = widened(y), resf = widened(res);
  std::vector<float> rrm = rm0, rrv = rv0, rout(size_t(m * c)), rsm(c), rsi(c);
  kc::batchnorm_add_relu_forward_training<float>(m, c, yf.data(), resf.data(), g.data<float>(), be.data<float>(),
                                                 1e-5f, 0.1f, rrm.data(), rrv.data(), rout.data(), rsm.data(),
                                                 rsi.data());
  EXPECT_EQ(widened(out), rounded(rout));
  EXPECT_EQ(values(rm), rrm);
  EXPECT_EQ(values(rv), rrv);
  EXPECT_EQ(values(sm), rsm);
  EXPECT_EQ(values(si), rsi);
  const std::vector<float> outf = widened(out);
  std::vector<float> rgx(size_t(m * c)), rgres(size_t(m * c)), rdg(c), rdb(c);
  kc::batchnorm_add_relu_backward<float>(m, c, yf.data(), outf.data(), gyf.data(), g.data<float>(), rsm.data(),
                                         rsi.data(), rgx.data(), rgres.data(), rdg.data(), rdb.data());
  EXPECT_EQ(widened(gx), rounded(rgx));
  EXPECT_EQ(widened(gy), rounded(rgres)) << "dresidual in place over dy";
  EXPECT_EQ(values(dg), rdg);
  EXPECT_EQ(values(db), rdb);

  // In-place elementwise op on bf16, and the loss on bf16 logits (fp32 loss, bf16 dlogits).
  Tensor a = to_bf16(random_tensor({7, 10}, 40, -3.f, 3.f));
  const std::vector<float> af = widened(a);
  ops::relu_forward(*s, a, a);
  Tensor labels = Tensor::empty({7}, DType::I32);
  for (int i = 0; i < 7; ++i) labels.at<int32_t>(i) = (3 * i) % 10;
  Tensor loss = Tensor::empty({1}, DType::F32), dlogits = Tensor::empty({7, 10}, DType::BF16),
         hits = Tensor::empty({1}, DType::I32);
  ops::softmax_cross_entropy(*s, a, labels, 0.1f, loss, dlogits, hits);
  s->synchronize();
  std::vector<float> ra(af.size());
  kc::relu_forward<float>(int64_t(af.size()), af.data(), ra.data());
  EXPECT_EQ(widened(a), ra);  // relu of bf16 values is exact
  float rloss = 0;
  std::vector<float> rdl(ra.size());
  int64_t rhits = 0;
  kc::softmax_cross_entropy<float>(7, 10, ra.data(), labels.data<int32_t>(), 0.1f, &rloss, rdl.data(), &rhits);
  EXPECT_EQ(loss.at<float>(0), rloss);
  EXPECT_EQ(widened(dlogits), rounded(rdl));
  EXPECT_EQ(hits.at<int32_t>(0), rhits);
}

TEST_F(OpsDispatch, BatchNormTrainingInferenceBackward) {
  const int64_t m = 2 * 3 * 4, c = 5;
  Tensor x = random_tensor({2, 3, 4, 5}, 5), g = random_tensor({5}, 6, 0.5f, 1.5f), be = random_tensor({5}, 7);
  Tensor rm = random_tensor({5}, 8), rv = random_tensor({5}, 9, 0.5f, 2.f);
  std::vector<float> rm0 = values(rm), rv0 = values(rv);
  Tensor y = Tensor::empty(x.shape(), DType::F32), sm = Tensor::empty({5}, DType::F32);
  Tensor si = Tensor::empty({5}, DType::F32), yi = Tensor::empty(x.shape(), DType::F32);
  Tensor dy = random_tensor(x.shape(), 10), dx = Tensor::empty(x.shape(), DType::F32);
  Tensor dg = Tensor::empty({5}, DType::F32), dbe = Tensor::empty({5}, DType::F32);
  ops::batchnorm_forward_training(*s, x, g, be, rm, rv, y, sm, si, 1e-5f, 0.1f);
  ops::batchnorm_forward_inference(*s, x, g, be, rm, rv, yi, 1e-5f);
  ops::batchnorm_backward(*s, x, dy, g, sm, si, dx, dg, dbe);
  s->synchronize();
  std::vector<float> ry(size_t(m * c)), rsm(5), rsi(5), ryi(size_t(m * c)), rdx(size_t(m * c)), rdg(5), rdbe(5);
  kc::batchnorm_forward_training<float>(m, c, x.data<float>(), g.data<float>(), be.data<float>(), 1e-5f, 0.1f,
                                        rm0.data(), rv0.data(), ry.data(), rsm.data(), rsi.data());
  kc::batchnorm_forward_inference<float>(m, c, x.data<float>(), g.data<float>(), be.data<float>(), rm0.data(),
                                         rv0.data(), 1e-5f, ryi.data());
  kc::batchnorm_backward<float>(m, c, x.data<float>(), dy.data<float>(), g.data<float>(), rsm.data(), rsi.data(),
                                rdx.data(), rdg.data(), rdbe.data());
  EXPECT_EQ(values(y), ry);
  EXPECT_EQ(values(rm), rm0);
  EXPECT_EQ(values(rv), rv0);
  EXPECT_EQ(values(yi), ryi);
  EXPECT_EQ(values(dx), rdx);
  EXPECT_EQ(values(dg), rdg);
  EXPECT_EQ(values(dbe), rdbe);
}

TEST_F(OpsDispatch, ElementwiseShortcutPoolingLinearLoss) {
  Tensor a = random_tensor({2, 4, 4, 3}, 11), b = random_tensor({2, 4, 4, 3}, 12);
  Tensor sum = Tensor::empty(a.shape(), DType::F32), relu = Tensor::empty(a.shape(), DType::F32);
  Tensor drelu = Tensor::empty(a.shape(), DType::F32), scaled = Tensor::empty(a.shape(), DType::F32);
  ops::add(*s, a, b, sum);
  ops::relu_forward(*s, sum, relu);
  ops::relu_backward(*s, relu, b, drelu);
  ops::scale(*s, 0.25f, a, scaled);
  Tensor sc = Tensor::empty({2, 2, 2, 8}, DType::F32), dsc = Tensor::empty(a.shape(), DType::F32);
  ops::shortcut_a_forward(*s, a, sc, 2);
  ops::shortcut_a_backward(*s, sc, dsc, 2);
  Tensor mp = Tensor::empty({2, 2, 2, 3}, DType::F32), dmp = Tensor::empty(a.shape(), DType::F32);
  ops::maxpool2d_forward(*s, a, mp, 2, 2, 0);
  ops::maxpool2d_backward(*s, a, mp, dmp, 2, 2, 0);
  Tensor gap = Tensor::empty({2, 3}, DType::F32), dgap = Tensor::empty(a.shape(), DType::F32);
  ops::global_avgpool_forward(*s, a, gap);
  ops::global_avgpool_backward(*s, gap, dgap);
  Tensor w = random_tensor({4, 3}, 13), lb = random_tensor({4}, 14), ly = Tensor::empty({2, 4}, DType::F32);
  Tensor ldx = Tensor::empty({2, 3}, DType::F32), ldw = Tensor::empty({4, 3}, DType::F32);
  Tensor ldb = Tensor::empty({4}, DType::F32);
  ops::linear_forward(*s, gap, w, lb, ly);
  ops::linear_backward(*s, gap, w, ly, ldx, ldw, ldb);
  Tensor labels = Tensor::empty({2}, DType::I32), loss = Tensor::empty({1}, DType::F32);
  Tensor dlogits = Tensor::empty({2, 4}, DType::F32), correct = Tensor::empty({1}, DType::I32);
  labels.at<int32_t>(0) = 3;
  labels.at<int32_t>(1) = 0;
  ops::softmax_cross_entropy(*s, ly, labels, 0.1f, loss, dlogits, correct);
  s->synchronize();

  const int64_t n = a.numel();
  std::vector<float> r(static_cast<size_t>(n)), r2(static_cast<size_t>(n));
  kc::add<float>(n, a.data<float>(), b.data<float>(), r.data());
  EXPECT_EQ(values(sum), r);
  kc::relu_forward<float>(n, r.data(), r.data());
  EXPECT_EQ(values(relu), r);
  kc::relu_backward<float>(n, r.data(), b.data<float>(), r2.data());
  EXPECT_EQ(values(drelu), r2);
  kc::scale<float>(n, 0.25f, a.data<float>(), r.data());
  EXPECT_EQ(values(scaled), r);
  kernels::ShortcutAShape ssh{2, 4, 4, 3, 8, 2};
  std::vector<float> rsc(size_t(sc.numel()));
  kc::shortcut_a_forward<float>(ssh, a.data<float>(), rsc.data());
  EXPECT_EQ(values(sc), rsc);
  kc::shortcut_a_backward<float>(ssh, rsc.data(), r.data());
  EXPECT_EQ(values(dsc), r);
  kernels::Pool2dShape psh{2, 4, 4, 3, 2, 2, 0};
  std::vector<float> rmp(size_t(mp.numel()));
  kc::maxpool2d_forward<float>(psh, a.data<float>(), rmp.data());
  EXPECT_EQ(values(mp), rmp);
  kc::maxpool2d_backward<float>(psh, a.data<float>(), rmp.data(), r.data());
  EXPECT_EQ(values(dmp), r);
  std::vector<float> rgap(6);
  kc::global_avgpool_forward<float>(2, 16, 3, a.data<float>(), rgap.data());
  EXPECT_EQ(values(gap), rgap);
  kc::global_avgpool_backward<float>(2, 16, 3, rgap.data(), r.data());
  EXPECT_EQ(values(dgap), r);
  std::vector<float> rly(8), rldx(6), rldw(12), rldb(4);
  kc::linear_forward<float>(2, 3, 4, rgap.data(), w.data<float>(), lb.data<float>(), rly.data());
  EXPECT_EQ(values(ly), rly);
  kc::linear_backward<float>(2, 3, 4, rgap.data(), w.data<float>(), rly.data(), rldx.data(), rldw.data(), rldb.data());
  EXPECT_EQ(values(ldx), rldx);
  EXPECT_EQ(values(ldw), rldw);
  EXPECT_EQ(values(ldb), rldb);
  float rloss = 0;
  int64_t rcorrect = 0;
  std::vector<float> rdl(8);
  kc::softmax_cross_entropy<float>(2, 4, rly.data(), labels.data<int32_t>(), 0.1f, &rloss, rdl.data(), &rcorrect);
  EXPECT_EQ(loss.at<float>(0), rloss);
  EXPECT_EQ(values(dlogits), rdl);
  EXPECT_EQ(correct.at<int32_t>(0), rcorrect);
}

// Awkward inputs, each found wrong by a review: a NaN in a max-pool window wins wherever it
// stands (PyTorch's rule; it won only as the first tap); a logit of -inf in a class with no
// target mass adds nothing to the loss (it made 0 * -inf = NaN); a filter or window larger than
// the padded input is refused (C++ division's rounding toward zero gave it one output); batch
// norm of an empty tensor is refused before it writes 0/0 into the running statistics.
TEST_F(OpsDispatch, AwkwardInputsOfPoolingLossShapesAndBatchNorm) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  {
    // One image of 2 x 4 pixels (pixel i = row * 4 + column), 2 channels, 2 x 2 windows at
    // stride 2. Channel 0: a NaN as window 0's last tap (after a 5), and in window 1 before a 9;
    // the old rule gave 5 and 9. Channel 1: no NaN.
    Tensor x = Tensor::empty({1, 2, 4, 2}, DType::F32);
    const float ch0[8] = {1, 5, 2, 3, /* row 1 */ 4, nan, nan, 9};
    const float ch1[8] = {1, 5, 2, 3, 4, 0, 7, 9};
    for (int i = 0; i < 8; ++i) x.at<float>(2 * i) = ch0[i], x.at<float>(2 * i + 1) = ch1[i];
    Tensor y = Tensor::empty({1, 1, 2, 2}, DType::F32), dy = Tensor::empty({1, 1, 2, 2}, DType::F32);
    Tensor dx = Tensor::empty(x.shape(), DType::F32);
    for (int i = 0; i < 4; ++i) dy.at<float>(i) = float(i + 1);
    ops::maxpool2d_forward(*s, x, y, 2, 2, 0);
    ops::maxpool2d_backward(*s, x, dy, dx, 2, 2, 0);
    s->synchronize();
    EXPECT_TRUE(std::isnan(y.at<float>(0))) << "a NaN as a window's last tap";
    EXPECT_TRUE(std::isnan(y.at<float>(2))) << "a NaN before a larger value";
    EXPECT_EQ(y.at<float>(1), 5.f);
    EXPECT_EQ(y.at<float>(3), 9.f);
    // The gradient goes to the NaN taps: pixel (1, 1) of window 0 and (1, 2) of window 1.
    for (int i = 0; i < 8; ++i) {
      EXPECT_EQ(dx.at<float>(2 * i), i == 5 ? 1.f : i == 6 ? 3.f : 0.f) << "channel 0, pixel " << i;
      EXPECT_EQ(dx.at<float>(2 * i + 1), i == 1 ? 2.f : i == 7 ? 4.f : 0.f) << "channel 1, pixel " << i;
    }
  }
  {
    Tensor logits = Tensor::empty({1, 10}, DType::F32), labels = Tensor::empty({1}, DType::I32);
    for (int j = 0; j < 10; ++j) logits.at<float>(j) = j == 0 ? 1.f : j == 1 ? 2.f : j == 2 ? -inf : 0.f;
    labels.at<int32_t>(0) = 1;
    Tensor loss = Tensor::empty({1}, DType::F32), dl = Tensor::empty({1, 10}, DType::F32);
    Tensor correct = Tensor::empty({1}, DType::I32);
    ops::softmax_cross_entropy(*s, logits, labels, 0.f, loss, dl, correct);
    s->synchronize();
    // -log softmax(z)_1 = log(e^1 + e^2 + 7) - 2.
    EXPECT_NEAR(loss.at<float>(0), std::log(std::exp(1.0) + std::exp(2.0) + 7.0) - 2.0, 1e-6);
    EXPECT_EQ(dl.at<float>(2), 0.f);
    // With smoothing the -inf class has target mass: the loss is infinite, as in PyTorch.
    ops::softmax_cross_entropy(*s, logits, labels, 0.1f, loss, dl, correct);
    s->synchronize();
    EXPECT_EQ(loss.at<float>(0), inf);
  }
  {
    // A 4 x 4 filter over a 3 x 3 input at stride 2 and a 2 x 2 window over a 1 x 1 input:
    // refused, as PyTorch refuses them; the same with padding that makes them fit is not.
    Tensor x = random_tensor({1, 3, 3, 2}, 31), w = random_tensor({1, 4, 4, 2}, 32);
    EXPECT_THROW(ops::conv2d_forward(*s, x, w, Tensor(), Tensor::empty({1, 1, 1, 1}, DType::F32), 2, 0), Error);
    Tensor fits = Tensor::empty({1, 1, 1, 1}, DType::F32);
    ops::conv2d_forward(*s, x, w, Tensor(), fits, 2, 1);
    Tensor one = random_tensor({1, 1, 1, 2}, 33);
    EXPECT_THROW(ops::maxpool2d_forward(*s, one, Tensor::empty({1, 1, 1, 2}, DType::F32), 2, 2, 0), Error);
    // A dimension past int's range (the kernels' shape descriptors hold ints) is refused before
    // it could wrap round; the memory is never touched.
    float dummy = 0.f;
    const Tensor wide = Tensor::from_blob(&dummy, {int64_t(1) << 31, 1, 1, 1}, DType::F32, Device::cpu());
    test::expect_error([&] { ops::maxpool2d_forward(*s, wide, wide, 1, 1, 0); }, {"over 2^31 - 1"});
    s->synchronize();
  }
  {
    Tensor rm = random_tensor({3}, 34), rv = random_tensor({3}, 35, 0.5f, 2.f);
    const std::vector<float> rm0 = values(rm), rv0 = values(rv);
    Tensor g = random_tensor({3}, 36), b = random_tensor({3}, 37), sm = Tensor::empty({3}, DType::F32);
    Tensor si = Tensor::empty({3}, DType::F32);
    Tensor empty = Tensor::empty({0, 4, 4, 3}, DType::F32);
    EXPECT_THROW(ops::batchnorm_forward_training(*s, empty, g, b, rm, rv, Tensor::empty(empty.shape(), DType::F32), sm,
                                                 si, 1e-5f, 0.1f),
                 Error);
    Tensor no_channels = Tensor::empty({2, 2, 2, 0}, DType::F32), none = Tensor::empty({0}, DType::F32);
    EXPECT_THROW(
        ops::batchnorm_forward_training(*s, no_channels, none, none, none, none,
                                        Tensor::empty(no_channels.shape(), DType::F32), none, none, 1e-5f, 0.1f),
        Error);
    // One value per channel (batch 1 of a 1x1 image): no statistics to train with, in either form.
    const Tensor single = random_tensor({1, 1, 1, 3}, 38), out = Tensor::empty({1, 1, 1, 3}, DType::F32);
    test::expect_error([&] { ops::batchnorm_forward_training(*s, single, g, b, rm, rv, out, sm, si, 1e-5f, 0.1f); },
                       {"batchnorm_forward_training", "[1, 1, 1, 3] holds one value per channel"});
    test::expect_error(
        [&] { ops::batchnorm_add_relu_forward_training(*s, single, single, g, b, rm, rv, out, sm, si, 1e-5f, 0.1f); },
        {"batchnorm_add_relu_forward_training", "one value per channel"});
    ops::batchnorm_forward_inference(*s, single, g, b, rm, rv, out, 1e-5f);  // evaluation may
    s->synchronize();
    EXPECT_EQ(values(rm), rm0);
    EXPECT_EQ(values(rv), rv0);
  }
}

TEST_F(OpsDispatch, SgdStepUpdatesEveryTensorInOneCall) {
  kernels::SgdParams p;
  p.lr = 0.1f, p.momentum = 0.9f, p.weight_decay = 1e-3f, p.nesterov = true, p.grad_scale = 0.5f;
  std::vector<Tensor> params = {random_tensor({3, 4}, 20), random_tensor({7}, 21)};
  std::vector<Tensor> grads = {random_tensor({3, 4}, 22), random_tensor({7}, 23)};
  std::vector<Tensor> moms = {random_tensor({3, 4}, 24), random_tensor({7}, 25)};
  std::vector<std::vector<float>> rp, rm;
  for (int i = 0; i < 2; ++i) rp.push_back(values(params[size_t(i)])), rm.push_back(values(moms[size_t(i)]));
  ops::sgd_step(*s, params, grads, moms, p);
  s->synchronize();
  std::vector<kc::SgdTensor<float>> list;
  for (int i = 0; i < 2; ++i)
    list.push_back({rp[size_t(i)].data(), grads[size_t(i)].data<float>(), rm[size_t(i)].data(),
                    int64_t(rp[size_t(i)].size())});
  kc::sgd_step<float>(list, p);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(values(params[size_t(i)]), rp[size_t(i)]);
    EXPECT_EQ(values(moms[size_t(i)]), rm[size_t(i)]);
  }
}

TEST_F(OpsDispatch, SgdStepWritesTheBf16CopiesItIsGiven) {
  kernels::SgdParams p;
  p.lr = 0.1f, p.momentum = 0.9f, p.weight_decay = 1e-3f;
  std::vector<Tensor> params = {random_tensor({3, 4}, 40), random_tensor({7}, 41)};
  std::vector<Tensor> grads = {random_tensor({3, 4}, 42), random_tensor({7}, 43)};
  std::vector<Tensor> moms = {random_tensor({3, 4}, 44), random_tensor({7}, 45)};
  // A copy for the first tensor only.
  std::vector<Tensor> copies = {Tensor::empty({3, 4}, DType::BF16), Tensor()};
  ops::sgd_step(*s, params, grads, moms, p, Tensor(), copies);
  Tensor want = Tensor::empty({3, 4}, DType::BF16);
  ops::cast(*s, params[0], want);
  s->synchronize();
  EXPECT_EQ(0, std::memcmp(copies[0].raw_data(), want.raw_data(), want.nbytes()));
  // A copy of the wrong dtype or shape, or a list of the wrong length, is refused.
  EXPECT_THROW(ops::sgd_step(*s, params, grads, moms, p, Tensor(), {Tensor::empty({3, 4}, DType::F32), Tensor()}),
               ShapeError);
  EXPECT_THROW(ops::sgd_step(*s, params, grads, moms, p, Tensor(), {Tensor::empty({4, 3}, DType::BF16), Tensor()}),
               ShapeError);
  EXPECT_THROW(ops::sgd_step(*s, params, grads, moms, p, Tensor(), {Tensor()}), ShapeError);
}

TEST_F(OpsDispatch, FillCopyCastAndGemm) {
  Tensor a = random_tensor({5, 3}, 30), b = random_tensor({5, 4}, 31), c = Tensor::empty({3, 4}, DType::F32);
  ops::gemm(*s, true, false, 2.f, a, b, 0.f, c);
  Tensor f = Tensor::empty({9}, DType::F32), g = Tensor::empty({9}, DType::F32);
  ops::fill(*s, f, 2.5f);
  ops::copy(*s, f, g);
  Tensor h = Tensor::empty({9}, DType::BF16), back = Tensor::empty({9}, DType::F32);
  ops::cast(*s, g, h);
  ops::cast(*s, h, back);
  s->synchronize();
  std::vector<float> rc(12);
  kc::gemm<float>(true, false, 3, 4, 5, 2.f, a.data<float>(), 3, b.data<float>(), 4, 0.f, rc.data(), 4);
  EXPECT_EQ(values(c), rc);
  for (int i = 0; i < 9; ++i) {
    EXPECT_EQ(g.at<float>(i), 2.5f);
    EXPECT_EQ(h.at<uint16_t>(i), 0x4020);  // 2.5 in bf16
    EXPECT_EQ(back.at<float>(i), 2.5f);
  }
}

// Closes a stream until open() (or the guard's end): work queued behind it waits.
class Gate {
 public:
  explicit Gate(Stream& s) : opened_(promise_.get_future().share()) {
    s.enqueue_host([f = opened_] { f.wait(); });
  }
  ~Gate() { open(); }
  void open() {
    if (!open_) promise_.set_value();
    open_ = true;
  }

 private:
  std::promise<void> promise_;
  std::shared_future<void> opened_;
  bool open_ = false;
};

Tensor bf16_of(Stream& s, const Tensor& f32) {
  Tensor t = Tensor::empty(f32.shape(), DType::BF16, s.device(), &s);
  ops::cast(s, f32, t);
  return t;
}

// Queued work holds no storage, on the CPU as on CUDA (ops.cpp: borrow): every op's tensors,
// and the fp32 temporaries of an op run on bf16 tensors, go back to the allocator as soon as
// the host lets go of them, while the work that uses them still waits behind a closed gate.
TEST_F(OpsDispatch, QueuedWorkHoldsNoStorage) {
  auto& alloc = device_allocator(Device::cpu());
  const auto r = [&](const Shape& shape, uint32_t seed, float lo = -1.f, float hi = 1.f) {
    return random_tensor(shape, seed, lo, hi);
  };
  const auto e = [&](const Shape& shape, DType dt = DType::F32) {
    return Tensor::empty(shape, dt, Device::cpu(), s.get());
  };
  const std::vector<std::pair<const char*, std::function<void()>>> calls = {
      {"gemm",
       [&] {
         ops::gemm(*s, false, true, 1.f, r({5, 7}, 1), r({3, 7}, 2), 0.f, e({5, 3}));
       }},
      {"gemm bf16",
       [&] {
         ops::gemm(*s, false, false, 1.f, bf16_of(*s, r({5, 7}, 1)), r({7, 3}, 2), 0.f, e({5, 3}));
       }},
      {"conv2d",
       [&] {
         Tensor x = r({2, 5, 5, 3}, 3), w = r({4, 3, 3, 3}, 4), dy = r({2, 5, 5, 4}, 5);
         ops::conv2d_forward(*s, x, w, r({4}, 6), e({2, 5, 5, 4}), 1, 1);
         ops::conv2d_backward_data(*s, dy, w, e(x.shape()), 1, 1);
         ops::conv2d_backward_weight(*s, x, dy, e(w.shape()), e({4}), 1, 1);
       }},
      {"batchnorm",
       [&] {
         Tensor x = r({2, 2, 1, 3}, 7), g = r({3}, 8), b = r({3}, 9), rm = r({3}, 10), rv = r({3}, 11, 0.5f, 1.f);
         ops::batchnorm_forward_training(*s, x, g, b, rm, rv, e({2, 2, 1, 3}), e({3}), e({3}), 1e-5f, 0.1f);
         ops::batchnorm_forward_inference(*s, x, g, b, rm, rv, e({2, 2, 1, 3}), 1e-5f);
         ops::batchnorm_backward(*s, x, r({2, 2, 1, 3}, 12), g, r({3}, 13), r({3}, 14, 0.5f, 1.f), e({2, 2, 1, 3}),
                                 e({3}), e({3}));
         ops::batchnorm_add_relu_forward_training(*s, x, r({2, 2, 1, 3}, 15), g, b, rm, rv, e({2, 2, 1, 3}), e({3}),
                                                  e({3}), 1e-5f, 0.1f);
         ops::batchnorm_add_relu_forward_inference(*s, x, r({2, 2, 1, 3}, 15), g, b, rm, rv, e({2, 2, 1, 3}), 1e-5f);
         ops::batchnorm_add_relu_backward(*s, x, r({2, 2, 1, 3}, 16), r({2, 2, 1, 3}, 12), g, r({3}, 13),
                                          r({3}, 14, 0.5f, 1.f), e({2, 2, 1, 3}), e({2, 2, 1, 3}), e({3}), e({3}));
       }},
      {"elementwise",
       [&] {
         ops::relu_forward(*s, r({9}, 17), e({9}));
         ops::relu_backward(*s, r({9}, 17), r({9}, 18), e({9}));
         ops::add(*s, r({9}, 17), r({9}, 18), e({9}));
         ops::scale(*s, 2.f, r({9}, 17), e({9}));
         ops::fill(*s, e({9}), 1.f);
         ops::copy(*s, r({9}, 17), e({9}));
         ops::cast(*s, bf16_of(*s, r({9}, 17)), e({9}));
         ops::add(*s, bf16_of(*s, r({9}, 17)), bf16_of(*s, r({9}, 18)), e({9}, DType::BF16));
       }},
      {"shortcut and pooling",
       [&] {
         ops::shortcut_a_forward(*s, r({2, 4, 4, 3}, 19), e({2, 2, 2, 6}), 2);
         ops::shortcut_a_backward(*s, r({2, 2, 2, 6}, 20), e({2, 4, 4, 3}), 2);
         ops::maxpool2d_forward(*s, r({2, 4, 4, 3}, 19), e({2, 2, 2, 3}), 2, 2, 0);
         ops::maxpool2d_backward(*s, r({2, 4, 4, 3}, 19), r({2, 2, 2, 3}, 21), e({2, 4, 4, 3}), 2, 2, 0);
         ops::global_avgpool_forward(*s, r({2, 4, 4, 3}, 19), e({2, 3}));
         ops::global_avgpool_backward(*s, r({2, 3}, 22), e({2, 4, 4, 3}));
       }},
      {"linear and loss",
       [&] {
         Tensor x = r({4, 5}, 23), w = r({3, 5}, 24);
         ops::linear_forward(*s, x, w, r({3}, 25), e({4, 3}));
         ops::linear_backward(*s, x, w, r({4, 3}, 26), e({4, 5}), e({3, 5}), e({3}));
         Tensor labels = Tensor::empty({4}, DType::I32);  // written by the host: not stream-ordered memory
         for (int i = 0; i < 4; ++i) labels.at<int32_t>(i) = i % 3;
         ops::softmax_cross_entropy(*s, r({4, 3}, 27), labels, 0.f, e({1}), e({4, 3}), e({1}, DType::I32));
       }},
      {"sgd_step",
       [&] {
         ops::sgd_step(*s, {r({6}, 28), r({2}, 29)}, {r({6}, 30), r({2}, 31)}, {r({6}, 32), r({2}, 33)},
                       ops::SgdParams{0.1f, 0.9f, 1e-4f, false, 1.f}, r({1}, 34));
       }},
  };
  for (const auto& [name, call] : calls) {
    SCOPED_TRACE(name);
    const size_t before = alloc.stats().allocated_bytes;
    Gate gate(*s);
    call();  // its tensors are gone on the host; its work has not started
    EXPECT_EQ(alloc.stats().allocated_bytes, before) << "queued work still holds memory";
    gate.open();
    s->synchronize();
  }
}

// A block let go of while queued work still uses it goes back under its stream's key: only work
// queued after that work on the same stream gets it, so the queued reader sees what it was given.
TEST_F(OpsDispatch, MemoryReleasedUnderQueuedWorkIsReusedInStreamOrder) {
  Tensor x = random_tensor({1000}, 40), out = Tensor::empty({1000}, DType::F32);
  Gate gate(*s);
  void* freed = nullptr;
  {
    Tensor staged = Tensor::empty({1000}, DType::F32, Device::cpu(), s.get());
    ops::copy(*s, x, staged);
    ops::scale(*s, 3.f, staged, out);
    freed = staged.raw_data();
  }
  Tensor next = Tensor::empty({1000}, DType::F32, Device::cpu(), s.get());
  EXPECT_EQ(next.raw_data(), freed) << "the stream's next allocation of the size takes the released block";
  Tensor unkeyed = Tensor::empty({1000}, DType::F32);
  EXPECT_NE(unkeyed.raw_data(), freed) << "memory of another key cannot take it";
  ops::fill(*s, next, std::nanf(""));  // ordered after the scale that reads the block
  gate.open();
  s->synchronize();
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(out.at<float>(i), 3.f * x.at<float>(i));
}

// The misuse the rule forbids shows on the CPU as it would on a GPU: memory used by a stream's
// queued work but keyed elsewhere (here: long-lived, nullptr), let go of without an event that
// orders the uses, is handed to the next allocation of its key, which overwrites what the
// queued work reads. (With queued closures owning their tensors, this bug could not show here.)
TEST_F(OpsDispatch, AReleaseNotOrderedAfterQueuedWorkCorruptsItAsOnAGpu) {
  Tensor out = Tensor::empty({1000}, DType::F32);
  Gate gate(*s);
  void* freed = nullptr;
  {
    Tensor x = random_tensor({1000}, 40);
    ops::scale(*s, 3.f, x, out);
    freed = x.raw_data();
  }
  // Cached blocks of the size left by earlier tests may come first: take them all until x's.
  std::vector<Tensor> junk;
  while (junk.size() < 256 && (junk.empty() || junk.back().raw_data() != freed)) {
    junk.push_back(Tensor::empty({1000}, DType::F32));
    for (int i = 0; i < 1000; ++i) junk.back().at<float>(i) = std::nanf("");
  }
  ASSERT_EQ(junk.back().raw_data(), freed);
  gate.open();
  s->synchronize();
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(std::isnan(out.at<float>(i))) << i;
}

}  // namespace

// The tensor-core main loop switch (engine/ops.h): names round-trip, a wrong name is refused
// with the accepted ones, and a build without CUDA says it has none.
TEST(TensorCoreMainloop, SelectionRoundTripsAndRefusesBadNames) {
  const std::string before = ops::tensor_core_mainloop();
  if (!STALEPROP_WITH_CUDA) {
    EXPECT_EQ(before, "none");
    EXPECT_EQ(ops::tensor_core_mainloop_in_use(), "none");
    EXPECT_FALSE(ops::wgmma_available());
    try {
      ops::set_tensor_core_mainloop("wgmma");
      ADD_FAILURE() << "selecting a main loop without CUDA must throw";
    } catch (const sp::Error& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA backend"), std::string::npos) << e.what();
    }
    return;
  }
  EXPECT_TRUE(before == "auto" || before == "mma_sync" || before == "wgmma" || before == "wgmma_tma") << before;
  for (const char* name : {"wgmma", "wgmma_tma", "auto", "mma_sync"}) {  // selecting is allowed anywhere; running needs sm_90a
    ops::set_tensor_core_mainloop(name);
    EXPECT_EQ(ops::tensor_core_mainloop(), name);
  }
  // An explicit choice is what runs; auto resolves per device (wgmma_tma on sm_90a, else mma_sync), and
  // without a GPU nothing runs.
  if (cuda_device_count() == 0) {
    EXPECT_EQ(ops::tensor_core_mainloop_in_use(), "none");
  } else {
    EXPECT_EQ(ops::tensor_core_mainloop_in_use(), "mma_sync");
    ops::set_tensor_core_mainloop("auto");
    EXPECT_EQ(ops::tensor_core_mainloop_in_use(), ops::wgmma_available() ? "wgmma_tma" : "mma_sync");
    ops::set_tensor_core_mainloop("mma_sync");
  }
  try {
    ops::set_tensor_core_mainloop("hgmma");
    ADD_FAILURE() << "an unknown main loop must throw";
  } catch (const sp::Error& e) {
    EXPECT_NE(std::string(e.what()).find("use auto, mma_sync, wgmma or wgmma_tma"), std::string::npos) << e.what();
  }
  EXPECT_EQ(ops::tensor_core_mainloop(), "mma_sync") << "a refused name leaves the selection as it was";
  ops::set_tensor_core_mainloop(before);
}
