// The convolutions' implicit-GEMM A operand loaded by TMA (the wgmma_tma kernel,
// wgmma_tma_mainloop.cuh), as plain C++ so that tests/test_conv_tma.cpp checks it on the CPU
// against a model of the TMA's tiled mode.
//
// Why: on the cp.async wgmma loop the convolutions issue on 61-63% of cycles with the integer
// ALU, the gathers' address arithmetic, their busiest pipe (Nsight Compute, bench/results/
// nvidia-h100/2026-11-26-summary.md); the same change in the GEMM took it from 0.46 to 0.62 of
// cuBLASLt. With TMA one thread issues one box per K step and the hardware does the
// addressing, the zero fill of the padding and the 128-byte swizzle.
//
// How: the A operand's rows are the pixels of an output grid [N, P, Q] (m = (n * P + p) * Q + q)
// and its K index is (tap, channel), the tap (r, s) major, so a 64-deep K step (C % 64 == 0) is
// one tap and 64 channels. For a tile of 128 rows that covers whole rows of the grid (Q divides
// 128, and the tile is either a band of 128 / Q rows of one image or 128 / (P * Q) whole
// images), the tile's K step is one box of a 4-D tensor map over the NHWC source {C, W, H, N}:
//   box {64 channels, Q, bh, bn} pixels, traversed with element strides {1, step, step, 1};
//   start {c0, q0 * step + dir * s + off_w, p0 * step + dir * r + off_h, n0} with q0 = 0:
//     forward          source x,  step = stride, dir = +1, off = -pad: pixel (p, q) reads
//                      x[n, p * stride - pad + r, q * stride - pad + s, c];
//     backward data    source dy, step = 1 (stride 1 only), dir = -1, off = +pad, K index
//                      (r, s, k) as the transposed filter wt[c, r, s, k] has it: pixel (h, w)
//                      reads dy[n, h + pad - r, w + pad - s, k];
//     backward data    of one stride class (a, b) of a strided convolution
//     by stride class  (kernels/common/conv_stride_classes.h): the grid is the class's pixels
//                      [N, hc, wc], the taps its rc x sc, source dy, step = 1, dir = -1,
//                      off_h = dh, off_w = dw, K index (rr, ss, k) as the class's transposed
//                      filter has it: class pixel (i, j) reads dy[n, i + dh - rr, j + dw - ss, k].
// TMA writes the box densely, channels fastest, then W, H, N: row (i_n * bh + i_h) * Q + i_w of
// the stage is grid pixel m0 + that, with 128 bytes of channels per row, which is the K-major
// layout of the GEMM's A stage (TmaStage<128> with ContigK). Coordinates outside the source
// (the padding, images past N in the last tile) arrive as zeros.
#pragma once

#include <cstdint>

#include "kernels/cuda/wgmma_layout.h"

