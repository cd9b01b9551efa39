// The decoupled pipeline scheduler on the CPU emulation of streams and events:
//  (a) K = 1 equals plain backprop bit for bit, in every method, and so does bp over K = 2..4;
//  (b) for K = 2, 3, 4 and each method, the parameters (BN buffers and counters included) after
//      two epochs equal, bit for bit, a plainly written sequential simulation of the
//      delayed-gradient recurrence (same data order, the same ops in the same order); so do runs
//      with weight stashing, with recomputation, and with staleness jitter (the simulation
//      taking the backward ticks from the run's ledger);
//  (c) random delays injected into the CPU streams do not change a single bit (also with weight
//      stashing, recomputation and staleness jitter);
//  (e) every batch of an epoch is forwarded once and back-propagated once by every module,
//      d_k ticks apart, across several epochs (fill and drain included);
//  before_step, data parallelism's insertion point: its work runs between each backward and
//      the optimizer step that follows it;
//  graphs: replaying captured ticks (the CPU emulation of CUDA graphs: the same closures on the
//      same arena addresses) changes no bit against enqueueing every op, in every method and
//      K, with and without injected delays.
// (d), ThreadSanitizer, runs this file in the TSan build of tools/run_tests.sh.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "engine/allocator.h"
#include "engine/checkpoint.h"
#include "engine/op_profile.h"
#include "engine/ops.h"
#include "engine/pipeline.h"
#include "engine/trainer.h"
#include "kernels/common/error.h"
#include "layers/layers.h"
#include "tests/error_testing.h"

using namespace sp;
using namespace sp::layers;

namespace {

constexpr int kClasses = 10;

// Five blocks (stem, three residual blocks with both shortcut kinds, head): cut points 1..4.
Network mini_resnet(uint64_t seed) {
  Rng rng(seed);
  Network net("mini");
  auto stem = std::make_unique<Sequential>();
  stem->add("conv1", std::make_unique<Conv2d>(3, 8, 3, 1, 1, false, rng));
  stem->add("bn1", std::make_unique<BatchNorm2d>(8));
  stem->add("relu", std::make_unique<ReLU>());
  net.add("", std::move(stem));
  net.add("layer1.0", std::make_unique<BasicBlock>(8, 8, 1, Shortcut::A, rng));
  net.add("layer2.0", std::make_unique<BasicBlock>(8, 16, 2, Shortcut::A, rng));
  net.add("layer3.0", std::make_unique<BasicBlock>(16, 16, 2, Shortcut::B, rng));
  auto head = std::make_unique<Sequential>();
  head->add("avgpool", std::make_unique<GlobalAvgPool>());
  head->add("linear", std::make_unique<Linear>(16, kClasses, rng));
  net.add("", std::move(head));
  return net;
}

struct Batches {
  std::vector<Tensor> images, labels;
};

// n batches of `rows` 8x8 images (the last one smaller when `last_rows` > 0).
Batches make_batches(int n, int rows, int last_rows, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  Batches b;
  for (int i = 0; i < n; ++i) {
    const int r = (i == n - 1 && last_rows > 0) ? last_rows : rows;
    Tensor x = Tensor::empty({r, 8, 8, 3}, DType::F32), y = Tensor::empty({r}, DType::I32);
    for (int64_t j = 0; j < x.numel(); ++j) x.at<float>(j) = g(rng);
    for (int j = 0; j < r; ++j) y.at<int32_t>(j) = int32_t(rng() % kClasses);
    b.images.push_back(x);
    b.labels.push_back(y);
  }
  return b;
}

PipelineTrainer::BatchSource source_of(const Batches& b) {
  auto next = std::make_shared<size_t>(0);
  return [&b, next](Tensor* x, Tensor* y) {
    if (*next >= b.images.size()) return false;
    *x = b.images[*next];
    *y = b.labels[*next];
    ++*next;
    return true;
  };
}

float lr_at(int64_t step) { return 0.05f * (1.f + 0.1f * float(step)); }

std::vector<float> flat_params(const Network& net) {
  std::vector<float> out;
  for (auto& [name, p] : net.state().params)
    out.insert(out.end(), p->value.data<float>(), p->value.data<float>() + p->value.numel());
  for (auto& [name, b] : net.state().buffers) out.insert(out.end(), b->data<float>(), b->data<float>() + b->numel());
  // The BN batch counters too (small whole numbers, exact in a float): one counted twice or not
  // restored after a recomputation differs by 1.
  for (auto& [name, c] : net.state().counters) out.push_back(float(*c));
  return out;
}

PipelineConfig config(PipelineMethod m, std::vector<size_t> cuts, float shrink = 1.f) {
  PipelineConfig c;
  c.method = m;
  c.cuts = std::move(cuts);
  c.shrink = shrink;
  c.sgd = SgdConfig{0.9f, 5e-4f, false};
  return c;
}

std::vector<float> run_pipeline(const PipelineConfig& c, const Batches& b, int epochs = 1, uint64_t seed = 1,
                                size_t* peak_saved_bytes = nullptr) {
  Network net = mini_resnet(seed);
  PipelineTrainer p(net, c);
  for (int e = 0; e < epochs; ++e) {
    const PipelineEpochStats st = p.run_epoch(source_of(b), lr_at);
    if (peak_saved_bytes) *peak_saved_bytes = st.peak_saved_bytes;
  }
  return flat_params(net);
}

// ---- The plainly written sequential simulation ---------------------------------------------
// Module k (0-based) forwards batch b at tick b + a*k and back-propagates it d_k = (a+g)(K-1-k)
// ticks later, a / g being the ticks an activation / a gradient takes per hop (bp 0/0,
// ddg 0/1, fdg 1/1). Within a tick: fdg runs the backward events (and steps) before the
// forward events; ddg and bp run forwards (ascending k) before backwards (descending k). The
// last module back-propagates right after its forward and loss. Everything runs in that order
// on one stream, with no queues or events. Epochs follow each other with the weights, momenta
// and step counts carried over, each filling and draining on its own (ticks from 0).
struct SimOptions {
  // A module k < K back-propagates through a copy of the weights it had at the batch's forward
  // (then steps its current weights).
  bool stash = false;
  // A module k < K keeps only the batch's input and, just before the backward, forwards it
  // again (through the weights of that moment, or the stashed ones) to rebuild what the
  // backward reads, leaving the BN running statistics and counters as they were.
  bool recompute = false;
  // Where given (one epoch): each backward's tick, from a run's ledger (staleness jitter),
  // instead of b + a*k + d_k. The forwards keep their ticks.
  const std::vector<PipelineEvent>* ledger = nullptr;
  int epochs = 1;
};

std::vector<float> simulate(PipelineMethod m, const std::vector<size_t>& cuts, const Batches& data, float shrink,
                            const SimOptions& o = {}) {
  Network net = mini_resnet(1);
  const int K = int(cuts.size()) + 1;
  const int a = m == PipelineMethod::FDG ? 1 : 0, g = m == PipelineMethod::BP ? 0 : 1;
  std::vector<size_t> first = {0}, last;
  for (size_t c : cuts) first.push_back(c);
  for (int k = 0; k < K; ++k) last.push_back(k + 1 < K ? first[size_t(k) + 1] : net.size());
  auto s = make_stream(Device::cpu());
  // Temporaries of the queued work are keyed to the stream, as the trainer's are: dropped on the
  // host with work still queued on them, they are reused only in the stream's order (of the null
  // key, the host's next allocation could take them first; STALEPROP_ALLOC_POISON showed it).
  const auto temporary = [&](const Shape& shape, DType dtype) {
    return Tensor::empty(shape, dtype, Device::cpu(), s.get());
  };
  std::vector<std::unique_ptr<Sgd>> opt;
  std::vector<int64_t> steps(size_t(K), 0);
  for (int k = 0; k < K; ++k)
    opt.push_back(std::make_unique<Sgd>(net.state(first[size_t(k)], last[size_t(k)]).params,
                                        SgdConfig{0.9f, 5e-4f, false}, *s));
  const int nb = int(data.images.size());
  std::map<std::pair<int, int>, int64_t> ledger_bwd;  // (module, batch) -> tick of its backward
  if (o.ledger) {
    EXPECT_EQ(o.epochs, 1) << "a ledger holds one epoch";
    for (const PipelineEvent& e : *o.ledger)
      if (e.backward) ledger_bwd[{e.module, int(e.batch)}] = e.tick;
  }
  // (tick, phase, order within the phase, module, batch, is_backward)
  std::vector<std::tuple<int64_t, int, int, int, int, bool>> events;
  for (int b = 0; b < nb; ++b)
    for (int k = 0; k < K; ++k) {
      const int64_t f = b + a * k, d = int64_t(a + g) * (K - 1 - k);
      const int fwd_phase = m == PipelineMethod::FDG ? 1 : 0, bwd_phase = 1 - fwd_phase;
      events.emplace_back(f, fwd_phase, k, k, b, false);
      if (k < K - 1)
        events.emplace_back(o.ledger ? ledger_bwd.at({k, b}) : f + d, bwd_phase, m == PipelineMethod::FDG ? k : K - k,
                            k, b, true);
    }
  std::sort(events.begin(), events.end());
  std::map<std::pair<int, int>, Tensor> act, grad, input;  // (module, batch) -> output / input gradient / input
  std::map<std::pair<int, int>, std::vector<Context>> ctx;
  std::map<std::pair<int, int>, std::vector<Tensor>> stashed;
  auto module_params = [&](int k) {
    std::vector<Parameter*> ps;
    for (auto& [name, p] : net.state(first[size_t(k)], last[size_t(k)]).params) ps.push_back(p);
    return ps;
  };
  auto forward = [&](int k, Tensor h, std::vector<Context>& c) {
    c.clear();
    c.resize(last[size_t(k)] - first[size_t(k)]);
    for (size_t i = first[size_t(k)]; i < last[size_t(k)]; ++i)
      h = net.block(i).forward(*s, h, c[i - first[size_t(k)]]);
    return h;
  };
  net.set_training(true);
  auto backward = [&](int k, int b, Tensor dy) {
    auto& c = ctx[{k, b}];
    std::vector<Tensor>& w = stashed[{k, b}];
    std::vector<Parameter*> ps = module_params(k);
    for (size_t i = 0; i < w.size(); ++i) std::swap(ps[i]->value, w[i]);
    if (o.recompute && k < K - 1) {
      const ModuleState state = net.state(first[size_t(k)], last[size_t(k)]);
      std::vector<Tensor> buffers;
      std::vector<int64_t> counts;
      for (auto& [name, buf] : state.buffers) {
        buffers.push_back(temporary(buf->shape(), buf->dtype()));
        ops::copy(*s, *buf, buffers.back());
      }
      for (auto& [name, n] : state.counters) counts.push_back(*n);
      forward(k, input.at({k, b}), c);
      for (size_t i = 0; i < buffers.size(); ++i) ops::copy(*s, buffers[i], *state.buffers[i].second);
      for (size_t i = 0; i < counts.size(); ++i) *state.counters[i].second = counts[i];
    }
    for (size_t i = last[size_t(k)]; i-- > first[size_t(k)];)
      dy = net.block(i).backward(*s, dy, c[i - first[size_t(k)]], i > first[size_t(k)] || k > 0);
    for (size_t i = 0; i < w.size(); ++i) std::swap(ps[i]->value, w[i]);
    if (k > 0) grad[{k - 1, b}] = dy;
    opt[size_t(k)]->step(*s, lr_at(steps[size_t(k)]++));
  };
  for (int epoch = 0; epoch < o.epochs; ++epoch) {
    act.clear(), grad.clear(), input.clear(), ctx.clear(), stashed.clear();
    for (auto& [tick, phase, order, k, b, is_bwd] : events) {
      if (is_bwd) {
        Tensor dy = grad.at({k, b});
        ops::scale(*s, shrink, dy, dy);
        backward(k, b, dy);
        continue;
      }
      Tensor h = k == 0 ? data.images[size_t(b)] : act.at({k - 1, b});
      input[{k, b}] = h;
      if (o.stash && k < K - 1)
        for (Parameter* p : module_params(k)) {
          Tensor copy = temporary(p->value.shape(), DType::F32);
          ops::copy(*s, p->value, copy);
          stashed[{k, b}].push_back(copy);
        }
      h = forward(k, h, ctx[{k, b}]);
      act[{k, b}] = h;
      if (k == K - 1) {
        Tensor loss = temporary({1}, DType::F32), correct = temporary({1}, DType::I32);
        Tensor dlogits = temporary(h.shape(), DType::F32);
        ops::softmax_cross_entropy(*s, h, data.labels[size_t(b)], 0.f, loss, dlogits, correct);
        backward(k, b, dlogits);
      }
    }
  }
  s->synchronize();
  return flat_params(net);
}

// The largest difference relative to 1 + |y|; infinite where a value is not finite (a run that
// diverged differs from everything, itself included).
double max_rel_diff(const std::vector<float>& x, const std::vector<float>& y) {
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i]) || !std::isfinite(y[i])) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, std::abs(double(x[i]) - double(y[i])) / (1.0 + std::abs(double(y[i]))));
  }
  return worst;
}

