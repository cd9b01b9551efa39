#include "layers/layers.h"

#include <cmath>

#include "engine/ops.h"
#include "kernels/common/error.h"

namespace sp::layers {
namespace {

Parameter make_param(const Shape& shape, ParamLayout layout = ParamLayout::Same) {
  Parameter p;
  p.value = Tensor::empty(shape, DType::F32);
  p.grad = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < p.grad.numel(); ++i) p.grad.at<float>(i) = 0.f;
  p.layout = layout;
  return p;
}

void fill_constant(Tensor& t, float v) {
  for (int64_t i = 0; i < t.numel(); ++i) t.at<float>(i) = v;
}

// Kaiming normal with fan-in (He et al. 2015): std = sqrt(2 / fan_in).
void kaiming_normal(Tensor& t, int64_t fan_in, Rng& rng) {
  std::normal_distribution<float> n(0.f, std::sqrt(2.f / float(fan_in)));
  for (int64_t i = 0; i < t.numel(); ++i) t.at<float>(i) = n(rng);
}

}  // namespace

// ---- Conv2d ---------------------------------------------------------------------------------

Conv2d::Conv2d(int in_channels, int out_channels, int kernel, int stride, int pad, bool with_bias, Rng& rng)
    : stride(stride), pad(pad) {
  weight = make_param({out_channels, kernel, kernel, in_channels}, ParamLayout::KRSC);
  kaiming_normal(weight.value, int64_t(in_channels) * kernel * kernel, rng);
  if (with_bias) {
    bias = make_param({out_channels});
    fill_constant(bias.value, 0.f);
  }
}

Tensor Conv2d::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  Tensor y = new_activation(s, ops::conv2d_output_shape(x.shape(), weight.value.shape(), stride, pad));
  ops::conv2d_forward(s, x, weight.value, bias.value, y, stride, pad);
  if (training_) ctx.saved = {x};
  return y;
}

Tensor Conv2d::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.saved.size() == 1, "Conv2d::backward without a training-mode forward");
  const Tensor& x = ctx.saved[0];
  ops::conv2d_backward_weight(s, x, dy, weight.grad, bias.grad, stride, pad);
  Tensor dx;
  if (need_dx) {
    dx = new_activation(s, x.shape());
    ops::conv2d_backward_data(s, dy, weight.value, dx, stride, pad);
  }
  return dx;
}

void Conv2d::collect(const std::string& prefix, ModuleState& st) {
  st.params.emplace_back(join_name(prefix, "weight"), &weight);
  if (bias.value.defined()) st.params.emplace_back(join_name(prefix, "bias"), &bias);
}

// ---- BatchNorm2d ----------------------------------------------------------------------------

BatchNorm2d::BatchNorm2d(int channels, float eps, float momentum) : eps(eps), momentum(momentum) {
  gamma = make_param({channels});
  beta = make_param({channels});
  fill_constant(gamma.value, 1.f);
  fill_constant(beta.value, 0.f);
  running_mean = Tensor::empty({channels}, DType::F32);
  running_var = Tensor::empty({channels}, DType::F32);
  fill_constant(running_mean, 0.f);
  fill_constant(running_var, 1.f);
}

Tensor BatchNorm2d::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  Tensor y = new_activation(s, x.shape());
  if (!training_) {
    ops::batchnorm_forward_inference(s, x, gamma.value, beta.value, running_mean, running_var, y, eps);
    return y;
  }
  const Shape c = {x.size(3)};
  Tensor mean = new_activation(s, c), invstd = new_activation(s, c);
  ops::batchnorm_forward_training(s, x, gamma.value, beta.value, running_mean, running_var, y, mean, invstd, eps,
                                  momentum);
  ++num_batches_tracked;
  ctx.saved = {x, mean, invstd};
  return y;
}

Tensor BatchNorm2d::backward(Stream& s, const Tensor& dy, Context& ctx, bool /*need_dx*/) {
  SP_CHECK(ctx.saved.size() == 3, "BatchNorm2d::backward without a training-mode forward");
  // dx comes out of the same pass as dgamma/dbeta, so it is always computed.
  Tensor dx = new_activation(s, dy.shape());
  ops::batchnorm_backward(s, ctx.saved[0], dy, gamma.value, ctx.saved[1], ctx.saved[2], dx, gamma.grad, beta.grad);
  return dx;
}

