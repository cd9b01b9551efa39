// The per-chunk work of the layout kernels (kernels/cuda/layout_gathers.h: the option-A
// shortcut, max pooling's forward, argmax and gather, the global average pool, and the scatter of
// a stride class's data gradient), run on the CPU for every chunk as the kernels' grid-stride
// loops run it, one and four (the scatter: eight) channels at a time, against the CPU reference
// (the scatter: the stride classes' definition) bit for bit. The kernels' float4/int4 accesses are scalar here;
// everything else (indexing, window ranges, tie-breaking, the order of the sums) is the code the
// GPU runs. No GPU needed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/common/conv_stride_classes.h"
#include "kernels/common/shapes.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/layout_gathers.h"

namespace {

namespace cpu = sp::kernels::cpu;
using namespace sp::kernels::cuda::detail;
using sp::kernels::Pool2dShape;
using sp::kernels::ShortcutAShape;

// Values from few levels, so windows hold ties (the first maximum must win), with one NaN, one
// -infinity and a few -0.0 among them (a -0.0 gradient must reach the sums as the reference's do).
std::vector<float> values(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = float(int(rng() % 7) - 3) * 0.5f;
  if (n > 2) {
    for (size_t k = 0; k < 1 + n / 16; ++k) v[rng() % n] = -0.0f;
    v[rng() % n] = std::numeric_limits<float>::quiet_NaN();
    v[rng() % n] = -std::numeric_limits<float>::infinity();
  }
  return v;
}

// Output buffers start as NaN with a payload no computation makes, so an unwritten element fails.
std::vector<float> unwritten(size_t n) {
  const uint32_t bits = 0x7fc0dead;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return std::vector<float>(n, f);
}

void expect_bits_equal(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    uint32_t a, b;
    std::memcpy(&a, &got[i], 4);
    std::memcpy(&b, &want[i], 4);
    ASSERT_EQ(a, b) << what << ": element " << i << " is " << got[i] << ", the reference " << want[i];
  }
}

template <int W>
void check_shortcut(const ShortcutAShape& sh, const std::string& what) {
  const std::vector<float> x = values(size_t(sh.x_size()), 1), dy = values(size_t(sh.y_size()), 2);
  std::vector<float> y = unwritten(size_t(sh.y_size())), y_ref(y.size());
  for (int64_t idx = 0; idx < sh.y_size() / W; ++idx)
    shortcut_a_forward_chunk<W>(sh, sh.p(), sh.q(), sh.pad_lo(), idx, x.data(), y.data());
  cpu::shortcut_a_forward<float>(sh, x.data(), y_ref.data());
  expect_bits_equal(y, y_ref, what + " forward");
  std::vector<float> dx = unwritten(size_t(sh.x_size())), dx_ref(dx.size());
  for (int64_t idx = 0; idx < sh.x_size() / W; ++idx)
    shortcut_a_backward_chunk<W>(sh, sh.p(), sh.q(), sh.pad_lo(), idx, dy.data(), dx.data());
  cpu::shortcut_a_backward<float>(sh, dy.data(), dx_ref.data());
  expect_bits_equal(dx, dx_ref, what + " backward");
}

TEST(LayoutGathers, ShortcutAOneAndFourChannelsAtATime) {
  // n, h, w, c_in, c_out, stride: ResNet-20's two (at a small batch), odd sizes, an identity,
  // a stride of 3, and channel counts the four-wide form does not take (as elementwise.cu's
  // shortcut_by_4 decides).
  const std::vector<ShortcutAShape> shapes = {{2, 8, 8, 16, 32, 2}, {2, 4, 4, 32, 64, 2}, {1, 5, 7, 4, 12, 2},
                                              {2, 6, 6, 8, 8, 1},   {1, 7, 5, 4, 8, 3},   {2, 5, 5, 3, 9, 2},
                                              {1, 4, 6, 6, 10, 2}};
  for (const ShortcutAShape& sh : shapes) {
    ASSERT_TRUE(sh.valid());
    const std::string what = "shortcut " + std::to_string(sh.h) + "x" + std::to_string(sh.w) + " " +
                             std::to_string(sh.c_in) + "->" + std::to_string(sh.c_out) + " stride " +
                             std::to_string(sh.stride);
    check_shortcut<1>(sh, what + ", one channel at a time");
    if (sh.c_in % 4 == 0 && sh.c_out % 4 == 0 && sh.pad_lo() % 4 == 0) check_shortcut<4>(sh, what + ", four at a time");
  }
}

