// Training throughput on synthetic data: what `staleprop bench` and `staleprop study` run.
//
// The data are a few random CIFAR-shaped batches resident on the device (the same setting as
// bench/pytorch_baseline.py), so the figure measures the engine, not the loader. A run is
// `warmup` untimed steps, then `steps` timed ones: images/s over the timed steps, the peak
// device memory they reached, and for the decoupled methods each module's busy share of the
// wall time (time its stream spent computing, from device events) and the activation memory
// kept for batches in flight. Optionally, more steps after the timed ones with the device time
// of every op recorded (--profile-ops).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/op_profile.h"

namespace sp::train {

struct BenchConfig {
  std::string model = "resnet20";
  int64_t batch_size = 128;
  int64_t steps = 50;   // timed steps
  int64_t warmup = 10;  // untimed steps before
  std::string device = "cpu";
  // Decoupled methods: one device per module (as `train --devices`), of --device's kind; the
  // network is built and measured on --device. Empty: every module on --device.
  std::vector<std::string> devices;
  std::string precision = "fp32";  // fp32 | bf16
  std::string kernels = "custom";  // custom | vendor
  std::string mainloop;            // auto | mma_sync | wgmma | wgmma_tma (GPU); empty: $STALEPROP_MAINLOOP, else auto
  // "backprop": the one-stream BackpropTrainer; "bp" | "ddg" | "fdg": the PipelineTrainer
  // over `split` modules (or the cuts of `split_at`, as for `staleprop train`).
  std::string method = "backprop";
  int split = 1;
  std::string split_at;
  float shrink = 1.f;
  bool recompute = false;
  bool weight_stash = false;
  // Replay each module's steady-state work from graphs (PipelineConfig::graphs). With method
  // "backprop" this runs the pipeline's bp over one module. The warm-up is lengthened where
  // needed so that every phase is captured before the timed steps.
  bool graphs = false;
  // With graphs: "planned" (arenas laid out from recorded lifetimes) or "bump" (every tensor of a
  // captured unit kept until it runs again); PipelineConfig::plan_graph_memory.
  std::string graph_memory = "planned";
  uint64_t seed = 0;
  // After the timed steps, this many more with every op timed by device events (OpProfile,
  // engine/op_profile.h); 0: none. Not with graphs (replays run no ops one by one).
  int64_t profile_ops = 0;
};

// The images/s of a full pipeline from two epochs of `steps` and `short_steps` batches of
// `batch` images, `ms` and `short_ms` long: each epoch fills and drains the pipeline once, over
// `depth` ticks more than its batches (PipelineTrainer::delay(0)), so the difference of their
// times is that of steps - short_steps batches in a full pipeline. 0 where it cannot be
// measured: the short epoch too short to fill the pipeline (short_steps <= depth), or timing
// noise larger than the difference (not longer than the short epoch).
double steady_rate(double ms, int64_t steps, double short_ms, int64_t short_steps, int64_t batch, int64_t depth);

struct BenchResult {
  BenchConfig config;
  int modules = 1;
  std::vector<size_t> cuts;
  // Over the timed steps: for the decoupled methods an epoch of `steps` batches, its fill and
  // drain included (delay(0) ticks that carry fewer batches than modules: 2(K-1) for fdg).
  double images_per_s = 0, ms_per_step = 0;
  // The rate of a full pipeline: the decoupled methods run a second epoch of steps / 2 batches,
  // and the difference of the two epochs' times cancels the fill and drain each pays
  // (steady_rate); 0 (null in the JSON) where it cannot be measured. Plain backprop has none to
  // cancel: images_per_s.
  double steady_images_per_s = 0;
  int64_t ticks = 0;                   // decoupled methods: ticks of the timed epoch (fill and drain included)
  std::vector<double> busy_pct;        // decoupled methods: per module, busy share of the wall time
  double host_wait_pct = -1;           // decoupled methods: PipelineEpochStats::host_wait_ms's share (-1: none)
  size_t peak_allocated_bytes = 0;     // device memory in the allocator's blocks handed out at the peak of the
                                       // timed steps (whole cached blocks: at least the tensors' bytes)
  size_t peak_reserved_bytes = 0;      // ... and held by the caching allocator (earlier runs' cache included)
  // With --devices: each device's peak (the two above are their sums), in --device, --devices order.
  std::vector<std::pair<std::string, size_t>> peak_allocated_by_device;
  // Decoupled methods: activations kept for batches in flight (PipelineEpochStats::peak_saved_bytes:
  // with --recompute their inputs and what the backwards rebuild).
  size_t peak_activation_bytes = 0;
  size_t peak_stash_bytes = 0;         // --weight-stash: weight copies kept for batches in flight
  int64_t warmup = 0;                  // the warm-up steps actually run
  int64_t units = 0, replayed_units = 0;  // --graphs: module units of the timed steps, and how many were replays
  std::string device_name;
  std::string mainloop;  // the bf16 tensor-core main loop in effect on a GPU, "none" on the CPU
  // On a GPU the other kernel switches: ops::tensor_core_switches, then the layers' bf16_weight_copies and
  // dgrad_accumulate; else "none".
  std::string switches;
  // profile_ops > 0: the device time of each (op, shapes) summed over the profiled steps, most
  // expensive first, and the wall time of those steps.
  std::vector<OpTime> op_times;
  double profiled_wall_ms = 0;

  std::string json() const;  // one line, no newline
  std::string op_profile_json() const;
};

// --batch-size and --steps positive, --warmup not negative: each refused by name (run_bench, and
// study before its first run).
void check_bench_counts(const BenchConfig& cfg);
BenchResult run_bench(const BenchConfig& cfg);

}  // namespace sp::train
