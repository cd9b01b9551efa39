// The bf16 tensor-core GEMM main loop shared by gemm_bf16.cu and conv_bf16.cu (device code
// only; the launch side is in mma_launch.cuh):
//
//   C[i, j] = epilogue( sum_k  A(i, k) * B(k, j) ),   i < M, j < N, k < K,  bf16 in, fp32 accumulate
//
// As in the fp32 main loop (gemm_mainloop.cuh), A and B are *loaders*: a strided matrix is one
// (MatrixLoader), a convolution's activations gathered through the filter window are others
// (the implicit-GEMM loaders of conv_loaders.h), so no im2col buffer is ever formed.
//
// Hierarchy:
//   block tile  kBM x kBN (MmaTile), marching along K in steps of kBK = 32 through a
//               kStages = 3 deep ring of shared-memory stages: while the warps multiply stage
//               s, the cp.async copies of the next two K steps are in flight
//               (cp.async.cg 16 B + commit_group / wait_group);
//   warp tile   kWM x kWN = 64 x 32 (32 x 32 for the narrow tile): kMI x kNI mma tiles;
//   mma         mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 on fragments loaded from
//               shared memory with ldmatrix.x4 (.trans for operands stored X-contiguous).
// Shared-memory layout follows the operand's contiguous dimension in global memory, so a 16 B
// cp.async chunk (8 bf16) lands unchanged:
//   K-contiguous operand   tile[x][kBK + kPadK]  (rows of 80 B)       -> ldmatrix
//   X-contiguous operand   tile[k][kX + kPadX]   (rows of 2 kX + 16 B) -> ldmatrix.trans
// The padding of 16 B per row makes the 8 row addresses of each ldmatrix phase (and the 16 B
// cp.async stores) fall on 8 distinct groups of 4 banks: no bank conflicts.
//
// Loads: a loader with `vec` set takes the cp.async path (16 B chunks, zero-filled past the
// operand's edge); otherwise every element is gathered one by one through registers and the
// chunk is stored with one 16 B shared store (unaligned pointers, leading dimensions that are
// not a multiple of 8, convolutions with C % 8 != 0). Both paths fill the same stages and the
// arithmetic is identical; the element-wise loads are synchronous, so that path hides less
// memory latency (it serves the odd shapes, and the C = 3 stem, not the bulk of the work).
//
// Split K: for an output of few block tiles and a long K, grid.z cuts K into slices of whole
// K steps; slice z writes its raw fp32 partial tile to partials[z][M][N] and a second kernel
// (mma_launch.cuh) adds the slices in slice order and applies the epilogue: deterministic.
#pragma once

#include <cstdint>

#include "kernels/common/conv_stride_classes.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/conv_geom.cuh"
#include "kernels/cuda/conv_loaders.h"
#include "kernels/cuda/ptx.cuh"

namespace sp::kernels::cuda::detail::mma {

constexpr int kBK = 32;    // K step (two m16n8k16 steps)
constexpr int kStages = 3;  // cp.async pipeline depth
constexpr int kChunk = 8;   // bf16 elements per 16-byte chunk
constexpr int kPadK = 8;    // elements of padding per row, K-contiguous layout
constexpr int kPadX = 8;    // elements of padding per row, X-contiguous layout

constexpr int max_int(int a, int b) { return a > b ? a : b; }

template <int BM, int BN, int WarpsM, int WarpsN, int MinBlocks>
struct MmaTile {
  static constexpr int kBM = BM, kBN = BN, kBK = mma::kBK, kStages = mma::kStages;
  static constexpr int kMinBlocks = MinBlocks;  // per SM, for __launch_bounds__ (caps the registers)
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN;
  static constexpr int kThreads = kWarpSize * WarpsM * WarpsN;
  static constexpr int kWM = BM / WarpsM, kWN = BN / WarpsN;  // warp tile
  static constexpr int kMI = kWM / 16, kNI = kWN / 8;          // mma tiles per warp
  // Elements of one stage of an operand tile kX wide: room for either layout.
  static constexpr int stage_elems(int x) { return max_int(x * (kBK + kPadK), kBK * (x + kPadX)); }
  static constexpr int kAStage = stage_elems(BM), kBStage = stage_elems(BN);
  static constexpr int kSmemBytes = kStages * (kAStage + kBStage) * 2;

