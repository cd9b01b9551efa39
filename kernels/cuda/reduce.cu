// Column sums of a row-major [m, c] matrix: the bias gradients of convolutions and linear
// layers, from fp32 or bf16 elements (column_reduce.cuh has the deterministic two-stage scheme;
// the sums run in double and are rounded to fp32 once).
#include "kernels/cuda/column_reduce.cuh"
#include "kernels/cuda/storage.cuh"
#include "kernels/cuda/tensor_core.h"

namespace sp::kernels::cuda::detail {
namespace {

template <class S>
struct SumTerm {
  static constexpr int kVals = 1;
  const typename S::Storage* x;
  int c;
  struct Cols {};
  __device__ Cols columns(int, int) const { return {}; }
  template <bool kVec>
  __device__ void load(int64_t i, int j0, int ncols, float (&v)[1][kChunkElems]) const {
    load_row<S, kVec>(x, i, c, j0, ncols, v[0]);
  }
  __device__ void prefetch(int64_t i, int j0) const { prefetch_l2(x + i * c + j0); }
  __device__ void add(const float (&v)[1][kChunkElems], const Cols&, double (&acc)[1][kChunkElems]) const {
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e) acc[0][e] += double(v[0][e]);
  }
};

__global__ void __launch_bounds__(kFinalizeThreads)
    column_sums_finalize_kernel(const double* partial, int chunks, int c, float* out) {
  pdl_prologue();
  const int j = warp_column();
  if (j >= c) return;  // the whole warp leaves together
  const double total = warp_sum_chunks(partial, chunks, c, j);
  if (threadIdx.x % kWarpSize == 0) out[j] = float(total);
}

template <class S>
void column_sums_impl(const char* op, int64_t m, int64_t c64, const typename S::Storage* x, float* out,
                      cudaStream_t stream) {
  const int c = checked_columns(op, c64);
  const ColumnReducePlan plan = plan_column_reduce(m, c);
  Workspace partial(sizeof(double) * size_t(plan.chunks) * size_t(c), stream);
  column_partials<1>(m, plan, SumTerm<S>{x, c}, chunk_loads_ok(c, x), partial.as<double>(), stream);
  launch_kernel(column_sums_finalize_kernel, finalize_blocks(c), kFinalizeThreads, 0, stream, partial.as<double>(),
                plan.chunks, c, out);
}

}  // namespace

void column_sums(int64_t m, int64_t c, const float* x, float* out, cudaStream_t stream) {
  column_sums_impl<F32>("column_sums", m, c, x, out, stream);
}

}  // namespace sp::kernels::cuda::detail

namespace sp::kernels::cuda {

void column_sums_bf16(int64_t m, int64_t c, const uint16_t* x, float* out, cudaStream_t stream) {
  detail::column_sums_impl<detail::BF16>("column_sums_bf16", m, c, x, out, stream);
}

}  // namespace sp::kernels::cuda
