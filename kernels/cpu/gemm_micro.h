// GEMM micro-kernels over packed panels, declared once and compiled per instruction set.
//
// A packed A panel holds kMr rows interleaved by k ({a[i0][k], ..., a[i0+kMr-1][k]} for each k),
// a packed B panel kNr columns interleaved by k; both are zero-padded to full width, so the
// kernel always computes a full kMr x kNr tile and stores only the valid mr x nr corner.
#pragma once

#include <cstdint>

namespace sp::kernels::cpu::gemm_detail {

template <typename T>
struct MicroTile;
template <>
struct MicroTile<float> {
  static constexpr int kMr = 6, kNr = 16;
};
template <>
struct MicroTile<double> {
  static constexpr int kMr = 6, kNr = 8;
};

// c[i*ldc + j] += alpha * sum_k ap[k*kMr + i] * bp[k*kNr + j], for i < mr, j < nr.
template <typename T>
using MicroKernel = void (*)(int64_t kc, const T* ap, const T* bp, T* c, int64_t ldc, T alpha, int mr, int nr);

namespace generic {
void micro_kernel(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, float alpha, int mr, int nr);
void micro_kernel(int64_t kc, const double* ap, const double* bp, double* c, int64_t ldc, double alpha, int mr,
                  int nr);
}  // namespace generic
namespace avx2 {
void micro_kernel(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, float alpha, int mr, int nr);
void micro_kernel(int64_t kc, const double* ap, const double* bp, double* c, int64_t ldc, double alpha, int mr,
                  int nr);
}  // namespace avx2

}  // namespace sp::kernels::cpu::gemm_detail
