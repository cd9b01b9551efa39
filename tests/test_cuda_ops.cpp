// The CUDA kernels (kernels/cuda) against the CPU reference (kernels/cpu), op by op, on fresh
// random data, on CIFAR ResNet shapes and on awkward ones (C = 3, K = 10, batch 1, sizes that
// are no multiple of any tile, M/N/K = 1, transposes, unaligned strides).
//
//   * Ops whose CUDA kernel computes each element exactly as the CPU does (pointwise ops,
//     casts, shortcut, pooling) must match the fp32 reference bit for bit.
//   * Ops that sum in a different order (GEMM, convolutions, batch norm, linear, loss, SGD's
//     contracted multiply-adds) are compared with the reference run in double, by relative
//     Frobenius error ||out - ref|| / ||ref|| <= 1e-5.
// Every output buffer is filled with NaN (bytes 0xFF) before the kernel runs, so an element
// the kernel fails to write fails the comparison; after each op the device is synchronised
// and checked for errors. Determinism: repeated runs must be bit-identical.
// Without a GPU (or in a CPU-only build) every test skips and says why.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "engine/device.h"
#include "engine/ops.h"
#include "engine/stream.h"
#include "engine/tensor.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/ops.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/common/cuda_check.h"
#include "kernels/cuda/ops.h"
#endif
#include "tests/gpu_testing.h"

using namespace sp;
namespace kc = sp::kernels::cpu;

#if !STALEPROP_WITH_CUDA

TEST(CudaOps, RequiresCudaBuild) { GTEST_SKIP() << "no CUDA device: this build has no CUDA backend"; }

#else

namespace kcu = sp::kernels::cuda;
using namespace sp::test;
using kernels::Conv2dShape;
using kernels::Pool2dShape;
using kernels::ShortcutAShape;

namespace {

std::vector<float> to_float_vector(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

// Whether NaNs must carry the reference's payload bits. IEEE 754 leaves the payload of an
// arithmetic result open: x86 propagates the input NaN's, NVIDIA GPUs return the canonical
// NaN. Ops that only move or select values (relu, casts, pooling) must keep it exactly.
enum class NanPayload { Exact, Any };
bool is_nan_value(float v) { return std::isnan(v); }
bool is_nan_value(uint16_t bf16) { return (bf16 & 0x7fffu) > 0x7f80u; }  // bf16 bit patterns
template <typename T>
bool is_nan_value(T) {
  return false;
}

template <typename T>
void expect_bits_equal(const std::vector<T>& got, const std::vector<T>& ref, const std::string& what,
                       NanPayload nan = NanPayload::Exact) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &ref[i], sizeof(T)) != 0 &&
        !(nan == NanPayload::Any && is_nan_value(got[i]) && is_nan_value(ref[i]))) {
      ADD_FAILURE() << what << ": element " << i << " of " << got.size() << " is " << +got[i] << ", expected "
                    << +ref[i];
      return;
    }
}

using CudaOps = GpuTest;

// ---- GEMM --------------------------------------------------------------------------------

struct GemmCase {
  int64_t m, n, k;
};

// Runs one GEMM on the device and against the double reference. pad adds to every leading
// dimension (pad % 4 != 0 forces the unaligned, element-wise paths); C's padding columns must
// come back untouched.
void check_gemm(cudaStream_t stream, const GemmCase& g, bool ta, bool tb, float alpha, float beta, int64_t pad,
                uint32_t seed) {
  const int64_t a_rows = ta ? g.k : g.m, a_cols = ta ? g.m : g.k;
  const int64_t b_rows = tb ? g.n : g.k, b_cols = tb ? g.k : g.n;
  const int64_t lda = a_cols + pad, ldb = b_cols + pad, ldc = g.n + pad;
  const std::vector<float> a = random_vector(size_t(a_rows * lda), seed);
  const std::vector<float> b = random_vector(size_t(b_rows * ldb), seed + 1);
  std::vector<float> c = random_vector(size_t(g.m * ldc), seed + 2);
  DeviceArray<float> da(a), db(b), dc(c.size());
  if (beta != 0.f) dc.upload(c);  // beta == 0: C stays NaN, which must not leak into the result
  kcu::gemm(ta, tb, g.m, g.n, g.k, alpha, da.get(), lda, db.get(), ldb, beta, dc.get(), ldc, stream);
  sync_and_check();
  const std::vector<float> got = dc.download();

  std::vector<double> ref = to_double(c);
  kc::gemm<double>(ta, tb, g.m, g.n, g.k, alpha, to_double(a).data(), lda, to_double(b).data(), ldb, beta, ref.data(),
                   ldc);
  std::vector<float> got_core, got_pad;
  std::vector<double> ref_core;
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t j = 0; j < ldc; ++j) {
      const size_t idx = size_t(i * ldc + j);
      if (j < g.n) {
        got_core.push_back(got[idx]);
        ref_core.push_back(ref[idx]);
      } else {
        got_pad.push_back(got[idx]);
      }
    }
  const std::string what = "gemm " + std::to_string(g.m) + "x" + std::to_string(g.n) + "x" + std::to_string(g.k) +
                           (ta ? " A^T" : "") + (tb ? " B^T" : "") + " alpha " + std::to_string(alpha) + " beta " +
                           std::to_string(beta) + " pad " + std::to_string(pad);
  EXPECT_LE(rel_error(got_core, ref_core), kTol) << what;
  // Untouched padding: NaN bytes when beta == 0 (C was never uploaded), C's values otherwise.
  for (size_t i = 0; i < got_pad.size(); ++i) {
    if (beta == 0.f) {
      ASSERT_TRUE(std::isnan(got_pad[i])) << what << ": wrote outside the M x N block";
    } else {
      ASSERT_EQ(got_pad[i], c[size_t(i / size_t(pad)) * size_t(ldc) + size_t(g.n) + i % size_t(pad)])
          << what << ": wrote outside the M x N block";
    }
  }
}

TEST_F(CudaOps, GemmAllTransposesOnAwkwardShapes) {
  // {600, 16, 72} and {513, 12, 40} take the slim 256 x 16 tile (N <= 16) without split K, so
  // through its own epilogue, float4 stores included.
  const GemmCase cases[] = {{1, 1, 1},       {1, 127, 257}, {257, 1, 127}, {127, 257, 1},  {127, 127, 127},
                            {257, 257, 257}, {128, 128, 8}, {513, 33, 77}, {300, 64, 200}, {65, 65, 65},
                            {600, 16, 72},   {513, 12, 40}};
  uint32_t seed = 100;
  for (const GemmCase& g : cases)
    for (int t = 0; t < 4; ++t) {
      // Each transpose pair runs once with tight (float4-aligned) and once with padded leading
      // dimensions, one of them with beta == 0 over a NaN C.
      const bool ta = t & 1, tb = t & 2;
      check_gemm(stream_, g, ta, tb, 1.f, 0.f, ta ? 5 : 0, seed += 3);
      check_gemm(stream_, g, ta, tb, 0.5f, -1.5f, ta ? 0 : 3, seed += 3);
    }
}

TEST_F(CudaOps, GemmSplitKOnLongReductions) {
  // Few output tiles and a long K: the K dimension is split across blocks and summed after.
  // {144, 16, K} is a stage-1 weight gradient (taps x channels, K = pixels).
  const GemmCase cases[] = {{16, 144, 8192}, {144, 16, 8192}, {10, 64, 4099}, {3, 5, 20000}};
  uint32_t seed = 200;
  for (const GemmCase& g : cases)
    for (int t = 0; t < 4; ++t) check_gemm(stream_, g, t & 1, t & 2, 1.f, 0.f, 0, seed += 3);
  check_gemm(stream_, {37, 29, 5000}, true, false, -2.f, 0.25f, 1, seed += 3);
}

TEST_F(CudaOps, GemmDegenerateAlphaAndK) {
  // alpha == 0 or K == 0: C = beta * C without reading A or B (null here).
  const std::vector<float> c = random_vector(35, 7);
  DeviceArray<float> dc(c);
  kcu::gemm(false, false, 5, 7, 3, 0.f, nullptr, 3, nullptr, 7, 2.f, dc.get(), 7, stream_);
  sync_and_check();
  std::vector<float> want(c);
  for (float& v : want) v *= 2.f;
  expect_bits_equal(dc.download(), want, "alpha == 0");
  kcu::gemm(false, false, 5, 7, 0, 1.f, nullptr, 1, nullptr, 7, 0.f, dc.get(), 7, stream_);
  sync_and_check();
  expect_bits_equal(dc.download(), std::vector<float>(35, 0.f), "K == 0, beta == 0");
}

TEST_F(CudaOps, GemmUnalignedPointers) {
  // Operands starting one float into their allocation: 16-byte alignment fails, the kernels
  // must take the element-wise paths.
  check_gemm_on_unaligned_pointers(kcu::gemm, stream_);
}

// ---- Convolution -------------------------------------------------------------------------

Conv2dShape conv(int n, int h, int w, int c, int k, int r, int stride, int pad) {
  Conv2dShape s;
  s.n = n, s.h = h, s.w = w, s.c = c, s.k = k, s.r = r, s.s = r, s.stride = stride, s.pad = pad;
  return s;
}

void check_conv(cudaStream_t stream, const Conv2dShape& sh, bool with_bias, uint32_t seed) {
  const std::string what = conv_str(sh);
  const std::vector<float> x = random_vector(size_t(sh.x_size()), seed),
                           w = random_vector(size_t(sh.w_size()), seed + 1);
  const std::vector<float> bias = random_vector(size_t(sh.k), seed + 2),
                           dy = random_vector(size_t(sh.y_size()), seed + 3);
  DeviceArray<float> dx_in(x), dw_in(w), dbias_in(bias), ddy(dy);
  DeviceArray<float> dy_out(size_t(sh.y_size())), ddx(size_t(sh.x_size())), ddw(size_t(sh.w_size())), ddb(size_t(sh.k));

  kcu::conv2d_forward(sh, dx_in.get(), dw_in.get(), with_bias ? dbias_in.get() : nullptr, dy_out.get(), stream);
  sync_and_check();
  kcu::conv2d_backward_data(sh, ddy.get(), dw_in.get(), ddx.get(), stream);
  sync_and_check();
  kcu::conv2d_backward_weight(sh, dx_in.get(), ddy.get(), ddw.get(), with_bias ? ddb.get() : nullptr, stream);
  sync_and_check();

  const std::vector<double> xd = to_double(x), wd = to_double(w), bd = to_double(bias), dyd = to_double(dy);
  std::vector<double> ry(size_t(sh.y_size())), rdx(size_t(sh.x_size())), rdw(size_t(sh.w_size())), rdb(size_t(sh.k));
  kc::conv2d_forward<double>(sh, xd.data(), wd.data(), with_bias ? bd.data() : nullptr, ry.data());
  kc::conv2d_backward_data<double>(sh, dyd.data(), wd.data(), rdx.data());
  kc::conv2d_backward_weight<double>(sh, xd.data(), dyd.data(), rdw.data(), rdb.data());
  EXPECT_LE(rel_error(dy_out.download(), ry), kTol) << what << " forward";
  EXPECT_LE(rel_error(ddx.download(), rdx), kTol) << what << " backward data";
  EXPECT_LE(rel_error(ddw.download(), rdw), kTol) << what << " backward weight";
  if (with_bias) {
    EXPECT_LE(rel_error(ddb.download(), rdb), kTol) << what << " backward bias";
  }
}

TEST_F(CudaOps, ConvolutionOnResNetAndAwkwardShapes) {
  const Conv2dShape shapes[] = {
      conv(4, 32, 32, 3, 16, 3, 1, 1),   // CIFAR stem: C = 3 (element-wise loads)
      conv(4, 32, 32, 16, 16, 3, 1, 1),  // stage 1
      conv(4, 32, 32, 16, 32, 3, 2, 1),  // downsampling into stage 2
      conv(4, 8, 8, 64, 64, 3, 1, 1),    // stage 3
      conv(2, 16, 16, 32, 64, 1, 2, 0),  // 1x1 stride-2 projection
      conv(1, 7, 5, 3, 10, 3, 2, 0),     // batch 1, K = 10, unpadded, odd sizes
      conv(1, 1, 1, 5, 3, 1, 1, 0),      // a single pixel
      conv(2, 9, 9, 5, 10, 1, 1, 0),     // 1x1 with C, K no multiple of 4
      conv(2, 5, 6, 8, 96, 3, 1, 1),     // K > 64: the large tile
      conv(3, 6, 7, 12, 7, 3, 2, 1),     // C % 4 == 0 but K odd (dy element-wise, x vectorised)
      conv(1, 4, 4, 4, 4, 4, 3, 2),      // 4x4 filter, stride 3, pad 2
  };
  uint32_t seed = 300;
  bool bias = false;
  for (const Conv2dShape& sh : shapes) check_conv(stream_, sh, bias = !bias, seed += 5);
}

