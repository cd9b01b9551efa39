// The CUDA implementations of streams, events, the caching allocator, pinned buffers and
// copies. Every test skips, saying why, on a machine without a GPU.
#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "engine/allocator.h"
#include "engine/ops.h"
#include "engine/stream.h"
#include "graph_testing.h"
#include "kernels/common/error.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

using namespace sp;

namespace {

#define REQUIRE_GPU()                                                                                 \
  do {                                                                                                \
    if (!cuda_built()) GTEST_SKIP() << "this build has no CUDA backend (STALEPROP_CUDA=OFF)";         \
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible: the GPU tests need one"; \
  } while (0)

std::vector<float> iota(size_t n, float start) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + float(i);
  return v;
}

TEST(CudaRuntime, CopiesRoundTripThroughTheDevice) {
  REQUIRE_GPU();
  auto s = make_stream(Device::cuda(0));
  std::vector<float> host = iota(1 << 16, 1.f), back(host.size(), 0.f);
  Tensor h = Tensor::from_blob(host.data(), {int64_t(host.size())}, DType::F32);
  Tensor b = Tensor::from_blob(back.data(), {int64_t(back.size())}, DType::F32);
  Tensor d1 = Tensor::empty(h.shape(), DType::F32, Device::cuda(0), s.get());
  Tensor d2 = Tensor::empty(h.shape(), DType::F32, Device::cuda(0), s.get());
  ops::copy(*s, h, d1);
  ops::copy(*s, d1, d2);
  ops::copy(*s, d2, b);
  s->synchronize();
  EXPECT_EQ(host, back);
}

TEST(CudaRuntime, HostWorkRunsInStreamOrderAndEventsOrderStreams) {
  REQUIRE_GPU();
  auto a = make_stream(Device::cuda(0)), b = make_stream(Device::cuda(0));
  auto ev = make_event(Device::cuda(0));
  EXPECT_TRUE(ev->query()) << "a never-recorded event counts as complete";
  std::vector<int> order;
  std::atomic<int> value{0};
  a->enqueue_host([&] { order.push_back(1); });
  a->enqueue_host([&] {
    order.push_back(2);
    value = 42;
  });
  a->record(*ev);
  b->wait(*ev);
  int seen = -1;
  b->enqueue_host([&] { seen = value.load(); });
  b->synchronize();
  a->synchronize();
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  EXPECT_EQ(seen, 42);
  EXPECT_TRUE(ev->query());
  EXPECT_TRUE(a->query());
}

TEST(CudaRuntime, TimingEventsMeasureDeviceWork) {
  REQUIRE_GPU();
  auto s = make_stream(Device::cuda(0));
  auto start = make_event(Device::cuda(0), true), stop = make_event(Device::cuda(0), true);
  Tensor big = Tensor::empty({64 << 20}, DType::F32, Device::cuda(0), s.get());
  Tensor other = Tensor::empty({64 << 20}, DType::F32, Device::cuda(0), s.get());
  s->record(*start);
  for (int i = 0; i < 4; ++i) ops::copy(*s, big, other);
  s->record(*stop);
  stop->synchronize();
  const float ms = stop->elapsed_ms_since(*start);
  EXPECT_GT(ms, 0.f);
  EXPECT_LT(ms, 10000.f);
}

// A query of unfinished work answers false and leaves no error behind: cudaErrorNotReady is also
// the thread's last error, which a later check (a test's, cuBLAS's, cuDNN's) would read as a
// failure. The work is a host function held until the queries are done.
TEST(CudaRuntime, QueriesOfUnfinishedWorkLeaveNoError) {
  REQUIRE_GPU();
#if STALEPROP_WITH_CUDA
  auto s = make_stream(Device::cuda(0));
  auto ev = make_event(Device::cuda(0));
  std::atomic<bool> release{false};
  s->enqueue_host([&] {
    while (!release.load()) std::this_thread::yield();
  });
  s->record(*ev);
  const bool stream_done = s->query(), event_done = ev->query();
  const cudaError_t last = cudaGetLastError();
  release = true;
  s->synchronize();
  EXPECT_FALSE(stream_done);
  EXPECT_FALSE(event_done);
  EXPECT_EQ(last, cudaSuccess) << cudaGetErrorName(last);
  EXPECT_TRUE(s->query());
  EXPECT_TRUE(ev->query());
#endif
}

// A stream destroyed inside a capture (an error between begin_capture and end_capture) leaves
// its thread capturing nothing: another stream's work, allocation and synchronisation go on.
TEST(CudaRuntime, AStreamDestroyedWhileCapturingLeavesTheThreadFree) {
  REQUIRE_GPU();
#if STALEPROP_WITH_CUDA
  const Device gpu = Device::cuda(0);
  {
    auto s = make_stream(gpu);
    s->begin_capture();
    s->enqueue_host([] {});
  }
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  auto t = make_stream(gpu);
  std::vector<float> host = iota(1000, 1.f), back(host.size(), 0.f);
  Tensor h = Tensor::from_blob(host.data(), {int64_t(host.size())}, DType::F32);
  Tensor b = Tensor::from_blob(back.data(), {int64_t(back.size())}, DType::F32);
  Tensor d = Tensor::empty(h.shape(), DType::F32, gpu, t.get());
  ops::copy(*t, h, d);
  ops::copy(*t, d, b);
  t->synchronize();
  EXPECT_EQ(host, back);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
#endif
}

// A host function that throws on a CUDA stream does as on a CPU stream: the later work runs,
// and synchronize() rethrows the first error, once (it used to unwind through the driver's C
// callback, which ends the process).
TEST(CudaRuntime, SynchronizeRethrowsTheFirstHostErrorOnce) {
  REQUIRE_GPU();
  test::check_host_errors_rethrown_once(Device::cuda(0));
}

TEST(CudaRuntime, CachingAllocatorStopsCallingCudaMallocAfterWarmUp) {
  REQUIRE_GPU();
  auto s = make_stream(Device::cuda(0));
  CachingAllocator& alloc = device_allocator(Device::cuda(0));
  auto step = [&] {
    std::vector<Tensor> live;
    for (int64_t n : {1000, 4096, 1 << 20, 3 << 20, 17})
      live.push_back(Tensor::empty({n}, DType::F32, Device::cuda(0), s.get()));
  };
  step();
  const uint64_t warm = alloc.stats().backend_allocs;
  for (int i = 0; i < 10; ++i) step();
  EXPECT_EQ(alloc.stats().backend_allocs, warm);
  EXPECT_GE(alloc.stats().peak_allocated_bytes, size_t(4) * ((3 << 20) + (1 << 20)));
}

// A destroyed stream first finishes its work, and the blocks it had cached then serve the
// streams after it (CachingAllocator::retire_stream) instead of staying cached under its address.
TEST(CudaRuntime, ADestroyedStreamFinishesItsWorkAndLeavesItsBlocksToLaterStreams) {
  REQUIRE_GPU();
  const Device gpu = Device::cuda(0);
  CachingAllocator& alloc = device_allocator(gpu);
  const int64_t n = (int64_t(3) << 20) + 1237;  // a size class nothing else here uses
  auto later = make_stream(gpu);                 // made first: never at the address of `s`
  void* block = nullptr;
  {
    auto s = make_stream(gpu);
    Tensor t = Tensor::empty({n}, DType::F32, gpu, s.get());
    block = t.data<float>();
    for (int i = 1; i <= 200; ++i) ops::fill(*s, t, float(i));  // still queued as s goes
  }
  const uint64_t before = alloc.stats().backend_allocs;
  Tensor u = Tensor::empty({n}, DType::F32, gpu, later.get());
  EXPECT_EQ(static_cast<void*>(u.data<float>()), block);
  EXPECT_EQ(alloc.stats().backend_allocs, before);
  Tensor host = Tensor::empty({n}, DType::F32);
  ops::copy(*later, u, host);
  later->synchronize();
  EXPECT_EQ(host.at<float>(0), 200.f) << "the last fill of the destroyed stream had ended";
  EXPECT_EQ(host.at<float>(n - 1), 200.f);
}

TEST(CudaRuntime, PinnedBuffersArePageLocked) {
  REQUIRE_GPU();
  PinnedBuffer p(1 << 20);
  EXPECT_TRUE(p.pinned());
  ASSERT_NE(p.data(), nullptr);
}

TEST(CudaRuntime, GraphsReplayKernelsHostFunctionsAndEventNodes) {
  REQUIRE_GPU();
  test::check_sgd_graph_replays(Device::cuda(0));
}

// Two streams, each replaying its own captured work, ordered by external event nodes as the
// pipeline's queues are: the producer adds one to a slot, the consumer adds the slot to a sum.
// Each consumer launch must see exactly the value of the producer launch just before it.
TEST(CudaRuntime, GraphEventNodesOrderReplaysAcrossStreams) {
  REQUIRE_GPU();
  const Device d = Device::cuda(0);
  auto producer = make_stream(d), consumer = make_stream(d);
  auto ready = make_event(d), freed = make_event(d);
  const int64_t n = int64_t(1) << 22;
  Tensor slot = Tensor::empty({n}, DType::F32, d), ones = Tensor::empty({n}, DType::F32, d);
  Tensor seen = Tensor::empty({n}, DType::F32, d), sum = Tensor::empty({n}, DType::F32, d);
  ops::fill(*producer, slot, 0.f);
  ops::fill(*producer, ones, 1.f);
  ops::fill(*producer, sum, 0.f);
  producer->synchronize();
  producer->begin_capture();
  producer->wait(*freed);
  ops::add(*producer, slot, ones, slot);
  producer->record(*ready);
  std::unique_ptr<Graph> produce = producer->end_capture();
  consumer->begin_capture();
  consumer->wait(*ready);
  ops::copy(*consumer, slot, seen);
  consumer->record(*freed);
  ops::add(*consumer, sum, seen, sum);
  std::unique_ptr<Graph> consume = consumer->end_capture();
  const int launches = 20;
  for (int i = 0; i < launches; ++i) {
    produce->launch(*producer);
    consume->launch(*consumer);
  }
  consumer->synchronize();
  producer->synchronize();
  std::vector<float> got(static_cast<size_t>(n));
  ops::copy(*consumer, sum, Tensor::from_blob(got.data(), {n}, DType::F32));
  consumer->synchronize();
  const float want = float(launches * (launches + 1) / 2);
  size_t wrong = 0;
  for (float v : got) wrong += v != want;
  EXPECT_EQ(wrong, 0u) << "e.g. " << got[0] << " instead of " << want;
}

TEST(CudaRuntime, CpuAndCudaObjectsDoNotMix) {
  REQUIRE_GPU();
  auto gpu = make_stream(Device::cuda(0));
  auto cpu_event = make_event(Device::cpu());
  EXPECT_THROW(gpu->wait(*cpu_event), Error);
  auto cpu = make_stream(Device::cpu());
  auto gpu_event = make_event(Device::cuda(0));
  EXPECT_THROW(cpu->wait(*gpu_event), Error);
}

// Peer access: one GPU reaches its own memory; between two, it is enabled exactly where the
// hardware allows, both ways, again without error, and a copy between them gives the bytes.
TEST(CudaRuntime, PeerAccessBetweenTheModulesGpus) {
  REQUIRE_GPU();
  EXPECT_TRUE(enable_peer_access(Device::cuda(0), Device::cuda(0)));
  if (cuda_device_count() < 2) GTEST_SKIP() << "one GPU visible: peer access between two needs two";
  const Device a = Device::cuda(0), b = Device::cuda(1);
#if STALEPROP_WITH_CUDA
  for (const auto& [from, to] : {std::pair{a, b}, std::pair{b, a}}) {
    int can = 0;
    ASSERT_EQ(cudaDeviceCanAccessPeer(&can, from.index, to.index), cudaSuccess);
    EXPECT_EQ(enable_peer_access(from, to), can != 0) << from.str() << " -> " << to.str();
    EXPECT_EQ(enable_peer_access(from, to), can != 0) << from.str() << " -> " << to.str() << ", again";
  }
#endif
  auto sa = make_stream(a), sb = make_stream(b);
  Tensor src = Tensor::empty({1 << 20}, DType::F32, a, sa.get()), dst = Tensor::empty({1 << 20}, DType::F32, b, sb.get());
  ops::fill(*sa, src, 3.f);
  sa->synchronize();
  ops::copy(*sb, src, dst);
  Tensor host = Tensor::empty({1 << 20}, DType::F32);
  ops::copy(*sb, dst, host);
  sb->synchronize();
  for (int64_t i = 0; i < host.numel(); i += 4099) ASSERT_EQ(host.at<float>(i), 3.f) << i;
}

}  // namespace
