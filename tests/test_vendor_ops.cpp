// The vendor baselines (kernels/vendor: cuBLASLt GEMM, cuDNN convolutions) against the CPU
// reference run in double and against our CUDA kernels, on CIFAR ResNet shapes and awkward
// ones (C = 3, K = 10, batch 1, stride 2, 1x1 filters, odd sizes, GEMM 127/257 with every
// transpose, padded and unaligned operands).
//
//   * Accuracy: relative Frobenius error ||out - ref|| / ||ref|| <= 1e-5 against double, for
//     both the vendor and the custom result. This needs full fp32 in the libraries: the
//     baselines use CUBLAS_COMPUTE_32F and CUDNN_FMA_MATH (TF32 would miss 1e-5 by ~100x).
//   * Every output buffer starts as NaN (bytes 0xFF), so an unwritten element, or a beta == 0
//     that reads C, fails the comparison.
//   * Deterministic mode (vendor::set_deterministic) gives bit-identical repeated runs.
//   * ops::set_kernel_backend routes CUDA gemm/convolutions to the vendor baselines (bit-identical
//     to calling them directly) and leaves CPU tensors on the CPU reference.
// Without a GPU (or in a CPU-only build) the GPU tests skip and say why.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/device.h"
#include "engine/ops.h"
#include "engine/stream.h"
#include "engine/tensor.h"
#include "kernels/cpu/ops.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/common/cuda_check.h"
#include "kernels/cuda/ops.h"
#include "kernels/vendor/vendor.h"
#endif
#include "tests/gpu_testing.h"

using namespace sp;
namespace kc = sp::kernels::cpu;
using kernels::Conv2dShape;
using namespace sp::test;

namespace {

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Restores the process-wide backend whatever the test does.
struct BackendGuard {
  ~BackendGuard() { ops::set_kernel_backend(ops::KernelBackend::Custom); }
};

}  // namespace

// Runs everywhere: the switch itself, and CPU tensors staying on the CPU reference.
TEST(VendorBackend, SwitchLeavesCpuTensorsOnTheReference) {
  BackendGuard guard;
  EXPECT_EQ(ops::kernel_backend(), ops::KernelBackend::Custom);
  auto hs = make_stream(Device::cpu());
  const Tensor a = host_tensor({13, 7}, 1), b = host_tensor({7, 9}, 2);
  Tensor c_custom = Tensor::empty({13, 9}, DType::F32), c_vendor = Tensor::empty({13, 9}, DType::F32);
  ops::gemm(*hs, false, false, 1.f, a, b, 0.f, c_custom);
  ops::set_kernel_backend(ops::KernelBackend::Vendor);
  EXPECT_EQ(ops::kernel_backend(), ops::KernelBackend::Vendor);
  ops::gemm(*hs, false, false, 1.f, a, b, 0.f, c_vendor);
  const Tensor x = host_tensor({2, 5, 5, 3}, 3), w = host_tensor({4, 3, 3, 3}, 4);
  Tensor y = Tensor::empty(ops::conv2d_output_shape(x.shape(), w.shape(), 1, 1), DType::F32);
  ops::conv2d_forward(*hs, x, w, Tensor(), y, 1, 1);
  hs->synchronize();
  EXPECT_TRUE(bits_equal(host_values(c_custom), host_values(c_vendor)));
  std::vector<float> want_c(13 * 9);  // both the CPU reference's product, not merely alike
  kc::gemm<float>(false, false, 13, 9, 7, 1.f, a.data<float>(), 7, b.data<float>(), 9, 0.f, want_c.data(), 9);
  EXPECT_TRUE(bits_equal(host_values(c_vendor), want_c));
  Conv2dShape sh;
  sh.n = 2, sh.h = 5, sh.w = 5, sh.c = 3, sh.k = 4, sh.r = 3, sh.s = 3, sh.stride = 1, sh.pad = 1;
  std::vector<float> want(size_t(sh.y_size()));
  kc::conv2d_forward<float>(sh, x.data<float>(), w.data<float>(), nullptr, want.data());
  EXPECT_TRUE(bits_equal(host_values(y), want));
  ops::set_kernel_backend(ops::KernelBackend::Custom);
  EXPECT_EQ(ops::kernel_backend(), ops::KernelBackend::Custom);
}

