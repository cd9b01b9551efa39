// Convolution on NHWC activations and KRSC weights: as im2col + GEMM, or for stride-1
// convolutions reading few channels from padded frames.
//
// The column matrix has one row per output pixel (n, p, q) and one column per filter tap
// (r, s, c), the order of a KRSC filter row, so the weights are used as stored:
//   forward          y[pix, K]    = col[pix, RSC] * w[K, RSC]^T (+ bias)
//   backward data    dcol         = dy[pix, K] * w[K, RSC], gathered back into dx; at stride 1
//                    instead dx = dycol[in pix, RSK] * wt[C, RSK]^T with dycol dy's columns
//                    around each input pixel and wt the filter transposed (a forward GEMM)
//   backward weight  dw[K, RSC]   = sum over chunks of dy[pix, K]^T * col[pix, RSC]; for K <= 32
//                    as dw^T = col^T * dy, transposed at the end (the same sums)
// Stride-1 convolutions reading at most kFramedMaxChannels channels (the stride-1 data gradient
// reads dy's K) skip the columns: see conv_framed and wgrad_framed.
// Images go through in chunks so the buffer stays bounded whatever the batch size.
// A 1x1, stride-1, unpadded convolution needs no im2col: x already is its column matrix.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/row_ops.h"

namespace sp::kernels::cpu {
namespace {

// Column-buffer budget per call. A single image larger than this still forms a chunk of one.
constexpr int64_t kColumnBudgetBytes = int64_t(16) << 20;
// The most channels a stride-1 convolution reads (x's C; for the data gradient dy's K) to run
// framed (conv_framed, wgrad_framed): measured faster up to 32, slower at 64
// (bench/results/cpu-amd-epyc-2core/2026-11-26-cpu-conv-framed.md).
constexpr int64_t kFramedMaxChannels = 32;
// Output channels up to which the weight gradient is computed transposed (measured on the 2-core
// development machine: 1.6x faster at 32 channels, slower at 64; bench_cpu_gemm).
constexpr int64_t kTransposedWgradMaxK = 32;

bool is_pointwise(const Conv2dShape& sh) { return sh.r == 1 && sh.s == 1 && sh.stride == 1 && sh.pad == 0; }

int64_t taps(const Conv2dShape& sh) { return int64_t(sh.r) * sh.s * sh.c; }

// Images per chunk when each image takes row_elems elements of the column buffer. Depends only
// on the shape and T, so the chunking (and with it the summation order of the weight gradient)
// is the same on every run and every thread count.
template <typename T>
int64_t images_per_chunk(int64_t n, int64_t row_elems) {
  const int64_t image_bytes = std::max<int64_t>(1, row_elems * int64_t(sizeof(T)));
  return std::clamp<int64_t>(kColumnBudgetBytes / image_bytes, 1, n);
}
template <typename T>
int64_t images_per_chunk(const Conv2dShape& sh, int64_t row_elems) {
  return images_per_chunk<T>(sh.n, row_elems);
}
// The forward's and the weight gradient's columns: P*Q rows of R*S*C taps per image.
template <typename T>
int64_t images_per_chunk(const Conv2dShape& sh) {
  return images_per_chunk<T>(sh, int64_t(sh.p()) * sh.q() * taps(sh));
}

// The column buffer is reused across calls on the same thread (each CPU stream is a thread):
// allocating it afresh would page-fault megabytes on every convolution.
template <typename T>
T* column_buffer(size_t need) {
  static thread_local std::vector<T> buf;
  if (buf.size() < need) buf.resize(need);
  return buf.data();
}
template <typename T>
T* column_buffer(const Conv2dShape& sh) {
  return column_buffer<T>(size_t(images_per_chunk<T>(sh) * sh.p() * sh.q() * taps(sh)));
}

// The columns of a convolution's implicit GEMM: for images i < images and output pixels (a, b)
// of an out_h x out_w grid,
//   dst[(i, a, b), (r, s, ch)] = src[i, a*step + base + dir*r, b*step + base + dir*s, ch],
// zero where that falls outside the src_h x src_w image. Rows of output pixels are independent,
// so any split works.
struct PatchGeom {
  int64_t out_h, out_w, src_h, src_w, ch;
  int r, s, step, base, dir;
};

template <typename T>
void gather_patches(const PatchGeom& g, int64_t images, const T* src, T* dst) {
  const int64_t row_elems = g.out_w * g.r * g.s * g.ch;
  parallel_for(images * g.out_h, detail::row_grain(row_elems), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t img = row / g.out_h, oh = row % g.out_h;
      const T* si = src + img * g.src_h * g.src_w * g.ch;
      T* d = dst + row * row_elems;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        for (int r = 0; r < g.r; ++r) {
          const int64_t ih = oh * g.step + g.base + g.dir * r;
          for (int s = 0; s < g.s; ++s, d += g.ch) {
            const int64_t iw = ow * g.step + g.base + g.dir * s;
            if (ih < 0 || ih >= g.src_h || iw < 0 || iw >= g.src_w)
              std::fill(d, d + g.ch, T(0));
            else
              std::copy_n(si + (ih * g.src_w + iw) * g.ch, g.ch, d);
          }
        }
      }
    }
  });
}

