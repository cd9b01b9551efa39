// Shape descriptors shared by the CPU reference kernels and the CUDA kernels.
//
// Layout conventions (fixed across the project):
//   activations  NHWC  (channels fastest)
//   conv weights KRSC  (K output channels, R x S filter, C input channels fastest)
//   linear       weight [out, in] (PyTorch's layout), activations [n, features]
#pragma once

#include <cstdint>

namespace sp::kernels {

struct Conv2dShape {
  int n = 1, h = 1, w = 1, c = 1;  // input  N x H x W x C
  int k = 1, r = 1, s = 1;         // weight K x R x S x C
  int stride = 1, pad = 0;         // same in both spatial dimensions

  int p() const { return (h + 2 * pad - r) / stride + 1; }  // output height
  int q() const { return (w + 2 * pad - s) / stride + 1; }  // output width
  int64_t x_size() const { return int64_t(n) * h * w * c; }
  int64_t w_size() const { return int64_t(k) * r * s * c; }
  int64_t y_size() const { return int64_t(n) * p() * q() * k; }
  double flops() const { return 2.0 * n * p() * q() * k * double(r) * s * c; }
  // The filter must fit the padded input (p() alone would not tell: C++ division rounds a
  // negative numerator toward zero, so a filter 1..stride-1 too large still gave one output).
  // (The padded sizes in 64 bits first: p() and q() are computed in int.)
  bool valid() const {
    return n > 0 && h > 0 && w > 0 && c > 0 && k > 0 && r > 0 && s > 0 && stride > 0 && pad >= 0 &&
           int64_t(h) + 2 * int64_t(pad) <= INT32_MAX && int64_t(w) + 2 * int64_t(pad) <= INT32_MAX &&
           h + 2 * pad >= r && w + 2 * pad >= s && p() > 0 && q() > 0;
  }
};

// Max pooling with a square window (NHWC).
struct Pool2dShape {
  int n = 1, h = 1, w = 1, c = 1;
  int window = 2, stride = 2, pad = 0;
  int p() const { return (h + 2 * pad - window) / stride + 1; }
  int q() const { return (w + 2 * pad - window) / stride + 1; }
  int64_t x_size() const { return int64_t(n) * h * w * c; }
  int64_t y_size() const { return int64_t(n) * p() * q() * c; }
  // The window must fit the padded input, as a convolution's filter (the padded sizes in 64 bits
  // first, as Conv2dShape's).
  bool valid() const {
    return n > 0 && h > 0 && w > 0 && c > 0 && window > 0 && stride > 0 && pad >= 0 && pad < window &&
           int64_t(h) + 2 * int64_t(pad) <= INT32_MAX && int64_t(w) + 2 * int64_t(pad) <= INT32_MAX &&
           h + 2 * pad >= window && w + 2 * pad >= window && p() > 0 && q() > 0;
  }
};

// CIFAR ResNet "option A" shortcut (He et al. 2016): y[n, i, j, ch] = x[n, i*stride, j*stride, ch - pad_lo]
// for pad_lo <= ch < pad_lo + c_in, zero elsewhere, with pad_lo = (c_out - c_in) / 2.
struct ShortcutAShape {
  int n = 1, h = 1, w = 1, c_in = 1;
  int c_out = 1, stride = 1;
  int p() const { return (h + stride - 1) / stride; }
  int q() const { return (w + stride - 1) / stride; }
  int pad_lo() const { return (c_out - c_in) / 2; }
  int64_t x_size() const { return int64_t(n) * h * w * c_in; }
  int64_t y_size() const { return int64_t(n) * p() * q() * c_out; }
  bool valid() const { return n > 0 && h > 0 && w > 0 && c_in > 0 && c_out >= c_in && stride > 0; }
};

// SGD with momentum, Nesterov and L2 weight decay, PyTorch semantics (dampening 0):
//   g  = grad_scale * grad + weight_decay * p
//   v  = momentum * v + g                         (v starts at zero, so the first v equals g)
//   p -= lr * (nesterov ? g + momentum * v : v)   (momentum == 0: p -= lr * g, v untouched)
// grad_scale can fold in the 1/N of data-parallel averaging (FDG's shrink factor scales the
// gradient a module receives instead, before its backward).
struct SgdParams {
  float lr = 0.1f;
  float momentum = 0.9f;
  float weight_decay = 0.0f;
  bool nesterov = false;
  float grad_scale = 1.0f;
  // When set, the learning rate is read from here as the update runs (device memory for the
  // CUDA kernel), so a captured graph replays with the current rate; lr is then unused.
  const float* lr_device = nullptr;
};

}  // namespace sp::kernels
