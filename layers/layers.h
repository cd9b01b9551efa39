// Layers of the CIFAR ResNets, implementing engine/module.h.
//
// Parameters are created on the CPU, initialised as in He et al. (Kaiming normal for conv and
// linear weights with fan-in, BN gamma = 1 and beta = 0, biases 0), and moved with Module::to.
#pragma once

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/module.h"

namespace sp::layers {

using Rng = std::mt19937_64;

// Mixed precision's bf16 weight copies kept by the optimizer (Parameter::bf16): on unless the
// environment sets STALEPROP_BF16_WEIGHT_COPIES=0, which casts every weight before each bf16
// use instead (the same bits, one more launch per weight and use). set_ overrides the
// environment (tests, A/B runs).
bool bf16_weight_copies();
void set_bf16_weight_copies(bool on);
// A residual block's two gradients summed by the convolution's data gradient (beta 1,
// Conv2d::backward_accumulate): on unless STALEPROP_DGRAD_ACCUMULATE=0, which runs the data
// gradient into its own tensor and a separate add (the same bits in fp32; in bf16 the sum is then
// rounded twice). set_ overrides the environment (tests, A/B runs).
bool dgrad_accumulates();
void set_dgrad_accumulates(bool on);

class Conv2d final : public Module {
 public:
  Conv2d(int in_channels, int out_channels, int kernel, int stride, int pad, bool bias, Rng& rng);
  std::string type() const override { return "Conv2d"; }
  Tensor forward(Stream& s, const Tensor& x, Context& ctx) override;
  Tensor backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) override;
  void backward_accumulate(Stream& s, const Tensor& dy, Context& ctx, const Tensor& into) override;
  void collect(const std::string& prefix, ModuleState& st) override;
  double forward_flops(const Shape& x, Shape* y) const override;
  Parameter weight, bias;  // weight KRSC; bias undefined when disabled
  int stride, pad;

 private:
  // The weight gradient, and dx = data gradient + beta * dx where dx is defined.
  void backward_into(Stream& s, const Tensor& dy, Context& ctx, const Tensor& dx, float beta);
};

// Batch normalisation; with fuse_relu the module computes relu(bn(x)) with the fused kernels
// (one module where PyTorch has BatchNorm2d followed by ReLU; ReLU has no state, so the state
// names are unchanged). forward_add_relu is the residual block's tail relu(bn(x) + residual).
class BatchNorm2d final : public Module {
 public:
  explicit BatchNorm2d(int channels, bool fuse_relu = false, float eps = 1e-5f, float momentum = 0.1f);
  std::string type() const override { return fuse_relu ? "BatchNorm2d+ReLU" : "BatchNorm2d"; }
  Tensor forward(Stream& s, const Tensor& x, Context& ctx) override;
  Tensor backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) override;
  void collect(const std::string& prefix, ModuleState& st) override;
  double forward_flops(const Shape& x, Shape* y) const override;
  // relu(bn(x) + residual), fused, whatever fuse_relu says.
  Tensor forward_add_relu(Stream& s, const Tensor& x, const Tensor& residual, Context& ctx);
  // Backward of forward_add_relu: returns dx and leaves the residual's gradient in dy
  // (which is consumed).
  Tensor backward_add_relu(Stream& s, const Tensor& dy, Context& ctx);
  Parameter gamma, beta;
  Tensor running_mean, running_var;
  int64_t num_batches_tracked = 0;
  bool fuse_relu;
  float eps, momentum;

 private:
  Tensor forward_impl(Stream& s, const Tensor& x, const Tensor& residual, bool relu, Context& ctx);
};

class ReLU final : public Module {
 public:
  std::string type() const override { return "ReLU"; }
  Tensor forward(Stream& s, const Tensor& x, Context& ctx) override;
  Tensor backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) override;
  void collect(const std::string&, ModuleState&) override {}
  double forward_flops(const Shape& x, Shape* y) const override;
};

class MaxPool2d final : public Module {
 public:
  MaxPool2d(int window, int stride, int pad);
  std::string type() const override { return "MaxPool2d"; }
  Tensor forward(Stream& s, const Tensor& x, Context& ctx) override;
  Tensor backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) override;
  void collect(const std::string&, ModuleState&) override {}
  double forward_flops(const Shape& x, Shape* y) const override;
  int window, stride, pad;
};

