// Deterministic column reductions of a row-major [m, c] matrix in double (batch-norm
// statistics, bias gradients), with no atomics, in two stages:
//   1. column_partials_kernel: block (bx, by) of plan_column_reduce's grid (column_plan.h)
//      sums rows [by * chunk_rows, ...) of its columns. Each thread adds its rows of its
//      kChunkElems columns in row order; the row lanes of a warp are added by an xor butterfly,
//      then the block's warps in warp order, and the block writes partial[by][s * c + j] for
//      each of the kSums sums s;
//   2. the caller's finalize kernel gives each column a warp, which adds that column's chunk
//      partials with warp_sum_chunks and then computes whatever the op needs.
// The plan depends on (m, c) only, and the chunk loads (kVec) change how elements are read,
// not the order they are added in: the sums are fixed by the shape.
#pragma once

#include <cstdint>

#include "kernels/cuda/column_plan.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/storage.cuh"

namespace sp::kernels::cuda::detail {

// Row i's columns j0 .. j0 + kChunkElems - 1 of a row-major [., c] matrix: one chunk load
// (kVec), or the first ncols one at a time and zeros after them.
template <class S, bool kVec>
__device__ __forceinline__ void load_row(const typename S::Storage* base, int64_t i, int c, int j0, int ncols,
                                         float (&v)[kChunkElems]) {
  const typename S::Storage* p = base + i * c + j0;
  if constexpr (kVec)
    S::load8(p, v);
  else
    load_elems_partial<S>(p, ncols, v);
}

// Term: a reduction's reads and arithmetic.
//   static constexpr int kVals;                                values a row chunk yields per element
//   using Cols = ...;                                         per-thread column constants
//   __device__ Cols columns(int j0, int ncols) const;          read once per thread (rows exist)
//   template <bool kVec> __device__ void load(int64_t i, int j0, int ncols,
//                                             float (&v)[kVals][kChunkElems]) const;
//   __device__ void add(const float (&v)[kVals][kChunkElems], const Cols&,
//                       double (&acc)[kSums][kChunkElems]) const;
//   __device__ void prefetch(int64_t i, int j0) const;           asks L2 for row i's chunks
// load reads row i's values for columns j0 + e, e < ncols (kVec: ncols == kChunkElems and the
// rows may be read with chunk loads), zeros for e >= ncols; add adds them, leaving the entries
// e >= ncols zero. The split lets a thread issue the loads of several rows before it adds the
// first (kRowsInFlight), without changing the order of the additions.
constexpr int kRowsInFlight = 4;  // row chunks a thread loads ahead, over the term's kVals values

// Asks L2 for the line holding p (a global address), no register waiting on it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(p)));
}

// A thread's walk over rows i = begin, begin + step, ... < end, each yielding kVals chunks of
// values: load(i, v) for kRowsInFlight / kVals rows at a time, so that their loads are in flight
// together, then use(i, v) for each of them in row order; the rows left one at a time. The rows
// are used in order either way. prefetch(i) (may do nothing) asks L2 for row i: the first two
// batches' rows but the first at the start, every later row two batches before its load. ptxas
// moves a batch's later loads below the first row's arithmetic (SASS of the statistics pass,
// cuobjdump 13.5: one row's loads in flight per thread, where the PTX issues the batch's
// together), so without the prefetches the rows' trips to DRAM would follow one another.
template <int kVals, class Load, class Use, class Prefetch>
__device__ __forceinline__ void rows_in_flight(int64_t begin, int64_t end, int step, const Load& load, const Use& use,
                                               const Prefetch& prefetch) {
  constexpr int kAhead = kRowsInFlight / kVals > 0 ? kRowsInFlight / kVals : 1;
  // Rows begin + step .. up to the second batch's last.
#pragma unroll
  for (int u = 1; u < 2 * kAhead; ++u)
    if (begin + int64_t(u) * step < end) prefetch(begin + int64_t(u) * step);
  int64_t i = begin;
  for (; i + int64_t(kAhead - 1) * step < end; i += int64_t(kAhead) * step) {
    // The batch after the next one's rows.
#pragma unroll
    for (int u = 2 * kAhead; u < 3 * kAhead; ++u)
      if (i + int64_t(u) * step < end) prefetch(i + int64_t(u) * step);
    float v[kAhead][kVals][kChunkElems];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) load(i + int64_t(u) * step, v[u]);
#pragma unroll
    for (int u = 0; u < kAhead; ++u) use(i + int64_t(u) * step, v[u]);
  }
  for (; i < end; i += step) {
    float v[kVals][kChunkElems];
    load(i, v);
    use(i, v);
  }
}