// The same parameters bit for bit (-0 is not +0), and finite.
::testing::AssertionResult same_bits(const std::vector<float>& x, const std::vector<float>& y) {
  if (x.size() != y.size()) return ::testing::AssertionFailure() << x.size() << " vs " << y.size() << " values";
  for (size_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x[i])) return ::testing::AssertionFailure() << "value " << i << " is " << x[i];
  if (std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) != 0)
    return ::testing::AssertionFailure() << "the values differ, by up to " << max_rel_diff(x, y) << " (relative)";
  return ::testing::AssertionSuccess();
}

const PipelineMethod kMethods[] = {PipelineMethod::BP, PipelineMethod::DDG, PipelineMethod::FDG};

TEST(Pipeline, OneModuleIsPlainBackpropBitForBit) {
  const Batches data = make_batches(5, 4, 3, 21);
  // Plain backprop with the same learning rates.
  Network ref = mini_resnet(1);
  auto s = make_stream(Device::cpu());
  Sgd opt(ref.state().params, SgdConfig{0.9f, 5e-4f, false}, *s);
  BackpropTrainer bp(ref, opt, *s, 0.f);
  for (size_t i = 0; i < data.images.size(); ++i) bp.train_step(data.images[i], data.labels[i], lr_at(int64_t(i)));
  bp.drain_stats();
  const std::vector<float> expected = flat_params(ref);
  for (PipelineMethod m : kMethods) {
    const std::vector<float> got = run_pipeline(config(m, {}), data);
    ASSERT_EQ(got.size(), expected.size());
    EXPECT_EQ(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)), 0) << pipeline_method_name(m);
  }
  // Locked backprop over several modules is plain backprop too, bit for bit: an oracle for the
  // queues and the cut network that shares nothing with the sequential simulation below.
  for (const std::vector<size_t>& cuts : {std::vector<size_t>{2}, {1, 3}, {1, 2, 4}}) {
    const std::vector<float> got = run_pipeline(config(PipelineMethod::BP, cuts), data);
    ASSERT_EQ(got.size(), expected.size());
    EXPECT_EQ(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)), 0)
        << "bp over " << cuts.size() + 1 << " modules";
  }
}

// A slow stream (injected delays) lets the host run far ahead unless the trainer holds it back:
// when train_step(j) returns, step j - 2 has run. A marker queued after each step counts the
// steps the stream has finished (marker i runs after step i).
TEST(Pipeline, PlainBackpropKeepsTheHostAtMostTwoStepsAhead) {
  const Batches data = make_batches(10, 32, 0, 5);
  Network net = mini_resnet(1);
  auto s = make_stream(Device::cpu(), {1500, 2});
  Sgd opt(net.state().params, SgdConfig{0.9f, 0.f, false}, *s);
  BackpropTrainer bp(net, opt, *s, 0.f);
  std::atomic<int> finished{0};
  for (size_t j = 0; j < data.images.size(); ++j) {
    bp.train_step(data.images[j], data.labels[j], 0.01f);
    // Step j - 2 ended before this returned, and with it every marker before it (i < j - 2).
    if (j >= 2) {
      EXPECT_GE(finished.load(), int(j) - 2) << "after step " << j;
    }
    s->enqueue_host([&finished] { ++finished; });
  }
  EXPECT_FALSE(s->query()) << "the stream should still be busy: the test needs a host that could run ahead";
  EXPECT_LT(finished.load(), int(data.images.size()) - 1) << "the host did not get ahead at all";
  EXPECT_EQ(bp.drain_stats().samples, 10 * 32);
  s->synchronize();
  EXPECT_EQ(finished.load(), int(data.images.size()));
}

