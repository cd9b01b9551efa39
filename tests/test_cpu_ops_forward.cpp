// Forward CPU ops against small cases computed by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/cpu/ops.h"
#include "tests/gradcheck.h"

namespace {

namespace cpu = sp::kernels::cpu;
using sp::kernels::Conv2dShape;
using sp::kernels::Pool2dShape;
using sp::kernels::SgdParams;
using sp::kernels::ShortcutAShape;
using sp::testing::expect_all_near;

// 4x4 single-channel image x[i][j] = 4i + j + 1 (1..16 row-major).
std::vector<double> ramp_4x4() {
  std::vector<double> x(16);
  for (int i = 0; i < 16; ++i) x[i] = i + 1;
  return x;
}

// Filter [[1, 2, 0], [0, 1, 0], [0, 0, -1]]: y[p][q] = x[p][q] + 2 x[p][q+1] + x[p+1][q+1] - x[p+2][q+2].
const std::vector<double> kFilter3x3 = {1, 2, 0, 0, 1, 0, 0, 0, -1};

TEST(CpuConvForward, SingleChannel3x3NoPadding) {
  // With x[i][j] = 4i + j + 1 the filter gives 3 (4p + q) + (1 + 4 + 6 - 11) = 12p + 3q.
  Conv2dShape sh;
  sh.h = sh.w = 4;
  sh.r = sh.s = 3;
  const std::vector<double> x = ramp_4x4(), bias = {0.5};
  std::vector<double> y(sh.y_size());
  ASSERT_EQ(y.size(), 4u);
  cpu::conv2d_forward(sh, x.data(), kFilter3x3.data(), bias.data(), y.data());
  expect_all_near(y, std::vector<double>{0.5, 3.5, 12.5, 15.5}, 0, 1e-12, "y");
}

TEST(CpuConvForward, SingleChannel3x3Stride2Pad1) {
  // Window origins (2p - 1, 2q - 1):
  //   (0,0): 0 + 0 + x[0][0] - x[1][1] = 1 - 6 = -5     (0,1): 0 + 0 + x[0][2] - x[1][3] = 3 - 8 = -5
  //   (1,0): 0 + 2*5 + x[2][0] - x[3][1] = 10 + 9 - 14 = 5
  //   (1,1): x[1][1] + 2 x[1][2] + x[2][2] - x[3][3] = 6 + 14 + 11 - 16 = 15
  Conv2dShape sh;
  sh.h = sh.w = 4;
  sh.r = sh.s = 3;
  sh.stride = 2;
  sh.pad = 1;
  const std::vector<double> x = ramp_4x4();
  std::vector<double> y(sh.y_size());
  ASSERT_EQ(y.size(), 4u);
  cpu::conv2d_forward<double>(sh, x.data(), kFilter3x3.data(), nullptr, y.data());
  expect_all_near(y, std::vector<double>{-5, -5, 5, 15}, 0, 1e-12, "y");
}

TEST(CpuConvForward, TapOrderIsRSC) {
  // One 1x2 filter over two channels, weights stored [r0s0c0, r0s0c1, r0s1c0, r0s1c1].
  Conv2dShape sh;
  sh.h = 1;
  sh.w = 2;
  sh.c = 2;
  sh.s = 2;
  const std::vector<float> x = {1, 2, 3, 4}, w = {1, 10, 100, 1000};
  float y = 0;
  cpu::conv2d_forward<float>(sh, x.data(), w.data(), nullptr, &y);
  EXPECT_EQ(y, 1 * 1 + 2 * 10 + 3 * 100 + 4 * 1000);
}

TEST(CpuConvForward, PointwiseChannelMixing) {
  // 1x1 stride-1 convolution (the no-im2col path): y[pixel, k] = sum_c x[pixel, c] w[k, c] + b[k].
  Conv2dShape sh;
  sh.h = 2;
  sh.c = 2;
  sh.k = 2;
  const std::vector<float> x = {1, 2, 3, 4}, w = {1, 10, 100, 1000}, b = {0.5f, -0.5f};
  std::vector<float> y(sh.y_size());
  cpu::conv2d_forward<float>(sh, x.data(), w.data(), b.data(), y.data());
  expect_all_near(y, std::vector<float>{21.5f, 2099.5f, 43.5f, 4299.5f}, 0, 0, "y");
}

TEST(CpuBatchNorm, TrainingForwardOnKnownBatch) {
  // Channel 0: {1, 2, 3, 4}: mean 2.5, biased var 1.25, unbiased var 5/3.
  // Channel 1: {2, -2, 2, -2}: mean 0, biased var 4, unbiased var 16/3.
  const std::vector<double> x = {1, 2, 2, -2, 3, 2, 4, -2};
  const std::vector<double> gamma = {2, 0.5}, beta = {1, -1};
  const double eps = 0.25, momentum = 0.1;
  std::vector<double> rm = {0, 1}, rv = {1, 2}, y(8), mean(2), invstd(2);
  cpu::batchnorm_forward_training<double>(4, 2, x.data(), gamma.data(), beta.data(), eps, momentum, rm.data(),
                                          rv.data(), y.data(), mean.data(), invstd.data());
  const double is0 = 1 / std::sqrt(1.25 + eps), is1 = 1 / std::sqrt(4 + eps);
  expect_all_near(mean, std::vector<double>{2.5, 0}, 1e-14, 1e-14, "save_mean");
  expect_all_near(invstd, std::vector<double>{is0, is1}, 1e-14, 0, "save_invstd");
  expect_all_near(rm, std::vector<double>{0.25, 0.9}, 1e-14, 1e-14, "running_mean");
  expect_all_near(rv, std::vector<double>{0.9 + 0.1 * 5 / 3, 1.8 + 0.1 * 16 / 3}, 1e-14, 0, "running_var");
  std::vector<double> expect(8);
  for (int i = 0; i < 4; ++i) {
    expect[2 * i] = (x[2 * i] - 2.5) * is0 * 2 + 1;
    expect[2 * i + 1] = x[2 * i + 1] * is1 * 0.5 - 1;
  }
  expect_all_near(y, expect, 1e-14, 1e-14, "y");
}

TEST(CpuBatchNorm, SingleRowUsesBiasedVarianceForRunningUpdate) {
  const std::vector<float> x = {3}, gamma = {1}, beta = {0};
  std::vector<float> rm = {1}, rv = {1}, y(1), mean(1), invstd(1);
  cpu::batchnorm_forward_training<float>(1, 1, x.data(), gamma.data(), beta.data(), 1.0f, 0.5f, rm.data(), rv.data(),
                                         y.data(), mean.data(), invstd.data());
  EXPECT_EQ(mean[0], 3.0f);
  EXPECT_EQ(invstd[0], 1.0f);  // 1 / sqrt(0 + eps)
  EXPECT_EQ(rm[0], 2.0f);
  EXPECT_EQ(rv[0], 0.5f);      // 0.5 * 1 + 0.5 * 0
  EXPECT_EQ(y[0], 0.0f);
}

TEST(CpuBatchNorm, InferenceUsesRunningStatistics) {
  const std::vector<double> x = {1, 5, 3, -1}, gamma = {2, 1}, beta = {0.5, 0}, rm = {1, 2}, rv = {3, 15};
  std::vector<double> y(4);
  cpu::batchnorm_forward_inference<double>(2, 2, x.data(), gamma.data(), beta.data(), rm.data(), rv.data(), 1.0,
                                           y.data());
  // invstd = 1/2 and 1/4.
  expect_all_near(y, std::vector<double>{0.5, 0.75, 2.5, -0.75}, 1e-15, 0, "y");
}

TEST(CpuElementwise, ReluAddScale) {
  const std::vector<float> x = {-2, -0.5f, 0, 0.5f, 3}, b = {1, 1, 1, 1, 1};
  std::vector<float> y(5), dx(5);
  cpu::relu_forward<float>(5, x.data(), y.data());
  expect_all_near(y, std::vector<float>{0, 0, 0, 0.5f, 3}, 0, 0, "relu");
  const std::vector<float> dy = {10, 20, 30, 40, 50};
  cpu::relu_backward<float>(5, y.data(), dy.data(), dx.data());
  expect_all_near(dx, std::vector<float>{0, 0, 0, 40, 50}, 0, 0, "relu_backward");
  cpu::add<float>(5, y.data(), b.data(), y.data());
  expect_all_near(y, std::vector<float>{1, 1, 1, 1.5f, 4}, 0, 0, "add");
  cpu::scale<float>(5, -2.0f, y.data(), y.data());
  expect_all_near(y, std::vector<float>{-2, -2, -2, -3, -8}, 0, 0, "scale");
}

TEST(CpuElementwise, ReluPropagatesNaN) {
  const float x = std::numeric_limits<float>::quiet_NaN();
  float y = 0;
  cpu::relu_forward<float>(1, &x, &y);
  EXPECT_TRUE(std::isnan(y));
}

TEST(CpuShortcutA, PadsChannelsAndSubsamples) {
  // 3x3 image, 2 channels -> 4 channels at stride 2: output 2x2, data in channels 1..2.
  ShortcutAShape sh;
  sh.h = sh.w = 3;
  sh.c_in = 2;
  sh.c_out = 4;
  sh.stride = 2;
  std::vector<double> x(sh.x_size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = double(i + 1);  // pixel (i, j), channel c -> 6i + 2j + c + 1
  std::vector<double> y(sh.y_size(), -1);
  ASSERT_EQ(y.size(), 16u);
  cpu::shortcut_a_forward(sh, x.data(), y.data());
  expect_all_near(y, std::vector<double>{0, 1, 2, 0, 0, 5, 6, 0, 0, 13, 14, 0, 0, 17, 18, 0}, 0, 0, "y");

  std::vector<double> dy(sh.y_size()), dx(sh.x_size(), -1);
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = double(i + 1);
  cpu::shortcut_a_backward(sh, dy.data(), dx.data());
  // Only pixels (0,0), (0,2), (2,0), (2,2) were sampled; they get dy channels 1..2.
  expect_all_near(dx, std::vector<double>{2, 3, 0, 0, 6, 7, 0, 0, 0, 0, 0, 0, 10, 11, 0, 0, 14, 15}, 0, 0, "dx");
}

TEST(CpuShortcutA, OddPaddingPutsTheExtraChannelOnTop) {
  // c_in 1 -> c_out 4: pad_lo = 1, so channels 2 and 3 are zero.
  ShortcutAShape sh;
  sh.c_out = 4;
  const float x = 7;
  std::vector<float> y(4, -1);
  cpu::shortcut_a_forward(sh, &x, y.data());
  expect_all_near(y, std::vector<float>{0, 7, 0, 0}, 0, 0, "y");
}

TEST(CpuMaxPool, TiesRouteToTheFirstMaximum) {
  // One 2x2 window over a constant image: the gradient goes to the top-left element only.
  Pool2dShape sh;
  sh.h = sh.w = 2;
  sh.c = 2;
  const std::vector<float> x = {5, 1, 5, 2, 5, 2, 5, 0};  // channel 1 ties between pixels 1 and 2
  std::vector<float> y(2), dx(8, -1);
  cpu::maxpool2d_forward(sh, x.data(), y.data());
  expect_all_near(y, std::vector<float>{5, 2}, 0, 0, "y");
  const std::vector<float> dy = {3, 4};
  cpu::maxpool2d_backward(sh, x.data(), dy.data(), dx.data());
  expect_all_near(dx, std::vector<float>{3, 0, 0, 4, 0, 0, 0, 0}, 0, 0, "dx");
}

TEST(CpuMaxPool, PaddingActsAsMinusInfinity) {
  // 3x3 window, stride 2, pad 1 over a 3x3 all-negative image: outputs are 2x2 and never 0.
  Pool2dShape sh;
  sh.h = sh.w = 3;
  sh.window = 3;
  sh.stride = 2;
  sh.pad = 1;
  const std::vector<double> x = {-9, -8, -7, -6, -5, -4, -3, -2, -1};
  std::vector<double> y(sh.y_size());
  ASSERT_EQ(y.size(), 4u);
  cpu::maxpool2d_forward(sh, x.data(), y.data());
  expect_all_near(y, std::vector<double>{-5, -4, -2, -1}, 0, 0, "y");
  // Overlapping windows: x[1][1] = -5 is the maximum of the first window only; x[2][2] of the last.
  const std::vector<double> dy = {1, 2, 3, 4};
  std::vector<double> dx(9, -1);
  cpu::maxpool2d_backward(sh, x.data(), dy.data(), dx.data());
  expect_all_near(dx, std::vector<double>{0, 0, 0, 0, 1, 2, 0, 3, 4}, 0, 0, "dx");
}

TEST(CpuGlobalAvgPool, MeanOverPixels) {
  const std::vector<double> x = {1, 10, 2, 20, 6, 60};  // n 1, hw 3, c 2
  std::vector<double> y(2), dx(6);
  cpu::global_avgpool_forward<double>(1, 3, 2, x.data(), y.data());
  expect_all_near(y, std::vector<double>{3, 30}, 1e-15, 0, "y");
  const std::vector<double> dy = {3, 6};
  cpu::global_avgpool_backward<double>(1, 3, 2, dy.data(), dx.data());
  expect_all_near(dx, std::vector<double>{1, 2, 1, 2, 1, 2}, 1e-15, 0, "dx");
}

TEST(CpuLinear, ForwardWithAndWithoutBias) {
  const std::vector<float> x = {1, 2, 3, -1, 0, 1}, w = {1, 0, 2, 0, 1, -1}, b = {10, 20};  // n 2, in 3, out 2
  std::vector<float> y(4);
  cpu::linear_forward<float>(2, 3, 2, x.data(), w.data(), b.data(), y.data());
  expect_all_near(y, std::vector<float>{17, 19, 11, 19}, 0, 0, "y");
  cpu::linear_forward<float>(2, 3, 2, x.data(), w.data(), nullptr, y.data());
  expect_all_near(y, std::vector<float>{7, -1, 1, -1}, 0, 0, "y (no bias)");
}

// Sample 0: equal logits (p = 1/3 each), label 1; argmax is the first maximum, class 0: wrong.
// Sample 1: logits {0, ln 2, ln 5} (p = {1, 2, 5} / 8), label 2: right.
struct CeCase {
  std::vector<double> logits = {0, 0, 0, 0, std::log(2.0), std::log(5.0)};
  std::vector<int32_t> labels = {1, 2};
  std::vector<double> p = {1.0 / 3, 1.0 / 3, 1.0 / 3, 1.0 / 8, 2.0 / 8, 5.0 / 8};
};

TEST(CpuSoftmaxCrossEntropy, WithoutSmoothing) {
  CeCase c;
  double loss = 0;
  int64_t correct = -1;
  std::vector<double> dlogits(6);
  cpu::softmax_cross_entropy<double>(2, 3, c.logits.data(), c.labels.data(), 0.0, &loss, dlogits.data(), &correct);
  EXPECT_NEAR(loss, (std::log(3.0) - std::log(5.0 / 8)) / 2, 1e-15);
  EXPECT_EQ(correct, 1);
  std::vector<double> expect = c.p;
  expect[1] -= 1;
  expect[5] -= 1;
  for (double& v : expect) v /= 2;
  expect_all_near(dlogits, expect, 1e-14, 1e-16, "dlogits");
}

TEST(CpuSoftmaxCrossEntropy, WithSmoothing) {
  // eps 0.3 over 3 classes: q = 0.1 everywhere plus 0.7 on the label.
  CeCase c;
  double loss = 0;
  int64_t correct = -1;
  std::vector<double> dlogits(6);
  cpu::softmax_cross_entropy<double>(2, 3, c.logits.data(), c.labels.data(), 0.3, &loss, dlogits.data(), &correct);
  std::vector<double> q = {0.1, 0.8, 0.1, 0.1, 0.1, 0.8};
  double expect_loss = 0;
  for (int j = 0; j < 6; ++j) expect_loss -= q[j] * std::log(c.p[j]) / 2;
  EXPECT_NEAR(loss, expect_loss, 1e-14);
  EXPECT_EQ(correct, 1);
  std::vector<double> expect(6);
  for (int j = 0; j < 6; ++j) expect[j] = (c.p[j] - q[j]) / 2;
  expect_all_near(dlogits, expect, 1e-14, 1e-16, "dlogits");
}

TEST(CpuSoftmaxCrossEntropy, StableForHugeLogits) {
  const std::vector<float> logits = {1e4f, 0, -1e4f};
  const int32_t label = 0;
  float loss = -1;
  int64_t correct = 0;
  std::vector<float> dlogits(3);
  cpu::softmax_cross_entropy<float>(1, 3, logits.data(), &label, 0.0f, &loss, dlogits.data(), &correct);
  EXPECT_EQ(loss, 0.0f);
  EXPECT_EQ(correct, 1);
  for (float g : dlogits) EXPECT_TRUE(std::isfinite(g));
}

TEST(CpuSoftmaxCrossEntropy, LabelOutOfRangeThrows) {
  const std::vector<float> logits(6, 0.0f);
  std::vector<float> dlogits(6);
  float loss = 0;
  int64_t correct = 0;
  for (int32_t bad : {-1, 3}) {
    const std::vector<int32_t> labels = {0, bad};
    EXPECT_THROW(cpu::softmax_cross_entropy<float>(2, 3, logits.data(), labels.data(), 0.1f, &loss, dlogits.data(),
                                                   &correct),
                 sp::Error)
        << "label " << bad;
  }
}

// Powers of two keep every intermediate exact in float and double, so results compare with ==.
// lr 1/8, momentum 1/2, weight decay 1/4, grad scale 2; p starts at 1, grads 0.5 then 0.25.
SgdParams sgd_params(float momentum, bool nesterov) {
  SgdParams p;
  p.lr = 0.125f;
  p.momentum = momentum;
  p.weight_decay = 0.25f;
  p.nesterov = nesterov;
  p.grad_scale = 2.0f;
  return p;
}

template <typename T>
std::vector<T> run_two_sgd_steps(const SgdParams& params, bool with_momentum_buffer) {
  // Two tensors in one call: the second starts at p = 2 with zero gradients (only decay acts).
  std::vector<T> p = {1, 2}, v = {0, 0};
  T grads[2][2] = {{T(0.5), 0}, {T(0.25), 0}};
  for (auto& g : grads) {
    std::vector<cpu::SgdTensor<T>> tensors = {
        {&p[0], &g[0], with_momentum_buffer ? &v[0] : nullptr, 1},
        {&p[1], &g[1], with_momentum_buffer ? &v[1] : nullptr, 1},
    };
    cpu::sgd_step(tensors, params);
  }
  return p;
}

TEST(CpuSgd, MomentumTwoSteps) {
  // Step 1: g = 2*0.5 + 0.25*1 = 1.25, v = 1.25, p = 1 - 0.125*1.25 = 0.84375.
  // Step 2: g = 2*0.25 + 0.25*0.84375 = 0.7109375, v = 0.5*1.25 + g = 1.3359375,
  //         p = 0.84375 - 0.125*1.3359375 = 0.6767578125.
  // Tensor 2: g = 0.5, v = 0.5, p = 1.9375; g = 0.25*1.9375 = 0.484375, v = 0.734375, p = 1.845703125.
  const SgdParams params = sgd_params(0.5f, false);
  EXPECT_EQ(run_two_sgd_steps<double>(params, true), (std::vector<double>{0.6767578125, 1.845703125}));
  EXPECT_EQ(run_two_sgd_steps<float>(params, true), (std::vector<float>{0.6767578125f, 1.845703125f}));
}

TEST(CpuSgd, NesterovTwoSteps) {
  // Step 1: g = 1.25, v = 1.25, p = 1 - 0.125*(1.25 + 0.5*1.25) = 0.765625.
  // Step 2: g = 0.5 + 0.25*0.765625 = 0.69140625, v = 0.625 + g = 1.31640625,
  //         p = 0.765625 - 0.125*(0.69140625 + 0.658203125) = 0.596923828125.
  // Tensor 2: g = 0.5, v = 0.5, p = 2 - 0.125*0.75 = 1.90625;
  //           g = 0.4765625, v = 0.7265625, p = 1.90625 - 0.125*0.83984375 = 1.80126953125.
  const SgdParams params = sgd_params(0.5f, true);
  EXPECT_EQ(run_two_sgd_steps<double>(params, true), (std::vector<double>{0.596923828125, 1.80126953125}));
  EXPECT_EQ(run_two_sgd_steps<float>(params, true), (std::vector<float>{0.596923828125f, 1.80126953125f}));
}

TEST(CpuSgd, ZeroMomentumNeedsNoBuffer) {
  // Step 1: p = 1 - 0.125*1.25 = 0.84375; step 2: p = 0.84375 - 0.125*0.7109375 = 0.7548828125.
  // Tensor 2: p = 2 - 0.125*0.5 = 1.9375, then 1.9375 - 0.125*0.484375 = 1.876953125.
  const SgdParams params = sgd_params(0.0f, false);
  EXPECT_EQ(run_two_sgd_steps<double>(params, false), (std::vector<double>{0.7548828125, 1.876953125}));
}

TEST(CpuSgd, WritesTheBf16CopyOfTheUpdatedParam) {
  // Random values over many magnitudes and a size that splits over parallel_for chunks: the
  // copy is exactly f32_to_bf16 of the updated param, and a tensor without one is updated alike.
  const int64_t n = 40000;
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> p(n), g(n), v(n);
  for (int64_t i = 0; i < n; ++i)
    p[i] = dist(rng) * std::ldexp(1.f, int(i % 40) - 20), g[i] = dist(rng), v[i] = dist(rng);
  std::vector<float> p2 = p, v2 = v;
  std::vector<uint16_t> copy(size_t(n), 0x7fc0);
  SgdParams params = sgd_params(0.9f, true);
  params.lr = 0.1f, params.weight_decay = 5e-4f;
  cpu::SgdTensor<float> with{p.data(), g.data(), v.data(), n, copy.data()};
  cpu::SgdTensor<float> without{p2.data(), g.data(), v2.data(), n};
  cpu::sgd_step<float>({with, without}, params);
  EXPECT_EQ(p, p2);
  EXPECT_EQ(v, v2);
  std::vector<uint16_t> want(static_cast<size_t>(n));
  cpu::f32_to_bf16(n, p.data(), want.data());
  EXPECT_EQ(copy, want);
  // Only float parameters have one.
  std::vector<double> pd = {1.0}, gd = {1.0}, vd = {0.0};
  uint16_t one = 0;
  EXPECT_THROW(cpu::sgd_step<double>({{pd.data(), gd.data(), vd.data(), 1, &one}}, params), sp::Error);
}

uint16_t to_bf16(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  uint16_t out = 0;
  cpu::f32_to_bf16(1, &f, &out);
  return out;
}

TEST(CpuBf16, RoundsToNearestEven) {
  EXPECT_EQ(to_bf16(0x3f800000u), 0x3f80);  // 1.0
  EXPECT_EQ(to_bf16(0x3f808000u), 0x3f80);  // tie, even neighbour below
  EXPECT_EQ(to_bf16(0x3f818000u), 0x3f82);  // tie, even neighbour above
  EXPECT_EQ(to_bf16(0x3f808001u), 0x3f81);  // just above the tie
  EXPECT_EQ(to_bf16(0x3f807fffu), 0x3f80);  // just below the tie
  EXPECT_EQ(to_bf16(0xbf818000u), 0xbf82);  // sign is independent of rounding
  EXPECT_EQ(to_bf16(0x3fffffffu), 0x4000);  // carry into the exponent
  EXPECT_EQ(to_bf16(0x7f7fffffu), 0x7f80);  // largest float rounds to infinity
  EXPECT_EQ(to_bf16(0x7f800000u), 0x7f80);  // +inf
  EXPECT_EQ(to_bf16(0xff800000u), 0xff80);  // -inf
  EXPECT_EQ(to_bf16(0x80000000u), 0x8000);  // -0
  EXPECT_EQ(to_bf16(0x00000001u), 0x0000);  // smallest denormal rounds to zero
}

TEST(CpuBf16, NaNStaysQuietNaN) {
  for (uint32_t nan : {0x7fc00000u, 0xffc00001u, 0x7f800001u, 0x7f80ffffu}) {
    const uint16_t b = to_bf16(nan);
    EXPECT_EQ(b & 0x7f80, 0x7f80) << std::hex << nan;
    EXPECT_NE(b & 0x0040, 0) << std::hex << nan;  // quiet bit set, so never infinity
    EXPECT_EQ(b & 0x8000, int((nan >> 16) & 0x8000)) << std::hex << nan;
  }
}

TEST(CpuBf16, WidensExactly) {
  const std::vector<uint16_t> x = {0x3f81, 0xc000, 0x7f80, 0x0000};
  std::vector<float> y(4);
  cpu::bf16_to_f32(4, x.data(), y.data());
  EXPECT_EQ(y[0], 1.0078125f);
  EXPECT_EQ(y[1], -2.0f);
  EXPECT_EQ(y[2], std::numeric_limits<float>::infinity());
  EXPECT_EQ(y[3], 0.0f);
  // Round trip of every bf16 value that is not NaN.
  std::vector<uint16_t> all(65536), back(65536);
  for (uint32_t i = 0; i < 65536; ++i) all[i] = uint16_t(i);
  std::vector<float> wide(65536);
  cpu::bf16_to_f32(65536, all.data(), wide.data());
  cpu::f32_to_bf16(65536, wide.data(), back.data());
  for (uint32_t i = 0; i < 65536; ++i) {
    if (std::isnan(wide[i])) continue;
    ASSERT_EQ(back[i], all[i]) << std::hex << i;
  }
}

}  // namespace
