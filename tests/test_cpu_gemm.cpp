// The CPU reference GEMM against a plain triple loop in double, across transposes, strides,
// alpha/beta, and sizes that straddle every blocking boundary (each kernel's MR, kNr, kMc,
// kGemmKc, kNc), with every micro-kernel this CPU can run (generic, avx2, avx512); and the
// fused kernels (avx2, avx512) against each other, bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "kernels/common/sanitizers.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "tests/error_testing.h"

namespace {

using sp::kernels::cpu::gemm;

// Keeps the GEMM micro-kernel in use, and puts it back when the scope ends (an assertion that
// returns early, or an exception, included).
class KeepGemmKernel {
 public:
  KeepGemmKernel() : before_(sp::kernels::cpu::gemm_kernel()) {}
  ~KeepGemmKernel() { sp::kernels::cpu::set_gemm_kernel(before_); }

 private:
  std::string before_;
};

// Runs body() once with each GEMM micro-kernel this CPU can run.
template <typename Body>
void with_each_kernel(const Body& body) {
  const KeepGemmKernel keep;
  for (const std::string& kernel : sp::kernels::cpu::gemm_kernels()) {
    SCOPED_TRACE("GEMM kernel " + kernel);
    sp::kernels::cpu::set_gemm_kernel(kernel);
    ASSERT_EQ(sp::kernels::cpu::gemm_kernel(), kernel);
    body();
  }
}

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
  with_each_kernel([&] {
    const auto [m, n, k] = GetParam();
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "trans_a=" << ta << " trans_b=" << tb);
        EXPECT_LT(max_rel_error<double>(ta, tb, m, n, k, 1.0, 0.0, 0, false), 1e-12);
        EXPECT_LT(max_rel_error<float>(ta, tb, m, n, k, 1.f, 0.f, 0, false), 2e-5 * std::sqrt(double(k) + 1));
      }
  });
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuGemm,
                         ::testing::Values(Case{1, 1, 1}, Case{1, 17, 5}, Case{7, 1, 3}, Case{6, 16, 8},
                                           Case{12, 16, 8}, Case{13, 33, 29}, Case{25, 16, 300}, Case{97, 50, 257},
                                           Case{200, 40, 600}, Case{5, 1100, 3}, Case{64, 64, 0},
                                           Case{5, 7, 9000},                        // split-K
                                           Case{12, 40, 9000}, Case{16, 32, 9000},  // split-K, read in place
                                           Case{9, 20, 4097}, Case{7, 70, 7232}));  // split-K in two chunks

TEST(CpuGemmScaling, AlphaBetaAndStrides) {
  with_each_kernel([&] {
    EXPECT_LT(max_rel_error<double>(false, false, 37, 45, 70, 0.5, 2.0, 3, false), 1e-12);
    EXPECT_LT(max_rel_error<double>(true, true, 37, 45, 70, -1.5, 1.0, 5, false), 1e-12);
    EXPECT_LT(max_rel_error<double>(false, true, 37, 45, 70, 1.0, -0.25, 1, false), 1e-12);
  });
}

TEST(CpuGemmScaling, BetaZeroIgnoresNaNInC) {
  with_each_kernel([&] {
    EXPECT_LT(max_rel_error<double>(false, false, 20, 30, 40, 1.0, 0.0, 2, true), 1e-12);
    EXPECT_LT(max_rel_error<float>(true, false, 20, 30, 40, 2.f, 0.f, 0, true), 1e-4);
  });
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
  with_each_kernel([&] {
    expect_in_place_same_as_packed<float>();
    expect_in_place_same_as_packed<double>();
  });
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
  with_each_kernel([&] {
    expect_overwrite_same_as_zero_then_add<float>();
    expect_overwrite_same_as_zero_then_add<double>();
  });
}

