// Several training runs at once in one process (`staleprop sweep`): each run on its own host
// thread with its own streams, so on a GPU their kernels share the device the way a decoupled
// pipeline's modules do, filling what one small model leaves idle. Runs are independent: each
// gives the same bits as it would alone (the kernels are deterministic and no buffer is
// shared; tests/test_sweep.cpp checks it). What they share: the process-wide settings
// (--kernels, --mainloop, --deterministic, CPU threads), the data sets they load alike, and
// the caching allocator: each run reports the peak of what it allocated itself, and the
// reserved peak is the process's.
#pragma once

#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "tools/train.h"

namespace sp::train {

// One run, as `staleprop train` would be given it.
struct SweepJob {
  std::string name;  // shown in the sweep's status lines
  TrainConfig cfg;
  std::string data_dir;  // as --data: resolved by data::resolve_cifar10_dir
  int64_t train_limit = -1, test_limit = -1;
  double time_limit_s = 0;  // as train --time-limit: from the run's own start (0: none)
};

enum class SweepStatus { Finished, StoppedAtDeadline, NotStarted, Failed, Interrupted };
const char* sweep_status_name(SweepStatus s);

struct SweepOutcome {
  std::string name;
  SweepStatus status = SweepStatus::NotStarted;
  std::string error;  // Failed: what was thrown
  TrainResult result;
  double seconds = 0;  // wall time of the run
};

struct SweepOptions {
  int parallel = 1;  // runs at once
  // Each run ends at the first epoch boundary where its next epoch would pass it
  // (TrainConfig::deadline), leaving its checkpoint to resume from. A waiting run does not start
  // once it has passed, nor when an epoch (as finished runs of the same model, devices,
  // precision, method, K, batch size and training-set size took) would not fit before it (the
  // first epoch of a run is never cut short).
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  std::FILE* status = stdout;  // a line when each run starts and ends (null: none)
  // The time at which a waiting run's start is judged against the deadline (null: the steady
  // clock). Only that judgement reads it; tests set it to reach the rule without waiting.
  std::function<std::chrono::steady_clock::time_point()> start_clock;
  // Once it says true, running runs end early (TrainConfig::interrupt) and waiting ones do not
  // start. Called from the runs' threads.
  std::function<bool()> interrupt;
};

// Runs the jobs, up to opts.parallel at once, in the order given. Throws sp::Error before any
// run starts when the jobs cannot share a process: different process-wide settings, two jobs
// writing the same file, or (with parallel > 1) a job printing to stdout instead of a --log.
// A run that fails is reported in its outcome (and at the end of its --log); the others go on.
std::vector<SweepOutcome> run_sweep(std::vector<SweepJob> jobs, const SweepOptions& opts);
// What an epoch's time depends on, besides the machine and the runs beside it: the model,
// devices, precision, method, number of modules (--split, or --split-at's cuts), batch size and
// number of training images. --time-limit judges a waiting run by the finished runs of its kind.
std::string run_kind(const TrainConfig& c, size_t train_images);
// The checks run_sweep makes first, for a caller that would rather know before it says anything.
void check_jobs(const std::vector<SweepJob>& jobs, const SweepOptions& opts);

// The words of a job line, as a POSIX shell splits them without expansions: blanks separate
// words; '...' is literal; "..." is literal but for \" \\ \$ \`; a backslash outside quotes
// keeps the next character. Python's shlex.join() output splits back to its words. Throws on
// an unterminated quote.
std::vector<std::string> split_command_line(const std::string& line);

}  // namespace sp::train
