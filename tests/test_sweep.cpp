// staleprop sweep on the CPU: runs side by side in one process give the bits they give alone;
// the time limit ends runs at epoch boundaries they resume from exactly; a failing run leaves
// the others running; jobs that cannot share a process are refused before anything runs; job
// lines split as a shell splits them. Also run under ThreadSanitizer (tools/run_tests.sh).
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <sstream>

#include "engine/safetensors.h"
#include "kernels/common/error.h"
#include "tests/checkpoint_testing.h"
#include "tests/error_testing.h"
#include "tests/temp_dir.h"
#include "tools/cifar10.h"
#include "tools/sweep.h"
#include "tools/train.h"

using namespace sp;
using sp::test::expect_same_tensors;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

// A directory in the official binary layout: one file of 10,000 records (class-coloured
// noise, so the runs learn something), and the other five names linked to it.
struct CifarDir {
  sp::test::TempDir dir{"staleprop_sweep"};
  const fs::path& path = dir.path;
  CifarDir() {
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> noise(0, 63);
    std::string bytes;
    bytes.reserve(size_t(data::kCifarRecordsPerFile * data::kCifarRecordBytes));
    for (int64_t i = 0; i < data::kCifarRecordsPerFile; ++i) {
      const int label = int(i * 7 % 10);
      bytes += char(label);
      for (int64_t p = 0; p < data::kCifarImageBytes; ++p)
        bytes += char(uint8_t(20 * label + (p / 1024 == label % 3 ? 60 : 0) + noise(rng)));
    }
    std::ofstream(path / "data_batch_1.bin", std::ios::binary) << bytes;
    for (const char* name : {"data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin",
                             "test_batch.bin"})
      fs::create_symlink(path / "data_batch_1.bin", path / name);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

const CifarDir& cifar() {
  static CifarDir d;
  return d;
}

// A tiny run: 2 steps of 8 images per epoch, 2 epochs, evaluated on 16 images.
train::SweepJob job(const std::string& name, const std::string& method = "bp") {
  train::SweepJob j;
  j.name = name;
  j.data_dir = cifar().path.string();
  j.train_limit = 16;
  j.test_limit = 16;
  train::TrainConfig& c = j.cfg;
  c.model = "resnet20";
  c.batch_size = 8;
  c.epochs = 2;
  c.lr = 0.05f;
  c.schedule = "cosine";
  c.seed = 5;
  c.progress = "plain";
  c.method = method;
  if (method != "bp") {
    c.split_at = "4";  // fixed cuts: measured ones could differ between runs
    c.shrink = 0.5f;
  }
  c.checkpoint = cifar().file(name + ".safetensors");
  c.metrics = cifar().file(name + ".jsonl");
  c.log = cifar().file(name + ".log");
  return j;
}

train::TrainResult run_alone(train::SweepJob j) {
  const auto train_set = data::load_cifar10(j.data_dir, data::Split::Train, j.train_limit);
  const auto test_set = data::load_cifar10(j.data_dir, data::Split::Test, j.test_limit);
  return train::run_training(j.cfg, train_set, test_set);
}

// A number field of the last "epoch" record of a metrics file (0 when there is none).
double last_epoch_number(const std::string& path, const std::string& field) {
  std::ifstream in(path);
  double value = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.find("\"event\":\"epoch\"") == std::string::npos) continue;
    const size_t at = line.find("\"" + field + "\":");
    if (at != std::string::npos) value = std::stod(line.substr(at + field.size() + 3));
  }
  return value;
}

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// --time-limit judges a waiting run by finished runs of its kind, whose module count comes from
// --split-at's cuts as well as --split (a run given only --split-at 4,7 runs over three modules;
// it was taken for a one-module run).
TEST(Sweep, RunsOfAKindHaveTheSameNumberOfModules) {
  train::TrainConfig one, cut, three;
  one.method = cut.method = three.method = "bp";
  cut.split_at = "4,7";
  three.split = 3;
  EXPECT_EQ(train::run_kind(cut, 100), train::run_kind(three, 100));
  EXPECT_NE(train::run_kind(cut, 100), train::run_kind(one, 100));
  EXPECT_NE(train::run_kind(three, 100), train::run_kind(three, 200));
  three.split_at = "fdg";  // FDG's cuts for K = 3: three modules still
  EXPECT_EQ(train::run_kind(three, 100), train::run_kind(cut, 100));
}

