// The micro-kernel compiled with -mavx512f (which implies AVX2 and FMA; see
// kernels/CMakeLists.txt); gemm.cpp calls it only after checking the CPU (and its operating
// system) supports AVX-512F.
#include <cstring>

#include "kernels/cpu/gemm_micro.h"

namespace sp::kernels::cpu::gemm_detail::avx512 {
constexpr int kVectorBytes = 64;
#include "kernels/cpu/gemm_micro.inl"
}  // namespace sp::kernels::cpu::gemm_detail::avx512