// col[(i, p, q), (r, s, c)] = x[i, p*stride - pad + r, q*stride - pad + s, c], zero in the
// padding.
template <typename T>
void im2col(const Conv2dShape& sh, int64_t images, const T* x, T* col) {
  gather_patches(PatchGeom{sh.p(), sh.q(), sh.h, sh.w, sh.c, sh.r, sh.s, sh.stride, -sh.pad, 1}, images, x, col);
}

// The adjoint of im2col: dx[i, h, w, c] = sum of every dcol entry that im2col copied from
// x[i, h, w, c]. Written as a gather over input pixels rather than a scatter over output
// pixels so that each dx element has one writer and a fixed (r, s) summation order: the
// result is deterministic under any split, and even a single image spreads over the threads.
// Which output rows and columns reach an input pixel depends on its row (for r) and column (for
// s) alone, so it is worked out once per row and once per call, not per element.
template <typename T>
void col2im(const Conv2dShape& sh, int64_t images, const T* dcol, T* dx) {
  const int64_t P = sh.p(), Q = sh.q(), C = sh.c, rsc = taps(sh);
  // For input column iw and tap s: the output column pw it comes from, or -1.
  std::vector<int> col_from(size_t(sh.w) * size_t(sh.s));
  for (int iw = 0; iw < sh.w; ++iw)
    for (int s = 0; s < sh.s; ++s) {
      const int pw = iw + sh.pad - s;
      col_from[size_t(iw) * sh.s + s] = pw >= 0 && pw % sh.stride == 0 && pw / sh.stride < Q ? pw / sh.stride : -1;
    }
  parallel_for(images * sh.h, detail::row_grain(int64_t(sh.w) * sh.r * sh.s * C), [&](int64_t b, int64_t e) {
    std::vector<int> row_from(size_t(sh.r));
    for (int64_t row = b; row < e; ++row) {
      const int64_t img = row / sh.h;
      const int ih = int(row % sh.h);
      for (int r = 0; r < sh.r; ++r) {
        const int ph = ih + sh.pad - r;
        row_from[size_t(r)] = ph >= 0 && ph % sh.stride == 0 && ph / sh.stride < P ? ph / sh.stride : -1;
      }
      for (int64_t iw = 0; iw < sh.w; ++iw) {
        T* out = dx + (row * sh.w + iw) * C;
        std::fill(out, out + C, T(0));
        for (int r = 0; r < sh.r; ++r) {
          const int ph = row_from[size_t(r)];
          if (ph < 0) continue;
          for (int s = 0; s < sh.s; ++s) {
            const int pw = col_from[size_t(iw) * sh.s + s];
            if (pw < 0) continue;
            const T* src = dcol + ((img * P + ph) * Q + pw) * rsc + (r * sh.s + s) * C;
            for (int64_t c = 0; c < C; ++c) out[c] += src[c];
          }
        }
      }
    }
  });
}

// The data gradient of a stride-1 convolution as a forward convolution of dy: with
//   dcol[(i, h, w), (r, s, k)] = dy[i, h + pad - r, w + pad - s, k]   (zero outside dy)
//   wt[c, (r, s, k)]           = w[k, r, s, c]
// dx[(i, h, w), c] = dcol * wt^T, one GEMM with N = C (for C <= 64 it reads dcol in place:
// gemm.cpp), instead of a GEMM into R*S*C columns and the col2im gather.
template <typename T>
void dgrad_im2col(const Conv2dShape& sh, int64_t images, const T* dy, T* dcol) {
  gather_patches(PatchGeom{sh.h, sh.w, sh.p(), sh.q(), sh.k, sh.r, sh.s, 1, sh.pad, -1}, images, dy, dcol);
}