// The fp32 convolutions `--precision fp32` trains with, on every distinct layer of ResNet-20 and
// ResNet-18 (64 to 512 channels, the 1x1 stride-2 projections) and the awkward shapes of
// conv_cases(), half of them with a bias.
TEST_F(CudaOps, ConvolutionOnEveryResNetLayerShape) {
  uint32_t seed = 500;
  bool bias = true;
  for (const Conv2dShape& sh : conv_cases()) check_conv(stream_, sh, bias = !bias, seed += 5);
}

TEST_F(CudaOps, ConvolutionFullCifarBatch) {
  // Batch 128 at 32x32: the weight gradient reduces over 131072 pixels (split K).
  check_conv(stream_, conv(128, 32, 32, 16, 16, 3, 1, 1), true, 400);
}

// ---- Batch normalisation -----------------------------------------------------------------

// A training forward's statistics on the device (save_mean, save_invstd, and the running mean and
// variance updated from rm0, rv0) against the double reference of the batch norm of x.
void expect_batchnorm_statistics(int64_t m, int64_t c, const std::vector<double>& x, const std::vector<double>& gamma,
                                 const std::vector<double>& beta, const std::vector<float>& rm0,
                                 const std::vector<float>& rv0, float eps, float momentum, const DeviceArray<float>& sm,
                                 const DeviceArray<float>& si, const DeviceArray<float>& rm,
                                 const DeviceArray<float>& rv, const std::string& what) {
  const size_t nc = static_cast<size_t>(c);
  std::vector<double> rrm = to_double(rm0), rrv = to_double(rv0), y(x.size()), rsm(nc), rsi(nc);
  kc::batchnorm_forward_training<double>(m, c, x.data(), gamma.data(), beta.data(), eps, momentum, rrm.data(),
                                         rrv.data(), y.data(), rsm.data(), rsi.data());
  EXPECT_LE(rel_error(sm.download(), rsm), kTol) << what << " save_mean";
  EXPECT_LE(rel_error(si.download(), rsi), kTol) << what << " save_invstd";
  EXPECT_LE(rel_error(rm.download(), rrm), kTol) << what << " running_mean";
  EXPECT_LE(rel_error(rv.download(), rrv), kTol) << what << " running_var";
}

void check_batchnorm(cudaStream_t stream, int64_t m, int64_t c, float x_offset, uint32_t seed) {
  const std::string what = "batchnorm m " + std::to_string(m) + " c " + std::to_string(c);
  std::vector<float> x = random_vector(size_t(m * c), seed, x_offset - 2.f, x_offset + 2.f);
  const std::vector<float> gamma = random_vector(size_t(c), seed + 1, 0.5f, 1.5f),
                           beta = random_vector(size_t(c), seed + 2);
  const std::vector<float> rm = random_vector(size_t(c), seed + 3), rv = random_vector(size_t(c), seed + 4, 0.5f, 2.f);
  const std::vector<float> dy = random_vector(size_t(m * c), seed + 5);
  const float eps = 1e-5f, momentum = 0.1f;
  DeviceArray<float> dx_in(x), dgamma_in(gamma), dbeta_in(beta), drm(rm), drv(rv), ddy(dy);
  const size_t nc = gamma.size();
  DeviceArray<float> dy_out(x.size()), dsm(nc), dsi(nc), dyi(x.size()), ddx(x.size()), ddg(nc), ddb(nc);
  kcu::batchnorm_forward_training(m, c, dx_in.get(), dgamma_in.get(), dbeta_in.get(), eps, momentum, drm.get(),
                                  drv.get(), dy_out.get(), dsm.get(), dsi.get(), stream);
  sync_and_check();
  kcu::batchnorm_forward_inference(m, c, dx_in.get(), dgamma_in.get(), dbeta_in.get(), drm.get(), drv.get(), eps,
                                   dyi.get(), stream);
  sync_and_check();
  kcu::batchnorm_backward(m, c, dx_in.get(), ddy.get(), dgamma_in.get(), dsm.get(), dsi.get(), ddx.get(), ddg.get(),
                          ddb.get(), stream);
  sync_and_check();

  const std::vector<double> xd = to_double(x), gd = to_double(gamma), bd = to_double(beta), dyd = to_double(dy);
  expect_batchnorm_statistics(m, c, xd, gd, bd, rm, rv, eps, momentum, dsm, dsi, drm, drv, what);
  std::vector<double> ry(x.size());

  // Everything downstream of the statistics is checked on the device's own fp32 statistics,
  // as the engine uses them: the double reference's y would charge the kernel with rounding
  // the mean to fp32 before x - mean, which no fp32 implementation avoids when |mean| >> std.
  const std::vector<double> rm1 = to_double(drm.download()), rv1 = to_double(drv.download());
  const std::vector<double> sm1 = to_double(dsm.download()), si1 = to_double(dsi.download());
  for (size_t i = 0; i < x.size(); ++i) {
    const size_t j = i % nc;
    ry[i] = (xd[i] - sm1[j]) * (gd[j] * si1[j]) + bd[j];
  }
  EXPECT_LE(rel_error(dy_out.download(), ry), kTol) << what << " y";
  std::vector<double> ryi(x.size()), rdx(x.size()), rdg(nc), rdb(nc);
  kc::batchnorm_forward_inference<double>(m, c, xd.data(), gd.data(), bd.data(), rm1.data(), rv1.data(), eps,
                                          ryi.data());
  kc::batchnorm_backward<double>(m, c, xd.data(), dyd.data(), gd.data(), sm1.data(), si1.data(), rdx.data(), rdg.data(),
                                 rdb.data());
  EXPECT_LE(rel_error(dyi.download(), ryi), kTol) << what << " inference y";
  EXPECT_LE(rel_error(ddx.download(), rdx), kTol) << what << " dx";
  EXPECT_LE(rel_error(ddg.download(), rdg), kTol) << what << " dgamma";
  EXPECT_LE(rel_error(ddb.download(), rdb), kTol) << what << " dbeta";
}

TEST_F(CudaOps, BatchNormOnResNetAndAwkwardShapes) {
  check_batchnorm(stream_, 8 * 32 * 32, 16, 0.f, 500);  // stage 1, c < one warp of columns
  check_batchnorm(stream_, 16 * 8 * 8, 64, 0.f, 510);   // stage 3
  check_batchnorm(stream_, 1, 3, 0.f, 520);             // a single sample: unbiased variance falls back
  // (Not m = 2: both samples normalise to -1 and +1 whatever x is, so dx is zero up to eps and
  // a relative error would measure rounding noise only.)
  check_batchnorm(stream_, 3, 5, 0.f, 530);
  check_batchnorm(stream_, 7, 37, 0.f, 540);        // c past one column group, not a multiple of 32
  check_batchnorm(stream_, 300001, 3, 0.f, 550);    // many row chunks (more than the chunk cap)
  check_batchnorm(stream_, 200003, 64, 0.f, 555);   // 16-byte chunks, rows past the chunk cap
  check_batchnorm(stream_, 300001, 64, 0.f, 558);   // more chunks than one pass of the largest grid
  check_batchnorm(stream_, 1000, 24, 0.f, 556);     // 16-byte chunks, a column lane idle
  check_batchnorm(stream_, 5, 264, 0.f, 557);       // two column blocks, the second nearly empty
  // |mean| >> std: the kernel's one-pass variance is of moments shifted by the channel's first
  // element, which must not cancel. At 3e4 the unshifted sum of squares in double would keep
  // only ~24 of its 53 bits.
  check_batchnorm(stream_, 4096, 10, 1000.f, 560);
  check_batchnorm(stream_, 4096, 10, 30000.f, 570);
}

// Fused BN+ReLU and BN+add+ReLU. The statistics (the plain BN's, of x alone) against the double
// reference; the output and the gradients against the double reference on the device's own
// statistics and ReLU mask (its fp32 output y), with dresidual written over dy as the engine does.
void check_batchnorm_add_relu(cudaStream_t stream, int64_t m, int64_t c, bool with_residual, uint32_t seed) {
  const std::string what = std::string(with_residual ? "bn+add+relu" : "bn+relu") + " m " + std::to_string(m) +
                           " c " + std::to_string(c);
  const std::vector<float> x = random_vector(size_t(m * c), seed, -2.f, 2.f),
                           res = random_vector(size_t(m * c), seed + 6),
                           gamma = random_vector(size_t(c), seed + 1, 0.5f, 1.5f),
                           beta = random_vector(size_t(c), seed + 2), dy = random_vector(size_t(m * c), seed + 5);
  const std::vector<float> rm(size_t(c), 0.f), rv(size_t(c), 1.f);
  const float eps = 1e-5f, momentum = 0.1f;
  const size_t nc = size_t(c);
  DeviceArray<float> dx_in(x), dres(res), dgamma(gamma), dbeta(beta), drm(rm), drv(rv), ddy(dy);
  DeviceArray<float> dy_out(x.size()), dsm(nc), dsi(nc), dyi(x.size()), ddx(x.size()), ddg(nc), ddb(nc);
  const float* r = with_residual ? dres.get() : nullptr;
  kcu::batchnorm_add_relu_forward_training(m, c, dx_in.get(), r, dgamma.get(), dbeta.get(), eps, momentum, drm.get(),
                                           drv.get(), dy_out.get(), dsm.get(), dsi.get(), stream);
  sync_and_check();
  kcu::batchnorm_add_relu_forward_inference(m, c, dx_in.get(), r, dgamma.get(), dbeta.get(), drm.get(), drv.get(), eps,
                                            true, dyi.get(), stream);
  sync_and_check();
  // dresidual over dy (in place), as ResidualBlock::backward uses it; without a residual, none.
  kcu::batchnorm_add_relu_backward(m, c, dx_in.get(), dy_out.get(), ddy.get(), dgamma.get(), dsm.get(), dsi.get(),
                                   ddx.get(), with_residual ? ddy.get() : nullptr, ddg.get(), ddb.get(), stream);
  sync_and_check();

  const std::vector<double> xd = to_double(x), rd = to_double(res), gd = to_double(gamma), bd = to_double(beta),
                            dyd = to_double(dy);
  expect_batchnorm_statistics(m, c, xd, gd, bd, rm, rv, eps, momentum, dsm, dsi, drm, drv, what);
  const std::vector<double> sm = to_double(dsm.download()), si = to_double(dsi.download());
  const std::vector<double> rm1 = to_double(drm.download()), rv1 = to_double(drv.download());
  const std::vector<double> y_dev = to_double(dy_out.download());
  std::vector<double> ry(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const size_t j = i % nc;
    const double v = (xd[i] - sm[j]) * (gd[j] * si[j]) + bd[j] + (with_residual ? rd[i] : 0.0);
    ry[i] = v < 0 ? 0 : v;
  }
  EXPECT_LE(rel_error(dy_out.download(), ry), kTol) << what << " y";
  std::vector<double> ryi(x.size()), rdx(x.size()), rdres(x.size()), rdg(nc), rdb(nc);
  kc::batchnorm_add_relu_forward_inference<double>(m, c, xd.data(), with_residual ? rd.data() : nullptr, gd.data(),
                                                   bd.data(), rm1.data(), rv1.data(), eps, true, ryi.data());
  kc::batchnorm_add_relu_backward<double>(m, c, xd.data(), y_dev.data(), dyd.data(), gd.data(), sm.data(), si.data(),
                                          rdx.data(), rdres.data(), rdg.data(), rdb.data());
  EXPECT_LE(rel_error(dyi.download(), ryi), kTol) << what << " inference y";
  EXPECT_LE(rel_error(ddx.download(), rdx), kTol) << what << " dx";
  EXPECT_LE(rel_error(ddg.download(), rdg), kTol) << what << " dgamma";
  EXPECT_LE(rel_error(ddb.download(), rdb), kTol) << what << " dbeta";
  if (with_residual) {
    EXPECT_EQ(ddy.download(), to_float_vector(rdres)) << what << " dresidual (a mask: exact)";
  }
}

