// The staleprop command line.
//
//   staleprop demo   trains a tiny convolutional network on synthetic data with the engine's
//                    ops on a CPU stream and prints its falling loss (a smoke test of the
//                    whole stack that needs no data set)
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/ops.h"
#include "kernels/common/error.h"
#include "kernels/cpu/parallel.h"

namespace {

const char* kUsage = R"(usage: staleprop <command> [options]

commands:
  demo      train a tiny CNN on synthetic data on the CPU and print the loss
  help      show this text

staleprop demo [--steps N] [--batch B] [--lr LR] [--seed S]
  --steps N   optimisation steps (default 60)
  --batch B   images per step (default 64)
  --lr LR     SGD learning rate, momentum 0.9 (default 0.05)
  --seed S    seed of the data and the initial weights (default 1)

Threads: $STALEPROP_NUM_THREADS (default: all cores).
)";

struct DemoOptions {
  int steps = 60, batch = 64;
  float lr = 0.05f;
  uint64_t seed = 1;
};

int parse_int(const char* flag, const char* v) {
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  SP_CHECK(end && *end == 0 && x > 0, flag, " expects a positive integer, got '", v, "'");
  return int(x);
}

float parse_float(const char* flag, const char* v) {
  char* end = nullptr;
  const float x = std::strtof(v, &end);
  SP_CHECK(end && *end == 0 && x > 0, flag, " expects a positive number, got '", v, "'");
  return x;
}

// A synthetic 10-class problem: each class is a fixed random 8x8x3 pattern; samples are the
// pattern plus Gaussian noise, so a small CNN can learn it in a few dozen steps.
struct SyntheticData {
  static constexpr int kH = 8, kW = 8, kC = 3, kClasses = 10;
  std::vector<float> prototypes;
  std::mt19937_64 rng;
  explicit SyntheticData(uint64_t seed) : prototypes(kClasses * kH * kW * kC), rng(seed) {
    std::normal_distribution<float> n(0.f, 1.f);
    for (float& p : prototypes) p = n(rng);
  }
  void batch(sp::Tensor& x, sp::Tensor& labels) {
    std::normal_distribution<float> noise(0.f, 1.0f);
    std::uniform_int_distribution<int> cls(0, kClasses - 1);
    const int64_t n = x.size(0), per = kH * kW * kC;
    for (int64_t i = 0; i < n; ++i) {
      const int c = cls(rng);
      labels.at<int32_t>(i) = c;
      for (int64_t j = 0; j < per; ++j) x.at<float>(i * per + j) = prototypes[size_t(c * per + j)] + noise(rng);
    }
  }
};

struct Param {
  sp::Tensor value, grad, momentum;
};

Param make_param(const sp::Shape& shape, float stddev, float constant, std::mt19937_64& rng) {
  using sp::DType;
  using sp::Tensor;
  Param p{Tensor::empty(shape, DType::F32), Tensor::empty(shape, DType::F32), Tensor::empty(shape, DType::F32)};
  std::normal_distribution<float> n(0.f, stddev);
  for (int64_t i = 0; i < p.value.numel(); ++i) {
    p.value.at<float>(i) = stddev > 0 ? n(rng) : constant;
    p.momentum.at<float>(i) = 0.f;
  }
  return p;
}

