// How the bandwidth-bound kernels (batch norm, bias gradients, pointwise ops) split a row-major
// [m, c] matrix among threads, as plain C++ that compiles for the host as well (SP_PLAN_HD), so
// the CPU tests (tests/test_column_plan.cpp) check that every element is visited exactly once
// without a GPU.
//
// A thread moves kChunkElems consecutive elements at a time: 32 bytes of fp32 as two 16-byte
// loads, 16 bytes of bf16 as one. That needs c % kChunkElems == 0 and 16-byte aligned pointers
// (every CIFAR ResNet layer qualifies); otherwise the same split runs with one element per load
// (a thread's chunk is then cut at the last column). The split, and so the order in which the
// reductions add, depends only on (m, c), never on the load width: both paths give the same bits.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SP_PLAN_HD __host__ __device__ __forceinline__
#else
#define SP_PLAN_HD inline
#endif

namespace sp::kernels::cuda::detail {

constexpr int kChunkElems = 8;         // elements a thread loads at once from a row
constexpr int kReduceThreads = 256;    // threads per block of the column reduction
constexpr int kReduceWarps = kReduceThreads / 32;
constexpr int kMaxColLanes = 32;       // column lanes per block: 32 chunks = 256 columns
constexpr int kMinRowsPerLane = 4;     // a row lane sums at least this many rows of its chunk
constexpr int64_t kMaxRowChunks = 1024;  // bounds the finalize's work (32 chunks per lane)

SP_PLAN_HD int64_t plan_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The column reduction's grid. Block (bx, by) covers columns [bx * col_lanes * kChunkElems, ...)
// and rows [by * chunk_rows, ...); its kReduceThreads threads are col_lanes column lanes (thread
// t takes chunk t % col_lanes) times row_lanes row lanes (t / col_lanes), so a warp reads
// 32 / col_lanes consecutive rows of its columns: contiguous memory when the block spans the row.
struct ColumnReducePlan {
  int c;
  int col_lanes;       // a power of two in 1..kMaxColLanes, at least the row's chunks when it can be
  int row_lanes;       // kReduceThreads / col_lanes
  int col_blocks;      // blocks across the columns
  int64_t chunk_rows;  // rows per block
  int chunks;          // blocks along the rows, at least 1 (m == 0 gives one empty chunk)
  SP_PLAN_HD int cols_per_block() const { return col_lanes * kChunkElems; }
};

inline ColumnReducePlan plan_column_reduce(int64_t m, int c) {
  ColumnReducePlan p{};
  p.c = c;
  const int64_t row_chunks = plan_ceil_div(c, kChunkElems);
  p.col_lanes = 1;
  while (p.col_lanes < kMaxColLanes && p.col_lanes < row_chunks) p.col_lanes *= 2;
  p.row_lanes = kReduceThreads / p.col_lanes;
  p.col_blocks = int(plan_ceil_div(row_chunks, p.col_lanes));
  const int64_t min_rows = int64_t(p.row_lanes) * kMinRowsPerLane;
  const int64_t cap_rows = plan_ceil_div(m, kMaxRowChunks);
  p.chunk_rows = min_rows > cap_rows ? min_rows : cap_rows;
  const int64_t chunks = plan_ceil_div(m, p.chunk_rows);
  p.chunks = int(chunks > 1 ? chunks : 1);
  return p;
}

// What one thread of the reduction sums: columns [j0, j0 + ncols) (ncols 0: none, the thread
// only takes part in the block's reduction) over rows row_begin, row_begin + row_step, ... < row_end.
struct ReduceSlice {
  int j0;
  int ncols;
  int64_t row_begin, row_end;
  int row_step;
};

SP_PLAN_HD ReduceSlice reduce_slice(const ColumnReducePlan& p, int64_t m, int block_x, int block_y, int tid) {
  ReduceSlice s;
  const int lane = tid % p.col_lanes;
  s.j0 = (block_x * p.col_lanes + lane) * kChunkElems;
  const int left = p.c - s.j0;
  s.ncols = left <= 0 ? 0 : (left < kChunkElems ? left : kChunkElems);
  const int64_t first = int64_t(block_y) * p.chunk_rows;
  const int64_t last = first + p.chunk_rows;
  s.row_begin = first + tid / p.col_lanes;
  s.row_end = last < m ? last : m;
  s.row_step = p.row_lanes;
  return s;
}

// A grid-stride walk over the kChunkElems-element chunks of a row-major [rows, c] matrix with
// c % kChunkElems == 0, tracking the column j of each chunk's first element without a division
// per chunk (a chunk never crosses a row end).
struct ChunkCursor {
  int64_t i;       // first element of the current chunk
  int j;           // its column, i % c
  int64_t stride;  // elements between one visit and the next
  int step;        // stride % c
};

SP_PLAN_HD ChunkCursor chunk_cursor(int64_t thread, int64_t threads, int c) {
  ChunkCursor k;
  k.i = thread * kChunkElems;
  k.j = int(k.i % c);
  k.stride = threads * kChunkElems;
  k.step = int(k.stride % c);
  return k;
}

SP_PLAN_HD void advance(ChunkCursor& k, int c) {
  k.i += k.stride;
  k.j += k.step;
  if (k.j >= c) k.j -= c;
}

}  // namespace sp::kernels::cuda::detail
