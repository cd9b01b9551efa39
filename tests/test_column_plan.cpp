// The work split of the bandwidth-bound CUDA kernels (kernels/cuda/column_plan.h), compiled for
// the host: by simulating every block and thread of the grids the kernels launch,
//   * the column reduction (column_reduce.cuh) sums every element of an [m, c] matrix exactly
//     once, its threads' chunks start at multiples of kChunkElems (the 16-byte loads), the lanes
//     its warp butterfly adds hold the same columns, and a warp's rows are consecutive;
//   * the element passes' chunk cursor (batchnorm.cu) visits every chunk once and always knows
//     its column;
//   * the persistent batch norm's grid owns every chunk of the reduction once, caches what the
//     shared memory holds, and its element pass has each thread read back exactly the elements
//     that thread cached in the reduction, at offsets inside its slot.
// The plan is a function of (m, c) alone, so the order in which the sums are added is too.
// The GPU tests (test_cuda_ops) then check the kernels' arithmetic against the CPU reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/column_plan.h"

namespace {

using namespace sp::kernels::cuda::detail;

std::string str(int64_t m, int c) { return "m " + std::to_string(m) + " c " + std::to_string(c); }

// CIFAR ResNet BN shapes at batch 128 and 512, then awkward ones: a single sample, c not a
// multiple of 8, c past one block's 256 columns, more rows than kMaxRowChunks minimum chunks
// hold, idle column lanes (c = 24: three chunks over four lanes), and no rows at all.
const std::vector<std::pair<int64_t, int>> kShapes = {
    {128 * 32 * 32, 16}, {128 * 16 * 16, 32}, {128 * 8 * 8, 64}, {512 * 32 * 32, 64}, {512 * 4 * 4, 512},
    {1, 3},              {3, 5},              {7, 37},           {300001, 3},        {5, 1000},
    {200003, 64},        {1000, 24},          {0, 16},           {33, 8},            {2, 264}};

TEST(ColumnPlan, TheReductionSumsEveryElementOnce) {
  for (const auto& [m, c] : kShapes) {
    const ColumnReducePlan p = plan_column_reduce(m, c);
    const std::string what = str(m, c);
    ASSERT_GE(p.col_lanes, 1) << what;
    ASSERT_LE(p.col_lanes, kMaxColLanes) << what;
    ASSERT_EQ(p.col_lanes & (p.col_lanes - 1), 0) << what << ": col_lanes must be a power of two";
    ASSERT_EQ(p.col_lanes * p.row_lanes, kReduceThreads) << what;
    ASSERT_GE(p.chunks, 1) << what;
    ASSERT_LE(p.chunks, kMaxRowChunks) << what;
    ASSERT_GE(int64_t(p.chunks) * p.chunk_rows, m) << what;
    ASSERT_GE(int64_t(p.col_blocks) * p.cols_per_block(), c) << what;
    // No block of the grid is wholly outside the matrix (except the one empty chunk of m == 0).
    ASSERT_LT(int64_t(p.col_blocks - 1) * p.cols_per_block(), c) << what;
    if (m > 0) {
      ASSERT_LT(int64_t(p.chunks - 1) * p.chunk_rows, m) << what;
    }
    // Fewer lanes than the row has chunks only when the lanes are all used.
    if (p.col_lanes < kMaxColLanes) {
      ASSERT_GE(p.col_lanes * kChunkElems, c) << what;
    }

    std::vector<uint8_t> seen(size_t(m) * size_t(c), 0);
    for (int bx = 0; bx < p.col_blocks; ++bx)
      for (int by = 0; by < p.chunks; ++by)
        for (int tid = 0; tid < kReduceThreads; ++tid) {
          const ReduceSlice s = reduce_slice(p, m, bx, by, tid);
          ASSERT_EQ(s.j0 % kChunkElems, 0) << what;
          ASSERT_GE(s.ncols, 0) << what;
          ASSERT_LE(s.ncols, kChunkElems) << what;
          ASSERT_EQ(s.ncols, s.j0 >= c ? 0 : std::min(kChunkElems, c - s.j0)) << what;
          // The chunk loads read whole chunks only when c allows them.
          if (c % kChunkElems == 0 && s.ncols > 0) {
            ASSERT_EQ(s.ncols, kChunkElems) << what;
          }
          ASSERT_EQ(s.row_step, p.row_lanes) << what;
          // The lanes the warp butterfly adds together (tid ^ o for o = col_lanes, ..., 16)
          // hold the same columns and share the block's rows.
          for (int o = p.col_lanes; o < 32; o *= 2) {
            const ReduceSlice t = reduce_slice(p, m, bx, by, tid ^ o);
            ASSERT_EQ(t.j0, s.j0) << what << " tid " << tid << " partner " << (tid ^ o);
            ASSERT_EQ(t.row_end, s.row_end) << what;
          }
          // A warp's lanes read rows first + 0 .. 32 / col_lanes - 1 of the same columns.
          const ReduceSlice lead = reduce_slice(p, m, bx, by, tid / 32 * 32 + tid % p.col_lanes);
          ASSERT_EQ(s.row_begin - lead.row_begin, (tid % 32) / p.col_lanes) << what;
          for (int64_t i = s.row_begin; i < s.row_end; i += s.row_step)
            for (int e = 0; e < s.ncols; ++e) {
              ASSERT_LT(i, m) << what;
              uint8_t& hit = seen[size_t(i) * size_t(c) + size_t(s.j0 + e)];
              ASSERT_EQ(hit, 0) << what << ": element (" << i << ", " << s.j0 + e << ") summed twice";
              hit = 1;
            }
        }
    for (size_t k = 0; k < seen.size(); ++k)
      ASSERT_EQ(seen[k], 1) << what << ": element (" << k / size_t(c) << ", " << k % size_t(c) << ") never summed";
  }
}

TEST(ColumnPlan, ResNetShapesGetTheLayoutsTheKernelsAssume) {
  // 16 columns: two chunks, so two column lanes and 128 row lanes (a warp reads 16 whole rows).
  const ColumnReducePlan r20 = plan_column_reduce(128 * 32 * 32, 16);
  EXPECT_EQ(r20.col_lanes, 2);
  EXPECT_EQ(r20.row_lanes, 128);
  EXPECT_EQ(r20.col_blocks, 1);
  EXPECT_EQ(plan_column_reduce(512 * 32 * 32, 64).col_lanes, 8);
  EXPECT_EQ(plan_column_reduce(512 * 4 * 4, 512).col_lanes, 32);
  EXPECT_EQ(plan_column_reduce(512 * 4 * 4, 512).col_blocks, 2);
  // Long columns hit the chunk cap: 1024 chunks of ceil(m / 1024) rows.
  const ColumnReducePlan big = plan_column_reduce(512 * 32 * 32, 64);
  EXPECT_EQ(big.chunks, 1024);
  EXPECT_EQ(big.chunk_rows, 512);
}

// The element passes' walk: every item once, with its column, never across a row end; each
// block's range below the one before it (the pass runs from the matrix's end to its start) and
// each thread's items descending.
TEST(ColumnPlan, TheDescendingWalkVisitsEveryItemOnceFromTheEndAndKnowsItsColumn) {
  for (const int width : {1, kChunkElems}) {
    for (const int c : {8, 16, 24, 64, 520}) {
      for (const int64_t rows : {int64_t(1), int64_t(3), int64_t(1000)}) {
        const int64_t total = rows * c, items = total / width;
        // One block and many; ranges shorter than a block, and blocks left without a range.
        for (const int64_t blocks : {int64_t(1), int64_t(3), int64_t(64), std::min<int64_t>(items + 5, 2000)}) {
          for (const int threads : {1, 3, 32, 256}) {
            const std::string what = str(rows, c) + " width " + std::to_string(width) + " blocks " +
                                     std::to_string(blocks) + " threads " + std::to_string(threads);
            std::vector<uint8_t> seen(size_t(items), 0);
            int64_t below = items;  // every item of the blocks so far is at least this
            for (int64_t b = 0; b < blocks; ++b) {
              int64_t lowest = below;
              for (int t = 0; t < threads; ++t) {
                int64_t last = items;
                for (DescendingCursor k = descending_cursor(items, blocks, b, threads, t, width, c); more(k);
                     retreat(k, c)) {
                  ASSERT_GE(k.item, 0) << what;
                  ASSERT_LT(k.item, below) << what << ": block " << b << " above a block before it";
                  ASSERT_LT(k.item, last) << what << ": thread " << t << " of block " << b << " not descending";
                  last = k.item;
                  ASSERT_EQ(k.j, int(k.item * width % c)) << what << " at item " << k.item;
                  ASSERT_LE(k.j + width, c) << what << ": an item crosses a row end";
                  uint8_t& hit = seen[size_t(k.item)];
                  ASSERT_EQ(hit, 0) << what << ": item " << k.item << " visited twice";
                  hit = 1;
                  lowest = std::min(lowest, k.item);
                }
              }
              below = lowest;
            }
            for (size_t i = 0; i < seen.size(); ++i)
              ASSERT_EQ(seen[i], 1) << what << ": item " << i << " never visited";
          }
        }
      }
    }
  }
}

// An H100-like device for plan_persistent: 132 SMs, 228 KiB of shared memory per SM of which a
// block may have 227 KiB, 1 KiB reserved per block, 32 KiB of static shared memory per block
// (the reduction's warp sums) and registers for two 256-thread blocks per SM.
constexpr int kSms = 132;
constexpr size_t kSmemPerSm = 228 * 1024, kStatic = 32 * 1024, kReserved = 1024;
constexpr size_t kMaxDynamic = 227 * 1024 - kStatic;
int modelled_occupancy(size_t dynamic_bytes) {
  const size_t per_block = dynamic_bytes + kStatic + kReserved;
  return int(std::min<size_t>(2, kSmemPerSm / per_block));
}

TEST(ColumnPlan, ThePersistentGridOwnsEveryChunkOnceAndCachesWhatFits) {
  for (const auto& [m, c] : kShapes) {
    if (m == 0) continue;  // the separate kernels handle an empty batch
    const ColumnReducePlan p = plan_column_reduce(m, c);
    for (const int elem_bytes : {2, 4})
      for (const int tensors : {1, 2}) {
        const std::string what = str(m, c) + " bytes " + std::to_string(elem_bytes) + " tensors " +
                                 std::to_string(tensors);
        const PersistentPlan pp = plan_persistent(p, elem_bytes, tensors, kSms, kMaxDynamic, modelled_occupancy);
        ASSERT_EQ(pp.total, p.col_blocks * p.chunks) << what;
        ASSERT_GE(pp.grid, 1) << what;
        ASSERT_LE(pp.grid, pp.total) << what;
        ASSERT_LE(pp.smem_bytes, kMaxDynamic) << what;
        ASSERT_EQ(pp.smem_bytes, size_t(pp.slots) * size_t(pp.slot_elems) * size_t(elem_bytes * tensors)) << what;
        // Co-resident: a cooperative launch of this grid fits.
        ASSERT_LE(pp.grid, modelled_occupancy(pp.smem_bytes) * kSms) << what;
        std::vector<int> owner(size_t(pp.total), -1);
        int64_t cached = 0;
        for (int b = 0; b < pp.grid; ++b) {
          const int owned = owned_chunks(pp.total, pp.grid, b);
          ASSERT_GE(owned, 1) << what << ": block " << b << " has no chunk";
          for (int k = 0; k < owned; ++k) {
            const int t = b + k * pp.grid;
            ASSERT_LT(t, pp.total) << what;
            ASSERT_EQ(owner[size_t(t)], -1) << what << ": chunk " << t << " owned twice";
            owner[size_t(t)] = b;
            if (k < pp.slots) ++cached;
          }
        }
        for (int t = 0; t < pp.total; ++t) ASSERT_NE(owner[size_t(t)], -1) << what << ": chunk " << t << " unowned";
        ASSERT_EQ(cached, pp.cached) << what;
        // Two blocks per SM where any choice gives them, and then no other number of slots
        // caches more (the search is exhaustive over what fits).
        const auto per_sm_at = [&](int s) {
          return modelled_occupancy(size_t(s) * size_t(pp.slot_elems) * size_t(elem_bytes * tensors));
        };
        ASSERT_GE(modelled_occupancy(pp.smem_bytes), kMinPersistentBlocksPerSm) << what;
        for (int s = 0; size_t(s) * size_t(pp.slot_elems) * size_t(elem_bytes * tensors) <= kMaxDynamic &&
                        s <= pp.total;
             ++s) {
          const int per_sm = per_sm_at(s);
          if (per_sm < kMinPersistentBlocksPerSm) continue;
          const int grid = std::min(pp.total, per_sm * kSms);
          int64_t could = 0;
          for (int b = 0; b < grid; ++b) could += std::min(s, owned_chunks(pp.total, grid, b));
          ASSERT_LE(could, pp.cached) << what << ": " << s << " slots would cache more";
        }
      }
  }
  // What the ResNet shapes get on this model. ResNet-18's first stage at batch 128 in bf16
  // (16 MiB) is cached whole for the forward; at batch 512 (64 MiB) a quarter of it, one 64 KiB
  // chunk per block at two blocks per SM. In fp32 at batch 512 a chunk is 128 KiB: caching one
  // would leave one block per SM, so nothing is cached (the tensor is four times the shared
  // memory anyway) and the grid keeps two blocks per SM.
  const ColumnReducePlan r18_128 = plan_column_reduce(128 * 32 * 32, 64);
  const PersistentPlan whole = plan_persistent(r18_128, 2, 1, kSms, kMaxDynamic, modelled_occupancy);
  EXPECT_EQ(whole.cached, whole.total);
  const ColumnReducePlan r18_512 = plan_column_reduce(512 * 32 * 32, 64);
  const PersistentPlan part = plan_persistent(r18_512, 2, 1, kSms, kMaxDynamic, modelled_occupancy);
  EXPECT_EQ(part.grid, 2 * kSms);
  EXPECT_EQ(part.cached, 2 * kSms);
  EXPECT_LT(part.cached, part.total);
  const PersistentPlan fp32 = plan_persistent(r18_512, 4, 1, kSms, kMaxDynamic, modelled_occupancy);
  EXPECT_EQ(fp32.grid, 2 * kSms);
  EXPECT_EQ(fp32.cached, 0);
  // With one block per SM the only choice, it is taken.
  const PersistentPlan single = plan_persistent(r18_512, 4, 1, kSms, kMaxDynamic, [](size_t bytes) {
    return bytes <= 128 * 1024 ? 1 : 0;
  });
  EXPECT_EQ(single.grid, kSms);
  EXPECT_EQ(single.cached, kSms);
  // A device without room for any block gets no plan (grid 0: the separate kernels run).
  EXPECT_EQ(plan_persistent(r18_128, 2, 1, kSms, kMaxDynamic, [](size_t) { return 0; }).grid, 0);
}

TEST(ColumnPlan, ThePersistentElementPassReadsBackWhatEachThreadCached) {
  for (const auto& [m, c] : kShapes) {
    if (m == 0) continue;
    const ColumnReducePlan p = plan_column_reduce(m, c);
    const std::string what = str(m, c);
    std::vector<uint8_t> written(size_t(m) * size_t(c), 0);
    for (int t = 0; t < p.col_blocks * p.chunks; ++t) {
      const ChunkBox box = chunk_box(p, m, t);
      const int bx = t % p.col_blocks, by = t / p.col_blocks;
      ASSERT_EQ(box.col0, bx * p.cols_per_block()) << what;
      ASSERT_EQ(box.row0, int64_t(by) * p.chunk_rows) << what;
      ASSERT_LE(box.rows, p.chunk_rows) << what;
      // The chunk's slot in shared memory: no two of its elements in one place.
      std::vector<uint8_t> slot(size_t(p.chunk_rows) * size_t(p.cols_per_block()), 0);
      for (int tid = 0; tid < kReduceThreads; ++tid) {
        const ReduceSlice rs = reduce_slice(p, m, bx, by, tid);
        const PieceSlice ps = piece_slice(p, box, tid);
        // The same columns and rows as the reduction thread.
        ASSERT_EQ(ps.j0, rs.j0) << what << " chunk " << t << " tid " << tid;
        ASSERT_EQ(ps.ncols, rs.ncols) << what;
        ASSERT_EQ(box.row0 + ps.r0, rs.row_begin) << what;
        ASSERT_EQ(ps.step, rs.row_step) << what;
        ASSERT_EQ(rs.row_end, box.row0 + box.rows) << what;
        if (ps.ncols == 0) continue;
        for (int64_t r = ps.r0; r < box.rows; r += ps.step) {
          const int64_t i = box.row0 + r;
          const int64_t off = slot_offset(p.cols_per_block(), box, i, ps.j0);
          // Inside the slot, on a 16-byte boundary for 2- and 4-byte elements.
          ASSERT_GE(off, 0) << what;
          ASSERT_LE(off + kChunkElems, int64_t(p.chunk_rows) * p.cols_per_block()) << what;
          ASSERT_EQ(off % kChunkElems, 0) << what;
          for (int e = 0; e < ps.ncols; ++e) {
            uint8_t& hit = written[size_t(i) * size_t(c) + size_t(ps.j0 + e)];
            ASSERT_EQ(hit, 0) << what << ": element (" << i << ", " << ps.j0 + e << ") written twice";
            hit = 1;
            uint8_t& used = slot[size_t(off + e)];
            ASSERT_EQ(used, 0) << what << " chunk " << t << ": element (" << i << ", " << ps.j0 + e
                               << ") cached where another element of the chunk is";
            used = 1;
          }
        }
      }
    }
    for (size_t k = 0; k < written.size(); ++k)
      ASSERT_EQ(written[k], 1) << what << ": element (" << k / size_t(c) << ", " << k % size_t(c) << ") never written";
  }
}

}  // namespace