#if !STALEPROP_WITH_CUDA

TEST(VendorOps, RequiresCudaBuild) { GTEST_SKIP() << "no CUDA device: this build has no CUDA backend"; }

#else

namespace kcu = sp::kernels::cuda;
namespace kvd = sp::kernels::vendor;



namespace {

constexpr double kTol = 1e-5;

struct DeterministicGuard {
  explicit DeterministicGuard(bool on) { kvd::set_deterministic(on); }
  ~DeterministicGuard() { kvd::set_deterministic(false); }
};

using VendorOps = GpuTest;

Conv2dShape conv(int n, int h, int w, int c, int k, int r, int s, int stride, int pad) {
  Conv2dShape sh;
  sh.n = n, sh.h = h, sh.w = w, sh.c = c, sh.k = k, sh.r = r, sh.s = s, sh.stride = stride, sh.pad = pad;
  return sh;
}

// ---- GEMM --------------------------------------------------------------------------------

using GemmFn = void (*)(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                        float, float*, int64_t, cudaStream_t);

// One GEMM through `fn`, checked against double; pad adds to every leading dimension, and C's
// padding columns must come back untouched. Returns the M x ldc result.
std::vector<float> check_gemm(GemmFn fn, const char* name, cudaStream_t stream, int64_t m, int64_t n, int64_t k,
                              bool ta, bool tb, float alpha, float beta, int64_t pad, uint32_t seed) {
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
  const int64_t lda = a_cols + pad, ldb = b_cols + pad, ldc = n + pad;
  const std::vector<float> a = random_vector(size_t(a_rows * lda), seed), b = random_vector(size_t(b_rows * ldb), seed + 1);
  const std::vector<float> c = random_vector(size_t(m * ldc), seed + 2);
  DeviceArray<float> da(a), db(b), dc(c.size());
  if (beta != 0.f) dc.upload(c);  // beta == 0: C stays NaN and must not leak into the result
  fn(ta, tb, m, n, k, alpha, da.get(), lda, db.get(), ldb, beta, dc.get(), ldc, stream);
  sync_and_check();
  const std::vector<float> got = dc.download();
  std::vector<double> ref = to_double(c);
  kc::gemm<double>(ta, tb, m, n, k, alpha, to_double(a).data(), lda, to_double(b).data(), ldb, beta, ref.data(), ldc);
  std::vector<float> core;
  std::vector<double> ref_core;
  const std::string what = std::string(name) + " gemm " + std::to_string(m) + "x" + std::to_string(n) + "x" +
                           std::to_string(k) + (ta ? " A^T" : "") + (tb ? " B^T" : "") + " beta " +
                           std::to_string(beta) + " pad " + std::to_string(pad);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < ldc; ++j) {
      const size_t idx = size_t(i * ldc + j);
      if (j < n) {
        core.push_back(got[idx]);
        ref_core.push_back(ref[idx]);
      } else if (beta == 0.f) {
        EXPECT_TRUE(std::isnan(got[idx])) << what << ": wrote outside the M x N block";
      } else {
        EXPECT_EQ(got[idx], c[idx]) << what << ": wrote outside the M x N block";
      }
    }
  EXPECT_LE(rel_error(core, ref_core), kTol) << what;
  return got;
}

TEST_F(VendorOps, GemmMatchesReferenceAndCustomOnAwkwardShapes) {
  struct Case {
    int64_t m, n, k;
  };
  const Case cases[] = {{1, 1, 1},     {1, 127, 257}, {257, 1, 127}, {127, 257, 1},   {127, 127, 127},
                        {257, 257, 257}, {513, 33, 77}, {10, 64, 4099}, {144, 16, 8192}};
  uint32_t seed = 500;
  for (const Case& g : cases)
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      seed += 3;
      // Tight leading dimensions: vendor and custom also agree with each other.
      const auto v = check_gemm(kvd::gemm, "vendor", stream_, g.m, g.n, g.k, ta, tb, 1.f, 0.f, 0, seed);
      const auto c = check_gemm(kcu::gemm, "custom", stream_, g.m, g.n, g.k, ta, tb, 1.f, 0.f, 0, seed);
      EXPECT_LE(rel_error(v, c), 2 * kTol) << "vendor vs custom " << g.m << "x" << g.n << "x" << g.k;
      // Padded (unaligned) leading dimensions, over a NaN C and with alpha/beta.
      check_gemm(kvd::gemm, "vendor", stream_, g.m, g.n, g.k, ta, tb, 1.f, 0.f, 5, seed += 3);
      check_gemm(kvd::gemm, "vendor", stream_, g.m, g.n, g.k, ta, tb, 0.5f, -1.5f, ta ? 0 : 3, seed += 3);
    }
}