TEST_F(CudaOps, ScratchPoolKeepsItsMemoryAndInsertsNoWaitsBetweenStreams) {
  // The kernels' stream-ordered scratch (common.cuh, Workspace; batch norm's partial sums here)
  // comes from the device's default pool, set up at first use: freed memory stays in the pool,
  // and cudaMallocAsync may not make one stream wait on another's work to reuse a block (that
  // would chain the decoupled pipeline's module streams), unless STALEPROP_POOL_INTERNAL_DEPS=1.
  const int64_t m = 64, c = 8;
  const std::vector<float> x = random_vector(size_t(m * c), 5), ones(size_t(c), 1.f), zeros(size_t(c), 0.f);
  DeviceArray<float> dx(x), gamma(ones), beta(zeros), rmean(zeros), rvar(ones);
  DeviceArray<float> y{size_t(m * c)}, mean{size_t(c)}, invstd{size_t(c)};
  kcu::batchnorm_forward_training(m, c, dx.get(), gamma.get(), beta.get(), 1e-5f, 0.1f, rmean.get(), rvar.get(),
                                  y.get(), mean.get(), invstd.get(), stream_);
  sync_and_check();
  int device = 0;
  SP_CUDA_CHECK(cudaGetDevice(&device));
  cudaMemPool_t pool;
  SP_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = 0;
  SP_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  EXPECT_EQ(threshold, UINT64_MAX) << "the pool keeps freed memory";
  int internal = -1;
  SP_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &internal));
  const char* env = std::getenv("STALEPROP_POOL_INTERNAL_DEPS");
  EXPECT_EQ(internal, env && std::string(env) == "1" ? 1 : 0) << "cross-stream waits inserted for reuse";
}

TEST_F(CudaOps, FusedBatchNormReluOnResNetAndAwkwardShapes) {
  for (const bool with_residual : {false, true}) {
    check_batchnorm_add_relu(stream_, 8 * 32 * 32, 16, with_residual, 600);
    check_batchnorm_add_relu(stream_, 16 * 8 * 8, 64, with_residual, 610);
    check_batchnorm_add_relu(stream_, 3, 5, with_residual, 620);
    check_batchnorm_add_relu(stream_, 7, 37, with_residual, 630);
    check_batchnorm_add_relu(stream_, 300001, 3, with_residual, 640);
    check_batchnorm_add_relu(stream_, 1000, 24, with_residual, 650);
    // ResNet-18's widths: batch 1 at its 4x4 tail (16 rows of 512), 128 and 256 channels.
    // (Fewer than three rows would make dx zero in exact arithmetic: nothing to compare to.)
    check_batchnorm_add_relu(stream_, 16, 512, with_residual, 660);
    check_batchnorm_add_relu(stream_, 4 * 16 * 16, 128, with_residual, 670);
    check_batchnorm_add_relu(stream_, 2 * 8 * 8, 256, with_residual, 680);
  }
}

// bf16 activations: the native bf16 batch-norm kernels give bit for bit what widening the
// activations, running the fp32 kernels and rounding the outputs gives (same fp32 arithmetic,
// one pass fewer each way), for the plain and the fused forms.
std::vector<uint16_t> to_bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  kc::f32_to_bf16(int64_t(v.size()), v.data(), b.data());
  return b;
}
std::vector<float> from_bf16_bits(const std::vector<uint16_t>& b) {
  std::vector<float> v(b.size());
  kc::bf16_to_f32(int64_t(b.size()), b.data(), v.data());
  return v;
}

void check_batchnorm_bf16(cudaStream_t stream, int64_t m, int64_t c, bool fused, uint32_t seed) {
  const std::string what = std::string(fused ? "bf16 bn+add+relu" : "bf16 bn") + " m " + std::to_string(m) + " c " +
                           std::to_string(c);
  const size_t n = size_t(m * c), nc = size_t(c);
  const std::vector<uint16_t> xb = to_bf16_bits(random_vector(n, seed, -2.f, 2.f)),
                              rb = to_bf16_bits(random_vector(n, seed + 1)),
                              dyb = to_bf16_bits(random_vector(n, seed + 2));
  const std::vector<float> gamma = random_vector(nc, seed + 3, 0.5f, 1.5f), beta = random_vector(nc, seed + 4);
  const std::vector<float> zeros(nc, 0.f), ones(nc, 1.f);
  const float eps = 1e-5f, momentum = 0.1f;

  // Native bf16.
  DeviceArray<uint16_t> x(xb), r(rb), y(n), yi(n), dy(dyb), dx(n);
  DeviceArray<float> g(gamma), b(beta), rm(zeros), rv(ones), sm(nc), si(nc), dg(nc), db(nc);
  const uint16_t* res = fused ? r.get() : nullptr;
  kcu::batchnorm_forward_training_bf16(m, c, x.get(), res, fused, g.get(), b.get(), eps, momentum, rm.get(), rv.get(),
                                       y.get(), sm.get(), si.get(), stream);
  kcu::batchnorm_forward_inference_bf16(m, c, x.get(), res, fused, g.get(), b.get(), rm.get(), rv.get(), eps, yi.get(),
                                        stream);
  kcu::batchnorm_backward_bf16(m, c, x.get(), fused ? y.get() : nullptr, dy.get(), g.get(), sm.get(), si.get(),
                               dx.get(), fused ? dy.get() : nullptr, dg.get(), db.get(), stream);
  sync_and_check();

  // Widened fp32 kernels on the same values.
  DeviceArray<float> xf(from_bf16_bits(xb)), rf(from_bf16_bits(rb)), yf(n), yif(n), dyf(from_bf16_bits(dyb)), dxf(n);
  DeviceArray<float> rm2(zeros), rv2(ones), sm2(nc), si2(nc), dg2(nc), db2(nc);
  if (fused) {
    kcu::batchnorm_add_relu_forward_training(m, c, xf.get(), rf.get(), g.get(), b.get(), eps, momentum, rm2.get(),
                                             rv2.get(), yf.get(), sm2.get(), si2.get(), stream);
    kcu::batchnorm_add_relu_forward_inference(m, c, xf.get(), rf.get(), g.get(), b.get(), rm2.get(), rv2.get(), eps,
                                              true, yif.get(), stream);
  } else {
    kcu::batchnorm_forward_training(m, c, xf.get(), g.get(), b.get(), eps, momentum, rm2.get(), rv2.get(), yf.get(),
                                    sm2.get(), si2.get(), stream);
    kcu::batchnorm_forward_inference(m, c, xf.get(), g.get(), b.get(), rm2.get(), rv2.get(), eps, yif.get(), stream);
  }
  sync_and_check();
  // The fused backward's mask comes from the bf16 output, as in the engine's widened path.
  DeviceArray<float> ymask(from_bf16_bits(y.download()));
  if (fused)
    kcu::batchnorm_add_relu_backward(m, c, xf.get(), ymask.get(), dyf.get(), g.get(), sm2.get(), si2.get(), dxf.get(),
                                     dyf.get(), dg2.get(), db2.get(), stream);
  else
    kcu::batchnorm_backward(m, c, xf.get(), dyf.get(), g.get(), sm2.get(), si2.get(), dxf.get(), dg2.get(), db2.get(),
                            stream);
  sync_and_check();

  expect_bits_equal(sm.download(), sm2.download(), what + " save_mean");
  expect_bits_equal(si.download(), si2.download(), what + " save_invstd");
  expect_bits_equal(rm.download(), rm2.download(), what + " running_mean");
  expect_bits_equal(rv.download(), rv2.download(), what + " running_var");
  expect_bits_equal(y.download(), to_bf16_bits(yf.download()), what + " y");
  expect_bits_equal(yi.download(), to_bf16_bits(yif.download()), what + " inference y");
  expect_bits_equal(dx.download(), to_bf16_bits(dxf.download()), what + " dx");
  expect_bits_equal(dg.download(), dg2.download(), what + " dgamma");
  expect_bits_equal(db.download(), db2.download(), what + " dbeta");
  if (fused) expect_bits_equal(dy.download(), to_bf16_bits(dyf.download()), what + " dresidual");
}

TEST_F(CudaOps, Bf16BatchNormMatchesTheWidenedFp32KernelsBitForBit) {
  for (const bool fused : {false, true}) {
    check_batchnorm_bf16(stream_, 8 * 32 * 32, 16, fused, 700);
    check_batchnorm_bf16(stream_, 7, 37, fused, 710);
    check_batchnorm_bf16(stream_, 300001, 3, fused, 720);
    check_batchnorm_bf16(stream_, 1000, 24, fused, 730);
    check_batchnorm_bf16(stream_, 4096, 64, fused, 740);
    check_batchnorm_bf16(stream_, 16, 512, fused, 750);
    check_batchnorm_bf16(stream_, 2 * 8 * 8, 256, fused, 760);
  }
}

// ---- Pointwise ops and casts -------------------------------------------------------------

// Random values plus the special ones: NaN, infinities, signed zeros.
std::vector<float> with_specials(std::vector<float> v) {
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            0.f,
                            -0.f,
                            1e-40f,
                            -1e-40f};
  for (size_t i = 0; i < std::size(specials) && i < v.size(); ++i) v[i * 37 % v.size()] = specials[i];
  return v;
}

TEST_F(CudaOps, PointwiseOpsMatchBitForBit) {
  // The last size takes the chunked kernels' grid-stride loop round more than once.
  for (int64_t n : {int64_t(1), int64_t(1000), int64_t(3) * 1024 * 1024 + 7, (int64_t(1) << 24) + 8 * 1000 + 5}) {
    const std::string what = " n = " + std::to_string(n);
    const std::vector<float> a = with_specials(random_vector(size_t(n), 600)), b = random_vector(size_t(n), 601);
    DeviceArray<float> da(a), db(b), dout(a.size());
    std::vector<float> ref(a.size());

    kcu::relu_forward(n, da.get(), dout.get(), stream_);
    sync_and_check();
    kc::relu_forward<float>(n, a.data(), ref.data());
    expect_bits_equal(dout.download(), ref, "relu_forward" + what);

    dout.poison();
    kcu::relu_backward(n, da.get(), db.get(), dout.get(), stream_);
    sync_and_check();
    kc::relu_backward<float>(n, a.data(), b.data(), ref.data());
    expect_bits_equal(dout.download(), ref, "relu_backward" + what);

    dout.poison();
    kcu::add(n, da.get(), db.get(), dout.get(), stream_);
    sync_and_check();
    kc::add<float>(n, a.data(), b.data(), ref.data());
    expect_bits_equal(dout.download(), ref, "add" + what, NanPayload::Any);

    dout.poison();
    kcu::scale(n, -0.375f, da.get(), dout.get(), stream_);
    sync_and_check();
    kc::scale<float>(n, -0.375f, a.data(), ref.data());
    expect_bits_equal(dout.download(), ref, "scale" + what, NanPayload::Any);

    kcu::fill(n, 2.5f, dout.get(), stream_);
    sync_and_check();
    expect_bits_equal(dout.download(), std::vector<float>(size_t(n), 2.5f), "fill" + what);

    // In place: y aliases an input.
    DeviceArray<float> inplace(a);
    kcu::add(n, inplace.get(), db.get(), inplace.get(), stream_);
    sync_and_check();
    kc::add<float>(n, a.data(), b.data(), ref.data());
    expect_bits_equal(inplace.download(), ref, "add in place" + what, NanPayload::Any);
  }
}

TEST_F(CudaOps, Bf16ConversionsMatchBitForBit) {
  // Every bf16 bit pattern widens exactly.
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = uint16_t(i);
  DeviceArray<uint16_t> dall(all);
  DeviceArray<float> wide(all.size());
  kcu::bf16_to_f32(int64_t(all.size()), dall.get(), wide.get(), stream_);
  sync_and_check();
  std::vector<float> ref_wide(all.size());
  kc::bf16_to_f32(int64_t(all.size()), all.data(), ref_wide.data());
  expect_bits_equal(wide.download(), ref_wide, "bf16_to_f32");

  // Rounding: random values, specials, and by bit pattern: ties to even downwards and upwards,
  // +-FLT_MAX and a tie just below it (rounding into infinity), a subnormal tie, a signalling NaN.
  std::vector<float> f = with_specials(random_vector(100000, 610, -1e4f, 1e4f));
  for (uint32_t bits : {0x3f808000u, 0x3f818000u, 0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x00008000u, 0x7fa00000u}) {
    float v;
    std::memcpy(&v, &bits, sizeof v);
    f.push_back(v);
  }
  DeviceArray<float> df(f);
  DeviceArray<uint16_t> narrow(f.size());
  kcu::f32_to_bf16(int64_t(f.size()), df.get(), narrow.get(), stream_);
  sync_and_check();
  std::vector<uint16_t> ref_narrow(f.size());
  kc::f32_to_bf16(int64_t(f.size()), f.data(), ref_narrow.data());
  expect_bits_equal(narrow.download(), ref_narrow, "f32_to_bf16");
}