// Mixed precision through the pipeline: bf16 activations and gradients travel through the
// queues. One module is bf16 backprop bit for bit; K = 3 decoupled training in bf16 stays
// close to fp32 but is not the fp32 run.
TEST(Pipeline, Bf16ActivationsAndGradientsFlowThroughTheQueues) {
  const Batches data = make_batches(5, 4, 3, 23);
  Network ref = mini_resnet(1);
  auto s = make_stream(Device::cpu());
  Sgd opt(ref.state().params, SgdConfig{0.9f, 5e-4f, false}, *s);
  BackpropTrainer bp(ref, opt, *s, 0.f, DType::BF16);
  for (size_t i = 0; i < data.images.size(); ++i) bp.train_step(data.images[i], data.labels[i], lr_at(int64_t(i)));
  bp.drain_stats();
  const std::vector<float> expected = flat_params(ref);
  PipelineConfig one = config(PipelineMethod::FDG, {});
  one.activation_dtype = DType::BF16;
  const std::vector<float> got = run_pipeline(one, data);
  ASSERT_EQ(got.size(), expected.size());
  EXPECT_EQ(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)), 0);

  PipelineConfig fdg = config(PipelineMethod::FDG, {1, 3}, 0.5f);
  const std::vector<float> f32 = run_pipeline(fdg, data);
  fdg.activation_dtype = DType::BF16;
  const std::vector<float> bf16 = run_pipeline(fdg, data);
  // The bf16 run takes the fp32 run's path: it ends far closer to it than either is to the
  // start (the weights move by the updates; bf16 perturbs the updates by bf16 rounding).
  const std::vector<float> start = flat_params(mini_resnet(1));
  const double moved = max_rel_diff(f32, start), apart = max_rel_diff(bf16, f32);
  EXPECT_GT(apart, 0.0);
  EXPECT_LE(apart, 0.2 * moved) << "bf16 vs fp32 " << apart << ", fp32 vs start " << moved;
}

class PipelineVsSimulation : public ::testing::TestWithParam<std::tuple<PipelineMethod, int>> {};

TEST_P(PipelineVsSimulation, ParametersMatchTheSequentialRecurrence) {
  const auto [method, K] = GetParam();
  const std::vector<size_t> cuts = K == 2 ? std::vector<size_t>{2} : K == 3 ? std::vector<size_t>{1, 3}
                                                                            : std::vector<size_t>{1, 2, 4};
  // Two epochs of 9 batches (the last one partial): module 1 of fdg K = 4 is 6 ticks behind, so
  // the steady state is reached, and what an epoch carries into the next (momenta, step counts
  // and so learning rates, queue slots whose ticks start again at 0) meets the simulation too.
  const Batches data = make_batches(9, 4, 2, 22);
  const float beta = 0.5f;
  SimOptions two;
  two.epochs = 2;
  const std::vector<float> got = run_pipeline(config(method, cuts, beta), data, 2);
  const std::vector<float> want = simulate(method, cuts, data, beta, two);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_TRUE(same_bits(got, want)) << pipeline_method_name(method) << " K=" << K;
  // The staleness matters: decoupled training differs from locked backprop with the same shrink
  // (so this test can tell the methods apart by their delays alone).
  if (method != PipelineMethod::BP) {
    EXPECT_GT(max_rel_diff(got, simulate(PipelineMethod::BP, cuts, data, beta, two)), 1e-4);
  }
}

INSTANTIATE_TEST_SUITE_P(MethodsAndDepths, PipelineVsSimulation,
                         ::testing::Combine(::testing::ValuesIn(kMethods), ::testing::Values(2, 3, 4)),
                         [](const auto& info) {
                           return std::string(pipeline_method_name(std::get<0>(info.param))) + "_K" +
                                  std::to_string(std::get<1>(info.param));
                         });

TEST(Pipeline, InjectedStreamDelaysChangeNoBit) {
  const Batches data = make_batches(6, 4, 0, 23);
  auto same_with_delays = [&](const PipelineConfig& quiet, const std::string& what) {
    PipelineConfig noisy = quiet;
    noisy.stream_options.jitter_max_us = 300;
    noisy.stream_options.seed = 77;
    const std::vector<float> a = run_pipeline(quiet, data, 2);
    const int64_t before = cpu_stream_jittered_closures();
    const std::vector<float> b = run_pipeline(noisy, data, 2);
    EXPECT_GT(cpu_stream_jittered_closures() - before, 100) << what << ": delays were injected";
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what;
  };
  for (PipelineMethod m : kMethods) same_with_delays(config(m, {1, 2, 4}, 0.5f), pipeline_method_name(m));
  // The paths with work of their own on the streams: weight stashing (copies of the weights at
  // each forward, swapped in for the backward), recomputation (BN buffers saved and restored
  // around the second forward) and staleness jitter (gradients held back for later ticks).
  PipelineConfig c = config(PipelineMethod::FDG, {1, 2, 4}, 0.5f);
  c.weight_stash = true;
  same_with_delays(c, "fdg with weight stashing");
  c.recompute = true;
  same_with_delays(c, "fdg with weight stashing and recomputation");
  c.weight_stash = false;
  same_with_delays(c, "fdg with recomputation");
  c = config(PipelineMethod::DDG, {1, 2, 4}, 0.5f);
  c.staleness_jitter = 2;
  c.jitter_seed = 9;
  same_with_delays(c, "ddg with staleness jitter");
}

// A queue slot grows when a larger batch comes than any before it (here one of 6 rows after
// batches of 4, which set the graphs' full shape): the producer waits until the slot's last read
// is done and drops the graphs that address the old buffers before it replaces them. With delays
// injected into the streams, op by op and with graphs (captured before the growth, and again
// after it), the run equals the sequential simulation bit for bit.
TEST(Pipeline, QueueSlotsGrowingForALargerBatchChangeNoBit) {
  Batches data = make_batches(6, 4, 0, 51);
  const Batches big = make_batches(1, 6, 0, 52), rest = make_batches(8, 4, 3, 53);
  data.images.insert(data.images.end(), big.images.begin(), big.images.end());
  data.labels.insert(data.labels.end(), big.labels.begin(), big.labels.end());
  data.images.insert(data.images.end(), rest.images.begin(), rest.images.end());
  data.labels.insert(data.labels.end(), rest.labels.begin(), rest.labels.end());
  SimOptions two;
  two.epochs = 2;
  const std::vector<float> want = simulate(PipelineMethod::FDG, {1, 3}, data, 0.5f, two);
  // The same run with a batch of 4 in the big one's place: no slot grows, no graph is dropped.
  Batches even = data;
  even.images[6] = data.images[7], even.labels[6] = data.labels[7];
  const auto run = [&](const Batches& d, bool graphs, PipelineGraphStats* stats) {
    PipelineConfig c = config(PipelineMethod::FDG, {1, 3}, 0.5f);
    c.graphs = graphs;
    c.stream_options.jitter_max_us = 300;
    c.stream_options.seed = 5;
    Network net = mini_resnet(1);
    PipelineTrainer p(net, c);
    for (int e = 0; e < 2; ++e) p.run_epoch(source_of(d), lr_at);
    if (stats) *stats = p.graph_stats();
    return flat_params(net);
  };
  EXPECT_TRUE(same_bits(run(data, false, nullptr), want)) << "op by op";
  PipelineGraphStats grown, control;
  EXPECT_TRUE(same_bits(run(data, true, &grown), want)) << "with graphs";
  run(even, true, &control);
  EXPECT_GT(grown.replays, 0);
  EXPECT_GT(control.replays, 0);
  EXPECT_GT(grown.captured, control.captured) << "the graphs addressing the old buffers were not captured again";
}

TEST(Pipeline, EveryBatchIsForwardedAndBackpropagatedOncePerModulePerEpoch) {
  const Batches data = make_batches(6, 4, 1, 24);
  for (PipelineMethod m : kMethods) {
    Network net = mini_resnet(1);
    PipelineTrainer p(net, config(m, {1, 2, 4}));
    const int K = p.num_modules();
    ASSERT_EQ(K, 4);
    for (int epoch = 0; epoch < 2; ++epoch) {
      p.clear_ledger();
      const PipelineEpochStats st = p.run_epoch(source_of(data), lr_at);
      EXPECT_EQ(st.train.samples, 4 * 5 + 1);
      // Fill and drain: the last batch enters at tick 5 and leaves module 1 d_1 ticks later.
      EXPECT_EQ(st.ticks, 6 + p.delay(0)) << pipeline_method_name(m);
      std::map<std::tuple<int, int64_t, bool>, std::vector<int64_t>> seen;  // (module, batch, bwd) -> ticks
      for (const PipelineEvent& e : p.ledger()) seen[{e.module, e.batch, e.backward}].push_back(e.tick);
      for (int k = 0; k < K; ++k)
        for (int64_t b = 0; b < 6; ++b) {
          const auto& f = seen[{k, b, false}];
          const auto& g = seen[{k, b, true}];
          ASSERT_EQ(f.size(), 1u) << "module " << k << " batch " << b;
          ASSERT_EQ(g.size(), 1u) << "module " << k << " batch " << b;
          EXPECT_EQ(g[0] - f[0], p.delay(k));
        }
      EXPECT_EQ(p.ledger().size(), size_t(2 * K * 6));
      EXPECT_EQ(st.busy_ms.size(), size_t(K));
      EXPECT_GT(st.peak_saved_bytes, 0u);
    }
    for (int k = 0; k < K; ++k) EXPECT_EQ(p.steps(k), 12);
  }
}

