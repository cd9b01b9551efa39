// CPU reference throughput (fp32), reported per core: the GEMM on square sizes, and the
// convolutions of a CIFAR ResNet-20 (its three 3x3 same-padding shapes at batch 128: forward,
// data gradient, weight gradient), which is where a CPU training step spends its time.
// Each is run once with every GEMM micro-kernel this CPU can run (generic, avx2, avx512: the
// `kernel:` part of the name), in the same run, so their ratios compare like with like.
#include <benchmark/benchmark.h>

#include <random>
#include <string>
#include <vector>

#include "bench/bench_main.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace {

void BM_CpuSgemm(benchmark::State& state, const std::string& kernel) {
  sp::kernels::cpu::set_gemm_kernel(kernel);
  const int64_t n = state.range(0);
  std::vector<float> a(size_t(n * n)), b(size_t(n * n)), c(size_t(n * n));
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto* v : {&a, &b})
    for (float& x : *v) x = u(rng);
  for (auto _ : state) {
    sp::kernels::cpu::gemm<float>(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * double(n) * n * n;
  const int threads = sp::kernels::cpu::num_threads();
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s/core"] =
      benchmark::Counter(flops * 1e-9 / threads, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = threads;
}

// ResNet-20's 3x3 stride-1 convolution with C = K = channels at 32 * 16 / channels pixels,
// batch 128; direction 0 forward, 1 data gradient, 2 weight gradient.
void BM_CpuConvResNet20(benchmark::State& state, const std::string& kernel) {
  sp::kernels::cpu::set_gemm_kernel(kernel);
  const int channels = int(state.range(0)), direction = int(state.range(1));
  sp::kernels::Conv2dShape sh{};
  sh.n = 128, sh.h = sh.w = 32 * 16 / channels, sh.c = sh.k = channels, sh.r = sh.s = 3, sh.stride = 1, sh.pad = 1;
  std::vector<float> x(size_t(sh.x_size())), w(size_t(sh.w_size())), y(size_t(sh.y_size())), dx(x.size()),
      dw(w.size());
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto* v : {&x, &w, &y})
    for (float& e : *v) e = u(rng);
  namespace cpu = sp::kernels::cpu;
  for (auto _ : state) {
    if (direction == 0)
      cpu::conv2d_forward<float>(sh, x.data(), w.data(), nullptr, y.data());
    else if (direction == 1)
      cpu::conv2d_backward_data<float>(sh, y.data(), w.data(), dx.data());
    else
      cpu::conv2d_backward_weight<float>(sh, x.data(), y.data(), dw.data(), nullptr);
    benchmark::ClobberMemory();
  }
  const double flops = sh.flops();
  const int threads = cpu::num_threads();
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s/core"] =
      benchmark::Counter(flops * 1e-9 / threads, benchmark::Counter::kIsIterationInvariantRate);
}
}  // namespace

int main(int argc, char** argv) {
  for (const std::string& kernel : sp::kernels::cpu::gemm_kernels()) {
    benchmark::RegisterBenchmark(("BM_CpuSgemm/kernel:" + kernel).c_str(), BM_CpuSgemm, kernel)
        ->Arg(256)
        ->Arg(512)
        ->Arg(1024)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark(("BM_CpuConvResNet20/kernel:" + kernel).c_str(), BM_CpuConvResNet20, kernel)
        ->ArgNames({"channels", "direction"})
        ->ArgsProduct({{16, 32, 64}, {0, 1, 2}})
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  return sp::bench::benchmark_main(argc, argv);
}