  static_assert(kWM % 16 == 0 && kWN % 16 == 0, "a warp tile is whole 16 x 16 pieces (B loads two n8 tiles at once)");
  static_assert((BM * kBK / kChunk) % kThreads == 0 && (BN * kBK / kChunk) % kThreads == 0,
                "every thread copies the same number of chunks");
};

// 128 x 128, 8 warps (2 x 4) of 64 x 32: 64 fp32 accumulators per thread. 61,440 B of shared
// memory; capped at 128 registers so that 2 blocks (16 warps) share an SM.
using MmaTileLarge = MmaTile<128, 128, 2, 4, 2>;
// 128 x 64, 4 warps (2 x 2) of 64 x 32: N <= 64 (ResNet stages of 64 channels). 46,080 B;
// left uncapped: up to ~220 registers, 2 blocks per SM (a cap of 168 for 3 blocks spilled).
using MmaTileMedium = MmaTile<128, 64, 2, 2, 1>;
// 128 x 32, 4 warps (4 x 1) of 32 x 32: N <= 32 (ResNet-20's 16 and 32 channels). 38,400 B,
// at most 128 registers (4 blocks per SM).
using MmaTileNarrow = MmaTile<128, 32, 4, 1, 4>;

// ---- bf16 <-> fp32, bit-identical to kernels/cpu/elementwise.cpp ------------------------------
__device__ __forceinline__ uint16_t bf16_round(float f) {
  uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x0040u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // nearest, ties to even
  return uint16_t(bits >> 16);
}
__device__ __forceinline__ float bf16_widen(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

// ---- Operand loaders -------------------------------------------------------------------------
// A loader presents an operand as elements (x, k), x along M for A and along N for B, with
//   static constexpr bool kContigK;     8 consecutive elements along K (true) or X (false) are
//                                       adjacent in memory
//   bool vec;                           the cp.async chunk path may be used
//   struct Row, struct Col;             the index arithmetic of a coordinate x, and of a k
//   __device__ Row row(int x) const;    (x and k any coordinates, also past the operand's end)
//   __device__ Col col(int k) const;
//   __device__ const uint16_t* chunk(const Row&, const Col&, int& bytes) const;
//       the chunk of 8 elements starting at (x, k) along the contiguous dimension (whose
//       coordinate is then a multiple of 8): its address, 16-byte aligned, and how many of its
//       16 bytes are real (0..16, the rest is zero); with bytes == 0 the address is any valid
//       one (nothing is read)
//   __device__ uint16_t elem(int x, int k) const;   one element, 0 outside the operand
// The split into row() and col() lets every thread work out its chunks' rows once per kernel
// (a thread's chunks keep their x from one K step to the next) and their K coordinates once
// per step, instead of decomposing both for every chunk of every step.

// A strided matrix: element (x, k) at p[x * ld + k] (kContigK) or p[k * ld + x]. A row or a
// column is an offset and how many bytes of a chunk it allows (16 inside, less at the edge of
// the contiguous dimension, 0 outside).
template <bool ContigK>
struct MatrixLoader {
  static constexpr bool kContigK = ContigK;
  const uint16_t* p;
  int64_t ld;
  int x_extent, k_extent;
  bool vec;  // p 16-byte aligned and ld % 8 == 0 (checked at launch)

  struct Row {
    int64_t off;
    int bytes;
  };
  using Col = Row;
  __device__ static Row line(int i, int extent, int64_t stride, bool contiguous) {
    if (i >= extent) return {0, 0};
    return {int64_t(i) * stride, contiguous ? 2 * min(kChunk, extent - i) : 16};
  }
  __device__ Row row(int x) const { return line(x, x_extent, kContigK ? ld : 1, !kContigK); }
  __device__ Col col(int k) const { return line(k, k_extent, kContigK ? 1 : ld, kContigK); }
  __device__ const uint16_t* chunk(const Row& r, const Col& c, int& bytes) const {
    bytes = min(r.bytes, c.bytes);
    return bytes ? p + r.off + c.off : p;
  }
  __device__ uint16_t elem(int x, int k) const {
    if (x >= x_extent || k >= k_extent) return 0;
    return kContigK ? p[int64_t(x) * ld + k] : p[int64_t(k) * ld + x];
  }
};

// ---- Epilogue --------------------------------------------------------------------------------
// C(i, j) = relu?(alpha * acc + beta * C(i, j) + bias[j]), stored at c[i * row_stride +
// j * col_stride] as fp32 (T = float) or rounded to bf16 (T = uint16_t). beta == 0 never reads C.
// With row_group > 0, row i is stored at c[(i / row_group) * group_stride + (i % row_group) *
// row_stride + j * col_stride] instead (grouped_row_offset): a stride class's data gradient
// written straight into dx (kernels/common/conv_stride_classes.h, class_row_map).
// The main loops' epilogues take a row's offset once (row_offset) and then store its columns two
// at a time (apply_pair_at): per element, the offset's arithmetic (with a 64-bit division, before
// 2026-11-27c) cost the bf16 GEMM 1.5x at 4096^3 on an H100, and 2-byte stores write each 32-byte
// sector in two halves.
template <typename T>
struct MmaEpilogue {
  T* c;
  int64_t row_stride, col_stride;
  float alpha, beta;
  const float* bias;  // nullable, indexed by the column j
  bool relu;
  int row_group = 0;
  int64_t group_stride = 0;

  __device__ static float load(const float* p) { return *p; }
  __device__ static float load(const uint16_t* p) { return bf16_widen(*p); }
  __device__ static void store(float* p, float v) { *p = v; }
  __device__ static void store(uint16_t* p, float v) { *p = bf16_round(v); }
  // Two adjacent elements at p (aligned to both: pairs_aligned), as one store.
  __device__ static void store2(float* p, float v0, float v1) { *reinterpret_cast<float2*>(p) = make_float2(v0, v1); }
  __device__ static void store2(uint16_t* p, float v0, float v1) {
    *reinterpret_cast<uint32_t*>(p) = uint32_t(bf16_round(v0)) | uint32_t(bf16_round(v1)) << 16;
  }

  __device__ int64_t row_offset(int i) const { return grouped_row_offset(i, row_stride, row_group, group_stride); }
  // The value stored for acc at out (column j).
  __device__ float value(const T* out, int j, float acc) const {
    float v = alpha * acc;
    if (beta != 0.f) v += beta * load(out);
    if (bias) v += bias[j];
    if (relu) v = v > 0.f ? v : 0.f;
    return v;
  }
  // Element (i, j), where row_off = row_offset(i).
  __device__ void apply_at(int64_t row_off, int j, float acc) const {
    T* out = c + row_off + int64_t(j) * col_stride;
    store(out, value(out, j, acc));
  }
  __device__ void apply(int i, int j, float acc) const { apply_at(row_offset(i), j, acc); }
  // Whether columns j and j + 1 (j even) of every row are adjacent and aligned to a store of both:
  // unit column stride, even row and group strides, and c aligned to two elements.
  __device__ bool pairs_aligned() const {
    return col_stride == 1 && row_stride % 2 == 0 && group_stride % 2 == 0 &&
           reinterpret_cast<uintptr_t>(c) % (2 * sizeof(T)) == 0;
  }
  // Elements (i, j) and (i, j + 1), j even, as one store where `paired` (pairs_aligned()), else
  // two; the same bits either way.
  __device__ void apply_pair_at(int64_t row_off, int j, float acc0, float acc1, bool paired) const {
    if (paired) {
      T* out = c + row_off + j;
      store2(out, value(out, j, acc0), value(out + 1, j + 1, acc1));
    } else {
      apply_at(row_off, j, acc0);
      apply_at(row_off, j + 1, acc1);
    }
  }
};

// Split K's fp32 partials: columns j and j + 1 (j even) of row `row` of slice z, paired where
// the slice's rows have an even length n (the partials themselves come from the allocator,
// aligned far beyond 8 bytes), the second only where j + 1 < n.
__device__ __forceinline__ void store_partial_pair(float* partials, int z, int m, int n, int row, int j, float v0,
                                                   float v1) {
  float* p = partials + (int64_t(z) * m + row) * n + j;
  if (j + 1 < n) {
    if (n % 2 == 0 && reinterpret_cast<uintptr_t>(partials) % 8 == 0) {
      *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    } else {
      p[0] = v0;
      p[1] = v1;
    }
  } else {
    p[0] = v0;
  }
}

struct MmaGeometry {
  int m, n, k;
  int k_per_split;  // K slice of each blockIdx.z, a multiple of kBK
  // wgmma_tma_gemm_kernel: its producer asks L2 for the stage it will load next into the slot it
  // has just filled (tma_l2_prefetch() in tensor_core.h); the other main loops ignore it.
  int l2_prefetch = 0;
};

// Columns col and col + 1 of row `row` (col even and below g.n; row_off = ep.row_offset(row)), as
// every main loop's epilogue stores them: through ep, paired where `paired`
// (ep.pairs_aligned()) and col + 1 < g.n, or with split K as the fp32 partials of slice z.
template <typename T>
__device__ __forceinline__ void store_pair(const MmaEpilogue<T>& ep, bool paired, float* partials, int z,
                                           const MmaGeometry& g, int row, int64_t row_off, int col, float v0,
                                           float v1) {
  if (partials != nullptr)
    store_partial_pair(partials, z, g.m, g.n, row, col, v0, v1);
  else if (col + 1 < g.n)
    ep.apply_pair_at(row_off, col, v0, v1, paired);
  else
    ep.apply_at(row_off, col, v0);
}

// ---- Stage fill: global -> shared ------------------------------------------------------------
// Where element (x, k) of a stage lives (in elements from the stage's start), for an operand
// stored K-contiguous or X-contiguous: Layout::offset<ContigK>(x, k), called for chunk starts
// (k, or x, a multiple of 8) only; Layout::kBK is the K step. The mma.sync main loop's layout
// pads every row by 16 bytes (see the top of this file); the wgmma main loop's swizzles
// (wgmma_mainloop.cuh).
template <int kX>
struct PaddedLayout {
  static constexpr int kBK = mma::kBK;
  template <bool ContigK>
  __device__ static int offset(int x, int k) {
    return ContigK ? x * (kBK + kPadK) + k : k * (kX + kPadX) + x;
  }
};

// The kX x BK tile of one K step, as kX * BK / 8 chunks; thread t takes chunks t,
// t + kThreads, ...  Chunk c is (x = c / (BK / 8), k = 8 (c % (BK / 8))) K-contiguous, or
// (k = c / (kX / 8), x = 8 (c % (kX / 8))) X-contiguous. Either way a thread's chunks keep
// their x (and, K-contiguous, their k within the step) from one step to the next.
template <class Loader, int kX, int kThreads, class Layout = PaddedLayout<kX>>
struct StageFill {
  static constexpr int kStepK = Layout::kBK;
  static constexpr int kChunks = kX * kStepK / kChunk, kPerThread = kChunks / kThreads;
  static constexpr int kRowsPerK = kStepK / kChunk, kRowsPerX = kX / kChunk;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
  static_assert(kThreads % kRowsPerK == 0 && kThreads % kRowsPerX == 0, "a thread's chunks keep their x");

  typename Loader::Row rows[kPerThread];  // the row() of each of this thread's chunks

  __device__ static int chunk_x(int i) {
    const int c = int(threadIdx.x) + i * kThreads;
    return Loader::kContigK ? c / kRowsPerK : c % kRowsPerX * kChunk;
  }
  __device__ static int chunk_k(int i) {
    const int c = int(threadIdx.x) + i * kThreads;
    return Loader::kContigK ? c % kRowsPerK * kChunk : c / kRowsPerX;
  }
  __device__ static int smem_offset(int i) {
    return Layout::template offset<Loader::kContigK>(chunk_x(i), chunk_k(i));
  }

  __device__ void init(const Loader& ld, int x0) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) rows[i] = ld.row(x0 + chunk_x(i));
  }

