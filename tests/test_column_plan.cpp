// The work split of the bandwidth-bound CUDA kernels (kernels/cuda/column_plan.h), compiled for
// the host: by simulating every block and thread of the grids the kernels launch,
//   * the column reduction (column_reduce.cuh) sums every element of an [m, c] matrix exactly
//     once, its threads' chunks start at multiples of kChunkElems (the 16-byte loads), the lanes
//     its warp butterfly adds hold the same columns, and a warp's rows are consecutive;
//   * the element passes' chunk cursor (batchnorm.cu) visits every chunk once and always knows
//     its column.
// The plan is a function of (m, c) alone, so the order in which the sums are added is too.
// The GPU tests (test_cuda_ops) then check the kernels' arithmetic against the CPU reference.
#include <gtest/gtest.h>

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

TEST(ColumnPlan, TheChunkCursorVisitsEveryChunkOnceAndKnowsItsColumn) {
  for (const int c : {8, 16, 24, 64, 520}) {
    for (const int64_t rows : {int64_t(1), int64_t(3), int64_t(1000)}) {
      const int64_t total = rows * c;
      // Grids smaller and larger than one row, and one past a multiple of c.
      for (const int64_t threads : {int64_t(1), int64_t(3), int64_t(256), int64_t(2048 * 8 + 1)}) {
        const std::string what = str(rows, c) + " threads " + std::to_string(threads);
        std::vector<uint8_t> seen(size_t(total / kChunkElems), 0);
        for (int64_t t = 0; t < threads; ++t)
          for (ChunkCursor k = chunk_cursor(t, threads, c); k.i < total; advance(k, c)) {
            ASSERT_EQ(k.i % kChunkElems, 0) << what;
            ASSERT_EQ(k.j, int(k.i % c)) << what << " at element " << k.i;
            ASSERT_LE(k.j + kChunkElems, c) << what << ": a chunk crosses a row end";
            uint8_t& hit = seen[size_t(k.i / kChunkElems)];
            ASSERT_EQ(hit, 0) << what << ": chunk at " << k.i << " visited twice";
            hit = 1;
          }
        for (size_t k = 0; k < seen.size(); ++k) ASSERT_EQ(seen[k], 1) << what << ": chunk " << k << " never visited";
      }
    }
  }
}

}  // namespace
