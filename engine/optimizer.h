// SGD with momentum, Nesterov and weight decay over a list of parameters, updated with one
// multi-tensor op call per weight-decay group (see kernels::SgdParams for the formula).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "engine/module.h"
#include "kernels/common/shapes.h"

namespace sp {

struct SgdConfig {
  float momentum = 0.9f;
  float weight_decay = 5e-4f;
  bool nesterov = false;
};

class Sgd {
 public:
  // Momentum buffers are created zeroed on each parameter's device (zeroing enqueued on s).
  Sgd(std::vector<std::pair<std::string, Parameter*>> params, const SgdConfig& config, Stream& s);
  // p -= lr * update(grad * grad_scale); grad_scale can fold in the 1/N of data-parallel
  // averaging (PipelineConfig::grad_scale). FDG's shrink factor is not applied here: the
  // pipeline scales the gradient a module receives (its dy) instead.
  void step(Stream& s, float lr, float grad_scale = 1.f);
  // The same, reading the learning rate from a one-element f32 tensor on the stream's device
  // as the update runs (for graph replays; see ops::sgd_step).
  void step(Stream& s, const Tensor& lr, float grad_scale = 1.f);
  // Named momentum buffers (for checkpoints): "<param name>".
  const std::vector<std::pair<std::string, Tensor>>& momentum_buffers() const { return momenta_; }
  const SgdConfig& config() const { return config_; }

 private:
  void step(Stream& s, float lr, const Tensor& lr_device, float grad_scale);
  SgdConfig config_;
  std::vector<std::pair<std::string, Parameter*>> params_;
  std::vector<std::pair<std::string, Tensor>> momenta_;
};

}  // namespace sp
