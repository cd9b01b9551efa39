// Internals shared by the CUDA kernels (not part of the op contract in ops.h): launch-size
// helpers, stream-ordered scratch memory, deterministic warp reductions, and the entry points
// one kernel file offers another.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include "kernels/common/cuda_check.h"
#include "kernels/common/error.h"
#include "kernels/common/shapes.h"
#include "kernels/common/switches.h"

namespace sp::kernels::cuda::detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

// ---- Grid-stride element kernels -----------------------------------------------------------
// Threads per block of the one-thread-per-element kernels.
constexpr int kElementThreads = 256;
// Grid cap of those kernels: enough blocks to fill any current GPU several times over; a
// larger tensor is covered by the grid-stride loop.
constexpr int64_t kMaxElementBlocks = 8192;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride kernel over n > 0 elements with kElementThreads threads each.
inline unsigned element_blocks(int64_t n) {
  return unsigned(std::min(ceil_div(n, kElementThreads), kMaxElementBlocks));
}

__device__ __forceinline__ int64_t global_thread_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// ---- Stream-ordered scratch memory ---------------------------------------------------------
// Device scratch allocated and freed in stream order (cudaMallocAsync / cudaFreeAsync), so it
// is valid for every kernel enqueued on `stream` between construction and destruction, needs
// no host synchronisation, and is safe when several streams run the same op concurrently.
// The free is enqueued by the destructor, i.e. after the kernels that use the memory.
// The current device's default pool is set up once per device (configure_scratch_pool, launch.cu):
//   * it keeps freed memory (its release threshold raised), so after the first steps these
//     allocations no longer reach the driver: a training step makes no device allocations of
//     its own;
//   * it does not insert waits between streams to reuse memory (cudaMemPoolReuseAllowInternal-
//     Dependencies off): by default cudaMallocAsync on one stream may take a block another stream
//     freed and make the allocating stream wait for the freeing stream's work up to that free. The
//     decoupled pipeline's modules run on their own streams and allocate scratch every step (the
//     transposed filters, batch norm's partial sums), so such waits would chain the modules'
//     streams together. Without them a stream reuses its own frees, frees already finished, and
//     frees it already waits for through events; the pool holds a little more instead. The
//     environment variable STALEPROP_POOL_INTERNAL_DEPS=1 restores the driver's default.
void configure_scratch_pool();

class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    configure_scratch_pool();
    SP_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  // A destructor cannot throw: a failing free leaves its status for the next checked call.
  ~Workspace() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  Workspace(Workspace&& o) noexcept : ptr_(o.ptr_), stream_(o.stream_) { o.ptr_ = nullptr; }

  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// ---- Process-wide on/off switches (kernels/common/switches.h) ----------------------------------
using ::sp::kernels::env_switch;
using ::sp::kernels::set_switch;

// ---- Launching: every kernel of ours, with programmatic dependent launch when on -------------
// With programmatic dependent launch (Hopper; kernels/cuda/ops.h: set_programmatic_launch, on
// where the environment variable STALEPROP_PDL is 1) a kernel may be scheduled while the kernel
// before it in the stream is still running, so its launch and its blocks' start overlap that
// kernel's tail instead of following its end. For that to be safe, every kernel we launch
// begins with pdl_prologue(): griddepcontrol.wait blocks until the previous kernel in the stream
// has finished and its memory operations are visible, before the kernel reads or writes
// anything, so each kernel still sees its inputs complete and no later kernel overwrites what
// it still reads; then launch_dependents lets the next kernel be scheduled. Without the launch
// attribute (or before sm_90) the wait returns at once. tests/test_launch_discipline.cpp checks
// the sources: every __global__ function begins with it, and every launch goes through
// launch_kernel (or, for the cooperative batch-norm kernels, launch_kernel_with).
__device__ __forceinline__ void pdl_prologue() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

bool programmatic_launch_on();  // launch.cu

// kernel<<<grid, block, smem, stream>>>(args...) with the n launch attributes attrs[0..n);
// returns the launch's status (an error is left set for the caller to handle).
template <class... Params, class... Args>
cudaError_t launch_kernel_attrs(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                cudaLaunchAttribute* attrs, unsigned n, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = n > 0 ? attrs : nullptr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// The same with the one launch attribute *attr (nullable).
template <class... Params, class... Args>
cudaError_t launch_kernel_with(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               const cudaLaunchAttribute* attr, Args&&... args) {
  cudaLaunchAttribute copy{};
  if (attr != nullptr) copy = *attr;
  return launch_kernel_attrs(kernel, grid, block, smem, stream, &copy, attr != nullptr ? 1u : 0u,
                             std::forward<Args>(args)...);
}

// Launches with `attrs` (room for one more) plus the programmatic-serialisation attribute when
// programmatic_launch_on() (launch.cu: the switch, on a device and build that take it); launch
// errors throw, and are not left set for an unrelated later check.
template <class... Params, class... Args>
void launch_kernel_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       cudaLaunchAttribute* attrs, unsigned n, Args&&... args) {
  if (programmatic_launch_on()) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  const cudaError_t err = launch_kernel_attrs(kernel, grid, block, smem, stream, attrs, n, std::forward<Args>(args)...);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    SP_CUDA_CHECK(err);
  }
}

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic dependent launch where on.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attrs[1]{};
  launch_kernel_pdl(kernel, grid, block, smem, stream, attrs, 0, std::forward<Args>(args)...);
}

// The same in thread-block clusters of cluster_x blocks along x (grid.x a multiple of it).
template <class... Params, class... Args>
void launch_kernel_in_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               unsigned cluster_x, Args&&... args) {
  cudaLaunchAttribute attrs[2]{};
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = cluster_x;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  launch_kernel_pdl(kernel, grid, block, smem, stream, attrs, 1, std::forward<Args>(args)...);
}

// ---- Deterministic warp reductions ---------------------------------------------------------
// A fixed xor butterfly: the order of the additions depends only on the lane numbers, and
// every lane ends with the same value (at each step both partners add the same two numbers,
// and floating-point addition is commutative). All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ T warp_allreduce_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

// ---- Entry points between kernel files -----------------------------------------------------
// gemm.cu: the GEMM of ops.h with an optional per-column bias added in the epilogue,
// C = alpha * op(A) * op(B) + beta * C + bias[j] (linear layers).
void gemm_bias(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const float* bias /*nullable*/,
               cudaStream_t stream);

// conv_small_c.cu: the direct bf16 forward and weight gradient of a convolution with few input
// channels (conv_small_c_plan.h), where conv_small_c() is on and the plan takes the shape; false
// (nothing launched) otherwise. dw as conv2d_backward_weight_bf16 writes it (no bias gradient).
bool conv_small_c_forward(const Conv2dShape& sh, const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y,
                          cudaStream_t stream);
bool conv_small_c_backward_weight(const Conv2dShape& sh, const uint16_t* x, const uint16_t* dy, float* dw,
                                  cudaStream_t stream);

// reduce.cu: out[j] = sum over the m rows of x[i * c + j] (bias gradients), accumulated in
// double in a fixed order (column_reduce.cuh) and rounded once.
void column_sums(int64_t m, int64_t c, const float* x, float* out, cudaStream_t stream);

}  // namespace sp::kernels::cuda::detail
