// The micro-kernel compiled with -mavx512f -mfma (see kernels/CMakeLists.txt): -mavx512f implies
// AVX2 but not FMA's 128- and 256-bit forms, which a narrower path of the compiler's choosing
// would need to be fused as the AVX2 kernel's are. gemm.cpp calls it only after checking the
// CPU (and its operating system) supports AVX-512F and FMA.
#include <cstring>

#include "kernels/cpu/gemm_micro.h"

namespace sp::kernels::cpu::gemm_detail::avx512 {
constexpr int kVectorBytes = 64;
#include "kernels/cpu/gemm_micro.inl"
}  // namespace sp::kernels::cpu::gemm_detail::avx512
