// Softmax cross-entropy with label smoothing, averaged over the batch.
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/row_ops.h"

namespace sp::kernels::cpu {

// Per sample, with z' = z - max(z) (so exp cannot overflow) and S = sum_j exp(z'_j):
//   log p_j = z'_j - log S, and since the target q sums to one,
//   loss = -sum_j q_j log p_j = log S - sum_j q_j z'_j.
// Everything per sample is computed in double; the batch mean sums the per-sample losses in
// index order so the result does not depend on the thread split.
template <typename T>
void softmax_cross_entropy(int64_t n, int64_t classes, const T* logits, const int32_t* labels, T smoothing, T* loss,
                           T* dlogits, int64_t* correct) {
  // Checked up front so that the throw happens on the caller's thread before anything is written.
  for (int64_t i = 0; i < n; ++i)
    SP_CHECK(labels[i] >= 0 && labels[i] < classes, "softmax_cross_entropy: label ", labels[i], " of sample ", i,
             " is outside [0, ", classes, ")");

  const double eps = double(smoothing);
  const double q_off = eps / double(classes);  // target mass of every class
  const double q_on = 1.0 - eps + q_off;       // target mass of the labelled class
  std::vector<double> sample_loss(n);
  std::vector<char> hit(n);
  parallel_for(n, detail::row_grain(classes, 4096), [&](int64_t b, int64_t e) {
    std::vector<double> shifted(classes);
    for (int64_t i = b; i < e; ++i) {
      const T* z = logits + i * classes;
      const int64_t label = labels[i];
      int64_t argmax = 0;
      for (int64_t j = 1; j < classes; ++j)
        if (z[j] > z[argmax]) argmax = j;
      double sum_exp = 0.0, target_dot = 0.0;
      for (int64_t j = 0; j < classes; ++j) {
        const double zj = double(z[j]) - double(z[argmax]);
        shifted[j] = zj;
        sum_exp += std::exp(zj);
        // A class with no target mass adds nothing, even at a logit of -inf (0 * -inf is NaN).
        const double q = j == label ? q_on : q_off;
        if (q != 0) target_dot += q * zj;
      }
      sample_loss[i] = std::log(sum_exp) - target_dot;
      hit[i] = argmax == label;
      for (int64_t j = 0; j < classes; ++j) {
        const double p = std::exp(shifted[j]) / sum_exp;
        dlogits[i * classes + j] = T((p - (j == label ? q_on : q_off)) / double(n));
      }
    }
  });

  double total = 0.0;
  int64_t hits = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += sample_loss[i];
    hits += hit[i];
  }
  *loss = T(total / double(n));
  *correct = hits;
}

template void softmax_cross_entropy<float>(int64_t, int64_t, const float*, const int32_t*, float, float*, float*,
                                           int64_t*);
template void softmax_cross_entropy<double>(int64_t, int64_t, const double*, const int32_t*, double, double*,
                                            double*, int64_t*);

}  // namespace sp::kernels::cpu