TEST_F(VendorOps, GemmDegenerateAlphaAndK) {
  // alpha == 0 or K == 0: C = beta * C without reading A or B (null here); padding untouched.
  const std::vector<float> c = random_vector(5 * 9, 7);
  DeviceArray<float> dc(c);
  kvd::gemm(false, false, 5, 7, 3, 0.f, nullptr, 3, nullptr, 7, 2.f, dc.get(), 9, stream_);
  sync_and_check();
  std::vector<float> want(c);
  for (size_t i = 0; i < want.size(); ++i)
    if (i % 9 < 7) want[i] *= 2.f;
  EXPECT_TRUE(bits_equal(dc.download(), want)) << "alpha == 0, beta == 2";
  kvd::gemm(false, false, 5, 7, 0, 1.f, nullptr, 1, nullptr, 7, 0.f, dc.get(), 9, stream_);
  sync_and_check();
  for (size_t i = 0; i < want.size(); ++i)
    if (i % 9 < 7) want[i] = 0.f;
  EXPECT_TRUE(bits_equal(dc.download(), want)) << "K == 0, beta == 0";
}

TEST_F(VendorOps, GemmUnalignedPointers) {
  // Operands one float into their allocation: the heuristic must be told the alignment.
  check_gemm_on_unaligned_pointers(kvd::gemm, stream_);
}

// ---- Convolutions ------------------------------------------------------------------------

const Conv2dShape kConvCases[] = {
    conv(16, 32, 32, 16, 16, 3, 3, 1, 1),  // ResNet stage 1
    conv(16, 32, 32, 16, 32, 3, 3, 2, 1),  // stage 1 -> 2 downsampling
    conv(16, 16, 16, 32, 64, 3, 3, 2, 1),  // stage 2 -> 3
    conv(8, 8, 8, 64, 64, 3, 3, 1, 1),     // stage 3
    conv(8, 32, 32, 3, 16, 3, 3, 1, 1),    // the stem: C = 3
    conv(4, 16, 16, 16, 32, 1, 1, 2, 0),   // 1x1 projection, stride 2
    conv(1, 7, 5, 3, 10, 3, 3, 2, 1),      // batch 1, odd sizes, K = 10
    conv(2, 11, 13, 5, 10, 5, 3, 1, 2),    // non-square filter
    conv(3, 9, 9, 7, 10, 3, 3, 3, 0),      // stride 3, no padding
};

struct ConvResults {
  std::vector<float> y, dx, dw, db;
};

// Runs the three convolution ops through one implementation, outputs poisoned with NaN first.
template <typename Fwd, typename BwdData, typename BwdWeight>
ConvResults run_conv(const Conv2dShape& sh, Fwd fwd, BwdData bwd_data, BwdWeight bwd_weight,
                     const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& bias,
                     const std::vector<float>& dy, cudaStream_t stream) {
  DeviceArray<float> dx_in(x), dw_in(w), dbias_in(bias), ddy(dy);
  DeviceArray<float> y(size_t(sh.y_size())), dx(size_t(sh.x_size())), dw(size_t(sh.w_size())), db(size_t(sh.k));
  fwd(sh, dx_in.get(), dw_in.get(), dbias_in.get(), y.get(), stream);
  sync_and_check();
  bwd_data(sh, ddy.get(), dw_in.get(), dx.get(), stream, 0.f);
  sync_and_check();
  bwd_weight(sh, dx_in.get(), ddy.get(), dw.get(), db.get(), stream);
  sync_and_check();
  return {y.download(), dx.download(), dw.download(), db.download()};
}

