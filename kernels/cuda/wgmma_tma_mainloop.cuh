// The warp-specialised Hopper (sm_90a) main loop of the bf16 GEMM on plain matrices: the wgmma
// multiply of wgmma_mainloop.cuh, its shared-memory layouts and its epilogue, with the stages
// filled by TMA (cp.async.bulk.tensor) instead of every thread's cp.async.
//
// Why: Nsight Compute on the cp.async wgmma loop (bench/results/nvidia-h200/
// 2026-11-26-mainloops.md) shows the tensor cores waiting on instruction issue, the integer ALU
// the busiest pipe. That is the address arithmetic of 256 threads' 16-byte copies. Here one
// thread issues a few bulk copies per K step (2-3 for the GEMM; up to 6 for the wide weight
// gradient's two 4-D activation boxes and four filter boxes: conv_tma.h), and the hardware does
// the addressing, the 128-byte swizzle and the zero fill past the matrix's edges.
//
// Block: 128 x kBN tile (kBN 128; 256 for GEMMs with N >= 256 where enabled; 64 for the
// convolutions with 64 output columns), three warpgroups (384 threads):
//   warpgroup 0   producer: one thread runs ahead through a ring of kStages stages. For each K
//                 step it waits until the stage is free ("empty" mbarrier), announces the
//                 stage's bytes on its "full" mbarrier, and issues the TMA boxes (TmaStage in
//                 wgmma_layout.h). The other 127 threads exit at once.
//   warpgroups 1, 2  consumers: rows 64 (w - 1) .. + 63, all kBN columns, as in
//                 wgmma_mainloop.cuh. Per K step: wait for "full", 4 wgmma.m64n{kBN}k16, commit,
//                 wait until only this step's group is pending, then release the previous
//                 step's stage (lane 0 of every consumer warp arrives on its "empty").
// TMA writes and wgmma reads both go through the async proxy, and the mbarrier wait orders
// them, so no proxy fence is needed. Split K, the epilogue and the partials are those of
// wgmma_gemm_kernel.
//
// Clusters (Tile::kCluster == 2; tma_cluster() in tensor_core.h, off by default: its first form
// passed its GPU tests but lost, see the protocol below; the present form passed them on an H100
// and still lost a little, 0.97x-0.98x on the GEMM: 2026-11-27c).
// Why: Nsight Compute on the 128 x 128 GEMM at 4096^3 (bench/results/nvidia-h100/
// 2026-11-26-ncu-gemm-wgmma_tma.txt) shows L2 at 73% of its throughput with the tensor pipes
// idle much of the time: each block reads 32 KiB of A and B from L2 per K step of 64, about
// 64 bytes per SM cycle at the tensor cores' rate, more than L2 delivers to all SMs at once.
// Two blocks on consecutive row tiles need the same B stage, so in a cluster of two each loads
// half of it (TmaStage::part_box) with multicast into both blocks' shared memory: B is read once
// per cluster, a quarter less L2 traffic for the 128 x 128 tile and a third less for 128 x 256.
// The protocol (the one CUTLASS's cluster pipelines use):
//   * the blocks' barriers are initialised before a cluster-wide barrier, so no multicast or
//     remote arrival reaches a block before its barriers exist;
//   * each block's "full" barrier expects the whole stage (its A, both halves of B); a half from
//     the other block may land before this block's producer announces the bytes, which only
//     leaves the transaction count negative for a while: the phase still needs the producer's
//     arrival;
//   * a stage's "empty" barrier counts the consumer warps of both blocks (each releases on both:
//     mbarrier_arrive_cluster), since the producers' multicasts write into both. The remote
//     arrivals and the producer's waits have the default (CTA-scope) semantics, as CUTLASS's:
//     with cluster scope they compiled to a GPU-wide fence (MEMBAR.ALL.GPU, ERRBAR, CGAERRBAR) on
//     every consumer warp's release and an L1 invalidation after every producer wait, and the
//     clustered GEMM ran at 0.46x-0.67x of the unclustered one on an H100 (2026-11-27b);
//   * the consumers also release the last stage, and each producer waits until every stage is
//     released by both blocks before it exits (its "tail"): no arrival then reaches a block that
//     has exited.
// The multiply, the K order and the epilogue are those of the single block, so the results are
// the same bits (tested: TensorCore.GemmAndConvolutionsInClustersOfTwo). Until the protocol has
// run on a GPU, its waits are bounded (ptx_sm90.cuh, kClusterWaitCycles): a bug traps instead of
// hanging.
//
// cuobjdump (CUDA 13.0, sm_90a): 90-92 registers, no stack; the SASS holds UTMALDG.2D (the TMA
// loads), SYNCS.ARRIVE.TRANS64 / SYNCS.PHASECHK.TRANS64.TRYWAIT (the mbarriers) and
// HGMMA.64x128x16.F32.BF16. The 128 x 128 form passed its GPU tests and compute-sanitizer on an
// H100 (bench/results/nvidia-h100/2026-11-26-summary.md) at commit 1265bd6. Since then the kernel
// became a template over its tile and its A source (the convolutions' 4-D boxes) and gained the
// PDL prologue; that form, the convolutions' sources and the 128 x 256 form (WgTmaTileWide, GEMMs with N >= 256
// where tma_wide_tile() is on) passed their GPU tests, memcheck and racecheck on an H100 at commit a7657e6
// (bench/results/nvidia-h100/2026-11-27-summary.md). The wide form: 168 registers at launch, USETMAXREG to 40 in
// the producer and 232 in the consumers, whose code reaches R152; no stack, no local memory (tools/sass_check.sh
// there: every 128 x 256 instance sets its registers twice and makes no call).
//
// Used for the bf16 GEMM when the wgmma_tma main loop is selected (tensor_core.h; auto selects it
// on Hopper), both
// operands are plain matrices TMA can address (16-byte-aligned base, rows a multiple of 16
// bytes apart) and N > 64. Everything else falls back to the cp.async wgmma loop.
// The A operand comes from a source (PlainSource: a plain matrix; ConvSource: a convolution's
// implicit-GEMM rows as 4-D boxes of its NHWC input; ConvWgradSource: the weight gradient's
// filter-tap rows, likewise; conv_tma.h). The convolution form runs
// only where conv_tma() is on (tensor_core.h; the default).
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: the maps are encoded through the runtime's driver entry point)

