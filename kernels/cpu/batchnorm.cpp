// Batch normalisation over NHWC activations viewed as [m = N*H*W, c].
//
// Statistics are column reductions over the m rows (row_ops.h: double partials in fixed
// blocks, so the result is deterministic). The variance takes a second pass over the centred
// values instead of E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/row_ops.h"

namespace sp::kernels::cpu {
namespace {

// y = (x - mean) * (gamma * invstd) + beta, per channel; then, for the fused variants,
// y += residual (when non-null) and y = relu(y) (when relu). Each step is the same
// floating-point operation as the unfused op it replaces (add, relu_forward), so fused and
// composed results are bit-identical.
template <typename T>
void normalize(int64_t m, int64_t c, const T* x, const T* mean, const T* invstd, const T* gamma, const T* beta,
               const T* residual, bool relu, T* y) {
  std::vector<T> gain(c);
  for (int64_t j = 0; j < c; ++j) gain[j] = gamma[j] * invstd[j];
  parallel_for(m, detail::row_grain(c), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < c; ++j) {
        T v = (x[i * c + j] - mean[j]) * gain[j] + beta[j];
        if (residual) v = v + residual[i * c + j];
        if (relu) v = v < T(0) ? T(0) : v;  // relu_forward's form: NaN passes through
        y[i * c + j] = v;
      }
  });
}

// The batch statistics of the training forward (see batchnorm_forward_training).
template <typename T>
void training_statistics(int64_t m, int64_t c, const T* x, T eps, T momentum, T* running_mean, T* running_var,
                         T* save_mean, T* save_invstd) {
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
}

// The backward pass shared by the plain and fused variants. The gradient reaching the
// normalisation is g = dy, or for the fused variants g = dy where y > 0 else 0
// (relu_backward's form), computed on the fly from the forward output y. dresidual (when
// non-null) receives g; it may alias dy.
// v when y > 0, else +0 (also for a NaN y or v), by masking v's bits: no branch, and exactly
// relu_backward's value.
template <typename T>
inline T select_positive(T y, T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "float or double");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits b;
  std::memcpy(&b, &v, sizeof b);
  b &= Bits(0) - Bits(y > T(0));
  std::memcpy(&v, &b, sizeof b);
  return v;
}

// The body is compiled once with the mask and once without, and the mask selects by bits
// (select_positive): a branch on the sign of y, which is random, mispredicts half the time
// (it made the fused backward 5x slower than the plain one).
template <bool kMasked, typename T>
void backward_body(int64_t m, int64_t c, const T* x, const T* y, const T* dy, const T* gamma, const T* save_mean,
                   const T* save_invstd, T* dx, T* dresidual, T* dgamma, T* dbeta) {
  auto grad = [&](int64_t i) {
    const T d = dy[i];
    if constexpr (kMasked) {
      return select_positive(y[i], d);
    } else {
      return d;
    }
  };
  std::vector<double> sums(2 * c);  // [sum(g) | sum(g * xhat)]
  detail::column_sums(
      m, c, 2,
      [&](int64_t b, int64_t e, double* acc) {
        for (int64_t i = b; i < e; ++i)
          for (int64_t j = 0; j < c; ++j) {
            const double g = grad(i * c + j);
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
        const T g = grad(i * c + j);
        const T xhat = (x[i * c + j] - save_mean[j]) * save_invstd[j];
        dx[i * c + j] = gain[j] * (g - mean_dy[j] - xhat * mean_dy_xhat[j]);
        if (dresidual) dresidual[i * c + j] = g;
      }
  });
}

template <typename T>
void backward_impl(int64_t m, int64_t c, const T* x, const T* y /*nullable*/, const T* dy, const T* gamma,
                   const T* save_mean, const T* save_invstd, T* dx, T* dresidual, T* dgamma, T* dbeta) {
  if (y != nullptr)
    backward_body<true>(m, c, x, y, dy, gamma, save_mean, save_invstd, dx, dresidual, dgamma, dbeta);
  else
    backward_body<false>(m, c, x, y, dy, gamma, save_mean, save_invstd, dx, dresidual, dgamma, dbeta);
}

}  // namespace

