// SGD with momentum, Nesterov and L2 weight decay (formula in SgdParams, shapes.h).
#include <cstdint>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace sp::kernels::cpu {

template <typename T>
void sgd_step(const std::vector<SgdTensor<T>>& tensors, const SgdParams& p) {
  const T lr = T(p.lr_device ? *p.lr_device : p.lr), mu = T(p.momentum), wd = T(p.weight_decay), gs = T(p.grad_scale);
  for (const SgdTensor<T>& t : tensors) {
    parallel_for(t.size, 16384, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T g = gs * t.grad[i] + wd * t.param[i];
        if (mu == T(0)) {
          t.param[i] -= lr * g;
          continue;
        }
        const T v = mu * t.momentum[i] + g;
        t.momentum[i] = v;
        t.param[i] -= lr * (p.nesterov ? g + mu * v : v);
      }
    });
  }
}

template void sgd_step<float>(const std::vector<SgdTensor<float>>&, const SgdParams&);
template void sgd_step<double>(const std::vector<SgdTensor<double>>&, const SgdParams&);

}  // namespace sp::kernels::cpu
