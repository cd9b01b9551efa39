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

template <typename T>
inline void micro_kernel_impl(int64_t kc, const T* ap, const T* bp, T* c, int64_t ldc, T alpha, int mr, int nr) {
  using Tile = sp::kernels::cpu::gemm_detail::MicroTile<T>;
  using V = typename Vec32<T>::type;
  constexpr int W = Vec32<T>::kWidth;
  constexpr int MR = Tile::kMr;
  static_assert(Tile::kNr == 2 * W, "the micro-tile is two vectors wide");

  V acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = V{};
  for (int64_t k = 0; k < kc; ++k) {
    V b0, b1;
    std::memcpy(&b0, bp + k * Tile::kNr, sizeof(V));
    std::memcpy(&b1, bp + k * Tile::kNr + W, sizeof(V));
    const T* a = ap + k * MR;
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const V ai = V{} + a[i];  // broadcast
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
  T tile[MR][Tile::kNr];
  for (int i = 0; i < MR; ++i) {
    std::memcpy(&tile[i][0], &acc[i][0], sizeof(V));
    std::memcpy(&tile[i][W], &acc[i][1], sizeof(V));
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) c[i * ldc + j] += alpha * tile[i][j];
}

}  // namespace

void micro_kernel(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, float alpha, int mr, int nr) {
  micro_kernel_impl(kc, ap, bp, c, ldc, alpha, mr, nr);
}
void micro_kernel(int64_t kc, const double* ap, const double* bp, double* c, int64_t ldc, double alpha, int mr,
                  int nr) {
  micro_kernel_impl(kc, ap, bp, c, ldc, alpha, mr, nr);
}
