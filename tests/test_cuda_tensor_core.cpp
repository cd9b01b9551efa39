// The bf16 tensor-core kernels (kernels/cuda/tensor_core.h) and their cuBLASLt / cuDNN bf16
// twins (kernels/vendor/vendor.h) against the CPU reference (kernels/cpu), on CIFAR ResNet-20/18
// shapes and awkward ones (M/N/K = 1, sizes that are no multiple of any tile, every transpose,
// unaligned leading dimensions and pointers, C = 3, K = 10, batch 1, 5x7 images, stride 2,
// 1x1 stride 2 pad 0).
//
//   * Inputs are random values already rounded to bf16; the reference is the CPU reference
//     run in double on the widened inputs, so the only errors measured are the kernels' own.
//   * Metric: relative Frobenius error ||out - ref|| / ||ref||. fp32 outputs (GEMM C, dw,
//     dbias) only carry fp32 accumulation-order rounding: <= 1e-5. bf16 outputs carry one
//     rounding to 8 significant bits (relative rms ~2^-9 / sqrt(3) ~ 1.1e-3): <= 8e-3. The
//     vendor's dw passes through bf16 (vendor.h), so it gets the bf16 bound.
//   * Every output buffer is NaN (bytes 0xFF) before the kernel runs, so an element the kernel
//     fails to write, or a beta == 0 that reads C, fails the comparison; padding columns of C
//     must come back untouched.
//   * Determinism: two runs of our kernels are bit-identical (split-K included).
// Without a GPU (or in a CPU-only build) every test skips and says why.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/ops.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/common/conv_stride_classes.h"
#include "kernels/common/cuda_check.h"
#include "kernels/cuda/conv_halo.h"
#include "kernels/cuda/conv_small_c_plan.h"
#include "kernels/cuda/conv_tma.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/tensor_core.h"
#include "kernels/vendor/vendor.h"
#endif
#include "tests/gpu_testing.h"

using namespace sp;
namespace kc = sp::kernels::cpu;
using kernels::Conv2dShape;

#if !STALEPROP_WITH_CUDA

TEST(TensorCore, RequiresCudaBuild) { GTEST_SKIP() << "no CUDA device: this build has no CUDA backend"; }

#else

namespace kcu = sp::kernels::cuda;
namespace kvd = sp::kernels::vendor;
using namespace sp::test;

namespace {

constexpr double kTolF32 = 1e-5;   // fp32 outputs
constexpr double kTolBf16 = 8e-3;  // bf16 outputs (and the vendor's bf16-rounded dw)

// Every test runs once per main loop (tensor_core.h): mma.sync, and wgmma and wgmma_tma (TMA
// for the GEMM's plain matrices with N > 64) where the build and the GPU have them (sm_90a code
// on a compute capability 9.0 device), skipping with the reason elsewhere.
class TensorCore : public GpuTest, public ::testing::WithParamInterface<kcu::MmaMainloop> {
 protected:
  void SetUp() override {
    GpuTest::SetUp();
    if (IsSkipped()) return;
    previous_ = kcu::mma_mainloop();
    if (GetParam() != kcu::MmaMainloop::kMmaSync && !kcu::wgmma_available())
      GTEST_SKIP() << "the " << kcu::mainloop_name(GetParam()) << " main loop needs an sm_90a build (CMAKE_CUDA_ARCHITECTURES=90a) and a compute "
                      "capability 9.0 GPU (H100/H200)";
    kcu::set_mma_mainloop(GetParam());
  }
  void TearDown() override {
    kcu::set_mma_mainloop(previous_);
    GpuTest::TearDown();
  }
  kcu::MmaMainloop previous_ = kcu::MmaMainloop::kMmaSync;
};

INSTANTIATE_TEST_SUITE_P(Mainloops, TensorCore,
                         ::testing::Values(kcu::MmaMainloop::kMmaSync, kcu::MmaMainloop::kWgmma,
                                           kcu::MmaMainloop::kWgmmaTma),
                         [](const ::testing::TestParamInfo<kcu::MmaMainloop>& info) {
                           return std::string(kcu::mainloop_name(info.param));
                         });

std::vector<uint16_t> random_bf16(size_t n, uint32_t seed) {
  const std::vector<float> f = random_vector(n, seed);
  std::vector<uint16_t> h(n);
  kc::f32_to_bf16(int64_t(n), f.data(), h.data());
  return h;
}
std::vector<float> widen(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  kc::bf16_to_f32(int64_t(h.size()), h.data(), f.data());
  return f;
}
std::vector<double> widen_d(const std::vector<uint16_t>& h) { return to_double(widen(h)); }
std::vector<float> as_float(const std::vector<float>& v) { return v; }
std::vector<float> as_float(const std::vector<uint16_t>& v) { return widen(v); }

template <typename T>
bool bits_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}
// Whether every element was written: none is NaN (the outputs start as NaN: DeviceArray's poison).
bool all_written(const std::vector<float>& v) {
  return std::none_of(v.begin(), v.end(), [](float x) { return std::isnan(x); });
}
bool all_written(const std::vector<uint16_t>& v) {
  return std::none_of(v.begin(), v.end(), [](uint16_t x) { return (x & 0x7FFF) > 0x7F80; });
}

// `count` entries of C = op(A) op(B) (bf16 operands, row-major: A m x k, or k x m with ta; B
// k x n, or n x k with tb), sampled at random, against a double reference: op(A)[i, :] .
// op(B)[:, j], within fp32 accumulation's rounding.
void expect_sampled_product(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const std::vector<uint16_t>& ha,
                            const std::vector<uint16_t>& hb, const std::vector<float>& c, int count,
                            const std::string& what) {
  const std::vector<float> fa = widen(ha), fb = widen(hb);
  std::mt19937 pick(uint32_t(m * 7 + n * 3 + k));
  for (int e = 0; e < count; ++e) {
    const int64_t i = int64_t(pick() % uint32_t(m)), j = int64_t(pick() % uint32_t(n));
    double ref = 0.0, mag = 0.0;
    for (int64_t q = 0; q < k; ++q) {
      const double av = fa[size_t(ta ? q * m + i : i * k + q)], bv = fb[size_t(tb ? j * k + q : q * n + j)];
      ref += av * bv;
      mag += std::fabs(av * bv);
    }
    EXPECT_LE(std::fabs(double(c[size_t(i * n + j)]) - ref), 1e-5 * mag + 1e-6)
        << what << ": entry (" << i << ", " << j << ")";
  }
}

// ---- GEMM --------------------------------------------------------------------------------
template <typename T>
using GemmFn = void (*)(bool, bool, int64_t, int64_t, int64_t, float, const uint16_t*, int64_t, const uint16_t*,
                        int64_t, float, T*, int64_t, const float*, bool, cudaStream_t);

struct GemmCase {
  int64_t m, n, k;
  bool ta = false, tb = false;
  float alpha = 1.f, beta = 0.f;
  int64_t pad = 0;  // added to every leading dimension (pad % 8 != 0: the element-wise path)
  bool bias = false, relu = false;
  int offset = 0;  // operands start this many elements into their allocation (unaligned pointers)
};

std::string gemm_str(const GemmCase& g, const char* fn) {
  return std::string(fn) + " " + std::to_string(g.m) + "x" + std::to_string(g.n) + "x" + std::to_string(g.k) +
         (g.ta ? " A^T" : "") + (g.tb ? " B^T" : "") + " alpha " + std::to_string(g.alpha) + " beta " +
         std::to_string(g.beta) + " pad " + std::to_string(g.pad) + (g.bias ? " bias" : "") + (g.relu ? " relu" : "") +
         " offset " + std::to_string(g.offset);
}

