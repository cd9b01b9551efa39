// SGD with momentum, Nesterov and L2 weight decay (formula in SgdParams, shapes.h).
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace sp::kernels::cpu {

template <typename T>
void sgd_step(const std::vector<SgdTensor<T>>& tensors, const SgdParams& p) {
  const T lr = T(p.lr_device ? *p.lr_device : p.lr), mu = T(p.momentum), wd = T(p.weight_decay), gs = T(p.grad_scale);
  for (const SgdTensor<T>& t : tensors) {
    constexpr bool is_float = std::is_same_v<T, float>;
    SP_CHECK(is_float || !t.param_bf16, "sgd_step: a bf16 weight copy needs float parameters");
    parallel_for(t.size, 16384, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T g = gs * t.grad[i] + wd * t.param[i];
        if (mu == T(0)) {
          t.param[i] -= lr * g;
        } else {
          const T v = mu * t.momentum[i] + g;
          t.momentum[i] = v;
          t.param[i] -= lr * (p.nesterov ? g + mu * v : v);
        }
        if (t.param_bf16) t.param_bf16[i] = bf16_from_f32(float(t.param[i]));
      }
    });
  }
}

template void sgd_step<float>(const std::vector<SgdTensor<float>>&, const SgdParams&);
template void sgd_step<double>(const std::vector<SgdTensor<double>>&, const SgdParams&);

}  // namespace sp::kernels::cpu
