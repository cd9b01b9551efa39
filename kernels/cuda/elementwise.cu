// Everything that is not a GEMM, a convolution or a batch norm: pointwise ops (fp32 and
// bf16), precision casts, the option-A shortcut, pooling, linear layers (GEMM + bias),
// softmax cross-entropy and the multi-tensor SGD step.
//
// Pointwise kernels are grid-stride loops in which a thread reads and writes eight elements at
// a time with 16-byte accesses (single elements where a pointer is not 16-byte aligned): each
// output element has one writer, which reads its inputs before writing it, so in-place use
// (y aliasing x) is safe and results are deterministic.
// Where the CPU reference computes an element in a particular order (pooling, the average
// pool's double sum), the kernel uses the same order and matches it bit for bit.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/column_plan.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/layout_gathers.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/storage.cuh"

namespace sp::kernels::cuda {
namespace {

using namespace detail;

// ---- Pointwise -------------------------------------------------------------------------------
// Each pointwise op comes as a pair of instances: kVec moves 16-byte chunks of kChunkElems
// elements (every pointer 16-byte aligned), the other single elements. Both compute every element
// with the same expression, so they give the same bits.

// Grid-stride loop over n elements calling fn(i, Width<W>{}) for elements i .. i + W - 1: the
// chunks, then the last n % kChunkElems elements one at a time (kVec); or every element alone.
template <bool kVec, class Fn>
__device__ __forceinline__ void for_each_element(int64_t n, const Fn& fn) {
  int64_t rest = 0;
  if constexpr (kVec) {
    rest = n / kChunkElems * kChunkElems;
    for (int64_t i = global_thread_index() * kChunkElems; i < rest; i += grid_stride() * kChunkElems)
      fn(i, Width<kChunkElems>{});
  }
  for (int64_t i = rest + global_thread_index(); i < n; i += grid_stride()) fn(i, Width<1>{});
}

// y = op(x) and y = op(a, b), element by element.
template <class S, bool kVec, class Op>
__global__ void unary_kernel(int64_t n, Op op, const typename S::Storage* x, typename S::Storage* y) {
  pdl_prologue();
  for_each_element<kVec>(n, [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    float v[W];
    load_elems<S, W>(x + i, v);
#pragma unroll
    for (int e = 0; e < W; ++e) v[e] = op(v[e]);
    store_elems<S, W>(y + i, v);
  });
}

template <class S, bool kVec, class Op>
__global__ void binary_kernel(int64_t n, Op op, const typename S::Storage* a, const typename S::Storage* b,
                              typename S::Storage* y) {
  pdl_prologue();
  for_each_element<kVec>(n, [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    float u[W], v[W];
    load_elems<S, W>(a + i, u);
    load_elems<S, W>(b + i, v);
#pragma unroll
    for (int e = 0; e < W; ++e) u[e] = op(u[e], v[e]);
    store_elems<S, W>(y + i, u);
  });
}

// relu as "x < 0 ? 0 : x", like the CPU reference: a NaN passes through (and shows up in the loss).
struct Relu {
  __device__ float operator()(float v) const { return v < 0.f ? 0.f : v; }
};
// dx = dy where the forward output y > 0, else 0.
struct ReluGrad {
  __device__ float operator()(float y, float dy) const { return y > 0.f ? dy : 0.f; }
};
struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Scale {
  float alpha;
  __device__ float operator()(float v) const { return alpha * v; }
};

template <bool kVec>
__global__ void fill_kernel(int64_t n, float value, float* y) {
  pdl_prologue();
  for_each_element<kVec>(n, [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    float v[W];
#pragma unroll
    for (int e = 0; e < W; ++e) v[e] = value;
    store_elems<F32, W>(y + i, v);
  });
}

// Precision casts: S::load widens, S::store rounds (storage.cuh).
template <class From, class To, bool kVec>
__global__ void cast_kernel(int64_t n, const typename From::Storage* x, typename To::Storage* y) {
  pdl_prologue();
  for_each_element<kVec>(n, [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    float v[W];
    load_elems<From, W>(x + i, v);
    store_elems<To, W>(y + i, v);
  });
}

// Launches a grid-stride kernel over n elements (nothing for n == 0), one thread per element.
template <class... Params, class... Args>
void launch_elements(void (*kernel)(int64_t, Params...), int64_t n, cudaStream_t stream, Args... args) {
  SP_CHECK(n >= 0, "negative element count ", n);
  if (n == 0) return;
  launch_kernel(kernel, element_blocks(n), kElementThreads, 0, stream, n, args...);
}

// Launches the chunked instance of a pointwise op when aligned, else the single-element one.
template <class... Params, class... Args>
void launch_pointwise(void (*chunked)(int64_t, Params...), void (*single)(int64_t, Params...), bool aligned,
                      int64_t n, cudaStream_t stream, Args... args) {
  SP_CHECK(n >= 0, "negative element count ", n);
  if (n == 0) return;
  if (aligned)
    launch_kernel(chunked, element_blocks(ceil_div(n, kChunkElems)), kElementThreads, 0, stream, n, args...);
  else
    launch_kernel(single, element_blocks(n), kElementThreads, 0, stream, n, args...);
}

// ---- Option-A shortcut -----------------------------------------------------------------------
// The per-chunk gathers are layout_gathers.h's. total counts chunks of y (forward) or of dx
// (backward). (ShortcutAShape's helpers are host code: the output size and pad_lo come as
// arguments.)
template <int W>
__global__ void shortcut_a_forward_kernel(int64_t total, ShortcutAShape sh, int p_out, int q_out, int lo,
                                          const float* x, float* y) {
  pdl_prologue();
  for (int64_t idx = global_thread_index(); idx < total; idx += grid_stride())
    shortcut_a_forward_chunk<W>(sh, p_out, q_out, lo, idx, x, y);
}

template <int W>
__global__ void shortcut_a_backward_kernel(int64_t total, ShortcutAShape sh, int p_out, int q_out, int lo,
                                           const float* dy, float* dx) {
  pdl_prologue();
  for (int64_t idx = global_thread_index(); idx < total; idx += grid_stride())
    shortcut_a_backward_chunk<W>(sh, p_out, q_out, lo, idx, dy, dx);
}

// ---- Max pooling -----------------------------------------------------------------------------
// The per-chunk work is layout_gathers.h's (window_argmax and the gather); total counts
// W-channel chunks of y (forward, argmax) or of dx (gather).
template <int W, int KW>
__global__ void maxpool_forward_kernel(int64_t total, PoolGeom g, const float* x, float* y) {
  pdl_prologue();
  for (int64_t idx = global_thread_index(); idx < total; idx += grid_stride())
    maxpool_forward_chunk<W, KW>(g, idx, x, y);
}

template <int W, int KW, typename A>
__global__ void maxpool_argmax_kernel(int64_t total, PoolGeom g, const float* x, A* arg) {
  pdl_prologue();
  for (int64_t idx = global_thread_index(); idx < total; idx += grid_stride())
    maxpool_argmax_chunk<W, KW>(g, idx, x, arg);
}

template <int W, int KMax, typename A>
__global__ void maxpool_backward_gather_kernel(int64_t total, PoolGeom g, const A* arg, const float* dy, float* dx) {
  pdl_prologue();
  for (int64_t idx = global_thread_index(); idx < total; idx += grid_stride())
    maxpool_gather_chunk<W, KMax>(g, idx, arg, dy, dx);
}

// ---- Global average pooling ------------------------------------------------------------------
// One thread per (image, channel) (layout_gathers.h).
__global__ void global_avgpool_forward_kernel(int64_t total, int64_t hw, int64_t c, const float* x, float* y) {
  pdl_prologue();
  for (int64_t idx = global_thread_index(); idx < total; idx += grid_stride())
    global_avgpool_forward_element(hw, c, idx, x, y);
}

// W channels at a time: 1, or 4 (float4) where c % 4 == 0 and the pointers are 16-byte
// aligned; the same quotient per element either way (layout_gathers.h). total = n * hw * c / W.
template <int W>
__global__ void global_avgpool_backward_kernel(int64_t total, int64_t hw, int64_t c, const float* dy, float* dx) {
  pdl_prologue();
  const int64_t cw = c / W, image = hw * cw;
  const bool narrow = image <= INT32_MAX;  // 32-bit divisions where the indices allow them
  for (int64_t idx = global_thread_index(); idx < total; idx += grid_stride())
    global_avgpool_backward_chunk<W>(cw, image, narrow, float(hw), idx, dy, dx);
}

// ---- Softmax cross-entropy -------------------------------------------------------------------
// A warp per sample (kLossWarps samples per block), then one block adds the per-sample losses
// and hits in a fixed tree order. Per sample, with z' = z - z[argmax] and S = sum exp(z'):
// loss = log S - sum_j q_j z'_j, dlogits = (exp(z') / S - q) / n, all in double (CPU formulas).
constexpr int kLossThreads = 256;
constexpr int kLossWarps = kLossThreads / kWarpSize;

__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double nan_f64() { return __longlong_as_double(0x7ff8000000000000LL); }

// Reduction state of the argmax: the largest non-NaN logit, ties to the smaller index
// (index -1: none seen). The combination is associative and commutative, so the butterfly
// gives every lane the same answer.
struct ArgMax {
  float value;
  int index;
  __device__ void take(float v, int i) {
    if (!isnan(v) && (index < 0 || v > value || (v == value && i < index))) {
      value = v;
      index = i;
    }
  }
};

__global__ void __launch_bounds__(kLossThreads)
    softmax_xent_rows_kernel(int n, int classes, const float* logits, const int32_t* labels, double q_on, double q_off,
                             double* sample_loss, int* hit, float* dlogits) {
  pdl_prologue();
  const int row = int(blockIdx.x) * kLossWarps + int(threadIdx.x) / kWarpSize;
  const int lane = int(threadIdx.x) % kWarpSize;
  if (row >= n) return;  // the whole warp leaves together
  const float* z = logits + int64_t(row) * classes;
  float* dz = dlogits + int64_t(row) * classes;
  const int label = labels[row];
  if (label < 0 || label >= classes) {  // cannot throw from a kernel: poison this sample instead
    for (int j = lane; j < classes; j += kWarpSize) dz[j] = nan_f32();
    if (lane == 0) {
      sample_loss[row] = nan_f64();
      hit[row] = 0;
    }
    return;
  }

  // The CPU scans left to right with "z[j] > z[argmax]": that is the first largest non-NaN
  // logit, except that a NaN z[0] stays the argmax (and makes the loss NaN).
  ArgMax am{0.f, -1};
  for (int j = lane; j < classes; j += kWarpSize) am.take(z[j], j);
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float v = __shfl_xor_sync(kFullWarp, am.value, offset);
    const int i = __shfl_xor_sync(kFullWarp, am.index, offset);
    if (i >= 0) am.take(v, i);
  }
  const float z0 = z[0];
  const int argmax = isnan(z0) || am.index < 0 ? 0 : am.index;
  const double zmax = z[argmax];