// wt[c, (r, s, k)] = w[k, r, s, c] into a per-thread buffer; flipped, w[k, R-1-r, S-1-s, c]
// (the data gradient as a framed forward convolution of dy).
template <typename T>
const T* transposed_filter(const Conv2dShape& sh, const T* w, bool flipped = false) {
  static thread_local std::vector<T> wt;
  const int64_t rs = int64_t(sh.r) * sh.s, K = sh.k, C = sh.c;
  wt.resize(size_t(C * rs * K));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t t = 0; t < rs; ++t)
      for (int64_t c = 0; c < C; ++c)
        wt[size_t((c * rs + (flipped ? rs - 1 - t : t)) * K + k)] = w[(k * rs + t) * C + c];
  return wt.data();
}

// Whether a convolution reading `ch` channels runs framed (below) instead of through columns:
// at stride 1 with few channels a column row (R*S*ch values) is short, the gather of every
// pixel's patch costs as much as the GEMM on it, and the framed form skips it. With more
// channels the column GEMM is already compute-bound, and the frame's extra rows and columns
// would cost more.
bool framed(const Conv2dShape& sh, int64_t ch) {
  return sh.stride == 1 && (sh.r > 1 || sh.s > 1) && ch <= kFramedMaxChannels;
}

// Images of h x w pixels of C channels into frames of Hp x Wp pixels, at row `top` and column
// `left`, zero around them.
template <typename T>
void to_frames(int64_t images, const T* src, int64_t h, int64_t w, int64_t C, int64_t top, int64_t left, int64_t Hp,
               int64_t Wp, T* dst) {
  parallel_for(images * Hp, detail::row_grain(Wp * C), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t img = row / Hp, y = row % Hp - top;
      T* d = dst + row * Wp * C;
      if (y < 0 || y >= h) {
        std::fill(d, d + Wp * C, T(0));
        continue;
      }
      std::fill(d, d + left * C, T(0));
      std::copy_n(src + (img * h + y) * w * C, w * C, d + left * C);
      std::fill(d + (left + w) * C, d + Wp * C, T(0));
    }
  });
}

// A stride-1 convolution from frames, without columns:
//   dst[i, p, q, o] = sum over r, s, c of src[i, p - pad_h + r, q - pad_w + s, c] * f[o, r, s, c]
//                     (+ bias[o] when bias is given)
// (zero outside src). The source goes once into a zero-padded frame of Hp x Wp pixels per
// image, where the S taps of filter row r at an output position are S*C consecutive values. So
// filter row r is one GEMM over all frame positions m, whose A rows start C values apart (they
// overlap: lda = C < S*C, which gemm allows) at the frame's pixel m + r*Wp, into an output frame
// of the same positions; the positions past the output's width or height are computed and
// dropped. The sums run over r, then s and c, in a fixed order. The frames live in the column
// buffer.
template <typename T>
void conv_framed(int64_t n, const T* src, int64_t h, int64_t w, int64_t C, const T* f, int64_t O, int R, int S,
                 int pad_h, int pad_w, const T* bias, T* dst) {
  const int64_t Hp = h + 2 * pad_h, Wp = w + 2 * pad_w, P = Hp - R + 1, Q = Wp - S + 1, frame = Hp * Wp;
  const int64_t chunk = images_per_chunk<T>(n, frame * (C + O));
  T* in = column_buffer<T>(size_t(chunk * frame * (C + O)));
  T* out = in + chunk * frame * C;
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t images = std::min(chunk, n - i0);
    to_frames(images, src + i0 * h * w * C, h, w, C, pad_h, pad_w, Hp, Wp, in);
    const int64_t M = images * frame - ((R - 1) * Wp + (S - 1));
    for (int r = 0; r < R; ++r)
      gemm(false, true, M, O, int64_t(S) * C, T(1), in + r * Wp * C, C, f + int64_t(r) * S * C, int64_t(R) * S * C,
           T(r == 0 ? 0 : 1), out, O);
    parallel_for(images * P, detail::row_grain(Q * O), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t img = row / P, p = row % P;
        const T* o = out + (img * frame + p * Wp) * O;
        T* d = dst + ((i0 + img) * P + p) * Q * O;
        if (bias)
          for (int64_t px = 0; px < Q; ++px)
            for (int64_t j = 0; j < O; ++j) d[px * O + j] = o[px * O + j] + bias[j];
        else
          std::copy_n(o, Q * O, d);
      }
    });
  }
}

// Where a weight gradient accumulates: dw itself, or for few output channels (K <=
// kTransposedWgradMaxK) dw^T[RSC, K] in a per-thread buffer, which puts the channels in the
// GEMM's N so that it reads the other operand in place (gemm.cpp); finish() then transposes it
// into dw. Either way each sum runs over the pixels in the same blocks and order, with the
// products' factors swapped: the same bits.
template <typename T>
struct WgradTarget {
  int64_t K, rsc;
  T* dw;
  bool transposed = K <= kTransposedWgradMaxK;
  T* dwt = transposed ? buffer(size_t(rsc * K)) : nullptr;