// No stash: the separate reduction kernel keeps nothing of what it reads.
struct NoStash {
  template <int kVals>
  __device__ void operator()(int64_t, int, const float (&)[kVals][kChunkElems]) const {}
};

// One block's share of stage 1 for the reduction grid's block (bx, by): the sums of its rows
// of its columns, written to partial[by][s * c + j]. stash(i, j0, v) sees every row chunk the
// thread reads, before it is added. warp_sums is the block's shared scratch; the block leaves
// synchronised, so the caller may reuse it at once.
template <int kSums, bool kVec, class Term, class Stash>
__device__ __forceinline__ void chunk_partials(int64_t m, const ColumnReducePlan& plan, const Term& term, int bx,
                                               int by, double* partial, const Stash& stash,
                                               double (&warp_sums)[kSums][kReduceWarps][kMaxColLanes * kChunkElems]) {
  constexpr int kVals = Term::kVals;
  const int tid = int(threadIdx.x);
  const ReduceSlice sl = reduce_slice(plan, m, bx, by, tid);
  double acc[kSums][kChunkElems];
#pragma unroll
  for (int s = 0; s < kSums; ++s)
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e) acc[s][e] = 0.0;
  if (sl.ncols > 0 && sl.row_begin < sl.row_end) {
    const typename Term::Cols cols = term.columns(sl.j0, sl.ncols);
    rows_in_flight<kVals>(
        sl.row_begin, sl.row_end, sl.row_step,
        [&](int64_t i, float(&v)[kVals][kChunkElems]) { term.template load<kVec>(i, sl.j0, sl.ncols, v); },
        [&](int64_t i, const float(&v)[kVals][kChunkElems]) {
          stash(i, sl.j0, v);
          term.add(v, cols, acc);
        },
        [&](int64_t i) {
          if constexpr (kVec) term.prefetch(i, sl.j0);  // (the single-element path: 128 -> 143 registers with them)
        });
  }
  // Lanes l and l ^ o (o a multiple of col_lanes) hold the same columns: add them.
  for (int o = plan.col_lanes; o < kWarpSize; o *= 2)
#pragma unroll
    for (int s = 0; s < kSums; ++s)
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) acc[s][e] += __shfl_xor_sync(kFullWarp, acc[s][e], o);
  const int lane = tid % kWarpSize, warp = tid / kWarpSize;
  if (lane < plan.col_lanes)
#pragma unroll
    for (int s = 0; s < kSums; ++s)
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) warp_sums[s][warp][lane * kChunkElems + e] = acc[s][e];
  __syncthreads();
  const int cols = plan.cols_per_block();
  for (int idx = tid; idx < kSums * cols; idx += kReduceThreads) {
    const int s = idx / cols, col = idx % cols;
    const int j = bx * cols + col;
    if (j >= plan.c) continue;
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kReduceWarps; ++w) total += warp_sums[s][w][col];
    partial[int64_t(by) * kSums * plan.c + int64_t(s) * plan.c + j] = total;
  }
  __syncthreads();
}

template <int kSums, bool kVec, class Term>
__global__ void __launch_bounds__(kReduceThreads)
    column_partials_kernel(int64_t m, ColumnReducePlan plan, Term term, double* partial) {
  pdl_prologue();
  __shared__ double warp_sums[kSums][kReduceWarps][kMaxColLanes * kChunkElems];
  chunk_partials<kSums, kVec>(m, plan, term, int(blockIdx.x), int(blockIdx.y), partial, NoStash{}, warp_sums);
}