// Epochs of different lengths, shorter than the pipeline is deep, and empty: each epoch fills
// and drains on its own. A message of an earlier epoch never passes for one of the next, whose
// ticks start again at 0 (a 1-batch epoch after a 4-batch one could see the old epoch's tick-3
// activation in the slot it reads at tick 4... had the slots kept it).
TEST(Pipeline, EpochsOfAnyLengthEachRunEveryBatchOnce) {
  const Batches data = make_batches(4, 4, 0, 25);
  const int lengths[] = {4, 1, 0, 3, 1, 4};
  for (PipelineMethod m : kMethods) {
    Network net = mini_resnet(1);
    PipelineTrainer p(net, config(m, {1, 2, 4}));
    const int K = p.num_modules();
    ASSERT_EQ(K, 4);
    int64_t total = 0;
    for (const int n : lengths) {
      p.clear_ledger();
      Batches part;
      part.images.assign(data.images.begin(), data.images.begin() + n);
      part.labels.assign(data.labels.begin(), data.labels.begin() + n);
      const PipelineEpochStats st = p.run_epoch(source_of(part), lr_at);
      total += n;
      EXPECT_EQ(st.train.samples, 4 * n) << pipeline_method_name(m) << ", epoch of " << n;
      std::map<std::tuple<int, int64_t, bool>, int> seen;
      for (const PipelineEvent& e : p.ledger()) ++seen[{e.module, e.batch, e.backward}];
      for (int k = 0; k < K; ++k)
        for (int64_t b = 0; b < n; ++b)
          for (const bool bwd : {false, true})
            EXPECT_EQ((seen[{k, b, bwd}]), 1) << pipeline_method_name(m) << ", epoch of " << n << ", module " << k
                                              << ", batch " << b << (bwd ? " backward" : " forward");
      EXPECT_EQ(p.ledger().size(), size_t(2 * K * n)) << pipeline_method_name(m) << ", epoch of " << n;
    }
    for (int k = 0; k < K; ++k) EXPECT_EQ(p.steps(k), total) << pipeline_method_name(m);
  }
}

// --devices: the modules on (emulated) devices, none of them the one the network was built on. The blocks move to their module's device, the queues copy across devices with
// events of the right devices (a stream records only its own device's events), and the
// evaluation hands the activations from device to device; with random stream delays, every
// bit must equal the one-device run.
TEST(Pipeline, ModulesOnSeparateDevicesChangeNoBit) {
  const Batches data = make_batches(7, 4, 3, 29);
  // Enough held-out batches that module 1 reuses the memory of an activation it handed on
  // (a missing wait for the receiver's copy then changes the evaluation).
  const Batches held_out = make_batches(8, 4, 2, 31);
  // Modules 2 and 3 share a device (streams of one device, one timing origin).
  const std::vector<Device> layout = {Device::cpu(1), Device::cpu(2), Device::cpu(2), Device::cpu(3)};
  for (PipelineMethod m : kMethods) {
    auto run = [&](bool spread, bool graphs = false) {
      PipelineConfig c = config(m, {1, 2, 4}, 0.5f);
      c.graphs = graphs;
      if (spread) {
        c.devices = layout;
        c.stream_options.jitter_max_us = 200;
        c.stream_options.seed = 5;
      }
      Network net = mini_resnet(1);
      PipelineTrainer p(net, c);
      std::vector<float> losses;
      for (int e = 0; e < 2; ++e) {
        const PipelineEpochStats st = p.run_epoch(source_of(data), lr_at);
        losses.push_back(float(st.train.loss_sum));
        // Each device's stages count from its first module's epoch start, which precedes them.
        for (const StageTiming& t : st.stages) EXPECT_GE(t.start_ms, 0.0) << t.stage << " of module " << t.module + 1;
      }
      const StepStats ev = p.evaluate(source_of(held_out));
      EXPECT_EQ(ev.samples, 7 * 4 + 2);
      losses.push_back(float(ev.loss_sum));
      losses.push_back(float(ev.correct));
      if (spread)
        for (int k = 0; k < 4; ++k) {
          const auto [first, last] = p.blocks(k);
          for (size_t b = first; b < last; ++b) {
            ModuleState block;
            net.block(b).collect("", block);
            for (auto& [name, param] : block.params)
              EXPECT_EQ(param->value.device(), layout[size_t(k)]) << name << " of module " << k + 1;
          }
        }
      std::vector<float> out = flat_params(net);
      out.insert(out.end(), losses.begin(), losses.end());
      return out;
    };
    std::vector<size_t> orphaned;
    for (const Device& d : layout) orphaned.push_back(device_allocator(d).stats().orphaned_bytes);
    const int64_t jittered = cpu_stream_jittered_closures();
    const std::vector<float> one = run(false), spread = run(true);
    EXPECT_GT(cpu_stream_jittered_closures() - jittered, 100) << "delays were injected";
    ASSERT_EQ(one.size(), spread.size());
    EXPECT_EQ(std::memcmp(one.data(), spread.data(), one.size() * sizeof(float)), 0) << pipeline_method_name(m);
    // Captured ticks replay on their module's device.
    const std::vector<float> replayed = run(true, true);
    EXPECT_EQ(std::memcmp(one.data(), replayed.data(), one.size() * sizeof(float)), 0)
        << pipeline_method_name(m) << " with graphs";
    // A run lets go of its memory before its streams are destroyed: none is left unusable.
    for (size_t i = 0; i < layout.size(); ++i)
      EXPECT_EQ(device_allocator(layout[i]).stats().orphaned_bytes, orphaned[i]) << layout[i].str();
  }
}

// Data parallelism's insertion point (PipelineConfig::before_step): called once for each
// backward of each module, with the module's parameters, and what it enqueues on the module's
// stream runs after the backward has written the gradients and before the optimizer step reads
// them. Here it halves every gradient, which must give the bits of the optimizer's own
// grad_scale 0.5 (an exact scaling either way), in every method and K = 1..3, op by op with
// injected delays and replayed from graphs. Work placed before the backward's last write or
// after the step would not match.
TEST(Pipeline, BeforeStepWorkRunsBetweenEachBackwardAndItsStep) {
  const Batches data = make_batches(9, 4, 3, 41);
  for (PipelineMethod m : kMethods)
    for (const std::vector<size_t>& cuts : {std::vector<size_t>{}, std::vector<size_t>{2}, std::vector<size_t>{1, 3}})
      for (bool graphs : {false, true}) {
        SCOPED_TRACE(::testing::Message() << pipeline_method_name(m) << ", K=" << cuts.size() + 1
                                          << (graphs ? ", graphs" : ", injected delays"));
        PipelineConfig c = config(m, cuts);
        c.graphs = graphs;
        if (!graphs) {
          c.stream_options.jitter_max_us = 200;
          c.stream_options.seed = 3;
        }
        const auto run = [&](const PipelineConfig& cfg, std::map<int, int>* calls) {
          Network net = mini_resnet(1);
          PipelineTrainer p(net, cfg);
          for (int e = 0; e < 2; ++e) {
            p.run_epoch(source_of(data), lr_at);
            if (!calls) continue;
            // Op by op, one call per backward of the epoch; from graphs, at most that (a
            // replayed unit does not call it again).
            std::map<int, int> backwards;
            for (const PipelineEvent& ev : p.ledger()) backwards[ev.module] += ev.backward;
            for (auto& [module, n] : backwards) {
              if (graphs) {
                EXPECT_LE((*calls)[module], n * (e + 1)) << "module " << module + 1;
              } else {
                EXPECT_EQ((*calls)[module], n * (e + 1)) << "module " << module + 1;
              }
            }
          }
          if (graphs) {
            EXPECT_GT(p.graph_stats().replays, 0);
          }
          return flat_params(net);
        };
        PipelineConfig scaled = c;
        scaled.grad_scale = 0.5f;
        PipelineConfig hooked = c;
        std::map<int, int> calls;
        hooked.before_step = [&calls](int module, Stream& s, const std::vector<Parameter*>& params) {
          ++calls[module];
          for (Parameter* p : params) ops::scale(s, 0.5f, p->grad, p->grad);
        };
        const std::vector<float> want = run(scaled, nullptr);
        const std::vector<float> got = run(hooked, &calls);
        EXPECT_EQ(calls.size(), cuts.size() + 1);
        ASSERT_EQ(want.size(), got.size());
        EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0);
        EXPECT_NE(run(c, nullptr), want) << "halving the gradients changes the run";
      }
}

