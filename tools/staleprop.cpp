// The staleprop command line: train, eval, bench, study, sweep, demo and version.
//
// Every flag is declared once in a table (name, value name, help, setter); --help is generated
// from the same tables, so it cannot drift from what is parsed.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/ops.h"
#include "engine/pipeline.h"
#include "kernels/common/error.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "layers/resnet.h"
#include "tools/bench.h"
#include "tools/build_info.h"
#include "tools/sweep.h"
#include "tools/train.h"

namespace {

struct Flag {
  std::string name, value, help;  // value empty: a switch without a value
  std::function<void(const std::string&)> set;
};

std::string usage_of(const std::string& cmd, const std::string& what, const std::vector<Flag>& flags) {
  std::ostringstream os;
  os << "usage: staleprop " << cmd << " [options]\n\n" << what << "\n\noptions:\n";
  for (const Flag& f : flags) {
    std::string head = "  --" + f.name + (f.value.empty() ? "" : " " + f.value);
    os << head << std::string(head.size() < 28 ? 28 - head.size() : 1, ' ') << f.help << "\n";
  }
  os << "  --help                    show this text\n";
  return os.str();
}

// Returns false when --help was given (after printing the usage).
bool parse_flags(const std::string& cmd, const std::string& what, const std::vector<Flag>& flags, int argc,
                 char** argv) {
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(usage_of(cmd, what, flags).c_str(), stdout);
      return false;
    }
    SP_CHECK(a.rfind("--", 0) == 0, cmd, ": unexpected argument '", a, "' (see staleprop ", cmd, " --help)");
    std::string name = a.substr(2), value;
    const size_t eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) value = name.substr(eq + 1), name = name.substr(0, eq);
    const Flag* flag = nullptr;
    for (const Flag& f : flags)
      if (f.name == name) flag = &f;
    SP_CHECK(flag, cmd, ": unknown option '--", name, "' (see staleprop ", cmd, " --help)");
    SP_CHECK(!flag->value.empty() || !inline_value, cmd, ": --", name, " is a switch and takes no value (got '", a,
             "'); leave it out to keep it off");
    if (!flag->value.empty() && !inline_value) {
      SP_CHECK(i + 1 < argc, cmd, ": --", name, " needs a value ", flag->value);
      value = argv[++i];
    }
    // An empty value (an unset shell variable: --resume "$CKPT") would quietly mean the default.
    SP_CHECK(flag->value.empty() || !value.empty(), cmd, ": --", name, " was given an empty value (it needs ",
             flag->value, "); leave it out for the default");
    try {
      flag->set(value);
    } catch (const std::invalid_argument&) {
      throw sp::Error(cmd + ": --" + name + ": cannot parse '" + value + "'");
    } catch (const std::out_of_range&) {
      throw sp::Error(cmd + ": --" + name + ": '" + value + "' is out of range");
    }
  }
  return true;
}

// Flag values are read whole: text after the number ("1x", "0.1.2") and a minus sign on an
// unsigned value (which std::stoull would wrap round) are errors, which parse_flags reports as
// "cannot parse" (std::invalid_argument) or "out of range" (std::out_of_range), as the
// standard conversions' own failures.
template <typename T, typename Convert>
T whole_number(const std::string& text, const Convert& convert) {
  size_t used = 0;
  const T v = convert(text, &used);
  if (used != text.size()) throw std::invalid_argument("trailing text");
  return v;
}
long long to_ll(const std::string& v) {
  return whole_number<long long>(v, [](const std::string& t, size_t* n) { return std::stoll(t, n); });
}
// An int-valued flag: a value past int's range is "out of range", not wrapped round.
int to_i(const std::string& v) {
  const long long x = to_ll(v);
  if (x < std::numeric_limits<int>::min() || x > std::numeric_limits<int>::max()) throw std::out_of_range("int");
  return int(x);
}
unsigned long long to_ull(const std::string& v) {
  if (v.find('-') != std::string::npos) throw std::invalid_argument("negative");
  return whole_number<unsigned long long>(v, [](const std::string& t, size_t* n) { return std::stoull(t, n); });
}
double to_d(const std::string& v) {
  return whole_number<double>(v, [](const std::string& t, size_t* n) { return std::stod(t, n); });
}
// Read as a double and rounded to float: a value below float's smallest normal (--lr 1e-40)
// becomes a subnormal, as float arithmetic would give it (std::stof called it out of range); one
// that rounds to 0, or past float's largest (from FLT_MAX + half an ulp on), is out of range.
float to_f(const std::string& v) {
  const double x = to_d(v);
  if (std::isfinite(x) && std::fabs(x) >= 0x1.ffffffp127) throw std::out_of_range("float");
  if (x != 0 && float(x) == 0) throw std::out_of_range("float");
  return float(x);
}

int64_t positive(const std::string& flag, int64_t v) {
  SP_CHECK(v > 0, "--", flag, " must be positive, got ", v);
  return v;
}

double positive_seconds(const std::string& flag, const std::string& v) {
  const double s = to_d(v);
  SP_CHECK(s > 0, "--", flag, " must be positive, got ", v);
  return s;
}

// --threads N: the CPU pool's size, as STALEPROP_NUM_THREADS takes it (1 to kMaxThreads).
int thread_count(const std::string& v) {
  const int n = to_i(v);
  SP_CHECK(n >= 1 && n <= sp::kernels::cpu::kMaxThreads, "--threads must be from 1 to ",
           sp::kernels::cpu::kMaxThreads, ", got ", v);
  return n;
}

// After a command's flags: --threads N (when given) becomes STALEPROP_NUM_THREADS, which the CPU
// pool reads at its first use; a bad value of the variable (or of STALEPROP_CPU_GEMM) is told
// now, not then (deep in a run).
void use_threads(int threads) {
  if (threads > 0) setenv("STALEPROP_NUM_THREADS", std::to_string(threads).c_str(), 1);
  sp::kernels::cpu::parse_num_threads(std::getenv("STALEPROP_NUM_THREADS"));
  sp::kernels::cpu::gemm_kernel();  // likewise a bad STALEPROP_CPU_GEMM
}

// --device when none was given (`device` is cleared before the flags are parsed): the first of
// --devices, through which a run over them is set up and checkpointed, else cpu.
void default_device(std::string& device, const std::vector<std::string>& devices) {
  if (device.empty()) device = devices.empty() ? "cpu" : devices[0];
}

// The items of flag --name's comma-separated list v; an empty item ("1,,2", "a,") is refused
// (parse_flags refuses an empty value), not skipped.
std::vector<std::string> comma_list(const std::string& name, const std::string& v) {
  std::vector<std::string> out;
  std::stringstream ss(v);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  // (getline yields no item after a trailing comma: v.back() tells it.)
  SP_CHECK(!out.empty() && v.back() != ',' && std::none_of(out.begin(), out.end(), [](const std::string& i) {
             return i.empty();
           }), "--", name, ": an empty item in '", v, "'");
  return out;
}

// The numbers of flag --name's comma-separated list v, each read whole.
std::vector<double> parse_list(const std::string& name, const std::string& v) {
  std::vector<double> out;
  for (const std::string& item : comma_list(name, v)) {
    try {
      out.push_back(to_d(item));
    } catch (const std::logic_error&) {  // std::invalid_argument and std::out_of_range
      throw sp::Error("--" + name + ": cannot parse '" + item + "' in '" + v + "'");
    }
  }
  return out;
}

std::string model_list() {
  std::string s;
  for (auto& n : sp::layers::resnet_names()) s += (s.empty() ? "" : "|") + n;
  return s;
}

const char* kTopUsage = R"(usage: staleprop <command> [options]

commands:
  train     train a CIFAR ResNet on CIFAR-10 (backprop, DDG or FDG over K modules)
  eval      report the test accuracy of a checkpoint
  bench     training throughput of one configuration on synthetic device-resident data
  study     locking study: throughput, busy time and memory of bp/ddg/fdg over K modules
  sweep     several train runs in one process, up to N at once (they share a GPU)
  demo      train a tiny CNN on synthetic data on the CPU (no data set needed)
  version   the build (version, commit, backends) and the devices this machine has
  help      show this text