template <int W, int KW>
void check_maxpool(const Pool2dShape& sh, const std::string& what) {
  const PoolGeom g{sh.h, sh.w, sh.c, sh.window, sh.stride, sh.pad, sh.p(), sh.q()};
  const std::vector<float> x = values(size_t(sh.x_size()), 3), dy = values(size_t(sh.y_size()), 4);
  std::vector<float> y = unwritten(size_t(sh.y_size())), y_ref(y.size());
  for (int64_t idx = 0; idx < sh.y_size() / W; ++idx) maxpool_forward_chunk<W, KW>(g, idx, x.data(), y.data());
  cpu::maxpool2d_forward<float>(sh, x.data(), y_ref.data());
  expect_bits_equal(y, y_ref, what + " forward");
  // The backward with the windows' tap indices as bytes (the kernels' form for windows up to
  // 15 x 15) and as ints: each a tap of its window inside the image, and the same bits as the
  // reference.
  std::vector<float> dx_ref(size_t(sh.x_size()));
  cpu::maxpool2d_backward<float>(sh, x.data(), dy.data(), dx_ref.data());
  const auto backward = [&](auto tag, const std::string& form) {
    using A = decltype(tag);
    std::vector<A> arg(size_t(sh.y_size()), A(-2));
    for (int64_t idx = 0; idx < sh.y_size() / W; ++idx) maxpool_argmax_chunk<W, KW>(g, idx, x.data(), arg.data());
    for (size_t i = 0; i < arg.size(); ++i) {
      const int tap = int(arg[i]), p = int(i / size_t(sh.c)) / sh.q() % sh.p(), q = int(i / size_t(sh.c)) % sh.q();
      const int ih = p * sh.stride - sh.pad + tap / sh.window, iw = q * sh.stride - sh.pad + tap % sh.window;
      ASSERT_TRUE(tap >= 0 && tap < sh.window * sh.window && ih >= 0 && ih < sh.h && iw >= 0 && iw < sh.w)
          << what << form << ": window " << i << " chose tap " << tap;
    }
    // The gather with the windows read one after another, and (where at most two, or one, contain
    // a pixel along each axis: the kernels' conditions) with all of them loaded first.
    std::vector<float> dx = unwritten(size_t(sh.x_size()));
    for (int64_t idx = 0; idx < sh.x_size() / W; ++idx)
      maxpool_gather_chunk<W, 0>(g, idx, arg.data(), dy.data(), dx.data());
    expect_bits_equal(dx, dx_ref, what + form + " backward");
    const int per_axis = (sh.window + sh.stride - 1) / sh.stride;
    if (per_axis <= 2) {
      dx = unwritten(size_t(sh.x_size()));
      for (int64_t idx = 0; idx < sh.x_size() / W; ++idx)
        maxpool_gather_chunk<W, 2>(g, idx, arg.data(), dy.data(), dx.data());
      expect_bits_equal(dx, dx_ref, what + form + " backward, two windows per axis loaded first");
    }
    if (per_axis <= 1) {
      dx = unwritten(size_t(sh.x_size()));
      for (int64_t idx = 0; idx < sh.x_size() / W; ++idx)
        maxpool_gather_chunk<W, 1>(g, idx, arg.data(), dy.data(), dx.data());
      expect_bits_equal(dx, dx_ref, what + form + " backward, the one window per axis loaded first");
    }
  };
  backward(uint8_t{}, ", taps as bytes");
  backward(int{}, ", taps as ints");
}

