// Batch normalisation over NHWC activations viewed as [m = N*H*W, c].
//
// Statistics are column reductions over the m rows (row_ops.h: double partials in fixed
// blocks, so the result is deterministic). The variance takes a second pass over the centred
// values instead of E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std.
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/row_ops.h"

namespace sp::kernels::cpu {
namespace {

// y = (x - mean) * (gamma * invstd) + beta, per channel.
template <typename T>
void normalize(int64_t m, int64_t c, const T* x, const T* mean, const T* invstd, const T* gamma, const T* beta, T* y) {
  std::vector<T> gain(c);
  for (int64_t j = 0; j < c; ++j) gain[j] = gamma[j] * invstd[j];
  parallel_for(m, detail::row_grain(c), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < c; ++j) y[i * c + j] = (x[i * c + j] - mean[j]) * gain[j] + beta[j];
  });
}

}  // namespace

template <typename T>
void batchnorm_forward_training(int64_t m, int64_t c, const T* x, const T* gamma, const T* beta, T eps, T momentum,
                                T* running_mean, T* running_var, T* y, T* save_mean, T* save_invstd) {
  std::vector<double> mean(c), var(c);
  detail::column_sums(
      m, c, 1,
      [&](int64_t b, int64_t e, double* acc) {
        for (int64_t i = b; i < e; ++i)
          for (int64_t j = 0; j < c; ++j) acc[j] += x[i * c + j];
      },
      mean.data());
  for (double& v : mean) v /= double(m);
  detail::column_sums(
      m, c, 1,
      [&](int64_t b, int64_t e, double* acc) {
        for (int64_t i = b; i < e; ++i)
          for (int64_t j = 0; j < c; ++j) {
            const double d = double(x[i * c + j]) - mean[j];
            acc[j] += d * d;
          }
      },
      var.data());

  const double mom = double(momentum);
  for (int64_t j = 0; j < c; ++j) {
    const double biased = var[j] / double(m);
    // A single sample has no unbiased estimate; its (zero) biased variance stands in.
    const double unbiased = m > 1 ? biased * double(m) / double(m - 1) : biased;
    running_mean[j] = T((1.0 - mom) * double(running_mean[j]) + mom * mean[j]);
    running_var[j] = T((1.0 - mom) * double(running_var[j]) + mom * unbiased);
    save_mean[j] = T(mean[j]);
    save_invstd[j] = T(1.0 / std::sqrt(biased + double(eps)));
  }
  normalize(m, c, x, save_mean, save_invstd, gamma, beta, y);
}

template <typename T>
void batchnorm_forward_inference(int64_t m, int64_t c, const T* x, const T* gamma, const T* beta,
                                 const T* running_mean, const T* running_var, T eps, T* y) {
  std::vector<T> invstd(c);
  for (int64_t j = 0; j < c; ++j) invstd[j] = T(1.0 / std::sqrt(double(running_var[j]) + double(eps)));
  normalize(m, c, x, running_mean, invstd.data(), gamma, beta, y);
}

// With xhat = (x - mean) * invstd and sums over the m rows of each channel:
//   dbeta = sum(dy), dgamma = sum(dy * xhat),
//   dx = gamma * invstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat)).
template <typename T>
void batchnorm_backward(int64_t m, int64_t c, const T* x, const T* dy, const T* gamma, const T* save_mean,
                        const T* save_invstd, T* dx, T* dgamma, T* dbeta) {
  std::vector<double> sums(2 * c);  // [sum(dy) | sum(dy * xhat)]
  detail::column_sums(
      m, c, 2,
      [&](int64_t b, int64_t e, double* acc) {
        for (int64_t i = b; i < e; ++i)
          for (int64_t j = 0; j < c; ++j) {
            const double g = dy[i * c + j];
            const double xhat = (double(x[i * c + j]) - double(save_mean[j])) * double(save_invstd[j]);
            acc[j] += g;
            acc[c + j] += g * xhat;
          }
      },
      sums.data());

  std::vector<T> gain(c), mean_dy(c), mean_dy_xhat(c);
  for (int64_t j = 0; j < c; ++j) {
    dbeta[j] = T(sums[j]);
    dgamma[j] = T(sums[c + j]);
    gain[j] = gamma[j] * save_invstd[j];
    mean_dy[j] = T(sums[j] / double(m));
    mean_dy_xhat[j] = T(sums[c + j] / double(m));
  }
  parallel_for(m, detail::row_grain(c), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < c; ++j) {
        const T xhat = (x[i * c + j] - save_mean[j]) * save_invstd[j];
        dx[i * c + j] = gain[j] * (dy[i * c + j] - mean_dy[j] - xhat * mean_dy_xhat[j]);
      }
  });
}

#define SP_INSTANTIATE_BATCHNORM(T)                                                                                  \
  template void batchnorm_forward_training<T>(int64_t, int64_t, const T*, const T*, const T*, T, T, T*, T*, T*, T*, \
                                              T*);                                                                   \
  template void batchnorm_forward_inference<T>(int64_t, int64_t, const T*, const T*, const T*, const T*, const T*,  \
                                               T, T*);                                                               \
  template void batchnorm_backward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*, const T*, T*, T*, T*);
SP_INSTANTIATE_BATCHNORM(float)
SP_INSTANTIATE_BATCHNORM(double)
#undef SP_INSTANTIATE_BATCHNORM

}  // namespace sp::kernels::cpu