// Launches stage 1; vec: every row may be read in chunks (c % kChunkElems == 0 and the term's
// pointers 16-byte aligned). partial holds plan.chunks * kSums * c doubles.
template <int kSums, class Term>
void column_partials(int64_t m, const ColumnReducePlan& plan, const Term& term, bool vec, double* partial,
                     cudaStream_t stream) {
  const dim3 grid(unsigned(plan.col_blocks), unsigned(plan.chunks));
  auto* kernel = vec ? &column_partials_kernel<kSums, true, Term> : &column_partials_kernel<kSums, false, Term>;
  launch_kernel(kernel, grid, kReduceThreads, 0, stream, m, plan, term, partial);
}

// Whether rows of c columns can be read in chunks from these (16-byte aligned) pointers.
template <class... P>
inline bool chunk_loads_ok(int64_t c, const P*... p) {
  return c % kChunkElems == 0 && all_aligned16(p...);
}

// ---- Finalize kernels: one warp per column ---------------------------------------------------
constexpr int kFinalizeThreads = 256;
constexpr int kFinalizeWarps = kFinalizeThreads / kWarpSize;

inline unsigned finalize_blocks(int columns) { return unsigned(ceil_div(columns, kFinalizeWarps)); }
// The column of the calling warp (it may be past the last column: the warp then has nothing to do).
__device__ __forceinline__ int warp_column() { return int(blockIdx.x) * kFinalizeWarps + int(threadIdx.x) / kWarpSize; }

// Chunks a lane loads before it adds the first of them (per column summed).
constexpr int kChunksInFlight = 8;

// Sums of the N columns cols[n] (of width columns) over the chunks, into sums[n]: lane l adds
// chunks l, l + 32, ... in order, then the warp butterfly adds the lanes. Every lane gets the
// totals; all 32 must call. A lane loads kChunksInFlight chunks of every column before it adds
// the first: a loop that added each value as it came kept two loads in flight (cuobjdump, CUDA
// 13.0), so a lane's 32 chunks (kMaxRowChunks) of a column took 16 round trips to L2, the two
// columns of batch norm's statistics one after the other. The additions are the same, in the
// same order: the sums are the same bits.
template <int N>
__device__ __forceinline__ void warp_sum_chunks(const double* partial, int chunks, int width, const int (&cols)[N],
                                                double (&sums)[N]) {
#pragma unroll
  for (int n = 0; n < N; ++n) sums[n] = 0.0;
  int ch = int(threadIdx.x) % kWarpSize;
  for (; ch + (kChunksInFlight - 1) * kWarpSize < chunks; ch += kChunksInFlight * kWarpSize) {
    double v[N][kChunksInFlight];
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u)
#pragma unroll
      for (int n = 0; n < N; ++n) v[n][u] = partial[int64_t(ch + u * kWarpSize) * width + cols[n]];
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u)
#pragma unroll
      for (int n = 0; n < N; ++n) sums[n] = __dadd_rn(sums[n], v[n][u]);
  }
  for (; ch < chunks; ch += kWarpSize)
#pragma unroll
    for (int n = 0; n < N; ++n) sums[n] = __dadd_rn(sums[n], partial[int64_t(ch) * width + cols[n]]);
#pragma unroll
  for (int n = 0; n < N; ++n) sums[n] = warp_allreduce_sum(sums[n]);
}
// One column's sum.
__device__ __forceinline__ double warp_sum_chunks(const double* partial, int chunks, int width, int col) {
  double sum[1];
  warp_sum_chunks(partial, chunks, width, {col}, sum);
  return sum[0];
}

// c is an int inside the reduction kernels.
// At most 2^28 columns: the kernels index per-column pairs (2 * c + j) in int.
inline int checked_columns(const char* op, int64_t c) {
  SP_CHECK(c > 0 && c <= (int64_t(1) << 28), op, ": unsupported column count ", c);
  return int(c);
}

}  // namespace sp::kernels::cuda::detail
