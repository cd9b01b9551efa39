// Tensor-core bf16 kernels for mixed-precision training, hand-written PTX with two main loops
// behind the same contract (selected below, MmaMainloop):
//   mma_sync  mma.sync m16n8k16 bf16 -> fp32 fed by ldmatrix, a 3-stage cp.async pipeline
//             (kernels/cuda/mma_mainloop.cuh); any GPU from sm_80;
//   wgmma     Hopper warpgroup wgmma.mma_async m64n{64,128}k16 reading 128-byte-swizzled
//             shared memory, a 4-stage cp.async pipeline (kernels/cuda/wgmma_mainloop.cuh);
//             sm_90a builds (CMAKE_CUDA_ARCHITECTURES 90a) on compute capability 9.0 only;
//   wgmma_tma the same multiply in a warp-specialised kernel whose stages TMA fills
//             (kernels/cuda/wgmma_tma_mainloop.cuh), for the GEMM on plain matrices and, with
//             conv_tma() on (the default), the convolutions TMA can address (conv_tma.h); the
//             rest runs the wgmma loop.
//
// Contract: every function is the fp32 op of kernels/cuda/ops.h (and of the CPU reference,
// kernels/cpu/ops.h) applied to the bf16 inputs widened to fp32, with fp32 accumulation, and
// bf16 outputs rounded to nearest even once, after the fp32 epilogue. bf16 values are bit
// patterns in uint16_t. All pointers are device pointers; each call only enqueues work on
// `stream` (launch-configuration errors throw sp::CudaError at the call site). Results agree
// with the reference to rounding, not bit for bit: the tensor cores add in their own order.
// Any shape is supported: operands with 16-byte aligned rows whose leading dimension (for the
// convolutions: C, or K for the gradient operand) is a multiple of 8 take the cp.async path,
// all others a register-staged element-wise gather with the same pipeline and arithmetic.
//
// Determinism: no float atomics. The split-K of small outputs with long reductions (weight
// gradients above all) writes fp32 partials to stream-ordered scratch (cudaMallocAsync) and
// adds them in slice order, the split depending on the shape alone: the same inputs give
// bit-identical outputs on every run and every GPU of the same architecture.
//
// mma_sync is built for sm_80 and newer (mma.sync bf16, ldmatrix, cp.async); cuobjdump -sass
// of the built objects shows HMMA.16816.F32.BF16, LDSM.16.M88.4 / LDSM.16.MT88.4 and
// LDGSTS.E.BYPASS.128.ZFILL in its main-loop kernels; (sm_90a, -O3) no spills, 128 x 128 tiles
// 128 registers and 61,440 B of dynamic shared memory, narrower tiles up to 221 registers
// (gemm_bf16.cu and conv_bf16.cu list the measured numbers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "kernels/common/shapes.h"
#include "kernels/cuda/tile_plan.h"

