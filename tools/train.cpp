#include "tools/train.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>

#include "engine/allocator.h"
#include "engine/checkpoint.h"
#include "engine/ops.h"
#include "engine/pipeline.h"
#include "engine/safetensors.h"
#include "engine/schedule.h"
#include "engine/trainer.h"
#include "kernels/common/error.h"
#include "kernels/cpu/parallel.h"
#include "layers/resnet.h"
#include "tools/build_info.h"
#include "tools/json.h"

#if STALEPROP_WITH_CUDA
#include "kernels/vendor/vendor.h"
#endif

namespace sp::train {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Images per second, "?" where not known yet.
std::string fmt_rate(double ips) {
  if (!std::isfinite(ips) || ips < 0) return "?";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f", ips);
  return buf;
}

std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char buf[32];
  const long t = long(s + 0.5);
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", t / 60, t % 60);
  return buf;
}

// Where a run's lines go: stdout, or the file of --log (appended, so a resumed run's lines
// follow the earlier ones).
class Output {
 public:
  explicit Output(const std::string& path) {
    if (path.empty()) return;
    file_ = std::fopen(path.c_str(), "a");
    SP_CHECK(file_, "cannot open the log file '", path, "'");
  }
  ~Output() {
    if (file_) std::fclose(file_);
  }
  Output(const Output&) = delete;
  Output& operator=(const Output&) = delete;
  std::FILE* get() const { return file_ ? file_ : stdout; }

 private:
  std::FILE* file_ = nullptr;
};

// Progress on the terminal: a redrawn bar on a TTY, plain lines otherwise.
class Progress {
 public:
  Progress(const std::string& mode, int64_t steps_per_epoch, int epochs, std::FILE* out)
      : out_(out), spe_(steps_per_epoch), epochs_(epochs) {
    SP_CHECK(mode == "auto" || mode == "bar" || mode == "plain" || mode == "none",
             "--progress must be auto, bar, plain or none, got '", mode, "'");
    bar_ = mode == "bar" || (mode == "auto" && isatty(fileno(out)));
    quiet_ = mode == "none";
    plain_every_ = std::max<int64_t>(1, steps_per_epoch / 10);
  }
  bool wants_update(int64_t index_in_epoch) const {
    if (quiet_) return false;
    return bar_ || (index_in_epoch + 1) % plain_every_ == 0 || index_in_epoch + 1 == spe_;
  }
  // `st` may be null when the statistics are not known yet (pipelined runs read them at the
  // end of the epoch).
  void update(int epoch, int64_t index_in_epoch, const StepStats* st, float lr, double ips, double eta_s) {
    if (quiet_) return;
    char stats[64] = "";
    if (st) std::snprintf(stats, sizeof stats, " loss %.4f acc %5.1f%%", st->mean_loss(), 100 * st->accuracy());
    if (bar_) {
      const int width = 24, filled = int(width * (index_in_epoch + 1) / std::max<int64_t>(1, spe_));
      std::fprintf(out_, "\repoch %d/%d [%s%s] %lld/%lld%s lr %.4g %s img/s ETA %s   ", epoch + 1, epochs_,
                   std::string(size_t(filled), '#').c_str(), std::string(size_t(width - filled), '.').c_str(),
                   (long long)(index_in_epoch + 1), (long long)spe_, stats, lr, fmt_rate(ips).c_str(),
                   fmt_duration(eta_s).c_str());
    } else {
      std::fprintf(out_, "epoch %d/%d step %lld/%lld%s lr %.4g %s img/s ETA %s\n", epoch + 1, epochs_,
                   (long long)(index_in_epoch + 1), (long long)spe_, stats, lr, fmt_rate(ips).c_str(),
                   fmt_duration(eta_s).c_str());
    }
    std::fflush(out_);
  }
  void end_epoch() {
    if (bar_ && !quiet_) std::fputc('\n', out_);
  }
  bool quiet() const { return quiet_; }

 private:
  std::FILE* out_;
  int64_t spe_;
  int epochs_;
  bool bar_ = false, quiet_ = false;
  int64_t plain_every_ = 1;
};

class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path) {
    if (!path.empty()) {
      out_.open(path, std::ios::app);
      SP_CHECK(out_.good(), "cannot open metrics file '", path, "'");
    }
  }
  bool enabled() const { return out_.is_open(); }
  void write(const std::string& json) {
    if (out_.is_open()) {
      out_ << json << '\n';
      out_.flush();
    }
  }

 private:
  std::ofstream out_;
};

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream os;
  os.precision(8);
  os << v;
  return os.str();
}

}  // namespace

LrSchedule make_schedule(const TrainConfig& cfg, int64_t steps_per_epoch) {
  LrSchedule sch;
  sch.kind = LrSchedule::parse_kind(cfg.schedule);
  sch.base_lr = cfg.lr;
  sch.total_steps = steps_per_epoch * cfg.epochs;
  sch.warmup_steps = int64_t(std::llround(cfg.warmup_epochs * double(steps_per_epoch)));
  sch.gamma = cfg.gamma;
  for (size_t i = 0; i < cfg.milestones.size(); ++i) {
    const double f = cfg.milestones[i];
    SP_CHECK(f > 0 && f < 1, "--milestones are fractions of the run in (0, 1), got ", f);
    SP_CHECK(i == 0 || f > cfg.milestones[i - 1], "--milestones must ascend, each once: ", cfg.milestones[i - 1],
             " then ", f);
    const int64_t step = int64_t(std::llround(f * double(sch.total_steps)));
    // Inside the warm-up a milestone would be applied unseen, at the warm-up's end; at step 0 the
    // base rate would never be used. (Only multistep reads them; the others ignore the default.)
    SP_CHECK(sch.kind != LrSchedule::Kind::MultiStep || step >= std::max<int64_t>(1, sch.warmup_steps),
             "--milestones: ", f, " of the run's ", sch.total_steps, " steps is step ", step, ", ",
             step == 0 ? "its first" : "inside the warm-up of ",
             step == 0 ? "" : std::to_string(sch.warmup_steps) + " steps",
             ": a milestone must fall after the warm-up and the first step");
    sch.milestones.push_back(step);
  }
  return sch;
}

// Chrome-trace / Perfetto JSON of one epoch's stages: one track per module; with --trace-ops each
// op of the module's stream inside its stages (category "op", its operand shapes as an argument).
// Times are written in microseconds with 3 decimals, start and end each rounded from the
// origin and the duration their difference, so that events back to back on a track (a stage's
// end, the next one's start) stay apart and ops stay inside their stages: with 8 significant
// digits, past 10 s an event's end could pass the next one's start, which Perfetto misdraws.
// Written to a temporary file renamed over PATH, so PATH never holds half a trace.
void write_trace(const std::string& path, const PipelineEpochStats& stats, int modules, int epoch) {
  const auto span = [](double start_ms, double duration_ms) {
    const long long ts = std::llround(start_ms * 1e6), end = std::llround((start_ms + duration_ms) * 1e6);
    char buf[96];
    std::snprintf(buf, sizeof buf, "\"ts\":%lld.%03lld,\"dur\":%lld.%03lld", ts / 1000, ts % 1000, (end - ts) / 1000,
                  (end - ts) % 1000);
    return std::string(buf);
  };
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  std::ofstream out(tmp);
  SP_CHECK(out.good(), "cannot write the trace file '", tmp, "'");
  out << "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[";
  for (int k = 0; k < modules; ++k)
    out << (k ? "," : "") << "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":" << k + 1
        << ",\"args\":{\"name\":\"module " << k + 1 << "\"}}";
  for (const StageTiming& t : stats.stages)
    out << ",{\"name\":" << json_str(t.stage + " b" + std::to_string(t.batch)) << ",\"cat\":\"epoch " << epoch + 1
        << "\",\"ph\":\"X\",\"pid\":1,\"tid\":" << t.module + 1 << "," << span(t.start_ms, t.duration_ms)
        << ",\"args\":{\"tick\":" << t.tick << "}}";
  for (const OpTiming& o : stats.ops)
    out << ",{\"name\":" << json_str(o.op) << ",\"cat\":\"op\",\"ph\":\"X\",\"pid\":1,\"tid\":" << o.module + 1
        << "," << span(o.start_ms, o.duration_ms) << ",\"args\":{\"shapes\":" << json_str(o.shapes) << "}}";
  out << "]}\n";
  out.close();
  if (!out.good() || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    SP_CHECK(false, "error writing the trace file '", path, "': ", why);
  }
}

