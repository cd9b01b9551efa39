// The bf16 tensor-core GEMM main loop shared by gemm_bf16.cu and conv_bf16.cu (device code
// only; the launch side is in mma_launch.cuh):
//
//   C[i, j] = epilogue( sum_k  A(i, k) * B(k, j) ),   i < M, j < N, k < K,  bf16 in, fp32 accumulate
//
// As in the fp32 main loop (gemm_mainloop.cuh), A and B are *loaders*: a strided matrix is one
// (MatrixLoader), a convolution's activations gathered through the filter window are others
// (the implicit-GEMM loaders at the end), so no im2col buffer is ever formed.
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

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/conv_geom.cuh"
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
template <typename T>
struct MmaEpilogue {
  T* c;
  int64_t row_stride, col_stride;
  float alpha, beta;
  const float* bias;  // nullable, indexed by the column j
  bool relu;

  __device__ static float load(const float* p) { return *p; }
  __device__ static float load(const uint16_t* p) { return bf16_widen(*p); }
  __device__ static void store(float* p, float v) { *p = v; }
  __device__ static void store(uint16_t* p, float v) { *p = bf16_round(v); }

  __device__ void apply(int i, int j, float acc) const {
    T* out = c + int64_t(i) * row_stride + int64_t(j) * col_stride;
    float v = alpha * acc;
    if (beta != 0.f) v += beta * load(out);
    if (bias) v += bias[j];
    if (relu) v = v > 0.f ? v : 0.f;
    store(out, v);
  }
};

struct MmaGeometry {
  int m, n, k;
  int k_per_split;  // K slice of each blockIdx.z, a multiple of kBK
};

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

  // acc[i][j] = D rows (g, g + 8), columns (2t, 2t + 1) of mma tile (i, j).
  const int gr = lane / 4, tc = lane % 4 * 2;
#pragma unroll
  for (int i = 0; i < Tile::kMI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm0 + i * 16 + gr + h * 8;
      if (row >= g.m) continue;
#pragma unroll
      for (int j = 0; j < Tile::kNI; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + wn0 + j * 8 + tc + e;
          if (col >= g.n) continue;
          const float v = acc[i][j][2 * h + e];
          if (partials == nullptr)
            ep.apply(row, col, v);
          else
            partials[(int64_t(blockIdx.z) * g.m + row) * g.n + col] = v;
        }
    }
}

// ---- Implicit-GEMM convolution loaders (NHWC activations, KRSC weights) -----------------------
// The GEMM views of conv.cu: forward M = N*P*Q, N = K, K = R*S*C; backward data M = N*H*W,
// N = C, K = R*S*K; backward weight M = R*S*C, N = K, K = N*P*Q.

// n / d and n % d for 0 <= n < 2^31 by a multiply-high and a shift (Granlund-Montgomery, as
// in CUTLASS's FastDivmod), for the index arithmetic of the gathers: a hardware integer
// division is a long instruction sequence.
struct FastDivmod {
  int d;
  uint32_t mul, shr;

  static FastDivmod make(int divisor) {  // host
    SP_CHECK(divisor > 0, "FastDivmod: divisor ", divisor, " is not positive");
    FastDivmod f{divisor, 0u, 0u};
    if (divisor != 1) {
      int log2_ceil = 0;
      while ((int64_t(1) << log2_ceil) < divisor) ++log2_ceil;
      const int p = 31 + log2_ceil;
      f.mul = uint32_t(((uint64_t(1) << p) + uint64_t(divisor) - 1) / uint64_t(divisor));
      f.shr = uint32_t(p - 32);
    }
    return f;
  }
  __device__ int div(int n) const { return d == 1 ? n : int(__umulhi(uint32_t(n), mul) >> shr); }
  __device__ int mod(int n, int q) const { return n - q * d; }  // with q = div(n)
};

// The convolution's sizes (conv_geom.cuh) and fast divisors for the loaders' index arithmetic.
struct ConvGeom : ConvDims {
  FastDivmod div_c, div_s, div_k, div_p, div_q, div_h, div_w, div_stride;
};

// A loader over a gather: Derived::offset(row, col) is the index of the element in base, or -1
// for a zero. With vec, the layout guarantees (see each loader) that the 8 elements of a chunk
// are adjacent, start 16-byte aligned and are all present or all zero, so the first element's
// offset decides for the whole chunk.
template <class Derived, bool ContigK>
struct GatherLoader {
  static constexpr bool kContigK = ContigK;
  const uint16_t* base;
  bool vec;

