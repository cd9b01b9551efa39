// The module interface: what the trainer and the decoupled scheduler know of a layer.
//
// A module maps x to y on a stream. Everything its backward needs is left in a Context that
// the caller owns, one per forward call, so that several batches can be in flight through the
// same module at once (FDG keeps one context per batch between a module's forward and its
// delayed backward). backward() overwrites the parameter gradients (it does not accumulate)
// and returns dx. Modules allocate outputs from the caching allocator keyed by the stream.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "engine/stream.h"
#include "engine/tensor.h"

namespace sp {

// How a parameter is laid out here versus in PyTorch (for checkpoints).
enum class ParamLayout {
  Same,  // identical layout (BN, linear [out, in], biases)
  KRSC,  // conv weight: KRSC here, KCRS (OIHW) in PyTorch
};

struct Parameter {
  Tensor value;  // fp32 master weights
  Tensor grad;   // same shape; overwritten by each backward
  ParamLayout layout = ParamLayout::Same;
  bool decay = true;  // subject to weight decay

  // Mixed precision's weight copy: value rounded to bf16. A layer running in bf16 asks for it at
  // its first use (layers.cpp, weight_for: bf16_wanted); the optimizer's next step allocates it,
  // and from then on rewrites it in the same launch as it updates value (Sgd::step) and marks it
  // current, so each later bf16 use reads it instead of casting value again. While it is not
  // current, uses cast value as before. Whoever writes value other than through Sgd::step must
  // call value_changed(). A CUDA graph captured while the copy was current keeps reading it: such
  // a write must also drop the trainer's graphs (nothing does so today: checkpoints are loaded
  // before the first step, and graphs refuse --weight-stash, whose swaps write value).
  Tensor bf16;
  bool bf16_wanted = false, bf16_current = false;
  void value_changed() { bf16_current = false; }
};

// Named references to a module tree's state, with PyTorch-style dotted names.
struct ModuleState {
  std::vector<std::pair<std::string, Parameter*>> params;
  std::vector<std::pair<std::string, Tensor*>> buffers;   // e.g. BN running statistics
  std::vector<std::pair<std::string, int64_t*>> counters;  // e.g. BN num_batches_tracked
};

// What one forward call leaves for its backward.
struct Context {
  std::vector<Tensor> saved;
  Shape shape;  // an input shape, for ops whose backward needs no tensor
  std::vector<Context> children;

  void clear() {
    saved.clear();
    shape.clear();
    children.clear();
  }
  // Bytes of the tensors saved, each start address once (the activation memory this batch keeps
  // alive). A view counts its own bytes, not the storage behind it: a batch that is a slice of a
  // device-resident data set keeps the set alive, but the set is no activation; views of one
  // storage at other offsets (no layer saves any) would count apart. An address already in
  // `seen` is not counted again, so one set can be passed over several contexts.
  size_t saved_bytes(std::set<const void*>* seen = nullptr) const;
};

// Context::saved_bytes summed over the contexts (of a module's blocks), each address counted once.
size_t saved_bytes(const std::vector<Context>& contexts, std::set<const void*>* seen = nullptr);

class Module {
 public:
  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  virtual std::string type() const = 0;
  // y = f(x); in training mode fills ctx (cleared first) with what backward needs.
  virtual Tensor forward(Stream& s, const Tensor& x, Context& ctx) = 0;
  // Writes the parameter gradients for the forward that filled ctx and returns dx (an
  // undefined tensor when need_dx is false). dy may be consumed (overwritten).
  virtual Tensor backward(Stream& s, const Tensor& dy, Context& ctx, bool need_dx) = 0;
  // backward(.., need_dx = true), its dx added to `into` (dx's shape and dtype) instead of
  // returned: how a residual block adds its main path's gradient to its shortcut's. The default
  // runs backward and an add (into + dx, elementwise); a convolution (and a Sequential that
  // starts with one) adds in its data-gradient op, without the add's pass and launch.
  virtual void backward_accumulate(Stream& s, const Tensor& dy, Context& ctx, const Tensor& into);
  // Adds this module's state to st, names prefixed with `prefix` ("" at the top).
  virtual void collect(const std::string& prefix, ModuleState& st) = 0;
  // Moves parameters, gradients and buffers to `device` (copies issued on s, which must be a
  // stream of the destination device or of the CPU for a CPU destination).
  void to(Device device, Stream& s);

  virtual void set_training(bool training) { training_ = training; }
  bool training() const { return training_; }

  // The floating-point operations of one forward on an input of shape x (a multiply-add counts
  // two), and the output's shape in *y: a cost model, not a measurement. Convolutions and
  // linear layers count their multiply-adds (and bias adds); elementwise work a few per element.
  // The default throws: a module that can be a block of a network cut by FLOPs overrides it.
  virtual double forward_flops(const Shape& x, Shape* y) const;

 protected:
  bool training_ = true;
};

// "prefix.name", or "name" when prefix is empty.
std::string join_name(const std::string& prefix, const std::string& name);

// A tensor of `shape` on the stream's device, allocated for use on that stream.
Tensor new_activation(Stream& s, const Shape& shape, DType dtype = DType::F32);

}  // namespace sp
