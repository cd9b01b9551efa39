// The geometry of a convolution as an implicit GEMM, shared by the fp32 (conv.cu) and the bf16
// tensor-core (conv_bf16.cu) convolutions: sizes in int, checked against the GEMM's limits.
#pragma once

#include <cstdint>

#include "kernels/common/error.h"
#include "kernels/common/shapes.h"
#include "kernels/cuda/conv_loaders.h"
#include "kernels/cuda/gemm_mainloop.cuh"

namespace sp::kernels::cuda::detail {

// ConvDims (the sizes) is in conv_loaders.h, with the loaders that use them.

// Throws sp::Error naming `op` for an invalid shape or a dimension beyond the GEMM's reach.
inline ConvDims conv_dims(const Conv2dShape& sh, const char* op) {
  SP_CHECK(sh.valid(), op, ": invalid shape");
  const int64_t npq = int64_t(sh.n) * sh.p() * sh.q(), nhw = int64_t(sh.n) * sh.h * sh.w;
  const int64_t taps = int64_t(sh.r) * sh.s * sh.c, rsk = int64_t(sh.r) * sh.s * sh.k;
  for (int64_t d : {npq, nhw, taps, rsk, int64_t(sh.k), int64_t(sh.c)})
    SP_CHECK(d <= kMaxGemmDim, op, ": dimension ", d, " too large for the implicit GEMM");
  return conv_sizes(sh);
}

}  // namespace sp::kernels::cuda::detail
