#include "engine/pipeline.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <limits>
#include <map>
#include <numeric>
#include <set>

#include "engine/allocator.h"
#include "engine/op_profile.h"
#include "engine/ops.h"
#include "engine/random.h"
#include "kernels/common/error.h"

#if STALEPROP_WITH_CUDA
#include <nvtx3/nvToolsExt.h>
#endif

namespace sp {

PipelineMethod parse_pipeline_method(const std::string& s) {
  if (s == "bp") return PipelineMethod::BP;
  if (s == "ddg") return PipelineMethod::DDG;
  if (s == "fdg") return PipelineMethod::FDG;
  throw Error("unknown method '" + s + "' (expected bp, ddg or fdg)");
}

const char* pipeline_method_name(PipelineMethod m) {
  switch (m) {
    case PipelineMethod::BP: return "bp";
    case PipelineMethod::DDG: return "ddg";
    case PipelineMethod::FDG: return "fdg";
  }
  return "?";
}

// One slot of a double-buffered queue. Buffers are persistent (allocated at the first write,
// grown only after the slot's last read has completed); the host-side fields describe the
// message of the most recent write.
struct PipelineTrainer::Slot {
  Tensor data, labels;
  std::unique_ptr<Event> ready, freed;
  int64_t tick = -1, batch = -1;
  Shape shape;
};

struct PipelineTrainer::Queue {
  Slot slots[2];
  // `ready` is recorded by the producer's stream, `freed` by the consumer's: each on its
  // recorder's device (a stream records only its own device's events, and waits on any).
  Queue(Device producer, Device consumer) {
    for (Slot& s : slots) s.ready = make_event(producer), s.freed = make_event(consumer);
  }
  // A new epoch's ticks start again at 0: no message of the last epoch may pass for one of its.
  void forget_messages() {
    for (Slot& s : slots) s.tick = -1, s.batch = -1;
  }
};

namespace {

constexpr uint64_t kJitterStream = 0x6a6974746572ull;  // "jitter": --staleness-jitter's draws

// A gradient taken out of its queue, waiting for its tick (later than its arrival under
// staleness jitter).
struct ReceivedGradient {
  int64_t batch, ready_tick;
  Tensor dy;
};

// One stage of a unit of work, timed by events on its module's stream. Eagerly run units are
// split at their hand-over: the stage that computes the message ends just before the message
// is marked ready (so its consumer cannot seem to start before it ends), and the optimizer
// step after a backward is a stage of its own, "step". A captured or replayed unit (--graphs)
// is one stage: an event recorded inside a capture would be baked into the graph.
struct TimedStage {
  std::unique_ptr<Event> start, end;
  int64_t tick = 0, batch = 0;
  const char* stage = "";
};

}  // namespace

struct PipelineTrainer::Message {
  Tensor data, labels;
  int64_t batch = -1;
};

// A captured unit of one phase (see "Graphs" in pipeline.h).
struct PipelineTrainer::Unit {
  std::unique_ptr<Graph> graph;
  std::vector<Context> contexts;  // forward units of k < K: what the captured forward left
  size_t saved_bytes = 0;         // module K: the activations its captured forward saved (within its tick)
  Shape sent;                     // the shape of the message the unit sends (empty: none)
  PendingLoss loss;               // module K: where each run leaves the loss and the hits
  std::vector<int64_t> counters;  // forward units: how far one run advances each counter
  int warm = 0;                   // eager steady runs of this phase (its arena has seen the work)
};

struct PipelineTrainer::InFlight {
  int64_t batch, tick;
  std::vector<Context> contexts;  // one per block of the module (cleared with --recompute)
  Tensor input;                   // the module's input, kept for --recompute
  std::vector<Tensor> stash;      // the module's weights at the forward, for --weight-stash
  bool steady = false;            // --graphs: a full-size batch (its backward may be replayed)
  bool from_graph = false;        // --graphs: its forward was captured or replayed (addresses final)
};

struct PipelineTrainer::Stage {
  int index = 0;
  Device device;
  std::unique_ptr<Stream> stream;
  size_t first = 0, last = 0;
  std::unique_ptr<Sgd> opt;
  std::deque<InFlight> inflight;
  int64_t steps = 0;
  std::unique_ptr<Event> tick_end[2];
  // Module 1: the copies of the last two batches' inputs, by batch parity (the source's views of
  // a batch may be reused after its copy; the host waits for the copy two batches back).
  std::unique_ptr<Event> input_copied[2];
  // Evaluation across devices: the activation this module hands on is computed (modules
  // k < K) / this module's copy of the one it received has read it (modules k > 1).
  std::unique_ptr<Event> eval_handed, eval_received;
  std::unique_ptr<Event> epoch_start;
  std::deque<TimedStage> timed;                      // recorded, not read yet (in tick order)
  std::vector<std::unique_ptr<Event>> spare_timing;  // read, to be recorded again
  int64_t timing_events_made = 0;