TEST(Sweep, RunsSideBySideGiveTheBitsTheyGiveAlone) {
  // Plain backprop and FDG over two modules (three CPU streams in all), twice each with other
  // seeds, all four at once.
  std::vector<train::SweepJob> jobs = {job("bp-a"), job("fdg-a", "fdg"), job("bp-b"), job("fdg-b", "fdg")};
  jobs[2].cfg.seed = jobs[3].cfg.seed = 9;
  std::vector<train::TrainResult> alone;
  for (train::SweepJob j : jobs) {
    j.cfg.checkpoint = cifar().file(j.name + "-alone.safetensors");
    j.cfg.metrics = cifar().file(j.name + "-alone.jsonl");
    j.cfg.log = cifar().file(j.name + "-alone.log");  // progress as in the sweep: it sets how far the host runs ahead
    alone.push_back(run_alone(j));
  }
  train::SweepOptions o;
  o.parallel = 4;
  o.status = nullptr;
  const auto outcomes = train::run_sweep(jobs, o);
  ASSERT_EQ(outcomes.size(), jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    SCOPED_TRACE(jobs[i].name);
    ASSERT_EQ(outcomes[i].status, train::SweepStatus::Finished) << outcomes[i].error;
    ASSERT_EQ(outcomes[i].result.epochs.size(), 2u);
    for (size_t e = 0; e < 2; ++e) {
      EXPECT_EQ(outcomes[i].result.epochs[e].train_loss, alone[i].epochs[e].train_loss) << "epoch " << e + 1;
      EXPECT_EQ(outcomes[i].result.epochs[e].test_loss, alone[i].epochs[e].test_loss) << "epoch " << e + 1;
    }
    expect_same_tensors(jobs[i].cfg.checkpoint, cifar().file(jobs[i].name + "-alone.safetensors"));
    // Each run writes its own log and metrics, and says it shared the process.
    const std::string log = read(jobs[i].cfg.log);
    EXPECT_NE(log.find("up to 4 runs at once in this process"), std::string::npos) << log;
    EXPECT_NE(log.find("epoch 2/2: train loss"), std::string::npos) << log;
    EXPECT_NE(read(jobs[i].cfg.metrics).find("\"max_concurrent_runs\":4"), std::string::npos);
    // Its peak of tensors in use is its own, not the four runs' together: about what it was
    // alone (blocks taken from the shared cache may be up to twice the size asked for).
    const double shared = last_epoch_number(jobs[i].cfg.metrics, "peak_allocated_bytes");
    const double solo = last_epoch_number(cifar().file(jobs[i].name + "-alone.jsonl"), "peak_allocated_bytes");
    EXPECT_GT(solo, 0);
    EXPECT_GE(shared, 0.75 * solo);
    EXPECT_LE(shared, 1.5 * solo);
  }
  // Different seeds train differently: the comparison above can tell runs apart.
  EXPECT_NE(alone[0].epochs[1].train_loss, alone[2].epochs[1].train_loss);
}

