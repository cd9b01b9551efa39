// The implicit-GEMM convolution loaders of the bf16 tensor-core main loops (mma_mainloop.cuh,
// wgmma_mainloop.cuh): for each gathered operand (forward A, weight-gradient A, data-gradient A
// and B, and their stride-class forms), where element (x, k) of the implicit matrix lives in the
// NHWC activations or the KRSC filter, or that it is a zero (padding, stride holes, past the
// edges). The other operands are plain matrices (MatrixLoader, mma_mainloop.cuh). Plain C++ that
// compiles for the host as well (SP_LOADER_HD), so the CPU tests (tests/test_conv_loaders.cpp)
// check every index these gathers compute against the convolution's definition without a GPU.
// The main loops add the copying: StageFill reads a loader's chunk() (16-byte cp.async) or
// elem() (the element-wise gather) per element of a stage.
#pragma once

#include <cstdint>

#include "kernels/common/conv_stride_classes.h"
#include "kernels/common/error.h"
#include "kernels/common/shapes.h"

#if defined(__CUDACC__)
#define SP_LOADER_HD __host__ __device__
#define SP_LOADER_INLINE __forceinline__
#else
#define SP_LOADER_HD
#define SP_LOADER_INLINE inline
#endif

namespace sp::kernels::cuda::detail {

struct ConvDims {
  int n, h, w, c, k, r, s, p, q, stride, pad;
  int npq;   // output pixels
  int nhw;   // input pixels
  int taps;  // R*S*C, the length of a filter
  int rsk;   // R*S*K, the backward-data reduction
};

// The sizes of sh (a valid shape whose products fit in int: conv_geom.cuh's conv_dims checks).
inline ConvDims conv_sizes(const Conv2dShape& sh) {
  ConvDims g;
  g.n = sh.n, g.h = sh.h, g.w = sh.w, g.c = sh.c, g.k = sh.k, g.r = sh.r, g.s = sh.s;
  g.p = sh.p(), g.q = sh.q(), g.stride = sh.stride, g.pad = sh.pad;
  g.npq = int(int64_t(sh.n) * sh.p() * sh.q()), g.nhw = int(int64_t(sh.n) * sh.h * sh.w);
  g.taps = int(int64_t(sh.r) * sh.s * sh.c), g.rsk = int(int64_t(sh.r) * sh.s * sh.k);
  return g;
}

}  // namespace sp::kernels::cuda::detail

namespace sp::kernels::cuda::detail::mma {

// The GEMM views of conv.cu: forward M = N*P*Q, N = K, K = R*S*C; backward data M = N*H*W,
// N = C, K = R*S*K; backward weight M = R*S*C, N = K, K = N*P*Q.

// n / d and n % d for 0 <= n < 2^31 by a multiply-high and a shift (Granlund-Montgomery, as
// in CUTLASS's FastDivmod), for the index arithmetic of the gathers: a hardware integer
// division is a long instruction sequence.
struct FastDivmod {
  int d;
  uint32_t mul, shr;

  static FastDivmod make(int divisor) {  // host
    SP_CHECK(divisor > 0, "FastDivmod: divisor ", divisor, " is not positive");
    FastDivmod f{divisor, 0u, 0u};
    if (divisor != 1) {
      int log2_ceil = 0;
      while ((int64_t(1) << log2_ceil) < divisor) ++log2_ceil;
      const int p = 31 + log2_ceil;
      f.mul = uint32_t(((uint64_t(1) << p) + uint64_t(divisor) - 1) / uint64_t(divisor));
      f.shr = uint32_t(p - 32);
    }
    return f;
  }
  SP_LOADER_HD int div(int n) const { return d == 1 ? n : int(mulhi(uint32_t(n), mul) >> shr); }
  SP_LOADER_HD static uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return uint32_t((uint64_t(a) * b) >> 32);
#endif
  }
  SP_LOADER_HD int mod(int n, int q) const { return n - q * d; }  // with q = div(n)
};

// The convolution's sizes (ConvDims above; conv_geom.cuh's conv_dims checks them) and fast
// divisors for the loaders' index arithmetic.
struct ConvGeom : ConvDims {
  FastDivmod div_c, div_s, div_k, div_p, div_q, div_h, div_w, div_stride;
};