namespace {

// load_checkpoint, whose refusal of another model's file ("no tensor 'layer1.3.conv1.weight'")
// names the model the file's metadata records where that is not `model`.
std::map<std::string, std::string> load_model_checkpoint(const std::string& path, const std::string& model,
                                                         const Network& net, const std::vector<Sgd*>& opts,
                                                         Stream& s) {
  try {
    return load_checkpoint(path, net, opts, s);
  } catch (const Error& e) {
    std::string holds;
    try {
      holds = io::read_safetensors(path).metadata["model"];
    } catch (const Error&) {
    }
    if (holds.empty() || holds == model) throw;
    throw Error(path + " holds a " + holds + ", not a " + model + " (" + user_message(e) + ")");
  }
}

void check_device_options(const TrainConfig& cfg, Device dev) {
  require_device(dev);
  check_module_devices(dev, cfg.devices);
  SP_CHECK(cfg.precision == "fp32" || cfg.precision == "bf16", "--precision must be fp32 or bf16, got '",
           cfg.precision, "'");
  SP_CHECK(cfg.kernels == "custom" || cfg.kernels == "vendor", "--kernels must be custom or vendor, got '",
           cfg.kernels, "'");
  if (dev.is_cpu()) {
    SP_CHECK(cfg.kernels == "custom", "--kernels vendor selects cuBLAS/cuDNN and needs a GPU (--device cuda)");
    SP_CHECK(cfg.mainloop.empty(), "--mainloop selects the main loop of the bf16 tensor-core kernels and needs a GPU "
             "(--device cuda)");
  }
}

// The activation dtype of --precision: bf16 is mixed precision (bf16 activations, gradients
// and weight copies; fp32 master weights, optimizer state and reductions).
DType activation_dtype(const TrainConfig& cfg) { return train::activation_dtype(cfg.precision); }

// The checkpoint path of an epoch: "{epoch}" in the flag's value becomes the epoch number.
std::string checkpoint_path(const std::string& pattern, int64_t epoch) {
  std::string p = pattern;
  const size_t at = p.find("{epoch}");
  if (at != std::string::npos) p.replace(at, 7, std::to_string(epoch));
  return p;
}

std::string milestones_str(const std::vector<double>& milestones) {
  std::string s;
  for (double m : milestones) s += (s.empty() ? "" : ",") + json_number(m);
  return s;
}

// The augmentation as a checkpoint records it.
std::string augment_str(const TrainConfig& cfg) {
  return !cfg.augment ? "none" : cfg.cutout > 0 ? "crop,flip,cutout" + std::to_string(cfg.cutout) : "crop,flip";
}

std::map<std::string, std::string> run_metadata(const TrainConfig& cfg, int64_t step, int64_t steps_per_epoch,
                                                int64_t train_size, const std::string& train_digest) {
  return {{"format", "staleprop-checkpoint-1"},
          {"model", cfg.model},
          {"step", std::to_string(step)},
          {"steps_per_epoch", std::to_string(steps_per_epoch)},
          {"batch_size", std::to_string(cfg.batch_size)},
          {"train_size", std::to_string(train_size)},
          {"train_digest", train_digest},
          {"seed", std::to_string(cfg.seed)},
          {"epochs", std::to_string(cfg.epochs)},
          {"schedule", cfg.schedule},
          {"lr", json_number(cfg.lr)},
          {"milestones", milestones_str(cfg.milestones)},
          {"gamma", json_number(cfg.gamma)},
          {"warmup_epochs", json_number(cfg.warmup_epochs)},
          {"augment", augment_str(cfg)},
          // The training rule: the update every step makes (a run on another device or with
          // other kernels keeps it, though not every bit).
          {"method", cfg.method},
          {"shrink", json_number(cfg.shrink)},
          {"staleness_jitter", std::to_string(cfg.staleness_jitter)},
          {"recompute", cfg.recompute ? "1" : "0"},
          {"weight_stash", cfg.weight_stash ? "1" : "0"},
          {"momentum", json_number(cfg.momentum)},
          {"nesterov", cfg.nesterov ? "1" : "0"},
          {"weight_decay", json_number(cfg.weight_decay)},
          {"label_smoothing", json_number(cfg.label_smoothing)},
          {"precision", cfg.precision},
          // Not checked on --resume: which build wrote the checkpoint.
          {"staleprop_build", build::describe()}};
}

// The loader of an evaluation: the set in order, unaugmented. A run keeps one for all its
// evaluations (with shuffle off every pass is the same), since making one takes pinned host
// memory, whose release waits for the whole GPU: beside other runs, for their work too.
std::unique_ptr<data::BatchLoader> make_eval_loader(const data::Dataset& set, int64_t batch_size) {
  data::LoaderOptions lo;
  lo.batch_size = batch_size;
  lo.shuffle = false;
  lo.augment = false;
  return std::make_unique<data::BatchLoader>(set, lo);
}

// Runs the eval-mode forward over one pass of `loader`.
StepStats evaluate(BackpropTrainer& trainer, data::BatchLoader& loader) {
  for (int64_t i = 0; i < loader.batches_per_epoch(); ++i) {
    const data::Batch& b = loader.next();
    trainer.eval_step(b.images, b.labels);  // returns once the batch before is copied: the loader may reuse it
  }
  return trainer.drain_stats();
}

// What both training paths share: the run's setup, the epoch report, metrics and checkpoints.
struct Run {
  // What this run's thread allocates counts for it too: its own peak when it shares the
  // allocator with other runs (staleprop sweep). Declared first, so it covers all of the run.
  AllocationOwner owner;
  const TrainConfig& cfg;
  const data::Dataset& train_set;
  const data::Dataset& test_set;
  const std::string train_digest;  // data::digest of train_set, which checkpoints record
  Device device;
  std::unique_ptr<Stream> stream;
  Network net;
  std::unique_ptr<data::BatchLoader> loader;
  std::unique_ptr<data::BatchLoader> eval_loader;  // made at the first evaluation
  // Destroyed before `net` and the loaders (members go in reverse order): when the run ends by
  // an error with work still queued, that work ends before their memory goes back.
  Drain drain{*stream};
  int64_t spe = 0;
  LrSchedule sched;
  Output out;
  Progress progress;
  MetricsLog metrics;
  Clock::time_point start = Clock::now();
  TrainResult result;

  Run(const TrainConfig& c, const data::Dataset& train, const data::Dataset& test)
      : cfg(c),
        train_set(train),
        test_set(test),
        train_digest(data::digest(train)),
        device(Device::parse(c.device)),
        stream(make_stream(device)),
        net(layers::build_resnet(c.model, data::kCifarClasses, c.seed)),
        loader(make_loader(c, train)),
        spe(loader->batches_per_epoch()),
        sched(make_schedule(c, spe)),
        out(c.log),
        progress(c.progress, spe, c.epochs, out.get()),
        metrics(c.metrics) {
    net.to(device, *stream);
  }

  data::BatchLoader& test_loader() {
    if (!eval_loader) eval_loader = make_eval_loader(test_set, cfg.eval_batch_size);
    return *eval_loader;
  }

  static std::unique_ptr<data::BatchLoader> make_loader(const TrainConfig& c, const data::Dataset& train) {
    data::LoaderOptions lo;
    lo.batch_size = c.batch_size;
    lo.shuffle = true;
    lo.augment = c.augment;
    lo.cutout = c.cutout;
    lo.seed = c.seed;
    return std::make_unique<data::BatchLoader>(train, lo);
  }

  // Opens the run on the log (its banner) and in --metrics: a "start" record naming the build,
  // the device, the method and the settings its checkpoints record (with extra_key, as
  // metadata()), so that a metrics file says what made it. A resumed run appends another, with
  // the step it goes on from.
  void announce(const std::string& method, int64_t step, const std::string& extra_key = "",
                const std::string& extra_value = "") {
    banner(method);
    if (!metrics.enabled()) return;
    std::string settings;
    for (const auto& [key, value] : metadata(step, extra_key, extra_value))
      if (key != "format" && key != "step")
        settings += (settings.empty() ? "" : ",") + json_str(key) + ":" + json_str(value);
    std::string devices;
    for (const std::string& d : cfg.devices) devices += (devices.empty() ? "" : ",") + json_str(d);
    const std::time_t now = std::time(nullptr);
    char utc[32] = "";
    std::tm tm{};
    if (gmtime_r(&now, &tm)) std::strftime(utc, sizeof utc, "%Y-%m-%dT%H:%M:%SZ", &tm);
    metrics.write("{\"event\":\"start\",\"build\":" + json_str(build::describe()) +
                  ",\"commit\":" + json_str(build::commit()) + ",\"started_utc\":" + json_str(utc) +
                  ",\"device\":" + json_str(device_description(device)) + ",\"devices\":[" + devices +
                  "],\"method\":" + json_str(method) + ",\"kernels\":" + json_str(cfg.kernels) +
                  ",\"step\":" + std::to_string(step) + ",\"steps_per_epoch\":" + std::to_string(spe) +
                  ",\"resume\":" + json_str(cfg.resume) + ",\"settings\":{" + settings + "}}");
  }

  void banner(const std::string& method) const {
    if (progress.quiet()) return;
    std::string precision = cfg.precision == "bf16" ? ", bf16 mixed precision" : "";
    if (cfg.precision == "bf16" && device.is_cuda() && cfg.kernels != "vendor")
      precision += " (" + ops::tensor_core_mainloop_in_use() + " main loop)";
    std::fprintf(out.get(),
                 "staleprop train: %s (%.2fM parameters) on %s, %s, %lld train / %lld test images, batch %lld, "
                 "%d epochs of %lld steps%s%s\n",
                cfg.model.c_str(), double(net.num_parameters()) / 1e6, (device.str() + modules_on()).c_str(),
                (method + precision).c_str(),
                (long long)train_set.size(), (long long)test_set.size(), (long long)cfg.batch_size, cfg.epochs,
                (long long)spe,
                device.is_cpu() ? (", " + std::to_string(kernels::cpu::num_threads()) + " CPU threads").c_str() : "",
                 cfg.max_concurrent_runs > 1
                     ? (", up to " + std::to_string(cfg.max_concurrent_runs) + " runs at once in this process").c_str()
                     : "");
    std::fflush(out.get());
  }

