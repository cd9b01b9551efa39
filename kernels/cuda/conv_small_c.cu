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
using detail::kSmallCMaxUnitsPerThread;
using detail::kSmallCOutputsPerThread;
using detail::kSmallCPixelsPerThread;
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

// Output pixel `pixel` as the offset of its image in x and the input row and column of its
// window's top-left tap (negative in the padding).
struct PixelOrigin {
  int64_t image;
  int h0, w0;
};
__device__ __forceinline__ PixelOrigin pixel_origin(const SmallCGeom& g, int64_t pixel) {
  const int q = int(pixel % g.q);
  const int64_t np = pixel / g.q;
  const int p = int(np % g.p), n = int(np / g.p);
  return {int64_t(n) * g.h * g.w * g.c, p * g.stride - g.pad, q * g.stride - g.pad};
}

// y[pixel, k0 .. k0 + 7] (+ bias) for the thread's kSmallCPixelsPerThread pixels: slot
// thread / (K / 8), pixels b * pixels_per_block + slot + j * slots, k0 = 8 * (thread % (K / 8)).
// The filter is staged as fp32, tap by tap (tap = (r * S + s) * C + c, the KRSC order) in two
// planes of channels; each tap's 8 weights are two 16-byte shared-memory reads serving 32 FMAs.
// vec: y 16-byte aligned, so each pixel's 8 outputs are one 16-byte store.
__global__ void conv_small_c_fwd_kernel(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y,
                                        SmallCGeom g, int slots, bool vec) {
  pdl_prologue();
  extern __shared__ float4 ws4[];
  float* const ws = reinterpret_cast<float*>(ws4);
  // Tap by tap, channels 8m .. 8m + 3 in one plane and 8m + 4 .. 8m + 7 in the other (so that a
  // thread's two 16-byte reads are of the two planes, and a quarter warp's reads hit distinct
  // banks); written in shared-memory order, the writes of a warp conflict-free.
  for (int i = int(threadIdx.x); i < g.taps * g.k; i += int(blockDim.x)) {
    const int tap = i / g.k, rest = i - tap * g.k, plane = rest / (g.k / 2), j = rest - plane * (g.k / 2);
    const int kk = 8 * (j / 4) + 4 * plane + j % 4;
    ws[i] = f32_from_bf16(w[int64_t(kk) * g.taps + tap]);
  }
  __syncthreads();
  constexpr int kP = kSmallCPixelsPerThread;
  const int tpp = g.k / kSmallCOutputsPerThread, slot = int(threadIdx.x) / tpp;
  if (slot >= slots) return;
  const int k0 = (int(threadIdx.x) - slot * tpp) * kSmallCOutputsPerThread;
  int64_t pixel[kP];
  PixelOrigin at[kP];
#pragma unroll
  for (int j = 0; j < kP; ++j) {
    pixel[j] = int64_t(blockIdx.x) * slots * kP + slot + j * slots;
    at[j] = pixel_origin(g, pixel[j] < g.pixels ? pixel[j] : 0);
  }
  float acc[kP][kSmallCOutputsPerThread] = {};
  for (int r = 0; r < g.r; ++r)
    for (int s = 0; s < g.s; ++s) {
      const uint16_t* from[kP];
#pragma unroll
      for (int j = 0; j < kP; ++j) {
        const int hh = at[j].h0 + r, ww = at[j].w0 + s;
        const bool inside = pixel[j] < g.pixels && hh >= 0 && hh < g.h && ww >= 0 && ww < g.w;
        from[j] = inside ? x + at[j].image + (int64_t(hh) * g.w + ww) * g.c : nullptr;
      }
      for (int c = 0; c < g.c; ++c) {
        const int tap = (r * g.s + s) * g.c + c;
        const float4 wa = ws4[tap * g.k / 4 + k0 / 8], wb = ws4[tap * g.k / 4 + g.k / 8 + k0 / 8];
        const float wv[kSmallCOutputsPerThread] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
        for (int j = 0; j < kP; ++j) {
          const float v = from[j] != nullptr ? f32_from_bf16(from[j][c]) : 0.f;
#pragma unroll
          for (int e = 0; e < kSmallCOutputsPerThread; ++e) acc[j][e] = fmaf(v, wv[e], acc[j][e]);
        }
      }
    }
#pragma unroll
  for (int j = 0; j < kP; ++j) {
    if (pixel[j] >= g.pixels) break;  // the later ones are further on
    if (bias != nullptr) {
#pragma unroll
      for (int e = 0; e < kSmallCOutputsPerThread; ++e) acc[j][e] += bias[k0 + e];
    }
    uint16_t* out = y + pixel[j] * g.k + k0;
    if (vec) {
      BF16::store8(out, acc[j]);
    } else {
#pragma unroll
      for (int e = 0; e < kSmallCOutputsPerThread; ++e) out[e] = BF16::store(acc[j][e]);
    }
  }
}

