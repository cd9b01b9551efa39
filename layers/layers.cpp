#include "layers/layers.h"

#include <atomic>
#include <cmath>
#include <string>

#include "engine/ops.h"
#include "kernels/common/error.h"
#include "kernels/common/switches.h"

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

std::atomic<int> g_bf16_weight_copies{-1}, g_dgrad_accumulates{-1};  // kernels/common/switches.h

// The weight in the activations' dtype: the fp32 master itself; or in bf16 (mixed precision:
// bf16 weight copies, fp32 master weights and gradients) the parameter's copy that the optimizer
// keeps current (Parameter::bf16), else a copy rounded on s now. A bf16 use asks for the copy
// (Parameter::bf16_wanted), which the optimizer's next step allocates and fills: a network only
// evaluated keeps none.
Tensor weight_for(Stream& s, Parameter& p, DType activation_dtype) {
  const Tensor& master = p.value;
  if (master.dtype() == activation_dtype) return master;
  if (activation_dtype == DType::BF16 && bf16_weight_copies()) {
    if (p.bf16_current && p.bf16.device() == master.device()) return p.bf16;
    p.bf16_wanted = true;
  }
  Tensor w = new_activation(s, master.shape(), activation_dtype);
  ops::cast(s, master, w);
  return w;
}

}  // namespace

void set_bf16_weight_copies(bool on) { kernels::set_switch(g_bf16_weight_copies, on); }
bool bf16_weight_copies() { return kernels::env_switch(g_bf16_weight_copies, "STALEPROP_BF16_WEIGHT_COPIES", true); }
void set_dgrad_accumulates(bool on) { kernels::set_switch(g_dgrad_accumulates, on); }
bool dgrad_accumulates() { return kernels::env_switch(g_dgrad_accumulates, "STALEPROP_DGRAD_ACCUMULATE", true); }

// ---- Conv2d ---------------------------------------------------------------------------------

Conv2d::Conv2d(int in_channels, int out_channels, int kernel, int stride, int pad, bool with_bias, Rng& rng)
    : stride(stride), pad(pad) {
  SP_CHECK(in_channels > 0 && out_channels > 0 && kernel > 0 && stride > 0 && pad >= 0, "Conv2d: channels ",
           in_channels, " -> ", out_channels, ", kernel ", kernel, ", stride ", stride, " and pad ", pad,
           ": all must be positive (pad may be 0)");
  weight = make_param({out_channels, kernel, kernel, in_channels}, ParamLayout::KRSC);
  kaiming_normal(weight.value, int64_t(in_channels) * kernel * kernel, rng);
  if (with_bias) {
    bias = make_param({out_channels});
    fill_constant(bias.value, 0.f);
  }
}

Tensor Conv2d::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  Tensor y = new_activation(s, ops::conv2d_output_shape(x.shape(), weight.value.shape(), stride, pad), x.dtype());
  ops::conv2d_forward(s, x, weight_for(s, weight, x.dtype()), bias.value, y, stride, pad);
  if (training_) ctx.saved = {x};
  return y;
}

Tensor Conv2d::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  const Tensor dx = need_dx && !ctx.saved.empty() ? new_activation(s, ctx.saved[0].shape(), dy.dtype()) : Tensor();
  backward_into(s, dy, ctx, dx, 0.f);
  return dx;
}

// The data gradient added to `into` by the op itself (beta 1): the bits of backward + add.
void Conv2d::backward_accumulate(Stream& s, const Tensor& dy, Context& ctx, const Tensor& into) {
  if (!dgrad_accumulates()) return Module::backward_accumulate(s, dy, ctx, into);
  backward_into(s, dy, ctx, into, 1.f);
}

void Conv2d::backward_into(Stream& s, const Tensor& dy, Context& ctx, const Tensor& dx, float beta) {
  SP_CHECK(ctx.saved.size() == 1, "Conv2d::backward without a training-mode forward");
  ops::conv2d_backward_weight(s, ctx.saved[0], dy, weight.grad, bias.grad, stride, pad);
  if (dx.defined()) ops::conv2d_backward_data(s, dy, weight_for(s, weight, dy.dtype()), dx, stride, pad, beta);
}

void Conv2d::collect(const std::string& prefix, ModuleState& st) {
  st.params.emplace_back(join_name(prefix, "weight"), &weight);
  if (bias.value.defined()) st.params.emplace_back(join_name(prefix, "bias"), &bias);
}