  double sum_exp = 0.0, target_dot = 0.0;
  for (int j = lane; j < classes; j += kWarpSize) {
    const double zj = double(z[j]) - zmax;
    sum_exp += exp(zj);
    const double q = j == label ? q_on : q_off;
    if (q != 0) target_dot += q * zj;  // as the CPU: no 0 * -inf
  }
  sum_exp = warp_allreduce_sum(sum_exp);
  target_dot = warp_allreduce_sum(target_dot);
  for (int j = lane; j < classes; j += kWarpSize) {
    const double p = exp(double(z[j]) - zmax) / sum_exp;
    dz[j] = float((p - (j == label ? q_on : q_off)) / double(n));
  }
  if (lane == 0) {
    sample_loss[row] = log(sum_exp) - target_dot;
    hit[row] = argmax == label;
  }
}

__global__ void __launch_bounds__(kLossThreads)
    softmax_xent_mean_kernel(int n, const double* sample_loss, const int* hit, float* loss, int32_t* correct) {
  pdl_prologue();
  __shared__ double losses[kLossThreads];
  __shared__ int hits[kLossThreads];
  const int t = int(threadIdx.x);
  double l = 0.0;
  int h = 0;
  for (int i = t; i < n; i += kLossThreads) {
    l += sample_loss[i];
    h += hit[i];
  }
  losses[t] = l;
  hits[t] = h;
  __syncthreads();
  for (int half = kLossThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      losses[t] += losses[t + half];
      hits[t] += hits[t + half];
    }
    __syncthreads();
  }
  if (t == 0) {
    *loss = float(losses[0] / double(n));
    *correct = hits[0];
  }
}

