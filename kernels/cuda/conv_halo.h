// The halo form of a stride-1 "same" convolution's implicit GEMM (the wgmma_halo kernel,
// wgmma_halo_mainloop.cuh), as plain C++ so that tests/test_conv_halo.cpp checks it on the CPU
// against a model of TMA's tiled mode and of wgmma's 128-byte-swizzled K-major reads.
//
// Why: the TMA convolutions (conv_tma.h) load one box of 128 pixels x 64 channels per tap, so
// every input pixel of a 3x3 layer crosses L2 nine times. On ResNet-18's 64-channel 32 px layers
// the output tile is at most 64 columns wide (K = 64), so nothing else amortises those reads:
// Nsight Compute had the forward at 76% of L2 throughput with the tensor pipes half idle, and
// the layer at 0.57 of cuDNN (bench/results/nvidia-h100/2026-11-27-ncu-conv_fwd-tma.txt,
// 2026-11-27b-kernels-r18-convs-wide-by-shape-1.json). Here a tile loads the input rows its taps
// reach once per 64 channels, a patch with its halo, and every tap reads its rows of the patch
// in place: per tile 30 KiB of A from L2 instead of 9 x 16 KiB.
//
// How. A tile is 128 consecutive positions o of one image's outputs laid out on the padded
// width Wp = W + 2 pad: o = p * Wp + q, where q >= Q (the last 2 pad columns of every row) are
// junk positions whose results the epilogue drops (Q / Wp of the tile is used: 32/34 at 32 px).
// Tiles do not cross images: an image is ceil(P * Wp / 128) tiles, the last one partly past the
// image (junk too). For a "same" convolution (stride 1, R = S odd, pad = (R - 1) / 2; P = H,
// Q = W), output position o reads, for tap (r, s),
//   forward         x[p - pad + r, q - pad + s]  = padded pixel (p + r, q + s)
//   backward data   dy[p + pad - r, q + pad - s] = padded pixel (p + 2 pad - r, q + 2 pad - s)
// (the data gradient on the transposed filter: its K index (r, s, k) as conv_tma.h has it), a
// padded pixel being (h + pad, w + pad) of the source, zero outside it. On the padded width
// that is position o + dr * Wp + ds with (dr, ds) the tap's shift, so the 128 rows of A of tap
// (r, s) are 128 consecutive padded positions. The patch is the source's padded rows
// p0 .. p0 + kRows - 1 (p0 = o0 / Wp for the tile's first position o0), all Wp columns, 64
// channels: one box of a 4-D tensor map over the NHWC source {C, W, H, N},
//   box {64, Wp, rows, 1} at {c0, -pad, p0 - pad, n},
// which TMA writes densely (channels fastest, then W, then H) with the 128-byte swizzle and zero
// fill outside the source, into a 1024-byte-aligned buffer: padded position (p0 + i, j) is patch
// row i * Wp + j, 128 B, the K-major layout wgmma reads. Tap (r, s)'s A operand for the tile is
// then patch rows o0 % Wp + dr * Wp + ds .. + 127: a descriptor that starts that many 128-byte
// rows into the patch. The 128-byte swizzle is a function of the shared-memory address (chunk
// bits 4-6 ^= row bits 7-9, for TMA's writes and wgmma's reads alike; the K slices' descriptors
// already start 32 B into a row), so a start that is not a multiple of 8 rows reads the same
// bytes TMA wrote (the descriptor's base offset stays 0; halo_desc_phase() can set it to the
// start's row phase instead, for the GPU test that tells which the hardware wants).
// Rows of the patch: the tile's positions span at most kOutRows = (Wp - 1 + 127) / Wp + 1 rows,
// and the taps reach R - 1 rows further. Junk positions at the end of the last row read up to
// S - 1 rows past the patch, into slack that is allocated but never written: their results are
// dropped, and no other row of the accumulators depends on them.
// K order: tap-major, 64 channels per step, as the TMA convolutions: step = tap * chunks + cc,
// each step's 4 wgmma k16 on the same A rows and B stage as there, so the results are the same
// bits as the TMA path's (where that path does not split K; the halo kernel never does).
#pragma once

#include <cstdint>

#include "kernels/cuda/conv_tma.h"
#include "kernels/cuda/wgmma_layout.h"