// ---- BatchNorm2d ----------------------------------------------------------------------------

BatchNorm2d::BatchNorm2d(int channels, bool fuse_relu, float eps, float momentum)
    : fuse_relu(fuse_relu), eps(eps), momentum(momentum) {
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
  return forward_impl(s, x, Tensor(), fuse_relu, ctx);
}

Tensor BatchNorm2d::forward_add_relu(Stream& s, const Tensor& x, const Tensor& residual, Context& ctx) {
  return forward_impl(s, x, residual, true, ctx);
}

// Saves {x, mean, invstd} for the plain BN and {x, mean, invstd, y} for the fused variants,
// whose backward recomputes the ReLU mask from y.
Tensor BatchNorm2d::forward_impl(Stream& s, const Tensor& x, const Tensor& residual, bool relu, Context& ctx) {
  ctx.clear();
  Tensor y = new_activation(s, x.shape(), x.dtype());
  const bool fused = relu || residual.defined();
  if (!training_) {
    if (fused)
      ops::batchnorm_add_relu_forward_inference(s, x, residual, gamma.value, beta.value, running_mean, running_var, y,
                                                eps);
    else
      ops::batchnorm_forward_inference(s, x, gamma.value, beta.value, running_mean, running_var, y, eps);
    return y;
  }
  const Shape c = {x.size(3)};
  Tensor mean = new_activation(s, c), invstd = new_activation(s, c);
  if (fused) {
    ops::batchnorm_add_relu_forward_training(s, x, residual, gamma.value, beta.value, running_mean, running_var, y,
                                             mean, invstd, eps, momentum);
    ctx.saved = {x, mean, invstd, y};
  } else {
    ops::batchnorm_forward_training(s, x, gamma.value, beta.value, running_mean, running_var, y, mean, invstd, eps,
                                    momentum);
    ctx.saved = {x, mean, invstd};
  }
  ++num_batches_tracked;
  return y;
}

Tensor BatchNorm2d::backward(Stream& s, const Tensor& dy, Context& ctx, bool /*need_dx*/) {
  SP_CHECK(ctx.saved.size() == 3 || ctx.saved.size() == 4, "BatchNorm2d::backward without a training-mode forward");
  // dx comes out of the same pass as dgamma/dbeta, so it is always computed.
  Tensor dx = new_activation(s, dy.shape(), dy.dtype());
  if (ctx.saved.size() == 4)
    ops::batchnorm_add_relu_backward(s, ctx.saved[0], ctx.saved[3], dy, gamma.value, ctx.saved[1], ctx.saved[2], dx,
                                     Tensor(), gamma.grad, beta.grad);
  else
    ops::batchnorm_backward(s, ctx.saved[0], dy, gamma.value, ctx.saved[1], ctx.saved[2], dx, gamma.grad, beta.grad);
  return dx;
}

Tensor BatchNorm2d::backward_add_relu(Stream& s, const Tensor& dy, Context& ctx) {
  SP_CHECK(ctx.saved.size() == 4, "BatchNorm2d::backward_add_relu without a training-mode forward_add_relu");
  Tensor dx = new_activation(s, dy.shape(), dy.dtype());
  ops::batchnorm_add_relu_backward(s, ctx.saved[0], ctx.saved[3], dy, gamma.value, ctx.saved[1], ctx.saved[2], dx, dy,
                                   gamma.grad, beta.grad);
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
  Tensor y = new_activation(s, x.shape(), x.dtype());
  ops::relu_forward(s, x, y);
  if (training_) ctx.saved = {y};
  return y;
}

Tensor ReLU::backward(Stream& s, const Tensor& dy, Context& ctx, bool /*need_dx*/) {
  SP_CHECK(ctx.saved.size() == 1, "ReLU::backward without a training-mode forward");
  ops::relu_backward(s, ctx.saved[0], dy, dy);  // in place: dy is consumed
  return dy;
}

MaxPool2d::MaxPool2d(int window, int stride, int pad) : window(window), stride(stride), pad(pad) {
  SP_CHECK(window > 0 && stride > 0 && pad >= 0 && pad < window, "MaxPool2d: window ", window, ", stride ", stride,
           " and pad ", pad, ": window and stride positive, pad in [0, window)");
}

Tensor MaxPool2d::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  Tensor y = new_activation(s, ops::maxpool2d_output_shape(x.shape(), window, stride, pad), x.dtype());
  ops::maxpool2d_forward(s, x, y, window, stride, pad);
  if (training_) ctx.saved = {x};
  return y;
}

