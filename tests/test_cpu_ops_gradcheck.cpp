// Backward CPU ops against central finite differences of their forward ops, in double.
//
// For an op y = f(x) and a fixed random dy, the scalar L(x) = sum(dy * f(x)) has gradient
// dL/dx = (df/dx)^T dy, which is exactly what the backward op returns given dy. Each test also
// runs the float instantiation of the op and compares it with the double one, loosely, so the
// float path the engine uses is exercised on the same shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cpu/ops.h"
#include "tests/gradcheck.h"

namespace {

namespace cpu = sp::kernels::cpu;
using sp::kernels::Conv2dShape;
using sp::kernels::Pool2dShape;
using sp::kernels::ShortcutAShape;
using sp::testing::dot;
using sp::testing::expect_all_near;
using sp::testing::expect_gradient_matches;
using sp::testing::random_uniform;
using sp::testing::to_float;

// Float against double: float rounding in sums of a few dozen O(1) terms.
constexpr double kFloatRtol = 1e-4, kFloatAtol = 1e-5;

// ---- Convolution -------------------------------------------------------------------------

// Direct evaluation of the convolution sum, independent of im2col: calls
// fn(y index, x index, w index) for every product that does not touch the padding.
template <typename Fn>
void for_each_conv_term(const Conv2dShape& sh, const Fn& fn) {
  for (int n = 0; n < sh.n; ++n)
    for (int p = 0; p < sh.p(); ++p)
      for (int q = 0; q < sh.q(); ++q)
        for (int k = 0; k < sh.k; ++k)
          for (int r = 0; r < sh.r; ++r)
            for (int s = 0; s < sh.s; ++s) {
              const int ih = p * sh.stride - sh.pad + r, iw = q * sh.stride - sh.pad + s;
              if (ih < 0 || ih >= sh.h || iw < 0 || iw >= sh.w) continue;
              const int64_t yi = ((int64_t(n) * sh.p() + p) * sh.q() + q) * sh.k + k;
              const int64_t xi = ((int64_t(n) * sh.h + ih) * sh.w + iw) * sh.c;
              const int64_t wi = ((int64_t(k) * sh.r + r) * sh.s + s) * sh.c;
              for (int c = 0; c < sh.c; ++c) fn(yi, xi + c, wi + c);
            }
}

std::vector<double> direct_conv(const Conv2dShape& sh, const std::vector<double>& x, const std::vector<double>& w) {
  std::vector<double> y(sh.y_size(), 0.0);
  for_each_conv_term(sh, [&](int64_t yi, int64_t xi, int64_t wi) { y[yi] += x[xi] * w[wi]; });
  return y;
}

struct ConvCase {
  int n, h, w, c, k, r, s, stride, pad;
  Conv2dShape shape() const {
    Conv2dShape sh;
    sh.n = n, sh.h = h, sh.w = w, sh.c = c, sh.k = k, sh.r = r, sh.s = s, sh.stride = stride, sh.pad = pad;
    return sh;
  }
};
std::ostream& operator<<(std::ostream& os, const ConvCase& c) {
  return os << "n" << c.n << " " << c.h << "x" << c.w << "x" << c.c << " k" << c.k << " " << c.r << "x" << c.s
            << " stride " << c.stride << " pad " << c.pad;
}

class CpuConvGrad : public ::testing::TestWithParam<ConvCase> {};

TEST_P(CpuConvGrad, MatchesFiniteDifferences) {
  const Conv2dShape sh = GetParam().shape();
  ASSERT_TRUE(sh.valid());
  std::vector<double> x = random_uniform(sh.x_size(), -1, 1, 1), w = random_uniform(sh.w_size(), -1, 1, 2),
                      b = random_uniform(sh.k, -1, 1, 3);
  const std::vector<double> dy = random_uniform(sh.y_size(), -1, 1, 4);

  std::vector<double> y(sh.y_size());
  cpu::conv2d_forward(sh, x.data(), w.data(), b.data(), y.data());
  std::vector<double> expect_y = direct_conv(sh, x, w);
  for (size_t i = 0; i < expect_y.size(); ++i) expect_y[i] += b[i % sh.k];
  expect_all_near(y, expect_y, 1e-12, 1e-12, "y vs direct");

  std::vector<double> dx(sh.x_size()), dw(sh.w_size()), db(sh.k);
  cpu::conv2d_backward_data(sh, dy.data(), w.data(), dx.data());
  cpu::conv2d_backward_weight(sh, x.data(), dy.data(), dw.data(), db.data());
  auto loss = [&] {
    std::vector<double> out(sh.y_size());
    cpu::conv2d_forward(sh, x.data(), w.data(), b.data(), out.data());
    return dot(dy, out);
  };
  expect_gradient_matches(dx, x, loss, "dx");
  expect_gradient_matches(dw, w, loss, "dw");
  expect_gradient_matches(db, b, loss, "dbias");

  // Without a bias the weight gradient is unchanged.
  std::vector<double> dw_only(sh.w_size());
  cpu::conv2d_backward_weight<double>(sh, x.data(), dy.data(), dw_only.data(), nullptr);
  expect_all_near(dw_only, dw, 0, 0, "dw without dbias");

  const std::vector<float> xf = to_float(x), wf = to_float(w), bf = to_float(b), dyf = to_float(dy);
  std::vector<float> yf(sh.y_size()), dxf(sh.x_size()), dwf(sh.w_size()), dbf(sh.k);
  cpu::conv2d_forward(sh, xf.data(), wf.data(), bf.data(), yf.data());
  cpu::conv2d_backward_data(sh, dyf.data(), wf.data(), dxf.data());
  cpu::conv2d_backward_weight(sh, xf.data(), dyf.data(), dwf.data(), dbf.data());
  expect_all_near(yf, y, kFloatRtol, kFloatAtol, "float y");
  expect_all_near(dxf, dx, kFloatRtol, kFloatAtol, "float dx");
  expect_all_near(dwf, dw, kFloatRtol, kFloatAtol, "float dw");
  expect_all_near(dbf, db, kFloatRtol, kFloatAtol, "float dbias");

  // With beta the data gradient is added to beta * dx: with beta 1, the bits of the gradient
  // then an add (a residual block's accumulation); with another beta, dgrad + beta * dx.
  const std::vector<float> before = to_float(random_uniform(sh.x_size(), -1, 1, 8));
  std::vector<float> added(sh.x_size()), summed = before, scaled = before;
  cpu::add<float>(sh.x_size(), dxf.data(), before.data(), added.data());
  cpu::conv2d_backward_data(sh, dyf.data(), wf.data(), summed.data(), 1.f);
  EXPECT_EQ(summed, added) << "beta 1";
  cpu::conv2d_backward_data(sh, dyf.data(), wf.data(), scaled.data(), -0.5f);
  std::vector<float> want(sh.x_size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = dxf[i] + -0.5f * before[i];
  EXPECT_EQ(scaled, want) << "beta -0.5";
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuConvGrad,
                         ::testing::Values(ConvCase{2, 5, 5, 3, 4, 3, 3, 1, 1},     // 3x3 same padding
                                           ConvCase{1, 7, 6, 3, 10, 3, 3, 2, 1},    // batch 1, stride 2, odd size
                                           ConvCase{2, 5, 7, 3, 10, 3, 3, 2, 0},    // stride 2 without padding
                                           ConvCase{3, 4, 5, 10, 3, 1, 1, 1, 0},    // 1x1: the no-im2col path
                                           ConvCase{2, 5, 5, 3, 10, 1, 1, 2, 0},    // 1x1 stride 2 (projection)
                                           ConvCase{1, 6, 5, 2, 3, 3, 2, 1, 1},     // non-square filter
                                           ConvCase{2, 3, 3, 4, 5, 3, 3, 1, 2},     // padding wider than needed
                                           ConvCase{2, 6, 5, 3, 4, 3, 3, 1, 0},     // stride 1 unpadded: P < H
                                           ConvCase{2, 4, 4, 3, 5, 1, 1, 1, 1}));  // 1x1 padded: no longer pointwise

// Shapes large enough that the column buffer is split over several chunks of images, checked
// against the direct sums rather than finite differences. In double, one image's columns take
// ~5.9 MB: two images per chunk, then a remainder of one. 80 input channels to 2 split the
// forward's and the weight gradient's columns (R*S*C per pixel; the weight gradient transposed,
// K <= 32); 2 to 80 the stride-1 data gradient's (R*S*K per input pixel); 80 to 40 the weight
// gradient as dy^T * col accumulated over the chunks.
class CpuConvChunks : public ::testing::TestWithParam<std::pair<int, int>> {};

void expect_direct_sums(const Conv2dShape& sh) {
  const std::vector<double> x = random_uniform(sh.x_size(), -1, 1, 5), w = random_uniform(sh.w_size(), -1, 1, 6),
                            dy = random_uniform(sh.y_size(), -1, 1, 7);
  std::vector<double> expect_dx(sh.x_size(), 0.0), expect_dw(sh.w_size(), 0.0);
  for_each_conv_term(sh, [&](int64_t yi, int64_t xi, int64_t wi) {
    expect_dx[xi] += dy[yi] * w[wi];
    expect_dw[wi] += dy[yi] * x[xi];
  });

  std::vector<double> y(sh.y_size()), dx(sh.x_size()), dw(sh.w_size());
  cpu::conv2d_forward<double>(sh, x.data(), w.data(), nullptr, y.data());
  cpu::conv2d_backward_data(sh, dy.data(), w.data(), dx.data());
  cpu::conv2d_backward_weight<double>(sh, x.data(), dy.data(), dw.data(), nullptr);
  expect_all_near(y, direct_conv(sh, x, w), 1e-12, 1e-12, "y");
  expect_all_near(dx, expect_dx, 1e-12, 1e-12, "dx");
  expect_all_near(dw, expect_dw, 1e-12, 1e-10, "dw");
}

TEST_P(CpuConvChunks, ManyChunksMatchDirectSums) {
  Conv2dShape sh;
  sh.n = 5, sh.h = sh.w = 32, sh.c = GetParam().first, sh.k = GetParam().second, sh.r = sh.s = 3, sh.pad = 1;
  expect_direct_sums(sh);
}

// Stride-1 convolutions with at most 32 input channels run from padded frames instead of
// columns (conv.cpp: conv_framed, wgrad_framed), and so does the stride-1 data gradient with at
// most 32 output channels. In double a 96 x 96 image of 16 + 32 channels takes a 3.7 MB frame:
// four images per chunk, then a remainder of one, for the forward, the data gradient and the
// (transposed) weight gradient alike; with 16 + 48 channels, 4.9 MB: three, then two, for the
// forward and the weight gradient as dy^T * frame (more than 32 outputs).
class CpuConvFramed : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(CpuConvFramed, ChunksOfFramesMatchDirectSums) {
  Conv2dShape sh;
  sh.n = 5, sh.h = sh.w = 96, sh.c = GetParam().first, sh.k = GetParam().second, sh.r = sh.s = 3, sh.pad = 1;
  expect_direct_sums(sh);
}

INSTANTIATE_TEST_SUITE_P(Channels, CpuConvFramed,
                         ::testing::Values(std::pair<int, int>{16, 32}, std::pair<int, int>{16, 48}));

INSTANTIATE_TEST_SUITE_P(Channels, CpuConvChunks,
                         ::testing::Values(std::pair<int, int>{80, 2}, std::pair<int, int>{2, 80},
                                           std::pair<int, int>{80, 40}));  // more than 32 outputs: dy^T * col

// ---- Batch normalisation -----------------------------------------------------------------

struct BnCase {
  int64_t m, c;
};
std::ostream& operator<<(std::ostream& os, const BnCase& b) { return os << "m" << b.m << " c" << b.c; }

class CpuBatchNormGrad : public ::testing::TestWithParam<BnCase> {};

TEST_P(CpuBatchNormGrad, MatchesFiniteDifferences) {
  const int64_t m = GetParam().m, c = GetParam().c;
  std::vector<double> x = random_uniform(m * c, -2, 3, 11), gamma = random_uniform(c, 0.5, 2, 12),
                      beta = random_uniform(c, -1, 1, 13);
  const std::vector<double> dy = random_uniform(m * c, -1, 1, 14);
  const double eps = 1e-3, momentum = 0.1;

  // Runs the training forward on scratch running statistics (the loss must not depend on them).
  auto forward = [&](std::vector<double>& y, std::vector<double>& mean, std::vector<double>& invstd) {
    std::vector<double> rm(c, 0.0), rv(c, 1.0);
    cpu::batchnorm_forward_training(m, c, x.data(), gamma.data(), beta.data(), eps, momentum, rm.data(), rv.data(),
                                    y.data(), mean.data(), invstd.data());
  };
  std::vector<double> y(m * c), mean(c), invstd(c);
  forward(y, mean, invstd);
  std::vector<double> dx(m * c), dgamma(c), dbeta(c);
  cpu::batchnorm_backward(m, c, x.data(), dy.data(), gamma.data(), mean.data(), invstd.data(), dx.data(),
                          dgamma.data(), dbeta.data());
  auto loss = [&] {
    std::vector<double> out(m * c), mu(c), is(c);
    forward(out, mu, is);
    return dot(dy, out);
  };
  expect_gradient_matches(dx, x, loss, "dx");
  expect_gradient_matches(dgamma, gamma, loss, "dgamma");
  expect_gradient_matches(dbeta, beta, loss, "dbeta");

  const std::vector<float> xf = to_float(x), gf = to_float(gamma), bf = to_float(beta), dyf = to_float(dy);
  std::vector<float> rm(c, 0.0f), rv(c, 1.0f), yf(m * c), meanf(c), invstdf(c), dxf(m * c), dgf(c), dbf(c);
  cpu::batchnorm_forward_training(m, c, xf.data(), gf.data(), bf.data(), float(eps), float(momentum), rm.data(),
                                  rv.data(), yf.data(), meanf.data(), invstdf.data());
  cpu::batchnorm_backward(m, c, xf.data(), dyf.data(), gf.data(), meanf.data(), invstdf.data(), dxf.data(),
                          dgf.data(), dbf.data());
  expect_all_near(yf, y, kFloatRtol, kFloatAtol, "float y");
  expect_all_near(dxf, dx, kFloatRtol, kFloatAtol, "float dx");
  expect_all_near(dgf, dgamma, kFloatRtol, kFloatAtol, "float dgamma");
  expect_all_near(dbf, dbeta, kFloatRtol, kFloatAtol, "float dbeta");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuBatchNormGrad,
                         ::testing::Values(BnCase{7, 3}, BnCase{12, 10}, BnCase{2, 1}, BnCase{1, 3}));

// Fused y = relu(bn(x) + residual) (and BN+ReLU without a residual) against finite
// differences, for x, residual, gamma and beta.
class CpuBatchNormAddReluGrad : public ::testing::TestWithParam<std::tuple<BnCase, bool>> {};

TEST_P(CpuBatchNormAddReluGrad, MatchesFiniteDifferences) {
  const int64_t m = std::get<0>(GetParam()).m, c = std::get<0>(GetParam()).c;
  const bool with_residual = std::get<1>(GetParam());
  std::vector<double> x = random_uniform(m * c, -2, 3, 31), gamma = random_uniform(c, 0.5, 2, 32),
                      beta = random_uniform(c, -1, 1, 33), residual = random_uniform(m * c, -1, 1, 34);
  const std::vector<double> dy = random_uniform(m * c, -1, 1, 35);
  const double eps = 1e-3, momentum = 0.1;
  const double* res = with_residual ? residual.data() : nullptr;

  auto forward = [&](std::vector<double>& y, std::vector<double>& mean, std::vector<double>& invstd) {
    std::vector<double> rm(c, 0.0), rv(c, 1.0);
    cpu::batchnorm_add_relu_forward_training(m, c, x.data(), res, gamma.data(), beta.data(), eps, momentum, rm.data(),
                                             rv.data(), y.data(), mean.data(), invstd.data());
  };
  std::vector<double> y(m * c), mean(c), invstd(c);
  forward(y, mean, invstd);
  int active = 0;
  for (double v : y) active += v > 0;
  ASSERT_GT(active, 0);
  ASSERT_LT(active, m * c) << "the ReLU must cut somewhere for the test to mean anything";

  std::vector<double> dx(m * c), dres(m * c), dgamma(c), dbeta(c);
  cpu::batchnorm_add_relu_backward(m, c, x.data(), y.data(), dy.data(), gamma.data(), mean.data(), invstd.data(),
                                   dx.data(), dres.data(), dgamma.data(), dbeta.data());
  auto loss = [&] {
    std::vector<double> out(m * c), mu(c), is(c);
    forward(out, mu, is);
    return dot(dy, out);
  };
  expect_gradient_matches(dx, x, loss, "dx");
  expect_gradient_matches(dgamma, gamma, loss, "dgamma");
  expect_gradient_matches(dbeta, beta, loss, "dbeta");
  if (with_residual) expect_gradient_matches(dres, residual, loss, "dresidual");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuBatchNormAddReluGrad,
                         ::testing::Combine(::testing::Values(BnCase{7, 3}, BnCase{12, 10}, BnCase{5, 1}),
                                            ::testing::Bool()));

// In float, the fused ops are bit-identical to the composition they replace (batchnorm,
// add, relu forward; relu backward, batchnorm backward), including dresidual written over dy.
TEST(CpuBatchNormAddRelu, BitIdenticalToTheComposedOps) {
  const int64_t m = 300, c = 24;
  const std::vector<float> x = to_float(random_uniform(m * c, -2, 3, 41)), gamma = to_float(random_uniform(c, 0.5, 2, 42)),
                           beta = to_float(random_uniform(c, -1, 1, 43)),
                           residual = to_float(random_uniform(m * c, -1, 1, 44)),
                           dy = to_float(random_uniform(m * c, -1, 1, 45));
  for (const bool with_residual : {false, true}) {
    SCOPED_TRACE(with_residual ? "BN+add+ReLU" : "BN+ReLU");
    // Composed.
    std::vector<float> rm1(c, 0.f), rv1(c, 1.f), y1(m * c), mean1(c), invstd1(c);
    cpu::batchnorm_forward_training(m, c, x.data(), gamma.data(), beta.data(), 1e-5f, 0.1f, rm1.data(), rv1.data(),
                                    y1.data(), mean1.data(), invstd1.data());
    if (with_residual) cpu::add(m * c, y1.data(), residual.data(), y1.data());
    cpu::relu_forward(m * c, y1.data(), y1.data());
    std::vector<float> g1 = dy, dx1(m * c), dg1(c), db1(c);
    cpu::relu_backward(m * c, y1.data(), g1.data(), g1.data());
    cpu::batchnorm_backward(m, c, x.data(), g1.data(), gamma.data(), mean1.data(), invstd1.data(), dx1.data(),
                            dg1.data(), db1.data());
    // Fused.
    std::vector<float> rm2(c, 0.f), rv2(c, 1.f), y2(m * c), mean2(c), invstd2(c);
    cpu::batchnorm_add_relu_forward_training(m, c, x.data(), with_residual ? residual.data() : nullptr, gamma.data(),
                                             beta.data(), 1e-5f, 0.1f, rm2.data(), rv2.data(), y2.data(), mean2.data(),
                                             invstd2.data());
    std::vector<float> g2 = dy, dx2(m * c), dg2(c), db2(c);
    cpu::batchnorm_add_relu_backward(m, c, x.data(), y2.data(), g2.data(), gamma.data(), mean2.data(), invstd2.data(),
                                     dx2.data(), g2.data(), dg2.data(), db2.data());
    EXPECT_EQ(y2, y1);
    EXPECT_EQ(rm2, rm1);
    EXPECT_EQ(rv2, rv1);
    EXPECT_EQ(g2, g1) << "dresidual";
    EXPECT_EQ(dx2, dx1);
    EXPECT_EQ(dg2, dg1);
    EXPECT_EQ(db2, db1);

    // Inference forward, with and without the ReLU.
    std::vector<float> yi1(m * c), yi2(m * c);
    cpu::batchnorm_forward_inference(m, c, x.data(), gamma.data(), beta.data(), rm1.data(), rv1.data(), 1e-5f,
                                     yi1.data());
    if (with_residual) cpu::add(m * c, yi1.data(), residual.data(), yi1.data());
    std::vector<float> yi3(m * c);
    cpu::batchnorm_add_relu_forward_inference(m, c, x.data(), with_residual ? residual.data() : nullptr, gamma.data(),
                                              beta.data(), rm1.data(), rv1.data(), 1e-5f, false, yi3.data());
    EXPECT_EQ(yi3, yi1) << "without the ReLU";
    cpu::relu_forward(m * c, yi1.data(), yi1.data());
    cpu::batchnorm_add_relu_forward_inference(m, c, x.data(), with_residual ? residual.data() : nullptr, gamma.data(),
                                              beta.data(), rm1.data(), rv1.data(), 1e-5f, true, yi2.data());
    EXPECT_EQ(yi2, yi1);
    EXPECT_NE(yi3, yi2) << "the ReLU clipped nothing";
  }
}

// The fused backward's mask is relu_backward's to the bit, special values included: dy where
// y > 0 (its NaN payload and infinities too), +0 where y <= 0 or y is NaN, whatever dy is there.
TEST(CpuBatchNormAddRelu, TheMaskIsReluBackwardBitForBit) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const std::vector<float> y = {1.f, -1.f, 0.f, -0.f, nan, 2.f, 3.f, -2.f, 1e-40f, -1e-40f, inf, -inf};
  const std::vector<float> dy = {nan, nan, inf, -inf, 5.f, -inf, -0.f, -0.f, 7.f, nan, nan, 3.f};
  const int64_t m = int64_t(y.size()), c = 1;
  const std::vector<float> x(y.size(), 0.5f), gamma = {1.f}, mean = {0.f}, invstd = {1.f};
  const size_t n = y.size();
  std::vector<float> dx(n), dres(n), dgamma(1), dbeta(1), want(n);
  cpu::batchnorm_add_relu_backward(m, c, x.data(), y.data(), dy.data(), gamma.data(), mean.data(), invstd.data(),
                                   dx.data(), dres.data(), dgamma.data(), dbeta.data());
  cpu::relu_backward(m, y.data(), dy.data(), want.data());
  for (int64_t i = 0; i < m; ++i) {
    uint32_t got_bits, want_bits;
    std::memcpy(&got_bits, &dres[size_t(i)], 4);
    std::memcpy(&want_bits, &want[size_t(i)], 4);
    EXPECT_EQ(got_bits, want_bits) << "element " << i << ": y " << y[size_t(i)] << ", dy " << dy[size_t(i)];
  }
}

// Enough rows for several reduction blocks; the statistics are compared with plain sums.
TEST(CpuBatchNormLarge, StatisticsOverManyBlocks) {
  const int64_t m = 9000, c = 16;
  const std::vector<double> x = random_uniform(m * c, 5, 7, 15), gamma(c, 1.0), beta(c, 0.0);
  std::vector<double> rm(c, 0.0), rv(c, 0.0), y(m * c), mean(c), invstd(c);
  cpu::batchnorm_forward_training(m, c, x.data(), gamma.data(), beta.data(), 0.0, 1.0, rm.data(), rv.data(), y.data(),
                                  mean.data(), invstd.data());
  std::vector<double> expect_mean(c, 0.0), expect_var(c, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < c; ++j) expect_mean[j] += x[i * c + j] / m;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < c; ++j) expect_var[j] += (x[i * c + j] - expect_mean[j]) * (x[i * c + j] - expect_mean[j]);
  std::vector<double> expect_invstd(c), expect_unbiased(c);
  for (int64_t j = 0; j < c; ++j) {
    expect_invstd[j] = 1 / std::sqrt(expect_var[j] / m);
    expect_unbiased[j] = expect_var[j] / (m - 1);
  }
  expect_all_near(mean, expect_mean, 1e-12, 0, "mean");
  expect_all_near(rm, expect_mean, 1e-12, 0, "running_mean (momentum 1)");
  expect_all_near(invstd, expect_invstd, 1e-10, 0, "invstd");
  expect_all_near(rv, expect_unbiased, 1e-10, 0, "running_var (momentum 1)");

