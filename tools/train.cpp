#include "tools/train.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "engine/checkpoint.h"
#include "engine/ops.h"
#include "engine/safetensors.h"
#include "engine/schedule.h"
#include "engine/trainer.h"
#include "kernels/common/error.h"
#include "kernels/cpu/parallel.h"
#include "layers/resnet.h"

namespace sp::train {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

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

// Progress on the terminal: a redrawn bar on a TTY, plain lines otherwise.
class Progress {
 public:
  Progress(const std::string& mode, int64_t steps_per_epoch, int epochs) : spe_(steps_per_epoch), epochs_(epochs) {
    SP_CHECK(mode == "auto" || mode == "bar" || mode == "plain" || mode == "none",
             "--progress must be auto, bar, plain or none, got '", mode, "'");
    bar_ = mode == "bar" || (mode == "auto" && isatty(STDOUT_FILENO));
    quiet_ = mode == "none";
    plain_every_ = std::max<int64_t>(1, steps_per_epoch / 10);
  }
  bool wants_update(int64_t index_in_epoch) const {
    if (quiet_) return false;
    return bar_ || (index_in_epoch + 1) % plain_every_ == 0 || index_in_epoch + 1 == spe_;
  }
  void update(int epoch, int64_t index_in_epoch, const StepStats& st, float lr, double ips, double eta_s) {
    if (quiet_) return;
    if (bar_) {
      const int width = 24, filled = int(width * (index_in_epoch + 1) / std::max<int64_t>(1, spe_));
      std::printf("\repoch %d/%d [%s%s] %lld/%lld loss %.4f acc %5.1f%% lr %.4g %.0f img/s ETA %s   ", epoch + 1,
                  epochs_, std::string(size_t(filled), '#').c_str(), std::string(size_t(width - filled), '.').c_str(),
                  (long long)(index_in_epoch + 1), (long long)spe_, st.mean_loss(), 100 * st.accuracy(), lr, ips,
                  fmt_duration(eta_s).c_str());
    } else {
      std::printf("epoch %d/%d step %lld/%lld loss %.4f acc %.1f%% lr %.4g %.0f img/s ETA %s\n", epoch + 1, epochs_,
                  (long long)(index_in_epoch + 1), (long long)spe_, st.mean_loss(), 100 * st.accuracy(), lr, ips,
                  fmt_duration(eta_s).c_str());
    }
    std::fflush(stdout);
  }
  void end_epoch() {
    if (bar_ && !quiet_) std::printf("\n");
  }
  bool quiet() const { return quiet_; }