TEST_F(CudaOps, Bf16PointwiseOpsRoundLikeTheComposedReference) {
  const int64_t n = 5000;
  const std::vector<float> fa = with_specials(random_vector(size_t(n), 620, -8.f, 8.f));
  const std::vector<float> fb = random_vector(size_t(n), 621, -8.f, 8.f);
  const size_t count = size_t(n);
  std::vector<uint16_t> a(count), b(count);
  kc::f32_to_bf16(n, fa.data(), a.data());
  kc::f32_to_bf16(n, fb.data(), b.data());
  // Reference: widen, run the fp32 reference op, round.
  std::vector<float> wa(count), wb(count), wr(count);
  kc::bf16_to_f32(n, a.data(), wa.data());
  kc::bf16_to_f32(n, b.data(), wb.data());
  std::vector<uint16_t> ref(count);
  auto round = [&] { kc::f32_to_bf16(n, wr.data(), ref.data()); };
  DeviceArray<uint16_t> da(a), db(b), dout(count);

  kcu::relu_forward_bf16(n, da.get(), dout.get(), stream_);
  sync_and_check();
  kc::relu_forward<float>(n, wa.data(), wr.data());
  round();
  expect_bits_equal(dout.download(), ref, "relu_forward_bf16");

  dout.poison();
  kcu::relu_backward_bf16(n, da.get(), db.get(), dout.get(), stream_);
  sync_and_check();
  kc::relu_backward<float>(n, wa.data(), wb.data(), wr.data());
  round();
  expect_bits_equal(dout.download(), ref, "relu_backward_bf16");

  dout.poison();
  kcu::add_bf16(n, da.get(), db.get(), dout.get(), stream_);
  sync_and_check();
  kc::add<float>(n, wa.data(), wb.data(), wr.data());
  round();
  expect_bits_equal(dout.download(), ref, "add_bf16", NanPayload::Any);

  dout.poison();
  kcu::scale_bf16(n, 0.3f, da.get(), dout.get(), stream_);
  sync_and_check();
  kc::scale<float>(n, 0.3f, wa.data(), wr.data());
  round();
  expect_bits_equal(dout.download(), ref, "scale_bf16", NanPayload::Any);
}

// ---- The single-element paths ------------------------------------------------------------
// The bandwidth-bound kernels move 16-byte chunks when every pointer is 16-byte aligned and c
// is a multiple of 8 (kernels/cuda/column_plan.h), else single elements. Both paths add in
// the same order, so they must give the same bits: the same data, once at cudaMalloc's
// alignment and once one element past it, goes through both.

// Device data starting one element past a cudaMalloc'ed (256-byte aligned) address.
template <typename T>
class Unaligned {
 public:
  explicit Unaligned(size_t n) : a_(n + 1) {}
  explicit Unaligned(const std::vector<T>& host) : a_(host.size() + 1) {
    std::vector<T> padded(1, T{});
    padded.insert(padded.end(), host.begin(), host.end());
    a_.upload(padded);
  }
  T* get() const { return a_.get() + 1; }
  void poison() { a_.poison(); }
  std::vector<T> download() const {
    std::vector<T> v = a_.download();
    v.erase(v.begin());
    return v;
  }

 private:
  DeviceArray<T> a_;
};

template <typename T>
std::vector<T> activations(const std::vector<float>& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    std::vector<uint16_t> b(v.size());
    kc::f32_to_bf16(int64_t(v.size()), v.data(), b.data());
    return b;
  }
}

// Everything a batch norm (plain or fused with residual add and ReLU) writes in a training
// forward, an inference forward and a backward.
template <typename T>
struct BnOutputs {
  std::vector<T> y, yi, dx, dres;
  std::vector<float> sm, si, rm, rv, dg, db;
};

template <template <class> class Buf, typename T>
BnOutputs<T> run_batchnorm(cudaStream_t stream, int64_t m, int64_t c, bool fused, uint32_t seed) {
  const size_t n = size_t(m * c), nc = size_t(c);
  const float eps = 1e-5f, momentum = 0.1f;
  Buf<T> x(activations<T>(random_vector(n, seed, -2.f, 2.f))), res(activations<T>(random_vector(n, seed + 1)));
  Buf<T> dy(activations<T>(random_vector(n, seed + 2))), y(n), yi(n), dx(n), dres(n);
  DeviceArray<float> g(random_vector(nc, seed + 3, 0.5f, 1.5f)), b(random_vector(nc, seed + 4));
  DeviceArray<float> rm(random_vector(nc, seed + 5)), rv(random_vector(nc, seed + 6, 0.5f, 2.f));
  DeviceArray<float> sm(nc), si(nc), dg(nc), db(nc);
  T* r = fused ? res.get() : nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (fused) {
      kcu::batchnorm_add_relu_forward_training(m, c, x.get(), r, g.get(), b.get(), eps, momentum, rm.get(), rv.get(),
                                               y.get(), sm.get(), si.get(), stream);
      kcu::batchnorm_add_relu_forward_inference(m, c, x.get(), r, g.get(), b.get(), rm.get(), rv.get(), eps, true,
                                                yi.get(), stream);
      kcu::batchnorm_add_relu_backward(m, c, x.get(), y.get(), dy.get(), g.get(), sm.get(), si.get(), dx.get(),
                                       dres.get(), dg.get(), db.get(), stream);
    } else {
      kcu::batchnorm_forward_training(m, c, x.get(), g.get(), b.get(), eps, momentum, rm.get(), rv.get(), y.get(),
                                      sm.get(), si.get(), stream);
      kcu::batchnorm_forward_inference(m, c, x.get(), g.get(), b.get(), rm.get(), rv.get(), eps, yi.get(), stream);
      kcu::batchnorm_backward(m, c, x.get(), dy.get(), g.get(), sm.get(), si.get(), dx.get(), dg.get(), db.get(),
                              stream);
    }
  } else {
    kcu::batchnorm_forward_training_bf16(m, c, x.get(), r, fused, g.get(), b.get(), eps, momentum, rm.get(), rv.get(),
                                         y.get(), sm.get(), si.get(), stream);
    kcu::batchnorm_forward_inference_bf16(m, c, x.get(), r, fused, g.get(), b.get(), rm.get(), rv.get(), eps, yi.get(),
                                          stream);
    kcu::batchnorm_backward_bf16(m, c, x.get(), fused ? y.get() : nullptr, dy.get(), g.get(), sm.get(), si.get(),
                                 dx.get(), fused ? dres.get() : nullptr, dg.get(), db.get(), stream);
  }
  sync_and_check();
  return {y.download(),  yi.download(), dx.download(), dres.download(), sm.download(), si.download(),
          rm.download(), rv.download(), dg.download(), db.download()};
}

// Whether any element is NaN (the outputs' poison; the inputs hold none).
template <typename T>
bool any_nan(const std::vector<T>& v) {
  return std::any_of(v.begin(), v.end(), [](T x) { return is_nan_value(x); });
}

// The two runs' outputs are bit-identical, and the baseline a has written every element (a
// baseline left poisoned where the other run is too would otherwise pass): dresidual is written
// by the fused form only, and left whole by the plain one.
template <typename T>
void expect_same_batchnorm(const BnOutputs<T>& a, const BnOutputs<T>& u, bool fused, const std::string& what) {
  for (const auto* v : {&a.y, &a.yi, &a.dx}) EXPECT_FALSE(any_nan(*v)) << what << ": an activation left unwritten";
  // (The running statistics are inputs too, finite from the start: compared bit for bit below.)
  for (const auto* v : {&a.sm, &a.si, &a.dg, &a.db})
    EXPECT_FALSE(any_nan(*v)) << what << ": a statistic or parameter gradient left unwritten";
  if (fused) {
    EXPECT_FALSE(any_nan(a.dres)) << what << ": dresidual left unwritten";
  } else {
    EXPECT_TRUE(std::all_of(a.dres.begin(), a.dres.end(), [](T x) { return is_nan_value(x); }))
        << what << ": dresidual written without a residual";
  }
  expect_bits_equal(u.y, a.y, what + " y");
  expect_bits_equal(u.yi, a.yi, what + " inference y");
  expect_bits_equal(u.dx, a.dx, what + " dx");
  expect_bits_equal(u.dres, a.dres, what + " dresidual");
  expect_bits_equal(u.sm, a.sm, what + " save_mean");
  expect_bits_equal(u.si, a.si, what + " save_invstd");
  expect_bits_equal(u.rm, a.rm, what + " running_mean");
  expect_bits_equal(u.rv, a.rv, what + " running_var");
  expect_bits_equal(u.dg, a.dg, what + " dgamma");
  expect_bits_equal(u.db, a.db, what + " dbeta");
}

// Where c divides 2048 the aligned forward runs its one-channel walk (batchnorm.cu): one item a
// thread (4096 x 64), three or four with the loop's tail (131072 x 16, 200003 x 64, 4099 x 1024),
// few (777 x 8); 1000 x 24 takes the per-item walk.
TEST_F(CudaOps, BatchNormGivesTheSameBitsFromUnalignedActivations) {
  for (const bool fused : {false, true})
    for (const auto& [m, c] :
         {std::pair<int64_t, int64_t>{4096, 64}, {1000, 24}, {131072, 16}, {200003, 64}, {4099, 1024}, {777, 8}}) {
      const std::string what = std::string(fused ? "fused " : "") + "batchnorm m " + std::to_string(m) + " c " +
                               std::to_string(c) + ", unaligned vs aligned:";
      expect_same_batchnorm(run_batchnorm<Unaligned, float>(stream_, m, c, fused, 800),
                            run_batchnorm<DeviceArray, float>(stream_, m, c, fused, 800), fused, what + " fp32");
      expect_same_batchnorm(run_batchnorm<Unaligned, uint16_t>(stream_, m, c, fused, 810),
                            run_batchnorm<DeviceArray, uint16_t>(stream_, m, c, fused, 810), fused, what + " bf16");
    }
}

// The persistent batch norm (one cooperative kernel: reduction, finalisation and element pass,
// with the chunks it reads cached in shared memory where they fit) computes every value as the
// three separate kernels do, in the same order: the same bits, for the plain and fused forms,
// fp32 and bf16, the chunked and single-element paths (unaligned), shapes cached whole and in
// part (ResNet-18's first stage at batch 512: 128 MiB in fp32), and awkward shapes.
template <template <class> class Buf, typename T>
void expect_persistent_batchnorm_same(cudaStream_t stream, int64_t m, int64_t c, bool fused, uint32_t seed,
                                      const std::string& what) {
  BnOutputs<T> separate, persistent;
  {
    const ScopedSwitch off(kcu::bn_persistent, kcu::set_bn_persistent, false);
    separate = run_batchnorm<Buf, T>(stream, m, c, fused, seed);
  }
  const int64_t before = kcu::bn_persistent_launches();
  {
    const ScopedSwitch on(kcu::bn_persistent, kcu::set_bn_persistent);
    persistent = run_batchnorm<Buf, T>(stream, m, c, fused, seed);
  }
  // The training forward and the backward ran persistent (inference has one pass already).
  EXPECT_EQ(kcu::bn_persistent_launches() - before, 2) << what << ": the persistent form did not run";
  expect_same_batchnorm(separate, persistent, fused, what);
}

// Which parts of the persistent kernels a set of shapes reached: a plan that keeps every chunk
// in shared memory, and one that keeps some (so the element pass reads both from shared memory
// and again from global memory), per chunked kernel (forward/backward, fp32/bf16).
struct PlanCoverage {
  bool whole = false, part = false;
  void add(const kcu::BnPersistentPlan& p) {
    whole = whole || (p.grid > 0 && p.cached == p.total);
    part = part || (p.grid > 0 && p.cached > 0 && p.cached < p.total);
  }
};

