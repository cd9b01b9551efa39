// Deterministic column reductions of a row-major [m, c] matrix in double (batch-norm
// statistics, bias gradients), with no atomics, in two stages:
//   1. column_partials_kernel: the rows are cut into chunks of chunk_rows rows; block
//      (column group, chunk) gives each column kReduceRowLanes threads that sum every
//      kReduceRowLanes-th row of the chunk, adds the lanes in lane order and writes
//      partial[chunk][s * c + j] for each of the kSums sums s;
//   2. the caller's finalize kernel gives each column a warp, which adds that column's chunk
//      partials with warp_sum_chunks and then computes whatever the op needs.
// The chunking depends on m only, so the summation order is fixed by the shape.
#pragma once

#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace sp::kernels::cuda::detail {

constexpr int kReduceCols = 32;     // columns per block, one per lane: a warp reads 128 B of a row
constexpr int kReduceRowLanes = 8;  // threads per column, each summing every 8th row
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kMaxChunks = 1024;  // bounds the finalize's work (32 chunks per lane)

struct ReducePlan {
  int64_t chunk_rows;
  int chunks;
};

inline ReducePlan plan_column_reduce(int64_t m) {
  const int64_t rows = std::max(kMinChunkRows, ceil_div(m, kMaxChunks));
  return ReducePlan{rows, int(std::max<int64_t>(1, ceil_div(m, rows)))};
}

// Term: __device__ void operator()(int64_t i, int j, double* acc) const, adding the
// contributions of element (i, j) to acc[0..kSums).
// (No __launch_bounds__: with it ptxas squeezes the two-sum instance into 32 registers and spills.)
template <int kSums, class Term>
__global__ void column_partials_kernel(int64_t m, int c, int64_t chunk_rows, Term term, double* partial) {
  __shared__ double lanes[kSums][kReduceRowLanes][kReduceCols];
  const int tx = int(threadIdx.x), ty = int(threadIdx.y);
  const int j = int(blockIdx.x) * kReduceCols + tx;
  const int64_t begin = int64_t(blockIdx.y) * chunk_rows;
  const int64_t end = m < begin + chunk_rows ? m : begin + chunk_rows;
  double acc[kSums] = {};
  if (j < c)
    for (int64_t i = begin + ty; i < end; i += kReduceRowLanes) term(i, j, acc);
#pragma unroll
  for (int s = 0; s < kSums; ++s) lanes[s][ty][tx] = acc[s];
  __syncthreads();
  if (ty != 0 || j >= c) return;
#pragma unroll
  for (int s = 0; s < kSums; ++s) {
    double total = 0.0;
    for (int l = 0; l < kReduceRowLanes; ++l) total += lanes[s][l][tx];
    partial[int64_t(blockIdx.y) * kSums * c + int64_t(s) * c + j] = total;
  }
}

template <int kSums, class Term>
void column_partials(int64_t m, int c, const ReducePlan& plan, const Term& term, double* partial, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(c, kReduceCols)), unsigned(plan.chunks));
  const dim3 block(kReduceCols, kReduceRowLanes);
  auto* kernel = &column_partials_kernel<kSums, Term>;
  kernel<<<grid, block, 0, stream>>>(m, c, plan.chunk_rows, term, partial);
  SP_CUDA_CHECK_LAUNCH();
}

// ---- Finalize kernels: one warp per column ---------------------------------------------------
constexpr int kFinalizeThreads = 256;
constexpr int kFinalizeWarps = kFinalizeThreads / kWarpSize;

inline unsigned finalize_blocks(int columns) { return unsigned(ceil_div(columns, kFinalizeWarps)); }
// The column of the calling warp (it may be past the last column: the warp then has nothing to do).
__device__ __forceinline__ int warp_column() { return int(blockIdx.x) * kFinalizeWarps + int(threadIdx.x) / kWarpSize; }

// Sum of column col (of width columns) over the chunks: lane l adds chunks l, l + 32, ... in
// order, then the warp butterfly adds the lanes. Every lane gets the total; all 32 must call.
__device__ __forceinline__ double warp_sum_chunks(const double* partial, int chunks, int width, int col) {
  double t = 0.0;
  for (int ch = int(threadIdx.x) % kWarpSize; ch < chunks; ch += kWarpSize) t += partial[int64_t(ch) * width + col];
  return warp_allreduce_sum(t);
}

// c is an int inside the reduction kernels.
inline int checked_columns(const char* op, int64_t c) {
  SP_CHECK(c > 0 && c <= (int64_t(1) << 30), op, ": unsupported column count ", c);
  return int(c);
}

}  // namespace sp::kernels::cuda::detail