  // Float statistics of data with |mean| >> std: the two-pass variance must stay accurate.
  const std::vector<float> xf = to_float(x), gf = to_float(gamma), bf = to_float(beta);
  std::vector<float> rmf(c, 0.0f), rvf(c, 0.0f), yf(m * c), meanf(c), invstdf(c);
  cpu::batchnorm_forward_training(m, c, xf.data(), gf.data(), bf.data(), 0.0f, 1.0f, rmf.data(), rvf.data(), yf.data(),
                                  meanf.data(), invstdf.data());
  expect_all_near(invstdf, invstd, 1e-5, 0, "float invstd");
  expect_all_near(yf, y, kFloatRtol, 1e-4, "float y");
}

// ---- Elementwise and shortcut ------------------------------------------------------------

TEST(CpuReluGrad, MatchesFiniteDifferences) {
  const int64_t n = 37;
  std::vector<double> x = sp::testing::random_away_from_zero(n, 0.1, 2, 21);
  const std::vector<double> dy = random_uniform(n, -1, 1, 22);
  std::vector<double> y(n), dx(n);
  cpu::relu_forward(n, x.data(), y.data());
  cpu::relu_backward(n, y.data(), dy.data(), dx.data());
  auto loss = [&] {
    std::vector<double> out(n);
    cpu::relu_forward(n, x.data(), out.data());
    return dot(dy, out);
  };
  expect_gradient_matches(dx, x, loss, "dx");

  // In-place backward (dx aliases dy), as the engine uses it.
  std::vector<double> inplace = dy;
  cpu::relu_backward(n, y.data(), inplace.data(), inplace.data());
  expect_all_near(inplace, dx, 0, 0, "in-place dx");

  const std::vector<float> xf = to_float(x);
  std::vector<float> yf(n);
  cpu::relu_forward(n, xf.data(), yf.data());
  expect_all_near(yf, y, 1e-7, 0, "float y");
}

