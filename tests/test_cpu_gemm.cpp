// The CPU reference GEMM against a plain triple loop in double, across transposes, strides,
// alpha/beta, and sizes that straddle every blocking boundary (kMr, kNr, kMc, kGemmKc, kNc).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "tests/error_testing.h"

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
                                           Case{13, 33, 29}, Case{97, 50, 257}, Case{200, 40, 600}, Case{5, 1100, 3},
                                           Case{64, 64, 0}, Case{5, 7, 9000},       // split-K
                                           Case{12, 40, 9000}, Case{16, 32, 9000},  // split-K, read in place
                                           Case{9, 20, 4097}, Case{7, 70, 7232}));  // split-K in two chunks

TEST(CpuGemmScaling, AlphaBetaAndStrides) {
  EXPECT_LT(max_rel_error<double>(false, false, 37, 45, 70, 0.5, 2.0, 3, false), 1e-12);
  EXPECT_LT(max_rel_error<double>(true, true, 37, 45, 70, -1.5, 1.0, 5, false), 1e-12);
  EXPECT_LT(max_rel_error<double>(false, true, 37, 45, 70, 1.0, -0.25, 1, false), 1e-12);
}

TEST(CpuGemmScaling, BetaZeroIgnoresNaNInC) {
  EXPECT_LT(max_rel_error<double>(false, false, 20, 30, 40, 1.0, 0.0, 2, true), 1e-12);
  EXPECT_LT(max_rel_error<float>(true, false, 20, 30, 40, 2.f, 0.f, 0, true), 1e-4);
}

// Narrow outputs read op(A) in place, and products of a few rows read B's whole strips in place,
// where wider or taller products pack them (gemm.cpp); every form adds the same products in the
// same order, so a column or row of C must come out with the same bits either way. Here the same
// A and B columns go through a narrow product (A in place, with its last partial group of rows
// packed) and as the first columns of a wide one (packed), and the same A rows through a short
// product (B in place but for its last, partial strip) and as the first rows of a tall one.
template <typename T>
void expect_in_place_same_as_packed() {
  std::mt19937 rng(5);
  std::uniform_real_distribution<T> u(-1, 1);
  const int64_t m = 50, k = 700, narrow = 40, wide = 203, tall = 300, few = 12;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "trans_a=" << ta << " trans_b=" << tb << " " << sizeof(T) * 8 << "-bit");
      // A: tall x k (its first rows used alone too); B: k x wide (its first columns too).
      std::vector<T> a(size_t(tall * k)), b(size_t(k * wide));
      for (auto& v : a) v = u(rng);
      for (auto& v : b) v = u(rng);
      const int64_t lda = ta ? tall : k, ldb = tb ? k : wide;
      auto product = [&](int64_t rows, int64_t cols) {
        std::vector<T> c(size_t(rows * cols), std::numeric_limits<T>::quiet_NaN());
        gemm<T>(ta, tb, rows, cols, k, T(1), a.data(), lda, b.data(), ldb, T(0), c.data(), cols);
        return c;
      };
      const std::vector<T> narrow_c = product(m, narrow), wide_c = product(m, wide);
      const std::vector<T> few_c = product(few, wide), tall_c = product(tall, wide);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < narrow; ++j)
          ASSERT_EQ(narrow_c[size_t(i * narrow + j)], wide_c[size_t(i * wide + j)]) << "narrow (" << i << ", " << j << ")";
      for (int64_t i = 0; i < few; ++i)
        for (int64_t j = 0; j < wide; ++j)
          ASSERT_EQ(few_c[size_t(i * wide + j)], tall_c[size_t(i * wide + j)]) << "few rows (" << i << ", " << j << ")";
    }
}

TEST(CpuGemmScaling, InPlaceOperandsGiveTheSameBitsAsPackedOnes) {
  expect_in_place_same_as_packed<float>();
  expect_in_place_same_as_packed<double>();
}

// beta == 0 overwrites C in the first K block (never reading it, so NaN there is ignored); that
// must give the bits of C = 0 followed by C += A*B (beta == 1), over several K blocks, with whole
// and partial tiles.
template <typename T>
void expect_overwrite_same_as_zero_then_add() {
  std::mt19937 rng(6);
  std::uniform_real_distribution<T> u(-1, 1);
  const int64_t m = 13, n = 37, k = 700;
  std::vector<T> a(size_t(m * k)), b(size_t(k * n));
  for (auto& v : a) v = u(rng);
  for (auto& v : b) v = u(rng);
  std::vector<T> over(size_t(m * n), std::numeric_limits<T>::quiet_NaN()), added(size_t(m * n), T(0));
  gemm<T>(false, false, m, n, k, T(0.5), a.data(), k, b.data(), n, T(0), over.data(), n);
  gemm<T>(false, false, m, n, k, T(0.5), a.data(), k, b.data(), n, T(1), added.data(), n);
  for (size_t i = 0; i < over.size(); ++i) ASSERT_EQ(over[i], added[i]) << "element " << i;
}