// ---- SGD -------------------------------------------------------------------------------------
// The whole tensor list travels in the kernel's parameter block (__grid_constant__: read in
// place, never copied to local memory). Each tensor owns a run of consecutive blocks of
// kSgdElementsPerBlock elements; a block finds its tensor by binary search over the runs.
constexpr int kSgdThreads = 256;
constexpr int64_t kSgdElementsPerBlock = 4096;

struct SgdEntry {
  float* param;
  const float* grad;
  float* momentum;
  uint16_t* param_bf16;  // null: no bf16 copy
  int64_t size;
  int64_t first_block;
};

struct SgdLaunch {
  const float* lr_device;  // read in the kernel when set (graph replays), else lr
  float lr, momentum, weight_decay, grad_scale;
  int nesterov;
  int count;
  SgdEntry tensors[kSgdMaxTensors];
};
// Kernel parameters are limited to 32764 bytes (sm_70+, CUDA 12.1+).
static_assert(sizeof(SgdLaunch) <= 32764, "the SGD table must fit the kernel parameter limit");

// One element's update, in the CPU reference's order (kernels/cpu/optim.cpp). Every product and
// sum is rounded on its own (the _rn intrinsics are never contracted into FMAs): left to itself,
// nvcc fused different pairs in the float4 loop and in the single-element loop, and the two paths
// differed in the last bit (H100, 2026-11-26: SgdGivesTheSameBitsFromUnalignedTensors).
__device__ __forceinline__ void sgd_update(float& param, float& mom, float grad, float lr, float mu, float wd, float gs,
                                           bool nesterov) {
  const float g = __fadd_rn(__fmul_rn(gs, grad), __fmul_rn(wd, param));
  if (mu == 0.f) {
    param = __fsub_rn(param, __fmul_rn(lr, g));
    return;
  }
  const float v = __fadd_rn(__fmul_rn(mu, mom), g);
  mom = v;
  param = __fsub_rn(param, __fmul_rn(lr, nesterov ? __fadd_rn(g, __fmul_rn(mu, v)) : v));
}