// Each unit of work is timed by two events; read once its tick has completed, they are recorded
// again later, so only the first ticks create events.
TEST(Pipeline, TimingEventsAreReusedOnceRead) {
  const Batches data = make_batches(10, 4, 0, 37);
  for (PipelineMethod m : kMethods) {
    Network net = mini_resnet(1);
    PipelineTrainer p(net, config(m, {1, 3}));
    for (int e = 0; e < 2; ++e) {
      const PipelineEpochStats st = p.run_epoch(source_of(data), lr_at);
      // Every batch: a forward in each of the 3 modules, a backward in the lower 2, and an
      // optimizer step in each.
      ASSERT_EQ(st.stages.size(), 10u * 8u) << pipeline_method_name(m);
      std::map<std::string, int> by_stage;
      for (const StageTiming& t : st.stages) {
        EXPECT_GE(t.duration_ms, 0.0);
        ++by_stage[t.stage];
      }
      EXPECT_EQ(by_stage, (std::map<std::string, int>{{"fwd", 20}, {"bwd", 20}, {"fwd+loss+bwd", 10}, {"step", 30}}));
      // Unread while tick t is enqueued: ticks t-1 and t (it reads those up to t-2 first), at
      // most three stages per module and tick (forward, backward, step), two events each.
      if (e == 0) {
        EXPECT_GT(st.timing_events_made, 0) << pipeline_method_name(m);
        EXPECT_LE(st.timing_events_made, 2 * 3 * 2 * 3) << pipeline_method_name(m);
      } else {
        EXPECT_EQ(st.timing_events_made, 0) << pipeline_method_name(m);
      }
    }
  }
}

// The host's waits on the streams lie within the epoch's wall time, and where the streams are
// the bottleneck (up to 2 ms of injected delay before each of their closures) they take most of
// it: the host keeps the streams two ticks ahead and waits for the tick two back to end.
TEST(Pipeline, HostWaitShowsWhenTheStreamsAreTheBottleneck) {
  const Batches data = make_batches(10, 4, 0, 41);
  for (const int jitter : {0, 2000}) {
    PipelineConfig c = config(PipelineMethod::FDG, {1, 3});
    c.stream_options.jitter_max_us = jitter;
    c.stream_options.seed = 3;
    Network net = mini_resnet(1);
    PipelineTrainer p(net, c);
    const PipelineEpochStats st = p.run_epoch(source_of(data), lr_at);
    EXPECT_GE(st.host_wait_ms, 0.0);
    EXPECT_LE(st.host_wait_ms, st.wall_ms);
    if (jitter > 0) {
      EXPECT_GT(st.host_wait_ms, 0.5 * st.wall_ms) << "waited " << st.host_wait_ms << " of " << st.wall_ms << " ms";
    }
  }
}

TEST(Pipeline, DelaysFollowTheMethod) {
  // d_k for modules k = 1..4 of K = 4: fdg 2(K-k), ddg K-k, bp none.
  const std::map<PipelineMethod, std::vector<int64_t>> want = {
      {PipelineMethod::FDG, {6, 4, 2, 0}}, {PipelineMethod::DDG, {3, 2, 1, 0}}, {PipelineMethod::BP, {0, 0, 0, 0}}};
  for (const auto& [m, delays] : want) {
    Network net = mini_resnet(1);
    PipelineTrainer p(net, config(m, {1, 2, 4}));
    ASSERT_EQ(p.num_modules(), 4);
    for (int k = 0; k < 4; ++k)
      EXPECT_EQ(p.delay(k), delays[size_t(k)]) << pipeline_method_name(m) << " module " << k + 1;
  }
  Network net2 = mini_resnet(1);
  PipelineTrainer ddg(net2, config(PipelineMethod::DDG, {1, 2, 4}));
  EXPECT_EQ(ddg.blocks(1), (std::pair<size_t, size_t>{1, 2}));
  EXPECT_EQ(ddg.blocks(3), (std::pair<size_t, size_t>{4, 5}));
  Network net3 = mini_resnet(1);
  EXPECT_THROW(PipelineTrainer(net3, config(PipelineMethod::FDG, {2, 2})), Error);
  EXPECT_THROW(PipelineTrainer(net3, config(PipelineMethod::FDG, {5})), Error);
  // Modules on the CPU and on a GPU cannot exchange events: refused before any is made.
  PipelineConfig mixed = config(PipelineMethod::FDG, {2});
  mixed.devices = {Device::cpu(), Device::cuda(0)};
  test::expect_error<Error>([&] { PipelineTrainer(net3, mixed); }, {"all be the CPU or all GPUs", "cpu and cuda:0"});
}

TEST(Pipeline, WeightStashingMatchesTheSequentialRecurrence) {
  const Batches data = make_batches(7, 4, 3, 25);
  for (PipelineMethod m : {PipelineMethod::DDG, PipelineMethod::FDG}) {
    PipelineConfig c = config(m, {1, 3}, 0.5f);
    c.weight_stash = true;
    const std::vector<float> got = run_pipeline(c, data);
    SimOptions stash;
    stash.stash = true;
    EXPECT_TRUE(same_bits(got, simulate(m, {1, 3}, data, 0.5f, stash))) << pipeline_method_name(m);
    EXPECT_GT(max_rel_diff(got, simulate(m, {1, 3}, data, 0.5f)), 1e-5) << "stashing changed nothing";
  }
}

TEST(Pipeline, RecomputeSavesActivationMemoryAndRebuildsTheSameActivations) {
  const Batches data = make_batches(6, 4, 0, 26);
  PipelineConfig stash = config(PipelineMethod::FDG, {1, 2, 4}, 0.5f);
  stash.weight_stash = true;
  PipelineConfig both = stash;
  both.recompute = true;
  size_t kept = 0, recomputed = 0;
  const std::vector<float> a = run_pipeline(stash, data, 1, 1, &kept), b = run_pipeline(both, data, 1, 1, &recomputed);
  // With the forward's weights, recomputation reproduces the saved activations exactly, and
  // BN running statistics (part of the compared state) are not updated twice.
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
  EXPECT_LT(recomputed * 2, kept) << "kept " << kept << " bytes, recompute " << recomputed;
  // Recomputation's figure holds, beside the stored inputs, what the backwards rebuild. In the
  // steady state of fdg, just after the backwards of a tick, module k < K holds d_k - 1 inputs of
  // batches in flight plus the input and the rebuilt activations of the batch it back-propagates:
  // sum over k < K of d_k * input_k + activations_k (per batch, measured here block by block),
  // and module K the activations of the batch it forwards and back-propagates within the tick.
  {
    const Batches many = make_batches(12, 4, 0, 26);
    PipelineConfig rc = config(PipelineMethod::FDG, {1, 2, 4}, 0.5f);
    rc.recompute = true;
    Network net = mini_resnet(1);
    PipelineTrainer p(net, rc);
    const size_t peak = p.run_epoch(source_of(many), lr_at).peak_saved_bytes;
    Network fresh = mini_resnet(1);
    auto s = make_stream(Device::cpu());
    Tensor h = many.images[0];
    size_t want = 0;
    const int K = p.num_modules();
    for (int k = 0; k + 1 < K; ++k) {
      const auto [first, last] = p.blocks(k);
      std::set<const void*> seen = {h.raw_data()};
      const size_t input = h.nbytes();
      std::vector<Context> ctx(last - first);
      for (size_t b = first; b < last; ++b) h = fresh.block(b).forward(*s, h, ctx[b - first]);
      s->synchronize();
      size_t activations = 0;
      for (const Context& c : ctx) activations += c.saved_bytes(&seen);
      want += size_t(2 * (K - 1 - k)) * input + activations;
    }
    const auto [first, last] = p.blocks(K - 1);
    std::vector<Context> ctx(last - first);
    for (size_t b = first; b < last; ++b) h = fresh.block(b).forward(*s, h, ctx[b - first]);
    s->synchronize();
    std::set<const void*> seen;
    for (const Context& c : ctx) want += c.saved_bytes(&seen);
    EXPECT_EQ(peak, want);
  }
  // One module (plain backprop's pipeline) holds its batch's activations within each tick: they
  // are counted (they were not: the last module's batch leaves the pipeline within its tick).
  {
    Network net = mini_resnet(1);
    PipelineTrainer one(net, config(PipelineMethod::BP, {}));
    const size_t peak = one.run_epoch(source_of(data), lr_at).peak_saved_bytes;
    Network fresh = mini_resnet(1);
    auto s = make_stream(Device::cpu());
    Tensor h = data.images[0];
    std::vector<Context> ctx(fresh.size());
    for (size_t b = 0; b < fresh.size(); ++b) h = fresh.block(b).forward(*s, h, ctx[b]);
    s->synchronize();
    std::set<const void*> seen;
    size_t want = 0;
    for (const Context& c : ctx) want += c.saved_bytes(&seen);
    EXPECT_GT(want, 0u);
    EXPECT_EQ(peak, want);
    // From graphs the same: a replayed tick counts the last module's activations as an eager one
    // (its contexts end with the tick, so its captured unit kept none, and replays counted 0), over
    // one module and over three.
    for (const std::vector<size_t>& cuts : {std::vector<size_t>{}, std::vector<size_t>{1, 2}}) {
      PipelineConfig eager_cfg = config(PipelineMethod::FDG, cuts, 0.5f);
      if (cuts.empty()) eager_cfg.method = PipelineMethod::BP;
      PipelineConfig graphs_cfg = eager_cfg;
      graphs_cfg.graphs = true;
      Network a = mini_resnet(1), b = mini_resnet(1);
      PipelineTrainer eager(a, eager_cfg), graphs(b, graphs_cfg);
      for (int epoch = 0; epoch < 2; ++epoch) {
        const size_t want_epoch = eager.run_epoch(source_of(data), lr_at).peak_saved_bytes;
        const int64_t replays = graphs.graph_stats().replays;
        EXPECT_EQ(graphs.run_epoch(source_of(data), lr_at).peak_saved_bytes, want_epoch)
            << cuts.size() + 1 << " modules, epoch " << epoch;
        if (epoch == 1) {
          EXPECT_GT(graphs.graph_stats().replays, replays) << "the second epoch replays";
        }
      }
    }
  }
  // Without stashing, recomputation uses the weights of the backward's moment: it trains, but
  // differently, as the simulation does when it forwards the stored input again just before each
  // backward (in ddg and fdg, whose modules step between a batch's forward and its backward).
  for (PipelineMethod m : {PipelineMethod::DDG, PipelineMethod::FDG}) {
    PipelineConfig only = config(m, {1, 2, 4}, 0.5f);
    only.recompute = true;
    const std::vector<float> got = run_pipeline(only, data);
    SimOptions rebuilt;
    rebuilt.recompute = true;
    EXPECT_TRUE(same_bits(got, simulate(m, {1, 2, 4}, data, 0.5f, rebuilt))) << pipeline_method_name(m);
    EXPECT_GT(max_rel_diff(got, simulate(m, {1, 2, 4}, data, 0.5f)), 1e-6)
        << pipeline_method_name(m) << ": recomputation with the present weights changed nothing";
  }
}

