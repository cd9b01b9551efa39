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
#include <initializer_list>

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

// ---- The persistent (single-launch) form of a reduction followed by an element pass ----------
// Batch norm's training forward and backward can run as one cooperative kernel (batchnorm.cu):
// its co-resident blocks sum the column reduction's chunks (the plan above, so the sums and
// their order are exactly those of the separate kernels), wait at a grid barrier, finalise the
// per-column statistics, wait again, and then run the element pass over the same chunks, each
// block over the chunks it reduced. A block keeps the first `slots` of its chunks in shared
// memory as it reads them, so that the element pass reads those from shared memory instead of
// from L2 or DRAM.
//
// Chunk t (0 <= t < total = col_blocks * chunks) is the reduction grid's block (t % col_blocks,
// t / col_blocks); block b of the persistent grid owns chunks b, b + grid, b + 2 grid, ...
struct PersistentPlan {
  int total = 0;           // chunks of the reduction plan
  int grid = 0;            // co-resident blocks; 0: no launch fits (use the separate kernels)
  int slots = 0;           // chunks a block caches in shared memory (its first ones)
  int64_t slot_elems = 0;  // elements of one cached chunk of one tensor: chunk_rows * cols_per_block
  int64_t cached = 0;      // chunks cached, over the whole grid
  size_t smem_bytes = 0;   // dynamic shared memory per block: slots * tensors * slot_elems * elem_bytes
};

SP_PLAN_HD int owned_chunks(int total, int grid, int block) {
  return block < total ? (total - block + grid - 1) / grid : 0;
}

// Blocks per SM a persistent plan keeps when it can: one 256-thread block per SM leaves too few
// loads in flight to stream the uncached chunks at full bandwidth.
constexpr int kMinPersistentBlocksPerSm = 2;
// Larger reductions (more chunks than this) run as separate kernels.
constexpr int64_t kMaxPersistentChunks = int64_t(1) << 24;

// plan_persistent's search over the slots, keeping only choices with min_per_sm blocks per SM.
template <class Occupancy>
PersistentPlan plan_persistent_with(const ColumnReducePlan& p, int elem_bytes, int tensors, int sms,
                                    size_t max_smem_bytes, const Occupancy& occupancy, int min_per_sm) {
  PersistentPlan best;
  best.total = p.col_blocks * p.chunks;
  best.slot_elems = p.chunk_rows * p.cols_per_block();
  const size_t slot_bytes = size_t(best.slot_elems) * size_t(elem_bytes) * size_t(tensors);
  const int most_slots = int(plan_ceil_div(best.total, sms));
  for (int s = 0; s <= most_slots; ++s) {
    const size_t bytes = size_t(s) * slot_bytes;
    if (bytes > max_smem_bytes) break;
    const int per_sm = occupancy(bytes);
    if (per_sm < min_per_sm || per_sm <= 0) continue;
    const int64_t fit = int64_t(per_sm) * sms;
    const int grid = int(fit < best.total ? fit : best.total);
    const int base = best.total / grid, rem = best.total % grid;
    const int64_t cached = int64_t(rem) * (s < base + 1 ? s : base + 1) + int64_t(grid - rem) * (s < base ? s : base);
    if (best.grid == 0 || cached > best.cached || (cached == best.cached && grid > best.grid)) {
      best.grid = grid;
      best.slots = s < base + (rem > 0 ? 1 : 0) ? s : base + (rem > 0 ? 1 : 0);
      best.cached = cached;
      best.smem_bytes = size_t(best.slots) * slot_bytes;
    }
  }
  return best;
}

// Chooses the grid and the slots: among the choices with at least kMinPersistentBlocksPerSm
// blocks per SM (any choice where none has), the most chunks cached over the grid, then the
// larger grid (more threads in flight), then fewer slots. occupancy(dynamic_smem_bytes) gives
// how many blocks of the kernel fit on one SM (0: none); tensors are the tensors cached per
// chunk, of elem_bytes each; max_smem_bytes is the most dynamic shared memory a block may have.
template <class Occupancy>
PersistentPlan plan_persistent(const ColumnReducePlan& p, int elem_bytes, int tensors, int sms,
                               size_t max_smem_bytes, const Occupancy& occupancy) {
  PersistentPlan none;
  const int64_t total = int64_t(p.col_blocks) * p.chunks;
  if (total > kMaxPersistentChunks || sms <= 0) return none;
  for (const int min_per_sm : {kMinPersistentBlocksPerSm, 1}) {
    const PersistentPlan plan = plan_persistent_with(p, elem_bytes, tensors, sms, max_smem_bytes, occupancy, min_per_sm);
    if (plan.grid > 0) return plan;
  }
  return none;
}