__global__ void __launch_bounds__(kSgdThreads) sgd_kernel(const __grid_constant__ SgdLaunch launch) {
  pdl_prologue();
  const int64_t block = blockIdx.x;
  int lo = 0, hi = launch.count - 1;  // the last tensor whose run starts at or before this block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (launch.tensors[mid].first_block <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  const SgdEntry& t = launch.tensors[lo];
  const int64_t begin = (block - t.first_block) * kSgdElementsPerBlock;
  const int64_t end = t.size < begin + kSgdElementsPerBlock ? t.size : begin + kSgdElementsPerBlock;
  const float lr = launch.lr_device ? *launch.lr_device : launch.lr, mu = launch.momentum,
              wd = launch.weight_decay, gs = launch.grad_scale;
  const bool nesterov = launch.nesterov != 0;
  // 16-byte accesses where the tensor's arrays are aligned (begin is a multiple of 4 elements;
  // the bf16 copy takes 8-byte stores), then the last (end - begin) % 4 elements one at a time.
  // momentum is not read when mu == 0.
  int64_t rest = begin;
  const uintptr_t bases = reinterpret_cast<uintptr_t>(t.param) | reinterpret_cast<uintptr_t>(t.grad) |
                          (mu != 0.f ? reinterpret_cast<uintptr_t>(t.momentum) : 0);
  if (bases % 16 == 0 && reinterpret_cast<uintptr_t>(t.param_bf16) % 8 == 0) {
    rest = begin + (end - begin) / 4 * 4;
    for (int64_t i = begin + 4 * int64_t(threadIdx.x); i < rest; i += 4 * kSgdThreads) {
      float4 p = *reinterpret_cast<const float4*>(t.param + i);
      const float4 g = *reinterpret_cast<const float4*>(t.grad + i);
      float4 m = mu != 0.f ? *reinterpret_cast<const float4*>(t.momentum + i) : make_float4(0.f, 0.f, 0.f, 0.f);
      sgd_update(p.x, m.x, g.x, lr, mu, wd, gs, nesterov);
      sgd_update(p.y, m.y, g.y, lr, mu, wd, gs, nesterov);
      sgd_update(p.z, m.z, g.z, lr, mu, wd, gs, nesterov);
      sgd_update(p.w, m.w, g.w, lr, mu, wd, gs, nesterov);
      *reinterpret_cast<float4*>(t.param + i) = p;
      if (mu != 0.f) *reinterpret_cast<float4*>(t.momentum + i) = m;
      if (t.param_bf16)
        *reinterpret_cast<uint2*>(t.param_bf16 + i) =
            make_uint2(uint32_t(bf16_from_f32(p.x)) | (uint32_t(bf16_from_f32(p.y)) << 16),
                       uint32_t(bf16_from_f32(p.z)) | (uint32_t(bf16_from_f32(p.w)) << 16));
    }
  }
  for (int64_t i = rest + threadIdx.x; i < end; i += kSgdThreads) {
    float m = mu != 0.f ? t.momentum[i] : 0.f;
    sgd_update(t.param[i], m, t.grad[i], lr, mu, wd, gs, nesterov);
    if (mu != 0.f) t.momentum[i] = m;
    if (t.param_bf16) t.param_bf16[i] = bf16_from_f32(t.param[i]);
  }
}

}  // namespace

