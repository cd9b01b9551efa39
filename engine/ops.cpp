// Validation and device dispatch of the tensor-level ops (see ops.h).
#include "engine/ops.h"

#include <atomic>
#include <cstring>
#include <deque>
#include <limits>

#include "engine/op_profile.h"
#include "kernels/common/error.h"
#include "kernels/cpu/ops.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/common/cuda_check.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/tensor_core.h"
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
    // The shape descriptors of the ops on matrices and NHWC tensors hold dimensions as int (their
    // index arithmetic is 64-bit); flat buffers (copy, fill, the optimizer's) may be longer.
    for (int64_t d : t.shape())
      if (rank >= 2 && d > std::numeric_limits<int>::max())
        throw ShapeError(detail::concat(op_, ": ", name, " ", t.str(), " has a dimension over 2^31 - 1"));
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

// Whether two tensors' bytes overlap: both defined, on one device.
bool overlaps(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined() || a.device() != b.device()) return false;
  const char *pa = static_cast<const char*>(a.raw_data()), *pb = static_cast<const char*>(b.raw_data());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}
// Whether two defined tensors are the same bytes (one may be a view of the other's shape).
bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.defined() && b.defined() && a.device() == b.device() && a.raw_data() == b.raw_data() &&
         a.nbytes() == b.nbytes();
}

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

// What queued CPU work holds of a tensor: its memory, not its storage. A CUDA kernel holds only
// pointers, so a tensor the host lets go of returns to the caching allocator while work that
// uses it may still be queued, and only the allocator's stream ordering (allocator.h) keeps the
// memory from being handed to other work too early. The CPU emulation does the same, so that a
// use on another stream that the owner failed to keep alive and order shows here as well (a
// race ThreadSanitizer reports, or a wrong result under jittered streams), not only on a GPU.
Tensor borrow(const Tensor& t) {
  return t.defined() ? Tensor::from_blob(t.raw_data(), t.shape(), t.dtype(), t.device()) : Tensor();
}

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

bool is_bf16(const Tensor& t) { return t.defined() && t.dtype() == DType::BF16; }

// The elementwise ops have CUDA kernels for bf16 (kernels/cuda/ops.h: *_bf16) when every
// tensor is bf16.
bool native_bf16_elementwise(const Stream& s, std::initializer_list<const Tensor*> ts) {
  if (!s.device().is_cuda()) return false;
  for (const Tensor* t : ts)
    if (!is_bf16(*t)) return false;
  return STALEPROP_WITH_CUDA != 0;
}

// The GEMM and the convolutions have tensor-core kernels (kernels/cuda/tensor_core.h, and
// vendor twins) for bf16 operands: every tensor of `bf16` is bf16, every defined one of `f32`
// is f32, on a CUDA stream.
bool native_bf16_tensor_core(const Stream& s, std::initializer_list<const Tensor*> bf16,
                             std::initializer_list<const Tensor*> f32) {
  if (!s.device().is_cuda()) return false;
  for (const Tensor* t : bf16)
    if (!is_bf16(*t)) return false;
  for (const Tensor* t : f32)
    if (t->defined() && t->dtype() != DType::F32) return false;
  return STALEPROP_WITH_CUDA != 0;
}

// Batch norm has CUDA kernels for bf16 activations (every defined activation tensor bf16)
// with fp32 parameters and statistics.
bool native_bf16_batchnorm(const Stream& s, std::initializer_list<const Tensor*> activations,
                           std::initializer_list<const Tensor*> per_channel) {
  if (!s.device().is_cuda()) return false;
  for (const Tensor* t : activations)
    if (t->defined() && !is_bf16(*t)) return false;
  for (const Tensor* t : per_channel)
    if (is_bf16(*t)) return false;
  return STALEPROP_WITH_CUDA != 0;
}

// The reference semantics of an op on bf16 tensors, for ops without a native bf16 kernel:
// each bf16 input is widened to an fp32 temporary (a cast on the stream), the fp32 op runs on
// the temporaries, and each bf16 output is rounded back to nearest even (another cast). An
// output that shares storage with an input (in-place ops) shares its temporary. Everything is
// ordered on the op's stream; the temporaries come from the caching allocator for that stream.
class Bf16Widening {
 public:
  explicit Bf16Widening(Stream& s) : s_(s) {}
  // Registers an input: a bf16 tensor is widened into its temporary.
  void in(const Tensor& t) {
    if (!is_bf16(t)) return;
    Temp& tmp = temp_for(t);
    if (!tmp.widened) cast(s_, t, tmp.f32);
    tmp.widened = true;
  }
  // Registers an output: a bf16 tensor gets a temporary that finish() rounds back into it.
  void out(const Tensor& t) {
    if (is_bf16(t)) temp_for(t).output = true;
  }
  // What the fp32 op gets for t: its temporary when t is a registered bf16 tensor, else t.
  const Tensor& get(const Tensor& t) const {
    const Temp* tmp = is_bf16(t) ? find(t) : nullptr;
    return tmp ? tmp->f32 : t;
  }
  // Rounds every output back into its bf16 tensor; call after the fp32 op.
  void finish() {
    for (Temp& tmp : temps_)
      if (tmp.output) cast(s_, tmp.f32, tmp.bf16);
  }

 private:
  struct Temp {
    Tensor bf16, f32;
    bool widened = false, output = false;
  };
  const Temp* find(const Tensor& t) const {
    for (const Temp& tmp : temps_)
      if (tmp.bf16.raw_data() == t.raw_data() && tmp.bf16.shape() == t.shape()) return &tmp;
    return nullptr;
  }
  Temp& temp_for(const Tensor& t) {
    if (const Temp* tmp = find(t)) return const_cast<Temp&>(*tmp);
    temps_.push_back({t, Tensor::empty(t.shape(), DType::F32, s_.device(), &s_)});
    return temps_.back();
  }
  Stream& s_;
  std::deque<Temp> temps_;  // stable addresses: get() hands out references
};

// When any of `inputs` or `outputs` is bf16: runs the fp32 op by the reference semantics
// above and returns true. `op` is called with f32, the map from an argument to what the fp32
// op must get (a tensor in both lists is read and written, in place). Otherwise returns false
// and does nothing.
template <class Op>
bool via_fp32(Stream& s, std::initializer_list<const Tensor*> inputs, std::initializer_list<const Tensor*> outputs,
              const Op& op) {
  bool any = false;
  for (const Tensor* t : inputs) any = any || is_bf16(*t);
  for (const Tensor* t : outputs) any = any || is_bf16(*t);
  if (!any) return false;
  Bf16Widening wide(s);
  for (const Tensor* t : inputs) wide.in(*t);
  for (const Tensor* t : outputs) wide.out(*t);
  op([&](const Tensor& t) -> const Tensor& { return wide.get(t); });
  wide.finish();
  return true;
}

}  // namespace

void set_kernel_backend(KernelBackend backend) { g_backend.store(backend); }
KernelBackend kernel_backend() { return g_backend.load(); }

void set_tensor_core_mainloop(const std::string& name) {
#if STALEPROP_WITH_CUDA
  kernels::cuda::set_mma_mainloop(kernels::cuda::parse_mainloop(name));
#else
  throw Error("tensor-core main loop '" + name + "': this build has no CUDA backend");
#endif
}

