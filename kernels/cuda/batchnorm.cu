// Batch normalisation over NHWC activations viewed as [m = N*H*W, c], following the CPU
// reference formula by formula (kernels/cpu/batchnorm.cpp):
//   training forward   one pass over x for the statistics: the deterministic double column
//                      reduction (column_reduce.cuh) of the shifted moments sum(x - s) and
//                      sum((x - s)^2), with the shift s the channel's first element. A shift
//                      near the mean keeps the variance sum/m - mean^2 from cancelling when
//                      |mean| >> std: the relative error grows with ((mean - s) / std)^2 * 2^-53
//                      in double, and s is a sample of the channel, so that stays far below
//                      fp32 rounding (the CPU reference's two passes agree to it). A warp per
//                      channel finalises the statistics and the running-stat update; then an
//                      element pass normalises: x is read twice, not three times.
//   inference forward  one element pass.
//   backward           one double reduction pass for sum(dy) and sum(dy * xhat), a warp per
//                      channel for dgamma, dbeta and the per-channel coefficients, one element pass.
// The fused BN+ReLU and BN+add+ReLU variants run the same passes: the residual add and the
// ReLU happen in the forward's element pass, and the backward recomputes the ReLU mask from
// the saved output y inside its reduction and element passes (which also write dresidual), so
// fusion removes the separate add/relu passes and their round trips through memory.
#include "kernels/cuda/column_reduce.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/storage.cuh"

