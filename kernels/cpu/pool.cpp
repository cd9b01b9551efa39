// Max pooling and global average pooling on NHWC activations.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/row_ops.h"

namespace sp::kernels::cpu {
namespace {

// Visits the in-bounds taps of output pixel (p, q) in row-major window order, calling
// fn(pixel_index_within_image, is_first_tap). Taps in the padding are skipped, which is how
// padding acts as -infinity; Pool2dShape requires pad < window, so every window has a tap.
template <typename Fn>
void for_each_tap(const Pool2dShape& sh, int64_t p, int64_t q, const Fn& fn) {
  bool first = true;
  for (int64_t r = 0; r < sh.window; ++r) {
    const int64_t ih = p * sh.stride - sh.pad + r;
    if (ih < 0 || ih >= sh.h) continue;
    for (int64_t s = 0; s < sh.window; ++s) {
      const int64_t iw = q * sh.stride - sh.pad + s;
      if (iw < 0 || iw >= sh.w) continue;
      fn(ih * sh.w + iw, first);
      first = false;
    }
  }
}

}  // namespace

// Whether tap value v replaces the window's best so far: a greater one (the first maximum
// stays on ties), or a NaN (the last NaN of the window wins, and nothing after it: PyTorch's
// `val > max || isnan(val)`). kernels/cuda/layout_gathers.h's window_argmax takes the same rule.
template <typename T>
bool takes_over(T v, T best) {
  return v > best || v != v;
}

template <typename T>
void maxpool2d_forward(const Pool2dShape& sh, const T* x, T* y) {
  const int64_t P = sh.p(), Q = sh.q(), C = sh.c;
  parallel_for(sh.n * P, detail::row_grain(Q * C * sh.window * sh.window), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t img = row / P, p = row % P;
      const T* xi = x + img * sh.h * sh.w * C;
      for (int64_t q = 0; q < Q; ++q) {
        T* out = y + (row * Q + q) * C;
        for_each_tap(sh, p, q, [&](int64_t pix, bool first) {
          const T* src = xi + pix * C;
          if (first) {
            std::copy_n(src, C, out);
            return;
          }
          // Strictly greater keeps the first maximum, matching the backward's routing; a NaN
          // wins wherever it stands (PyTorch's rule), so a diverging run shows.
          for (int64_t c = 0; c < C; ++c)
            if (takes_over(src[c], out[c])) out[c] = src[c];
        });
      }
    }
  });
}

// Windows overlap when stride < window, so several outputs may route to the same input:
// each image is handled whole by one thread, which keeps the accumulation order fixed.
template <typename T>
void maxpool2d_backward(const Pool2dShape& sh, const T* x, const T* dy, T* dx) {
  const int64_t P = sh.p(), Q = sh.q(), C = sh.c, HWC = int64_t(sh.h) * sh.w * C;
  parallel_for(sh.n, 1, [&](int64_t b, int64_t e) {
    std::vector<T> best(C);
    std::vector<int64_t> arg(C);
    for (int64_t img = b; img < e; ++img) {
      const T* xi = x + img * HWC;
      T* dxi = dx + img * HWC;
      std::fill(dxi, dxi + HWC, T(0));
      for (int64_t pq = 0; pq < P * Q; ++pq) {
        for_each_tap(sh, pq / Q, pq % Q, [&](int64_t pix, bool first) {
          const T* src = xi + pix * C;
          for (int64_t c = 0; c < C; ++c)
            if (first || takes_over(src[c], best[c])) {
              best[c] = src[c];
              arg[c] = pix;
            }
        });
        const T* g = dy + (img * P * Q + pq) * C;
        for (int64_t c = 0; c < C; ++c) dxi[arg[c] * C + c] += g[c];
      }
    }
  });
}

template <typename T>
void global_avgpool_forward(int64_t n, int64_t hw, int64_t c, const T* x, T* y) {
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    std::vector<double> acc(c);
    for (int64_t img = b; img < e; ++img) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t i = 0; i < hw; ++i)
        for (int64_t j = 0; j < c; ++j) acc[j] += x[(img * hw + i) * c + j];
      for (int64_t j = 0; j < c; ++j) y[img * c + j] = T(acc[j] / double(hw));
    }
  });
}

template <typename T>
void global_avgpool_backward(int64_t n, int64_t hw, int64_t c, const T* dy, T* dx) {
  parallel_for(n * hw, detail::row_grain(c), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const T* g = dy + (row / hw) * c;
      for (int64_t j = 0; j < c; ++j) dx[row * c + j] = g[j] / T(hw);
    }
  });
}

#define SP_INSTANTIATE_POOL(T)                                                             \
  template void maxpool2d_forward<T>(const Pool2dShape&, const T*, T*);                    \
  template void maxpool2d_backward<T>(const Pool2dShape&, const T*, const T*, T*);         \
  template void global_avgpool_forward<T>(int64_t, int64_t, int64_t, const T*, T*);        \
  template void global_avgpool_backward<T>(int64_t, int64_t, int64_t, const T*, T*);
SP_INSTANTIATE_POOL(float)
SP_INSTANTIATE_POOL(double)
#undef SP_INSTANTIATE_POOL

}  // namespace sp::kernels::cpu
