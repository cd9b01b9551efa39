// Batch normalisation over NHWC activations viewed as [m = N*H*W, c], following the CPU
// reference formula by formula (kernels/cpu/batchnorm.cpp):
//   training forward   one pass over x for the statistics: the deterministic double column
//                      reduction (column_reduce.cuh) of the shifted moments sum(x - s) and
//                      sum((x - s)^2), with the shift s the channel's first element. A shift
//                      near the mean keeps the variance sum/m - mean^2 from cancelling when
//                      |mean| >> std: the relative error grows with ((mean - s) / std)^2 * 2^-53
//                      in double, and s is a sample of the channel, so that stays far below
//                      fp32 rounding (the CPU reference's two passes agree to it). A warp per
//                      channel finalises the statistics, the running-stat update and the gain
//                      gamma * invstd; then an element pass normalises: x is read twice.
//   inference forward  the gain from the running variance, a thread per channel; one element pass.
//   backward           one double reduction pass for sum(dy) and sum(dy * xhat), a warp per
//                      channel for dgamma, dbeta and the per-channel coefficients, one element pass.
// The fused BN+ReLU and BN+add+ReLU variants run the same passes: the residual add and the
// ReLU happen in the forward's element pass, and the backward recomputes the ReLU mask from
// the saved output y inside its reduction pass, which also writes dresidual (the masked
// gradient g) where there is one: the element pass then reads g back instead of dy and y (else
// it recomputes the mask). So fusion removes the separate add/relu passes and their round trips
// through memory.
// Every pass moves 16-byte chunks of eight elements per thread when c % 8 == 0 and the pointers
// are 16-byte aligned (column_plan.h), else single elements; the reductions add in the same
// order either way, so both give the same bits.
// The training forward and the backward also have a persistent form (bn_persistent in ops.h):
// the three passes as one cooperative kernel with two grid barriers, whose blocks keep what
// they read in shared memory where it fits, so the element pass does not read it again and
// two launches are saved. It computes every value with the same device functions as the
// separate kernels, in the same order: both forms give the same bits.
#include <cooperative_groups.h>

#include <atomic>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels/cuda/column_reduce.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/storage.cuh"

namespace sp::kernels::cuda {
namespace {

using namespace detail;
namespace cg = cooperative_groups;

// The element passes' loop over the elements of a row-major [rows, c] matrix (total elements),
// calling fn(i, j, Width<W>) for the W elements i .. i + W - 1 of row-major column j .. j + W - 1:
// chunks of kChunkElems (kVec: c % kChunkElems == 0, pointers 16-byte aligned) or single
// elements, from the matrix's end to its start (column_plan.h's DescendingCursor: the rows the
// statistics pass read last, still in L2 where the matrix is larger, are read first). j is
// tracked incrementally: one 64-bit division per thread instead of one per element.
template <bool kVec, class Fn>
__device__ __forceinline__ void for_each_with_channel(int64_t total, int c, const Fn& fn) {
  constexpr int kWidth = kVec ? kChunkElems : 1;
  for (DescendingCursor k =
           descending_cursor(total / kWidth, gridDim.x, blockIdx.x, int(blockDim.x), int(threadIdx.x), kWidth, c);
       more(k); retreat(k, c))
    fn(k.item * kWidth, k.j, Width<kWidth>{});
}

// Blocks of a for_each_with_channel kernel over total > 0 elements.
unsigned channel_blocks(int64_t total, bool vec) { return element_blocks(vec ? total / kChunkElems : total); }

// The forward's chunked element pass where c divides kElementThreads * kChunkElems (every CIFAR
// ResNet layer: 16 to 512 channels): a thread's items, kElementThreads apart, all lie at one
// channel j. It then reads the per-channel parameters once, not with every item (three loads of
// 32 bytes beside the data's one or two), and loads kNormalizeItems items before it finishes the
// first, the grid giving each thread that many where the tensor has them (one_channel_blocks).
// Per SM (SASS and registers from cuobjdump 13.5, CUDA 13.0 build): the per-item loop kept one
// item's loads in flight per thread, 56 registers (four blocks of 256 threads): 32 KiB of x in
// flight; here 118 registers (two blocks) and four items: 64 KiB (twice that with a residual).
// The backward's element pass keeps the per-item loop: its five per-channel parameters held, a
// thread of two items took 110 registers, fewer bytes in flight than its 48-register threads of
// one item (five blocks). The walk and the per-element arithmetic are for_each_with_channel's:
// the same bits.
bool one_channel(int c, bool vec) { return vec && (int64_t(kElementThreads) * kChunkElems) % c == 0; }
// kItems items a thread, but at least kMinOneChannelBlocks blocks where the tensor has an item for
// each of their threads: a small layer's grid (ResNet-20's 8 px layers at batch 128: 64 blocks of
// four items a thread) would leave most SMs idle.
constexpr int64_t kMinOneChannelBlocks = 264;  // two 256-thread blocks (118 registers) on each of 132 SMs
unsigned one_channel_blocks(int64_t total, int items) {
  const int64_t chunks = total / kChunkElems;
  return element_blocks(std::max(ceil_div(chunks, items), std::min(chunks, kMinOneChannelBlocks * kElementThreads)));
}

// The walk of for_each_with_channel (chunks only) where one_channel holds: params(j) once, then
// load(i, v) for kItems items before finish(i, v) for each, i the first element of an item, v the
// item's Vals; the items left one at a time.
template <int kItems, class Vals, class Params, class Load, class Finish>
__device__ __forceinline__ void for_each_at_one_channel(int64_t total, int c, const Params& params, const Load& load,
                                                        const Finish& finish) {
  const DescendingCursor k =
      descending_cursor(total / kChunkElems, gridDim.x, blockIdx.x, int(blockDim.x), int(threadIdx.x), kChunkElems, c);
  if (!more(k)) return;
  params(k.j);
  const int64_t apart = k.threads;
  int64_t item = k.item;
  for (; item - (kItems - 1) * apart >= k.begin; item -= kItems * apart) {
    Vals v[kItems];
#pragma unroll
    for (int u = 0; u < kItems; ++u) load((item - u * apart) * kChunkElems, v[u]);
#pragma unroll
    for (int u = 0; u < kItems; ++u) finish((item - u * apart) * kChunkElems, v[u]);
  }
  for (; item >= k.begin; item -= apart) {
    Vals v;
    load(item * kChunkElems, v);
    finish(item * kChunkElems, v);
  }
}
// Items in flight per thread of the forward's element pass.
constexpr int kNormalizeItems = 4;

// Activations (x, residual, y, dy, dx, dresidual) are stored as S::Storage (fp32 or bf16) and
// computed on in fp32; parameters, statistics and reductions are fp32/double in both cases.

// The first ncols of the kChunkElems per-channel floats at p + j0, zeros after them.
__device__ __forceinline__ void load_params(const float* p, int j0, int ncols, float (&v)[kChunkElems]) {
#pragma unroll
  for (int e = 0; e < kChunkElems; ++e) v[e] = e < ncols ? p[j0 + e] : 0.f;
}

// Row chunk i, columns j0 ... of a row-major [., c] matrix: a chunk store, or the first ncols.
template <class S, bool kVec>
__device__ __forceinline__ void store_row(typename S::Storage* base, int64_t i, int c, int j0, int ncols,
                                          const float (&v)[kChunkElems]) {
  typename S::Storage* p = base + i * c + j0;
  if constexpr (kVec) {
    S::store8(p, v);
  } else {
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e)
      if (e < ncols) p[e] = S::store(v[e]);
  }
}

// ---- Reduction terms (column_reduce.cuh's Term) ---------------------------------------------
// The double arithmetic is written with explicit roundings (__dadd_rn, __fma_rn, ...) so that
// the compiler cannot contract it differently in the separate and the persistent kernels: both
// give the same bits.
//
// acc[0] += x - s, acc[1] += (x - s)^2 with the shift s = x[0, j] (read only when rows exist).
template <class S>
struct ShiftedMomentsTerm {
  static constexpr int kVals = 1;  // x
  const typename S::Storage* x;
  int c;
  struct Cols {
    float shift[kChunkElems];
  };
  __device__ Cols columns(int j0, int ncols) const {
    Cols k;
    load_elems_partial<S>(x + j0, ncols, k.shift);
    return k;
  }
  template <bool kVec>
  __device__ void load(int64_t i, int j0, int ncols, float (&v)[1][kChunkElems]) const {
    load_row<S, kVec>(x, i, c, j0, ncols, v[0]);
  }
  __device__ void prefetch(int64_t i, int j0) const { prefetch_l2(x + i * c + j0); }
  __device__ void add(const float (&v)[1][kChunkElems], const Cols& k, double (&acc)[2][kChunkElems]) const {
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e) {
      const double d = __dsub_rn(double(v[0][e]), double(k.shift[e]));
      acc[0][e] = __dadd_rn(acc[0][e], d);
      acc[1][e] = __fma_rn(d, d, acc[1][e]);
    }
  }
};