TEST(CpuGemmScaling, BetaZeroOverwritesWithTheBitsOfZeroThenAdd) {
  expect_overwrite_same_as_zero_then_add<float>();
  expect_overwrite_same_as_zero_then_add<double>();
}

// The convolutions' weight gradient for few output channels is computed transposed (conv.cpp):
// col^T * dy, then transposed, must equal dy^T * col bit for bit (the same sums with the
// factors of each product swapped), on the direct and the split-K paths.
TEST(CpuGemmScaling, TransposedProductGivesTheSameBits) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1, 1);
  const int64_t taps = 144, channels = 16;
  for (const int64_t pixels : {int64_t(300), int64_t(9000)}) {
    std::vector<float> col(size_t(pixels * taps)), dy(size_t(pixels * channels));
    for (auto& v : col) v = u(rng);
    for (auto& v : dy) v = u(rng);
    std::vector<float> dw(size_t(channels * taps)), dwt(size_t(taps * channels));
    gemm<float>(true, false, channels, taps, pixels, 1.f, dy.data(), channels, col.data(), taps, 0.f, dw.data(), taps);
    gemm<float>(true, false, taps, channels, pixels, 1.f, col.data(), taps, dy.data(), channels, 0.f, dwt.data(),
                channels);
    for (int64_t kk = 0; kk < channels; ++kk)
      for (int64_t t = 0; t < taps; ++t)
        ASSERT_EQ(dw[size_t(kk * taps + t)], dwt[size_t(t * channels + kk)]) << pixels << " pixels, (" << kk << ", " << t << ")";
  }
}

// The chunking of K and the tasks' output tiles fix every sum's order whatever the threads:
//  - the same product computed on every thread of the pool and inline on one (a nested
//    parallel_for runs inline) gives the same bits, on the direct and the split-K paths;
//  - a split-K product (K > 4096, an output of at most 65536) gives the bits of its chunks'
//    products added in chunk order, the chunks being ceil(K / 4096) runs of whole 256-deep
//    blocks shared out evenly (each chunk's product, K <= 4096, runs direct): the chunking
//    depends on K alone.
TEST(CpuGemmScaling, TheBitsDoNotDependOnTheThreads) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1, 1);
  for (const Case& c :
       {Case{64, 576, 7232}, Case{16, 144, 30000}, Case{9, 20, 69633}, Case{300, 64, 700}, Case{40, 1100, 300}}) {
    const auto [m, n, k] = c;
    SCOPED_TRACE(::testing::Message() << m << " x " << n << " x " << k);
    std::vector<float> a(size_t(k) * m), b(size_t(k) * n);
    for (auto& v : a) v = u(rng);
    for (auto& v : b) v = u(rng);
    std::vector<float> pooled(size_t(m) * n), inline_one(size_t(m) * n);
    gemm<float>(true, false, m, n, k, 1.f, a.data(), m, b.data(), n, 0.f, pooled.data(), n);
    if (sp::kernels::cpu::num_threads() > 1) {
      sp::kernels::cpu::parallel_for(2, 1, [&](int64_t begin, int64_t) {
        if (begin == 0) gemm<float>(true, false, m, n, k, 1.f, a.data(), m, b.data(), n, 0.f, inline_one.data(), n);
      });
      EXPECT_EQ(pooled, inline_one);
    }
    if (k <= 4096 || int64_t(m) * n > 65536) continue;
    const int64_t chunks = (k + 4095) / 4096, blocks = (k + 255) / 256;
    std::vector<float> sum(size_t(m) * n, 0.f), part(size_t(m) * n);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t begin = ch * blocks / chunks * 256, end = std::min<int64_t>(k, (ch + 1) * blocks / chunks * 256);
      ASSERT_LE(end - begin, 4096);
      gemm<float>(true, false, m, n, end - begin, 1.f, a.data() + begin * m, m, b.data() + begin * n, n, 0.f,
                  part.data(), n);
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
    }
    for (float& v : sum) v = 0.f + 1.f * v;  // C (zeroed, beta = 0) + alpha * sum
    EXPECT_EQ(pooled, sum);
  }
}

}  // namespace

// $STALEPROP_NUM_THREADS: a whole number from 1 to 1024, or unset/empty for every core; anything
// else is an error naming the variable (it used to fall back to every core without a word).
TEST(CpuThreads, TheThreadCountIsAWholeNumberOrAnError) {
  using sp::kernels::cpu::parse_num_threads;
  EXPECT_EQ(parse_num_threads(nullptr), 0);
  EXPECT_EQ(parse_num_threads(""), 0);
  EXPECT_EQ(parse_num_threads("1"), 1);
  EXPECT_EQ(parse_num_threads("16"), 16);
  EXPECT_EQ(parse_num_threads("1024"), 1024);
  for (const char* bad : {"0", "abc", "4x", "-2", " 4", "+4", "1025", "99999999999999999999"})
    sp::test::expect_error([&] { parse_num_threads(bad); }, {"STALEPROP_NUM_THREADS", std::string("'") + bad + "'"});
}
