// The halo kernel of stride-1 "same" convolutions on Hopper (sm_90a): the wgmma_tma kernel's
// multiply and B stages (wgmma_tma_mainloop.cuh), with A read from a patch of the source that
// one TMA box per 64 channels loads once per tile, every tap's rows a descriptor into it
// (conv_halo.h says why and how, and tests/test_conv_halo.cpp checks the addressing on the CPU).
//
// Block: a 128-position tile (HaloConvSource) x Tile::kBN output columns, three warpgroups:
//   warpgroup 0   producer: one thread issues the tile's patch boxes (one per chunk of 64
//                 channels, each completing on its own "patch" mbarrier), then runs ahead
//                 through the ring of B stages as the wgmma_tma producer does: per K step
//                 (tap-major, 64 channels) it waits until the stage is free ("empty"),
//                 announces its bytes on "full" and issues the filter's box.
//   warpgroups 1, 2  consumers: positions 64 (w - 1) .. + 63 of the tile, all kBN columns. Per
//                 K step: wait for the step's chunk of the patch (its first tap only) and for
//                 the B stage, 4 wgmma.m64n{kBN}k16 with A at the tap's patch rows, commit, wait
//                 until only this step's group is pending, release the previous step's stage.
//                 Then the epilogue, each row stored at its output position (conv_halo.h,
//                 out_row) and the junk positions dropped.
// One tile per block and no split of K (the host takes this kernel only where the TMA
// convolution would not split either): each output's sum runs over the same K steps, the same
// wgmma on the same operands, as on the TMA convolution, so the two give the same bits. The
// waits are bounded (ptx_sm90.cuh) until the kernel has run on a GPU: a protocol bug traps
// instead of hanging the process.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "kernels/cuda/conv_halo.h"
#include "kernels/cuda/mma_mainloop.cuh"
#include "kernels/cuda/ptx_sm90.cuh"
#include "kernels/cuda/wgmma_layout.h"
#include "kernels/cuda/wgmma_mainloop.cuh"

namespace sp::kernels::cuda::detail::wgmma {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The dynamic shared memory from its first 1024-byte boundary (the 128-byte swizzle's atom, which
// TMA's writes and wgmma's reads take from the address): the kernels' sizes include the slack.
__device__ __forceinline__ unsigned char* atom_aligned_smem() {
  unsigned char* const raw = ptx::dynamic_smem();
  const uint32_t misalign = ptx::smem_u32(raw) % kAtomBytes;
  return raw + (misalign ? kAtomBytes - misalign : 0);
}
#endif

// A warpgroup's 64 x BN accumulators for the tile's rows row_base .. + 63 (store_accumulators'
// fragment layout: acc[4i + 2h + e] at row 16 warp + lane / 4 + 8h, column 8i + 2 (lane % 4) + e),
// each row stored at its output position (HaloConvSource::out_row), junk rows dropped.
template <int BN, typename T>
__device__ __forceinline__ void store_halo_rows(const float (&acc)[BN / 2], const HaloConvSource& src, int img, int o0,
                                                int row_base, int n0, const MmaGeometry& g, const MmaEpilogue<T>& ep,
                                                bool paired) {
  const int lane = int(threadIdx.x) % kWarpSize, warp = int(threadIdx.x) % kWarpgroupThreads / kWarpSize;
  const int col0 = n0 + lane % 4 * 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t out = src.out_row(img, o0, row_base + warp * 16 + lane / 4 + 8 * h);
    if (out < 0) continue;
    const int64_t row_off = out * ep.row_stride;
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      const int col = col0 + 8 * i;
      if (col >= g.n) continue;
      store_pair(ep, paired, nullptr, 0, g, int(out), row_off, col, acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1]);
    }
  }
}