Tensor MaxPool2d::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.saved.size() == 1, "MaxPool2d::backward without a training-mode forward");
  if (!need_dx) return Tensor();
  Tensor dx = new_activation(s, ctx.saved[0].shape(), dy.dtype());
  ops::maxpool2d_backward(s, ctx.saved[0], dy, dx, window, stride, pad);
  return dx;
}

Tensor GlobalAvgPool::forward(Stream& s, const Tensor& x, Context& ctx) {
  ctx.clear();
  Tensor y = new_activation(s, {x.size(0), x.size(3)}, x.dtype());
  ops::global_avgpool_forward(s, x, y);
  if (training_) ctx.shape = x.shape();
  return y;
}

Tensor GlobalAvgPool::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.shape.size() == 4, "GlobalAvgPool::backward without a training-mode forward");
  if (!need_dx) return Tensor();
  Tensor dx = new_activation(s, ctx.shape, dy.dtype());
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
  Tensor y = new_activation(s, {x.size(0), weight.value.size(0)}, x.dtype());
  ops::linear_forward(s, x, weight_for(s, weight, x.dtype()), bias.value, y);
  if (training_) ctx.saved = {x};
  return y;
}

Tensor Linear::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.saved.size() == 1, "Linear::backward without a training-mode forward");
  Tensor dx = need_dx ? new_activation(s, ctx.saved[0].shape(), dy.dtype()) : Tensor();
  ops::linear_backward(s, ctx.saved[0], weight_for(s, weight, dy.dtype()), dy, dx, weight.grad, bias.grad);
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
  const Tensor g = backward_to_first(s, dy, ctx);
  return children_.empty() ? g : children_[0].second->backward(s, g, ctx.children[0], need_dx);
}

void Sequential::backward_accumulate(Stream& s, const Tensor& dy, Context& ctx, const Tensor& into) {
  if (children_.empty()) return Module::backward_accumulate(s, dy, ctx, into);  // dx = dy
  children_[0].second->backward_accumulate(s, backward_to_first(s, dy, ctx), ctx.children[0], into);
}

Tensor Sequential::backward_to_first(Stream& s, const Tensor& dy, Context& ctx) {
  SP_CHECK(ctx.children.size() == children_.size(), "Sequential::backward without a training-mode forward");
  Tensor g = dy;
  for (size_t i = children_.size(); i-- > 1;) g = children_[i].second->backward(s, g, ctx.children[i], true);
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
  ctx.children.resize(3);  // main, shortcut projection, output BN
  Tensor h = main_.forward(s, x, ctx.children[0]);
  Tensor sc = x;
  if (proj_) {
    sc = proj_->forward(s, x, ctx.children[1]);
  } else if (option_a_) {
    sc = new_activation(s, h.shape(), h.dtype());
    ops::shortcut_a_forward(s, x, sc, stride_);
    ctx.shape = x.shape();
  }
  return bn_out_->forward_add_relu(s, h, sc, ctx.children[2]);
}

// dx is the sum of the main path's and the shortcut's gradients. The second of the two adds
// itself to the first (Module::backward_accumulate: a convolution's data gradient with beta 1,
// no separate add): the projection's to the main path's; the main path's to option A's shortcut
// gradient, or to the identity's, which is dy itself after the output BN's backward.
Tensor ResidualBlock::backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) {
  SP_CHECK(ctx.children.size() == 3, "residual block backward without a training-mode forward");
  // After this, dy holds the gradient of the sum (the shortcut's gradient).
  Tensor dh = bn_out_->backward_add_relu(s, dy, ctx.children[2]);
  if (!need_dx) {
    main_.backward(s, dh, ctx.children[0], false);
    if (proj_) proj_->backward(s, dy, ctx.children[1], false);
    return Tensor();
  }
  if (proj_) {
    Tensor dx = main_.backward(s, dh, ctx.children[0], true);
    proj_->backward_accumulate(s, dy, ctx.children[1], dx);
    return dx;
  }
  Tensor dx = dy;  // identity: the shortcut's gradient is dy's
  if (option_a_) {
    dx = new_activation(s, ctx.shape, dy.dtype());
    ops::shortcut_a_backward(s, dy, dx, stride_);
  }
  main_.backward_accumulate(s, dh, ctx.children[0], dx);
  return dx;
}