  // Checks a checkpoint against this run and returns the global step it was written at.
  int64_t check_resume(std::map<std::string, std::string>& meta) const {
    // A file another tool wrote (PyTorch's save_file) records no run to go on with.
    SP_CHECK(meta.count("model") && meta.count("step"), "--resume: ", cfg.resume,
             " records no staleprop run (no 'model' and 'step' in its metadata): weights alone can be evaluated "
             "(staleprop eval --model M --checkpoint FILE), but training resumes only from a checkpoint staleprop "
             "train wrote");
    SP_CHECK(meta["model"] == cfg.model, "--resume: ", cfg.resume, " holds a ", meta["model"], ", not a ",
             cfg.model);
    SP_CHECK(meta["steps_per_epoch"] == std::to_string(spe) && meta["seed"] == std::to_string(cfg.seed), "--resume: ",
             cfg.resume, " was written with other data, batch size or seed (steps/epoch ", meta["steps_per_epoch"],
             ", seed ", meta["seed"], "); resume with the same settings");
    // The batches follow from these, and the learning rate at every step from the schedule's:
    // another value would silently train on other batches or another schedule than the run
    // began with. (Checkpoints from before a key was recorded are not checked on it.)
    // The values compared are those this run's own checkpoints would record.
    const std::map<std::string, std::string> ours = metadata(0);
    // Each key in the order checked, with the flag and the kind of setting the refusal names.
    // milestones and gamma shape only the multistep schedule. Recomputing through the stashed
    // weights rebuilds the saved activations bit for bit (tests/test_pipeline.cpp), so with
    // --weight-stash --recompute may change; without, it changes the weights the activations
    // are rebuilt with.
    struct Checked {
      const char *key, *flag, *what;
      bool applies;
    };
    const bool multistep = cfg.schedule == "multistep";
    const Checked checked[] = {
        {"batch_size", "--batch-size", "data settings", true},
        {"train_size", "training images (--train-limit)", "data settings", true},
        {"train_digest", "training data of digest", "data", true},
        {"augment", "augmentation", "data settings", true},
        {"epochs", "--epochs", "schedule", true},
        {"schedule", "--schedule", "schedule", true},
        {"lr", "--lr", "schedule", true},
        {"milestones", "--milestones", "schedule", multistep},
        {"gamma", "--gamma", "schedule", multistep},
        {"warmup_epochs", "--warmup-epochs", "schedule", true},
        {"method", "--method", "training rule", true},
        {"shrink", "--shrink", "training rule", true},
        {"staleness_jitter", "--staleness-jitter", "training rule", true},
        {"weight_stash", "--weight-stash", "training rule (1: on, 0: off)", true},
        {"recompute", "--recompute", "training rule (1: on, 0: off)", !cfg.weight_stash},
        {"momentum", "--momentum", "optimizer", true},
        {"nesterov", "--nesterov", "optimizer (1: on, 0: off)", true},
        {"weight_decay", "--weight-decay", "optimizer", true},
        {"label_smoothing", "--label-smoothing", "loss", true},
        {"precision", "--precision", "precision", true},
    };
    for (const Checked& c : checked) {
      if (!c.applies) continue;
      const std::string& now = ours.at(c.key);
      SP_CHECK(!meta.count(c.key) || meta[c.key] == now, "--resume: ", cfg.resume, " was written by a run with ",
               c.flag, " ", meta[c.key], ", not ", now, "; resume with the same ", c.what);
    }
    SP_CHECK(meta.count("step"), "--resume: ", cfg.resume, " records no training step: not a staleprop checkpoint");
    const std::string& step = meta["step"];
    SP_CHECK(!step.empty() && step.size() <= 18 && step.find_first_not_of("0123456789") == std::string::npos,
             "--resume: ", cfg.resume, " records the training step '", step, "', not a number of steps");
    const int64_t at = std::stoll(step), end = int64_t(cfg.epochs) * spe;
    SP_CHECK(at <= end, "--resume: ", cfg.resume, " records step ", at, ", past the end of this ", cfg.epochs,
             "-epoch run (step ", end, "): its metadata do not belong to this run");
    return at;
  }

  std::map<std::string, std::string> metadata(int64_t step, const std::string& extra_key = "",
                                              const std::string& extra_value = "") const {
    auto m = run_metadata(cfg, step, spe, train_set.size(), train_digest);
    if (!extra_key.empty()) m[extra_key] = extra_value;
    return m;
  }

  // Evaluates (when there is a test set), prints and logs the epoch; `extra` is appended to
  // the printed line and `extra_json` to the JSON record.
  void end_epoch(int epoch, int64_t step, const StepStats& train, double train_secs, int64_t images,
                 const std::function<StepStats()>& eval, const std::string& extra = "",
                 const std::string& extra_json = "") {
    EpochResult er{epoch + 1, train.mean_loss(), train.accuracy(), NAN, NAN, double(images) / train_secs, 0};
    // Peak memory of the device's caching allocator during the epoch's training (since
    // begin_epoch_peak()): tensors in use, and blocks held from the backend. Beside other runs,
    // the tensors are this run's own (allocated on its thread) and the blocks the process's.
    // With --devices, each device's peak, and their sum as the run's.
    AllocatorStats mem;
    std::string by_device, per_device_text;
    const std::vector<Device> devices = memory_devices();
    for (const Device d : devices) {
      const AllocatorStats m = device_allocator(d).stats();
      const size_t peak =
          shares_allocator() ? device_allocator(d).owner_stats(owner.id()).peak_allocated_bytes : m.peak_allocated_bytes;
      mem.peak_allocated_bytes += peak;
      mem.peak_reserved_bytes += m.peak_reserved_bytes;
      by_device += (by_device.empty() ? "" : ",") + ("\"" + d.str() + "\":" + std::to_string(peak));
      per_device_text += (per_device_text.empty() ? " (" : ", ") + d.str() + " " +
                         std::to_string(std::llround(double(peak) / (1 << 20)));
    }
    per_device_text = devices.size() > 1 ? per_device_text + ")" : "";
    if (test_set.size() > 0) {
      const StepStats t = eval();
      er.test_loss = t.mean_loss();
      er.test_acc = t.accuracy();
      // The weights after the epoch's last updates (which no training loss has seen yet), before
      // they are checkpointed.
      check_finite(er.test_loss, epoch, -1);
    }
    er.elapsed_s = seconds_since(start);
    result.epochs.push_back(er);
    if (!progress.quiet()) {
      std::fprintf(out.get(),
                   "epoch %d/%d: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%% | %.0f img/s%s | train peak "
                   "mem %.0f MiB%s | %s elapsed\n",
                   epoch + 1, cfg.epochs, er.train_loss, 100 * er.train_acc, er.test_loss, 100 * er.test_acc,
                   er.images_per_s, extra.c_str(), double(mem.peak_allocated_bytes) / (1 << 20),
                   per_device_text.c_str(), fmt_duration(er.elapsed_s).c_str());
      std::fflush(out.get());
    }
    metrics.write("{\"event\":\"epoch\",\"epoch\":" + std::to_string(epoch + 1) + ",\"step\":" +
                  std::to_string(step) + ",\"loss\":" + json_number(er.train_loss) + ",\"train_acc\":" +
                  json_number(er.train_acc) + ",\"test_loss\":" + json_number(er.test_loss) + ",\"test_acc\":" +
                  json_number(er.test_acc) + ",\"lr\":" + json_number(sched.at(step - 1)) + ",\"images_per_s\":" +
                  json_number(er.images_per_s) + ",\"elapsed_s\":" + json_number(er.elapsed_s) +
                  ",\"peak_allocated_bytes\":" + std::to_string(mem.peak_allocated_bytes) +
                  ",\"peak_reserved_bytes\":" + std::to_string(mem.peak_reserved_bytes) +
                  (devices.size() > 1 ? ",\"peak_allocated_bytes_by_device\":{" + by_device + "}" : "") +
                  (cfg.max_concurrent_runs > 1
                       ? ",\"max_concurrent_runs\":" + std::to_string(cfg.max_concurrent_runs)
                       : "") +
                  extra_json + "}");
  }

  bool shares_allocator() const { return cfg.max_concurrent_runs > 1; }

  // The checkpoint file of epoch `epoch` (0-based; see checkpoint_path), "" without --checkpoint.
  std::string epoch_checkpoint(int epoch) const {
    return cfg.checkpoint.empty() ? "" : checkpoint_path(cfg.checkpoint, epoch + 1);
  }

  // " (modules on D,D,..)" with --devices, else nothing.
  std::string modules_on() const {
    std::string out;
    for (const std::string& d : cfg.devices) out += (out.empty() ? " (modules on " : ",") + d;
    return out.empty() ? out : out + ")";
  }

  // The devices whose allocators hold this run's memory: --device, and each of --devices.
  std::vector<Device> memory_devices() const { return devices_in_use(device, cfg.devices); }

  // Starts the epoch's peak memory: the allocators', or beside other runs this run's own (the
  // process's peak is not reset under them).
  void begin_epoch_peak() {
    for (const Device d : memory_devices()) {
      if (shares_allocator())
        device_allocator(d).reset_owner_peak(owner.id());
      else
        device_allocator(d).reset_peak();
    }
  }

  bool interrupted() const { return cfg.interrupt && cfg.interrupt(); }