// The convolutions' weight gradient for few output channels is computed transposed (conv.cpp):
// col^T * dy, then transposed, must equal dy^T * col bit for bit (the same sums with the
// factors of each product swapped), on the direct and the split-K paths.
TEST(CpuGemmScaling, TransposedProductGivesTheSameBits) {
  with_each_kernel([&] {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1, 1);
    const int64_t taps = 144, channels = 16;
    for (const int64_t pixels : {int64_t(300), int64_t(9000)}) {
      std::vector<float> col(size_t(pixels * taps)), dy(size_t(pixels * channels));
      for (auto& v : col) v = u(rng);
      for (auto& v : dy) v = u(rng);
      std::vector<float> dw(size_t(channels * taps)), dwt(size_t(taps * channels));
      gemm<float>(true, false, channels, taps, pixels, 1.f, dy.data(), channels, col.data(), taps, 0.f, dw.data(),
                  taps);
      gemm<float>(true, false, taps, channels, pixels, 1.f, col.data(), taps, dy.data(), channels, 0.f, dwt.data(),
                  channels);
      for (int64_t kk = 0; kk < channels; ++kk)
        for (int64_t t = 0; t < taps; ++t)
          ASSERT_EQ(dw[size_t(kk * taps + t)], dwt[size_t(t * channels + kk)])
              << pixels << " pixels, (" << kk << ", " << t << ")";
    }
  });
}

// The chunking of K and the tasks' output tiles fix every sum's order whatever the threads:
//  - the same product computed on every thread of the pool and inline on one (a nested
//    parallel_for runs inline) gives the same bits, on the direct and the split-K paths;
//  - a split-K product (K > 4096, an output of at most 65536) gives the bits of its chunks'
//    products added in chunk order, the chunks being ceil(K / 4096) runs of whole 256-deep
//    blocks shared out evenly (each chunk's product, K <= 4096, runs direct): the chunking
//    depends on K alone.
TEST(CpuGemmScaling, TheBitsDoNotDependOnTheThreads) {
  with_each_kernel([&] {
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
      } else if (m == 64 && n == 576) {  // said once per kernel
        std::printf("[ NOTE     ] one CPU thread: the pooled call runs inline too; only the chunk order is checked\n");
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
  });
}

// avx2 and avx512 add each element's products in the same order with the same fused
// multiply-adds (gemm_micro.h), so they must give the same bits: on products of every form
// (operands packed or read in place, split-K, overwriting or adding to C, partial tiles) and on
// convolutions, which take those forms. Their tiles differ (6 x 16 and 12 x 16 for float), so a
// slip in either one's tile or panel handling shows here as a difference.
template <typename T>
std::vector<T> product_with(const std::string& kernel, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T beta) {
  std::mt19937 rng(uint32_t(m * 7 + n * 3 + k));
  std::uniform_real_distribution<T> u(-1, 1);
  std::vector<T> a(size_t(m * k)), b(size_t(k * n)), c(size_t(m * n));
  for (auto* v : {&a, &b, &c})
    for (auto& x : *v) x = u(rng);
  sp::kernels::cpu::set_gemm_kernel(kernel);
  gemm<T>(ta, tb, m, n, k, T(0.75), a.data(), ta ? m : k, b.data(), tb ? k : n, beta, c.data(), n);
  return c;
}

template <typename T>
std::vector<std::vector<T>> convolutions_with(const std::string& kernel, const sp::kernels::Conv2dShape& sh) {
  namespace cpu = sp::kernels::cpu;
  std::mt19937 rng(uint32_t(sh.c * 31 + sh.k + sh.stride));
  std::uniform_real_distribution<T> u(-1, 1);
  std::vector<T> x(size_t(sh.x_size())), w(size_t(sh.w_size())), dy(size_t(sh.y_size()));
  for (auto* v : {&x, &w, &dy})
    for (auto& e : *v) e = u(rng);
  std::vector<T> y(dy.size()), dx(x.size()), dw(w.size()), db(size_t(sh.k));
  cpu::set_gemm_kernel(kernel);
  cpu::conv2d_forward<T>(sh, x.data(), w.data(), nullptr, y.data());
  cpu::conv2d_backward_data<T>(sh, dy.data(), w.data(), dx.data());
  cpu::conv2d_backward_weight<T>(sh, x.data(), dy.data(), dw.data(), db.data());
  return {y, dx, dw, db};
}