 private:
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

LrSchedule make_schedule(const TrainConfig& cfg, int64_t steps_per_epoch) {
  LrSchedule sch;
  sch.kind = LrSchedule::parse_kind(cfg.schedule);
  sch.base_lr = cfg.lr;
  sch.total_steps = steps_per_epoch * cfg.epochs;
  sch.warmup_steps = int64_t(std::llround(cfg.warmup_epochs * double(steps_per_epoch)));
  sch.gamma = cfg.gamma;
  for (double f : cfg.milestones) {
    SP_CHECK(f > 0 && f < 1, "--milestones are fractions of the run in (0, 1), got ", f);
    sch.milestones.push_back(int64_t(std::llround(f * double(sch.total_steps))));
  }
  return sch;
}

void check_device_options(const TrainConfig& cfg, Device dev) {
  SP_CHECK(cfg.precision == "fp32" || cfg.precision == "bf16", "--precision must be fp32 or bf16, got '",
           cfg.precision, "'");
  SP_CHECK(cfg.kernels == "custom" || cfg.kernels == "vendor", "--kernels must be custom or vendor, got '",
           cfg.kernels, "'");
  if (dev.is_cpu()) {
    SP_CHECK(cfg.precision == "fp32", "--precision bf16 needs a GPU (--device cuda); the CPU reference is fp32");
    SP_CHECK(cfg.kernels == "custom", "--kernels vendor selects cuBLAS/cuDNN and needs a GPU (--device cuda)");
  } else if (cfg.precision == "bf16") {
    throw NotSupportedError("--precision bf16: the bf16 GPU path is not built yet");
  }
}

std::map<std::string, std::string> run_metadata(const TrainConfig& cfg, int64_t step, int64_t steps_per_epoch) {
  return {{"format", "staleprop-checkpoint-1"},
          {"model", cfg.model},
          {"step", std::to_string(step)},
          {"steps_per_epoch", std::to_string(steps_per_epoch)},
          {"batch_size", std::to_string(cfg.batch_size)},
          {"seed", std::to_string(cfg.seed)},
          {"epochs", std::to_string(cfg.epochs)},
          {"schedule", cfg.schedule},
          {"lr", json_number(cfg.lr)}};
}

// Runs the eval-mode forward over a whole data set.
StepStats evaluate(BackpropTrainer& trainer, const data::Dataset& set, int64_t batch_size) {
  data::LoaderOptions lo;
  lo.batch_size = batch_size;
  lo.shuffle = false;
  lo.augment = false;
  data::BatchLoader loader(set, lo);
  for (int64_t i = 0; i < loader.batches_per_epoch(); ++i) {
    const data::Batch& b = loader.next();
    trainer.eval_step(b.images, b.labels);
    trainer.wait_input_consumed();  // the loader reuses the batch's memory after next()
  }
  return trainer.drain_stats();
}

}  // namespace

TrainResult run_training(const TrainConfig& cfg, const data::Dataset& train_set, const data::Dataset& test_set) {
  const Device dev = Device::parse(cfg.device);
  check_device_options(cfg, dev);
  SP_CHECK(cfg.epochs > 0 && cfg.batch_size > 0, "--epochs and --batch-size must be positive");
  SP_CHECK(train_set.size() > 0, "the training set is empty");
  auto stream = make_stream(dev);
  Stream& s = *stream;

  Network net = layers::build_resnet(cfg.model, data::kCifarClasses, cfg.seed);
  net.to(dev, s);
  Sgd opt(net.state().params, SgdConfig{cfg.momentum, cfg.weight_decay, cfg.nesterov}, s);

  data::LoaderOptions lo;
  lo.batch_size = cfg.batch_size;
  lo.shuffle = true;
  lo.augment = cfg.augment;
  lo.seed = cfg.seed;
  data::BatchLoader loader(train_set, lo);
  const int64_t spe = loader.batches_per_epoch();
  const LrSchedule sched = make_schedule(cfg, spe);

  int64_t step = 0;
  if (!cfg.resume.empty()) {
    auto meta = load_checkpoint(cfg.resume, net, &opt, s);
    SP_CHECK(meta["model"] == cfg.model, "--resume: ", cfg.resume, " holds a ", meta["model"], ", not a ", cfg.model);
    SP_CHECK(meta["steps_per_epoch"] == std::to_string(spe) && meta["seed"] == std::to_string(cfg.seed),
             "--resume: ", cfg.resume, " was written with other data, batch size or seed (steps/epoch ",
             meta["steps_per_epoch"], ", seed ", meta["seed"], "); resume with the same settings");
    step = std::stoll(meta["step"]);
    loader.seek(step / spe, step % spe);
  }

  BackpropTrainer trainer(net, opt, s, cfg.label_smoothing);
  Progress progress(cfg.progress, spe, cfg.epochs);
  MetricsLog metrics(cfg.metrics);
  if (!progress.quiet())
    std::printf("staleprop train: %s (%.2fM parameters) on %s, %lld train / %lld test images, batch %lld, "
                "%d epochs of %lld steps%s\n",
                cfg.model.c_str(), double(net.num_parameters()) / 1e6, dev.str().c_str(), (long long)train_set.size(),
                (long long)test_set.size(), (long long)cfg.batch_size, cfg.epochs, (long long)spe,
                dev.is_cpu() ? (", " + std::to_string(kernels::cpu::num_threads()) + " CPU threads").c_str() : "");

  TrainResult result;
  const auto run_start = Clock::now();
  for (int epoch = int(step / spe); epoch < cfg.epochs; ++epoch) {
    const auto epoch_start = Clock::now();
    StepStats epoch_stats, window;
    int64_t epoch_images = 0;
    const int64_t first_index = step % spe;
    for (int64_t i = first_index; i < spe; ++i) {
      const data::Batch& b = loader.next();
      SP_CHECK(b.epoch == epoch && b.index_in_epoch == i, "loader out of step");
      const float lr = sched.at(step);
      trainer.train_step(b.images, b.labels, lr);
      trainer.wait_input_consumed();
      ++step;
      epoch_images += b.images.size(0);
      if (progress.wants_update(i) || i + 1 == spe) {
        window = trainer.drain_stats();
        epoch_stats += window;
        const double el = seconds_since(epoch_start), ips = double(epoch_images) / el;
        const double per_step = el / double(i + 1 - first_index);
        const double eta = per_step * double(spe - i - 1 + int64_t(cfg.epochs - epoch - 1) * spe);
        progress.update(epoch, i, epoch_stats, lr, ips, eta);
        metrics.write("{\"event\":\"step\",\"epoch\":" + std::to_string(epoch + 1) + ",\"step\":" +
                      std::to_string(step) + ",\"loss\":" + json_number(window.mean_loss()) + ",\"train_acc\":" +
                      json_number(window.accuracy()) + ",\"lr\":" + json_number(lr) + ",\"images_per_s\":" +
                      json_number(ips) + ",\"elapsed_s\":" + json_number(seconds_since(run_start)) + "}");
      }
      if (!cfg.checkpoint.empty() && cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0)
        save_checkpoint(cfg.checkpoint, net, &opt, run_metadata(cfg, step, spe), s);
      if (cfg.stop_after_steps >= 0 && step >= cfg.stop_after_steps) break;
    }
    epoch_stats += trainer.drain_stats();
    const double train_secs = seconds_since(epoch_start);
    progress.end_epoch();
    if (cfg.stop_after_steps >= 0 && step >= cfg.stop_after_steps && step % spe != 0) {
      result.steps = step;
      return result;
    }
    EpochResult er{epoch + 1, epoch_stats.mean_loss(), epoch_stats.accuracy(), NAN, NAN,
                   double(epoch_images) / train_secs, 0};
    if (test_set.size() > 0) {
      const StepStats t = evaluate(trainer, test_set, cfg.eval_batch_size);
      er.test_loss = t.mean_loss();
      er.test_acc = t.accuracy();
    }
    er.elapsed_s = seconds_since(run_start);
    result.epochs.push_back(er);
    if (!progress.quiet())
      std::printf("epoch %d/%d: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%% | %.0f img/s | %s elapsed\n",
                  epoch + 1, cfg.epochs, er.train_loss, 100 * er.train_acc, er.test_loss, 100 * er.test_acc,
                  er.images_per_s, fmt_duration(er.elapsed_s).c_str());
    metrics.write("{\"event\":\"epoch\",\"epoch\":" + std::to_string(epoch + 1) + ",\"step\":" +
                  std::to_string(step) + ",\"loss\":" + json_number(er.train_loss) + ",\"train_acc\":" +
                  json_number(er.train_acc) + ",\"test_loss\":" + json_number(er.test_loss) + ",\"test_acc\":" +
                  json_number(er.test_acc) + ",\"lr\":" + json_number(sched.at(step - 1)) + ",\"images_per_s\":" +
                  json_number(er.images_per_s) + ",\"elapsed_s\":" + json_number(er.elapsed_s) + "}");
    if (!cfg.checkpoint.empty()) save_checkpoint(cfg.checkpoint, net, &opt, run_metadata(cfg, step, spe), s);
    if (cfg.stop_after_steps >= 0 && step >= cfg.stop_after_steps) break;
  }
  result.steps = step;
  return result;
}

EvalResult evaluate_checkpoint(const std::string& checkpoint, std::string model, const std::string& device,
                               const data::Dataset& test_set, int64_t batch_size) {
  if (model.empty()) {
    model = io::read_safetensors(checkpoint).metadata["model"];
    SP_CHECK(!model.empty(), checkpoint, ": no model name in the metadata; pass --model");
  }
  const Device dev = Device::parse(device);
  auto stream = make_stream(dev);
  Network net = layers::build_resnet(model, data::kCifarClasses, 0);
  net.to(dev, *stream);
  load_checkpoint(checkpoint, net, nullptr, *stream);
  Sgd unused(net.state().params, SgdConfig{}, *stream);
  BackpropTrainer trainer(net, unused, *stream, 0.f);
  const StepStats st = evaluate(trainer, test_set, batch_size);
  return {st.mean_loss(), st.accuracy(), st.samples};
}

}  // namespace sp::train
