// Validation and device dispatch of the tensor-level ops (see ops.h).
#include "engine/ops.h"

#include <atomic>
#include <cstring>

#include "kernels/common/error.h"
#include "kernels/cpu/ops.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/common/cuda_check.h"
#include "kernels/cuda/ops.h"
#include "kernels/vendor/vendor.h"
#endif

namespace sp::ops {
namespace kc = kernels::cpu;
#if STALEPROP_WITH_CUDA
namespace kcu = kernels::cuda;
namespace kvd = kernels::vendor;
#endif
using kernels::Conv2dShape;
using kernels::Pool2dShape;
using kernels::ShortcutAShape;

namespace {

// Argument checks for one op call; every message starts with the op's name.
class OpCheck {
 public:
  OpCheck(const char* op, const Stream& s) : op_(op), device_(s.device()) {}

  // t is defined, on the stream's device, of dtype dt and (when rank >= 0) of that rank.
  void tensor(const Tensor& t, const char* name, DType dt, int rank = -1) const {
    if (!t.defined()) throw ShapeError(detail::concat(op_, ": ", name, " is undefined"));
    if (t.device() != device_)
      throw ShapeError(detail::concat(op_, ": ", name, " ", t.str(), " is not on the stream's device ",
                                      device_.str()));
    if (t.dtype() != dt)
      throw ShapeError(detail::concat(op_, ": ", name, " ", t.str(), " must have dtype ", dtype_name(dt)));
    if (rank >= 0 && t.dim() != rank)
      throw ShapeError(detail::concat(op_, ": ", name, " ", t.str(), " must have rank ", rank));
  }
  void optional(const Tensor& t, const char* name, DType dt, const Shape& expected, const std::string& why) const {
    if (t.defined()) {
      tensor(t, name, dt);
      shape(t, name, expected, why);
    }
  }
  // t has exactly `expected`; `why` names where the expectation comes from.
  void shape(const Tensor& t, const char* name, const Shape& expected, const std::string& why) const {
    if (t.shape() != expected)
      throw ShapeError(detail::concat(op_, ": ", name, " has shape ", shape_str(t.shape()), " but ", why,
                                      " requires ", shape_str(expected)));
  }
  void require(bool cond, const std::string& msg) const {
    if (!cond) throw ShapeError(detail::concat(op_, ": ", msg));
  }
  [[noreturn]] void no_cuda_kernel() const {
    throw NotSupportedError(detail::concat(op_, ": no CUDA kernel in this build yet (CPU reference only)"));
  }

