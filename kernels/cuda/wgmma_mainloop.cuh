// The Hopper (sm_90a) main loop of the bf16 GEMM and convolutions: the same contract, loaders,
// epilogue and split K as the mma.sync main loop (mma_mainloop.cuh), with the multiply done by
// warpgroup-wide wgmma.mma_async straight from shared memory instead of ldmatrix + mma.sync.
//
//   C[i, j] = epilogue( sum_k  A(i, k) * B(k, j) ),   bf16 in, fp32 accumulate
//
// Hierarchy:
//   block tile  128 x kBN (WgTile), two warpgroups (256 threads), marching along K in steps of
//               kBK = 64 (one 128-byte row of bf16) through a ring of kStages shared-memory
//               stages;
//   warpgroup   rows 64 wg .. 64 wg + 63 of the block tile, all kBN columns: one
//               wgmma.m64n{kBN}k16 per 16 of K (4 per step), kBN / 2 fp32 accumulators per
//               thread.
// Loads: every thread copies its share of the next stages with cp.async (or the register-staged
// gather of StageFill for unaligned operands and C = 3), so any loader of mma_mainloop.cuh (the
// strided matrices and the implicit-GEMM gathers alike) feeds it unchanged; only the shared-
// memory layout differs: the 128-byte swizzle wgmma reads (wgmma_layout.h), in which a 16-byte
// chunk still lands whole:
//   K-contiguous operand  K-major: row x is 128 B, chunk k / 8 stored at (k / 8) ^ (x % 8);
//   X-contiguous operand  MN-major: per 64 x-columns an atom of kBK rows of 128 B, chunk
//                         (x % 64) / 8 of row k stored at that ^ (k % 8).
// Both layouts put a warpgroup's 64 rows 8 KiB apart, and need no padding: the swizzle keeps
// wgmma's reads and the 16-byte stores free of bank conflicts.
//
// Pipeline, one barrier per K step (S = kStages, two steps in flight ahead of the one in use):
//   wait for this thread's copies of step s; fence.proxy.async (they were written through the
//   generic proxy, wgmma reads through the async proxy); __syncthreads;
//   issue the copies of step s + S - 2 into the stage of step s - 2;
//   wgmma.fence; 4 wgmma on step s's stage; commit; wait until at most one group is pending,
//   i.e. step s - 1's multiplies are done.
// The stage refilled at step s is free: every warpgroup waited for step s - 2's group (at step
// s - 1) before arriving at step s's barrier. The multiplies of step s overlap the barrier and
// copies of step s + 1.
//
// Measured with cuobjdump (CUDA 13.0, sm_90a, -O3): the main loop is HGMMA.64x128x16.F32.BF16
// (or 64x64x16) on gdesc operands (.tnspA/.tnspB for MN-major ones), WARPGROUP.ARRIVE,
// WARPGROUP.DEPBAR.LE gsb0 0x1, FENCE.VIEW.ASYNC.S and LDGSTS.E.BYPASS.128.ZFILL; registers:
// 128 x 128 tiles 168-191, 128 x 64 tiles 118-128 (capped for two blocks per SM), no stack in
// any instance.
// The CPU tests check its shared-memory layout and descriptors against the canonical layouts
// (tests/test_wgmma_layout.cpp); the GPU tests run every tensor-core test on each main loop
// (tests/test_cuda_tensor_core.cpp), and passed on an H200 (bench/results/nvidia-h200/
// 2026-11-26-mainloops.md).
//
// Built only for sm_90a (compute_90a, the architecture-specific Hopper target: wgmma does not
// exist in the portable sm_90); the host picks this main loop only where it was built and the
// device is compute capability 9.0 (tensor_core.h, MmaMainloop).
#pragma once

#include <cstdint>

#include "kernels/cuda/mma_mainloop.cuh"
#include "kernels/cuda/ptx_sm90.cuh"
#include "kernels/cuda/wgmma_layout.h"

namespace sp::kernels::cuda::detail::wgmma {

using mma::MmaEpilogue;
using mma::MmaGeometry;
using mma::store_pair;

template <int BN, int Stages, int MinBlocks>
struct WgTile {
  static_assert(BN == 64 || BN == 128, "wgmma tiles are 64 or 128 columns wide here");
  static_assert(Stages >= 3, "two steps in flight need a third stage");
  static constexpr int kBM = 128, kBN = BN, kBK = wgmma::kBK, kStages = Stages;
  static constexpr int kMinBlocks = MinBlocks;  // per SM, for __launch_bounds__
  static constexpr int kThreads = 2 * kWarpgroupThreads;
  static constexpr int kAStage = kBM * kBK, kBStage = kBN * kBK;  // elements
  static constexpr int kAcc = kBN / 2;                             // fp32 accumulators per thread
  // The stages, and the slack to round the dynamic shared memory up to a 1024-byte boundary.
  static constexpr int kSmemBytes = kStages * (kAStage + kBStage) * 2 + kAtomBytes;
  static_assert(kAStage * 2 % kAtomBytes == 0 && kBStage * 2 % kAtomBytes == 0, "stages stay 1024-byte aligned");
};

// N > 64: 128 x 128, 4 stages (129 KiB of shared memory, one block per SM), 64 accumulators.
using WgTileWide = WgTile<128, 4, 1>;
// N <= 64: 128 x 64, 4 stages (97 KiB, two blocks per SM), 32 accumulators.
using WgTileNarrow = WgTile<64, 4, 2>;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int BN, int TransA, int TransB>
__device__ __forceinline__ void wgmma_k16(float (&d)[BN / 2], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (BN == 256)
    ptx::wgmma_m64n256k16<TransA, TransB>(d, desc_a, desc_b, 1);
  else if constexpr (BN == 128)
    ptx::wgmma_m64n128k16<TransA, TransB>(d, desc_a, desc_b, 1);
  else
    ptx::wgmma_m64n64k16<TransA, TransB>(d, desc_a, desc_b, 1);
}
#endif

// The epilogue of a warpgroup's 64 x BN accumulators, whose first row is `row_base`:
// acc[4i + 2h + e] = D(16 warp + lane / 4 + 8h, 8i + 2 (lane % 4) + e). Applies ep, or with
// split K stores the fp32 partial of slice z; each row's offset once, then its columns in pairs
// (see MmaEpilogue).
template <int BN, typename T>
__device__ __forceinline__ void store_accumulators(const float (&acc)[BN / 2], int row_base, int n0,
                                                   const MmaGeometry& g, const MmaEpilogue<T>& ep, float* partials,
                                                   int z) {
  const int lane = int(threadIdx.x) % kWarpSize, warp = int(threadIdx.x) % kWarpgroupThreads / kWarpSize;
  const int row0 = row_base + warp * 16 + lane / 4, col0 = n0 + lane % 4 * 2;
  const bool paired = ep.pairs_aligned();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 8 * h;
    if (row >= g.m) continue;
    const int64_t row_off = ep.row_offset(row);
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      const int col = col0 + 8 * i;
      if (col >= g.n) continue;
      store_pair(ep, paired, partials, z, g, row, row_off, col, acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1]);
    }
  }
}

