#include "tools/sweep.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>

#include "kernels/common/error.h"
#include "tools/cifar10.h"

namespace sp::train {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

void check_jobs(const std::vector<SweepJob>& jobs, const SweepOptions& opts) {
  SP_CHECK(opts.parallel >= 1, "sweep: --parallel must be at least 1, got ", opts.parallel);
  SP_CHECK(!jobs.empty(), "sweep: no jobs");
  const TrainConfig& first = jobs.front().cfg;
  struct Writer {
    size_t job;
    std::string flag;
  };
  std::map<std::string, Writer> writer;  // file (same_file) -> the job writing it, and by which flag
  struct Output {
    size_t job;
    std::string flag, given, file;  // file: same_file(given)
  };
  std::vector<Output> written;
  for (size_t index = 0; index < jobs.size(); ++index) {
    const SweepJob& j = jobs[index];
    // --kernels, --mainloop and --deterministic set process-wide state (engine/ops.h), so
    // every run of one process must ask for the same.
    SP_CHECK(j.cfg.kernels == first.kernels && j.cfg.mainloop == first.mainloop &&
                 j.cfg.deterministic == first.deterministic,
             "sweep: ", j.name, " asks for --kernels ", j.cfg.kernels, ", --mainloop '", j.cfg.mainloop,
             "', --deterministic ", j.cfg.deterministic ? "on" : "off", " but ", jobs.front().name, " for --kernels ",
             first.kernels, ", --mainloop '", first.mainloop, "', --deterministic ",
             first.deterministic ? "on" : "off", ": these are process-wide, so the runs of one sweep must agree");
    SP_CHECK(opts.parallel == 1 || jobs.size() == 1 || !j.cfg.log.empty() || j.cfg.progress == "none", "sweep: ",
             j.name, " would print to stdout beside other runs: give it --log FILE (or --progress none)");
    // The op timings of --trace-ops come from a process-wide profile: it would time the other
    // runs' ops too, and only one can record at a time.
    SP_CHECK(opts.parallel == 1 || jobs.size() == 1 || !j.cfg.trace_ops, "sweep: ", j.name,
             " asks for --trace-ops, which times every op of the process: run it with --parallel 1");
    // Each job's flags as its run will check them (values, combinations, the model and its cuts,
    // its devices, its outputs' directories, no two of its outputs one file): a typo in the last
    // job refuses the sweep before the first trains. What needs the files a job reads (a missing
    // data set, a checkpoint that cannot be read) fails that job alone, when it runs.
    try {
      check_config(j.cfg);
    } catch (const Error& e) {
      throw Error(std::string("sweep: ") + j.name + ": " + e.what(),
                  std::string("sweep: ") + j.name + ": " + e.message());
    }
    for (const auto& [flag, file] : run_outputs(j.cfg)) {
      auto [it, fresh] = writer.emplace(same_file(file), Writer{index, flag});
      SP_CHECK(fresh, "sweep: ", j.name, " and ", jobs[it->second.job].name, " would both write ", file, " (", flag,
               ")");
      written.push_back({index, flag, file, it->first});
    }
  }
  // Nor may a --checkpoint pattern's files be another output (ck{epoch}.st and ck3.st).
  for (size_t a = 0; a < written.size(); ++a)
    for (size_t b = a + 1; b < written.size(); ++b)
      SP_CHECK(!may_collide(written[a].file, written[b].file), "sweep: ", jobs[written[b].job].name, "'s ",
               written[b].flag, " ", written[b].given, " and ", jobs[written[a].job].name, "'s ", written[a].flag, " ",
               written[a].given, " may name the same file");
  // A run must not resume from a file another run is writing.
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (jobs[i].cfg.resume.empty()) continue;
    const std::string resume = same_file(jobs[i].cfg.resume);
    for (const auto& [file, w] : writer)
      SP_CHECK(w.job == i || !may_write(file, resume), "sweep: ", jobs[i].name, " resumes from ", jobs[i].cfg.resume,
               ", which ", jobs[w.job].name, " writes (", w.flag, ")");
  }
}