struct ShortcutCase {
  int n, h, w, c_in, c_out, stride;
};
std::ostream& operator<<(std::ostream& os, const ShortcutCase& s) {
  return os << "n" << s.n << " " << s.h << "x" << s.w << " " << s.c_in << "->" << s.c_out << " stride " << s.stride;
}

class CpuShortcutAGrad : public ::testing::TestWithParam<ShortcutCase> {};

TEST_P(CpuShortcutAGrad, MatchesFiniteDifferences) {
  const ShortcutCase p = GetParam();
  ShortcutAShape sh;
  sh.n = p.n, sh.h = p.h, sh.w = p.w, sh.c_in = p.c_in, sh.c_out = p.c_out, sh.stride = p.stride;
  std::vector<double> x = random_uniform(sh.x_size(), -1, 1, 31);
  const std::vector<double> dy = random_uniform(sh.y_size(), -1, 1, 32);
  std::vector<double> dx(sh.x_size());
  cpu::shortcut_a_backward(sh, dy.data(), dx.data());
  std::vector<double> y(sh.y_size());
  auto loss = [&] {
    cpu::shortcut_a_forward(sh, x.data(), y.data());
    return dot(dy, y);
  };
  expect_gradient_matches(dx, x, loss, "dx");

  const std::vector<float> xf = to_float(x);
  std::vector<float> yf(sh.y_size());
  cpu::shortcut_a_forward(sh, xf.data(), yf.data());
  cpu::shortcut_a_forward(sh, x.data(), y.data());
  expect_all_near(yf, y, 1e-7, 0, "float y");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuShortcutAGrad,
                         ::testing::Values(ShortcutCase{2, 5, 5, 3, 6, 2},   // odd size, CIFAR-style doubling
                                           ShortcutCase{1, 4, 3, 3, 3, 1},   // identity
                                           ShortcutCase{2, 3, 4, 2, 5, 2}));  // odd channel padding