// Where chunk t's elements are: rows [row0, row0 + rows) and columns [col0, col0 + cols_per_block)
// (those < c).
struct ChunkBox {
  int64_t row0;
  int64_t rows;  // 0 for the empty chunk of m == 0
  int col0;
};

SP_PLAN_HD ChunkBox chunk_box(const ColumnReducePlan& p, int64_t m, int t) {
  ChunkBox b;
  const int bx = t % p.col_blocks, by = t / p.col_blocks;
  b.row0 = int64_t(by) * p.chunk_rows;
  const int64_t left = m - b.row0;
  b.rows = left <= 0 ? 0 : (left < p.chunk_rows ? left : p.chunk_rows);
  b.col0 = bx * p.cols_per_block();
  return b;
}

// Thread tid's share of chunk box in the element pass: rows box.row0 + r, r = r0, r0 + step, ...
// < box.rows, columns j0 .. j0 + ncols - 1 (ncols 0: none). These are the rows and columns the
// thread summed in the reduction (reduce_slice), so it reads back only what it cached itself.
struct PieceSlice {
  int j0;
  int ncols;
  int64_t r0;
  int step;
};

SP_PLAN_HD PieceSlice piece_slice(const ColumnReducePlan& p, const ChunkBox& box, int tid) {
  PieceSlice s;
  s.j0 = box.col0 + (tid % p.col_lanes) * kChunkElems;
  const int left = p.c - s.j0;
  s.ncols = left <= 0 ? 0 : (left < kChunkElems ? left : kChunkElems);
  s.r0 = tid / p.col_lanes;
  s.step = p.row_lanes;
  return s;
}

// A cached chunk's layout in shared memory: element (i, j) of the chunk at
// (i - row0) * cols_per_block + (j - col0), the same for the reduction that fills it and the
// element pass that reads it.
SP_PLAN_HD int64_t slot_offset(int cols_per_block, const ChunkBox& b, int64_t i, int j) {
  return (i - b.row0) * cols_per_block + (j - b.col0);
}

// ---- The element passes' walk -----------------------------------------------------------
// Batch norm's element passes (batchnorm.cu) visit the items of a row-major [rows, c] matrix:
// chunks of kChunkElems elements (width kChunkElems, with c % kChunkElems == 0: a chunk never
// crosses a row end) or single elements (width 1). They go from the matrix's end to its start.
// Block b of `blocks` takes the b-th range of items counted from the end (contiguous ranges of
// ceil(items / blocks) items), and its threads walk their range downwards, `threads` items
// apart. Blocks start in about the order of their index, so the pass reads the matrix in about
// the reverse of the order in which the statistics pass has just read it (that pass's row
// chunks in ascending order, column_reduce.cuh). Where the matrix is larger than L2, the rows
// read last, which L2 still holds, are then read again first, before the pass's own traffic
// evicts them; an ascending walk would reach them last. Every item is visited once and the
// arithmetic is per element, so the order changes no bit of the result.
// The column j of the item's first element is kept up to date without a division per item.
struct DescendingCursor {
  int64_t item;   // the current item; the walk goes on while item >= begin
  int64_t begin;  // the first item of the block's range
  int j;          // the column of the item's first element: item * width % c
  int threads;    // items between one visit and the next
  int step;       // threads * width % c
};

SP_PLAN_HD DescendingCursor descending_cursor(int64_t items, int64_t blocks, int64_t block, int threads, int thread,
                                              int width, int c) {
  DescendingCursor k;
  const int64_t per = plan_ceil_div(items, blocks > 0 ? blocks : 1);
  const int64_t range = blocks - 1 - block;  // counted from the end
  k.begin = range * per;
  const int64_t end = (range + 1) * per < items ? (range + 1) * per : items;
  k.item = end - 1 - thread;  // below begin where the range is empty or shorter than the block
  k.j = k.item >= k.begin ? int(k.item * width % c) : 0;
  k.threads = threads;
  k.step = int(int64_t(threads) * width % c);
  return k;
}

SP_PLAN_HD bool more(const DescendingCursor& k) { return k.item >= k.begin; }

SP_PLAN_HD void retreat(DescendingCursor& k, int c) {
  k.item -= k.threads;
  k.j -= k.step;
  if (k.j < 0) k.j += c;
}

}  // namespace sp::kernels::cuda::detail