// Mixed precision's bf16 weight copies (Parameter::bf16), written by the optimizer's step
// instead of cast from the master before each use, change no bit: in plain backprop, in the
// decoupled methods (with injected stream delays), with weight stashing (the stash stands in
// for the live weights during the backward, so the copies are stale then), with recomputation,
// with staleness jitter and replayed from graphs. Once every module has stepped, no weight is
// cast again (counted by the op profile in the second epoch) unless stashing needs it.
TEST(Pipeline, Bf16WeightCopiesChangeNoBitAndSaveTheCasts) {
  const Batches data = make_batches(7, 4, 3, 43);
  struct Case {
    const char* name;
    PipelineConfig c;
    bool casts_weights;  // casts weights in a steady epoch even with copies
  };
  std::vector<Case> cases;
  cases.push_back({"bp", config(PipelineMethod::BP, {}), false});
  cases.push_back({"ddg K=3", config(PipelineMethod::DDG, {1, 3}, 0.5f), false});
  cases.push_back({"fdg K=4", config(PipelineMethod::FDG, {1, 2, 4}, 0.5f), false});
  cases.push_back({"fdg K=3 stash", config(PipelineMethod::FDG, {1, 3}, 0.5f), true});
  cases.back().c.weight_stash = true;
  cases.push_back({"fdg K=3 stash+recompute", cases.back().c, true});
  cases.back().c.recompute = true;
  cases.push_back({"fdg K=3 recompute", config(PipelineMethod::FDG, {1, 3}, 0.5f), false});
  cases.back().c.recompute = true;
  cases.push_back({"fdg K=3 jitter", config(PipelineMethod::FDG, {1, 3}, 0.5f), false});
  cases.back().c.staleness_jitter = 2;
  cases.push_back({"fdg K=3 graphs", config(PipelineMethod::FDG, {1, 3}, 0.5f), false});
  cases.back().c.graphs = true;
  // Casts of a parameter's shape from f32 (the weights; the inputs' shapes differ).
  std::set<std::string> weight_shapes;
  {
    Network net = mini_resnet(1);
    for (auto& [name, p] : net.state().params) {
      std::string dims;
      for (size_t d = 0; d < p->value.shape().size(); ++d) dims += (d ? "," : "") + std::to_string(p->value.shape()[d]);
      weight_shapes.insert("f32 [" + dims + "] [" + dims + "]");
    }
  }
  auto run = [&](const PipelineConfig& c, bool copies, int64_t* steady_weight_casts) {
    set_bf16_weight_copies(copies);
    Network net = mini_resnet(1);
    PipelineTrainer p(net, c);
    p.run_epoch(source_of(data), lr_at);
    {
      OpProfile profile;
      p.run_epoch(source_of(data), lr_at);
      *steady_weight_casts = 0;
      for (const OpTime& t : profile.collect())
        if (t.op == "cast" && weight_shapes.count(t.shapes)) *steady_weight_casts += t.calls;
    }
    set_bf16_weight_copies(true);
    return flat_params(net);
  };
  for (Case& k : cases) {
    k.c.activation_dtype = DType::BF16;
    int64_t casts_off = 0, casts_on = 0;
    const std::vector<float> off = run(k.c, false, &casts_off);
    PipelineConfig noisy = k.c;
    noisy.stream_options.jitter_max_us = 100;
    noisy.stream_options.seed = 3;
    const std::vector<float> on = run(noisy, true, &casts_on);
    ASSERT_EQ(off.size(), on.size());
    EXPECT_EQ(std::memcmp(off.data(), on.data(), off.size() * sizeof(float)), 0) << k.name;
    if (k.c.graphs) continue;  // replays are not profiled
    EXPECT_GT(casts_off, 7 * 9) << k.name << ": every batch casts the weights without copies";
    if (k.casts_weights)
      EXPECT_LT(casts_on, casts_off) << k.name;
    else
      EXPECT_EQ(casts_on, 0) << k.name;
  }
}

// Loading a checkpoint into a network whose bf16 weight copies are current makes them stale:
// the next bf16 pass casts the loaded weights instead of using copies of the old ones.
TEST(Pipeline, LoadingACheckpointMakesTheBf16WeightCopiesStale) {
  set_bf16_weight_copies(true);  // whatever the environment says
  const Batches data = make_batches(3, 4, 0, 45);
  auto s = make_stream(Device::cpu());
  Network a = mini_resnet(1), b = mini_resnet(2);
  auto train_then_eval = [&](Network& net, bool train) {
    Sgd opt(net.state().params, SgdConfig{0.9f, 5e-4f, false}, *s);
    BackpropTrainer bp(net, opt, *s, 0.f, DType::BF16);
    for (size_t i = 0; train && i < data.images.size(); ++i) bp.train_step(data.images[i], data.labels[i], 0.1f);
    bp.drain_stats();
    for (size_t i = 0; i < data.images.size(); ++i) bp.eval_step(data.images[i], data.labels[i]);
    return bp.drain_stats().loss_sum;
  };
  // Evaluated only, a network keeps no copies (the step allocates them).
  Network evaluated = mini_resnet(3);
  train_then_eval(evaluated, false);
  for (auto& [name, p] : evaluated.state().params) EXPECT_FALSE(p->bf16.defined()) << name;
  train_then_eval(a, true);
  const double before = train_then_eval(b, true);
  int copies = 0, weights = 0;  // conv and linear weights, rank > 1 (BN's parameters stay f32)
  for (auto& [name, p] : b.state().params) {
    copies += p->bf16.defined() && p->bf16_current;
    weights += p->value.dim() > 1;
  }
  ASSERT_EQ(copies, 9);
  EXPECT_EQ(weights, 9);  // every weight that can have a copy has one (the GPU test counts so)
  // Moved to the device it is on, the network keeps its copies, current: nothing moved, and a
  // copy released there could go back to the allocator while another stream still wrote it.
  std::vector<const void*> kept;
  for (auto& [name, p] : b.state().params)
    if (p->bf16.defined()) kept.push_back(p->bf16.raw_data());
  b.to(Device::cpu(), *s);
  std::vector<const void*> after;
  for (auto& [name, p] : b.state().params)
    if (p->bf16.defined() && p->bf16_current) after.push_back(p->bf16.raw_data());
  EXPECT_EQ(after, kept);
  const std::string path = ::testing::TempDir() + "bf16_copies.safetensors";
  save_checkpoint(path, a, {}, {}, *s);
  load_checkpoint(path, b, {}, *s);
  std::remove(path.c_str());
  const double loaded = train_then_eval(b, false), want = train_then_eval(a, false);
  EXPECT_NE(before, want);
  EXPECT_EQ(loaded, want);
}

