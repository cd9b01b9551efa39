// The TMA plan of the convolutions' A operand (kernels/cuda/conv_tma.h) against a model of the
// TMA's tiled mode, without a GPU. The model loads a box as cuTensorMapEncodeTiled documents it:
// box[i] / element_stride[i] elements along dimension i from the box's start coordinates, each
// element_stride[i] apart, dimension 0 fastest, written densely; coordinates outside the tensor
// give zeros. For every tile and K step of each shape, the stage the model fills from the
// plan's map and coordinates must hold, row by row, the implicit GEMM's A operand written out
// independently here: forward x(pixel, tap, channel), backward data dy(pixel, tap, channel) on
// the stride-1 mirror image of the window, zero in the padding and past the last image; and the
// data gradient of each stride class of a strided convolution, from the convolution's
// definition (the taps that reach the class's input pixel and the output pixel each reads); and
// the whole stride-class data gradient rebuilt from those boxes, the class's transposed filter
// and the scatter, against the CPU reference.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/common/conv_stride_classes.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/conv_loaders.h"
#include "kernels/cuda/conv_tma.h"
#include "kernels/cuda/layout_gathers.h"

namespace {

using namespace sp::kernels::cuda::detail::wgmma;

constexpr int kTileM = 128;

struct Case {
  int n, h, w, c, k, r, stride, pad;
  bool data_gradient;  // the A operand of the backward data (source dy, stride 1)
};

std::string name(const Case& t) {
  return std::string(t.data_gradient ? "backward data" : "forward") + " n" + std::to_string(t.n) + " " +
         std::to_string(t.h) + "x" + std::to_string(t.w) + "x" + std::to_string(t.c) + " k" + std::to_string(t.k) +
         " " + std::to_string(t.r) + "x" + std::to_string(t.r) + " stride " + std::to_string(t.stride) + " pad " +
         std::to_string(t.pad);
}

int out_size(int in, int r, int stride, int pad) { return (in + 2 * pad - r) / stride + 1; }

// The TMA model: the box of `map` at `co` over the tensor `t` (dimension 0 contiguous).
std::vector<int> tma_box(const TmaMap4d& map, const std::vector<int>& t, const int (&co)[4]) {
  int loaded[4];
  for (int i = 0; i < 4; ++i) loaded[i] = int((map.box[i] + map.element_stride[i] - 1) / map.element_stride[i]);
  std::vector<int> box;
  for (int i3 = 0; i3 < loaded[3]; ++i3)
    for (int i2 = 0; i2 < loaded[2]; ++i2)
      for (int i1 = 0; i1 < loaded[1]; ++i1)
        for (int i0 = 0; i0 < loaded[0]; ++i0) {
          // Dimension 0 has no traversal stride (the documentation: its element stride is ignored).
          const int64_t x[4] = {int64_t(co[0]) + i0, int64_t(co[1]) + int64_t(i1) * map.element_stride[1],
                                int64_t(co[2]) + int64_t(i2) * map.element_stride[2],
                                int64_t(co[3]) + int64_t(i3) * map.element_stride[3]};
          bool inside = true;
          for (int d = 0; d < 4; ++d) inside = inside && x[d] >= 0 && x[d] < int64_t(map.dim[d]);
          int64_t off = x[0];
          for (int d = 1; d < 4; ++d) off += x[d] * int64_t(map.stride_bytes[d - 1] / 2);
          box.push_back(inside ? t[size_t(off)] : 0);
        }
  return box;
}

// The A operand written out: element (m, kk) of the implicit GEMM.
int a_element(const Case& t, const std::vector<int>& src, int m, int kk) {
  const int p = out_size(t.h, t.r, t.stride, t.pad), q = out_size(t.w, t.r, t.stride, t.pad);
  // Rows: forward the output pixels [n, p, q]; backward data the input pixels [n, h, w].
  const int rows_p = t.data_gradient ? t.h : p, rows_q = t.data_gradient ? t.w : q;
  const int src_h = t.data_gradient ? p : t.h, src_w = t.data_gradient ? q : t.w, src_c = t.data_gradient ? t.k : t.c;
  const int img = m / (rows_p * rows_q), pi = m / rows_q % rows_p, qi = m % rows_q;
  const int tap = kk / src_c, ch = kk % src_c, r = tap / t.r, s = tap % t.r;
  if (img >= t.n) return 0;
  const int hh = t.data_gradient ? pi + t.pad - r : pi * t.stride - t.pad + r;
  const int ww = t.data_gradient ? qi + t.pad - s : qi * t.stride - t.pad + s;
  if (hh < 0 || hh >= src_h || ww < 0 || ww >= src_w) return 0;
  return src[((size_t(img) * src_h + hh) * src_w + ww) * src_c + ch];
}

// Loads every stage of an A operand of `rows` rows and `depth` K (tiles of kTileM rows, K steps
// of kBK) from `plan` over `src` with the TMA model, and compares each element with a_at(m, kk),
// the operand written out; reports the first few differences. Returns how many differ.
template <class At>
int stages_differing(const ConvTmaPlan& plan, const std::vector<int>& src, int rows, int depth, const At& a_at) {
  int wrong = 0;
  for (int m0 = 0; m0 < rows; m0 += kTileM)
    for (int k0 = 0; k0 < depth; k0 += kBK) {
      int co[4];
      plan.src.coords(m0, k0, co);
      const std::vector<int> box = tma_box(plan.map, src, co);
      if (box.size() != size_t(kTileM) * kBK) {
        ADD_FAILURE() << "a box of " << box.size() << " elements is not one stage";
        return wrong + 1;
      }
      for (int row = 0; row < kTileM; ++row)
        for (int ch = 0; ch < kBK; ++ch) {
          const int expect = a_at(m0 + row, k0 + ch);
          if (box[size_t(row) * kBK + ch] != expect && ++wrong <= 5)
            ADD_FAILURE() << "tile m0 " << m0 << " k0 " << k0 << ": row " << row << " channel " << ch << " holds "
                          << box[size_t(row) * kBK + ch] << ", A has " << expect;
        }
    }
  return wrong;
}

ConvTmaPlan plan_of(const Case& t) {
  const int p = out_size(t.h, t.r, t.stride, t.pad), q = out_size(t.w, t.r, t.stride, t.pad);
  if (t.data_gradient) return plan_conv_tma(t.n, t.h, t.w, p, q, t.k, t.r, t.r, 1, -1, t.pad, kTileM);
  return plan_conv_tma(t.n, p, q, t.h, t.w, t.c, t.r, t.r, t.stride, 1, t.pad, kTileM);
}

void check_case(const Case& t) {
  SCOPED_TRACE(name(t));
  const ConvTmaPlan plan = plan_of(t);
  ASSERT_TRUE(plan.ok) << plan.why;
  const int p = out_size(t.h, t.r, t.stride, t.pad), q = out_size(t.w, t.r, t.stride, t.pad);
  const int src_h = t.data_gradient ? p : t.h, src_w = t.data_gradient ? q : t.w, src_c = t.data_gradient ? t.k : t.c;
  const int rows = t.data_gradient ? t.n * t.h * t.w : t.n * p * q;
  const int depth = t.r * t.r * src_c;
  // Distinct nonzero values, so a wrong element (or a zero where a value belongs) shows.
  std::vector<int> src(size_t(t.n) * src_h * src_w * src_c);
  for (size_t i = 0; i < src.size(); ++i) src[i] = int(i) + 1;
  // Each stage is exactly one tile of A: 128 rows of 64 channels, what the K-major stage holds.
  const uint32_t loaded = plan.map.box[0] * (plan.map.box[1] / plan.map.element_stride[1]) *
                          (plan.map.box[2] / plan.map.element_stride[2]) * plan.map.box[3];
  ASSERT_EQ(loaded, uint32_t(kTileM * kBK)) << "a box is not one stage";
  ASSERT_EQ(plan.map.box[1] % plan.map.element_stride[1], 0u);
  ASSERT_EQ(plan.map.box[2] % plan.map.element_stride[2], 0u);
  EXPECT_EQ(stages_differing(plan, src, rows, depth, [&](int m, int kk) { return a_element(t, src, m, kk); }), 0);
}

TEST(ConvTma, BoxesHoldTheImplicitGemmRowsOfEveryResNetLayer) {
  // ResNet-18's convolutions but the stem (C = 3), forward, and their stride-1 data gradients,
  // at batch 2, then batches that leave the last tile part empty (boxes past the last image).
  const Case cases[] = {
      {2, 32, 32, 64, 64, 3, 1, 1, false},   {2, 32, 32, 64, 128, 3, 2, 1, false}, {2, 32, 32, 64, 128, 1, 2, 0, false},
      {2, 16, 16, 128, 128, 3, 1, 1, false}, {2, 16, 16, 128, 256, 3, 2, 1, false}, {2, 8, 8, 256, 256, 3, 1, 1, false},
      {2, 8, 8, 256, 512, 1, 2, 0, false},   {2, 4, 4, 512, 512, 3, 1, 1, false},   {3, 8, 8, 64, 64, 3, 1, 1, false},
      {5, 4, 4, 128, 128, 3, 1, 1, false},   {5, 8, 8, 128, 64, 3, 2, 1, false},    {2, 8, 8, 64, 128, 5, 1, 2, false},
      {2, 32, 32, 64, 64, 3, 1, 1, true},    {2, 16, 16, 128, 128, 3, 1, 1, true},  {2, 8, 8, 256, 256, 3, 1, 1, true},
      {2, 4, 4, 512, 512, 3, 1, 1, true},    {3, 8, 8, 128, 64, 3, 1, 1, true},     {5, 4, 4, 64, 128, 3, 1, 1, true},
      {2, 8, 8, 64, 128, 5, 1, 2, true},     {2, 8, 8, 64, 64, 3, 1, 0, true},      {2, 8, 8, 64, 64, 3, 1, 2, true},
  };
  for (const Case& t : cases) check_case(t);
}

// The weight gradient's A: element (tap * C + c, pixel) = x at the pixel's window tap, stored
// MN-major per box (64 channels of a pixel in a 128-byte row); the stage of kX = 128 rows is
// two boxes, 8 KiB apart.
void check_wgrad_case(const Case& t) {
  SCOPED_TRACE("weight gradient " + name(t));
  const int p = out_size(t.h, t.r, t.stride, t.pad), q = out_size(t.w, t.r, t.stride, t.pad);
  const ConvWgradTmaPlan plan = plan_conv_wgrad_tma(t.n, p, q, t.h, t.w, t.c, t.r, t.r, t.stride, t.pad);
  ASSERT_TRUE(plan.ok) << plan.why;
  std::vector<int> x(size_t(t.n) * t.h * t.w * t.c);
  for (size_t i = 0; i < x.size(); ++i) x[i] = int(i) + 1;
  const int rows = t.r * t.r * t.c, pixels = t.n * p * q;
  const uint32_t loaded = plan.map.box[0] * (plan.map.box[1] / plan.map.element_stride[1]) *
                          (plan.map.box[2] / plan.map.element_stride[2]) * plan.map.box[3];
  ASSERT_EQ(loaded, uint32_t(64 * kBK)) << "a box is not 64 channels x 64 pixels";
  Case fwd = t;
  fwd.data_gradient = false;
  int wrong = 0;
  for (int x0 = 0; x0 < rows; x0 += 128)
    for (int k0 = 0; k0 < pixels; k0 += kBK)
      for (int j = 0; j < 2; ++j) {
        if (x0 + 64 * j >= rows) continue;  // rows past the filter: dropped by the epilogue
        int co[4];
        plan.src.coords(x0 + 64 * j, k0, co);
        const std::vector<int> box = tma_box(plan.map, x, co);
        for (int pix = 0; pix < kBK; ++pix)
          for (int ch = 0; ch < 64; ++ch) {
            const int row = x0 + 64 * j + ch, tap = row / t.c, c = row % t.c;
            // The forward's A at (pixel, tap * C + c) is the weight gradient's at (row, pixel).
            const int expect = k0 + pix < pixels ? a_element(fwd, x, k0 + pix, tap * t.c + c) : 0;
            if (box[size_t(pix) * 64 + ch] != expect && ++wrong <= 5)
              ADD_FAILURE() << "rows " << x0 + 64 * j << " pixels " << k0 << ": pixel " << pix << " channel " << ch
                            << " holds " << box[size_t(pix) * 64 + ch] << ", A has " << expect;
          }
      }
  EXPECT_EQ(wrong, 0);
}

TEST(ConvTma, WeightGradientBoxesHoldTheFilterTapRows) {
  const Case cases[] = {
      {2, 32, 32, 64, 64, 3, 1, 1, false},   {2, 32, 32, 64, 128, 3, 2, 1, false}, {2, 32, 32, 64, 128, 1, 2, 0, false},
      {2, 16, 16, 128, 128, 3, 1, 1, false}, {2, 16, 16, 128, 256, 3, 2, 1, false}, {2, 8, 8, 256, 256, 3, 1, 1, false},
      {3, 8, 8, 256, 512, 1, 2, 0, false},   {5, 4, 4, 512, 512, 3, 1, 1, false},   {3, 8, 8, 64, 64, 3, 1, 1, false},
      {2, 8, 8, 64, 128, 5, 1, 2, false},
  };
  for (const Case& t : cases) check_wgrad_case(t);
  // 64 pixels per step: Q = 32 with 2 rows, not 4; Q = 128 does not divide 64.
  EXPECT_EQ(plan_conv_wgrad_tma(2, 32, 32, 32, 32, 64, 3, 3, 1, 1).map.box[2], 2u);
  EXPECT_FALSE(plan_conv_wgrad_tma(2, 1, 128, 1, 128, 64, 1, 1, 1, 0).ok);
}

// The data gradient of stride class cl of the strided convolution t (the class path of
// conv_bf16.cu): rows the class's input pixels (img, a + stride * i, b + stride * j) in the order
// (img, i, j), K index (rr, ss, k) over the class's taps r = r0 + stride * rr, s = s0 + stride *
// ss, as the class's transposed filter has them. Element (m, kk) is dy at the output pixel the
// tap maps the input pixel to, h = p * stride - pad + r, so p = (h + pad - r) / stride (exact
// for the class's taps), zero outside the output and past the last image.
void check_class_case(const Case& t, const sp::kernels::StrideClass& cl) {
  SCOPED_TRACE(name(t) + ", class (" + std::to_string(cl.a) + ", " + std::to_string(cl.b) + ")");
  const int p = out_size(t.h, t.r, t.stride, t.pad), q = out_size(t.w, t.r, t.stride, t.pad);
  const ConvTmaPlan plan = plan_conv_dgrad_class_tma(t.n, cl.hc, cl.wc, p, q, t.k, cl.rc, cl.sc, cl.dh, cl.dw, kTileM);
  ASSERT_TRUE(plan.ok) << plan.why;
  std::vector<int> dy(size_t(t.n) * p * q * t.k);
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = int(i) + 1;
  const int rows = t.n * cl.hc * cl.wc, depth = cl.rc * cl.sc * t.k;
  // Element (m, kk) of the class's A: its input pixel (img, a + stride * i, b + stride * j), tap
  // (r, s) and channel k, at the output pixel (p, q) the tap maps that pixel to.
  const auto a_at = [&](int m, int kk) {
    const int img = m / (cl.hc * cl.wc), i = m / cl.wc % cl.hc, j = m % cl.wc;
    const int z = kk / t.k, k = kk % t.k, rr = z / cl.sc, ss = z % cl.sc;
    const int r = cl.r0 + t.stride * rr, s = cl.s0 + t.stride * ss;
    const int hn = cl.a + t.stride * i + t.pad - r, wn = cl.b + t.stride * j + t.pad - s;
    EXPECT_EQ(hn % t.stride, 0) << "tap " << r << " does not reach row " << cl.a + t.stride * i;
    EXPECT_EQ(wn % t.stride, 0) << "tap " << s << " does not reach column " << cl.b + t.stride * j;
    const int pp = hn / t.stride, qq = wn / t.stride;
    const bool inside = img < t.n && hn >= 0 && wn >= 0 && pp < p && qq < q;
    return inside ? dy[((size_t(img) * p + pp) * q + qq) * t.k + k] : 0;
  };
  EXPECT_EQ(stages_differing(plan, dy, rows, depth, a_at), 0);
}

TEST(ConvTma, StrideClassBoxesHoldEachClasssDataGradientRows) {
  // ResNet-18's strided layers (3x3 and 1x1, stride 2) at batch 2, batches that leave the last
  // tile part empty (3 images of 8 x 8 classes, 5 of 4 x 4), a 5x5 filter with pad 2 and
  // stride 2, and pad 0: every class with a tap. The 1x1 layers' three other classes have
  // none, and the plan refuses them (their pixels get zeros).
  const Case cases[] = {
      {2, 32, 32, 64, 128, 3, 2, 1, true}, {2, 16, 16, 128, 256, 3, 2, 1, true}, {2, 8, 8, 256, 512, 3, 2, 1, true},
      {2, 32, 32, 64, 128, 1, 2, 0, true}, {2, 16, 16, 128, 256, 1, 2, 0, true}, {2, 8, 8, 256, 512, 1, 2, 0, true},
      {3, 16, 16, 64, 64, 3, 2, 1, true},  {5, 8, 8, 64, 128, 3, 2, 1, true},    {2, 16, 16, 64, 64, 5, 2, 2, true},
      {2, 16, 16, 64, 64, 3, 2, 0, true},
  };
  for (const Case& t : cases) {
    sp::kernels::Conv2dShape sh;
    sh.n = t.n, sh.h = t.h, sh.w = t.w, sh.c = t.c, sh.k = t.k, sh.r = t.r, sh.s = t.r, sh.stride = t.stride,
    sh.pad = t.pad;
    int with_taps = 0;
    for (const sp::kernels::StrideClass& cl : sp::kernels::stride_classes(sh)) {
      if (cl.rc * cl.sc == 0) {
        EXPECT_FALSE(
            plan_conv_dgrad_class_tma(t.n, cl.hc, cl.wc, sh.p(), sh.q(), t.k, cl.rc, cl.sc, cl.dh, cl.dw, kTileM).ok)
            << name(t) << ": a class without taps";
        continue;
      }
      ++with_taps;
      check_class_case(t, cl);
    }
    EXPECT_EQ(with_taps, t.r == 1 ? 1 : 4) << name(t);
  }
  // Odd sizes give classes of different sizes (9 = 5 + 4 pixels): 5 x 5, 5 x 4 and 4 x 5, which do
  // not tile, and 4 x 4, which does: its boxes reach dy's last row and column (dh = dw = 1).
  const Case odd = {2, 9, 9, 64, 64, 3, 2, 1, true};
  const std::vector<sp::kernels::StrideClass> odd_classes = sp::kernels::stride_classes({2, 9, 9, 64, 64, 3, 3, 2, 1});
  ASSERT_EQ(odd_classes.size(), 4u);
  EXPECT_STREQ(plan_conv_dgrad_class_tma(2, 5, 5, 5, 5, 64, odd_classes[0].rc, odd_classes[0].sc, odd_classes[0].dh,
                                         odd_classes[0].dw, kTileM)
                   .why,
               "Q does not divide the tile");
  EXPECT_STREQ(plan_conv_dgrad_class_tma(2, 5, 4, 5, 5, 64, odd_classes[1].rc, odd_classes[1].sc, odd_classes[1].dh,
                                         odd_classes[1].dw, kTileM)
                   .why,
               "the tile is neither a band of whole rows of one image nor whole images");
  EXPECT_EQ(odd_classes[0].wc, 5);
  EXPECT_EQ(odd_classes[1].wc, 4);
  EXPECT_EQ(odd_classes[3].hc * odd_classes[3].wc, 16);
  EXPECT_EQ(odd_classes[3].dh, 1);
  check_class_case(odd, odd_classes[3]);
}

TEST(ConvTma, StrideClassesRebuildTheDataGradientFromTheirBoxes) {
  // The class path of conv_bf16.cu (backward_data_by_class with TMA loads) end to end on the
  // CPU, with the kernel's arithmetic replaced by plain sums: for each class with taps, every A
  // stage the TMA model loads through the class's plan, times the class's transposed filter
  // wt[c, z * K + k] = w[k, taps.tap(z), c] (FilterTaps::of_class, as transposed_filter builds
  // it), summed into the class's dense result rows; then scatter_class_chunk puts the rows into
  // dx (a class without taps from null: zeros). That must be the CPU reference's data gradient
  // exactly: small integers, exact in float and carried as 16-bit values by the scatter.
  // ResNet-like strided layers with every class planning: 3x3 pad 1, 1x1 pad 0, 5x5 pad 2,
  // 3x3 pad 0, a part-empty last tile (3 images of 8 x 8 classes) and classes of 16 x 16.
  using sp::kernels::Conv2dShape;
  namespace mma = sp::kernels::cuda::detail::mma;
  namespace det = sp::kernels::cuda::detail;
  std::vector<Conv2dShape> shapes(6);
  const int dims[6][9] = {{2, 16, 16, 16, 64, 3, 3, 2, 1}, {2, 16, 16, 8, 64, 1, 1, 2, 0},
                          {2, 16, 16, 8, 64, 5, 5, 2, 2},  {2, 16, 16, 8, 64, 3, 3, 2, 0},
                          {3, 16, 16, 8, 64, 3, 3, 2, 1},  {1, 32, 32, 8, 64, 3, 3, 2, 1}};
  for (int i = 0; i < 6; ++i) {
    const int* d = dims[i];
    shapes[size_t(i)] = Conv2dShape{d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8]};
  }
  uint32_t seed = 1;
  for (const Conv2dShape& sh : shapes) {
    const std::string what = "n" + std::to_string(sh.n) + " " + std::to_string(sh.h) + "x" + std::to_string(sh.w) +
                             "x" + std::to_string(sh.c) + " k" + std::to_string(sh.k) + " " + std::to_string(sh.r) +
                             "x" + std::to_string(sh.s) + " pad " + std::to_string(sh.pad);
    SCOPED_TRACE(what);
    const int p = sh.p(), q = sh.q();
    std::vector<int> dy(size_t(sh.n) * p * q * sh.k), w(size_t(sh.k) * sh.r * sh.s * sh.c);
    for (int& v : dy) v = int((seed = seed * 1103515245u + 12345u) >> 16) % 4;
    for (int& v : w) v = int((seed = seed * 1103515245u + 12345u) >> 16) % 4;
    std::vector<float> dyf(dy.begin(), dy.end()), wf(w.begin(), w.end()), ref(size_t(sh.n) * sh.h * sh.w * sh.c);
    sp::kernels::cpu::conv2d_backward_data<float>(sh, dyf.data(), wf.data(), ref.data());

    const det::ConvDims g = det::conv_sizes(sh);
    std::vector<uint16_t> dx(ref.size(), uint16_t(0xFFFF));
    for (const sp::kernels::StrideClass& cl : sp::kernels::stride_classes(sh)) {
      const int rows = sh.n * cl.hc * cl.wc;
      std::vector<uint16_t> result(size_t(rows) * sh.c, 0);
      const bool taps = cl.rc * cl.sc > 0;
      if (taps) {
        const ConvTmaPlan plan =
            plan_conv_dgrad_class_tma(sh.n, cl.hc, cl.wc, p, q, sh.k, cl.rc, cl.sc, cl.dh, cl.dw, kTileM);
        ASSERT_TRUE(plan.ok) << plan.why;
        const mma::FilterTaps ft = mma::FilterTaps::of_class(g, cl);
        const int depth = ft.count * sh.k;
        std::vector<int64_t> sums(size_t(rows) * sh.c, 0);
        for (int m0 = 0; m0 < rows; m0 += kTileM)
          for (int k0 = 0; k0 < depth; k0 += kBK) {
            int co[4];
            plan.src.coords(m0, k0, co);
            const std::vector<int> box = tma_box(plan.map, dy, co);
            for (int row = 0; row < kTileM && m0 + row < rows; ++row)
              for (int e = 0; e < kBK; ++e) {
                const int a = box[size_t(row) * kBK + e];
                if (a == 0) continue;
                const int t = k0 + e, z = t / sh.k, k = t % sh.k;
                for (int c = 0; c < sh.c; ++c)
                  sums[size_t(m0 + row) * sh.c + c] +=
                      int64_t(a) * w[(size_t(k) * sh.r * sh.s + size_t(ft.tap(z))) * sh.c + c];
              }
          }
        for (size_t i = 0; i < sums.size(); ++i) {
          ASSERT_LT(sums[i], 65536) << "the test's values must stay within 16 bits";
          result[i] = uint16_t(sums[i]);
        }
      }
      for (int64_t idx = 0; idx < int64_t(result.size()); ++idx)
        det::scatter_class_chunk<1>(taps ? result.data() : nullptr, dx.data(), idx, sh.c, sh.h, sh.w, sh.stride, cl.a,
                                    cl.b, cl.hc, cl.wc);
    }
    int wrong = 0;
    for (size_t i = 0; i < ref.size(); ++i)
      if (float(dx[i]) != ref[i] && ++wrong <= 5)
        ADD_FAILURE() << "dx[" << i << "] = " << dx[i] << ", the reference " << ref[i];
    EXPECT_EQ(wrong, 0);
  }
}