template <typename T>
void batchnorm_forward_training(int64_t m, int64_t c, const T* x, const T* gamma, const T* beta, T eps, T momentum,
                                T* running_mean, T* running_var, T* y, T* save_mean, T* save_invstd) {
  training_statistics(m, c, x, eps, momentum, running_mean, running_var, save_mean, save_invstd);
  normalize(m, c, x, save_mean, save_invstd, gamma, beta, static_cast<const T*>(nullptr), false, y);
}

template <typename T>
void batchnorm_forward_inference(int64_t m, int64_t c, const T* x, const T* gamma, const T* beta,
                                 const T* running_mean, const T* running_var, T eps, T* y) {
  batchnorm_add_relu_forward_inference<T>(m, c, x, nullptr, gamma, beta, running_mean, running_var, eps, false, y);
}

// With xhat = (x - mean) * invstd and sums over the m rows of each channel:
//   dbeta = sum(dy), dgamma = sum(dy * xhat),
//   dx = gamma * invstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat)).
template <typename T>
void batchnorm_backward(int64_t m, int64_t c, const T* x, const T* dy, const T* gamma, const T* save_mean,
                        const T* save_invstd, T* dx, T* dgamma, T* dbeta) {
  backward_impl<T>(m, c, x, nullptr, dy, gamma, save_mean, save_invstd, dx, nullptr, dgamma, dbeta);
}

template <typename T>
void batchnorm_add_relu_forward_training(int64_t m, int64_t c, const T* x, const T* residual, const T* gamma,
                                         const T* beta, T eps, T momentum, T* running_mean, T* running_var, T* y,
                                         T* save_mean, T* save_invstd) {
  training_statistics(m, c, x, eps, momentum, running_mean, running_var, save_mean, save_invstd);
  normalize(m, c, x, save_mean, save_invstd, gamma, beta, residual, true, y);
}

template <typename T>
void batchnorm_add_relu_forward_inference(int64_t m, int64_t c, const T* x, const T* residual, const T* gamma,
                                          const T* beta, const T* running_mean, const T* running_var, T eps, bool relu,
                                          T* y) {
  std::vector<T> invstd(c);
  for (int64_t j = 0; j < c; ++j) invstd[j] = T(1.0 / std::sqrt(double(running_var[j]) + double(eps)));
  normalize(m, c, x, running_mean, invstd.data(), gamma, beta, residual, relu, y);
}

template <typename T>
void batchnorm_add_relu_backward(int64_t m, int64_t c, const T* x, const T* y, const T* dy, const T* gamma,
                                 const T* save_mean, const T* save_invstd, T* dx, T* dresidual, T* dgamma, T* dbeta) {
  backward_impl<T>(m, c, x, y, dy, gamma, save_mean, save_invstd, dx, dresidual, dgamma, dbeta);
}

#define SP_INSTANTIATE_BATCHNORM(T)                                                                                  \
  template void batchnorm_forward_training<T>(int64_t, int64_t, const T*, const T*, const T*, T, T, T*, T*, T*, T*, \
                                              T*);                                                                   \
  template void batchnorm_forward_inference<T>(int64_t, int64_t, const T*, const T*, const T*, const T*, const T*,  \
                                               T, T*);                                                               \
  template void batchnorm_backward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*, const T*, T*, T*, T*); \
  template void batchnorm_add_relu_forward_training<T>(int64_t, int64_t, const T*, const T*, const T*, const T*, T, \
                                                       T, T*, T*, T*, T*, T*);                                       \
  template void batchnorm_add_relu_forward_inference<T>(int64_t, int64_t, const T*, const T*, const T*, const T*,   \
                                                        const T*, const T*, T, bool, T*);                            \
  template void batchnorm_add_relu_backward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*, const T*,  \
                                               const T*, T*, T*, T*, T*);
SP_INSTANTIATE_BATCHNORM(float)
SP_INSTANTIATE_BATCHNORM(double)
#undef SP_INSTANTIATE_BATCHNORM

}  // namespace sp::kernels::cpu