TEST(Sweep, TheTimeLimitEndsARunAtAnEpochBoundaryItResumesFromExactly) {
  train::SweepJob whole = job("whole");
  whole.cfg.epochs = 3;
  const train::TrainResult uninterrupted = run_alone(whole);
  ASSERT_FALSE(uninterrupted.stopped_at_deadline);

  // A deadline already passed: the first epoch runs (nothing to estimate from before it), then
  // the run ends there, its checkpoint written.
  train::SweepJob cut = job("cut");
  cut.cfg.epochs = 3;
  cut.cfg.deadline = Clock::now();
  const train::TrainResult first = run_alone(cut);
  EXPECT_TRUE(first.stopped_at_deadline);
  ASSERT_EQ(first.epochs.size(), 1u);
  EXPECT_EQ(io::read_safetensors(cut.cfg.checkpoint).metadata.at("step"), "2");
  EXPECT_NE(read(cut.cfg.log).find("stopped after epoch 1 of 3"), std::string::npos) << read(cut.cfg.log);
  EXPECT_NE(read(cut.cfg.log).find("--resume " + cut.cfg.checkpoint), std::string::npos);

  // Resumed from `stopped`'s checkpoint, `rest` trains its last `epochs` epochs to the end of
  // the uninterrupted run, bit for bit.
  const auto expect_resumes = [](train::SweepJob rest, const train::SweepJob& stopped, const train::SweepJob& full,
                                 const train::TrainResult& uninterrupted, size_t epochs) {
    rest.cfg.resume = stopped.cfg.checkpoint;
    const train::TrainResult r = run_alone(rest);
    EXPECT_FALSE(r.stopped_at_deadline) << rest.name;
    ASSERT_EQ(r.epochs.size(), epochs) << rest.name;
    EXPECT_EQ(r.epochs.back().test_loss, uninterrupted.epochs.back().test_loss) << rest.name;
    expect_same_tensors(rest.cfg.checkpoint, full.cfg.checkpoint);
  };
  train::SweepJob rest = job("rest");
  rest.cfg.epochs = 3;
  expect_resumes(rest, cut, whole, uninterrupted, 2);

  // The same for a pipelined run (it drains at epoch boundaries).
  train::SweepJob fdg_whole = job("fdg-whole", "fdg");
  const train::TrainResult fdg_uninterrupted = run_alone(fdg_whole);
  ASSERT_FALSE(fdg_uninterrupted.stopped_at_deadline);
  train::SweepJob fdg = job("fdg-cut", "fdg");
  fdg.cfg.deadline = Clock::now();
  EXPECT_TRUE(run_alone(fdg).stopped_at_deadline);
  EXPECT_EQ(io::read_safetensors(fdg.cfg.checkpoint).metadata.at("step"), "2");
  expect_resumes(job("fdg-rest", "fdg"), fdg, fdg_whole, fdg_uninterrupted, 1);

  // A deadline far off changes nothing; the last epoch never stops "early".
  train::SweepJob far = job("far");
  far.cfg.epochs = 3;
  far.cfg.deadline = Clock::now() + std::chrono::hours(1);
  EXPECT_FALSE(run_alone(far).stopped_at_deadline);
  expect_same_tensors(far.cfg.checkpoint, whole.cfg.checkpoint);

  // A sweep whose time limit has passed starts nothing, and says so in the runs' logs.
  train::SweepOptions o;
  o.status = nullptr;
  o.deadline = Clock::now();
  for (const auto& out : train::run_sweep({job("late-a"), job("late-b")}, o))
    EXPECT_EQ(out.status, train::SweepStatus::NotStarted) << out.name;
  EXPECT_FALSE(fs::exists(cifar().file("late-a.jsonl")));
  EXPECT_NE(read(cifar().file("late-b.log")).find("sweep: not started: the time limit had passed"),
            std::string::npos);
}

// The longest epoch of a run, evaluation and checkpoint included (the first with the setup).
double longest_epoch_s(const train::TrainResult& r) {
  double longest = 0, before = 0;
  for (const train::EpochResult& e : r.epochs) longest = std::max(longest, e.elapsed_s - before), before = e.elapsed_s;
  return longest;
}