// acc[0] += g, acc[1] += g * xhat, with g the gradient reaching the normalisation: dy, or for
// the fused variants dy where the forward output y > 0 else 0 (relu_backward's form). With g_out
// set (the fused BN+add+ReLU's dresidual, which is g), the reduction also stores g there as it
// reads it, so that the element pass reads g once instead of dy and y (7 passes over the tensor
// instead of 8). g_out may alias dy: each element is read and then written by one thread.
template <class S>
struct GradTerm {
  static constexpr int kVals = 2;  // x, g
  const typename S::Storage* x;
  const typename S::Storage* y;  // null for the plain backward
  const typename S::Storage* dy;
  const float* mean;
  const float* invstd;
  int c;
  typename S::Storage* g_out = nullptr;
  struct Cols {
    float mean[kChunkElems], invstd[kChunkElems];
  };
  __device__ Cols columns(int j0, int ncols) const {
    Cols k;
    load_params(mean, j0, ncols, k.mean);
    load_params(invstd, j0, ncols, k.invstd);
    return k;
  }
  template <bool kVec>
  __device__ void load(int64_t i, int j0, int ncols, float (&v)[2][kChunkElems]) const {
    load_row<S, kVec>(x, i, c, j0, ncols, v[0]);
    load_row<S, kVec>(dy, i, c, j0, ncols, v[1]);
    if (y != nullptr) {
      float yv[kChunkElems];
      load_row<S, kVec>(y, i, c, j0, ncols, yv);
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) v[1][e] = yv[e] > 0.f ? v[1][e] : 0.f;
    }
    if (g_out != nullptr) store_row<S, kVec>(g_out, i, c, j0, ncols, v[1]);
  }
  __device__ void prefetch(int64_t i, int j0) const {
    prefetch_l2(x + i * c + j0);
    prefetch_l2(dy + i * c + j0);
    if (y != nullptr) prefetch_l2(y + i * c + j0);
  }
  __device__ void add(const float (&v)[2][kChunkElems], const Cols& k, double (&acc)[2][kChunkElems]) const {
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e) {
      const double g = double(v[1][e]);
      const double xhat = __dmul_rn(__dsub_rn(double(v[0][e]), double(k.mean[e])), double(k.invstd[e]));
      acc[0][e] = __dadd_rn(acc[0][e], g);
      acc[1][e] = __fma_rn(g, xhat, acc[1][e]);
    }
  }
};

