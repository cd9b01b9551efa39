// The per-op device-time profile (engine/op_profile.h) on the CPU emulation: which calls it
// records and how it attributes time. (On a GPU the same code records CUDA events.)
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "engine/op_profile.h"
#include "engine/ops.h"
#include "engine/stream.h"
#include "engine/tensor.h"
#include "kernels/common/error.h"
#include "tests/gpu_testing.h"

using namespace sp;

namespace {

const OpTime* find(const std::vector<OpTime>& times, const std::string& op, const std::string& shapes = "") {
  for (const OpTime& t : times)
    if (t.op == op && (shapes.empty() || t.shapes == shapes)) return &t;
  return nullptr;
}

double total_ms(const std::vector<OpTime>& times) {
  double ms = 0;
  for (const OpTime& t : times) ms += t.ms;
  return ms;
}

TEST(OpProfile, CountsEachOpPerShapeAndTimesItOnItsStream) {
  auto s = make_stream(Device::cpu());
  const Tensor x = test::host_tensor({8, 32, 32, 64}, 1), w = test::host_tensor({64, 3, 3, 64}, 2);
  const Tensor y = Tensor::empty({8, 32, 32, 64}, DType::F32), small = Tensor::empty({10}, DType::F32);
  const Tensor x2 = test::host_tensor({2, 8, 8, 64}, 3), y2 = Tensor::empty({2, 8, 8, 64}, DType::F32);

  ops::fill(*s, small, 1.f);  // before the profile: not recorded
  OpProfile profile;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 3; ++i) {
    ops::conv2d_forward(*s, x, w, Tensor(), y, 1, 1);
    ops::fill(*s, small, 2.f);
  }
  ops::conv2d_forward(*s, x2, w, Tensor(), y2, 1, 1);
  const std::vector<OpTime> times = profile.collect();
  const double wall = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  ASSERT_EQ(times.size(), 3u);  // two conv shapes and the fill
  const OpTime* big = find(times, "conv2d_forward", "f32 [8,32,32,64] [64,3,3,64]");
  const OpTime* little = find(times, "conv2d_forward", "f32 [2,8,8,64] [64,3,3,64]");
  const OpTime* fill = find(times, "fill");
  ASSERT_NE(big, nullptr);
  ASSERT_NE(little, nullptr);
  ASSERT_NE(fill, nullptr);
  EXPECT_EQ(big->calls, 3);
  EXPECT_EQ(little->calls, 1);
  EXPECT_EQ(fill->calls, 3);
  EXPECT_EQ(fill->shapes, "f32 [10]");
  // Most expensive first; the 0.6 GFLOP convolutions dwarf a 10-element fill and the 64x
  // smaller convolution. The margins leave room for a thread preempted for a few time slices
  // on a loaded machine while still catching times given to the wrong op. (Not with the
  // race-hunting stream jitter, which sleeps inside ops.)
  EXPECT_EQ(&times[0], big);
  if (std::getenv("STALEPROP_CPU_STREAM_JITTER_US") == nullptr) {
    EXPECT_GT(big->ms, 3 * fill->ms);
    EXPECT_GT(big->ms / 3, little->ms);
  }
  // One stream runs one op at a time: the op times fit in the wall time of the work.
  EXPECT_LE(total_ms(times), wall * 1.001 + 0.01);
  EXPECT_GT(total_ms(times), 0.5 * wall) << "the stream was busy with the convolutions most of the time";
  // collect() consumed the calls.
  EXPECT_TRUE(profile.collect().empty());
}