ConvResults run_vendor(const Conv2dShape& sh, const std::vector<float>& x, const std::vector<float>& w,
                       const std::vector<float>& b, const std::vector<float>& dy, cudaStream_t stream) {
  return run_conv(sh, kvd::conv2d_forward, kvd::conv2d_backward_data, kvd::conv2d_backward_weight, x, w, b, dy,
                  stream);
}

TEST_F(VendorOps, ConvolutionsMatchReferenceAndCustom) {
  uint32_t seed = 900;
  for (const Conv2dShape& sh : kConvCases) {
    const std::string what = conv_str(sh);
    const std::vector<float> x = random_vector(size_t(sh.x_size()), seed++), w = random_vector(size_t(sh.w_size()), seed++);
    const std::vector<float> b = random_vector(size_t(sh.k), seed++), dy = random_vector(size_t(sh.y_size()), seed++);
    const ConvResults v = run_vendor(sh, x, w, b, dy, stream_);
    const ConvResults c = run_conv(sh, kcu::conv2d_forward, kcu::conv2d_backward_data, kcu::conv2d_backward_weight, x,
                                   w, b, dy, stream_);

    std::vector<double> y(size_t(sh.y_size())), dx(size_t(sh.x_size())), dw(size_t(sh.w_size())), db(size_t(sh.k));
    const std::vector<double> xd = to_double(x), wd = to_double(w), bd = to_double(b), dyd = to_double(dy);
    kc::conv2d_forward<double>(sh, xd.data(), wd.data(), bd.data(), y.data());
    kc::conv2d_backward_data<double>(sh, dyd.data(), wd.data(), dx.data());
    kc::conv2d_backward_weight<double>(sh, xd.data(), dyd.data(), dw.data(), db.data());

    EXPECT_LE(rel_error(v.y, y), kTol) << "vendor forward " << what;
    EXPECT_LE(rel_error(v.dx, dx), kTol) << "vendor backward data " << what;
    EXPECT_LE(rel_error(v.dw, dw), kTol) << "vendor backward weight " << what;
    EXPECT_LE(rel_error(v.db, db), kTol) << "vendor bias gradient " << what;
    EXPECT_LE(rel_error(c.y, y), kTol) << "custom forward " << what;
    EXPECT_LE(rel_error(c.dx, dx), kTol) << "custom backward data " << what;
    EXPECT_LE(rel_error(c.dw, dw), kTol) << "custom backward weight " << what;
    EXPECT_LE(rel_error(c.db, db), kTol) << "custom bias gradient " << what;
    EXPECT_LE(rel_error(v.y, c.y), 2 * kTol) << "vendor vs custom forward " << what;
    EXPECT_LE(rel_error(v.dx, c.dx), 2 * kTol) << "vendor vs custom backward data " << what;
    EXPECT_LE(rel_error(v.dw, c.dw), 2 * kTol) << "vendor vs custom backward weight " << what;
    EXPECT_LE(rel_error(v.db, c.db), 2 * kTol) << "vendor vs custom bias gradient " << what;
  }
}

// dx = data gradient + beta * dx, fp32, on cuDNN and on the custom kernels: beta 1 (a residual
// block's accumulation) and -0.5, against the reference.
TEST_F(VendorOps, DataGradientAddsToDx) {
  uint32_t seed = 950;
  for (const Conv2dShape& sh : kConvCases)
    for (const float beta : {1.f, -0.5f}) {
      const std::vector<float> w = random_vector(size_t(sh.w_size()), seed++),
                               dy = random_vector(size_t(sh.y_size()), seed++);
      const std::vector<float> dx0 = random_vector(size_t(sh.x_size()), seed++);
      std::vector<double> want = to_double(dx0);
      const std::vector<double> wd = to_double(w), dyd = to_double(dy);
      kc::conv2d_backward_data<double>(sh, dyd.data(), wd.data(), want.data(), double(beta));
      DeviceArray<float> dw_in(w), ddy(dy), vdx(dx0), cdx(dx0);
      kvd::conv2d_backward_data(sh, ddy.get(), dw_in.get(), vdx.get(), stream_, beta);
      kcu::conv2d_backward_data(sh, ddy.get(), dw_in.get(), cdx.get(), stream_, beta);
      sync_and_check();
      const std::string what = conv_str(sh) + " beta " + std::to_string(beta);
      EXPECT_LE(rel_error(vdx.download(), want), kTol) << "vendor " << what;
      EXPECT_LE(rel_error(cdx.download(), want), kTol) << "custom " << what;
    }
}

