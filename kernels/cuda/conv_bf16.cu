// bf16 tensor-core convolutions (tensor_core.h) on NHWC activations and KRSC weights: the
// main loop of mma_mainloop.cuh with the implicit-GEMM loaders of conv_loaders.h, which gather the
// activations through the filter window on the fly (zero in the padding), so no im2col
// buffer is ever formed. The GEMM views are those of conv.cu:
//
//   forward          y[pix, k]    = sum_{tap}      x(pix, tap)      * w[k, tap]   (+ bias[k])
//                    M = N*P*Q, N = K, K_gemm = R*S*C                 -> bf16 y
//   backward data    dx[pix, c]   = sum_{r, s, k}  dy(pix, r, s, k) * w[k, r, s, c]
//                    M = N*H*W, N = C, K_gemm = R*S*K                 -> bf16 dx
//                    (stride > 1 with dgrad_by_stride_class(): per stride class of the input
//                    pixels, only the taps that reach them, into a scratch matrix scattered
//                    into dx; see kernels/common/conv_stride_classes.h. With
//                    dgrad_transposed_filter(), B is the filter transposed into wt[c, r, s, k],
//                    read as a plain C x R*S*K matrix, or per class the class's taps.)
//   backward weight  dw^T[tap, k] = sum_{pix}      x(pix, tap)      * dy[pix, k]
//                    M = R*S*C, N = K, K_gemm = N*P*Q (split K)       -> fp32 dw, written
//                    transposed into dw[k, tap]
// With conv_tma() (tensor_core.h) on the wgmma_tma main loop, the forward, the stride-1 data
// gradient (transposed filter), each stride class's data gradient (transposed filter) and the
// weight gradient load A by TMA instead where the shape allows (conv_tma.h), B as a plain matrix.
// The cp.async path needs 16-byte chunks of one filter tap: C % 8 == 0 for the activations
// and the weights of the data gradient (for its transposed filter R*S*K % 8 == 0, or per stride
// class rc*sc*K % 8 == 0), K % 8 == 0 for dy (every ResNet layer but the first,
// C = 3, whose activations take the register-staged gather). The bias gradient is the
// deterministic double-precision column sum of dy widened to fp32 (reduce.cu).
//
// cuobjdump --dump-resource-usage (CUDA 13.0, sm_90a, -O3), no stack in any instance, mma.sync
// main loop: 128 x 128 tile 128 registers, 128 x 64 tile 168-221, 128 x 32 tile 128; shared memory as in
// mma_mainloop.cuh. The gathers' index arithmetic uses FastDivmod (IMAD.HI in the SASS, no integer-division calls).
#include <algorithm>
#include <vector>

#include "kernels/common/conv_stride_classes.h"
#include "kernels/cuda/layout_gathers.h"
#include "kernels/cuda/mma_launch.cuh"
#include "kernels/cuda/tensor_core.h"