namespace sp::kernels::cuda {

// ---- Main loop -------------------------------------------------------------------------------
// kAuto: where wgmma_available(), wgmma, with the GEMM of plain matrices on the TMA kernel as
// kWgmmaTma below (faster there: bf16 GEMM 4096^3 at 0.62 of cuBLASLt against wgmma's 0.46 and
// mma_sync's 0.34, bench/results/nvidia-h100/2026-11-26-summary.md and nvidia-h200/
// 2026-11-26-mainloops.md), else mma_sync; decided per device at each launch.
// kWgmmaTma: wgmma with operands loaded by TMA in a warp-specialised kernel
// (wgmma_tma_mainloop.cuh): the GEMM's plain matrices, and with conv_tma() on the convolutions'
// (below); operands TMA cannot address run the wgmma loop. Same availability as wgmma.
enum class MmaMainloop { kAuto, kMmaSync, kWgmma, kWgmmaTma };
const char* mainloop_name(MmaMainloop m);  // "auto", "mma_sync", "wgmma", "wgmma_tma"
// "auto", "mma_sync", "wgmma" or "wgmma_tma"; anything else throws sp::Error naming the
// accepted values.
MmaMainloop parse_mainloop(const std::string& name);
// Whether this build holds wgmma code (built for sm_90a) and the current device can run it
// (compute capability 9.0).
bool wgmma_available();
// The main loop selected for every later bf16 GEMM and convolution in this process. The default
// is the environment variable STALEPROP_MAINLOOP (a name above) when set, else auto. A call
// with wgmma or wgmma_tma selected where wgmma_available() is false throws sp::Error saying why.
void set_mma_mainloop(MmaMainloop m);
MmaMainloop mma_mainloop();

// The data gradient of strided convolutions by stride class (kernels/common/conv_stride_classes.h):
// only the products that are not structural zeros, each class's operand loaded by TMA where the
// class plans for it (conv_tma.h, plan_conv_dgrad_class_tma) and its results scattered eight
// channels at a time. On by default: on an H100 (bench/results/nvidia-h100/2026-11-27b-summary.md)
// its tests passed, compute-sanitizer memcheck and racecheck were clean, ResNet-18's bf16 data
// gradients at batch 512 ran 1.27x faster summed (stride-2 layers 1.4x to 2.2x), and its training
// step 1.07x. The environment variable STALEPROP_DGRAD_CLASSES=0 turns it off.
void set_dgrad_by_stride_class(bool on);
bool dgrad_by_stride_class();
// Each stride class's result written straight into dx by its GEMM's epilogue, where the class's
// rows tile the image's height (kernels/common/conv_stride_classes.h, class_row_map: an even H
// under stride 2), instead of into a scratch matrix that a scatter kernel then copies into dx:
// one kernel and a round trip of the class's result through memory fewer per class. The same
// bits either way (tested on an H100, memcheck clean). On by default: ResNet-18's bf16 data
// gradients at batch 512 ran 1.02x faster summed (2026-11-27c); the environment variable
// STALEPROP_DGRAD_CLASS_DIRECT=0 turns it off.
void set_dgrad_class_direct(bool on);
bool dgrad_class_direct();
// How many stride classes' GEMMs have written straight into dx in this process (a test's proof
// that the path ran).
int64_t dgrad_class_direct_launches();
// The data gradient's filter operand as a plain matrix: the filter is first transposed, per
// tap, into wt[c, r, s, k] (a small tiled-transpose kernel), so that the main loop reads it as
// the forward reads its filter instead of gathering w[k, r, s, c] through per-chunk index
// arithmetic (with stride classes: per class, its taps). On by default (ResNet-18's data
// gradients, bf16, batch 512, on an H100: 8% faster than the gathered filter; bench/results/
// nvidia-h100/2026-11-26-summary.md); the environment variable STALEPROP_DGRAD_WT=0 turns it off.
void set_dgrad_transposed_filter(bool on);
bool dgrad_transposed_filter();
// How many filters have been transposed for a data gradient in this process (a test's proof
// that the path ran).
int64_t dgrad_transposed_filters();
// The convolutions' A operand loaded by TMA (conv_tma.h) on the wgmma_tma kernel where the main
// loop is wgmma_tma (or auto on Hopper): the forward where the source has C % 64 == 0 and the
// output rows tile by 128 (every ResNet-18 layer but the stem, ResNet-20/56/110's 64-channel
// stage; not ImageNet's 56/28/14/7 pixel rows, which would need TMA's im2col mode), the stride-1 data gradient on the
// transposed filter, each stride class's data gradient with dgrad_by_stride_class() (below), and the weight gradient
// where the output pixels tile by 64. Other shapes take the cp.async
// wgmma loop. On by default: on an H100 (bench/results/nvidia-h100/2026-11-27-summary.md) its GPU tests passed,
// compute-sanitizer memcheck and racecheck were clean, and ResNet-18's bf16 convolutions at batch 512 ran 1.40x
// faster than on the gathers; the environment variable STALEPROP_CONV_TMA=0 turns it off.
void set_conv_tma(bool on);
bool conv_tma();
// The 128 x 256 tile of the wgmma_tma GEMM (wgmma_tma_mainloop.cuh, WgTmaTileWide) for N >= 256
// where N % 256 is 0 or more than 128 (wide_tile_width, tile_plan.h), instead of 128 x 128; with conv_tma() also
// for the TMA convolutions of such N. Off unless set, or the environment variable STALEPROP_TMA_WIDE is 1: on an
// H100 (2026-11-27) its tests passed and compute-sanitizer was clean, and it ran the bf16 GEMM 1.05x (4096^3) and
// 1.22x (8192^3) faster than the 128 x 128 tile, but ResNet-18's convolutions from 0.63x to 1.38x layer by layer
// (1.03x summed), so it is not a default.
void set_tma_wide_tile(bool on);
bool tma_wide_tile();
// The 128 x 256 tile by shape: where tma_wide_tile() is off, each product wide_tile_width admits takes the wide
// tile only where wide_tile_pays (tile_plan.h) says so, the rule that the layer-by-layer measurements above
// suggest (the wide tile where it splits K no more than the narrow one and the reduction is not short, or where
// both split and the reduction is long: the weight gradients). On by default: on an H100 (2026-11-27b) its tests
// passed, ResNet-18's bf16 convolutions at batch 512 ran 1.05x faster summed (the weight gradients 1.12x), the
// bf16 GEMM 1.04x (4096^3) and 1.17x (8192^3), and the training step 1.02x. The environment variable
// STALEPROP_TMA_WIDE_BY_SHAPE=0 turns it off.
void set_tma_wide_by_shape(bool on);
bool tma_wide_by_shape();
using detail::wide_tile_width;
// The 128 x 128 and 128 x 256 tiles of the wgmma_tma kernel (GEMM and TMA convolutions) in
// thread-block clusters of two along M that share the B operand: each block loads half of every
// B stage and multicasts it to both, so B is read from L2 once per pair (wgmma_tma_mainloop.cuh,
// "Clusters": L2 throughput limited the 128 x 128 GEMM on an H100). Products with an odd number
// of 128-row tiles run unclustered. The same bits as without. Off unless set, or the environment
// variable STALEPROP_TMA_CLUSTER is 1: on an H100 (2026-11-27b) its tests passed and
// compute-sanitizer was clean, but it ran the bf16 GEMM at 0.46x (128 x 128) to 0.67x
// (128 x 256) of the unclustered speed, at 4096^3 and 8192^3. Its barriers then ordered memory
// at cluster scope, a GPU-wide fence on every K step (ptx_sm90.cuh, mbarrier_arrive_cluster).
// The present form, with CUTLASS's CTA-scope semantics, still lost a little (2026-11-27c): the
// GEMM at 0.97x-0.98x, ResNet-18's convolutions 0.95x, its training step 0.98x.
void set_tma_cluster(bool on);
bool tma_cluster();
// The wgmma_tma kernel persistent (wgmma_tma_mainloop.cuh): where a product has more tiles than
// the SMs hold at once, as many blocks as they hold, each computing every gridDim.x-th tile, so
// that a block's producer loads its next tile's first stages while its consumers store the
// last one's results, and the last wave's tail is spread over all blocks. Short reductions gain
// most: ResNet-18's 3x3 convolutions run 9 to 72 K steps per tile, each behind a pipeline fill
// and an epilogue that nothing overlaps (one 128-row tile's block fills an SM's shared memory).
// Never with clusters (tma_cluster() keeps a block per tile). The same bits as without. On unless
// set, or the environment variable STALEPROP_TMA_PERSISTENT is 0: on an H200 its tests passed and
// memcheck was clean (2026-11-28, 2026-11-28b) and racecheck too (2026-11-28b); in two sessions it ran ResNet-18's
// bf16 training step at batch 512 1.04x faster, ResNet-56's from graphs at the same speed, the
// bf16 GEMM 4096^3 1.02x and ResNet-18's convolutions summed 1.05x. Not yet measured with the
// pipelined methods, whose modules share the SMs.
void set_tma_persistent(bool on);
bool tma_persistent();
// The wgmma_tma kernel's producer asks L2 (cp.async.bulk.prefetch.tensor) for the stage it will
// load next into the slot it has just filled, kStages steps ahead within the tile
// (STALEPROP_TMA_L2_PREFETCH; off by default: never timed). Not in the 128 x 256 tile's
// convolutions, whose 40-register producer spilled with it. The bits do not change.
void set_tma_l2_prefetch(bool on);
bool tma_l2_prefetch();
// The halo kernel for the stride-1 "same" convolutions (conv_halo.h, wgmma_halo_mainloop.cuh):
// the forward and the data gradient on the transposed filter (3x3 and larger), where conv_tma()
// is on with the wgmma_tma main loop, the source's channels are a multiple of 64, the TMA
// convolution (or, for rows that do not tile by 128, the cp.async loop) would not split K, and
// the halo plan takes the shape. A tile loads its input rows once per 64 channels as a
// patch, and every tap reads its rows of the patch in place, instead of one box per tap: a ninth
// of the A operand's L2 traffic, which bounded ResNet-18's 64-channel 32 px layers at 0.57 of
// cuDNN (2026-11-27). Tiles run on the padded width, so a share of their rows is junk: mode 1
// takes plans that use at least 80% of their rows (the 32 px layers: 89%), mode 2 at least 60%
// (16 px: 67%). The same bits as the TMA convolution. Off (0) unless set, or the environment
// variable STALEPROP_CONV_HALO is 1 or 2: on an H200 its tests passed, memcheck was clean
// (2026-11-28, -28b) and racecheck too (2026-11-28b), and mode 1 ran ResNet-18's training step
// 1.02x faster (2026-11-28); with the persistent TMA kernel it ran 49.4k img/s (2026-11-28b), the
// persistent kernel alone 49.6k in another call: no A/B against the persistent kernel alone in one
// call yet.
void set_conv_halo(int mode);
int conv_halo();
// The smallest share of used rows conv_halo()'s mode asks of a halo plan (0 when off).
double conv_halo_min_used();
// How many halo convolutions have been launched in this process.
int64_t conv_halo_launches();
// The halo kernel's resident form (wgmma_halo_mainloop.cuh, wgmma_halo_resident_kernel): a
// persistent block per SM keeps the filter's whole B operand in shared memory and streams only
// the patches, its two consumer warpgroups taking the tiles in turn (two patch slots each), where
// that fits (3x3 filters over 64 source channels: B is then 72 KiB) and there are at least 4
// tiles per SM (conv_halo.h, halo_resident_pays). With the streaming halo kernel a tile reads
// 30 KiB of patch but 72 KiB of filter from L2; resident, only the patch. The same bits. Off unless set, or the
// environment variable STALEPROP_HALO_RESIDENT is 1 (with conv_halo() on): on an H200 its tests
// passed, memcheck was clean (2026-11-28, -28b) and racecheck too (2026-11-28b), but ResNet-18's
// training step ran slower with it (45.8k img/s against 48.7k for the streaming halo kernel in the
// same A/B, 2026-11-28).
void set_halo_resident(bool on);
bool halo_resident();
// How many halo convolutions have run in the resident form in this process.
int64_t conv_halo_resident_launches();
// The halo kernel's A descriptors with their base offset set to the start's row within its
// 1024-byte swizzle pattern, instead of 0 (conv_halo.h: which one the hardware wants for a start
// that is not a multiple of 8 rows is for the GPU test to tell). Off unless set, or the
// environment variable STALEPROP_HALO_DESC_PHASE is 1.
void set_halo_desc_phase(bool on);
bool halo_desc_phase();
// The cap on the blocks of a split grid (tile_plan.h, split_max_blocks), for the whole process:
// blocks >= 0 overrides STALEPROP_SPLIT_MAX_BLOCKS and the defaults (0: the target rule), -1
// restores them. For tests: a split grid larger than the SMs hold (which the defaults never
// launch on an H100) exercises the persistent kernel's K slices.
inline void set_split_max_blocks(int64_t blocks) {
  detail::split_max_blocks_override().store(blocks, std::memory_order_relaxed);
}
inline int64_t split_max_blocks_override() {
  return detail::split_max_blocks_override().load(std::memory_order_relaxed);
}
// The bf16 forward and weight gradient of convolutions with at most 4 input channels (a
// ResNet's stem) as direct kernels on CUDA cores (conv_small_c_plan.h, conv_small_c.cu) instead
// of the tensor-core implicit GEMM, whose 27-deep reduction fills under half of one K step and
// whose operands it gathers element by element there (ResNet-18's stem: 218 us forward, 302 us
// weight gradient at batch 512 on an H100, for 1.8 GFLOP and 67 MB each). On by default: on an
// H100 (2026-11-27b) its tests passed and memcheck was clean; the stem's weight gradient took
// 250 us against 309, its forward the same 220 us as the tensor cores. The environment variable
// STALEPROP_CONV_SMALL_C=0 turns it off.
void set_conv_small_c(bool on);
bool conv_small_c();
// How many convolution passes the direct kernels above have run in this process.
int64_t conv_small_c_launches();
// How many kernels the TMA convolutions (conv) and the wide 128 x 256 TMA tile (wide_gemm: plain
// GEMMs and TMA convolutions alike) have launched in this process, so that a test can tell that
// the path it means to cover ran (rather than a fallback).
struct TmaLaunches {
  int64_t conv = 0, wide_gemm = 0, cluster = 0;  // cluster: launches in clusters of two
  int64_t persistent = 0;                        // launches of fewer blocks than tiles (tma_persistent)
};
TmaLaunches tma_launches();
// The main loop the kernels run on the current device: the selection with auto resolved.
MmaMainloop effective_mma_mainloop();

// ---- GEMM ------------------------------------------------------------------------------------
// Row-major C[M,N] = relu?( alpha * op(A) * op(B) + beta * C + bias[j] ); beta == 0 never reads
// C; alpha == 0 or K == 0 never reads A or B; bias may be null; relu optional. lda/ldb/ldc are
// the row strides of A, B, C as stored.
void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
               int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc,
               const float* bias /*nullable*/, bool relu, cudaStream_t stream);