TEST_F(VendorOps, ConvolutionWithoutBias) {
  const Conv2dShape sh = conv(2, 9, 9, 8, 12, 3, 3, 2, 1);
  const std::vector<float> x = random_vector(size_t(sh.x_size()), 71), w = random_vector(size_t(sh.w_size()), 72);
  const std::vector<float> dy = random_vector(size_t(sh.y_size()), 73);
  DeviceArray<float> dx_in(x), dw_in(w), ddy(dy), y(size_t(sh.y_size())), dw(size_t(sh.w_size()));
  kvd::conv2d_forward(sh, dx_in.get(), dw_in.get(), nullptr, y.get(), stream_);
  kvd::conv2d_backward_weight(sh, dx_in.get(), ddy.get(), dw.get(), nullptr, stream_);
  sync_and_check();
  std::vector<double> yr(size_t(sh.y_size())), dwr(size_t(sh.w_size()));
  const std::vector<double> xd = to_double(x), wd = to_double(w), dyd = to_double(dy);
  kc::conv2d_forward<double>(sh, xd.data(), wd.data(), nullptr, yr.data());
  kc::conv2d_backward_weight<double>(sh, xd.data(), dyd.data(), dwr.data(), nullptr);
  EXPECT_LE(rel_error(y.download(), yr), kTol);
  EXPECT_LE(rel_error(dw.download(), dwr), kTol);
}

// ---- Determinism -------------------------------------------------------------------------

TEST_F(VendorOps, DeterministicModeIsBitReproducible) {
  DeterministicGuard det(true);
  EXPECT_TRUE(kvd::deterministic());
  for (const Conv2dShape& sh : {kConvCases[0], kConvCases[2], kConvCases[6]}) {
    const std::vector<float> x = random_vector(size_t(sh.x_size()), 11), w = random_vector(size_t(sh.w_size()), 12);
    const std::vector<float> b = random_vector(size_t(sh.k), 13), dy = random_vector(size_t(sh.y_size()), 14);
    const ConvResults r1 = run_vendor(sh, x, w, b, dy, stream_);
    const ConvResults r2 = run_vendor(sh, x, w, b, dy, stream_);
    const std::string what = conv_str(sh);
    EXPECT_TRUE(bits_equal(r1.y, r2.y)) << "forward " << what;
    EXPECT_TRUE(bits_equal(r1.dx, r2.dx)) << "backward data " << what;
    EXPECT_TRUE(bits_equal(r1.dw, r2.dw)) << "backward weight " << what;
    EXPECT_TRUE(bits_equal(r1.db, r2.db)) << "bias gradient " << what;
  }
  const auto g1 = check_gemm(kvd::gemm, "vendor", stream_, 144, 16, 8192, true, false, 1.f, 0.f, 0, 21);
  const auto g2 = check_gemm(kvd::gemm, "vendor", stream_, 144, 16, 8192, true, false, 1.f, 0.f, 0, 21);
  EXPECT_TRUE(bits_equal(g1, g2)) << "gemm";
}

// ---- The engine-level switch ---------------------------------------------------------------