  // A loss that is no longer finite means the run diverged: it ends with an error before the
  // checkpoint that would follow. The training loss by global step `step` of epoch `epoch`, or
  // (step -1) the test loss after it, which sees the epoch's last updates too.
  static void check_finite(double loss, int epoch, int64_t step) {
    if (std::isfinite(loss)) return;
    const char* value = std::isnan(loss) ? "NaN" : loss > 0 ? "+inf" : "-inf";
    const std::string what =
        step < 0 ? detail::concat("the test loss after epoch ", epoch + 1, " is ", value,
                                  ": the run diverged. This epoch is not checkpointed")
                 : detail::concat("the training loss is ", value, " by step ", step, " (epoch ", epoch + 1,
                                  "): the run diverged. No checkpoint is written from here on");
    throw Error(what + "; try a lower --lr, or a warm-up (--warmup-epochs)");
  }

  // After epoch `epoch` (0-based) and its checkpoint `saved` (empty: none): true, said, when an
  // interrupt asks the run to end there (not after its last epoch, which ends it anyway).
  bool interrupted_after_epoch(int epoch, const std::string& saved) {
    if (epoch + 1 >= cfg.epochs || !interrupted()) return false;
    stop_interrupted("after epoch " + std::to_string(epoch + 1) + " of " + std::to_string(cfg.epochs), saved);
    return true;
  }

  // Ends the run on TrainConfig::interrupt: records it and says what is kept. `resume_from` is
  // the checkpoint to go on from (empty: none was written).
  void stop_interrupted(const std::string& what, const std::string& resume_from) {
    result.interrupted = true;
    say_stopped("interrupted " + what, resume_from);
  }

  // Ends the run at TrainConfig::stop_after_steps, `where` (a step inside an epoch, or after one):
  // records it and says what is kept.
  void stop_at_step(const std::string& where, const std::string& resume_from) {
    result.stopped_at_step = true;
    say_stopped("stopped " + where + " (--stop-after " + std::to_string(cfg.stop_after_steps) + ")", resume_from);
  }

  // Says that the run ends early (`what`) and how to go on: from `resume_from`, the checkpoint
  // written (empty: none was).
  void say_stopped(const std::string& what, const std::string& resume_from) {
    if (progress.quiet()) return;
    std::fprintf(out.get(), "%s; %s\n", what.c_str(),
                 !resume_from.empty()     ? ("go on with --resume " + resume_from).c_str()
                 : cfg.checkpoint.empty() ? "no --checkpoint was given, so the run cannot be resumed"
                                          : "nothing was checkpointed yet: start again");
    std::fflush(out.get());
  }

  // Called after epoch `epoch` (0-based) and its checkpoint, `epoch_secs` after the epoch
  // began: true when the run is to end here because the next epoch, taking as long, would
  // not end before cfg.deadline. Says so, and how to go on.
  bool stop_at_deadline(int epoch, double epoch_secs) {
    if (epoch + 1 >= cfg.epochs || cfg.deadline == Clock::time_point::max()) return false;
    const auto next_end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(epoch_secs));
    if (next_end <= cfg.deadline) return false;
    result.stopped_at_deadline = true;
    if (!progress.quiet()) {
      std::fprintf(out.get(), "stopped after epoch %d of %d: the next (about %s) would pass the time limit; %s\n",
                   epoch + 1, cfg.epochs, fmt_duration(epoch_secs).c_str(),
                   cfg.checkpoint.empty()
                       ? "no --checkpoint was given, so the run cannot be resumed"
                       : ("go on with --resume " + checkpoint_path(cfg.checkpoint, epoch + 1)).c_str());
      std::fflush(out.get());
    }
    return true;
  }
};

// A checkpoint written inside an epoch also holds the epoch's training statistics so far, so
// that a run resumed from it reports the epoch's loss and accuracy over all its steps, not only
// those after the resume.
void put_epoch_stats(std::map<std::string, std::string>& meta, const StepStats& st) {
  char sum[40];
  std::snprintf(sum, sizeof sum, "%.17g", st.loss_sum);
  meta["epoch_loss_sum"] = sum;
  meta["epoch_correct"] = std::to_string(st.correct);
  meta["epoch_samples"] = std::to_string(st.samples);
}
StepStats get_epoch_stats(const std::map<std::string, std::string>& meta) {
  StepStats st;
  const auto sum = meta.find("epoch_loss_sum"), correct = meta.find("epoch_correct"),
             samples = meta.find("epoch_samples");
  if (sum == meta.end() || correct == meta.end() || samples == meta.end()) return st;  // an older checkpoint
  try {
    size_t a = 0, b = 0, c = 0;
    st.loss_sum = std::stod(sum->second, &a), st.correct = std::stoll(correct->second, &b);
    st.samples = std::stoll(samples->second, &c);
    if (a != sum->second.size() || b != correct->second.size() || c != samples->second.size())
      throw std::invalid_argument("trailing text");
  } catch (const std::logic_error&) {
    throw Error("--resume: the checkpoint's epoch statistics are not numbers");
  }
  return st;
}

TrainResult run_backprop(Run& run) {
  const TrainConfig& cfg = run.cfg;
  Stream& s = *run.stream;
  Sgd opt(run.net.state().params, SgdConfig{cfg.momentum, cfg.weight_decay, cfg.nesterov}, s);
  const int64_t spe = run.spe;
  int64_t step = 0;
  StepStats resumed_epoch_stats;  // of the steps before the resume, in the epoch it resumes
  if (!cfg.resume.empty()) {
    auto meta = load_model_checkpoint(cfg.resume, cfg.model, run.net, {&opt}, s);
    step = run.check_resume(meta);
    run.result.already_complete = step == int64_t(cfg.epochs) * spe;
    SP_CHECK(run.result.already_complete || cfg.stop_after_steps < 0 || step < cfg.stop_after_steps, "--stop-after ",
             cfg.stop_after_steps, ": ", cfg.resume, " is at step ", step, " already; give a later step to train on");
    run.loader->seek(step / spe, step % spe);
    if (step % spe != 0) resumed_epoch_stats = get_epoch_stats(meta);
  }
  BackpropTrainer trainer(run.net, opt, s, cfg.label_smoothing, activation_dtype(cfg));
  const Drain drain{s};  // before `trainer` and `opt` let their memory go
  run.announce("standard backprop", step);
  for (int epoch = int(step / spe); epoch < cfg.epochs; ++epoch) {
    const auto epoch_start = Clock::now();
    run.begin_epoch_peak();  // the epoch's training peak, evaluation excluded
    StepStats epoch_stats;
    if (step % spe != 0) std::swap(epoch_stats, resumed_epoch_stats);  // the epoch resumed inside
    int64_t epoch_images = 0;
    const int64_t first_index = step % spe;
    bool stopped = false, interrupted = false;
    // Step records of --metrics come at every tenth of an epoch (its last step included), each
    // over the steps since the last: the same records whatever --progress shows, or whether
    // stdout is a terminal (the bar collects every step's statistics; plain lines every tenth).
    StepStats metrics_window;
    for (int64_t i = first_index; i < spe && !stopped; ++i) {
      const data::Batch& b = run.loader->next();
      SP_CHECK(b.epoch == epoch && b.index_in_epoch == i, "loader out of step");
      const float lr = run.sched.at(step);
      trainer.train_step(b.images, b.labels, lr);  // returns once the batch before is copied (loader reuse)
      ++step;
      epoch_images += b.images.size(0);
      const bool show = run.progress.wants_update(i) || i + 1 == spe;
      // At each step that ends a tenth of the epoch (the last step among them): ten records an
      // epoch of 10 steps or more, each over a tenth (+-1 step); every step of a shorter one.
      const bool record = run.metrics.enabled() && ((i + 1) * 10) / spe != (i * 10) / spe;
      if (show || record) {
        const StepStats window = trainer.drain_stats();
        run.check_finite(window.mean_loss(), epoch, step);
        epoch_stats += window;
        metrics_window += window;
        const double el = seconds_since(epoch_start), ips = double(epoch_images) / el;
        const double per_step = el / double(i + 1 - first_index);
        if (show)
          run.progress.update(epoch, i, &epoch_stats, lr, ips,
                              per_step * double(spe - i - 1 + int64_t(cfg.epochs - epoch - 1) * spe));
        if (record) {
          run.metrics.write("{\"event\":\"step\",\"epoch\":" + std::to_string(epoch + 1) + ",\"step\":" +
                            std::to_string(step) + ",\"loss\":" + json_number(metrics_window.mean_loss()) +
                            ",\"train_acc\":" + json_number(metrics_window.accuracy()) + ",\"lr\":" + json_number(lr) +
                            ",\"images_per_s\":" + json_number(ips) +
                            ",\"elapsed_s\":" + json_number(seconds_since(run.start)) + "}");
          metrics_window = StepStats();
        }
      }
      // Interrupted inside an epoch: a checkpoint here (at its end, the epoch's own follows).
      interrupted = run.interrupted();
      // --stop-after ends the run here: a checkpoint, as on an interrupt, so that it goes on.
      const bool stop_here = cfg.stop_after_steps >= 0 && step >= cfg.stop_after_steps;
      // At an epoch's end the epoch's own checkpoint follows its evaluation (and the test loss's
      // check for divergence), whatever asks for one here.
      if (!cfg.checkpoint.empty() && step % spe != 0 &&
          ((cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0) || interrupted || stop_here)) {
        const StepStats window = trainer.drain_stats();
        run.check_finite(window.mean_loss(), epoch, step);
        epoch_stats += window;
        metrics_window += window;
        auto meta = run.metadata(step);
        if (step % spe != 0) put_epoch_stats(meta, epoch_stats);
        save_checkpoint(checkpoint_path(cfg.checkpoint, epoch + 1), run.net, {&opt}, meta, s);
      }
      stopped = stop_here || interrupted;
    }
    const StepStats rest = trainer.drain_stats();
    run.check_finite(rest.mean_loss(), epoch, step);
    epoch_stats += rest;
    run.progress.end_epoch();
    if (stopped && step % spe != 0) {  // stopped inside an epoch: no epoch report
      const std::string where = "in epoch " + std::to_string(epoch + 1) + " after step " + std::to_string(step % spe) +
                                " of " + std::to_string(spe);
      if (interrupted)
        run.stop_interrupted(where, run.epoch_checkpoint(epoch));
      else
        run.stop_at_step(where, run.epoch_checkpoint(epoch));
      break;
    }
    const double train_secs = seconds_since(epoch_start);
    run.end_epoch(epoch, step, epoch_stats, train_secs, epoch_images,
                  [&] { return evaluate(trainer, run.test_loader()); });
    if (!cfg.checkpoint.empty())
      save_checkpoint(checkpoint_path(cfg.checkpoint, epoch + 1), run.net, {&opt}, run.metadata(step), s);
    if (run.interrupted_after_epoch(epoch, run.epoch_checkpoint(epoch)))
      break;
    if (stopped && !interrupted && epoch + 1 < cfg.epochs) {  // --stop-after at an epoch's end
      run.stop_at_step("after epoch " + std::to_string(epoch + 1) + " of " + std::to_string(cfg.epochs),
                       run.epoch_checkpoint(epoch));
      break;
    }
    if (stopped || run.stop_at_deadline(epoch, next_epoch_seconds(train_secs, seconds_since(epoch_start) - train_secs,
                                                                  spe - first_index, spe)))
      break;
  }
  run.result.steps = step;
  return run.result;
}