template <int BN, int Stages, int MinBlocks>
struct WgHaloTileOf {
  static constexpr int kBM = kHaloTileM, kBN = BN, kBK = wgmma::kBK, kStages = Stages;
  static constexpr int kMinBlocks = MinBlocks;
  static constexpr int kCluster = 1;  // b_operand_map's question (mma_launch.cuh)
  static constexpr int kConsumerThreads = 2 * kWarpgroupThreads, kConsumerWarps = kConsumerThreads / kWarpSize;
  static constexpr int kThreads = kWarpgroupThreads + kConsumerThreads;
  static constexpr int kBStage = kBN * kBK;  // elements
  static constexpr int kAcc = kBN / 2;
  // The B stages and their 2 x kStages mbarriers, room for kMaxChunks patch mbarriers, and the
  // slack to round the start up to 1024 bytes; the patches come first, patch_bytes * chunks more.
  static constexpr int kMaxChunks = kHaloMaxChunks;
  static constexpr int kFixedSmemBytes = kStages * kBStage * 2 + (2 * kStages + kMaxChunks) * 8 + kAtomBytes;
  // What the patches may take: what an SM's 228 KiB leave each of kMinBlocks blocks, after the
  // 1 KiB the system reserves per block and the fixed part.
  static constexpr int kMaxPatchBytes = 228 * 1024 / kMinBlocks - 1024 - kFixedSmemBytes;
  static_assert(kBStage * 2 % kAtomBytes == 0, "B stages stay 1024-byte aligned");
  static_assert(kMaxPatchBytes > 0, "room for a patch");
};
// 128 x 64 (ResNet-18's 64-channel layers), two blocks per SM: with the 32 px layers' 30 KiB
// patch, 63 KiB of shared memory a block.
using WgHaloTile = WgHaloTileOf<64, 4, 2>;

// Tile::kThreads threads; dynamic shared memory: src.patch_bytes * src.chunks +
// Tile::kFixedSmemBytes. map_a: the patch box (HaloConvPlan::map); map_b: B's stages
// (TmaStage<kBN>, K-contiguous). grid = (n * tiles_per_image, N tiles).
template <class Tile, typename T>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
    wgmma_halo_conv_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                           const __grid_constant__ HaloConvSource src, MmaGeometry g, MmaEpilogue<T> ep,
                           int desc_phase) {
  pdl_prologue();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using LayoutB = SwizzledLayout<Tile::kBN>;
  using StageB = TmaStage<Tile::kBN>;
  constexpr int kS = Tile::kStages;

  unsigned char* const patches = atom_aligned_smem();
  uint16_t* const b_smem = reinterpret_cast<uint16_t*>(patches + size_t(src.patch_bytes) * size_t(src.chunks));
  uint64_t* const full = reinterpret_cast<uint64_t*>(b_smem + kS * Tile::kBStage);
  uint64_t* const empty = full + kS;
  uint64_t* const patch_full = empty + kS;

  int img = 0, o0 = 0;
  src.tile(int(blockIdx.x), img, o0);
  const int n0 = int(blockIdx.y) * Tile::kBN;
  const int taps = src.s * src.s, k_steps = taps * src.chunks;
  const int wg = int(threadIdx.x) / kWarpgroupThreads;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      ptx::mbarrier_init(&full[s], 1);
      ptx::mbarrier_init(&empty[s], Tile::kConsumerWarps);
    }
    for (int cc = 0; cc < src.chunks; ++cc) ptx::mbarrier_init(&patch_full[cc], 1);
    ptx::fence_mbarrier_init();
    ptx::fence_proxy_async_shared();
  }
  __syncthreads();

  if (wg == 0) {
    if (threadIdx.x != 0) return;
    for (int cc = 0; cc < src.chunks; ++cc) {
      int co[4];
      src.box_coords(img, o0, cc, co);
      ptx::mbarrier_arrive_expect_tx(&patch_full[cc], src.box_bytes());
      ptx::tma_load_4d(patches + size_t(cc) * src.patch_bytes, &map_a, &patch_full[cc], co[0], co[1], co[2], co[3]);
    }
    for (int step = 0; step < k_steps; ++step) {
      const int s = step % kS;
      ptx::mbarrier_wait_bounded(&empty[s], ((step / kS) & 1) ^ 1);
      ptx::mbarrier_arrive_expect_tx(&full[s], StageB::kBytes);
      int c0 = 0, c1 = 0;
      StageB::template box_coords<true>(0, n0, step * kBK, c0, c1);
      ptx::tma_load_2d(b_smem + s * Tile::kBStage, &map_b, &full[s], c0, c1);
    }
    return;
  }

  const int cw = wg - 1;  // the consumer warpgroup: positions 64 cw .. 64 cw + 63 of the tile
  const uint32_t patch_base = ptx::smem_u32(patches);
  const int patch_row0 = o0 % src.wp + cw * kWarpgroupRows;  // the warpgroup's first patch row at tap shift 0
  HaloStepWalk walk = HaloStepWalk::start(src);
  float acc[Tile::kAcc];