int run_demo(const DemoOptions& o) {
  using namespace sp;
  const Device cpu = Device::cpu();
  auto s = make_stream(cpu);
  std::mt19937_64 rng(o.seed);
  SyntheticData data(o.seed + 1);
  const int B = o.batch, H = SyntheticData::kH, W = SyntheticData::kW, C = SyntheticData::kC, K1 = 16, K2 = 32;
  const int classes = SyntheticData::kClasses;

  // conv3x3(3->16) -> BN -> ReLU -> conv3x3 stride 2 (16->32) -> ReLU -> global avg pool -> linear(32->10)
  Param w1 = make_param({K1, 3, 3, C}, std::sqrt(2.f / (9 * C)), 0, rng);
  Param g1 = make_param({K1}, 0, 1.f, rng), b1 = make_param({K1}, 0, 0.f, rng);
  Param w2 = make_param({K2, 3, 3, K1}, std::sqrt(2.f / (9 * K1)), 0, rng);
  Param wl = make_param({classes, K2}, std::sqrt(1.f / K2), 0, rng), bl = make_param({classes}, 0, 0.f, rng);
  std::vector<Param*> params = {&w1, &g1, &b1, &w2, &wl, &bl};
  Tensor rmean = Tensor::empty({K1}, DType::F32), rvar = Tensor::empty({K1}, DType::F32);
  ops::fill(*s, rmean, 0.f);
  ops::fill(*s, rvar, 1.f);

  Tensor x = Tensor::empty({B, H, W, C}, DType::F32), labels = Tensor::empty({B}, DType::I32);
  Tensor a1 = Tensor::empty({B, H, W, K1}, DType::F32), n1 = Tensor::empty({B, H, W, K1}, DType::F32);
  Tensor r1 = Tensor::empty({B, H, W, K1}, DType::F32), smean = Tensor::empty({K1}, DType::F32);
  Tensor sinv = Tensor::empty({K1}, DType::F32);
  Tensor a2 = Tensor::empty({B, H / 2, W / 2, K2}, DType::F32), r2 = Tensor::empty({B, H / 2, W / 2, K2}, DType::F32);
  Tensor pooled = Tensor::empty({B, K2}, DType::F32), logits = Tensor::empty({B, classes}, DType::F32);
  Tensor loss = Tensor::empty({1}, DType::F32), correct = Tensor::empty({1}, DType::I32);
  Tensor dlogits = Tensor::empty({B, classes}, DType::F32), dpooled = Tensor::empty({B, K2}, DType::F32);
  Tensor dr2 = Tensor::empty(r2.shape(), DType::F32), dr1 = Tensor::empty(r1.shape(), DType::F32);
  Tensor dn1 = Tensor::empty(n1.shape(), DType::F32), da1 = Tensor::empty(a1.shape(), DType::F32);

  kernels::SgdParams sgd;
  sgd.lr = o.lr;
  sgd.momentum = 0.9f;
  sgd.weight_decay = 5e-4f;
  std::vector<Tensor> pv, pg, pm;
  for (Param* p : params) pv.push_back(p->value), pg.push_back(p->grad), pm.push_back(p->momentum);

  std::printf("staleprop demo: synthetic %d-class 8x8x3 data, batch %d, %d steps, %d CPU threads\n", classes, B,
              o.steps, kernels::cpu::num_threads());
  const auto t0 = std::chrono::steady_clock::now();
  double first = 0, last = 0;
  for (int step = 1; step <= o.steps; ++step) {
    s->synchronize();  // the host refills x and labels
    data.batch(x, labels);
    ops::conv2d_forward(*s, x, w1.value, Tensor(), a1, 1, 1);
    ops::batchnorm_forward_training(*s, a1, g1.value, b1.value, rmean, rvar, n1, smean, sinv, 1e-5f, 0.1f);
    ops::relu_forward(*s, n1, r1);
    ops::conv2d_forward(*s, r1, w2.value, Tensor(), a2, 2, 1);
    ops::relu_forward(*s, a2, r2);
    ops::global_avgpool_forward(*s, r2, pooled);
    ops::linear_forward(*s, pooled, wl.value, bl.value, logits);
    ops::softmax_cross_entropy(*s, logits, labels, 0.f, loss, dlogits, correct);
    ops::linear_backward(*s, pooled, wl.value, dlogits, dpooled, wl.grad, bl.grad);
    ops::global_avgpool_backward(*s, dpooled, dr2);
    ops::relu_backward(*s, r2, dr2, dr2);
    ops::conv2d_backward_weight(*s, r1, dr2, w2.grad, Tensor(), 2, 1);
    ops::conv2d_backward_data(*s, dr2, w2.value, dr1, 2, 1);
    ops::relu_backward(*s, r1, dr1, dn1);
    ops::batchnorm_backward(*s, a1, dn1, g1.value, smean, sinv, da1, g1.grad, b1.grad);
    ops::conv2d_backward_weight(*s, x, da1, w1.grad, Tensor(), 1, 1);
    ops::sgd_step(*s, pv, pg, pm, sgd);
    s->synchronize();
    const double l = loss.at<float>(0);
    if (!std::isfinite(l)) throw Error("demo: loss became " + std::to_string(l));
    if (step == 1) first = l;
    last = l;
    if (step == 1 || step % 10 == 0 || step == o.steps)
      std::printf("step %4d  loss %.4f  batch accuracy %5.1f%%\n", step, l, 100.0 * correct.at<int32_t>(0) / B);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("loss %.4f -> %.4f in %.1f s (%.0f images/s)\n", first, last, secs, o.steps * double(B) / secs);
  return 0;
}

int demo_main(int argc, char** argv) {
  DemoOptions o;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      SP_CHECK(i + 1 < argc, a, " needs a value");
      return argv[++i];
    };
    if (a == "--steps") o.steps = parse_int("--steps", value());
    else if (a == "--batch") o.batch = parse_int("--batch", value());
    else if (a == "--lr") o.lr = parse_float("--lr", value());
    else if (a == "--seed") o.seed = uint64_t(parse_int("--seed", value()));
    else if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else {
      throw sp::Error("demo: unknown option '" + a + "' (see staleprop help)");
    }
  }
  return run_demo(o);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2 || !std::strcmp(argv[1], "help") || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
      std::fputs(kUsage, stdout);
      return argc < 2 ? 2 : 0;
    }
    const std::string cmd = argv[1];
    if (cmd == "demo") return demo_main(argc - 2, argv + 2);
    std::fprintf(stderr, "staleprop: unknown command '%s'\n\n%s", cmd.c_str(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "staleprop: error: %s\n", e.what());
    return 1;
  }
}
