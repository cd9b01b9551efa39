// Direct bf16 convolutions for inputs with few channels (C <= 4: a ResNet's stem), forward and
// weight gradient, on CUDA cores: the plan and the reasons are in conv_small_c_plan.h. Same
// contract as the tensor-core convolutions (tensor_core.h): bf16 inputs widened to fp32, fp32
// sums, bf16 outputs rounded once after the bias; only the order of the sums differs.
#include <atomic>
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/conv_small_c_plan.h"
#include "kernels/cuda/storage.cuh"
#include "kernels/cuda/tensor_core.h"

namespace sp::kernels::cuda {
namespace {

using detail::BF16;
using detail::element_blocks;
using detail::f32_from_bf16;
using detail::global_thread_index;
using detail::grid_stride;
using detail::kElementThreads;
using detail::kSmallCOutputsPerThread;
using detail::kSmallCThreads;
using detail::kSmallCWgradTile;
using detail::launch_kernel;
using detail::pdl_prologue;
using detail::SmallCPlan;

std::atomic<int> g_small_c{-1};  // -1: not chosen yet (the environment decides at first use)
std::atomic<int64_t> g_small_c_launches{0};

struct SmallCGeom {
  int n, h, w, c, k, r, s, stride, pad, p, q, taps;
  int64_t pixels;
};

SmallCGeom small_c_geom(const Conv2dShape& sh, const SmallCPlan& plan) {
  return {sh.n, sh.h, sh.w, sh.c, sh.k, sh.r, sh.s, sh.stride, sh.pad, sh.p(), sh.q(), plan.taps, plan.pixels};
}

// The input value of tap (r, s, c) for output pixel (n, p, q), 0 in the padding.
__device__ __forceinline__ float patch_value(const uint16_t* x, const SmallCGeom& g, int n, int p, int q, int tap) {
  const int c = tap % g.c, rs = tap / g.c, s = rs % g.s, r = rs / g.s;
  const int hh = p * g.stride - g.pad + r, ww = q * g.stride - g.pad + s;
  if (hh < 0 || hh >= g.h || ww < 0 || ww >= g.w) return 0.f;
  return f32_from_bf16(x[((int64_t(n) * g.h + hh) * g.w + ww) * g.c + c]);
}

// y[pixel, k0 .. k0 + 7] (+ bias), k0 = 8 * (thread % (K / 8)), pixel = the block's
// kSmallCThreads / (K / 8) pixels in order. The filter is staged as fp32 [tap][k] (tap =
// (r * S + s) * C + c, the KRSC order); vec: y 16-byte aligned, so each thread stores its 8
// outputs at once.
__global__ void conv_small_c_fwd_kernel(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y,
                                        SmallCGeom g, int pixels_per_block, bool vec) {
  pdl_prologue();
  extern __shared__ float ws[];
  for (int i = int(threadIdx.x); i < g.taps * g.k; i += int(blockDim.x)) {
    const int tap = i / g.k, kk = i - tap * g.k;
    ws[i] = f32_from_bf16(w[int64_t(kk) * g.taps + tap]);
  }
  __syncthreads();
  const int tpp = g.k / kSmallCOutputsPerThread, local = int(threadIdx.x) / tpp;
  const int64_t pixel = int64_t(blockIdx.x) * pixels_per_block + local;
  if (local >= pixels_per_block || pixel >= g.pixels) return;
  const int k0 = (int(threadIdx.x) - local * tpp) * kSmallCOutputsPerThread;
  const int q = int(pixel % g.q);
  const int64_t np = pixel / g.q;
  const int p = int(np % g.p), n = int(np / g.p);
  float acc[kSmallCOutputsPerThread] = {};
  for (int tap = 0; tap < g.taps; ++tap) {
    const float v = patch_value(x, g, n, p, q, tap);
    const float* wr = ws + tap * g.k + k0;
#pragma unroll
    for (int j = 0; j < kSmallCOutputsPerThread; ++j) acc[j] = fmaf(v, wr[j], acc[j]);
  }
  if (bias != nullptr) {
#pragma unroll
    for (int j = 0; j < kSmallCOutputsPerThread; ++j) acc[j] += bias[k0 + j];
  }
  uint16_t* out = y + pixel * g.k + k0;
  if (vec) {
    BF16::store8(out, acc);
  } else {
#pragma unroll
    for (int j = 0; j < kSmallCOutputsPerThread; ++j) out[j] = BF16::store(acc[j]);
  }
}

// partial[block][o] = sum over the block's chunk of output pixels of x(pixel, tap) * dy[pixel, k],
// o = tap * K + k: thread t owns o = t, t + kSmallCThreads, ... (at most kSmallCOutputsPerThread).
// Per round kSmallCWgradTile pixels' patches (fp32 [pixel][tap]) and gradients ([pixel][k]) are
// staged in shared memory; a warp's threads read one tap's value (a broadcast) and consecutive
// k (consecutive banks).
__global__ void conv_small_c_wgrad_kernel(const uint16_t* x, const uint16_t* dy, float* partial, SmallCGeom g,
                                          int64_t chunk) {
  pdl_prologue();
  extern __shared__ float staged[];
  float* const xs = staged;                               // [kSmallCWgradTile][taps]
  float* const dys = staged + kSmallCWgradTile * g.taps;  // [kSmallCWgradTile][k]
  const int outputs = g.taps * g.k;
  float acc[kSmallCOutputsPerThread] = {};
  const int64_t begin = int64_t(blockIdx.x) * chunk, end = begin + chunk < g.pixels ? begin + chunk : g.pixels;
  for (int64_t base = begin; base < end; base += kSmallCWgradTile) {
    const int rows = end - base < kSmallCWgradTile ? int(end - base) : kSmallCWgradTile;
    __syncthreads();  // the previous round's reads are done
    for (int i = int(threadIdx.x); i < rows * g.k; i += int(blockDim.x)) dys[i] = f32_from_bf16(dy[base * g.k + i]);
    for (int i = int(threadIdx.x); i < rows * g.taps; i += int(blockDim.x)) {
      const int row = i / g.taps, tap = i - row * g.taps;
      const int64_t pixel = base + row;
      const int q = int(pixel % g.q);
      const int64_t np = pixel / g.q;
      xs[i] = patch_value(x, g, int(np / g.p), int(np % g.p), q, tap);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kSmallCOutputsPerThread; ++j) {
      const int o = int(threadIdx.x) + j * kSmallCThreads;
      if (o >= outputs) break;
      const int tap = o / g.k, kk = o - tap * g.k;
      float a = acc[j];
      for (int row = 0; row < rows; ++row) a = fmaf(xs[row * g.taps + tap], dys[row * g.k + kk], a);
      acc[j] = a;
    }
  }
#pragma unroll
  for (int j = 0; j < kSmallCOutputsPerThread; ++j) {
    const int o = int(threadIdx.x) + j * kSmallCThreads;
    if (o < outputs) partial[int64_t(blockIdx.x) * outputs + o] = acc[j];
  }
}

// dw[k * taps + tap] = the blocks' partial sums of o = tap * K + k, added in block order.
__global__ void conv_small_c_wgrad_sum_kernel(const float* partial, int blocks, int taps, int k, float* dw) {
  pdl_prologue();
  const int outputs = taps * k;
  for (int64_t o = global_thread_index(); o < outputs; o += grid_stride()) {
    float sum = 0.f;
    for (int b = 0; b < blocks; ++b) sum += partial[int64_t(b) * outputs + o];
    const int tap = int(o / k), kk = int(o - int64_t(tap) * k);
    dw[int64_t(kk) * taps + tap] = sum;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void set_conv_small_c(bool on) { detail::set_switch(g_small_c, on); }
bool conv_small_c() { return detail::env_switch(g_small_c, "STALEPROP_CONV_SMALL_C", false); }
int64_t conv_small_c_launches() { return g_small_c_launches.load(std::memory_order_relaxed); }

namespace detail {

bool conv_small_c_forward(const Conv2dShape& sh, const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y,
                          cudaStream_t stream) {
  if (!conv_small_c()) return false;
  const SmallCPlan plan = plan_small_c(sh);
  if (!plan.fwd) return false;
  launch_kernel(conv_small_c_fwd_kernel, unsigned(plan.fwd_blocks), kSmallCThreads, size_t(plan.fwd_smem), stream, x, w,
                bias, y, small_c_geom(sh, plan), plan.pixels_per_block, aligned16(y));
  g_small_c_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool conv_small_c_backward_weight(const Conv2dShape& sh, const uint16_t* x, const uint16_t* dy, float* dw,
                                  cudaStream_t stream) {
  if (!conv_small_c()) return false;
  const SmallCPlan plan = plan_small_c(sh);
  if (!plan.wgrad) return false;
  const int outputs = plan.taps * sh.k;
  Workspace partial(sizeof(float) * size_t(plan.wgrad_blocks) * size_t(outputs), stream);
  launch_kernel(conv_small_c_wgrad_kernel, unsigned(plan.wgrad_blocks), kSmallCThreads, size_t(plan.wgrad_smem), stream,
                x, dy, partial.as<float>(), small_c_geom(sh, plan), plan.chunk);
  launch_kernel(conv_small_c_wgrad_sum_kernel, element_blocks(outputs), kElementThreads, 0, stream,
                static_cast<const float*>(partial.as<float>()), plan.wgrad_blocks, plan.taps, sh.k, dw);
  g_small_c_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace detail
}  // namespace sp::kernels::cuda