#pragma unroll
  for (int i = 0; i < Tile::kAcc; ++i) acc[i] = 0.f;
  for (int step = 0; step < k_steps; ++step, walk.next(src)) {
    const int s = step % kS;
    if (step < src.chunks) ptx::mbarrier_wait_bounded(&patch_full[walk.cc], 0);  // the chunk's first tap
    ptx::mbarrier_wait_bounded(&full[s], (step / kS) & 1);
    const uint32_t as = patch_base + walk.offset(src, patch_row0);
    const uint32_t bs = ptx::smem_u32(b_smem + s * Tile::kBStage);
    // The descriptor's base offset: 0 (the swizzle taken from the address itself), or where
    // halo_desc_phase() asks, the start's row within its 1024-byte pattern.
    const uint64_t phase = desc_phase ? uint64_t((as >> 7) & 7u) << 49 : 0;
    ptx::fence_accumulators(acc);
    ptx::wgmma_fence();
#pragma unroll
    for (int j = 0; j < kBK / 16; ++j) {
      const uint64_t da = smem_desc_sw128(as + uint32_t(j) * 32, 16, kAtomBytes) | phase;
      const uint64_t db =
          smem_desc_sw128(bs + LayoutB::template k16_offset<true>(j), LayoutB::template lbo<true>(), LayoutB::kSbo);
      wgmma_k16<Tile::kBN, 0, 0>(acc, da, db);
    }
    ptx::wgmma_commit();
    ptx::wgmma_wait<1>();
    ptx::fence_accumulators(acc);
    if (step > 0 && threadIdx.x % kWarpSize == 0) ptx::mbarrier_arrive(&empty[(step - 1) % kS]);
  }
  ptx::wgmma_wait<0>();
  ptx::fence_accumulators(acc);

  store_halo_rows<Tile::kBN>(acc, src, img, o0, cw * kWarpgroupRows, n0, g, ep, ep.pairs_aligned());
#else
  (void)desc_phase;
  __trap();
#endif
}

// ---- The resident form (halo_resident(), tensor_core.h) ---------------------------------------
// With the streaming kernel above a tile's L2 traffic is 30 KiB of patch but 72 KiB of filter (9
// B stages of 8 KiB for a 64 -> 64 3x3 layer): B now dominates. Here a persistent block (one per
// SM: as many as the SMs hold, each taking tiles b, b + gridDim.x, ...) loads the filter's whole
// B operand for its column tile once, keeps it in shared memory, and streams only the patches.
// Per tile only the patch crosses L2.
// Its two consumer warpgroups take the block's tiles in turn (ping-pong), each a whole tile of
// 128 rows (two m64 halves per K slice), and in order: tile i's main loop starts once tile i - 1's
// is done (math_done), so that one's epilogue overlaps the other's multiplies. With one block per
// SM nothing else would keep the tensor cores busy while a tile is stored, and without the order
// the two would run in step and store together.
// Each warpgroup has two patch slots, so the producer loads its next tile while it computes one.
// Each tile runs the same K steps and wgmma (per 64-row half) on the same operands as on the
// streaming kernel: the same bits.
//   producer   one thread: every B stage of the column tile (each on its b_full barrier), then
//              the block's tiles i = 0, 1, ... in order, tile i in slot 2 (i % 2) + (i / 2) % 2
//              (warpgroup i % 2's two slots in turn): waits until the slot is free (patch_empty,
//              round i / 4), announces and issues its chunks' boxes (patch_full).
//   consumer   warpgroup w takes the block's tiles i = w, w + 2, ...: waits for tile i - 1's main
//   w = 0, 1   loop (the other warpgroup's) and its slot (and, on its first tile, for each B stage
//              as its step comes), runs the K steps, signals math_done[w], stores the tile, then
//              releases the slot (after the epilogue: released before it, ptxas serialises the
//              wgmma, C7515).
struct WgHaloResidentTile {
  static constexpr int kBM = kHaloTileM, kBN = 64, kBK = wgmma::kBK;
  static constexpr int kMinBlocks = 1;
  static constexpr int kCluster = 1;
  static constexpr int kConsumerThreads = 2 * kWarpgroupThreads;
  static constexpr int kWarpgroupWarps = kWarpgroupThreads / kWarpSize;  // a slot's releases
  static constexpr int kThreads = kWarpgroupThreads + kConsumerThreads;
  static constexpr int kBStage = kBN * kBK;  // elements of one K step's B
  static constexpr int kAcc = kBN / 2;       // per 64-row half
  static constexpr int kSlots = kHaloResidentSlots;  // two per consumer warpgroup
  static_assert(kSlots == 4, "two patch slots per consumer warpgroup");
  // A plan's shared memory, and whether it fits one block (conv_halo.h): 3x3 filters of one chunk
  // (64 source channels: 72 KiB of B and four 31 KiB patch slots at 32 px), not 5x5 or 128.
  SP_WGMMA_HD static constexpr int64_t smem_bytes(const HaloConvSource& src) {
    return halo_resident_smem_bytes(src, kBN);
  }
  SP_WGMMA_HD static constexpr bool fits(const HaloConvSource& src) { return halo_resident_fits(src, kBN); }
  static_assert(kBStage * 2 % kAtomBytes == 0, "B stages stay 1024-byte aligned");
};

