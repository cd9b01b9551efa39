// The stride classes of the backward-data pass (kernels/common/conv_stride_classes.h): over
// every small shape (stride 1-3, filters 1-4, padding 0-2, inputs 1-7), the (input pixel, tap,
// output pixel) triples the classes enumerate must be exactly the nonzero terms of the direct
// definition, each once, and the classes must partition the input pixels.
#include <gtest/gtest.h>

#include <set>
#include <tuple>

#include "kernels/common/conv_stride_classes.h"

namespace {

using sp::kernels::Conv2dShape;
using Term = std::tuple<int, int, int, int, int, int>;  // h, w, r, s, p, q

std::set<Term> direct_terms(const Conv2dShape& sh) {
  std::set<Term> t;
  for (int h = 0; h < sh.h; ++h)
    for (int w = 0; w < sh.w; ++w)
      for (int r = 0; r < sh.r; ++r)
        for (int s = 0; s < sh.s; ++s)
          for (int p = 0; p < sh.p(); ++p)
            for (int q = 0; q < sh.q(); ++q)
              if (p * sh.stride - sh.pad + r == h && q * sh.stride - sh.pad + s == w) t.insert({h, w, r, s, p, q});
  return t;
}

TEST(ConvStrideClasses, EnumerateExactlyTheNonzeroTermsOnce) {
  int shapes = 0;
  for (int stride = 1; stride <= 3; ++stride)
    for (int r = 1; r <= 4; ++r)
      for (int pad = 0; pad <= 2; ++pad)
        for (int h = 1; h <= 7; ++h) {
          Conv2dShape sh;
          sh.h = h, sh.w = 8 - h, sh.r = r, sh.s = 5 - r, sh.stride = stride, sh.pad = pad;
          if (!sh.valid()) continue;
          ++shapes;
          const std::string what = "stride " + std::to_string(stride) + " filter " + std::to_string(sh.r) + "x" +
                                   std::to_string(sh.s) + " pad " + std::to_string(pad) + " input " +
                                   std::to_string(sh.h) + "x" + std::to_string(sh.w);
          const auto classes = sp::kernels::stride_classes(sh);
          ASSERT_EQ(classes.size(), size_t(stride * stride)) << what;
          std::set<Term> terms;
          std::set<std::pair<int, int>> pixels;
          for (const auto& c : classes) {
            for (int i = 0; i < c.hc; ++i)
              for (int j = 0; j < c.wc; ++j) {
                const int hh = c.a + stride * i, ww = c.b + stride * j;
                EXPECT_TRUE(hh < sh.h && ww < sh.w) << what;
                EXPECT_TRUE(pixels.insert({hh, ww}).second) << what << ": pixel in two classes";
                for (int rr = 0; rr < c.rc; ++rr)
                  for (int ss = 0; ss < c.sc; ++ss) {
                    const int rt = c.r0 + stride * rr, st = c.s0 + stride * ss;
                    const int p = i + c.dh - rr, q = j + c.dw - ss;
                    EXPECT_TRUE(rt < sh.r && st < sh.s) << what << ": tap outside the filter";
                    if (p < 0 || p >= sh.p() || q < 0 || q >= sh.q()) continue;  // the loader's bounds test
                    EXPECT_EQ(p * stride - sh.pad + rt, hh) << what;
                    EXPECT_EQ(q * stride - sh.pad + st, ww) << what;
                    EXPECT_TRUE(terms.insert({hh, ww, rt, st, p, q}).second) << what << ": term twice";
                  }
              }
          }
          EXPECT_EQ(pixels.size(), size_t(sh.h * sh.w)) << what << ": every input pixel in a class";
          EXPECT_EQ(terms, direct_terms(sh)) << what;
        }
  EXPECT_GT(shapes, 200);
}

TEST(ConvStrideClasses, ResNetStrideTwoLayers) {
  // 3x3, pad 1: even rows take the middle tap only, odd rows the outer two; 1x1, pad 0: odd
  // pixels get no gradient at all.
  Conv2dShape sh;
  sh.h = sh.w = 32, sh.r = sh.s = 3, sh.stride = 2, sh.pad = 1;
  const auto c3 = sp::kernels::stride_classes(sh);
  EXPECT_EQ(c3[0].rc * c3[0].sc, 1);  // (even, even)
  EXPECT_EQ(c3[1].rc * c3[1].sc, 2);  // (even, odd)
  EXPECT_EQ(c3[3].rc * c3[3].sc, 4);  // (odd, odd)
  EXPECT_EQ(c3[0].hc * c3[0].wc, 256);
  sh.r = sh.s = 1, sh.pad = 0;
  const auto c1 = sp::kernels::stride_classes(sh);
  EXPECT_EQ(c1[0].rc * c1[0].sc, 1);
  EXPECT_EQ(c1[1].rc * c1[1].sc, 0);
  EXPECT_EQ(c1[3].rc * c1[3].sc, 0);
}

TEST(ConvStrideClasses, RowMapWritesEachClassRowToItsPixel) {
  // Where class_row_map is ok, row r = (img * hc + i) * wc + j of a class lands on input pixel
  // (img, a + stride * i, b + stride * j) of dx [N, H, W, C]: the place the scatter writes it
  // (layout_gathers.h, scatter_class_chunk). Over strides 2 and 3, heights and widths 1-8,
  // batches 1-3 and C 1 and 8, the map is ok exactly where H == stride * hc, and then all the
  // classes' rows together cover every pixel once.
  int mapped = 0, refused = 0;
  for (int stride = 2; stride <= 3; ++stride)
    for (int h = 1; h <= 8; ++h)
      for (int w = 1; w <= 8; ++w)
        for (int n = 1; n <= 3; ++n)
          for (int ch : {1, 8}) {
            Conv2dShape sh;
            sh.n = n, sh.h = h, sh.w = w, sh.c = ch, sh.k = 4, sh.r = sh.s = 3, sh.stride = stride, sh.pad = 1;
            if (!sh.valid()) continue;
            std::set<int64_t> starts;
            bool all_ok = true;
            for (const auto& c : sp::kernels::stride_classes(sh)) {
              const sp::kernels::ClassRowMap m = sp::kernels::class_row_map(sh, c);
              const bool tiles = c.hc > 0 && c.wc > 0 && h == stride * c.hc;
              EXPECT_EQ(m.ok, tiles) << "stride " << stride << " h " << h << " class (" << c.a << ", " << c.b << ")";
              all_ok = all_ok && (m.ok || c.hc * c.wc == 0);
              if (!m.ok) {
                refused += c.hc * c.wc > 0;
                continue;
              }
              ++mapped;
              for (int img = 0; img < n; ++img)
                for (int i = 0; i < c.hc; ++i)
                  for (int j = 0; j < c.wc; ++j) {
                    const int64_t r = (int64_t(img) * c.hc + i) * c.wc + j;
                    const int64_t pixel = (int64_t(img) * h + c.a + stride * i) * w + c.b + stride * j;
                    EXPECT_EQ(sp::kernels::class_row_offset(m, r), pixel * ch)
                        << "stride " << stride << " " << n << "x" << h << "x" << w << " class (" << c.a << ", " << c.b
                        << ") row " << r;
                    starts.insert(sp::kernels::class_row_offset(m, r));
                  }
            }
            if (all_ok) {
              EXPECT_EQ(starts.size(), size_t(n * h * w)) << "every pixel once";
            }
          }
  EXPECT_GT(mapped, 500);
  EXPECT_GT(refused, 100);
}

}  // namespace
