// The micro-kernel compiled with -mavx2 -mfma (see kernels/CMakeLists.txt); gemm.cpp calls it
// only after checking the CPU supports both.
#include <cstring>

#include "kernels/cpu/gemm_micro.h"

namespace sp::kernels::cpu::gemm_detail::avx2 {
constexpr int kVectorBytes = 32;
#include "kernels/cpu/gemm_micro.inl"
}  // namespace sp::kernels::cpu::gemm_detail::avx2