void BatchNorm2d::collect(const std::string& prefix, ModuleState& st) {
  st.params.emplace_back(join_name(prefix, "weight"), &gamma);
  st.params.emplace_back(join_name(prefix, "bias"), &beta);
  st.buffers.emplace_back(join_name(prefix, "running_mean"), &running_mean);
  st.buffers.emplace_back(join_name(prefix, "running_var"), &running_var);
  st.counters.emplace_back(join_name(prefix, "num_batches_tracked"), &num_batches_tracked);
}

// ---- ReLU, pooling --------------------------------------------------------------------------

Tensor ReLU::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  Tensor y = new_activation(s, x.shape());
  ops::relu_forward(s, x, y);
  if (training_) ctx.saved = {y};
  return y;
}

Tensor ReLU::backward(Stream& s, const Tensor& dy, Context& ctx, bool /*need_dx*/) {
  SP_CHECK(ctx.saved.size() == 1, "ReLU::backward without a training-mode forward");
  ops::relu_backward(s, ctx.saved[0], dy, dy);  // in place: dy is consumed
  return dy;
}

Tensor MaxPool2d::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  kernels::Pool2dShape sh{int(x.size(0)), int(x.size(1)), int(x.size(2)), int(x.size(3)), window, stride, pad};
  Tensor y = new_activation(s, {sh.n, sh.p(), sh.q(), sh.c});
  ops::maxpool2d_forward(s, x, y, window, stride, pad);
  if (training_) ctx.saved = {x};
  return y;
}

Tensor MaxPool2d::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.saved.size() == 1, "MaxPool2d::backward without a training-mode forward");
  if (!need_dx) return Tensor();
  Tensor dx = new_activation(s, ctx.saved[0].shape());
  ops::maxpool2d_backward(s, ctx.saved[0], dy, dx, window, stride, pad);
  return dx;
}

Tensor GlobalAvgPool::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  Tensor y = new_activation(s, {x.size(0), x.size(3)});
  ops::global_avgpool_forward(s, x, y);
  if (training_) ctx.shape = x.shape();
  return y;
}

Tensor GlobalAvgPool::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.shape.size() == 4, "GlobalAvgPool::backward without a training-mode forward");
  if (!need_dx) return Tensor();
  Tensor dx = new_activation(s, ctx.shape);
  ops::global_avgpool_backward(s, dy, dx);
  return dx;
}

// ---- Linear ---------------------------------------------------------------------------------

Linear::Linear(int in_features, int out_features, Rng& rng) {
  weight = make_param({out_features, in_features});
  kaiming_normal(weight.value, in_features, rng);
  bias = make_param({out_features});
  fill_constant(bias.value, 0.f);
}

Tensor Linear::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  Tensor y = new_activation(s, {x.size(0), weight.value.size(0)});
  ops::linear_forward(s, x, weight.value, bias.value, y);
  if (training_) ctx.saved = {x};
  return y;
}

Tensor Linear::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.saved.size() == 1, "Linear::backward without a training-mode forward");
  Tensor dx = need_dx ? new_activation(s, ctx.saved[0].shape()) : Tensor();
  ops::linear_backward(s, ctx.saved[0], weight.value, dy, dx, weight.grad, bias.grad);
  return dx;
}

void Linear::collect(const std::string& prefix, ModuleState& st) {
  st.params.emplace_back(join_name(prefix, "weight"), &weight);
  st.params.emplace_back(join_name(prefix, "bias"), &bias);
}

// ---- Sequential -----------------------------------------------------------------------------

Sequential& Sequential::add(std::string name, std::unique_ptr<Module> m) {
  children_.emplace_back(std::move(name), std::move(m));
  return *this;
}

Tensor Sequential::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  ctx.children.resize(children_.size());
  Tensor h = x;
  for (size_t i = 0; i < children_.size(); ++i) h = children_[i].second->forward(s, h, ctx.children[i]);
  return h;
}

Tensor Sequential::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.children.size() == children_.size(), "Sequential::backward without a training-mode forward");
  Tensor g = dy;
  for (size_t i = children_.size(); i-- > 0;) g = children_[i].second->backward(s, g, ctx.children[i], i > 0 || need_dx);
  return g;
}

void Sequential::collect(const std::string& prefix, ModuleState& st) {
  for (auto& [name, m] : children_) m->collect(join_name(prefix, name), st);
}

void Sequential::set_training(bool training) {
  Module::set_training(training);
  for (auto& [name, m] : children_) m->set_training(training);
}