namespace sp::kernels::cuda::detail::wgmma {

// The rows of a tile of the wgmma_tma kernel (WgTmaTileOf::kBM, which asserts it).
constexpr int kConvTmaTileM = 128;

// A 4-D tensor map of a bf16 tensor, dimension 0 contiguous (cuTensorMapEncodeTiled's order).
struct TmaMap4d {
  uint64_t dim[4];
  uint64_t stride_bytes[3];  // between consecutive indices of dimensions 1, 2, 3
  uint32_t box[4];           // elements traversed per dimension (loaded: box / element_stride)
  uint32_t element_stride[4];
};

// Where the producer's box for A rows m0.. and K index k0 starts (see above).
struct ConvTmaSource {
  int pq, q;  // P * Q and Q of the output grid (GEMM rows)
  int c;      // channels of the source per tap (a multiple of kBK)
  int s;      // filter width
  int step;   // source pixels per grid pixel (the stride forward; 1 for the data gradient)
  int dir;    // +1 forward, -1 backward data
  int off_h;  // -pad forward, +pad backward data, dh of a stride class
  int off_w;  // the same along W (dw of a stride class)
  SP_WGMMA_HD void coords(int m0, int k0, int (&co)[4]) const {
    const int tap = k0 / c, c0 = k0 - tap * c, r = tap / s, sx = tap - r * s;
    const int n0 = m0 / pq, p0 = (m0 - n0 * pq) / q;
    co[0] = c0;
    co[1] = dir * sx + off_w;
    co[2] = p0 * step + dir * r + off_h;
    co[3] = n0;
  }
};

struct ConvTmaPlan {
  bool ok = false;
  const char* why = "";  // when not ok: the first requirement the shape misses
  ConvTmaSource src{};
  TmaMap4d map{};
};

// The plan for a tile of tile_m rows (a multiple of 64) over an output grid [n, p, q] reading a
// source [n, src_h, src_w, src_c] through an r x s filter with the given step, direction and
// padding. Not ok where the shape misses a requirement; the caller then takes the cp.async path.
constexpr ConvTmaPlan plan_conv_tma(int n, int p, int q, int src_h, int src_w, int src_c, int r, int s, int step,
                                    int dir, int pad, int tile_m) {
  ConvTmaPlan plan;
  if (n <= 0 || p <= 0 || q <= 0 || src_h <= 0 || src_w <= 0 || r <= 0 || s <= 0) {
    plan.why = "an empty dimension";
    return plan;
  }
  if (src_c <= 0 || src_c % kBK != 0) {
    plan.why = "source channels not a multiple of 64";
    return plan;
  }
  if (step < 1 || step > 8 || (dir != 1 && dir != -1) || (dir == -1 && step != 1)) {
    plan.why = "a step TMA cannot traverse";
    return plan;
  }
  if (tile_m % q != 0) {
    plan.why = "Q does not divide the tile";
    return plan;
  }
  const int64_t pq = int64_t(p) * q;
  if (pq % tile_m != 0 && tile_m % pq != 0) {
    plan.why = "the tile is neither a band of whole rows of one image nor whole images";
    return plan;
  }
  const int bh = pq >= tile_m ? tile_m / q : p;
  const int bn = pq >= tile_m ? 1 : int(tile_m / pq);
  const int64_t box_w = int64_t(q) * step, box_h = int64_t(bh) * step;
  if (box_w > 256 || box_h > 256 || bn > 256) {
    plan.why = "a box dimension past 256";
    return plan;
  }
  const int64_t row = int64_t(src_c) * 2, image = row * src_w * src_h;
  if (image * n > (int64_t(1) << 40) || int64_t(r) * s * src_c > (int64_t(1) << 31) - 1) {
    plan.why = "a tensor past the tensor map's or the GEMM's limits";
    return plan;
  }
  plan.ok = true;
  plan.src = {int(pq), q, src_c, s, step, dir, dir == 1 ? -pad : pad, dir == 1 ? -pad : pad};
  plan.map = {{uint64_t(src_c), uint64_t(src_w), uint64_t(src_h), uint64_t(n)},
              {uint64_t(row), uint64_t(row) * uint64_t(src_w), uint64_t(image)},
              {uint32_t(kBK), uint32_t(box_w), uint32_t(box_h), uint32_t(bn)},
              {1u, uint32_t(step), uint32_t(step), 1u}};
  return plan;
}

// The data gradient of stride class (a, b) of a strided convolution (see the top of this file):
// the class's pixel grid [n, hc, wc], the output dy [n, p, q, k], the class's rc x sc taps and its
// offsets dh, dw (StrideClass). Not ok where the shape misses a requirement (as for any grid: wc
// divides the tile and hc * wc is a multiple or a divisor of it, which CIFAR's 16, 8 and 4 pixel
// classes meet and odd input sizes or ImageNet's 28, 14 and 7 do not), or the class has no tap.
constexpr ConvTmaPlan plan_conv_dgrad_class_tma(int n, int hc, int wc, int p, int q, int k, int rc, int sc, int dh,
                                                int dw, int tile_m) {
  ConvTmaPlan plan = plan_conv_tma(n, hc, wc, p, q, k, rc, sc, 1, -1, 0, tile_m);
  if (plan.ok) {
    plan.src.off_h = dh;
    plan.src.off_w = dw;
  }
  return plan;
}

// The weight gradient's A operand, dw^T[tap * C + c, k] = sum over pixels of x(pixel, tap, c) *
// dy[pixel, k]: rows (tap, channel), K index the output pixels [N, P, Q] of the grid, so the
// operand is X-contiguous (channels adjacent) and a stage is kX / 64 boxes of 64 channels x 64
// pixels (the MN-major layout: pixel row k at k * 128 B). The pixels of a 64-deep K step are
// whole rows of the grid as above (Q divides 64, and the step is a band of 64 / Q rows of one
// image or 64 / (P * Q) whole images); box j of the stage holds rows x0 + 64 j.., one tap and
// 64 channels (C % 64 == 0), at
//   {c0, q0 * stride - pad + s, p0 * stride - pad + r, n0}, q0 = 0.
// Rows past R * S * C (the last tile's) read whatever their coordinates give: the epilogue
// drops them, and no other row depends on them.
struct ConvWgradTmaSource {
  int pq, q, c, s, step, pad;
  SP_WGMMA_HD void coords(int x0, int k0, int (&co)[4]) const {
    const int tap = x0 / c, c0 = x0 - tap * c, r = tap / s, sx = tap - r * s;
    const int n0 = k0 / pq, p0 = (k0 - n0 * pq) / q;
    co[0] = c0;
    co[1] = sx - pad;
    co[2] = p0 * step + r - pad;
    co[3] = n0;
  }
};

struct ConvWgradTmaPlan {
  bool ok = false;
  const char* why = "";
  ConvWgradTmaSource src{};
  TmaMap4d map{};
};

// The weight gradient's plan: output grid [n, p, q], input [n, h, w, c], an r x s filter.
constexpr ConvWgradTmaPlan plan_conv_wgrad_tma(int n, int p, int q, int h, int w, int c, int r, int s, int stride,
                                               int pad) {
  ConvWgradTmaPlan plan;
  // The same box as the forward's, for K steps of kBK pixels instead of tiles of 128 rows.
  const ConvTmaPlan f = plan_conv_tma(n, p, q, h, w, c, r, s, stride, 1, pad, kBK);
  if (!f.ok) {
    plan.why = f.why;
    return plan;
  }
  plan.ok = true;
  plan.src = {f.src.pq, f.src.q, c, s, stride, pad};
  plan.map = f.map;
  return plan;
}

}  // namespace sp::kernels::cuda::detail::wgmma
