// The training run behind `staleprop train` (and `staleprop eval`), as a library so the tests
// can drive it: data, model, optimiser, schedule, per-epoch evaluation, metrics, progress,
// checkpoints and exact resumption.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "engine/network.h"
#include "engine/pipeline.h"
#include "engine/schedule.h"
#include "tools/cifar10.h"

namespace sp::train {

struct TrainConfig {
  std::string model = "resnet20";
  int epochs = 1;
  int64_t batch_size = 128;
  float lr = 0.1f;
  float momentum = 0.9f;
  bool nesterov = false;
  float weight_decay = 5e-4f;
  std::string schedule = "multistep";              // constant | multistep | cosine | onecycle
  std::vector<double> milestones = {0.5, 0.75};    // multistep, as fractions of the run
  float gamma = 0.1f;
  double warmup_epochs = 0;
  float label_smoothing = 0.f;
  std::string precision = "fp32";                  // fp32 | bf16 (mixed precision)
  std::string kernels = "custom";                  // custom | vendor (GPU)
  std::string mainloop;  // auto | mma_sync | wgmma | wgmma_tma (GPU); empty: $STALEPROP_MAINLOOP, else auto
  uint64_t seed = 0;
  bool deterministic = false;
  std::string device = "cpu";
  bool augment = true;                             // random crop (4-pixel padding) and flip
  int cutout = 0;                                  // with augment: Cutout square side (0: none)
  int64_t eval_batch_size = 500;
  std::string checkpoint;                          // written after every epoch; "{epoch}" -> number
  int64_t checkpoint_every = 0;                    // also every N steps when > 0
  std::string resume;                              // checkpoint to resume from
  std::string metrics;                             // JSON-lines file (appended) when set
  std::string progress = "auto";                   // auto | bar | plain | none
  std::string log;                                 // banner, progress and epoch lines: appended here, not stdout
  // After an epoch, the run ends (its checkpoint written) when the next epoch, taking as long
  // as the last one, would not end before this time; --resume goes on from there.
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  // Asked after every step (plain backprop) or before every batch fed (a pipeline), and at the
  // end of every epoch; once it says true (staleprop train and sweep: after SIGINT or SIGTERM),
  // the run ends early. Plain backprop ends after its current step and writes a checkpoint
  // there (with --checkpoint), which --resume goes on from exactly. A pipelined run stops
  // feeding batches, drains, and drops the epoch it was in: it is checkpointed at epoch
  // boundaries only. Null: never. Runs of a sweep call it from their own threads.
  std::function<bool()> interrupt;
  int max_concurrent_runs = 1;  // > 1: run beside up to this many-1 others in one process (staleprop sweep)
  int64_t stop_after_steps = -1;                   // end the run early after this global step
  // Decoupled training (engine/pipeline.h): bp with one module is plain backprop.
  std::string method = "bp";                       // bp | ddg | fdg
  int split = 1;                                   // K modules, balanced by split_by
  std::string split_by;  // time (measured per block) | flops (counted: reproducible); empty: flops with
                         // --deterministic, else time
  std::string split_at;                            // explicit cut points "i,j,..." or "fdg" (presets)
  float shrink = 1.f;                              // beta: gradient shrink factor
  std::vector<std::string> devices;                // one per module (default: --device for all)
  std::string trace;                               // Chrome-trace JSON of the first epoch's stages
  bool trace_ops = false;                          // and of every op in them (needs trace)
  int staleness_jitter = 0;                        // J: extra random delay 0..J ticks per gradient
  bool recompute = false;                          // rebuild saved activations before the backward
  bool weight_stash = false;                       // backward through the forward's weights
  bool graphs = false;                             // replay steady-state ticks from graphs (pipeline)
  std::string graph_memory = "planned";            // with graphs: planned | bump arenas
};

struct EpochResult {
  int epoch;
  double train_loss, train_acc, test_loss, test_acc, images_per_s, elapsed_s;
};

struct TrainResult {
  std::vector<EpochResult> epochs;
  int64_t steps = 0;
  int64_t graph_replays = 0;  // --graphs: module units replayed from graphs over the run
  bool stopped_at_deadline = false;  // ended before its last epoch by TrainConfig::deadline
  bool interrupted = false;          // ended early by TrainConfig::interrupt
  bool stopped_at_step = false;      // ended before its last epoch by TrainConfig::stop_after_steps
  bool already_complete = false;     // --resume from the run's last step: nothing was left to train
};

// How long the next epoch will take, judged from the last: its training took `train_secs` for
// `steps_run` of the `steps_per_epoch` steps (fewer in an epoch resumed part-way), and its
// evaluation and checkpoint `other_secs`, which every epoch pays whole.
double next_epoch_seconds(double train_secs, double other_secs, int64_t steps_run, int64_t steps_per_epoch);

// The deadline `seconds` from now; none (time_point::max()) for 0, and for limits too large to
// represent.
std::chrono::steady_clock::time_point deadline_after(double seconds);

// Trains on `train_set`, evaluating on `test_set` (may be empty) after each epoch.
TrainResult run_training(const TrainConfig& cfg, const data::Dataset& train_set, const data::Dataset& test_set);

// The checks of run_training that need no data: flag values, their combinations, the model's
// name, the output files' directories and that no two outputs name one file. Throws sp::Error.
// A sweep runs them for every job before the first (run_training runs them again).
void check_config(const TrainConfig& cfg);

// The files a run writes, by flag (--log, --metrics, --checkpoint, --trace), those given.
std::vector<std::pair<std::string, std::string>> run_outputs(const TrainConfig& cfg);
// One spelling per file ("a.log", "./a.log", "/cwd/a.log" and a symbolic link to it are the same;
// an existing file with hard links is named by its device and inode, which its links share).
std::string same_file(const std::string& path);
// Whether `file` is, or (for a --checkpoint pattern with "{epoch}") may be, written as `output`.
bool may_write(const std::string& output, const std::string& file);
// Whether outputs a and b (each a file, or a --checkpoint pattern with "{epoch}") may name the
// same file for some epochs.
bool may_collide(const std::string& a, const std::string& b);

// Test-set accuracy and mean loss of the model in a checkpoint; an empty `model` takes the
// name stored in the checkpoint's metadata, an empty `precision` (fp32|bf16) the precision the
// run was trained in (fp32 where the metadata names none).
struct EvalResult {
  double loss, accuracy;
  int64_t samples;
  std::string precision;  // the activations' precision it was evaluated in
};
EvalResult evaluate_checkpoint(const std::string& checkpoint, std::string model, const std::string& device,
                               const data::Dataset& test_set, int64_t batch_size, std::string precision = "");

// Per-block cost (forward + backward milliseconds) of one training step on `images` (f32
// [B,H,W,C], any device), measured with events on s; the network's BN statistics are left
// as they were. The basis of --split K's balanced cuts.
std::vector<double> measure_block_costs(Network& net, Stream& s, const Tensor& images, DType activation_dtype);

// The cut points of --split-at "i,j,..." (first block of modules 2..K).
std::vector<size_t> parse_cuts(const std::string& text);
// How many modules --split `split` and --split-at `split_at` give: one more than the explicit
// cuts, else `split` (also for "fdg", whose cuts are FDG's for that K).
size_t module_count(int split, const std::string& split_at);
// The cut points of --split `split` and --split-at `split_at` for `model` of `blocks` blocks, as
// train and bench take them: FDG's published cuts ("fdg"), the explicit cuts (which must agree
// with a --split other than 1, and lie ascending in 1..blocks-1), or for split > 1 cuts balanced
// by block_costs() (called only then); none for one module.
std::vector<size_t> choose_cuts(const std::string& model, size_t blocks, int split, const std::string& split_at,
                                const std::function<std::vector<double>()>& block_costs);
// Throws, as choose_cuts would, unless `model` can be cut as --split `split` / --split-at
// `split_at` say (measured cuts are checked by their count).
void check_cuts(const std::string& model, int split, const std::string& split_at);
// --graph-memory: planned or bump, and bump only with --graphs (train and bench alike).
void check_graph_memory(bool graphs, const std::string& graph_memory);
// --shrink `shrink` with --method `method` (bp, ddg or fdg): in (0, 1], and 1 with bp.
void check_shrink(const std::string& method, float shrink);

// --devices beside --device `dev`: throws unless every one is there and of dev's kind (the run
// builds and checkpoints the modules through dev), and a single one is dev itself.
void check_module_devices(Device dev, const std::vector<std::string>& devices);
// Throws unless `devices` names one device per module of --split `split` / --split-at `split_at`
// (or at most one): told before any cuts are measured.
void check_device_count(const std::vector<std::string>& devices, int split, const std::string& split_at);
// The devices whose allocators hold a run's memory: dev, then those of `devices` not yet named.
std::vector<Device> devices_in_use(Device dev, const std::vector<std::string>& devices);

// The activation dtype of TrainConfig::precision ("fp32" or "bf16").
DType activation_dtype(const std::string& precision);

// The learning-rate schedule of a run of cfg.epochs epochs of `steps_per_epoch` steps: the
// warm-up and the milestones, given as epochs and as fractions of the run, become steps
// (rounded to the nearest). Throws sp::Error for milestones out of (0, 1), not ascending, or
// (multistep only, the one schedule that reads them) falling at the first step or inside the
// warm-up.
LrSchedule make_schedule(const TrainConfig& cfg, int64_t steps_per_epoch);

// A file written by the run (--checkpoint, --trace, --metrics, --log, bench's --json) must go to
// an existing directory that takes new files, and not be a directory itself; throws sp::Error
// naming `flag`.
void check_output_directory(const std::string& flag, const std::string& file);
// An output appended to (--log, --metrics, bench's --json): an existing file the run may write
// is enough (/dev/null, a log in a directory that takes no new files); else as
// check_output_directory.
void check_append_output(const std::string& flag, const std::string& file);

// --trace: the Chrome-trace / Perfetto JSON of one epoch's stages (and ops, where recorded), one
// track per module, written atomically to `path`.
void write_trace(const std::string& path, const PipelineEpochStats& stats, int modules, int epoch);

}  // namespace sp::train
