// Column sums of a row-major bf16 [m, c] matrix into fp32 (the bias gradient of the bf16
// convolutions): reduce.cu's deterministic two-stage scheme (column_reduce.cuh) over the
// elements widened to fp32, accumulated in double and rounded once.
#include "kernels/cuda/column_reduce.cuh"
#include "kernels/cuda/mma_launch.cuh"
#include "kernels/cuda/tensor_core.h"

namespace sp::kernels::cuda::detail::mma {
namespace {

struct Bf16Term {
  const uint16_t* x;
  int c;
  __device__ void operator()(int64_t i, int j, double* acc) const { acc[0] += bf16_widen(x[i * c + j]); }
};

__global__ void __launch_bounds__(kFinalizeThreads)
    column_sums_finalize_kernel(const double* partial, int chunks, int c, float* out) {
  const int j = warp_column();
  if (j >= c) return;  // the whole warp leaves together
  const double total = warp_sum_chunks(partial, chunks, c, j);
  if (threadIdx.x % kWarpSize == 0) out[j] = float(total);
}

}  // namespace
}  // namespace sp::kernels::cuda::detail::mma

namespace sp::kernels::cuda {

using namespace detail;
using namespace detail::mma;

void column_sums_bf16(int64_t m, int64_t c64, const uint16_t* x, float* out, cudaStream_t stream) {
  const int c = checked_columns("column_sums_bf16", c64);
  const ReducePlan plan = plan_column_reduce(m);
  Workspace partial(sizeof(double) * size_t(plan.chunks) * size_t(c), stream);
  column_partials<1>(m, c, plan, Bf16Term{x, c}, partial.as<double>(), stream);
  column_sums_finalize_kernel<<<finalize_blocks(c), kFinalizeThreads, 0, stream>>>(partial.as<double>(), plan.chunks,
                                                                                   c, out);
  SP_CUDA_CHECK_LAUNCH();
}

}  // namespace sp::kernels::cuda
