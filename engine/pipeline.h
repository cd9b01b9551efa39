// Decoupled pipeline training: the network cut into K modules that all work every tick.
//
// Methods (d_k: how many ticks module k's backward of a batch trails its forward, k = 1..K):
//   bp   the locked baseline: each tick forwards one batch through all modules, then
//        back-propagates it through all of them (d_k = 0)
//   ddg  forward-locked (Huo et al. 2018): the forward of a batch still runs through all
//        modules in one tick, but module k back-propagates with the gradient module k+1 sent
//        the tick before (d_k = K - k)
//   fdg  fully decoupled (Zhuang et al., arXiv 1906.09108): activations and gradients both
//        move one module per tick, so every module works on a different batch at once
//        (d_k = 2(K - k))
// Every tick, module k (k < K): backward of its oldest batch in flight with the gradient just
// received from module k+1 multiplied by the shrink factor beta, then its optimizer step, then
// the forward of the activation just received (ddg and bp: forward first). Module K forwards,
// computes the loss and back-propagates the same batch at once, then steps. A module's
// optimizer uses the learning rate of its own step count, so every module sees the schedule
// in the same order of batches.
//
// Between modules k and k+1: a double-buffered activation queue (k -> k+1, with the labels)
// and a gradient queue (k+1 -> k). Each slot has a ready event (recorded by the producer after
// writing) and a free event (recorded by the consumer after copying out), so the producer
// writes tick t while the consumer reads tick t-1. Each module runs on its own stream (and
// device, if several are given). Only the engine's Stream/Event API is used: the same code
// runs on CUDA streams and on the CPU emulation.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/network.h"
#include "engine/optimizer.h"
#include "engine/stream.h"
#include "engine/trainer.h"

