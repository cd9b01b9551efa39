// The shape-only choices of the tensor-core launches (kernels/cuda/tile_plan.h), on the host:
//   * the split of K covers the reduction with no empty slice, only for small grids;
//   * the wide tile's rule (wide_tile_pays) at each of its boundaries, and against the
//     measurements it was drawn from: on the H100 of 2026-11-27 (bench/results/nvidia-h100/
//     2026-11-27-kernels-r18-convs-wide-{0,1}.json and -kernels-gemm-bf16-wide-{0,1}.json), every
//     product that ran measurably faster on the 128 x 256 tile takes it, and none that ran slower.
// The GPU test TensorCore.WideTileByShape checks that the launches follow the rule.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cuda/tile_plan.h"

namespace {

using namespace sp::kernels::cuda::detail;

std::string str(int64_t m, int64_t n, int64_t k) {
  return std::to_string(m) + " x " + std::to_string(n) + " x " + std::to_string(k);
}

TEST(TilePlan, SplitKCoversTheReductionWithNoEmptySlice) {
  for (int64_t tiles : {1, 2, 3, 7, 64, 128, 255, 256, 257, 1000})
    for (int k : {1, 63, 64, 65, 255, 256, 257, 1000, 4099, 8192, 20000, 32768}) {
      const std::string what = std::to_string(tiles) + " tiles, K = " + std::to_string(k);
      const SplitPlan p = plan_split_k(tiles, k, 64, 0);  // the target rule, whatever the environment
      ASSERT_GE(p.splits, 1) << what;
      EXPECT_EQ(p.k_per_split % 64, 0) << what;
      const int64_t steps = (k + 63) / 64;
      EXPECT_GE(int64_t(p.splits) * p.k_per_split, k) << what << ": the slices cover K";
      EXPECT_LT(int64_t(p.splits - 1) * p.k_per_split, k) << what << ": the last slice is not empty";
      EXPECT_LE(int64_t(p.splits), steps) << what;
      if (tiles >= kSplitTargetBlocks) {
        EXPECT_EQ(p.splits, 1) << what << ": a full grid is never split";
      }
      if (p.splits > 1) {  // a slice is at least kMinSliceDepth deep
        EXPECT_GE(p.k_per_split, kMinSliceDepth) << what;
      }
      if (tiles < kSplitTargetBlocks && k >= 2 * kMinSliceDepth) {
        EXPECT_GT(p.splits, 1) << what << ": a small grid with a long reduction is split";
      }
    }
}

TEST(TilePlan, SplitWithinAMaximumOfBlocks) {
  // STALEPROP_SPLIT_MAX_BLOCKS's rule: floor(max / tiles) slices, so the split grid never
  // exceeds max blocks (a grid of more tiles than that is not split), still covering K with no
  // empty slice and slices of at least kMinSliceDepth.
  for (int64_t max_blocks : {1, 132, 264, 396})
    for (int64_t tiles : {1, 5, 9, 18, 36, 72, 128, 133, 300})
      for (int k : {64, 255, 1024, 8192, 32768, 131072}) {
        const std::string what = std::to_string(max_blocks) + " blocks at most, " + std::to_string(tiles) +
                                 " tiles, K = " + std::to_string(k);
        const SplitPlan p = plan_split_k(tiles, k, 64, max_blocks);
        ASSERT_GE(p.splits, 1) << what;
        EXPECT_LE(tiles * p.splits, std::max(max_blocks, tiles)) << what;
        EXPECT_GE(int64_t(p.splits) * p.k_per_split, k) << what;
        EXPECT_LT(int64_t(p.splits - 1) * p.k_per_split, k) << what;
        if (p.splits > 1) {
          EXPECT_GE(p.k_per_split, kMinSliceDepth) << what;
        }
        if (2 * tiles > max_blocks) {
          EXPECT_EQ(p.splits, 1) << what;
        }
      }
  // ResNet-18's 256 -> 256 weight gradient at batch 512 on the wide tile: 18 tiles, 512 K steps.
  // The target rule (0) reaches past 256 blocks (15 slices, 270 blocks: a third wave of 132 SMs);
  // at most 264 blocks, 14 slices (252: two waves); at most 132, 7 slices (126: one wave).
  EXPECT_EQ(plan_split_k(18, 32768, 64, 0).splits, 15);
  EXPECT_EQ(plan_split_k(18, 32768, 64, 264).splits, 14);
  EXPECT_EQ(plan_split_k(18, 32768, 64, 132).splits, 7);
  // An 8-pixel stride class's GEMM: 128 tiles, which the target rule splits in two (256 blocks).
  EXPECT_EQ(plan_split_k(128, 8192, 64, 0).splits, 2);
  EXPECT_EQ(plan_split_k(128, 8192, 64, 132).splits, 1);
}

TEST(TilePlan, TensorCoreLaunchesSplitWithinOneWaveByDefault) {
  // The tensor-core launches' cap (tensor_core_split_cap, which every launch in mma_launch.cuh
  // asks): one wave, kTensorCoreSplitMaxBlocks blocks per block an SM holds of the tile (132 for
  // the one-block tiles, 264 for the two-block narrow ones); the fp32 launches the target rule
  // (fallback 0). Unless the override or the environment sets the cap.
  if (std::getenv("STALEPROP_SPLIT_MAX_BLOCKS")) GTEST_SKIP() << "STALEPROP_SPLIT_MAX_BLOCKS is set";
  ASSERT_EQ(split_max_blocks_override().load(), -1);
  EXPECT_EQ(tensor_core_split_cap(1), 132);
  EXPECT_EQ(tensor_core_split_cap(2), 264);
  EXPECT_EQ(split_max_blocks(0), 0);
  // ResNet-18's late weight gradient (18 wide tiles, 512 K steps) and an 8-pixel stride class
  // (128 tiles, 128 steps), as launched by default on a one-block tile; the class on the narrow
  // two-block tile (264 / 128: 2 slices); the target rule's split.
  EXPECT_EQ(plan_split_k(18, 32768, 64, tensor_core_split_cap(1)).splits, 7);
  EXPECT_EQ(plan_split_k(128, 8192, 64, tensor_core_split_cap(1)).splits, 1);
  EXPECT_EQ(plan_split_k(128, 8192, 64, tensor_core_split_cap(2)).splits, 2);
  EXPECT_EQ(plan_split_k(128, 8192, 64, split_max_blocks(0)).splits, 2);
  // The override replaces the cap for every tile.
  split_max_blocks_override().store(500);
  EXPECT_EQ(tensor_core_split_cap(1), 500);
  EXPECT_EQ(tensor_core_split_cap(2), 500);
  split_max_blocks_override().store(-1);
}

TEST(TilePlan, SplitMaximumFromTheEnvironment) {
  EXPECT_EQ(parse_split_max_blocks("0"), 0);  // the target rule
  EXPECT_EQ(parse_split_max_blocks("132"), 132);
  EXPECT_EQ(parse_split_max_blocks("65536"), 65536);
  for (const char* bad : {"", "-4", "65537", "12x", "abc", " 132"}) {
    try {
      parse_split_max_blocks(bad);
      ADD_FAILURE() << "'" << bad << "' was accepted";
    } catch (const sp::Error& e) {
      EXPECT_NE(std::string(e.what()).find("STALEPROP_SPLIT_MAX_BLOCKS"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(parse_split_max_blocks(nullptr), sp::Error);
}

TEST(TilePlan, TileNumberingCoversEveryTileOnceOnEitherGrid) {
  // tile_work's numbering (the persistent TMA kernel's): on the classic grid (M tiles, N tiles,
  // K slices) each block's index in the grid decodes to its own (blockIdx.x, blockIdx.y,
  // blockIdx.z); every index decodes to a distinct tile, so a persistent grid (block b taking
  // b, b + P, ...) computes each once; and each tile's K slices cover K in order, with no slice
  // empty, as the split plan (and the kernel's reduction of the partials by slice) expects.
  struct Shape {
    int m, n, k;
  };
  for (const Shape& sh : {Shape{1000, 3000, 136}, Shape{512, 512, 16040}, Shape{128, 64, 64}, Shape{4096, 2048, 4160},
                          Shape{130, 72, 100000}, Shape{34816, 64, 576}})
    for (const auto& tile : {std::pair<int, int>{128, 128}, {128, 256}, {128, 64}})
      for (const int64_t cap : {int64_t(0), int64_t(132), int64_t(4096)}) {
        const int bm = tile.first, bn = tile.second, step = 64;
        const int tiles_m = (sh.m + bm - 1) / bm, tiles_n = (sh.n + bn - 1) / bn;
        const SplitPlan plan = plan_split_k(int64_t(tiles_m) * tiles_n, sh.k, step, cap);
        const int tiles = tile_count(sh.m, sh.n, sh.k, bm, bn, plan.k_per_split);
        const std::string what = std::to_string(sh.m) + " x " + std::to_string(sh.n) + " x " + std::to_string(sh.k) +
                                 " on " + std::to_string(bm) + " x " + std::to_string(bn) + ", cap " +
                                 std::to_string(cap);
        ASSERT_EQ(tiles, tiles_m * tiles_n * plan.splits) << what;
        // The classic grid: block (x, y, z) at index x + X (y + Y z).
        for (int z = 0; z < plan.splits; ++z)
          for (int y = 0; y < tiles_n; ++y)
            for (int x = 0; x < tiles_m; x += std::max(1, tiles_m / 7)) {
              const TileWork w =
                  tile_work(x + tiles_m * (y + tiles_n * z), tiles_m, tiles_n, bm, bn, sh.k, plan.k_per_split, step);
              ASSERT_EQ(w.m0, x * bm) << what;
              ASSERT_EQ(w.n0, y * bn) << what;
              ASSERT_EQ(w.z, z) << what;
            }
        // Any grid, persistent or not, takes tile indices 0 .. tiles - 1 once each (block b: b,
        // b + gridDim, ...), so the numbering must decode them into distinct tiles, (m0, n0, z)
        // each once, whose slices cover each output tile's K in order, slice z after z - 1.
        std::set<std::tuple<int, int, int>> decoded;
        std::vector<int> k_done(size_t(tiles_m) * tiles_n, 0);  // K covered so far, slices in order
        for (int t = 0; t < tiles; ++t) {
          const TileWork w = tile_work(t, tiles_m, tiles_n, bm, bn, sh.k, plan.k_per_split, step);
          ASSERT_TRUE(decoded.insert({w.m0, w.n0, w.z}).second) << what << ": tile " << t << " decoded twice";
          ASSERT_GE(w.k_steps, 1) << what << ": an empty slice";
          int& done = k_done[size_t(w.m0 / bm) + size_t(tiles_m) * size_t(w.n0 / bn)];
          ASSERT_EQ(w.k_begin, done) << what << ": slice " << w.z;
          done = std::min(sh.k, w.k_begin + w.k_steps * step);
        }
        ASSERT_EQ(decoded.size(), size_t(tiles)) << what;
        ASSERT_TRUE(std::all_of(k_done.begin(), k_done.end(), [&](int v) { return v == sh.k; })) << what;
      }
}

TEST(TilePlan, WideTileWidths) {
  for (int64_t n : {0, 128, 255, 264, 320, 384}) EXPECT_FALSE(wide_tile_width(n)) << n;
  for (int64_t n : {256, 400, 448, 512, 1024, 1000}) EXPECT_TRUE(wide_tile_width(n)) << n;
  // The rule never takes a width the tile does not take, however the grid and reduction look.
  EXPECT_FALSE(wide_tile_pays(32768, 384, 4096));
  EXPECT_FALSE(wide_tile_pays(256, 264, 32768));
}

TEST(TilePlan, WideTileRuleAtItsBoundaries) {
  // The 128 x 128 form does not split K (>= 256 tiles): the wide one must not split either
  // (>= 256 wide tiles) and the reduction must have kWideMinSteps steps.
  EXPECT_TRUE(wide_tile_pays(32768, 256, 16 * 64));      // 512 / 256 tiles, 16 steps
  EXPECT_FALSE(wide_tile_pays(32768, 256, 15 * 64));     // 15 steps
  EXPECT_TRUE(wide_tile_pays(32768, 256, 15 * 64 + 1));  // a part step counts
  EXPECT_FALSE(wide_tile_pays(32767 - 127, 256, 4096));  // 255 wide tiles: it would split
  EXPECT_TRUE(wide_tile_pays(32768 - 127, 256, 4096));   // a part-empty last row tile counts
  EXPECT_TRUE(wide_tile_pays(16384, 512, 4608));         // 512 narrow, 256 wide tiles
  EXPECT_FALSE(wide_tile_pays(8192, 512, 4608));         // 256 narrow, 128 wide tiles
  // The 128 x 128 form splits K anyway (< 256 tiles): the wide tile for long reductions only.
  EXPECT_TRUE(wide_tile_pays(256, 256, 128 * 64));
  EXPECT_FALSE(wide_tile_pays(256, 256, 127 * 64));
  EXPECT_TRUE(wide_tile_pays(16256, 256, 128 * 64));  // 127 x 2 = 254 narrow tiles
  EXPECT_FALSE(wide_tile_pays(16256, 256, 127 * 64));
  // Nothing to compute.
  EXPECT_FALSE(wide_tile_pays(0, 256, 8192));
  EXPECT_FALSE(wide_tile_pays(256, 256, 0));
}

// One product measured on the 128 x 256 tile and on the 128 x 128 one in the same session, by
// our own rates: M x N x K of its implicit GEMM and the wide tile's speed-up.
struct Measured {
  const char* what;
  int64_t m, n, k;
  double speedup;
};

TEST(TilePlan, WideTileRuleTakesTheMeasuredGainsAndNoneOfTheLosses) {
  // ResNet-18's bf16 convolutions at batch 512 on TMA loads whose N admits the wide tile
  // (forward: M = N*P*Q, N = K, K = R*S*C; data gradient: M = N*H*W, N = C, K = R*S*K; weight
  // gradient: M = R*S*C, N = K, K = N*P*Q), and the square bf16 GEMMs. Left out: the layers the
  // wide tile does not reach (the strided data gradients and the 1x1 weight gradients, which do
  // not take TMA loads: 0.97x-1.01x, the run-to-run spread), and the 256->512 1x1 forward
  // (1.00x: K of 256 cannot be split, so both forms run alike).
  const Measured runs[] = {
      {"128->256 s2 forward", 32768, 256, 1152, 1.08},
      {"256->256 forward", 32768, 256, 2304, 1.23},
      {"256->512 s2 forward", 8192, 512, 2304, 0.63},
      {"512->512 forward", 8192, 512, 4608, 0.83},
      {"128->256 1x1 s2 forward", 32768, 256, 128, 0.95},
      {"256->256 data gradient", 32768, 256, 2304, 1.16},
      {"512->512 data gradient", 8192, 512, 4608, 0.84},
      {"128->256 s2 weight gradient", 1152, 256, 32768, 1.07},
      {"256->256 weight gradient", 2304, 256, 32768, 1.38},
      {"256->512 s2 weight gradient", 2304, 512, 8192, 1.08},
      {"512->512 weight gradient", 4608, 512, 8192, 1.26},
      {"GEMM 4096^3", 4096, 4096, 4096, 1.05},
      {"GEMM 8192^3", 8192, 8192, 8192, 1.22},
  };
  int gains = 0, losses = 0;
  for (const Measured& r : runs) {
    const bool wide = wide_tile_pays(r.m, r.n, r.k);
    const std::string what = std::string(r.what) + " (" + str(r.m, r.n, r.k) + ", " + std::to_string(r.speedup) + "x)";
    if (r.speedup >= 1.04) {
      EXPECT_TRUE(wide) << what << ": a gain the rule leaves";
      ++gains;
    } else {
      EXPECT_FALSE(wide) << what << ": a loss the rule takes";
      ++losses;
    }
  }
  EXPECT_EQ(gains, 9);
  EXPECT_EQ(losses, 4);
}

}  // namespace