// ---- Per-channel finalisation: one warp per channel, lane 0 writes -------------------------
// Channel j's statistics from the reduction's chunk partials; all 32 lanes of the warp call it.
template <class S>
__device__ __forceinline__ void bn_statistics_column(int j, const double* partial, int chunks, int64_t m, int c,
                                                     const typename S::Storage* x, const float* gamma, float eps,
                                                     float momentum, float* running_mean, float* running_var,
                                                     float* save_mean, float* save_invstd, float* gain) {
  double sums[2];
  warp_sum_chunks(partial, chunks, 2 * c, {j, c + j}, sums);
  const double sum_d = sums[0], sum_d2 = sums[1];
  if (threadIdx.x % kWarpSize != 0) return;
  // With m == 0 the statistics are NaN (0 / 0), as in the reference; x is not read.
  const double shift = m > 0 ? double(S::load(x[j])) : 0.0;
  const double mean_d = sum_d / double(m);
  const double mean = __dadd_rn(shift, mean_d);
  const double centred = __dsub_rn(sum_d2 / double(m), __dmul_rn(mean_d, mean_d));
  const double biased = centred > 0.0 ? centred : (centred == centred ? 0.0 : centred);  // rounding, not NaN
  // A single sample has no unbiased estimate; its (zero) biased variance stands in.
  const double unbiased = m > 1 ? __dmul_rn(biased, double(m)) / double(m - 1) : biased;
  const double mom = double(momentum), keep = __dsub_rn(1.0, mom);
  running_mean[j] = float(__fma_rn(mom, mean, __dmul_rn(keep, double(running_mean[j]))));
  running_var[j] = float(__fma_rn(mom, unbiased, __dmul_rn(keep, double(running_var[j]))));
  save_mean[j] = float(mean);
  const float invstd = float(1.0 / sqrt(__dadd_rn(biased, double(eps))));
  save_invstd[j] = invstd;
  gain[j] = __fmul_rn(gamma[j], invstd);
}

template <class S>
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_statistics_kernel(const double* partial, int chunks, int64_t m, int c, const typename S::Storage* x,
                         const float* gamma, float eps, float momentum, float* running_mean, float* running_var,
                         float* save_mean, float* save_invstd, float* gain) {
  pdl_prologue();
  const int j = warp_column();
  if (j >= c) return;  // the whole warp leaves together
  bn_statistics_column<S>(j, partial, chunks, m, c, x, gamma, eps, momentum, running_mean, running_var, save_mean,
                          save_invstd, gain);
}

// gain = gamma * invstd from the running variance, for inference.
__global__ void __launch_bounds__(kElementThreads)
    bn_inference_gain_kernel(int c, const float* gamma, const float* running_var, float eps, float* gain) {
  pdl_prologue();
  const int j = int(global_thread_index());
  if (j >= c) return;
  const float invstd = float(1.0 / sqrt(double(running_var[j]) + double(eps)));
  gain[j] = gamma[j] * invstd;
}

// coef = [gain = gamma * invstd | mean(dy) | mean(dy * xhat)], each c floats; all 32 lanes call it.
__device__ __forceinline__ void bn_backward_finalize_column(int j, const double* partial, int chunks, int64_t m, int c,
                                                            const float* gamma, const float* save_invstd,
                                                            float* dgamma, float* dbeta, float* coef) {
  double sums[2];
  warp_sum_chunks(partial, chunks, 2 * c, {j, c + j}, sums);
  const double sum_dy = sums[0], sum_dy_xhat = sums[1];
  if (threadIdx.x % kWarpSize != 0) return;
  dbeta[j] = float(sum_dy);
  dgamma[j] = float(sum_dy_xhat);
  coef[j] = __fmul_rn(gamma[j], save_invstd[j]);
  coef[c + j] = float(sum_dy / double(m));
  coef[2 * c + j] = float(sum_dy_xhat / double(m));
}

__global__ void __launch_bounds__(kFinalizeThreads)
    bn_backward_finalize_kernel(const double* partial, int chunks, int64_t m, int c, const float* gamma,
                                const float* save_invstd, float* dgamma, float* dbeta, float* coef) {
  pdl_prologue();
  const int j = warp_column();
  if (j >= c) return;
  bn_backward_finalize_column(j, partial, chunks, m, c, gamma, save_invstd, dgamma, dbeta, coef);
}

// ---- Element passes --------------------------------------------------------------------------
// y = (x - mean) * gain + beta, then + residual (when add), then relu (when relu), in the CPU
// reference's order; the branches are uniform across the grid. Explicit roundings: the
// separate and the persistent element passes give the same bits.
__device__ __forceinline__ float bn_value(float x, float mean, float gain, float beta, bool add, float residual,
                                          bool relu) {
  float v = __fmaf_rn(__fsub_rn(x, mean), gain, beta);
  if (add) v = __fadd_rn(v, residual);
  if (relu) v = v < 0.f ? 0.f : v;  // NaN passes through, as in relu_forward
  return v;
}

// dx = gain * (g - mean(g) - xhat * mean(g * xhat)), xhat = (x - mean) * invstd.
__device__ __forceinline__ float bn_dx_value(float x, float g, float mean, float invstd, float gain, float mdy,
                                             float mdyx) {
  const float xhat = __fmul_rn(__fsub_rn(x, mean), invstd);
  return __fmul_rn(gain, __fsub_rn(__fsub_rn(g, mdy), __fmul_rn(xhat, mdyx)));
}

// The forward's element pass, training and inference alike: gain is gamma * invstd per channel.
// kOne: one_channel holds (kVec too).
template <class S, bool kVec, bool kOne>
__global__ void bn_normalize_kernel(int64_t total, int c, const typename S::Storage* x,
                                    const typename S::Storage* residual, bool relu, const float* mean,
                                    const float* gain, const float* beta, typename S::Storage* y) {
  pdl_prologue();
  if constexpr (kOne) {
    constexpr int W = kChunkElems;
    float mu[W], ga[W], be[W];
    struct Vals {
      float x[W], r[W];
    };
    for_each_at_one_channel<kNormalizeItems, Vals>(
        total, c,
        [&](int j) {
          load_elems<F32, W>(mean + j, mu);
          load_elems<F32, W>(gain + j, ga);
          load_elems<F32, W>(beta + j, be);
        },
        [&](int64_t i, Vals& v) {
          load_elems<S, W>(x + i, v.x);
          if (residual != nullptr)
            load_elems<S, W>(residual + i, v.r);
          else
#pragma unroll
            for (int e = 0; e < W; ++e) v.r[e] = 0.f;
        },
        [&](int64_t i, Vals& v) {
#pragma unroll
          for (int e = 0; e < W; ++e) v.x[e] = bn_value(v.x[e], mu[e], ga[e], be[e], residual != nullptr, v.r[e], relu);
          store_elems<S, W>(y + i, v.x);
        });
    return;
  }
  for_each_with_channel<kVec>(total, c, [&](int64_t i, int j, auto width) {
    constexpr int W = decltype(width)::value;
    float v[W], r[W] = {}, mu[W], ga[W], be[W];
    load_elems<S, W>(x + i, v);
    if (residual != nullptr) load_elems<S, W>(residual + i, r);
    load_elems<F32, W>(mean + j, mu);
    load_elems<F32, W>(gain + j, ga);
    load_elems<F32, W>(beta + j, be);
#pragma unroll
    for (int e = 0; e < W; ++e) v[e] = bn_value(v[e], mu[e], ga[e], be[e], residual != nullptr, r[e], relu);
    store_elems<S, W>(y + i, v);
  });
}