// --weight-stash keeps a copy of a module's weights for every batch in flight: d_k = 2(K - k)
// batches for module k < K under fdg (the last module back-propagates each batch at once),
// reported apart from the activations.
TEST(Pipeline, WeightStashMemoryIsReportedPerBatchInFlight) {
  const Batches data = make_batches(8, 4, 0, 28);
  PipelineConfig c = config(PipelineMethod::FDG, {1, 3}, 0.5f);
  c.weight_stash = true;
  Network net = mini_resnet(1);
  PipelineTrainer p(net, c);
  const PipelineEpochStats st = p.run_epoch(source_of(data), lr_at);
  size_t want = 0;
  for (int k = 0; k + 1 < p.num_modules(); ++k) {
    const auto [first, last] = p.blocks(k);
    size_t bytes = 0;
    for (auto& [name, param] : net.state(first, last).params) bytes += param->value.nbytes();
    want += size_t(2 * (p.num_modules() - 1 - k)) * bytes;
  }
  EXPECT_GT(want, 0u);
  EXPECT_EQ(st.peak_stash_bytes, want);
  // Without stashing there is none.
  Network plain_net = mini_resnet(1);
  PipelineTrainer plain(plain_net, config(PipelineMethod::FDG, {1, 3}, 0.5f));
  EXPECT_EQ(plain.run_epoch(source_of(data), lr_at).peak_stash_bytes, 0u);
}

// set_trace_ops: every op of each module's stream, timed on that stream from the stages' origin,
// lies inside one of the module's stages (its forward, backward or step) but for the hand-overs
// between them, with injected stream delays too; every module ran its convolutions and its
// optimizer step; none without it.
TEST(Pipeline, OpTimingsLieInsideTheirModulesStages) {
  const Batches data = make_batches(6, 4, 0, 44);
  PipelineConfig c = config(PipelineMethod::FDG, {1, 2, 4}, 0.5f);
  c.stream_options.jitter_max_us = 100;
  c.stream_options.seed = 4;
  Network net = mini_resnet(1);
  PipelineTrainer p(net, c);
  p.set_trace_ops(true);
  const PipelineEpochStats st = p.run_epoch(source_of(data), lr_at);
  p.set_trace_ops(false);
  const int K = p.num_modules();
  ASSERT_FALSE(st.ops.empty());
  std::vector<std::set<std::string>> ops_of(static_cast<size_t>(K));
  size_t outside = 0, hand_overs = 0, misplaced = 0;
  for (const OpTiming& o : st.ops) {
    ASSERT_GE(o.module, 0);
    ASSERT_LT(o.module, K);
    ops_of[size_t(o.module)].insert(o.op);
    const double end = o.start_ms + o.duration_ms;
    bool inside = false, overlaps = false;
    double last_end = 0.0;  // of the module's stages
    for (const StageTiming& t : st.stages) {
      if (t.module != o.module) continue;
      const double t_end = t.start_ms + t.duration_ms;
      inside = inside || (o.start_ms >= t.start_ms && end <= t_end + 1e-6);
      overlaps = overlaps || (o.start_ms < t_end - 1e-6 && end > t.start_ms + 1e-6);
      last_end = std::max(last_end, t_end);
    }
    // Taking delivery of a message is not part of a stage (stages exclude the wait for one):
    // the copy out of the queue (or of module 1's staged input) and the shrink applied to a
    // received gradient may run between the module's stages. Copies and scales inside a stage
    // (sending) lie wholly within it; none straddles a stage's edge or comes after the last.
    const bool hand_over = o.op == "copy" || o.op == "scale";
    if (hand_over) {
      ++hand_overs;
      misplaced += (overlaps && !inside) || end > last_end + 1e-6;
    }
    outside += !inside && !hand_over;
    EXPECT_GE(o.start_ms, 0.0) << o.op;
  }
  EXPECT_EQ(outside, 0u) << "ops outside every stage of their module, of " << st.ops.size();
  EXPECT_GT(hand_overs, 0u) << "no hand-over was timed";
  EXPECT_EQ(misplaced, 0u) << "hand-overs straddling a stage's edge or after the module's last, of " << hand_overs;
  for (int k = 0; k < K; ++k) {
    EXPECT_TRUE(ops_of[size_t(k)].count("sgd_step")) << "module " << k + 1;
    EXPECT_TRUE(ops_of[size_t(k)].count("conv2d_forward") || k == K - 1) << "module " << k + 1;
  }
  EXPECT_TRUE(ops_of[size_t(K - 1)].count("softmax_cross_entropy"));
  EXPECT_TRUE(p.run_epoch(source_of(data), lr_at).ops.empty()) << "only while asked";
}

TEST(Pipeline, StalenessJitterDelaysGradientsWithinBoundsAndInOrder) {
  const Batches data = make_batches(8, 4, 0, 27);
  PipelineConfig c = config(PipelineMethod::FDG, {1, 2, 4}, 0.5f);
  c.staleness_jitter = 2;
  c.jitter_seed = 5;
  Network net = mini_resnet(1);
  PipelineTrainer p(net, c);
  const PipelineEpochStats st = p.run_epoch(source_of(data), lr_at);
  EXPECT_EQ(st.train.samples, 32);
  std::map<std::tuple<int, int64_t, bool>, int64_t> tick_of;
  for (const PipelineEvent& e : p.ledger()) {
    EXPECT_EQ(tick_of.count({e.module, e.batch, e.backward}), 0u) << "twice: module " << e.module << " batch " << e.batch;
    tick_of[{e.module, e.batch, e.backward}] = e.tick;
  }
  int64_t extra = 0;
  for (int k = 0; k < p.num_modules(); ++k) {
    int64_t previous = -1;
    for (int64_t b = 0; b < 8; ++b) {
      const int64_t late = tick_of.at({k, b, true}) - tick_of.at({k, b, false});
      EXPECT_GE(late, p.delay(k));
      // Each module above adds at most J (PipelineConfig::staleness_jitter).
      EXPECT_LE(late, p.delay(k) + (p.num_modules() - 1 - k) * c.staleness_jitter) << "module " << k << " batch " << b;
      extra += late - p.delay(k);
      EXPECT_GT(tick_of.at({k, b, true}), previous) << "backwards out of order";
      previous = tick_of.at({k, b, true});
    }
  }
  EXPECT_GT(extra, 0) << "the jitter added no delay";
  // Seeded: the same run again is bit-identical.
  const std::vector<float> got = flat_params(net);
  EXPECT_EQ(got, run_pipeline(c, data));
  // The numbers: each held gradient (scaled by beta once) is back-propagated at the tick the
  // ledger gives, through its own batch's saved activations, as in the sequential recurrence
  // with those ticks. A held gradient overwritten before its tick, or one paired with another
  // batch, fails here though the ledger looks right.
  SimOptions jittered;
  jittered.ledger = &p.ledger();
  EXPECT_TRUE(same_bits(got, simulate(PipelineMethod::FDG, {1, 2, 4}, data, 0.5f, jittered)));
  EXPECT_GT(max_rel_diff(got, simulate(PipelineMethod::FDG, {1, 2, 4}, data, 0.5f)), 1e-6)
      << "the extra delays changed no weight";
}

std::vector<int64_t> counters(const Network& net) {
  std::vector<int64_t> out;
  for (auto& [name, c] : net.state().counters) out.push_back(*c);
  return out;
}

// Graph replay against op-by-op enqueueing, over three epochs with a partial last batch: the
// first epoch warms up and captures (planned arenas record each phase twice first, so some
// phases are captured in the second epoch), the later ones mostly replay. A
// replay that read a stale address, missed a learning-rate change, a queue event or a BN
// counter would change the result.
class PipelineGraphs : public ::testing::TestWithParam<std::tuple<PipelineMethod, int>> {};