TEST_F(CudaOps, PersistentBatchNormGivesTheSameBitsAsTheSeparateKernels) {
  // ResNet shapes (at batch 128 and 512; 131072 x 64 and 524288 x 64 are ResNet-18's first
  // stage), then awkward ones. The two largest run only fused and aligned, to bound the time.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {128 * 32 * 32, 16}, {128 * 8 * 8, 64}, {512 * 4 * 4, 512}, {128 * 32 * 32, 64}, {512 * 32 * 32, 64},
      {1, 3},              {7, 37},           {300001, 3},        {5, 264},           {1000, 24}};
  std::map<std::string, PlanCoverage> coverage;
  for (const bool fused : {false, true})
    for (const auto& [m, c] : shapes) {
      const bool large = m * c > 4 * 1024 * 1024;
      if (large && !fused) continue;
      const std::string what = std::string(fused ? "fused " : "") + "batchnorm m " + std::to_string(m) + " c " +
                                std::to_string(c) + ", persistent vs separate:";
      expect_persistent_batchnorm_same<DeviceArray, float>(stream_, m, c, fused, 900, what + " fp32");
      expect_persistent_batchnorm_same<DeviceArray, uint16_t>(stream_, m, c, fused, 910, what + " bf16");
      if (c % 8 == 0)  // the chunked kernels' plans
        for (const bool bf16 : {false, true})
          for (const bool backward : {false, true})
            coverage[std::string(bf16 ? "bf16" : "fp32") + (backward ? " backward" : " forward")].add(
                kcu::bn_persistent_plan(m, c, bf16, backward, true));
      if (m * c >= 4096 && !large) {  // the single-element path
        expect_persistent_batchnorm_same<Unaligned, float>(stream_, m, c, fused, 920, what + " fp32 unaligned");
        expect_persistent_batchnorm_same<Unaligned, uint16_t>(stream_, m, c, fused, 930, what + " bf16 unaligned");
      }
    }
  // On an H100 or H200 (228 KiB of shared memory per SM, two blocks per SM) every chunked
  // kernel meets both a shape it caches whole and one it caches in part.
  ASSERT_EQ(coverage.size(), 4u);
  for (const auto& [kernel, cov] : coverage) {
    EXPECT_TRUE(cov.whole) << kernel << ": no shape cached whole";
    EXPECT_TRUE(cov.part) << kernel << ": no shape cached in part";
  }
}

// The engine's residual blocks pass dy as dresidual (the gradient is consumed as it is
// replaced): both forms must give with that aliasing what they give without it.
TEST_F(CudaOps, BatchNormBackwardWritesTheResidualGradientOverDy) {
  for (const bool persistent : {false, true})
    for (const auto& [m, c] : {std::pair<int64_t, int64_t>{128 * 32 * 32, 64}, {1000, 24}}) {
      const std::string what = std::string(persistent ? "persistent" : "separate") + " m " + std::to_string(m) +
                               " c " + std::to_string(c);
      const ScopedSwitch form(kcu::bn_persistent, kcu::set_bn_persistent, persistent);
      const size_t n = size_t(m * c), nc = size_t(c);
      const std::vector<uint16_t> xb = activations<uint16_t>(random_vector(n, 940, -2.f, 2.f)),
                                  yb = activations<uint16_t>(random_vector(n, 941)),
                                  dyb = activations<uint16_t>(random_vector(n, 942));
      DeviceArray<uint16_t> x(xb), y(yb), dy(dyb), dx(n), dres(n), dx2(n);
      DeviceArray<float> g(random_vector(nc, 943, 0.5f, 1.5f)), sm(random_vector(nc, 944)),
          si(random_vector(nc, 945, 0.5f, 2.f)), dg(nc), db(nc), dg2(nc), db2(nc);
      kcu::batchnorm_backward_bf16(m, c, x.get(), y.get(), dy.get(), g.get(), sm.get(), si.get(), dx.get(), dres.get(),
                                   dg.get(), db.get(), stream_);
      kcu::batchnorm_backward_bf16(m, c, x.get(), y.get(), dy.get(), g.get(), sm.get(), si.get(), dx2.get(), dy.get(),
                                   dg2.get(), db2.get(), stream_);
      sync_and_check();
      expect_bits_equal(dx2.download(), dx.download(), what + " dx");
      expect_bits_equal(dy.download(), dres.download(), what + " dresidual written over dy");
      expect_bits_equal(dg2.download(), dg.download(), what + " dgamma");
      expect_bits_equal(db2.download(), db.download(), what + " dbeta");
    }
}

// A shape's first persistent call may come inside a stream capture (--graphs captures a tick
// after warm-up, but a new batch size appears only then): planning it there (occupancy, shared
// memory opt-in) and capturing the cooperative launch must work, and the replay must give the
// separate kernels' bits.
// With programmatic dependent launch on as well (STALEPROP_PDL=1 with STALEPROP_BN_PERSISTENT=1):
// the cooperative kernels are captured beside PDL launches (the ReLUs after each), and the graph
// gives the same bits.
TEST_F(CudaOps, PersistentBatchNormIsFirstPlannedInsideAStreamCapture) {
  const int64_t m = 3 * 1000 + 17, c = 40;  // a shape no other test uses
  const size_t n = size_t(m * c), nc = size_t(c);
  const std::vector<float> xv = random_vector(n, 950, -2.f, 2.f), dyv = random_vector(n, 951);
  const std::vector<float> gamma = random_vector(nc, 952, 0.5f, 1.5f), beta = random_vector(nc, 953);
  auto run = [&](bool persistent, bool capture, bool pdl) {
    const ScopedSwitch form(kcu::bn_persistent, kcu::set_bn_persistent, persistent);
    const ScopedSwitch launch(kcu::programmatic_launch, kcu::set_programmatic_launch, pdl);
    DeviceArray<float> x(xv), dy(dyv), y(n), dx(n), g(gamma), b(beta), rm(std::vector<float>(nc, 0.f)),
        rv(std::vector<float>(nc, 1.f)), sm(nc), si(nc), dg(nc), db(nc), ry(n), rdx(n);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    if (capture) SP_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    kcu::batchnorm_forward_training(m, c, x.get(), g.get(), b.get(), 1e-5f, 0.1f, rm.get(), rv.get(), y.get(), sm.get(),
                                    si.get(), stream_);
    kcu::relu_forward(int64_t(n), y.get(), ry.get(), stream_);
    kcu::batchnorm_backward(m, c, x.get(), dy.get(), g.get(), sm.get(), si.get(), dx.get(), dg.get(), db.get(),
                            stream_);
    kcu::relu_forward(int64_t(n), dx.get(), rdx.get(), stream_);
    if (capture) {
      SP_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
      SP_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      SP_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    }
    sync_and_check();
    if (exec) SP_CUDA_CHECK(cudaGraphExecDestroy(exec));
    if (graph) SP_CUDA_CHECK(cudaGraphDestroy(graph));
    return std::vector<std::vector<float>>{y.download(),  dx.download(), sm.download(), si.download(), rm.download(),
                                           rv.download(), dg.download(), db.download(), ry.download(), rdx.download()};
  };
  const auto separate = run(false, false, false);
  const char* names[] = {"y",           "dx",     "save_mean", "save_invstd", "running_mean",
                         "running_var", "dgamma", "dbeta",     "relu(y)",     "relu(dx)"};
  for (size_t k = 0; k < separate.size(); ++k) EXPECT_FALSE(any_nan(separate[k])) << names[k] << " left unwritten";
  for (const bool pdl : {false, true}) {
    const int64_t before = kcu::bn_persistent_launches();
    const auto captured = run(true, true, pdl);
    EXPECT_EQ(kcu::bn_persistent_launches() - before, 2) << "the persistent form was not captured";
    for (size_t k = 0; k < separate.size(); ++k)
      expect_bits_equal(captured[k], separate[k],
                        std::string("captured persistent") + (pdl ? " with PDL" : "") + " vs separate: " + names[k]);
  }
}

// Programmatic dependent launch: a kernel scheduled before the previous one finishes still sees
// everything it wrote, because every kernel waits in its prologue. The writer spins ~0.1 ms first,
// so a reader that did not wait would see the old value.
TEST_F(CudaOps, ProgrammaticLaunchStillOrdersDependentKernels) {
  const ScopedSwitch pdl(kcu::programmatic_launch, kcu::set_programmatic_launch, false);
  pdl.set(true);
  if (!kcu::programmatic_launch_active())
    GTEST_SKIP() << "programmatic dependent launch needs a compute capability 9.0 device and a build for it";
  for (const bool on : {false, true}) {
    pdl.set(on);
    ASSERT_EQ(kcu::programmatic_launch_active(), on);
    for (int rep = 0; rep < 20; ++rep)
      EXPECT_TRUE(kcu::programmatic_launch_selftest(stream_)) << "with PDL " << (on ? "on" : "off") << ", run " << rep;
  }
}

// The pointwise ops and casts over n elements (8k + 5: chunks and a tail), in fp32 and bf16.
template <template <class> class Buf>
std::vector<std::vector<uint32_t>> run_pointwise(cudaStream_t stream, int64_t n) {
  const size_t count = size_t(n);
  const std::vector<float> fa = with_specials(random_vector(count, 900, -4.f, 4.f)), fb = random_vector(count, 901);
  Buf<float> a(fa), b(fb), out(count), inplace(fa);
  Buf<uint16_t> ha(activations<uint16_t>(fa)), hb(activations<uint16_t>(fb)), hout(count);
  std::vector<std::vector<uint32_t>> results;
  auto keep = [&](const auto& buf) {
    sync_and_check();
    const auto v = buf.download();
    results.emplace_back(v.begin(), v.end());  // the bit patterns, widened to 32 bits
  };
  auto bits = [](const std::vector<float>& v) {
    std::vector<uint32_t> u(v.size());
    std::memcpy(u.data(), v.data(), v.size() * sizeof(float));
    return u;
  };
  auto keep_f32 = [&](const Buf<float>& buf) {
    sync_and_check();
    results.push_back(bits(buf.download()));
  };
  // Each output poisoned before its op, so an element an op skips fails (it would otherwise keep
  // the op before's value, which may be right: relu_backward's 0 where relu_forward gave 0).
  out.poison(), kcu::relu_forward(n, a.get(), out.get(), stream), keep_f32(out);
  out.poison(), kcu::relu_backward(n, a.get(), b.get(), out.get(), stream), keep_f32(out);
  out.poison(), kcu::add(n, a.get(), b.get(), out.get(), stream), keep_f32(out);
  out.poison(), kcu::scale(n, -0.375f, a.get(), out.get(), stream), keep_f32(out);
  out.poison(), kcu::fill(n, 2.5f, out.get(), stream), keep_f32(out);
  kcu::add(n, inplace.get(), b.get(), inplace.get(), stream), keep_f32(inplace);
  hout.poison(), kcu::f32_to_bf16(n, a.get(), hout.get(), stream), keep(hout);
  out.poison(), kcu::bf16_to_f32(n, ha.get(), out.get(), stream), keep_f32(out);
  hout.poison(), kcu::relu_forward_bf16(n, ha.get(), hout.get(), stream), keep(hout);
  hout.poison(), kcu::relu_backward_bf16(n, ha.get(), hb.get(), hout.get(), stream), keep(hout);
  hout.poison(), kcu::add_bf16(n, ha.get(), hb.get(), hout.get(), stream), keep(hout);
  hout.poison(), kcu::scale_bf16(n, 0.3f, ha.get(), hout.get(), stream), keep(hout);
  return results;
}

TEST_F(CudaOps, PointwiseOpsGiveTheSameBitsFromUnalignedPointers) {
  const char* names[] = {"relu_forward",      "relu_backward",      "add",      "scale",     "fill",
                         "add in place",      "f32_to_bf16",        "bf16_to_f32",
                         "relu_forward_bf16", "relu_backward_bf16", "add_bf16", "scale_bf16"};
  const auto u = run_pointwise<Unaligned>(stream_, 8 * 1000 + 5), a = run_pointwise<DeviceArray>(stream_, 8 * 1000 + 5);
  ASSERT_EQ(u.size(), std::size(names));
  ASSERT_EQ(a.size(), u.size());
  for (size_t k = 0; k < u.size(); ++k)
    expect_bits_equal(u[k], a[k], std::string(names[k]) + ", unaligned vs aligned");
}

// One SGD step over tensors of 4096 + 3, 100 and 7 elements, the first two with their bf16 weight
// copies (the third without: copies and none in one launch); per tensor, param, momentum and the
// copy (widened; NaN where there is none) after it. copy_offset starts the copies that many
// elements into their allocations (1: not 8-byte aligned beside aligned floats).
template <template <class> class Buf>
std::vector<std::vector<float>> run_sgd(cudaStream_t stream, const kernels::SgdParams& p, int copy_offset = 0) {
  std::vector<std::unique_ptr<Buf<float>>> bufs;
  std::vector<std::unique_ptr<Buf<uint16_t> > > copies;
  std::vector<kcu::SgdTensor> list;
  uint32_t seed = 950;
  for (const int64_t size : {int64_t(4096 + 3), int64_t(100), int64_t(7)}) {
    for (int k = 0; k < 3; ++k) bufs.push_back(std::make_unique<Buf<float>>(random_vector(size_t(size), ++seed)));
    copies.push_back(
        std::make_unique<Buf<uint16_t>>(std::vector<uint16_t>(size_t(size + copy_offset), uint16_t(0x7fc0))));
    const size_t at = bufs.size() - 3;
    list.push_back({bufs[at]->get(), bufs[at + 1]->get(), p.momentum != 0.f ? bufs[at + 2]->get() : nullptr, size,
                    size == 7 ? nullptr : copies.back()->get() + copy_offset});
  }
  kcu::sgd_step(list, p, stream);
  sync_and_check();
  std::vector<std::vector<float>> out;
  for (size_t at = 0; at < bufs.size(); at += 3) {
    out.push_back(bufs[at]->download());
    out.push_back(bufs[at + 2]->download());
    std::vector<float> copy;
    const std::vector<uint16_t> bits = copies[at / 3]->download();
    for (size_t i = size_t(copy_offset); i < bits.size(); ++i) copy.push_back(kc::f32_from_bf16(bits[i]));
    out.push_back(copy);
  }
  return out;
}