  // Timing events are reused once read, so a steady epoch creates none (cudaEventCreate and
  // cudaEventDestroy per unit and tick would be host time on the pipeline's critical path).
  std::unique_ptr<Event> timing_event() {
    if (spare_timing.empty()) {
      ++timing_events_made;
      return make_event(device, true);
    }
    std::unique_ptr<Event> e = std::move(spare_timing.back());
    spare_timing.pop_back();
    return e;
  }
  // A stage of `batch` at `tick`, with its two timing events (not recorded yet).
  TimedStage new_stage(int64_t tick, int64_t batch, const char* name) {
    return TimedStage{timing_event(), timing_event(), tick, batch, name};
  }
  // Ends the timing of a unit: records its end unless the hand-over did (`end_recorded`), then
  // that of its optimizer step when timed apart (`step`, see TimedStage), and keeps them to read.
  void finish_timing(TimedStage unit, bool end_recorded, TimedStage step) {
    if (!end_recorded) stream->record(*unit.end);
    timed.push_back(std::move(unit));
    if (step.end) {
      stream->record(*step.end);
      timed.push_back(std::move(step));
    }
  }
  // Reads the stages of ticks up to `through_tick`, whose work has completed, into `stats`,
  // their start times counted from `origin` (an event of this stage's device).
  void read_timings(int64_t through_tick, Event& origin, PipelineEpochStats& stats) {
    while (!timed.empty() && timed.front().tick <= through_tick) {
      TimedStage& t = timed.front();
      // The busy time from the stage's own span (precise); its place on the timeline from the
      // origin, end as start, so that rounding (elapsed times are floats: about 4 us steps a
      // minute into the epoch) keeps stages back to back apart and ops inside their stages.
      const double start = t.start->elapsed_ms_since(origin), end = t.end->elapsed_ms_since(origin);
      stats.busy_ms[size_t(index)] += t.end->elapsed_ms_since(*t.start);
      stats.stages.push_back({index, t.tick, t.batch, t.stage, start, std::max(0.0, end - start)});
      spare_timing.push_back(std::move(t.start));
      spare_timing.push_back(std::move(t.end));
      timed.pop_front();
    }
  }
  std::vector<PendingLoss> pending;  // module K
  std::vector<Parameter*> params;     // this module's parameters
  std::vector<int64_t*> counters;     // ... and host-side counters (BN num_batches_tracked)
  std::deque<ReceivedGradient> gradients;
  // --graphs
  int period = 1;                                  // P_k
  std::vector<std::unique_ptr<Arena>> fwd_arenas;  // phase j uses j mod their count
  std::unique_ptr<Arena> bwd_arena;
  std::vector<Unit> fwd_units, bwd_units;  // one per phase
  int fwd_warm = 0, bwd_warm = 0;          // steady units run eagerly so far
  Shape full_input;                        // the module's input shape for a full batch
  Tensor lr;                               // the learning rate the optimizer reads
};

namespace {

// An NVTX range around the host's enqueueing of a stage (visible in Nsight Systems).
class NvtxRange {
 public:
  explicit NvtxRange(const std::string& name) {
#if STALEPROP_WITH_CUDA
    nvtxRangePushA(name.c_str());
#else
    (void)name;
#endif
  }
  ~NvtxRange() {
#if STALEPROP_WITH_CUDA
    nvtxRangePop();
#endif
  }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

// Begins a capture on s when asked; if the enqueueing throws before end_capture(), ends the
// capture and drops it, so the stream is usable again.
class CaptureGuard {
 public:
  CaptureGuard(Stream& s, bool capture) : s_(s) {
    if (capture) s_.begin_capture();
  }
  ~CaptureGuard() {
    if (!s_.capturing()) return;
    try {
      s_.end_capture();
    } catch (...) {  // already failing: keep the first error
    }
  }
  CaptureGuard(const CaptureGuard&) = delete;
  CaptureGuard& operator=(const CaptureGuard&) = delete;