template <class S>
void launch_normalize(int64_t total, int c, const typename S::Storage* x, const typename S::Storage* residual,
                      bool relu, const float* mean, const float* gain, const float* beta, typename S::Storage* y,
                      cudaStream_t stream) {
  if (total == 0) return;
  const bool vec = chunk_loads_ok(c, x, residual, y) && all_aligned16(mean, gain, beta);
  const bool one = one_channel(c, vec);
  auto* kernel = one   ? &bn_normalize_kernel<S, true, true>
                 : vec ? &bn_normalize_kernel<S, true, false>
                       : &bn_normalize_kernel<S, false, false>;
  launch_kernel(kernel, one ? one_channel_blocks(total, kNormalizeItems) : channel_blocks(total, vec), kElementThreads,
                0, stream, total, c, x, residual, relu, mean, gain, beta, y);
}

// dresidual (nullable) receives the masked gradient; it may alias dy (a thread reads its
// elements of dy before it writes the same elements of dresidual). With g_ready, the reduction
// has already stored it there (GradTerm's g_out): it is read from dresidual instead of from dy
// and y.
template <class S, bool kVec>
__global__ void bn_backward_dx_kernel(int64_t total, int c, const typename S::Storage* x, const typename S::Storage* y,
                                      const typename S::Storage* dy, const float* save_mean, const float* save_invstd,
                                      const float* coef, typename S::Storage* dx, typename S::Storage* dresidual,
                                      bool g_ready) {
  pdl_prologue();
  for_each_with_channel<kVec>(total, c, [&](int64_t i, int j, auto width) {
    constexpr int W = decltype(width)::value;
    float xv[W], g[W], mu[W], is[W], gain[W], mdy[W], mdyx[W];
    load_elems<S, W>(x + i, xv);
    load_elems<S, W>((g_ready ? dresidual : dy) + i, g);
    if (y != nullptr && !g_ready) {
      float yv[W];
      load_elems<S, W>(y + i, yv);
#pragma unroll
      for (int e = 0; e < W; ++e) g[e] = yv[e] > 0.f ? g[e] : 0.f;
    }
    load_elems<F32, W>(save_mean + j, mu);
    load_elems<F32, W>(save_invstd + j, is);
    load_elems<F32, W>(coef + j, gain);
    load_elems<F32, W>(coef + c + j, mdy);
    load_elems<F32, W>(coef + 2 * c + j, mdyx);
    float out[W];
#pragma unroll
    for (int e = 0; e < W; ++e) out[e] = bn_dx_value(xv[e], g[e], mu[e], is[e], gain[e], mdy[e], mdyx[e]);
    store_elems<S, W>(dx + i, out);
    if (dresidual != nullptr && !g_ready) store_elems<S, W>(dresidual + i, g);
  });
}

// ---- Persistent form: reduction, finalisation and element pass in one cooperative kernel ----
// column_plan.h's PersistentPlan: block b reduces chunks b, b + grid, ... exactly as the
// separate reduction kernel's blocks would (chunk_partials, same partials), keeping the first
// `slots` of them in shared memory; a grid barrier; a warp per channel finalises as the separate
// finalise kernel does; a grid barrier; then the block runs the element pass over its chunks,
// the uncached ones first in the reverse of the order it read them (the latest reads are the
// likeliest still in L2), then the cached ones from shared memory. Every value is computed by
// the same device functions as in the separate kernels, so both forms give the same bits.

// Caches the kVals values a reduction thread reads into its chunk's slot (null: not cached):
// tensor q of the chunk at slot + q * slot_elems, in column_plan.h's slot_offset layout.
template <class S, bool kVec, int kVals>
struct SlotStash {
  int cols_per_block;
  ChunkBox box;
  typename S::Storage* slot;
  int64_t slot_elems;
  __device__ void operator()(int64_t i, int j0, const float (&v)[kVals][kChunkElems]) const {
    if (slot == nullptr) return;
    typename S::Storage* p = slot + slot_offset(cols_per_block, box, i, j0);
#pragma unroll
    for (int q = 0; q < kVals; ++q) {
      if constexpr (kVec) {
        S::store8(p + q * slot_elems, v[q]);
      } else {
#pragma unroll
        for (int e = 0; e < kChunkElems; ++e) p[q * slot_elems + e] = S::store(v[q][e]);  // inside the slot's row
      }
    }
  }
};

// The kVals values of row i, columns j0 ...: from the slot when the chunk is cached, else
// reloaded through the term (the reads the reduction made).
template <class S, bool kVec, class Term>
__device__ __forceinline__ void chunk_values(const Term& term, int cols_per_block, const ChunkBox& box,
                                             const typename S::Storage* slot, int64_t slot_elems, int64_t i, int j0,
                                             int ncols, float (&v)[Term::kVals][kChunkElems]) {
  if (slot == nullptr) {
    term.template load<kVec>(i, j0, ncols, v);
    return;
  }
  const typename S::Storage* p = slot + slot_offset(cols_per_block, box, i, j0);
#pragma unroll
  for (int q = 0; q < Term::kVals; ++q) {
    if constexpr (kVec)
      S::load8(p + q * slot_elems, v[q]);
    else
      load_elems_partial<S>(p + q * slot_elems, ncols, v[q]);
  }
}