// ---- Pooling -----------------------------------------------------------------------------

struct PoolCase {
  int n, h, w, c, window, stride, pad;
};
std::ostream& operator<<(std::ostream& os, const PoolCase& p) {
  return os << "n" << p.n << " " << p.h << "x" << p.w << "x" << p.c << " window " << p.window << " stride "
            << p.stride << " pad " << p.pad;
}

class CpuMaxPoolGrad : public ::testing::TestWithParam<PoolCase> {};

TEST_P(CpuMaxPoolGrad, MatchesFiniteDifferences) {
  const PoolCase p = GetParam();
  Pool2dShape sh;
  sh.n = p.n, sh.h = p.h, sh.w = p.w, sh.c = p.c, sh.window = p.window, sh.stride = p.stride, sh.pad = p.pad;
  ASSERT_TRUE(sh.valid());
  // Distinct values 0.01 apart: no ties, so the maximum cannot switch within a step.
  std::vector<double> x = sp::testing::random_distinct(sh.x_size(), 0.01, 41);
  const std::vector<double> dy = random_uniform(sh.y_size(), -1, 1, 42);
  std::vector<double> dx(sh.x_size()), y(sh.y_size());
  cpu::maxpool2d_backward(sh, x.data(), dy.data(), dx.data());
  auto loss = [&] {
    cpu::maxpool2d_forward(sh, x.data(), y.data());
    return dot(dy, y);
  };
  expect_gradient_matches(dx, x, loss, "dx");

  const std::vector<float> xf = to_float(x), dyf = to_float(dy);
  std::vector<float> yf(sh.y_size()), dxf(sh.x_size());
  cpu::maxpool2d_forward(sh, xf.data(), yf.data());
  cpu::maxpool2d_backward(sh, xf.data(), dyf.data(), dxf.data());
  cpu::maxpool2d_forward(sh, x.data(), y.data());
  expect_all_near(yf, y, 1e-7, 0, "float y");
  expect_all_near(dxf, dx, kFloatRtol, kFloatAtol, "float dx");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuMaxPoolGrad,
                         ::testing::Values(PoolCase{2, 5, 5, 3, 2, 2, 0},   // odd size drops the last row
                                           PoolCase{1, 7, 6, 3, 3, 2, 1},   // overlapping, padded
                                           PoolCase{2, 4, 4, 2, 3, 1, 1}));  // stride 1, heavy overlap

