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
// layers but the first, C = 3, which takes the element-wise path).
#include "kernels/cuda/conv_geom.cuh"
#include "kernels/cuda/gemm_mainloop.cuh"
#include "kernels/cuda/ops.h"

namespace sp::kernels::cuda {
namespace {

using detail::Epilogue;
using detail::MatrixLoader;

using ConvGeom = detail::ConvDims;

ConvGeom conv_geom(const Conv2dShape& sh) { return detail::conv_dims(sh, "conv2d"); }

// Index in x of input element (pix, tap) of the convolution's implicit column matrix, or -1
// when the tap falls in the padding or the coordinates are outside the matrix.
__device__ __forceinline__ int64_t input_offset(const ConvGeom& g, int pix, int tap) {
  if (pix >= g.npq || tap >= g.taps) return -1;
  const int q = pix % g.q, np = pix / g.q, p = np % g.p, img = np / g.p;
  const int c = tap % g.c, rs = tap / g.c, s = rs % g.s, r = rs / g.s;
  const int h = p * g.stride - g.pad + r, w = q * g.stride - g.pad + s;
  if (h < 0 || h >= g.h || w < 0 || w >= g.w) return -1;
  return ((int64_t(img) * g.h + h) * g.w + w) * g.c + c;
}

// A loader over a gather: Derived::offset(x, k) gives the index of element (x, k) in base, or
// -1 for a zero. With vec, the layout guarantees (see each loader) that the 4 elements of a
// chunk are adjacent in memory, start 16-byte aligned, and are all present or all zero, so
// the first element's offset decides for the whole float4.
template <class Derived, bool kContigK>
struct GatherLoader {
  const float* base;
  bool vec;

  __device__ bool contiguous_k() const { return kContigK; }
  __device__ float4 load4(int x, int k) const {
    const Derived& self = static_cast<const Derived&>(*this);
    if (vec) {
      const int64_t o = self.offset(x, k);
      return o < 0 ? make_float4(0.f, 0.f, 0.f, 0.f) : *reinterpret_cast<const float4*>(base + o);
    }
    float e[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int64_t o = kContigK ? self.offset(x, k + t) : self.offset(x + t, k);
      e[t] = o < 0 ? 0.f : base[o];
    }
    return make_float4(e[0], e[1], e[2], e[3]);
  }
};

// Forward A: x(pix, tap). vec needs C % 4 == 0: a chunk is c..c+3 (c % 4 == 0) of one tap.
struct FwdInputLoader : GatherLoader<FwdInputLoader, true> {
  ConvGeom g;
  __device__ int64_t offset(int pix, int tap) const { return input_offset(g, pix, tap); }
};

// Backward-data A: dy(pix, t) with t = (r * S + s) * K + k. vec needs K % 4 == 0: a chunk is
// k..k+3 (k % 4 == 0) of one output pixel.
struct BwdDataGradLoader : GatherLoader<BwdDataGradLoader, true> {
  ConvGeom g;
  __device__ int64_t offset(int pix, int t) const {
    if (pix >= g.nhw || t >= g.rsk) return -1;
    const int w = pix % g.w, nh = pix / g.w, h = nh % g.h, img = nh / g.h;
    const int k = t % g.k, rs = t / g.k, s = rs % g.s, r = rs / g.s;
    // Output pixel (p, q) reaches input (h, w) through tap (r, s) when p * stride - pad + r == h.
    const int ph = h + g.pad - r, pw = w + g.pad - s;
    if (ph < 0 || pw < 0 || ph % g.stride != 0 || pw % g.stride != 0) return -1;
    const int p = ph / g.stride, q = pw / g.stride;
    if (p >= g.p || q >= g.q) return -1;
    return ((int64_t(img) * g.p + p) * g.q + q) * g.k + k;
  }
};

// Backward-data B: w[k, r, s, c] as element (c, t), t = (r * S + s) * K + k, contiguous along
// c. vec needs C % 4 == 0: a chunk is c..c+3 (c % 4 == 0) of one (k, r, s).
struct BwdDataWeightLoader : GatherLoader<BwdDataWeightLoader, false> {
  ConvGeom g;
  __device__ int64_t offset(int c, int t) const {
    if (c >= g.c || t >= g.rsk) return -1;
    const int k = t % g.k, rs = t / g.k;
    return (int64_t(k) * g.r * g.s + rs) * g.c + c;
  }
};

// Backward-weight A: x(pix, tap) as element (tap, pix), contiguous along the taps' c.
// vec needs C % 4 == 0, as for the forward.
struct BwdWeightInputLoader : GatherLoader<BwdWeightInputLoader, false> {
  ConvGeom g;
  __device__ int64_t offset(int tap, int pix) const { return input_offset(g, pix, tap); }
};

template <class LoaderA, class LoaderB>
void run(const LoaderA& a, const LoaderB& b, int m, int n, int k, const Epilogue& ep, cudaStream_t stream) {
  detail::with_tile_for(n, [&](auto tile) { detail::run_gemm_tiles<decltype(tile)>(a, b, m, n, k, ep, stream); });
}

}  // namespace

void conv2d_forward(const Conv2dShape& sh, const float* x, const float* w, const float* bias, float* y,
                    cudaStream_t stream) {
  const ConvGeom g = conv_geom(sh);
  const FwdInputLoader a{{x, detail::float4_ok(x, g.c)}, g};
  // w[k, tap]: element (k, tap) of a K x taps matrix, contiguous along the taps.
  const MatrixLoader b{w, g.taps, g.k, g.taps, true, detail::float4_ok(w, g.taps)};
  run(a, b, g.npq, g.k, g.taps, detail::row_major_epilogue(y, g.k, 1.f, 0.f, bias), stream);
}

void conv2d_backward_data(const Conv2dShape& sh, const float* dy, const float* w, float* dx, cudaStream_t stream) {
  const ConvGeom g = conv_geom(sh);
  const BwdDataGradLoader a{{dy, detail::float4_ok(dy, g.k)}, g};
  const BwdDataWeightLoader b{{w, detail::float4_ok(w, g.c)}, g};
  run(a, b, g.nhw, g.c, g.rsk, detail::row_major_epilogue(dx, g.c, 1.f, 0.f, nullptr), stream);
}

void conv2d_backward_weight(const Conv2dShape& sh, const float* x, const float* dy, float* dw, float* dbias,
                            cudaStream_t stream) {
  const ConvGeom g = conv_geom(sh);
  const BwdWeightInputLoader a{{x, detail::float4_ok(x, g.c)}, g};
  // dy[pix, k]: element (k, pix), contiguous along k.
  const MatrixLoader b{dy, g.k, g.k, g.npq, false, detail::float4_ok(dy, g.k)};
  // Result (tap, k) goes to dw[k * taps + tap].
  const Epilogue ep{dw, 1, g.taps, 1.f, 0.f, nullptr, false};
  run(a, b, g.taps, g.k, g.npq, ep, stream);
  if (dbias) detail::column_sums(g.npq, g.k, dy, dbias, stream);
}

}  // namespace sp::kernels::cuda