// What every persistent launch shares.
struct PersistentShape {
  int64_t m;
  ColumnReducePlan plan;
  int total, slots;
  int64_t slot_elems;
  double* partial;  // plan.chunks * 2 * c
};

// The phases' loop over a block's chunks: phase(t, box, slot) for its k-th chunk t, k = 0 ..
// owned - 1 (reduction order) or owned - 1 .. 0 (element-pass order). A cached chunk takes
// kVals * slot_elems elements of the block's dynamic shared memory.
template <class S, int kVals, class Phase>
__device__ __forceinline__ void for_each_owned_chunk(const PersistentShape& sh, typename S::Storage* cache,
                                                     bool reverse, const Phase& phase) {
  const int grid = int(gridDim.x), b = int(blockIdx.x);
  const int owned = owned_chunks(sh.total, grid, b);
  for (int n = 0; n < owned; ++n) {
    const int k = reverse ? owned - 1 - n : n;
    const int t = b + k * grid;
    typename S::Storage* slot = k < sh.slots ? cache + int64_t(k) * kVals * sh.slot_elems : nullptr;
    phase(t, chunk_box(sh.plan, sh.m, t), slot);
  }
}

// The element pass over chunk box for the calling thread (column_plan.h's piece_slice: the rows
// and columns it summed): params(j0, ncols) once, then load(i, j0, ncols, v) and
// finish(i, j0, ncols, v) for its rows i, several rows' loads in flight at a time
// (rows_in_flight, column_reduce.cuh).
template <int kVals, class Params, class Load, class Finish>
__device__ __forceinline__ void element_pass(const ColumnReducePlan& plan, const ChunkBox& box, const Params& params,
                                             const Load& load, const Finish& finish) {
  const PieceSlice ps = piece_slice(plan, box, int(threadIdx.x));
  if (ps.ncols == 0) return;
  params(ps.j0, ps.ncols);
  rows_in_flight<kVals>(
      box.row0 + ps.r0, box.row0 + box.rows, ps.step,
      [&](int64_t i, float(&v)[kVals][kChunkElems]) { load(i, ps.j0, ps.ncols, v); },
      [&](int64_t i, float(&v)[kVals][kChunkElems]) { finish(i, ps.j0, ps.ncols, v); }, [](int64_t) {});
}

template <class S>
struct ForwardJob {
  PersistentShape sh;
  ShiftedMomentsTerm<S> term;
  const typename S::Storage* residual;  // nullable
  bool relu;
  const float *gamma, *beta;
  float eps, momentum;
  float *running_mean, *running_var, *save_mean, *save_invstd, *gain;
  typename S::Storage* y;
};

// The persistent kernels' three phases for the calling block: its chunks' reduction (cached in
// shared memory as far as the plan says), a grid barrier, finalize(j) by a warp for every
// column j, a grid barrier, then element(t, box, slot) for its chunks in the element-pass order.
template <class S, bool kVec, class Term, class Finalize, class Element>
__device__ __forceinline__ void persistent_phases(const PersistentShape& sh, const Term& term, const Finalize& finalize,
                                                  const Element& element) {
  using T = typename S::Storage;
  constexpr int kVals = Term::kVals;
  extern __shared__ __align__(16) unsigned char bn_dynamic_smem[];
  __shared__ double warp_sums[2][kReduceWarps][kMaxColLanes * kChunkElems];
  T* cache = reinterpret_cast<T*>(bn_dynamic_smem);
  const ColumnReducePlan& plan = sh.plan;
  for_each_owned_chunk<S, kVals>(sh, cache, false, [&](int t, const ChunkBox& box, T* slot) {
    chunk_partials<2, kVec>(sh.m, plan, term, t % plan.col_blocks, t / plan.col_blocks, sh.partial,
                            SlotStash<S, kVec, kVals>{plan.cols_per_block(), box, slot, sh.slot_elems}, warp_sums);
  });
  cg::this_grid().sync();
  for (int j = int(blockIdx.x) * kReduceWarps + int(threadIdx.x) / kWarpSize; j < plan.c;
       j += int(gridDim.x) * kReduceWarps)
    finalize(j);
  cg::this_grid().sync();
  for_each_owned_chunk<S, kVals>(sh, cache, true, element);
}

// Two blocks per SM (kMinPersistentBlocksPerSm) must fit by registers.
template <class S, bool kVec>
__global__ void __launch_bounds__(kReduceThreads, kMinPersistentBlocksPerSm)
    bn_forward_persistent_kernel(const __grid_constant__ ForwardJob<S> a) {
  pdl_prologue();
  using T = typename S::Storage;
  const PersistentShape& sh = a.sh;
  const ColumnReducePlan& plan = sh.plan;
  const int c = plan.c, cpb = plan.cols_per_block();
  const bool add = a.residual != nullptr;
  persistent_phases<S, kVec>(
      sh, a.term,
      [&](int j) {
        bn_statistics_column<S>(j, sh.partial, plan.chunks, sh.m, c, a.term.x, a.gamma, a.eps, a.momentum,
                                a.running_mean, a.running_var, a.save_mean, a.save_invstd, a.gain);
      },
      [&](int, const ChunkBox& box, T* slot) {
        float mu[kChunkElems], ga[kChunkElems], be[kChunkElems];
        element_pass<2>(
            plan, box,
            [&](int j0, int ncols) {
              load_params(a.save_mean, j0, ncols, mu), load_params(a.gain, j0, ncols, ga);
              load_params(a.beta, j0, ncols, be);
            },
            [&](int64_t i, int j0, int ncols, float (&v)[2][kChunkElems]) {  // v: x, residual
              float x[1][kChunkElems];
              chunk_values<S, kVec>(a.term, cpb, box, slot, sh.slot_elems, i, j0, ncols, x);
#pragma unroll
              for (int e = 0; e < kChunkElems; ++e) v[0][e] = x[0][e], v[1][e] = 0.f;
              if (add) load_row<S, kVec>(a.residual, i, c, j0, ncols, v[1]);
            },
            [&](int64_t i, int j0, int ncols, float (&v)[2][kChunkElems]) {
#pragma unroll
              for (int e = 0; e < kChunkElems; ++e)
                v[0][e] = bn_value(v[0][e], mu[e], ga[e], be[e], add, v[1][e], a.relu);
              store_row<S, kVec>(a.y, i, c, j0, ncols, v[0]);
            });
      });
}