  __device__ const Derived& self() const { return static_cast<const Derived&>(*this); }
  template <class Row, class Col>
  __device__ const uint16_t* chunk(const Row& r, const Col& c, int& bytes) const {
    const int64_t o = self().offset(r, c);
    bytes = o < 0 ? 0 : 16;
    return o < 0 ? base : base + o;
  }
  __device__ uint16_t elem(int x, int k) const {
    const int64_t o = self().offset(self().row(x), self().col(k));
    return o < 0 ? uint16_t(0) : base[o];
  }
};

// An output pixel as the top-left input coordinate of its window, and a filter tap.
struct OutPixel {
  int img;     // -1 past the last pixel
  int h0, w0;  // p * stride - pad, q * stride - pad
};
struct FilterTap {
  int r, s, c;
  bool valid;
};
__device__ __forceinline__ OutPixel out_pixel(const ConvGeom& g, int pix) {
  const int np = g.div_q.div(pix), q = g.div_q.mod(pix, np);
  const int img = g.div_p.div(np), p = g.div_p.mod(np, img);
  return {pix < g.npq ? img : -1, p * g.stride - g.pad, q * g.stride - g.pad};
}
__device__ __forceinline__ FilterTap filter_tap(const ConvGeom& g, int tap) {
  const int rs = g.div_c.div(tap), c = g.div_c.mod(tap, rs);
  const int r = g.div_s.div(rs), s = g.div_s.mod(rs, r);
  return {r, s, c, tap < g.taps};
}
// Index in x of element (pixel, tap) of the implicit column matrix, -1 in the padding or
// outside the matrix.
__device__ __forceinline__ int64_t conv_input_offset(const ConvGeom& g, const OutPixel& px, const FilterTap& t) {
  const int h = px.h0 + t.r, w = px.w0 + t.s;
  if (px.img < 0 || !t.valid || h < 0 || h >= g.h || w < 0 || w >= g.w) return -1;
  return ((int64_t(px.img) * g.h + h) * g.w + w) * g.c + t.c;
}

// Forward A: x(pix, tap). vec needs C % 8 == 0: a chunk is c..c+7 (c % 8 == 0) of one tap.
struct FwdInputLoader : GatherLoader<FwdInputLoader, true> {
  ConvGeom g;
  using Row = OutPixel;
  using Col = FilterTap;
  __device__ Row row(int pix) const { return out_pixel(g, pix); }
  __device__ Col col(int tap) const { return filter_tap(g, tap); }
  __device__ int64_t offset(const Row& px, const Col& t) const { return conv_input_offset(g, px, t); }
};

// Backward-weight A: x(pix, tap) as element (tap, pix), contiguous along the taps' c.
// vec needs C % 8 == 0.
struct BwdWeightInputLoader : GatherLoader<BwdWeightInputLoader, false> {
  ConvGeom g;
  using Row = FilterTap;
  using Col = OutPixel;
  __device__ Row row(int tap) const { return filter_tap(g, tap); }
  __device__ Col col(int pix) const { return out_pixel(g, pix); }
  __device__ int64_t offset(const Row& t, const Col& px) const { return conv_input_offset(g, px, t); }
};

// Backward-data A: dy(pix, t), t = (r * S + s) * K + k: dy at the output pixel whose window
// puts tap (r, s) on input pixel pix, zero when there is none. vec needs K % 8 == 0: a chunk
// is k..k+7 (k % 8 == 0) of one output pixel.
struct BwdDataGradLoader : GatherLoader<BwdDataGradLoader, true> {
  ConvGeom g;
  struct Row {
    int img;     // -1 past the last pixel
    int hp, wp;  // h + pad, w + pad
  };
  struct Col {
    int r, s, k;
    bool valid;
  };
  __device__ Row row(int pix) const {
    const int nh = g.div_w.div(pix), w = g.div_w.mod(pix, nh);
    const int img = g.div_h.div(nh), h = g.div_h.mod(nh, img);
    return {pix < g.nhw ? img : -1, h + g.pad, w + g.pad};
  }
  __device__ Col col(int t) const {
    const int rs = g.div_k.div(t), k = g.div_k.mod(t, rs);
    const int r = g.div_s.div(rs), s = g.div_s.mod(rs, r);
    return {r, s, k, t < g.rsk};
  }
  // Output pixel (p, q) reaches input (h, w) through tap (r, s) when p * stride - pad + r == h.
  __device__ int64_t offset(const Row& px, const Col& t) const {
    const int ph = px.hp - t.r, pw = px.wp - t.s;
    if (px.img < 0 || !t.valid || ph < 0 || pw < 0) return -1;
    const int p = g.div_stride.div(ph), q = g.div_stride.div(pw);
    if (g.div_stride.mod(ph, p) != 0 || g.div_stride.mod(pw, q) != 0 || p >= g.p || q >= g.q) return -1;
    return ((int64_t(px.img) * g.p + p) * g.q + q) * g.k + t.k;
  }
};