 private:
  Stream& s_;
};

// The first numel(shape) elements of a slot buffer, viewed as `shape`.
Tensor slot_view(const Tensor& buffer, const Shape& shape) {
  return buffer.view({buffer.numel()}).slice(0, shape_numel(shape)).view(shape);
}

}  // namespace

PipelineTrainer::PipelineTrainer(Network& net, const PipelineConfig& config) : net_(net), cfg_(config) {
  const size_t blocks = net.size();
  SP_CHECK(blocks > 0, "pipeline: the network has no blocks");
  std::vector<size_t> starts = {0};
  for (size_t c : cfg_.cuts) {
    SP_CHECK(c > starts.back() && c < blocks, "pipeline: cut points must be ascending block indices in (0, ",
             blocks, "), got ", c);
    starts.push_back(c);
  }
  const int k_modules = int(starts.size());
  const Device home = net.state().params.empty() ? Device::cpu() : net.state().params[0].second->value.device();
  SP_CHECK(cfg_.devices.empty() || cfg_.devices.size() == 1 || int(cfg_.devices.size()) == k_modules,
           "pipeline: give one device for all modules or one per module (", k_modules, " modules, ",
           cfg_.devices.size(), " devices)");
  for (const Device& d : cfg_.devices)
    SP_CHECK(d.is_cpu() == cfg_.devices[0].is_cpu(),
             "pipeline: the modules' devices must all be the CPU or all GPUs (their streams exchange events), got ",
             cfg_.devices[0].str(), " and ", d.str());
  SP_CHECK(!cfg_.graphs || (cfg_.staleness_jitter == 0 && !cfg_.recompute && !cfg_.weight_stash),
           "pipeline: graphs cannot be combined with staleness jitter, recompute or weight stashing, whose work "
           "changes from tick to tick");
  switch (cfg_.method) {
    case PipelineMethod::BP: activation_latency_ = 0, gradient_latency_ = 0; break;
    case PipelineMethod::DDG: activation_latency_ = 0, gradient_latency_ = 1; break;
    case PipelineMethod::FDG: activation_latency_ = 1, gradient_latency_ = 1; break;
  }
  for (int k = 0; k < k_modules; ++k) {
    auto st = std::make_unique<Stage>();
    st->index = k;
    st->device = cfg_.devices.empty() ? home : cfg_.devices[cfg_.devices.size() == 1 ? 0 : size_t(k)];
    st->stream = make_stream(st->device, cfg_.stream_options);
    st->first = starts[size_t(k)];
    st->last = k + 1 < k_modules ? starts[size_t(k) + 1] : blocks;
    for (size_t b = st->first; b < st->last; ++b) net.block(b).to(st->device, *st->stream);
    st->opt = std::make_unique<Sgd>(net.state(st->first, st->last).params, cfg_.sgd, *st->stream);
    for (auto& [name, p] : net.state(st->first, st->last).params) st->params.push_back(p);
    for (auto& [name, c] : net.state(st->first, st->last).counters) st->counters.push_back(c);
    for (auto& e : st->tick_end) e = make_event(st->device);
    for (auto& e : st->input_copied) e = make_event(st->device);
    if (k + 1 < k_modules) st->eval_handed = make_event(st->device);
    if (k > 0) st->eval_received = make_event(st->device);
    st->epoch_start = make_event(st->device, true);
    stages_.push_back(std::move(st));
  }
  if (cfg_.graphs)
    for (auto& st : stages_) {
      // As many phases as batches whose saved activations a forward must not overwrite,
      // rounded up to even (the parity of the queue slots); one module has no queues. In a
      // tick, fdg back-propagates batch t - d_k before it forwards batch t, which may then
      // take that batch's arena: d_k arenas (1 for d_k = 0). ddg and bp forward first: d_k + 1.
      const int d = delay(st->index);
      const int sets = cfg_.method == PipelineMethod::FDG ? std::max(d, 1) : d + 1;
      st->period = k_modules == 1 ? 1 : (sets + 1) / 2 * 2;
      const Arena::Policy policy = cfg_.plan_graph_memory ? Arena::Policy::Planned : Arena::Policy::Bump;
      // With one batch in flight (d_k = 0: its backward follows its forward in the same tick)
      // the phases, which differ only in their queue slots, share one arena.
      const int arenas = st->period % sets == 0 ? sets : st->period;
      for (int j = 0; j < arenas; ++j)
        st->fwd_arenas.push_back(std::make_unique<Arena>(st->device, size_t(4) << 20, policy));
      st->bwd_arena = std::make_unique<Arena>(st->device, size_t(4) << 20, policy);
      st->fwd_units.resize(size_t(st->period));
      st->bwd_units.resize(size_t(st->period));
      st->lr = Tensor::empty({1}, DType::F32, st->device);
      ops::fill(*st->stream, st->lr, 0.f);
    }
  for (int k = 0; k + 1 < k_modules; ++k) {
    // Neighbouring modules' streams copy each other's queue slots: directly, where GPUs allow.
    enable_peer_access(stages_[size_t(k)]->device, stages_[size_t(k) + 1]->device);
    enable_peer_access(stages_[size_t(k) + 1]->device, stages_[size_t(k)]->device);
    act_.push_back(std::make_unique<Queue>(stages_[size_t(k)]->device, stages_[size_t(k) + 1]->device));
    grad_.push_back(std::make_unique<Queue>(stages_[size_t(k) + 1]->device, stages_[size_t(k)]->device));
  }
  // The optimizers' zeroed momentum must be in place before anyone (e.g. a checkpoint being
  // restored from the host) touches it.
  for (auto& st : stages_) st->stream->synchronize();
}

PipelineTrainer::~PipelineTrainer() {
  // The streams' work must end before the memory it uses goes; when it failed (the error is
  // what is unwinding the stack, or was reported already), that is no reason to terminate.
  for (auto& st : stages_) synchronize_quietly(*st->stream);
}

int PipelineTrainer::delay(int module) const {
  return (activation_latency_ + gradient_latency_) * (num_modules() - 1 - module);
}

std::pair<size_t, size_t> PipelineTrainer::blocks(int module) const {
  return {stages_[size_t(module)]->first, stages_[size_t(module)]->last};
}

int64_t PipelineTrainer::steps(int module) const { return stages_[size_t(module)]->steps; }

int PipelineTrainer::graph_period(int module) const { return stages_[size_t(module)]->period; }

PipelineGraphStats PipelineTrainer::graph_stats() const {
  PipelineGraphStats g = graph_stats_;
  for (const auto& st : stages_) {
    std::vector<const Arena*> arenas;
    for (const auto& a : st->fwd_arenas) arenas.push_back(a.get());
    if (st->bwd_arena && st->index + 1 < num_modules()) arenas.push_back(st->bwd_arena.get());  // K's is unused
    for (const Arena* a : arenas) {
      g.arena_bytes += a->reserved_bytes(), g.arena_peak_used += a->peak_used_bytes();
      ++g.arenas;
      g.planned_arenas += a->policy() == Arena::Policy::Planned && a->stable();
    }
  }
  return g;
}

std::vector<Sgd*> PipelineTrainer::optimizers() {
  std::vector<Sgd*> out;
  for (auto& st : stages_) out.push_back(st->opt.get());
  return out;
}

void PipelineTrainer::send(Stage& st, Queue& q, int64_t tick, int64_t batch, const Tensor& data,
                           const Tensor& labels, Event* before_ready) {
  Slot& slot = q.slots[tick % 2];
  Stream& s = *st.stream;
  s.wait(*slot.freed);  // the consumer has copied out the message of two ticks ago
  const bool grow = !slot.data.defined() || slot.data.numel() < data.numel() || slot.data.dtype() != data.dtype() ||
                    (labels.defined() && (!slot.labels.defined() || slot.labels.numel() < labels.numel()));
  if (grow) {
    SP_CHECK(!s.capturing(), "pipeline: a queue slot grew while a graph was being captured");
    if (slot.data.defined()) drop_graphs();  // captured copies may address the old buffers
    slot.freed->synchronize();  // the old buffers' last read is done before they are released
    slot.data = Tensor::empty(data.shape(), data.dtype(), s.device());
    if (labels.defined()) slot.labels = Tensor::empty(labels.shape(), labels.dtype(), s.device());
  }
  ops::copy(s, data, slot_view(slot.data, data.shape()));
  if (labels.defined()) ops::copy(s, labels, slot.labels.slice(0, labels.numel()));
  if (before_ready) s.record(*before_ready);
  s.record(*slot.ready);
  slot.tick = tick, slot.batch = batch, slot.shape = data.shape();
}

const PipelineTrainer::Slot* PipelineTrainer::incoming(const Queue& q, int64_t written_tick) {
  if (written_tick < 0) return nullptr;  // before the first tick
  const Slot& slot = q.slots[written_tick % 2];
  return slot.tick == written_tick ? &slot : nullptr;  // nullptr: nothing was sent at that tick
}

bool PipelineTrainer::receive(Stage& st, Queue& q, int64_t written_tick, bool with_labels, Tensor* data,
                              Tensor* labels, int64_t* batch) {
  if (!incoming(q, written_tick)) return false;
  Slot& slot = q.slots[written_tick % 2];
  Stream& s = *st.stream;
  s.wait(*slot.ready);
  *data = new_activation(s, slot.shape, slot.data.dtype());
  ops::copy(s, slot_view(slot.data, slot.shape), *data);
  if (with_labels) {
    *labels = new_activation(s, {slot.shape[0]}, DType::I32);
    ops::copy(s, slot.labels.slice(0, slot.shape[0]), *labels);
  }
  s.record(*slot.freed);
  *batch = slot.batch;
  return true;
}

Arena* PipelineTrainer::forward_arena(const Stage& st, size_t phase) const {
  // The periods are chosen so that this never fails (see Graphs in pipeline.h); it guards the
  // order of a tick that they rely on (fdg: the backwards before the forwards).
  const size_t n = st.fwd_arenas.size();
  for (const InFlight& f : st.inflight)
    SP_CHECK(!f.steady || size_t(f.tick % st.period) % n != phase % n, "pipeline: module ", st.index + 1,
             "'s forward of phase ", phase, " would take the arena of batch ", f.batch, " (forwarded at tick ", f.tick,
             "), which is still in flight");
  return st.fwd_arenas[phase % n].get();
}

void PipelineTrainer::host_wait(Event& e) {
  const auto start = std::chrono::steady_clock::now();
  e.synchronize();
  host_wait_ms_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

void PipelineTrainer::forward_phase(int k, int64_t tick, const BatchSource& source, bool& source_done,
                                    const LrAt& lr) {
  Stage& st = *stages_[size_t(k)];
  Stream& s = *st.stream;
  const int last = num_modules() - 1;
  const size_t phase = size_t(tick % st.period);
  // Only full-size batches use the phase's arena (a partial one is never captured).
  Arena* arena = nullptr;
  Message in;
  Shape in_shape;
  if (k == 0) {
    if (source_done) return;
    // The source may reuse the views of two batches back. (Module 1 takes one batch a tick, so the
    // wait for tick t - 2's end above has already covered that copy; this wait keeps the source's
    // contract without relying on it.)
    host_wait(*st.input_copied[next_batch_ % 2]);
    Tensor xs, ys;
    if (!source(&xs, &ys)) {
      source_done = true;
      return;
    }
    if (cfg_.graphs && (st.full_input.empty() || xs.size(0) == st.full_input[0])) {
      arena = forward_arena(st, phase);
      arena->reset();
    }
    // Staged into the phase's arena, where a replayed forward expects its input.
    ArenaScope scope(s, arena);
    in.data = network_input(s, xs, cfg_.activation_dtype);
    in.labels = new_activation(s, ys.shape(), DType::I32);
    ops::copy(s, ys, in.labels);
    s.record(*st.input_copied[next_batch_ % 2]);
    in.batch = next_batch_++;
    in_shape = in.data.shape();
  } else {
    const Slot* slot = incoming(*act_[size_t(k) - 1], tick - activation_latency_);
    if (!slot) return;
    in.batch = slot->batch;
    in_shape = slot->shape;
  }
  if (cfg_.graphs && st.full_input.empty()) st.full_input = in_shape;
  Unit* unit = cfg_.graphs && in_shape == st.full_input ? &st.fwd_units[phase] : nullptr;
  if (unit && k > 0) {
    arena = forward_arena(st, phase);
    if (!unit->graph) arena->reset();
  }
  TimedStage timed = st.new_stage(tick, in.batch, k == last ? "fwd+loss+bwd" : "fwd");
  NvtxRange range("module " + std::to_string(k + 1) + " " + timed.stage + " batch " + std::to_string(in.batch));
  // The wait for the input comes before the start event, so busy time excludes it (the wait
  // in the receive, or in a replayed graph, then finds the message there).
  if (k > 0) s.wait(*act_[size_t(k) - 1]->slots[(tick - activation_latency_) % 2].ready);
  s.record(*timed.start);
  if (cfg_.graphs && k == last) ops::fill(s, st.lr, lr(st.steps));  // module K steps in this unit
  bool end_recorded = false;
  TimedStage step;  // module K's optimizer step, in an eager unit
  if (unit && unit->graph) {
    unit->graph->launch(s);
    replayed_forward(k, tick, in.batch, *unit);
    ++graph_stats_.replays;
  } else {
    // Captured once the phase ran eagerly and its arena's addresses are settled.
    const bool capture = unit && unit->warm > 0 && st.fwd_warm >= st.period && arena->stable();
    ArenaScope scope(s, arena);
    std::vector<int64_t> before;
    if (capture)
      for (const int64_t* c : st.counters) before.push_back(*c);
    CaptureGuard guard(s, capture);
    // Eagerly, the stage ends before its output is handed over (see TimedStage): on the CPU
    // emulation the consumer could otherwise start before the producer's thread gets round to
    // recording a later event, showing locked modules overlapping. (Captured and replayed
    // units record their end after the graph, whose hand-over is inside it; on the CPU with
    // --graphs a preempted producer can still show such overlap. On a GPU the two records are
    // microseconds apart.)
    if (!capture) {
      end_recorded = true;
      if (k == last) step = st.new_stage(tick, in.batch, "step");
    }
    enqueue_forward(k, tick, in, unit != nullptr, lr, end_recorded ? timed.end.get() : nullptr, step.start.get());
    if (capture) {
      unit->graph = s.end_capture();
      if (k < last) st.inflight.back().from_graph = true, unit->contexts = st.inflight.back().contexts;
      if (k == last) unit->saved_bytes = last_module_saved_bytes_;  // its contexts end with the tick
      const Queue* out = k < last ? act_[size_t(k)].get() : k > 0 ? grad_[size_t(k) - 1].get() : nullptr;
      unit->sent = out ? out->slots[tick % 2].shape : Shape();
      if (k == last) unit->loss = st.pending.back();
      unit->counters.clear();
      for (size_t i = 0; i < before.size(); ++i) unit->counters.push_back(*st.counters[i] - before[i]);
      unit->graph->launch(s);
      ++graph_stats_.captured;
    } else {
      if (unit) ++st.fwd_warm, ++unit->warm;
      ++graph_stats_.eager;
    }
  }
  if (cfg_.graphs && k == last) {
    // The loss lives in the arena until the phase comes round again: keep a copy.
    PendingLoss& in_arena = st.pending.back();
    PendingLoss kept{new_activation(s, {1}), new_activation(s, {1}, DType::I32), in_arena.samples};
    ops::copy(s, in_arena.loss, kept.loss);
    ops::copy(s, in_arena.correct, kept.correct);
    in_arena = kept;
  }
  st.finish_timing(std::move(timed), end_recorded, std::move(step));
}

void PipelineTrainer::enqueue_forward(int k, int64_t tick, Message& in, bool steady, const LrAt& lr, Event* end,
                                      Event* step_start) {
  Stage& st = *stages_[size_t(k)];
  Stream& s = *st.stream;
  const int last = num_modules() - 1;
  if (k > 0) {
    const bool received = receive(st, *act_[size_t(k) - 1], tick - activation_latency_, true, &in.data, &in.labels,
                                  &in.batch);
    SP_CHECK(received, "pipeline: module ", k + 1, " lost its input at tick ", tick);
  }
  InFlight f{in.batch, tick, std::vector<Context>(st.last - st.first), Tensor(), {}, steady};
  if (k < last && cfg_.weight_stash)
    for (Parameter* p : st.params) {
      f.stash.push_back(new_activation(s, p->value.shape()));
      ops::copy(s, p->value, f.stash.back());
    }
  Tensor h = in.data;
  for (size_t b = st.first; b < st.last; ++b) h = net_.block(b).forward(s, h, f.contexts[b - st.first]);
  if (k < last && cfg_.recompute) {
    // Keep only the input; the backward rebuilds the contexts.
    f.input = in.data;
    for (Context& c : f.contexts) c.clear();
  }
  ledger_.push_back({tick, k, in.batch, false});
  if (k == last) last_module_saved_bytes_ = saved_bytes(f.contexts);
  st.inflight.push_back(std::move(f));
  if (k < last) {
    send(st, *act_[size_t(k)], tick, in.batch, h, in.labels, end);
    return;
  }
  // Module K: the loss and its gradient, then the backward of the same batch at once.
  SP_CHECK(h.dim() == 2, "pipeline: the last module must produce [N, classes] logits, got ", h.str());
  PendingLoss pl{new_activation(s, {1}), new_activation(s, {1}, DType::I32), h.size(0)};
  Tensor dlogits = new_activation(s, h.shape(), h.dtype());
  ops::softmax_cross_entropy(s, h, in.labels, cfg_.label_smoothing, pl.loss, dlogits, pl.correct);
  st.pending.push_back(pl);
  backward_and_step(k, tick, in.batch, dlogits, lr, end, step_start);
}

void PipelineTrainer::replayed_forward(int k, int64_t tick, int64_t batch, const Unit& u) {
  Stage& st = *stages_[size_t(k)];
  for (size_t i = 0; i < u.counters.size(); ++i) *st.counters[i] += u.counters[i];
  ledger_.push_back({tick, k, batch, false});
  st.inflight.push_back(InFlight{batch, tick, u.contexts, Tensor(), {}, true, true});
  if (k + 1 < num_modules()) {
    Slot& out = act_[size_t(k)]->slots[tick % 2];
    out.tick = tick, out.batch = batch, out.shape = u.sent;
    return;
  }
  last_module_saved_bytes_ = u.saved_bytes;
  st.pending.push_back(u.loss);
  replayed_backward(k, tick, batch, u.sent);
}

void PipelineTrainer::replayed_backward(int k, int64_t tick, int64_t batch, const Shape& sent) {
  Stage& st = *stages_[size_t(k)];
  take_inflight(k, tick, batch);
  if (k > 0) {
    Slot& out = grad_[size_t(k) - 1]->slots[tick % 2];
    out.tick = tick, out.batch = batch, out.shape = sent;
  }
  ++st.steps;
  ledger_.push_back({tick, k, batch, true});
}

PipelineTrainer::InFlight& PipelineTrainer::oldest_inflight(int k, int64_t batch) {
  Stage& st = *stages_[size_t(k)];
  SP_CHECK(!st.inflight.empty() && st.inflight.front().batch == batch, "pipeline: module ", k + 1,
           " received the gradient of batch ", batch, " but its oldest batch in flight is ",
           st.inflight.empty() ? -1 : st.inflight.front().batch);
  return st.inflight.front();
}

PipelineTrainer::InFlight PipelineTrainer::take_inflight(int k, int64_t tick, int64_t batch) {
  Stage& st = *stages_[size_t(k)];
  InFlight f = std::move(oldest_inflight(k, batch));
  st.inflight.pop_front();
  const int64_t late = tick - f.tick;
  SP_CHECK(cfg_.staleness_jitter > 0 ? late >= delay(k) : late == delay(k), "pipeline: module ", k + 1,
           " back-propagates batch ", f.batch, " ", late, " ticks after its forward, expected ", delay(k));
  return f;
}

void PipelineTrainer::backward_phase(int k, int64_t tick, const LrAt& lr) {
  Stage& st = *stages_[size_t(k)];
  Stream& s = *st.stream;
  if (cfg_.graphs) {
    // No jitter here: the gradient that arrives is back-propagated at once.
    const Slot* slot = incoming(*grad_[size_t(k)], tick - gradient_latency_);
    if (!slot) return;
    const int64_t batch = slot->batch;
    const InFlight& f = oldest_inflight(k, batch);
    Unit* unit = f.steady ? &st.bwd_units[size_t(tick % st.period)] : nullptr;
    TimedStage timed = st.new_stage(tick, batch, "bwd");
    NvtxRange range("module " + std::to_string(k + 1) + " bwd batch " + std::to_string(batch));
    s.wait(*grad_[size_t(k)]->slots[(tick - gradient_latency_) % 2].ready);  // not counted as busy
    s.record(*timed.start);
    ops::fill(s, st.lr, lr(st.steps));
    bool split = false;  // an eager unit: its step timed apart
    TimedStage step;
    if (unit && unit->graph) {
      // The batch's forward phase was captured before this unit was, and replays ever since.
      SP_CHECK(f.from_graph, "pipeline: module ", k + 1, " would replay the backward of batch ", batch,
               " whose forward did not come from a graph");
      unit->graph->launch(s);
      replayed_backward(k, tick, batch, unit->sent);
      ++graph_stats_.replays;
    } else {
      // Captured once the arena's addresses are settled and the saved activations it reads
      // sit where every later forward of their phase puts them (that forward is a graph).
      Arena* arena = unit ? st.bwd_arena.get() : nullptr;
      if (arena) arena->reset();
      const bool capture = unit && unit->warm > 0 && st.bwd_warm >= st.period && arena->stable() && f.from_graph;
      ArenaScope scope(s, arena);
      CaptureGuard guard(s, capture);
      Tensor dy, unused;
      int64_t received = -1;
      receive(st, *grad_[size_t(k)], tick - gradient_latency_, false, &dy, &unused, &received);
      if (cfg_.shrink != 1.f) ops::scale(s, cfg_.shrink, dy, dy);
      split = !capture;
      if (split) step = st.new_stage(tick, received, "step");
      backward_and_step(k, tick, received, dy, lr, split ? timed.end.get() : nullptr, step.start.get());
      if (capture) {
        unit->graph = s.end_capture();
        unit->sent = k > 0 ? grad_[size_t(k) - 1]->slots[tick % 2].shape : Shape();
        unit->graph->launch(s);
        ++graph_stats_.captured;
      } else {
        if (unit) ++st.bwd_warm, ++unit->warm;
        ++graph_stats_.eager;
      }
    }
    st.finish_timing(std::move(timed), split, std::move(step));
    return;
  }
  // Take delivery of the gradient sent to this module (freeing its slot at once) ...
  ReceivedGradient g;
  Tensor unused;
  if (receive(st, *grad_[size_t(k)], tick - gradient_latency_, false, &g.dy, &unused, &g.batch)) {
    if (cfg_.shrink != 1.f) ops::scale(s, cfg_.shrink, g.dy, g.dy);
    // The draw hangs on the module and on how many gradients it has received in the run
    // (steps taken + those waiting), not on a generator's past: a run resumed at an epoch
    // boundary (set_steps) draws what the uninterrupted run draws.
    const uint64_t received = uint64_t(st.steps) + st.gradients.size();
    const int64_t extra = cfg_.staleness_jitter > 0
                              ? int64_t(SplitMix(random_key(cfg_.jitter_seed, kJitterStream, uint64_t(k), received))
                                            .below(uint64_t(cfg_.staleness_jitter) + 1))
                              : 0;
    g.ready_tick = tick + extra;
    st.gradients.push_back(std::move(g));
  }
  // ... and back-propagate the oldest one once its tick has come (in order, one per tick).
  if (st.gradients.empty() || st.gradients.front().ready_tick > tick) return;
  ReceivedGradient ready = std::move(st.gradients.front());
  st.gradients.pop_front();
  oldest_inflight(k, ready.batch);  // checked before any work is enqueued
  TimedStage timed = st.new_stage(tick, ready.batch, "bwd");
  NvtxRange range("module " + std::to_string(k + 1) + " bwd batch " + std::to_string(ready.batch));
  TimedStage step = st.new_stage(tick, ready.batch, "step");
  s.record(*timed.start);
  backward_and_step(k, tick, ready.batch, ready.dy, lr, timed.end.get(), step.start.get());
  st.finish_timing(std::move(timed), true, std::move(step));
  ++graph_stats_.eager;
}

void PipelineTrainer::backward_and_step(int k, int64_t tick, int64_t batch, Tensor dy, const LrAt& lr, Event* bwd_end,
                                        Event* step_start) {
  Stage& st = *stages_[size_t(k)];
  Stream& s = *st.stream;
  InFlight f = take_inflight(k, tick, batch);
  // Weight stashing: back-propagate through the weights this batch's forward used, swapped in and
  // back out. (The bf16 weight copies follow the live weights: stale while the stash stands in.)
  const auto swap_stash = [&] {
    for (size_t i = 0; i < f.stash.size(); ++i)
      std::swap(st.params[i]->value, f.stash[i]), st.params[i]->value_changed();
  };
  swap_stash();
  if (f.input.defined()) {
    recompute_forward(st, f);
    // Held until this backward has run: the stored input and every activation rebuilt from it.
    std::set<const void*> seen = {f.input.raw_data()};
    tick_rebuilt_bytes_ += f.input.nbytes();
    for (const Context& c : f.contexts) tick_rebuilt_bytes_ += c.saved_bytes(&seen);
  }
  Tensor g = dy;
  for (size_t b = st.last; b-- > st.first;)
    g = net_.block(b).backward(s, g, f.contexts[b - st.first], b > st.first || k > 0);
  swap_stash();
  if (k > 0)
    send(st, *grad_[size_t(k) - 1], tick, f.batch, g, Tensor(), bwd_end);
  else if (bwd_end)
    s.record(*bwd_end);
  if (step_start) s.record(*step_start);
  if (cfg_.before_step) cfg_.before_step(k, s, st.params);  // timed with the step
  if (cfg_.graphs)
    st.opt->step(s, st.lr, cfg_.grad_scale);  // the rate written into st.lr before the unit
  else
    st.opt->step(s, lr(st.steps), cfg_.grad_scale);
  ++st.steps;
  ledger_.push_back({tick, k, f.batch, true});
}

void PipelineTrainer::drop_graphs() {
  bool any = false;
  for (auto& st : stages_)
    for (const Unit& u : st->fwd_units) any = any || u.graph;
  for (auto& st : stages_)
    for (const Unit& u : st->bwd_units) any = any || u.graph;
  if (!any) return;
  for (auto& st : stages_) st->stream->synchronize();  // no launch of a graph is pending
  for (auto& st : stages_) {
    for (Unit& u : st->fwd_units) u = Unit();
    for (Unit& u : st->bwd_units) u = Unit();
    st->fwd_warm = st->bwd_warm = 0;
  }
}

void PipelineTrainer::recompute_forward(Stage& st, InFlight& f) {
  Stream& s = *st.stream;
  // The repeated forward must not count twice in the BN running statistics: save and restore.
  const ModuleState state = net_.state(st.first, st.last);
  std::vector<Tensor> buffers;
  for (auto& [name, b] : state.buffers) {
    buffers.push_back(new_activation(s, b->shape(), b->dtype()));
    ops::copy(s, *b, buffers.back());
  }
  std::vector<int64_t> counters;
  for (auto& [name, c] : state.counters) counters.push_back(*c);
  Tensor h = f.input;
  for (size_t b = st.first; b < st.last; ++b) h = net_.block(b).forward(s, h, f.contexts[b - st.first]);
  for (size_t i = 0; i < buffers.size(); ++i) ops::copy(s, buffers[i], *state.buffers[i].second);
  for (size_t i = 0; i < counters.size(); ++i) *state.counters[i].second = counters[i];
}

PipelineEpochStats PipelineTrainer::run_epoch(const BatchSource& source, const LrAt& lr) {
  PipelineEpochStats stats;
  const int K = num_modules();
  stats.busy_ms.assign(size_t(K), 0.0);
  net_.set_training(true);
  last_module_saved_bytes_ = 0;
  for (auto& st : stages_) {
    SP_CHECK(st->inflight.empty() && st->gradients.empty(), "run_epoch: module ", st->index + 1, " still holds ",
             st->inflight.size(), " batches and ", st->gradients.size(),
             " gradients of an earlier epoch (did that epoch fail?)");
    st->timed.clear();
    st->pending.clear();
  }
  // Stage times count from one origin per device, the epoch start of the device's first
  // module (streams of one device share a clock; per-stream origins would shift a module's
  // stages by however late its stream reached the epoch's start). Each module's work waits on
  // a message that leaves that first module after its epoch start, so no stage starts before
  // it. With several devices the origins are recorded on idle streams, to match closely.
  if (!on_one_device())
    for (auto& st : stages_) st->stream->synchronize();
  std::vector<Event*> origin;
  for (auto& st : stages_) {
    st->stream->record(*st->epoch_start);
    st->timing_events_made = 0;
    size_t first = 0;
    while (stages_[first]->device != st->device) ++first;
    origin.push_back(stages_[first]->epoch_start.get());
  }
  for (auto* queues : {&act_, &grad_})
    for (auto& q : *queues) q->forget_messages();
  ledger_.clear();
  next_batch_ = 0;
  host_wait_ms_ = 0;
  // Op timings: from here to the end of the epoch (after the origins, which come first on every
  // stream), read tick by tick as the streams finish them, so few events are held at once. Each
  // op on a module's stream counts from that module's origin (the stages'); ops on other streams
  // (none today) are left out.
  std::unique_ptr<OpProfile> op_profile = trace_ops_ ? std::make_unique<OpProfile>() : nullptr;
  std::map<const Stream*, int> module_of;
  for (auto& st : stages_) module_of[st->stream.get()] = st->index;
  auto read_ops = [&](bool completed_only) {
    if (!op_profile) return;
    const auto origin_of = [&](const Stream* s) -> Event* {
      const auto it = module_of.find(s);
      return it == module_of.end() ? nullptr : origin[size_t(it->second)];
    };
    for (const OpSpan& span : op_profile->collect_spans(origin_of, completed_only))
      stats.ops.push_back({module_of.at(span.stream), span.op, span.shapes, span.start_ms, span.duration_ms});
  };
  const auto wall_start = std::chrono::steady_clock::now();
  // Activation memory held for batches in flight, measured where it peaks within a tick: after
  // the forwards, and with --recompute also after the backwards, adding what they rebuilt
  // (`extra`), and the last module's (last_module_saved_bytes_). The weight stashes of the
  // batches in flight beside it.
  auto measure_saved = [&](size_t extra) {
    std::set<const void*> seen;
    size_t saved = extra + last_module_saved_bytes_, stashed = 0;
    for (auto& st : stages_)
      for (const InFlight& f : st->inflight) {
        for (const Context& c : f.contexts) saved += c.saved_bytes(&seen);
        if (f.input.defined() && seen.insert(f.input.raw_data()).second) saved += f.input.nbytes();
        for (const Tensor& w : f.stash) stashed += w.nbytes();
      }
    stats.peak_saved_bytes = std::max(stats.peak_saved_bytes, saved);
    stats.peak_stash_bytes = std::max(stats.peak_stash_bytes, stashed);
  };
  bool source_done = false;
  int64_t last_active_tick = -1;
  for (int64_t tick = 0; !(source_done && stages_[0]->inflight.empty()); ++tick) {
    // At most two ticks of work are queued ahead of each stream.
    for (auto& st : stages_) host_wait(*st->tick_end[tick % 2]);
    for (auto& st : stages_) st->read_timings(tick - 2, *origin[size_t(st->index)], stats);  // ended by that record
    read_ops(true);
    const size_t events_before = ledger_.size();
    tick_rebuilt_bytes_ = 0;
    if (cfg_.method == PipelineMethod::FDG) {
      for (int k = 0; k + 1 < K; ++k) backward_phase(k, tick, lr);
      if (cfg_.recompute) measure_saved(tick_rebuilt_bytes_);
      for (int k = 0; k < K; ++k) forward_phase(k, tick, source, source_done, lr);
      measure_saved(0);
    } else {
      for (int k = 0; k < K; ++k) forward_phase(k, tick, source, source_done, lr);
      measure_saved(0);
      for (int k = K - 2; k >= 0; --k) backward_phase(k, tick, lr);
      if (cfg_.recompute) measure_saved(tick_rebuilt_bytes_);
    }
    for (auto& st : stages_) st->stream->record(*st->tick_end[tick % 2]);
    if (ledger_.size() > events_before) last_active_tick = tick;
  }
  stats.ticks = last_active_tick + 1;
  stats.host_wait_ms = host_wait_ms_;

  // Read back the losses and the stage timings.
  Stage& last = *stages_.back();
  stats.train = collect_losses(*last.stream, last.pending);
  for (auto& st : stages_) st->stream->synchronize();
  stats.wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - wall_start).count();
  for (auto& st : stages_) {
    st->read_timings(std::numeric_limits<int64_t>::max(), *origin[size_t(st->index)], stats);
    st->pending.clear();
    stats.timing_events_made += st->timing_events_made;
  }
  read_ops(false);
  std::stable_sort(stats.ops.begin(), stats.ops.end(),
                   [](const OpTiming& a, const OpTiming& b) { return a.start_ms < b.start_ms; });
  return stats;
}

StepStats PipelineTrainer::evaluate(const BatchSource& source) {
  net_.set_training(false);
  // One stream for all modules when they share a device; otherwise each module's stream, the
  // hand-overs ordered by events: the receiver waits for the activation, and the sender waits
  // for the receiver's copy before its later work, which may reuse the activation's memory.
  const bool one_device = on_one_device();
  Stage& first = *stages_[0];
  Stage& last = *stages_.back();
  std::vector<PendingLoss> pending;
  std::vector<Context> scratch(net_.size());
  Tensor xs, ys;
  for (int64_t batch = 0;; ++batch) {
    first.input_copied[batch % 2]->synchronize();  // the source may reuse the views of two batches back
    if (!source(&xs, &ys)) break;
    Stream* s = first.stream.get();
    Tensor h = network_input(*s, xs, cfg_.activation_dtype), labels = new_activation(*s, ys.shape(), DType::I32);
    ops::copy(*s, ys, labels);
    s->record(*first.input_copied[batch % 2]);
    for (auto& st : stages_) {
      if (!one_device && st->index > 0) {
        Stream& from = *s;
        Stage& prev = *stages_[size_t(st->index) - 1];
        from.record(*prev.eval_handed);
        s = st->stream.get();
        s->wait(*prev.eval_handed);
        Tensor moved = new_activation(*s, h.shape(), h.dtype());
        Tensor moved_labels = new_activation(*s, labels.shape(), DType::I32);
        ops::copy(*s, h, moved);
        ops::copy(*s, labels, moved_labels);
        s->record(*st->eval_received);
        // h and labels go back to from's pool below: its later work, which may reuse their
        // blocks, waits for the copies. (Queued CPU copies hold no tensors either: without
        // this wait ModulesOnSeparateDevicesChangeNoBit fails whenever the jitter delays the
        // receiver's copy past module 1's reuse, as it did in each of three tries.)
        from.wait(*st->eval_received);
        h = moved, labels = moved_labels;
      }
      for (size_t b = st->first; b < st->last; ++b) h = net_.block(b).forward(*s, h, scratch[b]);
    }
    PendingLoss pl{new_activation(*s, {1}), new_activation(*s, {1}, DType::I32), h.size(0)};
    Tensor dlogits = new_activation(*s, h.shape(), h.dtype());
    ops::softmax_cross_entropy(*s, h, labels, 0.f, pl.loss, dlogits, pl.correct);
    pending.push_back(pl);
  }
  StepStats st = collect_losses(one_device ? *first.stream : *last.stream, pending);
  net_.set_training(true);
  return st;
}

bool PipelineTrainer::on_one_device() const {
  for (auto& st : stages_)
    if (st->device != stages_[0]->device) return false;
  return true;
}

void PipelineTrainer::set_steps(int64_t steps) {
  for (auto& st : stages_) st->steps = steps;
}

std::vector<size_t> balanced_cuts(const std::vector<double>& block_cost, int k) {
  const size_t n = block_cost.size();
  SP_CHECK(k >= 1 && size_t(k) <= n, "cannot cut ", n, " blocks into ", k, " modules");
  // Greedy on prefix sums: cut i goes where the running cost first reaches i/k of the total,
  // keeping at least one block per module.
  const double total = std::accumulate(block_cost.begin(), block_cost.end(), 0.0);
  std::vector<size_t> cuts;
  double run = 0;
  for (size_t b = 0; b < n && int(cuts.size()) < k - 1; ++b) {
    run += block_cost[b];
    const size_t next = cuts.size() + 1;
    const size_t remaining_blocks = n - (b + 1), remaining_cuts = size_t(k - 1) - cuts.size();
    if ((run >= total * double(next) / k && b + 1 < n) || remaining_blocks == remaining_cuts)
      if (cuts.empty() || b + 1 > cuts.back()) cuts.push_back(b + 1);
  }
  return cuts;
}

}  // namespace sp
