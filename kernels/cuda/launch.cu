// Programmatic dependent launch (common.cuh, launch_kernel): the switch, the check that this
// build's kernels and this device can take it, and a self-test of the ordering it relies on.
// Also the set-up of the stream-ordered scratch pool (common.cuh, Workspace).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops.h"

namespace sp::kernels::cuda {
namespace {

using detail::pdl_prologue;

std::atomic<int> g_pdl{-1};  // -1: not chosen yet (the environment decides at first use)

// Never launched: its attributes tell which PTX the kernels of this build were compiled from.
__global__ void pdl_probe_kernel(int* out) {
  pdl_prologue();
  if (out) *out = 0;
}

// Whether the current device runs kernels of this build that contain griddepcontrol.wait: a
// compute capability 9.0 device and kernels compiled for compute 9.0 or later. A build for an
// older architecture can still run on an H100 (its PTX JIT-compiled there), but pdl_prologue
// compiled to nothing in it, so the attribute must not be set.
bool device_takes_pdl() {
  static std::mutex mu;
  static std::set<int> yes, no;
  int device = 0;
  SP_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lk(mu);
  if (yes.count(device)) return true;
  if (no.count(device)) return false;
  int major = 0;
  SP_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attr{};
  SP_CUDA_CHECK(cudaFuncGetAttributes(&attr, pdl_probe_kernel));
  const bool ok = major >= 9 && attr.ptxVersion >= 90;
  (ok ? yes : no).insert(device);
  return ok;
}

// The self-test's kernels: the producer spins for `cycles` clock cycles and then writes 1; the
// consumer, launched right after it, copies what it sees after its prologue.
__global__ void pdl_producer_kernel(int* flag, long long cycles) {
  pdl_prologue();
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
  *flag = 1;
}
__global__ void pdl_consumer_kernel(const int* flag, int* seen) {
  pdl_prologue();
  *seen = *flag;
}

}  // namespace

void set_programmatic_launch(bool on) { detail::set_switch(g_pdl, on); }
bool programmatic_launch() { return detail::env_switch(g_pdl, "STALEPROP_PDL", false); }
bool detail::programmatic_launch_on() { return programmatic_launch() && device_takes_pdl(); }
bool programmatic_launch_active() { return detail::programmatic_launch_on(); }

bool programmatic_launch_selftest(cudaStream_t stream) {
  int* d = nullptr;
  SP_CUDA_CHECK(cudaMallocAsync(&d, 2 * sizeof(int), stream));
  SP_CUDA_CHECK(cudaMemsetAsync(d, 0, 2 * sizeof(int), stream));
  detail::launch_kernel(pdl_producer_kernel, 1, 1, 0, stream, d, 200000LL);  // ~0.1 ms at 2 GHz
  detail::launch_kernel(pdl_consumer_kernel, 1, 1, 0, stream, static_cast<const int*>(d), d + 1);
  int seen = 0;
  SP_CUDA_CHECK(cudaMemcpyAsync(&seen, d + 1, sizeof(int), cudaMemcpyDeviceToHost, stream));
  SP_CUDA_CHECK(cudaFreeAsync(d, stream));
  SP_CUDA_CHECK(cudaStreamSynchronize(stream));
  return seen == 1;
}

void detail::configure_scratch_pool() {
  static std::atomic<uint64_t> done{0};  // bit d: device d set up (devices >= 64 take the lock every time)
  int device = 0;
  SP_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return;
  static std::mutex mu;
  static std::set<int> set_up;
  std::lock_guard<std::mutex> lk(mu);
  if (set_up.count(device)) return;
  cudaMemPool_t pool;
  SP_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t keep_all = UINT64_MAX;
  SP_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all));
  const char* env = std::getenv("STALEPROP_POOL_INTERNAL_DEPS");
  int internal_deps = env && std::strcmp(env, "1") == 0 ? 1 : 0;
  SP_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &internal_deps));
  set_up.insert(device);  // only once every setting took (a throw leaves it to be tried again)
  done.fetch_or(bit, std::memory_order_release);
}

}  // namespace sp::kernels::cuda