std::string tensor_core_mainloop() {
#if STALEPROP_WITH_CUDA
  return kernels::cuda::mainloop_name(kernels::cuda::mma_mainloop());
#else
  return "none";
#endif
}

std::string tensor_core_mainloop_in_use() {
#if STALEPROP_WITH_CUDA
  if (cuda_device_count() == 0) return "none";
  return kernels::cuda::mainloop_name(kernels::cuda::effective_mma_mainloop());
#else
  return "none";
#endif
}

std::string tensor_core_switches() {
#if STALEPROP_WITH_CUDA
  namespace kc = kernels::cuda;
  const auto bit = [](bool on) { return on ? "1" : "0"; };
  return std::string("dgrad_wt=") + bit(kc::dgrad_transposed_filter()) +
         ",dgrad_classes=" + bit(kc::dgrad_by_stride_class()) + ",dgrad_class_direct=" + bit(kc::dgrad_class_direct()) +
         ",conv_tma=" + bit(kc::conv_tma()) + ",tma_wide=" + bit(kc::tma_wide_tile()) +
         ",tma_wide_by_shape=" + bit(kc::tma_wide_by_shape()) + ",tma_cluster=" + bit(kc::tma_cluster()) +
         ",tma_persistent=" + bit(kc::tma_persistent()) + ",conv_small_c=" + bit(kc::conv_small_c()) +
         ",bn_persistent=" + bit(kc::bn_persistent()) + ",pdl=" + bit(kc::programmatic_launch()) +
         ",conv_halo=" + std::to_string(kc::conv_halo()) + ",halo_resident=" + bit(kc::halo_resident()) +
         ",tma_l2_prefetch=" + bit(kc::tma_l2_prefetch());
#else
  return "none";
#endif
}

bool wgmma_available() {
#if STALEPROP_WITH_CUDA
  return cuda_device_count() > 0 && kernels::cuda::wgmma_available();
#else
  return false;
#endif
}

