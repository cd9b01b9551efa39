// The geometry of a convolution as an implicit GEMM, shared by the fp32 (conv.cu) and the bf16
// tensor-core (conv_bf16.cu) convolutions: sizes in int, checked against the GEMM's limits.
#pragma once

#include <cstdint>

#include "kernels/common/error.h"
#include "kernels/common/shapes.h"
#include "kernels/cuda/gemm_mainloop.cuh"

namespace sp::kernels::cuda::detail {

struct ConvDims {
  int n, h, w, c, k, r, s, p, q, stride, pad;
  int npq;   // output pixels
  int nhw;   // input pixels
  int taps;  // R*S*C, the length of a filter
  int rsk;   // R*S*K, the backward-data reduction
};

// Throws sp::Error naming `op` for an invalid shape or a dimension beyond the GEMM's reach.
inline ConvDims conv_dims(const Conv2dShape& sh, const char* op) {
  SP_CHECK(sh.valid(), op, ": invalid shape");
  const int64_t npq = int64_t(sh.n) * sh.p() * sh.q(), nhw = int64_t(sh.n) * sh.h * sh.w;
  const int64_t taps = int64_t(sh.r) * sh.s * sh.c, rsk = int64_t(sh.r) * sh.s * sh.k;
  for (int64_t d : {npq, nhw, taps, rsk, int64_t(sh.k), int64_t(sh.c)})
    SP_CHECK(d <= kMaxGemmDim, op, ": dimension ", d, " too large for the implicit GEMM");
  ConvDims g;
  g.n = sh.n, g.h = sh.h, g.w = sh.w, g.c = sh.c, g.k = sh.k, g.r = sh.r, g.s = sh.s;
  g.p = sh.p(), g.q = sh.q(), g.stride = sh.stride, g.pad = sh.pad;
  g.npq = int(npq), g.nhw = int(nhw), g.taps = int(taps), g.rsk = int(rsk);
  return g;
}

}  // namespace sp::kernels::cuda::detail