// Runs one GEMM through fn and checks it against the double reference (tolerance tol) and
// C's padding. Returns the whole M x ldc result (for determinism and vendor comparisons).
template <typename T>
std::vector<T> check_gemm(GemmFn<T> fn, const char* name, cudaStream_t stream, const GemmCase& g, uint32_t seed,
                          double tol) {
  const int64_t a_rows = g.ta ? g.k : g.m, a_cols = g.ta ? g.m : g.k;
  const int64_t b_rows = g.tb ? g.n : g.k, b_cols = g.tb ? g.k : g.n;
  const int64_t lda = a_cols + g.pad, ldb = b_cols + g.pad, ldc = g.n + g.pad;
  const size_t off = size_t(g.offset);
  const std::vector<uint16_t> a = random_bf16(size_t(a_rows * lda), seed), b = random_bf16(size_t(b_rows * ldb), seed + 1);
  const std::vector<float> bias = random_vector(size_t(g.n), seed + 2);
  std::vector<T> c(size_t(g.m * ldc));
  if constexpr (std::is_same_v<T, float>)
    c = random_vector(c.size(), seed + 3);
  else
    c = random_bf16(c.size(), seed + 3);

  DeviceArray<uint16_t> da(a.size() + off), db(b.size() + off);
  DeviceArray<T> dc(c.size() + off);
  DeviceArray<float> dbias(bias);
  SP_CUDA_CHECK(cudaMemcpy(da.get() + off, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
  SP_CUDA_CHECK(cudaMemcpy(db.get() + off, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
  if (g.beta != 0.f)  // beta == 0: C stays NaN, which must not leak into the result
    SP_CUDA_CHECK(cudaMemcpy(dc.get() + off, c.data(), c.size() * sizeof(T), cudaMemcpyHostToDevice));
  fn(g.ta, g.tb, g.m, g.n, g.k, g.alpha, da.get() + off, lda, db.get() + off, ldb, g.beta, dc.get() + off, ldc,
     g.bias ? dbias.get() : nullptr, g.relu, stream);
  sync_and_check();
  std::vector<T> got = dc.download();
  got.erase(got.begin(), got.begin() + std::ptrdiff_t(off));

  std::vector<double> ref = to_double(as_float(c));
  if (g.beta == 0.f) std::fill(ref.begin(), ref.end(), 0.0);
  kc::gemm<double>(g.ta, g.tb, g.m, g.n, g.k, g.alpha, widen_d(a).data(), lda, widen_d(b).data(), ldb, g.beta,
                   ref.data(), ldc);
  const std::vector<float> gotf = as_float(got);
  std::vector<float> got_core;
  std::vector<double> ref_core;
  const std::string what = gemm_str(g, name);
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t j = 0; j < ldc; ++j) {
      const size_t idx = size_t(i * ldc + j);
      if (j < g.n) {
        double v = ref[idx] + (g.bias ? double(bias[size_t(j)]) : 0.0);
        if (g.relu) v = std::max(v, 0.0);
        got_core.push_back(gotf[idx]);
        ref_core.push_back(v);
      } else if (g.beta == 0.f) {
        EXPECT_TRUE(std::isnan(gotf[idx])) << what << ": wrote outside the M x N block";
      } else {
        EXPECT_EQ(std::memcmp(&got[idx], &c[idx], sizeof(T)), 0) << what << ": wrote outside the M x N block";
      }
    }
  EXPECT_LE(rel_error(got_core, ref_core), tol) << what;
  return got;
}

std::vector<float> check_f32(GemmFn<float> fn, cudaStream_t s, const GemmCase& g, uint32_t seed) {
  return check_gemm<float>(fn, "gemm_bf16", s, g, seed, kTolF32);
}
std::vector<uint16_t> check_b16(GemmFn<uint16_t> fn, cudaStream_t s, const GemmCase& g, uint32_t seed) {
  return check_gemm<uint16_t>(fn, "gemm_bf16_out_bf16", s, g, seed, kTolBf16);
}

TEST_P(TensorCore, GemmAllTransposesAndEpilogues) {
  const int64_t shapes[][3] = {{1, 1, 1}, {17, 33, 65}, {128, 128, 128}, {256, 512, 1024}, {130, 72, 96}};
  uint32_t seed = 100;
  for (const auto& s : shapes)
    for (int t = 0; t < 4; ++t) {
      GemmCase g{s[0], s[1], s[2]};
      g.ta = t & 1, g.tb = t & 2;
      check_f32(&kcu::gemm_bf16, stream_, g, seed += 5);  // plain, beta == 0 over a NaN C
      GemmCase e = g;
      e.alpha = 0.5f, e.beta = -1.5f, e.pad = 3, e.bias = true, e.relu = true;  // unaligned ld: element-wise path
      check_f32(&kcu::gemm_bf16, stream_, e, seed += 5);
      GemmCase b = g;
      b.bias = true;
      check_b16(&kcu::gemm_bf16_out_bf16, stream_, b, seed += 5);
      b.alpha = 2.f, b.beta = 1.f, b.pad = 8, b.relu = true, b.bias = false;  // padded but aligned
      check_b16(&kcu::gemm_bf16_out_bf16, stream_, b, seed += 5);
      // ldc = N + 1: even for odd N, whose bf16 output is stored in column pairs with a single last
      // column (for even N, ldc is odd: single columns throughout).
      b.beta = 0.5f, b.pad = 1, b.bias = true;
      check_b16(&kcu::gemm_bf16_out_bf16, stream_, b, seed += 5);
      GemmCase r = g;
      r.pad = 7, r.bias = true;  // ld % 8 == 0 only where the extent is 1 mod 8: cp.async of ragged chunks
      check_f32(&kcu::gemm_bf16, stream_, r, seed += 5);
    }
}

TEST_P(TensorCore, GemmSplitKOnLongReductions) {
  // Few output tiles and a long K: K is split across blocks and the slices summed in order.
  const int64_t shapes[][3] = {{16, 144, 8192}, {144, 16, 8192}, {10, 64, 4099}, {3, 5, 20000}};
  uint32_t seed = 200;
  for (const auto& s : shapes)
    for (int t = 0; t < 4; ++t) {
      GemmCase g{s[0], s[1], s[2]};
      g.ta = t & 1, g.tb = t & 2;
      check_f32(&kcu::gemm_bf16, stream_, g, seed += 5);
      g.bias = g.relu = true;
      check_b16(&kcu::gemm_bf16_out_bf16, stream_, g, seed += 5);
    }
}

TEST_P(TensorCore, GemmUnalignedPointers) {
  // Operands one element (2 bytes) into their allocation: not 16-byte aligned, so the loads
  // take the element-wise path. The vendor twin too: cuBLASLt's heuristic must be told 2-byte
  // alignment (it was told 4, which could pick a kernel that faults on these pointers).
  uint32_t seed = 300;
  for (int t = 0; t < 4; ++t) {
    GemmCase g{70, 90, 50};
    g.ta = t & 1, g.tb = t & 2, g.offset = 1, g.bias = true;
    check_f32(&kcu::gemm_bf16, stream_, g, seed += 5);
    check_b16(&kcu::gemm_bf16_out_bf16, stream_, g, seed += 5);
    check_f32(&kvd::gemm_bf16, stream_, g, seed += 5);
    check_b16(&kvd::gemm_bf16_out_bf16, stream_, g, seed += 5);
  }
}

TEST_P(TensorCore, GemmDegenerateAlphaAndK) {
  // alpha == 0 or K == 0: C = relu?(beta * C + bias) without reading A or B (null here).
  const std::vector<float> c = random_vector(35, 7), bias = random_vector(7, 8);
  DeviceArray<float> dc(c), dbias(bias);
  kcu::gemm_bf16(false, false, 5, 7, 3, 0.f, nullptr, 3, nullptr, 7, 2.f, dc.get(), 7, dbias.get(), true, stream_);
  sync_and_check();
  std::vector<float> want(c);
  for (size_t i = 0; i < want.size(); ++i) want[i] = std::max(2.f * c[i] + bias[i % 7], 0.f);
  EXPECT_TRUE(bits_equal(dc.download(), want)) << "alpha == 0";
  kcu::gemm_bf16(false, false, 5, 7, 0, 1.f, nullptr, 1, nullptr, 7, 0.f, dc.get(), 7, nullptr, false, stream_);
  sync_and_check();
  EXPECT_TRUE(bits_equal(dc.download(), std::vector<float>(35, 0.f))) << "K == 0, beta == 0";
}

TEST_P(TensorCore, GemmIsDeterministic) {
  GemmCase split{48, 40, 6000};  // split K
  GemmCase plain{300, 260, 300};
  plain.tb = true;
  for (const GemmCase& g : {split, plain}) {
    const std::vector<float> r1 = check_f32(&kcu::gemm_bf16, stream_, g, 400);
    const std::vector<float> r2 = check_f32(&kcu::gemm_bf16, stream_, g, 400);
    EXPECT_TRUE(bits_equal(r1, r2)) << gemm_str(g, "gemm_bf16") << ": repeated runs differ";
    const std::vector<uint16_t> h1 = check_b16(&kcu::gemm_bf16_out_bf16, stream_, g, 401);
    const std::vector<uint16_t> h2 = check_b16(&kcu::gemm_bf16_out_bf16, stream_, g, 401);
    EXPECT_TRUE(bits_equal(h1, h2)) << gemm_str(g, "gemm_bf16_out_bf16") << ": repeated runs differ";
  }
}

TEST_P(TensorCore, GemmVendorBaselineAgrees) {
  const int64_t shapes[][3] = {{1, 1, 1}, {17, 33, 65}, {128, 128, 128}, {256, 512, 1024}, {10, 64, 4099}};
  uint32_t seed = 500;
  for (const auto& s : shapes)
    for (int t = 0; t < 4; ++t) {
      GemmCase g{s[0], s[1], s[2]};
      g.ta = t & 1, g.tb = t & 2, g.bias = t != 1, g.relu = t >= 2, g.beta = t == 3 ? 0.5f : 0.f;
      const std::vector<float> ours = check_f32(&kcu::gemm_bf16, stream_, g, seed);
      const std::vector<float> theirs = check_f32(&kvd::gemm_bf16, stream_, g, seed);
      EXPECT_LE(rel_error(ours, theirs), 2 * kTolF32) << gemm_str(g, "custom vs vendor");
      const std::vector<uint16_t> ours16 = check_b16(&kcu::gemm_bf16_out_bf16, stream_, g, seed + 1);
      const std::vector<uint16_t> theirs16 = check_b16(&kvd::gemm_bf16_out_bf16, stream_, g, seed + 1);
      EXPECT_LE(rel_error(widen(ours16), widen(theirs16)), 2 * kTolBf16) << gemm_str(g, "custom vs vendor (bf16)");
      seed += 5;
    }
}

// ---- Convolutions ----------------------------------------------------------------------------
struct ConvResult {
  std::vector<uint16_t> y, dx;
  std::vector<float> dw, db;
};

using ConvFwd = void (*)(const Conv2dShape&, const uint16_t*, const uint16_t*, const float*, uint16_t*, cudaStream_t);
using ConvBwdData = void (*)(const Conv2dShape&, const uint16_t*, const uint16_t*, uint16_t*, cudaStream_t, float);
using ConvBwdWeight = void (*)(const Conv2dShape&, const uint16_t*, const uint16_t*, float*, float*, cudaStream_t);

struct ConvFns {
  const char* name;
  ConvFwd fwd;
  ConvBwdData bwd_data;
  ConvBwdWeight bwd_weight;
  double dw_tol;
};
const ConvFns kCustomConv{"custom", &kcu::conv2d_forward_bf16, &kcu::conv2d_backward_data_bf16,
                          &kcu::conv2d_backward_weight_bf16, kTolF32};
const ConvFns kVendorConv{"vendor", &kvd::conv2d_forward_bf16, &kvd::conv2d_backward_data_bf16,
                          &kvd::conv2d_backward_weight_bf16, kTolBf16};

// The inputs of a convolution test of `seed`: x, w, dy, the bias, and what dx holds before a
// data gradient with beta adds to it.
struct ConvInputs {
  std::vector<uint16_t> x, w, dy;
  std::vector<float> bias;
  std::vector<uint16_t> dx0;
};
ConvInputs conv_inputs(const Conv2dShape& sh, uint32_t seed) {
  return {random_bf16(size_t(sh.x_size()), seed), random_bf16(size_t(sh.w_size()), seed + 1),
          random_bf16(size_t(sh.y_size()), seed + 2), random_vector(size_t(sh.k), seed + 3),
          random_bf16(size_t(sh.x_size()), seed + 4)};
}

// All three passes of one shape through fns on conv_inputs(seed). offset shifts every tensor by
// that many elements (unaligned pointers). Without a bias (as the ResNets run), the bias and its
// gradient are null pointers, and the result's db stays NaN. With beta, the data gradient adds to
// beta * dx0 (else dx starts as NaN).
ConvResult run_conv(const ConvFns& fns, cudaStream_t stream, const Conv2dShape& sh, uint32_t seed, int offset = 0,
                    bool with_bias = true, float beta = 0.f) {
  const size_t off = size_t(offset);
  const ConvInputs in = conv_inputs(sh, seed);
  auto upload = [&](const std::vector<uint16_t>& h) {
    auto d = std::make_unique<DeviceArray<uint16_t>>(h.size() + off);
    SP_CUDA_CHECK(cudaMemcpy(d->get() + off, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    return d;
  };
  const auto dx_in = upload(in.x), dw_in = upload(in.w), ddy = upload(in.dy);
  DeviceArray<float> dbias(in.bias);
  DeviceArray<uint16_t> dy_out(size_t(sh.y_size()) + off), ddx(size_t(sh.x_size()) + off);
  DeviceArray<float> ddw(size_t(sh.w_size()) + off), ddb(size_t(sh.k));

  fns.fwd(sh, dx_in->get() + off, dw_in->get() + off, with_bias ? dbias.get() : nullptr, dy_out.get() + off, stream);
  sync_and_check();
  if (beta != 0.f) SP_CUDA_CHECK(cudaMemcpy(ddx.get() + off, in.dx0.data(), in.dx0.size() * 2, cudaMemcpyHostToDevice));
  fns.bwd_data(sh, ddy->get() + off, dw_in->get() + off, ddx.get() + off, stream, beta);
  sync_and_check();
  fns.bwd_weight(sh, dx_in->get() + off, ddy->get() + off, ddw.get() + off, with_bias ? ddb.get() : nullptr, stream);
  sync_and_check();
  auto strip = [off](auto v) {
    v.erase(v.begin(), v.begin() + std::ptrdiff_t(off));
    return v;
  };
  return ConvResult{strip(dy_out.download()), strip(ddx.download()), strip(ddw.download()), ddb.download()};
}

// run_conv, checked against the double reference.
ConvResult check_conv(const ConvFns& fns, cudaStream_t stream, const Conv2dShape& sh, uint32_t seed, int offset = 0,
                      bool with_bias = true, float beta = 0.f) {
  const std::string what = std::string(fns.name) + " " + conv_str(sh) + " offset " + std::to_string(offset) +
                           (with_bias ? "" : " without bias") + (beta != 0.f ? " beta " + std::to_string(beta) : "");
  const ConvResult r = run_conv(fns, stream, sh, seed, offset, with_bias, beta);
  const ConvInputs in = conv_inputs(sh, seed);
  const std::vector<double> xd = widen_d(in.x), wd = widen_d(in.w), dyd = widen_d(in.dy), bd = to_double(in.bias);
  std::vector<double> ry(size_t(sh.y_size())), rdx(size_t(sh.x_size())), rdw(size_t(sh.w_size())), rdb(size_t(sh.k));
  kc::conv2d_forward<double>(sh, xd.data(), wd.data(), with_bias ? bd.data() : nullptr, ry.data());
  if (beta != 0.f) rdx = widen_d(in.dx0);
  kc::conv2d_backward_data<double>(sh, dyd.data(), wd.data(), rdx.data(), double(beta));
  kc::conv2d_backward_weight<double>(sh, xd.data(), dyd.data(), rdw.data(), rdb.data());
  EXPECT_LE(rel_error(widen(r.y), ry), kTolBf16) << what << " forward";
  EXPECT_LE(rel_error(widen(r.dx), rdx), kTolBf16) << what << " backward data";
  EXPECT_LE(rel_error(r.dw, rdw), fns.dw_tol) << what << " backward weight";
  if (with_bias) {
    EXPECT_LE(rel_error(r.db, rdb), fns.dw_tol) << what << " backward bias";
  } else {
    EXPECT_TRUE(std::all_of(r.db.begin(), r.db.end(), [](float v) { return std::isnan(v); }))
        << what << ": wrote a bias gradient it was not given";
  }
  return r;
}

TEST_P(TensorCore, ConvolutionsOnResNetAndAwkwardShapes) {
  uint32_t seed = 600;
  for (const Conv2dShape& sh : conv_cases()) check_conv(kCustomConv, stream_, sh, seed += 5);
  // Without a bias, as the ResNets' convolutions run: the epilogue adds none, and no bias
  // gradient is written.
  for (const Conv2dShape& sh : conv_cases()) check_conv(kCustomConv, stream_, sh, seed += 5, 0, false);
  // The data gradient added to dx (beta 1, as a residual block accumulates; the stride classes
  // too), and with beta 0.5 (the strided shapes then take the direct form).
  for (const Conv2dShape& sh : conv_cases()) {
    check_conv(kCustomConv, stream_, sh, seed += 5, 0, false, 1.f);
    check_conv(kCustomConv, stream_, sh, seed += 5, 1, false, 0.5f);
  }
  // The forms the defaults leave (tensor_core.h): the strided data gradients direct (not by stride
  // class), and the convolutions with at most 4 input channels on the tensor cores (not direct).
  const ScopedSwitch direct(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class, false);
  const ScopedSwitch tensor_cores(kcu::conv_small_c, kcu::set_conv_small_c, false);
  int64_t others = 0;
  for (const Conv2dShape& sh : conv_cases())
    if (sh.stride > 1 || sh.c <= 4) check_conv(kCustomConv, stream_, sh, seed += 5), ++others;
  EXPECT_GE(others, 2) << "conv_cases() has strided shapes and C = 3";
}

TEST_P(TensorCore, GemmOnTheWideTmaTile) {
  // The 128 x 256 tile of the wgmma_tma GEMM (tma_wide_tile(), tensor_core.h) for N >= 256, its
  // warpgroups' registers rebalanced by setmaxnreg: whole tiles, tails in M, N and K, all four
  // transposes (every row stride here a multiple of 8 elements, so all take TMA), epilogues, bf16
  // output, split K, blocks that go round the 4-stage ring more than once ({136, 448, 488}: 8
  // steps; {200, 512, 1000}: slices of 6, 6 and 4), and a repeated run. Every N here takes the
  // wide tile (N % 256 is 0 or more than 128). Against the reference; on the other main loops
  // the switch changes nothing.
  const ScopedSwitch wide(kcu::tma_wide_tile, kcu::set_tma_wide_tile);
  const int64_t shapes[][3] = {{256, 512, 1024}, {200, 400, 136}, {136, 448, 488}, {200, 512, 1000}, {16, 512, 8192}};
  const int64_t expect_wide = GetParam() == kcu::MmaMainloop::kWgmmaTma ? 1 : 0;
  uint32_t seed = 560;
  for (const auto& s : shapes)
    for (int t = 0; t < 4; ++t) {
      GemmCase g{s[0], s[1], s[2]};
      g.ta = t & 1, g.tb = t & 2;
      const int64_t before = kcu::tma_launches().wide_gemm;
      check_f32(&kcu::gemm_bf16, stream_, g, seed += 5);
      EXPECT_EQ(kcu::tma_launches().wide_gemm - before, expect_wide) << gemm_str(g, "gemm_bf16") << ": wide tile launches";
      GemmCase e = g;
      e.alpha = 0.5f, e.beta = -1.5f, e.bias = true, e.relu = true;
      check_f32(&kcu::gemm_bf16, stream_, e, seed += 5);
      GemmCase b = g;
      b.bias = true;
      check_b16(&kcu::gemm_bf16_out_bf16, stream_, b, seed += 5);
    }
  const GemmCase d{300, 256, 304};  // every row stride a multiple of 8: the TMA kernel, 5 steps
  const std::vector<float> r1 = check_f32(&kcu::gemm_bf16, stream_, d, 590);
  const std::vector<float> r2 = check_f32(&kcu::gemm_bf16, stream_, d, 590);
  EXPECT_TRUE(bits_equal(r1, r2)) << "repeated runs differ";
}

TEST_P(TensorCore, ConvolutionsByStrideClass) {
  // The data gradient of a strided convolution runs per stride class of the input pixels
  // (kernels/common/conv_stride_classes.h): stride 3 with a filter smaller than the stride
  // (classes no tap reaches, whose dx must be zeros), stride 3 with a 5x5 filter and pad 2 on
  // odd sizes, a single input row under stride 2 (empty classes), and C = 12 / K = 10 (the
  // element-wise gathers) under stride 2, also with chunked dy beside gathered weights.
  // On by default (tensor_core.h), and on here whatever the environment says: for every strided
  // shape of conv_cases() and on unaligned tensors too, with the default filter form (transposed);
  // ConvolutionsOnResNetAndAwkwardShapes runs the direct form too, and
  // ConvolutionsWithTheTransposedFilter the classes on the gathered filter.
  const ScopedSwitch on(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class);
  std::vector<Conv2dShape> shapes = {conv(2, 10, 11, 16, 24, 2, 3, 0), conv(1, 7, 8, 8, 16, 5, 3, 2),
                                     conv(2, 1, 3, 8, 8, 1, 2, 0), conv(2, 9, 7, 12, 10, 3, 2, 1),
                                     conv(2, 9, 9, 12, 16, 3, 2, 1)};
  for (const Conv2dShape& sh : conv_cases())
    if (sh.stride > 1) shapes.push_back(sh);
  uint32_t seed = 650;
  // Each class written into dx by its epilogue where its rows tile the height (even H here under
  // stride 2: class_row_map), else through the scratch and the scatter: both must give the same
  // bits (dgrad_class_direct(), on by default, off for the second run).
  // Besides the square even shapes: an odd width at batch 3 with C = 12 (element-wise gathers),
  // and stride 3 with H = 3 hc.
  shapes.push_back(conv(3, 10, 7, 12, 10, 3, 2, 1));
  shapes.push_back(conv(2, 9, 8, 8, 16, 5, 3, 2));
  // Odd C written straight into dx: the epilogue stores column pairs where a class's rows start
  // at an even offset (classes (0, 0) and (1, 0) on an even width) and single columns in the
  // others, with an odd last column either way.
  shapes.push_back(conv(2, 10, 8, 5, 16, 3, 2, 1));
  shapes.push_back(conv(1, 6, 6, 7, 10, 3, 2, 1));
  int64_t direct_total = 0;
  for (const Conv2dShape& sh : shapes) {
    seed += 5;
    // The classes with taps whose rows tile the height: the launch counter must grow by that many.
    int64_t expect = 0;
    for (const auto& c : sp::kernels::stride_classes(sh))
      expect += c.rc * c.sc > 0 && sp::kernels::class_row_map(sh, c).ok;
    ConvResult direct, scattered;
    {
      const ScopedSwitch into_dx(kcu::dgrad_class_direct, kcu::set_dgrad_class_direct);
      const int64_t before = kcu::dgrad_class_direct_launches();
      direct = check_conv(kCustomConv, stream_, sh, seed);
      EXPECT_EQ(kcu::dgrad_class_direct_launches() - before, expect) << conv_str(sh) << ": classes into dx";
    }
    {
      const ScopedSwitch scatter(kcu::dgrad_class_direct, kcu::set_dgrad_class_direct, false);
      const int64_t before = kcu::dgrad_class_direct_launches();
      scattered = check_conv(kCustomConv, stream_, sh, seed);
      EXPECT_EQ(kcu::dgrad_class_direct_launches(), before) << conv_str(sh) << ": the switch off writes none direct";
    }
    EXPECT_TRUE(bits_equal(direct.dx, scattered.dx)) << conv_str(sh) << ": dx written direct vs scattered";
    // Added to dx (beta 1): a class into dx adds in its epilogue, one through the scratch after
    // gathering its pixels there: the same bits; a class no tap reaches leaves its pixels.
    ConvResult direct_acc, scattered_acc;
    {
      const ScopedSwitch into_dx(kcu::dgrad_class_direct, kcu::set_dgrad_class_direct);
      direct_acc = check_conv(kCustomConv, stream_, sh, seed, 0, true, 1.f);
    }
    {
      const ScopedSwitch scatter(kcu::dgrad_class_direct, kcu::set_dgrad_class_direct, false);
      scattered_acc = check_conv(kCustomConv, stream_, sh, seed, 0, true, 1.f);
    }
    EXPECT_TRUE(bits_equal(direct_acc.dx, scattered_acc.dx)) << conv_str(sh) << ": dx added to direct vs scattered";
    // And on unaligned tensors (element-wise gathers and scatters, single-column stores).
    check_conv(kCustomConv, stream_, sh, seed, 1, true, 1.f);
    direct_total += expect;
  }
  EXPECT_GE(direct_total, 16) << "classes written straight into dx";
  const ConvResult a = check_conv(kCustomConv, stream_, shapes.back(), 660);
  const ConvResult b = check_conv(kCustomConv, stream_, shapes.back(), 660);
  EXPECT_TRUE(bits_equal(a.dx, b.dx)) << "repeated runs differ";
  check_conv(kCustomConv, stream_, conv(2, 8, 8, 16, 32, 3, 2, 1), 670, 1);  // unaligned: element-wise gathers
}

TEST_P(TensorCore, ConvolutionsWithTheTransposedFilter) {
  // The data gradient reading the filter transposed into wt[c, r, s, k] as a plain matrix: every
  // shape of conv_cases() (C = 3, K = 10, channels past one 32 x 32 transpose tile, 1x1 and
  // 5x5 filters, strides 1 and 2), C and K not multiples of 32, a 5x5 filter over one channel
  // (R*S*K = 250: the filter read element-wise), and unaligned tensors (the element-wise gather
  // of dy beside the transposed filter, which is always aligned), with stride classes off, so
  // that every shape takes this path; then the strided shapes by stride class. Against the
  // reference (check_conv) and against the gathered filter of the same path: the same
  // products summed in the same order, so dx is expected to match bit for bit; the test allows
  // one bf16 ulp in case the two shared-memory layouts' instruction sequences accumulate
  // differently (it matched within that on an H100, 2026-11-27). A wrong or missing filter element changes a whole
  // channel of dx by far more (about one term of its sums, a few percent).
  std::vector<Conv2dShape> shapes = conv_cases();
  shapes.push_back(conv(2, 7, 9, 40, 48, 3, 1, 1));
  shapes.push_back(conv(1, 6, 6, 72, 24, 5, 3, 2));
  shapes.push_back(conv(1, 5, 5, 1, 10, 5, 1, 2));
  // Then the strided shapes again by stride class, each class's taps transposed (against the
  // class path's own gather): stride 3 with a filter smaller than the stride, and 5x5 stride 3.
  std::vector<Conv2dShape> strided = {conv(2, 10, 11, 16, 24, 2, 3, 0), conv(1, 7, 8, 8, 16, 5, 3, 2)};
  for (const Conv2dShape& sh : shapes)
    if (sh.stride > 1) strided.push_back(sh);
  uint32_t seed = 680;
  for (const bool classes : {false, true}) {
    const ScopedSwitch by_class(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class, classes);
    for (const Conv2dShape& sh : classes ? strided : shapes) {
      seed += 5;
      ConvResult gathered;
      {
        const ScopedSwitch off(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter, false);
        const int64_t before = kcu::dgrad_transposed_filters();
        gathered = check_conv(kCustomConv, stream_, sh, seed);
        EXPECT_EQ(kcu::dgrad_transposed_filters(), before) << conv_str(sh) << ": switched off, yet transposed";
      }
      ConvResult wt;
      {
        const ScopedSwitch on(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter);
        const int64_t before = kcu::dgrad_transposed_filters();
        wt = check_conv(kCustomConv, stream_, sh, seed);
        EXPECT_GT(kcu::dgrad_transposed_filters(), before) << conv_str(sh) << ": the filter was not transposed";
      }
      const std::vector<float> a = widen(wt.dx), b = widen(gathered.dx);
      ASSERT_EQ(a.size(), b.size());
      float largest = 0.f;
      for (float v : b) largest = std::max(largest, std::fabs(v));
      const float floor = std::ldexp(largest, -17);  // sums that cancel to almost nothing
      size_t off_by_more = 0;
      for (size_t i = 0; i < a.size(); ++i)
        off_by_more += std::fabs(a[i] - b[i]) > std::max(std::ldexp(std::fabs(b[i]), -7), floor);
      EXPECT_EQ(off_by_more, 0u) << conv_str(sh) << (classes ? " by stride class" : "")
                                 << ": elements of dx beyond one bf16 ulp of the gathered filter's";
    }
  }
  const ScopedSwitch classes_off(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class, false);
  const ScopedSwitch on(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter);
  check_conv(kCustomConv, stream_, conv(2, 8, 8, 16, 32, 3, 1, 1), 690, 1);
  const ConvResult a = check_conv(kCustomConv, stream_, shapes.back(), 695);
  const ConvResult b = check_conv(kCustomConv, stream_, shapes.back(), 695);
  EXPECT_TRUE(bits_equal(a.dx, b.dx)) << "repeated runs differ";
}

// Which passes of sh the TMA convolutions' plans accept (conv_tma.h; check_conv's tensors are
// aligned and their row strides multiples of 8, so the plans alone decide): the forward, the
// weight gradient and the stride-1 data gradient. The stride classes' plans are their test's.
struct TmaPlans {
  bool fwd, wgrad, dgrad;
};
TmaPlans tma_plans(const Conv2dShape& sh) {
  namespace wg = kcu::detail::wgmma;
  return {
      wg::plan_conv_tma(sh.n, sh.p(), sh.q(), sh.h, sh.w, sh.c, sh.r, sh.s, sh.stride, 1, sh.pad, wg::kConvTmaTileM).ok,
      wg::plan_conv_wgrad_tma(sh.n, sh.p(), sh.q(), sh.h, sh.w, sh.c, sh.r, sh.s, sh.stride, sh.pad).ok,
      sh.stride == 1 &&
          wg::plan_conv_tma(sh.n, sh.h, sh.w, sh.p(), sh.q(), sh.k, sh.r, sh.s, 1, -1, sh.pad, wg::kConvTmaTileM).ok};
}

TEST_P(TensorCore, ConvolutionsWithTmaLoads) {
  // The convolutions' A operand loaded by TMA, one 4-D box of the NHWC source per tap and 64
  // channels (conv_tma.h), with conv_tma() on: on the wgmma_tma main loop the forward and the
  // weight gradient of every shape below whose input has C % 64 == 0, and the stride-1 data
  // gradients whose dy has K % 64 == 0, take it (narrow 128 x 64 and wide 128 x 128 tiles; the
  // weight gradient, with few tiles, splits K); the other main loops, and the other shapes, fall
  // back to the cp.async paths. Every ResNet-18 shape but the stem, then:
  // batches that leave the last tile part empty (3 images of 8 x 8, 5 of 4 x 4: the boxes past
  // N arrive as zeros and the epilogue drops those rows), a long reduction that splits K, a
  // 5 x 5 filter with pad 2, padding 0 (the data gradient's output larger than its input), the
  // stem (C = 3: only its data gradient, over K = 64, takes TMA, with a filter box larger than
  // the 3-row filter), and shapes the plan refuses (C = 96, Q = 6, Q = 12).
  // Against the reference (check_conv), and against the cp.async wgmma path bit for bit: both
  // run the same wgmma instructions on the same K steps in the same order, only the loads differ.
  // The strided data gradients run directly here (by stride class they have their own test
  // below, whose passes the counts here leave out), whatever the environment says.
  const ScopedSwitch direct(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class, false);
  std::vector<Conv2dShape> shapes;
  for (const Conv2dShape& sh : conv_cases())
    if (sh.c % 64 == 0) {
      shapes.push_back(sh);
      // These take the TMA path (so that the comparisons below are not of the cp.async path with
      // itself): the plans the kernels ask for accept them.
      const TmaPlans plans = tma_plans(sh);
      EXPECT_TRUE(plans.fwd) << conv_str(sh) << ": forward";
      EXPECT_TRUE(plans.wgrad) << conv_str(sh) << ": weight gradient";
      EXPECT_TRUE(plans.dgrad || sh.stride != 1) << conv_str(sh) << ": backward data";
    }
  shapes.push_back(conv(3, 8, 8, 64, 64, 3, 1, 1));
  shapes.push_back(conv(5, 4, 4, 128, 128, 3, 1, 1));
  shapes.push_back(conv(5, 8, 8, 128, 64, 3, 2, 1));
  shapes.push_back(conv(1, 4, 4, 512, 128, 3, 1, 1));
  shapes.push_back(conv(2, 8, 8, 64, 128, 5, 1, 2));
  shapes.push_back(conv(2, 8, 8, 64, 64, 3, 1, 0));
  shapes.push_back(conv(2, 32, 32, 3, 64, 3, 1, 1));
  shapes.push_back(conv(2, 6, 6, 96, 64, 3, 1, 1));
  shapes.push_back(conv(2, 6, 6, 64, 64, 3, 1, 1));
  shapes.push_back(conv(3, 4, 12, 64, 64, 3, 1, 1));
  // The passes of a shape that take TMA on the wgmma_tma main loop: the plans say which (the
  // tensors here are aligned and their row strides multiples of 8), and the launch counter must
  // grow by that many.
  const auto tma_passes = [&](const Conv2dShape& sh) {
    if (GetParam() != kcu::MmaMainloop::kWgmmaTma) return int64_t(0);
    const TmaPlans plans = tma_plans(sh);
    return int64_t(plans.fwd) + int64_t(plans.wgrad) + int64_t(plans.dgrad);
  };
  uint32_t seed = 720;
  for (const Conv2dShape& sh : shapes) {
    seed += 5;
    ConvResult tma;
    {
      // The 128 x 128 and 128 x 64 tiles only (the wide one has its own test below), on the
      // transposed filter whatever the environment says.
      const ScopedSwitch narrow(kcu::tma_wide_tile, kcu::set_tma_wide_tile, false);
      const ScopedSwitch not_by_shape(kcu::tma_wide_by_shape, kcu::set_tma_wide_by_shape, false);
      const ScopedSwitch wt(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter);
      const ScopedSwitch on(kcu::conv_tma, kcu::set_conv_tma);
      const int64_t before = kcu::tma_launches().conv;
      tma = check_conv(kCustomConv, stream_, sh, seed);
      EXPECT_EQ(kcu::tma_launches().conv - before, tma_passes(sh)) << conv_str(sh) << ": passes launched with TMA";
    }
    // The other main loops fell back to their cp.async paths (checked above): comparing those
    // with themselves would prove nothing.
    if (GetParam() != kcu::MmaMainloop::kWgmmaTma) continue;
    ConvResult cp_async;
    {
      const ScopedSwitch wt(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter);
      const ScopedSwitch off(kcu::conv_tma, kcu::set_conv_tma, false);
      cp_async = check_conv(kCustomConv, stream_, sh, seed);
    }
    EXPECT_TRUE(bits_equal(tma.y, cp_async.y)) << conv_str(sh) << ": forward with TMA loads vs cp.async";
    EXPECT_TRUE(bits_equal(tma.dx, cp_async.dx)) << conv_str(sh) << ": backward data with TMA loads vs cp.async";
    EXPECT_TRUE(bits_equal(tma.dw, cp_async.dw)) << conv_str(sh) << ": backward weight with TMA loads vs cp.async";
  }
}

TEST_P(TensorCore, ConvolutionsByStrideClassWithTmaLoads) {
  // The data gradient by stride class with each class's A operand loaded by TMA (conv_tma.h,
  // plan_conv_dgrad_class_tma), with dgrad_by_stride_class(), conv_tma() and the transposed
  // filter on: ResNet-18's strided layers (3x3 and 1x1, stride 2; the 1x1 layers' classes
  // without taps get zeros), batches that leave the last tile part empty, a 5x5 filter with
  // pad 2, pad 0 (the last input row and column get no gradient), and 9 x 9 (classes of 5 x 5,
  // 5 x 4 and 4 x 5 pixels, which the plan refuses, so they take the cp.async class path, beside
  // a 4 x 4 class that takes TMA). Against the reference
  // (check_conv); the launch counter must grow by the passes the plans send to TMA (forward,
  // weight gradient, and each class that plans); and against the cp.async class path bit for
  // bit (the same wgmma instructions on the same K steps in the same order, only the loads
  // differ). On the other main loops the switch changes nothing.
  const ScopedSwitch classes(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class);
  const ScopedSwitch wt(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter);
  const ScopedSwitch narrow(kcu::tma_wide_tile, kcu::set_tma_wide_tile, false);
  const ScopedSwitch not_by_shape(kcu::tma_wide_by_shape, kcu::set_tma_wide_by_shape, false);
  namespace wg = kcu::detail::wgmma;
  const std::vector<Conv2dShape> shapes = {
      conv(2, 32, 32, 64, 128, 3, 2, 1), conv(2, 16, 16, 128, 256, 3, 2, 1), conv(2, 8, 8, 256, 512, 3, 2, 1),
      conv(2, 32, 32, 64, 128, 1, 2, 0), conv(2, 16, 16, 128, 256, 1, 2, 0), conv(2, 8, 8, 256, 512, 1, 2, 0),
      conv(3, 16, 16, 64, 64, 3, 2, 1),  conv(5, 8, 8, 64, 128, 3, 2, 1),    conv(2, 16, 16, 64, 64, 5, 2, 2),
      conv(2, 16, 16, 64, 64, 3, 2, 0),  conv(2, 9, 9, 64, 64, 3, 2, 1)};
  int64_t class_passes = 0;
  uint32_t seed = 800;
  for (const Conv2dShape& sh : shapes) {
    seed += 5;
    int64_t expect = 0;
    if (GetParam() == kcu::MmaMainloop::kWgmmaTma) {
      const TmaPlans plans = tma_plans(sh);
      expect += int64_t(plans.fwd) + int64_t(plans.wgrad);
      for (const sp::kernels::StrideClass& cl : sp::kernels::stride_classes(sh)) {
        const bool ok =
            cl.hc * cl.wc > 0 && wg::plan_conv_dgrad_class_tma(sh.n, cl.hc, cl.wc, sh.p(), sh.q(), sh.k, cl.rc, cl.sc,
                                                               cl.dh, cl.dw, wg::kConvTmaTileM)
                                     .ok;
        expect += ok;
        class_passes += ok;
      }
    }
    ConvResult tma;
    {
      const ScopedSwitch on(kcu::conv_tma, kcu::set_conv_tma);
      const int64_t before = kcu::tma_launches().conv;
      tma = check_conv(kCustomConv, stream_, sh, seed);
      EXPECT_EQ(kcu::tma_launches().conv - before, expect) << conv_str(sh) << ": passes launched with TMA";
    }
    if (GetParam() != kcu::MmaMainloop::kWgmmaTma) continue;
    ConvResult cp_async;
    {
      const ScopedSwitch off(kcu::conv_tma, kcu::set_conv_tma, false);
      cp_async = check_conv(kCustomConv, stream_, sh, seed);
    }
    EXPECT_TRUE(bits_equal(tma.dx, cp_async.dx)) << conv_str(sh) << ": classes' data gradient with TMA vs cp.async";
  }
  if (GetParam() == kcu::MmaMainloop::kWgmmaTma) {
    EXPECT_EQ(class_passes, 3 * 4 + 3 * 1 + 4 + 4 + 4 + 4 + 1) << "the classes that take TMA";
  }
}

// Elementwise closeness of two results of the same convolution from different tiles (their
// sums may be split differently): every element within tol of the other, relative to the
// larger of its magnitude and the result's RMS. A wrong fragment (a few elements off by their
// own size) fails this where an L2 norm over the whole result might not.
template <typename T>
void expect_close_elementwise(const std::vector<T>& got, const std::vector<T>& ref, double tol, const std::string& what) {
  const std::vector<float> g = as_float(got), r = as_float(ref);
  ASSERT_EQ(g.size(), r.size()) << what;
  double sq = 0;
  for (float v : r) sq += double(v) * v;
  const double rms = r.empty() ? 0.0 : std::sqrt(sq / double(r.size()));
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < g.size(); ++i)
    if (!(std::abs(double(g[i]) - r[i]) <= tol * std::max(std::abs(double(r[i])), rms)) && bad++ == 0) first = i;
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " elements differ, the first at " << first << " (" << g[first]
                     << " vs " << r[first] << ")";
}

TEST_P(TensorCore, ConvolutionsWithTmaLoadsOnTheWideTile) {
  // With conv_tma() and tma_wide_tile() on, the TMA convolutions whose N fills a 256-column tile
  // (the forward's and the weight gradient's K, the stride-1 data gradient's C; tensor_core.h,
  // wide_tile_width) run on the 128 x 256 tile. ResNet-18's wide layers at batch 2 and 3 (a
  // part-empty last tile of output pixels), a weight gradient long enough to split K at batch 8,
  // one whose M (taps * C = 576) leaves a part-empty last tile, a 1x1 convolution with N = 448
  // (a part-empty last column tile), and K = 384 (not wide for the forward; its data gradient,
  // N = C = 512, is). Against the reference; against the 128 x 128 TMA tile element by element
  // (bf16 outputs within two of their ulps, the fp32 weight gradient within 1e-4: the split of K
  // may differ); and the wide-tile launch counter must grow by the passes the plans send there.
  // On the other main loops the switches change nothing.
  const ScopedSwitch tma(kcu::conv_tma, kcu::set_conv_tma);
  const ScopedSwitch wt(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter);
  const ScopedSwitch direct(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class, false);
  std::vector<Conv2dShape> shapes;
  for (const Conv2dShape& sh : conv_cases())
    if (sh.c % 64 == 0 && (sh.k >= 256 || sh.c >= 256)) shapes.push_back(sh);
  shapes.push_back(conv(3, 8, 8, 256, 256, 3, 1, 1));
  shapes.push_back(conv(8, 8, 8, 256, 256, 3, 1, 1));
  shapes.push_back(conv(2, 8, 8, 64, 256, 3, 1, 1));
  shapes.push_back(conv(2, 8, 8, 256, 448, 1, 1, 0));
  shapes.push_back(conv(2, 4, 4, 512, 384, 3, 1, 1));
  int64_t wide_total = 0;
  uint32_t seed = 760;
  for (const Conv2dShape& sh : shapes) {
    seed += 5;
    int64_t expect = 0;
    if (GetParam() == kcu::MmaMainloop::kWgmmaTma) {
      const TmaPlans plans = tma_plans(sh);
      expect += (plans.fwd && kcu::wide_tile_width(sh.k)) + (plans.wgrad && kcu::wide_tile_width(sh.k)) +
                (plans.dgrad && kcu::wide_tile_width(sh.c));
    }
    ConvResult wide, narrow;
    {
      const ScopedSwitch on(kcu::tma_wide_tile, kcu::set_tma_wide_tile);
      const int64_t before = kcu::tma_launches().wide_gemm;
      wide = check_conv(kCustomConv, stream_, sh, seed);
      EXPECT_EQ(kcu::tma_launches().wide_gemm - before, expect) << conv_str(sh) << ": passes on the wide tile";
    }
    {
      const ScopedSwitch off(kcu::tma_wide_tile, kcu::set_tma_wide_tile, false);
      const ScopedSwitch not_by_shape(kcu::tma_wide_by_shape, kcu::set_tma_wide_by_shape, false);
      narrow = check_conv(kCustomConv, stream_, sh, seed);
    }
    expect_close_elementwise(wide.y, narrow.y, 1.0 / 64, conv_str(sh) + ": forward, wide vs 128 x 128");
    expect_close_elementwise(wide.dx, narrow.dx, 1.0 / 64, conv_str(sh) + ": backward data, wide vs 128 x 128");
    expect_close_elementwise(wide.dw, narrow.dw, 1e-4, conv_str(sh) + ": backward weight, wide vs 128 x 128");
    wide_total += expect;
  }
  if (GetParam() == kcu::MmaMainloop::kWgmmaTma) {
    EXPECT_GT(wide_total, 0) << "no pass took the wide tile";
  }
}

// conv_halo()'s mode for a scope (tensor_core.h), restored however the scope ends.
class ScopedHalo {
 public:
  explicit ScopedHalo(int mode) : before_(kcu::conv_halo()) { kcu::set_conv_halo(mode); }
  ~ScopedHalo() { kcu::set_conv_halo(before_); }
  ScopedHalo(const ScopedHalo&) = delete;
  ScopedHalo& operator=(const ScopedHalo&) = delete;

 private:
  int before_;
};

// The halo convolutions' test cases (below): a shape, conv_halo()'s mode, which of its two
// passes (forward, data gradient) take the halo kernel, which of them give the same bits as
// without it, and the data gradient's beta.
struct HaloCase {
  Conv2dShape sh;
  int mode;
  bool fwd, dgrad;
  bool same_bits_fwd, same_bits_dgrad;
  float beta;
  int launches() const { return int(fwd) + int(dgrad); }
};
std::vector<HaloCase> halo_cases() {
  return {
      {conv(20, 32, 32, 64, 64, 3, 1, 1), 1, true, true, true, true, 0.f},
      {conv(24, 32, 32, 64, 64, 3, 1, 1), 1, true, true, true, true, 1.f},
      {conv(20, 32, 32, 64, 128, 3, 1, 1), 1, true, true, false, true, 0.f},
      {conv(20, 32, 32, 64, 64, 5, 1, 2), 1, true, true, true, true, 0.f},
      {conv(40, 30, 30, 64, 64, 3, 1, 1), 1, true, true, true, true, 0.f},
      {conv(40, 16, 16, 128, 128, 3, 1, 1), 2, true, true, false, false, 0.f},
      // Many tiles per SM (1152: the resident form's ring goes round several times per block), and
      // 40 output channels (a column tile part past N; the data gradient's dy, of 40 channels, is
      // no halo source).
      {conv(128, 32, 32, 64, 64, 3, 1, 1), 1, true, true, true, true, 0.f},
      // The same adding to dx (beta 1) where the data gradient runs resident (1152 tiles); 128
      // output channels, the resident forward over two column tiles (gridDim.y 2); and three
      // chunks of 64 channels (192, at 16 px in mode 2: 3 x 26 KiB of patches fit the streaming
      // kernel's 79.8 KiB) with a data gradient over three column tiles.
      {conv(128, 32, 32, 64, 64, 3, 1, 1), 1, true, true, true, true, 1.f},
      {conv(128, 32, 32, 64, 128, 3, 1, 1), 1, true, true, false, true, 0.f},
      {conv(128, 16, 16, 192, 64, 3, 1, 1), 2, true, true, false, false, 0.f},
      {conv(64, 32, 32, 64, 40, 3, 1, 1), 1, true, false, true, true, 0.f},
      {conv(40, 16, 16, 128, 128, 3, 1, 1), 1, false, false, true, true, 0.f},
      {conv(2, 32, 32, 64, 64, 3, 1, 1), 1, false, false, true, true, 0.f},
      {conv(20, 32, 32, 64, 64, 3, 2, 1), 1, false, false, true, true, 0.f},
  };
}

// What the halo tests hold, whatever the environment says: the TMA convolutions and the
// transposed filter on, the strided data gradients direct, the 128 x 64 and 128 x 128 tiles only.
struct HaloTestSwitches {
  const ScopedSwitch tma{kcu::conv_tma, kcu::set_conv_tma};
  const ScopedSwitch wt{kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter};
  const ScopedSwitch direct{kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class, false};
  const ScopedSwitch narrow{kcu::tma_wide_tile, kcu::set_tma_wide_tile, false};
  const ScopedSwitch not_by_shape{kcu::tma_wide_by_shape, kcu::set_tma_wide_by_shape, false};
};

TEST_P(TensorCore, ConvolutionsByHaloPatches) {
  // The halo kernel (conv_halo.h, wgmma_halo_mainloop.cuh) for the stride-1 same convolutions'
  // forward and data gradient on the wgmma_tma main loop, where the TMA convolution would not
  // split K and the plan takes the shape: ResNet-18's 64-channel 32 px layer (9 tiles of 128
  // positions per image on the 34-wide padded rows), its data gradient adding to dx (beta 1, a
  // residual block), two chunks of 64 channels (dy with K = 128), 128 output columns (two
  // column tiles of 64), a 5x5 filter, 30 px rows (not a divisor of the tile: the TMA
  // convolution's plan refuses them, and the cp.async loop is the comparison), 16 px (a third
  // of the rows junk: mode 2 takes it, mode 1 does not), three chunks (192 channels) and three
  // column tiles, and batch 128 (many tiles a block in the resident test below, with beta 1 and
  // with two column tiles). Refused: a batch whose grid would split
  // K, and stride 2. Against the reference (check_conv); against the same pass without the halo
  // kernel bit for bit where both run 64-column tiles (the same wgmma on the same K steps), else
  // within two bf16 ulps; and the launch counter must grow by the passes expected here.
  const std::vector<HaloCase> cases = halo_cases();
  const ScopedSwitch streaming(kcu::halo_resident, kcu::set_halo_resident, false);  // its own test below
  const HaloTestSwitches switches;
  const bool runs = GetParam() == kcu::MmaMainloop::kWgmmaTma;
  // Every other case with a bias (the ResNets run without: the epilogue adds it to each kept row).
  uint32_t seed = 990;
  bool bias = false;
  for (const HaloCase& c : cases) {
    seed += 5;
    bias = !bias;
    const std::string what = conv_str(c.sh) + " mode " + std::to_string(c.mode) + (bias ? " with bias" : "");
    ConvResult with, without;
    {
      const ScopedHalo on(c.mode);
      const int64_t before = kcu::conv_halo_launches();
      with = check_conv(kCustomConv, stream_, c.sh, seed, 0, bias, c.beta);
      EXPECT_EQ(kcu::conv_halo_launches() - before, runs ? c.launches() : 0) << what << ": halo launches";
    }
    if (!runs || c.launches() == 0) continue;
    {
      const ScopedHalo off(0);
      without = check_conv(kCustomConv, stream_, c.sh, seed, 0, bias, c.beta);
    }
    if (c.same_bits_fwd)
      EXPECT_TRUE(bits_equal(with.y, without.y)) << what << ": forward, halo vs without";
    else
      expect_close_elementwise(with.y, without.y, 1.0 / 64, what + ": forward, halo vs without");
    if (c.same_bits_dgrad)
      EXPECT_TRUE(bits_equal(with.dx, without.dx)) << what << ": backward data, halo vs without";
    else
      expect_close_elementwise(with.dx, without.dx, 1.0 / 64, what + ": backward data, halo vs without");
  }
}

TEST_P(TensorCore, ConvolutionsByHaloPatchesResident) {
  // The halo kernel's resident form (halo_resident(), wgmma_halo_resident_kernel): a persistent
  // block per SM keeps the filter's B operand in shared memory and streams the patches through
  // its consumer warpgroups' slots, the warpgroups taking the tiles in turn. On the cases above,
  // every pass whose plan fits it (3x3 over 64 source channels) and has at least 4 tiles per SM
  // runs resident (the launch counter), bit for bit against
  // the streaming kernel and right against the reference (check_conv); the others stream.
  namespace wg = kcu::detail::wgmma;
  const HaloTestSwitches switches;
  const bool runs = GetParam() == kcu::MmaMainloop::kWgmmaTma;
  int device = 0, sms = 0;
  SP_CUDA_CHECK(cudaGetDevice(&device));
  SP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  uint32_t seed = 1090;
  int64_t total = 0;
  bool bias = true;  // every other case with a bias, the other cases than in the test above
  for (const HaloCase& c : halo_cases()) {
    seed += 5;
    bias = !bias;
    if (c.launches() == 0) continue;
    const std::string what = conv_str(c.sh) + " mode " + std::to_string(c.mode) + (bias ? " with bias" : "");
    // The passes that take the halo kernel (the case says which), resident where their plan fits
    // and pays (conv_halo.h; the plan's tiles and sizes do not depend on the limits given here).
    int64_t expect = 0;
    for (const int dir : {1, -1}) {
      if (!(dir > 0 ? c.fwd : c.dgrad)) continue;
      const wg::HaloConvPlan plan = wg::plan_conv_halo(c.sh.n, c.sh.h, c.sh.w, dir > 0 ? c.sh.c : c.sh.k, c.sh.r,
                                                       c.sh.s, 1, c.sh.pad, dir, int64_t(1) << 30, 0.0);
      ASSERT_TRUE(plan.ok) << what << ": " << plan.why;
      expect += runs && wg::halo_resident_fits(plan.src, 64) && wg::halo_resident_pays(plan.tiles, sms);
    }
    const ScopedHalo on(c.mode);
    ConvResult streaming, resident;
    {
      const ScopedSwitch off(kcu::halo_resident, kcu::set_halo_resident, false);
      streaming = check_conv(kCustomConv, stream_, c.sh, seed, 0, bias, c.beta);
    }
    {
      const ScopedSwitch resident_on(kcu::halo_resident, kcu::set_halo_resident);
      const int64_t before = kcu::conv_halo_resident_launches(), halo_before = kcu::conv_halo_launches();
      resident = check_conv(kCustomConv, stream_, c.sh, seed, 0, bias, c.beta);
      EXPECT_EQ(kcu::conv_halo_resident_launches() - before, expect) << what << ": resident launches";
      EXPECT_EQ(kcu::conv_halo_launches() - halo_before, runs ? c.launches() : 0) << what << ": halo launches";
    }
    EXPECT_TRUE(bits_equal(resident.y, streaming.y)) << what << ": forward, resident vs streaming";
    EXPECT_TRUE(bits_equal(resident.dx, streaming.dx)) << what << ": backward data, resident vs streaming";
    total += expect;
  }
  if (runs) {
    EXPECT_GT(total, 0) << "nothing ran resident on " << sms << " SMs";
  }
}

TEST_P(TensorCore, WideTileByShape) {
  // With tma_wide_by_shape() on and tma_wide_tile() off, a product takes the 128 x 256 tile
  // exactly where wide_tile_pays (tile_plan.h) says so, on each side of both branches of its
  // rule. GEMMs whose 128 x 128 form splits K anyway (a long reduction takes the wide tile; a
  // short one does not, nor does N = 384, which the tile never takes) against the reference;
  // GEMMs whose 128 x 128 form does not split (a grid the wide tile keeps from splitting, one it
  // would split, a short reduction), whose double-precision reference would be slow, against the
  // 128 x 128 tile element by element; and convolutions whose weight gradient has a long
  // reduction (takes it) while their forward and data gradient do not, against the reference.
  // On the other main loops nothing takes the wide tile.
  const ScopedSwitch always(kcu::tma_wide_tile, kcu::set_tma_wide_tile, false);
  const ScopedSwitch by_shape(kcu::tma_wide_by_shape, kcu::set_tma_wide_by_shape);
  const ScopedSwitch tma(kcu::conv_tma, kcu::set_conv_tma);
  const ScopedSwitch wt(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter);
  const ScopedSwitch direct(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class, false);
  const bool on_tma = GetParam() == kcu::MmaMainloop::kWgmmaTma;
  int64_t took = 0, left = 0;  // products the rule sent to the wide tile, and those it kept off it
  const auto expect_launches = [&](int64_t before, int64_t expect, const std::string& what) {
    EXPECT_EQ(kcu::tma_launches().wide_gemm - before, on_tma ? expect : 0) << what << ": wide tile launches";
    (expect ? took : left) += expect ? expect : 1;
  };
  uint32_t seed = 900;
  // {256, 256, 8192}: 4 tiles, 128 K steps (wide); {256, 256, 1024}: 16 steps (not); {200, 384,
  // 8200}: N = 384 is not a width the wide tile takes (wide_tile_width), whatever the reduction.
  const int64_t small[][3] = {{256, 256, 8192}, {256, 256, 1024}, {200, 384, 8200}};
  for (const auto& sz : small) {
    const GemmCase g{sz[0], sz[1], sz[2]};
    const int64_t before = kcu::tma_launches().wide_gemm;
    check_f32(&kcu::gemm_bf16, stream_, g, seed += 5);
    expect_launches(before, kcu::detail::wide_tile_pays(g.m, g.n, g.k), gemm_str(g, "gemm_bf16"));
  }
  // {32768, 256, 1024}: 512 narrow and 256 wide tiles, 16 steps (wide); {16384, 256, 2048}: 256
  // narrow but 128 wide tiles, which would split K (not); {32768, 256, 512}: 8 steps (not).
  const int64_t large[][3] = {{32768, 256, 1024}, {16384, 256, 2048}, {32768, 256, 512}};
  for (const auto& sz : large) {
    const int64_t m = sz[0], n = sz[1], k = sz[2];
    const std::string what = "gemm_bf16 " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k);
    const DeviceArray<uint16_t> a(random_bf16(size_t(m * k), seed += 5)), b(random_bf16(size_t(k * n), seed + 1));
    DeviceArray<float> by(size_t(m * n)), narrow(size_t(m * n));
    const int64_t before = kcu::tma_launches().wide_gemm;
    kcu::gemm_bf16(false, false, m, n, k, 1.f, a.get(), k, b.get(), n, 0.f, by.get(), n, nullptr, false, stream_);
    sync_and_check();
    expect_launches(before, kcu::detail::wide_tile_pays(m, n, k), what);
    {
      const ScopedSwitch off(kcu::tma_wide_by_shape, kcu::set_tma_wide_by_shape, false);
      const int64_t before_narrow = kcu::tma_launches().wide_gemm;
      kcu::gemm_bf16(false, false, m, n, k, 1.f, a.get(), k, b.get(), n, 0.f, narrow.get(), n, nullptr, false, stream_);
      sync_and_check();
      EXPECT_EQ(kcu::tma_launches().wide_gemm - before_narrow, 0) << what << ": the switch off takes no wide tile";
    }
    expect_close_elementwise(by.download(), narrow.download(), 1e-4, what + ": by shape vs 128 x 128");
  }
  // A 1x1 and a 3x3 layer at batch 8 and 32 x 32 pixels: each weight gradient (M = R*S*C, N = K,
  // a reduction over 8192 pixels: 128 steps on few tiles) takes the wide tile; the forward and
  // the data gradient (M = 8192 pixels, so 128 or fewer narrow tiles, and 4 to 9 K steps; or N =
  // C = 64) do not.
  for (const Conv2dShape& sh : {conv(8, 32, 32, 256, 256, 1, 1, 0), conv(8, 32, 32, 64, 256, 3, 1, 1)}) {
    const TmaPlans plans = tma_plans(sh);
    const int64_t taps = int64_t(sh.r) * sh.s * sh.c, npq = int64_t(sh.n) * sh.p() * sh.q();
    const int64_t nhw = int64_t(sh.n) * sh.h * sh.w, rsk = int64_t(sh.r) * sh.s * sh.k;
    const bool fwd = plans.fwd && kcu::detail::wide_tile_pays(npq, sh.k, taps);
    const bool wgrad = plans.wgrad && kcu::detail::wide_tile_pays(taps, sh.k, npq);
    const bool dgrad = plans.dgrad && kcu::detail::wide_tile_pays(nhw, sh.c, rsk);
    EXPECT_TRUE(plans.wgrad && wgrad && !fwd && !dgrad) << conv_str(sh) << ": the case meant here";
    const int64_t before = kcu::tma_launches().wide_gemm;
    check_conv(kCustomConv, stream_, sh, seed += 5);
    expect_launches(before, int64_t(fwd) + int64_t(wgrad) + int64_t(dgrad), conv_str(sh));
  }
  EXPECT_GT(took, 0) << "no product took the wide tile";
  EXPECT_GT(left, 0) << "every product took the wide tile";
}

TEST_P(TensorCore, GemmAndConvolutionsInClustersOfTwo) {
  // With tma_cluster() on, the wgmma_tma kernel's 128 x 128 and 128 x 256 tiles run in clusters
  // of two blocks along M that load halves of each B stage and multicast them to both
  // (wgmma_tma_mainloop.cuh, "Clusters"), where the product has an even number of 128-row
  // tiles; the others run unclustered. The multiply and its order are the single block's, so
  // every result must be the same bits as without clusters, and right against the reference.
  // GEMMs: all four transposes; tails in M, N and K; split K (the blocks of a cluster share
  // their K slice); three row tiles and one (not clustered); on both tiles; and long reductions
  // whose rings of stages go round several times. Convolutions with TMA loads: the forward and
  // data gradient with two and four row tiles, a weight gradient with 18 (R*S*C = 2304), the
  // wide tile, and one with an odd count; and a strided data gradient by stride class. The launch
  // counter must grow by the products with an even tile count. Each tile as the loops below say
  // (not chosen by shape).
  const ScopedSwitch not_by_shape(kcu::tma_wide_by_shape, kcu::set_tma_wide_by_shape, false);
  const bool on_tma = GetParam() == kcu::MmaMainloop::kWgmmaTma;
  const auto clustered = [&](int64_t m) { return on_tma && (m + 127) / 128 % 2 == 0 ? int64_t(1) : int64_t(0); };
  const int64_t gemms[][3] = {{256, 512, 1024}, {200, 400, 136}, {136, 448, 488}, {256, 256, 8192},
                              {384, 256, 1000}, {16, 512, 8192}, {512, 128, 64}};
  uint32_t seed = 1000;
  int64_t total = 0;
  for (const bool wide : {false, true}) {
    const ScopedSwitch tile(kcu::tma_wide_tile, kcu::set_tma_wide_tile, wide);
    for (const auto& sz : gemms)
      for (int t = 0; t < 4; ++t) {
        GemmCase g{sz[0], sz[1], sz[2]};
        g.ta = t & 1, g.tb = t & 2;
        g.bias = t == 3;
        seed += 5;
        std::vector<float> with, without;
        {
          const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster);
          const int64_t before = kcu::tma_launches().cluster;
          with = check_f32(&kcu::gemm_bf16, stream_, g, seed);
          EXPECT_EQ(kcu::tma_launches().cluster - before, clustered(g.m)) << gemm_str(g, "gemm_bf16") << ": clusters";
          total += clustered(g.m);
        }
        {
          const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster, false);
          without = check_f32(&kcu::gemm_bf16, stream_, g, seed);
        }
        EXPECT_TRUE(bits_equal(with, without))
            << gemm_str(g, "gemm_bf16") << (wide ? " (wide)" : "") << ": in clusters vs not";
      }
  }
  // With programmatic dependent launch as well (both launch attributes on one launch, as
  // STALEPROP_PDL=1 STALEPROP_TMA_CLUSTER=1 gives; where the device takes no PDL the switch sets
  // nothing): a chain of clustered GEMMs, each reading the one before, the same bits.
  {
    const ScopedSwitch pdl(kcu::programmatic_launch, kcu::set_programmatic_launch);
    const int64_t n = 256;
    const DeviceArray<uint16_t> a(random_bf16(size_t(n * n), seed += 5)), b(random_bf16(size_t(n * n), seed + 1));
    DeviceArray<uint16_t> c1(size_t(n * n)), c2(size_t(n * n));
    std::vector<uint16_t> results[2];
    for (const bool on : {true, false}) {
      const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster, on);
      c1.poison();  // NaN again: the second chain must write every element itself
      c2.poison();
      kcu::gemm_bf16_out_bf16(false, false, n, n, n, 0.125f, a.get(), n, b.get(), n, 0.f, c1.get(), n, nullptr, false,
                              stream_);
      kcu::gemm_bf16_out_bf16(false, false, n, n, n, 0.125f, c1.get(), n, b.get(), n, 0.f, c2.get(), n, nullptr, false,
                              stream_);
      sync_and_check();
      results[on ? 0 : 1] = c2.download();
    }
    EXPECT_TRUE(bits_equal(results[0], results[1])) << "a chain of GEMMs with PDL, in clusters vs not";
    EXPECT_TRUE(all_written(results[0])) << "the chain left elements unwritten (NaN)";
  }
  // Long reductions that do not split (or split into long slices), so that the blocks go round
  // their ring of stages several times with the other block's releases and halves in play:
  // 2048 x 2048 x 1024 (256 tiles, 16 K steps; on the wide tile 2 slices of 8), 512 x 2048 x 4096
  // (4 slices of 16 steps). Their double-precision reference would be slow: against the
  // unclustered run, bit for bit; the clustered run also written whole and, on 32 sampled
  // entries, against a double reference (so that a region both runs got wrong alike would fail).
  const int64_t long_gemms[][3] = {{2048, 2048, 1024}, {512, 2048, 4096}};
  for (const bool wide : {false, true}) {
    const ScopedSwitch tile(kcu::tma_wide_tile, kcu::set_tma_wide_tile, wide);
    for (const auto& sz : long_gemms) {
      const int64_t m = sz[0], n = sz[1], k = sz[2];
      const std::string what = "gemm_bf16 " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k) +
                               (wide ? " (wide)" : "");
      const std::vector<uint16_t> ha = random_bf16(size_t(m * k), seed += 5), hb = random_bf16(size_t(k * n), seed + 1);
      const DeviceArray<uint16_t> a(ha), b(hb);
      DeviceArray<float> with(size_t(m * n)), without(size_t(m * n));
      {
        const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster);
        const int64_t before = kcu::tma_launches().cluster;
        kcu::gemm_bf16(false, true, m, n, k, 1.f, a.get(), k, b.get(), k, 0.f, with.get(), n, nullptr, false, stream_);
        sync_and_check();
        EXPECT_EQ(kcu::tma_launches().cluster - before, clustered(m)) << what << ": clusters";
        total += clustered(m);
      }
      {
        const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster, false);
        kcu::gemm_bf16(false, true, m, n, k, 1.f, a.get(), k, b.get(), k, 0.f, without.get(), n, nullptr, false,
                       stream_);
        sync_and_check();
      }
      const std::vector<float> got = with.download();
      EXPECT_TRUE(bits_equal(got, without.download())) << what << ": in clusters vs not";
      EXPECT_TRUE(all_written(got)) << what << ": elements left unwritten (NaN)";
      expect_sampled_product(false, true, m, n, k, ha, hb, got, 32, what);  // C = A B^T
    }
  }
  // Convolutions (conv_tma on, the transposed filter, strided data gradients direct).
  const ScopedSwitch tma(kcu::conv_tma, kcu::set_conv_tma);
  const ScopedSwitch wt(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter);
  const ScopedSwitch direct(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class, false);
  for (const bool wide : {false, true}) {
    const ScopedSwitch tile(kcu::tma_wide_tile, kcu::set_tma_wide_tile, wide);
    for (const Conv2dShape& sh : {conv(4, 8, 8, 128, 128, 3, 1, 1), conv(8, 8, 8, 128, 256, 3, 1, 1),
                                  conv(4, 8, 8, 256, 128, 3, 1, 1), conv(5, 8, 8, 128, 128, 3, 1, 1)}) {
      seed += 5;
      const TmaPlans plans = tma_plans(sh);
      const int64_t npq = int64_t(sh.n) * sh.p() * sh.q(), taps = int64_t(sh.r) * sh.s * sh.c;
      const int64_t nhw = int64_t(sh.n) * sh.h * sh.w;
      // N > 64 (not the narrow tile) and an even number of row tiles.
      const int64_t expect = (plans.fwd && sh.k > 64 ? clustered(npq) : 0) +
                             (plans.wgrad && sh.k > 64 ? clustered(taps) : 0) +
                             (plans.dgrad && sh.c > 64 ? clustered(nhw) : 0);
      ConvResult with, without;
      {
        const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster);
        const int64_t before = kcu::tma_launches().cluster;
        with = check_conv(kCustomConv, stream_, sh, seed);
        EXPECT_EQ(kcu::tma_launches().cluster - before, expect) << conv_str(sh) << ": passes in clusters";
        total += expect;
      }
      {
        const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster, false);
        without = check_conv(kCustomConv, stream_, sh, seed);
      }
      const std::string what = conv_str(sh) + (wide ? " (wide)" : "") + ": in clusters vs not";
      EXPECT_TRUE(bits_equal(with.y, without.y)) << what << ", forward";
      EXPECT_TRUE(bits_equal(with.dx, without.dx)) << what << ", backward data";
      EXPECT_TRUE(bits_equal(with.dw, without.dw)) << what << ", backward weight";
    }
  }
  // A stride-2 layer's data gradient by stride class (ResNet-18's 128->256 at batch 8): each
  // class's product (512 rows, N = C = 128) runs in clusters where it takes TMA loads.
  {
    const Conv2dShape sh = conv(8, 16, 16, 128, 256, 3, 2, 1);
    const ScopedSwitch classes(kcu::dgrad_by_stride_class, kcu::set_dgrad_by_stride_class);
    ConvResult with, without;
    int64_t in_clusters = 0;
    {
      const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster);
      const int64_t before = kcu::tma_launches().cluster;
      with = check_conv(kCustomConv, stream_, sh, seed += 5);
      in_clusters = kcu::tma_launches().cluster - before;
    }
    {
      const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster, false);
      without = check_conv(kCustomConv, stream_, sh, seed);
    }
    if (on_tma) {
      EXPECT_GT(in_clusters, 0) << conv_str(sh) << ": nothing in clusters";
    }
    EXPECT_TRUE(bits_equal(with.dx, without.dx)) << conv_str(sh) << ": data gradient by class, in clusters vs not";
    EXPECT_TRUE(bits_equal(with.y, without.y)) << conv_str(sh) << ": forward, in clusters vs not";
    EXPECT_TRUE(bits_equal(with.dw, without.dw)) << conv_str(sh) << ": weight gradient, in clusters vs not";
  }
  if (on_tma) {
    EXPECT_GT(total, 0) << "nothing ran in clusters";
  }
}