void ResidualBlock::collect(const std::string& prefix, ModuleState& st) {
  main_.collect(prefix, st);
  bn_out_->collect(join_name(prefix, bn_out_name_), st);
  if (proj_) proj_->collect(join_name(prefix, "shortcut"), st);
}

void ResidualBlock::set_training(bool training) {
  Module::set_training(training);
  main_.set_training(training);
  bn_out_->set_training(training);
  if (proj_) proj_->set_training(training);
}

BasicBlock::BasicBlock(int in_channels, int out_channels, int stride, Shortcut shortcut, Rng& rng) {
  main_.add("conv1", std::make_unique<Conv2d>(in_channels, out_channels, 3, stride, 1, false, rng));
  main_.add("bn1", std::make_unique<BatchNorm2d>(out_channels, /*fuse_relu=*/true));
  main_.add("conv2", std::make_unique<Conv2d>(out_channels, out_channels, 3, 1, 1, false, rng));
  bn_out_ = std::make_unique<BatchNorm2d>(out_channels);
  bn_out_name_ = "bn2";
  make_shortcut(in_channels, out_channels, stride, shortcut, rng);
}

Bottleneck::Bottleneck(int in_channels, int mid_channels, int stride, Rng& rng) {
  const int out_channels = mid_channels * kExpansion;
  main_.add("conv1", std::make_unique<Conv2d>(in_channels, mid_channels, 1, 1, 0, false, rng));
  main_.add("bn1", std::make_unique<BatchNorm2d>(mid_channels, /*fuse_relu=*/true));
  main_.add("conv2", std::make_unique<Conv2d>(mid_channels, mid_channels, 3, stride, 1, false, rng));
  main_.add("bn2", std::make_unique<BatchNorm2d>(mid_channels, /*fuse_relu=*/true));
  main_.add("conv3", std::make_unique<Conv2d>(mid_channels, out_channels, 1, 1, 0, false, rng));
  bn_out_ = std::make_unique<BatchNorm2d>(out_channels);
  bn_out_name_ = "bn3";
  make_shortcut(in_channels, out_channels, stride, Shortcut::B, rng);
}

// ---- FLOPs of one forward (Module::forward_flops) -------------------------------------------

namespace {
double numel(const Shape& sh) { return double(shape_numel(sh)); }
}  // namespace

double Conv2d::forward_flops(const Shape& x, Shape* y) const {
  const Shape& w = weight.value.shape();  // [K, R, S, C]
  *y = ops::conv2d_output_shape(x, w, stride, pad);
  return 2 * numel(*y) * double(w[1] * w[2] * w[3]) + (bias.value.defined() ? numel(*y) : 0);
}

// Statistics (a sum and a sum of squares), then scale and shift; the ReLU when fused.
double BatchNorm2d::forward_flops(const Shape& x, Shape* y) const {
  *y = x;
  return (fuse_relu ? 5 : 4) * numel(x);
}

double ReLU::forward_flops(const Shape& x, Shape* y) const {
  *y = x;
  return numel(x);
}

double MaxPool2d::forward_flops(const Shape& x, Shape* y) const {
  *y = ops::maxpool2d_output_shape(x, window, stride, pad);
  return numel(*y) * window * window;
}

double GlobalAvgPool::forward_flops(const Shape& x, Shape* y) const {
  *y = {x[0], x[3]};
  return numel(x);
}

double Linear::forward_flops(const Shape& x, Shape* y) const {
  *y = {x[0], weight.value.size(0)};
  return 2 * double(x[0]) * double(weight.value.size(0)) * double(weight.value.size(1)) + numel(*y);
}

double Sequential::forward_flops(const Shape& x, Shape* y) const {
  Shape h = x;
  double flops = 0;
  for (const auto& [name, m] : children_) {
    Shape next;
    flops += m->forward_flops(h, &next);
    h = next;
  }
  *y = h;
  return flops;
}

// The main path, the shortcut (a projection, or option A's copy into the padded channels), and
// the output BN fused with the add and the ReLU.
double ResidualBlock::forward_flops(const Shape& x, Shape* y) const {
  double flops = main_.forward_flops(x, y);
  if (proj_) {
    Shape sc;
    flops += proj_->forward_flops(x, &sc);
  } else if (option_a_) {
    flops += numel(*y);
  }
  return flops + 6 * numel(*y);
}

}  // namespace sp::layers