TEST(CpuGlobalAvgPoolGrad, MatchesFiniteDifferences) {
  for (const auto& shape : {std::tuple<int64_t, int64_t, int64_t>{3, 5, 4}, {1, 1, 10}, {2, 49, 3}}) {
    const int64_t n = std::get<0>(shape), hw = std::get<1>(shape), c = std::get<2>(shape);
    SCOPED_TRACE(::testing::Message() << "n " << n << " hw " << hw << " c " << c);
    std::vector<double> x = random_uniform(n * hw * c, -1, 1, 51);
    const std::vector<double> dy = random_uniform(n * c, -1, 1, 52);
    std::vector<double> dx(n * hw * c), y(n * c);
    cpu::global_avgpool_backward(n, hw, c, dy.data(), dx.data());
    auto loss = [&] {
      cpu::global_avgpool_forward(n, hw, c, x.data(), y.data());
      return dot(dy, y);
    };
    expect_gradient_matches(dx, x, loss, "dx");

    const std::vector<float> xf = to_float(x);
    std::vector<float> yf(n * c);
    cpu::global_avgpool_forward(n, hw, c, xf.data(), yf.data());
    cpu::global_avgpool_forward(n, hw, c, x.data(), y.data());
    expect_all_near(yf, y, kFloatRtol, kFloatAtol, "float y");
  }
}