TEST_P(TensorCore, PersistentTmaKernelGivesTheSameBits) {
  // With tma_persistent() on, a wgmma_tma product with more tiles than the SMs hold at once runs
  // on as many blocks as they hold, each going over tiles with one ring of stages
  // (wgmma_tma_mainloop.cuh). Each tile is computed as by a block of its own, so every result
  // must be the same bits as without, fully written (no NaN left of the poison), and right: the
  // GEMMs with tails against the reference, the long GEMMs and split K on 64 sampled entries, the
  // convolutions with the split cap raised against the default cap's. Each section below must
  // launch persistent on the wgmma_tma main loop (on a GPU of up to 140 SMs), none elsewhere:
  //   * GEMMs with tails in M, N and K, on both tiles (1000 x 4500 x 136: 8 x 36 narrow tiles,
  //     8 x 18 wide), fp32 output with transposes 0 and 3 (a bias), bf16 with 1 (beta 0.5) and
  //     2 (ReLU), against the reference;
  //   * GEMMs of 512 tiles (256 wide) with rings that go round many times within and across
  //     tiles (K up to 4160 = 65 steps), all four transposes;
  //   * split K under the persistent grid, which the default cap of one wave never launches on
  //     an H100 (set_split_max_blocks): 16 tiles of K = 16040 (251 steps, the last one 40 deep) in
  //     51 slices of 5 steps but the last of 1, so a block's ring goes across slices of different
  //     depths and the partials of slice z > 0 come from the tile's decoding;
  //   * convolutions with TMA loads whose forward and data gradient have 272 row tiles on the
  //     narrow 128 x 64 tile (N = 64, two blocks an SM) or 256 on the 128 x 128 one, a stride-2
  //     layer whose forward and stride classes (written straight into dx) have 192 each; and,
  //     with the split cap raised, their weight gradients split over more blocks than the SMs hold;
  //   * a chain of GEMMs with programmatic dependent launch.
  const ScopedSwitch not_by_shape(kcu::tma_wide_by_shape, kcu::set_tma_wide_by_shape, false);
  const bool on_tma = GetParam() == kcu::MmaMainloop::kWgmmaTma;
  int device = 0, sms = 0;
  SP_CUDA_CHECK(cudaGetDevice(&device));
  SP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  uint32_t seed = 1200;
  int64_t section = 0;  // persistent launches in the present section
  // Runs fn with the switch on and off; returns both results, and counts the persistent launches.
  const auto both = [&](const auto& fn) {
    std::pair<decltype(fn()), decltype(fn())> r;
    {
      const ScopedSwitch persistent(kcu::tma_persistent, kcu::set_tma_persistent);
      const int64_t before = kcu::tma_launches().persistent;
      r.first = fn();
      section += kcu::tma_launches().persistent - before;
    }
    {
      const ScopedSwitch persistent(kcu::tma_persistent, kcu::set_tma_persistent, false);
      const int64_t before = kcu::tma_launches().persistent;
      r.second = fn();
      EXPECT_EQ(kcu::tma_launches().persistent, before) << "persistent launches with the switch off";
    }
    return r;
  };
  // Ends a section: on the wgmma_tma main loop it launched persistent, elsewhere never.
  const auto end_section = [&](const char* what) {
    if (on_tma) {
      EXPECT_GT(section, 0) << what << ": nothing ran persistent on " << sms << " SMs";
    } else {
      EXPECT_EQ(section, 0) << what << ": only the wgmma_tma kernel runs persistent";
    }
    section = 0;
  };
  // A plain GEMM's fp32 result on the device (no reference: the run without is the check).
  const auto gemm = [&](bool ta, bool tb, int64_t m, int64_t n, int64_t k, const DeviceArray<uint16_t>& a,
                        const DeviceArray<uint16_t>& b) {
    DeviceArray<float> c(size_t(m * n));
    kcu::gemm_bf16(ta, tb, m, n, k, 1.f, a.get(), ta ? m : k, b.get(), tb ? k : n, 0.f, c.get(), n, nullptr, false,
                   stream_);
    sync_and_check();
    return c.download();
  };

  for (const bool wide : {false, true}) {
    const ScopedSwitch tile(kcu::tma_wide_tile, kcu::set_tma_wide_tile, wide);
    for (int t = 0; t < 4; ++t) {
      GemmCase g{1000, 4500, 136};
      g.ta = t & 1, g.tb = t & 2;
      g.bias = t == 3;
      g.beta = t == 1 ? 0.5f : 0.f;
      g.relu = t == 2;
      seed += 5;
      const std::string what = (wide ? " (wide)" : "") + std::string(": persistent vs not");
      if (t == 0 || t == 3) {
        const auto r = both([&] { return check_f32(&kcu::gemm_bf16, stream_, g, seed); });
        EXPECT_TRUE(bits_equal(r.first, r.second)) << gemm_str(g, "gemm_bf16") << what;
      } else {
        const auto h = both([&] { return check_b16(&kcu::gemm_bf16_out_bf16, stream_, g, seed); });
        EXPECT_TRUE(bits_equal(h.first, h.second)) << gemm_str(g, "gemm_bf16_out_bf16") << what;
      }
    }
    end_section(wide ? "GEMMs with tails, wide tile" : "GEMMs with tails");
  }
  // Against the run without, and 64 sampled entries against a double reference (the whole
  // reference would be slow).
  const int64_t long_gemms[][3] = {{4096, 2048, 512}, {8192, 1024, 1024}, {2048, 4096, 4160}};
  for (const bool wide : {false, true}) {
    const ScopedSwitch tile(kcu::tma_wide_tile, kcu::set_tma_wide_tile, wide);
    int t = 0;
    for (const auto& sz : long_gemms) {
      const int64_t m = sz[0], n = sz[1], k = sz[2];
      const bool ta = t & 1, tb = t & 2;
      ++t;
      const std::string what = "gemm_bf16 " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k) +
                               (ta ? " A^T" : "") + (tb ? " B^T" : "") + (wide ? " (wide)" : "");
      const std::vector<uint16_t> ha = random_bf16(size_t(m * k), seed += 5), hb = random_bf16(size_t(k * n), seed + 1);
      const DeviceArray<uint16_t> a(ha), b(hb);
      const auto r = both([&] { return gemm(ta, tb, m, n, k, a, b); });
      EXPECT_TRUE(bits_equal(r.first, r.second)) << what << ": persistent vs not";
      EXPECT_TRUE(all_written(r.first)) << what << ": unwritten entries";
      expect_sampled_product(ta, tb, m, n, k, ha, hb, r.first, 64, what);
    }
    end_section(wide ? "long GEMMs, wide tile" : "long GEMMs");
  }
  {
    const int64_t m = 512, n = 512, k = 16040;
    const int64_t before = kcu::split_max_blocks_override();
    kcu::set_split_max_blocks(4096);
    const std::vector<uint16_t> ha = random_bf16(size_t(m * k), seed += 5), hb = random_bf16(size_t(k * n), seed + 1);
    const DeviceArray<uint16_t> a(ha), b(hb);
    for (const bool tb : {false, true}) {
      const std::string what = std::string("gemm_bf16 512x512x16040 in 51 K slices") + (tb ? " B^T" : "");
      const auto r = both([&] { return gemm(false, tb, m, n, k, a, b); });
      EXPECT_TRUE(bits_equal(r.first, r.second)) << what << ": persistent vs not";
      EXPECT_TRUE(all_written(r.first)) << what << ": unwritten entries";
      // Sampled with B read as the flag lays it out (k x n, or n x k transposed).
      expect_sampled_product(false, tb, m, n, k, ha, hb, r.first, 64, what);
    }
    kcu::set_split_max_blocks(before);
    end_section("split K");
  }
  // Convolutions with TMA loads (conv_tma on, the transposed filter), strided data gradients by
  // stride class; the reference would be slow at these sizes: against the run without. Then with
  // the split cap raised, so that the weight gradients (5 to 9 tiles, K = N * P * Q) split over
  // more blocks than the SMs hold.
  {
    const ScopedSwitch tma(kcu::conv_tma, kcu::set_conv_tma);
    const ScopedSwitch wt(kcu::dgrad_transposed_filter, kcu::set_dgrad_transposed_filter);
    const int64_t before = kcu::split_max_blocks_override();
    const Conv2dShape shapes[] = {conv(34, 32, 32, 64, 64, 3, 1, 1), conv(128, 16, 16, 128, 128, 3, 1, 1),
                                  conv(384, 16, 16, 128, 128, 3, 2, 1)};
    std::vector<ConvResult> by_default;  // the default cap's persistent results, per shape
    for (const int64_t cap : {int64_t(-1), int64_t(4096)}) {
      kcu::set_split_max_blocks(cap);
      for (size_t i = 0; i < 3; ++i) {
        const Conv2dShape& sh = shapes[i];
        const uint32_t shape_seed = seed + 5 * uint32_t(i + 1);
        const auto r = both([&] { return run_conv(kCustomConv, stream_, sh, shape_seed, 0, false); });
        const std::string what = conv_str(sh) + (cap > 0 ? " (split cap raised)" : "") + ": persistent vs not";
        EXPECT_TRUE(bits_equal(r.first.y, r.second.y)) << what << ", forward";
        EXPECT_TRUE(bits_equal(r.first.dx, r.second.dx)) << what << ", backward data";
        EXPECT_TRUE(bits_equal(r.first.dw, r.second.dw)) << what << ", backward weight";
        EXPECT_TRUE(all_written(r.first.y) && all_written(r.first.dx) && all_written(r.first.dw))
            << what << ": unwritten elements";
        if (cap < 0) {
          by_default.push_back(r.first);
        } else {
          // The raised cap splits the weight gradients differently: the same sums to fp32 rounding
          // (and the same forward and data gradient), against the default cap's run (checked
          // against the reference, for these passes, by ConvolutionsWithTmaLoads' shapes).
          const ConvResult& d = by_default[i];
          expect_close_elementwise(r.first.y, d.y, 1.0 / 64, what + ", forward vs the default cap");
          expect_close_elementwise(r.first.dx, d.dx, 1.0 / 64, what + ", backward data vs the default cap");
          expect_close_elementwise(r.first.dw, d.dw, 1e-4, what + ", backward weight vs the default cap");
        }
      }
      end_section(cap > 0 ? "convolutions, split cap raised" : "convolutions");
    }
    seed += 15;
    kcu::set_split_max_blocks(before);
  }
  // A chain of GEMMs, each reading the one before, with programmatic dependent launch as well
  // (where the device takes no PDL the switch sets nothing).
  {
    const ScopedSwitch pdl(kcu::programmatic_launch, kcu::set_programmatic_launch);
    const int64_t n = 2048;
    const DeviceArray<uint16_t> a(random_bf16(size_t(n * n), seed += 5)), b(random_bf16(size_t(n * n), seed + 1));
    const auto r = both([&] {
      DeviceArray<uint16_t> c1(size_t(n * n)), c2(size_t(n * n));
      kcu::gemm_bf16_out_bf16(false, false, n, n, n, 0.03125f, a.get(), n, b.get(), n, 0.f, c1.get(), n, nullptr, false,
                              stream_);
      kcu::gemm_bf16_out_bf16(false, false, n, n, n, 0.03125f, c1.get(), n, b.get(), n, 0.f, c2.get(), n, nullptr,
                              false, stream_);
      sync_and_check();
      return c2.download();
    });
    EXPECT_TRUE(bits_equal(r.first, r.second)) << "a chain of GEMMs with PDL, persistent vs not";
    EXPECT_TRUE(all_written(r.first)) << "a chain of GEMMs with PDL: unwritten entries";
    end_section("a chain of GEMMs with PDL");
  }
}