std::string cuts_str(const std::vector<size_t>& cuts) {
  std::string s;
  for (size_t c : cuts) s += (s.empty() ? "" : ",") + std::to_string(c);
  return s;
}

std::vector<double> measure_block_costs(Run& run) {
  const data::Batch& batch = run.loader->next();
  Tensor x = new_activation(*run.stream, batch.images.shape());
  ops::copy(*run.stream, batch.images, x);
  run.stream->synchronize();
  run.loader->seek(0, 0);
  return train::measure_block_costs(run.net, *run.stream, x, activation_dtype(run.cfg));
}

// What the model's blocks are, for the messages about cuts.
std::string blocks_of(const std::string& model, size_t blocks) {
  return detail::concat(model, " has ", blocks, " blocks: 0 the stem, ", blocks - 1, " the pooling+linear head");
}

// The cut points of the run's --split/--split-at, and `how` they were chosen (for the banner).
std::vector<size_t> resolve_cuts(Run& run, std::string& how) {
  const TrainConfig& cfg = run.cfg;
  // Measured times differ run to run, and so would the cuts: --deterministic counts FLOPs.
  const bool flops = cfg.split_by == "flops" || (cfg.split_by.empty() && cfg.deterministic);
  if (cfg.split_at == "fdg")
    how = "FDG's published cuts";
  else if (!cfg.split_at.empty())
    how = "cuts of --split-at";
  else if (flops)
    how = std::string("cuts balanced by counted FLOPs") + (cfg.split_by == "flops" ? "" : " (--deterministic)");
  else
    how = "cuts balanced by measured block times";
  return choose_cuts(cfg.model, run.net.size(), cfg.split, cfg.split_at, [&] {
    return flops ? run.net.block_forward_flops({cfg.batch_size, data::kCifarSide, data::kCifarSide, 3})
                 : measure_block_costs(run);
  });
}