// ---- Linear ------------------------------------------------------------------------------

TEST(CpuLinearGrad, MatchesFiniteDifferences) {
  for (const auto& shape : {std::tuple<int64_t, int64_t, int64_t>{5, 7, 10}, {1, 3, 1}, {4, 64, 10}}) {
    const int64_t n = std::get<0>(shape), in = std::get<1>(shape), out = std::get<2>(shape);
    SCOPED_TRACE(::testing::Message() << "n " << n << " in " << in << " out " << out);
    std::vector<double> x = random_uniform(n * in, -1, 1, 61), w = random_uniform(out * in, -1, 1, 62),
                        b = random_uniform(out, -1, 1, 63);
    const std::vector<double> dy = random_uniform(n * out, -1, 1, 64);
    std::vector<double> dx(n * in), dw(out * in), db(out), y(n * out);
    cpu::linear_backward(n, in, out, x.data(), w.data(), dy.data(), dx.data(), dw.data(), db.data());
    auto loss = [&] {
      cpu::linear_forward(n, in, out, x.data(), w.data(), b.data(), y.data());
      return dot(dy, y);
    };
    expect_gradient_matches(dx, x, loss, "dx");
    expect_gradient_matches(dw, w, loss, "dw");
    expect_gradient_matches(db, b, loss, "db");

    // Each output may be skipped independently.
    std::vector<double> dw_only(out * in);
    cpu::linear_backward<double>(n, in, out, x.data(), w.data(), dy.data(), nullptr, dw_only.data(), nullptr);
    expect_all_near(dw_only, dw, 0, 0, "dw alone");
    std::vector<double> dx_only(n * in), db_only(out);
    cpu::linear_backward<double>(n, in, out, x.data(), w.data(), dy.data(), dx_only.data(), nullptr, nullptr);
    expect_all_near(dx_only, dx, 0, 0, "dx alone");
    cpu::linear_backward<double>(n, in, out, x.data(), w.data(), dy.data(), nullptr, nullptr, db_only.data());
    expect_all_near(db_only, db, 0, 0, "db alone");

    const std::vector<float> xf = to_float(x), wf = to_float(w), bf = to_float(b), dyf = to_float(dy);
    std::vector<float> yf(n * out), dxf(n * in), dwf(out * in), dbf(out);
    cpu::linear_forward(n, in, out, xf.data(), wf.data(), bf.data(), yf.data());
    cpu::linear_backward(n, in, out, xf.data(), wf.data(), dyf.data(), dxf.data(), dwf.data(), dbf.data());
    cpu::linear_forward(n, in, out, x.data(), w.data(), b.data(), y.data());
    expect_all_near(yf, y, kFloatRtol, kFloatAtol, "float y");
    expect_all_near(dxf, dx, kFloatRtol, kFloatAtol, "float dx");
    expect_all_near(dwf, dw, kFloatRtol, kFloatAtol, "float dw");
    expect_all_near(dbf, db, kFloatRtol, kFloatAtol, "float db");
  }
}