// Tile::kThreads threads; dynamic shared memory Tile::smem_bytes(src). map_a: the patch box;
// map_b: B's stages (TmaStage<kBN>, K-contiguous). grid = (blocks, N tiles), blocks at most the
// M tiles (n * tiles_per_image).
template <class Tile, typename T>
__global__ void __launch_bounds__(Tile::kThreads, 1)
    wgmma_halo_resident_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                               const __grid_constant__ HaloConvSource src, MmaGeometry g, MmaEpilogue<T> ep, int tiles,
                               int desc_phase) {
  pdl_prologue();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using LayoutB = SwizzledLayout<Tile::kBN>;
  using StageB = TmaStage<Tile::kBN>;
  constexpr int kSlots = Tile::kSlots;

  const int k_steps = src.s * src.s * src.chunks;
  uint16_t* const b_smem = reinterpret_cast<uint16_t*>(atom_aligned_smem());
  unsigned char* const patches = reinterpret_cast<unsigned char*>(b_smem + size_t(k_steps) * Tile::kBStage);
  const size_t slot_bytes = size_t(src.patch_bytes) * size_t(src.chunks);
  uint64_t* const b_full = reinterpret_cast<uint64_t*>(patches + kSlots * slot_bytes);  // one per B stage
  uint64_t* const patch_full = b_full + k_steps;
  uint64_t* const patch_empty = patch_full + kSlots;
  uint64_t* const math_done = patch_empty + kSlots;  // per consumer warpgroup: a main loop done

  const int n0 = int(blockIdx.y) * Tile::kBN;
  const int first = int(blockIdx.x), stride = int(gridDim.x);
  const int wg = int(threadIdx.x) / kWarpgroupThreads;

  if (threadIdx.x == 0) {
    for (int step = 0; step < k_steps; ++step) ptx::mbarrier_init(&b_full[step], 1);
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      ptx::mbarrier_init(&patch_full[i], 1);
      ptx::mbarrier_init(&patch_empty[i], Tile::kWarpgroupWarps);
    }
    ptx::mbarrier_init(&math_done[0], Tile::kWarpgroupWarps);
    ptx::mbarrier_init(&math_done[1], Tile::kWarpgroupWarps);
    ptx::fence_mbarrier_init();
    ptx::fence_proxy_async_shared();
  }
  __syncthreads();

  if (wg == 0) {
    if (threadIdx.x != 0) return;
    // B stage by stage, each on its own barrier: the first tiles' K steps start as their stages
    // land rather than after the whole filter.
    for (int step = 0; step < k_steps; ++step) {
      int c0 = 0, c1 = 0;
      StageB::template box_coords<true>(0, n0, step * kBK, c0, c1);
      ptx::mbarrier_arrive_expect_tx(&b_full[step], StageB::kBytes);
      ptx::tma_load_2d(b_smem + size_t(step) * Tile::kBStage, &map_b, &b_full[step], c0, c1);
    }
    int i = 0;  // the block's tiles so far
    for (int t = first; t < tiles; t += stride, ++i) {
      const int slot = halo_resident_slot(i);
      ptx::mbarrier_wait_bounded(&patch_empty[slot], ((i / 4) & 1) ^ 1);
      int img = 0, o0 = 0;
      src.tile(t, img, o0);
      ptx::mbarrier_arrive_expect_tx(&patch_full[slot], src.box_bytes() * uint32_t(src.chunks));
      for (int cc = 0; cc < src.chunks; ++cc) {
        int co[4];
        src.box_coords(img, o0, cc, co);
        ptx::tma_load_4d(patches + slot * slot_bytes + size_t(cc) * src.patch_bytes, &map_a, &patch_full[slot], co[0],
                         co[1], co[2], co[3]);
      }
    }
    return;
  }

  const int w = wg - 1;  // this consumer warpgroup takes the block's tiles i = w, w + 2, ...
  const uint32_t b_base = ptx::smem_u32(b_smem);
  const int lane = int(threadIdx.x) % kWarpSize;
  const bool paired = ep.pairs_aligned();
  for (int k = 0;; ++k) {
    const int i = 2 * k + w;
    const int64_t t64 = int64_t(first) + int64_t(i) * stride;
    if (t64 >= tiles) break;
    const int t = int(t64), slot = halo_resident_slot(i);
    int img = 0, o0 = 0;
    src.tile(t, img, o0);
    // The ping-pong's order: tile i's main loop starts once tile i - 1's (the other warpgroup's,
    // its (k + w - 1)-th) is done, so that the two warpgroups take the tensor cores in turn and
    // each one's epilogue overlaps the other's main loop. The other cannot be two main loops
    // ahead: its next waits for this one's.
    if (i > 0) ptx::mbarrier_wait_bounded(&math_done[1 - w], (k + w - 1) & 1);
    ptx::mbarrier_wait_bounded(&patch_full[slot], (i / 4) & 1);
    const uint32_t patch_base = ptx::smem_u32(patches + slot * slot_bytes);
    const int row0 = o0 % src.wp;  // the tile's first patch row at tap shift 0
    HaloStepWalk walk = HaloStepWalk::start(src);
    float acc0[Tile::kAcc], acc1[Tile::kAcc];  // rows 0-63 and 64-127 of the tile
#pragma unroll
    for (int e = 0; e < Tile::kAcc; ++e) acc0[e] = acc1[e] = 0.f;
    for (int step = 0; step < k_steps; ++step, walk.next(src)) {
      if (k == 0) ptx::mbarrier_wait_bounded(&b_full[step], 0);  // the first tile: B landing
      const uint32_t as0 = patch_base + walk.offset(src, row0);
      const uint32_t as1 = as0 + uint32_t(kWarpgroupRows) * kBK * 2;
      const uint32_t bs = b_base + uint32_t(step) * Tile::kBStage * 2;
      // (as1 is 8 KiB past as0: the same row phase.)
      const uint64_t phase = desc_phase ? uint64_t((as0 >> 7) & 7u) << 49 : 0;
      ptx::fence_accumulators(acc0);
      ptx::fence_accumulators(acc1);
      ptx::wgmma_fence();
#pragma unroll
      for (int q = 0; q < kBK / 16; ++q) {
        const uint64_t db =
            smem_desc_sw128(bs + LayoutB::template k16_offset<true>(q), LayoutB::template lbo<true>(), LayoutB::kSbo);
        wgmma_k16<Tile::kBN, 0, 0>(acc0, smem_desc_sw128(as0 + uint32_t(q) * 32, 16, kAtomBytes) | phase, db);
        wgmma_k16<Tile::kBN, 0, 0>(acc1, smem_desc_sw128(as1 + uint32_t(q) * 32, 16, kAtomBytes) | phase, db);
      }
      ptx::wgmma_commit();
      ptx::wgmma_wait<1>();
      ptx::fence_accumulators(acc0);
      ptx::fence_accumulators(acc1);
    }
    ptx::wgmma_wait<0>();
    ptx::fence_accumulators(acc0);
    ptx::fence_accumulators(acc1);
    if (lane == 0) ptx::mbarrier_arrive(&math_done[w]);  // the other warpgroup's next main loop may go
    store_halo_rows<Tile::kBN>(acc0, src, img, o0, 0, n0, g, ep, paired);
    store_halo_rows<Tile::kBN>(acc1, src, img, o0, kWarpgroupRows, n0, g, ep, paired);
    // The slot's patch is read (wait<0> above): free it for this warpgroup's next tile but one
    // (the block's tile i + 4).
    if (lane == 0) ptx::mbarrier_arrive(&patch_empty[slot]);
  }
#else
  (void)tiles;
  (void)desc_phase;
  __trap();
#endif
}

}  // namespace sp::kernels::cuda::detail::wgmma