staleprop <command> --help lists the command's options.
Environment: CIFAR10_DIR (data directory), STALEPROP_NUM_THREADS (CPU threads),
STALEPROP_CPU_GEMM=generic|avx2|avx512|auto (the CPU GEMM's micro-kernel; default auto: the
widest this CPU has; avx2 and avx512 give the same bits, generic other bits), STALEPROP_DEBUG=1
(errors also name the failed check and its source line); for our bf16
GPU kernels: STALEPROP_MAINLOOP (the default of --mainloop); these turn off a default:
STALEPROP_DGRAD_WT=0 (data gradient on the gathered filter instead of the transposed one),
STALEPROP_DGRAD_CLASSES=0 (strided data gradients direct instead of by stride class),
STALEPROP_DGRAD_CLASS_DIRECT=0 (each stride class through a scratch matrix and a scatter instead
of straight into dx), STALEPROP_CONV_TMA=0 (convolutions' operands gathered by cp.async instead
of loaded by TMA), STALEPROP_TMA_WIDE_BY_SHAPE=0 (no 128x256 tile chosen by the shape's rule),
STALEPROP_CONV_SMALL_C=0 (the stem's bf16 forward and weight gradient on the tensor cores
instead of direct kernels), STALEPROP_TMA_PERSISTENT=0 (the TMA kernel one block per tile
instead of persistent: as many blocks as the SMs hold, each going over tiles),
STALEPROP_BF16_WEIGHT_COPIES=0 (each bf16 weight cast before every use instead of the copy the
optimizer's step writes), STALEPROP_DGRAD_ACCUMULATE=0 (a residual block's two gradients summed
by a separate add instead of in the convolution's data gradient); these turn on a path that is
off by default:
STALEPROP_CONV_HALO=1 or 2 (the stride-1 3x3 convolutions' halo kernel, for 32 px rows or also
16 px; STALEPROP_HALO_RESIDENT=1 its form that keeps the filter in shared memory;
STALEPROP_HALO_DESC_PHASE=1 sets its descriptors' base offset), STALEPROP_TMA_WIDE=1
(the 128x256 tile wherever it fits), STALEPROP_TMA_CLUSTER=1 (the TMA tiles in clusters of two
that share the B operand by multicast), STALEPROP_TMA_L2_PREFETCH=1 (the TMA kernel's producer
asks L2 for each K step one round of its ring before it loads it, but a tile's first), STALEPROP_BN_PERSISTENT=1 (batch norm's training
forward and backward as one cooperative kernel each, fp32 and bf16) and STALEPROP_PDL=1
(programmatic dependent launch of our kernels). The TMA paths run only with the wgmma_tma main
loop (auto on an H100/H200). The README's "Tensor-core main loop" says why each default is what
it is. STALEPROP_SPLIT_MAX_BLOCKS=N (an experiment's knob) caps the split of K of the tiled GEMM
and convolution launches at N blocks (default on the tensor cores: one wave, 132 blocks per block
an SM holds of the tile; 0: the earlier rule of at least 256 blocks).
STALEPROP_POOL_INTERNAL_DEPS=1 lets the kernels' scratch pool make one stream wait on another to
reuse memory (the driver's default; off, so the pipeline's module streams stay independent).
For the layers, on any device: STALEPROP_BF16_WEIGHT_COPIES=0 (bf16 layers, GPU or emulated on the
CPU, cast their fp32 weights before every use instead of reading the copies the optimizer's step
writes; the same bits) and STALEPROP_DGRAD_ACCUMULATE=0 (a residual block's two gradients summed by
a separate add instead of inside the convolution's data gradient; in fp32 the same bits).
)";

struct DemoOptions {
  int steps = 60, batch = 64;
  float lr = 0.05f;
  uint64_t seed = 1;
};

// A synthetic 10-class problem: each class is a fixed random 8x8x3 pattern; samples are the
// pattern plus Gaussian noise, so a small CNN can learn it in a few dozen steps.
struct SyntheticData {
  static constexpr int kH = 8, kW = 8, kC = 3, kClasses = 10;
  std::vector<float> prototypes;
  std::mt19937_64 rng;
  explicit SyntheticData(uint64_t seed) : prototypes(kClasses * kH * kW * kC), rng(seed) {
    std::normal_distribution<float> n(0.f, 1.f);
    for (float& p : prototypes) p = n(rng);
  }
  void batch(sp::Tensor& x, sp::Tensor& labels) {
    std::normal_distribution<float> noise(0.f, 1.0f);
    std::uniform_int_distribution<int> cls(0, kClasses - 1);
    const int64_t n = x.size(0), per = kH * kW * kC;
    for (int64_t i = 0; i < n; ++i) {
      const int c = cls(rng);
      labels.at<int32_t>(i) = c;
      for (int64_t j = 0; j < per; ++j) x.at<float>(i * per + j) = prototypes[size_t(c * per + j)] + noise(rng);
    }
  }
};

struct Param {
  sp::Tensor value, grad, momentum;
};

Param make_param(const sp::Shape& shape, float stddev, float constant, std::mt19937_64& rng) {
  using sp::DType;
  using sp::Tensor;
  Param p{Tensor::empty(shape, DType::F32), Tensor::empty(shape, DType::F32), Tensor::empty(shape, DType::F32)};
  // A normal distribution needs stddev > 0 (a zero one is undefined behaviour): constant
  // parameters make none.
  std::optional<std::normal_distribution<float>> n;
  if (stddev > 0) n.emplace(0.f, stddev);
  for (int64_t i = 0; i < p.value.numel(); ++i) {
    p.value.at<float>(i) = n ? (*n)(rng) : constant;
    p.momentum.at<float>(i) = 0.f;
  }
  return p;
}

int run_demo(const DemoOptions& o) {
  using namespace sp;
  const Device cpu = Device::cpu();
  auto s = make_stream(cpu);
  std::mt19937_64 rng(o.seed);
  SyntheticData data(o.seed + 1);
  const int B = o.batch, H = SyntheticData::kH, W = SyntheticData::kW, C = SyntheticData::kC, K1 = 16, K2 = 32;
  const int classes = SyntheticData::kClasses;

  // conv3x3(3->16) -> BN -> ReLU -> conv3x3 stride 2 (16->32) -> ReLU -> global avg pool -> linear(32->10)
  Param w1 = make_param({K1, 3, 3, C}, std::sqrt(2.f / (9 * C)), 0, rng);
  Param g1 = make_param({K1}, 0, 1.f, rng), b1 = make_param({K1}, 0, 0.f, rng);
  Param w2 = make_param({K2, 3, 3, K1}, std::sqrt(2.f / (9 * K1)), 0, rng);
  Param wl = make_param({classes, K2}, std::sqrt(1.f / K2), 0, rng), bl = make_param({classes}, 0, 0.f, rng);
  std::vector<Param*> params = {&w1, &g1, &b1, &w2, &wl, &bl};
  Tensor rmean = Tensor::empty({K1}, DType::F32), rvar = Tensor::empty({K1}, DType::F32);
  ops::fill(*s, rmean, 0.f);
  ops::fill(*s, rvar, 1.f);

  Tensor x = Tensor::empty({B, H, W, C}, DType::F32), labels = Tensor::empty({B}, DType::I32);
  Tensor a1 = Tensor::empty({B, H, W, K1}, DType::F32), n1 = Tensor::empty({B, H, W, K1}, DType::F32);
  Tensor r1 = Tensor::empty({B, H, W, K1}, DType::F32), smean = Tensor::empty({K1}, DType::F32);
  Tensor sinv = Tensor::empty({K1}, DType::F32);
  Tensor a2 = Tensor::empty({B, H / 2, W / 2, K2}, DType::F32), r2 = Tensor::empty({B, H / 2, W / 2, K2}, DType::F32);
  Tensor pooled = Tensor::empty({B, K2}, DType::F32), logits = Tensor::empty({B, classes}, DType::F32);
  Tensor loss = Tensor::empty({1}, DType::F32), correct = Tensor::empty({1}, DType::I32);
  Tensor dlogits = Tensor::empty({B, classes}, DType::F32), dpooled = Tensor::empty({B, K2}, DType::F32);
  Tensor dr2 = Tensor::empty(r2.shape(), DType::F32), dr1 = Tensor::empty(r1.shape(), DType::F32);
  Tensor dn1 = Tensor::empty(n1.shape(), DType::F32), da1 = Tensor::empty(a1.shape(), DType::F32);

  kernels::SgdParams sgd;
  sgd.lr = o.lr;
  sgd.momentum = 0.9f;
  sgd.weight_decay = 5e-4f;
  std::vector<Tensor> pv, pg, pm;
  for (Param* p : params) pv.push_back(p->value), pg.push_back(p->grad), pm.push_back(p->momentum);

  std::printf("staleprop demo: synthetic %d-class 8x8x3 data, batch %d, %d steps, %d CPU threads\n", classes, B,
              o.steps, kernels::cpu::num_threads());
  const auto t0 = std::chrono::steady_clock::now();
  double first = 0, last = 0;
  for (int step = 1; step <= o.steps; ++step) {
    s->synchronize();  // the host refills x and labels
    data.batch(x, labels);
    ops::conv2d_forward(*s, x, w1.value, Tensor(), a1, 1, 1);
    ops::batchnorm_forward_training(*s, a1, g1.value, b1.value, rmean, rvar, n1, smean, sinv, 1e-5f, 0.1f);
    ops::relu_forward(*s, n1, r1);
    ops::conv2d_forward(*s, r1, w2.value, Tensor(), a2, 2, 1);
    ops::relu_forward(*s, a2, r2);
    ops::global_avgpool_forward(*s, r2, pooled);
    ops::linear_forward(*s, pooled, wl.value, bl.value, logits);
    ops::softmax_cross_entropy(*s, logits, labels, 0.f, loss, dlogits, correct);
    ops::linear_backward(*s, pooled, wl.value, dlogits, dpooled, wl.grad, bl.grad);
    ops::global_avgpool_backward(*s, dpooled, dr2);
    ops::relu_backward(*s, r2, dr2, dr2);
    ops::conv2d_backward_weight(*s, r1, dr2, w2.grad, Tensor(), 2, 1);
    ops::conv2d_backward_data(*s, dr2, w2.value, dr1, 2, 1);
    ops::relu_backward(*s, r1, dr1, dn1);
    ops::batchnorm_backward(*s, a1, dn1, g1.value, smean, sinv, da1, g1.grad, b1.grad);
    ops::conv2d_backward_weight(*s, x, da1, w1.grad, Tensor(), 1, 1);
    ops::sgd_step(*s, pv, pg, pm, sgd);
    s->synchronize();
    const double l = loss.at<float>(0);
    if (!std::isfinite(l)) throw Error("demo: loss became " + std::to_string(l));
    if (step == 1) first = l;
    last = l;
    if (step == 1 || step % 10 == 0 || step == o.steps)
      std::printf("step %4d  loss %.4f  batch accuracy %5.1f%%\n", step, l, 100.0 * correct.at<int32_t>(0) / B);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("loss %.4f -> %.4f in %.1f s (%.0f images/s)\n", first, last, secs, o.steps * double(B) / secs);
  // At the default rate the loss halves in about 30 steps: judged from 40 on (the default is 60).
  if (o.steps >= 40 && !(last < 0.5 * first)) {
    std::fprintf(stderr, "staleprop demo: the loss did not fall by half in %d steps; something is wrong\n", o.steps);
    return 1;
  }
  return 0;
}


int demo_main(int argc, char** argv) {
  DemoOptions o;
  const std::vector<Flag> flags = {
      {"steps", "N", "optimisation steps (default 60)", [&](const std::string& v) { o.steps = int(positive("steps", to_i(v))); }},
      {"batch", "B", "images per step (default 64)", [&](const std::string& v) { o.batch = int(positive("batch", to_i(v))); }},
      {"lr", "LR", "SGD learning rate, momentum 0.9 (default 0.05)", [&](const std::string& v) {
         o.lr = to_f(v);
         SP_CHECK(std::isfinite(o.lr) && o.lr > 0, "--lr must be a finite number > 0, got ", v);
       }},
      {"seed", "S", "seed of the data and the initial weights (default 1)", [&](const std::string& v) { o.seed = to_ull(v); }},
  };
  if (!parse_flags("demo", "Trains a tiny CNN on a synthetic 10-class problem with the engine's ops on a CPU stream\nand prints the falling loss; exits 1 if, after 40 or more steps, it has not halved (at the\ndefault rate it halves in about 30).", flags, argc, argv)) return 0;
  use_threads(0);  // a bad STALEPROP_NUM_THREADS is told before any work
  return run_demo(o);
}

// What `staleprop train` is given: the run's configuration and what the command line itself
// uses (data, CPU threads, time limit). One sweep job is the same.
struct TrainArgs {
  sp::train::TrainConfig c;
  std::string data_dir;
  int64_t train_limit = -1, test_limit = -1;
  int threads = 0;
  double time_limit = 0;
  TrainArgs() { c.device.clear(); }  // unless --device is given: default_device
};

const char* kTrainWhat =
    "Trains a CIFAR ResNet on CIFAR-10, evaluating on the test set after every epoch: standard\nbackprop, or "
    "decoupled training over K modules (--method ddg|fdg --split K).\n"
    "Ctrl-C (SIGINT) or SIGTERM stops it early: standard backprop after its current step, writing a\n"
    "checkpoint there (--checkpoint) to --resume from (at an epoch's last step, after the epoch's\n"
    "evaluation and checkpoint); a decoupled run drops the epoch it is in (it is checkpointed at\n"
    "epoch boundaries). It says where to go on from (unless --progress none), then ends by the signal\n"
    "(status 130 or 143). A second Ctrl-C, or 60 s without stopping, ends it at once.";

std::vector<Flag> train_flags(TrainArgs& a) {
  sp::train::TrainConfig& c = a.c;
  std::string& data_dir = a.data_dir;
  int64_t& train_limit = a.train_limit;
  int64_t& test_limit = a.test_limit;
  int& threads = a.threads;
  return {
      {"model", "NAME", model_list() + " (default resnet20)", [&](const std::string& v) { c.model = v; }},
      {"epochs", "N", "epochs (default 1)", [&](const std::string& v) { c.epochs = int(positive("epochs", to_i(v))); }},
      {"batch-size", "B", "images per step; an epoch's last batch may be smaller, and is kept (default 128)", [&](const std::string& v) { c.batch_size = positive("batch-size", to_ll(v)); }},
      {"lr", "LR", "peak learning rate, at least 0 (default 0.1)", [&](const std::string& v) { c.lr = to_f(v); }},
      {"momentum", "M", "SGD momentum, in [0, 1) (default 0.9)", [&](const std::string& v) { c.momentum = to_f(v); }},
      {"nesterov", "", "Nesterov momentum (needs --momentum > 0)", [&](const std::string&) { c.nesterov = true; }},
      {"weight-decay", "WD", "L2 weight decay, on every parameter (BN's and biases too) (default 5e-4)", [&](const std::string& v) { c.weight_decay = to_f(v); }},
      {"schedule", "S", "constant|multistep|cosine|onecycle (default multistep). Each begins with --warmup-epochs of linear warm-up from 0; then multistep multiplies the rate by --gamma at each milestone, cosine decays it to 0 along a half cosine, onecycle linearly to 0 (a piecewise-linear one-cycle with --warmup-epochs > 0, not PyTorch's OneCycleLR)", [&](const std::string& v) { c.schedule = v; }},
      {"milestones", "F,F", "multistep: lr *= gamma at these fractions of the run, after the warm-up (default 0.5,0.75)", [&](const std::string& v) { c.milestones = parse_list("milestones", v); }},
      {"gamma", "G", "multistep decay factor, above 0 (default 0.1)", [&](const std::string& v) { c.gamma = to_f(v); }},
      {"warmup-epochs", "E", "linear warm-up from 0 over E epochs, at most --epochs (default 0)", [&](const std::string& v) { c.warmup_epochs = to_d(v); }},
      {"label-smoothing", "EPS", "label smoothing in [0, 1) (default 0)", [&](const std::string& v) { c.label_smoothing = to_f(v); }},
      {"precision", "P", "fp32|bf16: bf16 = mixed precision (bf16 activations and weight copies, fp32 master weights and reductions; on the CPU it is emulated by rounding); default fp32", [&](const std::string& v) { c.precision = v; }},
      {"kernels", "K", "custom|vendor: our kernels, or the cuBLASLt/cuDNN baselines for GEMM and convolutions (GPU only; default custom)", [&](const std::string& v) { c.kernels = v; }},
      {"mainloop", "L", "auto|mma_sync|wgmma|wgmma_tma: main loop of our bf16 tensor-core GEMM and convolutions (wgmma: Hopper, in sm_90a builds; wgmma_tma: wgmma with TMA loads for the GEMM and the convolutions TMA can address; auto: wgmma_tma where wgmma can run, else mma_sync; GPU only; default $STALEPROP_MAINLOOP, else auto)", [&](const std::string& v) { c.mainloop = v; }},
      {"seed", "S", "seed of initialisation, order and augmentation (default 0)", [&](const std::string& v) { c.seed = to_ull(v); }},
      {"deterministic", "", "require bit-identical runs for a seed (the CPU reference and the custom CUDA kernels always are: fixed reduction orders, no float atomics; with --kernels vendor it restricts cuDNN to deterministic algorithms); --split K then balances its cuts by counted FLOPs, as measured times differ run to run", [&](const std::string&) { c.deterministic = true; }},
      {"device", "D", "cpu|cuda|cuda:N, or cpu:N, an emulated device: where the network is built and checkpointed, and trained and evaluated without --devices (default the first of --devices, else cpu)", [&](const std::string& v) { c.device = v; }},
      {"data", "DIR", "CIFAR-10 binary directory (default $CIFAR10_DIR, else ./data/cifar-10-batches-bin)", [&](const std::string& v) { data_dir = v; }},
      {"train-limit", "N", "use only the first N training images (default all)", [&](const std::string& v) { train_limit = positive("train-limit", to_ll(v)); }},
      {"test-limit", "N", "evaluate on the first N test images (default all)", [&](const std::string& v) { test_limit = positive("test-limit", to_ll(v)); }},
      {"no-augment", "", "disable random crop and flip", [&](const std::string&) { c.augment = false; }},
      {"cutout", "N", "after crop and flip, zero an N x N square (clipped at the border) centred on a random pixel of each training image (Cutout, DeVries & Taylor 2017; they use 16 on CIFAR-10; 0 to 32, not with --no-augment; default 0: none)", [&](const std::string& v) { c.cutout = to_i(v); }},  // its range checked by the run
      {"eval-batch-size", "B", "batch size of the test-set evaluation; a larger one than the test set is the whole set (default 500)", [&](const std::string& v) { c.eval_batch_size = positive("eval-batch-size", to_ll(v)); }},
      {"checkpoint", "FILE", "safetensors checkpoint written after every epoch ({epoch} once in the file's name: one per epoch); no other output may name it", [&](const std::string& v) { c.checkpoint = v; }},
      {"checkpoint-every", "N", "also write --checkpoint every N steps (plain backprop over one module on one device, without --graphs, --trace, --recompute or --weight-stash, only; default none: at epoch ends only)", [&](const std::string& v) { c.checkpoint_every = positive("checkpoint-every", to_ll(v)); }},
      {"resume", "FILE", "resume exactly from a checkpoint of the same run; refused, saying why, when its model, data, schedule, training rule (method, shrink, jitter, recompute, weight stashing), optimizer, loss, precision or cuts differ (--recompute may change with --weight-stash: it changes no bit there; plain backprop (--method bp) takes a bp checkpoint of any cuts, which compute the same bits); --metrics, --log and --trace may not name FILE (--checkpoint may). --device and --kernels may change (the run then goes on, but not bit for bit)", [&](const std::string& v) { c.resume = v; }},
      {"metrics", "FILE", "append metrics as JSON lines to FILE", [&](const std::string& v) { c.metrics = v; }},
      {"progress", "MODE", "auto|bar|plain|none (auto: a bar on a terminal, else lines; default auto)", [&](const std::string& v) { c.progress = v; }},
      {"log", "FILE", "append the banner, progress and epoch lines to FILE instead of printing them", [&](const std::string& v) { c.log = v; }},
      {"time-limit", "SECONDS", "end the run at the first epoch boundary where the next epoch, taking as long as the last, would end later than SECONDS after the start; the epoch's checkpoint (--checkpoint) is there to --resume from (default none)", [&](const std::string& v) { a.time_limit = positive_seconds("time-limit", v); }},
      {"stop-after", "STEPS", "end the run after this many steps in total, writing --checkpoint there to --resume from (a --resume from that step or later is refused; plain backprop over one module on one device, without --graphs, --trace, --recompute or --weight-stash, only; default none)", [&](const std::string& v) { c.stop_after_steps = positive("stop-after", to_ll(v)); }},
      {"method", "M", "bp|ddg|fdg: locked backprop, forward-locked DDG, fully decoupled FDG (default bp)", [&](const std::string& v) { c.method = v; }},
      {"split", "K", "cut the network into K modules, balanced by --split-by (default 1)", [&](const std::string& v) { c.split = int(positive("split", to_i(v))); }},
      {"split-by", "COST", "time|flops: balance --split's cuts by each block's forward+backward time measured at the start, or by its counted forward FLOPs (the same cuts on every run and machine); default time, flops with --deterministic (which refuses time)", [&](const std::string& v) { c.split_by = v; }},
      {"split-at", "CUTS", "explicit cuts: first block of modules 2..K (\"i,j,..\", ascending), or fdg for FDG's published cuts into --split K modules. Block 0 is the stem, the last the pooling+linear head: resnet20 has 11 blocks, resnet32 17, resnet44 23, resnet56 29, resnet110 56, resnet18 10", [&](const std::string& v) { c.split_at = v; }},
      {"shrink", "BETA", "gradient shrink factor in (0, 1] applied by each module k < K, with --method ddg or fdg (default 1)", [&](const std::string& v) { c.shrink = to_f(v); }},
      {"devices", "D,D", "one device per module, of --device's kind (default: --device for all); cpu:1,cpu:2,.. run a multi-GPU layout on emulated CPU devices", [&](const std::string& v) { c.devices = comma_list("devices", v); }},
      {"trace", "FILE", "Chrome-trace/Perfetto JSON of the module stages of the first epoch this process runs (a one-module run then goes through the decoupled trainer: the same training, bit for bit, without --checkpoint-every, --stop-after or step records, and stopped early it drops the epoch it was in)", [&](const std::string& v) { c.trace = v; }},
      {"trace-ops", "", "with --trace: also every op of each module's stream in that epoch, timed with events on the stream (two per op: host time; not with --graphs, whose replays issue no ops)", [&](const std::string&) { c.trace_ops = true; }},
      {"staleness-jitter", "J", "with --method ddg or fdg: each received gradient becomes due 0..J ticks after it arrives (random, seeded by --seed, the same draws when resumed; J at most the steps of an epoch); backwards stay in order, one per tick, so in a steady stream a module's extra delay settles at the largest drawn (J, soon), and modules below add theirs (default 0)", [&](const std::string& v) { c.staleness_jitter = to_i(v); }},
      {"recompute", "", "keep only module inputs; recompute activations before the backward, with the weights of that moment (with ddg/fdg these are newer than the forward's, so the gradient differs from saved activations'; --weight-stash recomputes with the forward's weights)", [&](const std::string&) { c.recompute = true; }},
      {"weight-stash", "", "back-propagate through the weights the batch's forward used (PipeDream)", [&](const std::string&) { c.weight_stash = true; }},
      {"graphs", "", "replay each module's steady-state tick from CUDA graphs (CPU: recorded closures); not with --staleness-jitter, --recompute, --weight-stash", [&](const std::string&) { c.graphs = true; }},
      {"graph-memory", "M", "planned|bump, with --graphs: memory of captured ticks, laid out from recorded tensor lifetimes (one module: about the eager peak; decoupled modules: more, see the README) or kept whole until the tick runs again (default planned)", [&](const std::string& v) { c.graph_memory = v; }},
      {"threads", "N", "size of the CPU thread pool that the kernels split their work over (default: all cores; same as STALEPROP_NUM_THREADS); on the CPU each stream (one per module) is a thread of its own besides", [&](const std::string& v) { threads = thread_count(v); }},
  };
}

// "runs/r56-fdg-K2.jsonl" -> "r56-fdg-K2".
std::string file_stem(const std::string& path) {
  std::string base = path.substr(path.find_last_of('/') + 1);
  const size_t dot = base.find_last_of('.');
  return dot == std::string::npos || dot == 0 ? base : base.substr(0, dot);
}

// SIGINT and SIGTERM end a training run or sweep early, keeping what can be kept (TrainConfig::
// interrupt: plain backprop checkpoints the step it is at). A second one ends the process at
// once, and so does SIGALRM kStopGraceSeconds after the first, should the run be stuck. Once the
// run has stopped, the process ends by the signal it got (so a shell sees it, and a script's loop
// stops as it would for a program without a handler). A signal that a parent set to be ignored
// (a background job of a script) stays ignored.
constexpr unsigned kStopGraceSeconds = 60;
std::atomic<int> g_signal{0};
std::atomic<bool> g_interrupt{false};

void on_stop_signal(int sig) {
  if (g_interrupt.load()) {  // the second: as if no handler had been installed
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  g_signal.store(sig);
  g_interrupt.store(true);
  alarm(kStopGraceSeconds);
  static const char msg[] = "\nstaleprop: stopping early and keeping what can be kept (again to quit at once)\n";
  if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0) {
  }
}

void stop_on_signals() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int sig : {SIGINT, SIGTERM}) {
    struct sigaction old {};
    sigaction(sig, nullptr, &old);
    if (old.sa_handler != SIG_IGN) sigaction(sig, &sa, nullptr);
  }
}

// After a stop by signal: ends the process by that signal, its output flushed.
void end_by_signal_if_stopped() {
  if (!g_interrupt.load()) return;
  std::fflush(nullptr);
  const int sig = g_signal.load();
  signal(sig, SIG_DFL);
  raise(sig);
}

// Throws, naming it, unless --device and each of --devices is there: told before any data is read.
void require_devices(const std::string& device, const std::vector<std::string>& devices) {
  sp::require_device(sp::Device::parse(device));
  for (const std::string& d : devices) sp::require_device(sp::Device::parse(d));
}

int train_main(int argc, char** argv) {
  TrainArgs a;
  if (!parse_flags("train", kTrainWhat, train_flags(a), argc, argv)) return 0;
  sp::train::TrainConfig& c = a.c;
  default_device(a.c.device, a.c.devices);
  c.deadline = sp::train::deadline_after(a.time_limit);
  use_threads(a.threads);
  require_devices(c.device, c.devices);  // before the data is looked for and read
  sp::train::check_config(c);            // the flags too
  const std::string dir = sp::data::resolve_cifar10_dir(a.data_dir);
  const sp::data::Dataset train = sp::data::load_cifar10(dir, sp::data::Split::Train, a.train_limit);
  const sp::data::Dataset test = sp::data::load_cifar10(dir, sp::data::Split::Test, a.test_limit);
  stop_on_signals();
  c.interrupt = [] { return g_interrupt.load(); };
  const auto result = sp::train::run_training(c, train, test);
  if (!result.epochs.empty())
    std::printf("%s test accuracy %.2f%% (%s, %d of %d epochs)\n",
                result.interrupted           ? "interrupted:"
                : result.stopped_at_deadline ? "stopped at the time limit:"
                : result.stopped_at_step     ? "stopped (--stop-after):"
                                             : "final",
                100 * result.epochs.back().test_acc, c.model.c_str(), result.epochs.back().epoch, c.epochs);
  else if (result.already_complete)
    std::printf("nothing to train: %s is the end of this %d-epoch run (step %lld). --epochs cannot change on --resume "
                "(the schedule depends on it); staleprop eval --checkpoint %s gives its test accuracy\n",
                c.resume.c_str(), c.epochs, (long long)result.steps, c.resume.c_str());
  end_by_signal_if_stopped();
  return 0;
}

int sweep_main(int argc, char** argv) {
  std::string jobs_file;
  int parallel = 1, threads = 0;
  double time_limit = 0;
  const std::vector<Flag> flags = {
      {"jobs", "FILE", "the runs, one per line: the arguments of a staleprop train command (quoted as in a shell; blank lines and lines starting with # are skipped); a job's own --time-limit counts from its start; required", [&](const std::string& v) { jobs_file = v; }},
      {"parallel", "N", "runs at once, each on its own host thread and streams (default 1: one after another)", [&](const std::string& v) { parallel = int(positive("parallel", to_i(v))); }},
      {"time-limit", "SECONDS", "every run ends at the first epoch boundary where its next epoch would end later than SECONDS after the sweep began (see train --time-limit), and a waiting run does not start when an epoch of a run like it (model, device, precision, method, K, batch, data size), as finished runs took, would not fit; default none", [&](const std::string& v) { time_limit = positive_seconds("time-limit", v); }},
      {"threads", "N", "size of the CPU thread pool, shared by all runs; a job may name the same (default: all cores; same as STALEPROP_NUM_THREADS); on the CPU each run's streams (one per module) are threads of their own besides", [&](const std::string& v) { threads = thread_count(v); }},
  };
  if (!parse_flags("sweep",
                   "Runs several staleprop train runs in one process, up to --parallel at once. On a GPU their\n"
                   "kernels then share the device as a decoupled pipeline's modules do, so small models that\n"
                   "leave it partly idle can train faster together than one after another. Each run gives the\n"
                   "same bits as alone where a solo run is reproducible (not with cuts measured at run time:\n"
                   "--split-by flops, --split-at or --deterministic give fixed ones; nor --kernels vendor without\n"
                   "--deterministic). --kernels, --mainloop, --deterministic and\n"
                   "--threads are process-wide: all runs must agree. With --parallel > 1 and several jobs, each\n"
                   "needs its own --log FILE (or --progress none); a run's peak reserved memory is then the\n"
                   "process's (its peak of tensors in use stays its own). A job whose flags train would refuse\n"
                   "(values, model, cuts, devices, outputs) stops the sweep before any run. Exits 1 if a run\n"
                   "failed as it ran (the others go on). Ctrl-C (SIGINT) or SIGTERM stops the running runs as in\n"
                   "train and starts no other; the sweep then ends by the signal (status 130 or 143).",
                   flags, argc, argv))
    return 0;
  SP_CHECK(!jobs_file.empty(), "sweep: --jobs FILE is required");
  std::error_code ec;
  SP_CHECK(!std::filesystem::is_directory(jobs_file, ec), "sweep: the jobs file '", jobs_file, "' is a directory");
  std::ifstream in(jobs_file);
  SP_CHECK(in.good(), "sweep: cannot read the jobs file '", jobs_file, "'");
  std::vector<sp::train::SweepJob> jobs;
  int line_no = 0;
  const bool sweep_threads = threads > 0;
  size_t jobs_naming_threads = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    const std::string where = jobs_file + " line " + std::to_string(line_no);
    const size_t first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos || line[first] == '#') continue;
    TrainArgs a;
    try {
      std::vector<std::string> words = sp::train::split_command_line(line);
      if (!words.empty() && words[0] == "train") words.erase(words.begin());
      for (const std::string& w : words) SP_CHECK(w != "--help" && w != "-h", w, " has no place in a job");
      std::vector<char*> argv_job;
      for (std::string& w : words) argv_job.push_back(w.data());
      parse_flags("train", kTrainWhat, train_flags(a), int(argv_job.size()), argv_job.data());
      default_device(a.c.device, a.c.devices);
      // The CPU threads are the process's: jobs may name them (as train does) if they agree.
      if (a.threads > 0) {
        SP_CHECK(threads == 0 || threads == a.threads, "--threads ", a.threads, " differs from the sweep's ",
                 threads, " (or an earlier job's): the CPU threads are shared by all runs");
        threads = a.threads;
        ++jobs_naming_threads;
      }
    } catch (const std::exception& e) {
      throw sp::Error("sweep: " + where + ": " + sp::user_message(e));
    }
    sp::train::SweepJob j;
    const std::string& named = !a.c.metrics.empty() ? a.c.metrics : a.c.log;
    // The line tells jobs apart where their files' stems do not (a.jsonl in two directories).
    j.name = (named.empty() ? "" : file_stem(named) + " ") + "(line " + std::to_string(line_no) + ")";
    j.cfg = a.c;
    j.time_limit_s = a.time_limit;  // counted from the run's start, not from now
    j.data_dir = a.data_dir;
    j.train_limit = a.train_limit;
    j.test_limit = a.test_limit;
    jobs.push_back(std::move(j));
  }
  // A job without --threads would run on all cores alone: it may not quietly take another's.
  SP_CHECK(sweep_threads || jobs_naming_threads == 0 || jobs_naming_threads == jobs.size(), "sweep: ",
           jobs_naming_threads, " of the ", jobs.size(), " jobs name --threads ", threads,
           " and the others do not (all cores): the CPU threads are shared by all runs, so give the sweep --threads");
  use_threads(threads);
  sp::train::SweepOptions o;
  o.parallel = parallel;
  o.deadline = sp::train::deadline_after(time_limit);
  stop_on_signals();
  o.interrupt = [] { return g_interrupt.load(); };
  try {  // before the banner: a refused sweep runs nothing and says only why
    sp::train::check_jobs(jobs, o);
  } catch (const std::exception& e) {
    std::string why = sp::user_message(e);
    if (why.rfind("sweep: ", 0) == 0) why.erase(0, 7);
    throw sp::Error("sweep: " + jobs_file + ": " + why);
  }
  // At most one run per job at once, whatever --parallel says.
  const size_t at_once = std::min(size_t(parallel), jobs.size());
  std::printf("staleprop sweep: %zu run%s from %s, up to %zu at once%s\n", jobs.size(), jobs.size() == 1 ? "" : "s",
              jobs_file.c_str(), at_once,
              time_limit > 0 ? (", time limit " + std::to_string(int64_t(time_limit)) + " s").c_str() : "");
  const auto outcomes = sp::train::run_sweep(std::move(jobs), o);
  int counts[5] = {0, 0, 0, 0, 0};
  for (const auto& out : outcomes) ++counts[int(out.status)];
  std::printf("staleprop sweep: %d finished, %d stopped at the time limit, %d not started, %d failed%s\n", counts[0],
              counts[1], counts[2], counts[3],
              g_interrupt ? (", " + std::to_string(counts[4]) + " interrupted").c_str() : "");
  end_by_signal_if_stopped();
  return counts[int(sp::train::SweepStatus::Failed)] > 0 ? 1 : 0;
}

// Flags shared by bench and study (everything but the method and the cuts).
std::vector<Flag> bench_flags(sp::train::BenchConfig& c, std::string& json, int& threads) {
  return {
      {"model", "NAME", model_list() + " (default resnet20)", [&](const std::string& v) { c.model = v; }},
      {"batch-size", "B", "images per step (default 128)", [&](const std::string& v) { c.batch_size = positive("batch-size", to_ll(v)); }},
      {"steps", "N", "timed steps (default 50)", [&](const std::string& v) { c.steps = positive("steps", to_ll(v)); }},
      {"warmup", "N", "untimed steps before them (default 10)", [&](const std::string& v) { c.warmup = to_ll(v); }},
      {"device", "D", "cpu|cuda|cuda:N, or cpu:N, an emulated device (default the first of --devices, else cpu)", [&](const std::string& v) { c.device = v; }},
      {"precision", "P", "fp32|bf16 (default fp32)", [&](const std::string& v) { c.precision = v; }},
      {"kernels", "K", "custom|vendor (vendor: cuBLASLt/cuDNN for GEMM and convolutions; GPU only; default custom)", [&](const std::string& v) { c.kernels = v; }},
      {"mainloop", "L", "auto|mma_sync|wgmma|wgmma_tma: main loop of our bf16 tensor-core GEMM and convolutions (wgmma: Hopper, in sm_90a builds; wgmma_tma: wgmma with TMA loads for the GEMM and the convolutions TMA can address; auto: wgmma_tma where wgmma can run, else mma_sync; GPU only; default $STALEPROP_MAINLOOP, else auto)", [&](const std::string& v) { c.mainloop = v; }},
      {"seed", "S", "seed of the weights and the synthetic data (default 0)", [&](const std::string& v) { c.seed = to_ull(v); }},
      {"json", "FILE", "append each result as a JSON line to FILE (- for stdout, which then holds the JSON alone: the summary goes to stderr)", [&](const std::string& v) { json = v; }},
      {"graphs", "", "replay steady-state ticks from CUDA graphs (backprop then runs as bp over one module; not with --recompute); the warm-up grows until every phase is captured", [&](const std::string&) { c.graphs = true; }},
      {"graph-memory", "M", "planned|bump, with --graphs: memory of captured ticks (see train --help; default planned)", [&](const std::string& v) { c.graph_memory = v; }},
      {"threads", "N", "size of the CPU thread pool that the kernels split their work over (default: all cores; same as STALEPROP_NUM_THREADS); on the CPU each stream (one per module) is a thread of its own besides", [&](const std::string& v) { threads = thread_count(v); }},
  };
}

// Where bench's summary and study's table go: stdout, or with --json - stderr (stdout then holds
// the JSON alone, for a pipe). A --json file's directory is checked first, before any measurement.
FILE* summary_out(const std::string& json) {
  if (json != "-") sp::train::check_append_output("--json", json);
  return json == "-" ? stderr : stdout;
}

void emit_json(const std::string& target, const sp::train::BenchResult& r) {
  if (target.empty()) return;
  if (target == "-") {
    std::printf("%s\n", r.json().c_str());
    return;
  }
  FILE* f = std::fopen(target.c_str(), "a");
  SP_CHECK(f, "cannot open --json file ", target, ": ", std::strerror(errno));
  std::fprintf(f, "%s\n", r.json().c_str());
  std::fclose(f);
}

std::string mib(size_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.0f", double(bytes) / double(1 << 20));
  return b;
}

std::string busy_str(const std::vector<double>& busy) {
  std::string out;
  char b[16];
  for (double v : busy) {
    std::snprintf(b, sizeof b, "%.0f", v);
    out += (out.empty() ? "" : "/") + std::string(b);
  }
  return out.empty() ? "-" : out + "%";
}

std::string method_str(const sp::train::BenchResult& r) {
  const std::string graphs =
      !r.config.graphs ? "" : r.config.graph_memory == "planned" ? " graphs" : " graphs (" + r.config.graph_memory + " arenas)";
  if (r.config.method == "backprop") return "backprop" + graphs;
  std::string cuts;
  for (size_t c : r.cuts) cuts += (cuts.empty() ? "" : ",") + std::to_string(c);
  // The settings that change the run's work beside the method: a line or row says them.
  char shrink[32] = "";
  if (r.config.shrink != 1.f) std::snprintf(shrink, sizeof shrink, " shrink %g", double(r.config.shrink));
  return r.config.method + " K=" + std::to_string(r.modules) + (cuts.empty() ? "" : " [" + cuts + "]") + shrink +
         (r.config.recompute ? " recompute" : "") + (r.config.weight_stash ? " weight-stash" : "") + graphs;
}

int bench_main(int argc, char** argv) {
  sp::train::BenchConfig c;
  std::string json;
  int threads = 0;
  c.device.clear();  // unless given: default_device
  std::vector<Flag> flags = bench_flags(c, json, threads);
  const std::vector<Flag> more = {
      {"method", "M", "backprop (one stream, BackpropTrainer) or bp|ddg|fdg over --split modules (default backprop)", [&](const std::string& v) { c.method = v; }},
      {"split", "K", "modules, balanced by measured block time (default 1)", [&](const std::string& v) { c.split = int(positive("split", to_i(v))); }},
      {"split-at", "CUTS", "explicit cuts \"i,j,..\", or fdg for FDG's published cuts into --split K modules", [&](const std::string& v) { c.split_at = v; }},
      {"shrink", "BETA", "gradient shrink factor, with --method ddg or fdg (default 1)", [&](const std::string& v) { c.shrink = to_f(v); }},
      {"recompute", "", "keep only module inputs; recompute activations before the backward, with the weights of that moment (with ddg/fdg these are newer than the forward's, so the gradient differs from saved activations'; --weight-stash recomputes with the forward's weights)", [&](const std::string&) { c.recompute = true; }},
      {"weight-stash", "", "back-propagate through the weights the batch's forward used", [&](const std::string&) { c.weight_stash = true; }},
      {"devices", "D,D", "one device per module, of --device's kind (default: --device for all; --device defaults to the first); cpu:1,cpu:2,.. are emulated devices", [&](const std::string& v) { c.devices = comma_list("devices", v); }},
      {"profile-ops", "N", "after the timed steps, run N more with each op timed by device events and print the time per op and per shape (slower: two event records per op; not with --graphs; default 0)", [&](const std::string& v) { c.profile_ops = to_ll(v); }},
  };
  flags.insert(flags.end(), more.begin(), more.end());
  if (!parse_flags("bench", "Measures training throughput (images/s), peak device memory and, for the decoupled methods,\nper-module busy time, on random CIFAR-shaped batches resident on the device (as\nbench/pytorch_baseline.py does), after untimed warm-up steps.", flags, argc, argv)) return 0;
  use_threads(threads);
  default_device(c.device, c.devices);
  FILE* human = summary_out(json);
  const sp::train::BenchResult r = sp::train::run_bench(c);
  std::fprintf(human, "%s batch %lld %s %s %s on %s: %.1f img/s, %.2f ms/step, peak memory %s MiB", c.model.c_str(),
              (long long)c.batch_size, c.precision.c_str(), c.kernels.c_str(), method_str(r).c_str(),
              r.device_name.c_str(), r.images_per_s, r.ms_per_step, mib(r.peak_allocated_bytes).c_str());
  if (r.peak_allocated_by_device.size() > 1) {
    std::string each;
    for (const auto& [name, bytes] : r.peak_allocated_by_device) each += (each.empty() ? "" : ", ") + name + " " + mib(bytes);
    std::fprintf(human, " (%s)", each.c_str());
  }
  if (c.method != "backprop") {
    if (r.steady_images_per_s > 0) std::fprintf(human, " (steady state %.1f img/s)", r.steady_images_per_s);
    std::fprintf(human, ", busy %s, activations %s MiB", busy_str(r.busy_pct).c_str(), mib(r.peak_activation_bytes).c_str());
  }
  if (c.weight_stash) std::fprintf(human, ", weight stash %.1f MiB", double(r.peak_stash_bytes) / double(1 << 20));
  if (c.graphs)
    std::fprintf(human, ", %lld of %lld module units replayed from graphs (%lld warm-up steps)", (long long)r.replayed_units,
                (long long)r.units, (long long)r.warmup);
  std::fprintf(human, "\n");
  if (c.profile_ops > 0) {
    std::fprintf(human, "%lld profiled steps: %.3f ms per step of wall time; ", (long long)c.profile_ops,
                r.profiled_wall_ms / double(c.profile_ops));
    std::fputs(sp::format_op_profile(r.op_times, c.profile_ops).c_str(), human);
  }
  emit_json(json, r);
  return 0;
}

int study_main(int argc, char** argv) {
  sp::train::BenchConfig c;
  std::string json, methods = "bp,ddg,fdg", splits = "1,2,3,4";
  int threads = 0;
  bool fdg_cuts = false;
  std::vector<Flag> flags = bench_flags(c, json, threads);
  const std::vector<Flag> more = {
      {"methods", "M,M", "decoupled methods to run for every K > 1 (default bp,ddg,fdg)", [&](const std::string& v) { methods = v; }},
      {"splits", "K,K", "module counts (default 1,2,3,4; K = 1 is plain backprop, run once, the baseline of the table's \"vs backprop\" column, which shows - without it)", [&](const std::string& v) { splits = v; }},
      {"split-at-fdg", "", "use FDG's published cuts where it has them (else balanced by measured block time)", [&](const std::string&) { fdg_cuts = true; }},
      {"shrink", "BETA", "gradient shrink factor of the ddg and fdg runs (default 1)", [&](const std::string& v) { c.shrink = to_f(v); }},
      {"recompute", "", "recompute activations before the backward (memory for time; with the weights of that moment, see train --help)", [&](const std::string&) { c.recompute = true; }},
      {"devices", "D,D", "module k of every K-module run on the k-th of these (at least max K of them; plain backprop on the first; cpu:1,cpu:2,.. are emulated devices); --device defaults to the first", [&](const std::string& v) { c.devices = comma_list("devices", v); }},
  };
  flags.insert(flags.end(), more.begin(), more.end());
  c.device.clear();  // unless given: default_device
  if (!parse_flags("study", "The locking study: for K = 1 (plain backprop) and every K > 1 and method given, measures\nthroughput, per-module busy share and memory on synthetic device-resident data (as\nstaleprop bench does) and prints a table; --json keeps every run.", flags, argc, argv)) return 0;
  use_threads(threads);
  FILE* human = summary_out(json);
  const std::vector<std::string> method_list = comma_list("methods", methods);
  (void)sp::layers::build_resnet(c.model);  // an unknown model, named as such before any run
  sp::train::check_bench_counts(c);  // before any run, as run_bench checks them
  for (size_t i = 0; i < method_list.size(); ++i)
    for (size_t j = i + 1; j < method_list.size(); ++j)
      SP_CHECK(method_list[i] != method_list[j], "study: --methods names ", method_list[i], " twice");
  std::vector<int> k_list;
  for (double k : parse_list("splits", splits)) {
    SP_CHECK(k >= 1 && k <= 1e6 && k == std::floor(k), "study: --splits: each K is a whole number of modules, got ", k);
    k_list.push_back(int(k));
  }
  // A K named twice, or more modules than the model has blocks: refused before any run (the run
  // of that K refused it after the runs before it).
  for (size_t i = 0; i < k_list.size(); ++i)
    for (size_t j = i + 1; j < k_list.size(); ++j)
      SP_CHECK(k_list[i] != k_list[j], "study: --splits names K = ", k_list[i], " twice");
  for (int k : k_list) {
    try {
      sp::train::check_cuts(c.model, k, "");
    } catch (const sp::Error& e) {
      throw sp::Error(std::string("study: --splits: ") + e.what(), std::string("study: --splits: ") + e.message());
    }
  }
  sp::train::check_shrink("ddg", c.shrink);  // before any run
  default_device(c.device, c.devices);
  const std::vector<std::string> devices = c.devices;
  for (int k : k_list)
    SP_CHECK(devices.empty() || size_t(k) <= devices.size(), "study: --splits ", k, " needs ", k,
             " devices, --devices gives ", devices.size());
  for (const std::string& m : method_list) sp::parse_pipeline_method(m);  // reject typos before any run
  // As a run would refuse them, after the runs before it.
  if (!devices.empty()) sp::train::check_module_devices(sp::Device::parse(c.device), devices);
  SP_CHECK(!c.graphs || !c.recompute, "study: --graphs does not go with --recompute, whose work changes from tick to "
           "tick");

  std::vector<sp::train::BenchResult> results;
  double base = 0, steady_base = 0;
  for (int k : k_list) {
    std::vector<std::string> ms = k == 1 ? std::vector<std::string>{"backprop"} : method_list;
    for (const std::string& m : ms) {
      sp::train::BenchConfig run = c;
      run.method = m;
      run.split = k;
      run.devices.clear();
      if (k > 1 && !devices.empty()) run.devices.assign(devices.begin(), devices.begin() + k);
      if (k == 1 && !devices.empty()) run.device = devices[0];
      if (k > 1 && fdg_cuts) {
        try {
          (void)sp::layers::fdg_preset_cuts(c.model, k);
          run.split_at = "fdg";
        } catch (const sp::Error&) {
          // no published cuts for this model and K: balanced ones instead
        }
      }
      if (run.method == "backprop") run.recompute = false;
      if (run.method == "backprop" || run.method == "bp") run.shrink = 1.f;  // no stale gradients to shrink
      results.push_back(sp::train::run_bench(run));
      const auto& r = results.back();
      if (m == "backprop") base = r.images_per_s, steady_base = r.steady_images_per_s;
      std::fprintf(stderr, "study: %s: %.1f img/s\n", method_str(r).c_str(), r.images_per_s);
      emit_json(json, r);
    }
  }
  SP_CHECK(!results.empty(), "study: no runs (--splits and --methods name none)");
  // The tensor-core main loop matters only for our bf16 kernels on a GPU.
  const std::string loop = results.front().mainloop;
  const std::string kernels =
      c.kernels + " kernels" + (c.kernels == "custom" && c.precision == "bf16" && loop != "none" ? " (" + loop + ")" : "");
  std::string placed;
  for (const std::string& d : devices) placed += (placed.empty() ? " (module k on " : ",") + d;
  if (!placed.empty()) placed += ")";
  std::fprintf(human, "\n%s, batch %d, %s, %s, on %s%s; %lld timed steps after %lld warm-up steps%s%s\n\n", c.model.c_str(),
              int(c.batch_size), c.precision.c_str(), kernels.c_str(), results.front().device_name.c_str(),
              placed.c_str(), (long long)c.steps, (long long)c.warmup,
              c.graphs ? " (more under --graphs, until every phase is captured: warmup_run in --json)" : "",
              c.steps >= 2 ? ("; the steady state from a second epoch of " + std::to_string(c.steps / 2) +
                              " steps (- where that many do not fill the pipeline)")
                                 .c_str()
                           : "");
  std::fprintf(human, "| method | img/s | vs backprop | steady img/s | vs backprop | ms/step | busy per module | peak MiB | "
              "activations MiB |\n");
  std::fprintf(human, "|---|---|---|---|---|---|---|---|---|\n");
  // img/s is over an epoch of the timed steps (a decoupled run's fill and drain included);
  // steady, that of a full pipeline (BenchResult::steady_images_per_s). "-" for a figure not
  // measured, and for a ratio without K = 1 in --splits (no plain backprop run to compare with).
  const auto figure = [](const char* format, double value) {
    char b[32];
    std::snprintf(b, sizeof b, format, value);
    return value > 0 ? std::string(b) : std::string("-");
  };
  const auto ratio = [&](double value, double to) { return figure("%.2fx", to > 0 ? value / to : 0); };
  for (const auto& r : results) {
    std::fprintf(human, "| %s | %.1f | %s | %s | %s | %.2f | %s | %s | %s |\n", method_str(r).c_str(), r.images_per_s,
                ratio(r.images_per_s, base).c_str(), figure("%.1f", r.steady_images_per_s).c_str(),
                ratio(r.steady_images_per_s, steady_base).c_str(), r.ms_per_step, busy_str(r.busy_pct).c_str(),
                mib(r.peak_allocated_bytes).c_str(),
                r.config.method == "backprop" ? "-" : mib(r.peak_activation_bytes).c_str());
  }
  return 0;
}

int eval_main(int argc, char** argv) {
  std::string checkpoint, model, device = "cpu", data_dir, precision;
  int64_t limit = -1, batch = 500;
  const std::vector<Flag> flags = {
      {"checkpoint", "FILE", "safetensors checkpoint written by staleprop train (required)", [&](const std::string& v) { checkpoint = v; }},
      {"model", "NAME", "model (default: the name stored in the checkpoint)", [&](const std::string& v) { model = v; }},
      {"device", "D", "cpu|cuda|cuda:N, or cpu:N, an emulated device (default cpu)", [&](const std::string& v) { device = v; }},
      {"data", "DIR", "CIFAR-10 binary directory (default $CIFAR10_DIR, else ./data/cifar-10-batches-bin)", [&](const std::string& v) { data_dir = v; }},
      {"test-limit", "N", "evaluate on the first N test images (default all)", [&](const std::string& v) { limit = positive("test-limit", to_ll(v)); }},
      {"batch-size", "B", "evaluation batch size (default 500)", [&](const std::string& v) { batch = positive("batch-size", to_ll(v)); }},
      {"precision", "P", "fp32|bf16: the activations' precision (default: the one the checkpoint was trained in, from its metadata; fp32 where it names none)", [&](const std::string& v) { precision = v; }},
  };
  if (!parse_flags("eval", "Reports the CIFAR-10 test accuracy of a checkpoint.", flags, argc, argv)) return 0;
  use_threads(0);  // a bad STALEPROP_NUM_THREADS is told before any work
  SP_CHECK(!checkpoint.empty(), "eval: --checkpoint FILE is required");
  require_devices(device, {});
  const std::string dir = sp::data::resolve_cifar10_dir(data_dir, {sp::data::Split::Test});  // reads only the test batch
  const auto test = sp::data::load_cifar10(dir, sp::data::Split::Test, limit);
  const auto r = sp::train::evaluate_checkpoint(checkpoint, model, device, test, batch, precision);
  std::printf("test accuracy %.2f%% (loss %.4f) on %lld images, %s\n", 100 * r.accuracy, r.loss, (long long)r.samples,
              r.precision.c_str());
  return 0;
}

// The build and the devices it can use here: what a results file should name beside its figures.
int version_main(int argc, char** argv) {
  if (!parse_flags("version", "Prints the build (version, commit, build type, backends) and the devices it finds.",
                   {}, argc, argv))
    return 0;
  std::printf("%s\n", sp::build::describe().c_str());
  std::printf("%s\n", sp::device_description(sp::Device::cpu()).c_str());
  if (sp::cuda_built()) {
    const int n = sp::cuda_device_count();
    if (n == 0) std::printf("cuda: no GPU found\n");
    for (int i = 0; i < n; ++i)
      std::printf("cuda:%d: %s\n", i, sp::device_description(sp::Device::cuda(i)).c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2 || !std::strcmp(argv[1], "help") || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
      std::fputs(kTopUsage, stdout);
      return argc < 2 ? 2 : 0;
    }
    const std::string cmd = argv[1];
    if (cmd == "version" || cmd == "--version") return version_main(argc - 2, argv + 2);
    if (cmd == "train") return train_main(argc - 2, argv + 2);
    if (cmd == "eval") return eval_main(argc - 2, argv + 2);
    if (cmd == "demo") return demo_main(argc - 2, argv + 2);
    if (cmd == "bench") return bench_main(argc - 2, argv + 2);
    if (cmd == "study") return study_main(argc - 2, argv + 2);
    if (cmd == "sweep") return sweep_main(argc - 2, argv + 2);
    std::fprintf(stderr, "staleprop: unknown command '%s'\n\n%s", cmd.c_str(), kTopUsage);
    return 2;
  } catch (const std::exception& e) {
    // The failed check's condition and source line only with STALEPROP_DEBUG set: they help a
    // developer, the message alone says what is wrong.
    const char* debug = std::getenv("STALEPROP_DEBUG");
    std::fprintf(stderr, "staleprop: error: %s\n", debug && *debug && *debug != '0' ? e.what() : sp::user_message(e));
    return 1;
  }
}