// ---- Loss --------------------------------------------------------------------------------

TEST(CpuSoftmaxCrossEntropyGrad, MatchesFiniteDifferences) {
  const int64_t n = 6, classes = 10;
  const std::vector<int32_t> labels = {3, 0, 9, 3, 7, 1};
  for (double smoothing : {0.0, 0.1}) {
    SCOPED_TRACE(::testing::Message() << "smoothing " << smoothing);
    std::vector<double> logits = random_uniform(n * classes, -3, 3, 71);
    std::vector<double> dlogits(n * classes), scratch(n * classes);
    double loss = 0;
    int64_t correct = 0;
    cpu::softmax_cross_entropy(n, classes, logits.data(), labels.data(), smoothing, &loss, dlogits.data(), &correct);
    auto loss_fn = [&] {
      double l = 0;
      int64_t hits = 0;
      cpu::softmax_cross_entropy(n, classes, logits.data(), labels.data(), smoothing, &l, scratch.data(), &hits);
      return l;
    };
    expect_gradient_matches(dlogits, logits, loss_fn, "dlogits");

    const std::vector<float> lf = to_float(logits);
    std::vector<float> dlf(n * classes);
    float lossf = 0;
    int64_t correctf = -1;
    cpu::softmax_cross_entropy(n, classes, lf.data(), labels.data(), float(smoothing), &lossf, dlf.data(), &correctf);
    EXPECT_NEAR(lossf, loss, 1e-5);
    EXPECT_EQ(correctf, correct);
    expect_all_near(dlf, dlogits, kFloatRtol, 1e-7, "float dlogits");
  }
}

}  // namespace