namespace {

// Appends a line to a run's log (a failure, or why it did not start), so the log alone tells
// what happened.
void log_line(const TrainConfig& c, const std::string& line) {
  if (c.log.empty()) return;
  if (std::FILE* f = std::fopen(c.log.c_str(), "a")) {
    std::fprintf(f, "%s\n", line.c_str());
    std::fclose(f);
  }
}

std::string describe(const SweepOutcome& o, int epochs_wanted) {
  char buf[160];
  const auto& e = o.result.epochs;
  switch (o.status) {
    case SweepStatus::Finished:
    case SweepStatus::StoppedAtDeadline:
    case SweepStatus::Interrupted:
      if (e.empty()) return std::string(sweep_status_name(o.status)) + ", no epoch ended";
      std::snprintf(buf, sizeof buf, "%s after epoch %d of %d: test accuracy %.2f%%, %.0f s",
                    sweep_status_name(o.status), e.back().epoch, epochs_wanted, 100 * e.back().test_acc, o.seconds);
      return buf;
    case SweepStatus::NotStarted:
      return "not started: " + o.error;
    case SweepStatus::Failed:
      return "failed: " + o.error;
  }
  return "?";
}

}  // namespace

const char* sweep_status_name(SweepStatus s) {
  switch (s) {
    case SweepStatus::Finished: return "finished";
    case SweepStatus::StoppedAtDeadline: return "stopped at the time limit";
    case SweepStatus::NotStarted: return "not started";
    case SweepStatus::Failed: return "failed";
    case SweepStatus::Interrupted: return "interrupted";
  }
  return "?";
}

std::string run_kind(const TrainConfig& c, size_t train_images) {
  std::string devices;
  for (const std::string& d : c.devices) devices += "," + d;
  // A --split-at the run will refuse counts as --split here: that run fails on its own, and the
  // others go on (a throw here would end the sweep before any run).
  size_t modules = size_t(c.split);
  try {
    modules = module_count(c.split, c.split_at);
  } catch (const Error&) {
  }
  return c.model + " " + c.device + devices + " " + c.precision + " " + c.method + " K" + std::to_string(modules) +
         " batch " + std::to_string(c.batch_size) + " on " + std::to_string(train_images) + " images";
}

