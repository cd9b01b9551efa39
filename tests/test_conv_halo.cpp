// The halo plan of the stride-1 convolutions (kernels/cuda/conv_halo.h) against models of the
// hardware, without a GPU. TMA: a box is written densely (dimension 0 fastest) from its start
// coordinates, each element read at the map's byte strides from the NHWC source, zeros outside
// the tensor, into a 1024-byte-aligned buffer with the 128-byte
// swizzle (16-byte chunk bits 4-6 ^= bits 7-9 of the shared-memory address). wgmma: element
// (x, kk) of a K-major 128-byte-swizzled operand whose descriptor starts at `start` is read at
// swizzle(start + (x % 8) * 128 + (x / 8) * SBO + kk * 2) (tests/test_wgmma_layout.cpp checks
// the same model against the main loops' stages). For every tile, chunk, tap, consumer
// warpgroup and K slice the kernel hands to wgmma, each element the model reads at a real output
// position must be the implicit GEMM's A element there, written out independently from the
// convolution's definition; junk positions must read inside the shared memory the plan sizes;
// and the epilogue's rows must cover every output exactly once. Then the whole forward and data
// gradient rebuilt from those reads and the filter as the library passes it, against the CPU
// reference.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/common/shapes.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/conv_halo.h"
#include "kernels/cuda/conv_loaders.h"