// The rows and columns of a backward-data B operand (the weights as element (c, t)).
struct WeightChannel {
  int c;
};
struct WeightTap {
  int64_t off;  // of w[k, r, s, 0]
  bool valid;
};

// Backward-data B: w[k, r, s, c] as element (c, t), t = (r * S + s) * K + k, contiguous along
// c. vec needs C % 8 == 0.
struct BwdDataWeightLoader : GatherLoader<BwdDataWeightLoader, false> {
  ConvGeom g;
  using Row = WeightChannel;
  using Col = WeightTap;
  __device__ Row row(int c) const { return {c}; }
  __device__ Col col(int t) const {
    const int rs = g.div_k.div(t), k = g.div_k.mod(t, rs);
    return {(int64_t(k) * g.r * g.s + rs) * g.c, t < g.rsk};
  }
  __device__ int64_t offset(const Row& r, const Col& t) const { return r.c < g.c && t.valid ? t.off + r.c : -1; }
};

// ---- Backward data by stride class (kernels/common/conv_stride_classes.h) ---------------------
// One class (a, b) of a strided convolution's input pixels, h = a + stride * i,
// w = b + stride * j, as a dense implicit GEMM: rows pix = (img * hc + i) * wc + j, columns
// t = (rr * sc + ss) * K + k over the class's taps r = r0 + stride * rr, s = s0 + stride * ss.
struct ClassGeom {
  ConvGeom g;
  int hc, wc, r0, s0, rc, sc, dh, dw;
  int m;   // N * hc * wc
  int kc;  // rc * sc * K
  FastDivmod div_hc, div_wc, div_sc;
};

// A: dy(pix, t) at output pixel (i + dh - rr, j + dw - ss), zero outside the output. vec as
// BwdDataGradLoader's (K % 8 == 0).
struct BwdDataClassGradLoader : GatherLoader<BwdDataClassGradLoader, true> {
  ClassGeom cg;
  struct Row {
    int img;  // -1 past the class's last pixel
    int i, j;
  };
  struct Col {
    int rr, ss, k;
    bool valid;
  };
  __device__ Row row(int pix) const {
    const int ni = cg.div_wc.div(pix), j = cg.div_wc.mod(pix, ni);
    const int img = cg.div_hc.div(ni), i = cg.div_hc.mod(ni, img);
    return {pix < cg.m ? img : -1, i, j};
  }
  __device__ Col col(int t) const {
    const int rs = cg.g.div_k.div(t), k = cg.g.div_k.mod(t, rs);
    const int rr = cg.div_sc.div(rs), ss = cg.div_sc.mod(rs, rr);
    return {rr, ss, k, t < cg.kc};
  }
  __device__ int64_t offset(const Row& px, const Col& t) const {
    const int p = px.i + cg.dh - t.rr, q = px.j + cg.dw - t.ss;
    if (px.img < 0 || !t.valid || p < 0 || p >= cg.g.p || q < 0 || q >= cg.g.q) return -1;
    return ((int64_t(px.img) * cg.g.p + p) * cg.g.q + q) * cg.g.k + t.k;
  }
};

// B: w[k, r0 + stride * rr, s0 + stride * ss, c] as element (c, t), contiguous along c. vec as
// BwdDataWeightLoader's (C % 8 == 0).
struct BwdDataClassWeightLoader : GatherLoader<BwdDataClassWeightLoader, false> {
  ClassGeom cg;
  using Row = WeightChannel;
  using Col = WeightTap;
  __device__ Row row(int c) const { return {c}; }
  __device__ Col col(int t) const {
    const int rs = cg.g.div_k.div(t), k = cg.g.div_k.mod(t, rs);
    const int rr = cg.div_sc.div(rs), ss = cg.div_sc.mod(rs, rr);
    const int r = cg.r0 + cg.g.stride * rr, s = cg.s0 + cg.g.stride * ss;
    return {((int64_t(k) * cg.g.r + r) * cg.g.s + s) * cg.g.c, t < cg.kc};
  }
  __device__ int64_t offset(const Row& r, const Col& t) const { return r.c < cg.g.c && t.valid ? t.off + r.c : -1; }
};

}  // namespace sp::kernels::cuda::detail::mma