namespace sp {

enum class PipelineMethod { BP, DDG, FDG };
PipelineMethod parse_pipeline_method(const std::string& s);  // bp | ddg | fdg
const char* pipeline_method_name(PipelineMethod m);

struct PipelineConfig {
  PipelineMethod method = PipelineMethod::FDG;
  std::vector<size_t> cuts;     // first block of modules 2..K (ascending); empty: K = 1
  std::vector<Device> devices;  // one per module, or one for all; empty: the network's device.
                                // All the CPU or all GPUs: their streams exchange events.
  float shrink = 1.f;           // beta, applied to the gradient each module k < K receives
  float label_smoothing = 0.f;
  SgdConfig sgd;
  StreamOptions stream_options;  // CPU emulation: injected jitter
  // Stochastic staleness: each gradient a module k < K receives becomes due a further 0..J
  // ticks (uniform, seeded) after it arrives. Gradients stay in order, one backward per tick
  // (a module sends at most one gradient down per tick), so a gradient also waits for the one
  // before it: in a steady stream a module's extra delay settles at the largest drawn so far
  // (J, soon) until the epoch drains, and each module adds its own to what reaches the ones
  // below: module k's backward comes at most (K-1-k)*J ticks (0-based k) after its delay d_k.
  int staleness_jitter = 0;
  uint64_t jitter_seed = 0;
  // Keep only each in-flight batch's module input and rebuild the saved activations by a
  // second forward just before the backward (with the weights of that moment, or the stashed
  // ones with weight_stash); BN running statistics are not updated twice.
  bool recompute = false;
  // PipeDream-style: back-propagate each batch through the weights its forward used.
  bool weight_stash = false;
  // F32, or BF16 for mixed precision: bf16 activations and gradients (also in the queues),
  // bf16 weight copies, fp32 master weights.
  DType activation_dtype = DType::F32;
  // Data parallelism's insertion point. Called on the host each time module `module`'s backward
  // of a batch has been enqueued on its stream `s`, before its optimizer step is: the work it
  // enqueues on `s` (e.g. an allreduce of `params`' gradients across the module's replicas)
  // runs after the backward has written every gradient and before the step reads them. In a
  // unit captured into a graph (`graphs`) it is called at the capture, and its work replays with
  // the unit; host-side effects of its own happen only when it is called. Its work is timed as
  // part of the module's "step" stage. For capture, work it puts on another stream must fork
  // from `s` and join back through events, and what it allocates (from the unit's arena) must
  // be the same at every call. BN running statistics are buffers, not parameters: not given.
  // (Plain backprop without modules, BackpropTrainer, has no such point.)
  std::function<void(int module, Stream& s, const std::vector<Parameter*>& params)> before_step;
  // Each module's gradients are multiplied by this in its optimizer step (folded into the
  // update: e.g. the 1/N of averaging over N replicas whose gradients before_step sums).
  float grad_scale = 1.f;
  // Launch overhead: replay each module's steady-state work from graphs (CUDA graphs on a GPU)
  // instead of enqueueing it op by op. See "Graphs" below. Not with staleness_jitter,
  // recompute or weight_stash, whose work changes from tick to tick.
  bool graphs = false;
  // With graphs: plan each arena's memory from recorded lifetimes (Arena::Policy::Planned), so
  // a captured unit holds about what its eager run holds; false: bump arenas, which keep every
  // tensor of a unit until the unit comes round again.
  bool plan_graph_memory = true;
};

// Graphs. A module's work in a tick is two units: its forward (module K: forward, loss,
// backward and step) and its backward with the optimizer step (modules k < K). Each unit is
// captured once per phase, tick mod P_k, and replayed at every later tick of that phase, so a
// replay always finds the queue slots of its tick's parity and the saved activations of the
// batch it back-propagates at the addresses the capture used. P_k is even (the slots' parity)
// and at least the number of batches in flight when module k forwards: d_k + 1 for ddg and bp,
// which forward first in a tick; d_k for fdg, which back-propagates batch t - d_k before it
// forwards batch t (and 1 for d_k = 0); a single module, without queues, has P = 1.
//   * every forward unit of phase j allocates from its own arena (Arena, allocator.h; with
//     d_k = 0 both phases share one, as each batch's backward follows its forward in the same
//     tick), reset at the unit's start, so its tensors (the saved activations among them) sit
//     at the same addresses in eager runs, the capture and every replay, and live until the
//     same phase comes round again, after their backward (at most d_k ticks later, before the
//     forward in fdg's tick, which may then take the arena back);
//   * every backward unit allocates from one per-module arena, reset at the unit's start;
//   * the arenas are Planned (plan_graph_memory): a unit's first runs record its allocations
//     and their lifetimes, and once two runs agree the arena lays them out in one block,
//     reusing the bytes of tensors the unit has let go. A unit is captured only once its arena
//     is settled, and a backward only when the batch it reads was forwarded by a graph, so
//     every replay finds the saved activations where the capture found them. Partial batches
//     use no arena;
//   * the learning rate is written into a device scalar before each unit (outside the graph)
//     and read by the optimizer kernel; module 1's input is staged into its arena before the
//     launch; module K's loss is copied out after it; queue events become event nodes;
//   * the host keeps its bookkeeping (ledger, batches in flight, queue slots, step counts,
//     BN batch counters) as if it had enqueued the work itself.
// A unit runs eagerly while its module warms up (at least its first P_k steady runs: lazily
// built kernel state exists before any capture; a phase is captured only after it ran once and
// its arena settled, which a Planned arena does once two consecutive recorded runs agree) and
// whenever its batch is not of the full size (the epoch's last, partial batch); fill and drain
// replay like any other tick. On CUDA, the scratch some kernels take from cudaMallocAsync inside
// a captured unit becomes graph-owned memory (CUDA's graph memory pool), which the allocator
// statistics and arena_bytes do not count.

struct PipelineGraphStats {
  int64_t captured = 0;  // graphs captured so far (all modules, all phases)
  int64_t replays = 0;   // units replayed from a graph
  int64_t eager = 0;     // units enqueued op by op
  size_t arena_bytes = 0;       // memory the arenas hold now (a recording arena holds none)
  size_t arena_peak_used = 0;   // sum over the arenas of the most each handed out between resets
  int arenas = 0;               // forward arenas (one per module and phase; one for both phases where d_k = 0),
                                // modules 1..K-1's backward ones
  int planned_arenas = 0;       // ... of which laid out from a settled plan
};

// What a tick did, for tests and for traces: module m (0-based) forwarded or back-propagated
// batch b (0-based, in source order) at tick t.
struct PipelineEvent {
  int64_t tick;
  int module;
  int64_t batch;
  bool backward;
};

struct StageTiming {
  int module;
  int64_t tick, batch;
  // "fwd", "bwd" (module K: "fwd+loss+bwd"), and "step", the optimizer step after a backward;
  // in a captured or replayed unit (--graphs) the step stays inside "bwd" / "fwd+loss+bwd".
  std::string stage;
  // start_ms counts from the epoch start of the first module on the stage's device.
  double start_ms, duration_ms;
};

// One op of a module's stream (PipelineTrainer::set_trace_ops), timed with events on that stream;
// start_ms counts from the same origin as the stages'.
struct OpTiming {
  int module;
  std::string op, shapes;  // e.g. "conv2d_forward", "f32 [8,16,16,16] [16,3,3,16]"
  double start_ms, duration_ms;
};

struct PipelineEpochStats {
  StepStats train;
  int64_t ticks = 0;
  double wall_ms = 0;
  // Per module: time in its stages. The wait for a message is not in it; the wait for a free
  // queue slot at a hand-over (a consumer two ticks behind) is.
  std::vector<double> busy_ms;
  // Host time blocked on the streams while it enqueued the ticks: the wait for the end of the tick
  // two back and for module 1's input copy two batches back. Near wall_ms the streams are the
  // bottleneck (the host keeps them two ticks ahead); near 0 the host is (it enqueues no faster
  // than they run). The final drain is not in it.
  double host_wait_ms = 0;
  std::vector<StageTiming> stages;
  // Most activation memory held for in-flight batches at once: their saved tensors (with
  // --recompute their stored module inputs, plus, during the backwards, the activations each
  // module rebuilt for the batch it back-propagates in that tick), and the last module's saved
  // tensors of the batch it forwards and back-propagates within the tick.
  size_t peak_saved_bytes = 0;
  // --weight-stash: most memory held at once in the in-flight batches' copies of the weights.
  size_t peak_stash_bytes = 0;
  int64_t timing_events_made = 0;  // events created to time stages (read ones are reused)
  // With set_trace_ops(true): every op the modules' streams ran, in order of start. Work
  // replayed from graphs is not seen (ops enqueued while capturing are not timed either).
  std::vector<OpTiming> ops;
};

class PipelineTrainer {
 public:
  // The source yields the next batch (images f32 [B,H,W,C], labels i32 [B]) or returns false at
  // the end of the epoch. The views must stay valid until the second following call: the copy of
  // a batch may still be queued while the next one is taken (BatchLoader::next's contract).
  using BatchSource = std::function<bool(Tensor* images, Tensor* labels)>;
  using LrAt = std::function<float(int64_t step)>;