// Same, C stored as bf16 (beta reads C widened; the result is rounded once).
void gemm_bf16_out_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                        int64_t lda, const uint16_t* b, int64_t ldb, float beta, uint16_t* c, int64_t ldc,
                        const float* bias /*nullable*/, bool relu, cudaStream_t stream);

// ---- Convolutions (NHWC activations, KRSC weights), implicit GEMM ------------------------------
// Same semantics as the fp32 twins in ops.h; fp32 accumulation, no im2col buffer.
void conv2d_forward_bf16(const Conv2dShape& sh, const uint16_t* x, const uint16_t* w, const float* bias /*nullable*/,
                         uint16_t* y, cudaStream_t stream);
// dx = data gradient + beta * dx (dx widened; the sum rounded once; beta == 0: dx is not read).
void conv2d_backward_data_bf16(const Conv2dShape& sh, const uint16_t* dy, const uint16_t* w, uint16_t* dx,
                               cudaStream_t stream, float beta = 0.f);
// dw (and dbias) are fp32: they feed fp32 master weights.
void conv2d_backward_weight_bf16(const Conv2dShape& sh, const uint16_t* x, const uint16_t* dy, float* dw,
                                 float* dbias /*nullable*/, cudaStream_t stream);

// out[j] = sum over the m rows of the bf16 [m, c] matrix x (widened; summed in double in a fixed
// order, rounded once): the bias gradient of the bf16 convolutions.
void column_sums_bf16(int64_t m, int64_t c, const uint16_t* x, float* out, cudaStream_t stream);

}  // namespace sp::kernels::cuda