// ---- Pointwise -------------------------------------------------------------------------------
namespace {
template <class S, class Op>
void unary(int64_t n, Op op, const typename S::Storage* x, typename S::Storage* y, cudaStream_t stream) {
  launch_pointwise(unary_kernel<S, true, Op>, unary_kernel<S, false, Op>, all_aligned16(x, y), n, stream, op, x, y);
}
template <class S, class Op>
void binary(int64_t n, Op op, const typename S::Storage* a, const typename S::Storage* b, typename S::Storage* y,
            cudaStream_t stream) {
  launch_pointwise(binary_kernel<S, true, Op>, binary_kernel<S, false, Op>, all_aligned16(a, b, y), n, stream, op, a,
                   b, y);
}
}  // namespace

void relu_forward(int64_t n, const float* x, float* y, cudaStream_t stream) { unary<F32>(n, Relu{}, x, y, stream); }
void relu_backward(int64_t n, const float* y, const float* dy, float* dx, cudaStream_t stream) {
  binary<F32>(n, ReluGrad{}, y, dy, dx, stream);
}
void add(int64_t n, const float* a, const float* b, float* y, cudaStream_t stream) {
  binary<F32>(n, Add{}, a, b, y, stream);
}
void scale(int64_t n, float alpha, const float* x, float* y, cudaStream_t stream) {
  unary<F32>(n, Scale{alpha}, x, y, stream);
}
void fill(int64_t n, float value, float* y, cudaStream_t stream) {
  launch_pointwise(fill_kernel<true>, fill_kernel<false>, all_aligned16(y), n, stream, value, y);
}