TrainResult run_pipelined(Run& run) {
  const TrainConfig& cfg = run.cfg;
  // The pipeline drains at every epoch's end, ticking until the last delayed gradient is due: a
  // jitter of more ticks than an epoch has only stretches that drain (of 2^31 ticks, with no
  // batch left to read an interrupt between them, it ran until killed).
  SP_CHECK(cfg.staleness_jitter <= run.spe, "--staleness-jitter ", cfg.staleness_jitter,
           " is more ticks than an epoch has steps (", run.spe, "): give at most ", run.spe);
  std::map<std::string, std::string> resume_meta;
  if (!cfg.resume.empty()) resume_meta = io::read_safetensors(cfg.resume).metadata;
  PipelineConfig pc;
  pc.method = parse_pipeline_method(cfg.method);
  // A resumed run keeps the cut points it started with (measured cuts may differ run to run);
  // asked for another number of modules, or other explicit cuts, it is refused.
  std::string cuts_how = "cuts of the checkpoint";
  // Plain backprop computes the same bits over any cuts: its checkpoint goes on over the cuts asked
  // for (one module from graphs, say, after three), as a one-module run op by op takes it.
  if (resume_meta.count("cuts") && pc.method != PipelineMethod::BP) {
    pc.cuts = parse_cuts(resume_meta["cuts"]);
    const std::vector<size_t> asked = cfg.split_at.empty() ? std::vector<size_t>()
                                      : cfg.split_at == "fdg" ? layers::fdg_preset_cuts(cfg.model, cfg.split)
                                                              : parse_cuts(cfg.split_at);
    SP_CHECK(cfg.split_at.empty() ? int(pc.cuts.size()) + 1 == cfg.split : asked == pc.cuts, "--resume: ",
             cfg.resume, " was written by a run over ", pc.cuts.size() + 1, " modules (cuts ",
             resume_meta["cuts"].empty() ? "none" : resume_meta["cuts"], "); resume with the same --split/--split-at");
  } else {
    check_device_count(cfg.devices, cfg.split, cfg.split_at);  // before the cuts are measured
    pc.cuts = resolve_cuts(run, cuts_how);
  }
  for (const std::string& d : cfg.devices) pc.devices.push_back(Device::parse(d));
  pc.shrink = cfg.shrink;
  pc.label_smoothing = cfg.label_smoothing;
  pc.staleness_jitter = cfg.staleness_jitter;
  pc.jitter_seed = cfg.seed;
  pc.recompute = cfg.recompute;
  pc.weight_stash = cfg.weight_stash;
  pc.graphs = cfg.graphs;
  pc.plan_graph_memory = cfg.graph_memory == "planned";
  pc.activation_dtype = activation_dtype(cfg);
  pc.sgd = SgdConfig{cfg.momentum, cfg.weight_decay, cfg.nesterov};
  PipelineTrainer pipe(run.net, pc);
  const int K = pipe.num_modules();
  auto opts = pipe.optimizers();
  const std::vector<const Sgd*> const_opts(opts.begin(), opts.end());
  const int64_t spe = run.spe;
  int64_t step = 0;
  if (!cfg.resume.empty()) {
    auto meta = load_model_checkpoint(cfg.resume, cfg.model, run.net, opts, *run.stream);
    step = run.check_resume(meta);
    SP_CHECK(step % spe == 0, "--resume: ", cfg.resume,
             " was written inside an epoch; a run through the decoupled "
             "trainer (--method ddg or fdg, --split, --split-at, --devices, --graphs, --trace, ...) resumes at epoch "
             "boundaries only");
    pipe.set_steps(step);
    run.result.already_complete = step == int64_t(cfg.epochs) * spe;
    run.loader->seek(step / spe, 0);
  }
  std::string layout;
  for (int k = 0; k < K; ++k)
    layout += (k ? " | " : "") + std::to_string(pipe.blocks(k).second - pipe.blocks(k).first) + " blocks (d=" +
              std::to_string(pipe.delay(k)) + ")";
  run.announce(std::string(pipeline_method_name(pc.method)) + " over " + std::to_string(K) + " modules [" + layout +
                   (K > 1 ? "; " + cuts_how : "") + "], shrink " + json_number(cfg.shrink) +
                   (cfg.staleness_jitter ? ", staleness jitter " + std::to_string(cfg.staleness_jitter) : "") +
                   (cfg.recompute ? ", recompute" : "") + (cfg.weight_stash ? ", weight stashing" : "") +
                   (cfg.graphs ? ", graphs" : ""),
               step, "cuts", cuts_str(pc.cuts));

  // A trace from an earlier run would look like this one's where this one stops before its
  // first epoch ends (interrupted, failed): it goes now, and the first epoch writes the new one.
  if (!cfg.trace.empty()) std::remove(cfg.trace.c_str());
  std::string last_saved = cfg.resume;  // the checkpoint of the last epoch boundary passed
  for (int epoch = int(step / spe); epoch < cfg.epochs; ++epoch) {
    const auto epoch_start = Clock::now();
    run.begin_epoch_peak();  // the epoch's training peak, evaluation excluded
    int64_t fed = 0, images = 0;
    // The rate of the ticks that have ended, from the first full one on. Batch t is fed at the
    // start of tick t, when the host has seen tick t - 2 end (it runs two ticks ahead of the
    // streams), and the first `fill` ticks fill the pipeline with less than a tick's work: the
    // rate of the batches fed so far over the time since the start was many times too high early
    // in an epoch (100,000 img/s on a CPU doing 400). Until a full tick has ended: no rate ("?").
    const int64_t fill = pipe.delay(0);
    Clock::time_point steady_start{};
    const PipelineTrainer::BatchSource source = [&](Tensor* x, Tensor* y) {
      if (fed == spe || run.interrupted()) return false;
      const data::Batch& b = run.loader->next();
      *x = b.images;
      *y = b.labels;
      images += b.images.size(0);
      if (fed == fill + 1) steady_start = Clock::now();  // tick fill - 1 has ended: tick `fill` begins
      if (fed > 0 && run.progress.wants_update(fed)) {
        const int64_t ticks = fed - 1 - fill;  // ticks fill .. fed - 2 have ended since steady_start
        const double el = ticks > 0 ? std::chrono::duration<double>(Clock::now() - steady_start).count() : 0.0;
        const double per_tick = ticks > 0 && el > 0 ? el / double(ticks) : std::nan("");
        const int64_t ticks_left = spe - fed + fill + int64_t(cfg.epochs - epoch - 1) * (spe + fill);
        run.progress.update(epoch, fed, nullptr, run.sched.at(step + fed), double(cfg.batch_size) / per_tick,
                            per_tick * double(ticks_left));
      }
      ++fed;
      return true;
    };
    const PipelineGraphStats graphs_before = pipe.graph_stats();
    const bool traced = !cfg.trace.empty() && run.result.epochs.empty();  // the first epoch of this process
    pipe.set_trace_ops(traced && cfg.trace_ops);
    const PipelineEpochStats st = pipe.run_epoch(source, [&](int64_t s) { return run.sched.at(s); });
    pipe.set_trace_ops(false);
    const PipelineGraphStats graphs_after = pipe.graph_stats();
    run.progress.end_epoch();
    run.check_finite(st.train.mean_loss(), epoch, step + fed);
    if (fed < spe) {  // interrupted: the batches fed have drained; the epoch is dropped
      run.stop_interrupted("in epoch " + std::to_string(epoch + 1) + " after " + std::to_string(fed) + " of " +
                               std::to_string(spe) + " batches, which are dropped (a pipelined run is checkpointed "
                               "at epoch boundaries only)",
                           last_saved);
      break;
    }
    step += spe;
    // Each module's busy share of the epoch's wall time, and its idle (waiting) time.
    std::string busy, idle, busy_json = ",\"modules\":[";
    for (int k = 0; k < K; ++k) {
      const double pct = 100.0 * st.busy_ms[size_t(k)] / st.wall_ms, idle_ms = st.wall_ms - st.busy_ms[size_t(k)];
      char buf[96];
      std::snprintf(buf, sizeof buf, "%s%.0f%%", k ? "/" : "", pct);
      busy += buf;
      std::snprintf(buf, sizeof buf, "%s%.2f", k ? "/" : "", idle_ms / 1e3);
      idle += buf;
      busy_json += std::string(k ? "," : "") + "{\"busy_pct\":" + json_number(pct) +
                   ",\"idle_ms\":" + json_number(idle_ms) + "}";
    }
    const double host_wait_pct = 100.0 * st.host_wait_ms / st.wall_ms;
    busy_json += "],\"host_wait_pct\":" + json_number(host_wait_pct) + ",\"ticks\":" + std::to_string(st.ticks) +
                 ",\"activation_bytes\":" + std::to_string(st.peak_saved_bytes);
    if (cfg.weight_stash) busy_json += ",\"stash_bytes\":" + std::to_string(st.peak_stash_bytes);
    char activations[96];
    std::snprintf(activations, sizeof activations, " | activations %.0f MiB", double(st.peak_saved_bytes) / (1 << 20));
    if (cfg.weight_stash)
      std::snprintf(activations + std::strlen(activations), sizeof activations - std::strlen(activations),
                    ", weight stash %.1f MiB", double(st.peak_stash_bytes) / (1 << 20));
    char host[40];
    std::snprintf(host, sizeof host, " | host waited %.0f%%", host_wait_pct);
    std::string extra = " | busy " + busy + ", idle " + idle + " s" + host + activations;
    if (cfg.graphs) {
      const int64_t replays = graphs_after.replays - graphs_before.replays;
      const int64_t units = replays + (graphs_after.eager - graphs_before.eager) +
                            (graphs_after.captured - graphs_before.captured);
      run.result.graph_replays += replays;
      extra += " | " + std::to_string(replays) + "/" + std::to_string(units) + " units from graphs";
      busy_json += ",\"graph_units\":" + std::to_string(units) + ",\"graph_replays\":" + std::to_string(replays) +
                   ",\"graph_arena_bytes\":" + std::to_string(graphs_after.arena_bytes);
    }
    run.end_epoch(epoch, step, st.train, seconds_since(epoch_start), images,
                  [&] {
                    data::BatchLoader& test = run.test_loader();
                    int64_t given = 0;
                    return pipe.evaluate([&](Tensor* x, Tensor* y) {
                      if (given == test.batches_per_epoch()) return false;
                      const data::Batch& b = test.next();
                      *x = b.images, *y = b.labels;
                      ++given;
                      return true;
                    });
                  },
                  extra, busy_json);
    if (traced) write_trace(cfg.trace, st, K, epoch);
    // Without --checkpoint, the state to go on from is no longer in any file.
    last_saved = run.epoch_checkpoint(epoch);
    if (!last_saved.empty())
      save_checkpoint(last_saved, run.net, const_opts, run.metadata(step, "cuts", cuts_str(pc.cuts)), *run.stream);
    if (run.interrupted_after_epoch(epoch, last_saved)) break;
    if (run.stop_at_deadline(epoch, seconds_since(epoch_start))) break;
  }
  run.result.steps = step;
  return run.result;
}

}  // namespace

std::vector<size_t> parse_cuts(const std::string& text) {
  std::vector<size_t> cuts;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    SP_CHECK(!item.empty() && item.size() <= 9 && item.find_first_not_of("0123456789") == std::string::npos,
             "--split-at expects comma-separated block indices (or 'fdg'), got '", text, "'");
    cuts.push_back(size_t(std::stoul(item)));
  }
  return cuts;
}

std::vector<size_t> choose_cuts(const std::string& model, size_t blocks, int split, const std::string& split_at,
                                const std::function<std::vector<double>()>& block_costs) {
  if (split_at == "fdg") return layers::fdg_preset_cuts(model, split);
  if (!split_at.empty()) {
    std::vector<size_t> cuts = parse_cuts(split_at);
    SP_CHECK(split == 1 || int(cuts.size()) + 1 == split, "--split ", split, " and --split-at ", split_at,
             " disagree (", cuts.size() + 1, " modules)");
    for (size_t i = 0; i < cuts.size(); ++i)
      SP_CHECK(cuts[i] >= 1 && cuts[i] < blocks && (i == 0 || cuts[i] > cuts[i - 1]), "--split-at ", split_at,
               ": the cuts are the first blocks of modules 2..K, ascending, in 1..", blocks - 1, " (",
               blocks_of(model, blocks), ")");
    return cuts;
  }
  if (split <= 1) return {};
  SP_CHECK(size_t(split) <= blocks, "--split ", split, ": at most one module per block, and ",
           blocks_of(model, blocks));
  return balanced_cuts(block_costs(), split);
}

void check_graph_memory(bool graphs, const std::string& graph_memory) {
  SP_CHECK(graph_memory == "planned" || graph_memory == "bump", "--graph-memory must be planned or bump, got '",
           graph_memory, "'");
  SP_CHECK(graphs || graph_memory == "planned", "--graph-memory ", graph_memory,
           " lays out the memory of --graphs' captured ticks: give --graphs too");
}

void check_cuts(const std::string& model, int split, const std::string& split_at) {
  if (split <= 1 && split_at.empty()) return;
  const size_t blocks = layers::build_resnet(model).size();
  (void)choose_cuts(model, blocks, split, split_at, [&] { return std::vector<double>(blocks, 1.0); });
}

void check_shrink(const std::string& method, float shrink) {
  SP_CHECK(shrink > 0 && shrink <= 1, "--shrink must be in (0, 1], got ", shrink);
  SP_CHECK(method != "bp" || shrink == 1.f, "--shrink applies to --method ddg and fdg: with bp, whose ",
           "gradients are not stale, it would only scale the lower modules' gradients");
}

DType activation_dtype(const std::string& precision) {
  SP_CHECK(precision == "fp32" || precision == "bf16", "--precision must be fp32 or bf16, got '", precision, "'");
  return precision == "bf16" ? DType::BF16 : DType::F32;
}