std::vector<SweepOutcome> run_sweep(std::vector<SweepJob> jobs, const SweepOptions& opts) {
  check_jobs(jobs, opts);
  const size_t n = jobs.size();
  const int concurrent = int(std::min<size_t>(size_t(opts.parallel), n));
  std::vector<SweepOutcome> outcomes(n);

  // The data, read once for all jobs that ask for the same (nodes of a map do not move).
  using Key = std::tuple<std::string, int, int64_t>;
  std::map<Key, data::Dataset> sets;
  std::vector<const data::Dataset*> train_of(n, nullptr), test_of(n, nullptr);
  for (size_t i = 0; i < n; ++i) {
    outcomes[i].name = jobs[i].name;
    try {
      const std::string dir = data::resolve_cifar10_dir(jobs[i].data_dir);
      auto get = [&](data::Split split, int64_t limit) {
        const Key key{dir, int(split), limit};
        auto it = sets.find(key);
        if (it == sets.end()) it = sets.emplace(key, data::load_cifar10(dir, split, limit)).first;
        return &it->second;
      };
      train_of[i] = get(data::Split::Train, jobs[i].train_limit);
      test_of[i] = get(data::Split::Test, jobs[i].test_limit);
    } catch (const std::exception& e) {
      outcomes[i].status = SweepStatus::Failed;
      outcomes[i].error = user_message(e);
      log_line(jobs[i].cfg, "error: " + outcomes[i].error);
    }
  }

  std::mutex print_mu;
  auto say = [&](size_t i, const std::string& what) {
    if (!opts.status) return;
    std::lock_guard<std::mutex> lk(print_mu);
    std::fprintf(opts.status, "sweep: [%zu/%zu] %s: %s\n", i + 1, n, jobs[i].name.c_str(), what.c_str());
    std::fflush(opts.status);
  };
  // Seconds per epoch of finished runs of each kind (the longest), to judge whether a waiting
  // run's first epoch would fit before the deadline.
  std::map<std::string, double> epoch_secs;
  std::vector<std::string> kind(n);
  for (size_t i = 0; i < n; ++i) kind[i] = run_kind(jobs[i].cfg, train_of[i] ? train_of[i]->size() : 0);
  std::mutex epoch_mu;
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < n;) {
      SweepOutcome& o = outcomes[i];
      const SweepJob& job = jobs[i];
      if (o.status == SweepStatus::Failed) {
        say(i, describe(o, job.cfg.epochs));
        continue;
      }
      double estimate = 0;
      {
        std::lock_guard<std::mutex> lk(epoch_mu);
        if (auto it = epoch_secs.find(kind[i]); it != epoch_secs.end()) estimate = it->second;
      }
      // Why a waiting run does not start, if it does not.
      const auto now = opts.start_clock ? opts.start_clock() : Clock::now();
      if (opts.interrupt && opts.interrupt())
        o.error = "the sweep was interrupted";
      else if (now >= opts.deadline)
        o.error = "the time limit had passed";
      else if (now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(estimate)) >
               opts.deadline)
        o.error = "an epoch (about " + std::to_string(int64_t(estimate + 0.5)) + " s, as finished runs of " +
                  kind[i] + " took) would not end within the time limit";
      if (!o.error.empty()) {
        log_line(job.cfg, "sweep: not started: " + o.error);
        say(i, describe(o, job.cfg.epochs));
        continue;
      }
      TrainConfig cfg = job.cfg;
      cfg.deadline = std::min(deadline_after(job.time_limit_s), opts.deadline);
      cfg.max_concurrent_runs = concurrent;
      cfg.interrupt = opts.interrupt;
      say(i, "started" + (cfg.log.empty() ? std::string() : ", output in " + cfg.log));
      const auto t0 = Clock::now();
      try {
        o.result = run_training(cfg, *train_of[i], *test_of[i]);
        o.status = o.result.interrupted           ? SweepStatus::Interrupted
                   : o.result.stopped_at_deadline ? SweepStatus::StoppedAtDeadline
                                                  : SweepStatus::Finished;
      } catch (const std::exception& e) {
        o.status = SweepStatus::Failed;
        o.error = user_message(e);
        log_line(cfg, "error: " + o.error);
      }
      o.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      if (!o.result.epochs.empty()) {
        std::lock_guard<std::mutex> lk(epoch_mu);
        double& e = epoch_secs[kind[i]];
        e = std::max(e, o.seconds / double(o.result.epochs.size()));
      }
      say(i, describe(o, cfg.epochs));
    }
  };
  // Whatever escapes a worker (not a run's error, which its outcome keeps: a failure of the
  // sweep's own bookkeeping) stops the others taking runs, is rethrown once every thread has
  // joined, and never ends the process through a joinable thread or an exception in one.
  std::mutex error_mu;
  std::exception_ptr error;
  auto guarded = [&] {
    try {
      worker();
    } catch (...) {
      next = n;
      std::lock_guard<std::mutex> lk(error_mu);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  struct JoinAll {
    std::vector<std::thread>& threads;
    ~JoinAll() {
      for (std::thread& t : threads)
        if (t.joinable()) t.join();
    }
  } join_all{threads};
  try {
    for (int t = 1; t < concurrent; ++t) threads.emplace_back(guarded);
  } catch (...) {
    next = n;  // no thread to run them: the ones started finish their runs, then JoinAll joins
    throw;
  }
  guarded();
  for (std::thread& t : threads) t.join();
  if (error) std::rethrow_exception(error);
  return outcomes;
}

std::vector<std::string> split_command_line(const std::string& line) {
  std::vector<std::string> words;
  std::string word;
  bool in_word = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      if (in_word) words.push_back(word), word.clear(), in_word = false;
    } else if (c == '\'') {
      const size_t end = line.find('\'', i + 1);
      SP_CHECK(end != std::string::npos, "unterminated ' in: ", line);
      word += line.substr(i + 1, end - i - 1);
      in_word = true;
      i = end;
    } else if (c == '"') {
      in_word = true;
      for (++i;; ++i) {
        SP_CHECK(i < line.size(), "unterminated \" in: ", line);
        if (line[i] == '"') break;
        if (line[i] == '\\' && i + 1 < line.size() && std::string("\"\\$`").find(line[i + 1]) != std::string::npos)
          ++i;
        word += line[i];
      }
    } else if (c == '\\') {
      SP_CHECK(i + 1 < line.size(), "a backslash ends: ", line);
      word += line[++i];
      in_word = true;
    } else {
      word += c;
      in_word = true;
    }
  }
  if (in_word) words.push_back(word);
  return words;
}

}  // namespace sp::train