// collect_spans: each call on its own, on its stream, from that stream's origin, in order of start;
// calls on a stream without an origin are left out; consumed as collect() consumes them.
TEST(OpProfile, SpansTimeEachCallFromItsStreamsOrigin) {
  auto a = make_stream(Device::cpu()), b = make_stream(Device::cpu()), other = make_stream(Device::cpu());
  const Tensor x = test::host_tensor({4, 16, 16, 32}, 1), w = test::host_tensor({32, 3, 3, 32}, 2);
  const Tensor y = Tensor::empty({4, 16, 16, 32}, DType::F32), small = Tensor::empty({10}, DType::F32);
  auto origin = make_event(Device::cpu(), true);
  a->record(*origin);
  OpProfile profile;
  ops::conv2d_forward(*a, x, w, Tensor(), y, 1, 1);
  ops::fill(*a, small, 1.f);
  b->wait(*origin);
  const Tensor small_b = Tensor::empty({10}, DType::F32);
  ops::fill(*b, small_b, 2.f);  // beside a's work (b waits for nothing else): order by start only
  ops::fill(*other, Tensor::empty({3}, DType::F32), 3.f);
  a->synchronize(), b->synchronize(), other->synchronize();
  const std::vector<OpSpan> spans =
      profile.collect_spans([&](const Stream* s) { return s == other.get() ? nullptr : origin.get(); });
  ASSERT_EQ(spans.size(), 3u);
  int on_a = 0, on_b = 0;
  for (size_t i = 0; i < spans.size(); ++i) {
    EXPECT_GE(spans[i].start_ms, 0.0);
    EXPECT_GE(spans[i].duration_ms, 0.0);
    if (i > 0) {
      EXPECT_GE(spans[i].start_ms, spans[i - 1].start_ms);
    }
    on_a += spans[i].stream == a.get(), on_b += spans[i].stream == b.get();
  }
  EXPECT_EQ(on_a, 2);
  EXPECT_EQ(on_b, 1);
  // a's ops in stream order: the fill starts after the convolution has ended.
  const OpSpan* conv = nullptr;
  const OpSpan* fill_a = nullptr;
  for (const OpSpan& sp : spans) {
    if (sp.op == "conv2d_forward") conv = &sp;
    if (sp.op == "fill" && sp.stream == a.get()) fill_a = &sp;
  }
  ASSERT_NE(conv, nullptr);
  ASSERT_NE(fill_a, nullptr);
  EXPECT_EQ(conv->shapes, "f32 [4,16,16,32] [32,3,3,32]");
  EXPECT_GE(fill_a->start_ms, conv->start_ms + conv->duration_ms);
  EXPECT_TRUE(profile.collect().empty());
}

TEST(OpProfile, TimesOnlyTheOutermostOpAndNothingWithoutAProfile) {
  auto s = make_stream(Device::cpu());
  // bf16 relu on the CPU runs the fp32 kernel between widening and rounding casts: one call.
  const Tensor a = Tensor::empty({4, 8}, DType::BF16), b = Tensor::empty({4, 8}, DType::BF16);
  ops::fill(*s, Tensor::empty({1}, DType::F32), 0.f);
  {
    OpProfile profile;
    ops::relu_forward(*s, a, b);
    const std::vector<OpTime> times = profile.collect();
    ASSERT_EQ(times.size(), 1u);
    EXPECT_EQ(times[0].op, "relu_forward");
    EXPECT_EQ(times[0].shapes, "bf16 [4,8]");
    EXPECT_EQ(times[0].calls, 1);
  }
  // After the profile: nothing is recorded, and a new profile starts empty.
  ops::relu_forward(*s, a, b);
  OpProfile again;
  EXPECT_TRUE(again.collect().empty());
  // Only one profile at a time.
  EXPECT_THROW({ OpProfile second; }, Error);
}

TEST(OpProfile, AnOpThatThrowsIsNotTimedAndTheNextOnesAre) {
  auto s = make_stream(Device::cpu());
  const Tensor f = Tensor::empty({8}, DType::F32), wrong = Tensor::empty({8}, DType::I32);
  OpProfile profile;
  EXPECT_THROW(ops::fill(*s, wrong, 1.f), Error);  // fill takes f32 only
  ops::fill(*s, f, 1.f);
  ops::scale(*s, 2.f, f, f);
  const std::vector<OpTime> times = profile.collect();
  ASSERT_EQ(times.size(), 2u);
  const OpTime* fill = find(times, "fill");
  ASSERT_NE(fill, nullptr);
  EXPECT_EQ(fill->calls, 1);
  EXPECT_EQ(fill->shapes, "f32 [8]");
  ASSERT_NE(find(times, "scale"), nullptr);
}