TEST_P(TensorCore, TmaL2PrefetchChangesNoBit) {
  // With tma_l2_prefetch() on, the wgmma_tma kernel's producer asks L2 for the stage it loads next
  // into each slot of its ring (wgmma_tma_mainloop.cuh): a hint that moves no data into shared
  // memory, so every result must be the same bits as without, and right (a prefetch's
  // coordinates cannot show in the results: the SASS's UTMAPF and a profile can). Reductions
  // long enough for the prefetches to run (more K steps than stages): GEMMs with tails on both
  // tiles, one block per tile and persistent, all four transposes, against the reference; two in
  // clusters of two (B read K-contiguous and not: each block prefetches its part of B); the TMA
  // convolutions' forward, data gradient (stride classes for the stride-2 layer) and weight
  // gradient, on the narrow 128 x 64 and the 128 x 128 tiles.
  if (GetParam() != kcu::MmaMainloop::kWgmmaTma) GTEST_SKIP() << "the switch concerns the wgmma_tma kernel only";
  const ScopedSwitch not_by_shape(kcu::tma_wide_by_shape, kcu::set_tma_wide_by_shape, false);
  uint32_t seed = 1300;
  const auto both = [&](const auto& fn) {
    std::pair<decltype(fn()), decltype(fn())> r;
    {
      const ScopedSwitch prefetch(kcu::tma_l2_prefetch, kcu::set_tma_l2_prefetch);
      r.first = fn();
    }
    {
      const ScopedSwitch prefetch(kcu::tma_l2_prefetch, kcu::set_tma_l2_prefetch, false);
      r.second = fn();
    }
    return r;
  };
  for (const bool wide : {false, true})
    for (const bool persistent : {false, true}) {
      const ScopedSwitch tile(kcu::tma_wide_tile, kcu::set_tma_wide_tile, wide);
      const ScopedSwitch grid(kcu::tma_persistent, kcu::set_tma_persistent, persistent);
      for (int t = 0; t < 4; ++t) {
        GemmCase g{1000, 4500, 400};  // 7 K steps, the last 16 deep
        g.ta = t & 1, g.tb = t & 2;
        g.bias = t == 3;
        seed += 5;
        const auto r = both([&] { return check_f32(&kcu::gemm_bf16, stream_, g, seed); });
        EXPECT_TRUE(bits_equal(r.first, r.second)) << gemm_str(g, "gemm_bf16") << (wide ? " (wide)" : "")
                                                   << (persistent ? " (persistent)" : "") << ": L2 prefetch vs not";
      }
    }
  for (const bool tb : {false, true}) {
    const ScopedSwitch cluster(kcu::tma_cluster, kcu::set_tma_cluster);
    GemmCase g{1024, 2048, 1000};  // eight row tiles: whole clusters of two
    g.tb = tb;
    const uint32_t s = seed += 5;
    const auto r = both([&] { return check_f32(&kcu::gemm_bf16, stream_, g, s); });
    EXPECT_TRUE(bits_equal(r.first, r.second)) << gemm_str(g, "gemm_bf16") << " (clusters): L2 prefetch vs not";
  }
  const ScopedSwitch tma(kcu::conv_tma, kcu::set_conv_tma);
  for (const Conv2dShape& sh : {conv(34, 32, 32, 64, 64, 3, 1, 1), conv(128, 16, 16, 128, 128, 3, 1, 1),
                                conv(64, 8, 8, 256, 256, 3, 1, 1), conv(384, 16, 16, 128, 128, 3, 2, 1)}) {
    const uint32_t shape_seed = seed += 5;
    const auto r = both([&] { return run_conv(kCustomConv, stream_, sh, shape_seed, 0, false); });
    const std::string what = conv_str(sh) + ": L2 prefetch vs not";
    EXPECT_TRUE(bits_equal(r.first.y, r.second.y)) << what << ", forward";
    EXPECT_TRUE(bits_equal(r.first.dx, r.second.dx)) << what << ", backward data";
    EXPECT_TRUE(bits_equal(r.first.dw, r.second.dw)) << what << ", backward weight";
    EXPECT_TRUE(all_written(r.first.y) && all_written(r.first.dx) && all_written(r.first.dw))
        << what << ": unwritten elements";
  }
}