// partial[block][o] = sum over the block's chunk of output pixels of x(pixel, tap) * dy[pixel, k],
// o = tap * K + k, in units of 2 taps x 4 channels (SmallCPlan). Per round kSmallCWgradTile
// pixels' patches (fp32 [pixel][taps_pad], the pad tap 0) and gradients ([pixel][k]) are staged
// in shared memory, after a table of each staged pixel's origin; each tap's (r, s, c) is tabled
// once. In the sums a warp reads one tap pair (8 bytes, a broadcast) and consecutive 16-byte
// groups of channels: two shared-memory reads per 8 FMAs. vec_dy: dy 16-byte aligned (K % 8 == 0 always), staged 8
// values at a time.
__global__ void conv_small_c_wgrad_kernel(const uint16_t* x, const uint16_t* dy, float* partial, SmallCGeom g,
                                          int64_t chunk, int taps_pad, int units, bool vec_dy) {
  pdl_prologue();
  extern __shared__ float4 smem4[];
  float* const xs = reinterpret_cast<float*>(smem4);    // [tile][taps_pad]
  float* const dys = xs + kSmallCWgradTile * taps_pad;  // [tile][k], 16-byte aligned
  int* const tap_r = reinterpret_cast<int*>(dys + kSmallCWgradTile * g.k);
  int* const tap_s = tap_r + taps_pad;
  int* const tap_c = tap_s + taps_pad;
  int64_t* const row_image = reinterpret_cast<int64_t*>(tap_c + taps_pad);  // 8-byte aligned: taps_pad is even
  int* const row_h0 = reinterpret_cast<int*>(row_image + kSmallCWgradTile);
  int* const row_w0 = row_h0 + kSmallCWgradTile;
  for (int tap = int(threadIdx.x); tap < g.taps; tap += int(blockDim.x)) {
    const int c = tap % g.c, rs = tap / g.c;
    tap_r[tap] = rs / g.s, tap_s[tap] = rs % g.s, tap_c[tap] = c;
  }
  const int kq = g.k / 4;
  float acc[kSmallCMaxUnitsPerThread][8] = {};
  const int64_t begin = int64_t(blockIdx.x) * chunk, end = begin + chunk < g.pixels ? begin + chunk : g.pixels;
  for (int64_t base = begin; base < end; base += kSmallCWgradTile) {
    const int rows = end - base < kSmallCWgradTile ? int(end - base) : kSmallCWgradTile;
    __syncthreads();  // the previous round's reads (and, the first time, the tap table) are done
    for (int row = int(threadIdx.x); row < rows; row += int(blockDim.x)) {
      const PixelOrigin o = pixel_origin(g, base + row);
      row_image[row] = o.image, row_h0[row] = o.h0, row_w0[row] = o.w0;
    }
    const uint16_t* const dy_rows = dy + base * g.k;
    if (vec_dy) {
      for (int i = int(threadIdx.x); i < rows * g.k / 8; i += int(blockDim.x)) {
        float v[8];
        BF16::load8(dy_rows + 8 * i, v);
        reinterpret_cast<float4*>(dys)[2 * i] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(dys)[2 * i + 1] = make_float4(v[4], v[5], v[6], v[7]);
      }
    } else {
      for (int i = int(threadIdx.x); i < rows * g.k; i += int(blockDim.x)) dys[i] = f32_from_bf16(dy_rows[i]);
    }
    __syncthreads();  // the origins are tabled
    for (int i = int(threadIdx.x); i < rows * taps_pad; i += int(blockDim.x)) {
      const int row = i / taps_pad, tap = i - row * taps_pad;
      float v = 0.f;
      if (tap < g.taps) {
        const int hh = row_h0[row] + tap_r[tap], ww = row_w0[row] + tap_s[tap];
        if (hh >= 0 && hh < g.h && ww >= 0 && ww < g.w)
          v = f32_from_bf16(x[row_image[row] + (int64_t(hh) * g.w + ww) * g.c + tap_c[tap]]);
      }
      xs[i] = v;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kSmallCMaxUnitsPerThread; ++j) {
      const int u = int(threadIdx.x) + j * kSmallCThreads;
      if (u >= units) break;
      const int t0 = 2 * (u / kq), k0 = 4 * (u - (u / kq) * kq);
      float a[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) a[e] = acc[j][e];
      for (int row = 0; row < rows; ++row) {
        const float2 xp = reinterpret_cast<const float2*>(xs)[(row * taps_pad + t0) / 2];  // t0, taps_pad even
        const float x0 = xp.x, x1 = xp.y;
        const float4 d = reinterpret_cast<const float4*>(dys)[(row * g.k + k0) / 4];
        a[0] = fmaf(x0, d.x, a[0]), a[1] = fmaf(x0, d.y, a[1]), a[2] = fmaf(x0, d.z, a[2]), a[3] = fmaf(x0, d.w, a[3]);
        a[4] = fmaf(x1, d.x, a[4]), a[5] = fmaf(x1, d.y, a[5]), a[6] = fmaf(x1, d.z, a[6]), a[7] = fmaf(x1, d.w, a[7]);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[j][e] = a[e];
    }
  }
  const int outputs = g.taps * g.k;
#pragma unroll
  for (int j = 0; j < kSmallCMaxUnitsPerThread; ++j) {
    const int u = int(threadIdx.x) + j * kSmallCThreads;
    if (u >= units) break;
    const int t0 = 2 * (u / kq), k0 = 4 * (u - (u / kq) * kq);
    float* const out = partial + int64_t(blockIdx.x) * outputs;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      out[t0 * g.k + k0 + e] = acc[j][e];
      if (t0 + 1 < g.taps) out[(t0 + 1) * g.k + k0 + e] = acc[j][4 + e];
    }
  }
}