// The sweep's time limit reaches runs already going, and a job's own limit counts from its start.
// A run starts no epoch that its last one says would end past the limit, so the bounds below
// are in its own epochs' times (a loaded machine slows them all).
TEST(Sweep, TimeLimitsReachRunningRunsAndCountFromEachRunsStart) {
  // Each epoch takes a fraction of a second here; 500 would take minutes.
  train::SweepJob endless = job("endless");
  endless.cfg.epochs = 500;
  train::SweepOptions o;
  o.status = nullptr;
  o.deadline = Clock::now() + std::chrono::seconds(5);  // the data are read inside it too
  const auto t0 = Clock::now();
  const auto out = train::run_sweep({endless}, o);
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  ASSERT_EQ(out[0].status, train::SweepStatus::StoppedAtDeadline) << out[0].error;
  const auto& epochs = out[0].result.epochs;
  ASSERT_GE(epochs.size(), 1u);
  EXPECT_LT(epochs.size(), 500u);
  // It ended at an epoch boundary no later than one epoch past the limit.
  EXPECT_LT(took, 5.0 + longest_epoch_s(out[0].result) + 1.0);
  EXPECT_EQ(io::read_safetensors(endless.cfg.checkpoint).metadata.at("step"), std::to_string(2 * epochs.size()));

  // One after another: the second run's 3 s limit starts when it does, after the first's 3 s.
  train::SweepJob first = job("first"), second = job("second");
  first.cfg.epochs = second.cfg.epochs = 500;
  first.time_limit_s = second.time_limit_s = 3;
  o.deadline = Clock::time_point::max();
  const auto both = train::run_sweep({first, second}, o);
  for (const auto& r : both) {
    ASSERT_EQ(r.status, train::SweepStatus::StoppedAtDeadline) << r.name << ": " << r.error;
    ASSERT_GE(r.result.epochs.size(), 1u) << r.name;
    EXPECT_GE(r.seconds, 3.0 - longest_epoch_s(r.result) - 0.25)
        << r.name << ": each run had its own 3 s (the second not what the first left)";
    EXPECT_LT(r.seconds, 3.0 + longest_epoch_s(r.result) + 1.0) << r.name << ": its 3 s ended it";
  }
}

// A waiting run does not start when an epoch of a finished run of its kind would not end before
// the sweep's deadline; a run of another kind, with no such estimate, still starts. The clock
// that judges the start is set to just before the deadline, so the rule is reached at once.
TEST(Sweep, AWaitingRunStartsOnlyWhereAnEpochOfItsKindFits) {
  train::SweepOptions o;
  o.status = nullptr;
  o.deadline = Clock::now() + std::chrono::hours(1);  // the runs themselves are never stopped
  o.start_clock = [&] { return o.deadline - std::chrono::milliseconds(1); };
  std::vector<train::SweepJob> jobs = {job("fit-a"), job("fit-b"), job("fit-other")};
  jobs[2].cfg.batch_size = 4;  // another kind: no finished run of it to estimate from
  auto out = train::run_sweep(jobs, o);
  EXPECT_EQ(out[0].status, train::SweepStatus::Finished) << out[0].error;
  EXPECT_EQ(out[1].status, train::SweepStatus::NotStarted);
  EXPECT_NE(out[1].error.find("would not end within the time limit"), std::string::npos) << out[1].error;
  EXPECT_NE(out[1].error.find("batch 8"), std::string::npos) << "names the kind: " << out[1].error;
  EXPECT_FALSE(fs::exists(jobs[1].cfg.metrics)) << "it never started";
  EXPECT_NE(read(jobs[1].cfg.log).find("sweep: not started: an epoch (about "), std::string::npos);
  EXPECT_EQ(out[2].status, train::SweepStatus::Finished) << out[2].error;

  // With ten minutes left, an epoch of either kind fits: all three run.
  o.start_clock = [&] { return o.deadline - std::chrono::minutes(10); };
  jobs = {job("fit10-a"), job("fit10-b"), job("fit10-other")};
  jobs[2].cfg.batch_size = 4;
  out = train::run_sweep(jobs, o);
  for (const auto& r : out) EXPECT_EQ(r.status, train::SweepStatus::Finished) << r.name << ": " << r.error;
}