TEST_P(TensorCore, ConvolutionsWithFewChannelsRunDirect) {
  // With conv_small_c() on, the forward and the weight gradient of a convolution with at most 4
  // input channels run the direct kernels (conv_small_c_plan.h) wherever the plan takes them: the
  // CIFAR ResNets' stems (3 -> 64 and 3 -> 16), a single channel with a 5x5 filter at stride 2,
  // ImageNet's 7x7 stride-2 stem on odd sizes (its weight gradient, 147 x 64 sums, is too many
  // for the direct kernel and keeps the tensor cores), no padding, batches that leave the last
  // block of pixels part empty, 256 output channels (32 threads a pixel), 128 (two units of the
  // weight gradient's sums per thread), and tensors one element
  // into their allocation (y not 16-byte aligned: the element-wise stores), with and without a
  // bias; and a second run of the first, the same bits. Against the reference, with the
  // launch counter grown by the passes the plan takes; and against the switch off.
  const ScopedSwitch direct(kcu::conv_small_c, kcu::set_conv_small_c);
  struct Case {
    Conv2dShape sh;
    int offset;
    bool bias;
  };
  const Case cases[] = {{conv(2, 32, 32, 3, 64, 3, 1, 1), 0, false}, {conv(3, 32, 32, 3, 16, 3, 1, 1), 0, true},
                        {conv(2, 9, 7, 1, 8, 5, 2, 2), 1, true},     {conv(2, 13, 11, 3, 64, 7, 2, 3), 0, true},
                        {conv(1, 6, 6, 3, 16, 3, 1, 0), 1, false},   {conv(5, 7, 5, 2, 24, 3, 1, 1), 0, true},
                        {conv(2, 8, 8, 4, 256, 3, 1, 1), 0, true},   {conv(2, 8, 8, 3, 128, 3, 1, 1), 0, true}};
  uint32_t seed = 1100;
  int64_t total = 0;
  for (const Case& cs : cases) {
    const kcu::detail::SmallCPlan plan = kcu::detail::plan_small_c(cs.sh);
    EXPECT_TRUE(plan.fwd) << conv_str(cs.sh) << ": the forward is meant to run direct";
    const int64_t before = kcu::conv_small_c_launches();
    const ConvResult with = check_conv(kCustomConv, stream_, cs.sh, seed += 5, cs.offset, cs.bias);
    const int64_t launched = kcu::conv_small_c_launches() - before;
    EXPECT_EQ(launched, int64_t(plan.fwd) + int64_t(plan.wgrad)) << conv_str(cs.sh) << ": direct passes";
    total += launched;
    ConvResult without;
    {
      const ScopedSwitch off(kcu::conv_small_c, kcu::set_conv_small_c, false);
      const int64_t off_before = kcu::conv_small_c_launches();
      without = check_conv(kCustomConv, stream_, cs.sh, seed, cs.offset, cs.bias);
      EXPECT_EQ(kcu::conv_small_c_launches(), off_before) << conv_str(cs.sh) << ": switched off, yet ran direct";
    }
    expect_close_elementwise(with.y, without.y, 1.0 / 64, conv_str(cs.sh) + ": forward, direct vs tensor cores");
    expect_close_elementwise(with.dw, without.dw, 1e-4, conv_str(cs.sh) + ": weight gradient, direct vs tensor cores");
  }
  EXPECT_GT(total, 0);
  // The same bits on a second run (the weight gradient's chunks and their sum are fixed).
  const ConvResult a = check_conv(kCustomConv, stream_, cases[0].sh, 1190),
                   b = check_conv(kCustomConv, stream_, cases[0].sh, 1190);
  EXPECT_TRUE(bits_equal(a.y, b.y) && bits_equal(a.dw, b.dw)) << "repeated runs differ";
}