// Every window size, stride and padding up to 3 on small odd and even images, one and four
// channels at a time, with the window's size read at run time and, for 2 and 3, unrolled (the
// kernels' two forms).
TEST(LayoutGathers, MaxPoolingOneAndFourChannelsAtATime) {
  int checked = 0;
  for (const int n : {1, 2})
    for (const auto& [h, w] : std::vector<std::pair<int, int>>{{1, 1}, {4, 4}, {5, 7}, {8, 8}, {9, 6}})
      for (const int c : {1, 3, 4, 8})
        for (const int window : {1, 2, 3})
          for (const int stride : {1, 2, 3})
            for (const int pad : {0, 1}) {
              const Pool2dShape sh{n, h, w, c, window, stride, pad};
              if (!sh.valid()) continue;
              const std::string what = "maxpool n " + std::to_string(n) + " " + std::to_string(h) + "x" +
                                       std::to_string(w) + "x" + std::to_string(c) + " window " +
                                       std::to_string(window) + " stride " + std::to_string(stride) + " pad " +
                                       std::to_string(pad);
              check_maxpool<1, 0>(sh, what + ", W 1");
              if (window == 2) check_maxpool<1, 2>(sh, what + ", W 1, unrolled");
              if (window == 3) check_maxpool<1, 3>(sh, what + ", W 1, unrolled");
              if (c % 4 == 0) {
                check_maxpool<4, 0>(sh, what + ", W 4");
                if (window == 2) check_maxpool<4, 2>(sh, what + ", W 4, unrolled");
                if (window == 3) check_maxpool<4, 3>(sh, what + ", W 4, unrolled");
              }
              if (HasFatalFailure()) return;
              ++checked;
            }
  EXPECT_GT(checked, 300);
}

template <int W>
void check_avgpool_backward(int64_t n, int64_t hw, int64_t c, bool narrow, const std::string& what) {
  const std::vector<float> dy = values(size_t(n * c), 5);
  std::vector<float> dx = unwritten(size_t(n * hw * c)), dx_ref(dx.size());
  const int64_t cw = c / W;
  for (int64_t idx = 0; idx < n * hw * cw; ++idx)
    global_avgpool_backward_chunk<W>(cw, hw * cw, narrow, float(hw), idx, dy.data(), dx.data());
  cpu::global_avgpool_backward<float>(n, hw, c, dy.data(), dx_ref.data());
  expect_bits_equal(dx, dx_ref, what);
}

// The forward's sums in the CPU's order, with and without a tail after the batches of loads.
TEST(LayoutGathers, GlobalAvgPoolForward) {
  for (const auto& [n, hw, c] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {2, 64, 64}, {3, 5, 3}, {1, 1, 4}, {2, 16, 12}, {4, 49, 512}, {2, 33, 7}}) {
    std::vector<float> x = values(size_t(n * hw * c), 6);
    // Finite values whose sum depends on its order even in double: each +-1e30 swallows the
    // small values added before the one that cancels it.
    for (float& v : x)
      if (!std::isfinite(v)) v = 1.f;
    for (size_t i = 0; i < x.size(); i += 5) x[i] = (i / 5) % 2 ? 1e30f : -1e30f;
    std::vector<float> y = unwritten(size_t(n * c)), y_ref(y.size());
    for (int64_t idx = 0; idx < n * c; ++idx) global_avgpool_forward_element(hw, c, idx, x.data(), y.data());
    cpu::global_avgpool_forward<float>(n, hw, c, x.data(), y_ref.data());
    expect_bits_equal(
        y, y_ref, "avgpool forward n " + std::to_string(n) + " hw " + std::to_string(hw) + " c " + std::to_string(c));
  }
}

// With the 32-bit and the 64-bit index arithmetic.
TEST(LayoutGathers, GlobalAvgPoolBackwardOneAndFourChannelsAtATime) {
  for (const auto& [n, hw, c] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{{2, 64, 64}, {3, 5, 3}, {1, 1, 4}, {2, 16, 12}, {4, 49, 512}})
    for (const bool narrow : {true, false}) {
      const std::string what = "avgpool backward n " + std::to_string(n) + " hw " + std::to_string(hw) + " c " +
                               std::to_string(c) + (narrow ? "" : ", 64-bit indices");
      check_avgpool_backward<1>(n, hw, c, narrow, what + ", W 1");
      if (c % 4 == 0) check_avgpool_backward<4>(n, hw, c, narrow, what + ", W 4");
    }
}