namespace sp::kernels::cuda {
namespace {

using detail::element_blocks;
using detail::global_thread_index;
using detail::grid_stride;
using detail::kElementThreads;
using detail::launch_kernel;
using detail::pdl_prologue;
using detail::Workspace;
using namespace detail::mma;

ConvGeom conv_geom(const Conv2dShape& sh) { return make_conv_geom(detail::conv_dims(sh, "conv2d (bf16)")); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether the TMA convolutions run for an A operand read from src: conv_tma() on, the wgmma_tma
// kernel selected, src 16-byte aligned.
bool tma_on(const void* src) { return conv_tma() && use_wgmma() && use_wgmma_tma() && aligned16(src); }

// The TMA plan of a convolution's A operand where tma_on(src); not ok otherwise.
detail::wgmma::ConvTmaPlan tma_plan(const void* src, int n, int p, int q, int src_h, int src_w, int src_c, int r, int s,
                                    int step, int dir, int pad) {
  if (!tma_on(src)) return {};
  return detail::wgmma::plan_conv_tma(n, p, q, src_h, src_w, src_c, r, s, step, dir, pad, detail::wgmma::kConvTmaTileM);
}

// The halo convolution (conv_halo.h) of a stride-1 pass with source `src` (x forward, dy backward
// data) of src_c channels over [n, h, w], where conv_halo() is on, the TMA convolution would run
// (tma_on) without a split of K, and the halo plan takes the shape. Returns whether it ran.
template <typename T>
bool halo(const void* src, const ConvGeom& g, int h, int w, int src_c, int dir, const MatrixLoader<true>& b,
          int64_t rows, int n, int k, const MmaEpilogue<T>& ep, cudaStream_t stream) {
  if (conv_halo() == 0 || !b.vec || rows <= 0 || n <= 0 || k <= 0 || !tma_on(src)) return false;
  const detail::wgmma::HaloConvPlan plan =
      detail::wgmma::plan_conv_halo(g.n, h, w, src_c, g.r, g.s, g.stride, g.pad, dir,
                                    detail::wgmma::WgHaloTile::kMaxPatchBytes, conv_halo_min_used());
  if (!plan.ok || rows >= (int64_t(1) << 31) || !tma_conv_unsplit(int(rows), n, k)) return false;
  run_wgmma_halo_conv(plan, static_cast<const uint16_t*>(src), b, rows, n, k, ep, stream);
  return true;
}

// The selected main loop; mma.sync on narrow tiles for ResNet's 16/32 and 64 channels.
template <class LoaderA, class LoaderB, typename T>
void run(const LoaderA& a, const LoaderB& b, int m, int n, int k, const MmaEpilogue<T>& ep, cudaStream_t stream) {
  run_tensor_core(a, b, m, n, k, ep, stream, [](int cols, const auto& launch) {
    if (cols <= 32)
      launch(MmaTileNarrow{});
    else if (cols <= 64)
      launch(MmaTileMedium{});
    else
      launch(MmaTileLarge{});
  });
}

// w[k, r, s, c] -> wt[c, z, k] over the taps z of `taps` (FilterTaps, conv_loaders.h): per tap
// (blockIdx.z), the K x C slice
// transposed through a 32 x 32 tile of shared memory, so that both the reads (along c) and
// the writes (along k) are coalesced. 32 x 8 threads, grid (ceil(C/32), ceil(K/32), taps).
__global__ void transpose_filter_kernel(const uint16_t* w, uint16_t* wt, int k, int rs, int c, FilterTaps taps) {
  pdl_prologue();
  __shared__ uint16_t tile[32][34];  // rows of 68 bytes: a column's 32 reads hit 32 banks
  const int z = int(blockIdx.z), c0 = int(blockIdx.x) * 32, k0 = int(blockIdx.y) * 32;
  const int tap = taps.tap(z);
  const int tx = int(threadIdx.x);
  for (int i = int(threadIdx.y); i < 32; i += int(blockDim.y)) {
    const int kk = k0 + i, cc = c0 + tx;
    if (kk < k && cc < c) tile[i][tx] = w[(int64_t(kk) * rs + tap) * c + cc];
  }
  __syncthreads();
  for (int i = int(threadIdx.y); i < 32; i += int(blockDim.y)) {
    const int cc = c0 + i, kk = k0 + tx;
    if (kk < k && cc < c) wt[(int64_t(cc) * taps.count + z) * k + kk] = tile[tx][i];
  }
}

// The filter transposed over `taps` into a new workspace: element (c, z * K + k) of a
// C x taps.count*K matrix, contiguous along its second index.
Workspace transposed_filter(const ConvGeom& g, const uint16_t* w, const FilterTaps& taps, cudaStream_t stream) {
  SP_CHECK((g.k + 31) / 32 <= 65535 && taps.count <= 65535, "conv2d backward data (bf16): a filter of ", g.k, " x ",
           g.r, " x ", g.s, " is past the transpose kernel's grid");
  Workspace wt(size_t(g.c) * size_t(taps.count) * size_t(g.k) * sizeof(uint16_t), stream);
  const dim3 grid(unsigned(g.c + 31) / 32, unsigned(g.k + 31) / 32, unsigned(taps.count));
  launch_kernel(transpose_filter_kernel, grid, dim3(32, 8), 0, stream, w, wt.as<uint16_t>(), g.k, g.r * g.s, g.c, taps);
  count_transposed_filter();
  return wt;
}

// Copies between stride class (a, b)'s dense rows, (img * hc + i) * wc + j of C values, and its
// pixels of dx (layout_gathers.h): kGather takes them out of dx (src is dx, dst the rows), else
// puts them in (src the rows, or nullptr for zeros: a class no tap reaches; dst is dx). W channels
// per thread: 8, one 16-byte access, where C % 8 == 0 and the pointers are 16-byte aligned, else 1.
template <int W, bool kGather>
__global__ void class_copy_kernel(const uint16_t* src, uint16_t* dst, int64_t chunks, int c, int h, int w, int stride,
                                  int a, int b, int hc, int wc) {
  pdl_prologue();
  for (int64_t idx = global_thread_index(); idx < chunks; idx += grid_stride()) {
    if constexpr (kGather)
      detail::gather_class_chunk<W>(src, dst, idx, c, h, w, stride, a, b, hc, wc);
    else
      detail::scatter_class_chunk<W>(src, dst, idx, c, h, w, stride, a, b, hc, wc);
  }
}

template <bool kGather>
void class_copy(const uint16_t* src, uint16_t* dst, int64_t rows, const ConvGeom& g, const StrideClass& c,
                cudaStream_t stream) {
  const int64_t total = rows * g.c;
  if (g.c % 8 == 0 && aligned16(dst) && (!src || aligned16(src)))
    launch_kernel(class_copy_kernel<8, kGather>, element_blocks(total / 8), kElementThreads, 0, stream, src, dst,
                  total / 8, g.c, g.h, g.w, g.stride, c.a, c.b, c.hc, c.wc);
  else
    launch_kernel(class_copy_kernel<1, kGather>, element_blocks(total), kElementThreads, 0, stream, src, dst, total,
                  g.c, g.h, g.w, g.stride, c.a, c.b, c.hc, c.wc);
}

// dx at the pixels of class c from its dense result src (zeros where src is null).
void scatter_class(const uint16_t* src, uint16_t* dx, int64_t rows, const ConvGeom& g, const StrideClass& c,
                   cudaStream_t stream) {
  class_copy<false>(src, dx, rows, g, c, stream);
}
// The reverse: class c's pixels of dx into its dense rows dst.
void gather_class(const uint16_t* dx, uint16_t* dst, int64_t rows, const ConvGeom& g, const StrideClass& c,
                  cudaStream_t stream) {
  class_copy<true>(dx, dst, rows, g, c, stream);
}

// Backward data of a strided convolution by stride class (kernels/common/conv_stride_classes.h):
// per class, the dense implicit GEMM of its pixels and taps into a scratch matrix, then the
// scatter of its rows into dx. Only the products that are not structural zeros are computed:
// a quarter of the direct form's for a 3x3 stride-2 layer. On the transposed filter, a class's
// A operand is loaded by TMA where conv_tma() is on and the class plans for it (conv_tma.h,
// plan_conv_dgrad_class_tma: dy with K % 64 == 0 and a class grid that tiles, as in ResNet-18's
// stride-2 layers on CIFAR); else it is gathered by cp.async.
// accumulate (beta == 1): dx += the data gradient. A class written straight into dx adds in its
// epilogue; one through the scratch first gathers its pixels of dx there, so that its epilogue adds
// to them alike (the same bits either way); a class no tap reaches leaves its pixels as they are.
void backward_data_by_class(const Conv2dShape& sh, const ConvGeom& g, const uint16_t* dy, const uint16_t* w,
                            uint16_t* dx, bool accumulate, cudaStream_t stream) {
  const float beta = accumulate ? 1.f : 0.f;
  const std::vector<StrideClass> classes = stride_classes(sh);
  // A class whose rows tile the image's height is written straight into dx by its GEMM's
  // epilogue (class_row_map; dgrad_class_direct(), tensor_core.h); the others go through the
  // scratch matrix and the scatter.
  const bool direct = dgrad_class_direct();
  std::vector<ClassRowMap> maps;
  int64_t scratch_rows = 0;
  for (const StrideClass& c : classes) {
    maps.push_back(direct ? class_row_map(sh, c) : ClassRowMap{});
    if (c.rc * c.sc > 0 && !maps.back().ok) scratch_rows = std::max(scratch_rows, int64_t(g.n) * c.hc * c.wc);
  }
  Workspace scratch(size_t(scratch_rows) * size_t(g.c) * sizeof(uint16_t), stream);
  for (size_t ci = 0; ci < classes.size(); ++ci) {
    const StrideClass& c = classes[ci];
    const ClassRowMap& map = maps[ci];
    const int64_t rows = int64_t(g.n) * c.hc * c.wc;
    if (rows == 0) continue;
    const bool taps = c.rc * c.sc > 0, into_dx = taps && map.ok;
    if (!taps && accumulate) continue;  // adds nothing
    if (taps && !into_dx && accumulate) gather_class(dx, scratch.as<uint16_t>(), rows, g, c, stream);
    if (taps) {
      const ClassGeom cg = make_class_geom(g, c);
      const BwdDataClassGradLoader a{{dy, aligned16(dy) && run_allows_chunks(g.k, 8)}, cg};
      const MmaEpilogue<uint16_t> ep =
          into_dx ? MmaEpilogue<uint16_t>{dx + map.base, map.row_stride,  1, 1.f, beta, nullptr, false,
                                          map.group,     map.group_stride}
                  : MmaEpilogue<uint16_t>{scratch.as<uint16_t>(), g.c, 1, 1.f, beta, nullptr, false, 0, 0};
      if (dgrad_transposed_filter()) {
        // The class's taps of the filter as a plain C x kc matrix (see conv2d_backward_data_bf16).
        const Workspace wt = transposed_filter(g, w, FilterTaps::of_class(g, c), stream);
        const MatrixLoader<true> b{wt.as<uint16_t>(), cg.kc, g.c, cg.kc, chunk_ok(wt.as<uint16_t>(), cg.kc)};
        const detail::wgmma::ConvTmaPlan plan =
            b.vec && g.c > 0 && tma_on(dy)
                ? detail::wgmma::plan_conv_dgrad_class_tma(g.n, c.hc, c.wc, g.p, g.q, g.k, c.rc, c.sc, c.dh, c.dw,
                                                           detail::wgmma::kConvTmaTileM)
                : detail::wgmma::ConvTmaPlan{};
        if (plan.ok)
          run_wgmma_tma_conv(detail::wgmma::ConvSource{plan.src}, plan.map, dy, b, cg.m, g.c, cg.kc, ep, stream);
        else
          run(a, b, cg.m, g.c, cg.kc, ep, stream);
      } else {
        const BwdDataClassWeightLoader b{{w, aligned16(w) && run_allows_chunks(g.c, 8)}, cg};
        run(a, b, cg.m, g.c, cg.kc, ep, stream);
      }
    }
    if (into_dx)
      count_class_direct_launch();
    else
      scatter_class(taps ? scratch.as<uint16_t>() : nullptr, dx, rows, g, c, stream);
  }
}

}  // namespace

void conv2d_forward_bf16(const Conv2dShape& sh, const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y,
                         cudaStream_t stream) {
  const ConvGeom g = conv_geom(sh);
  if (detail::conv_small_c_forward(sh, x, w, bias, y, stream)) return;
  const FwdInputLoader a{{x, aligned16(x) && run_allows_chunks(g.c, 8)}, g};
  // w[k, tap]: element (k, tap) of a K x taps matrix, contiguous along the taps.
  const MatrixLoader<true> b{w, g.taps, g.k, g.taps, chunk_ok(w, g.taps)};
  const MmaEpilogue<uint16_t> ep{y, g.k, 1, 1.f, 0.f, bias, false};
  if (b.vec && g.npq > 0 && g.k > 0) {
    if (halo(x, g, g.h, g.w, g.c, 1, b, g.npq, g.k, g.taps, ep, stream)) return;
    const detail::wgmma::ConvTmaPlan plan = tma_plan(x, g.n, g.p, g.q, g.h, g.w, g.c, g.r, g.s, g.stride, 1, g.pad);
    if (plan.ok) {
      run_wgmma_tma_conv(detail::wgmma::ConvSource{plan.src}, plan.map, x, b, g.npq, g.k, g.taps, ep, stream);
      return;
    }
  }
  run(a, b, g.npq, g.k, g.taps, ep, stream);
}

void conv2d_backward_data_bf16(const Conv2dShape& sh, const uint16_t* dy, const uint16_t* w, uint16_t* dx,
                               cudaStream_t stream, float beta) {
  const ConvGeom g = conv_geom(sh);
  // The stride classes add to dx with beta 1 (a residual block's accumulation); another beta
  // takes the direct form.
  if (g.stride > 1 && dgrad_by_stride_class() && (beta == 0.f || beta == 1.f)) {
    backward_data_by_class(sh, g, dy, w, dx, beta == 1.f, stream);
    return;
  }
  const BwdDataGradLoader a{{dy, aligned16(dy) && run_allows_chunks(g.k, 8)}, g};
  const MmaEpilogue<uint16_t> ep{dx, g.c, 1, 1.f, beta, nullptr, false};
  if (dgrad_transposed_filter()) {
    const Workspace wt = transposed_filter(g, w, FilterTaps::all(g), stream);
    // wt[c, t], t = (r * S + s) * K + k: element (c, t) of a C x R*S*K matrix, contiguous along t.
    const MatrixLoader<true> b{wt.as<uint16_t>(), g.rsk, g.c, g.rsk, chunk_ok(wt.as<uint16_t>(), g.rsk)};
    // Stride 1: dx(h, w) gathers dy(h + pad - r, w + pad - s), one box per tap (conv_tma.h).
    if (g.stride == 1 && b.vec && g.nhw > 0 && g.c > 0) {
      if (halo(dy, g, g.p, g.q, g.k, -1, b, g.nhw, g.c, g.rsk, ep, stream)) return;
      const detail::wgmma::ConvTmaPlan plan = tma_plan(dy, g.n, g.h, g.w, g.p, g.q, g.k, g.r, g.s, 1, -1, g.pad);
      if (plan.ok) {
        run_wgmma_tma_conv(detail::wgmma::ConvSource{plan.src}, plan.map, dy, b, g.nhw, g.c, g.rsk, ep, stream);
        return;
      }
    }
    run(a, b, g.nhw, g.c, g.rsk, ep, stream);
    return;
  }
  const BwdDataWeightLoader b{{w, aligned16(w) && run_allows_chunks(g.c, 8)}, g};
  run(a, b, g.nhw, g.c, g.rsk, ep, stream);
}

void conv2d_backward_weight_bf16(const Conv2dShape& sh, const uint16_t* x, const uint16_t* dy, float* dw,
                                 float* dbias, cudaStream_t stream) {
  const ConvGeom g = conv_geom(sh);
  if (detail::conv_small_c_backward_weight(sh, x, dy, dw, stream)) {
    if (dbias) column_sums_bf16(g.npq, g.k, dy, dbias, stream);
    return;
  }
  const BwdWeightInputLoader a{{x, aligned16(x) && run_allows_chunks(g.c, 8)}, g};
  // dy[pix, k]: element (k, pix), contiguous along k.
  const MatrixLoader<false> b{dy, g.k, g.k, g.npq, chunk_ok(dy, g.k)};
  // Result (tap, k) goes to dw[k * taps + tap].
  const MmaEpilogue<float> ep{dw, 1, g.taps, 1.f, 0.f, nullptr, false};
  const detail::wgmma::ConvWgradTmaPlan plan =
      b.vec && g.taps > 0 && g.k > 0 && g.npq > 0 && tma_on(x)
          ? detail::wgmma::plan_conv_wgrad_tma(g.n, g.p, g.q, g.h, g.w, g.c, g.r, g.s, g.stride, g.pad)
          : detail::wgmma::ConvWgradTmaPlan{};
  if (plan.ok)
    run_wgmma_tma_conv(detail::wgmma::ConvWgradSource{plan.src}, plan.map, x, b, g.taps, g.k, g.npq, ep, stream);
  else
    run(a, b, g.taps, g.k, g.npq, ep, stream);
  if (dbias) column_sums_bf16(g.npq, g.k, dy, dbias, stream);
}

}  // namespace sp::kernels::cuda