TEST_P(TensorCore, ConvolutionsOnUnalignedTensors) {
  // Tensors one element into their allocation: every loader takes the element-wise path.
  uint32_t seed = 700;
  for (const Conv2dShape& sh : {conv(2, 8, 8, 16, 32, 3, 1, 1), conv(2, 8, 8, 16, 32, 1, 2, 0)})
    check_conv(kCustomConv, stream_, sh, seed += 5, 1);
}

TEST_P(TensorCore, ConvolutionsAtLargerBatchSplitTheWeightGradient) {
  // Batch 32: the weight gradient's K (N*P*Q pixels) is long and its output small (split K).
  uint32_t seed = 800;
  for (const Conv2dShape& sh : {conv(32, 32, 32, 16, 16, 3, 1, 1), conv(32, 8, 8, 64, 64, 3, 1, 1)})
    check_conv(kCustomConv, stream_, sh, seed += 5);
}

TEST_P(TensorCore, ConvolutionsAreDeterministic) {
  for (const Conv2dShape& sh : {conv(8, 16, 16, 32, 32, 3, 1, 1), conv(2, 5, 7, 3, 10, 3, 1, 1)}) {
    const ConvResult a = check_conv(kCustomConv, stream_, sh, 900), b = check_conv(kCustomConv, stream_, sh, 900);
    EXPECT_TRUE(bits_equal(a.y, b.y) && bits_equal(a.dx, b.dx) && bits_equal(a.dw, b.dw) && bits_equal(a.db, b.db))
        << conv_str(sh) << ": repeated runs differ";
  }
}