namespace sp::kernels::cuda {
namespace {

using namespace detail;

// Grid-stride loop over the elements of a row-major [rows, c] matrix (total elements),
// calling fn(i, j) with j = i % c tracked incrementally: one 64-bit division per thread
// instead of one per element.
template <class Fn>
__device__ __forceinline__ void for_each_with_channel(int64_t total, int c, const Fn& fn) {
  const int64_t stride = grid_stride();
  const int step = int(stride % c);
  int64_t i = global_thread_index();
  int j = int(i % c);
  for (; i < total; i += stride) {
    fn(i, j);
    j += step;
    if (j >= c) j -= c;
  }
}

// Activations (x, residual, y, dy, dx, dresidual) are stored as S::Storage (fp32 or bf16) and
// computed on in fp32; parameters, statistics and reductions are fp32/double in both cases.

// ---- Reduction terms -------------------------------------------------------------------------
// acc[0] += x - s, acc[1] += (x - s)^2 with the shift s = x[0, j] (only read when m > 0).
template <class S>
struct ShiftedMomentsTerm {
  const typename S::Storage* x;
  int c;
  __device__ void operator()(int64_t i, int j, double* acc) const {
    const double d = double(S::load(x[i * c + j])) - double(S::load(x[j]));
    acc[0] += d;
    acc[1] += d * d;
  }
};

// The gradient reaching the normalisation: dy, or for the fused variants dy where the
// forward output y > 0 else 0 (relu_backward's form).
template <class S>
__device__ __forceinline__ float masked_grad(const typename S::Storage* y, const typename S::Storage* dy, int64_t i) {
  return y == nullptr || S::load(y[i]) > 0.f ? S::load(dy[i]) : 0.f;
}

// acc[0] += g, acc[1] += g * xhat
template <class S>
struct GradTerm {
  const typename S::Storage* x;
  const typename S::Storage* y;  // null for the plain backward
  const typename S::Storage* dy;
  const float* mean;
  const float* invstd;
  int c;
  __device__ void operator()(int64_t i, int j, double* acc) const {
    const double g = masked_grad<S>(y, dy, i * c + j);
    const double xhat = (double(S::load(x[i * c + j])) - double(mean[j])) * double(invstd[j]);
    acc[0] += g;
    acc[1] += g * xhat;
  }
};

// ---- Per-channel finalisation: one warp per channel, lane 0 writes -------------------------
template <class S>
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_statistics_kernel(const double* partial, int chunks, int64_t m, int c, const typename S::Storage* x,
                         float eps, float momentum, float* running_mean, float* running_var, float* save_mean,
                         float* save_invstd) {
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
  save_invstd[j] = float(1.0 / sqrt(biased + double(eps)));
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
// y = (x - mean) * gain + beta, then + residual (when non-null), then relu (when relu), in the
// CPU reference's order; the branches are uniform across the grid.
template <class S>
__device__ __forceinline__ typename S::Storage bn_output(float x, float mean, float gain, float beta,
                                                         const typename S::Storage* residual, int64_t i, bool relu) {
  float v = (x - mean) * gain + beta;
  if (residual != nullptr) v = v + S::load(residual[i]);
  if (relu) v = v < 0.f ? 0.f : v;  // NaN passes through, as in relu_forward
  return S::store(v);
}

template <class S>
__global__ void bn_normalize_kernel(int64_t total, int c, const typename S::Storage* x,
                                    const typename S::Storage* residual, bool relu, const float* mean,
                                    const float* invstd, const float* gamma, const float* beta,
                                    typename S::Storage* y) {
  for_each_with_channel(total, c, [&](int64_t i, int j) {
    const float gain = gamma[j] * invstd[j];
    y[i] = bn_output<S>(S::load(x[i]), mean[j], gain, beta[j], residual, i, relu);
  });
}

template <class S>
__global__ void bn_inference_kernel(int64_t total, int c, const typename S::Storage* x,
                                    const typename S::Storage* residual, bool relu, const float* gamma,
                                    const float* beta, const float* running_mean, const float* running_var, float eps,
                                    typename S::Storage* y) {
  for_each_with_channel(total, c, [&](int64_t i, int j) {
    const float invstd = float(1.0 / sqrt(double(running_var[j]) + double(eps)));
    const float gain = gamma[j] * invstd;
    y[i] = bn_output<S>(S::load(x[i]), running_mean[j], gain, beta[j], residual, i, relu);
  });
}

// dresidual (nullable) receives the masked gradient; it may alias dy (each element is read
// before it is written, by the same thread).
template <class S>
__global__ void bn_backward_dx_kernel(int64_t total, int c, const typename S::Storage* x,
                                      const typename S::Storage* y, const typename S::Storage* dy,
                                      const float* save_mean, const float* save_invstd, const float* coef,
                                      typename S::Storage* dx, typename S::Storage* dresidual) {
  for_each_with_channel(total, c, [&](int64_t i, int j) {
    const float g = masked_grad<S>(y, dy, i);
    const float xhat = (S::load(x[i]) - save_mean[j]) * save_invstd[j];
    dx[i] = S::store(coef[j] * (g - coef[c + j] - xhat * coef[2 * c + j]));
    if (dresidual != nullptr) dresidual[i] = S::store(g);
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
  const ReducePlan plan = plan_column_reduce(m);
  Workspace ws(sizeof(double) * size_t(plan.chunks) * 2 * size_t(c), stream);
  double* partial = ws.as<double>();

  column_partials<2>(m, c, plan, ShiftedMomentsTerm<S>{x, c}, partial, stream);
  bn_statistics_kernel<S><<<finalize_blocks(c), kFinalizeThreads, 0, stream>>>(
      partial, plan.chunks, m, c, x, eps, momentum, running_mean, running_var, save_mean, save_invstd);
  SP_CUDA_CHECK_LAUNCH();
  const int64_t total = m * c;
  if (total == 0) return;
  bn_normalize_kernel<S><<<element_blocks(total), kElementThreads, 0, stream>>>(total, c, x, residual, relu,
                                                                                save_mean, save_invstd, gamma, beta, y);
  SP_CUDA_CHECK_LAUNCH();
}

template <class S>
void forward_inference_impl(const char* op, int64_t m, int64_t c64, const typename S::Storage* x,
                            const typename S::Storage* residual, bool relu, const float* gamma, const float* beta,
                            const float* running_mean, const float* running_var, float eps, typename S::Storage* y,
                            cudaStream_t stream) {
  const int c = checked_columns(op, c64);
  const int64_t total = m * c;
  if (total == 0) return;
  bn_inference_kernel<S><<<element_blocks(total), kElementThreads, 0, stream>>>(
      total, c, x, residual, relu, gamma, beta, running_mean, running_var, eps, y);
  SP_CUDA_CHECK_LAUNCH();
}

template <class S>
void backward_impl(const char* op, int64_t m, int64_t c64, const typename S::Storage* x,
                   const typename S::Storage* y, const typename S::Storage* dy, const float* gamma,
                   const float* save_mean, const float* save_invstd, typename S::Storage* dx,
                   typename S::Storage* dresidual, float* dgamma, float* dbeta, cudaStream_t stream) {
  const int c = checked_columns(op, c64);
  const ReducePlan plan = plan_column_reduce(m);
  const size_t partial_doubles = size_t(plan.chunks) * 2 * size_t(c);
  Workspace ws(sizeof(double) * partial_doubles + sizeof(float) * 3 * size_t(c), stream);
  double* partial = ws.as<double>();
  float* coef = reinterpret_cast<float*>(partial + partial_doubles);

  column_partials<2>(m, c, plan, GradTerm<S>{x, y, dy, save_mean, save_invstd, c}, partial, stream);
  bn_backward_finalize_kernel<<<finalize_blocks(c), kFinalizeThreads, 0, stream>>>(partial, plan.chunks, m, c, gamma,
                                                                                   save_invstd, dgamma, dbeta, coef);
  SP_CUDA_CHECK_LAUNCH();
  const int64_t total = m * c;
  if (total == 0) return;
  bn_backward_dx_kernel<S><<<element_blocks(total), kElementThreads, 0, stream>>>(total, c, x, y, dy, save_mean,
                                                                                  save_invstd, coef, dx, dresidual);
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
