// The host-side choices of the tensor-core GEMM launches that depend on the shape alone, as
// plain C++ (no CUDA), so that the CPU tests (tests/test_tile_plan.cpp) check them without a
// GPU: the split of K (every tiled GEMM and convolution), and which products the 128 x 256 TMA
// tile takes when it is chosen by shape (tensor_core.h, tma_wide_by_shape).
//
// None of them reads the device (its SM count, say): the choices, and with them the order in
// which the sums are added, are the same on every GPU, so a run is bit-reproducible across
// machines of one architecture.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels/common/error.h"
#include "kernels/common/whole_number.h"

#if defined(__CUDACC__)
#define SP_TILE_HD __host__ __device__ __forceinline__
#else
#define SP_TILE_HD inline
#endif

namespace sp::kernels::cuda::detail {

// Split K only while the output has fewer block tiles than this: about two blocks per SM on
// an H100 (132 SMs). A constant rather than the device's SM count (see above).
constexpr int64_t kSplitTargetBlocks = 256;
// Each K slice is at least this deep, so the round trip of its partial tile through memory
// stays small next to its FMAs.
constexpr int kMinSliceDepth = 256;

struct SplitPlan {
  int splits;       // K slices (grid.z)
  int k_per_split;  // a multiple of the K step
};

inline int64_t tile_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tensor-core launches' cap on the split grid, by default, per block an SM holds of the tile
// (Tile::kMinBlocks, mma_launch.cuh): one wave of an H100's (and an H200's) 132 SMs. The rule of kSplitTargetBlocks
// instead split ResNet-18's three late weight gradients into 270-288 blocks, a third wave at most a fifth full, and its
// 8-pixel stride classes where the unsplit grid is one wave already; capped at 132, its bf16 convolutions at batch 512
// ran 1.03x faster summed on an H100, the weight gradients 1.05x (264 blocks: 1.00x;
// bench/results/nvidia-h100/2026-11-27c-summary.md). A constant, like the rest of this file, so that the sums' order is
// the same on every GPU. The fp32 tiles (several blocks per SM) keep the target rule.
constexpr int64_t kTensorCoreSplitMaxBlocks = 132;

// The environment variable STALEPROP_SPLIT_MAX_BLOCKS, for timing the tiled launches
// (tensor-core and fp32) under another split: a whole number of blocks from 0 to 65536, read
// once; 0 is the target rule for both. A value that is not such a number throws sp::Error
// naming the variable.
inline int64_t parse_split_max_blocks(const char* text) {
  return parse_whole_number("STALEPROP_SPLIT_MAX_BLOCKS", "blocks", text, 0, 65536);
}
// A process-wide cap that overrides the environment's and the defaults: -1 (as at start) for
// none. For tests (set_split_max_blocks in tensor_core.h), which cannot set the environment
// once it has been read.
inline std::atomic<int64_t>& split_max_blocks_override() {
  static std::atomic<int64_t> blocks{-1};
  return blocks;
}
// The cap a launch uses: the override where set, else the environment's where it is set (and
// not empty), else `fallback` (kTensorCoreSplitMaxBlocks for the tensor-core launches, 0 for
// the fp32 ones).
inline int64_t split_max_blocks(int64_t fallback) {
  const int64_t set = split_max_blocks_override().load(std::memory_order_relaxed);
  if (set >= 0) return set;
  static const int64_t from_env = [] {
    const char* env = std::getenv("STALEPROP_SPLIT_MAX_BLOCKS");
    return env && *env ? parse_split_max_blocks(env) : int64_t(-1);
  }();
  return from_env >= 0 ? from_env : fallback;
}

// The split cap of a tensor-core launch on a tile that holds min_blocks blocks per SM: one wave
// of its blocks (kTensorCoreSplitMaxBlocks per block an SM holds), unless the override or the
// environment sets another (split_max_blocks). Every tensor-core launch asks this.
inline int64_t tensor_core_split_cap(int min_blocks) {
  return split_max_blocks(kTensorCoreSplitMaxBlocks * int64_t(min_blocks));
}

// The K split for an output of `tiles` block tiles, K = k in steps of k_step, in slices of at
// least kMinSliceDepth. With max_blocks > 0, into floor(max_blocks / tiles) slices: the split
// grid stays within max_blocks (kTensorCoreSplitMaxBlocks: one full wave). With max_blocks 0
// (the target rule), a grid of fewer than kSplitTargetBlocks tiles is split into
// ceil(kSplitTargetBlocks / tiles) slices: the split grid reaches the target.
inline SplitPlan plan_split_k(int64_t tiles, int k, int k_step, int64_t max_blocks) {
  const int k_steps = int(tile_ceil_div(k, k_step));
  const int64_t wanted = max_blocks > 0               ? max_blocks / std::max<int64_t>(tiles, 1)
                         : tiles < kSplitTargetBlocks ? tile_ceil_div(kSplitTargetBlocks, tiles)
                                                      : 1;
  const int splits = int(std::max<int64_t>(1, std::min<int64_t>(wanted, k / kMinSliceDepth)));
  const int steps_per_split = int(tile_ceil_div(k_steps, splits));
  // Recount so that no slice is empty (e.g. 10 steps in 4 slices of 3 leave 4 slices, 3 + 3 + 3 + 1).
  return SplitPlan{int(tile_ceil_div(k_steps, steps_per_split)), steps_per_split * k_step};
}

// One output tile's work in a tiled launch: tile t of the product's tiles numbered M tile fastest,
// then N tile, then K slice, the order of a (M tiles, N tiles, K slices) grid's blocks. The
// persistent TMA kernel (wgmma_tma_mainloop.cuh) goes over tiles by this numbering; a block per
// tile decodes its own index to its (blockIdx.x, blockIdx.y, blockIdx.z). bm x bn tiles, K = k
// in slices of k_per_split (a multiple of k_step; the split plan's). 32-bit: the host keeps the
// tiles under 2^30. tests/test_tile_plan.cpp checks the numbering on the CPU.
struct TileWork {
  int m0, n0, z, k_begin, k_steps;
};
SP_TILE_HD TileWork tile_work(int t, int tiles_m, int tiles_n, int bm, int bn, int k, int k_per_split, int k_step) {
  TileWork w;
  w.m0 = t % tiles_m * bm;
  const int rest = t / tiles_m;
  w.n0 = rest % tiles_n * bn;
  w.z = rest / tiles_n;
  w.k_begin = w.z * k_per_split;
  const int k_end = k < w.k_begin + k_per_split ? k : w.k_begin + k_per_split;
  w.k_steps = (k_end - w.k_begin + k_step - 1) / k_step;  // >= 1 where the plan leaves no slice empty
  return w;
}
// The tiles of a product: M tiles x N tiles x K slices.
SP_TILE_HD int tile_count(int m, int n, int k, int bm, int bn, int k_per_split) {
  return ((m + bm - 1) / bm) * ((n + bn - 1) / bn) * ((k + k_per_split - 1) / k_per_split);
}

// Whether an N-column product fills the 128 x 256 tile well enough to take it at all: N >= 256
// and its last 256-column tile more than half full (N = 264 would compute 512 columns where
// 128-wide tiles compute 384).
inline bool wide_tile_width(int64_t n) { return n >= 256 && (n % 256 == 0 || n % 256 > 128); }

// The wgmma_tma kernel's tiles: 128 rows, 128 or 256 columns, K steps of 64.
constexpr int kTmaTileRows = 128, kTmaNarrowCols = 128, kTmaWideCols = 256, kTmaKStep = 64;
// The rule's thresholds, in K steps (below).
constexpr int64_t kWideMinSteps = 16, kWideSplitMinSteps = 128;

// Whether the 128 x 256 tile should run an M x N x K product that wide_tile_width(N) admits, by
// the rule the H100 measurements of 2026-11-27 suggest (bench/results/nvidia-h100/
// 2026-11-27-summary.md, "128x256 TMA tile": ResNet-18's bf16 convolutions at batch 512 and the
// bf16 GEMM, our own rates with the wide tile against the 128 x 128 one):
//   * where the 128 x 128 form does not split K (at least kSplitTargetBlocks tiles), the wide
//     tile only where it does not split K either and the reduction has at least kWideMinSteps
//     steps. The losses were all wide forms with 128 tiles, which split K where the narrow form
//     did not (the 256->512 s2 forward 0.63x, the 512->512 forward 0.84x and data gradient
//     0.84x), and one reduction of 2 steps (the 128->256 1x1 forward, 0.95x); the gains had 256
//     wide tiles and 18 or 36 steps (1.08x-1.23x), and the GEMM 4096^3 (512 tiles) 1.05x;
//   * where the narrow form splits K anyway (few output tiles: the weight gradients), the wide
//     tile where the reduction is long, at least kWideSplitMinSteps steps: the four 3x3 weight
//     gradients, with 128 to 512 steps, gained 1.07x-1.38x.
// Timed as a rule on an H100 (2026-11-27b-summary.md): ResNet-18's convolutions 1.05x summed, the
// weight gradients 1.12x, the GEMM 1.04x (4096^3) and 1.17x (8192^3); on by default since.
inline bool wide_tile_pays(int64_t m, int64_t n, int64_t k) {
  if (m <= 0 || k <= 0 || !wide_tile_width(n)) return false;
  const int64_t row_tiles = tile_ceil_div(m, kTmaTileRows);
  const int64_t narrow = row_tiles * tile_ceil_div(n, kTmaNarrowCols);
  const int64_t wide = row_tiles * tile_ceil_div(n, kTmaWideCols);
  const int64_t steps = tile_ceil_div(k, kTmaKStep);
  if (narrow >= kSplitTargetBlocks) return wide >= kSplitTargetBlocks && steps >= kWideMinSteps;
  return steps >= kWideSplitMinSteps;
}

}  // namespace sp::kernels::cuda::detail