// Per-block cost (forward + backward milliseconds) of one training batch, measured on s's
// device. BN running statistics are restored afterwards, so measuring leaves no trace.
std::vector<double> measure_block_costs(Network& net, Stream& s, const Tensor& images, DType activation_dtype) {
  ModuleState st = net.state();
  std::vector<Tensor> saved_buffers;
  for (auto& [name, b] : st.buffers) {
    Tensor copy = Tensor::empty(b->shape(), b->dtype(), b->device());
    ops::copy(s, *b, copy);
    saved_buffers.push_back(copy);
  }
  const Drain drain{s};  // on an error below, no copy into saved_buffers is still queued as they go
  std::vector<int64_t> saved_counters;
  for (auto& [name, c] : st.counters) saved_counters.push_back(*c);

  const Tensor x = network_input(s, images, activation_dtype);
  net.set_training(true);
  const size_t n = net.size();
  std::vector<double> cost(n, 0.0);
  std::vector<Context> ctx(n);
  for (int rep = 0; rep < 2; ++rep) {  // the first pass warms up caches and the allocator
    std::vector<std::unique_ptr<Event>> ev;
    for (size_t i = 0; i < 2 * n + 2; ++i) ev.push_back(make_event(s.device(), true));
    Tensor h = x;
    s.record(*ev[0]);
    for (size_t i = 0; i < n; ++i) {
      h = net.block(i).forward(s, h, ctx[i]);
      s.record(*ev[i + 1]);
    }
    Tensor g = new_activation(s, h.shape(), h.dtype());
    ops::scale(s, 1.f / float(h.numel()), h, g);  // any gradient will do; this one has h's dtype
    s.record(*ev[n + 1]);
    for (size_t i = n; i-- > 0;) {
      g = net.block(i).backward(s, g, ctx[i], i > 0);
      s.record(*ev[2 * n + 1 - i]);
    }
    s.synchronize();
    if (rep == 1)
      for (size_t i = 0; i < n; ++i)
        cost[i] = ev[i + 1]->elapsed_ms_since(*ev[i]) + ev[2 * n + 1 - i]->elapsed_ms_since(*ev[2 * n - i]);
  }
  for (size_t i = 0; i < st.buffers.size(); ++i) ops::copy(s, saved_buffers[i], *st.buffers[i].second);
  for (size_t i = 0; i < st.counters.size(); ++i) *st.counters[i].second = saved_counters[i];
  s.synchronize();
  return cost;
}

double next_epoch_seconds(double train_secs, double other_secs, int64_t steps_run, int64_t steps_per_epoch) {
  return train_secs * double(steps_per_epoch) / double(std::max<int64_t>(1, steps_run)) + other_secs;
}

void check_module_devices(Device dev, const std::vector<std::string>& devices) {
  for (const std::string& name : devices) {
    const Device d = Device::parse(name);
    // The network is built, its cuts measured, and it is checkpointed through --device: a
    // stream of the modules' kind (a CUDA stream copies to and from a GPU).
    SP_CHECK(d.type == dev.type, "--devices ", name, " and --device ", dev.str(), " must be the same kind (",
             "the run builds and checkpoints the modules through --device): give --device ", Device{d.type, 0}.str());
    require_device(d);
  }
  SP_CHECK(devices.size() != 1 || Device::parse(devices[0]) == dev, "--devices with one device is --device ",
           devices.empty() ? "" : devices[0], ": give that (or one device per module)");
}

size_t module_count(int split, const std::string& split_at) {
  return !split_at.empty() && split_at != "fdg" ? parse_cuts(split_at).size() + 1 : size_t(split);
}

void check_device_count(const std::vector<std::string>& devices, int split, const std::string& split_at) {
  const size_t modules = module_count(split, split_at);
  SP_CHECK(devices.size() <= 1 || devices.size() == modules, "--devices names ", devices.size(), " devices for ",
           modules, " modules: give one per module (--split K, --split-at)");
}

std::vector<Device> devices_in_use(Device dev, const std::vector<std::string>& devices) {
  std::vector<Device> out{dev};
  for (const std::string& name : devices)
    if (const Device d = Device::parse(name); std::find(out.begin(), out.end(), d) == out.end()) out.push_back(d);
  return out;
}

std::chrono::steady_clock::time_point deadline_after(double seconds) {
  using namespace std::chrono;
  const auto now = steady_clock::now();
  // Beyond ~30 years (or inf/nan) there is no limit; duration_cast would overflow first.
  if (!(seconds > 0) || !(seconds < 1e9)) return steady_clock::time_point::max();
  return now + duration_cast<steady_clock::duration>(duration<double>(seconds));
}

std::vector<std::pair<std::string, std::string>> run_outputs(const TrainConfig& c) {
  std::vector<std::pair<std::string, std::string>> out;
  if (!c.log.empty()) out.emplace_back("--log", c.log);
  if (!c.metrics.empty()) out.emplace_back("--metrics", c.metrics);
  if (!c.checkpoint.empty()) out.emplace_back("--checkpoint", c.checkpoint);
  if (!c.trace.empty()) out.emplace_back("--trace", c.trace);
  return out;
}