// ---- Residual blocks ------------------------------------------------------------------------

void ResidualBlock::make_shortcut(int in_channels, int out_channels, int stride, Shortcut shortcut, Rng& rng) {
  stride_ = stride;
  out_channels_ = out_channels;
  if (stride == 1 && in_channels == out_channels) return;  // identity
  if (shortcut == Shortcut::A) {
    SP_CHECK(out_channels >= in_channels, "option-A shortcut cannot reduce channels (", in_channels, " -> ",
             out_channels, ")");
    option_a_ = true;
    return;
  }
  proj_ = std::make_unique<Sequential>();
  proj_->add("0", std::make_unique<Conv2d>(in_channels, out_channels, 1, stride, 0, false, rng));
  proj_->add("1", std::make_unique<BatchNorm2d>(out_channels));
}

Tensor ResidualBlock::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  ctx.children.resize(2);
  Tensor y = main_.forward(s, x, ctx.children[0]);  // ends in BN, whose output nothing saves
  if (proj_) {
    ops::add(s, y, proj_->forward(s, x, ctx.children[1]), y);
  } else if (option_a_) {
    Tensor sc = new_activation(s, y.shape());
    ops::shortcut_a_forward(s, x, sc, stride_);
    ops::add(s, y, sc, y);
    ctx.shape = x.shape();
  } else {
    ops::add(s, y, x, y);
  }
  ops::relu_forward(s, y, y);
  if (training_) ctx.saved = {y};
  return y;
}

Tensor ResidualBlock::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.saved.size() == 1 && ctx.children.size() == 2,
           "residual block backward without a training-mode forward");
  ops::relu_backward(s, ctx.saved[0], dy, dy);  // dy now holds the gradient of the sum
  // Both branches read dy without modifying it (each begins its reverse pass with a BN).
  Tensor dx = main_.backward(s, dy, ctx.children[0], need_dx);
  if (proj_) {
    Tensor dsc = proj_->backward(s, dy, ctx.children[1], need_dx);
    if (need_dx) ops::add(s, dx, dsc, dx);
  } else if (need_dx && option_a_) {
    Tensor dsc = new_activation(s, ctx.shape);
    ops::shortcut_a_backward(s, dy, dsc, stride_);
    ops::add(s, dx, dsc, dx);
  } else if (need_dx) {
    ops::add(s, dx, dy, dx);
  }
  return dx;
}

void ResidualBlock::collect(const std::string& prefix, ModuleState& st) {
  main_.collect(prefix, st);
  if (proj_) proj_->collect(join_name(prefix, "shortcut"), st);
}

void ResidualBlock::set_training(bool training) {
  Module::set_training(training);
  main_.set_training(training);
  if (proj_) proj_->set_training(training);
}

BasicBlock::BasicBlock(int in_channels, int out_channels, int stride, Shortcut shortcut, Rng& rng) {
  main_.add("conv1", std::make_unique<Conv2d>(in_channels, out_channels, 3, stride, 1, false, rng));
  main_.add("bn1", std::make_unique<BatchNorm2d>(out_channels));
  main_.add("relu1", std::make_unique<ReLU>());
  main_.add("conv2", std::make_unique<Conv2d>(out_channels, out_channels, 3, 1, 1, false, rng));
  main_.add("bn2", std::make_unique<BatchNorm2d>(out_channels));
  make_shortcut(in_channels, out_channels, stride, shortcut, rng);
}

Bottleneck::Bottleneck(int in_channels, int mid_channels, int stride, Rng& rng) {
  const int out_channels = mid_channels * kExpansion;
  main_.add("conv1", std::make_unique<Conv2d>(in_channels, mid_channels, 1, 1, 0, false, rng));
  main_.add("bn1", std::make_unique<BatchNorm2d>(mid_channels));
  main_.add("relu1", std::make_unique<ReLU>());
  main_.add("conv2", std::make_unique<Conv2d>(mid_channels, mid_channels, 3, stride, 1, false, rng));
  main_.add("bn2", std::make_unique<BatchNorm2d>(mid_channels));
  main_.add("relu2", std::make_unique<ReLU>());
  main_.add("conv3", std::make_unique<Conv2d>(mid_channels, out_channels, 1, 1, 0, false, rng));
  main_.add("bn3", std::make_unique<BatchNorm2d>(out_channels));
  make_shortcut(in_channels, out_channels, stride, Shortcut::B, rng);
}

}  // namespace sp::layers