TEST(LayoutGathers, StrideClassScatterOneAndEightChannelsAtATime) {
  // Each class's dense rows (img, i, j), gathered here from a known dx by the classes'
  // definition (kernels/common/conv_stride_classes.h), scattered back by scatter_class_chunk
  // into a sentinel-filled tensor must rebuild dx exactly, every element written once; a class
  // scattered from null writes zeros. Even and odd sizes (classes of different sizes), strides 2
  // and 3 (a stride past the height: empty classes), 8 and 24 channels (eight at a time) and 12
  // (one at a time only). gather_class_chunk takes each class's rows back out of dx.
  const std::tuple<int, int, int, int, int> cases[] = {// n, h, w, c, stride
                                                       {2, 8, 8, 16, 2},
                                                       {3, 9, 7, 24, 2},
                                                       {2, 10, 11, 8, 3},
                                                       {1, 2, 5, 12, 3},
                                                       {2, 5, 5, 8, 2}};
  for (const auto& [n, h, w, c, stride] : cases) {
    sp::kernels::Conv2dShape sh;
    sh.n = n, sh.h = h, sh.w = w, sh.c = c, sh.k = 8, sh.r = 3, sh.s = 3, sh.stride = stride, sh.pad = 1;
    std::vector<uint16_t> dx(size_t(n) * h * w * c);
    for (size_t i = 0; i < dx.size(); ++i) dx[i] = uint16_t(i % 60000 + 1);
    for (const int width : {1, 8}) {
      if (c % width != 0) continue;
      const std::string what = "n" + std::to_string(n) + " " + std::to_string(h) + "x" + std::to_string(w) + "x" +
                               std::to_string(c) + " stride " + std::to_string(stride) + ", " + std::to_string(width) +
                               " at a time";
      std::vector<uint16_t> got(dx.size(), uint16_t(0xFFFF)), zeros(dx.size(), uint16_t(0xFFFF));
      for (const sp::kernels::StrideClass& cl : sp::kernels::stride_classes(sh)) {
        std::vector<uint16_t> rows;
        for (int img = 0; img < n; ++img)
          for (int i = 0; i < cl.hc; ++i)
            for (int j = 0; j < cl.wc; ++j)
              for (int ch = 0; ch < c; ++ch)
                rows.push_back(dx[((size_t(img) * h + cl.a + stride * i) * w + cl.b + stride * j) * c + ch]);
        const int64_t chunks = int64_t(rows.size()) / width;
        std::vector<uint16_t> gathered(rows.size(), uint16_t(0xFFFF));
        for (int64_t idx = 0; idx < chunks; ++idx) {
          if (width == 8) {
            scatter_class_chunk<8>(rows.data(), got.data(), idx, c, h, w, stride, cl.a, cl.b, cl.hc, cl.wc);
            scatter_class_chunk<8>(nullptr, zeros.data(), idx, c, h, w, stride, cl.a, cl.b, cl.hc, cl.wc);
            gather_class_chunk<8>(dx.data(), gathered.data(), idx, c, h, w, stride, cl.a, cl.b, cl.hc, cl.wc);
          } else {
            scatter_class_chunk<1>(rows.data(), got.data(), idx, c, h, w, stride, cl.a, cl.b, cl.hc, cl.wc);
            scatter_class_chunk<1>(nullptr, zeros.data(), idx, c, h, w, stride, cl.a, cl.b, cl.hc, cl.wc);
            gather_class_chunk<1>(dx.data(), gathered.data(), idx, c, h, w, stride, cl.a, cl.b, cl.hc, cl.wc);
          }
        }
        // The reverse, gather_class_chunk, takes the class's rows out of dx.
        EXPECT_EQ(gathered, rows) << what << ", class " << cl.a << "," << cl.b << " gathered";
      }
      EXPECT_EQ(got, dx) << what;
      EXPECT_EQ(zeros, std::vector<uint16_t>(dx.size(), 0)) << what << ": null sources write zeros everywhere";
    }
  }
}

// Past 2^31 elements the coordinates come from 64-bit divisions; below, from 32-bit ones. Both
// must give the coordinates the plain arithmetic gives.
TEST(LayoutGathers, NhwcIndexInBothRanges) {
  const int c = 48, cols = 17, rows = 13;
  std::mt19937_64 rng(9);
  for (int t = 0; t < 20000; ++t) {
    const int64_t idx = t < 10000 ? int64_t(rng() % (uint64_t(INT32_MAX) + 1))
                                  : int64_t(INT32_MAX) - 5000 + int64_t(rng() % (uint64_t(1) << 40));
    const NhwcIndex got = nhwc_index(idx, c, cols, rows);
    ASSERT_EQ(got.ch, idx % c) << idx;
    ASSERT_EQ(got.col, idx / c % cols) << idx;
    ASSERT_EQ(got.row, idx / c / cols % rows) << idx;
    ASSERT_EQ(got.img, idx / c / cols / rows) << idx;
  }
}

}  // namespace