TEST_P(PipelineGraphs, ReplayingCapturedTicksChangesNoBit) {
  const auto [method, K] = GetParam();
  const std::vector<size_t> cuts = K == 1   ? std::vector<size_t>{}
                                   : K == 2 ? std::vector<size_t>{2}
                                   : K == 3 ? std::vector<size_t>{1, 3}
                                            : std::vector<size_t>{1, 2, 4};
  const Batches data = make_batches(21, 4, 3, 31);
  const PipelineConfig eager = config(method, cuts, 0.5f);
  PipelineConfig graphs = eager;
  graphs.graphs = true;
  for (int jitter : {0, 200}) {
    graphs.stream_options.jitter_max_us = jitter;
    graphs.stream_options.seed = 3;
    Network a = mini_resnet(1), b = mini_resnet(1);
    PipelineTrainer pa(a, eager), pb(b, graphs);
    PipelineGraphStats after_two;
    for (int epoch = 0; epoch < 3; ++epoch) {
      // The arenas stop growing once every phase has run: their addresses repeat.
      if (epoch == 2) after_two = pb.graph_stats();
      const PipelineEpochStats sa = pa.run_epoch(source_of(data), lr_at), sb = pb.run_epoch(source_of(data), lr_at);
      EXPECT_EQ(sa.train.loss_sum, sb.train.loss_sum) << "epoch " << epoch;
      EXPECT_EQ(sa.train.correct, sb.train.correct);
      EXPECT_EQ(sa.train.samples, sb.train.samples);
      EXPECT_EQ(sa.ticks, sb.ticks);
      // The same forwards and backwards at the same ticks (each epoch's ledger).
      EXPECT_EQ(pa.ledger().size(), pb.ledger().size());
      for (size_t i = 0; i < pa.ledger().size() && i < pb.ledger().size(); ++i) {
        const PipelineEvent &x = pa.ledger()[i], &y = pb.ledger()[i];
        ASSERT_TRUE(x.tick == y.tick && x.module == y.module && x.batch == y.batch && x.backward == y.backward)
            << "epoch " << epoch << ", ledger entry " << i;
      }
    }
    const std::vector<float> want = flat_params(a), got = flat_params(b);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
        << pipeline_method_name(method) << " K=" << K << " jitter " << jitter;
    EXPECT_EQ(counters(a), counters(b)) << "BN batch counters";
    const PipelineGraphStats g = pb.graph_stats();
    EXPECT_GT(after_two.arena_peak_used, 0u);
    EXPECT_EQ(g.arena_peak_used, after_two.arena_peak_used);
    EXPECT_EQ(g.arena_bytes, after_two.arena_bytes);
    EXPECT_EQ(g.planned_arenas, g.arenas) << "every arena settled on a plan";
    // Every module's units were captured (K forward units + K-1 backward units, P_k phases
    // each) and most units of the later epochs were replays.
    int64_t phases = 0;
    for (int k = 0; k < K; ++k) phases += (k + 1 < K ? 2 : 1) * pb.graph_period(k);
    EXPECT_EQ(g.captured, phases);
    const int64_t units = 3 * 21 * (2 * K - 1);
    EXPECT_EQ(g.captured + g.replays + g.eager, units);
    EXPECT_GT(g.replays, units / 2) << "captured " << g.captured << ", eager " << g.eager;
  }
}

INSTANTIATE_TEST_SUITE_P(MethodsAndDepths, PipelineGraphs,
                         ::testing::Combine(::testing::ValuesIn(kMethods), ::testing::Values(1, 2, 4)),
                         [](const auto& info) {
                           return std::string(pipeline_method_name(std::get<0>(info.param))) + "_K" +
                                  std::to_string(std::get<1>(info.param));
                         });

// Planned arenas against bump arenas and op-by-op enqueueing: the same bits, and the memory a
// replayed tick holds close to what an eager tick holds instead of a multiple of it.
TEST(Pipeline, PlannedGraphMemoryChangesNoBitAndHoldsLessThanBumpArenas) {
  const Batches data = make_batches(24, 32, 8, 41);
  for (const auto& [method, cuts] : std::vector<std::pair<PipelineMethod, std::vector<size_t>>>{
           {PipelineMethod::BP, {}}, {PipelineMethod::FDG, {1, 2, 4}}}) {
    const std::string what = std::string(pipeline_method_name(method)) + " K=" + std::to_string(cuts.size() + 1);
    PipelineConfig eager = config(method, cuts, 0.5f);
    // Queued work holds no tensors, so what each run holds is the host's doing alone: the same
    // whatever the streams' pace.
    PipelineConfig bump = eager, planned = eager;
    bump.graphs = planned.graphs = true;
    bump.plan_graph_memory = false;
    std::vector<std::vector<float>> params;
    std::vector<size_t> peak, arena;
    for (const PipelineConfig* c : {&eager, &bump, &planned}) {
      Network net = mini_resnet(1);
      PipelineTrainer p(net, *c);
      for (int epoch = 0; epoch < 3; ++epoch) {
        if (epoch == 2) device_allocator(Device::cpu()).reset_peak();  // a warm epoch: full batches replay
        p.run_epoch(source_of(data), lr_at);
      }
      peak.push_back(device_allocator(Device::cpu()).stats().peak_allocated_bytes);
      arena.push_back(p.graph_stats().arena_bytes);
      params.push_back(flat_params(net));
      if (c->graphs) {
        const PipelineGraphStats g = p.graph_stats();
        EXPECT_GT(g.replays, 2 * 24) << what;
        // P_k forward arenas (module K: one, shared by its two phases), K-1 backward ones.
        EXPECT_EQ(g.arenas, cuts.empty() ? 1 : 6 + 4 + 2 + 1 + 3) << what;
        EXPECT_EQ(g.planned_arenas, c->plan_graph_memory ? g.arenas : 0) << what;
      }
    }
    EXPECT_EQ(params[1], params[0]) << what << ": bump arenas";
    EXPECT_EQ(params[2], params[0]) << what << ": planned arenas";
    // Measured (mini ResNet, 8x8 images, batch 32): bp K=1 eager 1.6 MB, bump 5.3 MB, planned
    // 2.0 MB; fdg K=4 eager 4.2 MB, bump 69 MB (4 MiB chunks), planned 5.4 MB. A phase's arena
    // holds its batch's tensors until the phase comes round, and each backward arena its own
    // temporaries. With fdg's former d_k + 2 phases planned took 7.0 MB and bump 98.
    EXPECT_LE(double(peak[2]), 1.4 * double(peak[0]))
        << what << ": planned against eager: eager " << peak[0] << ", bump " << peak[1] << ", planned " << peak[2];
    EXPECT_LT(2 * arena[2], arena[1]) << what << ": planned against bump arenas";
  }
}

TEST(Pipeline, GraphPeriodsCoverTheDelays) {
  Network net = mini_resnet(1);
  PipelineConfig c = config(PipelineMethod::FDG, {1, 2, 4});
  c.graphs = true;
  PipelineTrainer fdg(net, c);
  // fdg back-propagates before it forwards: d_k rounded up to even, at least 2 (6, 4, 2, 2).
  EXPECT_EQ(fdg.graph_period(0), 6);
  EXPECT_EQ(fdg.graph_period(1), 4);
  EXPECT_EQ(fdg.graph_period(2), 2);
  EXPECT_EQ(fdg.graph_period(3), 2);
  Network net2 = mini_resnet(1);
  c.method = PipelineMethod::DDG;  // delays 3, 2, 1, 0; forwards first: d_k + 1 rounded up to even
  PipelineTrainer ddg(net2, c);
  EXPECT_EQ(ddg.graph_period(0), 4);
  EXPECT_EQ(ddg.graph_period(1), 4);
  EXPECT_EQ(ddg.graph_period(2), 2);
  EXPECT_EQ(ddg.graph_period(3), 2);
  Network net3 = mini_resnet(1);
  PipelineConfig single = config(PipelineMethod::FDG, {});
  single.graphs = true;
  PipelineTrainer one(net3, single);  // no queues, no parity to keep
  EXPECT_EQ(one.graph_period(0), 1);
}

TEST(Pipeline, GraphsRejectWorkThatChangesFromTickToTick) {
  Network net = mini_resnet(1);
  PipelineConfig c = config(PipelineMethod::FDG, {1, 3});
  c.graphs = true;
  for (int which = 0; which < 3; ++which) {
    PipelineConfig bad = c;
    if (which == 0) bad.staleness_jitter = 1;
    if (which == 1) bad.recompute = true;
    if (which == 2) bad.weight_stash = true;
    try {
      PipelineTrainer p(net, bad);
      ADD_FAILURE() << "accepted case " << which;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("graphs cannot be combined"), std::string::npos) << e.what();
    }
  }
}

TEST(Pipeline, BalancedCutsSplitTheCost) {
  EXPECT_EQ(balanced_cuts({1, 1, 1, 1}, 2), (std::vector<size_t>{2}));
  EXPECT_EQ(balanced_cuts({1, 1, 1, 1, 1, 1}, 3), (std::vector<size_t>{2, 4}));
  EXPECT_EQ(balanced_cuts({10, 1, 1, 1}, 2), (std::vector<size_t>{1}));
  EXPECT_EQ(balanced_cuts({1, 1, 1}, 3), (std::vector<size_t>{1, 2}));
  EXPECT_EQ(balanced_cuts({5}, 1), (std::vector<size_t>{}));
  EXPECT_THROW(balanced_cuts({1, 1}, 3), Error);
}

}  // namespace