namespace sp::kernels::cuda::detail::wgmma {

// The rows of a halo tile: two consumer warpgroups of 64 (wgmma's m64).
constexpr int kHaloTileM = 128;
// The most chunks of 64 source channels a plan takes (the kernel's patch mbarriers).
constexpr int kHaloMaxChunks = 16;

struct HaloConvSource {
  int wp;    // padded width W + 2 pad: the patch's and the tile's row length, in positions
  int p, q;  // the output grid of one image (P = H and Q = W: a "same" convolution)
  int tiles_per_image;
  int chunks;  // source channels / 64
  int s;       // filter width (= R)
  int dir;     // +1 forward, -1 backward data (mirrored taps)
  int pad;
  int rows;              // the patch's rows (the box's height)
  uint32_t patch_bytes;  // one chunk's patch: rows * wp * 128 B, plus the slack, rounded up to 1024
  // Tile t's image and first position (o0, on the padded width).
  SP_WGMMA_HD void tile(int t, int& img, int& o0) const {
    img = t / tiles_per_image;
    o0 = (t - img * tiles_per_image) * kHaloTileM;
  }
  // The patch box of chunk cc for the tile at (img, o0): {c0, w0, h0, n}.
  SP_WGMMA_HD void box_coords(int img, int o0, int cc, int (&co)[4]) const {
    co[0] = cc * kBK;
    co[1] = -pad;
    co[2] = o0 / wp - pad;
    co[3] = img;
  }
  // The patch row where tap `tap` (r * S + s) reads the tile's first position.
  SP_WGMMA_HD int tap_row(int o0, int tap) const {
    const int r = tap / s, sx = tap - r * s;
    const int dr = dir > 0 ? r : 2 * pad - r, ds = dir > 0 ? sx : 2 * pad - sx;
    return o0 % wp + dr * wp + ds;
  }
  // What TMA writes for one chunk's patch box (the slack past it is never written).
  SP_WGMMA_HD uint32_t box_bytes() const { return uint32_t(rows) * uint32_t(wp) * kBK * 2; }
  // The byte offset, from the first patch, of A's rows row0.. (a consumer warpgroup's: 0 or 64)
  // of tap `tap` and chunk cc for the tile starting at o0; its K slice j is 32 j bytes further.
  SP_WGMMA_HD uint32_t a_offset(int o0, int tap, int cc, int row0) const {
    return uint32_t(cc) * patch_bytes + uint32_t(tap_row(o0, tap) + row0) * kBK * 2;
  }
  // The dense output row (n * P + p) * Q + q of the tile's row i, or -1 for a junk position.
  SP_WGMMA_HD int64_t out_row(int img, int o0, int i) const {
    const int o = o0 + i, pp = o / wp, qq = o - pp * wp;
    if (pp >= p || qq >= q) return -1;
    return (int64_t(img) * p + pp) * q + qq;
  }
};

// The consumers' walk over the K steps (step = tap * chunks + cc, the tap r * S + s), with the
// chunk and the tap's row shift (dr * Wp + ds) kept incrementally: the divisions of a_offset in
// the main loop made ptxas serialise its wgmma (C7515). offset(row0) equals
// a_offset(o0, tap, cc, row0') for row0 = o0 % Wp + row0' (tests/test_conv_halo.cpp).
struct HaloStepWalk {
  int cc = 0, sx = 0, shift = 0;
  SP_WGMMA_HD static HaloStepWalk start(const HaloConvSource& src) {
    return {0, 0, src.dir > 0 ? 0 : 2 * src.pad * (src.wp + 1)};
  }
  SP_WGMMA_HD void next(const HaloConvSource& src) {
    if (++cc < src.chunks) return;
    cc = 0;
    if (++sx < src.s) {
      shift += src.dir;
      return;
    }
    sx = 0;
    shift += src.dir * (src.wp - (src.s - 1));
  }
  SP_WGMMA_HD uint32_t offset(const HaloConvSource& src, int row0) const {
    return uint32_t(cc) * src.patch_bytes + uint32_t(row0 + shift) * kBK * 2;
  }
};

// The resident form's shared memory (wgmma_halo_mainloop.cuh, wgmma_halo_resident_kernel): the
// whole B operand of a column tile bn wide (one 64-deep stage per K step: taps * chunks of
// them), kHaloResidentSlots patch slots, an mbarrier per B stage, two per slot and one per
// consumer warpgroup (the ping-pong's order), and the slack to round the start up to 1024 bytes.
// Four slots of a 64-channel patch fit beside a 3x3 filter up to rows of about 48 px (32 px:
// 197 KiB); ImageNet's 56 px layers would stream. It runs where that fits one block (227 KiB), with
// at most kHaloResidentMaxSteps K steps (the B stages' barriers), and where the tiles are at
// least kHaloResidentTilesPerSm per SM: each block's one-off load of B, and the uneven last
// round of tiles, are then small beside its tiles (at 180 tiles on 132 SMs, a block per tile of
// the streaming kernel runs them all in one wave, while 48 persistent blocks would run two).
constexpr int kHaloResidentSlots = 4;  // two per consumer warpgroup
constexpr int kHaloResidentMaxSteps = 32;
constexpr int kHaloResidentTilesPerSm = 4;
constexpr int64_t kHaloResidentMaxSmem = 227 * 1024;
SP_WGMMA_HD constexpr int64_t halo_resident_smem_bytes(const HaloConvSource& src, int bn) {
  const int64_t steps = int64_t(src.s) * src.s * src.chunks;
  return steps * bn * kBK * 2 + int64_t(kHaloResidentSlots) * src.patch_bytes * src.chunks +
         (steps + 2 * kHaloResidentSlots + 2) * 8 + kAtomBytes;
}
SP_WGMMA_HD constexpr bool halo_resident_fits(const HaloConvSource& src, int bn) {
  return int64_t(src.s) * src.s * src.chunks <= kHaloResidentMaxSteps &&
         halo_resident_smem_bytes(src, bn) <= kHaloResidentMaxSmem;
}
// The patch slot of a resident block's tile i: consumer warpgroup i % 2 takes tiles i % 2,
// i % 2 + 2, ..., in its two slots 2 (i % 2) and 2 (i % 2) + 1 in turn, so each slot comes round
// every 4 tiles (its round: i / 4).
SP_WGMMA_HD constexpr int halo_resident_slot(int i) { return 2 * (i % 2) + (i / 2) % 2; }
// Whether a plan's tiles are enough for the resident form on `sms` SMs (a persistent block each).
SP_WGMMA_HD constexpr bool halo_resident_pays(int64_t tiles, int64_t sms) {
  return tiles >= int64_t(kHaloResidentTilesPerSm) * sms;
}

struct HaloConvPlan {
  bool ok = false;
  const char* why = "";  // when not ok: the first requirement the shape misses
  HaloConvSource src{};
  TmaMap4d map{};
  int64_t tiles = 0;  // the M tiles: n * tiles_per_image
  double used = 0.0;  // the share of the tiles' rows that are real outputs
};

// The plan of a stride-1 convolution over images [n, h, w] of src_c channels through an r x s
// filter with padding `pad`: dir +1 the forward (source x), -1 the data gradient on the
// transposed filter (source dy, whose grid is the same for a "same" convolution). The patches of
// all chunks must fit max_patch_bytes (what the kernel's shared memory leaves them), and at least
// min_used of the tiles' rows must be real outputs, with at most kHaloMaxChunks chunks of 64
// channels. Not ok otherwise: the caller then takes the TMA convolution (or the cp.async loop).
// 1x1 filters are refused: a patch of one tap is a TMA box with nothing to reuse.
constexpr HaloConvPlan plan_conv_halo(int n, int h, int w, int src_c, int r, int s, int stride, int pad, int dir,
                                      int64_t max_patch_bytes, double min_used) {
  HaloConvPlan plan;
  if (n <= 0 || h <= 0 || w <= 0 || r <= 0 || s <= 0) {
    plan.why = "an empty dimension";
    return plan;
  }
  if (stride != 1 || r != s || r % 2 == 0 || r < 3 || 2 * pad != r - 1 || (dir != 1 && dir != -1)) {
    plan.why = "not a stride-1 same convolution with a square odd filter of 3 or more taps a side";
    return plan;
  }
  if (src_c <= 0 || src_c % kBK != 0) {
    plan.why = "source channels not a multiple of 64";
    return plan;
  }
  const int wp = w + 2 * pad;
  const int out_rows = (wp - 1 + kHaloTileM - 1) / wp + 1, rows = out_rows + r - 1;
  if (wp > 256 || rows > 256) {
    plan.why = "a box dimension past 256";
    return plan;
  }
  const int64_t row_bytes = int64_t(kBK) * 2;  // a patch row: 64 channels
  // Junk positions read up to s - 1 positions past the rows: slack rows, never written.
  const int64_t patch_bytes = ((int64_t(rows) * wp + s) * row_bytes + kAtomBytes - 1) / kAtomBytes * kAtomBytes;
  const int chunks = src_c / kBK;
  if (chunks > kHaloMaxChunks) {
    plan.why = "more chunks of 64 channels than the kernel has barriers for";
    return plan;
  }
  if (patch_bytes * chunks > max_patch_bytes) {
    plan.why = "the patches do not fit the kernel's shared memory";
    return plan;
  }
  const int64_t positions = int64_t(h) * wp;
  const int tiles_per_image = int((positions + kHaloTileM - 1) / kHaloTileM);
  const double used = double(int64_t(h) * w) / double(int64_t(tiles_per_image) * kHaloTileM);
  if (used < min_used) {
    plan.why = "too many junk positions in the tiles";
    return plan;
  }
  const int64_t pixel = int64_t(src_c) * 2, image = pixel * w * h;  // NHWC source strides
  if (image * n > (int64_t(1) << 40) || int64_t(n) * tiles_per_image >= (int64_t(1) << 30) ||
      int64_t(r) * s * src_c > (int64_t(1) << 31) - 1) {
    plan.why = "a tensor past the tensor map's or the GEMM's limits";
    return plan;
  }
  plan.ok = true;
  plan.src = {wp, h, w, tiles_per_image, chunks, s, dir, pad, rows, uint32_t(patch_bytes)};
  plan.map = {{uint64_t(src_c), uint64_t(w), uint64_t(h), uint64_t(n)},
              {uint64_t(pixel), uint64_t(pixel) * uint64_t(w), uint64_t(image)},
              {uint32_t(kBK), uint32_t(wp), uint32_t(rows), 1u},
              {1u, 1u, 1u, 1u}};
  plan.tiles = int64_t(n) * tiles_per_image;
  plan.used = used;
  return plan;
}

}  // namespace sp::kernels::cuda::detail::wgmma
