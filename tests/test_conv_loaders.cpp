// The implicit-GEMM gathers of the bf16 tensor-core convolutions (kernels/cuda/conv_loaders.h),
// compiled for the host: every index they compute, against the convolution's definition, on
// conv_cases() (tests/gpu_testing.h) and three more strided shapes, without a GPU. For each
// loader and every element (x, k) of its
// implicit matrix (and a few past its edges): the element of the NHWC activations or the KRSC
// filter it reads, or -1 for a zero. Then the promise the 16-byte cp.async path rests on: with
// the loader's vec condition, the 8 elements of an aligned chunk along the contiguous
// dimension are adjacent or all zero. And the transposed filter's taps (FilterTaps) against
// the gathered filter operands they replace.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/common/conv_stride_classes.h"
#include "kernels/common/shapes.h"
#include "kernels/cuda/conv_loaders.h"
#include "tests/gpu_testing.h"

namespace {

using namespace sp::kernels::cuda::detail::mma;
using sp::kernels::Conv2dShape;
using sp::kernels::StrideClass;
using sp::test::conv;
using sp::test::conv_cases;
using sp::test::conv_str;

// The shapes of the GPU convolution tests (conv_cases(), tests/gpu_testing.h), then stride 3
// with a filter smaller than the stride, 5x5 stride 3, a single input row under stride 2, and
// channel counts that are multiples of 4 but not of 8 (the fp32 float4 chunks only).
std::vector<Conv2dShape> shapes() {
  std::vector<Conv2dShape> all = conv_cases();
  for (const Conv2dShape& s :
       {conv(2, 10, 11, 16, 24, 2, 3, 0), conv(1, 7, 8, 8, 16, 5, 3, 2), conv(2, 1, 3, 8, 8, 1, 2, 0),
        conv(2, 5, 7, 4, 12, 3, 2, 1), conv(1, 4, 4, 12, 4, 3, 1, 1)})
    all.push_back(s);
  return all;
}

// Index of x[n, h, w, c] (-1 outside the image), of dy[n, p, q, k], of w[k, r, s, c].
int64_t x_index(const Conv2dShape& s, int n, int h, int w, int c) {
  if (h < 0 || h >= s.h || w < 0 || w >= s.w) return -1;
  return ((int64_t(n) * s.h + h) * s.w + w) * s.c + c;
}
int64_t dy_index(const Conv2dShape& s, int n, int p, int q, int k) {
  return ((int64_t(n) * s.p() + p) * s.q() + q) * s.k + k;
}
int64_t w_index(const Conv2dShape& s, int k, int r, int q, int c) {
  return ((int64_t(k) * s.r + r) * s.s + q) * s.c + c;
}

// Forward A / backward-weight A: x at output pixel pix's window, filter tap (r, s, c).
int64_t ref_input(const Conv2dShape& s, int pix, int tap) {
  const int npq = s.n * s.p() * s.q(), taps = s.r * s.s * s.c;
  if (pix >= npq || tap >= taps) return -1;
  const int n = pix / (s.p() * s.q()), p = pix / s.q() % s.p(), q = pix % s.q();
  const int r = tap / (s.s * s.c), t = tap / s.c % s.s, c = tap % s.c;
  return x_index(s, n, p * s.stride - s.pad + r, q * s.stride - s.pad + t, c);
}

// Backward-data A: dy at the output pixel whose window puts tap (r, s) on input pixel pix.
int64_t ref_grad(const Conv2dShape& s, int pix, int t) {
  if (pix >= s.n * s.h * s.w || t >= s.r * s.s * s.k) return -1;
  const int n = pix / (s.h * s.w), h = pix / s.w % s.h, w = pix % s.w;
  const int r = t / (s.s * s.k), u = t / s.k % s.s, k = t % s.k;
  const int ph = h + s.pad - r, pw = w + s.pad - u;
  if (ph < 0 || pw < 0 || ph % s.stride || pw % s.stride) return -1;
  const int p = ph / s.stride, q = pw / s.stride;
  if (p >= s.p() || q >= s.q()) return -1;
  return dy_index(s, n, p, q, k);
}

// The chunk widths whose promise a gather along a run (C or K) of `run` elements must keep: 8
// elements (16 bytes of bf16, the tensor-core loaders) when run % 8 == 0, and 4 (a float4, the
// fp32 convolutions of conv.cu) when run % 4 == 0.
std::vector<int> chunk_widths(int run) {
  std::vector<int> w;
  for (int width : {8, 4})
    if (run_allows_chunks(run, width)) w.push_back(width);
  return w;
}

// The stride-class gathers serve the bf16 tensor-core kernels only: 8-element chunks.
std::vector<int> bf16_chunks(int run) { return run_allows_chunks(run, 8) ? std::vector<int>{8} : std::vector<int>{}; }

// Checks that loader.offset(row(x), col(k)) == ref(x, k) over [0, xs + 2) x [0, ks + 2) and at
// coordinates up to a whole tile past the edges (the GEMMs load up to 255 rows past M and 7
// columns past K), and the chunk promise along the contiguous dimension (k with kContigK, else
// x) for each of `widths`: the elements of an aligned chunk are adjacent or all zero.
template <class Loader, class Ref>
void check_loader(const Loader& ld, int xs, int ks, const Ref& ref, const std::vector<int>& widths,
                  const std::string& what) {
  std::vector<int> xv, kv;
  for (int x = 0; x < xs + 2; ++x) xv.push_back(x);
  for (int k = 0; k < ks + 2; ++k) kv.push_back(k);
  xv.insert(xv.end(), {xs + 7, xs + 63, xs + 255});
  kv.insert(kv.end(), {ks + 7, ks + 63, ks + 255});
  int64_t wrong = 0;
  for (int x : xv)
    for (int k : kv) {
      const int64_t got = ld.offset(ld.row(x), ld.col(k)), want = ref(x, k);
      if (got != want && wrong++ < 3) ADD_FAILURE() << what << ": element (" << x << ", " << k << ") at " << got
                                                    << ", the definition says " << want;
    }
  EXPECT_EQ(wrong, 0) << what << ": elements at the wrong index";
  const bool along_k = Loader::kContigK;
  for (const int width : widths) {
    int64_t broken = 0;
    for (int x = 0; x < xs; x += along_k ? 1 : width)
      for (int k = 0; k < ks; k += along_k ? width : 1) {
        const int64_t first = ref(x, k);
        for (int e = 1; e < width; ++e) {
          const int64_t o = along_k ? ref(x, k + e) : ref(x + e, k);
          if (first < 0 ? o >= 0 : o != first + e) ++broken;
        }
      }
    EXPECT_EQ(broken, 0) << what << ": chunks of " << width << " that are neither adjacent nor all zero";
  }
}

TEST(ConvLoaders, ForwardAndWeightGradientGatherTheWindow) {
  for (const Conv2dShape& s : shapes()) {
    const ConvGeom g = make_conv_geom(sp::kernels::cuda::detail::conv_sizes(s));
    const bool vec = s.c % 8 == 0;
    const FwdInputLoader fwd{{nullptr, vec}, g};
    check_loader(fwd, g.npq, g.taps, [&](int pix, int tap) { return ref_input(s, pix, tap); }, chunk_widths(s.c),
                 conv_str(s) + " forward A");
    const BwdWeightInputLoader bww{{nullptr, vec}, g};
    check_loader(bww, g.taps, g.npq, [&](int tap, int pix) { return ref_input(s, pix, tap); }, chunk_widths(s.c),
                 conv_str(s) + " weight-gradient A");
  }
}

TEST(ConvLoaders, DataGradientGathersTheOutputsThatReachEachPixel) {
  for (const Conv2dShape& s : shapes()) {
    const ConvGeom g = make_conv_geom(sp::kernels::cuda::detail::conv_sizes(s));
    const BwdDataGradLoader a{{nullptr, s.k % 8 == 0}, g};
    check_loader(a, g.nhw, g.rsk, [&](int pix, int t) { return ref_grad(s, pix, t); }, chunk_widths(s.k),
                 conv_str(s) + " data-gradient A");
    const BwdDataWeightLoader b{{nullptr, s.c % 8 == 0}, g};
    const auto ref_w = [&](int c, int t) -> int64_t {
      if (c >= s.c || t >= g.rsk) return -1;
      return w_index(s, t % s.k, t / s.k / s.s, t / s.k % s.s, c);
    };
    check_loader(b, g.c, g.rsk, ref_w, chunk_widths(s.c), conv_str(s) + " data-gradient B");
  }
}

TEST(ConvLoaders, StrideClassesGatherTheirPixelsAndTaps) {
  int classes_seen = 0;
  for (const Conv2dShape& s : shapes()) {
    if (s.stride == 1) continue;
    const ConvGeom g = make_conv_geom(sp::kernels::cuda::detail::conv_sizes(s));
    for (const StrideClass& c : sp::kernels::stride_classes(s)) {
      if (c.hc * c.wc == 0 || c.rc * c.sc == 0) continue;
      ++classes_seen;
      const ClassGeom cg = make_class_geom(g, c);
      const std::string what = conv_str(s) + " class (" + std::to_string(c.a) + ", " + std::to_string(c.b) + ")";
      // Row (img, i, j) is input pixel (img, a + stride i, b + stride j); column (rr, ss, k) is
      // tap (r0 + stride rr, s0 + stride ss) of filter k: the direct form's element there.
      const auto pixel = [&](int row) {
        const int img = row / (c.hc * c.wc), i = row / c.wc % c.hc, j = row % c.wc;
        return (img * s.h + c.a + s.stride * i) * s.w + c.b + s.stride * j;
      };
      const auto column = [&](int t) {
        const int rr = t / g.k / c.sc, ss = t / g.k % c.sc, k = t % g.k;
        return ((c.r0 + s.stride * rr) * s.s + c.s0 + s.stride * ss) * s.k + k;
      };
      const BwdDataClassGradLoader a{{nullptr, s.k % 8 == 0}, cg};
      check_loader(
          a, cg.m, cg.kc,
          [&](int row, int t) { return row >= cg.m || t >= cg.kc ? -1 : ref_grad(s, pixel(row), column(t)); },
          bf16_chunks(s.k), what + " A");
      const BwdDataClassWeightLoader b{{nullptr, s.c % 8 == 0}, cg};
      check_loader(
          b, g.c, cg.kc,
          [&](int ch, int t) -> int64_t {
            if (ch >= s.c || t >= cg.kc) return -1;
            const int full = column(t);  // (r * S + s) * K + k
            return w_index(s, full % s.k, full / s.k / s.s, full / s.k % s.s, ch);
          },
          bf16_chunks(s.c), what + " B");
    }
  }
  EXPECT_GT(classes_seen, 20);
}

TEST(ConvLoaders, TheTransposedFilterHoldsWhatTheGathersRead) {
  // wt[c, z * K + k] = w[k, taps.tap(z), c] (transpose_filter_kernel) must be element (c, t) of
  // the gathered B operand it replaces, for all taps and for every stride class's.
  for (const Conv2dShape& s : shapes()) {
    const ConvGeom g = make_conv_geom(sp::kernels::cuda::detail::conv_sizes(s));
    const auto transposed = [&](const FilterTaps& taps, int c, int t) -> int64_t {
      if (c >= s.c || t >= taps.count * s.k) return -1;
      return (int64_t(t % s.k) * s.r * s.s + taps.tap(t / s.k)) * s.c + c;
    };
    const FilterTaps all = FilterTaps::all(g);
    EXPECT_EQ(all.count * s.k, g.rsk);
    const BwdDataWeightLoader b{{nullptr, false}, g};
    check_loader(b, g.c, g.rsk, [&](int c, int t) { return transposed(all, c, t); }, {},
                 conv_str(s) + " transposed filter");
    if (s.stride == 1) continue;
    for (const StrideClass& c : sp::kernels::stride_classes(s)) {
      if (c.hc * c.wc == 0 || c.rc * c.sc == 0) continue;
      const ClassGeom cg = make_class_geom(g, c);
      const FilterTaps taps = FilterTaps::of_class(g, c);
      EXPECT_EQ(taps.count * s.k, cg.kc);
      const BwdDataClassWeightLoader cb{{nullptr, false}, cg};
      check_loader(cb, g.c, cg.kc, [&](int ch, int t) { return transposed(taps, ch, t); }, {},
                   conv_str(s) + " class (" + std::to_string(c.a) + ", " + std::to_string(c.b) + ") transposed filter");
    }
  }
}

TEST(ConvLoaders, FastDivmodDividesEveryIndexTheGathersMeet) {
  for (int d : {1, 2, 3, 5, 7, 9, 10, 16, 24, 25, 49, 63, 100, 513, 4096, 65537, 1 << 20}) {
    const FastDivmod f = FastDivmod::make(d);
    for (int n : {0, 1, 2, d - 1, d, d + 1, 2 * d - 1, 1000003, (1 << 30) - 1, (1 << 30), 2147483647}) {
      if (n < 0) continue;
      const int q = f.div(n);
      ASSERT_EQ(q, n / d) << n << " / " << d;
      ASSERT_EQ(f.mod(n, q), n % d) << n << " % " << d;
    }
  }
  EXPECT_THROW(FastDivmod::make(0), sp::Error);
}

}  // namespace