TEST_F(VendorOps, EngineSwitchRoutesCudaOps) {
  BackendGuard guard;
  auto cs = make_stream(Device::cuda(0));
  const Device gpu = Device::cuda(0);
  auto to_gpu = [&](const Tensor& t) { return to_device(*cs, t, gpu); };
  auto values = [&](const Tensor& d) { return host_values(to_host(*cs, d)); };
  auto stream = [&] { return static_cast<cudaStream_t>(cs->native_handle()); };

  // GEMM with a long K, where the two implementations almost surely round differently, so each
  // backend's result identifies the implementation that produced it.
  const Tensor a = to_gpu(host_tensor({10, 4099}, 41)), b = to_gpu(host_tensor({4099, 64}, 42));
  Tensor c = Tensor::empty({10, 64}, DType::F32, gpu);
  DeviceArray<float> direct_v(640), direct_c(640);
  kvd::gemm(false, false, 10, 64, 4099, 1.f, a.data<float>(), 4099, b.data<float>(), 64, 0.f, direct_v.get(), 64,
            stream());
  kcu::gemm(false, false, 10, 64, 4099, 1.f, a.data<float>(), 4099, b.data<float>(), 64, 0.f, direct_c.get(), 64,
            stream());
  ops::set_kernel_backend(ops::KernelBackend::Vendor);
  ops::gemm(*cs, false, false, 1.f, a, b, 0.f, c);
  const std::vector<float> via_vendor = values(c);
  ops::set_kernel_backend(ops::KernelBackend::Custom);
  ops::gemm(*cs, false, false, 1.f, a, b, 0.f, c);
  const std::vector<float> via_custom = values(c);
  EXPECT_TRUE(bits_equal(via_vendor, direct_v.download())) << "Vendor backend: gemm is cuBLASLt's";
  EXPECT_TRUE(bits_equal(via_custom, direct_c.download())) << "Custom backend: gemm is ours";
  ASSERT_FALSE(bits_equal(via_vendor, via_custom)) << "the two GEMMs gave the same bits: the checks above cannot "
                                                      "tell which ran";

  // The three convolution ops.
  const Conv2dShape sh = conv(4, 16, 16, 16, 32, 3, 3, 2, 1);
  const Tensor x = to_gpu(host_tensor({4, 16, 16, 16}, 43)), w = to_gpu(host_tensor({32, 3, 3, 16}, 44));
  const Tensor bias = to_gpu(host_tensor({32}, 45)), dy = to_gpu(host_tensor({4, 8, 8, 32}, 46));
  Tensor y = Tensor::empty({4, 8, 8, 32}, DType::F32, gpu), dx = Tensor::empty(x.shape(), DType::F32, gpu);
  Tensor dw = Tensor::empty(w.shape(), DType::F32, gpu), db = Tensor::empty({32}, DType::F32, gpu);
  ops::set_kernel_backend(ops::KernelBackend::Vendor);
  ops::conv2d_forward(*cs, x, w, bias, y, 2, 1);
  ops::conv2d_backward_data(*cs, dy, w, dx, 2, 1);
  ops::conv2d_backward_weight(*cs, x, dy, dw, db, 2, 1);
  const std::vector<float> ey = values(y), edx = values(dx), edw = values(dw), edb = values(db);
  DeviceArray<float> vy(size_t(sh.y_size())), vdx(size_t(sh.x_size())), vdw(size_t(sh.w_size())), vdb(32);
  kvd::conv2d_forward(sh, x.data<float>(), w.data<float>(), bias.data<float>(), vy.get(), stream());
  kvd::conv2d_backward_data(sh, dy.data<float>(), w.data<float>(), vdx.get(), stream());
  kvd::conv2d_backward_weight(sh, x.data<float>(), dy.data<float>(), vdw.get(), vdb.get(), stream());
  EXPECT_TRUE(bits_equal(ey, vy.download())) << "conv2d_forward";
  EXPECT_TRUE(bits_equal(edx, vdx.download())) << "conv2d_backward_data";
  EXPECT_TRUE(bits_equal(edw, vdw.download())) << "conv2d_backward_weight";
  EXPECT_TRUE(bits_equal(edb, vdb.download())) << "bias gradient";
  // Ours must differ somewhere, or the checks above could not tell which ran.
  ops::set_kernel_backend(ops::KernelBackend::Custom);
  ops::conv2d_forward(*cs, x, w, bias, y, 2, 1);
  ops::conv2d_backward_data(*cs, dy, w, dx, 2, 1);
  ops::conv2d_backward_weight(*cs, x, dy, dw, db, 2, 1);
  EXPECT_FALSE(bits_equal(ey, values(y)) && bits_equal(edx, values(dx)) && bits_equal(edw, values(dw)))
      << "our convolutions gave cuDNN's bits in all three ops";
}

