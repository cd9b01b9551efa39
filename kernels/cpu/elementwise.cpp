// Elementwise ops, the option-A shortcut and the bf16 conversions.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/bf16.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/row_ops.h"

namespace sp::kernels::cpu {
namespace {

// Elements per parallel_for chunk: below this, waking the pool costs more than the work.
constexpr int64_t kElementGrain = 16384;

template <typename Fn>
void for_each_index(int64_t n, const Fn& fn) {
  parallel_for(n, kElementGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(i);
  });
}

}  // namespace

// Written as "x < 0 ? 0 : x" rather than "x > 0 ? x : 0" so that a NaN passes through and
// a diverging run shows up in the loss instead of being silently zeroed.
template <typename T>
void relu_forward(int64_t n, const T* x, T* y) {
  for_each_index(n, [&](int64_t i) { y[i] = x[i] < T(0) ? T(0) : x[i]; });
}

template <typename T>
void relu_backward(int64_t n, const T* y, const T* dy, T* dx) {
  for_each_index(n, [&](int64_t i) { dx[i] = y[i] > T(0) ? dy[i] : T(0); });
}

template <typename T>
void add(int64_t n, const T* a, const T* b, T* y) {
  for_each_index(n, [&](int64_t i) { y[i] = a[i] + b[i]; });
}

template <typename T>
void scale(int64_t n, T alpha, const T* x, T* y) {
  for_each_index(n, [&](int64_t i) { y[i] = alpha * x[i]; });
}

template <typename T>
void shortcut_a_forward(const ShortcutAShape& sh, const T* x, T* y) {
  const int64_t P = sh.p(), Q = sh.q(), lo = sh.pad_lo(), cin = sh.c_in, cout = sh.c_out;
  parallel_for(sh.n * P, detail::row_grain(Q * cout), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t img = row / P, i = row % P;
      const T* src_row = x + ((img * sh.h + i * sh.stride) * sh.w) * cin;
      for (int64_t j = 0; j < Q; ++j) {
        T* dst = y + (row * Q + j) * cout;
        std::fill(dst, dst + lo, T(0));
        std::copy_n(src_row + j * sh.stride * cin, cin, dst + lo);
        std::fill(dst + lo + cin, dst + cout, T(0));
      }
    }
  });
}

template <typename T>
void shortcut_a_backward(const ShortcutAShape& sh, const T* dy, T* dx) {
  const int64_t P = sh.p(), Q = sh.q(), lo = sh.pad_lo(), cin = sh.c_in, cout = sh.c_out;
  parallel_for(int64_t(sh.n) * sh.h, detail::row_grain(int64_t(sh.w) * cin), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t img = row / sh.h, ih = row % sh.h;
      T* dst_row = dx + row * sh.w * cin;
      std::fill(dst_row, dst_row + sh.w * cin, T(0));
      if (ih % sh.stride != 0) continue;
      const T* src_row = dy + (img * P + ih / sh.stride) * Q * cout;
      for (int64_t j = 0; j < Q; ++j) std::copy_n(src_row + j * cout + lo, cin, dst_row + j * sh.stride * cin);
    }
  });
}

void f32_to_bf16(int64_t n, const float* x, uint16_t* y) {
  for_each_index(n, [&](int64_t i) { y[i] = bf16_from_f32(x[i]); });
}

void bf16_to_f32(int64_t n, const uint16_t* x, float* y) {
  for_each_index(n, [&](int64_t i) { y[i] = f32_from_bf16(x[i]); });
}

#define SP_INSTANTIATE_ELEMENTWISE(T)                                            \
  template void relu_forward<T>(int64_t, const T*, T*);                          \
  template void relu_backward<T>(int64_t, const T*, const T*, T*);               \
  template void add<T>(int64_t, const T*, const T*, T*);                         \
  template void scale<T>(int64_t, T, const T*, T*);                              \
  template void shortcut_a_forward<T>(const ShortcutAShape&, const T*, T*);      \
  template void shortcut_a_backward<T>(const ShortcutAShape&, const T*, T*);
SP_INSTANTIATE_ELEMENTWISE(float)
SP_INSTANTIATE_ELEMENTWISE(double)
#undef SP_INSTANTIATE_ELEMENTWISE

}  // namespace sp::kernels::cpu