inline ConvGeom make_conv_geom(const ConvDims& d) {
  ConvGeom g;
  static_cast<ConvDims&>(g) = d;
  g.div_c = FastDivmod::make(g.c), g.div_s = FastDivmod::make(g.s), g.div_k = FastDivmod::make(g.k);
  g.div_p = FastDivmod::make(g.p), g.div_q = FastDivmod::make(g.q), g.div_h = FastDivmod::make(g.h);
  g.div_w = FastDivmod::make(g.w), g.div_stride = FastDivmod::make(g.stride);
  return g;
}

// Whether a gather along a run (C or K) of `run` elements keeps the chunk promise below for
// chunks of `width` elements: 8 for the bf16 loaders' 16 bytes, 4 for the fp32 float4s of
// conv.cu. (A chunk starts at a multiple of its width along the run, so it stays within one
// filter tap and one pixel exactly when the run is a multiple of the width.) The kernels and
// test_conv_loaders share it.
constexpr bool run_allows_chunks(int64_t run, int width) { return run % width == 0; }

// A loader over a gather: Derived::offset(row, col) is the index of the element in base, or -1
// for a zero. With vec, the layout guarantees (see each loader) that the 8 elements of a chunk
// are adjacent, start 16-byte aligned and are all present or all zero, so the first element's
// offset decides for the whole chunk. The fp32 convolutions (conv.cu) use the index arithmetic
// of the four direct gathers with 4-element chunks (a float4), which needs the run (C or K) to
// be a multiple of 4 instead of 8; test_conv_loaders checks both chunk widths.
template <class Derived, bool ContigK>
struct GatherLoader {
  static constexpr bool kContigK = ContigK;
  const uint16_t* base;
  bool vec;

  SP_LOADER_HD const Derived& self() const { return static_cast<const Derived&>(*this); }
  template <class Row, class Col>
  SP_LOADER_HD const uint16_t* chunk(const Row& r, const Col& c, int& bytes) const {
    const int64_t o = self().offset(r, c);
    bytes = o < 0 ? 0 : 16;
    return o < 0 ? base : base + o;
  }
  SP_LOADER_HD uint16_t elem(int x, int k) const {
    const int64_t o = self().offset(self().row(x), self().col(k));
    return o < 0 ? uint16_t(0) : base[o];
  }
};

// An output pixel as the top-left input coordinate of its window, and a filter tap.
struct OutPixel {
  int img;     // -1 past the last pixel
  int h0, w0;  // p * stride - pad, q * stride - pad
};
struct FilterTap {
  int r, s, c;
  bool valid;
};
SP_LOADER_HD SP_LOADER_INLINE OutPixel out_pixel(const ConvGeom& g, int pix) {
  const int np = g.div_q.div(pix), q = g.div_q.mod(pix, np);
  const int img = g.div_p.div(np), p = g.div_p.mod(np, img);
  return {pix < g.npq ? img : -1, p * g.stride - g.pad, q * g.stride - g.pad};
}
SP_LOADER_HD SP_LOADER_INLINE FilterTap filter_tap(const ConvGeom& g, int tap) {
  const int rs = g.div_c.div(tap), c = g.div_c.mod(tap, rs);
  const int r = g.div_s.div(rs), s = g.div_s.mod(rs, r);
  return {r, s, c, tap < g.taps};
}
// Index in x of element (pixel, tap) of the implicit column matrix, -1 in the padding or
// outside the matrix.
SP_LOADER_HD SP_LOADER_INLINE int64_t conv_input_offset(const ConvGeom& g, const OutPixel& px, const FilterTap& t) {
  const int h = px.h0 + t.r, w = px.w0 + t.s;
  if (px.img < 0 || !t.valid || h < 0 || h >= g.h || w < 0 || w >= g.w) return -1;
  return ((int64_t(px.img) * g.h + h) * g.w + w) * g.c + t.c;
}

// Forward A: x(pix, tap). vec needs C % 8 == 0: a chunk is c..c+7 (c % 8 == 0) of one tap.
struct FwdInputLoader : GatherLoader<FwdInputLoader, true> {
  ConvGeom g;
  using Row = OutPixel;
  using Col = FilterTap;
  SP_LOADER_HD Row row(int pix) const { return out_pixel(g, pix); }
  SP_LOADER_HD Col col(int tap) const { return filter_tap(g, tap); }
  SP_LOADER_HD int64_t offset(const Row& px, const Col& t) const { return conv_input_offset(g, px, t); }
};