// An interrupt (staleprop sweep: SIGINT or SIGTERM) ends the running run early, keeping its
// step, and no waiting run starts.
TEST(Sweep, AnInterruptEndsTheRunningRunsAndStartsNoOther) {
  train::SweepOptions o;
  o.status = nullptr;
  auto asked = std::make_shared<int>(0);
  // Asked before the first run starts, then after each of its steps: true after its step 2.
  o.interrupt = [asked] { return ++*asked >= 3; };
  const std::vector<train::SweepJob> jobs = {job("int-a"), job("int-b"), job("int-c")};
  const auto out = train::run_sweep(jobs, o);
  EXPECT_EQ(out[0].status, train::SweepStatus::Interrupted) << out[0].error;
  EXPECT_EQ(out[0].result.steps, 2);
  EXPECT_EQ(io::read_safetensors(jobs[0].cfg.checkpoint).metadata.at("step"), "2");
  for (size_t i : {size_t(1), size_t(2)}) {
    EXPECT_EQ(out[i].status, train::SweepStatus::NotStarted) << out[i].name;
    EXPECT_EQ(out[i].error, "the sweep was interrupted");
    EXPECT_FALSE(fs::exists(jobs[i].cfg.checkpoint));
  }
}

TEST(Sweep, AFailedRunLeavesTheOthersRunning) {
  // One fails as it starts (its --resume file is not there), one on its data, and a pipelined
  // one after its first epoch (its first epoch's checkpoint cannot be written: a directory stands
  // at that path, so the write's final rename fails, while the pattern passes the check before
  // training), with its module streams at work. (A job whose flags are wrong refuses the sweep:
  // AJobWithWrongFlagsRefusesTheSweepBeforeAnyRun.)
  std::vector<train::SweepJob> jobs = {job("bad"), job("good"), job("no-data"), job("late", "fdg")};
  jobs[0].cfg.resume = cifar().file("no-such-checkpoint.safetensors");
  jobs[2].data_dir = cifar().file("missing");
  jobs[3].cfg.checkpoint = cifar().file("a-directory-stands-here{epoch}");
  std::filesystem::create_directories(cifar().file("a-directory-stands-here1"));
  train::SweepOptions o;
  o.parallel = 2;
  std::FILE* status = std::tmpfile();
  o.status = status;
  const auto outcomes = train::run_sweep(jobs, o);
  EXPECT_EQ(outcomes[0].status, train::SweepStatus::Failed);
  EXPECT_NE(outcomes[0].error.find("no-such-checkpoint"), std::string::npos) << outcomes[0].error;
  EXPECT_NE(read(jobs[0].cfg.log).find("error: "), std::string::npos);
  EXPECT_EQ(outcomes[1].status, train::SweepStatus::Finished) << outcomes[1].error;
  EXPECT_EQ(outcomes[2].status, train::SweepStatus::Failed);
  EXPECT_NE(outcomes[2].error.find("missing"), std::string::npos) << outcomes[2].error;
  EXPECT_EQ(outcomes[3].status, train::SweepStatus::Failed);
  EXPECT_NE(outcomes[3].error.find("a-directory-stands-here"), std::string::npos) << outcomes[3].error;
  EXPECT_NE(read(jobs[3].cfg.log).find("epoch 1/2: train loss"), std::string::npos) << "it failed after epoch 1";
  // The status lines name every run and how it ended.
  std::rewind(status);
  std::string lines;
  for (int c; (c = std::fgetc(status)) != EOF;) lines += char(c);
  std::fclose(status);
  EXPECT_NE(lines.find("sweep: [2/4] good: finished after epoch 2 of 2: test accuracy"), std::string::npos) << lines;
  EXPECT_NE(lines.find("sweep: [1/4] bad: failed: "), std::string::npos) << lines;
  EXPECT_NE(lines.find("sweep: [3/4] no-data: failed: "), std::string::npos) << lines;
  EXPECT_NE(lines.find("sweep: [4/4] late: failed: "), std::string::npos) << lines;
}