TEST(OpProfile, CountsEveryCallIssuedFromSeveralThreadsWhileAnotherCollects) {
  // Two host threads issue ops on their own streams while the main thread collects: every call
  // is counted exactly once, in one collect() or the last (ThreadSanitizer runs this too).
  constexpr int kCalls = 200;
  OpProfile profile;
  std::atomic<int> running{2};
  auto issue = [&](float v) {
    auto s = make_stream(Device::cpu());
    const Tensor t = Tensor::empty({64}, DType::F32);
    for (int i = 0; i < kCalls; ++i) {
      ops::fill(*s, t, v);
      ops::scale(*s, 2.f, t, t);
    }
    s->synchronize();
    --running;
  };
  std::thread a(issue, 1.f), b(issue, 2.f);
  int64_t fills = 0, scales = 0;
  auto count = [&](const std::vector<OpTime>& times) {
    for (const OpTime& t : times) {
      EXPECT_GE(t.ms, 0.0);
      (t.op == "fill" ? fills : scales) += t.calls;
    }
  };
  while (running.load() > 0) count(profile.collect());
  a.join();
  b.join();
  count(profile.collect());
  EXPECT_EQ(fills, 2 * kCalls);
  EXPECT_EQ(scales, 2 * kCalls);
}

// A profile may end while another thread issues ops: the op that found it recording keeps its
// state alive until it has recorded (it used to lock a mutex the profile's end had freed, a race
// ThreadSanitizer reported). Profiles start and end here while a thread issues ops throughout.
TEST(OpProfile, AProfileEndsSafelyWhileAnotherThreadIssuesOps) {
  std::atomic<bool> stop{false};
  std::atomic<int64_t> issued{0};
  std::thread issuer([&] {
    auto s = make_stream(Device::cpu());
    const Tensor t = Tensor::empty({64}, DType::F32);
    while (!stop.load()) {
      ops::fill(*s, t, 1.f);
      ++issued;
    }
    s->synchronize();
  });
  int64_t counted = 0;
  // At least 200 profiles, and on until the issuer has issued 200 ops (on a loaded machine it
  // may not have started before the first 200 are done) and some profile has counted one; an
  // issuer that stalls fails the test after a minute instead of hanging it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (int i = 0; (i < 200 || issued.load() < 200 || counted == 0) && std::chrono::steady_clock::now() < deadline;
       ++i) {
    OpProfile profile;
    std::this_thread::yield();
    for (const OpTime& t : profile.collect()) counted += t.calls;
  }
  stop = true;
  issuer.join();
  EXPECT_GE(issued.load(), 200);
  EXPECT_GT(counted, 0) << "no profile saw the issuer's ops";
  EXPECT_LE(counted, issued.load());  // no op counted twice, nor one that was never issued
}

TEST(OpProfile, RecordsNothingWhileAStreamCaptures) {
  auto s = make_stream(Device::cpu());
  const Tensor t = Tensor::empty({16}, DType::F32);
  OpProfile profile;
  s->begin_capture();
  ops::fill(*s, t, 3.f);
  std::unique_ptr<Graph> g = s->end_capture();
  g->launch(*s);
  ops::scale(*s, 2.f, t, t);
  const std::vector<OpTime> times = profile.collect();
  s->synchronize();
  ASSERT_EQ(times.size(), 1u);
  EXPECT_EQ(times[0].op, "scale");
  EXPECT_EQ(test::host_values(t)[0], 6.f);
}

TEST(OpProfile, FormatsTotalsPerOpAndTheMostExpensiveShapes) {
  const std::vector<OpTime> times = {{"conv2d_forward", "f32 [8,32,32,16] [16,3,3,16]", 6, 30.0},
                                     {"batchnorm_backward", "f32 [8,32,32,16]", 4, 12.0},
                                     {"conv2d_forward", "f32 [8,8,8,64] [64,3,3,64]", 2, 6.0},
                                     {"fill", "f32 [10]", 2, 2.0}};
  const std::string text = format_op_profile(times, 2, 2);
  // Per op: 36 ms over 2 steps is 18 ms per step, 72% of the 50 ms summed.
  EXPECT_NE(text.find("op time: 25.000 ms per step over 2 steps"), std::string::npos) << text;
  EXPECT_NE(text.find("   18.000   72.0%       4.0  conv2d_forward\n"), std::string::npos) << text;
  EXPECT_NE(text.find("    6.000   24.0%       2.0  batchnorm_backward\n"), std::string::npos) << text;
  // The top 2 shapes only.
  EXPECT_NE(text.find("conv2d_forward f32 [8,32,32,16] [16,3,3,16]"), std::string::npos) << text;
  EXPECT_NE(text.find("batchnorm_backward f32 [8,32,32,16]"), std::string::npos) << text;
  EXPECT_EQ(text.find("[8,8,8,64]"), std::string::npos) << text;
}

}  // namespace