// Backward-weight A: x(pix, tap) as element (tap, pix), contiguous along the taps' c.
// vec needs C % 8 == 0.
struct BwdWeightInputLoader : GatherLoader<BwdWeightInputLoader, false> {
  ConvGeom g;
  using Row = FilterTap;
  using Col = OutPixel;
  SP_LOADER_HD Row row(int tap) const { return filter_tap(g, tap); }
  SP_LOADER_HD Col col(int pix) const { return out_pixel(g, pix); }
  SP_LOADER_HD int64_t offset(const Row& t, const Col& px) const { return conv_input_offset(g, px, t); }
};

// Backward-data A: dy(pix, t), t = (r * S + s) * K + k: dy at the output pixel whose window
// puts tap (r, s) on input pixel pix, zero when there is none. vec needs K % 8 == 0: a chunk
// is k..k+7 (k % 8 == 0) of one output pixel.
struct BwdDataGradLoader : GatherLoader<BwdDataGradLoader, true> {
  ConvGeom g;
  struct Row {
    int img;     // -1 past the last pixel
    int hp, wp;  // h + pad, w + pad
  };
  struct Col {
    int r, s, k;
    bool valid;
  };
  SP_LOADER_HD Row row(int pix) const {
    const int nh = g.div_w.div(pix), w = g.div_w.mod(pix, nh);
    const int img = g.div_h.div(nh), h = g.div_h.mod(nh, img);
    return {pix < g.nhw ? img : -1, h + g.pad, w + g.pad};
  }
  SP_LOADER_HD Col col(int t) const {
    const int rs = g.div_k.div(t), k = g.div_k.mod(t, rs);
    const int r = g.div_s.div(rs), s = g.div_s.mod(rs, r);
    return {r, s, k, t < g.rsk};
  }
  // Output pixel (p, q) reaches input (h, w) through tap (r, s) when p * stride - pad + r == h.
  SP_LOADER_HD int64_t offset(const Row& px, const Col& t) const {
    const int ph = px.hp - t.r, pw = px.wp - t.s;
    if (px.img < 0 || !t.valid || ph < 0 || pw < 0) return -1;
    const int p = g.div_stride.div(ph), q = g.div_stride.div(pw);
    if (g.div_stride.mod(ph, p) != 0 || g.div_stride.mod(pw, q) != 0 || p >= g.p || q >= g.q) return -1;
    return ((int64_t(px.img) * g.p + p) * g.q + q) * g.k + t.k;
  }
};

// The rows and columns of a backward-data B operand (the weights as element (c, t)).
struct WeightChannel {
  int c;
};
struct WeightTap {
  int64_t off;  // of w[k, r, s, 0]
  bool valid;
};

// Backward-data B: w[k, r, s, c] as element (c, t), t = (r * S + s) * K + k, contiguous along
// c. vec needs C % 8 == 0.
struct BwdDataWeightLoader : GatherLoader<BwdDataWeightLoader, false> {
  ConvGeom g;
  using Row = WeightChannel;
  using Col = WeightTap;
  SP_LOADER_HD Row row(int c) const { return {c}; }
  SP_LOADER_HD Col col(int t) const {
    const int rs = g.div_k.div(t), k = g.div_k.mod(t, rs);
    return {(int64_t(k) * g.r * g.s + rs) * g.c, t < g.rsk};
  }
  SP_LOADER_HD int64_t offset(const Row& r, const Col& t) const { return r.c < g.c && t.valid ? t.off + r.c : -1; }
};

// ---- Backward data by stride class (kernels/common/conv_stride_classes.h) ---------------------
// One class (a, b) of a strided convolution's input pixels, h = a + stride * i,
// w = b + stride * j, as a dense implicit GEMM: rows pix = (img * hc + i) * wc + j, columns
// t = (rr * sc + ss) * K + k over the class's taps r = r0 + stride * rr, s = s0 + stride * ss.
struct ClassGeom {
  ConvGeom g;
  int hc, wc, r0, s0, rc, sc, dh, dw;
  int m;   // N * hc * wc
  int kc;  // rc * sc * K
  FastDivmod div_hc, div_wc, div_sc;
};

