// GEMM micro-kernels over packed panels or operands read in place, declared once and compiled
// per instruction set. Each computes tiles of MR x kNr: kNr (the tile's columns) is the same for
// every instruction set, MR (its rows) is the kernel's own (kTileRows of its namespace: 6 for
// generic and AVX2, whose tile rows are two 32-byte vectors; 12 for AVX-512, one 64-byte vector).
//
// A packed A panel holds MR rows interleaved by k ({a[i0][k], ..., a[i0+MR-1][k]} for each k),
// a packed B panel kNr columns interleaved by k; both are zero-padded to full width, so the
// kernel always computes a full MR x kNr tile and stores only the valid mr x nr corner. An
// operand read in place must be whole (MR rows of A, kNr columns of B).
//
// Every kernel adds each element's products in order of k, one at a time, and scales by alpha
// last, in the same operations: the AVX2 and AVX-512 kernels (both with fused multiply-adds)
// give the same bits, which the generic kernel's separate multiplies and adds do not.
#pragma once

#include <cstdint>

namespace sp::kernels::cpu::gemm_detail {

template <typename T>
struct MicroTile;
template <>
struct MicroTile<float> {
  static constexpr int kNr = 16;
};
template <>
struct MicroTile<double> {
  static constexpr int kNr = 8;
};
constexpr int kMaxTileRows = 12;  // the largest MR of any kernel

// c[i*ldc + j] += alpha * sum_k a(i, k) * b(k, j), for i < mr, j < nr, with
//   a(i, k) = ap[k*MR + i]    (lda == 0: a packed panel), or
//   a(i, k) = ap[i*lda + k]   (lda > 0: MR rows of a row-major matrix read in place; mr == MR),
//   a(i, k) = ap[k*(-lda) + i] (lda < 0: MR columns of a row-major matrix, i.e. rows of its
//                              transpose, read in place; mr == MR),
//   b(k, j) = bp[k*kNr + j]   (ldb == 0: a packed panel), or
//   b(k, j) = bp[k*ldb + j]   (ldb > 0: kNr columns of a row-major matrix read in place; nr == kNr).
// overwrite: c[i*ldc + j] = 0 + alpha * sum instead (C is not read: the first K block of a
// GEMM with beta == 0), which gives the bits that zero-filling C first and adding would.
// The sums run over k in order either way, so every form of A and B gives the same bits.
template <typename T>
using MicroKernel = void (*)(int64_t kc, const T* ap, int64_t lda, const T* bp, int64_t ldb, T* c, int64_t ldc,
                             T alpha, int mr, int nr, bool overwrite);

namespace generic {
constexpr int kTileRows = 6;
void micro_kernel(int64_t kc, const float* ap, int64_t lda, const float* bp, int64_t ldb, float* c, int64_t ldc,
                  float alpha, int mr, int nr, bool overwrite);
void micro_kernel(int64_t kc, const double* ap, int64_t lda, const double* bp, int64_t ldb, double* c, int64_t ldc,
                  double alpha, int mr, int nr, bool overwrite);
}  // namespace generic
namespace avx2 {
constexpr int kTileRows = 6;
void micro_kernel(int64_t kc, const float* ap, int64_t lda, const float* bp, int64_t ldb, float* c, int64_t ldc,
                  float alpha, int mr, int nr, bool overwrite);
void micro_kernel(int64_t kc, const double* ap, int64_t lda, const double* bp, int64_t ldb, double* c, int64_t ldc,
                  double alpha, int mr, int nr, bool overwrite);
}  // namespace avx2
namespace avx512 {
constexpr int kTileRows = 12;
void micro_kernel(int64_t kc, const float* ap, int64_t lda, const float* bp, int64_t ldb, float* c, int64_t ldc,
                  float alpha, int mr, int nr, bool overwrite);
void micro_kernel(int64_t kc, const double* ap, int64_t lda, const double* bp, int64_t ldb, double* c, int64_t ldc,
                  double alpha, int mr, int nr, bool overwrite);
}  // namespace avx512

}  // namespace sp::kernels::cpu::gemm_detail
