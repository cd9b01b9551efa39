#include "tools/bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include "engine/allocator.h"
#include "engine/ops.h"
#include "engine/pipeline.h"
#include "engine/trainer.h"
#include "kernels/common/error.h"
#include "layers/layers.h"
#include "layers/resnet.h"
#include "tools/build_info.h"
#include "tools/cifar10.h"
#include "tools/json.h"
#include "tools/train.h"

namespace sp::train {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kPoolBatches = 4;  // distinct synthetic batches, used in turn

// Random N(0, 1) images and uniform labels, resident on the device.
struct SyntheticBatches {
  std::vector<Tensor> images, labels;
  SyntheticBatches(Stream& s, int64_t batch, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_int_distribution<int32_t> label(0, data::kCifarClasses - 1);
    std::vector<Tensor> host;  // kept until the copies have read them (queued work holds none)
    for (int b = 0; b < kPoolBatches; ++b) {
      Tensor x = Tensor::empty({batch, data::kCifarSide, data::kCifarSide, data::kCifarChannels}, DType::F32);
      Tensor y = Tensor::empty({batch}, DType::I32);
      for (int64_t i = 0; i < x.numel(); ++i) x.at<float>(i) = normal(rng);
      for (int64_t i = 0; i < batch; ++i) y.at<int32_t>(i) = label(rng);
      Tensor xd = Tensor::empty(x.shape(), DType::F32, s.device()), yd = Tensor::empty(y.shape(), DType::I32, s.device());
      ops::copy(s, x, xd);
      ops::copy(s, y, yd);
      host.push_back(x);
      host.push_back(y);
      images.push_back(xd);
      labels.push_back(yd);
    }
    s.synchronize();
  }
};

std::string json_num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}

void reset_peaks(const std::vector<Device>& devices) {
  for (const Device d : devices) device_allocator(d).reset_peak();
}

// The peak memory of the timed steps (read before any profiled ones), summed over the devices.
void keep_peak(BenchResult& r, const std::vector<Device>& devices) {
  r.peak_allocated_bytes = r.peak_reserved_bytes = 0;
  r.peak_allocated_by_device.clear();
  for (const Device d : devices) {
    const AllocatorStats mem = device_allocator(d).stats();
    r.peak_allocated_bytes += mem.peak_allocated_bytes;
    r.peak_reserved_bytes += mem.peak_reserved_bytes;
    if (devices.size() > 1) r.peak_allocated_by_device.emplace_back(d.str(), mem.peak_allocated_bytes);
  }
}

// With --profile-ops: runs the profiled steps (run_ms runs them and returns their wall time in
// ms) with every op timed, after the timed steps.
template <class RunMs>
void profile_ops(const BenchConfig& cfg, BenchResult& r, const RunMs& run_ms) {
  if (cfg.profile_ops <= 0) return;
  OpProfile profile;
  r.profiled_wall_ms = run_ms();
  r.op_times = profile.collect();
}

}  // namespace

// ,"profile_steps":N,"profile_wall_ms":W,"op_profile":[{"op":..,"shapes":..,"calls":..,"ms":..},..]
// when ops were profiled, else nothing.
std::string BenchResult::op_profile_json() const {
  if (config.profile_ops <= 0) return "";
  std::string out = ",\"profile_steps\":" + std::to_string(config.profile_ops) +
                    ",\"profile_wall_ms\":" + json_num(profiled_wall_ms) + ",\"op_profile\":[";
  for (size_t i = 0; i < op_times.size(); ++i) {
    const OpTime& t = op_times[i];
    out += std::string(i ? "," : "") + "{\"op\":" + json_str(t.op) + ",\"shapes\":" + json_str(t.shapes) +
           ",\"calls\":" + std::to_string(t.calls) + ",\"ms\":" + json_num(t.ms) + "}";
  }
  return out + "]";
}

