#include "engine/trainer.h"

#include "engine/ops.h"
#include "kernels/common/error.h"

namespace sp {

Tensor network_input(Stream& s, const Tensor& x, DType activation_dtype) {
  SP_CHECK(activation_dtype == DType::F32 || activation_dtype == DType::BF16,
           "activations must be f32 or bf16, got ", dtype_name(activation_dtype));
  Tensor d = new_activation(s, x.shape(), x.dtype());
  ops::copy(s, x, d);
  if (activation_dtype == x.dtype()) return d;
  Tensor r = new_activation(s, x.shape(), activation_dtype);
  ops::cast(s, d, r);
  return r;
}

BackpropTrainer::BackpropTrainer(Network& net, Sgd& opt, Stream& s, float label_smoothing, DType activation_dtype)
    : net_(net),
      opt_(opt),
      s_(s),
      smoothing_(label_smoothing),
      dtype_(activation_dtype),
      contexts_(net.size()),
      input_consumed_{make_event(s.device()), make_event(s.device())},
      step_end_{make_event(s.device()), make_event(s.device())} {}

Tensor BackpropTrainer::input_copy(const Tensor& t) {
  Tensor d = new_activation(s_, t.shape(), t.dtype());
  ops::copy(s_, t, d);
  return d;
}

Tensor BackpropTrainer::forward_loss(const Tensor& x, const Tensor& labels, bool training) {
  net_.set_training(training);
  Tensor h = network_input(s_, x, dtype_), y = input_copy(labels);
  s_.record(*input_consumed_[steps_ % 2]);
  for (size_t i = 0; i < net_.size(); ++i) h = net_.block(i).forward(s_, h, contexts_[i]);
  SP_CHECK(h.dim() == 2, "the network must end in [N, classes] logits, got ", h.str());
  PendingLoss p{new_activation(s_, {1}), new_activation(s_, {1}, DType::I32), h.size(0)};
  Tensor dlogits = new_activation(s_, h.shape(), h.dtype());
  // Label smoothing is part of the training objective only: an evaluation reports the plain
  // cross-entropy, as PipelineTrainer::evaluate and `staleprop eval` do.
  ops::softmax_cross_entropy(s_, h, y, training ? smoothing_ : 0.f, p.loss, dlogits, p.correct);
  pending_.push_back(p);
  return dlogits;
}

void BackpropTrainer::train_step(const Tensor& x, const Tensor& labels, float lr) {
  begin_step();
  Tensor g = forward_loss(x, labels, true);
  for (size_t i = net_.size(); i-- > 0;) g = net_.block(i).backward(s_, g, contexts_[i], i > 0);
  for (Context& c : contexts_) c.clear();
  opt_.step(s_, lr);
  end_step();
}

void BackpropTrainer::eval_step(const Tensor& x, const Tensor& labels) {
  begin_step();
  forward_loss(x, labels, false);
  for (Context& c : contexts_) c.clear();
  end_step();
}

StepStats BackpropTrainer::drain_stats() { return collect_losses(s_, pending_); }

StepStats collect_losses(Stream& s, std::vector<PendingLoss>& pending) {
  std::vector<std::pair<Tensor, Tensor>> host;
  for (const PendingLoss& p : pending) {
    Tensor l = p.loss, c = p.correct;
    if (!l.device().is_cpu()) {
      l = Tensor::empty({1}, DType::F32);
      c = Tensor::empty({1}, DType::I32);
      ops::copy(s, p.loss, l);
      ops::copy(s, p.correct, c);
    }
    host.emplace_back(l, c);
  }
  s.synchronize();
  StepStats st;
  for (size_t i = 0; i < pending.size(); ++i) {
    st.loss_sum += double(host[i].first.at<float>(0)) * double(pending[i].samples);
    st.correct += host[i].second.at<int32_t>(0);
    st.samples += pending[i].samples;
  }
  pending.clear();
  return st;
}

}  // namespace sp
