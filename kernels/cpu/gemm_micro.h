// GEMM micro-kernels over packed panels or operands read in place, declared once and compiled
// per instruction set.
//
// A packed A panel holds kMr rows interleaved by k ({a[i0][k], ..., a[i0+kMr-1][k]} for each k),
// a packed B panel kNr columns interleaved by k; both are zero-padded to full width, so the
// kernel always computes a full kMr x kNr tile and stores only the valid mr x nr corner. An
// operand read in place must be whole (kMr rows of A, kNr columns of B).
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

// c[i*ldc + j] += alpha * sum_k a(i, k) * b(k, j), for i < mr, j < nr, with
//   a(i, k) = ap[k*kMr + i]   (lda == 0: a packed panel), or
//   a(i, k) = ap[i*lda + k]   (lda > 0: kMr rows of a row-major matrix read in place; mr == kMr),
//   a(i, k) = ap[k*(-lda) + i] (lda < 0: kMr columns of a row-major matrix, i.e. rows of its
//                              transpose, read in place; mr == kMr),
//   b(k, j) = bp[k*kNr + j]   (ldb == 0: a packed panel), or
//   b(k, j) = bp[k*ldb + j]   (ldb > 0: kNr columns of a row-major matrix read in place; nr == kNr).
// overwrite: c[i*ldc + j] = 0 + alpha * sum instead (C is not read: the first K block of a
// GEMM with beta == 0), which gives the bits that zero-filling C first and adding would.
// The sums run over k in order either way, so every form of A and B gives the same bits.
template <typename T>
using MicroKernel = void (*)(int64_t kc, const T* ap, int64_t lda, const T* bp, int64_t ldb, T* c, int64_t ldc,
                             T alpha, int mr, int nr, bool overwrite);

namespace generic {
void micro_kernel(int64_t kc, const float* ap, int64_t lda, const float* bp, int64_t ldb, float* c, int64_t ldc,
                  float alpha, int mr, int nr, bool overwrite);
void micro_kernel(int64_t kc, const double* ap, int64_t lda, const double* bp, int64_t ldb, double* c, int64_t ldc,
                  double alpha, int mr, int nr, bool overwrite);
}  // namespace generic
namespace avx2 {
void micro_kernel(int64_t kc, const float* ap, int64_t lda, const float* bp, int64_t ldb, float* c, int64_t ldc,
                  float alpha, int mr, int nr, bool overwrite);
void micro_kernel(int64_t kc, const double* ap, int64_t lda, const double* bp, int64_t ldb, double* c, int64_t ldc,
                  double alpha, int mr, int nr, bool overwrite);
}  // namespace avx2

}  // namespace sp::kernels::cpu::gemm_detail