std::string BenchResult::json() const {
  const BenchConfig& c = config;
  std::string busy = "[", cut_list = "[";
  for (size_t i = 0; i < busy_pct.size(); ++i) busy += (i ? "," : "") + json_num(busy_pct[i]);
  for (size_t i = 0; i < cuts.size(); ++i) cut_list += (i ? "," : "") + std::to_string(cuts[i]);
  std::string by_device;
  for (const auto& [name, bytes] : peak_allocated_by_device)
    by_device += (by_device.empty() ? ",\"peak_allocated_bytes_by_device\":{" : ",") + json_str(name) + ":" +
                 std::to_string(bytes);
  if (!by_device.empty()) by_device += "}";
  return "{\"build\":" + json_str(build::describe()) + ",\"model\":" + json_str(c.model) +
         ",\"batch_size\":" + std::to_string(c.batch_size) + ",\"method\":" + json_str(c.method) +
         ",\"modules\":" + std::to_string(modules) + ",\"cuts\":" + cut_list +
         "],\"precision\":" + json_str(c.precision) + ",\"kernels\":" + json_str(c.kernels) +
         ",\"mainloop\":" + json_str(mainloop) + ",\"kernel_switches\":" + json_str(switches) +
         ",\"device\":" + json_str(device_name) + ",\"steps\":" + std::to_string(c.steps) +
         ",\"warmup\":" + std::to_string(c.warmup) + ",\"images_per_s\":" + json_num(images_per_s) +
         ",\"ms_per_step\":" + json_num(ms_per_step) +
         ",\"steady_images_per_s\":" + (steady_images_per_s > 0 ? json_num(steady_images_per_s) : "null") +
         ",\"ticks\":" + std::to_string(ticks) + ",\"busy_pct\":" + busy +
         "],\"host_wait_pct\":" + (host_wait_pct < 0 ? "null" : json_num(host_wait_pct)) +
         ",\"peak_allocated_bytes\":" + std::to_string(peak_allocated_bytes) +
         ",\"peak_reserved_bytes\":" + std::to_string(peak_reserved_bytes) + by_device +
         ",\"peak_activation_bytes\":" + std::to_string(peak_activation_bytes) +
         ",\"peak_stash_bytes\":" + std::to_string(peak_stash_bytes) + ",\"shrink\":" + json_num(c.shrink) +
         ",\"recompute\":" + (c.recompute ? "true" : "false") +
         ",\"weight_stash\":" + (c.weight_stash ? "true" : "false") + ",\"graphs\":" + (c.graphs ? "true" : "false") +
         ",\"graph_memory\":" + json_str(c.graphs ? c.graph_memory : "") + ",\"warmup_run\":" + std::to_string(warmup) +
         ",\"units\":" + std::to_string(units) + ",\"replayed_units\":" + std::to_string(replayed_units) +
         op_profile_json() + "}";
}

double steady_rate(double ms, int64_t steps, double short_ms, int64_t short_steps, int64_t batch, int64_t depth) {
  if (short_steps <= depth || steps <= short_steps || !(ms > short_ms)) return 0;
  return double(batch) * double(steps - short_steps) / ((ms - short_ms) / 1e3);
}

void check_bench_counts(const BenchConfig& cfg) {
  SP_CHECK(cfg.batch_size > 0, "--batch-size must be positive, got ", cfg.batch_size);
  SP_CHECK(cfg.steps > 0, "--steps must be positive, got ", cfg.steps);
  SP_CHECK(cfg.warmup >= 0, "--warmup must not be negative, got ", cfg.warmup);
}