 private:
  const char* op_;
  Device device_;
};

bool on_cpu(const Stream& s) { return s.device().is_cpu(); }

std::atomic<KernelBackend> g_backend{KernelBackend::Custom};
#if STALEPROP_WITH_CUDA
bool use_vendor() { return g_backend.load(std::memory_order_relaxed) == KernelBackend::Vendor; }
#endif

#if STALEPROP_WITH_CUDA
// The stream's cudaStream_t, with the stream's device made current for this host thread:
// kernels launch on the current device, which must be the stream's.
cudaStream_t cuda_stream(const Stream& s) {
  SP_CUDA_CHECK(cudaSetDevice(s.device().index));
  return static_cast<cudaStream_t>(s.native_handle());
}
#endif

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

Conv2dShape conv_shape(const OpCheck& c, const Shape& x, const Shape& w, int stride, int pad) {
  Conv2dShape sh;
  sh.n = int(x[0]), sh.h = int(x[1]), sh.w = int(x[2]), sh.c = int(x[3]);
  sh.k = int(w[0]), sh.r = int(w[1]), sh.s = int(w[2]);
  sh.stride = stride, sh.pad = pad;
  c.require(w[3] == x[3], detail::concat("input ", shape_str(x), " has ", x[3], " channels but weight ",
                                         shape_str(w), " expects ", w[3]));
  c.require(sh.valid(), detail::concat("invalid convolution of ", shape_str(x), " by ", shape_str(w), " stride ",
                                       stride, " pad ", pad));
  return sh;
}

}  // namespace

void set_kernel_backend(KernelBackend backend) { g_backend.store(backend); }
KernelBackend kernel_backend() { return g_backend.load(); }

void gemm(Stream& s, bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta,
          const Tensor& c) {
  OpCheck chk("gemm", s);
  chk.tensor(a, "A", DType::F32, 2);
  chk.tensor(b, "B", DType::F32, 2);
  chk.tensor(c, "C", DType::F32, 2);
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  chk.require(k == kb, detail::concat("inner dimensions differ: A ", shape_str(a.shape()), (trans_a ? "^T" : ""),
                                      " and B ", shape_str(b.shape()), (trans_b ? "^T" : "")));
  chk.shape(c, "C", {m, n}, "A " + shape_str(a.shape()) + " times B " + shape_str(b.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([=] {
      kc::gemm<float>(trans_a, trans_b, m, n, k, alpha, a.data<float>(), a.size(1), b.data<float>(), b.size(1), beta,
                      c.data<float>(), n);
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  const auto run = use_vendor() ? kvd::gemm : kcu::gemm;
  run(trans_a, trans_b, m, n, k, alpha, a.data<float>(), a.size(1), b.data<float>(), b.size(1), beta, c.data<float>(),
      n, cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

Shape conv2d_output_shape(const Shape& x, const Shape& w, int stride, int pad) {
  SP_SHAPE_CHECK(x.size() == 4 && w.size() == 4, "conv2d: x ", shape_str(x), " and w ", shape_str(w),
                 " must both have rank 4");
  Conv2dShape sh;
  sh.h = int(x[1]), sh.w = int(x[2]), sh.r = int(w[1]), sh.s = int(w[2]), sh.stride = stride, sh.pad = pad;
  return {x[0], sh.p(), sh.q(), w[0]};
}

void conv2d_forward(Stream& s, const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& y, int stride,
                    int pad) {
  OpCheck chk("conv2d_forward", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(w, "w", DType::F32, 4);
  chk.tensor(y, "y", DType::F32, 4);
  const Conv2dShape sh = conv_shape(chk, x.shape(), w.shape(), stride, pad);
  chk.optional(bias, "bias", DType::F32, {sh.k}, "weight " + shape_str(w.shape()));
  chk.shape(y, "y", conv2d_output_shape(x.shape(), w.shape(), stride, pad),
            "x " + shape_str(x.shape()) + " convolved with w " + shape_str(w.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::conv2d_forward<float>(sh, x.data<float>(), w.data<float>(), ptr_or_null<float>(bias),
                                                   y.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  const auto run = use_vendor() ? kvd::conv2d_forward : kcu::conv2d_forward;
  run(sh, x.data<float>(), w.data<float>(), ptr_or_null<float>(bias), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void conv2d_backward_data(Stream& s, const Tensor& dy, const Tensor& w, const Tensor& dx, int stride, int pad) {
  OpCheck chk("conv2d_backward_data", s);
  chk.tensor(dy, "dy", DType::F32, 4);
  chk.tensor(w, "w", DType::F32, 4);
  chk.tensor(dx, "dx", DType::F32, 4);
  const Conv2dShape sh = conv_shape(chk, dx.shape(), w.shape(), stride, pad);
  chk.shape(dy, "dy", conv2d_output_shape(dx.shape(), w.shape(), stride, pad),
            "dx " + shape_str(dx.shape()) + " convolved with w " + shape_str(w.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::conv2d_backward_data<float>(sh, dy.data<float>(), w.data<float>(), dx.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  const auto run = use_vendor() ? kvd::conv2d_backward_data : kcu::conv2d_backward_data;
  run(sh, dy.data<float>(), w.data<float>(), dx.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void conv2d_backward_weight(Stream& s, const Tensor& x, const Tensor& dy, const Tensor& dw, const Tensor& dbias,
                            int stride, int pad) {
  OpCheck chk("conv2d_backward_weight", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(dy, "dy", DType::F32, 4);
  chk.tensor(dw, "dw", DType::F32, 4);
  const Conv2dShape sh = conv_shape(chk, x.shape(), dw.shape(), stride, pad);
  chk.optional(dbias, "dbias", DType::F32, {sh.k}, "weight " + shape_str(dw.shape()));
  chk.shape(dy, "dy", conv2d_output_shape(x.shape(), dw.shape(), stride, pad),
            "x " + shape_str(x.shape()) + " convolved with dw " + shape_str(dw.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::conv2d_backward_weight<float>(sh, x.data<float>(), dy.data<float>(), dw.data<float>(),
                                                           ptr_or_null<float>(dbias)); });
    return;
  }
#if STALEPROP_WITH_CUDA
  const auto run = use_vendor() ? kvd::conv2d_backward_weight : kcu::conv2d_backward_weight;
  run(sh, x.data<float>(), dy.data<float>(), dw.data<float>(), ptr_or_null<float>(dbias), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

namespace {
// Checks an NHWC activation and C-sized per-channel tensors; returns {m = N*H*W, c}.
std::pair<int64_t, int64_t> bn_dims(const OpCheck& chk, const Tensor& x, std::initializer_list<std::pair<const Tensor*, const char*>> per_channel) {
  chk.tensor(x, "x", DType::F32, 4);
  const int64_t c = x.size(3);
  for (auto& [t, name] : per_channel) {
    chk.tensor(*t, name, DType::F32, 1);
    chk.shape(*t, name, {c}, "x " + shape_str(x.shape()));
  }
  return {x.numel() / c, c};
}
}  // namespace

void batchnorm_forward_training(Stream& s, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                const Tensor& running_mean, const Tensor& running_var, const Tensor& y,
                                const Tensor& save_mean, const Tensor& save_invstd, float eps, float momentum) {
  OpCheck chk("batchnorm_forward_training", s);
  const auto [m, c] = bn_dims(chk, x, {{&gamma, "gamma"}, {&beta, "beta"}, {&running_mean, "running_mean"},
                                       {&running_var, "running_var"}, {&save_mean, "save_mean"},
                                       {&save_invstd, "save_invstd"}});
  chk.tensor(y, "y", DType::F32);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([=, m = m, c = c] {
      kc::batchnorm_forward_training<float>(m, c, x.data<float>(), gamma.data<float>(), beta.data<float>(), eps,
                                            momentum, running_mean.data<float>(), running_var.data<float>(),
                                            y.data<float>(), save_mean.data<float>(), save_invstd.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::batchnorm_forward_training(m, c, x.data<float>(), gamma.data<float>(), beta.data<float>(), eps, momentum,
                                  running_mean.data<float>(), running_var.data<float>(), y.data<float>(),
                                  save_mean.data<float>(), save_invstd.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void batchnorm_forward_inference(Stream& s, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                 const Tensor& running_mean, const Tensor& running_var, const Tensor& y, float eps) {
  OpCheck chk("batchnorm_forward_inference", s);
  const auto [m, c] = bn_dims(chk, x, {{&gamma, "gamma"}, {&beta, "beta"}, {&running_mean, "running_mean"},
                                       {&running_var, "running_var"}});
  chk.tensor(y, "y", DType::F32);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([=, m = m, c = c] {
      kc::batchnorm_forward_inference<float>(m, c, x.data<float>(), gamma.data<float>(), beta.data<float>(),
                                             running_mean.data<float>(), running_var.data<float>(), eps,
                                             y.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::batchnorm_forward_inference(m, c, x.data<float>(), gamma.data<float>(), beta.data<float>(),
                                   running_mean.data<float>(), running_var.data<float>(), eps, y.data<float>(),
                                   cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void batchnorm_backward(Stream& s, const Tensor& x, const Tensor& dy, const Tensor& gamma, const Tensor& save_mean,
                        const Tensor& save_invstd, const Tensor& dx, const Tensor& dgamma, const Tensor& dbeta) {
  OpCheck chk("batchnorm_backward", s);
  const auto [m, c] = bn_dims(chk, x, {{&gamma, "gamma"}, {&save_mean, "save_mean"}, {&save_invstd, "save_invstd"},
                                       {&dgamma, "dgamma"}, {&dbeta, "dbeta"}});
  chk.tensor(dy, "dy", DType::F32);
  chk.shape(dy, "dy", x.shape(), "x");
  chk.tensor(dx, "dx", DType::F32);
  chk.shape(dx, "dx", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([=, m = m, c = c] {
      kc::batchnorm_backward<float>(m, c, x.data<float>(), dy.data<float>(), gamma.data<float>(),
                                    save_mean.data<float>(), save_invstd.data<float>(), dx.data<float>(),
                                    dgamma.data<float>(), dbeta.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::batchnorm_backward(m, c, x.data<float>(), dy.data<float>(), gamma.data<float>(), save_mean.data<float>(),
                          save_invstd.data<float>(), dx.data<float>(), dgamma.data<float>(), dbeta.data<float>(),
                          cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void relu_forward(Stream& s, const Tensor& x, const Tensor& y) {
  OpCheck chk("relu_forward", s);
  chk.tensor(x, "x", DType::F32);
  chk.tensor(y, "y", DType::F32);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::relu_forward<float>(x.numel(), x.data<float>(), y.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::relu_forward(x.numel(), x.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void relu_backward(Stream& s, const Tensor& y, const Tensor& dy, const Tensor& dx) {
  OpCheck chk("relu_backward", s);
  chk.tensor(y, "y", DType::F32);
  chk.tensor(dy, "dy", DType::F32);
  chk.tensor(dx, "dx", DType::F32);
  chk.shape(dy, "dy", y.shape(), "y");
  chk.shape(dx, "dx", y.shape(), "y");
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::relu_backward<float>(y.numel(), y.data<float>(), dy.data<float>(), dx.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::relu_backward(y.numel(), y.data<float>(), dy.data<float>(), dx.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void add(Stream& s, const Tensor& a, const Tensor& b, const Tensor& y) {
  OpCheck chk("add", s);
  chk.tensor(a, "a", DType::F32);
  chk.tensor(b, "b", DType::F32);
  chk.tensor(y, "y", DType::F32);
  chk.shape(b, "b", a.shape(), "a");
  chk.shape(y, "y", a.shape(), "a");
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::add<float>(a.numel(), a.data<float>(), b.data<float>(), y.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::add(a.numel(), a.data<float>(), b.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void scale(Stream& s, float alpha, const Tensor& x, const Tensor& y) {
  OpCheck chk("scale", s);
  chk.tensor(x, "x", DType::F32);
  chk.tensor(y, "y", DType::F32);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::scale<float>(x.numel(), alpha, x.data<float>(), y.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::scale(x.numel(), alpha, x.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void fill(Stream& s, const Tensor& t, float value) {
  OpCheck chk("fill", s);
  chk.tensor(t, "t", DType::F32);
  if (on_cpu(s)) {
    s.enqueue_host([=] {
      float* p = t.data<float>();
      for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = value;
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::fill(t.numel(), value, t.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void copy(Stream& s, const Tensor& src, const Tensor& dst) {
  OpCheck chk("copy", s);
  chk.require(src.defined() && dst.defined(), "src and dst must be defined");
  chk.require(src.dtype() == dst.dtype() && src.numel() == dst.numel(),
              detail::concat("src ", src.str(), " and dst ", dst.str(), " differ in dtype or element count"));
  const size_t bytes = src.nbytes();
  if (src.device().is_cpu() && dst.device().is_cpu()) {
    chk.require(on_cpu(s), "a host-to-host copy runs on a CPU stream");
    s.enqueue_host([=] { std::memcpy(dst.raw_data(), src.raw_data(), bytes); });
    return;
  }
#if STALEPROP_WITH_CUDA
  chk.require(s.device().is_cuda(), "a copy involving " + src.device().str() + " and " + dst.device().str() +
                                        " must be issued on a CUDA stream");
  SP_CUDA_CHECK(cudaMemcpyAsync(dst.raw_data(), src.raw_data(), bytes, cudaMemcpyDefault, cuda_stream(s)));
#else
  chk.no_cuda_kernel();
#endif
}

void cast(Stream& s, const Tensor& src, const Tensor& dst) {
  OpCheck chk("cast", s);
  chk.require(src.defined() && dst.defined(), "src and dst must be defined");
  chk.require(src.device() == s.device() && dst.device() == s.device(),
              "src " + src.str() + " and dst " + dst.str() + " must be on the stream's device " + s.device().str());
  chk.shape(dst, "dst", src.shape(), "src");
  const bool to_bf16 = src.dtype() == DType::F32 && dst.dtype() == DType::BF16;
  const bool to_f32 = src.dtype() == DType::BF16 && dst.dtype() == DType::F32;
  chk.require(to_bf16 || to_f32, "supports f32 <-> bf16, got " + src.str() + " -> " + dst.str());
  if (on_cpu(s)) {
    s.enqueue_host([=] {
      if (to_bf16)
        kc::f32_to_bf16(src.numel(), src.data<float>(), dst.data<uint16_t>());
      else
        kc::bf16_to_f32(src.numel(), src.data<uint16_t>(), dst.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (to_bf16)
    kcu::f32_to_bf16(src.numel(), src.data<float>(), dst.data<uint16_t>(), cuda_stream(s));
  else
    kcu::bf16_to_f32(src.numel(), src.data<uint16_t>(), dst.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void shortcut_a_forward(Stream& s, const Tensor& x, const Tensor& y, int stride) {
  OpCheck chk("shortcut_a_forward", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(y, "y", DType::F32, 4);
  ShortcutAShape sh{int(x.size(0)), int(x.size(1)), int(x.size(2)), int(x.size(3)), int(y.size(3)), stride};
  chk.require(sh.valid(), "invalid option-A shortcut from " + shape_str(x.shape()) + " to " + shape_str(y.shape()));
  chk.shape(y, "y", {sh.n, sh.p(), sh.q(), sh.c_out}, "x " + shape_str(x.shape()) + " with stride " +
                                                          std::to_string(stride));
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::shortcut_a_forward<float>(sh, x.data<float>(), y.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::shortcut_a_forward(sh, x.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void shortcut_a_backward(Stream& s, const Tensor& dy, const Tensor& dx, int stride) {
  OpCheck chk("shortcut_a_backward", s);
  chk.tensor(dy, "dy", DType::F32, 4);
  chk.tensor(dx, "dx", DType::F32, 4);
  ShortcutAShape sh{int(dx.size(0)), int(dx.size(1)), int(dx.size(2)), int(dx.size(3)), int(dy.size(3)), stride};
  chk.require(sh.valid(), "invalid option-A shortcut from " + shape_str(dx.shape()) + " to " + shape_str(dy.shape()));
  chk.shape(dy, "dy", {sh.n, sh.p(), sh.q(), sh.c_out}, "dx " + shape_str(dx.shape()) + " with stride " +
                                                            std::to_string(stride));
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::shortcut_a_backward<float>(sh, dy.data<float>(), dx.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::shortcut_a_backward(sh, dy.data<float>(), dx.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

namespace {
Pool2dShape pool_shape(const OpCheck& chk, const Tensor& x, int window, int stride, int pad) {
  Pool2dShape sh{int(x.size(0)), int(x.size(1)), int(x.size(2)), int(x.size(3)), window, stride, pad};
  chk.require(sh.valid(), detail::concat("invalid pooling of ", shape_str(x.shape()), " window ", window, " stride ",
                                         stride, " pad ", pad));
  return sh;
}
}  // namespace

void maxpool2d_forward(Stream& s, const Tensor& x, const Tensor& y, int window, int stride, int pad) {
  OpCheck chk("maxpool2d_forward", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(y, "y", DType::F32, 4);
  const Pool2dShape sh = pool_shape(chk, x, window, stride, pad);
  chk.shape(y, "y", {sh.n, sh.p(), sh.q(), sh.c}, "pooling x " + shape_str(x.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::maxpool2d_forward<float>(sh, x.data<float>(), y.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::maxpool2d_forward(sh, x.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void maxpool2d_backward(Stream& s, const Tensor& x, const Tensor& dy, const Tensor& dx, int window, int stride,
                        int pad) {
  OpCheck chk("maxpool2d_backward", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(dy, "dy", DType::F32, 4);
  chk.tensor(dx, "dx", DType::F32, 4);
  const Pool2dShape sh = pool_shape(chk, x, window, stride, pad);
  chk.shape(dy, "dy", {sh.n, sh.p(), sh.q(), sh.c}, "pooling x " + shape_str(x.shape()));
  chk.shape(dx, "dx", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::maxpool2d_backward<float>(sh, x.data<float>(), dy.data<float>(), dx.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::maxpool2d_backward(sh, x.data<float>(), dy.data<float>(), dx.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void global_avgpool_forward(Stream& s, const Tensor& x, const Tensor& y) {
  OpCheck chk("global_avgpool_forward", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(y, "y", DType::F32, 2);
  chk.shape(y, "y", {x.size(0), x.size(3)}, "x " + shape_str(x.shape()));
  const int64_t n = x.size(0), hw = x.size(1) * x.size(2), c = x.size(3);
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::global_avgpool_forward<float>(n, hw, c, x.data<float>(), y.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::global_avgpool_forward(n, hw, c, x.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void global_avgpool_backward(Stream& s, const Tensor& dy, const Tensor& dx) {
  OpCheck chk("global_avgpool_backward", s);
  chk.tensor(dy, "dy", DType::F32, 2);
  chk.tensor(dx, "dx", DType::F32, 4);
  chk.shape(dy, "dy", {dx.size(0), dx.size(3)}, "dx " + shape_str(dx.shape()));
  const int64_t n = dx.size(0), hw = dx.size(1) * dx.size(2), c = dx.size(3);
  if (on_cpu(s)) {
    s.enqueue_host([=] { kc::global_avgpool_backward<float>(n, hw, c, dy.data<float>(), dx.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::global_avgpool_backward(n, hw, c, dy.data<float>(), dx.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void linear_forward(Stream& s, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y) {
  OpCheck chk("linear_forward", s);
  chk.tensor(x, "x", DType::F32, 2);
  chk.tensor(w, "w", DType::F32, 2);
  chk.tensor(y, "y", DType::F32, 2);
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  chk.require(w.size(1) == in, "x " + shape_str(x.shape()) + " has " + std::to_string(in) +
                                   " features but w " + shape_str(w.shape()) + " expects " +
                                   std::to_string(w.size(1)));
  chk.optional(b, "b", DType::F32, {out}, "w " + shape_str(w.shape()));
  chk.shape(y, "y", {n, out}, "x " + shape_str(x.shape()) + " and w " + shape_str(w.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([=] {
      kc::linear_forward<float>(n, in, out, x.data<float>(), w.data<float>(), ptr_or_null<float>(b), y.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::linear_forward(n, in, out, x.data<float>(), w.data<float>(), ptr_or_null<float>(b), y.data<float>(),
                      cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void linear_backward(Stream& s, const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                     const Tensor& dw, const Tensor& db) {
  OpCheck chk("linear_backward", s);
  chk.tensor(x, "x", DType::F32, 2);
  chk.tensor(w, "w", DType::F32, 2);
  chk.tensor(dy, "dy", DType::F32, 2);
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  chk.shape(w, "w", {out, in}, "x " + shape_str(x.shape()));
  chk.shape(dy, "dy", {n, out}, "x " + shape_str(x.shape()) + " and w " + shape_str(w.shape()));
  chk.optional(dx, "dx", DType::F32, x.shape(), "x");
  chk.optional(dw, "dw", DType::F32, w.shape(), "w");
  chk.optional(db, "db", DType::F32, {out}, "w " + shape_str(w.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([=] {
      kc::linear_backward<float>(n, in, out, x.data<float>(), w.data<float>(), dy.data<float>(), ptr_or_null<float>(dx),
                                 ptr_or_null<float>(dw), ptr_or_null<float>(db));
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::linear_backward(n, in, out, x.data<float>(), w.data<float>(), dy.data<float>(), ptr_or_null<float>(dx),
                       ptr_or_null<float>(dw), ptr_or_null<float>(db), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void softmax_cross_entropy(Stream& s, const Tensor& logits, const Tensor& labels, float smoothing, const Tensor& loss,
                           const Tensor& dlogits, const Tensor& correct) {
  OpCheck chk("softmax_cross_entropy", s);
  chk.tensor(logits, "logits", DType::F32, 2);
  chk.tensor(labels, "labels", DType::I32, 1);
  chk.tensor(loss, "loss", DType::F32);
  chk.tensor(dlogits, "dlogits", DType::F32);
  chk.tensor(correct, "correct", DType::I32);
  const int64_t n = logits.size(0), classes = logits.size(1);
  chk.shape(labels, "labels", {n}, "logits " + shape_str(logits.shape()));
  chk.shape(dlogits, "dlogits", logits.shape(), "logits");
  chk.shape(loss, "loss", {1}, "a scalar result");
  chk.shape(correct, "correct", {1}, "a scalar result");
  chk.require(smoothing >= 0.f && smoothing < 1.f, "label smoothing must lie in [0, 1)");
  if (on_cpu(s)) {
    s.enqueue_host([=] {
      int64_t hits = 0;
      kc::softmax_cross_entropy<float>(n, classes, logits.data<float>(), labels.data<int32_t>(), smoothing,
                                       loss.data<float>(), dlogits.data<float>(), &hits);
      correct.data<int32_t>()[0] = int32_t(hits);
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::softmax_cross_entropy(n, classes, logits.data<float>(), labels.data<int32_t>(), smoothing, loss.data<float>(),
                             dlogits.data<float>(), correct.data<int32_t>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void sgd_step(Stream& s, const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
              const std::vector<Tensor>& momenta, const SgdParams& p) {
  OpCheck chk("sgd_step", s);
  chk.require(grads.size() == params.size() && momenta.size() == params.size(),
              detail::concat(params.size(), " params, ", grads.size(), " grads and ", momenta.size(),
                             " momentum buffers"));
  std::vector<kc::SgdTensor<float>> list;
  for (size_t i = 0; i < params.size(); ++i) {
    chk.tensor(params[i], "param", DType::F32);
    chk.tensor(grads[i], "grad", DType::F32);
    chk.shape(grads[i], "grad", params[i].shape(), "its parameter");
    if (p.momentum != 0.f) {
      chk.tensor(momenta[i], "momentum", DType::F32);
      chk.shape(momenta[i], "momentum", params[i].shape(), "its parameter");
    }
    list.push_back({params[i].data<float>(), grads[i].data<float>(), ptr_or_null<float>(momenta[i]),
                    params[i].numel()});
  }
  if (on_cpu(s)) {
    // The tensors are captured so their storage outlives the queued update.
    s.enqueue_host([list, p, keep = std::vector<std::vector<Tensor>>{params, grads, momenta}] {
      kc::sgd_step<float>(list, p);
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  // The pointer table is copied into the launch. As for every CUDA op, the tensors are not
  // captured: their storage is stream-ordered (allocator.h), and memory used by several
  // streams is kept alive by its owner until an event orders the uses.
  std::vector<kcu::SgdTensor> cuda_list;
  cuda_list.reserve(list.size());
  for (const kc::SgdTensor<float>& t : list) cuda_list.push_back({t.param, t.grad, t.momentum, t.size});
  kcu::sgd_step(cuda_list, p, cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

}  // namespace sp::ops
