// The CPU reference GEMM against a plain triple loop in double, across transposes, strides,
// alpha/beta, and sizes that straddle every blocking boundary (kMr, kNr, kMc, kGemmKc, kNc).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/cpu/ops.h"

namespace {

using sp::kernels::cpu::gemm;

template <typename T>
double max_rel_error(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, T beta, int64_t pad, bool nan_c) {
  std::mt19937 rng(uint32_t(m * 131 + n * 17 + k));
  std::uniform_real_distribution<double> u(-1, 1);
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
  const int64_t lda = a_cols + pad, ldb = b_cols + pad, ldc = n + pad;
  std::vector<T> a(size_t(a_rows * lda)), b(size_t(b_rows * ldb)), c(size_t(m * ldc));
  for (auto& v : a) v = T(u(rng));
  for (auto& v : b) v = T(u(rng));
  for (auto& v : c) v = nan_c ? std::numeric_limits<T>::quiet_NaN() : T(u(rng));
  std::vector<double> ref(size_t(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p)
        acc += double(ta ? a[size_t(p * lda + i)] : a[size_t(i * lda + p)]) *
               double(tb ? b[size_t(j * ldb + p)] : b[size_t(p * ldb + j)]);
      ref[size_t(i * n + j)] = double(alpha) * acc + (beta == T(0) ? 0.0 : double(beta) * c[size_t(i * ldc + j)]);
    }
  const std::vector<T> c_before = c;
  gemm<T>(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
  double worst = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const double got = c[size_t(i * ldc + j)];
      const double err = std::abs(got - ref[size_t(i * n + j)]) / (1.0 + std::abs(ref[size_t(i * n + j)]));
      worst = std::isnan(err) ? INFINITY : std::max(worst, err);
    }
    for (int64_t j = n; j < ldc; ++j) {  // padding columns of C are never written
      if (!(nan_c && std::isnan(c[size_t(i * ldc + j)]))) {
        EXPECT_EQ(c[size_t(i * ldc + j)], c_before[size_t(i * ldc + j)]);
      }
    }
  }
  return worst;
}

using Case = std::tuple<int, int, int>;
class CpuGemm : public ::testing::TestWithParam<Case> {};

TEST_P(CpuGemm, MatchesTripleLoopForEveryTransposeCombination) {
  const auto [m, n, k] = GetParam();
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "trans_a=" << ta << " trans_b=" << tb);
      EXPECT_LT(max_rel_error<double>(ta, tb, m, n, k, 1.0, 0.0, 0, false), 1e-12);
      EXPECT_LT(max_rel_error<float>(ta, tb, m, n, k, 1.f, 0.f, 0, false), 2e-5 * std::sqrt(double(k) + 1));
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuGemm,
                         ::testing::Values(Case{1, 1, 1}, Case{1, 17, 5}, Case{7, 1, 3}, Case{6, 16, 8},
                                           Case{13, 33, 29}, Case{97, 50, 257}, Case{200, 40, 600},
                                           Case{5, 1100, 3}, Case{64, 64, 0}, Case{5, 7, 9000}));  // the last takes the split-K path

TEST(CpuGemmScaling, AlphaBetaAndStrides) {
  EXPECT_LT(max_rel_error<double>(false, false, 37, 45, 70, 0.5, 2.0, 3, false), 1e-12);
  EXPECT_LT(max_rel_error<double>(true, true, 37, 45, 70, -1.5, 1.0, 5, false), 1e-12);
  EXPECT_LT(max_rel_error<double>(false, true, 37, 45, 70, 1.0, -0.25, 1, false), 1e-12);
}

TEST(CpuGemmScaling, BetaZeroIgnoresNaNInC) {
  EXPECT_LT(max_rel_error<double>(false, false, 20, 30, 40, 1.0, 0.0, 2, true), 1e-12);
  EXPECT_LT(max_rel_error<float>(true, false, 20, 30, 40, 2.f, 0.f, 0, true), 1e-4);
}

// Narrow outputs read op(A) in place, and a single block of rows reads B's rows in place, where
// wider or taller products pack them (gemm.cpp); every form adds the same products in the same
// order, so a column or row of C must come out with the same bits either way. Here the same
// A and B columns go through a narrow product (in place) and as the first columns of a wide one
// (packed), and the same A rows through a short product and as the first rows of a tall one.
TEST(CpuGemmScaling, InPlaceOperandsGiveTheSameBitsAsPackedOnes) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1, 1);
  const int64_t m = 50, k = 700, narrow = 40, wide = 200, tall = 300;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "trans_a=" << ta << " trans_b=" << tb);
      // A: tall x k (its first m rows used alone too); B: k x wide (its first narrow columns too).
      std::vector<float> a(size_t(tall * k)), b(size_t(k * wide));
      for (auto& v : a) v = u(rng);
      for (auto& v : b) v = u(rng);
      const int64_t lda = ta ? tall : k, ldb = tb ? k : wide;
      auto product = [&](int64_t rows, int64_t cols) {
        std::vector<float> c(size_t(rows * cols), std::numeric_limits<float>::quiet_NaN());
        gemm<float>(ta, tb, rows, cols, k, 1.f, a.data(), lda, b.data(), ldb, 0.f, c.data(), cols);
        return c;
      };
      const std::vector<float> narrow_c = product(m, narrow), wide_c = product(m, wide);
      const std::vector<float> short_c = product(m, wide), tall_c = product(tall, wide);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < narrow; ++j)
          ASSERT_EQ(narrow_c[size_t(i * narrow + j)], wide_c[size_t(i * wide + j)]) << "narrow (" << i << ", " << j << ")";
        for (int64_t j = 0; j < wide; ++j)
          ASSERT_EQ(short_c[size_t(i * wide + j)], tall_c[size_t(i * wide + j)]) << "short (" << i << ", " << j << ")";
      }
    }
}

}  // namespace
