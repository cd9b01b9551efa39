// The host side of the data path: how many CIFAR-10 images per second the batch loader prepares
// (random crop with 4-pixel padding, horizontal flip, optional Cutout, normalisation into fp32
// NHWC in pinned memory), against the images per second a GPU trains at. fill_batch is one
// batch on the CPU thread pool; BatchLoader is the producer thread the trainers read from, run
// as fast as a consumer that takes each batch at once (no copy) can drain it.
// On 50,000 random images (the content does not change the work).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "bench/bench_main.h"
#include "kernels/cpu/parallel.h"
#include "tools/cifar10.h"

namespace {

namespace data = sp::data;

const data::Dataset& random_set() {
  static const data::Dataset set = [] {
    data::Dataset d;
    const int64_t n = 50000;
    d.images.resize(size_t(n * data::kCifarImageBytes));
    std::mt19937_64 rng(1);
    for (uint8_t& p : d.images) p = uint8_t(rng());
    for (int64_t i = 0; i < n; ++i) d.labels.push_back(int32_t(i % data::kCifarClasses));
    return d;
  }();
  return set;
}

data::LoaderOptions options(const benchmark::State& state) {
  data::LoaderOptions o;
  o.batch_size = state.range(0);
  o.augment = state.range(1) > 0;
  o.cutout = int(state.range(2));
  o.seed = 3;
  return o;
}

void counters(benchmark::State& state, int64_t images) {
  state.counters["images/s"] = benchmark::Counter(double(images), benchmark::Counter::kIsRate);
  state.counters["threads"] = sp::kernels::cpu::num_threads();
}

void BM_FillBatch(benchmark::State& state) {
  const data::Dataset& d = random_set();
  const data::LoaderOptions o = options(state);
  const std::vector<int64_t> order = data::epoch_order(d.size(), true, o.seed, 0);
  std::vector<float> images(size_t(o.batch_size * data::kCifarImageBytes));
  std::vector<int32_t> labels(size_t(o.batch_size));
  std::vector<int64_t> ids(size_t(o.batch_size));
  const int64_t batches = data::batches_per_epoch(d.size(), o.batch_size, true);
  int64_t index = 0, images_done = 0;
  for (auto _ : state) {
    data::fill_batch(d, order, o, 0, index, images.data(), labels.data(), ids.data());
    benchmark::ClobberMemory();
    images_done += o.batch_size;
    index = (index + 1) % batches;
  }
  counters(state, images_done);
}

void BM_BatchLoader(benchmark::State& state) {
  const data::Dataset& d = random_set();
  data::LoaderOptions o = options(state);
  o.drop_last = true;
  data::BatchLoader loader(d, o);
  int64_t images_done = 0;
  for (auto _ : state) {
    const data::Batch& b = loader.next();
    benchmark::DoNotOptimize(b.images.raw_data());
    images_done += b.images.size(0);
  }
  counters(state, images_done);
}

// Batch size; augmentation (crop and flip) off or on; Cutout side (0: none).
void loader_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "augment", "cutout"});
  for (int64_t batch : {128, 512}) {
    b->Args({batch, 0, 0});
    b->Args({batch, 1, 0});
    b->Args({batch, 1, 16});
  }
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK(BM_FillBatch)->Apply(loader_args);
BENCHMARK(BM_BatchLoader)->Apply(loader_args);

}  // namespace

int main(int argc, char** argv) { return sp::bench::benchmark_main(argc, argv); }
