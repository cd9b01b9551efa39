// The shared-memory layout of the wgmma main loop (kernels/cuda/wgmma_layout.h) against an
// independent model of how wgmma reads shared memory: the canonical 128-byte-swizzled K-major
// and MN-major layouts of the PTX ISA (the same ones CUTLASS's GMMA layout atoms spell out),
// addressed through the descriptor the kernel builds for each warpgroup and 16-deep K slice.
// For every element of every wgmma operand a stage holds, the byte the model says wgmma reads
// must be the byte where the stage fill stored that element. Plain C++: runs without a GPU,
// so a wrong stride, slice offset or swizzle in the kernel's arithmetic fails here in CI.
#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <string>

#include "kernels/cuda/wgmma_layout.h"

namespace {

using namespace sp::kernels::cuda::detail::wgmma;

struct Desc {
  uint32_t start, lbo, sbo;  // bytes
  int swizzle, base_offset;
};

Desc decode(uint64_t d) {
  return {uint32_t(d & 0x3FFF) << 4, uint32_t((d >> 16) & 0x3FFF) << 4, uint32_t((d >> 32) & 0x3FFF) << 4,
          int(d >> 62), int((d >> 49) & 7)};
}

// The 128-byte swizzle on a shared-memory byte address: 16-byte chunk bits 4-6 ^= bits 7-9.
uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

// Where wgmma reads element (x, kk) of an operand (x < 64 for A, < N for B; kk < 16) whose
// descriptor is d, per the canonical layouts in element strides (T = 8 bf16 = 16 bytes):
//   K-major  ((8, m), (T, 2)) : ((8T, SBO), (1, T))
//   MN-major ((T, 8, m), (8, 2)) : ((1, T, LBO), (8T, SBO))
uint32_t wgmma_reads(const Desc& d, bool k_major, int x, int kk) {
  uint32_t u;
  if (k_major)
    u = d.start + uint32_t(x % 8) * 128 + uint32_t(x / 8) * d.sbo + uint32_t(kk / 8) * 16 + uint32_t(kk % 8) * 2;
  else
    u = d.start + uint32_t(x % 8) * 2 + uint32_t(x / 8 % 8) * 16 + uint32_t(x / 64) * d.lbo + uint32_t(kk % 8) * 128 +
        uint32_t(kk / 8) * d.sbo;
  return swizzle128(u);
}

// Where the stage fill stores element (x, k): the chunk's start from the layout, then the
// element's place in its 16-byte chunk.
template <int kX, bool ContigK>
uint32_t fill_stores(uint32_t stage, int x, int k) {
  const int elem = ContigK ? SwizzledLayout<kX>::template offset<true>(x, k - k % 8) + k % 8
                           : SwizzledLayout<kX>::template offset<false>(x - x % 8, k) + x % 8;
  return stage + uint32_t(elem) * 2;
}

// Checks every operand the kernel hands to wgmma from one stage of an operand kX wide: for A
// (operand_rows = 64) one per warpgroup (x0 = 0, 64, ...), for B (operand_rows = kX) one.
template <int kX, bool ContigK>
void check_stage(int operand_rows, const std::string& what) {
  using L = SwizzledLayout<kX>;
  const uint32_t stage = 3 * 32768;  // some 1024-byte aligned stage address
  // The fill is a bijection onto the stage's bytes: no two elements share a byte, none falls out.
  std::set<uint32_t> bytes;
  for (int x = 0; x < kX; ++x)
    for (int k = 0; k < kBK; ++k) {
      const uint32_t b = fill_stores<kX, ContigK>(stage, x, k);
      ASSERT_GE(b, stage) << what;
      ASSERT_LT(b, stage + uint32_t(kX * kBK * 2)) << what;
      ASSERT_TRUE(bytes.insert(b).second) << what << ": two elements stored at byte " << b;
    }
  // The descriptors' row blocks and K slices below tile the stage whole, so every element is read.
  ASSERT_EQ(kX % operand_rows, 0) << what;
  static_assert(kBK % 16 == 0);
  for (int x0 = 0; x0 < kX; x0 += operand_rows)
    for (int j = 0; j < kBK / 16; ++j) {
      const uint64_t raw = smem_desc_sw128(stage + L::x_offset(x0) + L::template k16_offset<ContigK>(j), L::template lbo<ContigK>(),
                                       L::kSbo);
      const Desc d = decode(raw);
      ASSERT_EQ(d.swizzle, 1) << what << ": the descriptor must ask for the 128-byte swizzle";
      ASSERT_EQ(d.base_offset, 0) << what;
      for (int x = 0; x < operand_rows; ++x)
        for (int kk = 0; kk < 16; ++kk) {
          const int gx = x0 + x, gk = 16 * j + kk;
          const uint32_t stored = fill_stores<kX, ContigK>(stage, gx, gk);
          ASSERT_EQ(wgmma_reads(d, ContigK, x, kk), stored)
              << what << ": rows from " << x0 << ", K slice " << j << ", element (x " << gx << ", k " << gk << ")";
        }
    }
}

TEST(WgmmaLayout, DescriptorPacksTheFieldsThePtxIsaNames) {
  const uint64_t d = smem_desc_sw128(0x1A3C0, 8192, 1024);
  EXPECT_EQ(d & 0x3FFF, 0x1A3C0u >> 4) << "start address >> 4 in bits 0-13";
  EXPECT_EQ((d >> 14) & 3, 0u);
  EXPECT_EQ((d >> 16) & 0x3FFF, 8192u >> 4) << "LBO >> 4 in bits 16-29";
  EXPECT_EQ((d >> 32) & 0x3FFF, 1024u >> 4) << "SBO >> 4 in bits 32-45";
  EXPECT_EQ((d >> 46) & 0xFFFF, 0u) << "base offset 0 and the reserved bits clear";
  EXPECT_EQ(d >> 62, 1u) << "swizzle mode 1 (128 B) in bits 62-63";
  // Shared-memory addresses up to 256 KiB fit the 14-bit field.
  EXPECT_EQ(decode(smem_desc_sw128(227 * 1024 - 16, 0, 0)).start, 227u * 1024 - 16);
}

TEST(WgmmaLayout, AOperandsKMajorMatchWhatWgmmaReads) { check_stage<128, true>(kWarpgroupRows, "A K-major"); }
TEST(WgmmaLayout, AOperandsMNMajorMatchWhatWgmmaReads) { check_stage<128, false>(kWarpgroupRows, "A MN-major"); }
TEST(WgmmaLayout, BOperandsKMajorMatchWhatWgmmaReads) {
  check_stage<256, true>(256, "B K-major, N = 256");
  check_stage<128, true>(128, "B K-major, N = 128");
  check_stage<64, true>(64, "B K-major, N = 64");
}
TEST(WgmmaLayout, BOperandsMNMajorMatchWhatWgmmaReads) {
  check_stage<256, false>(256, "B MN-major, N = 256");
  check_stage<128, false>(128, "B MN-major, N = 128");
  check_stage<64, false>(64, "B MN-major, N = 64");
}

TEST(WgmmaLayout, ChunksStayWholeAndBankConflictFree) {
  // A 16-byte chunk lands 16-byte aligned; the 8 chunks of any 8 consecutive rows along the
  // strided dimension (what 8 lanes of a warp store at once) cover all 32 banks.
  for (int x = 0; x < 128; x += 8)
    for (int k = 0; k < kBK; ++k) EXPECT_EQ(SwizzledLayout<128>::offset<false>(x, k) % 8, 0);
  for (int x = 0; x < 128; ++x)
    for (int k = 0; k < kBK; k += 8) EXPECT_EQ(SwizzledLayout<128>::offset<true>(x, k) % 8, 0);
  // Every chunk column: each 8 elements along the contiguous dimension.
  for (int x0 = 0; x0 < 128; x0 += 8)
    for (int k = 0; k < kBK; k += 8) {
      std::set<int> groups;  // 4-bank groups (16 bytes) hit by the same chunk column of 8 rows
      for (int r = 0; r < 8; ++r) groups.insert(SwizzledLayout<128>::offset<true>(x0 + r, k) * 2 / 16 % 8);
      EXPECT_EQ(groups.size(), 8u) << "K-major rows " << x0 << ".., k " << k;
    }
  for (int k0 = 0; k0 < kBK; k0 += 8)
    for (int x = 0; x < 128; x += 8) {
      std::set<int> groups;
      for (int r = 0; r < 8; ++r) groups.insert(SwizzledLayout<128>::offset<false>(x, k0 + r) * 2 / 16 % 8);
      EXPECT_EQ(groups.size(), 8u) << "MN-major k rows " << k0 << ".., x " << x;
    }
}

// What TMA writes for one stage of an operand kX wide (TmaStage): every element of every box,
// placed densely (dimension 0 fastest, rows of 128 bytes) at the box's offset in a
// 1024-byte-aligned stage, then 128-byte swizzled. Each element of the stage must arrive
// exactly once, at the byte the stage fill of the cp.async loop would have stored it (so the
// descriptors checked above read it), and the map must describe the operand's memory.
template <int kX, bool ContigK>
void check_tma_stage(const std::string& what) {
  using S = TmaStage<kX>;
  const int x0 = 3 * kX, k0 = 5 * kBK;  // any tile: coordinates only shift
  std::set<uint32_t> written;
  int elements = 0;
  for (int j = 0; j < S::template boxes<ContigK>(); ++j) {
    int c0 = 0, c1 = 0;
    S::template box_coords<ContigK>(j, x0, k0, c0, c1);
    const TmaMapShape m = S::template map_shape<ContigK>(1 << 20, 1 << 20, 1 << 20);
    for (uint32_t o = 0; o < m.box[1]; ++o)
      for (uint32_t i = 0; i < m.box[0]; ++i) {
        const int d0 = c0 + int(i), d1 = c1 + int(o);  // the element's tensor-map coordinates
        const int x = (ContigK ? d1 : d0) - x0, k = (ContigK ? d0 : d1) - k0;
        ASSERT_TRUE(x >= 0 && x < kX && k >= 0 && k < kBK) << what << ": box " << j << " leaves the stage";
        const uint32_t at = swizzle128(S::template box_offset<ContigK>(j) + o * m.box[0] * 2 + i * 2);
        EXPECT_EQ(at, (fill_stores<kX, ContigK>(0, x, k))) << what << ": element (" << x << ", " << k << ")";
        EXPECT_TRUE(written.insert(at).second) << what << ": byte " << at << " written twice";
        ++elements;
      }
  }
  EXPECT_EQ(elements, kX * kBK) << what;
  EXPECT_EQ(S::kBytes, uint32_t(elements) * 2) << what << ": the expect-tx byte count";
}

TEST(WgmmaLayout, TmaBoxesFillTheStagesTheDescriptorsRead) {
  check_tma_stage<256, true>("256 wide, K-contiguous");
  check_tma_stage<256, false>("256 wide, X-contiguous");
  check_tma_stage<128, true>("128 wide, K-contiguous");
  check_tma_stage<128, false>("128 wide, X-contiguous");
  check_tma_stage<64, true>("64 wide, K-contiguous");
  check_tma_stage<64, false>("64 wide, X-contiguous");
}

// The same for a stage cut into parts (TmaStage::part_box), one per block of a cluster that
// loads its part with multicast: the parts together write every element exactly once, where the
// whole stage's boxes write it, and each part is the same share of the expect-tx bytes.
template <int kX, bool ContigK, int kParts>
void check_tma_stage_parts(const std::string& what) {
  using S = TmaStage<kX>;
  const int x0 = 2 * kX, k0 = 7 * kBK;
  const TmaMapShape m = S::template part_map_shape<ContigK, kParts>(1 << 20, 1 << 20, 1 << 20);
  EXPECT_EQ(m.box[0] * 2, 128u) << what << ": the inner box is one 128-byte swizzle row";
  std::set<uint32_t> written;
  for (int part = 0; part < kParts; ++part) {
    int elements = 0;
    for (int i = 0; i < S::template part_boxes<ContigK, kParts>(); ++i) {
      int c0 = 0, c1 = 0;
      uint32_t offset = 0;
      S::template part_box<ContigK, kParts>(part, i, x0, k0, c0, c1, offset);
      EXPECT_EQ(offset % kAtomBytes, 0u) << what << ": part " << part << " box " << i << " starts mid-atom";
      for (uint32_t o = 0; o < m.box[1]; ++o)
        for (uint32_t e = 0; e < m.box[0]; ++e) {
          const int d0 = c0 + int(e), d1 = c1 + int(o);
          const int x = (ContigK ? d1 : d0) - x0, k = (ContigK ? d0 : d1) - k0;
          ASSERT_TRUE(x >= 0 && x < kX && k >= 0 && k < kBK) << what << ": part " << part << " leaves the stage";
          const uint32_t at = swizzle128(offset + o * m.box[0] * 2 + e * 2);
          EXPECT_EQ(at, (fill_stores<kX, ContigK>(0, x, k))) << what << ": element (" << x << ", " << k << ")";
          EXPECT_TRUE(written.insert(at).second) << what << ": byte " << at << " written twice";
          ++elements;
        }
    }
    EXPECT_EQ(uint32_t(elements) * 2 * kParts, S::kBytes) << what << ": part " << part << "'s share of the bytes";
  }
  EXPECT_EQ(written.size(), size_t(kX) * kBK) << what << ": every element of the stage";
}

TEST(WgmmaLayout, TmaStagePartsOfAClusterFillTheWholeStage) {
  check_tma_stage_parts<256, true, 2>("256 wide, K-contiguous, 2 parts");
  check_tma_stage_parts<256, false, 2>("256 wide, X-contiguous, 2 parts");
  check_tma_stage_parts<128, true, 2>("128 wide, K-contiguous, 2 parts");
  check_tma_stage_parts<128, false, 2>("128 wide, X-contiguous, 2 parts");
  // One part is the whole stage: the unclustered kernel loads B through part_box too.
  check_tma_stage_parts<256, true, 1>("256 wide, K-contiguous, 1 part");
  check_tma_stage_parts<256, false, 1>("256 wide, X-contiguous, 1 part");
  check_tma_stage_parts<128, true, 1>("128 wide, K-contiguous, 1 part");
  check_tma_stage_parts<128, false, 1>("128 wide, X-contiguous, 1 part");
}

TEST(WgmmaLayout, TmaMapsDescribeTheOperandsMemory) {
  // Row-major 300 x 200 (ld 208) read K-contiguous: dimension 0 is k; read X-contiguous
  // (the same memory as a K x X operand), dimension 0 is x. Strides in bytes, boxes within the
  // driver's limits (inner box 128 bytes for the 128-byte swizzle, at most 256 per dimension).
  const TmaMapShape k_major = TmaStage<128>::map_shape<true>(300, 200, 208);
  EXPECT_EQ(k_major.dim[0], 200u);
  EXPECT_EQ(k_major.dim[1], 300u);
  EXPECT_EQ(k_major.stride_bytes, 416u);
  EXPECT_EQ(k_major.box[0] * 2, 128u);
  EXPECT_EQ(k_major.box[1], 128u);
  const TmaMapShape mn_major = TmaStage<128>::map_shape<false>(200, 300, 208);
  EXPECT_EQ(mn_major.dim[0], 200u);
  EXPECT_EQ(mn_major.dim[1], 300u);
  EXPECT_EQ(mn_major.stride_bytes, 416u);
  EXPECT_EQ(mn_major.box[0] * 2, 128u);
  EXPECT_EQ(mn_major.box[1], uint32_t(kBK));
  for (const TmaMapShape& m : {k_major, mn_major}) {
    EXPECT_EQ(m.stride_bytes % 16, 0u);
    EXPECT_LE(m.box[1], 256u);
  }
}

}  // namespace