template <class S>
struct BackwardJob {
  PersistentShape sh;
  GradTerm<S> term;
  const float *gamma, *save_mean, *save_invstd;
  float *dgamma, *dbeta, *coef;
  typename S::Storage *dx, *dresidual;  // dresidual nullable; it may alias dy
};

template <class S, bool kVec>
__global__ void __launch_bounds__(kReduceThreads, kMinPersistentBlocksPerSm)
    bn_backward_persistent_kernel(const __grid_constant__ BackwardJob<S> a) {
  pdl_prologue();
  using T = typename S::Storage;
  const PersistentShape& sh = a.sh;
  const ColumnReducePlan& plan = sh.plan;
  const int c = plan.c, cpb = plan.cols_per_block();
  persistent_phases<S, kVec>(
      sh, a.term,
      [&](int j) {
        bn_backward_finalize_column(j, sh.partial, plan.chunks, sh.m, c, a.gamma, a.save_invstd, a.dgamma, a.dbeta,
                                    a.coef);
      },
      [&](int, const ChunkBox& box, T* slot) {
        float mu[kChunkElems], is[kChunkElems], gain[kChunkElems], mdy[kChunkElems], mdyx[kChunkElems];
        element_pass<2>(
            plan, box,
            [&](int j0, int ncols) {
              load_params(a.save_mean, j0, ncols, mu), load_params(a.save_invstd, j0, ncols, is);
              load_params(a.coef, j0, ncols, gain), load_params(a.coef + c, j0, ncols, mdy);
              load_params(a.coef + 2 * c, j0, ncols, mdyx);
            },
            [&](int64_t i, int j0, int ncols, float (&v)[2][kChunkElems]) {  // v: x, g
              chunk_values<S, kVec>(a.term, cpb, box, slot, sh.slot_elems, i, j0, ncols, v);
            },
            [&](int64_t i, int j0, int ncols, float (&v)[2][kChunkElems]) {
              float out[kChunkElems];
#pragma unroll
              for (int e = 0; e < kChunkElems; ++e)
                out[e] = bn_dx_value(v[0][e], v[1][e], mu[e], is[e], gain[e], mdy[e], mdyx[e]);
              store_row<S, kVec>(a.dx, i, c, j0, ncols, out);
              if (a.dresidual != nullptr) store_row<S, kVec>(a.dresidual, i, c, j0, ncols, v[1]);
            });
      });
}

// ---- Choosing and launching the persistent form ---------------------------------------------
std::atomic<int> g_bn_persistent{-1};  // -1: not chosen yet (the environment decides at first use)
std::atomic<int64_t> g_bn_persistent_launches{0};

// The plan for Kernel on the current device (cached per device and chunk geometry): grid 0 where
// the device has no cooperative launch or no block fits.
template <auto Kernel>
PersistentPlan persistent_plan_for(const ColumnReducePlan& p, int elem_bytes, int tensors) {
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t, int64_t>, PersistentPlan> known;
  int device = 0;
  SP_CUDA_CHECK(cudaGetDevice(&device));
  const std::tuple<int, int64_t, int64_t> key{device, int64_t(p.col_blocks) * p.chunks,
                                              p.chunk_rows * p.cols_per_block()};
  std::lock_guard<std::mutex> lk(mu);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  int cooperative = 0, sms = 0, optin = 0;
  SP_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  SP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  SP_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr{};
  SP_CUDA_CHECK(cudaFuncGetAttributes(&attr, Kernel));
  const int max_dynamic = optin > int(attr.sharedSizeBytes) ? optin - int(attr.sharedSizeBytes) : 0;
  SP_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic));
  SP_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                     int(cudaSharedmemCarveoutMaxShared)));
  PersistentPlan plan;
  if (cooperative != 0)
    plan = plan_persistent(p, elem_bytes, tensors, sms, size_t(max_dynamic), [](size_t bytes) {
      int blocks = 0;
      SP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kReduceThreads, bytes));
      return blocks;
    });
  known.emplace(key, plan);
  return plan;
}

template <class S, bool kVec>
PersistentPlan forward_plan(const ColumnReducePlan& p) {
  return persistent_plan_for<bn_forward_persistent_kernel<S, kVec>>(p, int(sizeof(typename S::Storage)), 1);
}
template <class S, bool kVec>
PersistentPlan backward_plan(const ColumnReducePlan& p) {
  return persistent_plan_for<bn_backward_persistent_kernel<S, kVec>>(p, int(sizeof(typename S::Storage)), 2);
}

PersistentShape persistent_shape(int64_t m, const ColumnReducePlan& p, const PersistentPlan& pp, double* partial) {
  return PersistentShape{m, p, pp.total, pp.slots, pp.slot_elems, partial};
}

// Launches kernel cooperatively; false (nothing launched, the error cleared) where the grid does
// not fit now, e.g. under an MPS or green-context limit smaller than the device, outside stream
// capture. Other errors throw.
template <class Job>
bool launch_cooperative(void (*kernel)(Job), const PersistentPlan& pp, const Job& job, cudaStream_t stream) {
  cudaLaunchAttribute cooperative{};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  const cudaError_t err =
      launch_kernel_with(kernel, pp.grid, kReduceThreads, pp.smem_bytes, stream, &cooperative, job);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    SP_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
    if (capturing == cudaStreamCaptureStatusNone) {
      (void)cudaGetLastError();
      return false;
    }
  }
  if (err != cudaSuccess) (void)cudaGetLastError();  // as launch_kernel: a later check must not see it again
  SP_CUDA_CHECK(err);
  g_bn_persistent_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// The persistent training forward where it is switched on and a grid fits; false: not run.