// [N, H, W, C] -> [N, C]
class GlobalAvgPool final : public Module {
 public:
  std::string type() const override { return "GlobalAvgPool"; }
  Tensor forward(Stream& s, const Tensor& x, Context& ctx) override;
  Tensor backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) override;
  void collect(const std::string&, ModuleState&) override {}
  double forward_flops(const Shape& x, Shape* y) const override;
};

class Linear final : public Module {
 public:
  Linear(int in_features, int out_features, Rng& rng);
  std::string type() const override { return "Linear"; }
  Tensor forward(Stream& s, const Tensor& x, Context& ctx) override;
  Tensor backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) override;
  void collect(const std::string& prefix, ModuleState& st) override;
  double forward_flops(const Shape& x, Shape* y) const override;
  Parameter weight, bias;  // weight [out, in]
};

// Named children run in order; names become the PyTorch-style state names.
class Sequential : public Module {
 public:
  std::string type() const override { return "Sequential"; }
  Sequential& add(std::string name, std::unique_ptr<Module> m);
  Tensor forward(Stream& s, const Tensor& x, Context& ctx) override;
  Tensor backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) override;
  // The children's backwards in reverse; the first child adds its dx to `into`.
  void backward_accumulate(Stream& s, const Tensor& dy, Context& ctx, const Tensor& into) override;
  void collect(const std::string& prefix, ModuleState& st) override;
  double forward_flops(const Shape& x, Shape* y) const override;
  void set_training(bool training) override;
  size_t size() const { return children_.size(); }

 private:
  // The backwards of every child but the first, in reverse: the gradient reaching the first.
  Tensor backward_to_first(Stream& s, const Tensor& dy, Context& ctx);
  std::vector<std::pair<std::string, std::unique_ptr<Module>>> children_;
};

enum class Shortcut {
  A,  // parameter-free: stride-2 subsampling plus zero channel padding (CIFAR ResNet-20..110)
  B,  // 1x1 convolution + BN projection where the shape changes (ResNet-18)
};

// The residual pattern shared by BasicBlock and Bottleneck: relu(bn_out(main(x)) + shortcut(x)),
// where the shortcut is the identity when the shape is kept, else option A or a projection.
// The final BN, the add and the ReLU run as one fused op (BatchNorm2d::forward_add_relu).
class ResidualBlock : public Module {
 public:
  Tensor forward(Stream& s, const Tensor& x, Context& ctx) override;
  Tensor backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) override;
  void collect(const std::string& prefix, ModuleState& st) override;
  double forward_flops(const Shape& x, Shape* y) const override;
  void set_training(bool training) override;

 protected:
  // Derived constructors fill main_ (all but the last BN), set bn_out_ and its name, and
  // call this once.
  void make_shortcut(int in_channels, int out_channels, int stride, Shortcut shortcut, Rng& rng);
  Sequential main_;
  std::unique_ptr<BatchNorm2d> bn_out_;
  std::string bn_out_name_;
  std::unique_ptr<Sequential> proj_;  // option B projection ("shortcut.0", "shortcut.1"), or null
  bool option_a_ = false;             // option A with a shape change
  int stride_ = 1, out_channels_ = 0;
};

// main = conv3x3(stride) bn relu conv3x3 bn; names conv1 bn1 conv2 bn2 as in PyTorch
// (bn1 fused with its ReLU; bn2 fused with the add and the block's ReLU).
class BasicBlock final : public ResidualBlock {
 public:
  BasicBlock(int in_channels, int out_channels, int stride, Shortcut shortcut, Rng& rng);
  std::string type() const override { return "BasicBlock"; }
};

// main = conv1x1 bn relu conv3x3(stride) bn relu conv1x1 bn, expansion 4, projection shortcut.
class Bottleneck final : public ResidualBlock {
 public:
  static constexpr int kExpansion = 4;
  Bottleneck(int in_channels, int mid_channels, int stride, Rng& rng);
  std::string type() const override { return "Bottleneck"; }
};

}  // namespace sp::layers
