// Fully connected layer with PyTorch's [out, in] weight layout, as GEMMs.
#include <cstdint>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/row_ops.h"

namespace sp::kernels::cpu {

template <typename T>
void linear_forward(int64_t n, int64_t in, int64_t out, const T* x, const T* w, const T* b, T* y) {
  if (b) detail::broadcast_rows(n, out, b, y);
  gemm(false, true, n, out, in, T(1), x, in, w, in, b ? T(1) : T(0), y, out);
}

template <typename T>
void linear_backward(int64_t n, int64_t in, int64_t out, const T* x, const T* w, const T* dy, T* dx, T* dw, T* db) {
  if (dx) gemm(false, false, n, in, out, T(1), dy, out, w, in, T(0), dx, in);
  if (dw) gemm(true, false, out, in, n, T(1), dy, out, x, in, T(0), dw, in);
  if (db) {
    std::vector<double> sums(out);
    detail::column_sums(
        n, out, 1,
        [&](int64_t b, int64_t e, double* acc) {
          for (int64_t i = b; i < e; ++i)
            for (int64_t j = 0; j < out; ++j) acc[j] += dy[i * out + j];
        },
        sums.data());
    for (int64_t j = 0; j < out; ++j) db[j] = T(sums[j]);
  }
}

template void linear_forward<float>(int64_t, int64_t, int64_t, const float*, const float*, const float*, float*);
template void linear_forward<double>(int64_t, int64_t, int64_t, const double*, const double*, const double*, double*);
template void linear_backward<float>(int64_t, int64_t, int64_t, const float*, const float*, const float*, float*,
                                     float*, float*);
template void linear_backward<double>(int64_t, int64_t, int64_t, const double*, const double*, const double*, double*,
                                      double*, double*);

}  // namespace sp::kernels::cpu
