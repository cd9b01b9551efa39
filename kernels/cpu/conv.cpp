// Convolution as im2col + GEMM on NHWC activations and KRSC weights.
//
// The column matrix has one row per output pixel (n, p, q) and one column per filter tap
// (r, s, c), the order of a KRSC filter row, so the weights are used as stored:
//   forward          y[pix, K]    = col[pix, RSC] * w[K, RSC]^T (+ bias)
//   backward data    dcol         = dy[pix, K] * w[K, RSC], gathered back into dx
//   backward weight  dw[K, RSC]   = sum over chunks of dy[pix, K]^T * col[pix, RSC]
// Images go through in chunks so the column buffer stays bounded whatever the batch size.
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

bool is_pointwise(const Conv2dShape& sh) { return sh.r == 1 && sh.s == 1 && sh.stride == 1 && sh.pad == 0; }

int64_t taps(const Conv2dShape& sh) { return int64_t(sh.r) * sh.s * sh.c; }

// Depends only on the shape and T, so the chunking (and with it the summation order of the
// weight gradient) is the same on every run and every thread count.
template <typename T>
int64_t images_per_chunk(const Conv2dShape& sh) {
  const int64_t image_bytes = int64_t(sh.p()) * sh.q() * taps(sh) * int64_t(sizeof(T));
  return std::clamp<int64_t>(kColumnBudgetBytes / image_bytes, 1, sh.n);
}

// The column buffer is reused across calls on the same thread (each CPU stream is a thread):
// allocating it afresh would page-fault megabytes on every convolution.
template <typename T>
T* column_buffer(const Conv2dShape& sh) {
  static thread_local std::vector<T> buf;
  const size_t need = size_t(images_per_chunk<T>(sh) * sh.p() * sh.q() * taps(sh));
  if (buf.size() < need) buf.resize(need);
  return buf.data();
}

// col[(i, p, q), (r, s, c)] = x[i, p*stride - pad + r, q*stride - pad + s, c], zero in the
// padding, for images i < images. Rows of output pixels are independent, so any split works.
template <typename T>
void im2col(const Conv2dShape& sh, int64_t images, const T* x, T* col) {
  const int64_t P = sh.p(), Q = sh.q(), C = sh.c, rsc = taps(sh);
  parallel_for(images * P, detail::row_grain(Q * rsc), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t img = row / P, p = row % P;
      const T* xi = x + img * sh.h * sh.w * C;
      T* dst = col + row * Q * rsc;
      for (int64_t q = 0; q < Q; ++q) {
        for (int r = 0; r < sh.r; ++r) {
          const int64_t ih = p * sh.stride - sh.pad + r;
          for (int s = 0; s < sh.s; ++s, dst += C) {
            const int64_t iw = q * sh.stride - sh.pad + s;
            if (ih < 0 || ih >= sh.h || iw < 0 || iw >= sh.w)
              std::fill(dst, dst + C, T(0));
            else
              std::copy_n(xi + (ih * sh.w + iw) * C, C, dst);
          }
        }
      }
    }
  });
}

// The adjoint of im2col: dx[i, h, w, c] = sum of every dcol entry that im2col copied from
// x[i, h, w, c]. Written as a gather over input pixels rather than a scatter over output
// pixels so that each dx element has one writer and a fixed (r, s) summation order: the
// result is deterministic under any split, and even a single image spreads over the threads.
template <typename T>
void col2im(const Conv2dShape& sh, int64_t images, const T* dcol, T* dx) {
  const int64_t P = sh.p(), Q = sh.q(), C = sh.c, rsc = taps(sh);
  parallel_for(images * sh.h, detail::row_grain(int64_t(sh.w) * sh.r * sh.s * C), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t img = row / sh.h, ih = row % sh.h;
      for (int64_t iw = 0; iw < sh.w; ++iw) {
        T* out = dx + (row * sh.w + iw) * C;
        std::fill(out, out + C, T(0));
        for (int r = 0; r < sh.r; ++r) {
          const int64_t ph = ih + sh.pad - r;
          if (ph < 0 || ph % sh.stride != 0 || ph / sh.stride >= P) continue;
          for (int s = 0; s < sh.s; ++s) {
            const int64_t pw = iw + sh.pad - s;
            if (pw < 0 || pw % sh.stride != 0 || pw / sh.stride >= Q) continue;
            const T* src = dcol + ((img * P + ph / sh.stride) * Q + pw / sh.stride) * rsc + (r * sh.s + s) * C;
            for (int64_t c = 0; c < C; ++c) out[c] += src[c];
          }
        }
      }
    }
  });
}

}  // namespace

template <typename T>
void conv2d_forward(const Conv2dShape& sh, const T* x, const T* w, const T* bias, T* y) {
  const int64_t PQ = int64_t(sh.p()) * sh.q(), K = sh.k, rsc = taps(sh);
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
void conv2d_backward_data(const Conv2dShape& sh, const T* dy, const T* w, T* dx) {
  const int64_t PQ = int64_t(sh.p()) * sh.q(), K = sh.k, rsc = taps(sh);
  if (is_pointwise(sh)) {
    gemm(false, false, sh.n * PQ, rsc, K, T(1), dy, K, w, rsc, T(0), dx, rsc);
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
  const int64_t chunk = images_per_chunk<T>(sh);
  T* col = column_buffer<T>(sh);
  for (int64_t i0 = 0; i0 < sh.n; i0 += chunk) {
    const int64_t images = std::min<int64_t>(chunk, sh.n - i0);
    im2col(sh, images, x + i0 * sh.h * sh.w * sh.c, col);
    gemm(true, false, K, rsc, images * PQ, T(1), dy + i0 * PQ * K, K, col, rsc, i0 == 0 ? T(0) : T(1), dw, rsc);
  }
}

#define SP_INSTANTIATE_CONV(T)                                                          \
  template void conv2d_forward<T>(const Conv2dShape&, const T*, const T*, const T*, T*); \
  template void conv2d_backward_data<T>(const Conv2dShape&, const T*, const T*, T*);     \
  template void conv2d_backward_weight<T>(const Conv2dShape&, const T*, const T*, T*, T*);
SP_INSTANTIATE_CONV(float)
SP_INSTANTIATE_CONV(double)
#undef SP_INSTANTIATE_CONV

}  // namespace sp::kernels::cpu
