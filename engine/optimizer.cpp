#include "engine/optimizer.h"

#include "engine/ops.h"
#include "kernels/common/error.h"

namespace sp {

Sgd::Sgd(std::vector<std::pair<std::string, Parameter*>> params, const SgdConfig& config, Stream& s)
    : config_(config), params_(std::move(params)) {
  // As PyTorch's SGD: Nesterov's look-ahead is along the momentum, so it needs one.
  SP_CHECK(!config.nesterov || config.momentum > 0, "SGD: Nesterov momentum needs a momentum > 0, got ",
           config.momentum);
  for (auto& [name, p] : params_) {
    Tensor m = Tensor::empty(p->value.shape(), DType::F32, p->value.device());
    ops::fill(s, m, 0.f);
    momenta_.emplace_back(name, m);
  }
}

void Sgd::step(Stream& s, float lr, float grad_scale) { step(s, lr, Tensor(), grad_scale); }

void Sgd::step(Stream& s, const Tensor& lr, float grad_scale) { step(s, 0.f, lr, grad_scale); }

void Sgd::step(Stream& s, float lr, const Tensor& lr_device, float grad_scale) {
  // Two groups: parameters with and without weight decay.
  for (bool decay : {true, false}) {
    std::vector<Tensor> values, grads, moms, copies;
    std::vector<Parameter*> copied;
    for (size_t i = 0; i < params_.size(); ++i) {
      Parameter* param = params_[i].second;
      if (param->decay != decay) continue;
      values.push_back(param->value);
      grads.push_back(param->grad);
      moms.push_back(momenta_[i].second);
      // The bf16 weight copy, where a layer has asked for one (Parameter::bf16), is rewritten
      // from the updated value in the same launch (allocated at the first step that can: not
      // while the stream captures a graph, whose memory comes from its arena).
      if (param->bf16_wanted && !param->bf16.defined() && !s.capturing())
        param->bf16 = Tensor::empty(param->value.shape(), DType::BF16, param->value.device());
      copies.push_back(param->bf16);
      if (param->bf16.defined()) copied.push_back(param);
    }
    if (values.empty()) continue;
    kernels::SgdParams p;
    p.lr = lr;
    p.momentum = config_.momentum;
    p.weight_decay = decay ? config_.weight_decay : 0.f;
    p.nesterov = config_.nesterov;
    p.grad_scale = grad_scale;
    ops::sgd_step(s, values, grads, moms, p, lr_device, copies);
    for (Parameter* param : copied) param->bf16_current = true;
  }
}

}  // namespace sp