// A linear layer under the vendor backend: every product on cuBLASLt (the bias and its gradient
// as products with a column of ones), matching the double reference; outputs filled with NaN
// first, so an unwritten element fails. Under the custom backend, ours.
TEST_F(VendorOps, EngineSwitchRoutesLinearLayersToCuBlasLt) {
  BackendGuard guard;
  auto cs = make_stream(Device::cuda(0));
  const Device gpu = Device::cuda(0);
  auto values = [&](const Tensor& d) { return host_values(to_host(*cs, d)); };
  // K = 4099 in the forward, so the two implementations almost surely round differently.
  const int64_t n = 33, in = 4099, out = 10;
  const Tensor hx = host_tensor({n, in}, 51), hw = host_tensor({out, in}, 52), hb = host_tensor({out}, 53);
  const Tensor hdy = host_tensor({n, out}, 54);
  const Tensor x = to_device(*cs, hx, gpu), w = to_device(*cs, hw, gpu), b = to_device(*cs, hb, gpu);
  const Tensor dy = to_device(*cs, hdy, gpu);
  Tensor y = Tensor::empty({n, out}, DType::F32, gpu), dx = Tensor::empty({n, in}, DType::F32, gpu);
  Tensor dw = Tensor::empty({out, in}, DType::F32, gpu), db = Tensor::empty({out}, DType::F32, gpu);
  const auto run = [&](ops::KernelBackend backend) {
    ops::set_kernel_backend(backend);
    for (Tensor* t : {&y, &dx, &dw, &db}) ops::fill(*cs, *t, NAN);
    ops::linear_forward(*cs, x, w, b, y);
    ops::linear_backward(*cs, x, w, dy, dx, dw, db);
    return std::vector<std::vector<float> >{values(y), values(dx), values(dw), values(db)};
  };
  const auto vendor = run(ops::KernelBackend::Vendor), custom = run(ops::KernelBackend::Custom);

  std::vector<double> ry(size_t(n * out)), rdx(size_t(n * in)), rdw(size_t(out * in)), rdb(static_cast<size_t>(out));
  const std::vector<double> xd = to_double(host_values(hx)), wd = to_double(host_values(hw));
  const std::vector<double> bd = to_double(host_values(hb)), dyd = to_double(host_values(hdy));
  kc::linear_forward<double>(n, in, out, xd.data(), wd.data(), bd.data(), ry.data());
  kc::linear_backward<double>(n, in, out, xd.data(), wd.data(), dyd.data(), rdx.data(), rdw.data(), rdb.data());
  const std::vector<std::vector<double> > ref = {ry, rdx, rdw, rdb};
  const char* names[] = {"forward", "input gradient", "weight gradient", "bias gradient"};
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_LE(rel_error(vendor[i], ref[i]), kTol) << "vendor " << names[i];
    EXPECT_LE(rel_error(custom[i], ref[i]), kTol) << "custom " << names[i];
  }

  // The vendor forward is cuBLASLt's bits: the bias product, then x w^T accumulated onto it.
  DeviceArray<float> ones(std::vector<float>(size_t(n), 1.f)), direct(size_t(n * out));
  const cudaStream_t st = static_cast<cudaStream_t>(cs->native_handle());
  kvd::gemm(false, false, n, out, 1, 1.f, ones.get(), 1, b.data<float>(), out, 0.f, direct.get(), out, st);
  kvd::gemm(false, true, n, out, in, 1.f, x.data<float>(), in, w.data<float>(), in, 1.f, direct.get(), out, st);
  EXPECT_TRUE(bits_equal(vendor[0], direct.download())) << "Vendor backend: the linear forward is cuBLASLt's";
  DeviceArray<float> ours(size_t(n * out));
  kcu::linear_forward(n, in, out, x.data<float>(), w.data<float>(), b.data<float>(), ours.get(), st);
  EXPECT_TRUE(bits_equal(custom[0], ours.download())) << "Custom backend: the linear forward is ours";
  ASSERT_FALSE(bits_equal(vendor[0], custom[0])) << "the two forwards gave the same bits: the checks above cannot "
                                                    "tell which ran";
}

}  // namespace

#endif  // STALEPROP_WITH_CUDA
