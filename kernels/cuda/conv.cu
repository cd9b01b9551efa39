// Convolutions on NHWC activations and KRSC weights as implicit GEMMs: the GEMM main loop of
// gemm_mainloop.cuh with loaders that gather the activations through the filter window on
// the fly (zero in the padding), so no im2col buffer is ever formed.
//
//   forward          y[pix, k]   = sum_{tap}       x(pix, tap)   * w[k, tap]     (+ bias[k])
//                    M = N*P*Q output pixels, N = K, K_gemm = R*S*C taps (r, s, c), c fastest
//   backward data    dx[pix, c]  = sum_{r, s, k}   dy(pix, r, s, k) * w[k, r, s, c]
//                    M = N*H*W input pixels, N = C, K_gemm = R*S*K, k fastest; dy(pix, r, s, k)
//                    is dy at the output pixel whose window puts tap (r, s) on pix, zero when
//                    there is none (with stride 2, three taps in four are such zeros)
//   backward weight  dw^T[tap, k] = sum_{pix}      x(pix, tap)   * dy[pix, k]
//                    M = R*S*C taps, N = K, K_gemm = N*P*Q output pixels (split K), written
//                    transposed into dw[k, tap]; the taps go on M because K is usually the
//                    small dimension and N is where the narrow tile fits a small extent.
// Every loader runs along a dimension that is contiguous in memory: with C (or K) a multiple
// of 4 and 16-byte aligned tensors, a chunk of 4 elements is one float4 load (all ResNet
// layers but the first, C = 3, which takes the element-wise path). The index arithmetic is the
// bf16 convolutions' (conv_loaders.h: divisions by multiply-high and shift, checked against the
// convolution's definition on the CPU by test_conv_loaders).
#include "kernels/cuda/conv_geom.cuh"
#include "kernels/cuda/gemm_mainloop.cuh"
#include "kernels/cuda/ops.h"

namespace sp::kernels::cuda {
namespace {

using detail::Epilogue;
using detail::MatrixLoader;
using detail::mma::ConvGeom;

ConvGeom conv_geom(const Conv2dShape& sh) { return detail::mma::make_conv_geom(detail::conv_dims(sh, "conv2d")); }

// An fp32 operand of the implicit GEMM over one of conv_loaders.h's gathers (Index: row(),
// col() and offset(), the index of element (x, k) in the tensor or -1 for a zero; its own
// bf16 base pointer is unused). With vec (the gather's run, C or K, a multiple of 4 and base
// 16-byte aligned) the 4 elements of a chunk, starting at a multiple of 4 along that run, are
// adjacent in memory or all zero, so the first element's offset decides for the whole float4.
template <class Index>
struct F32GatherLoader {
  const float* base;
  bool vec;
  Index ix;

  __device__ bool contiguous_k() const { return Index::kContigK; }
  __device__ float4 load4(int x, int k) const {
    if (vec) {
      const int64_t o = ix.offset(ix.row(x), ix.col(k));
      return o < 0 ? make_float4(0.f, 0.f, 0.f, 0.f) : *reinterpret_cast<const float4*>(base + o);
    }
    float e[4];
    if constexpr (Index::kContigK) {
      const typename Index::Row r = ix.row(x);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int64_t o = ix.offset(r, ix.col(k + t));
        e[t] = o < 0 ? 0.f : base[o];
      }
    } else {
      const typename Index::Col c = ix.col(k);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int64_t o = ix.offset(ix.row(x + t), c);
        e[t] = o < 0 ? 0.f : base[o];
      }
    }
    return make_float4(e[0], e[1], e[2], e[3]);
  }
};

// The gather Index over base, whose contiguous run (C or K) is `run` elements long.
// Forward A: x(pix, tap), run C. Backward-data A: dy(pix, (r * S + s) * K + k), run K; B:
// w[k, r, s, c] as element (c, (r * S + s) * K + k), run C. Backward-weight A: x(pix, tap) as
// element (tap, pix), run C.
template <class Index>
F32GatherLoader<Index> gather(const float* base, int64_t run, const ConvGeom& g) {
  const bool vec = reinterpret_cast<uintptr_t>(base) % 16 == 0 && detail::mma::run_allows_chunks(run, 4);
  return F32GatherLoader<Index>{base, vec, Index{{nullptr, false}, g}};
}

template <class LoaderA, class LoaderB>
void run(const LoaderA& a, const LoaderB& b, int m, int n, int k, const Epilogue& ep, cudaStream_t stream) {
  detail::with_tile_for(n, [&](auto tile) { detail::run_gemm_tiles<decltype(tile)>(a, b, m, n, k, ep, stream); });
}

}  // namespace

void conv2d_forward(const Conv2dShape& sh, const float* x, const float* w, const float* bias, float* y,
                    cudaStream_t stream) {
  const ConvGeom g = conv_geom(sh);
  const auto a = gather<detail::mma::FwdInputLoader>(x, g.c, g);
  // w[k, tap]: element (k, tap) of a K x taps matrix, contiguous along the taps.
  const MatrixLoader b{w, g.taps, g.k, g.taps, true, detail::float4_ok(w, g.taps)};
  run(a, b, g.npq, g.k, g.taps, detail::row_major_epilogue(y, g.k, 1.f, 0.f, bias), stream);
}

void conv2d_backward_data(const Conv2dShape& sh, const float* dy, const float* w, float* dx, cudaStream_t stream,
                          float beta) {
  const ConvGeom g = conv_geom(sh);
  const auto a = gather<detail::mma::BwdDataGradLoader>(dy, g.k, g);
  const auto b = gather<detail::mma::BwdDataWeightLoader>(w, g.c, g);
  run(a, b, g.nhw, g.c, g.rsk, detail::row_major_epilogue(dx, g.c, 1.f, beta, nullptr), stream);
}

void conv2d_backward_weight(const Conv2dShape& sh, const float* x, const float* dy, float* dw, float* dbias,
                            cudaStream_t stream) {
  const ConvGeom g = conv_geom(sh);
  const auto a = gather<detail::mma::BwdWeightInputLoader>(x, g.c, g);
  // dy[pix, k]: element (k, pix), contiguous along k.
  const MatrixLoader b{dy, g.k, g.k, g.npq, false, detail::float4_ok(dy, g.k)};
  // Result (tap, k) goes to dw[k * taps + tap].
  const Epilogue ep{dw, 1, g.taps, 1.f, 0.f, nullptr, false};
  run(a, b, g.taps, g.k, g.npq, ep, stream);
  if (dbias) detail::column_sums(g.npq, g.k, dy, dbias, stream);
}

}  // namespace sp::kernels::cuda