  __device__ void fill(const Loader& ld, uint16_t* stage, int x0, int k0) const {
    if (ld.vec) {
      // K-contiguous, every chunk of the thread has the same k: one col() per step.
      const typename Loader::Col shared_col = ld.col(k0 + chunk_k(0));
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const typename Loader::Col col = Loader::kContigK ? shared_col : ld.col(k0 + chunk_k(i));
        int bytes = 0;
        const uint16_t* src = ld.chunk(rows[i], col, bytes);
        ptx::cp_async_16(stage + smem_offset(i), src, bytes);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int x = x0 + chunk_x(i), k = k0 + chunk_k(i);
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < kChunk; e += 2) {
        const uint16_t lo = Loader::kContigK ? ld.elem(x, k + e) : ld.elem(x + e, k);
        const uint16_t hi = Loader::kContigK ? ld.elem(x, k + e + 1) : ld.elem(x + e + 1, k);
        w[e / 2] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
      *reinterpret_cast<uint4*>(stage + smem_offset(i)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
};

// Both operands of a block tile at (m0, n0), K from k_begin: fill(step) issues the copies of K
// step `step` into stage step % Tile::kStages of the A and B rings (Tile::kAStage and
// Tile::kBStage elements per stage), each thread its share (StageFill). Past the slice's end
// the loaders' bounds checks cannot help (the next slice's K is inside the operand), so the
// callers skip those steps.
template <class Tile, class LoaderA, class LoaderB, class LayoutA, class LayoutB>
struct BlockFill {
  const LoaderA& a;
  const LoaderB& b;
  uint16_t* a_smem;
  uint16_t* b_smem;
  int m0, n0, k_begin;
  StageFill<LoaderA, Tile::kBM, Tile::kThreads, LayoutA> fill_a;
  StageFill<LoaderB, Tile::kBN, Tile::kThreads, LayoutB> fill_b;

  __device__ BlockFill(const LoaderA& la, const LoaderB& lb, uint16_t* as, uint16_t* bs, int m, int n, int k)
      : a(la), b(lb), a_smem(as), b_smem(bs), m0(m), n0(n), k_begin(k) {
    fill_a.init(a, m0);
    fill_b.init(b, n0);
  }
  __device__ void fill(int step) const {
    const int s = step % Tile::kStages, k0 = k_begin + step * Tile::kBK;
    fill_a.fill(a, a_smem + s * Tile::kAStage, m0, k0);
    fill_b.fill(b, b_smem + s * Tile::kBStage, n0, k0);
  }
};

// ---- Fragments: shared -> registers ------------------------------------------------------------
// A fragments of the 16 x 16 piece at (rows x0.., k kk..) of an A stage.
template <bool ContigK, int kX>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const uint16_t* stage, int x0, int kk, int lane) {
  if (ContigK) {  // tile[x][k]: lanes 0-15 rows x0..x0+15 at kk, lanes 16-31 the same rows at kk + 8
    ptx::ldmatrix_x4(a, stage + (x0 + lane % 16) * (kBK + kPadK) + kk + lane / 16 * 8);
  } else {  // tile[k][x]: matrix j = lane / 8 is rows kk + 8 (j / 2).., columns x0 + 8 (j % 2)..
    const int j = lane / 8, r = lane % 8;
    ptx::ldmatrix_x4_trans(a, stage + (kk + r + j / 2 * 8) * (kX + kPadX) + x0 + j % 2 * 8);
  }
}

// B fragments of two n8 tiles, columns x0..x0+7 (b0) and x0+8..x0+15 (b1), k kk..kk+15.
template <bool ContigK, int kX>
__device__ __forceinline__ void load_b_frags(uint32_t (&b0)[2], uint32_t (&b1)[2], const uint16_t* stage, int x0,
                                             int kk, int lane) {
  uint32_t r4[4];
  const int j = lane / 8, r = lane % 8;
  if (ContigK)  // tile[n][k]: matrix j is columns x0 + 8 (j / 2).., k kk + 8 (j % 2)..
    ptx::ldmatrix_x4(r4, stage + (x0 + r + j / 2 * 8) * (kBK + kPadK) + kk + j % 2 * 8);
  else  // tile[k][n]: matrix j is rows kk + 8 (j % 2).., columns x0 + 8 (j / 2)..
    ptx::ldmatrix_x4_trans(r4, stage + (kk + r + j % 2 * 8) * (kX + kPadX) + x0 + j / 2 * 8);
  b0[0] = r4[0], b0[1] = r4[1], b1[0] = r4[2], b1[1] = r4[3];
}

// ---- The kernel ------------------------------------------------------------------------------
// grid = (M tiles, N tiles, K slices), dynamic shared memory Tile::kSmemBytes. With
// partials == nullptr (one slice) the epilogue writes C; otherwise slice z writes its raw sums
// to partials[z][M][N] (row-major).
template <class Tile, class LoaderA, class LoaderB, typename T>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
    mma_gemm_kernel(LoaderA a, LoaderB b, MmaGeometry g, MmaEpilogue<T> ep, float* partials) {
  pdl_prologue();
  uint16_t* const a_smem = reinterpret_cast<uint16_t*>(ptx::dynamic_smem());
  uint16_t* const b_smem = a_smem + kStages * Tile::kAStage;

  const int m0 = int(blockIdx.x) * Tile::kBM, n0 = int(blockIdx.y) * Tile::kBN;
  const int k_begin = int(blockIdx.z) * g.k_per_split;
  const int k_end = min(g.k, k_begin + g.k_per_split);
  const int k_steps = (k_end - k_begin + kBK - 1) / kBK;  // >= 1: the host never launches an empty slice

  const int warp = int(threadIdx.x) / kWarpSize, lane = int(threadIdx.x) % kWarpSize;
  const int wm0 = warp / Tile::kWarpsN * Tile::kWM, wn0 = warp % Tile::kWarpsN * Tile::kWN;

  const BlockFill<Tile, LoaderA, LoaderB, PaddedLayout<Tile::kBM>, PaddedLayout<Tile::kBN>> stages(
      a, b, a_smem, b_smem, m0, n0, k_begin);

  float acc[Tile::kMI][Tile::kNI][4];
#pragma unroll
  for (int i = 0; i < Tile::kMI; ++i)
#pragma unroll
    for (int j = 0; j < Tile::kNI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // Prologue: the first kStages - 1 steps in flight, one commit group each (possibly empty,
  // so that the group count, and with it wait_group's meaning, is the same for every step).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_steps) stages.fill(s);
    ptx::cp_async_commit();
  }

  for (int step = 0; step < k_steps; ++step) {
    // This step's group has landed (for this thread); the barrier makes every thread's
    // copies visible, and also tells that every warp has finished reading step - 1's stage,
    // which the fill below overwrites.
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (step + kStages - 1 < k_steps) stages.fill(step + kStages - 1);
    ptx::cp_async_commit();

    const uint16_t* as = a_smem + step % kStages * Tile::kAStage;
    const uint16_t* bs = b_smem + step % kStages * Tile::kBStage;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      // All B fragments, then one A fragment at a time: 4 live A registers instead of 4 kMI
      // (the unrolled loop still lets the compiler issue the next ldmatrix early).
      uint32_t bf[Tile::kNI][2];
#pragma unroll
      for (int j = 0; j < Tile::kNI; j += 2)
        load_b_frags<LoaderB::kContigK, Tile::kBN>(bf[j], bf[j + 1], bs, wn0 + j * 8, kk, lane);
#pragma unroll
      for (int i = 0; i < Tile::kMI; ++i) {
        uint32_t af[4];
        load_a_frag<LoaderA::kContigK, Tile::kBM>(af, as, wm0 + i * 16, kk, lane);
#pragma unroll
        for (int j = 0; j < Tile::kNI; ++j) ptx::mma_bf16_16816(acc[i][j], af, bf[j]);
      }
    }
  }
  ptx::cp_async_wait<0>();  // only empty groups remain; leave none behind

  // acc[i][j] = D rows (g, g + 8), columns (2t, 2t + 1) of mma tile (i, j): each row's offset
  // once, then its columns in pairs (see MmaEpilogue).
  const int gr = lane / 4, tc = lane % 4 * 2;
  const bool paired = ep.pairs_aligned();
#pragma unroll
  for (int i = 0; i < Tile::kMI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm0 + i * 16 + gr + h * 8;
      if (row >= g.m) continue;
      const int64_t row_off = ep.row_offset(row);
#pragma unroll
      for (int j = 0; j < Tile::kNI; ++j) {
        const int col = n0 + wn0 + j * 8 + tc;
        if (col >= g.n) continue;
        store_pair(ep, paired, partials, int(blockIdx.z), g, row, row_off, col, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
    }
}

}  // namespace sp::kernels::cuda::detail::mma