TEST(CpuGemmKernels, Avx2AndAvx512GiveTheSameBits) {
  const std::vector<std::string> kernels = sp::kernels::cpu::gemm_kernels();
  const auto has = [&](const char* name) { return std::find(kernels.begin(), kernels.end(), name) != kernels.end(); };
  if (!has("avx2") || !has("avx512")) {
    std::string names;
    for (const auto& k : kernels) names += " " + k;
    GTEST_SKIP() << "this CPU cannot run both fused kernels (it runs:" << names << ")";
  }
  const KeepGemmKernel keep;
  for (const Case& c : {Case{13, 37, 700}, Case{50, 40, 700}, Case{12, 203, 700}, Case{25, 16, 300}, Case{9, 20, 9000},
                        Case{97, 50, 257}, Case{300, 64, 700}, Case{1, 1, 1}})
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (double beta : {0.0, 1.5}) {
          const auto [m, n, k] = c;
          SCOPED_TRACE(::testing::Message()
                       << m << " x " << n << " x " << k << " trans_a=" << ta << " trans_b=" << tb << " beta=" << beta);
          EXPECT_EQ(product_with<float>("avx2", ta, tb, m, n, k, float(beta)),
                    product_with<float>("avx512", ta, tb, m, n, k, float(beta)));
          EXPECT_EQ(product_with<double>("avx2", ta, tb, m, n, k, beta),
                    product_with<double>("avx512", ta, tb, m, n, k, beta));
        }
  for (const auto& [c, k, stride] : {std::tuple{16, 16, 1}, std::tuple{16, 32, 2}, std::tuple{64, 64, 1},
                                     std::tuple{3, 16, 1}, std::tuple{32, 10, 1}}) {
    sp::kernels::Conv2dShape sh{};
    sh.n = 3, sh.h = sh.w = 12, sh.c = c, sh.k = k, sh.r = sh.s = 3, sh.stride = stride, sh.pad = 1;
    SCOPED_TRACE(::testing::Message() << "conv C " << c << " K " << k << " stride " << stride);
    EXPECT_EQ(convolutions_with<float>("avx2", sh), convolutions_with<float>("avx512", sh));
  }
}

// The choice of kernel: "auto" is the widest this CPU runs; a name it cannot run, or an unknown
// one, is refused naming the choices, and leaves the kernel in use as it was.
TEST(CpuGemmKernels, TheChoiceIsCheckedAndKept) {
  using namespace sp::kernels::cpu;
  const std::vector<std::string> kernels = gemm_kernels();
  ASSERT_FALSE(kernels.empty());
  EXPECT_EQ(kernels.front(), "generic");
  const KeepGemmKernel keep;
  set_gemm_kernel("generic");
  EXPECT_EQ(gemm_kernel(), "generic");
  set_gemm_kernel("auto");
  EXPECT_EQ(gemm_kernel(), kernels.back());
  set_gemm_kernel("generic");
  sp::test::expect_error([] { set_gemm_kernel("avx1024"); },
                         {"set_gemm_kernel", "unknown GEMM kernel 'avx1024'", "this CPU can run generic"});
  // One this CPU lacks: refused as one it cannot run (x86-64), or as unknown (a build for another
  // processor has only generic).
  for (const char* known : {"avx2", "avx512"})
    if (std::find(kernels.begin(), kernels.end(), known) == kernels.end()) {
      try {
        set_gemm_kernel(known);
        ADD_FAILURE() << known << " was taken on a CPU that cannot run it";
      } catch (const sp::Error& e) {
        const std::string what = e.what();
        EXPECT_TRUE(what.find(std::string("cannot run the ") + known) != std::string::npos ||
                    what.find(std::string("unknown GEMM kernel '") + known) != std::string::npos)
            << what;
      }
    }
  EXPECT_EQ(gemm_kernel(), "generic");
}