  static T* buffer(size_t n) {
    static thread_local std::vector<T> b;
    b.resize(n);
    return b.data();
  }
  void finish() const {
    if (transposed)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t t = 0; t < rsc; ++t) dw[k * rsc + t] = dwt[t * K + k];
  }
};

// The weight gradient of a stride-1 convolution from frames (as conv_framed): x in its padded
// frame, dy in a frame of the same size with zeros past the output's width and height, and for
// filter row r
//   dw[k, (r, s, c)] = sum over frame positions m of dy_frame[m, k] * x_frame[m + r*Wp, (s, c)]
// (x_frame's rows overlapping as in conv_framed), one GEMM per r over the positions of each
// chunk of images, accumulated over the chunks; transposed for few output channels, as the
// column form is (conv2d_backward_weight).
template <typename T>
void wgrad_framed(const Conv2dShape& sh, const T* x, const T* dy, T* dw) {
  const int64_t R = sh.r, S = sh.s, C = sh.c, K = sh.k, pad = sh.pad;
  const int64_t Hp = sh.h + 2 * pad, Wp = sh.w + 2 * pad, P = sh.p(), Q = sh.q(), frame = Hp * Wp;
  const int64_t per_image = frame * (C + K), rsc = R * S * C;
  const int64_t chunk = images_per_chunk<T>(sh.n, per_image);
  T* in = column_buffer<T>(size_t(chunk * per_image));
  T* grad = in + chunk * frame * C;
  const WgradTarget<T> target{K, rsc, dw};
  for (int64_t i0 = 0; i0 < sh.n; i0 += chunk) {
    const int64_t images = std::min(chunk, sh.n - i0);
    const T beta = i0 == 0 ? T(0) : T(1);
    to_frames(images, x + i0 * sh.h * sh.w * C, sh.h, sh.w, C, pad, pad, Hp, Wp, in);
    to_frames(images, dy + i0 * P * Q * K, P, Q, K, 0, 0, Hp, Wp, grad);
    const int64_t M = images * frame - ((R - 1) * Wp + (S - 1));
    for (int64_t r = 0; r < R; ++r) {
      const T* a = in + r * Wp * C;
      if (target.transposed)
        gemm(true, false, S * C, K, M, T(1), a, C, grad, K, beta, target.dwt + r * S * C * K, K);
      else
        gemm(true, false, K, S * C, M, T(1), grad, K, a, C, beta, dw + r * S * C, rsc);
    }
  }
  target.finish();
}

}  // namespace

template <typename T>
void conv2d_forward(const Conv2dShape& sh, const T* x, const T* w, const T* bias, T* y) {
  const int64_t PQ = int64_t(sh.p()) * sh.q(), K = sh.k, rsc = taps(sh);
  if (framed(sh, sh.c)) {
    conv_framed(sh.n, x, sh.h, sh.w, sh.c, w, K, sh.r, sh.s, sh.pad, sh.pad, bias, y);
    return;
  }
  if (bias) detail::broadcast_rows(sh.n * PQ, K, bias, y);
  const T beta = bias ? T(1) : T(0);
  if (is_pointwise(sh)) {
    gemm(false, true, sh.n * PQ, K, rsc, T(1), x, rsc, w, rsc, beta, y, K);
    return;
  }
  const int64_t chunk = images_per_chunk<T>(sh);
  T* col = column_buffer<T>(sh);
  for (int64_t i0 = 0; i0 < sh.n; i0 += chunk) {
    const int64_t images = std::min<int64_t>(chunk, sh.n - i0);
    im2col(sh, images, x + i0 * sh.h * sh.w * sh.c, col);
    gemm(false, true, images * PQ, K, rsc, T(1), col, rsc, w, rsc, beta, y + i0 * PQ * K, K);
  }
}