TEST_F(CudaOps, SgdGivesTheSameBitsFromUnalignedTensors) {
  kernels::SgdParams p;
  p.lr = 0.1f, p.momentum = 0.9f, p.weight_decay = 5e-4f, p.grad_scale = 0.5f;
  const char* what[] = {" param", " momentum", " bf16 copy"};
  for (const bool nesterov : {false, true})
    for (const float momentum : {0.9f, 0.f}) {
      p.nesterov = nesterov, p.momentum = momentum;
      const auto u = run_sgd<Unaligned>(stream_, p), a = run_sgd<DeviceArray>(stream_, p);
      // Aligned floats beside copies that are not 8-byte aligned: 16-byte float accesses, single copy stores.
      const auto mixed = run_sgd<DeviceArray>(stream_, p, 1);
      ASSERT_EQ(u.size(), a.size());
      ASSERT_EQ(mixed.size(), a.size());
      for (size_t k = 0; k < a.size(); ++k) expect_bits_equal(mixed[k], a[k], "sgd, copies unaligned: " + std::to_string(k));
      const std::string setting = std::string(nesterov ? " nesterov" : "") + " momentum " + std::to_string(momentum);
      for (size_t k = 0; k < u.size(); ++k)
        expect_bits_equal(u[k], a[k],
                          "sgd tensor " + std::to_string(k / 3) + what[k % 3] + setting + ", unaligned vs aligned");
      // The copy (8-byte stores when aligned, single ones when not) is the updated param rounded
      // as f32_to_bf16 rounds it; the tensor without one left its buffer as it was (NaN).
      EXPECT_TRUE(std::all_of(a[8].begin(), a[8].end(), [](float v) { return std::isnan(v); }));
      for (size_t k = 0; k + 3 < a.size(); k += 3) {
        std::vector<uint16_t> rounded(a[k].size());
        kc::f32_to_bf16(int64_t(a[k].size()), a[k].data(), rounded.data());
        std::vector<float> want;
        for (uint16_t h : rounded) want.push_back(kc::f32_from_bf16(h));
        expect_bits_equal(a[k + 2], want,
                          "sgd tensor " + std::to_string(k / 3) + " bf16 copy vs the rounded param" + setting);
      }
    }
}

// ---- Shortcut and pooling ----------------------------------------------------------------