TEST(ConvTma, ThePlanRefusesWhatOneBoxCannotLoad) {
  const int n = 2, tile = kTileM;
  // C not a multiple of 64 (the stem's 3, 96); Q not dividing the tile; P * Q neither a
  // multiple nor a divisor of the tile; a box dimension past 256; steps TMA cannot traverse; a
  // strided data gradient.
  const auto refuses = [](const ConvTmaPlan& plan, const char* why) {
    EXPECT_FALSE(plan.ok) << why;
    EXPECT_STREQ(plan.why, why);
  };
  const char* const kChannels = "source channels not a multiple of 64";
  const char* const kStep = "a step TMA cannot traverse";
  refuses(plan_conv_tma(n, 32, 32, 32, 32, 3, 3, 3, 1, 1, 1, tile), kChannels);
  refuses(plan_conv_tma(n, 8, 8, 8, 8, 96, 3, 3, 1, 1, 1, tile), kChannels);
  refuses(plan_conv_tma(n, 6, 6, 6, 6, 64, 3, 3, 1, 1, 1, tile), "Q does not divide the tile");
  refuses(plan_conv_tma(n, 12, 4, 12, 4, 64, 3, 3, 1, 1, 1, tile),  // P * Q = 48
          "the tile is neither a band of whole rows of one image nor whole images");
  refuses(plan_conv_tma(n, 1, 128, 1, 512, 64, 1, 1, 4, 1, 0, tile), "a box dimension past 256");  // box W 512
  EXPECT_TRUE(plan_conv_tma(n, 1, 128, 1, 256, 64, 1, 1, 2, 1, 0, tile).ok);   // box W 256: the limit
  refuses(plan_conv_tma(n, 4, 4, 4, 4, 64, 3, 3, 9, 1, 1, tile), kStep);
  refuses(plan_conv_tma(n, 8, 8, 4, 4, 64, 3, 3, 2, -1, 1, tile), kStep);
  refuses(plan_conv_tma(0, 8, 8, 8, 8, 64, 3, 3, 1, 1, 1, tile), "an empty dimension");
  // And what it takes: a band of rows of one image, and several whole images per tile.
  const ConvTmaPlan band = plan_conv_tma(n, 32, 32, 32, 32, 64, 3, 3, 1, 1, 1, tile);
  ASSERT_TRUE(band.ok);
  EXPECT_EQ(band.map.box[1], 32u);
  EXPECT_EQ(band.map.box[2], 4u);
  EXPECT_EQ(band.map.box[3], 1u);
  const ConvTmaPlan images = plan_conv_tma(n, 4, 4, 8, 8, 64, 3, 3, 2, 1, 1, tile);
  ASSERT_TRUE(images.ok);
  EXPECT_EQ(images.map.box[1], 8u);  // 4 pixels, each 2 apart
  EXPECT_EQ(images.map.element_stride[1], 2u);
  EXPECT_EQ(images.map.box[3], 8u);  // 8 images of 4 x 4
}

}  // namespace