  PipelineTrainer(Network& net, const PipelineConfig& config);
  ~PipelineTrainer();

  int num_modules() const { return int(stages_.size()); }
  int delay(int module) const;  // d_k of the 0-based module
  // The blocks [first, last) of the 0-based module.
  std::pair<size_t, size_t> blocks(int module) const;
  // Optimizer steps taken so far by the 0-based module.
  int64_t steps(int module) const;

  // Runs one epoch: fills the pipeline, feeds every batch of the source once, drains. Blocks
  // until all work is done.
  PipelineEpochStats run_epoch(const BatchSource& source, const LrAt& lr);

  // Eval-mode forward and loss over every batch of the source, module after module.
  StepStats evaluate(const BatchSource& source);

  // Sets every module's optimizer step count (resuming at an epoch boundary).
  void set_steps(int64_t steps);

  // From the next run_epoch on: time every op of the modules' streams (an OpProfile alive
  // through the epoch, so none other may be; two events per op cost host time) into
  // PipelineEpochStats::ops, for op-level timelines (staleprop train --trace-ops).
  void set_trace_ops(bool on) { trace_ops_ = on; }

  // The phases P_k of the 0-based module's captured work (with --graphs).
  int graph_period(int module) const;
  PipelineGraphStats graph_stats() const;

  // Every forward and backward of the last run_epoch (each run_epoch starts it afresh, so a
  // long run does not grow it).
  const std::vector<PipelineEvent>& ledger() const { return ledger_; }
  void clear_ledger() { ledger_.clear(); }
  // Optimizer state of every module (for checkpoints).
  std::vector<Sgd*> optimizers();