template <class S>
bool forward_persistent(int64_t m, const ColumnReducePlan& plan, const typename S::Storage* x,
                        const typename S::Storage* residual, bool relu, const float* gamma, const float* beta,
                        float eps, float momentum, float* running_mean, float* running_var, typename S::Storage* y,
                        float* save_mean, float* save_invstd, double* partial, float* gain, cudaStream_t stream) {
  if (m == 0 || !bn_persistent()) return false;
  const bool vec = chunk_loads_ok(plan.c, x, residual, y);
  const PersistentPlan pp = vec ? forward_plan<S, true>(plan) : forward_plan<S, false>(plan);
  if (pp.grid == 0) return false;
  const ForwardJob<S> job{persistent_shape(m, plan, pp, partial), ShiftedMomentsTerm<S>{x, plan.c},
                          residual, relu, gamma, beta, eps, momentum, running_mean, running_var, save_mean,
                          save_invstd, gain, y};
  return launch_cooperative(vec ? &bn_forward_persistent_kernel<S, true> : &bn_forward_persistent_kernel<S, false>,
                            pp, job, stream);
}

template <class S>
bool backward_persistent(int64_t m, const ColumnReducePlan& plan, const GradTerm<S>& term, const float* gamma,
                         const float* save_mean, const float* save_invstd, typename S::Storage* dx,
                         typename S::Storage* dresidual, float* dgamma, float* dbeta, double* partial, float* coef,
                         cudaStream_t stream) {
  if (m == 0 || !bn_persistent()) return false;
  const bool vec = chunk_loads_ok(plan.c, term.x, term.y, term.dy, dx, dresidual);
  const PersistentPlan pp = vec ? backward_plan<S, true>(plan) : backward_plan<S, false>(plan);
  if (pp.grid == 0) return false;
  const BackwardJob<S> job{persistent_shape(m, plan, pp, partial), term, gamma, save_mean, save_invstd,
                           dgamma, dbeta, coef, dx, dresidual};
  return launch_cooperative(vec ? &bn_backward_persistent_kernel<S, true> : &bn_backward_persistent_kernel<S, false>,
                            pp, job, stream);
}

}  // namespace

namespace {

template <class S>
void forward_training_impl(const char* op, int64_t m, int64_t c64, const typename S::Storage* x,
                           const typename S::Storage* residual, bool relu, const float* gamma, const float* beta,
                           float eps, float momentum, float* running_mean, float* running_var,
                           typename S::Storage* y, float* save_mean, float* save_invstd, cudaStream_t stream) {
  const int c = checked_columns(op, c64);
  const ColumnReducePlan plan = plan_column_reduce(m, c);
  const size_t partial_doubles = size_t(plan.chunks) * 2 * size_t(c);
  // gain follows the partials, at a multiple of 16 bytes.
  Workspace ws(sizeof(double) * partial_doubles + sizeof(float) * size_t(c), stream);
  double* partial = ws.as<double>();
  float* gain = reinterpret_cast<float*>(partial + partial_doubles);

  if (forward_persistent<S>(m, plan, x, residual, relu, gamma, beta, eps, momentum, running_mean, running_var, y,
                            save_mean, save_invstd, partial, gain, stream))
    return;
  column_partials<2>(m, plan, ShiftedMomentsTerm<S>{x, c}, chunk_loads_ok(c, x), partial, stream);
  launch_kernel(bn_statistics_kernel<S>, finalize_blocks(c), kFinalizeThreads, 0, stream, partial, plan.chunks, m, c, x,
                gamma, eps, momentum, running_mean, running_var, save_mean, save_invstd, gain);
  launch_normalize<S>(m * c, c, x, residual, relu, save_mean, gain, beta, y, stream);
}

template <class S>
void forward_inference_impl(const char* op, int64_t m, int64_t c64, const typename S::Storage* x,
                            const typename S::Storage* residual, bool relu, const float* gamma, const float* beta,
                            const float* running_mean, const float* running_var, float eps, typename S::Storage* y,
                            cudaStream_t stream) {
  const int c = checked_columns(op, c64);
  const int64_t total = m * c;
  if (total == 0) return;
  Workspace ws(sizeof(float) * size_t(c), stream);
  float* gain = ws.as<float>();
  launch_kernel(bn_inference_gain_kernel, unsigned(ceil_div(c, kElementThreads)), kElementThreads, 0, stream, c, gamma,
                running_var, eps, gain);
  launch_normalize<S>(total, c, x, residual, relu, running_mean, gain, beta, y, stream);
}

template <class S>
void backward_impl(const char* op, int64_t m, int64_t c64, const typename S::Storage* x,
                   const typename S::Storage* y, const typename S::Storage* dy, const float* gamma,
                   const float* save_mean, const float* save_invstd, typename S::Storage* dx,
                   typename S::Storage* dresidual, float* dgamma, float* dbeta, cudaStream_t stream) {
  const int c = checked_columns(op, c64);
  const ColumnReducePlan plan = plan_column_reduce(m, c);
  const size_t partial_doubles = size_t(plan.chunks) * 2 * size_t(c);
  // coef follows the partials: at a multiple of 16 bytes, and so is coef + c when c % 4 == 0.
  Workspace ws(sizeof(double) * partial_doubles + sizeof(float) * 3 * size_t(c), stream);
  double* partial = ws.as<double>();
  float* coef = reinterpret_cast<float*>(partial + partial_doubles);
  const bool vec = chunk_loads_ok(c, x, y, dy, dx, dresidual) && all_aligned16(save_mean, save_invstd, coef);

  const GradTerm<S> term{x, y, dy, save_mean, save_invstd, c};
  if (backward_persistent<S>(m, plan, term, gamma, save_mean, save_invstd, dx, dresidual, dgamma, dbeta, partial, coef,
                             stream))
    return;
  // The fused BN+add+ReLU's dresidual (g) written by the reduction as it reads dy and y.
  GradTerm<S> grad = term;
  grad.g_out = dresidual;
  column_partials<2>(m, plan, grad, vec, partial, stream);
  launch_kernel(bn_backward_finalize_kernel, finalize_blocks(c), kFinalizeThreads, 0, stream, partial, plan.chunks, m,
                c, gamma, save_invstd, dgamma, dbeta, coef);
  const int64_t total = m * c;
  if (total == 0) return;
  auto* kernel = vec ? &bn_backward_dx_kernel<S, true> : &bn_backward_dx_kernel<S, false>;
  launch_kernel(kernel, channel_blocks(total, vec), kElementThreads, 0, stream, total, c, x, y, dy, save_mean,
                save_invstd, coef, dx, dresidual, dresidual != nullptr);
}

}  // namespace