TEST_F(CudaOps, ShortcutMatchesBitForBit) {
  // 16 -> 32 and 8 -> 16 (padding of 8 and 4 channels) move 4 channels at a time; 4 -> 16 pads
  // 6 (not a multiple of 4), the others have odd channel counts: element by element. Each shape
  // also runs one element into its allocations (unaligned: element by element).
  const ShortcutAShape shapes[] = {{8, 32, 32, 16, 32, 2}, {2, 8, 8, 8, 16, 2}, {2, 8, 8, 4, 16, 2},
                                   {1, 5, 7, 3, 8, 2},     {2, 4, 4, 6, 6, 1},  {3, 9, 6, 5, 11, 3},
                                   {1, 7, 5, 8, 16, 2}};  // 4 at a time on odd sizes, batch 1
  uint32_t seed = 700;
  for (const ShortcutAShape& sh : shapes)
    for (const size_t off : {size_t(0), size_t(1)}) {
      const std::string what = "shortcut " + std::to_string(sh.c_in) + "->" + std::to_string(sh.c_out) + " offset " +
                               std::to_string(off);
      const std::vector<float> x = random_vector(size_t(sh.x_size()), ++seed),
                               dy = random_vector(size_t(sh.y_size()), ++seed);
      DeviceArray<float> dxin(x.size() + off), ddy(dy.size() + off), dyout(size_t(sh.y_size()) + off),
          ddx(size_t(sh.x_size()) + off);
      SP_CUDA_CHECK(cudaMemcpy(dxin.get() + off, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
      SP_CUDA_CHECK(cudaMemcpy(ddy.get() + off, dy.data(), dy.size() * 4, cudaMemcpyHostToDevice));
      kcu::shortcut_a_forward(sh, dxin.get() + off, dyout.get() + off, stream_);
      sync_and_check();
      kcu::shortcut_a_backward(sh, ddy.get() + off, ddx.get() + off, stream_);
      sync_and_check();
      std::vector<float> ry(size_t(sh.y_size())), rdx(size_t(sh.x_size()));
      kc::shortcut_a_forward<float>(sh, x.data(), ry.data());
      kc::shortcut_a_backward<float>(sh, dy.data(), rdx.data());
      std::vector<float> gy = dyout.download(), gdx = ddx.download();
      gy.erase(gy.begin(), gy.begin() + std::ptrdiff_t(off));
      gdx.erase(gdx.begin(), gdx.begin() + std::ptrdiff_t(off));
      expect_bits_equal(gy, ry, what + " forward");
      expect_bits_equal(gdx, rdx, what + " backward");
    }
}

TEST_F(CudaOps, MaxPoolMatchesBitForBitIncludingTiesAndOverlap) {
  // Windows of 2 and 3 (unrolled) and of 1 and 4 (not; the last shape 4 channels at a time).
  // Channels a multiple of 4 move 4 at a time when aligned; each shape also runs one element into
  // its allocations (one at a time).
  // The last two shapes leave pixels that no window covers (their gradient is 0): 3/2 on 8 x 8
  // misses the last row and column, 2/3 (stride past the window) every third.
  const Pool2dShape shapes[] = {{2, 9, 9, 5, 3, 2, 1},    {1, 8, 8, 4, 2, 2, 0}, {2, 7, 6, 4, 3, 1, 1},
                                {4, 32, 32, 16, 3, 2, 1}, {1, 1, 1, 2, 1, 1, 0}, {1, 5, 5, 3, 4, 3, 2},
                                {1, 8, 8, 8, 3, 2, 0},    {1, 7, 7, 3, 2, 3, 0},  {1, 5, 5, 8, 4, 3, 2}};
  // Then each shape once more with some NaN inputs, which win their windows on both devices
  // (PyTorch's rule: the last NaN of a window wins), so that a diverging run shows.
  uint32_t seed = 800;
  for (const bool nans : {false, true})
    for (const Pool2dShape& sh : shapes)
      for (const size_t off : {size_t(0), size_t(1)}) {
        if (nans && off == 1) continue;
        const std::string what = "maxpool " + std::to_string(sh.h) + "x" + std::to_string(sh.w) + " c " +
                                 std::to_string(sh.c) + " window " + std::to_string(sh.window) + " stride " +
                                 std::to_string(sh.stride) + " offset " + std::to_string(off) + (nans ? " NaNs" : "");
        // Values from a small set, so windows often hold several equal maxima (the first wins),
        // and negative ones, so a window beside the padding often has a maximum below 0 (padding
        // is no tap, not a 0).
        std::vector<float> x = random_vector(size_t(sh.x_size()), ++seed, -4.f, 4.f);
        for (float& v : x) v = std::floor(v);
        if (nans)
          for (size_t i = 3; i < x.size(); i += 7) x[i] = std::numeric_limits<float>::quiet_NaN();
        const std::vector<float> dy = random_vector(size_t(sh.y_size()), ++seed);
        std::vector<float> xo(off, 0.f), dyo(off, 0.f);
        xo.insert(xo.end(), x.begin(), x.end());
        dyo.insert(dyo.end(), dy.begin(), dy.end());
        DeviceArray<float> dxin(xo), ddy(dyo), dyout(off + size_t(sh.y_size())), ddx(off + size_t(sh.x_size()));
        kcu::maxpool2d_forward(sh, dxin.get() + off, dyout.get() + off, stream_);
        sync_and_check();
        kcu::maxpool2d_backward(sh, dxin.get() + off, ddy.get() + off, ddx.get() + off, stream_);
        sync_and_check();
        std::vector<float> ry(size_t(sh.y_size())), rdx(size_t(sh.x_size()));
        kc::maxpool2d_forward<float>(sh, x.data(), ry.data());
        kc::maxpool2d_backward<float>(sh, x.data(), dy.data(), rdx.data());
        const std::vector<float> gy = dyout.download(), gdx = ddx.download();
        expect_bits_equal(std::vector<float>(gy.begin() + long(off), gy.end()), ry, what + " forward");
        expect_bits_equal(std::vector<float>(gdx.begin() + long(off), gdx.end()), rdx, what + " backward");
      }
}

TEST_F(CudaOps, GlobalAvgPoolMatchesBitForBit) {
  // c % 4 == 0 and aligned: the backward moves 4 channels at a time; the other cases, and every
  // case one element into its allocations, element by element.
  const int64_t cases[][3] = {{128, 64, 64}, {3, 16, 512}, {1, 1, 10}, {2, 49, 3}};
  uint32_t seed = 900;
  for (const auto& cs : cases)
    for (const size_t off : {size_t(0), size_t(1)}) {
      const int64_t n = cs[0], hw = cs[1], c = cs[2];
      const std::string what = "global_avgpool c " + std::to_string(c) + " offset " + std::to_string(off);
      const std::vector<float> x = random_vector(size_t(n * hw * c), ++seed), dy = random_vector(size_t(n * c), ++seed);
      DeviceArray<float> dxin(x.size() + off), ddy(dy.size() + off), dyout(size_t(n * c) + off), ddx(x.size() + off);
      SP_CUDA_CHECK(cudaMemcpy(dxin.get() + off, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
      SP_CUDA_CHECK(cudaMemcpy(ddy.get() + off, dy.data(), dy.size() * 4, cudaMemcpyHostToDevice));
      kcu::global_avgpool_forward(n, hw, c, dxin.get() + off, dyout.get() + off, stream_);
      sync_and_check();
      kcu::global_avgpool_backward(n, hw, c, ddy.get() + off, ddx.get() + off, stream_);
      sync_and_check();
      std::vector<float> ry(size_t(n * c)), rdx(x.size());
      kc::global_avgpool_forward<float>(n, hw, c, x.data(), ry.data());
      kc::global_avgpool_backward<float>(n, hw, c, dy.data(), rdx.data());
      std::vector<float> gy = dyout.download(), gdx = ddx.download();
      gy.erase(gy.begin(), gy.begin() + std::ptrdiff_t(off));
      gdx.erase(gdx.begin(), gdx.begin() + std::ptrdiff_t(off));
      expect_bits_equal(gy, ry, what + " forward");
      expect_bits_equal(gdx, rdx, what + " backward");
    }
}

// ---- Linear ------------------------------------------------------------------------------

TEST_F(CudaOps, LinearForwardBackward) {
  const int64_t cases[][3] = {{128, 64, 10}, {1, 3, 1}, {5, 257, 127}, {33, 100, 100}};
  uint32_t seed = 1000;
  bool bias = true;
  for (const auto& cs : cases) {
    const int64_t n = cs[0], in = cs[1], out = cs[2];
    const std::string what = "linear " + std::to_string(n) + "x" + std::to_string(in) + "->" + std::to_string(out);
    const std::vector<float> x = random_vector(size_t(n * in), ++seed), w = random_vector(size_t(out * in), ++seed);
    const std::vector<float> b = random_vector(size_t(out), ++seed), dy = random_vector(size_t(n * out), ++seed);
    DeviceArray<float> dxin(x), dwin(w), dbin(b), ddy(dy);
    DeviceArray<float> dyout(size_t(n * out)), ddx(x.size()), ddw(w.size()), ddb(b.size());
    kcu::linear_forward(n, in, out, dxin.get(), dwin.get(), bias ? dbin.get() : nullptr, dyout.get(), stream_);
    sync_and_check();
    kcu::linear_backward(n, in, out, dxin.get(), dwin.get(), ddy.get(), ddx.get(), ddw.get(), ddb.get(), stream_);
    sync_and_check();
    const std::vector<double> xd = to_double(x), wd = to_double(w), bd = to_double(b), dyd = to_double(dy);
    std::vector<double> ry(size_t(n * out)), rdx(x.size()), rdw(w.size()), rdb(b.size());
    kc::linear_forward<double>(n, in, out, xd.data(), wd.data(), bias ? bd.data() : nullptr, ry.data());
    kc::linear_backward<double>(n, in, out, xd.data(), wd.data(), dyd.data(), rdx.data(), rdw.data(), rdb.data());
    EXPECT_LE(rel_error(dyout.download(), ry), kTol) << what << " y";
    EXPECT_LE(rel_error(ddx.download(), rdx), kTol) << what << " dx";
    EXPECT_LE(rel_error(ddw.download(), rdw), kTol) << what << " dw";
    EXPECT_LE(rel_error(ddb.download(), rdb), kTol) << what << " db";
    bias = !bias;
  }
  // Null outputs are skipped.
  DeviceArray<float> x(std::vector<float>(6, 1.f)), w(std::vector<float>(6, 1.f)), dy(std::vector<float>(4, 1.f));
  DeviceArray<float> db(2);
  kcu::linear_backward(2, 3, 2, x.get(), w.get(), dy.get(), nullptr, nullptr, db.get(), stream_);
  sync_and_check();
  expect_bits_equal(db.download(), std::vector<float>{2.f, 2.f}, "linear db only");
}

// ---- Loss --------------------------------------------------------------------------------

void check_softmax_xent(cudaStream_t stream, int64_t n, int64_t classes, float smoothing, float spread, uint32_t seed) {
  const std::string what = "softmax_cross_entropy " + std::to_string(n) + "x" + std::to_string(classes);
  std::vector<float> logits = random_vector(size_t(n * classes), seed, -spread, spread);
  std::vector<int32_t> labels(logits.size() / size_t(classes));
  std::mt19937 rng(seed + 1);
  for (int32_t& l : labels) l = int32_t(rng() % uint32_t(classes));
  // A row of equal logits (argmax: the first), and a row whose maximum sits at the label.
  if (n > 2) {
    for (int64_t j = 0; j < classes; ++j) logits[size_t(classes + j)] = 0.5f;
    logits[size_t(2 * classes + labels[2])] = 2 * spread;
  }
  DeviceArray<float> dlogits_in(logits), dloss(1), ddl(logits.size());
  DeviceArray<int32_t> dlabels(labels), dcorrect(1);
  kcu::softmax_cross_entropy(n, classes, dlogits_in.get(), dlabels.get(), smoothing, dloss.get(), ddl.get(),
                             dcorrect.get(), stream);
  sync_and_check();
  double rloss = 0.0;
  int64_t rcorrect = 0;
  std::vector<double> rdl(logits.size());
  kc::softmax_cross_entropy<double>(n, classes, to_double(logits).data(), labels.data(), smoothing, &rloss, rdl.data(),
                                    &rcorrect);
  float floss = 0.f;  // the fp32 reference decides the argmax on the same fp32 logits
  int64_t fcorrect = 0;
  std::vector<float> fdl(logits.size());
  kc::softmax_cross_entropy<float>(n, classes, logits.data(), labels.data(), smoothing, &floss, fdl.data(), &fcorrect);
  EXPECT_EQ(rcorrect, fcorrect);
  EXPECT_LE(rel_error(dloss.download(), std::vector<double>{rloss}), kTol) << what << " loss";
  EXPECT_LE(rel_error(ddl.download(), rdl), kTol) << what << " dlogits";
  EXPECT_EQ(dcorrect.download()[0], fcorrect) << what << " correct";
}

TEST_F(CudaOps, SoftmaxCrossEntropy) {
  check_softmax_xent(stream_, 128, 10, 0.1f, 4.f, 1100);
  check_softmax_xent(stream_, 1, 1, 0.f, 1.f, 1110);
  check_softmax_xent(stream_, 37, 100, 0.f, 30.f, 1120);  // wide logits: the max shift matters
  check_softmax_xent(stream_, 3, 1000, 0.2f, 2.f, 1130);
  check_softmax_xent(stream_, 1000, 33, 0.05f, 1.f, 1140);
}

// Logits of -inf (a masked class) with no smoothing: such a class has probability 0 and no
// target mass, so the loss and every gradient stay finite (0 * -inf must not enter the sum).
TEST_F(CudaOps, SoftmaxCrossEntropyMinusInfinityLogits) {
  const int64_t n = 4, classes = 10;
  std::vector<float> logits = random_vector(size_t(n * classes), 1160, -3.f, 3.f);
  const std::vector<int32_t> labels = {2, 7, 0, 9};
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i % 2; j < classes; j += 2)
      if (j != labels[size_t(i)]) logits[size_t(i * classes + j)] = -inf;
  DeviceArray<float> dlogits_in(logits), dloss(1), ddl(logits.size());
  DeviceArray<int32_t> dlabels(labels), dcorrect(1);
  kcu::softmax_cross_entropy(n, classes, dlogits_in.get(), dlabels.get(), 0.f, dloss.get(), ddl.get(), dcorrect.get(),
                             stream_);
  sync_and_check();
  double rloss = 0.0;
  int64_t rcorrect = 0;
  std::vector<double> rdl(logits.size());
  kc::softmax_cross_entropy<double>(n, classes, to_double(logits).data(), labels.data(), 0.0, &rloss, rdl.data(),
                                    &rcorrect);
  const float loss = dloss.download()[0];
  ASSERT_TRUE(std::isfinite(loss) && std::isfinite(rloss)) << "loss " << loss << ", reference " << rloss;
  EXPECT_LE(rel_error(std::vector<float>{loss}, std::vector<double>{rloss}), kTol);
  const std::vector<float> dl = ddl.download();
  for (size_t i = 0; i < dl.size(); ++i) ASSERT_TRUE(std::isfinite(dl[i])) << "dlogits " << i;
  EXPECT_LE(rel_error(dl, rdl), kTol);
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isinf(logits[i])) {
      EXPECT_EQ(dl[i], 0.f) << "dlogits " << i << " of a class of probability 0";
    }
  }
  EXPECT_EQ(dcorrect.download()[0], rcorrect);
}

TEST_F(CudaOps, SoftmaxCrossEntropyBadLabelPoisonsTheLoss) {
  const std::vector<float> logits = random_vector(3 * 4, 1150);
  // Outputs start finite (not the usual NaN poison), so the NaNs below are the kernel's.
  DeviceArray<float> dlogits_in(logits), dloss(std::vector<float>{0.f}), ddl(std::vector<float>(logits.size(), 0.f));
  DeviceArray<int32_t> dlabels(std::vector<int32_t>{1, 4, 0}), dcorrect(1);
  kcu::softmax_cross_entropy(3, 4, dlogits_in.get(), dlabels.get(), 0.f, dloss.get(), ddl.get(), dcorrect.get(),
                             stream_);
  sync_and_check();
  EXPECT_TRUE(std::isnan(dloss.download()[0]));
  const std::vector<float> dl = ddl.download();
  for (int j = 0; j < 4; ++j) {
    EXPECT_TRUE(std::isnan(dl[size_t(4 + j)])) << "row of the bad label";
    EXPECT_FALSE(std::isnan(dl[size_t(j)])) << "rows of good labels";
  }
  // The good rows count as usual (first maximum == label), the bad one as a miss.
  int hits = 0;
  for (int row : {0, 2}) {
    const auto first = logits.begin() + 4 * row;
    hits += std::max_element(first, first + 4) - first == (row == 0 ? 1 : 0);
  }
  EXPECT_EQ(dcorrect.download()[0], hits);
}

// ---- SGD ---------------------------------------------------------------------------------

void check_sgd(cudaStream_t stream, const std::vector<int64_t>& sizes, const kernels::SgdParams& p, uint32_t seed) {
  std::vector<std::vector<float>> params, grads, moms;
  std::vector<std::unique_ptr<DeviceArray<float>>> dparams, dgrads, dmoms;
  std::vector<kcu::SgdTensor> list;
  for (int64_t size : sizes) {
    params.push_back(random_vector(size_t(size), ++seed));
    grads.push_back(random_vector(size_t(size), ++seed));
    moms.push_back(random_vector(size_t(size), ++seed));
    dparams.push_back(std::make_unique<DeviceArray<float>>(params.back()));
    dgrads.push_back(std::make_unique<DeviceArray<float>>(grads.back()));
    dmoms.push_back(std::make_unique<DeviceArray<float>>(moms.back()));
    list.push_back(
        {dparams.back()->get(), dgrads.back()->get(), p.momentum != 0.f ? dmoms.back()->get() : nullptr, size});
  }
  kcu::sgd_step(list, p, stream);
  list.clear();  // the list was copied into the launch
  sync_and_check();

  std::vector<kc::SgdTensor<double>> ref;
  std::vector<std::vector<double>> rp, rg, rm;
  for (size_t i = 0; i < sizes.size(); ++i) {
    rp.push_back(to_double(params[i]));
    rg.push_back(to_double(grads[i]));
    rm.push_back(to_double(moms[i]));
  }
  for (size_t i = 0; i < sizes.size(); ++i) ref.push_back({rp[i].data(), rg[i].data(), rm[i].data(), sizes[i]});
  kc::sgd_step<double>(ref, p);
  std::vector<float> got_p, got_m;
  std::vector<double> want_p, want_m;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::vector<float> gp = dparams[i]->download(), gm = dmoms[i]->download();
    got_p.insert(got_p.end(), gp.begin(), gp.end());
    got_m.insert(got_m.end(), gm.begin(), gm.end());
    want_p.insert(want_p.end(), rp[i].begin(), rp[i].end());
    want_m.insert(want_m.end(), rm[i].begin(), rm[i].end());
  }
  const std::string what = "sgd over " + std::to_string(sizes.size()) + " tensors, momentum " +
                           std::to_string(p.momentum) + (p.nesterov ? " nesterov" : "");
  EXPECT_LE(rel_error(got_p, want_p), kTol) << what << " params";
  if (p.momentum != 0.f)
    EXPECT_LE(rel_error(got_m, want_m), kTol) << what << " momenta";
  else
    expect_bits_equal(
        got_m,
        [&] {  // untouched
          std::vector<float> all;
          for (const auto& m : moms) all.insert(all.end(), m.begin(), m.end());
          return all;
        }(),
        what + " momenta untouched");
}

TEST_F(CudaOps, SgdUpdatesEveryTensorInOneCall) {
  const std::vector<int64_t> sizes = {1, 7, 4096, 4097, 0, 16 * 16 * 9, 100000, 10};
  kernels::SgdParams p;
  p.lr = 0.1f, p.momentum = 0.9f, p.weight_decay = 5e-4f, p.nesterov = false, p.grad_scale = 0.5f;
  check_sgd(stream_, sizes, p, 1200);
  p.nesterov = true;
  check_sgd(stream_, sizes, p, 1300);
  p.momentum = 0.f, p.nesterov = false;
  check_sgd(stream_, sizes, p, 1400);
  // More tensors than one launch's table holds.
  p.momentum = 0.9f;
  check_sgd(stream_, std::vector<int64_t>(size_t(kcu::kSgdMaxTensors) + 50, 3), p, 1500);
}

// ---- Determinism -------------------------------------------------------------------------

TEST_F(CudaOps, RepeatedRunsAreBitIdentical) {
  const Conv2dShape sh = conv(32, 16, 16, 16, 32, 3, 1, 1);  // split-K weight gradient
  const std::vector<float> x = random_vector(size_t(sh.x_size()), 1600), dy = random_vector(size_t(sh.y_size()), 1601);
  DeviceArray<float> dx(x), ddy(dy), dw(size_t(sh.w_size())), db(size_t(sh.k));
  DeviceArray<float> g(std::vector<float>(size_t(sh.c), 1.f)), b(std::vector<float>(size_t(sh.c), 0.f));
  DeviceArray<float> rm(size_t(sh.c)), rv(size_t(sh.c)), y(x.size()), sm(size_t(sh.c)), si(size_t(sh.c));
  DeviceArray<float> bdx(x.size()), bdg(size_t(sh.c)), bdb(size_t(sh.c));
  const int64_t m = int64_t(sh.n) * sh.h * sh.w;
  auto run = [&] {
    kcu::fill(sh.c, 0.f, rm.get(), stream_);
    kcu::fill(sh.c, 1.f, rv.get(), stream_);
    kcu::conv2d_backward_weight(sh, dx.get(), ddy.get(), dw.get(), db.get(), stream_);
    kcu::batchnorm_forward_training(m, sh.c, dx.get(), g.get(), b.get(), 1e-5f, 0.1f, rm.get(), rv.get(), y.get(),
                                    sm.get(), si.get(), stream_);
    kcu::batchnorm_backward(m, sh.c, dx.get(), ddy.get(), g.get(), sm.get(), si.get(), bdx.get(), bdg.get(), bdb.get(),
                            stream_);
    sync_and_check();
    std::vector<std::vector<float> > out = {dw.download(), db.download(),  y.download(),   sm.download(), si.download(),
                                            rv.download(), bdx.download(), bdg.download(), bdb.download()};
    for (auto* a : {&dw, &db, &y, &sm, &si, &bdx, &bdg, &bdb}) a->poison();
    return out;
  };
  const auto first = run(), second = run();
  for (size_t i = 0; i < first.size(); ++i) {
    EXPECT_FALSE(any_nan(first[i])) << "output " << i << " left unwritten";
    expect_bits_equal(second[i], first[i], "output " + std::to_string(i));
  }
}