TEST_P(TensorCore, ConvolutionVendorBaselineAgrees) {
  uint32_t seed = 1000;
  for (const Conv2dShape& sh : conv_cases()) {
    seed += 5;
    const ConvResult ours = check_conv(kCustomConv, stream_, sh, seed);
    const ConvResult theirs = check_conv(kVendorConv, stream_, sh, seed);
    const std::string what = conv_str(sh) + ": custom vs vendor";
    EXPECT_LE(rel_error(widen(ours.y), widen(theirs.y)), 2 * kTolBf16) << what << " forward";
    EXPECT_LE(rel_error(widen(ours.dx), widen(theirs.dx)), 2 * kTolBf16) << what << " backward data";
    EXPECT_LE(rel_error(ours.dw, theirs.dw), 2 * kTolBf16) << what << " backward weight";
    EXPECT_LE(rel_error(ours.db, theirs.db), 2 * kTolBf16) << what << " backward bias";
    // The data gradient added to dx (beta 1) by both.
    const ConvResult ours_acc = check_conv(kCustomConv, stream_, sh, seed, 0, true, 1.f);
    const ConvResult theirs_acc = check_conv(kVendorConv, stream_, sh, seed, 0, true, 1.f);
    EXPECT_LE(rel_error(widen(ours_acc.dx), widen(theirs_acc.dx)), 2 * kTolBf16) << what << " backward data, beta 1";
  }
}

}  // namespace

#endif  // STALEPROP_WITH_CUDA