// Under the sanitizers the micro-kernels run uninstrumented, and the GEMM tells the sanitizer of
// each call's operands instead (kernels/cpu/gemm.cpp, sanitize_micro_call). Under AddressSanitizer
// an operand one element short must stop the run, naming the operand, with every kernel and each
// operand a caller gives (A's rows or columns read in place, B's rows read in place, C).
TEST(CpuGemmKernelsDeathTest, AnOperandTooShortStopsTheRunUnderAsan) {
#if !defined(SP_SANITIZE_ADDRESS)
  GTEST_SKIP() << "the micro-kernels' operand check is compiled only in AddressSanitizer builds "
                  "(-DSTALEPROP_ASAN=ON; tools/run_tests.sh runs this test there)";
#else
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // m x n x k, the product's operands each one element short in turn (each a vector of its own,
  // so the element past it is in ASan's redzone). 24 x 16 x 8: A's rows in place (n <= 64, whole
  // tiles of 6 and 12 rows), or with A transposed its columns in place; 4 x 16 x 8: A packed (4
  // rows, less than a tile), B's rows in place (m <= 16); and 40 x 100 x 8: both packed. (The
  // packed panels are the GEMM's own buffers: no caller can make them short.)
  struct Short {
    int64_t m, n, k;
    bool trans_a;
    int which;  // 0: A, 1: B, 2: C
    const char* says;
  };
  for (const Short& t : {Short{24, 16, 8, false, 0, "row of A read in place"}, Short{24, 16, 8, true, 0, "column of A"},
                         Short{4, 16, 8, false, 1, "row of B read in place"}, Short{24, 16, 8, false, 2, "row of C"},
                         Short{40, 100, 8, false, 2, "row of C"}})
    with_each_kernel([&] {
      SCOPED_TRACE(::testing::Message() << t.m << " x " << t.n << " x " << t.k << ": " << t.says);
      const int64_t lda = t.trans_a ? t.m : t.k;  // A is m x k, or k x m when transposed
      std::vector<float> a(size_t(t.m * t.k - (t.which == 0))), b(size_t(t.k * t.n - (t.which == 1))),
          c(size_t(t.m * t.n - (t.which == 2)));
      EXPECT_DEATH(gemm<float>(t.trans_a, false, t.m, t.n, t.k, 1.f, a.data(), lda, b.data(), t.n, 0.f, c.data(), t.n),
                   std::string("GEMM micro-kernel: its ") + t.says + " reaches unaddressable memory");
      // Whole operands run.
      a.resize(size_t(t.m * t.k)), b.resize(size_t(t.k * t.n)), c.resize(size_t(t.m * t.n));
      gemm<float>(t.trans_a, false, t.m, t.n, t.k, 1.f, a.data(), lda, b.data(), t.n, 0.f, c.data(), t.n);
    });
#endif
}

// Under ThreadSanitizer, two products written into the same C at once by two threads must be
// reported as a race: only the GEMM's record of the micro-kernels' writes can show it, since they
// run uninstrumented and the rest of the GEMM writes only each thread's own packing buffers. The
// two products run in the two chunks of a parallel_for (each GEMM then runs inline, on its
// chunk's thread), which first wait for each other through a relaxed atomic: so they run on two
// threads at once, and nothing orders them for the race detector.
TEST(CpuGemmKernelsDeathTest, TwoProductsIntoOneCAtOnceAreARaceUnderTsan) {
#if !defined(SP_SANITIZE_THREAD)
  GTEST_SKIP() << "needs a ThreadSanitizer build (-DSTALEPROP_TSAN=ON; tools/run_tests.sh runs this test there)";
#else
  if (sp::kernels::cpu::num_threads() < 2) GTEST_SKIP() << "needs two CPU threads to race";
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  ::setenv("TSAN_OPTIONS", "halt_on_error=1 exitcode=66", 1);  // read by the child the death test starts
  const int64_t m = 48, n = 32, k = 64;
  std::vector<float> a(size_t(m * k), 1.f), b(size_t(k * n), 1.f), c(size_t(m * n));
  const auto product = [&] { gemm<float>(false, false, m, n, k, 1.f, a.data(), k, b.data(), n, 0.f, c.data(), n); };
  const auto at_once = [&] {
    std::atomic<int> arrived{0};
    sp::kernels::cpu::parallel_for(2, 1, [&](int64_t, int64_t) {
      arrived.fetch_add(1, std::memory_order_relaxed);
      while (arrived.load(std::memory_order_relaxed) < 2) std::this_thread::yield();
      product();
    });
  };
  EXPECT_EXIT(at_once(), ::testing::ExitedWithCode(66), "ThreadSanitizer: data race");
  // One after the other, the same products are no race.
  product();
  product();
  EXPECT_EQ(c[0], float(k));
#endif
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
