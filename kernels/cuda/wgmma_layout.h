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

// ---- TMA (the wgmma_tma main loop, wgmma_tma_mainloop.cuh) --------------------------------
// A plain bf16 matrix operand as a 2-D tensor map, dimension 0 the contiguous one, and the
// boxes that fill one stage of SwizzledLayout<kX> with CU_TENSOR_MAP_SWIZZLE_128B. TMA writes a
// box densely, dimension 0 fastest, into a 1024-byte-aligned destination and swizzles like
// wgmma: byte address bits 4-6 ^= bits 7-9. So:
//   K-contiguous operand  one box {64 (k), kX (x)}: row x at x * 128 B, chunk k / 8 at
//                         (k / 8) ^ (x % 8), the K-major layout;
//   X-contiguous operand  kX / 64 boxes {64 (x), 64 (k)}, box j at j * 8 KiB: row k at k * 128 B,
//                         chunk (x % 64) / 8 at that ^ (k % 8), the MN-major layout.
// Elements outside the matrix arrive as zeros, so the M, N and K tails need no code.
struct TmaMapShape {
  uint64_t dim[2];       // elements, dimension 0 contiguous
  uint64_t stride_bytes;  // between consecutive indices of dimension 1
  uint32_t box[2];
};

template <int kX>
struct TmaStage {
  static_assert(kX % 64 == 0 && kX <= 256, "whole 64-wide boxes, at most 256 rows per box");
  static constexpr uint32_t kBytes = uint32_t(kX) * kBK * 2;  // one stage of the operand
  // The map of an operand with x_extent x k_extent elements, ld elements between consecutive
  // rows (x for K-contiguous, k for X-contiguous).
  template <bool ContigK>
  static constexpr TmaMapShape map_shape(int64_t x_extent, int64_t k_extent, int64_t ld) {
    if (ContigK) return {{uint64_t(k_extent), uint64_t(x_extent)}, uint64_t(ld) * 2, {uint32_t(kBK), uint32_t(kX)}};
    return {{uint64_t(x_extent), uint64_t(k_extent)}, uint64_t(ld) * 2, {64u, uint32_t(kBK)}};
  }
  template <bool ContigK>
  SP_WGMMA_HD static constexpr int boxes() {
    return ContigK ? 1 : kX / 64;
  }
  // Box j of the stage at (x0, k0): its coordinates (dimension 0, 1) and its byte offset in
  // the stage.
  template <bool ContigK>
  SP_WGMMA_HD static constexpr void box_coords(int j, int x0, int k0, int& c0, int& c1) {
    c0 = ContigK ? k0 : x0 + 64 * j;
    c1 = ContigK ? x0 : k0;
  }
  template <bool ContigK>
  SP_WGMMA_HD static constexpr uint32_t box_offset(int j) {
    return ContigK ? 0u : uint32_t(j) * 64 * kBK * 2;
  }

  // The stage cut into kParts parts, one per block of a cluster that shares the operand (the
  // B operand of two blocks along M): block r loads part r and multicasts it to the others, and
  // the parts together write what the whole stage's boxes write. K-contiguous: kParts boxes of
  // kX / kParts rows each (the map's box is that many rows: part_map_shape), part r at row
  // r * kX / kParts; X-contiguous: the stage's kX / 64 boxes dealt round robin, box j to part
  // j % kParts. Part offsets stay multiples of the 1024-byte swizzle atom, so TMA swizzles each
  // part as it would the whole box.
  template <bool ContigK, int kParts>
  static constexpr TmaMapShape part_map_shape(int64_t x_extent, int64_t k_extent, int64_t ld) {
    static_assert(ContigK ? kX % (8 * kParts) == 0 : (kX / 64) % kParts == 0, "whole parts of swizzle atoms");
    TmaMapShape m = map_shape<ContigK>(x_extent, k_extent, ld);
    if (ContigK) m.box[1] = uint32_t(kX / kParts);
    return m;
  }
  template <bool ContigK, int kParts>
  SP_WGMMA_HD static constexpr int part_boxes() {
    return ContigK ? 1 : kX / 64 / kParts;
  }
  // Box i of part `part` at (x0, k0): its coordinates and byte offset in the stage.
  template <bool ContigK, int kParts>
  SP_WGMMA_HD static constexpr void part_box(int part, int i, int x0, int k0, int& c0, int& c1, uint32_t& offset) {
    if (ContigK) {
      c0 = k0;
      c1 = x0 + part * (kX / kParts);
      offset = uint32_t(part) * uint32_t(kX / kParts) * kBK * 2;
    } else {
      const int j = i * kParts + part;
      box_coords<false>(j, x0, k0, c0, c1);
      offset = box_offset<false>(j);
    }
  }
};

}  // namespace sp::kernels::cuda::detail::wgmma