std::string same_file(const std::string& path) {
  // Absolute first: weakly_canonical leaves a relative path relative when its first part does not
  // exist yet.
  const auto absolute = std::filesystem::absolute(path);
  std::error_code ec;
  const auto canonical = std::filesystem::weakly_canonical(absolute, ec);
  // An existing file with other hard links is named by its device and inode, which every one of
  // its names shares (two names of one file passed as --metrics and --log interleaved both).
  struct stat st {};
  if (!ec && ::stat(canonical.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink > 1)
    return "inode " + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
  return ec ? absolute.lexically_normal().string() : canonical.string();
}

bool may_write(const std::string& output, const std::string& file) {
  const size_t at = output.find("{epoch}");
  if (at == std::string::npos) return output == file;
  const std::string head = output.substr(0, at), tail = output.substr(at + 7);
  if (file.size() <= head.size() + tail.size() || file.compare(0, head.size(), head) != 0 ||
      file.compare(file.size() - tail.size(), tail.size(), tail) != 0)
    return false;
  const std::string middle = file.substr(head.size(), file.size() - head.size() - tail.size());
  return middle.find_first_not_of("0123456789") == std::string::npos;
}

// Two patterns are taken to name the same file for some epochs, conservatively, where one's head is the
// other's followed by digits only, and one's tail digits followed by the other's (a{epoch}.st
// and a1{epoch}.st both write a11.st; a{epoch}.st and ab{epoch}.st never meet).
bool may_collide(const std::string& a, const std::string& b) {
  const size_t at_a = a.find("{epoch}"), at_b = b.find("{epoch}");
  if (at_a == std::string::npos || at_b == std::string::npos) return may_write(a, b) || may_write(b, a);
  const std::string head_a = a.substr(0, at_a), tail_a = a.substr(at_a + 7);
  const std::string head_b = b.substr(0, at_b), tail_b = b.substr(at_b + 7);
  const auto digits = [](const std::string& s) { return s.find_first_not_of("0123456789") == std::string::npos; };
  const auto head_digits = [&](const std::string& longer, const std::string& shorter) {
    return longer.compare(0, shorter.size(), shorter) == 0 && digits(longer.substr(shorter.size()));
  };
  const auto digits_tail = [&](const std::string& longer, const std::string& shorter) {
    const size_t extra = longer.size() - shorter.size();
    return longer.compare(extra, shorter.size(), shorter) == 0 && digits(longer.substr(0, extra));
  };
  const bool heads = head_a.size() >= head_b.size() ? head_digits(head_a, head_b) : head_digits(head_b, head_a);
  const bool tails = tail_a.size() >= tail_b.size() ? digits_tail(tail_a, tail_b) : digits_tail(tail_b, tail_a);
  return heads && tails;
}

// A file the run writes (--checkpoint at the end of an epoch, --trace after the first, --metrics,
// --log) must go to a directory that exists and takes new files, and not be a directory itself:
// checked before any training, so that a mistyped path fails at once instead of after the first
// epoch.
void check_output_directory(const std::string& flag, const std::string& file) {
  if (file.empty()) return;
  const std::filesystem::path parent = std::filesystem::path(file).parent_path();
  const std::string dir = parent.empty() ? "." : parent.string();
  std::error_code ec;
  SP_CHECK(std::filesystem::is_directory(dir, ec), flag, " ", file, ": directory '", dir, "' does not exist");
  SP_CHECK(::access(dir.c_str(), W_OK | X_OK) == 0, flag, " ", file, ": cannot write in directory '", dir,
           "': ", std::strerror(errno));
  SP_CHECK(!std::filesystem::is_directory(file, ec), flag, " ", file, ": is a directory; give a file name in it");
  // Written to a temporary file and renamed over the path: a device or pipe standing there would
  // be replaced (--checkpoint /dev/null, run as root, replaced the system's).
  SP_CHECK(!std::filesystem::exists(file, ec) || std::filesystem::is_regular_file(file, ec), flag, " ", file,
           ": is not a regular file, and the run would replace it; give a file's name");
}

// --log and --metrics are appended to: an existing file we may write is enough (/dev/null, a log
// in a directory we may not create files in); else the file is created, as the others are.
void check_append_output(const std::string& flag, const std::string& file) {
  std::error_code ec;
  if (!file.empty() && std::filesystem::exists(file, ec) && !std::filesystem::is_directory(file, ec)) {
    SP_CHECK(::access(file.c_str(), W_OK) == 0, flag, " ", file, ": cannot write to it: ", std::strerror(errno));
    return;
  }
  check_output_directory(flag, file);
}

namespace {

// Whether a run goes through the decoupled trainer. A trace times its module stages: a
// one-module run traced goes through it, the same training bit for bit (tests/test_pipeline.cpp:
// one module equals plain backprop).
bool pipelined_run(const TrainConfig& cfg) {
  return cfg.method != "bp" || cfg.split > 1 || !cfg.split_at.empty() || cfg.devices.size() > 1 ||
         cfg.staleness_jitter > 0 || cfg.recompute || cfg.weight_stash || cfg.graphs || !cfg.trace.empty();
}

// Whether an output path is (or will be) a file of the run's own, not a device or pipe that
// several outputs may share (--metrics /dev/stdout --log /dev/stderr).
bool written_file(const std::string& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  return ec || !std::filesystem::exists(st) || std::filesystem::is_regular_file(st);
}

}  // namespace

void check_config(const TrainConfig& cfg) {
  check_device_options(cfg, Device::parse(cfg.device));
  const std::vector<std::string>& models = layers::resnet_names();
  if (std::find(models.begin(), models.end(), cfg.model) == models.end()) {
    std::string known;
    for (const std::string& m : models) known += (known.empty() ? "" : ", ") + m;
    SP_CHECK(false, "unknown model '", cfg.model, "' (known: ", known, ")");
  }
  SP_CHECK(cfg.epochs > 0 && cfg.batch_size > 0, "--epochs and --batch-size must be positive");
  SP_CHECK(cfg.split >= 1, "--split must be at least 1");
  SP_CHECK(cfg.split_by.empty() || cfg.split_by == "time" || cfg.split_by == "flops",
           "--split-by must be time or flops, got '", cfg.split_by, "'");
  SP_CHECK(!(cfg.deterministic && cfg.split_by == "time"), "--split-by time measures the cuts, which differ run to ",
           "run: it does not go with --deterministic (give --split-by flops, or --split-at)");
  SP_CHECK(cfg.cutout >= 0 && cfg.cutout <= data::kCifarSide, "--cutout must be in 0..", data::kCifarSide, ", got ",
           cfg.cutout);
  SP_CHECK(cfg.cutout == 0 || cfg.augment, "--cutout is an augmentation: it does not go with --no-augment");
  parse_pipeline_method(cfg.method);  // reject unknown methods before any work
  check_graph_memory(cfg.graphs, cfg.graph_memory);
  SP_CHECK(std::isfinite(cfg.lr) && cfg.lr >= 0, "--lr must be a finite number >= 0, got ", cfg.lr);
  SP_CHECK(cfg.momentum >= 0 && cfg.momentum < 1, "--momentum must be in [0, 1), got ", cfg.momentum);
  SP_CHECK(!cfg.nesterov || cfg.momentum > 0, "--nesterov needs a --momentum > 0 (as PyTorch's SGD)");
  SP_CHECK(std::isfinite(cfg.weight_decay) && cfg.weight_decay >= 0,
           "--weight-decay must be a finite number >= 0, got ", cfg.weight_decay);
  SP_CHECK(cfg.label_smoothing >= 0 && cfg.label_smoothing < 1, "--label-smoothing must be in [0, 1), got ",
           cfg.label_smoothing);
  SP_CHECK(std::isfinite(cfg.gamma) && cfg.gamma > 0, "--gamma must be a finite number > 0, got ", cfg.gamma);
  SP_CHECK(std::isfinite(cfg.warmup_epochs) && cfg.warmup_epochs >= 0 && cfg.warmup_epochs <= cfg.epochs,
           "--warmup-epochs must be in [0, --epochs], got ", cfg.warmup_epochs);
  SP_CHECK(cfg.checkpoint_every == 0 || !cfg.checkpoint.empty(),
           "--checkpoint-every says how often to write --checkpoint FILE: give that too");
  SP_CHECK(cfg.staleness_jitter >= 0, "--staleness-jitter must not be negative");
  SP_CHECK(!cfg.trace_ops || !cfg.trace.empty(), "--trace-ops adds the ops to --trace FILE's timeline: give --trace");
  SP_CHECK(!cfg.trace_ops || !cfg.graphs,
           "--trace-ops times the ops issued one by one, and graph replays issue none: drop --graphs");
  check_shrink(cfg.method, cfg.shrink);
  SP_CHECK(cfg.method != "bp" || cfg.staleness_jitter == 0, "--staleness-jitter applies to --method ddg and fdg: ",
           "with bp, whose gradients are not stale, it would make them so");
  // The outputs: "{epoch}" once at most, in the checkpoint's file name (checkpoint_path fills in
  // one, and a directory per epoch would have to exist beforehand); each in a directory that
  // exists; no two naming one file (a checkpoint or trace renamed over the metrics or the log
  // took their place, and their later lines went to an unlinked file).
  const size_t epoch_at = cfg.checkpoint.find("{epoch}");
  SP_CHECK(epoch_at == cfg.checkpoint.rfind("{epoch}"), "--checkpoint ", cfg.checkpoint,
           ": {epoch} may stand once in the name");
  SP_CHECK(epoch_at == std::string::npos ||
               std::filesystem::path(cfg.checkpoint).parent_path().string().find("{epoch}") == std::string::npos,
           "--checkpoint ", cfg.checkpoint, ": {epoch} may stand in the file's name, not in its directory");
  const auto outputs = run_outputs(cfg);
  // --resume is read before the run writes: only --checkpoint, which replaces it whole at the next
  // checkpoint, may name it (metrics or a log appended to it, a trace put in its place, destroyed
  // the one copy of the run).
  for (const auto& [flag, file] : outputs)
    SP_CHECK(cfg.resume.empty() || flag == "--checkpoint" || same_file(file) != same_file(cfg.resume), flag, " ", file,
             " names the --resume file: give the run's ", flag, " another");
  for (const auto& [flag, file] : outputs)
    flag == "--log" || flag == "--metrics" ? check_append_output(flag, file) : check_output_directory(flag, file);
  for (size_t a = 0; a < outputs.size(); ++a)
    for (size_t b = a + 1; b < outputs.size(); ++b)
      SP_CHECK(!written_file(outputs[a].second) || !written_file(outputs[b].second) ||
                   !may_collide(same_file(outputs[a].second), same_file(outputs[b].second)),
               outputs[a].first, " ", outputs[a].second, " and ", outputs[b].first, " ", outputs[b].second,
               " may name the same file: give each output its own");
  // What the decoupled trainer would refuse only once the data is loaded and the model built.
  SP_CHECK(!pipelined_run(cfg) || (cfg.checkpoint_every == 0 && cfg.stop_after_steps < 0),
           "--checkpoint-every and --stop-after need --method bp with one module, one device and none of --graphs, "
           "--trace, --recompute or --weight-stash: a pipeline is checkpointed at epoch boundaries, when it has "
           "drained");
  SP_CHECK(!cfg.graphs || (cfg.staleness_jitter == 0 && !cfg.recompute && !cfg.weight_stash),
           "--graphs does not go with --staleness-jitter, --recompute or --weight-stash, whose work changes from tick "
           "to tick");
  if (pipelined_run(cfg) && cfg.resume.empty()) check_device_count(cfg.devices, cfg.split, cfg.split_at);
  check_cuts(cfg.model, cfg.split, cfg.split_at);
}

TrainResult run_training(const TrainConfig& cfg, const data::Dataset& train_set, const data::Dataset& test_set) {
  check_config(cfg);
  // Process-wide: gemm and convolutions on CUDA tensors go to cuBLASLt/cuDNN with --kernels
  // vendor (check_device_options admits vendor only on a GPU, so only in a CUDA build).
  const bool vendor = cfg.kernels == "vendor";
  ops::set_kernel_backend(vendor ? ops::KernelBackend::Vendor : ops::KernelBackend::Custom);
  if (!cfg.mainloop.empty()) ops::set_tensor_core_mainloop(cfg.mainloop);
#if STALEPROP_WITH_CUDA
  if (vendor) kernels::vendor::set_deterministic(cfg.deterministic);
#endif
  SP_CHECK(train_set.size() > 0, "the training set is empty");
  Run run(cfg, train_set, test_set);
  return pipelined_run(cfg) ? run_pipelined(run) : run_backprop(run);
}

EvalResult evaluate_checkpoint(const std::string& checkpoint, std::string model, const std::string& device,
                               const data::Dataset& test_set, int64_t batch_size, std::string precision) {
  if (model.empty() || precision.empty()) {
    auto meta = io::read_safetensors(checkpoint).metadata;
    if (model.empty()) {
      model = meta["model"];
      SP_CHECK(!model.empty(), checkpoint, ": no model name in the metadata; pass --model");
      const std::vector<std::string>& known = layers::resnet_names();
      SP_CHECK(std::find(known.begin(), known.end(), model) != known.end(), checkpoint, ": its metadata names model '",
               model, "', which this build does not know; pass --model");
    }
    if (precision.empty()) {
      precision = meta["precision"].empty() ? "fp32" : meta["precision"];
      SP_CHECK(precision == "fp32" || precision == "bf16", checkpoint, ": its metadata names precision '", precision,
               "' (fp32 or bf16 were expected); pass --precision");
    }
  }
  const DType dt = activation_dtype(precision);  // refuses anything but fp32 and bf16
  const Device dev = Device::parse(device);
  require_device(dev);
  auto stream = make_stream(dev);
  Network net = layers::build_resnet(model, data::kCifarClasses, 0);
  net.to(dev, *stream);
  load_model_checkpoint(checkpoint, model, net, {}, *stream);
  Sgd unused(net.state().params, SgdConfig{}, *stream);
  const auto loader = make_eval_loader(test_set, batch_size);
  BackpropTrainer trainer(net, unused, *stream, 0.f, dt);
  const Drain drain{*stream};  // an error while evaluating leaves no copy from the loader's buffers queued
  const StepStats st = evaluate(trainer, *loader);
  return {st.mean_loss(), st.accuracy(), st.samples, precision};
}

}  // namespace sp::train