namespace {

using namespace sp::kernels::cuda::detail::wgmma;
namespace det = sp::kernels::cuda::detail;
namespace mma = sp::kernels::cuda::detail::mma;

uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

struct Case {
  int n, h, w, c, r;
  int dir;  // +1 forward, -1 backward data
};

std::string name(const Case& t) {
  return std::string(t.dir > 0 ? "forward" : "backward data") + " n" + std::to_string(t.n) + " " + std::to_string(t.h) +
         "x" + std::to_string(t.w) + "x" + std::to_string(t.c) + " " + std::to_string(t.r) + "x" + std::to_string(t.r);
}

// A distinct nonzero value per source element (zero is the padding's).
int source_value(const Case& t, int img, int hh, int ww, int ch) {
  return 1 + ((img * t.h + hh) * t.w + ww) * t.c + ch;
}

// The implicit GEMM's A element at output (img, p, q) and K index (tap, channel), from the
// convolution's definition: the forward reads x[p - pad + r, q - pad + s]; the data gradient on
// the transposed filter dy[p + pad - r, q + pad - s]; zero outside the image.
int a_element(const Case& t, int img, int p, int q, int tap, int ch) {
  const int pad = (t.r - 1) / 2, r = tap / t.r, s = tap % t.r;
  const int hh = t.dir > 0 ? p - pad + r : p + pad - r, ww = t.dir > 0 ? q - pad + s : q + pad - s;
  if (hh < 0 || hh >= t.h || ww < 0 || ww >= t.w) return 0;
  return source_value(t, img, hh, ww, ch);
}

// Shared memory as the kernel lays it out from a 1024-byte-aligned base: chunk cc's patch at
// cc * patch_bytes, filled by the TMA model from the plan's map at the box's coordinates.
// Bytes are tracked per bf16 element: -1 is never written (slack).
std::vector<int> fill_patches(const HaloConvPlan& plan, const Case& t, const std::vector<int>& nhwc, int img, int o0) {
  const HaloConvSource& src = plan.src;
  std::vector<int> smem(size_t(src.patch_bytes) * size_t(src.chunks) / 2, -1);
  for (int cc = 0; cc < src.chunks; ++cc) {
    int co[4];
    src.box_coords(img, o0, cc, co);
    uint32_t dense = 0;  // the box's bytes written so far, densely
    for (uint32_t i2 = 0; i2 < plan.map.box[2]; ++i2)
      for (uint32_t i1 = 0; i1 < plan.map.box[1]; ++i1)
        for (uint32_t i0 = 0; i0 < plan.map.box[0]; ++i0, dense += 2) {
          const int64_t x[4] = {co[0] + int64_t(i0), co[1] + int64_t(i1), co[2] + int64_t(i2), int64_t(co[3])};
          bool inside = true;
          for (int d = 0; d < 4; ++d) inside = inside && x[d] >= 0 && x[d] < int64_t(plan.map.dim[d]);
          // The element at the map's byte strides in the NHWC tensor (dimension 0 contiguous).
          const int64_t at = x[0] * 2 + x[1] * int64_t(plan.map.stride_bytes[0]) +
                             x[2] * int64_t(plan.map.stride_bytes[1]) + x[3] * int64_t(plan.map.stride_bytes[2]);
          const int v = inside ? nhwc[size_t(at / 2)] : 0;
          const uint32_t addr = swizzle128(uint32_t(cc) * src.patch_bytes + dense);
          smem[addr / 2] = v;
        }
    EXPECT_EQ(dense, src.box_bytes()) << name(t) << ": the box's bytes";
    EXPECT_LE(src.box_bytes(), src.patch_bytes) << name(t);
  }
  return smem;
}

// Checks every operand element of every tile; returns the number of wrong ones.
int check_case(const Case& t, double min_used = 0.0) {
  const int pad = (t.r - 1) / 2;
  const HaloConvPlan plan = plan_conv_halo(t.n, t.h, t.w, t.c, t.r, t.r, 1, pad, t.dir, int64_t(1) << 30, min_used);
  EXPECT_TRUE(plan.ok) << name(t) << ": " << plan.why;
  if (!plan.ok) return 1;
  const HaloConvSource& src = plan.src;
  EXPECT_EQ(plan.tiles, int64_t(t.n) * src.tiles_per_image) << name(t);
  const int taps = t.r * t.r;
  std::vector<int> nhwc(size_t(t.n) * t.h * t.w * t.c);  // the source, NHWC
  for (int img = 0; img < t.n; ++img)
    for (int hh = 0; hh < t.h; ++hh)
      for (int ww = 0; ww < t.w; ++ww)
        for (int ch = 0; ch < t.c; ++ch)
          nhwc[((size_t(img) * t.h + hh) * t.w + ww) * t.c + ch] = source_value(t, img, hh, ww, ch);
  std::vector<int> covered(size_t(t.n) * t.h * t.w, 0);
  int wrong = 0;
  for (int tile = 0; tile < plan.tiles; ++tile) {
    int img = 0, o0 = 0;
    src.tile(tile, img, o0);
    const std::vector<int> smem = fill_patches(plan, t, nhwc, img, o0);
    for (int i = 0; i < kHaloTileM; ++i) {
      const int64_t out = src.out_row(img, o0, i);
      if (out >= 0) ++covered[size_t(out)];
    }
    HaloStepWalk walk = HaloStepWalk::start(src);  // the kernel's incremental form of a_offset
    for (int step = 0; step < taps * src.chunks; ++step, walk.next(src)) {
      const int tap = step / src.chunks, cc = step % src.chunks;
      EXPECT_EQ(walk.cc, cc) << name(t) << ": step " << step;
      for (int cw = 0; cw < 2; ++cw)
        for (int j = 0; j < kBK / 16; ++j) {
          const uint32_t walked = walk.offset(src, o0 % src.wp + cw * kWarpgroupRows);
          if (walked != src.a_offset(o0, tap, cc, cw * kWarpgroupRows) && ++wrong <= 5)
            ADD_FAILURE() << name(t) << ": step " << step << ": the walk's offset " << walked << ", a_offset's "
                          << src.a_offset(o0, tap, cc, cw * kWarpgroupRows);
          const uint32_t start = walked + uint32_t(j) * 32;
          for (int x = 0; x < kWarpgroupRows; ++x)
            for (int kk = 0; kk < 16; ++kk) {
              const uint32_t addr =
                  swizzle128(start + uint32_t(x % 8) * 128 + uint32_t(x / 8) * kAtomBytes + uint32_t(kk) * 2);
              const int i = cw * kWarpgroupRows + x;
              if (addr / 2 >= smem.size()) {
                if (++wrong <= 5)
                  ADD_FAILURE() << name(t) << ": tile " << tile << " row " << i << " tap " << tap << " reads byte "
                                << addr << " past the " << smem.size() * 2 << " bytes of the patches";
                continue;
              }
              const int64_t out = src.out_row(img, o0, i);
              if (out < 0) continue;  // a junk position: any value, dropped by the epilogue
              const int q = int(out % t.w), p = int(out / t.w % t.h), n = int(out / (int64_t(t.w) * t.h));
              const int ch = cc * kBK + j * 16 + kk;
              const int expect = a_element(t, n, p, q, tap, ch);
              if (smem[addr / 2] != expect && ++wrong <= 5)
                ADD_FAILURE() << name(t) << ": tile " << tile << " row " << i << " (output " << n << "," << p << ","
                              << q << ") tap " << tap << " channel " << ch << ": wgmma reads " << smem[addr / 2]
                              << ", A holds " << expect;
            }
        }
    }
  }
  for (size_t o = 0; o < covered.size(); ++o)
    if (covered[o] != 1 && ++wrong <= 5)
      ADD_FAILURE() << name(t) << ": output row " << o << " stored by " << covered[o] << " tiles";
  return wrong;
}

TEST(ConvHalo, WgmmaReadsTheImplicitGemmOperandFromThePatch) {
  // ResNet-18's 64-channel 32 px layers (two images), both directions; a second chunk of 64
  // channels; a 5x5 filter (pad 2); images whose rows do not divide the tile, a tile wider than
  // an image (4 x 6: one tile per image, mostly junk), a single row, and 16 px.
  const Case cases[] = {
      {2, 32, 32, 64, 3, 1}, {2, 32, 32, 64, 3, -1}, {1, 16, 16, 128, 3, 1}, {1, 16, 16, 128, 3, -1},
      {2, 9, 13, 64, 5, 1},  {2, 9, 13, 64, 5, -1},  {3, 4, 6, 64, 3, 1},    {2, 1, 40, 64, 3, -1},
      {1, 7, 30, 192, 3, 1}, {2, 5, 7, 128, 3, -1},
  };
  for (const Case& t : cases) EXPECT_EQ(check_case(t), 0) << name(t);
}

TEST(ConvHalo, PlanTakesOnlySameConvolutionsItCanTile) {
  const int64_t big = int64_t(1) << 30;
  const HaloConvPlan r18 = plan_conv_halo(512, 32, 32, 64, 3, 3, 1, 1, 1, big, 0.8);
  ASSERT_TRUE(r18.ok) << r18.why;
  EXPECT_EQ(r18.src.wp, 34);
  EXPECT_EQ(r18.src.tiles_per_image, 9);  // 32 x 34 = 1088 positions
  EXPECT_EQ(r18.src.rows, 7);             // 128 positions span at most 5 rows, and the taps 2 more
  EXPECT_EQ(r18.tiles, 512 * 9);
  EXPECT_NEAR(r18.used, 1024.0 / 1152.0, 1e-12);
  EXPECT_EQ(r18.src.patch_bytes % kAtomBytes, 0u);
  EXPECT_GE(r18.src.patch_bytes, (7u * 34u + 3u) * 128u);
  EXPECT_EQ(r18.map.box[0], 64u);
  EXPECT_EQ(r18.map.box[1], 34u);
  EXPECT_EQ(r18.map.box[2], 7u);
  EXPECT_EQ(r18.map.box[3], 1u);
  // The map's strides are the NHWC source's: a pixel of C channels, a row, an image.
  const HaloConvPlan c128 = plan_conv_halo(4, 32, 32, 128, 3, 3, 1, 1, -1, big, 0.8);
  ASSERT_TRUE(c128.ok) << c128.why;
  EXPECT_EQ(c128.src.chunks, 2);
  EXPECT_EQ(c128.map.stride_bytes[0], 256u);
  EXPECT_EQ(c128.map.stride_bytes[1], 256u * 32u);
  EXPECT_EQ(c128.map.stride_bytes[2], 256u * 32u * 32u);
  EXPECT_EQ(c128.map.dim[0], 128u);
  // The resident form (a column tile of 64, the whole filter in shared memory) fits the 32 px
  // 64-channel layer: 9 stages of 8 KiB and four 31 KiB patch slots; not two chunks, nor 5x5.
  EXPECT_EQ(halo_resident_smem_bytes(r18.src, 64),
            9 * 8192 + 4 * int64_t(r18.src.patch_bytes) + (9 + 8 + 2) * 8 + 1024);
  // Its slots: tile i goes to warpgroup i % 2's slots, which alternate, each slot every 4 tiles.
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(halo_resident_slot(i) / 2, i % 2) << i;
    EXPECT_EQ(halo_resident_slot(i + 4), halo_resident_slot(i)) << i;
    for (int d = 1; d < 4; ++d) EXPECT_NE(halo_resident_slot(i + d), halo_resident_slot(i)) << i << " + " << d;
  }
  // ... where the tiles are at least 4 per SM: ResNet-18's 32 px layer at batch 512 (4608 tiles) on
  // an H100's 132 SMs, not 180 tiles (one wave of the streaming kernel).
  EXPECT_TRUE(halo_resident_pays(r18.tiles, 132));
  EXPECT_TRUE(halo_resident_pays(528, 132));
  EXPECT_FALSE(halo_resident_pays(527, 132));
  EXPECT_FALSE(halo_resident_pays(180, 132));
  EXPECT_TRUE(halo_resident_fits(r18.src, 64));
  EXPECT_FALSE(halo_resident_fits(c128.src, 64));
  const HaloConvPlan r5 = plan_conv_halo(8, 32, 32, 64, 5, 5, 1, 2, 1, big, 0.8);
  ASSERT_TRUE(r5.ok) << r5.why;
  EXPECT_FALSE(halo_resident_fits(r5.src, 64));
  // 16 px: 16 x 18 positions make 3 tiles for 256 outputs, two thirds used.
  const HaloConvPlan r16 = plan_conv_halo(512, 16, 16, 128, 3, 3, 1, 1, 1, big, 0.8);
  EXPECT_FALSE(r16.ok);
  EXPECT_STREQ(r16.why, "too many junk positions in the tiles");
  EXPECT_TRUE(plan_conv_halo(512, 16, 16, 128, 3, 3, 1, 1, 1, big, 0.6).ok);
  // Refused, each for its reason: strided, unpadded, even, non-square and 1x1 filters, channels
  // not a multiple of 64, chunks past the kernel's barriers, patches past the shared memory
  // given, rows wider than a box, an empty batch, a direction that is neither.
  const auto refused = [&](const HaloConvPlan& p, const char* why) {
    EXPECT_FALSE(p.ok) << why;
    EXPECT_STREQ(p.why, why);
  };
  const char* not_same = "not a stride-1 same convolution with a square odd filter of 3 or more taps a side";
  refused(plan_conv_halo(8, 32, 32, 64, 3, 3, 2, 1, 1, big, 0), not_same);
  refused(plan_conv_halo(8, 32, 32, 64, 3, 3, 1, 0, 1, big, 0), not_same);
  refused(plan_conv_halo(8, 32, 32, 64, 2, 2, 1, 1, 1, big, 0), not_same);
  refused(plan_conv_halo(8, 32, 32, 64, 3, 1, 1, 1, 1, big, 0), not_same);
  refused(plan_conv_halo(8, 32, 32, 64, 1, 1, 1, 0, 1, big, 0), not_same);  // 1x1: nothing to reuse
  refused(plan_conv_halo(8, 32, 32, 64, 3, 3, 1, 1, 0, big, 0), not_same);
  refused(plan_conv_halo(8, 32, 32, 96, 3, 3, 1, 1, 1, big, 0), "source channels not a multiple of 64");
  refused(plan_conv_halo(8, 32, 32, 3, 3, 3, 1, 1, 1, big, 0), "source channels not a multiple of 64");
  const char* no_room = "the patches do not fit the kernel's shared memory";
  refused(plan_conv_halo(8, 32, 32, 64 * (kHaloMaxChunks + 1), 3, 3, 1, 1, 1, big, 0),
          "more chunks of 64 channels than the kernel has barriers for");
  refused(plan_conv_halo(8, 32, 32, 128, 3, 3, 1, 1, 1, r18.src.patch_bytes, 0), no_room);
  EXPECT_TRUE(plan_conv_halo(8, 32, 32, 128, 3, 3, 1, 1, 1, 2 * r18.src.patch_bytes, 0).ok);
  refused(plan_conv_halo(8, 4, 300, 64, 3, 3, 1, 1, 1, big, 0), "a box dimension past 256");
  refused(plan_conv_halo(0, 32, 32, 64, 3, 3, 1, 1, 1, big, 0), "an empty dimension");
}

