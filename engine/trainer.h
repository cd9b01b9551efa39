// Standard backpropagation (the locked baseline): forward through every block, loss, backward
// through every block in reverse, one optimizer step; all on one stream.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/network.h"
#include "engine/optimizer.h"

namespace sp {

struct StepStats {
  double loss_sum = 0;  // sum over batches of (mean batch loss * batch size)
  int64_t correct = 0;
  int64_t samples = 0;
  double mean_loss() const { return samples ? loss_sum / double(samples) : 0.0; }
  double accuracy() const { return samples ? double(correct) / double(samples) : 0.0; }
  StepStats& operator+=(const StepStats& o) {
    loss_sum += o.loss_sum, correct += o.correct, samples += o.samples;
    return *this;
  }
};

// The loss and hit count of one batch, still on the device where the loss was computed.
struct PendingLoss {
  Tensor loss, correct;  // f32 [1] (batch mean), i32 [1]
  int64_t samples;
};

// Copies the pending results to the host (copies issued on s, which must be able to read
// them), waits for s, and sums them up. `pending` is left empty.
StepStats collect_losses(Stream& s, std::vector<PendingLoss>& pending);

// x (f32, on any device) as the network's input on s's device, in the activation dtype:
// f32, or bf16 for mixed precision (rounded to nearest even).
Tensor network_input(Stream& s, const Tensor& x, DType activation_dtype);

class BackpropTrainer {
 public:
  // activation_dtype: F32, or BF16 for mixed precision (bf16 activations and gradients, bf16
  // weight copies, fp32 master weights, statistics and reductions).
  BackpropTrainer(Network& net, Sgd& opt, Stream& s, float label_smoothing, DType activation_dtype = DType::F32);

  // Enqueues one training step on the batch (x f32 [B,H,W,C], labels i32 [B], on the host or
  // on the stream's device). Statistics are read back by drain_stats(). The host stays at most
  // two steps (training or eval) ahead of the stream: it waits for the end of the step before
  // the previous one, so that the work queued (and the time an interrupt or a host read waits
  // for it) stays bounded. Inputs are double-buffered: on return the step before this one has
  // copied its inputs, so the caller may reuse their memory (a loader holds two batches, as
  // data::BatchLoader does), while this step's copy may still be queued.
  void train_step(const Tensor& x, const Tensor& labels, float lr);
  // Enqueues an eval-mode forward and loss on the batch (inputs as train_step's).
  void eval_step(const Tensor& x, const Tensor& labels);
  // Waits for the enqueued steps and returns their statistics since the last call.
  StepStats drain_stats();

 private:
  // A copy of t on the stream's device, owned by the step (inputs may live in reused buffers).
  Tensor input_copy(const Tensor& t);
  // Forward through all blocks (contexts filled in training mode), then loss and dlogits.
  Tensor forward_loss(const Tensor& x, const Tensor& labels, bool training);

  Network& net_;
  Sgd& opt_;
  Stream& s_;
  float smoothing_;
  DType dtype_;
  std::vector<Context> contexts_;
  std::vector<PendingLoss> pending_;
  std::unique_ptr<Event> input_consumed_[2];  // the last two steps' input copies, by step parity
  std::unique_ptr<Event> step_end_[2];  // the last two steps' ends
  int64_t steps_ = 0;                   // steps enqueued
  void begin_step() { step_end_[steps_ % 2]->synchronize(); }
  // Records the step's end, then waits for the previous step's input copy (see train_step).
  void end_step() {
    s_.record(*step_end_[steps_++ % 2]);
    input_consumed_[steps_ % 2]->synchronize();
  }
};

}  // namespace sp
