// CPU reference GEMM throughput (fp32, row-major), reported per core.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace {

void BM_CpuSgemm(benchmark::State& state) {
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
BENCHMARK(BM_CpuSgemm)->Arg(256)->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