// grid = (M tiles, N tiles, K slices), Tile::kThreads threads, Tile::kSmemBytes of dynamic
// shared memory. partials as in mma::mma_gemm_kernel.
template <class Tile, class LoaderA, class LoaderB, typename T>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
    wgmma_gemm_kernel(LoaderA a, LoaderB b, MmaGeometry g, MmaEpilogue<T> ep, float* partials) {
  pdl_prologue();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using LayoutA = SwizzledLayout<Tile::kBM>;
  using LayoutB = SwizzledLayout<Tile::kBN>;
  constexpr int kS = Tile::kStages, kAhead = kS - 2;

  unsigned char* const raw = ptx::dynamic_smem();
  const uint32_t misalign = ptx::smem_u32(raw) % kAtomBytes;
  uint16_t* const a_smem = reinterpret_cast<uint16_t*>(raw + (misalign ? kAtomBytes - misalign : 0));
  uint16_t* const b_smem = a_smem + kS * Tile::kAStage;

  const int m0 = int(blockIdx.x) * Tile::kBM, n0 = int(blockIdx.y) * Tile::kBN;
  const int k_begin = int(blockIdx.z) * g.k_per_split;
  const int k_end = min(g.k, k_begin + g.k_per_split);
  const int k_steps = (k_end - k_begin + kBK - 1) / kBK;  // >= 1: the host never launches an empty slice
  const int wg = int(threadIdx.x) / kWarpgroupThreads;

  const mma::BlockFill<Tile, LoaderA, LoaderB, LayoutA, LayoutB> stages(a, b, a_smem, b_smem, m0, n0, k_begin);

  float acc[Tile::kAcc];
#pragma unroll
  for (int i = 0; i < Tile::kAcc; ++i) acc[i] = 0.f;

  // Prologue: kAhead steps in flight, one commit group each (possibly empty, so that
  // wait_group means the same at every step).
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < k_steps) stages.fill(s);
    ptx::cp_async_commit();
  }

  constexpr int kTransA = LoaderA::kContigK ? 0 : 1, kTransB = LoaderB::kContigK ? 0 : 1;
  for (int step = 0; step < k_steps; ++step) {
    ptx::cp_async_wait<kAhead - 1>();  // this thread's copies of `step` have landed
    ptx::fence_proxy_async_shared();   // ... and are ordered before the async proxy's reads
    __syncthreads();                   // everyone's; and step - 2's stage is free (see the top)
    if (step + kAhead < k_steps) stages.fill(step + kAhead);
    ptx::cp_async_commit();

    const int s = step % kS;
    const uint32_t as = ptx::smem_u32(a_smem + s * Tile::kAStage) + LayoutA::x_offset(wg * kWarpgroupRows);
    const uint32_t bs = ptx::smem_u32(b_smem + s * Tile::kBStage);
    ptx::fence_accumulators(acc);  // no compiler-made access to acc between here and the wait
    ptx::wgmma_fence();
#pragma unroll
    for (int j = 0; j < kBK / 16; ++j) {
      const uint64_t da =
          smem_desc_sw128(as + LayoutA::template k16_offset<LoaderA::kContigK>(j),
                          LayoutA::template lbo<LoaderA::kContigK>(), LayoutA::kSbo);
      const uint64_t db =
          smem_desc_sw128(bs + LayoutB::template k16_offset<LoaderB::kContigK>(j),
                          LayoutB::template lbo<LoaderB::kContigK>(), LayoutB::kSbo);
      wgmma_k16<Tile::kBN, kTransA, kTransB>(acc, da, db);
    }
    ptx::wgmma_commit();
    ptx::wgmma_wait<1>();
    ptx::fence_accumulators(acc);
  }
  ptx::wgmma_wait<0>();
  ptx::fence_accumulators(acc);  // the epilogue reads the accumulators only after the wait
  ptx::cp_async_wait<0>();       // only empty groups remain; leave none behind

  store_accumulators<Tile::kBN>(acc, m0 + wg * kWarpgroupRows, n0, g, ep, partials, int(blockIdx.z));
#else
  // Not built for sm_90a: the host never launches this (wgmma_available() is false).
  __trap();
#endif
}

}  // namespace sp::kernels::cuda::detail::wgmma