void set_bn_persistent(bool on) { detail::set_switch(g_bn_persistent, on); }
bool bn_persistent() { return detail::env_switch(g_bn_persistent, "STALEPROP_BN_PERSISTENT", false); }
int64_t bn_persistent_launches() { return g_bn_persistent_launches.load(std::memory_order_relaxed); }

BnPersistentPlan bn_persistent_plan(int64_t m, int64_t c, bool bf16, bool backward, bool vec) {
  const ColumnReducePlan plan = plan_column_reduce(m, checked_columns("bn_persistent_plan", c));
  PersistentPlan pp;
  if (bf16)
    pp = backward ? (vec ? backward_plan<BF16, true>(plan) : backward_plan<BF16, false>(plan))
                  : (vec ? forward_plan<BF16, true>(plan) : forward_plan<BF16, false>(plan));
  else
    pp = backward ? (vec ? backward_plan<F32, true>(plan) : backward_plan<F32, false>(plan))
                  : (vec ? forward_plan<F32, true>(plan) : forward_plan<F32, false>(plan));
  return BnPersistentPlan{pp.grid, pp.slots, pp.cached, pp.total};
}

void batchnorm_forward_training(int64_t m, int64_t c, const float* x, const float* gamma, const float* beta, float eps,
                                float momentum, float* running_mean, float* running_var, float* y, float* save_mean,
                                float* save_invstd, cudaStream_t stream) {
  forward_training_impl<F32>("batchnorm_forward_training", m, c, x, nullptr, false, gamma, beta, eps, momentum,
                             running_mean, running_var, y, save_mean, save_invstd, stream);
}

void batchnorm_forward_inference(int64_t m, int64_t c, const float* x, const float* gamma, const float* beta,
                                 const float* running_mean, const float* running_var, float eps, float* y,
                                 cudaStream_t stream) {
  forward_inference_impl<F32>("batchnorm_forward_inference", m, c, x, nullptr, false, gamma, beta, running_mean,
                              running_var, eps, y, stream);
}

void batchnorm_backward(int64_t m, int64_t c, const float* x, const float* dy, const float* gamma,
                        const float* save_mean, const float* save_invstd, float* dx, float* dgamma, float* dbeta,
                        cudaStream_t stream) {
  backward_impl<F32>("batchnorm_backward", m, c, x, nullptr, dy, gamma, save_mean, save_invstd, dx, nullptr, dgamma,
                     dbeta, stream);
}

void batchnorm_add_relu_forward_training(int64_t m, int64_t c, const float* x, const float* residual,
                                         const float* gamma, const float* beta, float eps, float momentum,
                                         float* running_mean, float* running_var, float* y, float* save_mean,
                                         float* save_invstd, cudaStream_t stream) {
  forward_training_impl<F32>("batchnorm_add_relu_forward_training", m, c, x, residual, true, gamma, beta, eps,
                             momentum, running_mean, running_var, y, save_mean, save_invstd, stream);
}

void batchnorm_add_relu_forward_inference(int64_t m, int64_t c, const float* x, const float* residual,
                                          const float* gamma, const float* beta, const float* running_mean,
                                          const float* running_var, float eps, bool relu, float* y,
                                          cudaStream_t stream) {
  forward_inference_impl<F32>("batchnorm_add_relu_forward_inference", m, c, x, residual, relu, gamma, beta,
                              running_mean, running_var, eps, y, stream);
}

void batchnorm_add_relu_backward(int64_t m, int64_t c, const float* x, const float* y, const float* dy,
                                 const float* gamma, const float* save_mean, const float* save_invstd, float* dx,
                                 float* dresidual, float* dgamma, float* dbeta, cudaStream_t stream) {
  backward_impl<F32>("batchnorm_add_relu_backward", m, c, x, y, dy, gamma, save_mean, save_invstd, dx, dresidual,
                     dgamma, dbeta, stream);
}

void batchnorm_forward_training_bf16(int64_t m, int64_t c, const uint16_t* x, const uint16_t* residual, bool relu,
                                     const float* gamma, const float* beta, float eps, float momentum,
                                     float* running_mean, float* running_var, uint16_t* y, float* save_mean,
                                     float* save_invstd, cudaStream_t stream) {
  forward_training_impl<BF16>("batchnorm_forward_training_bf16", m, c, x, residual, relu, gamma, beta, eps, momentum,
                              running_mean, running_var, y, save_mean, save_invstd, stream);
}

void batchnorm_forward_inference_bf16(int64_t m, int64_t c, const uint16_t* x, const uint16_t* residual, bool relu,
                                      const float* gamma, const float* beta, const float* running_mean,
                                      const float* running_var, float eps, uint16_t* y, cudaStream_t stream) {
  forward_inference_impl<BF16>("batchnorm_forward_inference_bf16", m, c, x, residual, relu, gamma, beta, running_mean,
                               running_var, eps, y, stream);
}

void batchnorm_backward_bf16(int64_t m, int64_t c, const uint16_t* x, const uint16_t* y, const uint16_t* dy,
                             const float* gamma, const float* save_mean, const float* save_invstd, uint16_t* dx,
                             uint16_t* dresidual, float* dgamma, float* dbeta, cudaStream_t stream) {
  backward_impl<BF16>("batchnorm_backward_bf16", m, c, x, y, dy, gamma, save_mean, save_invstd, dx, dresidual, dgamma,
                      dbeta, stream);
}

}  // namespace sp::kernels::cuda