// The class c (with at least one pixel and one tap) of g's convolution.
inline ClassGeom make_class_geom(const ConvGeom& g, const StrideClass& c) {
  ClassGeom cg;
  cg.g = g;
  cg.hc = c.hc, cg.wc = c.wc, cg.r0 = c.r0, cg.s0 = c.s0, cg.rc = c.rc, cg.sc = c.sc, cg.dh = c.dh, cg.dw = c.dw;
  cg.m = int(int64_t(g.n) * c.hc * c.wc), cg.kc = c.rc * c.sc * g.k;
  cg.div_hc = FastDivmod::make(c.hc), cg.div_wc = FastDivmod::make(c.wc), cg.div_sc = FastDivmod::make(c.sc);
  return cg;
}

// A: dy(pix, t) at output pixel (i + dh - rr, j + dw - ss), zero outside the output. vec as
// BwdDataGradLoader's (K % 8 == 0).
struct BwdDataClassGradLoader : GatherLoader<BwdDataClassGradLoader, true> {
  ClassGeom cg;
  struct Row {
    int img;  // -1 past the class's last pixel
    int i, j;
  };
  struct Col {
    int rr, ss, k;
    bool valid;
  };
  SP_LOADER_HD Row row(int pix) const {
    const int ni = cg.div_wc.div(pix), j = cg.div_wc.mod(pix, ni);
    const int img = cg.div_hc.div(ni), i = cg.div_hc.mod(ni, img);
    return {pix < cg.m ? img : -1, i, j};
  }
  SP_LOADER_HD Col col(int t) const {
    const int rs = cg.g.div_k.div(t), k = cg.g.div_k.mod(t, rs);
    const int rr = cg.div_sc.div(rs), ss = cg.div_sc.mod(rs, rr);
    return {rr, ss, k, t < cg.kc};
  }
  SP_LOADER_HD int64_t offset(const Row& px, const Col& t) const {
    const int p = px.i + cg.dh - t.rr, q = px.j + cg.dw - t.ss;
    if (px.img < 0 || !t.valid || p < 0 || p >= cg.g.p || q < 0 || q >= cg.g.q) return -1;
    return ((int64_t(px.img) * cg.g.p + p) * cg.g.q + q) * cg.g.k + t.k;
  }
};

// B: w[k, r0 + stride * rr, s0 + stride * ss, c] as element (c, t), contiguous along c. vec as
// BwdDataWeightLoader's (C % 8 == 0).
struct BwdDataClassWeightLoader : GatherLoader<BwdDataClassWeightLoader, false> {
  ClassGeom cg;
  using Row = WeightChannel;
  using Col = WeightTap;
  SP_LOADER_HD Row row(int c) const { return {c}; }
  SP_LOADER_HD Col col(int t) const {
    const int rs = cg.g.div_k.div(t), k = cg.g.div_k.mod(t, rs);
    const int rr = cg.div_sc.div(rs), ss = cg.div_sc.mod(rs, rr);
    const int r = cg.r0 + cg.g.stride * rr, s = cg.s0 + cg.g.stride * ss;
    return {((int64_t(k) * cg.g.r + r) * cg.g.s + s) * cg.g.c, t < cg.kc};
  }
  SP_LOADER_HD int64_t offset(const Row& r, const Col& t) const { return r.c < cg.g.c && t.valid ? t.off + r.c : -1; }
};

// ---- The data gradient's filter, transposed (dgrad_transposed_filter, conv_bf16.cu) ----------
// A set of filter taps: tap z of the set is the filter's tap (r0 + step * (z / sc)) * S + s0 +
// step * (z % sc). All taps in order (all()), or a stride class's (of_class()). The filter
// transposed over a set is the C x count*K matrix wt[c, z * K + k] = w[k, tap(z), c]: the
// B operand BwdDataWeightLoader / BwdDataClassWeightLoader gather, as a plain matrix.
struct FilterTaps {
  int r0, s0, step, sc;
  int s;  // the filter's S
  int count;
  SP_LOADER_HD int tap(int z) const { return (r0 + step * (z / sc)) * s + s0 + step * (z % sc); }
  static FilterTaps all(const ConvDims& g) { return {0, 0, 1, g.s, g.s, g.r * g.s}; }
  static FilterTaps of_class(const ConvDims& g, const StrideClass& c) {
    return {c.r0, c.s0, g.stride, c.sc, g.s, c.rc * c.sc};
  }
};

}  // namespace sp::kernels::cuda::detail::mma