BenchResult run_bench(const BenchConfig& cfg) {
  check_bench_counts(cfg);
  check_graph_memory(cfg.graphs, cfg.graph_memory);
  SP_CHECK(cfg.kernels == "custom" || cfg.kernels == "vendor", "--kernels must be custom or vendor, got '",
           cfg.kernels, "'");
  SP_CHECK(cfg.profile_ops >= 0, "--profile-ops must not be negative");
  SP_CHECK(cfg.profile_ops == 0 || !cfg.graphs,
           "--profile-ops times the ops issued one by one, and graph replays issue none: drop --graphs");
  const Device dev = Device::parse(cfg.device);
  require_device(dev);
  // --method backprop is plain backprop over one module: the backprop trainer, or with --graphs the pipeline
  // running bp over one module (graph capture lives there).
  const bool one_module = cfg.method == "backprop";
  const bool backprop = one_module && !cfg.graphs;
  SP_CHECK(cfg.kernels == "custom" || dev.is_cuda(), "--kernels vendor selects cuBLAS/cuDNN and needs --device cuda");
  check_module_devices(dev, cfg.devices);
  SP_CHECK(cfg.devices.size() <= 1 || !one_module, "bench: --devices places the modules of --method bp|ddg|fdg");
  SP_CHECK(!one_module || (cfg.split == 1 && cfg.split_at.empty() && !cfg.recompute && !cfg.weight_stash),
           "bench: --split, --split-at, --recompute and --weight-stash need --method bp|ddg|fdg");
  const DType dt = activation_dtype(cfg.precision);
  const std::string method = cfg.method == "backprop" ? "bp" : cfg.method;
  parse_pipeline_method(method);  // rejects unknown methods
  check_shrink(method, cfg.shrink);
  ops::set_kernel_backend(cfg.kernels == "vendor" ? ops::KernelBackend::Vendor : ops::KernelBackend::Custom);
  if (!cfg.mainloop.empty()) {
    SP_CHECK(dev.is_cuda(), "--mainloop selects the main loop of the bf16 tensor-core kernels and needs --device cuda");
    ops::set_tensor_core_mainloop(cfg.mainloop);
  }

  BenchResult r;
  r.config = cfg;
  r.device_name = device_description(dev);
  r.mainloop = dev.is_cuda() ? ops::tensor_core_mainloop_in_use() : "none";
  // Every switch that changes which kernels run: the tensor-core ones, then the layers' two.
  r.switches = dev.is_cuda()
                   ? ops::tensor_core_switches() + ",bf16_weight_copies=" + (layers::bf16_weight_copies() ? "1" : "0") +
                         ",dgrad_accumulate=" + (layers::dgrad_accumulates() ? "1" : "0")
                   : "none";
  auto s = make_stream(dev);
  Network net = layers::build_resnet(cfg.model, data::kCifarClasses, cfg.seed);
  net.to(dev, *s);
  SyntheticBatches data(*s, cfg.batch_size, cfg.seed + 1);
  const SgdConfig sgd{0.9f, 5e-4f, false};
  const auto lr = [](int64_t) { return 0.01f; };  // small and constant: random labels, stable weights
  const std::vector<Device> mem_devices = devices_in_use(dev, cfg.devices);

  if (backprop) {
    Sgd opt(net.state().params, sgd, *s);
    BackpropTrainer trainer(net, opt, *s, 0.f, dt);
    int64_t step = 0;
    auto run = [&](int64_t n) {
      for (int64_t i = 0; i < n; ++i, ++step)
        trainer.train_step(data.images[size_t(step % kPoolBatches)], data.labels[size_t(step % kPoolBatches)],
                           lr(step));
      trainer.drain_stats();  // waits for the stream
    };
    run(cfg.warmup);
    r.warmup = cfg.warmup;
    reset_peaks(mem_devices);
    const auto t0 = Clock::now();
    run(cfg.steps);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    r.images_per_s = double(cfg.steps * cfg.batch_size) / (ms / 1e3);
    r.steady_images_per_s = r.images_per_s;
    r.ms_per_step = ms / double(cfg.steps);
    keep_peak(r, mem_devices);
    profile_ops(cfg, r, [&] {
      const auto p0 = Clock::now();
      run(cfg.profile_ops);
      return std::chrono::duration<double, std::milli>(Clock::now() - p0).count();
    });
  } else {
    PipelineConfig pc;
    pc.method = parse_pipeline_method(method);
    check_device_count(cfg.devices, cfg.split, cfg.split_at);  // before the cuts are measured
    pc.cuts = choose_cuts(cfg.model, net.size(), int(cfg.split), cfg.split_at,
                          [&] { return measure_block_costs(net, *s, data.images[0], dt); });
    pc.shrink = cfg.shrink;
    pc.recompute = cfg.recompute;
    pc.weight_stash = cfg.weight_stash;
    pc.sgd = sgd;
    pc.activation_dtype = dt;
    pc.graphs = cfg.graphs;
    pc.plan_graph_memory = cfg.graph_memory == "planned";
    for (const std::string& name : cfg.devices) pc.devices.push_back(Device::parse(name));
    PipelineTrainer pipe(net, pc);
    r.modules = pipe.num_modules();
    r.cuts = pc.cuts;
    int64_t next = 0;
    auto epoch = [&](int64_t n) {
      int64_t left = n;
      return pipe.run_epoch(
          [&](Tensor* x, Tensor* y) {
            if (left-- <= 0) return false;
            *x = data.images[size_t(next % kPoolBatches)];
            *y = data.labels[size_t(next++ % kPoolBatches)];
            return true;
          },
          lr);
    };
    // With graphs, every phase of a unit runs eagerly (twice while a planned arena records)
    // and is then captured; a backward waits until the forward of its batch was a graph, d_k
    // ticks earlier, and module k starts up to k ticks late: that many batches make sure all
    // is captured before the timed steps.
    int64_t warmup = cfg.warmup;
    if (cfg.graphs) {
      int most = 0;
      for (int k = 0; k < pipe.num_modules(); ++k) most = std::max(most, pipe.graph_period(k));
      warmup = std::max<int64_t>(warmup, 3 * most + pipe.delay(0) + pipe.num_modules());
    }
    if (warmup > 0) epoch(warmup);
    r.warmup = warmup;
    const PipelineGraphStats before = pipe.graph_stats();
    reset_peaks(mem_devices);
    const PipelineEpochStats st = epoch(cfg.steps);
    const PipelineGraphStats after = pipe.graph_stats();
    r.units = (after.eager + after.captured + after.replays) - (before.eager + before.captured + before.replays);
    r.replayed_units = after.replays - before.replays;
    r.images_per_s = double(st.train.samples) / (st.wall_ms / 1e3);
    r.ms_per_step = st.wall_ms / double(cfg.steps);
    r.ticks = st.ticks;
    for (double b : st.busy_ms) r.busy_pct.push_back(100.0 * b / st.wall_ms);
    r.host_wait_pct = 100.0 * st.host_wait_ms / st.wall_ms;
    r.peak_activation_bytes = st.peak_saved_bytes;
    r.peak_stash_bytes = st.peak_stash_bytes;
    keep_peak(r, mem_devices);
    // Every epoch fills and drains the pipeline once, whatever its length: the difference of two
    // epochs' times is that of their batches in a full pipeline (steady_rate).
    const int64_t short_steps = cfg.steps / 2, depth = pipe.delay(0);
    if (short_steps > depth)
      r.steady_images_per_s =
          steady_rate(st.wall_ms, cfg.steps, epoch(short_steps).wall_ms, short_steps, cfg.batch_size, depth);
    profile_ops(cfg, r, [&] { return epoch(cfg.profile_ops).wall_ms; });
  }
  ops::set_kernel_backend(ops::KernelBackend::Custom);
  return r;
}

}  // namespace sp::train