void relu_forward_bf16(int64_t n, const uint16_t* x, uint16_t* y, cudaStream_t stream) {
  unary<BF16>(n, Relu{}, x, y, stream);
}
void relu_backward_bf16(int64_t n, const uint16_t* y, const uint16_t* dy, uint16_t* dx, cudaStream_t stream) {
  binary<BF16>(n, ReluGrad{}, y, dy, dx, stream);
}
void add_bf16(int64_t n, const uint16_t* a, const uint16_t* b, uint16_t* y, cudaStream_t stream) {
  binary<BF16>(n, Add{}, a, b, y, stream);
}
void scale_bf16(int64_t n, float alpha, const uint16_t* x, uint16_t* y, cudaStream_t stream) {
  unary<BF16>(n, Scale{alpha}, x, y, stream);
}

void f32_to_bf16(int64_t n, const float* x, uint16_t* y, cudaStream_t stream) {
  launch_pointwise(cast_kernel<F32, BF16, true>, cast_kernel<F32, BF16, false>, all_aligned16(x, y), n, stream, x, y);
}
void bf16_to_f32(int64_t n, const uint16_t* x, float* y, cudaStream_t stream) {
  launch_pointwise(cast_kernel<BF16, F32, true>, cast_kernel<BF16, F32, false>, all_aligned16(x, y), n, stream, x, y);
}

// ---- Shortcut and pooling --------------------------------------------------------------------
namespace {
// Whether the option-A shortcut can move 4 channels at a time (see shortcut_a_forward_kernel).
bool shortcut_by_4(const ShortcutAShape& sh, const float* a, const float* b) {
  return sh.c_in % 4 == 0 && sh.c_out % 4 == 0 && sh.pad_lo() % 4 == 0 && all_aligned16(a, b);
}
}  // namespace

void shortcut_a_forward(const ShortcutAShape& sh, const float* x, float* y, cudaStream_t stream) {
  SP_CHECK(sh.valid(), "shortcut_a_forward: invalid shape");
  if (shortcut_by_4(sh, x, y))
    launch_elements(shortcut_a_forward_kernel<4>, sh.y_size() / 4, stream, sh, sh.p(), sh.q(), sh.pad_lo(), x, y);
  else
    launch_elements(shortcut_a_forward_kernel<1>, sh.y_size(), stream, sh, sh.p(), sh.q(), sh.pad_lo(), x, y);
}
void shortcut_a_backward(const ShortcutAShape& sh, const float* dy, float* dx, cudaStream_t stream) {
  SP_CHECK(sh.valid(), "shortcut_a_backward: invalid shape");
  if (shortcut_by_4(sh, dy, dx))
    launch_elements(shortcut_a_backward_kernel<4>, sh.x_size() / 4, stream, sh, sh.p(), sh.q(), sh.pad_lo(), dy, dx);
  else
    launch_elements(shortcut_a_backward_kernel<1>, sh.x_size(), stream, sh, sh.p(), sh.q(), sh.pad_lo(), dy, dx);
}