void gemm(Stream& s, bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta,
          const Tensor& c) {
  OpScope scope(s, "gemm", {&a, &b, &c});
  // Tensor cores for bf16 A and B, with C in f32 or bf16.
  const bool tc = native_bf16_tensor_core(s, {&a, &b}, {}) && c.defined() &&
                  (c.dtype() == DType::F32 || c.dtype() == DType::BF16);
  if (!tc && via_fp32(s, {&a, &b, &c}, {&c}, [&](const auto& f32) {
        gemm(s, trans_a, trans_b, alpha, f32(a), f32(b), beta, f32(c));
      }))
    return;
  OpCheck chk("gemm", s);
  chk.tensor(a, "A", tc ? DType::BF16 : DType::F32, 2);
  chk.tensor(b, "B", tc ? DType::BF16 : DType::F32, 2);
  chk.tensor(c, "C", tc ? c.dtype() : DType::F32, 2);
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  chk.require(k == kb, detail::concat("inner dimensions differ: A ", shape_str(a.shape()), (trans_a ? "^T" : ""),
                                      " and B ", shape_str(b.shape()), (trans_b ? "^T" : "")));
  chk.shape(c, "C", {m, n}, "A " + shape_str(a.shape()) + " times B " + shape_str(b.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([a = borrow(a), b = borrow(b), c = borrow(c), m, n, alpha, trans_a, trans_b, k, beta] {
      kc::gemm<float>(trans_a, trans_b, m, n, k, alpha, a.data<float>(), a.size(1), b.data<float>(), b.size(1), beta,
                      c.data<float>(), n);
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (tc && c.dtype() == DType::F32) {
    const auto run_bf16 = use_vendor() ? kvd::gemm_bf16 : kcu::gemm_bf16;
    run_bf16(trans_a, trans_b, m, n, k, alpha, a.data<uint16_t>(), a.size(1), b.data<uint16_t>(), b.size(1), beta,
             c.data<float>(), n, nullptr, false, cuda_stream(s));
    return;
  }
  if (tc) {
    const auto run_bf16 = use_vendor() ? kvd::gemm_bf16_out_bf16 : kcu::gemm_bf16_out_bf16;
    run_bf16(trans_a, trans_b, m, n, k, alpha, a.data<uint16_t>(), a.size(1), b.data<uint16_t>(), b.size(1), beta,
             c.data<uint16_t>(), n, nullptr, false, cuda_stream(s));
    return;
  }
  const auto run = use_vendor() ? kvd::gemm : kcu::gemm;
  run(trans_a, trans_b, m, n, k, alpha, a.data<float>(), a.size(1), b.data<float>(), b.size(1), beta, c.data<float>(),
      n, cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

namespace {
// Whether every dimension fits the int of the kernels' shape descriptors.
bool dims_fit_int(const Shape& s) {
  for (int64_t d : s)
    if (d > std::numeric_limits<int>::max()) return false;
  return true;
}
}  // namespace

Shape conv2d_output_shape(const Shape& x, const Shape& w, int stride, int pad) {
  SP_SHAPE_CHECK(x.size() == 4 && w.size() == 4, "conv2d: x ", shape_str(x), " and w ", shape_str(w),
                 " must both have rank 4");
  SP_SHAPE_CHECK(dims_fit_int(x) && dims_fit_int(w), "conv2d: x ", shape_str(x), " or w ", shape_str(w),
                 " has a dimension over 2^31 - 1");
  Conv2dShape sh;
  sh.n = int(x[0]), sh.h = int(x[1]), sh.w = int(x[2]), sh.c = int(x[3]);
  sh.k = int(w[0]), sh.r = int(w[1]), sh.s = int(w[2]), sh.stride = stride, sh.pad = pad;
  SP_SHAPE_CHECK(sh.valid(), "conv2d: x ", shape_str(x), ", w ", shape_str(w), ", stride ", stride, ", pad ", pad,
                 ": the sizes must be positive, the stride too, the pad not negative, and the filter must fit the "
                 "padded input");
  return {x[0], sh.p(), sh.q(), w[0]};
}

void conv2d_forward(Stream& s, const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& y, int stride,
                    int pad) {
  OpScope scope(s, "conv2d_forward", {&x, &w});
  const bool tc = native_bf16_tensor_core(s, {&x, &w, &y}, {&bias});
  if (!tc && via_fp32(s, {&x, &w, &bias}, {&y}, [&](const auto& f32) {
        conv2d_forward(s, f32(x), f32(w), f32(bias), f32(y), stride, pad);
      }))
    return;
  OpCheck chk("conv2d_forward", s);
  const DType at = tc ? DType::BF16 : DType::F32;  // x, w, y
  chk.tensor(x, "x", at, 4);
  chk.tensor(w, "w", at, 4);
  chk.tensor(y, "y", at, 4);
  const Conv2dShape sh = conv_shape(chk, x.shape(), w.shape(), stride, pad);
  chk.optional(bias, "bias", DType::F32, {sh.k}, "weight " + shape_str(w.shape()));
  chk.shape(y, "y", conv2d_output_shape(x.shape(), w.shape(), stride, pad),
            "x " + shape_str(x.shape()) + " convolved with w " + shape_str(w.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), w = borrow(w), y = borrow(y), bias = borrow(bias), sh] {
      kc::conv2d_forward<float>(sh, x.data<float>(), w.data<float>(), ptr_or_null<float>(bias), y.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (tc) {
    const auto run_bf16 = use_vendor() ? kvd::conv2d_forward_bf16 : kcu::conv2d_forward_bf16;
    run_bf16(sh, x.data<uint16_t>(), w.data<uint16_t>(), ptr_or_null<float>(bias), y.data<uint16_t>(),
             cuda_stream(s));
    return;
  }
  const auto run = use_vendor() ? kvd::conv2d_forward : kcu::conv2d_forward;
  run(sh, x.data<float>(), w.data<float>(), ptr_or_null<float>(bias), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void conv2d_backward_data(Stream& s, const Tensor& dy, const Tensor& w, const Tensor& dx, int stride, int pad,
                          float beta) {
  OpScope scope(s, "conv2d_backward_data", {&dy, &w});
  const bool tc = native_bf16_tensor_core(s, {&dy, &w, &dx}, {});
  // With beta, dx is read as well as written (widened in place under bf16).
  const auto fp32 = [&](const auto& f32) { conv2d_backward_data(s, f32(dy), f32(w), f32(dx), stride, pad, beta); };
  if (!tc && (beta != 0.f ? via_fp32(s, {&dy, &w, &dx}, {&dx}, fp32) : via_fp32(s, {&dy, &w}, {&dx}, fp32))) return;
  OpCheck chk("conv2d_backward_data", s);
  const DType at = tc ? DType::BF16 : DType::F32;  // dy, w, dx
  chk.tensor(dy, "dy", at, 4);
  chk.tensor(w, "w", at, 4);
  chk.tensor(dx, "dx", at, 4);
  const Conv2dShape sh = conv_shape(chk, dx.shape(), w.shape(), stride, pad);
  chk.shape(dy, "dy", conv2d_output_shape(dx.shape(), w.shape(), stride, pad),
            "dx " + shape_str(dx.shape()) + " convolved with w " + shape_str(w.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([dy = borrow(dy), w = borrow(w), dx = borrow(dx), sh, beta] {
      kc::conv2d_backward_data<float>(sh, dy.data<float>(), w.data<float>(), dx.data<float>(), beta);
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (tc) {
    const auto run_bf16 = use_vendor() ? kvd::conv2d_backward_data_bf16 : kcu::conv2d_backward_data_bf16;
    run_bf16(sh, dy.data<uint16_t>(), w.data<uint16_t>(), dx.data<uint16_t>(), cuda_stream(s), beta);
    return;
  }
  const auto run = use_vendor() ? kvd::conv2d_backward_data : kcu::conv2d_backward_data;
  run(sh, dy.data<float>(), w.data<float>(), dx.data<float>(), cuda_stream(s), beta);
#else
  chk.no_cuda_kernel();
#endif
}

void conv2d_backward_weight(Stream& s, const Tensor& x, const Tensor& dy, const Tensor& dw, const Tensor& dbias,
                            int stride, int pad) {
  OpScope scope(s, "conv2d_backward_weight", {&x, &dy});
  const bool tc = native_bf16_tensor_core(s, {&x, &dy}, {&dw, &dbias});
  if (!tc && via_fp32(s, {&x, &dy}, {&dw, &dbias}, [&](const auto& f32) {
        conv2d_backward_weight(s, f32(x), f32(dy), f32(dw), f32(dbias), stride, pad);
      }))
    return;
  OpCheck chk("conv2d_backward_weight", s);
  const DType at = tc ? DType::BF16 : DType::F32;  // x, dy (dw and dbias are f32)
  chk.tensor(x, "x", at, 4);
  chk.tensor(dy, "dy", at, 4);
  chk.tensor(dw, "dw", DType::F32, 4);
  const Conv2dShape sh = conv_shape(chk, x.shape(), dw.shape(), stride, pad);
  chk.optional(dbias, "dbias", DType::F32, {sh.k}, "weight " + shape_str(dw.shape()));
  chk.shape(dy, "dy", conv2d_output_shape(x.shape(), dw.shape(), stride, pad),
            "x " + shape_str(x.shape()) + " convolved with dw " + shape_str(dw.shape()));
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), dy = borrow(dy), dw = borrow(dw), dbias = borrow(dbias), sh] {
      kc::conv2d_backward_weight<float>(sh, x.data<float>(), dy.data<float>(), dw.data<float>(),
                                        ptr_or_null<float>(dbias));
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (tc) {
    const auto run_bf16 = use_vendor() ? kvd::conv2d_backward_weight_bf16 : kcu::conv2d_backward_weight_bf16;
    run_bf16(sh, x.data<uint16_t>(), dy.data<uint16_t>(), dw.data<float>(), ptr_or_null<float>(dbias),
             cuda_stream(s));
    return;
  }
  const auto run = use_vendor() ? kvd::conv2d_backward_weight : kcu::conv2d_backward_weight;
  run(sh, x.data<float>(), dy.data<float>(), dw.data<float>(), ptr_or_null<float>(dbias), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

namespace {
// Checks an NHWC activation and C-sized per-channel tensors; returns {m = N*H*W, c}.
// x has the activation dtype `at`; the per-channel tensors are f32.
std::pair<int64_t, int64_t> bn_dims(const OpCheck& chk, const Tensor& x, DType at,
                                    std::initializer_list<std::pair<const Tensor*, const char*>> per_channel) {
  chk.tensor(x, "x", at, 4);
  const int64_t c = x.size(3);
  // Batch statistics of no values would be 0/0, and written into the running statistics.
  chk.require(c > 0 && x.numel() > 0, "batch norm of an empty tensor " + shape_str(x.shape()));
  for (auto& [t, name] : per_channel) {
    chk.tensor(*t, name, DType::F32, 1);
    chk.shape(*t, name, {c}, "x " + shape_str(x.shape()));
  }
  return {x.numel() / c, c};
}

// Training statistics of one value per channel normalise every output to beta and drive the
// running variance to 0, so that evaluation divides by sqrt(eps): refused, as by PyTorch.
void require_batch_statistics(const OpCheck& chk, const Tensor& x, int64_t m) {
  if (m > 1) return;
  chk.require(false, "x " + shape_str(x.shape()) +
                         " holds one value per channel: training statistics need more than one (a larger batch "
                         "or image)");
}
}  // namespace

void batchnorm_forward_training(Stream& s, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                const Tensor& running_mean, const Tensor& running_var, const Tensor& y,
                                const Tensor& save_mean, const Tensor& save_invstd, float eps, float momentum) {
  OpScope scope(s, "batchnorm_forward_training", {&x});
  if (!native_bf16_batchnorm(s, {&x, &y}, {&gamma, &beta, &running_mean, &running_var, &save_mean, &save_invstd}) &&
      via_fp32(s, {&x, &gamma, &beta, &running_mean, &running_var},
               {&running_mean, &running_var, &y, &save_mean, &save_invstd}, [&](const auto& f32) {
        batchnorm_forward_training(s, f32(x), f32(gamma), f32(beta), f32(running_mean), f32(running_var), f32(y),
            f32(save_mean), f32(save_invstd), eps, momentum);
      }))
    return;
  OpCheck chk("batchnorm_forward_training", s);
  // Activations f32, or (native_bf16_batchnorm) bf16 on a CUDA stream.
  const DType at = x.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  const auto [m, c] = bn_dims(chk, x, at, {{&gamma, "gamma"}, {&beta, "beta"}, {&running_mean, "running_mean"},
                                       {&running_var, "running_var"}, {&save_mean, "save_mean"},
                                       {&save_invstd, "save_invstd"}});
  require_batch_statistics(chk, x, m);
  chk.tensor(y, "y", at);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), gamma = borrow(gamma), beta = borrow(beta), running_mean = borrow(running_mean),
                    running_var = borrow(running_var), y = borrow(y), save_mean = borrow(save_mean),
                    save_invstd = borrow(save_invstd), m = m, c = c, eps, momentum] {
      kc::batchnorm_forward_training<float>(m, c, x.data<float>(), gamma.data<float>(), beta.data<float>(), eps,
                                            momentum, running_mean.data<float>(), running_var.data<float>(),
                                            y.data<float>(), save_mean.data<float>(), save_invstd.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (at == DType::BF16) {
    kcu::batchnorm_forward_training_bf16(m, c, x.data<uint16_t>(), nullptr, false, gamma.data<float>(),
                                         beta.data<float>(), eps, momentum, running_mean.data<float>(),
                                         running_var.data<float>(), y.data<uint16_t>(), save_mean.data<float>(),
                                         save_invstd.data<float>(), cuda_stream(s));
    return;
  }
  kcu::batchnorm_forward_training(m, c, x.data<float>(), gamma.data<float>(), beta.data<float>(), eps, momentum,
                                  running_mean.data<float>(), running_var.data<float>(), y.data<float>(),
                                  save_mean.data<float>(), save_invstd.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void batchnorm_forward_inference(Stream& s, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                 const Tensor& running_mean, const Tensor& running_var, const Tensor& y, float eps) {
  OpScope scope(s, "batchnorm_forward_inference", {&x});
  if (!native_bf16_batchnorm(s, {&x, &y}, {&gamma, &beta, &running_mean, &running_var}) &&
      via_fp32(s, {&x, &gamma, &beta, &running_mean, &running_var}, {&y}, [&](const auto& f32) {
        batchnorm_forward_inference(s, f32(x), f32(gamma), f32(beta), f32(running_mean), f32(running_var), f32(y), eps);
      }))
    return;
  OpCheck chk("batchnorm_forward_inference", s);
  // Activations f32, or (native_bf16_batchnorm) bf16 on a CUDA stream.
  const DType at = x.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  const auto [m, c] = bn_dims(chk, x, at, {{&gamma, "gamma"}, {&beta, "beta"}, {&running_mean, "running_mean"},
                                       {&running_var, "running_var"}});
  chk.tensor(y, "y", at);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), gamma = borrow(gamma), beta = borrow(beta), running_mean = borrow(running_mean),
                    running_var = borrow(running_var), y = borrow(y), m = m, c = c, eps] {
      kc::batchnorm_forward_inference<float>(m, c, x.data<float>(), gamma.data<float>(), beta.data<float>(),
                                             running_mean.data<float>(), running_var.data<float>(), eps,
                                             y.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (at == DType::BF16) {
    kcu::batchnorm_forward_inference_bf16(m, c, x.data<uint16_t>(), nullptr, false, gamma.data<float>(),
                                          beta.data<float>(), running_mean.data<float>(), running_var.data<float>(),
                                          eps, y.data<uint16_t>(), cuda_stream(s));
    return;
  }
  kcu::batchnorm_forward_inference(m, c, x.data<float>(), gamma.data<float>(), beta.data<float>(),
                                   running_mean.data<float>(), running_var.data<float>(), eps, y.data<float>(),
                                   cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void batchnorm_backward(Stream& s, const Tensor& x, const Tensor& dy, const Tensor& gamma, const Tensor& save_mean,
                        const Tensor& save_invstd, const Tensor& dx, const Tensor& dgamma, const Tensor& dbeta) {
  OpScope scope(s, "batchnorm_backward", {&x});
  if (!native_bf16_batchnorm(s, {&x, &dy, &dx}, {&gamma, &save_mean, &save_invstd, &dgamma, &dbeta}) &&
      via_fp32(s, {&x, &dy, &gamma, &save_mean, &save_invstd}, {&dx, &dgamma, &dbeta}, [&](const auto& f32) {
        batchnorm_backward(s, f32(x), f32(dy), f32(gamma), f32(save_mean), f32(save_invstd), f32(dx), f32(dgamma),
            f32(dbeta));
      }))
    return;
  OpCheck chk("batchnorm_backward", s);
  // Activations f32, or (native_bf16_batchnorm) bf16 on a CUDA stream.
  const DType at = x.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  const auto [m, c] = bn_dims(chk, x, at, {{&gamma, "gamma"}, {&save_mean, "save_mean"}, {&save_invstd, "save_invstd"},
                                       {&dgamma, "dgamma"}, {&dbeta, "dbeta"}});
  chk.tensor(dy, "dy", at);
  chk.shape(dy, "dy", x.shape(), "x");
  chk.tensor(dx, "dx", at);
  chk.shape(dx, "dx", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), dy = borrow(dy), gamma = borrow(gamma), save_mean = borrow(save_mean),
                    save_invstd = borrow(save_invstd), dx = borrow(dx), dgamma = borrow(dgamma), dbeta = borrow(dbeta),
                    m = m, c = c] {
      kc::batchnorm_backward<float>(m, c, x.data<float>(), dy.data<float>(), gamma.data<float>(),
                                    save_mean.data<float>(), save_invstd.data<float>(), dx.data<float>(),
                                    dgamma.data<float>(), dbeta.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (at == DType::BF16) {
    kcu::batchnorm_backward_bf16(m, c, x.data<uint16_t>(), nullptr, dy.data<uint16_t>(), gamma.data<float>(),
                                 save_mean.data<float>(), save_invstd.data<float>(), dx.data<uint16_t>(), nullptr,
                                 dgamma.data<float>(), dbeta.data<float>(), cuda_stream(s));
    return;
  }
  kcu::batchnorm_backward(m, c, x.data<float>(), dy.data<float>(), gamma.data<float>(), save_mean.data<float>(),
                          save_invstd.data<float>(), dx.data<float>(), dgamma.data<float>(), dbeta.data<float>(),
                          cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void batchnorm_add_relu_forward_training(Stream& s, const Tensor& x, const Tensor& residual, const Tensor& gamma,
                                         const Tensor& beta, const Tensor& running_mean, const Tensor& running_var,
                                         const Tensor& y, const Tensor& save_mean, const Tensor& save_invstd,
                                         float eps, float momentum) {
  OpScope scope(s, "batchnorm_add_relu_forward_training", {&x, &residual});
  if (!native_bf16_batchnorm(s, {&x, &residual, &y}, {&gamma, &beta, &running_mean, &running_var, &save_mean,
      &save_invstd}) &&
      via_fp32(s, {&x, &residual, &gamma, &beta, &running_mean, &running_var},
               {&running_mean, &running_var, &y, &save_mean, &save_invstd}, [&](const auto& f32) {
        batchnorm_add_relu_forward_training(s, f32(x), f32(residual), f32(gamma), f32(beta), f32(running_mean),
            f32(running_var), f32(y), f32(save_mean), f32(save_invstd), eps, momentum);
      }))
    return;
  OpCheck chk("batchnorm_add_relu_forward_training", s);
  // Activations f32, or (native_bf16_batchnorm) bf16 on a CUDA stream.
  const DType at = x.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  const auto [m, c] = bn_dims(chk, x, at, {{&gamma, "gamma"}, {&beta, "beta"}, {&running_mean, "running_mean"},
                                       {&running_var, "running_var"}, {&save_mean, "save_mean"},
                                       {&save_invstd, "save_invstd"}});
  chk.optional(residual, "residual", at, x.shape(), "x");
  require_batch_statistics(chk, x, m);
  chk.tensor(y, "y", at);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), gamma = borrow(gamma), beta = borrow(beta), running_mean = borrow(running_mean),
                    running_var = borrow(running_var), y = borrow(y), save_mean = borrow(save_mean),
                    save_invstd = borrow(save_invstd), residual = borrow(residual), m = m, c = c, eps, momentum] {
      kc::batchnorm_add_relu_forward_training<float>(
          m, c, x.data<float>(), ptr_or_null<float>(residual), gamma.data<float>(), beta.data<float>(), eps, momentum,
          running_mean.data<float>(), running_var.data<float>(), y.data<float>(), save_mean.data<float>(),
          save_invstd.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (at == DType::BF16) {
    kcu::batchnorm_forward_training_bf16(m, c, x.data<uint16_t>(), ptr_or_null<uint16_t>(residual), true,
                                         gamma.data<float>(), beta.data<float>(), eps, momentum,
                                         running_mean.data<float>(), running_var.data<float>(), y.data<uint16_t>(),
                                         save_mean.data<float>(), save_invstd.data<float>(), cuda_stream(s));
    return;
  }
  kcu::batchnorm_add_relu_forward_training(m, c, x.data<float>(), ptr_or_null<float>(residual), gamma.data<float>(),
                                           beta.data<float>(), eps, momentum, running_mean.data<float>(),
                                           running_var.data<float>(), y.data<float>(), save_mean.data<float>(),
                                           save_invstd.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void batchnorm_add_relu_forward_inference(Stream& s, const Tensor& x, const Tensor& residual, const Tensor& gamma,
                                          const Tensor& beta, const Tensor& running_mean, const Tensor& running_var,
                                          const Tensor& y, float eps) {
  OpScope scope(s, "batchnorm_add_relu_forward_inference", {&x, &residual});
  if (!native_bf16_batchnorm(s, {&x, &residual, &y}, {&gamma, &beta, &running_mean, &running_var}) &&
      via_fp32(s, {&x, &residual, &gamma, &beta, &running_mean, &running_var}, {&y}, [&](const auto& f32) {
        batchnorm_add_relu_forward_inference(s, f32(x), f32(residual), f32(gamma), f32(beta), f32(running_mean),
            f32(running_var), f32(y), eps);
      }))
    return;
  OpCheck chk("batchnorm_add_relu_forward_inference", s);
  // Activations f32, or (native_bf16_batchnorm) bf16 on a CUDA stream.
  const DType at = x.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  const auto [m, c] = bn_dims(chk, x, at, {{&gamma, "gamma"}, {&beta, "beta"}, {&running_mean, "running_mean"},
                                       {&running_var, "running_var"}});
  chk.optional(residual, "residual", at, x.shape(), "x");
  chk.tensor(y, "y", at);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), gamma = borrow(gamma), beta = borrow(beta), running_mean = borrow(running_mean),
                    running_var = borrow(running_var), y = borrow(y), residual = borrow(residual), m = m, c = c, eps] {
      kc::batchnorm_add_relu_forward_inference<float>(m, c, x.data<float>(), ptr_or_null<float>(residual),
                                                      gamma.data<float>(), beta.data<float>(),
                                                      running_mean.data<float>(), running_var.data<float>(), eps,
                                                      true, y.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (at == DType::BF16) {
    kcu::batchnorm_forward_inference_bf16(m, c, x.data<uint16_t>(), ptr_or_null<uint16_t>(residual), true,
                                          gamma.data<float>(), beta.data<float>(), running_mean.data<float>(),
                                          running_var.data<float>(), eps, y.data<uint16_t>(), cuda_stream(s));
    return;
  }
  kcu::batchnorm_add_relu_forward_inference(m, c, x.data<float>(), ptr_or_null<float>(residual), gamma.data<float>(),
                                            beta.data<float>(), running_mean.data<float>(), running_var.data<float>(),
                                            eps, true, y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void batchnorm_add_relu_backward(Stream& s, const Tensor& x, const Tensor& y, const Tensor& dy, const Tensor& gamma,
                                 const Tensor& save_mean, const Tensor& save_invstd, const Tensor& dx,
                                 const Tensor& dresidual, const Tensor& dgamma, const Tensor& dbeta) {
  OpScope scope(s, "batchnorm_add_relu_backward", {&x, &dresidual});
  // dresidual may be dy itself (written as it is consumed), and may touch no other input or dx
  // (both kernels read x, y and dy, and write dx, beside their pass over it): checked on the
  // tensors given, before any bf16 widening gives them temporaries.
  SP_SHAPE_CHECK(!dresidual.defined() || ((same_bytes(dresidual, dy) || !overlaps(dresidual, dy)) &&
                                            !overlaps(dresidual, x) && !overlaps(dresidual, y) &&
                                            !overlaps(dresidual, dx)),
                 "batchnorm_add_relu_backward: dresidual may alias dy, never x, y or dx, nor part of dy");
  if (!native_bf16_batchnorm(s, {&x, &y, &dy, &dx, &dresidual}, {&gamma, &save_mean, &save_invstd, &dgamma, &dbeta}) &&
      via_fp32(s, {&x, &y, &dy, &gamma, &save_mean, &save_invstd},
               {&dx, &dresidual, &dgamma, &dbeta}, [&](const auto& f32) {
        batchnorm_add_relu_backward(s, f32(x), f32(y), f32(dy), f32(gamma), f32(save_mean), f32(save_invstd), f32(dx),
            f32(dresidual), f32(dgamma), f32(dbeta));
      }))
    return;
  OpCheck chk("batchnorm_add_relu_backward", s);
  // Activations f32, or (native_bf16_batchnorm) bf16 on a CUDA stream.
  const DType at = x.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  const auto [m, c] = bn_dims(chk, x, at, {{&gamma, "gamma"}, {&save_mean, "save_mean"}, {&save_invstd, "save_invstd"},
                                       {&dgamma, "dgamma"}, {&dbeta, "dbeta"}});
  for (auto [t, name] : {std::pair{&y, "y"}, {&dy, "dy"}, {&dx, "dx"}}) {
    chk.tensor(*t, name, at);
    chk.shape(*t, name, x.shape(), "x");
  }
  chk.optional(dresidual, "dresidual", at, x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), y = borrow(y), dy = borrow(dy), gamma = borrow(gamma), save_mean = borrow(save_mean),
                    save_invstd = borrow(save_invstd), dx = borrow(dx), dgamma = borrow(dgamma), dbeta = borrow(dbeta),
                    dresidual = borrow(dresidual), m = m, c = c] {
      kc::batchnorm_add_relu_backward<float>(m, c, x.data<float>(), y.data<float>(), dy.data<float>(),
                                             gamma.data<float>(), save_mean.data<float>(), save_invstd.data<float>(),
                                             dx.data<float>(), ptr_or_null<float>(dresidual), dgamma.data<float>(),
                                             dbeta.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (at == DType::BF16) {
    kcu::batchnorm_backward_bf16(m, c, x.data<uint16_t>(), y.data<uint16_t>(), dy.data<uint16_t>(), gamma.data<float>(),
                                 save_mean.data<float>(), save_invstd.data<float>(), dx.data<uint16_t>(),
                                 ptr_or_null<uint16_t>(dresidual), dgamma.data<float>(), dbeta.data<float>(),
                                 cuda_stream(s));
    return;
  }
  kcu::batchnorm_add_relu_backward(m, c, x.data<float>(), y.data<float>(), dy.data<float>(), gamma.data<float>(),
                                   save_mean.data<float>(), save_invstd.data<float>(), dx.data<float>(),
                                   ptr_or_null<float>(dresidual), dgamma.data<float>(), dbeta.data<float>(),
                                   cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void relu_forward(Stream& s, const Tensor& x, const Tensor& y) {
  OpScope scope(s, "relu_forward", {&x});
  if (!native_bf16_elementwise(s, {&x, &y}) && via_fp32(s, {&x}, {&y}, [&](const auto& f32) {
        relu_forward(s, f32(x), f32(y));
      }))
    return;
  OpCheck chk("relu_forward", s);
  // f32 everywhere, or (native_bf16_elementwise) bf16 everywhere on a CUDA stream.
  const DType dt = x.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  chk.tensor(x, "x", dt);
  chk.tensor(y, "y", dt);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host(
        [x = borrow(x), y = borrow(y)] { kc::relu_forward<float>(x.numel(), x.data<float>(), y.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (dt == DType::BF16)
    kcu::relu_forward_bf16(x.numel(), x.data<uint16_t>(), y.data<uint16_t>(), cuda_stream(s));
  else
    kcu::relu_forward(x.numel(), x.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void relu_backward(Stream& s, const Tensor& y, const Tensor& dy, const Tensor& dx) {
  OpScope scope(s, "relu_backward", {&dy});
  if (!native_bf16_elementwise(s, {&y, &dy, &dx}) && via_fp32(s, {&y, &dy}, {&dx}, [&](const auto& f32) {
        relu_backward(s, f32(y), f32(dy), f32(dx));
      }))
    return;
  OpCheck chk("relu_backward", s);
  // f32 everywhere, or (native_bf16_elementwise) bf16 everywhere on a CUDA stream.
  const DType dt = y.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  chk.tensor(y, "y", dt);
  chk.tensor(dy, "dy", dt);
  chk.tensor(dx, "dx", dt);
  chk.shape(dy, "dy", y.shape(), "y");
  chk.shape(dx, "dx", y.shape(), "y");
  if (on_cpu(s)) {
    s.enqueue_host([y = borrow(y), dy = borrow(dy), dx = borrow(dx)] {
      kc::relu_backward<float>(y.numel(), y.data<float>(), dy.data<float>(), dx.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (dt == DType::BF16)
    kcu::relu_backward_bf16(y.numel(), y.data<uint16_t>(), dy.data<uint16_t>(), dx.data<uint16_t>(), cuda_stream(s));
  else
    kcu::relu_backward(y.numel(), y.data<float>(), dy.data<float>(), dx.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void add(Stream& s, const Tensor& a, const Tensor& b, const Tensor& y) {
  OpScope scope(s, "add", {&a});
  if (!native_bf16_elementwise(s, {&a, &b, &y}) && via_fp32(s, {&a, &b}, {&y}, [&](const auto& f32) {
        add(s, f32(a), f32(b), f32(y));
      }))
    return;
  OpCheck chk("add", s);
  // f32 everywhere, or (native_bf16_elementwise) bf16 everywhere on a CUDA stream.
  const DType dt = a.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  chk.tensor(a, "a", dt);
  chk.tensor(b, "b", dt);
  chk.tensor(y, "y", dt);
  chk.shape(b, "b", a.shape(), "a");
  chk.shape(y, "y", a.shape(), "a");
  if (on_cpu(s)) {
    s.enqueue_host([a = borrow(a), b = borrow(b), y = borrow(y)] {
      kc::add<float>(a.numel(), a.data<float>(), b.data<float>(), y.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (dt == DType::BF16)
    kcu::add_bf16(a.numel(), a.data<uint16_t>(), b.data<uint16_t>(), y.data<uint16_t>(), cuda_stream(s));
  else
    kcu::add(a.numel(), a.data<float>(), b.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void scale(Stream& s, float alpha, const Tensor& x, const Tensor& y) {
  OpScope scope(s, "scale", {&x});
  if (!native_bf16_elementwise(s, {&x, &y}) && via_fp32(s, {&x}, {&y}, [&](const auto& f32) {
        scale(s, alpha, f32(x), f32(y));
      }))
    return;
  OpCheck chk("scale", s);
  // f32 everywhere, or (native_bf16_elementwise) bf16 everywhere on a CUDA stream.
  const DType dt = x.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  chk.tensor(x, "x", dt);
  chk.tensor(y, "y", dt);
  chk.shape(y, "y", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), y = borrow(y), alpha] {
      kc::scale<float>(x.numel(), alpha, x.data<float>(), y.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (dt == DType::BF16)
    kcu::scale_bf16(x.numel(), alpha, x.data<uint16_t>(), y.data<uint16_t>(), cuda_stream(s));
  else
    kcu::scale(x.numel(), alpha, x.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void fill(Stream& s, const Tensor& t, float value) {
  OpScope scope(s, "fill", {&t});
  OpCheck chk("fill", s);
  chk.tensor(t, "t", DType::F32);
  if (on_cpu(s)) {
    s.enqueue_host([t = borrow(t), value] {
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
  OpScope scope(s, "copy", {&src, &dst});
  OpCheck chk("copy", s);
  chk.require(src.defined() && dst.defined(), "src and dst must be defined");
  chk.require(src.dtype() == dst.dtype() && src.numel() == dst.numel(),
              detail::concat("src ", src.str(), " and dst ", dst.str(), " differ in dtype or element count"));
  const size_t bytes = src.nbytes();
  if (src.device().is_cpu() && dst.device().is_cpu()) {
    chk.require(on_cpu(s), "a host-to-host copy runs on a CPU stream");
    s.enqueue_host(
        [dst = borrow(dst), src = borrow(src), bytes] { std::memcpy(dst.raw_data(), src.raw_data(), bytes); });
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
  OpScope scope(s, "cast", {&src, &dst});
  OpCheck chk("cast", s);
  chk.require(src.defined() && dst.defined(), "src and dst must be defined");
  chk.require(src.device() == s.device() && dst.device() == s.device(),
              "src " + src.str() + " and dst " + dst.str() + " must be on the stream's device " + s.device().str());
  chk.shape(dst, "dst", src.shape(), "src");
  const bool to_bf16 = src.dtype() == DType::F32 && dst.dtype() == DType::BF16;
  const bool to_f32 = src.dtype() == DType::BF16 && dst.dtype() == DType::F32;
  chk.require(to_bf16 || to_f32, "supports f32 <-> bf16, got " + src.str() + " -> " + dst.str());
  if (on_cpu(s)) {
    s.enqueue_host([src = borrow(src), dst = borrow(dst), to_bf16] {
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
  OpScope scope(s, "shortcut_a_forward", {&x, &y});
  if (via_fp32(s, {&x}, {&y}, [&](const auto& f32) {
        shortcut_a_forward(s, f32(x), f32(y), stride);
      }))
    return;
  OpCheck chk("shortcut_a_forward", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(y, "y", DType::F32, 4);
  ShortcutAShape sh{int(x.size(0)), int(x.size(1)), int(x.size(2)), int(x.size(3)), int(y.size(3)), stride};
  chk.require(sh.valid(), "invalid option-A shortcut from " + shape_str(x.shape()) + " to " + shape_str(y.shape()));
  chk.shape(y, "y", {sh.n, sh.p(), sh.q(), sh.c_out}, "x " + shape_str(x.shape()) + " with stride " +
                                                          std::to_string(stride));
  if (on_cpu(s)) {
    s.enqueue_host(
        [x = borrow(x), y = borrow(y), sh] { kc::shortcut_a_forward<float>(sh, x.data<float>(), y.data<float>()); });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::shortcut_a_forward(sh, x.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void shortcut_a_backward(Stream& s, const Tensor& dy, const Tensor& dx, int stride) {
  OpScope scope(s, "shortcut_a_backward", {&dy, &dx});
  if (via_fp32(s, {&dy}, {&dx}, [&](const auto& f32) {
        shortcut_a_backward(s, f32(dy), f32(dx), stride);
      }))
    return;
  OpCheck chk("shortcut_a_backward", s);
  chk.tensor(dy, "dy", DType::F32, 4);
  chk.tensor(dx, "dx", DType::F32, 4);
  ShortcutAShape sh{int(dx.size(0)), int(dx.size(1)), int(dx.size(2)), int(dx.size(3)), int(dy.size(3)), stride};
  chk.require(sh.valid(), "invalid option-A shortcut from " + shape_str(dx.shape()) + " to " + shape_str(dy.shape()));
  chk.shape(dy, "dy", {sh.n, sh.p(), sh.q(), sh.c_out}, "dx " + shape_str(dx.shape()) + " with stride " +
                                                            std::to_string(stride));
  if (on_cpu(s)) {
    s.enqueue_host([dy = borrow(dy), dx = borrow(dx), sh] {
      kc::shortcut_a_backward<float>(sh, dy.data<float>(), dx.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::shortcut_a_backward(sh, dy.data<float>(), dx.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

Shape maxpool2d_output_shape(const Shape& x, int window, int stride, int pad) {
  SP_SHAPE_CHECK(x.size() == 4, "maxpool2d: x ", shape_str(x), " must have rank 4");
  SP_SHAPE_CHECK(dims_fit_int(x), "maxpool2d: x ", shape_str(x), " has a dimension over 2^31 - 1");
  const Pool2dShape sh{int(x[0]), int(x[1]), int(x[2]), int(x[3]), window, stride, pad};
  SP_SHAPE_CHECK(sh.valid(), "maxpool2d: x ", shape_str(x), ", window ", window, ", stride ", stride, ", pad ", pad,
                 ": the sizes must be positive, the window and stride too, the pad in [0, window), and the window "
                 "must fit the padded input");
  return {x[0], sh.p(), sh.q(), x[3]};
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
  OpScope scope(s, "maxpool2d_forward", {&x, &y});
  if (via_fp32(s, {&x}, {&y}, [&](const auto& f32) {
        maxpool2d_forward(s, f32(x), f32(y), window, stride, pad);
      }))
    return;
  OpCheck chk("maxpool2d_forward", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(y, "y", DType::F32, 4);
  const Pool2dShape sh = pool_shape(chk, x, window, stride, pad);
  chk.shape(y, "y", {sh.n, sh.p(), sh.q(), sh.c}, "pooling x " + shape_str(x.shape()));
  if (on_cpu(s)) {
    s.enqueue_host(
        [x = borrow(x), y = borrow(y), sh] { kc::maxpool2d_forward<float>(sh, x.data<float>(), y.data<float>()); });
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
  OpScope scope(s, "maxpool2d_backward", {&x, &dx});
  if (via_fp32(s, {&x, &dy}, {&dx}, [&](const auto& f32) {
        maxpool2d_backward(s, f32(x), f32(dy), f32(dx), window, stride, pad);
      }))
    return;
  OpCheck chk("maxpool2d_backward", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(dy, "dy", DType::F32, 4);
  chk.tensor(dx, "dx", DType::F32, 4);
  const Pool2dShape sh = pool_shape(chk, x, window, stride, pad);
  chk.shape(dy, "dy", {sh.n, sh.p(), sh.q(), sh.c}, "pooling x " + shape_str(x.shape()));
  chk.shape(dx, "dx", x.shape(), "x");
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), dy = borrow(dy), dx = borrow(dx), sh] {
      kc::maxpool2d_backward<float>(sh, x.data<float>(), dy.data<float>(), dx.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::maxpool2d_backward(sh, x.data<float>(), dy.data<float>(), dx.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void global_avgpool_forward(Stream& s, const Tensor& x, const Tensor& y) {
  OpScope scope(s, "global_avgpool_forward", {&x});
  if (via_fp32(s, {&x}, {&y}, [&](const auto& f32) {
        global_avgpool_forward(s, f32(x), f32(y));
      }))
    return;
  OpCheck chk("global_avgpool_forward", s);
  chk.tensor(x, "x", DType::F32, 4);
  chk.tensor(y, "y", DType::F32, 2);
  chk.shape(y, "y", {x.size(0), x.size(3)}, "x " + shape_str(x.shape()));
  const int64_t n = x.size(0), hw = x.size(1) * x.size(2), c = x.size(3);
  if (on_cpu(s)) {
    s.enqueue_host([x = borrow(x), y = borrow(y), c, n, hw] {
      kc::global_avgpool_forward<float>(n, hw, c, x.data<float>(), y.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::global_avgpool_forward(n, hw, c, x.data<float>(), y.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void global_avgpool_backward(Stream& s, const Tensor& dy, const Tensor& dx) {
  OpScope scope(s, "global_avgpool_backward", {&dx});
  if (via_fp32(s, {&dy}, {&dx}, [&](const auto& f32) {
        global_avgpool_backward(s, f32(dy), f32(dx));
      }))
    return;
  OpCheck chk("global_avgpool_backward", s);
  chk.tensor(dy, "dy", DType::F32, 2);
  chk.tensor(dx, "dx", DType::F32, 4);
  chk.shape(dy, "dy", {dx.size(0), dx.size(3)}, "dx " + shape_str(dx.shape()));
  const int64_t n = dx.size(0), hw = dx.size(1) * dx.size(2), c = dx.size(3);
  if (on_cpu(s)) {
    s.enqueue_host([dy = borrow(dy), dx = borrow(dx), c, n, hw] {
      kc::global_avgpool_backward<float>(n, hw, c, dy.data<float>(), dx.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  kcu::global_avgpool_backward(n, hw, c, dy.data<float>(), dx.data<float>(), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

#if STALEPROP_WITH_CUDA
namespace {
// --kernels vendor runs a linear layer's GEMMs on cuBLASLt, its bias and bias gradient too: as
// products with a column of n ones (filled by our kernel; stream-ordered, freed after the use).
Tensor vendor_linear_ones(Stream& s, int64_t n) {
  Tensor ones = Tensor::empty({n}, DType::F32, s.device(), &s);
  kcu::fill(n, 1.f, ones.data<float>(), cuda_stream(s));
  return ones;
}
}  // namespace
#endif

void linear_forward(Stream& s, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y) {
  OpScope scope(s, "linear_forward", {&x, &w});
  if (via_fp32(s, {&x, &w, &b}, {&y}, [&](const auto& f32) {
        linear_forward(s, f32(x), f32(w), f32(b), f32(y));
      }))
    return;
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
    s.enqueue_host([x = borrow(x), w = borrow(w), y = borrow(y), b = borrow(b), n, in, out] {
      kc::linear_forward<float>(n, in, out, x.data<float>(), w.data<float>(), ptr_or_null<float>(b), y.data<float>());
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (use_vendor()) {  // the GEMMs on cuBLASLt; see vendor_linear_ones
    float beta = 0.f;
    if (b.defined()) {  // y = 1 b^T (a rank-1 product), onto which x w^T is then accumulated
      const Tensor ones = vendor_linear_ones(s, n);
      kvd::gemm(false, false, n, out, 1, 1.f, ones.data<float>(), 1, b.data<float>(), out, 0.f, y.data<float>(), out,
                cuda_stream(s));
      beta = 1.f;
    }
    kvd::gemm(false, true, n, out, in, 1.f, x.data<float>(), in, w.data<float>(), in, beta, y.data<float>(), out,
              cuda_stream(s));
    return;
  }
  kcu::linear_forward(n, in, out, x.data<float>(), w.data<float>(), ptr_or_null<float>(b), y.data<float>(),
                      cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void linear_backward(Stream& s, const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                     const Tensor& dw, const Tensor& db) {
  OpScope scope(s, "linear_backward", {&x, &w});
  if (via_fp32(s, {&x, &w, &dy}, {&dx, &dw, &db}, [&](const auto& f32) {
        linear_backward(s, f32(x), f32(w), f32(dy), f32(dx), f32(dw), f32(db));
      }))
    return;
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
    s.enqueue_host([x = borrow(x), w = borrow(w), dy = borrow(dy), dx = borrow(dx), dw = borrow(dw), db = borrow(db), n,
                    in, out] {
      kc::linear_backward<float>(n, in, out, x.data<float>(), w.data<float>(), dy.data<float>(), ptr_or_null<float>(dx),
                                 ptr_or_null<float>(dw), ptr_or_null<float>(db));
    });
    return;
  }
#if STALEPROP_WITH_CUDA
  if (use_vendor()) {  // dx = dy w, dw = dy^T x, db = dy^T 1, all on cuBLASLt
    const cudaStream_t cs = cuda_stream(s);
    if (dx.defined())
      kvd::gemm(false, false, n, in, out, 1.f, dy.data<float>(), out, w.data<float>(), in, 0.f, dx.data<float>(), in,
                cs);
    if (dw.defined())
      kvd::gemm(true, false, out, in, n, 1.f, dy.data<float>(), out, x.data<float>(), in, 0.f, dw.data<float>(), in,
                cs);
    if (db.defined()) {
      const Tensor ones = vendor_linear_ones(s, n);
      kvd::gemm(true, false, out, 1, n, 1.f, dy.data<float>(), out, ones.data<float>(), 1, 0.f, db.data<float>(), 1,
                cs);
    }
    return;
  }
  kcu::linear_backward(n, in, out, x.data<float>(), w.data<float>(), dy.data<float>(), ptr_or_null<float>(dx),
                       ptr_or_null<float>(dw), ptr_or_null<float>(db), cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

void softmax_cross_entropy(Stream& s, const Tensor& logits, const Tensor& labels, float smoothing, const Tensor& loss,
                           const Tensor& dlogits, const Tensor& correct) {
  OpScope scope(s, "softmax_cross_entropy", {&logits});
  if (via_fp32(s, {&logits}, {&loss, &dlogits}, [&](const auto& f32) {
        softmax_cross_entropy(s, f32(logits), labels, smoothing, f32(loss), f32(dlogits), correct);
      }))
    return;
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
    s.enqueue_host([logits = borrow(logits), labels = borrow(labels), loss = borrow(loss), dlogits = borrow(dlogits),
                    correct = borrow(correct), n, smoothing, classes] {
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
              const std::vector<Tensor>& momenta, const SgdParams& config, const Tensor& lr,
              const std::vector<Tensor>& params_bf16) {
  OpScope scope(s, "sgd_step", {});
  OpCheck chk("sgd_step", s);
  SgdParams p = config;
  if (lr.defined()) {
    chk.tensor(lr, "lr", DType::F32);
    chk.require(lr.numel() == 1, "lr must have one element, got " + lr.str());
    p.lr_device = lr.data<float>();
  }
  chk.require(grads.size() == params.size() && momenta.size() == params.size(),
              detail::concat(params.size(), " params, ", grads.size(), " grads and ", momenta.size(),
                             " momentum buffers"));
  chk.require(params_bf16.empty() || params_bf16.size() == params.size(),
              detail::concat(params.size(), " params and ", params_bf16.size(), " bf16 copies"));
  std::vector<kc::SgdTensor<float>> list;
  for (size_t i = 0; i < params.size(); ++i) {
    chk.tensor(params[i], "param", DType::F32);
    chk.tensor(grads[i], "grad", DType::F32);
    chk.shape(grads[i], "grad", params[i].shape(), "its parameter");
    if (p.momentum != 0.f) {
      chk.tensor(momenta[i], "momentum", DType::F32);
      chk.shape(momenta[i], "momentum", params[i].shape(), "its parameter");
    }
    uint16_t* copy = nullptr;
    if (!params_bf16.empty() && params_bf16[i].defined()) {
      chk.tensor(params_bf16[i], "bf16 copy", DType::BF16);
      chk.shape(params_bf16[i], "bf16 copy", params[i].shape(), "its parameter");
      copy = params_bf16[i].data<uint16_t>();
    }
    list.push_back(
        {params[i].data<float>(), grads[i].data<float>(), ptr_or_null<float>(momenta[i]), params[i].numel(), copy});
  }
  if (on_cpu(s)) {
    // Pointers only, as the CUDA launch below: the tensors' storage is stream-ordered.
    s.enqueue_host([list, p] { kc::sgd_step<float>(list, p); });
    return;
  }
#if STALEPROP_WITH_CUDA
  // The pointer table is copied into the launch. As for every CUDA op, the tensors are not
  // captured: their storage is stream-ordered (allocator.h), and memory used by several
  // streams is kept alive by its owner until an event orders the uses.
  std::vector<kcu::SgdTensor> cuda_list;
  cuda_list.reserve(list.size());
  for (const kc::SgdTensor<float>& t : list) cuda_list.push_back({t.param, t.grad, t.momentum, t.size, t.param_bf16});
  kcu::sgd_step(cuda_list, p, cuda_stream(s));
#else
  chk.no_cuda_kernel();
#endif
}

}  // namespace sp::ops