template <typename T>
void conv2d_backward_data(const Conv2dShape& sh, const T* dy, const T* w, T* dx, T beta) {
  if (beta != T(0)) {
    // The gradient into a buffer of this thread's (kept between calls, as the column buffer),
    // then added.
    // (The workers see the buffer through `grad`: a thread_local named in their lambda would be
    // their own.)
    static thread_local std::vector<T> buffer;
    if (buffer.size() < size_t(sh.x_size())) buffer.resize(size_t(sh.x_size()));
    T* const grad = buffer.data();
    conv2d_backward_data(sh, dy, w, grad, T(0));
    parallel_for(sh.x_size(), 16384, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dx[i] = grad[i] + beta * dx[i];
    });
    return;
  }
  const int64_t PQ = int64_t(sh.p()) * sh.q(), K = sh.k, rsc = taps(sh);
  if (is_pointwise(sh)) {
    gemm(false, false, sh.n * PQ, rsc, K, T(1), dy, K, w, rsc, T(0), dx, rsc);
    return;
  }
  // As a framed forward convolution of dy with the flipped, transposed filter, padded by R-1-pad
  // and S-1-pad (which padding wider than the filter would make negative).
  if (framed(sh, K) && sh.pad < sh.r && sh.pad < sh.s) {
    conv_framed(sh.n, dy, sh.p(), sh.q(), K, transposed_filter(sh, w, true), int64_t(sh.c), sh.r, sh.s,
                sh.r - 1 - sh.pad, sh.s - 1 - sh.pad, static_cast<const T*>(nullptr), dx);
    return;
  }
  if (sh.stride == 1) {
    const int64_t HW = int64_t(sh.h) * sh.w, rsk = int64_t(sh.r) * sh.s * K;
    const T* wt = transposed_filter(sh, w);
    const int64_t chunk = images_per_chunk<T>(sh, HW * rsk);
    T* dcol = column_buffer<T>(size_t(chunk * HW * rsk));
    for (int64_t i0 = 0; i0 < sh.n; i0 += chunk) {
      const int64_t images = std::min<int64_t>(chunk, sh.n - i0);
      dgrad_im2col(sh, images, dy + i0 * PQ * K, dcol);
      gemm(false, true, images * HW, sh.c, rsk, T(1), dcol, rsk, wt, rsk, T(0), dx + i0 * HW * sh.c, sh.c);
    }
    return;
  }
  const int64_t chunk = images_per_chunk<T>(sh);
  T* dcol = column_buffer<T>(sh);
  for (int64_t i0 = 0; i0 < sh.n; i0 += chunk) {
    const int64_t images = std::min<int64_t>(chunk, sh.n - i0);
    gemm(false, false, images * PQ, rsc, K, T(1), dy + i0 * PQ * K, K, w, rsc, T(0), dcol, rsc);
    col2im(sh, images, dcol, dx + i0 * sh.h * sh.w * sh.c);
  }
}

template <typename T>
void conv2d_backward_weight(const Conv2dShape& sh, const T* x, const T* dy, T* dw, T* dbias) {
  const int64_t PQ = int64_t(sh.p()) * sh.q(), K = sh.k, rsc = taps(sh);
  if (dbias) {
    std::vector<double> sums(K);
    detail::column_sums(
        sh.n * PQ, K, 1,
        [&](int64_t b, int64_t e, double* acc) {
          for (int64_t i = b; i < e; ++i)
            for (int64_t k = 0; k < K; ++k) acc[k] += dy[i * K + k];
        },
        sums.data());
    for (int64_t k = 0; k < K; ++k) dbias[k] = T(sums[k]);
  }
  if (is_pointwise(sh)) {
    gemm(true, false, K, rsc, sh.n * PQ, T(1), dy, K, x, rsc, T(0), dw, rsc);
    return;
  }
  if (framed(sh, sh.c)) {
    wgrad_framed(sh, x, dy, dw);
    return;
  }
  // dw[K, RSC] = dy^T * col, or dw^T[RSC, K] = col^T * dy (WgradTarget).
  const int64_t chunk = images_per_chunk<T>(sh);
  T* col = column_buffer<T>(sh);
  const WgradTarget<T> target{K, rsc, dw};
  for (int64_t i0 = 0; i0 < sh.n; i0 += chunk) {
    const int64_t images = std::min<int64_t>(chunk, sh.n - i0);
    const T beta = i0 == 0 ? T(0) : T(1);
    im2col(sh, images, x + i0 * sh.h * sh.w * sh.c, col);
    if (target.transposed)
      gemm(true, false, rsc, K, images * PQ, T(1), col, rsc, dy + i0 * PQ * K, K, beta, target.dwt, K);
    else
      gemm(true, false, K, rsc, images * PQ, T(1), dy + i0 * PQ * K, K, col, rsc, beta, dw, rsc);
  }
  target.finish();
}

#define SP_INSTANTIATE_CONV(T)                                                           \
  template void conv2d_forward<T>(const Conv2dShape&, const T*, const T*, const T*, T*); \
  template void conv2d_backward_data<T>(const Conv2dShape&, const T*, const T*, T*, T);  \
  template void conv2d_backward_weight<T>(const Conv2dShape&, const T*, const T*, T*, T*);
SP_INSTANTIATE_CONV(float)
SP_INSTANTIATE_CONV(double)
#undef SP_INSTANTIATE_CONV

}  // namespace sp::kernels::cpu
