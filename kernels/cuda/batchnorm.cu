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
// the saved output y inside its reduction and element passes (which also write dresidual), so
// fusion removes the separate add/relu passes and their round trips through memory.
// Every pass moves 16-byte chunks of eight elements per thread when c % 8 == 0 and the pointers
// are 16-byte aligned (column_plan.h), else single elements; the reductions add in the same
// order either way, so both give the same bits.
#include "kernels/cuda/column_reduce.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/storage.cuh"

namespace sp::kernels::cuda {
namespace {

using namespace detail;

// Grid-stride loop over the elements of a row-major [rows, c] matrix (total elements), calling
// fn(i, j, Width<W>) for the W elements i .. i + W - 1 of row-major column j .. j + W - 1:
// chunks of kChunkElems (kVec: c % kChunkElems == 0, pointers 16-byte aligned) or single
// elements. j is tracked incrementally: one 64-bit division per thread instead of one per element.
template <bool kVec, class Fn>
__device__ __forceinline__ void for_each_with_channel(int64_t total, int c, const Fn& fn) {
  if constexpr (kVec) {
    for (ChunkCursor k = chunk_cursor(global_thread_index(), grid_stride(), c); k.i < total; advance(k, c))
      fn(k.i, k.j, Width<kChunkElems>{});
  } else {
    const int64_t stride = grid_stride();
    const int step = int(stride % c);
    int64_t i = global_thread_index();
    int j = int(i % c);
    for (; i < total; i += stride) {
      fn(i, j, Width<1>{});
      j += step;
      if (j >= c) j -= c;
    }
  }
}

// Blocks of a for_each_with_channel kernel over total > 0 elements.
unsigned channel_blocks(int64_t total, bool vec) { return element_blocks(vec ? total / kChunkElems : total); }

// Activations (x, residual, y, dy, dx, dresidual) are stored as S::Storage (fp32 or bf16) and
// computed on in fp32; parameters, statistics and reductions are fp32/double in both cases.

// ---- Reduction terms (column_reduce.cuh's Term) ---------------------------------------------
// acc[0] += x - s, acc[1] += (x - s)^2 with the shift s = x[0, j] (read only when rows exist).
template <class S>
struct ShiftedMomentsTerm {
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
  __device__ void operator()(int64_t i, int j0, int ncols, const Cols& k, double (&acc)[2][kChunkElems]) const {
    float v[kChunkElems];
    load_row<S, kVec>(x, i, c, j0, ncols, v);
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e) {
      const double d = double(v[e]) - double(k.shift[e]);
      acc[0][e] += d;
      acc[1][e] += d * d;
    }
  }
};

// acc[0] += g, acc[1] += g * xhat, with g the gradient reaching the normalisation: dy, or for
// the fused variants dy where the forward output y > 0 else 0 (relu_backward's form).
template <class S>
struct GradTerm {
  const typename S::Storage* x;
  const typename S::Storage* y;  // null for the plain backward
  const typename S::Storage* dy;
  const float* mean;
  const float* invstd;
  int c;
  struct Cols {
    float mean[kChunkElems], invstd[kChunkElems];
  };
  __device__ Cols columns(int j0, int ncols) const {
    Cols k;
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e) {
      k.mean[e] = e < ncols ? mean[j0 + e] : 0.f;
      k.invstd[e] = e < ncols ? invstd[j0 + e] : 0.f;
    }
    return k;
  }
  template <bool kVec>
  __device__ void operator()(int64_t i, int j0, int ncols, const Cols& k, double (&acc)[2][kChunkElems]) const {
    float xv[kChunkElems], g[kChunkElems];
    load_row<S, kVec>(x, i, c, j0, ncols, xv);
    load_row<S, kVec>(dy, i, c, j0, ncols, g);
    if (y != nullptr) {
      float yv[kChunkElems];
      load_row<S, kVec>(y, i, c, j0, ncols, yv);
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) g[e] = yv[e] > 0.f ? g[e] : 0.f;
    }
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e) {
      const double xhat = (double(xv[e]) - double(k.mean[e])) * double(k.invstd[e]);
      acc[0][e] += double(g[e]);
      acc[1][e] += double(g[e]) * xhat;
    }
  }
};

// ---- Per-channel finalisation: one warp per channel, lane 0 writes -------------------------
template <class S>
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_statistics_kernel(const double* partial, int chunks, int64_t m, int c, const typename S::Storage* x,
                         const float* gamma, float eps, float momentum, float* running_mean, float* running_var,
                         float* save_mean, float* save_invstd, float* gain) {
  const int j = warp_column();
  if (j >= c) return;  // the whole warp leaves together
  const double sum_d = warp_sum_chunks(partial, chunks, 2 * c, j);
  const double sum_d2 = warp_sum_chunks(partial, chunks, 2 * c, c + j);
  if (threadIdx.x % kWarpSize != 0) return;
  // With m == 0 the statistics are NaN (0 / 0), as in the reference; x is not read.
  const double shift = m > 0 ? double(S::load(x[j])) : 0.0;
  const double mean_d = sum_d / double(m);
  const double mean = shift + mean_d;
  const double centred = sum_d2 / double(m) - mean_d * mean_d;
  const double biased = centred > 0.0 ? centred : (centred == centred ? 0.0 : centred);  // rounding, not NaN
  // A single sample has no unbiased estimate; its (zero) biased variance stands in.
  const double unbiased = m > 1 ? biased * double(m) / double(m - 1) : biased;
  const double mom = double(momentum);
  running_mean[j] = float((1.0 - mom) * double(running_mean[j]) + mom * mean);
  running_var[j] = float((1.0 - mom) * double(running_var[j]) + mom * unbiased);
  save_mean[j] = float(mean);
  const float invstd = float(1.0 / sqrt(biased + double(eps)));
  save_invstd[j] = invstd;
  gain[j] = gamma[j] * invstd;
}

