// End-to-end training runs on the CPU: checkpoints in PyTorch's names and layouts, exact
// resumption, determinism, evaluation, and loss that falls on synthetic and on real images.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <random>

#include "engine/checkpoint.h"
#include "engine/ops.h"
#include "engine/pipeline.h"
#include "engine/safetensors.h"
#include "engine/trainer.h"
#include "kernels/common/error.h"
#include "layers/resnet.h"
#include "tests/checkpoint_testing.h"
#include "tests/error_testing.h"
#include "tests/source_dir.h"
#include "tests/temp_dir.h"
#include "tools/bench.h"
#include "tools/json.h"
#include "tools/train.h"

using namespace sp;
using sp::test::any_tensor_differs;
using sp::test::expect_same_tensors;
using sp::test::TempDir;
namespace fs = std::filesystem;

namespace {

// A learnable 10-class set: each class is a fixed random colour pattern on a coarse 4x4 grid
// plus per-image noise, as uint8 NHWC images.
data::Dataset synthetic_set(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> level(40, 215), noise(-30, 30);
  std::vector<std::array<uint8_t, 48>> patterns(10);
  for (auto& p : patterns)
    for (auto& v : p) v = uint8_t(level(rng));
  data::Dataset d;
  d.images.resize(size_t(n * data::kCifarImageBytes));
  for (int64_t i = 0; i < n; ++i) {
    const int label = int(i % 10);
    d.labels.push_back(label);
    for (int y = 0; y < 32; ++y)
      for (int x = 0; x < 32; ++x)
        for (int c = 0; c < 3; ++c) {
          const int v = patterns[size_t(label)][size_t(((y / 8) * 4 + x / 8) * 3 + c)] + noise(rng);
          d.images[size_t(((i * 32 + y) * 32 + x) * 3 + c)] = uint8_t(std::clamp(v, 0, 255));
        }
  }
  return d;
}

// The number after "key": in a JSON record, or -1 where the key is missing.
double number_after(const std::string& rec, const std::string& key) {
  const size_t at = rec.find("\"" + key + "\":");
  return at == std::string::npos ? -1.0 : std::stod(rec.substr(at + key.size() + 3));
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

train::TrainConfig small_config() {
  train::TrainConfig c;
  c.model = "resnet20";
  c.batch_size = 32;
  c.epochs = 2;
  c.lr = 0.05f;
  c.schedule = "cosine";
  c.warmup_epochs = 0.5;
  c.progress = "none";
  c.seed = 3;
  return c;
}

// The time limit's estimate of the next epoch: an epoch resumed part-way trained for only some
// of its steps, but paid its evaluation and checkpoint whole.
TEST(Training, TheNextEpochIsEstimatedFromTheStepsTheLastRan) {
  EXPECT_DOUBLE_EQ(train::next_epoch_seconds(10.0, 3.0, 20, 20), 13.0);
  EXPECT_DOUBLE_EQ(train::next_epoch_seconds(1.0, 3.0, 2, 20), 13.0);
  EXPECT_DOUBLE_EQ(train::next_epoch_seconds(0.5, 0.0, 1, 4), 2.0);
}

// --progress: a bar redrawn in place ('\r', the bar, images/s and ETA), plain lines (auto when
// the output is no terminal, as a --log file is not: about ten per epoch, each with the step,
// images/s and ETA, never a '\r'), or none; an unknown mode is refused.
TEST(Training, ProgressIsABarPlainLinesOrNothing) {
  const data::Dataset train = synthetic_set(320, 15), test = synthetic_set(20, 16);  // 10 steps per epoch
  TempDir dir;
  auto run = [&](const std::string& mode) {
    train::TrainConfig c = small_config();
    c.epochs = 1;
    c.progress = mode;
    c.log = dir.file(mode + ".log");
    train::run_training(c, train, test);
    return read_text(c.log);
  };
  const std::string bar = run("bar");
  EXPECT_NE(bar.find("\repoch 1/1 [#"), std::string::npos) << bar;
  EXPECT_NE(bar.find("] 10/10"), std::string::npos) << bar;
  EXPECT_NE(bar.find(" img/s ETA "), std::string::npos) << bar;
  for (const std::string& mode : {std::string("auto"), std::string("plain")}) {
    const std::string text = run(mode);
    EXPECT_EQ(text.find('\r'), std::string::npos) << mode << ": " << text;
    int steps = 0;
    for (size_t at = text.find("epoch 1/1 step "); at != std::string::npos; at = text.find("epoch 1/1 step ", at + 1)) {
      const std::string line = text.substr(at, text.find('\n', at) - at);
      EXPECT_NE(line.find(" img/s ETA "), std::string::npos) << line;
      ++steps;
    }
    EXPECT_EQ(steps, 10) << mode << ": " << text;
    EXPECT_NE(text.find("epoch 1/1 step 10/10"), std::string::npos) << text;
  }
  EXPECT_EQ(run("none").find("step "), std::string::npos);
  test::expect_error<Error>([&] { run("fancy"); }, {"--progress must be auto, bar, plain or none, got 'fancy'"});
}

// A decoupled run's progress shows no rate until a full tick has ended ("?": the host runs two
// ticks ahead and the first d_1 ticks only fill the pipeline; the rate of the batches fed over
// the time since the start was tens of times too high there), then the rate of the ticks that
// have ended, about the epoch's own.
TEST(Training, ADecoupledRunsProgressShowsTheRateOfTicksThatEnded) {
  const data::Dataset train = synthetic_set(320, 15), test = synthetic_set(20, 16);  // 10 steps per epoch
  TempDir dir;
  train::TrainConfig c = small_config();
  c.epochs = 1;
  c.method = "fdg", c.split_at = "4,7";  // K = 3: d_1 = 4
  c.progress = "plain";
  c.log = dir.file("fdg.log");
  const train::TrainResult r = train::run_training(c, train, test);
  const std::string text = read_text(c.log);
  for (int step = 2; step <= 10; ++step) {
    const std::string head = "epoch 1/1 step " + std::to_string(step) + "/10 lr ";
    const size_t at = text.find(head);
    ASSERT_NE(at, std::string::npos) << text;
    const std::string line = text.substr(at, text.find('\n', at) - at);
    const size_t rate_at = line.find(' ', line.find(" lr ") + 4) + 1;
    if (step <= 6) {  // batch step - 1 fed: ticks up to step - 3 ended, none of them full before tick 4
      EXPECT_NE(line.find(" ? img/s ETA ?"), std::string::npos) << line;
    } else {
      const double rate = std::stod(line.substr(rate_at));
      EXPECT_GT(rate, 0.2 * r.epochs[0].images_per_s) << line;
      EXPECT_LT(rate, 5.0 * r.epochs[0].images_per_s) << line;
    }
  }
}

// The tools' JSON strings escape what JSON requires (quotes, backslashes, control characters).
TEST(Training, JsonStringsAreEscaped) {
  EXPECT_EQ(train::json_str("conv2d_forward"), "\"conv2d_forward\"");
  EXPECT_EQ(train::json_str("a\"b\\c\nd\x01"), "\"a\\\"b\\\\c\\u000ad\\u0001\"");
}

// Resuming with `resuming` (its --resume set) changed by `change` is refused, the message holding
// every one of `reason`.
void expect_resume_refused(train::TrainConfig resuming, const std::function<void(train::TrainConfig&)>& change,
                           const std::vector<std::string>& reason, const data::Dataset& train,
                           const data::Dataset& test) {
  change(resuming);
  test::expect_error([&] { train::run_training(resuming, train, test); }, reason);
}

// The uninterrupted plain-backprop run the resume tests compare with: 2 epochs of 4 steps on
// 128 synthetic images, its checkpoint in full.checkpoint.
struct WholeRun {
  const data::Dataset train = synthetic_set(128, 1), test = synthetic_set(40, 2);
  TempDir dir;
  const train::TrainConfig full = [this] {
    train::TrainConfig c = small_config();
    c.checkpoint = dir.file("full.safetensors");
    return c;
  }();
  const train::TrainResult whole = train::run_training(full, train, test);
};

// --stop-after alone (no --checkpoint-every) ends the run inside an epoch with a checkpoint of
// that step, from which the run goes on bit for bit (it used to end with none).
TEST(Training, StopAfterLeavesACheckpointToGoOnFrom) {
  WholeRun w;
  auto& [train, test, dir, full, whole] = w;
  train::TrainConfig first = small_config();
  first.checkpoint = dir.file("stopped.safetensors");
  first.stop_after_steps = 5;
  const train::TrainResult stopped = train::run_training(first, train, test);
  EXPECT_EQ(stopped.steps, 5);
  EXPECT_TRUE(stopped.stopped_at_step);
  ASSERT_TRUE(fs::exists(first.checkpoint));
  EXPECT_EQ(io::read_safetensors(first.checkpoint).metadata.at("step"), "5");
  // Resumed there with the same --stop-after, there is no step left to take: refused, rather
  // than one more step taken past it.
  train::TrainConfig again = first;
  again.resume = first.checkpoint;
  again.checkpoint = dir.file("again.safetensors");
  test::expect_error([&] { train::run_training(again, train, test); }, {"--stop-after 5", "is at step 5 already"});
  EXPECT_FALSE(fs::exists(again.checkpoint));
  train::TrainConfig rest = small_config();
  rest.resume = first.checkpoint;
  rest.checkpoint = dir.file("went-on.safetensors");
  const train::TrainResult went_on = train::run_training(rest, train, test);
  EXPECT_EQ(went_on.steps, 8);
  EXPECT_FALSE(went_on.stopped_at_step);
  expect_same_tensors(full.checkpoint, rest.checkpoint);

  // At an epoch's end (4 steps an epoch): the epoch's evaluation and checkpoint, and the run says
  // it stopped and where to go on from.
  train::TrainConfig boundary = small_config();
  boundary.checkpoint = dir.file("boundary.safetensors");
  boundary.stop_after_steps = 4;
  boundary.progress = "plain";
  boundary.log = dir.file("boundary.log");
  const train::TrainResult at_end = train::run_training(boundary, train, test);
  EXPECT_EQ(at_end.steps, 4);
  EXPECT_EQ(at_end.epochs.size(), 1u);
  EXPECT_TRUE(at_end.stopped_at_step);
  EXPECT_EQ(io::read_safetensors(boundary.checkpoint).metadata.at("step"), "4");
  const std::string log = read_text(boundary.log);
  EXPECT_NE(log.find("stopped after epoch 1 of 2 (--stop-after 4); go on with --resume " + boundary.checkpoint),
            std::string::npos)
      << log;
}

// A run that diverges writes no checkpoint of its broken weights: --checkpoint-every's saves
// inside an epoch come before any loss has seen the last update, so the save itself refuses
// weights that are not finite (and an epoch's end waits for the test loss).
TEST(Training, ADivergedRunWritesNoCheckpointOfItsWeights) {
  const data::Dataset train = synthetic_set(128, 21), test = synthetic_set(16, 22);
  TempDir dir;
  train::TrainConfig c = small_config();
  c.lr = 3e38f;  // the first update overflows some weights
  c.schedule = "constant";
  c.warmup_epochs = 0;
  c.checkpoint = dir.file("every.safetensors");
  c.checkpoint_every = 1;
  // The first update's weights overflow while its step's loss is finite: the save refuses them.
  test::expect_error([&] { train::run_training(c, train, test); }, {c.checkpoint, "not written", "the run diverged"});
  if (fs::exists(c.checkpoint)) {  // an earlier step's, of finite weights
    for (const io::TensorRecord& r : io::read_safetensors(c.checkpoint).tensors) {
      if (r.dtype != "F32") continue;
      const float* v = reinterpret_cast<const float*>(r.data.data());
      for (size_t i = 0; i < r.data.size() / 4; ++i) ASSERT_TRUE(std::isfinite(v[i])) << r.name << " " << i;
    }
  }
  // The save on its own: a NaN in one weight, and nothing is written.
  Network net = layers::build_resnet("resnet20", 10, 0);
  auto s = make_stream(Device::cpu());
  net.state().params.back().second->value.data<float>()[0] = std::nanf("");
  const std::string path = dir.file("nan.safetensors");
  test::expect_error([&] { save_checkpoint(path, net, {}, {}, *s); },
                     {path, "not written", "linear.bias", "holds NaN"});
  EXPECT_FALSE(fs::exists(path));
}

// --metrics's step records come every tenth of an epoch whatever --progress shows: the same
// records (but their timings) with no progress, plain lines and the bar, which collects the
// statistics every step.
TEST(Training, MetricsStepRecordsDoNotDependOnTheProgressDisplay) {
  const data::Dataset train = synthetic_set(640, 11);
  TempDir dir;
  std::map<std::string, std::vector<std::string>> records;
  for (const std::string mode : {"none", "plain", "bar"}) {
    train::TrainConfig c = small_config();
    c.epochs = 1;  // 20 steps of 32
    c.progress = mode;
    c.log = dir.file(mode + ".log");
    c.metrics = dir.file(mode + ".jsonl");
    train::run_training(c, train, data::Dataset{});
    std::ifstream in(c.metrics);
    for (std::string line; std::getline(in, line);) {
      if (line.find("\"event\":\"step\"") == std::string::npos) continue;
      records[mode].push_back(line.substr(0, line.find(",\"images_per_s\"")));  // without the timings
    }
  }
  ASSERT_EQ(records["none"].size(), 10u);
  EXPECT_NE(records["none"][0].find("\"step\":2,"), std::string::npos) << records["none"][0];
  EXPECT_EQ(records["plain"], records["none"]);
  EXPECT_EQ(records["bar"], records["none"]);
}

TEST(Training, ResumedRunMatchesUninterruptedRunBitForBit) {
  WholeRun w;
  auto& [train, test, dir, full, whole] = w;
  ASSERT_EQ(whole.steps, 8);

  train::TrainConfig first = small_config();  // stops in the middle of epoch 2
  first.checkpoint = dir.file("part.safetensors");
  first.checkpoint_every = 6;
  first.stop_after_steps = 6;
  EXPECT_EQ(train::run_training(first, train, test).steps, 6);
  EXPECT_EQ(io::read_safetensors(first.checkpoint).metadata.at("step"), "6");

  train::TrainConfig rest = small_config();
  rest.resume = first.checkpoint;
  rest.checkpoint = dir.file("resumed.safetensors");
  const train::TrainResult resumed = train::run_training(rest, train, test);
  EXPECT_EQ(resumed.steps, 8);
  expect_same_tensors(full.checkpoint, rest.checkpoint);
  ASSERT_EQ(resumed.epochs.size(), 1u);
  EXPECT_EQ(resumed.epochs[0].test_acc, whole.epochs[1].test_acc);
  EXPECT_EQ(resumed.epochs[0].test_loss, whole.epochs[1].test_loss);
  // The epoch's training statistics cover its steps before the resume too (the checkpoint holds
  // them), summed in another grouping: the same up to rounding.
  EXPECT_EQ(resumed.epochs[0].train_acc, whole.epochs[1].train_acc);
  EXPECT_NEAR(resumed.epochs[0].train_loss, whole.epochs[1].train_loss, 1e-12 * whole.epochs[1].train_loss);
  EXPECT_FALSE(resumed.already_complete);
  // Resumed from its last step, the run has nothing left to train.
  rest.resume = rest.checkpoint;
  const train::TrainResult again = train::run_training(rest, train, test);
  EXPECT_TRUE(again.already_complete);
  EXPECT_TRUE(again.epochs.empty());
  EXPECT_EQ(again.steps, 8);
  expect_same_tensors(full.checkpoint, rest.checkpoint);

  // Resuming with other settings is refused with a reason: `change` applied to the run's own
  // settings, on `set` (the run's training set unless given).
  train::TrainConfig resume_part = small_config();
  resume_part.resume = first.checkpoint;
  const auto refused = [&](const std::function<void(train::TrainConfig&)>& change,
                           const std::vector<std::string>& reason, const data::Dataset* set = nullptr) {
    expect_resume_refused(resume_part, change, reason, set ? *set : train, test);
  };
  refused([](train::TrainConfig& c) { c.batch_size = 16; }, {"was written with other data, batch size or seed"});
  // Another model's file is refused naming the model it holds (its metadata's), and why.
  refused([](train::TrainConfig& c) { c.model = "resnet32"; },
          {first.checkpoint + " holds a resnet20, not a resnet32", "was it saved from another model?"});
  // The same tensor names with other shapes (ResNet-18's stem has 64 filters, ResNet-20's 16).
  refused([](train::TrainConfig& c) { c.model = "resnet18"; },
          {first.checkpoint, "holds a resnet20, not a resnet18", "'conv1.weight' is F32 [16, 3, 3, 3]"});
  test::expect_error<Error>([&] { train::evaluate_checkpoint(first.checkpoint, "resnet32", "cpu", test, 16); },
                            {"holds a resnet20, not a resnet32", "'layer1.3.conv1.weight'"});
  // A file that records no run (weights as another tool writes them: no metadata) is refused as
  // such, not as a model named "" ("holds a , not a resnet20").
  {
    io::SafetensorsFile bare = io::read_safetensors(first.checkpoint);
    bare.metadata.clear();
    const std::string bare_path = dir.file("bare.safetensors");
    io::write_safetensors(bare_path, bare.tensors, bare.metadata);
    refused([&](train::TrainConfig& c) { c.resume = bare_path; },
            {"--resume: " + bare_path + " records no staleprop run", "staleprop eval"});
  }
  // So are other batches with as many steps per epoch: another batch size, other images, other
  // augmentation.
  refused([](train::TrainConfig& c) { c.batch_size = 33; },  // 4 steps per epoch, as 32 gives
          {"--batch-size 32, not 33", "same data"});
  const data::Dataset fewer = synthetic_set(120, 1);
  refused([](train::TrainConfig&) {}, {"training images (--train-limit) 128, not 120"}, &fewer);
  // Other images, or one label changed, of the same size: the digest of the data tells them apart.
  const data::Dataset other_images = synthetic_set(128, 3);
  refused([](train::TrainConfig&) {},
          {"training data of digest " + data::digest(train) + ", not " + data::digest(other_images)}, &other_images);
  data::Dataset relabelled = train;
  relabelled.labels[77] = (relabelled.labels[77] + 1) % 10;
  refused([](train::TrainConfig&) {}, {"training data of digest", "resume with the same data"}, &relabelled);
  refused([](train::TrainConfig& c) { c.cutout = 8; }, {"augmentation crop,flip, not crop,flip,cutout8"});
  // So is another schedule: the learning rate of every step would change under the run.
  refused([](train::TrainConfig& c) { c.epochs = 3; }, {"--epochs 2, not 3", "same schedule"});
  refused([](train::TrainConfig& c) { c.schedule = "onecycle"; }, {"--schedule cosine, not onecycle"});
  refused([](train::TrainConfig& c) { c.lr = 0.1f; }, {"--lr 0.050000001, not 0.1"});
  refused([](train::TrainConfig& c) { c.warmup_epochs = 1; }, {"--warmup-epochs 0.5, not 1"});
  // So is another training rule, optimizer, loss or precision: every update would change. (The
  // decoupled rules are refused in DecoupledRunResumesExactlyAtAnEpochBoundary.)
  refused([](train::TrainConfig& c) { c.method = "fdg"; }, {"--method bp, not fdg", "same training rule"});
  refused([](train::TrainConfig& c) { c.momentum = 0.5f; }, {"--momentum 0.89999998, not 0.5;", "same optimizer"});
  refused([](train::TrainConfig& c) { c.nesterov = true; }, {"--nesterov 0, not 1"});
  refused([](train::TrainConfig& c) { c.weight_decay = 1e-4f; }, {"--weight-decay 0.00050000002, not 9.9999997e-05"});
  refused([](train::TrainConfig& c) { c.label_smoothing = 0.1f; }, {"--label-smoothing 0, not 0.1", "same loss"});
  refused([](train::TrainConfig& c) { c.precision = "bf16"; }, {"--precision fp32, not bf16"});
  // A checkpoint whose recorded step is not a number (a damaged or foreign file) is refused by name.
  for (const std::string step : {"6x", "", "-6", "99999999999999999999"}) {
    io::SafetensorsFile damaged = io::read_safetensors(first.checkpoint);
    damaged.metadata["step"] = step;
    const std::string path = dir.file("damaged-step.safetensors");
    io::write_safetensors(path, damaged.tensors, damaged.metadata);
    train::TrainConfig from_damaged = resume_part;
    from_damaged.resume = path;
    test::expect_error([&] { train::run_training(from_damaged, train, test); },
                       {path, "records the training step '" + step + "', not a number of steps"});
  }
  {  // A step past the run's end (hand-edited metadata) is refused, not taken for a finished run.
    io::SafetensorsFile edited = io::read_safetensors(first.checkpoint);
    edited.metadata["step"] = "100000";
    const std::string path = dir.file("past-the-end.safetensors");
    io::write_safetensors(path, edited.tensors, edited.metadata);
    train::TrainConfig from_edited = resume_part;
    from_edited.resume = path;
    test::expect_error([&] { train::run_training(from_edited, train, test); },
                       {path, "records step 100000, past the end of this 2-epoch run"});
  }
  // Milestones shape only a multistep schedule (small_config's is cosine): another is no change.
  train::TrainConfig other = small_config();
  other.resume = first.checkpoint;
  other.milestones = {0.3, 0.6};
  other.checkpoint = dir.file("other-milestones.safetensors");
  train::run_training(other, train, test);
  expect_same_tensors(full.checkpoint, other.checkpoint);
  train::TrainConfig multistep = small_config();
  multistep.schedule = "multistep";
  multistep.checkpoint = dir.file("multistep.safetensors");
  multistep.checkpoint_every = 2;
  multistep.stop_after_steps = 2;
  train::run_training(multistep, train, test);
  multistep.resume = multistep.checkpoint;
  multistep.stop_after_steps = -1;
  multistep.milestones = {0.3, 0.6};
  test::expect_error([&] { train::run_training(multistep, train, test); }, {"--milestones 0.5,0.75, not 0.3,0.6"});
  multistep.milestones = {0.5, 0.75};
  multistep.gamma = 0.2f;
  test::expect_error([&] { train::run_training(multistep, train, test); }, {"--gamma 0.1", "not 0.2"});
}

// An interrupt that says true from its n-th question on (TrainConfig::interrupt is asked after
// every step of plain backprop, before every batch a pipeline is fed, and after every epoch).
std::function<bool()> interrupt_from(int n) {
  auto asked = std::make_shared<int>(0);
  return [asked, n] { return ++*asked >= n; };
}

// Interrupted plain backprop keeps the step it is at: inside an epoch it writes a checkpoint
// there, at an epoch's end the epoch's own; each resumes to the uninterrupted run's bits.
TEST(Training, AnInterruptedRunResumesFromTheStepItStoppedAt) {
  WholeRun w;
  auto& [train, test, dir, full, whole] = w;

  train::TrainConfig cut = small_config();
  cut.checkpoint = dir.file("cut.safetensors");
  cut.interrupt = interrupt_from(2);  // after step 2 of epoch 1
  const train::TrainResult part = train::run_training(cut, train, test);
  EXPECT_TRUE(part.interrupted);
  EXPECT_EQ(part.steps, 2);
  EXPECT_TRUE(part.epochs.empty()) << "an epoch cut short is not reported";
  EXPECT_EQ(io::read_safetensors(cut.checkpoint).metadata.at("step"), "2");
  train::TrainConfig rest = small_config();
  rest.resume = cut.checkpoint;
  rest.checkpoint = dir.file("rest.safetensors");
  const train::TrainResult resumed = train::run_training(rest, train, test);
  EXPECT_FALSE(resumed.interrupted);
  EXPECT_EQ(resumed.steps, 8);
  expect_same_tensors(full.checkpoint, rest.checkpoint);
  ASSERT_EQ(resumed.epochs.size(), 2u);
  EXPECT_EQ(resumed.epochs[1].test_acc, whole.epochs[1].test_acc);

  // Asked after step 4, the last of epoch 1: the epoch ends as usual (evaluated, checkpointed),
  // and the run stops there.
  cut.checkpoint = dir.file("cut-at-end.safetensors");
  cut.interrupt = interrupt_from(4);
  const train::TrainResult at_end = train::run_training(cut, train, test);
  EXPECT_TRUE(at_end.interrupted);
  ASSERT_EQ(at_end.epochs.size(), 1u);
  EXPECT_EQ(at_end.epochs[0].test_acc, whole.epochs[0].test_acc);
  EXPECT_EQ(io::read_safetensors(cut.checkpoint).metadata.at("step"), "4");
  rest.resume = cut.checkpoint;
  rest.checkpoint = dir.file("rest-at-end.safetensors");
  train::run_training(rest, train, test);
  expect_same_tensors(full.checkpoint, rest.checkpoint);

  // Without --checkpoint nothing is written, and the run still stops.
  train::TrainConfig bare = small_config();
  bare.interrupt = interrupt_from(1);
  EXPECT_EQ(train::run_training(bare, train, test).steps, 1);
}

// An interrupted pipeline stops feeding, drains the batches in flight, and drops the epoch: it
// checkpoints only at epoch boundaries, and the last one stands.
TEST(Training, AnInterruptedPipelineDropsTheEpochItWasIn) {
  const data::Dataset train = synthetic_set(96, 9), test = synthetic_set(30, 10);
  TempDir dir;
  train::TrainConfig full = small_config();  // 2 epochs of 3 steps
  full.method = "fdg";
  full.split_at = "4";
  full.shrink = 0.5f;
  full.checkpoint = dir.file("full-{epoch}.safetensors");
  const train::TrainResult whole = train::run_training(full, train, test);
  ASSERT_EQ(whole.epochs.size(), 2u);

  train::TrainConfig cut = full;
  cut.checkpoint = dir.file("cut-{epoch}.safetensors");
  cut.log = dir.file("cut.log");
  cut.progress = "plain";
  cut.interrupt = interrupt_from(3);  // fed 2 of epoch 1's 3 batches
  const train::TrainResult part = train::run_training(cut, train, test);
  EXPECT_TRUE(part.interrupted);
  EXPECT_TRUE(part.epochs.empty());
  EXPECT_FALSE(fs::exists(dir.file("cut-1.safetensors")));
  const std::string text = read_text(cut.log);
  EXPECT_NE(text.find("interrupted in epoch 1 after 2 of 3 batches, which are dropped"), std::string::npos) << text;
  EXPECT_NE(text.find("nothing was checkpointed yet: start again"), std::string::npos) << text;

  // Resumed from epoch 1 and interrupted in epoch 2: epoch 1's checkpoint is where to go on.
  train::TrainConfig again = full;
  again.resume = dir.file("full-1.safetensors");
  again.checkpoint = dir.file("again-{epoch}.safetensors");
  again.log = dir.file("again.log");
  again.progress = "plain";
  again.interrupt = interrupt_from(2);
  const train::TrainResult dropped = train::run_training(again, train, test);
  EXPECT_TRUE(dropped.interrupted);
  EXPECT_TRUE(dropped.epochs.empty());
  EXPECT_FALSE(fs::exists(dir.file("again-2.safetensors")));
  const std::string again_text = read_text(again.log);
  EXPECT_NE(again_text.find("go on with --resume " + again.resume), std::string::npos) << again_text;
  // Which gives epoch 2 as the uninterrupted run had it.
  again.interrupt = nullptr;
  const train::TrainResult rest = train::run_training(again, train, test);
  ASSERT_EQ(rest.epochs.size(), 1u);
  EXPECT_EQ(rest.epochs[0].test_acc, whole.epochs[1].test_acc);
  expect_same_tensors(dir.file("full-2.safetensors"), dir.file("again-2.safetensors"));
}

// A run whose loss stops being finite ends with an error before it checkpoints the weights
// that produced it: the last checkpoint written stays a good one.
TEST(Training, ADivergedRunStopsBeforeCheckpointingItsWeights) {
  const data::Dataset train = synthetic_set(128, 1), test = synthetic_set(40, 2);
  TempDir dir;
  for (const char* method : {"bp", "fdg"}) {
    train::TrainConfig c = small_config();  // 2 epochs of 4 steps
    c.method = method;
    if (c.method == "fdg") c.split_at = "4";
    // A learning rate 1e9 times larger from epoch 2 on.
    c.schedule = "multistep";
    c.milestones = {0.5};
    c.gamma = 1e9f;
    c.checkpoint = dir.file(std::string(method) + "-{epoch}.safetensors");
    test::expect_error<Error>([&] { train::run_training(c, train, test); },
                              {"the training loss is ", "(epoch 2): the run diverged"});
    EXPECT_TRUE(fs::exists(dir.file(std::string(method) + "-1.safetensors"))) << method;
    EXPECT_FALSE(fs::exists(dir.file(std::string(method) + "-2.safetensors"))) << method;
  }
}

// --split-by flops: the cuts follow the counted FLOPs of the blocks, the same on every run
// (measured block times may differ from run to run).
TEST(Training, CutsByFlopsAreTheBalancedCutsOfTheCountedFlops) {
  const data::Dataset train = synthetic_set(64, 3), test = synthetic_set(16, 4);
  TempDir dir;
  train::TrainConfig c = small_config();
  c.method = "fdg";
  c.split = 3;
  c.split_by = "flops";
  c.epochs = 1;
  c.checkpoint = dir.file("flops.safetensors");
  train::run_training(c, train, test);
  const Network net = layers::build_resnet("resnet20", 10, 0);
  std::string want;
  for (size_t cut : balanced_cuts(net.block_forward_flops({c.batch_size, 32, 32, 3}), 3))
    want += (want.empty() ? "" : ",") + std::to_string(cut);
  EXPECT_EQ(io::read_safetensors(c.checkpoint).metadata.at("cuts"), want);
  EXPECT_EQ(want, "4,7");  // stem + 3 blocks | 3 blocks | 3 blocks + head (FDG's own cuts too)
  // A resume keeps the recorded cuts, and refuses another number of modules.
  train::TrainConfig other = c;
  other.resume = c.checkpoint;
  other.checkpoint.clear();
  other.epochs = 1;
  other.split = 2;
  test::expect_error([&] { train::run_training(other, train, test); },
                     {"was written by a run over 3 modules (cuts 4,7)", "same --split/--split-at"});
  other.split = 3;
  other.split_at = "5,8";
  test::expect_error([&] { train::run_training(other, train, test); }, {"over 3 modules (cuts 4,7)"});
  c.split_by = "params";
  test::expect_error([&] { train::run_training(c, train, test); }, {"--split-by must be time or flops, got 'params'"});

  // --deterministic balances --split K's cuts by FLOPs too (measured times differ run to run),
  // refuses measured ones asked for, and the banner says how the cuts were chosen.
  c.split_by = "time";
  c.deterministic = true;
  test::expect_error([&] { train::run_training(c, train, test); },
                     {"--split-by time measures the cuts", "does not go with --deterministic"});
  c.split_by.clear();
  c.checkpoint = dir.file("deterministic.safetensors");
  c.log = dir.file("deterministic.log");
  c.progress = "plain";
  train::run_training(c, train, test);
  EXPECT_EQ(io::read_safetensors(c.checkpoint).metadata.at("cuts"), want);
  EXPECT_NE(read_text(c.log).find("; cuts balanced by counted FLOPs (--deterministic)], shrink"), std::string::npos)
      << read_text(c.log);
  c.deterministic = false;
  c.log = dir.file("measured.log");
  c.checkpoint.clear();
  train::run_training(c, train, test);
  EXPECT_NE(read_text(c.log).find("; cuts balanced by measured block times]"), std::string::npos) << read_text(c.log);
}

TEST(Training, CheckpointHoldsPyTorchNamesAndLayouts) {
  const data::Dataset train = synthetic_set(64, 4);
  TempDir dir;
  train::TrainConfig c = small_config();
  c.epochs = 1;
  c.checkpoint = dir.file("ckpt.safetensors");
  train::run_training(c, train, data::Dataset{});

  // Loading into a differently initialised network restores every tensor exactly.
  Network net = layers::build_resnet("resnet20", 10, 99);
  auto s = make_stream(Device::cpu());
  Sgd opt(net.state().params, SgdConfig{}, *s);
  const auto meta = load_checkpoint(c.checkpoint, net, {&opt}, *s);
  EXPECT_EQ(meta.at("model"), "resnet20");
  EXPECT_EQ(meta.at("step"), "2");
  const io::SafetensorsFile f = io::read_safetensors(c.checkpoint);
  const io::TensorRecord* conv = f.find("layer2.0.conv1.weight");
  ASSERT_NE(conv, nullptr);
  EXPECT_EQ(conv->dtype, "F32");
  EXPECT_EQ(conv->shape, (std::vector<int64_t>{32, 16, 3, 3}));  // OIHW, as PyTorch stores it
  const Tensor* ours = nullptr;
  for (auto& [n, p] : net.state().params)
    if (n == "layer2.0.conv1.weight") ours = &p->value;
  ASSERT_NE(ours, nullptr);
  const float* pt = reinterpret_cast<const float*>(conv->data.data());
  for (int k : {0, 7, 31})
    for (int ch : {0, 5, 15})
      for (int r : {0, 2})
        for (int col : {1, 2}) EXPECT_EQ(pt[((k * 16 + ch) * 3 + r) * 3 + col], ours->at<float>(((k * 3 + r) * 3 + col) * 16 + ch));
  const io::TensorRecord* tracked = f.find("bn1.num_batches_tracked");
  ASSERT_NE(tracked, nullptr);
  EXPECT_EQ(tracked->dtype, "I64");
  int64_t batches = 0;
  std::memcpy(&batches, tracked->data.data(), 8);
  EXPECT_EQ(batches, 2);
  EXPECT_NE(f.find("bn1.running_var"), nullptr);
  EXPECT_NE(f.find("linear.bias"), nullptr);
  EXPECT_NE(f.find("_optim.momentum.layer3.2.conv2.weight"), nullptr);
  // Saving the restored network reproduces the file's tensors.
  save_checkpoint(dir.file("again.safetensors"), net, {&opt}, meta, *s);
  expect_same_tensors(c.checkpoint, dir.file("again.safetensors"));
  // A checkpoint of another architecture is rejected, naming the missing tensor, before any
  // tensor is written: the resnet32 keeps every weight, buffer, counter and momentum it had
  // (the tensors the two share by name, conv1 and layer1.0 among them, were overwritten before).
  Network other = layers::build_resnet("resnet32", 10, 0);
  Sgd other_opt(other.state().params, SgdConfig{0.9f, 0.f, false}, *s);
  for (auto& [n, p] : other.state().params) ops::fill(*s, p->grad, 0.5f);
  other_opt.step(*s, 0.1f);  // momenta of 0.5 everywhere
  s->synchronize();
  const std::string before = dir.file("resnet32-before.safetensors");
  save_checkpoint(before, other, {&other_opt}, {}, *s);
  try {
    load_checkpoint(c.checkpoint, other, {&other_opt}, *s);
    FAIL() << "loaded a resnet20 checkpoint into a resnet32";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer1.3"), std::string::npos) << e.what();
  }
  save_checkpoint(dir.file("resnet32-after.safetensors"), other, {&other_opt}, {}, *s);
  expect_same_tensors(before, dir.file("resnet32-after.safetensors"));
}

// A checkpoint is loaded as PyTorch's strict load_state_dict would: a deeper ResNet's file holds
// every name of a shallower one and more, and is refused. Damage to its data, which the format
// cannot see, is found by the CRC-32 it records; a NaN in a file without one (another writer's)
// is refused by name. A refused file changes nothing.
TEST(Training, LoadingRefusesAnotherModelsTensorsDamagedDataAndNonFiniteValues) {
  TempDir dir;
  auto s = make_stream(Device::cpu());
  Network net = layers::build_resnet("resnet20", 10, 1);
  Sgd opt(net.state().params, SgdConfig{}, *s);
  const std::string ours = dir.file("resnet20.safetensors");
  save_checkpoint(ours, net, {&opt}, {{"model", "resnet20"}}, *s);
  const io::SafetensorsFile file = io::read_safetensors(ours);
  ASSERT_EQ(file.metadata.count("tensors_crc32"), 1u);
  EXPECT_EQ(file.metadata.at("tensors_crc32").size(), 8u);

  Network deeper = layers::build_resnet("resnet32", 10, 2);
  Sgd deeper_opt(deeper.state().params, SgdConfig{}, *s);
  const std::string r32 = dir.file("resnet32.safetensors");
  save_checkpoint(r32, deeper, {&deeper_opt}, {}, *s);
  auto expect_refused = [&](const std::string& path, Sgd* o, std::vector<std::string> parts) {
    try {
      load_checkpoint(path, net, o ? std::vector<Sgd*>{o} : std::vector<Sgd*>{}, *s);
      ADD_FAILURE() << path << " was loaded";
    } catch (const Error& e) {
      for (const std::string& part : parts)
        EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << "no '" << part << "' in: " << e.what();
    }
    const std::string after = dir.file("after.safetensors");
    save_checkpoint(after, net, {&opt}, {{"model", "resnet20"}}, *s);
    expect_same_tensors(ours, after);  // the refused load changed nothing
  };
  expect_refused(r32, &opt, {"resnet32.safetensors", "'layer1.3.", "does not name", "another model"});
  expect_refused(r32, nullptr, {"'layer1.3.", "this network does not name"});  // eval: weights alone
  // Evaluation reads no momenta: the file's are no unexpected tensors then.
  EXPECT_NO_THROW(load_checkpoint(ours, net, {}, *s));

  // One flipped bit in the data.
  std::vector<uint8_t> bytes;
  {
    std::ifstream in(ours, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  ASSERT_GT(bytes.size(), 1000u);
  bytes[bytes.size() - 700] ^= 0x10;
  const std::string damaged = dir.file("damaged.safetensors");
  std::ofstream(damaged, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  expect_refused(damaged, &opt, {"damaged.safetensors", "CRC-32", "the file is damaged"});

  // Another writer's file (no CRC) loads; with a NaN in it, it is refused naming the tensor.
  io::SafetensorsFile foreign = file;
  foreign.metadata.erase("tensors_crc32");
  const std::string plain = dir.file("foreign.safetensors");
  io::write_safetensors(plain, foreign.tensors, foreign.metadata);
  EXPECT_NO_THROW(load_checkpoint(plain, net, {&opt}, *s));
  for (io::TensorRecord& r : foreign.tensors)
    if (r.name == "layer2.1.bn1.running_var") {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      std::memcpy(r.data.data() + 4 * 3, &nan, 4);
    }
  const std::string with_nan = dir.file("nan.safetensors");
  io::write_safetensors(with_nan, foreign.tensors, foreign.metadata);
  expect_refused(with_nan, &opt, {"nan.safetensors", "'layer2.1.bn1.running_var' holds NaN (element 3)"});

  // Weights alone (PyTorch's save_file of a state_dict): evaluated, but refused for training as
  // holding no optimizer state, not as another model's file.
  io::SafetensorsFile weights = file;
  weights.metadata.clear();
  weights.tensors.erase(std::remove_if(weights.tensors.begin(), weights.tensors.end(),
                                       [](const io::TensorRecord& r) { return r.name.rfind("_optim.", 0) == 0; }),
                        weights.tensors.end());
  ASSERT_LT(weights.tensors.size(), file.tensors.size());
  const std::string weights_only = dir.file("weights.safetensors");
  io::write_safetensors(weights_only, weights.tensors, weights.metadata);
  EXPECT_NO_THROW(load_checkpoint(weights_only, net, {}, *s));
  expect_refused(weights_only, &opt, {"weights.safetensors: checkpoint holds no optimizer state", "staleprop eval"});
}

TEST(Training, EvaluationOfACheckpointMatchesTheRun) {
  const data::Dataset train = synthetic_set(64, 5), test = synthetic_set(50, 6);
  TempDir dir;
  train::TrainConfig c = small_config();
  c.epochs = 1;
  c.eval_batch_size = 16;  // a smaller last batch too
  c.label_smoothing = 0.2f;  // trains on the smoothed loss; both evaluations report the plain one
  c.checkpoint = dir.file("ckpt.safetensors");
  const train::TrainResult r = train::run_training(c, train, test);
  const train::EvalResult e = train::evaluate_checkpoint(c.checkpoint, "", "cpu", test, 16);
  EXPECT_EQ(e.samples, 50);
  EXPECT_EQ(e.precision, "fp32");
  EXPECT_EQ(e.accuracy, r.epochs.back().test_acc);
  EXPECT_DOUBLE_EQ(e.loss, r.epochs.back().test_loss);
  // Both agree with the checkpoint's network in evaluation mode run by hand over the test images
  // in order, neither shuffled nor augmented (the two evaluations share their loader).
  {
    Network net = layers::build_resnet("resnet20", 10, 123);
    auto s = make_stream(Device::cpu());
    load_checkpoint(c.checkpoint, net, {}, *s);
    net.set_training(false);
    data::LoaderOptions plain;
    plain.batch_size = 16, plain.shuffle = false, plain.augment = false;
    const std::vector<int64_t> order = data::epoch_order(test.size(), false, 0, 0);
    double loss_sum = 0;
    int64_t correct = 0;
    for (int64_t b = 0; b * 16 < test.size(); ++b) {
      const int64_t n = std::min<int64_t>(16, test.size() - b * 16);
      const Tensor images = Tensor::empty({n, 32, 32, 3}, DType::F32), labels = Tensor::empty({n}, DType::I32);
      std::vector<int64_t> ids(static_cast<size_t>(n));
      data::fill_batch(test, order, plain, 0, b, images.data<float>(), labels.data<int32_t>(), ids.data());
      Tensor h = images;
      std::vector<Context> ctx(net.size());
      for (size_t i = 0; i < net.size(); ++i) h = net.block(i).forward(*s, h, ctx[i]);
      s->synchronize();
      for (int64_t i = 0; i < n; ++i) {
        const float* z = h.data<float>() + i * 10;
        const int32_t label = labels.data<int32_t>()[i];
        double top = z[0], sum = 0;
        for (int k = 1; k < 10; ++k) top = std::max(top, double(z[k]));
        for (int k = 0; k < 10; ++k) sum += std::exp(double(z[k]) - top);
        loss_sum += std::log(sum) + top - z[label];
        correct += std::max_element(z, z + 10) - z == label;
      }
    }
    EXPECT_EQ(double(correct) / double(test.size()), e.accuracy);
    EXPECT_NEAR(loss_sum / double(test.size()), e.loss, 1e-5 * e.loss);
  }
  // A bf16 run is evaluated in bf16, as its own test passes were; in fp32 when asked.
  c.precision = "bf16";
  c.checkpoint = dir.file("bf16.safetensors");
  const train::TrainResult b = train::run_training(c, train, test);
  const train::EvalResult eb = train::evaluate_checkpoint(c.checkpoint, "", "cpu", test, 16);
  EXPECT_EQ(eb.precision, "bf16");
  EXPECT_EQ(eb.accuracy, b.epochs.back().test_acc);
  EXPECT_DOUBLE_EQ(eb.loss, b.epochs.back().test_loss);
  const train::EvalResult ef = train::evaluate_checkpoint(c.checkpoint, "", "cpu", test, 16, "fp32");
  EXPECT_EQ(ef.precision, "fp32");
  EXPECT_NE(ef.loss, eb.loss) << "the fp32 evaluation ran in bf16";
}

TEST(Training, LossFallsOnSyntheticImages) {
  const data::Dataset train = synthetic_set(320, 7);
  train::TrainConfig c = small_config();
  c.epochs = 3;
  c.augment = false;
  c.schedule = "constant";
  c.warmup_epochs = 0;
  TempDir dir;
  c.metrics = dir.file("metrics.jsonl");
  const train::TrainResult r = train::run_training(c, train, data::Dataset{});
  ASSERT_EQ(r.epochs.size(), 3u);
  EXPECT_LT(r.epochs[2].train_loss, 0.5 * r.epochs[0].train_loss)
      << "loss " << r.epochs[0].train_loss << " -> " << r.epochs[2].train_loss;
  EXPECT_GT(r.epochs[2].train_acc, 0.8);
  // Metrics: one JSON object per line, a start record first, then step records and one epoch
  // record per epoch.
  std::ifstream in(c.metrics);
  int steps = 0, epochs = 0, starts = 0;
  for (std::string line; std::getline(in, line);) {
    ASSERT_TRUE(line.front() == '{' && line.back() == '}') << line;
    if (line.find("\"event\":\"start\"") != std::string::npos) {
      EXPECT_EQ(steps + epochs, 0) << "the start record comes first";
      EXPECT_NE(line.find("\"settings\":{"), std::string::npos) << line;
      ++starts;
      continue;
    }
    for (const char* key : {"\"epoch\":", "\"step\":", "\"loss\":", "\"train_acc\":", "\"lr\":",
                            "\"images_per_s\":", "\"elapsed_s\":"})
      EXPECT_NE(line.find(key), std::string::npos) << key << " missing in " << line;
    steps += line.find("\"event\":\"step\"") != std::string::npos;
    epochs += line.find("\"event\":\"epoch\"") != std::string::npos;
  }
  EXPECT_EQ(starts, 1);
  EXPECT_EQ(epochs, 3);
  EXPECT_EQ(steps, 30);  // 320 images in batches of 32: 10 steps an epoch, each a tenth of it
}

TEST(Training, LossFallsOnAFewHundredRealImages) {
  const std::string dir = test::real_cifar10_dir();
  if (dir.empty()) GTEST_SKIP() << test::no_cifar10_reason();
  const data::Dataset train = data::load_cifar10(dir, data::Split::Train, 512);
  const data::Dataset test = data::load_cifar10(dir, data::Split::Test, 500);
  train::TrainConfig c = small_config();
  c.batch_size = 64;
  c.epochs = 5;
  c.augment = false;
  c.schedule = "constant";
  c.warmup_epochs = 0;
  const train::TrainResult r = train::run_training(c, train, test);
  ASSERT_EQ(r.epochs.size(), 5u);
  const train::EpochResult& first = r.epochs.front();
  const train::EpochResult& last = r.epochs.back();
  std::printf("train loss %.3f -> %.3f, train accuracy %.3f -> %.3f, held-out accuracy %.3f\n", first.train_loss,
              last.train_loss, first.train_acc, last.train_acc, last.test_acc);
  // Clearly below chance (ln 10 = 2.303, where a network that predicts every class alike
  // settles), not merely below a first epoch that started above it ...
  EXPECT_LT(last.train_loss, 0.85 * std::log(10.0)) << "loss " << first.train_loss << " -> " << last.train_loss;
  EXPECT_LT(last.train_loss, 0.8 * first.train_loss);
  EXPECT_GT(last.train_acc, 0.25);
  // ... and what it learnt carries to images it never saw (chance: 10%).
  EXPECT_GT(last.test_acc, 0.18);
}

// Also with staleness jitter, whose draws a resumed run must make as the whole run does.
// Plain backprop computes the same bits over any cuts (Pipeline tests): its checkpoint resumes
// over other cuts, also through the decoupled trainer (from graphs, or traced), which held it to
// the checkpoint's cuts, and gives the uninterrupted run's weights.
TEST(Training, APlainBackpropCheckpointResumesOverAnyCuts) {
  const data::Dataset train = synthetic_set(64, 9), test = synthetic_set(16, 10);
  TempDir dir;
  train::TrainConfig plain = small_config();
  plain.checkpoint = dir.file("plain-{epoch}.safetensors");
  train::run_training(plain, train, test);
  train::TrainConfig three = plain;
  three.split_at = "3,6";
  three.checkpoint = dir.file("three-{epoch}.safetensors");
  train::run_training(three, train, test);
  train::TrainConfig graphs = plain;
  graphs.graphs = true;
  graphs.checkpoint = dir.file("graphs-{epoch}.safetensors");
  train::run_training(graphs, train, test);
  // Three modules' first epoch, then one module from graphs; one module's (from graphs), then three.
  for (const auto& [from, to] : {std::pair<std::string, train::TrainConfig>{"three", graphs},
                                 std::pair<std::string, train::TrainConfig>{"graphs", three}}) {
    train::TrainConfig rest = to;
    rest.resume = dir.file(from + "-1.safetensors");
    rest.checkpoint = dir.file(from + "-then-{epoch}.safetensors");
    train::run_training(rest, train, test);
    expect_same_tensors(dir.file("plain-2.safetensors"), dir.file(from + "-then-2.safetensors"));
  }
}

TEST(Training, DecoupledRunResumesExactlyAtAnEpochBoundary) {
  const data::Dataset train = synthetic_set(96, 9), test = synthetic_set(30, 10);
  TempDir dir;
  train::TrainConfig full = small_config();
  full.method = "fdg";
  full.split = 3;  // cuts from measured block times, kept in the checkpoint for the resume
  full.shrink = 0.5f;
  full.epochs = 3;
  full.trace = dir.file("trace.json");
  for (const int jitter : {0, 2}) {
    SCOPED_TRACE("staleness jitter " + std::to_string(jitter));
    const std::string tag = "-j" + std::to_string(jitter);
    full.staleness_jitter = jitter;
    full.checkpoint = dir.file("full" + tag + "-{epoch}.safetensors");
    const train::TrainResult whole = train::run_training(full, train, test);
    ASSERT_EQ(whole.epochs.size(), 3u);
    const auto meta = io::read_safetensors(dir.file("full" + tag + "-1.safetensors")).metadata;
    EXPECT_EQ(meta.at("step"), "3");
    EXPECT_EQ(std::count(meta.at("cuts").begin(), meta.at("cuts").end(), ','), 1) << meta.at("cuts");

    train::TrainConfig rest = full;
    rest.resume = dir.file("full" + tag + "-1.safetensors");
    rest.checkpoint = dir.file("rest" + tag + "-{epoch}.safetensors");
    rest.trace.clear();
    const train::TrainResult resumed = train::run_training(rest, train, test);
    ASSERT_EQ(resumed.epochs.size(), 2u);
    EXPECT_EQ(resumed.epochs[1].test_acc, whole.epochs[2].test_acc);
    expect_same_tensors(dir.file("full" + tag + "-3.safetensors"), dir.file("rest" + tag + "-3.safetensors"));
  }
  // The jitter changed the run: without it, over the same cuts, the weights end otherwise.
  {
    train::TrainConfig plain = full;
    plain.staleness_jitter = 0;
    plain.split_at = io::read_safetensors(dir.file("full-j2-3.safetensors")).metadata.at("cuts");
    plain.checkpoint = dir.file("plain-{epoch}.safetensors");
    plain.trace.clear();
    train::run_training(plain, train, test);
    EXPECT_TRUE(any_tensor_differs(dir.file("plain-3.safetensors"), dir.file("full-j2-3.safetensors")))
        << "staleness jitter 2 over cuts " << plain.split_at << " changed no weight";
  }

  // The rule of a decoupled run is its own too: resuming with another is refused.
  train::TrainConfig resume_full = full;
  resume_full.resume = dir.file("full-j2-1.safetensors");
  resume_full.checkpoint.clear();
  resume_full.trace.clear();
  const auto refused = [&](const std::function<void(train::TrainConfig&)>& change,
                           const std::vector<std::string>& reason) {
    expect_resume_refused(resume_full, change, reason, train, test);
  };
  refused([](train::TrainConfig& c) { c.method = "ddg"; }, {"--method fdg, not ddg"});
  refused([](train::TrainConfig& c) { c.shrink = 0.25f; }, {"--shrink 0.5, not 0.25", "same training rule"});
  refused([](train::TrainConfig& c) { c.staleness_jitter = 1; }, {"--staleness-jitter 2, not 1"});
  refused([](train::TrainConfig& c) { c.weight_stash = true; }, {"--weight-stash 0, not 1"});
  refused([](train::TrainConfig& c) { c.recompute = true; }, {"--recompute 0, not 1"});
  // With weight stashing, recomputing rebuilds the very activations kept: a stashed run may go
  // on with --recompute (to save memory), bit for bit.
  train::TrainConfig stash = full;
  stash.staleness_jitter = 0;
  stash.weight_stash = true;
  stash.epochs = 2;
  stash.trace.clear();
  stash.checkpoint = dir.file("stash-{epoch}.safetensors");
  stash.metrics = dir.file("stash.jsonl");
  train::run_training(stash, train, test);
  {
    // Its epoch records report the weight copies kept for batches in flight.
    std::ifstream in(stash.metrics);
    std::string line;
    int epochs = 0;
    while (std::getline(in, line))
      if (line.find("\"event\":\"epoch\"") != std::string::npos) {
        EXPECT_GT(number_after(line, "stash_bytes"), 0) << line;
        ++epochs;
      }
    EXPECT_EQ(epochs, 2);
  }
  stash.metrics.clear();
  stash.resume = dir.file("stash-1.safetensors");
  stash.recompute = true;
  stash.checkpoint = dir.file("stash-recompute-{epoch}.safetensors");
  train::run_training(stash, train, test);
  expect_same_tensors(dir.file("stash-2.safetensors"), dir.file("stash-recompute-2.safetensors"));

  // A checkpoint of the run's last step leaves nothing to train, and says so.
  train::TrainConfig done = full;
  done.resume = dir.file("full-j2-3.safetensors");
  done.checkpoint = dir.file("done.safetensors");
  done.trace.clear();
  const train::TrainResult nothing = train::run_training(done, train, test);
  EXPECT_TRUE(nothing.already_complete);
  EXPECT_TRUE(nothing.epochs.empty());
  EXPECT_EQ(nothing.steps, 9);
  EXPECT_FALSE(fs::exists(done.checkpoint));

  const std::string json = read_text(full.trace);
  EXPECT_EQ(json.rfind("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[", 0), 0u);
  EXPECT_NE(json.find("\"module 3\""), std::string::npos);
  EXPECT_NE(json.find("fwd+loss+bwd"), std::string::npos);
  EXPECT_NE(json.find("\"bwd b0\""), std::string::npos);

  // Mid-epoch checkpoints need a drained pipeline, so they are refused with a reason.
  train::TrainConfig mid = full;
  mid.checkpoint_every = 2;
  EXPECT_THROW(train::run_training(mid, train, test), Error);
}

// The trace's times a minute into an epoch, where the elapsed times (floats) step by about 4 us:
// a stage's end where the next one starts, and an op inside the first. Each time is written in
// microseconds to the nanosecond, the end rounded from the origin as the start, so the stages
// stay apart and the op inside (8 significant digits put the first stage's end 0.44 us past
// the second's start). The file is replaced whole.
TEST(Training, TraceTimesKeepStagesApartAndOpsInsideLateInAnEpoch) {
  TempDir dir;
  const std::string path = dir.file("trace.json");
  sp::test::write_bytes(path, {'o', 'l', 'd'});
  PipelineEpochStats st;
  st.stages.push_back({0, 7, 3, "bwd", 65432.1015625, 65433.359375 - 65432.1015625});
  st.stages.push_back({0, 7, 3, "step", 65433.359375, 0.5});
  st.ops.push_back({0, "conv2d_backward_data", "f32 [1]", 65432.2109375, 0.3984375});
  train::write_trace(path, st, 1, 0);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"trace.json"}) << "a temporary file left";
  const std::string json = read_text(path);
  EXPECT_EQ(json.rfind("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[", 0), 0u);
  // Each event's start and end in whole nanoseconds, as written.
  std::vector<std::pair<long long, long long>> spans;
  for (size_t at = json.find("\"ts\":"); at != std::string::npos; at = json.find("\"ts\":", at + 1)) {
    long long ts_us = 0, ts_ns = 0, dur_us = 0, dur_ns = 0;
    ASSERT_EQ(std::sscanf(json.c_str() + at, "\"ts\":%lld.%3lld,\"dur\":%lld.%3lld", &ts_us, &ts_ns, &dur_us, &dur_ns),
              4)
        << json.substr(at, 60);
    spans.emplace_back(ts_us * 1000 + ts_ns, ts_us * 1000 + ts_ns + dur_us * 1000 + dur_ns);
  }
  ASSERT_EQ(spans.size(), 3u) << json;
  EXPECT_EQ(spans[0].first, 65432101563LL);
  EXPECT_LE(spans[0].second, spans[1].first) << "the backward ends after the step starts";
  EXPECT_EQ(spans[0].second, 65433359375LL);
  EXPECT_GE(spans[2].first, spans[0].first);
  EXPECT_LE(spans[2].second, spans[0].second) << "the op leaves its stage";
  EXPECT_NE(json.find("\"ts\":65432101.563,\"dur\":1257.812"), std::string::npos) << json;
}

// --trace on plain backprop over one module: the run goes through the decoupled trainer to time
// its stages, writes the trace, and trains the same bits as without it.
TEST(Training, ATracedOneModuleRunWritesItsTraceAndTrainsTheSameBits) {
  const data::Dataset train = synthetic_set(96, 13), test = synthetic_set(30, 14);
  TempDir dir;
  train::TrainConfig plain = small_config();
  plain.epochs = 2;
  plain.checkpoint = dir.file("plain.safetensors");
  const train::TrainResult untraced = train::run_training(plain, train, test);
  train::TrainConfig traced = plain;
  traced.checkpoint = dir.file("traced.safetensors");
  traced.trace = dir.file("trace.json");
  const train::TrainResult with_trace = train::run_training(traced, train, test);
  expect_same_tensors(plain.checkpoint, traced.checkpoint);
  ASSERT_EQ(with_trace.epochs.size(), 2u);
  EXPECT_EQ(with_trace.epochs[1].test_acc, untraced.epochs[1].test_acc);
  EXPECT_EQ(with_trace.epochs[1].test_loss, untraced.epochs[1].test_loss);
  const std::string json = read_text(traced.trace);
  EXPECT_EQ(json.rfind("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[", 0), 0u);
  EXPECT_NE(json.find("\"module 1\""), std::string::npos);
  EXPECT_NE(json.find("\"fwd+loss+bwd b0\""), std::string::npos);
  EXPECT_EQ(json.find("\"module 2\""), std::string::npos);
  EXPECT_EQ(json.find("\"cat\":\"op\""), std::string::npos) << "ops only with --trace-ops";
  // --trace-ops adds each op of the module's stream (category "op", its shapes), the same training.
  train::TrainConfig with_ops = traced;
  with_ops.trace = dir.file("ops.json");
  with_ops.trace_ops = true;
  with_ops.checkpoint = dir.file("ops.safetensors");
  train::run_training(with_ops, train, test);
  expect_same_tensors(plain.checkpoint, with_ops.checkpoint);
  const std::string ops_json = read_text(with_ops.trace);
  for (const char* op : {"\"name\":\"conv2d_forward\",\"cat\":\"op\"", "\"name\":\"sgd_step\",\"cat\":\"op\"",
                         "\"shapes\":\"f32 [", "\"fwd+loss+bwd b0\""})
    EXPECT_NE(ops_json.find(op), std::string::npos) << op;
  with_ops.graphs = true;
  test::expect_error([&] { train::run_training(with_ops, train, test); }, {"--trace-ops", "drop --graphs"});
  with_ops.graphs = false;
  with_ops.trace.clear();
  test::expect_error([&] { train::run_training(with_ops, train, test); }, {"--trace-ops", "give --trace"});
  // Mid-epoch checkpoints are the plain trainer's alone: refused with --trace, with a reason.
  traced.checkpoint_every = 2;
  test::expect_error([&] { train::run_training(traced, train, test); }, {"--checkpoint-every", "--trace"});
  // So with --recompute or --weight-stash, which also send one module through the pipeline.
  train::TrainConfig recomputed = plain;
  recomputed.recompute = true;
  recomputed.checkpoint_every = 2;
  test::expect_error([&] { train::run_training(recomputed, train, test); }, {"--checkpoint-every", "--recompute"});
  recomputed.recompute = false, recomputed.weight_stash = true;
  recomputed.checkpoint_every = 0, recomputed.stop_after_steps = 3;
  test::expect_error([&] { train::run_training(recomputed, train, test); }, {"--stop-after", "--weight-stash"});
}

// --graphs replays the steady-state ticks; the run (evaluation between epochs included) is the
// same bit for bit.
TEST(Training, GraphsChangeNoBitOfADecoupledRun) {
  const data::Dataset train = synthetic_set(96, 11), test = synthetic_set(30, 12);
  TempDir dir;
  train::TrainConfig c = small_config();
  c.batch_size = 16;  // 6 steps per epoch
  c.epochs = 3;
  c.method = "fdg";
  c.split_at = "4";  // fixed cuts (measured ones may differ between the two runs)
  c.shrink = 0.5f;
  c.checkpoint = dir.file("eager.safetensors");
  const train::TrainResult eager = train::run_training(c, train, test);
  EXPECT_EQ(eager.graph_replays, 0);
  c.graphs = true;
  c.checkpoint = dir.file("graphs.safetensors");
  const train::TrainResult graphs = train::run_training(c, train, test);
  EXPECT_GT(graphs.graph_replays, 6) << "the last epoch should replay most units";
  ASSERT_EQ(graphs.epochs.size(), eager.epochs.size());
  for (size_t e = 0; e < eager.epochs.size(); ++e) {
    EXPECT_EQ(graphs.epochs[e].train_loss, eager.epochs[e].train_loss) << "epoch " << e;
    EXPECT_EQ(graphs.epochs[e].test_acc, eager.epochs[e].test_acc) << "epoch " << e;
  }
  expect_same_tensors(dir.file("eager.safetensors"), dir.file("graphs.safetensors"));
}

// --devices on emulated CPU devices: the modules' weights live on three devices, the checkpoint
// gathers them, a resume puts them back, and every bit equals the one-device run; plain backprop
// on --device cpu:2 equals the one on cpu.
TEST(Training, ModulesOnEmulatedDevicesTrainAndResumeAsOnOne) {
  const data::Dataset train = synthetic_set(64, 13), test = synthetic_set(20, 14);
  TempDir dir;
  train::TrainConfig one = small_config();
  one.method = "fdg";
  one.split_at = "4,7";
  one.shrink = 0.5f;
  one.checkpoint = dir.file("one-{epoch}.safetensors");
  const train::TrainResult a = train::run_training(one, train, test);
  train::TrainConfig spread = one;
  spread.devices = {"cpu:1", "cpu:2", "cpu:3"};
  spread.device = "cpu:1";  // as the command line defaults it
  spread.checkpoint = dir.file("spread-{epoch}.safetensors");
  spread.metrics = dir.file("spread.jsonl");
  const train::TrainResult b = train::run_training(spread, train, test);
  // The modules' memory was on their devices, each reported.
  std::ifstream metrics(spread.metrics);
  std::string line, last_epoch;
  while (std::getline(metrics, line))
    if (line.find("\"event\":\"epoch\"") != std::string::npos) last_epoch = line;
  for (const char* d : {"cpu:1", "cpu:2", "cpu:3"}) {
    const size_t at = last_epoch.find("\"" + std::string(d) + "\":");
    ASSERT_NE(at, std::string::npos) << d << " in " << last_epoch;
    EXPECT_GT(std::stoll(last_epoch.substr(at + std::strlen(d) + 3)), 1 << 20) << d << " in " << last_epoch;
  }
  // A decoupled epoch record: per-module busy share and idle time, the host's wait, the ticks
  // and the activation memory (each a number).
  EXPECT_GT(number_after(last_epoch, "ticks"), 0) << last_epoch;
  EXPECT_GT(number_after(last_epoch, "activation_bytes"), 0) << last_epoch;
  EXPECT_GE(number_after(last_epoch, "host_wait_pct"), 0) << last_epoch;
  EXPECT_EQ(last_epoch.find("stash_bytes"), std::string::npos) << "no stash without --weight-stash";
  size_t modules = 0;
  for (size_t at = last_epoch.find("{\"busy_pct\":"); at != std::string::npos;
       at = last_epoch.find("{\"busy_pct\":", at + 1)) {
    const std::string rec = last_epoch.substr(at);
    EXPECT_GT(number_after(rec, "busy_pct"), 0) << rec;
    EXPECT_GE(number_after(rec, "idle_ms"), 0) << rec;
    ++modules;
  }
  EXPECT_EQ(modules, 3u) << last_epoch;
  ASSERT_EQ(a.epochs.size(), 2u);
  ASSERT_EQ(b.epochs.size(), 2u);
  for (size_t e = 0; e < 2; ++e) {
    EXPECT_EQ(a.epochs[e].train_loss, b.epochs[e].train_loss) << "epoch " << e;
    EXPECT_EQ(a.epochs[e].test_loss, b.epochs[e].test_loss) << "epoch " << e;
    EXPECT_EQ(a.epochs[e].test_acc, b.epochs[e].test_acc) << "epoch " << e;
  }
  expect_same_tensors(dir.file("one-2.safetensors"), dir.file("spread-2.safetensors"));
  // A checkpoint of either layout resumes in the other.
  train::TrainConfig rest = spread;
  rest.resume = dir.file("one-1.safetensors");
  rest.checkpoint = dir.file("rest-{epoch}.safetensors");
  rest.metrics.clear();
  train::run_training(rest, train, test);
  expect_same_tensors(dir.file("one-2.safetensors"), dir.file("rest-2.safetensors"));
  train::TrainConfig back = one;
  back.resume = dir.file("spread-1.safetensors");
  back.checkpoint = dir.file("back-{epoch}.safetensors");
  train::run_training(back, train, test);
  expect_same_tensors(dir.file("one-2.safetensors"), dir.file("back-2.safetensors"));
  const train::EvalResult ev = train::evaluate_checkpoint(dir.file("spread-2.safetensors"), "", "cpu:2", test, 16);
  EXPECT_EQ(ev.accuracy, b.epochs[1].test_acc);

  // The run sets up, evaluates and checkpoints through --device, which must be of the modules' kind.
  train::TrainConfig mixed = spread;
  mixed.device = "cpu";
  mixed.devices = {"cuda:0", "cuda:1"};
  test::expect_error<Error>([&] { train::run_training(mixed, train, test); },
                            {"--devices cuda:0 and --device cpu must be the same kind", "give --device cuda:0"});
  mixed.devices = {"cpu:2"};
  test::expect_error<Error>([&] { train::run_training(mixed, train, test); }, {"--devices with one device is --device"});
  mixed.devices = {"cpu:1", "cpu:2"};  // for the 3 modules of --split-at 4,7
  test::expect_error<Error>([&] { train::run_training(mixed, train, test); },
                            {"--devices names 2 devices for 3 modules", "--split K, --split-at"});

  train::TrainConfig bp = small_config();
  bp.epochs = 1;
  bp.checkpoint = dir.file("bp-cpu.safetensors");
  train::run_training(bp, train, test);
  bp.device = "cpu:2";
  bp.checkpoint = dir.file("bp-cpu2.safetensors");
  train::run_training(bp, train, test);
  expect_same_tensors(dir.file("bp-cpu.safetensors"), dir.file("bp-cpu2.safetensors"));
}

// A full pipeline's rate from two epochs: 10 ms a batch, and 30 ms of fill and drain each epoch
// (depth 4 ticks), pay; their difference is the batches' alone.
TEST(Bench, TheSteadyRateCancelsEachEpochsFillAndDrain) {
  EXPECT_DOUBLE_EQ(train::steady_rate(20 * 10 + 30, 20, 10 * 10 + 30, 10, 8, 4), 8 * 10 / 0.1);  // 800 img/s
  EXPECT_DOUBLE_EQ(train::steady_rate(20 * 10 + 30, 20, 10 * 10 + 30, 10, 8, 0), 800.0);
  EXPECT_EQ(train::steady_rate(230, 20, 130, 4, 8, 4), 0) << "a short epoch that never fills the pipeline";
  EXPECT_EQ(train::steady_rate(130, 20, 130, 10, 8, 4), 0) << "noise as large as the difference";
  EXPECT_EQ(train::steady_rate(120, 20, 130, 10, 8, 4), 0);
  EXPECT_EQ(train::steady_rate(230, 10, 130, 10, 8, 4), 0) << "no longer epoch";
}

// staleprop bench / study: throughput on synthetic data, per-module busy shares, memory.
TEST(Bench, ThroughputBusyTimeAndMemoryOfBackpropAndDecoupledRuns) {
  train::BenchConfig c;
  c.model = "resnet20";
  c.batch_size = 8;
  c.steps = 3;
  c.warmup = 1;
  const auto t0 = std::chrono::steady_clock::now();
  const train::BenchResult bp = train::run_bench(c);
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(bp.modules, 1);
  EXPECT_GT(bp.images_per_s, 0);
  // The timed steps lie inside the call: their time cannot exceed its wall time.
  EXPECT_GT(bp.ms_per_step, 0);
  EXPECT_LE(double(c.steps) * bp.ms_per_step, wall_ms);
  EXPECT_GT(bp.peak_allocated_bytes, 0u);
  EXPECT_TRUE(bp.busy_pct.empty());
  EXPECT_EQ(bp.steady_images_per_s, bp.images_per_s);  // no fill or drain to take out

  c.method = "fdg";
  c.split = 3;
  // Fixed cuts: cuts measured per run vary with the machine's load, and the fp32 and bf16 runs
  // below must hold the same layers' activations.
  c.split_at = "4,7";
  const train::BenchResult fdg = train::run_bench(c);
  EXPECT_EQ(fdg.cuts, (std::vector<size_t>{4, 7}));
  EXPECT_EQ(fdg.modules, 3);
  ASSERT_EQ(fdg.cuts.size(), 2u);
  ASSERT_EQ(fdg.busy_pct.size(), 3u);
  for (double b : fdg.busy_pct) {
    EXPECT_GT(b, 0.0);
    EXPECT_LE(b, 100.0 + 1e-9);
  }
  EXPECT_EQ(fdg.ticks, c.steps + 2 * (3 - 1));  // the last batch enters module 3 after 2 hops of one tick each
  EXPECT_GT(fdg.peak_activation_bytes, 0u);
  // The steady state needs a second epoch that fills the pipeline (more than d_1 = 4 batches):
  // 3 steps give none (steady_rate's arithmetic is checked below).
  EXPECT_EQ(fdg.steady_images_per_s, 0);
  EXPECT_NE(fdg.json().find("\"steady_images_per_s\":null"), std::string::npos) << fdg.json();
  // bf16 mixed precision halves the activations kept for batches in flight.
  c.precision = "bf16";
  const train::BenchResult half = train::run_bench(c);
  EXPECT_LT(double(half.peak_activation_bytes), 0.6 * double(fdg.peak_activation_bytes));
  EXPECT_GT(double(half.peak_activation_bytes), 0.4 * double(fdg.peak_activation_bytes));

  const std::string j = fdg.json();
  for (const char* key : {"\"model\":\"resnet20\"", "\"method\":\"fdg\"", "\"modules\":3",
                          "\"images_per_s\":", "\"steady_images_per_s\":", "\"busy_pct\":[",
                          "\"peak_activation_bytes\":", "\"mainloop\":\"none\"", "\"kernel_switches\":\"none\""})
    EXPECT_NE(j.find(key), std::string::npos) << key << " in " << j;

  // --devices: the modules on emulated devices, each device's peak reported and summed.
  c.precision = "fp32";
  c.devices = {"cpu:1", "cpu:2", "cpu:3"};
  c.device = "cpu:1";
  const train::BenchResult spread = train::run_bench(c);
  EXPECT_EQ(spread.modules, 3);
  EXPECT_EQ(spread.cuts, (std::vector<size_t>{4, 7}));
  ASSERT_EQ(spread.peak_allocated_by_device.size(), 3u);
  for (const auto& [name, bytes] : spread.peak_allocated_by_device) EXPECT_GT(bytes, size_t(1) << 20) << name;
  EXPECT_NE(spread.json().find("\"peak_allocated_bytes_by_device\":{\"cpu:1\":"), std::string::npos) << spread.json();
  c.device = "cpu";
  c.devices = {"cuda:0", "cuda:1"};
  test::expect_error<Error>([&] { train::run_bench(c); }, {"must be the same kind", "give --device cuda:0"});
  c.devices = {"cpu:1", "cpu:2"};  // for 3 modules
  test::expect_error<Error>([&] { train::run_bench(c); }, {"--devices names 2 devices for 3 modules"});
  c.devices = {"cpu:2"};
  test::expect_error<Error>([&] { train::run_bench(c); }, {"--devices with one device is --device cpu:2"});
  c.devices.clear();
  c.split_at.clear();
  EXPECT_TRUE(fdg.peak_allocated_by_device.empty());

  // Graphs: the warm-up grows until every phase is captured, then every unit of the timed
  // steps (fill and drain included) is a replay.
  c.precision = "fp32";
  c.split = 2;
  c.graphs = true;
  const train::BenchResult replayed = train::run_bench(c);
  EXPECT_EQ(replayed.warmup, 3 * 2 + 2 + 2);  // 3 P (both modules: P = 2) + d_1 (2) + K (2)
  EXPECT_EQ(replayed.units, c.steps * 3);     // per batch: 2 forward units, 1 backward unit
  EXPECT_EQ(replayed.replayed_units, replayed.units);
  c.graphs = false;

  // --profile-ops: the device time of every op over more steps, beside the timed ones.
  c.method = "backprop";
  c.split = 1;
  c.profile_ops = 2;
  const train::BenchResult profiled = train::run_bench(c);
  EXPECT_GT(profiled.profiled_wall_ms, 0);
  int64_t convs = 0, sgd_steps = 0;
  double op_ms = 0;
  for (const OpTime& t : profiled.op_times) {
    if (t.op == "conv2d_forward") convs += t.calls;
    if (t.op == "sgd_step") sgd_steps += t.calls;
    op_ms += t.ms;
  }
  EXPECT_EQ(convs, 19 * c.profile_ops);  // ResNet-20: the stem and 18 block convolutions (option-A shortcuts)
  EXPECT_EQ(sgd_steps, c.profile_ops);   // one multi-tensor launch per step
  EXPECT_LE(op_ms, profiled.profiled_wall_ms * 1.001);
  EXPECT_NE(profiled.json().find("\"op_profile\":[{\"op\":"), std::string::npos);
  EXPECT_EQ(bp.json().find("op_profile"), std::string::npos);
  // The decoupled methods profile one more epoch: every module's ops, fill and drain included.
  c.method = "fdg";
  c.split = 2;
  const train::BenchResult fdg_profiled = train::run_bench(c);
  int64_t fdg_convs = 0;
  for (const OpTime& t : fdg_profiled.op_times)
    if (t.op == "conv2d_forward") fdg_convs += t.calls;
  EXPECT_EQ(fdg_convs, 19 * c.profile_ops);  // each batch forwarded once through both modules
  c.graphs = true;
  EXPECT_THROW(train::run_bench(c), Error);  // replays issue no ops to time
  c.graphs = false;
  c.method = "backprop";
  c.split = 1;
  c.profile_ops = 0;

  c.method = "pipedream";
  EXPECT_THROW(train::run_bench(c), Error);
  c.method = "backprop";
  c.split = 2;
  EXPECT_THROW(train::run_bench(c), Error);  // a split needs a decoupled method
}

// The run's warm-up (in epochs) and milestones (fractions of the run) as steps, rounded to the
// nearest; milestones the warm-up would hide, or that leave the base rate unused, are refused.
TEST(Training, ScheduleStepsFollowTheRunsEpochsAndFractions) {
  train::TrainConfig c = small_config();
  c.schedule = "multistep", c.lr = 0.2f, c.gamma = 0.1f, c.epochs = 2;
  c.milestones = {0.5, 0.8}, c.warmup_epochs = 0.5;
  const LrSchedule s = train::make_schedule(c, 4);
  EXPECT_EQ(s.kind, LrSchedule::Kind::MultiStep);
  EXPECT_EQ(s.total_steps, 8);
  EXPECT_EQ(s.warmup_steps, 2);
  EXPECT_EQ(s.milestones, (std::vector<int64_t>{4, 6}));  // 0.8 of 8 steps is 6.4
  const std::vector<float> want = {0.1f, 0.2f, 0.2f, 0.2f, 0.02f, 0.02f, 0.002f, 0.002f};
  for (int64_t i = 0; i < 8; ++i) EXPECT_FLOAT_EQ(s.at(i), want[size_t(i)]) << "step " << i;
  // Halves round away from zero: half an epoch of 3 steps is 2, 0.8 of 6 steps is 5.
  const LrSchedule odd = train::make_schedule(c, 3);
  EXPECT_EQ(odd.warmup_steps, 2);
  EXPECT_EQ(odd.milestones, (std::vector<int64_t>{3, 5}));
  c.warmup_epochs = 1.5;  // 6 steps of warm-up: the milestone at step 4 would be hidden
  sp::test::expect_error<Error>([&] { train::make_schedule(c, 4); },
                                {"--milestones: 0.5 of the run's 8 steps is step 4, inside the warm-up of 6 steps"});
  c.schedule = "cosine";  // the milestones (here the default's) are not read
  EXPECT_EQ(train::make_schedule(c, 4).warmup_steps, 6);
  c.schedule = "multistep", c.warmup_epochs = 0, c.milestones = {0.05};
  sp::test::expect_error<Error>([&] { train::make_schedule(c, 4); }, {"is step 0, its first"});
  // Nesterov's look-ahead needs a momentum, in the optimizer too (as PyTorch's SGD).
  Network net = layers::build_resnet("resnet20", 10, 0);
  auto stream = make_stream(Device::cpu());
  sp::test::expect_error<Error>(
      [&] {
        Sgd(net.state().params, SgdConfig{0.f, 0.f, true}, *stream);
      },
      {"Nesterov momentum needs a momentum > 0, got 0"});
}

TEST(Training, RejectsOptionsTheDeviceCannotHonour) {
  const data::Dataset train = synthetic_set(32, 8);
  train::TrainConfig c = small_config();
  const auto run = [&] { train::run_training(c, train, {}); };
  c.precision = "fp16";
  sp::test::expect_error<Error>(run, {"--precision must be fp32 or bf16, got 'fp16'"});
  c = small_config();
  c.kernels = "vendor";
  sp::test::expect_error<Error>(run, {"--kernels vendor", "needs a GPU"});
  c = small_config();
  c.schedule = "linear";
  sp::test::expect_error<Error>(run, {"unknown schedule 'linear'"});
  c = small_config();
  c.milestones = {1.5};
  c.schedule = "multistep";
  sp::test::expect_error<Error>(run, {"--milestones are fractions of the run in (0, 1), got 1.5"});
  c.milestones = {0.75, 0.5};
  sp::test::expect_error<Error>(run, {"--milestones must ascend, each once: 0.75 then 0.5"});
  c.milestones = {0.5, 0.5};
  sp::test::expect_error<Error>(run, {"--milestones must ascend"});
  c = small_config();
  c.shrink = 0.5f;  // bp (the default method)
  sp::test::expect_error<Error>(run, {"--shrink applies to --method ddg and fdg"});
  // Values out of range, and flags without the one they need.
  const std::vector<std::pair<std::function<void(train::TrainConfig&)>, std::string>> wrong = {
      {[](train::TrainConfig& x) { x.lr = -0.1f; }, "--lr must be a finite number >= 0, got -0.1"},
      {[](train::TrainConfig& x) { x.momentum = 1.f; }, "--momentum must be in [0, 1), got 1"},
      {[](train::TrainConfig& x) { x.momentum = 0.f, x.nesterov = true; }, "--nesterov needs a --momentum > 0"},
      {[](train::TrainConfig& x) { x.weight_decay = -1e-4f; }, "--weight-decay must be a finite number >= 0"},
      {[](train::TrainConfig& x) { x.label_smoothing = 1.f; }, "--label-smoothing must be in [0, 1), got 1"},
      {[](train::TrainConfig& x) { x.gamma = 0.f; }, "--gamma must be a finite number > 0, got 0"},
      {[](train::TrainConfig& x) { x.warmup_epochs = 3; }, "--warmup-epochs must be in [0, --epochs], got 3"},
      {[](train::TrainConfig& x) { x.checkpoint_every = 5; },
       "--checkpoint-every says how often to write --checkpoint"},
      {[](train::TrainConfig& x) { x.method = "fdg", x.shrink = 0.f; }, "--shrink must be in (0, 1], got 0"},
      {[](train::TrainConfig& x) { x.method = "fdg", x.shrink = 1.5f; }, "--shrink must be in (0, 1], got 1.5"},
      {[](train::TrainConfig& x) { x.staleness_jitter = 2; }, "--staleness-jitter applies to --method ddg and fdg"},
      // Cuts a ResNet-20 (11 blocks) cannot have, named with the flag and the model's blocks.
      {[](train::TrainConfig& x) { x.method = "fdg", x.split = 12; },
       "--split 12: at most one module per block, and resnet20 has 11 blocks: 0 the stem, 10 the pooling+linear head"},
      {[](train::TrainConfig& x) { x.method = "fdg", x.split_at = "0,4"; },
       "--split-at 0,4: the cuts are the first blocks of modules 2..K, ascending, in 1..10 (resnet20 has 11 blocks"},
      {[](train::TrainConfig& x) { x.method = "fdg", x.split_at = "7,4"; }, "--split-at 7,4: the cuts are"},
      {[](train::TrainConfig& x) { x.method = "fdg", x.split_at = "3,3"; }, "--split-at 3,3: the cuts are"},
      {[](train::TrainConfig& x) { x.method = "fdg", x.split_at = "11"; }, "--split-at 11: the cuts are"},
      // Files written only later go to a directory that must exist: refused before any training.
      {[](train::TrainConfig& x) { x.checkpoint = "/nonexistent-staleprop-dir/run.safetensors"; },
       "--checkpoint /nonexistent-staleprop-dir/run.safetensors: directory '/nonexistent-staleprop-dir' does not "
       "exist"},
      {[](train::TrainConfig& x) { x.checkpoint = "/tmp/."; }, "--checkpoint /tmp/.: is a directory"},
      {[](train::TrainConfig& x) { x.trace = "/nonexistent-staleprop-dir/sub/trace.json"; },
       "--trace /nonexistent-staleprop-dir/sub/trace.json: directory '/nonexistent-staleprop-dir/sub' does not exist"},
      {[](train::TrainConfig& x) { x.metrics = "/nonexistent-staleprop-dir/m.jsonl"; },
       "--metrics /nonexistent-staleprop-dir/m.jsonl: directory '/nonexistent-staleprop-dir' does not exist"},
      {[](train::TrainConfig& x) { x.log = "/nonexistent-staleprop-dir/run.log"; },
       "--log /nonexistent-staleprop-dir/run.log: directory '/nonexistent-staleprop-dir' does not exist"},
      // Two outputs naming one file (the checkpoint, renamed over the metrics, took their place),
      // however spelled, or a checkpoint pattern's epoch file.
      {[](train::TrainConfig& x) { x.metrics = "/tmp/sp-same.txt", x.checkpoint = "/tmp/sp-same.txt"; },
       "--metrics /tmp/sp-same.txt and --checkpoint /tmp/sp-same.txt may name the same file"},
      {[](train::TrainConfig& x) { x.log = "/tmp/./sp-same.txt", x.trace = "/tmp/sp-same.txt"; },
       "--log /tmp/./sp-same.txt and --trace /tmp/sp-same.txt may name the same file"},
      {[](train::TrainConfig& x) { x.metrics = "/tmp/sp-e3.st", x.checkpoint = "/tmp/sp-e{epoch}.st"; },
       "--metrics /tmp/sp-e3.st and --checkpoint /tmp/sp-e{epoch}.st may name the same file"},
      {[](train::TrainConfig& x) { x.checkpoint = "/tmp/sp-e{epoch}-{epoch}.st"; },
       "--checkpoint /tmp/sp-e{epoch}-{epoch}.st: {epoch} may stand once in the name"},
      {[](train::TrainConfig& x) { x.checkpoint = "/tmp/d{epoch}/run.st"; },
       "--checkpoint /tmp/d{epoch}/run.st: {epoch} may stand in the file's name, not in its directory"},
      {[](train::TrainConfig& x) { x.model = "resnet7"; }, "unknown model 'resnet7' (known: resnet20,"},
      {[](train::TrainConfig& x) { x.graph_memory = "bump"; }, "--graph-memory bump lays out the memory of --graphs'"},
      // --resume is read before the run writes: only --checkpoint may name it (metrics appended to
      // it, or a trace put in its place, destroyed the run's one copy).
      {[](train::TrainConfig& x) { x.resume = "/tmp/sp-r.st", x.metrics = "/tmp/./sp-r.st"; },
       "--metrics /tmp/./sp-r.st names the --resume file"},
      {[](train::TrainConfig& x) { x.resume = "/tmp/sp-r.st", x.trace = "/tmp/sp-r.st"; },
       "--trace /tmp/sp-r.st names the --resume file"},
      // A jitter longer than an epoch (1 step here) only stretches the drain: of 2^31 ticks, the
      // run could not be stopped.
      {[](train::TrainConfig& x) { x.method = "fdg", x.split = 2, x.staleness_jitter = 2; },
       "--staleness-jitter 2 is more ticks than an epoch has steps (1): give at most 1"},
  };
  for (const auto& [change, message] : wrong) {
    c = small_config();
    change(c);
    sp::test::expect_error<Error>(run, {message});
  }
  // An output renamed into place (checkpoint, trace) must not replace a device or pipe standing
  // there; one appended to (metrics, log) may be one, several of them the same.
  TempDir dir;
  const std::string fifo = dir.file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  c = small_config();
  c.checkpoint = fifo;
  sp::test::expect_error<Error>(run,
                                {"--checkpoint " + fifo + ": is not a regular file, and the run would replace it"});
  c = small_config();
  c.metrics = "/dev/null", c.log = "/dev/null";
  EXPECT_NO_THROW(train::check_config(c));
  c.resume = "/tmp/sp-r.st", c.checkpoint = "/tmp/sp-r.st";  // the checkpoint replaces the file it resumed from
  EXPECT_NO_THROW(train::check_config(c));
  // Two hard links of one file are one file (--metrics and --log into it interleaved both).
  const std::string first = dir.file("one.jsonl"), second = dir.file("two.jsonl");
  std::ofstream(first).put('\n');
  ASSERT_EQ(::link(first.c_str(), second.c_str()), 0);
  c = small_config();
  c.metrics = first, c.log = second;
  sp::test::expect_error<Error>(run, {"--log " + second + " and --metrics " + first + " may name the same file"});
  c.resume = first, c.log.clear();
  sp::test::expect_error<Error>(run, {"--metrics " + first + " names the --resume file"});
  c = small_config();
  c.cutout = 33;
  sp::test::expect_error<Error>([&] { train::run_training(c, train, {}); }, {"--cutout must be in 0..32"});
  c.cutout = 8;
  c.augment = false;
  sp::test::expect_error<Error>([&] { train::run_training(c, train, {}); }, {"does not go with --no-augment"});
}

}  // namespace
