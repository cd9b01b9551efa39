// The shared-memory side of the wgmma main loop (wgmma_mainloop.cuh) as plain C++, so the CPU
// tests (tests/test_wgmma_layout.cpp) check it against the hardware's canonical layouts
// without a GPU: where the stage fill puts element (x, k), the descriptor strides and offsets
// of each 16-deep K slice, and the descriptor's bit packing.
//
// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format" of the asynchronous
// warpgroup-level matrix instructions), 64 bits:
//   bits  0-13  start address >> 4
//   bits 16-29  leading-dimension byte offset >> 4 (LBO)
//   bits 32-45  stride-dimension byte offset >> 4 (SBO)
//   bits 49-51  base offset (0 here: every swizzle pattern starts 1024-byte aligned)
//   bits 62-63  swizzle mode: 1 = 128-byte swizzle
// With the 128-byte swizzle, the 16-byte chunk j (address bits 4-6) of every 128-byte row is
// stored at chunk j ^ (row % 8) (row = address bits 7-9). The canonical layouts wgmma reads,
// bf16 (CUTLASS's GMMA layout atoms describe the same):
//   K-major   rows of 64 elements (128 B), 8 rows per 1024 B pattern; the patterns of
//             consecutive row groups are SBO apart; LBO unused. A 16-deep K slice is a 32 B
//             column of the rows: its descriptor starts 32 B per slice further.
//   MN-major  64 elements of M or N (128 B) x 8 k rows per 1024 B pattern; patterns along k
//             are SBO apart, along M/N LBO apart. A 16-deep K slice is 16 rows further.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SP_WGMMA_HD __host__ __device__
#else
#define SP_WGMMA_HD
#endif

namespace sp::kernels::cuda::detail::wgmma {

constexpr int kBK = 64;               // K step of a stage: one 128-byte swizzle row of bf16
constexpr int kChunk = 8;             // bf16 per 16-byte chunk
constexpr int kAtomBytes = 1024;      // one swizzle pattern: 8 rows of 128 B
constexpr int kWarpgroupThreads = 128;
constexpr int kWarpgroupRows = 64;    // rows of M per warpgroup (wgmma's m64)

SP_WGMMA_HD constexpr uint64_t smem_desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((smem_addr >> 4) & 0x3FFFu) | (uint64_t((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFFu) << 32) | (uint64_t(1) << 62);
}

// A stage of an operand kX wide (x along M for A, along N for B) and kBK deep, in elements
// from the stage's start (1024-byte aligned, so the pattern the hardware applies to address
// bits 4-9 is the one written here):
//   K-contiguous operand  K-major: row x is 128 B, chunk k / 8 stored at (k / 8) ^ (x % 8);
//   X-contiguous operand  MN-major: per 64 x-columns a block of kBK rows of 128 B, chunk
//                         (x % 64) / 8 of row k stored at that ^ (k % 8).
// offset() is called for chunk starts (k, or x, a multiple of 8); the other 7 elements of the
// chunk follow it.
template <int kX>
struct SwizzledLayout {
  static_assert(kX % 64 == 0, "an MN-major operand is whole 64-column blocks");
  static constexpr int kBK = wgmma::kBK;  // the K step (StageFill reads it)
  template <bool ContigK>
  SP_WGMMA_HD static constexpr int offset(int x, int k) {
    if (ContigK) return x * kBK + ((k / kChunk) ^ (x & 7)) * kChunk;
    return x / 64 * (64 * kBK) + k * 64 + ((x % 64 / kChunk) ^ (k & 7)) * kChunk;
  }
  // Descriptor strides, in bytes: SBO between 8-row groups (along x K-major, along k
  // MN-major); LBO between 64-column blocks MN-major, unused K-major (a 16-deep K slice never
  // crosses a 128-byte row), where it is set to 16 (encoded 1) as is customary.
  static constexpr uint32_t kSbo = kAtomBytes;
  template <bool ContigK>
  SP_WGMMA_HD static constexpr uint32_t lbo() {
    return ContigK ? 16u : uint32_t(64 * kBK * 2);
  }
  // Byte offset of the 16-deep K slice j of a stage.
  template <bool ContigK>
  SP_WGMMA_HD static constexpr uint32_t k16_offset(int j) {
    return ContigK ? uint32_t(j) * 16 * 2 : uint32_t(j) * 16 * 64 * 2;
  }
  // Byte offset of rows x0.. (x0 a multiple of 64): 64 x 128 B in either layout.
  SP_WGMMA_HD static constexpr uint32_t x_offset(int x0) { return uint32_t(x0) * kBK * 2; }
};

}  // namespace sp::kernels::cuda::detail::wgmma
