// The micro-kernel for the baseline instruction set of the target.
#include <cstring>

#include "kernels/cpu/gemm_micro.h"

namespace sp::kernels::cpu::gemm_detail::generic {
constexpr int kVectorBytes = 32;
#include "kernels/cpu/gemm_micro.inl"
}  // namespace sp::kernels::cpu::gemm_detail::generic