 private:
  struct Stage;
  struct Slot;
  struct Queue;
  struct Message;
  struct InFlight;
  struct Unit;
  Network& net_;
  PipelineConfig cfg_;
  std::vector<std::unique_ptr<Stage>> stages_;
  std::vector<std::unique_ptr<Queue>> act_, grad_;  // act_[k]: k -> k+1; grad_[k]: k+1 -> k
  std::vector<PipelineEvent> ledger_;
  int activation_latency_ = 1, gradient_latency_ = 1;  // ticks an activation / gradient takes per hop
  int64_t next_batch_ = 0;
  double host_wait_ms_ = 0;  // this epoch's PipelineEpochStats::host_wait_ms so far
  // --recompute: bytes of the module inputs and rebuilt activations of the batches back-propagated
  // in the current tick (every module's at once: their streams run side by side).
  size_t tick_rebuilt_bytes_ = 0;
  // Module K's saved activations of the batch it last forwarded: held only within its tick (its
  // forward, the loss and its backward), beside the other modules' batches in flight, whose
  // streams run side by side. Counted in every measurement of the activation memory.
  size_t last_module_saved_bytes_ = 0;
  bool trace_ops_ = false;
  // Blocks the host until e has completed, counting the time in host_wait_ms_.
  void host_wait(Event& e);
  PipelineGraphStats graph_stats_;

  // Producer side of a queue: waits until the consumer has copied out the slot's previous
  // message, writes this one and records the slot's ready event.
  void send(Stage& st, Queue& q, int64_t tick, int64_t batch, const Tensor& data, const Tensor& labels,
            Event* before_ready = nullptr);
  // Consumer side: if a message was written into the queue at `written_tick`, waits for it,
  // copies it into tensors of this stage, records the slot's free event and returns true.
  bool receive(Stage& st, Queue& q, int64_t written_tick, bool with_labels, Tensor* data, Tensor* labels,
               int64_t* batch);
  // The slot holding the message written into q at `written_tick`, or nullptr.
  static const Slot* incoming(const Queue& q, int64_t written_tick);
  void forward_phase(int k, int64_t tick, const BatchSource& source, bool& source_done, const LrAt& lr);
  // The forward unit's work after the input is at hand (module 1: staged; others: received).
  // `end` is recorded just before the module's output (module K: its gradient) is marked
  // ready, `step_start` before module K's optimizer step (eagerly timed units; see TimedStage).
  void enqueue_forward(int k, int64_t tick, Message& in, bool steady, const LrAt& lr, Event* end = nullptr,
                       Event* step_start = nullptr);
  void backward_phase(int k, int64_t tick, const LrAt& lr);
  bool on_one_device() const;  // every module on the first one's device
  // Back-propagates `batch` (which must be the module's oldest in flight) and steps.
  // `bwd_end` is recorded just before the input gradient is marked ready (module 1: after the
  // backward), `step_start` before the optimizer step.
  void backward_and_step(int k, int64_t tick, int64_t batch, Tensor dy, const LrAt& lr, Event* bwd_end = nullptr,
                         Event* step_start = nullptr);
  // Host bookkeeping of a replayed unit (what the enqueueing code would have recorded).
  void replayed_forward(int k, int64_t tick, int64_t batch, const Unit& u);
  void replayed_backward(int k, int64_t tick, int64_t batch, const Shape& sent);
  // The module's oldest batch in flight, checked to be `batch`; take_inflight() also removes
  // it and checks its delay.
  InFlight& oldest_inflight(int k, int64_t batch);
  // The forward arena of `phase`, checked to hold no batch still in flight.
  Arena* forward_arena(const Stage& st, size_t phase) const;
  InFlight take_inflight(int k, int64_t tick, int64_t batch);
  void drop_graphs();
  void recompute_forward(Stage& st, InFlight& f);
};

// Cut points that balance the per-block cost (e.g. FLOPs or measured time) over K modules:
// the first block of modules 2..K.
std::vector<size_t> balanced_cuts(const std::vector<double>& block_cost, int k);

}  // namespace sp
