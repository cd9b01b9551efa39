#include "engine/optimizer.h"

#include "engine/ops.h"

namespace sp {

Sgd::Sgd(std::vector<std::pair<std::string, Parameter*>> params, const SgdConfig& config, Stream& s)
    : config_(config), params_(std::move(params)) {
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
    std::vector<Tensor> values, grads, moms;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (params_[i].second->decay != decay) continue;
      values.push_back(params_[i].second->value);
      grads.push_back(params_[i].second->grad);
      moms.push_back(momenta_[i].second);
    }
    if (values.empty()) continue;
    kernels::SgdParams p;
    p.lr = lr;
    p.momentum = config_.momentum;
    p.weight_decay = decay ? config_.weight_decay : 0.f;
    p.nesterov = config_.nesterov;
    p.grad_scale = grad_scale;
    ops::sgd_step(s, values, grads, moms, p, lr_device);
  }
}

}  // namespace sp
