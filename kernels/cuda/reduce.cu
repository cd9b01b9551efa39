// Column sums of a row-major [m, c] matrix: the bias gradients of convolutions and linear
// layers (column_reduce.cuh has the deterministic two-stage scheme).
#include "kernels/cuda/column_reduce.cuh"

namespace sp::kernels::cuda::detail {
namespace {

struct PlainTerm {
  const float* x;
  int c;
  __device__ void operator()(int64_t i, int j, double* acc) const { acc[0] += x[i * c + j]; }
};

__global__ void __launch_bounds__(kFinalizeThreads)
    column_sums_finalize_kernel(const double* partial, int chunks, int c, float* out) {
  const int j = warp_column();
  if (j >= c) return;  // the whole warp leaves together
  const double total = warp_sum_chunks(partial, chunks, c, j);
  if (threadIdx.x % kWarpSize == 0) out[j] = float(total);
}

}  // namespace

void column_sums(int64_t m, int64_t c64, const float* x, float* out, cudaStream_t stream) {
  const int c = checked_columns("column_sums", c64);
  const ReducePlan plan = plan_column_reduce(m);
  Workspace partial(sizeof(double) * size_t(plan.chunks) * size_t(c), stream);
  column_partials<1>(m, c, plan, PlainTerm{x, c}, partial.as<double>(), stream);
  column_sums_finalize_kernel<<<finalize_blocks(c), kFinalizeThreads, 0, stream>>>(partial.as<double>(), plan.chunks, c,
                                                                                   out);
  SP_CUDA_CHECK_LAUNCH();
}

}  // namespace sp::kernels::cuda::detail