namespace {
PoolGeom pool_geom(const Pool2dShape& sh) {
  SP_CHECK(sh.valid(), "maxpool2d: invalid shape");
  return PoolGeom{sh.h, sh.w, sh.c, sh.window, sh.stride, sh.pad, sh.p(), sh.q()};
}

// Calls f with the window size as a compile-time constant where it is a common one (2 x 2,
// 3 x 3: the kernels unroll it), else with 0 (the kernels read it at run time).
template <class F>
void with_window(int window, F&& f) {
  if (window == 3)
    f(std::integral_constant<int, 3>{});
  else if (window == 2)
    f(std::integral_constant<int, 2>{});
  else
    f(std::integral_constant<int, 0>{});
}

// W channels at a time (see window_argmax).
template <int W>
void maxpool_forward_w(const PoolGeom& g, int64_t y_size, const float* x, float* y, cudaStream_t stream) {
  with_window(g.window, [&](auto kw) {
    launch_elements(maxpool_forward_kernel<W, decltype(kw)::value>, y_size / W, stream, g, x, y);
  });
}
// The windows' tap indices as bytes where a window has at most 225 taps (15 x 15: 255 stays
// free for a window with no tap inside the image), else as ints (layout_gathers.h).
template <int W, typename A>
void maxpool_backward_taps(const PoolGeom& g, int64_t y_size, int64_t x_size, const float* x, const float* dy,
                           float* dx, cudaStream_t stream) {
  const Workspace arg(size_t(y_size) * sizeof(A), stream);
  A* a = arg.as<A>();
  with_window(g.window, [&](auto kw) {
    launch_elements(maxpool_argmax_kernel<W, decltype(kw)::value, A>, y_size / W, stream, g, x, a);
  });
  // At most ceil(window / stride) windows along each axis contain a pixel: one where the windows
  // do not overlap (2 x 2 stride 2), two for 3 x 3 stride 2; their loads go together
  // (layout_gathers.h).
  const int per_axis = (g.window + g.stride - 1) / g.stride;
  const auto gather = per_axis <= 1   ? maxpool_backward_gather_kernel<W, 1, A>
                      : per_axis <= 2 ? maxpool_backward_gather_kernel<W, 2, A>
                                      : maxpool_backward_gather_kernel<W, 0, A>;
  launch_elements(gather, x_size / W, stream, g, static_cast<const A*>(a), dy, dx);
}
template <int W>
void maxpool_backward_w(const PoolGeom& g, int64_t y_size, int64_t x_size, const float* x, const float* dy, float* dx,
                        cudaStream_t stream) {
  if (g.window <= 15)
    maxpool_backward_taps<W, uint8_t>(g, y_size, x_size, x, dy, dx, stream);
  else
    maxpool_backward_taps<W, int>(g, y_size, x_size, x, dy, dx, stream);
}
}  // namespace

void maxpool2d_forward(const Pool2dShape& sh, const float* x, float* y, cudaStream_t stream) {
  const PoolGeom g = pool_geom(sh);  // checks the shape before y_size() divides by its stride
  if (g.c % 4 == 0 && all_aligned16(x, y))
    maxpool_forward_w<4>(g, sh.y_size(), x, y, stream);
  else
    maxpool_forward_w<1>(g, sh.y_size(), x, y, stream);
}
void maxpool2d_backward(const Pool2dShape& sh, const float* x, const float* dy, float* dx, cudaStream_t stream) {
  const PoolGeom g = pool_geom(sh);
  if (sh.y_size() == 0 || sh.x_size() == 0) return;
  // The scratch array comes from cudaMallocAsync (256-byte aligned), so its groups of four tap
  // indices are aligned.
  if (g.c % 4 == 0 && all_aligned16(x, dy, dx))
    maxpool_backward_w<4>(g, sh.y_size(), sh.x_size(), x, dy, dx, stream);
  else
    maxpool_backward_w<1>(g, sh.y_size(), sh.x_size(), x, dy, dx, stream);
}

void global_avgpool_forward(int64_t n, int64_t hw, int64_t c, const float* x, float* y, cudaStream_t stream) {
  // One thread per (image, channel), each summing a column of hw values: few threads, so blocks
  // of one warp, which spread ResNet-20's 8192 sums at batch 128 over 256 blocks instead of 32
  // of 256 threads on 132 SMs. Same sums, same order.
  const int64_t total = n * c;
  SP_CHECK(total >= 0, "negative element count ", total);
  if (total == 0) return;
  constexpr int kThreads = 32;
  launch_kernel(global_avgpool_forward_kernel, unsigned(std::min(ceil_div(total, kThreads), int64_t(1) << 20)),
                kThreads, 0, stream, total, hw, c, x, y);
}
void global_avgpool_backward(int64_t n, int64_t hw, int64_t c, const float* dy, float* dx, cudaStream_t stream) {
  if (c % 4 == 0 && all_aligned16(dy, dx))
    launch_elements(global_avgpool_backward_kernel<4>, n * hw * c / 4, stream, hw, c, dy, dx);
  else
    launch_elements(global_avgpool_backward_kernel<1>, n * hw * c, stream, hw, c, dy, dx);
}

