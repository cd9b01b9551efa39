// The per-element work of the layout kernels in elementwise.cu: the option-A shortcut, max
// pooling (forward, the backward's argmax pass and its gather) and the global average pool, the
// gathers W channels at a time (W = 1, or 4 with float4/int4 accesses); and conv_bf16.cu's
// scatter of a stride class's data gradient (W = 1, or 8 bf16 with uint4 accesses). Each kernel is a
// grid-stride loop calling one of the functions below for chunk (element) idx of its output.
// Plain C++ that compiles for the host as well (SP_GATHER_HD; on the host the W = 4 accesses are
// four scalar ones), so the CPU tests (tests/test_layout_gathers.cpp) run every chunk of these
// kernels and compare them with the CPU reference bit for bit without a GPU.
#pragma once

#include <cstdint>

#include "kernels/common/shapes.h"

#if defined(__CUDACC__)
#define SP_GATHER_HD __host__ __device__ __forceinline__
#else
#define SP_GATHER_HD inline
#endif
#if defined(__CUDA_ARCH__)  // nvcc's device pass (its host compiler does not know the pragma)
#define SP_GATHER_UNROLL _Pragma("unroll")
#else
#define SP_GATHER_UNROLL
#endif

namespace sp::kernels::cuda::detail {

// The coordinates of element idx of an NHWC tensor [.., rows, cols, c]: its channel, column,
// row and image.
struct NhwcIndex {
  int ch, col, row;
  int64_t img;
};
SP_GATHER_HD NhwcIndex nhwc_index(int64_t idx, int c, int cols, int rows) {
  NhwcIndex x;
  if (idx <= INT32_MAX) {  // 32-bit divisions (a 64-bit one is a long call sequence)
    uint32_t rest = uint32_t(idx) / uint32_t(c);
    x.ch = int(uint32_t(idx) - rest * uint32_t(c));
    uint32_t next = rest / uint32_t(cols);
    x.col = int(rest - next * uint32_t(cols));
    rest = next / uint32_t(rows);
    x.row = int(next - rest * uint32_t(rows));
    x.img = int64_t(rest);
    return x;
  }
  x.ch = int(idx % c);
  int64_t rest = idx / c;
  x.col = int(rest % cols);
  rest /= cols;
  x.row = int(rest % rows);
  x.img = rest / rows;
  return x;
}

#if defined(__CUDA_ARCH__)
// The 16-byte vector of four T.
template <typename T>
struct Vec4;
template <>
struct Vec4<float> {
  using type = float4;
};
template <>
struct Vec4<int> {
  using type = int4;
};
#endif

// W consecutive floats at p (one 16-byte access on the device when W is 4: p 16-byte aligned),
// or zeros where p is null (the shortcut's padding and skipped pixels).
template <int W>
SP_GATHER_HD void load_w(const float* p, float (&v)[W]) {
#if defined(__CUDA_ARCH__)
  if constexpr (W == 4) {
    const float4 t = p ? *reinterpret_cast<const float4*>(p) : make_float4(0.f, 0.f, 0.f, 0.f);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else
#endif
  {
    SP_GATHER_UNROLL
    for (int e = 0; e < W; ++e) v[e] = p ? p[e] : 0.f;
  }
}
// W consecutive ints at p (never null: the argmax indices).
template <int W>
SP_GATHER_HD void load_w(const int* p, int (&v)[W]) {
#if defined(__CUDA_ARCH__)
  if constexpr (W == 4) {
    const int4 t = *reinterpret_cast<const int4*>(p);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else
#endif
  {
    SP_GATHER_UNROLL
    for (int e = 0; e < W; ++e) v[e] = p[e];
  }
}
// W consecutive tap indices at p (never null), as bytes (one 4-byte access on the device when W
// is 4: p 4-byte aligned) or ints.
template <int W>
SP_GATHER_HD void load_w(const uint8_t* p, int (&v)[W]) {
#if defined(__CUDA_ARCH__)
  if constexpr (W == 4) {
    const uint32_t t = *reinterpret_cast<const uint32_t*>(p);
    v[0] = int(t & 0xff), v[1] = int(t >> 8 & 0xff), v[2] = int(t >> 16 & 0xff), v[3] = int(t >> 24);
  } else
#endif
  {
    SP_GATHER_UNROLL
    for (int e = 0; e < W; ++e) v[e] = p[e];
  }
}
template <int W>
SP_GATHER_HD void store_taps(uint8_t* p, const int (&v)[W]) {
#if defined(__CUDA_ARCH__)
  if constexpr (W == 4) {
    *reinterpret_cast<uint32_t*>(p) = (uint32_t(v[0]) & 0xffu) | (uint32_t(v[1]) & 0xffu) << 8 |
                                      (uint32_t(v[2]) & 0xffu) << 16 | uint32_t(v[3]) << 24;
  } else
#endif
  {
    SP_GATHER_UNROLL
    for (int e = 0; e < W; ++e) p[e] = uint8_t(v[e]);
  }
}
// Stores W consecutive elements at p (16-byte aligned when W is 4).
template <int W, typename T>
SP_GATHER_HD void store_w(T* p, const T (&v)[W]) {
#if defined(__CUDA_ARCH__)
  if constexpr (W == 4) {
    using V = typename Vec4<T>::type;
    *reinterpret_cast<V*>(p) = V{v[0], v[1], v[2], v[3]};
  } else
#endif
  {
    SP_GATHER_UNROLL
    for (int e = 0; e < W; ++e) p[e] = v[e];
  }
}

// ---- Option-A shortcut -----------------------------------------------------------------------
// Forward gathers each y element from x (or zero in the padded channels); backward gathers
// each dx element from dy (zero at the pixels the stride skips). W is 4 only where c_in, c_out
// and lo are multiples of 4, so a chunk of y is all from x or all padding and a chunk of dx all
// from dy or all zero. p_out, q_out and lo are ShortcutAShape's p(), q() and pad_lo() (host code).
template <int W>
SP_GATHER_HD void shortcut_a_forward_chunk(const ShortcutAShape& sh, int p_out, int q_out, int lo, int64_t idx,
                                           const float* x, float* y) {
  const NhwcIndex o = nhwc_index(idx, sh.c_out / W, q_out, p_out);
  const int src = o.ch * W - lo;
  float v[W];
  load_w<W>(src >= 0 && src < sh.c_in
                ? x + ((o.img * sh.h + int64_t(o.row) * sh.stride) * sh.w + int64_t(o.col) * sh.stride) * sh.c_in + src
                : nullptr,
            v);
  store_w<W>(y + idx * W, v);
}

template <int W>
SP_GATHER_HD void shortcut_a_backward_chunk(const ShortcutAShape& sh, int p_out, int q_out, int lo, int64_t idx,
                                            const float* dy, float* dx) {
  const NhwcIndex i = nhwc_index(idx, sh.c_in / W, sh.w, sh.h);
  float v[W];
  load_w<W>(i.row % sh.stride == 0 && i.col % sh.stride == 0
                ? dy + ((i.img * p_out + i.row / sh.stride) * q_out + i.col / sh.stride) * sh.c_out + lo + i.ch * W
                : nullptr,
            v);
  store_w<W>(dx + idx * W, v);
}

// ---- Max pooling -----------------------------------------------------------------------------
// Padding acts as -infinity: taps outside the image are skipped (pad < window, so every
// window has a tap). The maximum is the first one in row-major window order (strictly
// greater replaces), unless the window holds a NaN, which wins (the last NaN: PyTorch's rule);
// the backward routes to the same element, as on the CPU (kernels/cpu/pool.cpp, takes_over).
struct PoolGeom {
  int h, w, c, window, stride, pad, p, q;
};

// The first maximum (or last NaN) of window (p, q) in channels ch .. ch + W - 1 of image xi, per channel: its
// value and its tap index in the window (r * window + s). KW > 0 is the window's size known at compile time: every
// tap inside the image is loaded before the first comparison, so the loads are in flight together (compared as
// each came, with a branch per tap and per channel, the SASS issued them one after another: nine round trips per
// window of 3 x 3); 0 reads g.window and loads each tap as it compares it. The taps are compared in row-major
// order with the same comparisons either way.
template <int W, int KW>
SP_GATHER_HD void window_argmax(const PoolGeom& g, const float* xi, int p, int q, int ch, int (&arg)[W],
                                float (&best)[W]) {
  SP_GATHER_UNROLL
  for (int e = 0; e < W; ++e) arg[e] = -1, best[e] = 0.f;
  const int h0 = p * g.stride - g.pad, w0 = q * g.stride - g.pad;
  const auto inside = [&](int r, int s) { return h0 + r >= 0 && h0 + r < g.h && w0 + s >= 0 && w0 + s < g.w; };
  const auto tap_ptr = [&](int r, int s) { return xi + (int64_t(h0 + r) * g.w + (w0 + s)) * g.c + ch; };
  const auto take = [&](int t, const float(&v)[W]) {
    SP_GATHER_UNROLL
    for (int e = 0; e < W; ++e)
      if (arg[e] < 0 || v[e] > best[e] || v[e] != v[e]) {  // as the CPU's takes_over: NaN wins
        best[e] = v[e];
        arg[e] = t;
      }
  };
  if constexpr (KW > 0) {
    float v[KW * KW][W] = {};  // those outside the image are never read
    bool in[KW * KW];
    SP_GATHER_UNROLL
    for (int t = 0; t < KW * KW; ++t) {
      in[t] = inside(t / KW, t % KW);
      if (in[t]) load_w<W>(tap_ptr(t / KW, t % KW), v[t]);
    }
    SP_GATHER_UNROLL
    for (int t = 0; t < KW * KW; ++t)
      if (in[t]) take(t, v[t]);
  } else {
    for (int r = 0; r < g.window; ++r)
      for (int s = 0; s < g.window; ++s) {
        if (!inside(r, s)) continue;
        float v[W];
        load_w<W>(tap_ptr(r, s), v);
        take(r * g.window + s, v);
      }
  }
}

// The window of chunk idx of y: window_argmax at its image, row, column and channels.
template <int W, int KW>
SP_GATHER_HD void chunk_argmax(const PoolGeom& g, int64_t idx, const float* x, int (&arg)[W], float (&best)[W]) {
  const NhwcIndex o = nhwc_index(idx, g.c / W, g.q, g.p);
  window_argmax<W, KW>(g, x + o.img * g.h * g.w * g.c, o.row, o.col, o.ch * W, arg, best);
}

// Chunk idx of y: the window's maximum.
template <int W, int KW>
SP_GATHER_HD void maxpool_forward_chunk(const PoolGeom& g, int64_t idx, const float* x, float* y) {
  int arg[W];
  float best[W];
  chunk_argmax<W, KW>(g, idx, x, arg, best);
  store_w<W>(y + idx * W, best);
}

// The backward in two passes: first every window's argmax (its tap index, r * window + s) into
// a scratch array shaped like y, then each dx element sums dy over the windows that contain it
// and chose it, in row-major window order (the order the CPU accumulates in). Each window's
// comparisons are made once, not once per element it covers (up to 4 for 3x3 stride 2, whose
// one-pass form ran at 0.07 of the copy on an H100). The tap indices are bytes where the window
// has at most 225 taps (15 x 15: A = uint8_t, 255 left for a window with no tap; else int): a
// quarter of the scratch traffic of the pixel indices they replace, 2.375 against 2.75 passes
// over x for 3x3 stride 2 (2.25 the least).
template <int W, int KW, typename A>
SP_GATHER_HD void maxpool_argmax_chunk(const PoolGeom& g, int64_t idx, const float* x, A* arg) {
  int a[W];
  float best[W];
  chunk_argmax<W, KW>(g, idx, x, a, best);
  if constexpr (sizeof(A) == 1)
    store_taps<W>(arg + idx * W, a);
  else
    store_w<W>(arg + idx * W, a);
}

// Chunk idx of dx: the windows containing pixel (h, w) are p in [ceil((h + pad - window + 1) /
// stride), (h + pad) / stride] within 0..P-1, and likewise q. KMax > 0: at most KMax windows
// contain a pixel along each axis (ceil(window / stride) <= KMax: 2 for 3 x 3 stride 2, 1 where
// the windows do not overlap), and the taps and gradients of all of them are loaded before the
// first is added; summed as each came, a window's tap and gradient were loaded together but the
// next window's only once that tap had arrived and been compared (SASS): one round trip per
// window, up to four. 0: the windows one after another. Either way the sum
// takes the matching windows in row-major order: the same bits (a window that did not choose the
// pixel adds 0, which leaves the sum as it was: it starts at +0 and can never be -0, since a sum
// rounded to nearest is -0 only when both terms are; this needs subnormals kept, not flushed to
// zero: the build uses no -ftz or fast math).
template <int W, int KMax, typename A>
SP_GATHER_HD void maxpool_gather_chunk(const PoolGeom& g, int64_t idx, const A* arg, const float* dy, float* dx) {
  const NhwcIndex i = nhwc_index(idx, g.c / W, g.w, g.h);
  const int ch = i.ch * W, w = i.col, h = i.row;
  const int64_t out0 = i.img * g.p * g.q * g.c;
  const int h_lo = h + g.pad - g.window + 1, w_lo = w + g.pad - g.window + 1;
  const int p_begin = h_lo <= 0 ? 0 : (h_lo + g.stride - 1) / g.stride;
  const int q_begin = w_lo <= 0 ? 0 : (w_lo + g.stride - 1) / g.stride;
  const int p_last = (h + g.pad) / g.stride, q_last = (w + g.pad) / g.stride;
  const int p_end = p_last < g.p - 1 ? p_last : g.p - 1, q_end = q_last < g.q - 1 ? q_last : g.q - 1;
  // Window (p, q): its offset in y and this pixel's tap in it.
  const auto offset = [&](int p, int q) { return out0 + (int64_t(p) * g.q + q) * g.c + ch; };
  const auto self = [&](int p, int q) {
    return (h - (p * g.stride - g.pad)) * g.window + (w - (q * g.stride - g.pad));
  };
  float sum[W];
  SP_GATHER_UNROLL
  for (int e = 0; e < W; ++e) sum[e] = 0.f;
  const auto add = [&](int me, const int(&a)[W], const float(&d)[W]) {
    SP_GATHER_UNROLL
    for (int e = 0; e < W; ++e) sum[e] += a[e] == me ? d[e] : 0.f;
  };
  if constexpr (KMax > 0) {
    int a[KMax * KMax][W];
    float d[KMax * KMax][W];
    bool in[KMax * KMax];
    // Without a branch: a window past the end reads the image's first one instead (its values
    // are not used), so nothing orders the loads.
    SP_GATHER_UNROLL
    for (int k = 0; k < KMax * KMax; ++k) {
      const int p = p_begin + k / KMax, q = q_begin + k % KMax;
      in[k] = p <= p_end && q <= q_end;
      const int64_t o = in[k] ? offset(p, q) : out0 + ch;
      load_w<W>(arg + o, a[k]);
      load_w<W>(dy + o, d[k]);
    }
    SP_GATHER_UNROLL
    for (int k = 0; k < KMax * KMax; ++k)
      if (in[k]) add(self(p_begin + k / KMax, q_begin + k % KMax), a[k], d[k]);
  } else {
    for (int p = p_begin; p <= p_end; ++p)
      for (int q = q_begin; q <= q_end; ++q) {
        int a[W];
        float d[W];
        load_w<W>(arg + offset(p, q), a);
        load_w<W>(dy + offset(p, q), d);
        add(self(p, q), a, d);
      }
  }
  store_w<W>(dx + idx * W, sum);
}

// ---- Global average pool ---------------------------------------------------------------------
// Element idx = (image, channel) of y [n, c]: the mean of its hw pixels, summed in order in
// double (the CPU's order). There are few threads (n * c: 8192 for ResNet-20 at batch 128), so
// each issues its loads in batches of kAvgBatch before adding them, in order, to keep more of them
// in flight.
constexpr int kAvgBatch = 16;
SP_GATHER_HD void global_avgpool_forward_element(int64_t hw, int64_t c, int64_t idx, const float* x, float* y) {
  const int64_t img = idx / c, j = idx % c;
  const float* xi = x + img * hw * c + j;
  double acc = 0.0;
  int64_t i = 0;
  for (; i + kAvgBatch <= hw; i += kAvgBatch) {
    float v[kAvgBatch];
    SP_GATHER_UNROLL
    for (int e = 0; e < kAvgBatch; ++e) v[e] = xi[(i + e) * c];
    SP_GATHER_UNROLL
    for (int e = 0; e < kAvgBatch; ++e) acc += v[e];
  }
  for (; i < hw; ++i) acc += xi[i * c];
  y[idx] = float(acc / double(hw));
}

// Chunk idx of dx [n, hw, c]: dy of its image and channels over hw (the CPU's quotient). cw is
// c / W, image hw * cw, narrow whether image fits in 32 bits (32-bit divisions where the indices
// allow them).
template <int W>
SP_GATHER_HD void global_avgpool_backward_chunk(int64_t cw, int64_t image, bool narrow, float d, int64_t idx,
                                                const float* dy, float* dx) {
  const int64_t src = narrow && idx <= INT32_MAX
                          ? int64_t(uint32_t(idx) / uint32_t(image)) * cw + uint32_t(idx) % uint32_t(cw)
                          : idx / image * cw + idx % cw;
  float v[W];
  load_w<W>(dy + src * W, v);
  SP_GATHER_UNROLL
  for (int e = 0; e < W; ++e) v[e] /= d;
  store_w<W>(dx + idx * W, v);
}

// ---- Stride-class scatter (conv_bf16.cu) ------------------------------------------------------
// W consecutive bf16 (their bits) from p to q, or zeros where p is null: one 16-byte access on
// the device when W is 8 (p and q 16-byte aligned).
template <int W>
SP_GATHER_HD void copy_bf16_w(const uint16_t* p, uint16_t* q) {
#if defined(__CUDA_ARCH__)
  if constexpr (W == 8) {
    *reinterpret_cast<uint4*>(q) = p ? *reinterpret_cast<const uint4*>(p) : make_uint4(0u, 0u, 0u, 0u);
  } else
#endif
  {
    SP_GATHER_UNROLL
    for (int e = 0; e < W; ++e) q[e] = p ? p[e] : uint16_t(0);
  }
}

// Where chunk idx (W channels) of stride class (a, b)'s dense rows, (img * hc + i) * wc + j of c
// channels (kernels/common/conv_stride_classes.h), sits in dx [.., h, w, c]: at input pixel
// (img, a + stride * i, b + stride * j); the element offset of its first channel.
template <int W>
SP_GATHER_HD int64_t class_chunk_offset(int64_t idx, int c, int h, int w, int stride, int a, int b, int hc, int wc) {
  const NhwcIndex o = nhwc_index(idx, c / W, wc, hc);
  const int64_t pixel = (o.img * h + a + int64_t(stride) * o.row) * w + b + int64_t(stride) * o.col;
  return pixel * c + int64_t(o.ch) * W;
}

// Chunk idx of the class's dense data gradient src to its place in dx; zeros where src is null
// (a class no tap reaches). W is 8 only where c % 8 == 0 and src and dx are 16-byte aligned.
template <int W>
SP_GATHER_HD void scatter_class_chunk(const uint16_t* src, uint16_t* dx, int64_t idx, int c, int h, int w, int stride,
                                      int a, int b, int hc, int wc) {
  copy_bf16_w<W>(src ? src + idx * W : nullptr, dx + class_chunk_offset<W>(idx, c, h, w, stride, a, b, hc, wc));
}

// The reverse: chunk idx of the class's pixels of dx into its dense rows dst (where a class
// accumulates into dx through the scratch, the scratch first holds the values it adds to).
template <int W>
SP_GATHER_HD void gather_class_chunk(const uint16_t* dx, uint16_t* dst, int64_t idx, int c, int h, int w, int stride,
                                     int a, int b, int hc, int wc) {
  copy_bf16_w<W>(dx + class_chunk_offset<W>(idx, c, h, w, stride, a, b, hc, wc), dst + idx * W);
}

}  // namespace sp::kernels::cuda::detail