// ---- Through the engine's ops:: API on a CUDA stream ---------------------------------------

TEST_F(CudaOps, EngineOpsOnACudaStream) {
  auto cs = make_stream(Device::cuda(0));
  auto hs = make_stream(Device::cpu());
  const Device gpu = Device::cuda(0);
  auto to_gpu = [&](const Tensor& t) { return to_device(*cs, t, gpu); };
  auto to_host = [&](const Tensor& d) { return test::to_host(*cs, d); };
  // The GPU's outputs start as NaN (Tensor::empty may hand back a cached block holding earlier
  // results), so an element left unwritten fails.
  auto poisoned = [&](const Shape& shape, DType dt = DType::F32) {
    Tensor t = Tensor::empty(shape, dt, gpu);
    SP_CUDA_CHECK(cudaMemset(t.raw_data(), 0xFF, t.nbytes()));
    SP_CUDA_CHECK(cudaDeviceSynchronize());  // the legacy stream's fill, before cs writes
    return t;
  };

  // Convolution with bias, then a training-mode batch norm, on both devices.
  const Tensor x = host_tensor({4, 9, 9, 8}, 1700), w = host_tensor({12, 3, 3, 8}, 1701),
               bias = host_tensor({12}, 1702);
  const Shape yshape = ops::conv2d_output_shape(x.shape(), w.shape(), 2, 1);
  Tensor y_cpu = Tensor::empty(yshape, DType::F32), bn_cpu = Tensor::empty(yshape, DType::F32);
  Tensor gamma = host_tensor({12}, 1703), beta = host_tensor({12}, 1704);
  Tensor rm_cpu = Tensor::empty({12}, DType::F32), rv_cpu = Tensor::empty({12}, DType::F32);
  Tensor sm_cpu = Tensor::empty({12}, DType::F32), si_cpu = Tensor::empty({12}, DType::F32);
  ops::fill(*hs, rm_cpu, 0.f);
  ops::fill(*hs, rv_cpu, 1.f);
  ops::conv2d_forward(*hs, x, w, bias, y_cpu, 2, 1);
  ops::batchnorm_forward_training(*hs, y_cpu, gamma, beta, rm_cpu, rv_cpu, bn_cpu, sm_cpu, si_cpu, 1e-5f, 0.1f);
  hs->synchronize();

  const Tensor xg = to_gpu(x), wg = to_gpu(w), bg = to_gpu(bias), gg = to_gpu(gamma), beg = to_gpu(beta);
  Tensor yg = poisoned(yshape), bng = poisoned(yshape);
  Tensor rmg = Tensor::empty({12}, DType::F32, gpu), rvg = Tensor::empty({12}, DType::F32, gpu);
  Tensor smg = poisoned({12}), sig = poisoned({12});
  ops::fill(*cs, rmg, 0.f);
  ops::fill(*cs, rvg, 1.f);
  ops::conv2d_forward(*cs, xg, wg, bg, yg, 2, 1);
  ops::batchnorm_forward_training(*cs, yg, gg, beg, rmg, rvg, bng, smg, sig, 1e-5f, 0.1f);
  sync_and_check();
  EXPECT_LE(rel_error(host_values(to_host(yg)), to_double(host_values(y_cpu))), kTol) << "conv2d_forward";
  EXPECT_LE(rel_error(host_values(to_host(bng)), to_double(host_values(bn_cpu))), kTol) << "batchnorm y";
  EXPECT_LE(rel_error(host_values(to_host(rvg)), to_double(host_values(rv_cpu))), kTol) << "running_var";
  EXPECT_LE(rel_error(host_values(to_host(smg)), to_double(host_values(sm_cpu))), kTol) << "save_mean";
  EXPECT_LE(rel_error(host_values(to_host(sig)), to_double(host_values(si_cpu))), kTol) << "save_invstd";

  // bf16 round trip through ops::cast is exact on both devices.
  Tensor h16 = Tensor::empty(yshape, DType::BF16), g16 = poisoned(yshape, DType::BF16);
  ops::cast(*hs, y_cpu, h16);
  hs->synchronize();
  ops::cast(*cs, to_gpu(y_cpu), g16);
  const Tensor g16_host = to_host(g16);
  EXPECT_EQ(0, std::memcmp(g16_host.raw_data(), h16.raw_data(), h16.nbytes())) << "cast f32 -> bf16";

  // sgd_step over two tensors in one call.
  kernels::SgdParams p;
  p.lr = 0.05f, p.momentum = 0.9f, p.nesterov = true, p.weight_decay = 1e-4f;
  std::vector<Tensor> params_cpu = {host_tensor({3, 5}, 1710), host_tensor({7}, 1711)};
  std::vector<Tensor> grads_cpu = {host_tensor({3, 5}, 1712), host_tensor({7}, 1713)};
  std::vector<Tensor> moms_cpu = {host_tensor({3, 5}, 1714), host_tensor({7}, 1715)};
  std::vector<Tensor> params_gpu, grads_gpu, moms_gpu;
  for (size_t i = 0; i < 2; ++i) {
    params_gpu.push_back(to_gpu(params_cpu[i]));
    grads_gpu.push_back(to_gpu(grads_cpu[i]));
    moms_gpu.push_back(to_gpu(moms_cpu[i]));
  }
  ops::sgd_step(*hs, params_cpu, grads_cpu, moms_cpu, p);
  hs->synchronize();
  ops::sgd_step(*cs, params_gpu, grads_gpu, moms_gpu, p);
  sync_and_check();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_LE(rel_error(host_values(to_host(params_gpu[i])), to_double(host_values(params_cpu[i]))), kTol);
    EXPECT_LE(rel_error(host_values(to_host(moms_gpu[i])), to_double(host_values(moms_cpu[i]))), kTol);
  }
}

// The ops that run widened under bf16 (max and average pooling, the option-A shortcut, the
// linear layer, softmax cross-entropy: bf16 inputs widened to fp32, the fp32 op, outputs
// rounded to bf16) on bf16 CUDA tensors, against the same calls on the CPU. Outputs start as
// NaN on both devices, so an unwritten element fails. The pure data movements (max pooling's
// forward, the shortcut) must match bit for bit; the reductions, whose fp32 sums may round
// differently, within bf16's tolerance (relative L2 2e-2).
TEST_F(CudaOps, WidenedBf16OpsMatchTheCpu) {
  auto cs = make_stream(Device::cuda(0));
  auto hs = make_stream(Device::cpu());
  const Device gpu = Device::cuda(0);
  struct Both {
    Tensor cpu, gpu;
  };
  // Seeded values in [-1, 1) rounded to bf16 (or f32 / i32 as given), the same on both devices.
  const auto input = [&](const Shape& shape, uint32_t seed, DType dt = DType::BF16) {
    const Tensor f = host_tensor(shape, seed);
    Tensor h = dt == DType::F32 ? f : Tensor::empty(shape, dt);
    if (dt == DType::I32) {
      for (int64_t i = 0; i < h.numel(); ++i) h.at<int32_t>(i) = int32_t((i * 7 + seed) % 10);
    } else if (dt == DType::BF16) {
      ops::cast(*hs, f, h);
      hs->synchronize();
    }
    return Both{h, to_device(*cs, h, gpu)};
  };
  const auto output = [&](const Shape& shape, DType dt = DType::BF16) {
    Both b{Tensor::empty(shape, dt), Tensor::empty(shape, dt, gpu)};
    std::memset(b.cpu.raw_data(), 0xFF, b.cpu.nbytes());  // NaN in bf16 and f32
    SP_CUDA_CHECK(cudaMemset(b.gpu.raw_data(), 0xFF, b.gpu.nbytes()));
    SP_CUDA_CHECK(cudaDeviceSynchronize());  // the legacy stream's fill, before cs writes
    return b;
  };
  // The values of a tensor of either device as f32 (the GPU's copied back first).
  const auto values = [&](const Tensor& t) {
    hs->synchronize();
    const Tensor h = t.device().is_cpu() ? t : test::to_host(*cs, t);
    if (h.dtype() == DType::F32) return host_values(h);
    Tensor f = Tensor::empty(h.shape(), DType::F32);
    ops::cast(*hs, h, f);
    hs->synchronize();
    return host_values(f);
  };
  const auto same_bits = [&](const Both& b, const char* what) {
    hs->synchronize();
    const Tensor g = test::to_host(*cs, b.gpu);
    EXPECT_EQ(0, std::memcmp(g.raw_data(), b.cpu.raw_data(), b.cpu.nbytes())) << what;
  };
  const auto close = [&](const Both& b, const char* what, double tol = 2e-2) {
    const std::vector<float> g = values(b.gpu), c = values(b.cpu);
    EXPECT_TRUE(std::none_of(g.begin(), g.end(), [](float v) { return std::isnan(v); })) << what << ": NaN left";
    EXPECT_LE(rel_error(g, to_double(c)), tol) << what;
  };

  // Max pooling 3x3 / 2, pad 1, with overlapping windows; global average pooling; the option-A
  // shortcut 4 -> 8 channels at stride 2; the linear layer as Linear runs it under bf16 (bf16
  // input, weight copy and output gradient, fp32 bias and parameter gradients); softmax
  // cross-entropy with label smoothing.
  const Both px = input({3, 9, 9, 8}, 1800), pdy = input({3, 5, 5, 8}, 1801);
  const Both py = output({3, 5, 5, 8}), pdx = output({3, 9, 9, 8});
  const Both ax = input({3, 4, 4, 16}, 1802), ady = input({3, 16}, 1803);
  const Both ay = output({3, 16}), adx = output({3, 4, 4, 16});
  const Both sx = input({2, 8, 8, 4}, 1804), sdy = input({2, 4, 4, 8}, 1805);
  const Both sy = output({2, 4, 4, 8}), sdx = output({2, 8, 8, 4});
  const Both lx = input({5, 20}, 1806), lw = input({10, 20}, 1807), lb = input({10}, 1808, DType::F32);
  const Both ldy = input({5, 10}, 1809);
  const Both ly = output({5, 10}), ldx = output({5, 20}), ldw = output({10, 20}, DType::F32);
  const Both ldb = output({10}, DType::F32);
  const Both logits = input({6, 10}, 1810), labels = input({6}, 1811, DType::I32);
  const Both loss = output({1}, DType::F32), dlogits = output({6, 10}), hits = output({1}, DType::I32);
  for (const bool on_gpu : {false, true}) {
    Stream& s = on_gpu ? *cs : *hs;
    const auto at = [on_gpu](const Both& b) { return on_gpu ? b.gpu : b.cpu; };
    ops::maxpool2d_forward(s, at(px), at(py), 3, 2, 1);
    ops::maxpool2d_backward(s, at(px), at(pdy), at(pdx), 3, 2, 1);
    ops::global_avgpool_forward(s, at(ax), at(ay));
    ops::global_avgpool_backward(s, at(ady), at(adx));
    ops::shortcut_a_forward(s, at(sx), at(sy), 2);
    ops::shortcut_a_backward(s, at(sdy), at(sdx), 2);
    ops::linear_forward(s, at(lx), at(lw), at(lb), at(ly));
    ops::linear_backward(s, at(lx), at(lw), at(ldy), at(ldx), at(ldw), at(ldb));
    ops::softmax_cross_entropy(s, at(logits), at(labels), 0.1f, at(loss), at(dlogits), at(hits));
  }
  sync_and_check();
  same_bits(py, "maxpool2d_forward");
  close(pdx, "maxpool2d_backward");
  close(ay, "global_avgpool_forward");
  close(adx, "global_avgpool_backward");
  same_bits(sy, "shortcut_a_forward");
  same_bits(sdx, "shortcut_a_backward");
  close(ly, "linear_forward");
  close(ldx, "linear_backward dx");
  close(ldw, "linear_backward dw", kTol);  // fp32 outputs from the same widened inputs
  close(ldb, "linear_backward db", kTol);
  close(loss, "softmax_cross_entropy loss", kTol);
  close(dlogits, "softmax_cross_entropy dlogits");
  same_bits(hits, "softmax_cross_entropy correct");
}

}  // namespace

#endif  // STALEPROP_WITH_CUDA