TEST(ConvHalo, RebuildsTheConvolutionAgainstTheCpuReference) {
  // The whole pass rebuilt from what the kernel computes, per the models: for every tile, K step,
  // warpgroup and K slice, the A rows wgmma reads from the patches (TMA model, the kernel's
  // HaloStepWalk) times the B stage's columns, the filter as the library hands it to the kernel
  // (forward: w[k, r, s, c], K index (r * S + s) * C + c; data gradient: the transposed filter
  // wt[c, (r * S + s) * K + k] = w[k, r, s, c]), summed per K step in the kernel's order and stored
  // at out_row. That must be the CPU reference's forward and data gradient exactly (small
  // integers, exact in float). Shapes: ResNet-18's 32 px layer at batch 2, two chunks, 5x5, odd
  // sizes; the source has src_c channels and the output 8 (forward: C = src_c, K = 8; data
  // gradient: K = src_c, C = 8), to keep it quick: the output columns are independent.
  struct Shape {
    int n, h, w, src_c, r;
  };
  const Shape shapes[] = {{2, 32, 32, 64, 3}, {1, 9, 13, 128, 3}, {2, 7, 10, 64, 5}, {1, 4, 6, 64, 3}};
  uint32_t seed = 7;
  const auto next = [&seed] { return int((seed = seed * 1103515245u + 12345u) >> 16) % 4; };
  for (const Shape& d : shapes)
    for (const int dir : {1, -1}) {
      const int pad = (d.r - 1) / 2, taps = d.r * d.r, src_c = d.src_c, out_c = 8;
      const int c = dir > 0 ? src_c : out_c, k = dir > 0 ? out_c : src_c;
      const sp::kernels::Conv2dShape sh{d.n, d.h, d.w, c, k, d.r, d.r, 1, pad};
      const std::string what = std::string(dir > 0 ? "forward " : "backward data ") + std::to_string(d.n) + "x" +
                               std::to_string(d.h) + "x" + std::to_string(d.w) + "x" + std::to_string(c) + " k" +
                               std::to_string(k) + " " + std::to_string(d.r) + "x" + std::to_string(d.r);
      SCOPED_TRACE(what);
      std::vector<int> src(size_t(d.n) * d.h * d.w * src_c), w(size_t(k) * taps * c);
      for (int& v : src) v = next();
      for (int& v : w) v = next();
      std::vector<float> srcf(src.begin(), src.end()), wf(w.begin(), w.end());
      std::vector<float> ref(size_t(d.n) * d.h * d.w * out_c);
      if (dir > 0)
        sp::kernels::cpu::conv2d_forward<float>(sh, srcf.data(), wf.data(), nullptr, ref.data());
      else
        sp::kernels::cpu::conv2d_backward_data<float>(sh, srcf.data(), wf.data(), ref.data());
      // B(column, K index) as the kernel's B stages hold it: the forward's w as it is; the data
      // gradient's filter transposed over FilterTaps::all, as conv2d_backward_data_bf16 builds it
      // (transposed_filter: wt[c, z * K + k] = w[k, taps.tap(z), c]).
      const mma::FilterTaps all = mma::FilterTaps::all(det::conv_sizes(sh));
      const auto b_at = [&](int col, int kk) {
        if (dir > 0) return w[size_t(col) * taps * c + size_t(kk)];
        const int z = kk / k, kout = kk % k;
        return w[(size_t(kout) * taps + size_t(all.tap(z))) * c + size_t(col)];
      };
      const HaloConvPlan plan = plan_conv_halo(d.n, d.h, d.w, src_c, d.r, d.r, 1, pad, dir, int64_t(1) << 30, 0.0);
      ASSERT_TRUE(plan.ok) << plan.why;
      const HaloConvSource& hs = plan.src;
      const Case t{d.n, d.h, d.w, src_c, d.r, dir};
      std::vector<double> out(ref.size(), -1e30);
      int wrong = 0;
      for (int tile = 0; tile < plan.tiles; ++tile) {
        int img = 0, o0 = 0;
        hs.tile(tile, img, o0);
        const std::vector<int> smem = fill_patches(plan, t, src, img, o0);
        std::vector<double> acc(size_t(kHaloTileM) * out_c, 0.0);
        HaloStepWalk walk = HaloStepWalk::start(hs);
        for (int step = 0; step < taps * hs.chunks; ++step, walk.next(hs))
          for (int cw = 0; cw < 2; ++cw)
            for (int j = 0; j < kBK / 16; ++j) {
              const uint32_t start = walk.offset(hs, o0 % hs.wp + cw * kWarpgroupRows) + uint32_t(j) * 32;
              for (int x = 0; x < kWarpgroupRows; ++x)
                for (int kk = 0; kk < 16; ++kk) {
                  const uint32_t addr =
                      swizzle128(start + uint32_t(x % 8) * 128 + uint32_t(x / 8) * kAtomBytes + uint32_t(kk) * 2);
                  const int a = addr / 2 < smem.size() ? smem[addr / 2] : -1;
                  if (a < 0) {  // slack, or past the patches: only junk rows may read it
                    if (hs.out_row(img, o0, cw * kWarpgroupRows + x) >= 0 && ++wrong <= 5)
                      ADD_FAILURE() << "tile " << tile << " row " << cw * kWarpgroupRows + x << " reads slack";
                    continue;
                  }
                  const int kglobal = step * kBK + j * 16 + kk;
                  for (int col = 0; col < out_c; ++col)
                    acc[size_t(cw * kWarpgroupRows + x) * out_c + size_t(col)] += double(a) * b_at(col, kglobal);
                }
            }
        for (int i = 0; i < kHaloTileM; ++i) {
          const int64_t row = hs.out_row(img, o0, i);
          if (row < 0) continue;
          for (int col = 0; col < out_c; ++col)
            out[size_t(row) * out_c + size_t(col)] = acc[size_t(i) * out_c + size_t(col)];
        }
      }
      for (size_t e = 0; e < ref.size(); ++e)
        if (out[e] != double(ref[e]) && ++wrong <= 5)
          ADD_FAILURE() << "element " << e << ": rebuilt " << out[e] << ", reference " << ref[e];
      EXPECT_EQ(wrong, 0);
    }
}

}  // namespace