// gain = gamma * invstd from the running variance, for inference.
__global__ void __launch_bounds__(kElementThreads)
    bn_inference_gain_kernel(int c, const float* gamma, const float* running_var, float eps, float* gain) {
  const int j = int(global_thread_index());
  if (j >= c) return;
  const float invstd = float(1.0 / sqrt(double(running_var[j]) + double(eps)));
  gain[j] = gamma[j] * invstd;
}

// coef = [gain = gamma * invstd | mean(dy) | mean(dy * xhat)], each c floats.
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_backward_finalize_kernel(const double* partial, int chunks, int64_t m, int c, const float* gamma,
                                const float* save_invstd, float* dgamma, float* dbeta, float* coef) {
  const int j = warp_column();
  if (j >= c) return;
  const double sum_dy = warp_sum_chunks(partial, chunks, 2 * c, j);
  const double sum_dy_xhat = warp_sum_chunks(partial, chunks, 2 * c, c + j);
  if (threadIdx.x % kWarpSize != 0) return;
  dbeta[j] = float(sum_dy);
  dgamma[j] = float(sum_dy_xhat);
  coef[j] = gamma[j] * save_invstd[j];
  coef[c + j] = float(sum_dy / double(m));
  coef[2 * c + j] = float(sum_dy_xhat / double(m));
}

// ---- Element passes --------------------------------------------------------------------------
// y = (x - mean) * gain + beta, then + residual (when add), then relu (when relu), in the CPU
// reference's order; the branches are uniform across the grid.
__device__ __forceinline__ float bn_value(float x, float mean, float gain, float beta, bool add, float residual,
                                          bool relu) {
  float v = (x - mean) * gain + beta;
  if (add) v = v + residual;
  if (relu) v = v < 0.f ? 0.f : v;  // NaN passes through, as in relu_forward
  return v;
}

// The forward's element pass, training and inference alike: gain is gamma * invstd per channel.
template <class S, bool kVec>
__global__ void bn_normalize_kernel(int64_t total, int c, const typename S::Storage* x,
                                    const typename S::Storage* residual, bool relu, const float* mean,
                                    const float* gain, const float* beta, typename S::Storage* y) {
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
  auto* kernel = vec ? &bn_normalize_kernel<S, true> : &bn_normalize_kernel<S, false>;
  kernel<<<channel_blocks(total, vec), kElementThreads, 0, stream>>>(total, c, x, residual, relu, mean, gain, beta, y);
  SP_CUDA_CHECK_LAUNCH();
}

// dresidual (nullable) receives the masked gradient; it may alias dy (a thread reads its
// elements of dy before it writes the same elements of dresidual).
template <class S, bool kVec>
__global__ void bn_backward_dx_kernel(int64_t total, int c, const typename S::Storage* x,
                                      const typename S::Storage* y, const typename S::Storage* dy,
                                      const float* save_mean, const float* save_invstd, const float* coef,
                                      typename S::Storage* dx, typename S::Storage* dresidual) {
  for_each_with_channel<kVec>(total, c, [&](int64_t i, int j, auto width) {
    constexpr int W = decltype(width)::value;
    float xv[W], g[W], mu[W], is[W], gain[W], mdy[W], mdyx[W];
    load_elems<S, W>(x + i, xv);
    load_elems<S, W>(dy + i, g);
    if (y != nullptr) {
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
    for (int e = 0; e < W; ++e) {
      const float xhat = (xv[e] - mu[e]) * is[e];
      out[e] = gain[e] * (g[e] - mdy[e] - xhat * mdyx[e]);
    }
    store_elems<S, W>(dx + i, out);
    if (dresidual != nullptr) store_elems<S, W>(dresidual + i, g);
  });
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

  column_partials<2>(m, plan, ShiftedMomentsTerm<S>{x, c}, chunk_loads_ok(c, x), partial, stream);
  bn_statistics_kernel<S><<<finalize_blocks(c), kFinalizeThreads, 0, stream>>>(
      partial, plan.chunks, m, c, x, gamma, eps, momentum, running_mean, running_var, save_mean, save_invstd, gain);
  SP_CUDA_CHECK_LAUNCH();
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
  bn_inference_gain_kernel<<<unsigned(ceil_div(c, kElementThreads)), kElementThreads, 0, stream>>>(
      c, gamma, running_var, eps, gain);
  SP_CUDA_CHECK_LAUNCH();
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

  column_partials<2>(m, plan, GradTerm<S>{x, y, dy, save_mean, save_invstd, c}, vec, partial, stream);
  bn_backward_finalize_kernel<<<finalize_blocks(c), kFinalizeThreads, 0, stream>>>(partial, plan.chunks, m, c, gamma,
                                                                                   save_invstd, dgamma, dbeta, coef);
  SP_CUDA_CHECK_LAUNCH();
  const int64_t total = m * c;
  if (total == 0) return;
  auto* kernel = vec ? &bn_backward_dx_kernel<S, true> : &bn_backward_dx_kernel<S, false>;
  kernel<<<channel_blocks(total, vec), kElementThreads, 0, stream>>>(total, c, x, y, dy, save_mean, save_invstd, coef,
                                                                     dx, dresidual);
  SP_CUDA_CHECK_LAUNCH();
}

}  // namespace

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