#include <cstdint>

#include "kernels/cuda/conv_tma.h"
#include "kernels/cuda/mma_mainloop.cuh"
#include "kernels/cuda/ptx_sm90.cuh"
#include "kernels/cuda/tile_plan.h"
#include "kernels/cuda/wgmma_layout.h"
#include "kernels/cuda/wgmma_mainloop.cuh"

namespace sp::kernels::cuda::detail::wgmma {

// ProducerRegs > 0: the warpgroups rebalance the registers at the start (setmaxnreg), the
// producer down to ProducerRegs and the consumers up to ConsumerRegs. The block is launched
// with 65536 / 384 = 168 per thread; 40 + 2 x 232 = 3 x 168, so the consumers' increase is
// exactly what the producer hands back.
// Cluster > 1: blocks run in clusters of Cluster along M (consecutive row tiles, the same
// column tile and K range), which share the B operand: each block loads its part of every B
// stage (TmaStage::part_box) and multicasts it to the cluster, so B is read from L2 once per
// cluster instead of once per block (below, "Clusters").
template <int BN, int Stages, int MinBlocks = 1, int ProducerRegs = 0, int ConsumerRegs = 0, int Cluster = 1>
struct WgTmaTileOf {
  static constexpr int kBM = 128, kBN = BN, kBK = wgmma::kBK, kStages = Stages;
  static constexpr int kMinBlocks = MinBlocks;  // per SM, for __launch_bounds__
  static constexpr int kProducerRegs = ProducerRegs, kConsumerRegs = ConsumerRegs;
  static constexpr int kCluster = Cluster;
  static_assert(Cluster == 1 || Cluster == 2, "clusters of one or two blocks");
  // 168 = 65536 / 384 rounded down to 8: what __launch_bounds__(384, 1) gives every thread.
  static_assert(ProducerRegs == 0 || (MinBlocks == 1 && ProducerRegs % 8 == 0 && ConsumerRegs % 8 == 0 &&
                                      ProducerRegs >= 24 && ProducerRegs <= 168 && ConsumerRegs >= 168 &&
                                      ConsumerRegs <= 256 && ProducerRegs + 2 * ConsumerRegs <= 3 * 168),
                "setmaxnreg: multiples of 8 in 24..256 that rebalance the block's 3 x 168 per thread");
  static constexpr int kConsumerThreads = 2 * kWarpgroupThreads, kConsumerWarps = kConsumerThreads / kWarpSize;
  static constexpr int kThreads = kWarpgroupThreads + kConsumerThreads;
  static constexpr int kAStage = kBM * kBK, kBStage = kBN * kBK;  // elements
  static constexpr int kAcc = kBN / 2;
  // The stages (1024-byte aligned), the 2 x kStages mbarriers after them, and the slack to
  // round the start up to 1024 bytes: 161 KiB (kBN 128, one block per SM), 97 KiB (kBN 64, two)
  // or 193 KiB (kBN 256, one).
  static constexpr int kSmemBytes = kStages * (kAStage + kBStage) * 2 + 2 * kStages * 8 + kAtomBytes;
  static_assert(kAStage * 2 % kAtomBytes == 0 && kBStage * 2 % kAtomBytes == 0,
                "stages stay 1024-byte aligned (the 128-byte swizzle's atom)");
  static_assert(kSmemBytes * kMinBlocks <= 227 * 1024, "the stages of kMinBlocks blocks fit an SM's shared memory");
  static_assert(kBM == kConvTmaTileM, "the convolutions' TMA plans are for this tile");
};
using WgTmaTile = WgTmaTileOf<128, 5>;
// 128 x 64 (the convolutions with 64 output columns): two blocks per SM, as the cp.async loop's
// narrow tile runs, so that one block's epilogue and pipeline fill overlap the other's main
// loop; its consumers need about 60 registers (of the 85 two blocks allow).
using WgTmaTileNarrow = WgTmaTileOf<64, 4, 2>;
// 128 x 256 for the GEMM with N >= 256: half the tiles of 128 x 128, and each consumer's
// wgmma.m64n256k16 reads 10 KiB of shared memory per 64 x 256 x 16 product instead of 2 x 6 KiB
// for two m64n128k16. 128 accumulators per consumer thread: the registers are rebalanced.
using WgTmaTileWide = WgTmaTileOf<256, 4, 1, 40, 232>;
// The 128 x 128 and 128 x 256 tiles in clusters of two along M (tma_cluster(), tensor_core.h).
using WgTmaTileCluster = WgTmaTileOf<128, 5, 1, 0, 0, 2>;
using WgTmaTileWideCluster = WgTmaTileOf<256, 4, 1, 40, 232, 2>;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The TMA boxes of one operand's stage at (x0, k0) into `stage`, completing on `bar`.
template <class Stage, bool ContigK>
__device__ __forceinline__ void tma_load_stage(const CUtensorMap* map, uint16_t* stage, uint64_t* bar, int x0,
                                               int k0) {
#pragma unroll
  for (int j = 0; j < Stage::template boxes<ContigK>(); ++j) {
    int c0 = 0, c1 = 0;
    Stage::template box_coords<ContigK>(j, x0, k0, c0, c1);
    ptx::tma_load_2d(reinterpret_cast<unsigned char*>(stage) + Stage::template box_offset<ContigK>(j), map, bar, c0,
                     c1);
  }
}

// The L2 prefetches of what tma_load_stage loads.
template <class Stage, bool ContigK>
__device__ __forceinline__ void tma_prefetch_stage(const CUtensorMap* map, int x0, int k0) {
#pragma unroll
  for (int j = 0; j < Stage::template boxes<ContigK>(); ++j) {
    int c0 = 0, c1 = 0;
    Stage::template box_coords<ContigK>(j, x0, k0, c0, c1);
    ptx::tma_prefetch_2d(map, c0, c1);
  }
}
#endif

// The A operand of the kernel below: load() issues the TMA boxes of A's stage for rows x0..
// and K index k0 on `map`, completing on `bar` with TmaStage<kX>::kBytes in all; prefetch() asks
// L2 for the same boxes.
template <bool ContigK>
struct PlainSource {  // a plain matrix, TmaStage's boxes of a 2-D map
  static constexpr bool kContigK = ContigK;
  static constexpr bool kPlain = true;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  template <int kX>
  __device__ __forceinline__ void load(const CUtensorMap* map, uint16_t* stage, uint64_t* bar, int x0, int k0) const {
    tma_load_stage<TmaStage<kX>, ContigK>(map, stage, bar, x0, k0);
  }
  template <int kX>
  __device__ __forceinline__ void prefetch(const CUtensorMap* map, int x0, int k0) const {
    tma_prefetch_stage<TmaStage<kX>, ContigK>(map, x0, k0);
  }
#endif
};
struct ConvSource {  // a convolution's implicit-GEMM rows: one 4-D box per stage (conv_tma.h)
  static constexpr bool kContigK = true;
  static constexpr bool kPlain = false;
  ConvTmaSource src;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  template <int kX>
  __device__ __forceinline__ void load(const CUtensorMap* map, uint16_t* stage, uint64_t* bar, int x0, int k0) const {
    static_assert(kX == 128, "the plan's boxes are 128 rows");
    int co[4];
    src.coords(x0, k0, co);
    ptx::tma_load_4d(stage, map, bar, co[0], co[1], co[2], co[3]);
  }
  template <int kX>
  __device__ __forceinline__ void prefetch(const CUtensorMap* map, int x0, int k0) const {
    int co[4];
    src.coords(x0, k0, co);
    ptx::tma_prefetch_4d(map, co[0], co[1], co[2], co[3]);
  }
#endif
};

struct ConvWgradSource {  // the weight gradient's rows (tap, channel): kX / 64 boxes per stage
  static constexpr bool kContigK = false;
  static constexpr bool kPlain = false;
  ConvWgradTmaSource src;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  template <int kX>
  __device__ __forceinline__ void load(const CUtensorMap* map, uint16_t* stage, uint64_t* bar, int x0, int k0) const {
#pragma unroll
    for (int j = 0; j < kX / 64; ++j) {
      int co[4];
      src.coords(x0 + 64 * j, k0, co);
      ptx::tma_load_4d(reinterpret_cast<unsigned char*>(stage) + TmaStage<kX>::template box_offset<false>(j), map, bar,
                       co[0], co[1], co[2], co[3]);
    }
  }
  template <int kX>
  __device__ __forceinline__ void prefetch(const CUtensorMap* map, int x0, int k0) const {
#pragma unroll
    for (int j = 0; j < kX / 64; ++j) {
      int co[4];
      src.coords(x0 + 64 * j, k0, co);
      ptx::tma_prefetch_4d(map, co[0], co[1], co[2], co[3]);
    }
  }
#endif
};

// One output tile's work (tile_plan.h, tile_work: the numbering of a classic grid's blocks).
// 32-bit: the host checks that the tiles are fewer than 2^30, so that t + the grid's size cannot
// overflow either.
template <class Tile>
__device__ __forceinline__ TileWork tma_tile_work(int t, int tiles_m, int tiles_n, const MmaGeometry& g) {
  return tile_work(t, tiles_m, tiles_n, Tile::kBM, Tile::kBN, g.k, g.k_per_split, kBK);
}

// Tile::kThreads threads, kSmemBytes of dynamic shared memory; map_a / map_b describe A (x = M)
// and B (x = N): map_b as TmaStage's map_shape does, map_a as SourceA's load reads it. ContigB
// whether B is K-contiguous. partials as in mma::mma_gemm_kernel.
// The grid: (M tiles, N tiles, K slices), a block per tile; or persistent (tma_persistent() in
// tensor_core.h; never in clusters), a 1-D grid of as many blocks as the SMs hold, block b
// computing tiles b, b + gridDim.x, ... in tile_work's numbering (tile_plan.h). Either way the
// block's tiles are those numbered from its index in the grid in steps of the grid's size, and
// its producer and consumers go round one ring of stages across them: the producer fills the
// next tile's stages while the consumers store the last one's results. Each tile is computed as
// by a block of its own: the same bits.
template <class Tile, class SourceA, bool ContigB, typename T>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
    wgmma_tma_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                          const __grid_constant__ SourceA source_a, MmaGeometry g, MmaEpilogue<T> ep,
                          float* partials) {
  pdl_prologue();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool ContigA = SourceA::kContigK;
  using LayoutA = SwizzledLayout<Tile::kBM>;
  using LayoutB = SwizzledLayout<Tile::kBN>;
  using StageA = TmaStage<Tile::kBM>;
  using StageB = TmaStage<Tile::kBN>;
  constexpr int kS = Tile::kStages;

  unsigned char* const raw = ptx::dynamic_smem();
  const uint32_t misalign = ptx::smem_u32(raw) % kAtomBytes;
  uint16_t* const a_smem = reinterpret_cast<uint16_t*>(raw + (misalign ? kAtomBytes - misalign : 0));
  uint16_t* const b_smem = a_smem + kS * Tile::kAStage;
  uint64_t* const full = reinterpret_cast<uint64_t*>(b_smem + kS * Tile::kBStage);
  uint64_t* const empty = full + kS;

  constexpr int kCl = Tile::kCluster;
  // The L2 prefetches (g.l2_prefetch) where they fit the producer's registers: not the
  // convolutions' 4-D coordinates within the 128 x 256 tile's 40 (ptxas spilled there).
  constexpr bool kL2Prefetch = Tile::kProducerRegs == 0 || SourceA::kPlain;
  const int tiles_m = (g.m + Tile::kBM - 1) / Tile::kBM, tiles_n = (g.n + Tile::kBN - 1) / Tile::kBN;
  const int tiles = tile_count(g.m, g.n, g.k, Tile::kBM, Tile::kBN, g.k_per_split);
  const int first_tile = int(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
  const int tile_step = int(gridDim.x * gridDim.y * gridDim.z);
  // Clusters and a persistent grid wait bounded (a protocol bug traps instead of hanging the
  // process: see ptx_sm90.cuh); a block per tile, unclustered, keeps the plain wait.
  const bool bounded = kCl > 1 || tile_step < tiles;
  const auto wait_stage = [bounded](uint64_t* bar, uint32_t parity) {
    if (bounded)
      ptx::mbarrier_wait_bounded(bar, parity);
    else
      ptx::mbarrier_wait(bar, parity);
  };
  const int wg = int(threadIdx.x) / kWarpgroupThreads;
  const uint32_t rank = kCl > 1 ? ptx::cluster_ctarank() : 0;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      ptx::mbarrier_init(&full[s], 1);  // the producer's arrive (+ bytes)
      // Each consumer warp's release, of every block of the cluster: a stage is refilled only
      // once the blocks its multicast writes into have all done with it.
      ptx::mbarrier_init(&empty[s], Tile::kConsumerWarps * kCl);
    }
    ptx::fence_mbarrier_init();
    ptx::fence_proxy_async_shared();  // the initialised barriers, seen by TMA too
  }
  // The last block-wide barrier: the warpgroups go their own ways below. In a cluster, also no
  // block arrives on or multicasts into another before that one's barriers are initialised.
  if constexpr (kCl > 1)
    ptx::cluster_sync();
  else
    __syncthreads();

  // The boxes of B's stage at (n0, k0) that this block loads: fn(c0, c1, offset in the stage) for
  // each; in a cluster its part (TmaStage::part_box: the cluster's map has the part's box), which
  // it multicasts.
  const auto b_boxes = [&](int n0, int k0, const auto& fn) {
#pragma unroll
    for (int i = 0; i < StageB::template part_boxes<ContigB, kCl>(); ++i) {
      int c0 = 0, c1 = 0;
      uint32_t offset = 0;
      StageB::template part_box<ContigB, kCl>(int(rank), i, n0, k0, c0, c1, offset);
      fn(c0, c1, offset);
    }
  };

  if (wg == 0) {
    if constexpr (Tile::kProducerRegs > 0) ptx::setmaxnreg_dec<Tile::kProducerRegs>();  // the whole warpgroup
    if (threadIdx.x != 0) return;
    int it = 0;  // the ring's position: K steps loaded so far, over the block's tiles
    for (int t = first_tile; t < tiles; t += tile_step) {
      const TileWork w = tma_tile_work<Tile>(t, tiles_m, tiles_n, g);
      for (int step = 0; step < w.k_steps; ++step, ++it) {
        const int s = it % kS;
        // Round 0 finds every stage free. In a cluster the releases come from both blocks.
        wait_stage(&empty[s], ((it / kS) & 1) ^ 1);
        // The whole stage lands here: this block's part of B and the other blocks' parts.
        ptx::mbarrier_arrive_expect_tx(&full[s], StageA::kBytes + StageB::kBytes);
        const int k0 = w.k_begin + step * kBK;
        source_a.template load<Tile::kBM>(&map_a, a_smem + s * Tile::kAStage, &full[s], w.m0, k0);
        unsigned char* const b_stage = reinterpret_cast<unsigned char*>(b_smem + s * Tile::kBStage);
        b_boxes(w.n0, k0, [&](int c0, int c1, uint32_t offset) {
          if constexpr (kCl > 1)
            ptx::tma_load_2d_multicast(b_stage + offset, &map_b, &full[s], c0, c1, uint16_t((1u << kCl) - 1));
          else
            ptx::tma_load_2d(b_stage + offset, &map_b, &full[s], c0, c1);
        });
        // The step this slot takes next, asked of L2 now: its loads, issued once the consumers free
        // the slot (about kS - 2 steps on), then find it there instead of in DRAM.
        if (kL2Prefetch && g.l2_prefetch && step + kS < w.k_steps) {
          const int k_next = k0 + kS * kBK;
          source_a.template prefetch<Tile::kBM>(&map_a, w.m0, k_next);
          b_boxes(w.n0, k_next, [&](int c0, int c1, uint32_t) { ptx::tma_prefetch_2d(&map_b, c0, c1); });
        }
      }
    }
    if constexpr (kCl > 1) {
      // Stay until every block of the cluster has released every stage: their last arrivals on
      // this block's barriers have landed, and so have this block's multicasts into theirs.
      for (int i = it; i < it + kS; ++i) ptx::mbarrier_wait_bounded(&empty[i % kS], ((i / kS) & 1) ^ 1);
    }
    return;
  }
  // A consumer warp's release of stage s, on every block of the cluster.
  const auto release = [&](int s) {
    ptx::mbarrier_arrive(&empty[s]);
    if constexpr (kCl > 1) {
#pragma unroll
      for (int r = 1; r < kCl; ++r) ptx::mbarrier_arrive_cluster(&empty[s], (rank + uint32_t(r)) % uint32_t(kCl));
    }
  };

  if constexpr (Tile::kConsumerRegs > 0) ptx::setmaxnreg_inc<Tile::kConsumerRegs>();
  const int cw = wg - 1;  // the consumer warpgroup: rows 64 cw .. 64 cw + 63 of the tile
  constexpr int kTransA = ContigA ? 0 : 1, kTransB = ContigB ? 0 : 1;
  float acc[Tile::kAcc];
  int it = 0;  // the ring's position, as the producer's
  for (int t = first_tile; t < tiles; t += tile_step) {
    const TileWork w = tma_tile_work<Tile>(t, tiles_m, tiles_n, g);
#pragma unroll
    for (int i = 0; i < Tile::kAcc; ++i) acc[i] = 0.f;

    for (int step = 0; step < w.k_steps; ++step, ++it) {
      const int s = it % kS;
      wait_stage(&full[s], (it / kS) & 1);
      const uint32_t as = ptx::smem_u32(a_smem + s * Tile::kAStage) + LayoutA::x_offset(cw * kWarpgroupRows);
      const uint32_t bs = ptx::smem_u32(b_smem + s * Tile::kBStage);
      ptx::fence_accumulators(acc);
      ptx::wgmma_fence();
#pragma unroll
      for (int j = 0; j < kBK / 16; ++j) {
        const uint64_t da = smem_desc_sw128(as + LayoutA::template k16_offset<ContigA>(j),
                                            LayoutA::template lbo<ContigA>(), LayoutA::kSbo);
        const uint64_t db = smem_desc_sw128(bs + LayoutB::template k16_offset<ContigB>(j),
                                            LayoutB::template lbo<ContigB>(), LayoutB::kSbo);
        wgmma_k16<Tile::kBN, kTransA, kTransB>(acc, da, db);
      }
      ptx::wgmma_commit();
      ptx::wgmma_wait<1>();  // step - 1's multiplies are done: its stage may be refilled
      ptx::fence_accumulators(acc);
      // wait_group is warp-wide: once lane 0 is past it, the whole warp's reads of step - 1 are done.
      if (step > 0 && threadIdx.x % kWarpSize == 0) release((it - 1) % kS);
    }
    ptx::wgmma_wait<0>();
    ptx::fence_accumulators(acc);
    store_accumulators<Tile::kBN>(acc, w.m0 + cw * kWarpgroupRows, w.n0, g, ep, partials, w.z);
    // The tile's last stage, for the block's next tile (and in a cluster for the producers' tail,
    // above). After the epilogue, which reads no shared memory: released between the last wait and
    // the epilogue, ptxas serialises the main loop's wgmma (C7515).
    if (threadIdx.x % kWarpSize == 0) release((it - 1) % kS);
  }
#else
  // Not built for sm_90a: the host never launches this (wgmma_available() is false).
  __trap();
#endif
}

}  // namespace sp::kernels::cuda::detail::wgmma
