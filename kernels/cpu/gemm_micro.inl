// Body of the GEMM micro-kernel; included by gemm_micro_generic.cpp and gemm_micro_avx2.cpp,
// which compile it for different instruction sets inside their own namespace.
// GCC vector extensions hold one 32-byte row slice; each accumulator row is two of them.
// The including file provides <cstring> and gemm_micro.h before opening its namespace.

namespace {

template <typename T>
struct Vec32 {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int kWidth = 32 / sizeof(T);
};

// Where the micro-kernel reads A: a packed panel, rows in place, or columns in place.
enum class AForm { kPacked, kRows, kColumns };

// v with every lane a: a single broadcast instruction (adding a to a zero vector, as in V{} + a,
// would cost an add and a register the micro-tile needs).
// (Written to a reference: returning a 32-byte vector by value from the generic build's
// functions would change their ABI, which GCC warns about.)
template <typename V, typename T>
inline void splat(V& out, T a) {
  const V v = {a};
  if constexpr (Vec32<T>::kWidth == 8)
    out = __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
  else
    out = __builtin_shufflevector(v, v, 0, 0, 0, 0);
}

// kA: A's form (kRows: row i at ap + i * lda; kColumns: a(i, k) at ap[k * lda + i]); kRowsB: B
// read in place, row k at bp + k * ldb; else packed panels.
template <AForm kA, bool kRowsB, typename T>
inline void micro_kernel_impl(int64_t kc, const T* ap, int64_t lda, const T* bp, int64_t ldb, T* c, int64_t ldc,
                              T alpha, int mr, int nr, bool overwrite) {
  using Tile = sp::kernels::cpu::gemm_detail::MicroTile<T>;
  using V = typename Vec32<T>::type;
  constexpr int W = Vec32<T>::kWidth;
  constexpr int MR = Tile::kMr;
  static_assert(Tile::kNr == 2 * W, "the micro-tile is two vectors wide");

  V acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = V{};
  for (int64_t k = 0; k < kc; ++k) {
    V b0, b1;
    const T* bk = bp + k * (kRowsB ? ldb : Tile::kNr);
    std::memcpy(&b0, bk, sizeof(V));
    std::memcpy(&b1, bk + W, sizeof(V));
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const T a = kA == AForm::kRows ? ap[i * lda + k] : kA == AForm::kColumns ? ap[k * lda + i] : ap[k * MR + i];
      V ai;
      splat(ai, a);
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
  if (mr == MR && nr == Tile::kNr) {  // whole tile: row vectors
    V va;
    splat(va, alpha);
    for (int i = 0; i < MR; ++i) {
      T* row = c + i * ldc;
      V c0 = V{}, c1 = V{};
      if (!overwrite) {
        std::memcpy(&c0, row, sizeof(V));
        std::memcpy(&c1, row + W, sizeof(V));
      }
      c0 += va * acc[i][0];
      c1 += va * acc[i][1];
      std::memcpy(row, &c0, sizeof(V));
      std::memcpy(row + W, &c1, sizeof(V));
    }
    return;
  }
  T tile[MR][Tile::kNr];
  for (int i = 0; i < MR; ++i) {
    std::memcpy(&tile[i][0], &acc[i][0], sizeof(V));
    std::memcpy(&tile[i][W], &acc[i][1], sizeof(V));
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      T& out = c[i * ldc + j];
      out = (overwrite ? T(0) : out) + alpha * tile[i][j];
    }
}

// micro_kernel_impl by where A (lda > 0 rows, lda < 0 columns with stride -lda, 0 packed) and B
// (ldb > 0 rows, 0 packed) are read.
template <bool kRowsB, typename T>
inline void micro_kernel_a(int64_t kc, const T* ap, int64_t lda, const T* bp, int64_t ldb, T* c, int64_t ldc,
                           T alpha, int mr, int nr, bool overwrite) {
  if (lda > 0)
    micro_kernel_impl<AForm::kRows, kRowsB>(kc, ap, lda, bp, ldb, c, ldc, alpha, mr, nr, overwrite);
  else if (lda < 0)
    micro_kernel_impl<AForm::kColumns, kRowsB>(kc, ap, -lda, bp, ldb, c, ldc, alpha, mr, nr, overwrite);
  else
    micro_kernel_impl<AForm::kPacked, kRowsB>(kc, ap, lda, bp, ldb, c, ldc, alpha, mr, nr, overwrite);
}
template <typename T>
inline void micro_kernel_any(int64_t kc, const T* ap, int64_t lda, const T* bp, int64_t ldb, T* c, int64_t ldc,
                             T alpha, int mr, int nr, bool overwrite) {
  if (ldb > 0)
    micro_kernel_a<true>(kc, ap, lda, bp, ldb, c, ldc, alpha, mr, nr, overwrite);
  else
    micro_kernel_a<false>(kc, ap, lda, bp, ldb, c, ldc, alpha, mr, nr, overwrite);
}

}  // namespace

void micro_kernel(int64_t kc, const float* ap, int64_t lda, const float* bp, int64_t ldb, float* c, int64_t ldc,
                  float alpha, int mr, int nr, bool overwrite) {
  micro_kernel_any(kc, ap, lda, bp, ldb, c, ldc, alpha, mr, nr, overwrite);
}
void micro_kernel(int64_t kc, const double* ap, int64_t lda, const double* bp, int64_t ldb, double* c, int64_t ldc,
                  double alpha, int mr, int nr, bool overwrite) {
  micro_kernel_any(kc, ap, lda, bp, ldb, c, ldc, alpha, mr, nr, overwrite);
}