TEST(Sweep, RefusesJobsThatCannotShareAProcess) {
  train::SweepOptions two;
  two.parallel = 2;
  two.status = nullptr;
  auto same_file = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[1].cfg.metrics = jobs[0].cfg.metrics;
    train::run_sweep(jobs, two);
  };
  test::expect_error(same_file, {"x", "y", "would both write", "x.jsonl", "--metrics"});
  // --trace-ops times every op of the process: not beside other runs.
  auto trace_ops = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[1].cfg.trace = jobs[1].cfg.log + ".trace.json";
    jobs[1].cfg.trace_ops = true;
    train::run_sweep(jobs, two);
  };
  test::expect_error(trace_ops, {"y asks for --trace-ops", "--parallel 1"});
  auto same_file_spelt_otherwise = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    fs::create_directories(cifar().file("sub"));  // a path through a missing directory is refused as such
    jobs[1].cfg.log = cifar().file("./sub/../x.log");
    train::run_sweep(jobs, two);
  };
  test::expect_error(same_file_spelt_otherwise, {"would both write", "--log"});
  auto bare_and_dotted = [&] {  // relative names whose files do not exist yet
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[0].cfg.log = "sweep-test-bare.log";
    jobs[1].cfg.log = (fs::current_path() / "." / "sweep-test-bare.log").string();
    train::run_sweep(jobs, two);
  };
  test::expect_error(bare_and_dotted, {"would both write", "sweep-test-bare.log"});
  auto resume_from_a_bare_pattern = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[0].cfg.checkpoint = "sweep-test-c{epoch}.safetensors";
    jobs[1].cfg.resume = "./sweep-test-c3.safetensors";
    train::run_sweep(jobs, two);
  };
  test::expect_error(resume_from_a_bare_pattern, {"y resumes from", "which x writes (--checkpoint)"});
  auto resume_from_anothers_output = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[1].cfg.resume = jobs[0].cfg.checkpoint;
    train::run_sweep(jobs, two);
  };
  test::expect_error(resume_from_anothers_output, {"y resumes from", "x.safetensors, which x writes"});
  auto resume_from_anothers_epoch = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[0].cfg.checkpoint = cifar().file("x-{epoch}.safetensors");
    jobs[1].cfg.resume = cifar().file("x-12.safetensors");
    train::run_sweep(jobs, two);
  };
  test::expect_error(resume_from_anothers_epoch, {"y resumes from", "x-12.safetensors, which x writes (--checkpoint)"});
  // A --checkpoint pattern's files are outputs too: one of them another job's file, or another
  // pattern's (a{epoch} and a1{epoch} both give a11); both runs used to write it.
  auto pattern_and_file = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[0].cfg.checkpoint = cifar().file("ck{epoch}.safetensors");
    jobs[1].cfg.checkpoint = cifar().file("ck3.safetensors");
    train::run_sweep(jobs, two);
  };
  test::expect_error(pattern_and_file, {"y's --checkpoint", "ck3.safetensors", "x's --checkpoint",
                                        "ck{epoch}.safetensors", "may name the same file"});
  auto two_patterns = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[0].cfg.checkpoint = cifar().file("a{epoch}.safetensors");
    jobs[1].cfg.checkpoint = cifar().file("a1{epoch}.safetensors");
    train::run_sweep(jobs, two);
  };
  test::expect_error(two_patterns, {"a1{epoch}.safetensors", "a{epoch}.safetensors", "may name the same file"});

  auto other_kernels = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[1].cfg.kernels = "vendor";
    train::run_sweep(jobs, two);
  };
  test::expect_error(other_kernels, {"y asks for --kernels vendor", "process-wide"});
  auto to_stdout = [&] {
    auto jobs = std::vector<train::SweepJob>{job("x"), job("y")};
    jobs[1].cfg.log.clear();
    train::run_sweep(jobs, two);
  };
  test::expect_error(to_stdout, {"y would print to stdout", "--log FILE"});
  test::expect_error([&] { train::run_sweep({}, two); }, {"no jobs"});
  EXPECT_FALSE(fs::exists(cifar().file("x.jsonl"))) << "nothing runs when the jobs are refused";
}

