// Body of the GEMM micro-kernel; included by gemm_micro_generic.cpp, gemm_micro_avx2.cpp and
// gemm_micro_avx512.cpp, which compile it for different instruction sets inside their own
// namespace. GCC vector extensions of kVectorBytes (32 or 64) hold one row slice; a tile row of
// MicroTile<T>::kNr elements is kNr * sizeof(T) / kVectorBytes of them (two 32-byte vectors, or
// one 64-byte vector), and a tile has kTileRows rows.
// The including file provides <cstring>, gemm_micro.h (which declares each namespace's
// kTileRows) and, inside its namespace before the include, `constexpr int kVectorBytes`.

namespace {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  static constexpr int kWidth = kVectorBytes / sizeof(T);
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
  if constexpr (Vec<T>::kWidth == 16)
    out = __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  else if constexpr (Vec<T>::kWidth == 8)
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
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::kWidth;
  constexpr int MR = kTileRows;
  constexpr int NV = Tile::kNr / W;  // vectors per tile row
  static_assert(NV * W == Tile::kNr && (NV == 1 || NV == 2), "a tile row is one or two vectors");

  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t k = 0; k < kc; ++k) {
    V b[NV];
    const T* bk = bp + k * (kRowsB ? ldb : Tile::kNr);
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], bk + v * W, sizeof(V));
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const T a = kA == AForm::kRows ? ap[i * lda + k] : kA == AForm::kColumns ? ap[k * lda + i] : ap[k * MR + i];
      V ai;
      splat(ai, a);
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * b[v];
    }
  }
  // C += alpha * acc in row vectors, straight on C for a whole tile; for a partial one, on a copy
  // of C's valid corner, so that its elements get the very operations (and bits) they would in a
  // whole tile (a scalar loop there may be contracted, or vectorised, differently).
  const bool whole = mr == MR && nr == Tile::kNr;
  T tile[MR][Tile::kNr];
  T* base = c;
  int64_t ld = ldc;
  if (!whole) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < Tile::kNr; ++j) tile[i][j] = !overwrite && i < mr && j < nr ? c[i * ldc + j] : T(0);
    base = &tile[0][0], ld = Tile::kNr;
  }
  V va;
  splat(va, alpha);
  for (int i = 0; i < MR; ++i) {
    T* row = base + i * ld;
    for (int v = 0; v < NV; ++v) {
      V cv = V{};
      if (!overwrite) std::memcpy(&cv, row + v * W, sizeof(V));
      cv += va * acc[i][v];
      std::memcpy(row + v * W, &cv, sizeof(V));
    }
  }
  if (!whole)
    for (int i = 0; i < mr; ++i) std::memcpy(c + i * ldc, &tile[i][0], sizeof(T) * size_t(nr));
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