// dw[k * taps + tap] = the blocks' partial sums of o = tap * K + k, added in block order.
__global__ void conv_small_c_wgrad_sum_kernel(const float* partial, int blocks, int taps, int k, float* dw) {
  pdl_prologue();
  const int outputs = taps * k;
  for (int64_t o = global_thread_index(); o < outputs; o += grid_stride()) {
    // Eight independent loads in flight at a time, still added in block order.
    float sum = 0.f;
    int b = 0;
    for (; b + 8 <= blocks; b += 8) {
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = partial[int64_t(b + e) * outputs + o];
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += v[e];
    }
    for (; b < blocks; ++b) sum += partial[int64_t(b) * outputs + o];
    const int tap = int(o / k), kk = int(o - int64_t(tap) * k);
    dw[int64_t(kk) * taps + tap] = sum;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void set_conv_small_c(bool on) { detail::set_switch(g_small_c, on); }
bool conv_small_c() { return detail::env_switch(g_small_c, "STALEPROP_CONV_SMALL_C", true); }
int64_t conv_small_c_launches() { return g_small_c_launches.load(std::memory_order_relaxed); }

namespace detail {

bool conv_small_c_forward(const Conv2dShape& sh, const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y,
                          cudaStream_t stream) {
  if (!conv_small_c()) return false;
  const SmallCPlan plan = plan_small_c(sh);
  if (!plan.fwd) return false;
  launch_kernel(conv_small_c_fwd_kernel, unsigned(plan.fwd_blocks), kSmallCThreads, size_t(plan.fwd_smem), stream, x, w,
                bias, y, small_c_geom(sh, plan), plan.slots, aligned16(y));
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
                x, dy, partial.as<float>(), small_c_geom(sh, plan), plan.chunk, plan.taps_pad, plan.units,
                aligned16(dy));
  launch_kernel(conv_small_c_wgrad_sum_kernel, element_blocks(outputs), kElementThreads, 0, stream,
                static_cast<const float*>(partial.as<float>()), plan.wgrad_blocks, plan.taps, sh.k, dw);
  g_small_c_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace detail
}  // namespace sp::kernels::cuda