// A job's flags are checked as its run would check them, for every job before the first runs: a
// typo in the last job (a model, an output's directory, two outputs of one file) ran the jobs
// before it, hours of them, and then failed.
TEST(Sweep, AJobWithWrongFlagsRefusesTheSweepBeforeAnyRun) {
  train::SweepOptions one;
  one.status = nullptr;
  const auto refused = [&](const std::function<void(train::TrainConfig&)>& change,
                           const std::vector<std::string>& message) {
    auto jobs = std::vector<train::SweepJob>{job("refused-first"), job("last")};
    change(jobs[1].cfg);
    test::expect_error([&] { train::run_sweep(jobs, one); }, message);
    EXPECT_FALSE(fs::exists(jobs[0].cfg.metrics)) << "the first job did not run";
  };
  refused([](train::TrainConfig& c) { c.model = "resnet7"; }, {"sweep: last: ", "unknown model 'resnet7'"});
  refused([](train::TrainConfig& c) { c.metrics = "/nonexistent-staleprop-dir/m.jsonl"; },
          {"sweep: last: ", "--metrics /nonexistent-staleprop-dir/m.jsonl: directory", "does not exist"});
  refused([](train::TrainConfig& c) { c.trace = c.log; },
          {"sweep: last: ", "--log", "and --trace", "may name the same file"});
  refused([](train::TrainConfig& c) { c.momentum = 1.5f; }, {"sweep: last: ", "--momentum must be in [0, 1)"});
  // What the pipelined trainer refused only once the data was loaded and the model built: cuts
  // that cannot be read or that the model cannot have, and a step checkpoint of a pipeline.
  refused([](train::TrainConfig& c) { c.method = "fdg", c.split_at = "4,x"; },
          {"sweep: last: ", "--split-at expects comma-separated block indices (or 'fdg'), got '4,x'"});
  refused([](train::TrainConfig& c) { c.method = "fdg", c.split = 12; },
          {"sweep: last: ", "--split 12: at most one module per block"});
  refused([](train::TrainConfig& c) { c.method = "fdg", c.split = 2, c.checkpoint_every = 1; },
          {"sweep: last: ", "--checkpoint-every and --stop-after need --method bp with one module"});
}

// Checkpoint patterns whose tails differ, or whose heads differ by more than digits, name no
// file in common: such jobs run side by side.
TEST(Sweep, CheckpointPatternsWithOtherTailsRunSideBySide) {
  train::SweepOptions two;
  two.parallel = 2;
  two.status = nullptr;
  auto jobs = std::vector<train::SweepJob>{job("apart-a"), job("apart-b"), job("apart-c")};
  jobs[0].cfg.checkpoint = cifar().file("apart-{epoch}.safetensors");
  jobs[1].cfg.checkpoint = cifar().file("apart-{epoch}.st");
  jobs[2].cfg.checkpoint = cifar().file("apart-c{epoch}.st");
  for (auto& j : jobs) j.cfg.epochs = 1;
  const auto out = train::run_sweep(jobs, two);
  for (const auto& r : out) EXPECT_EQ(r.status, train::SweepStatus::Finished) << r.name << ": " << r.error;
  EXPECT_TRUE(fs::exists(cifar().file("apart-1.safetensors")));
  EXPECT_TRUE(fs::exists(cifar().file("apart-1.st")));
  EXPECT_TRUE(fs::exists(cifar().file("apart-c1.st")));
}

TEST(Sweep, SplitsJobLinesAsAShellWould) {
  using train::split_command_line;
  EXPECT_EQ(split_command_line("  --model resnet56\t--epochs 3 "),
            (std::vector<std::string>{"--model", "resnet56", "--epochs", "3"}));
  // What Python's shlex.join writes for awkward words.
  EXPECT_EQ(split_command_line("--log 'a b.log' --data 'it'\"'\"'s' --x ''"),
            (std::vector<std::string>{"--log", "a b.log", "--data", "it's", "--x", ""}));
  EXPECT_EQ(split_command_line(R"(--a "say \"hi\" \n" --b a\ b)"),
            (std::vector<std::string>{"--a", "say \"hi\" \\n", "--b", "a b"}));
  EXPECT_TRUE(split_command_line("   ").empty());
  test::expect_error([] { split_command_line("--log 'open"); }, {"unterminated '"});
  test::expect_error([] { split_command_line("--log \"open"); }, {"unterminated \""});
}

}  // namespace
