// The CPU emulation of streams and events: in-order execution, CUDA's record/wait meaning,
// query/synchronize, error propagation, and a double-buffered producer/consumer pipeline like
// the scheduler's queues, with random delays injected into the workers; graphs (capture and
// replay) with their event nodes.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/stream.h"
#include "graph_testing.h"
#include "kernels/common/error.h"
#include "tests/error_testing.h"

using namespace sp;
using namespace std::chrono_literals;
using sp::test::expect_error;

namespace {

StreamOptions jitter(int us, uint64_t seed) {
  StreamOptions o;
  o.jitter_max_us = us;
  o.seed = seed;
  return o;
}

class CpuStreams : public ::testing::TestWithParam<int> {};  // parameter: jitter in microseconds

TEST_P(CpuStreams, RunsClosuresInEnqueueOrder) {
  auto s = make_stream(Device::cpu(), jitter(GetParam(), 1));
  std::vector<int> seen;
  for (int i = 0; i < 300; ++i) s->enqueue_host([&seen, i] { seen.push_back(i); });
  s->synchronize();
  ASSERT_EQ(seen.size(), 300u);
  for (int i = 0; i < 300; ++i) EXPECT_EQ(seen[size_t(i)], i);
}

TEST_P(CpuStreams, WaitOrdersWorkAcrossStreams) {
  auto a = make_stream(Device::cpu(), jitter(GetParam(), 2));
  auto b = make_stream(Device::cpu(), jitter(GetParam(), 3));
  auto ev = make_event(Device::cpu());
  for (int round = 0; round < 50; ++round) {
    int value = 0, observed = -1;
    a->enqueue_host([&] {
      std::this_thread::sleep_for(200us);
      value = round + 1;
    });
    a->record(*ev);
    b->wait(*ev);
    b->enqueue_host([&] { observed = value; });
    b->synchronize();
    EXPECT_EQ(observed, round + 1);
    a->synchronize();
  }
}

TEST(CpuStreamEvents, WaitOnNeverRecordedEventIsNoOp) {
  auto s = make_stream(Device::cpu());
  auto ev = make_event(Device::cpu());
  EXPECT_TRUE(ev->query());
  bool ran = false;
  s->wait(*ev);
  s->enqueue_host([&] { ran = true; });
  s->synchronize();
  EXPECT_TRUE(ran);
  ev->synchronize();  // returns at once
}

TEST(CpuStreamEvents, WaitRefersToTheRecordBeforeTheWaitCall) {
  auto a = make_stream(Device::cpu());
  auto b = make_stream(Device::cpu());
  auto ev = make_event(Device::cpu());
  std::promise<void> gate;
  std::shared_future<void> opened = gate.get_future().share();
  std::atomic<int> x{0};
  a->enqueue_host([&] { x = 1; });
  a->record(*ev);                                  // record #1: completes soon
  b->wait(*ev);                                    // refers to record #1
  b->enqueue_host([&] { EXPECT_EQ(x.load(), 1); });
  a->enqueue_host([opened] { opened.wait(); });   // a blocks until the gate opens
  a->record(*ev);                                  // record #2: pending until then
  // b must finish while the gate is shut: waiting on record #2 it would not, so it is given
  // seconds for work of microseconds, and the gate opens after the check either way.
  std::future<void> b_done = std::async(std::launch::async, [&] { b->synchronize(); });
  EXPECT_EQ(b_done.wait_for(5s), std::future_status::ready) << "b waits on the record made after its wait call";
  EXPECT_FALSE(ev->query());  // query looks at record #2
  EXPECT_FALSE(a->query());
  gate.set_value();
  b_done.get();
  EXPECT_TRUE(b->query());
  ev->synchronize();
  EXPECT_TRUE(ev->query());
  a->synchronize();
  EXPECT_TRUE(a->query());
}

TEST(CpuStreamEvents, QueryAndSynchronizeFollowTheWork) {
  auto s = make_stream(Device::cpu());
  auto ev = make_event(Device::cpu());
  std::promise<void> gate;
  std::shared_future<void> opened = gate.get_future().share();
  s->enqueue_host([opened] { opened.wait(); });
  s->record(*ev);
  EXPECT_FALSE(s->query());
  EXPECT_FALSE(ev->query());
  gate.set_value();
  ev->synchronize();
  EXPECT_TRUE(ev->query());
  s->synchronize();
  EXPECT_TRUE(s->query());
}

TEST(CpuStreamEvents, SynchronizeRethrowsTheFirstErrorOnce) { test::check_host_errors_rethrown_once(Device::cpu()); }

TEST(CpuStreamEvents, TimingEventsMeasureElapsedTime) {
  auto s = make_stream(Device::cpu());
  auto start = make_event(Device::cpu(), true), stop = make_event(Device::cpu(), true);
  s->record(*start);
  s->enqueue_host([] { std::this_thread::sleep_for(20ms); });
  s->record(*stop);
  s->synchronize();
  const float ms = stop->elapsed_ms_since(*start);
  EXPECT_GE(ms, 19.0f);
  EXPECT_LT(ms, 2000.0f);
  auto untimed = make_event(Device::cpu());
  s->record(*untimed);
  s->synchronize();
  EXPECT_THROW(untimed->elapsed_ms_since(*start), Error);
}

// As CUDA: an event never recorded has no time (cudaEventElapsedTime fails), and an event is
// timed by its latest record, not by an older record that completes later.
TEST(CpuStreamEvents, AnEventIsTimedByItsLatestRecordOnly) {
  auto start = make_event(Device::cpu(), true), never = make_event(Device::cpu(), true);
  auto a = make_stream(Device::cpu()), b = make_stream(Device::cpu());
  a->record(*start);
  a->synchronize();
  test::expect_error([&] { never->elapsed_ms_since(*start); }, {"recorded"});
  test::expect_error([&] { start->elapsed_ms_since(*never); }, {"recorded"});

  auto stop = make_event(Device::cpu(), true);
  std::promise<void> gate;
  std::shared_future<void> opened = gate.get_future().share();
  a->enqueue_host([opened] { opened.wait(); });
  a->record(*stop);  // superseded by the record on b before it completes
  b->record(*stop);
  b->synchronize();
  ASSERT_TRUE(stop->query());
  const float latest = stop->elapsed_ms_since(*start);
  std::this_thread::sleep_for(50ms);
  gate.set_value();
  a->synchronize();  // the older record completes now, 50 ms later
  EXPECT_EQ(stop->elapsed_ms_since(*start), latest);
}

TEST(CpuStreamEvents, DestructionDrainsPendingWork) {
  std::atomic<int> done{0};
  {
    auto s = make_stream(Device::cpu());
    for (int i = 0; i < 20; ++i)
      s->enqueue_host([&] {
        std::this_thread::sleep_for(100us);
        ++done;
      });
  }
  EXPECT_EQ(done.load(), 20);
}

// Drain (what ~PipelineTrainer and the training loops use while an error unwinds the stack):
// it waits for the stream's work, and a second error, kept by the stream, neither escapes nor
// terminates the process; the first error is the one that arrives.
TEST(CpuStreamEvents, DrainWaitsForTheWorkAndSwallowsASecondError) {
  auto s = make_stream(Device::cpu());
  std::atomic<int> done{0};
  try {
    Drain drain{*s};
    s->enqueue_host([] { throw std::runtime_error("second error, on the stream"); });
    s->enqueue_host([&] {
      std::this_thread::sleep_for(20ms);
      ++done;
    });
    throw std::logic_error("first error, on the host");
  } catch (const std::logic_error& e) {
    EXPECT_STREQ(e.what(), "first error, on the host");
    EXPECT_EQ(done.load(), 1) << "the stream's work had ended when the error left the scope";
  }
  // The stream's error was consumed by the drain: the stream is usable again.
  s->enqueue_host([&] { ++done; });
  EXPECT_NO_THROW(s->synchronize());
  EXPECT_EQ(done.load(), 2);
  // synchronize_quietly itself: the error is dropped, not thrown.
  s->enqueue_host([] { throw std::runtime_error("dropped"); });
  synchronize_quietly(*s);
  EXPECT_NO_THROW(s->synchronize());
}

TEST(CpuStreamEvents, CpuStreamRejectsForeignEvents) {
  // An event of another implementation cannot be waited on by a CPU stream.
  class FakeEvent final : public Event {
   public:
    Device device() const override { return Device::cuda(0); }
    bool query() override { return true; }
    void synchronize() override {}
    float elapsed_ms_since(Event&) override { return 0; }
  } fake;
  auto s = make_stream(Device::cpu());
  EXPECT_THROW(s->wait(fake), Error);
  EXPECT_THROW(s->record(fake), Error);
}

// The scheduler's queue pattern: a double-buffered slot array between a producer and a
// consumer stream, each slot with a ready event (recorded by the producer) and a free event
// (recorded by the consumer). With the waits in place every tick's value arrives intact even
// with random delays on both workers.
TEST_P(CpuStreams, DoubleBufferedQueueDeliversEveryTickIntact) {
  const int64_t jittered_before = cpu_stream_jittered_closures();
  auto producer = make_stream(Device::cpu(), jitter(GetParam(), 11));
  auto consumer = make_stream(Device::cpu(), jitter(GetParam(), 12));
  constexpr int kTicks = 200, kWidth = 64;
  std::vector<int> slots[2] = {std::vector<int>(kWidth), std::vector<int>(kWidth)};
  std::unique_ptr<Event> ready[2] = {make_event(Device::cpu()), make_event(Device::cpu())};
  std::unique_ptr<Event> freed[2] = {make_event(Device::cpu()), make_event(Device::cpu())};
  std::vector<int> received;
  int torn = 0;
  for (int t = 0; t < kTicks; ++t) {
    const int slot = t % 2;
    producer->wait(*freed[slot]);
    producer->enqueue_host([&, t, slot] {
      for (int i = 0; i < kWidth; ++i) slots[slot][size_t(i)] = t;
    });
    producer->record(*ready[slot]);
    consumer->wait(*ready[slot]);
    consumer->enqueue_host([&, slot] {
      const int first = slots[slot][0];
      for (int i = 0; i < kWidth; ++i) torn += slots[slot][size_t(i)] != first;
      received.push_back(first);
    });
    consumer->record(*freed[slot]);
  }
  consumer->synchronize();
  producer->synchronize();
  EXPECT_EQ(torn, 0);
  ASSERT_EQ(received.size(), size_t(kTicks));
  for (int t = 0; t < kTicks; ++t) EXPECT_EQ(received[size_t(t)], t);
  // The delays asked for were injected (most closures wait 1 us or more).
  if (GetParam() > 0) {
    EXPECT_GT(cpu_stream_jittered_closures() - jittered_before, kTicks);
  }
}

INSTANTIATE_TEST_SUITE_P(Jitter, CpuStreams, ::testing::Values(0, 50, 300),
                         [](const auto& info) { return "jitter" + std::to_string(info.param) + "us"; });

// ---- Graphs ---------------------------------------------------------------------------------

TEST_P(CpuStreams, CapturedWorkRunsOnlyWhenLaunchedAndAsOftenAsLaunched) {
  auto s = make_stream(Device::cpu(), jitter(GetParam(), 5));
  std::vector<int> seen;
  int value = 1;
  s->begin_capture();
  EXPECT_TRUE(s->capturing());
  s->enqueue_host([&] { seen.push_back(value); });
  s->enqueue_host([&] { value *= 3; });
  std::unique_ptr<Graph> g = s->end_capture();
  EXPECT_FALSE(s->capturing());
  EXPECT_EQ(g->size(), 2u);
  s->synchronize();
  EXPECT_TRUE(seen.empty()) << "captured work ran at capture";
  for (int i = 0; i < 4; ++i) {
    g->launch(*s);
    s->enqueue_host([&] { value += 1; });  // eager work between launches keeps its place
  }
  s->synchronize();
  // 1 -> 3 +1 = 4 -> 12 +1 = 13 -> 39 +1 = 40 -> 120 +1 = 121
  EXPECT_EQ(seen, (std::vector<int>{1, 4, 13, 40}));
  EXPECT_EQ(value, 121);
}

// The scheduler's pattern: a producer's captured tick records "ready", a consumer's captured
// tick waits on it; each launch's wait refers to the record made by the latest launch before
// it, as an eager wait would.
TEST_P(CpuStreams, EventNodesActAtEachLaunchAsTheCapturedCallsWould) {
  auto producer = make_stream(Device::cpu(), jitter(GetParam(), 6));
  auto consumer = make_stream(Device::cpu(), jitter(GetParam(), 7));
  auto ready = make_event(Device::cpu()), freed = make_event(Device::cpu());
  // ready is pending before the capture (a record on a third stream, held by a gate), so that a
  // record made while capturing, instead of at each launch, would show as a completed event.
  auto other = make_stream(Device::cpu());
  std::promise<void> gate;
  other->enqueue_host([opened = gate.get_future().share()] { opened.wait(); });
  other->record(*ready);
  int slot = -1, tick = 0;
  std::vector<int> got;
  producer->begin_capture();
  producer->wait(*freed);  // never recorded at capture: still a node, resolved at launch
  producer->enqueue_host([&] {
    std::this_thread::sleep_for(100us);
    slot = tick;
  });
  producer->record(*ready);
  std::unique_ptr<Graph> produce = producer->end_capture();
  consumer->begin_capture();
  consumer->wait(*ready);
  consumer->enqueue_host([&] {
    got.push_back(slot);
    ++tick;
  });
  consumer->record(*freed);
  std::unique_ptr<Graph> consume = consumer->end_capture();
  EXPECT_FALSE(ready->query());  // capturing recorded nothing: still the third stream's pending record
  gate.set_value();
  other->synchronize();
  EXPECT_TRUE(ready->query());
  for (int i = 0; i < 40; ++i) {
    produce->launch(*producer);
    consume->launch(*consumer);
  }
  consumer->synchronize();
  producer->synchronize();
  ASSERT_EQ(got.size(), 40u);
  for (int i = 0; i < 40; ++i) EXPECT_EQ(got[size_t(i)], i) << "launch " << i;
}

TEST(CpuStreamGraphs, ReplayedSgdReadsTheLearningRateWrittenBeforeEachLaunch) {
  test::check_sgd_graph_replays(Device::cpu());
}

TEST(CpuStreamGraphs, MisuseDuringCaptureIsAnError) {
  auto s = make_stream(Device::cpu());
  s->begin_capture();
  EXPECT_THROW(s->begin_capture(), Error);
  EXPECT_THROW(s->synchronize(), Error);
  EXPECT_THROW(s->query(), Error);
  std::unique_ptr<Graph> g = s->end_capture();
  EXPECT_THROW(s->end_capture(), Error);
  EXPECT_EQ(g->size(), 0u);
  g->launch(*s);  // an empty graph does nothing
  s->synchronize();
}

}  // namespace