// ---- Linear: the GEMMs of the CPU reference, bias in the GEMM's epilogue ---------------------
void linear_forward(int64_t n, int64_t in, int64_t out, const float* x, const float* w, const float* b, float* y,
                    cudaStream_t stream) {
  gemm_bias(false, true, n, out, in, 1.f, x, in, w, in, 0.f, y, out, b, stream);
}

void linear_backward(int64_t n, int64_t in, int64_t out, const float* x, const float* w, const float* dy, float* dx,
                     float* dw, float* db, cudaStream_t stream) {
  if (dx) gemm_bias(false, false, n, in, out, 1.f, dy, out, w, in, 0.f, dx, in, nullptr, stream);
  if (dw) gemm_bias(true, false, out, in, n, 1.f, dy, out, x, in, 0.f, dw, in, nullptr, stream);
  if (db) column_sums(n, out, dy, db, stream);
}

// ---- Loss ------------------------------------------------------------------------------------
void softmax_cross_entropy(int64_t n, int64_t classes, const float* logits, const int32_t* labels, float smoothing,
                           float* loss, float* dlogits, int32_t* correct, cudaStream_t stream) {
  SP_CHECK(n >= 0 && n <= (int64_t(1) << 30) && classes > 0 && classes <= (int64_t(1) << 30),
           "softmax_cross_entropy: unsupported size ", n, " x ", classes);
  const double eps = double(smoothing);
  const double q_off = eps / double(classes);  // target mass of every class
  const double q_on = 1.0 - eps + q_off;       // target mass of the labelled class
  Workspace ws((sizeof(double) + sizeof(int)) * size_t(n), stream);
  double* sample_loss = ws.as<double>();
  int* hit = reinterpret_cast<int*>(sample_loss + n);
  if (n > 0) {
    launch_kernel(softmax_xent_rows_kernel, unsigned(ceil_div(n, kLossWarps)), kLossThreads, 0, stream, int(n),
                  int(classes), logits, labels, q_on, q_off, sample_loss, hit, dlogits);
  }
  // With n == 0 the mean is 0 / 0 = NaN, as on the CPU.
  launch_kernel(softmax_xent_mean_kernel, 1, kLossThreads, 0, stream, int(n), sample_loss, hit, loss, correct);
}

// ---- SGD -------------------------------------------------------------------------------------
void sgd_step(const std::vector<SgdTensor>& tensors, const SgdParams& p, cudaStream_t stream) {
  SgdLaunch launch{};
  launch.lr_device = p.lr_device;
  launch.lr = p.lr, launch.momentum = p.momentum, launch.weight_decay = p.weight_decay;
  launch.grad_scale = p.grad_scale, launch.nesterov = p.nesterov;
  auto flush = [&](int64_t blocks) {
    if (launch.count == 0) return;
    launch_kernel(sgd_kernel, unsigned(blocks), kSgdThreads, 0, stream, launch);
    launch.count = 0;
  };
  int64_t blocks = 0;
  for (const SgdTensor& t : tensors) {
    SP_CHECK(t.size >= 0, "sgd_step: negative tensor size ", t.size);
    SP_CHECK(p.momentum == 0.f || t.momentum != nullptr, "sgd_step: momentum ", p.momentum,
             " needs a momentum buffer for every tensor");
    if (t.size == 0) continue;  // owns no block: the search must never land on it
    if (launch.count == kSgdMaxTensors) flush(blocks), blocks = 0;
    launch.tensors[launch.count++] = SgdEntry{t.param, t.grad, t.momentum, t.param_bf16, t.size, blocks};
    blocks += ceil_div(t.size, kSgdElementsPerBlock);
    SP_CHECK(blocks < (int64_t(1) << 31), "sgd_step: too many elements for one launch");
  }
  flush(blocks);
}

}  // namespace sp::kernels::cuda
