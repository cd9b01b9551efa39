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
// not a multiple of 8, convolutions with C % 8 != 0). Both paths fill the same stages, so the
// pipeline and the arithmetic are identical.
//
// Split K: for an output of few block tiles and a long K, grid.z cuts K into slices of whole
// K steps; slice z writes its raw fp32 partial tile to partials[z][M][N] and a second kernel
// (mma_launch.cuh) adds the slices in slice order and applies the epilogue: deterministic.
#pragma once

#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ptx.cuh"

namespace sp::kernels::cuda::detail::mma {

constexpr int kBK = 32;    // K step (two m16n8k16 steps)
constexpr int kStages = 3;  // cp.async pipeline depth
constexpr int kChunk = 8;   // bf16 elements per 16-byte chunk
constexpr int kPadK = 8;    // elements of padding per row, K-contiguous layout
constexpr int kPadX = 8;    // elements of padding per row, X-contiguous layout

constexpr int max_int(int a, int b) { return a > b ? a : b; }

template <int BM, int BN, int WarpsM, int WarpsN>
struct MmaTile {
  static constexpr int kBM = BM, kBN = BN;
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

// 128 x 128, 8 warps (2 x 4) of 64 x 32: 64 fp32 accumulators per thread. 61,440 B of shared memory.
using MmaTileLarge = MmaTile<128, 128, 2, 4>;
// 128 x 64, 4 warps (2 x 2) of 64 x 32: N <= 64 (ResNet stages of 64 channels). 46,080 B.
using MmaTileMedium = MmaTile<128, 64, 2, 2>;
// 128 x 32, 4 warps (4 x 1) of 32 x 32: N <= 32 (ResNet-20's 16 and 32 channels). 38,400 B.
using MmaTileNarrow = MmaTile<128, 32, 4, 1>;

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
//   static constexpr bool kContigK;       8 consecutive elements along K (true) or X (false)
//                                         are adjacent in memory
//   bool vec;                             the cp.async chunk path may be used
//   __device__ const uint16_t* chunk(int x, int k, int& bytes) const;
//       the chunk starting at (x, k) (its contiguous coordinate a multiple of 8): the address
//       of its first element, 16-byte aligned, and how many of its 16 bytes are real (0..16,
//       the rest is zero); with bytes == 0 the address is any valid one (nothing is read)
//   __device__ uint16_t elem(int x, int k) const;   one element, 0 outside the operand

// A strided matrix: element (x, k) at p[x * ld + k] (kContigK) or p[k * ld + x].
template <bool ContigK>
struct MatrixLoader {
  static constexpr bool kContigK = ContigK;
  const uint16_t* p;
  int64_t ld;
  int x_extent, k_extent;
  bool vec;  // p 16-byte aligned and ld % 8 == 0 (checked at launch)

  __device__ const uint16_t* chunk(int x, int k, int& bytes) const {
    const int outer = kContigK ? x : k, inner = kContigK ? k : x;
    const int outer_extent = kContigK ? x_extent : k_extent, inner_extent = kContigK ? k_extent : x_extent;
    if (outer >= outer_extent || inner >= inner_extent) {
      bytes = 0;
      return p;
    }
    bytes = 2 * min(kChunk, inner_extent - inner);
    return p + int64_t(outer) * ld + inner;
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
// The kX x kBK tile of one K step, as kX * kBK / 8 chunks; thread t takes chunks t,
// t + kThreads, ...  Chunk c is (x = c / 4, k = 8 (c % 4)) K-contiguous, or
// (k = c / (kX / 8), x = 8 (c % (kX / 8))) X-contiguous.
template <class Loader, int kX, int kThreads>
__device__ __forceinline__ void fill_stage(const Loader& ld, uint16_t* stage, int x0, int k0) {
  constexpr int kChunks = kX * kBK / kChunk, kPerThread = kChunks / kThreads;
  constexpr int kRowsPerK = kBK / kChunk, kRowsPerX = kX / kChunk;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = int(threadIdx.x) + i * kThreads;
    int x, k, offset;
    if (Loader::kContigK) {
      x = c / kRowsPerK, k = c % kRowsPerK * kChunk;
      offset = x * (kBK + kPadK) + k;
    } else {
      k = c / kRowsPerX, x = c % kRowsPerX * kChunk;
      offset = k * (kX + kPadX) + x;
    }
    if (ld.vec) {
      int bytes;
      const uint16_t* src = ld.chunk(x0 + x, k0 + k, bytes);
      ptx::cp_async_16(stage + offset, src, bytes);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < kChunk; e += 2) {
        const uint16_t lo = Loader::kContigK ? ld.elem(x0 + x, k0 + k + e) : ld.elem(x0 + x + e, k0 + k);
        const uint16_t hi = Loader::kContigK ? ld.elem(x0 + x, k0 + k + e + 1) : ld.elem(x0 + x + e + 1, k0 + k);
        w[e / 2] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
      *reinterpret_cast<uint4*>(stage + offset) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

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
__global__ void __launch_bounds__(Tile::kThreads)
    mma_gemm_kernel(LoaderA a, LoaderB b, MmaGeometry g, MmaEpilogue<T> ep, float* partials) {
  uint16_t* const a_smem = reinterpret_cast<uint16_t*>(ptx::dynamic_smem());
  uint16_t* const b_smem = a_smem + kStages * Tile::kAStage;

  const int m0 = int(blockIdx.x) * Tile::kBM, n0 = int(blockIdx.y) * Tile::kBN;
  const int k_begin = int(blockIdx.z) * g.k_per_split;
  const int k_end = min(g.k, k_begin + g.k_per_split);
  const int k_steps = (k_end - k_begin + kBK - 1) / kBK;  // >= 1: the host never launches an empty slice

  const int warp = int(threadIdx.x) / kWarpSize, lane = int(threadIdx.x) % kWarpSize;
  const int wm0 = warp / Tile::kWarpsN * Tile::kWM, wn0 = warp % Tile::kWarpsN * Tile::kWN;

  // The K step `step` into stage `step % kStages`. Past the slice's end the loaders' bounds
  // checks cannot help (the next slice's K is inside the operand), so those steps are skipped.
  auto fill = [&](int step) {
    const int s = step % kStages, k0 = k_begin + step * kBK;
    fill_stage<LoaderA, Tile::kBM, Tile::kThreads>(a, a_smem + s * Tile::kAStage, m0, k0);
    fill_stage<LoaderB, Tile::kBN, Tile::kThreads>(b, b_smem + s * Tile::kBStage, n0, k0);
  };

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
    if (s < k_steps) fill(s);
    ptx::cp_async_commit();
  }

  for (int step = 0; step < k_steps; ++step) {
    // This step's group has landed (for this thread); the barrier makes every thread's
    // copies visible, and also tells that every warp has finished reading step - 1's stage,
    // which the fill below overwrites.
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (step + kStages - 1 < k_steps) fill(step + kStages - 1);
    ptx::cp_async_commit();

    const uint16_t* as = a_smem + step % kStages * Tile::kAStage;
    const uint16_t* bs = b_smem + step % kStages * Tile::kBStage;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[Tile::kMI][4], bf[Tile::kNI][2];
#pragma unroll
      for (int i = 0; i < Tile::kMI; ++i)
        load_a_frag<LoaderA::kContigK, Tile::kBM>(af[i], as, wm0 + i * 16, kk, lane);
#pragma unroll
      for (int j = 0; j < Tile::kNI; j += 2)
        load_b_frags<LoaderB::kContigK, Tile::kBN>(bf[j], bf[j + 1], bs, wn0 + j * 8, kk, lane);
#pragma unroll
      for (int i = 0; i < Tile::kMI; ++i)
#pragma unroll
        for (int j = 0; j < Tile::kNI; ++j) ptx::mma_bf16_16816(acc[i][j], af[i], bf[j]);
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
struct ConvGeom {
  int n, h, w, c, k, r, s, p, q, stride, pad;
  int npq;   // output pixels
  int nhw;   // input pixels
  int taps;  // R*S*C, the length of a filter
  int rsk;   // R*S*K, the backward-data reduction
};

// Index in x of element (pix, tap) of the implicit column matrix, or -1 when the tap falls in
// the padding or the coordinates are outside the matrix.
__device__ __forceinline__ int64_t conv_input_offset(const ConvGeom& g, int pix, int tap) {
  if (pix >= g.npq || tap >= g.taps) return -1;
  const int q = pix % g.q, np = pix / g.q, p = np % g.p, img = np / g.p;
  const int c = tap % g.c, rs = tap / g.c, s = rs % g.s, r = rs / g.s;
  const int h = p * g.stride - g.pad + r, w = q * g.stride - g.pad + s;
  if (h < 0 || h >= g.h || w < 0 || w >= g.w) return -1;
  return ((int64_t(img) * g.h + h) * g.w + w) * g.c + c;
}

// A loader over a gather: Derived::offset(x, k) is the index of element (x, k) in base, or -1
// for a zero. With vec, the layout guarantees (see each loader) that the 8 elements of a chunk
// are adjacent, start 16-byte aligned and are all present or all zero, so the first element's
// offset decides for the whole chunk.
template <class Derived, bool ContigK>
struct GatherLoader {
  static constexpr bool kContigK = ContigK;
  const uint16_t* base;
  bool vec;

  __device__ const uint16_t* chunk(int x, int k, int& bytes) const {
    const int64_t o = static_cast<const Derived&>(*this).offset(x, k);
    bytes = o < 0 ? 0 : 16;
    return o < 0 ? base : base + o;
  }
  __device__ uint16_t elem(int x, int k) const {
    const int64_t o = static_cast<const Derived&>(*this).offset(x, k);
    return o < 0 ? uint16_t(0) : base[o];
  }
};

// Forward A: x(pix, tap). vec needs C % 8 == 0: a chunk is c..c+7 (c % 8 == 0) of one tap.
struct FwdInputLoader : GatherLoader<FwdInputLoader, true> {
  ConvGeom g;
  __device__ int64_t offset(int pix, int tap) const { return conv_input_offset(g, pix, tap); }
};

// Backward-data A: dy(pix, t), t = (r * S + s) * K + k, the output pixel whose window puts
// tap (r, s) on input pixel pix (zero when there is none). vec needs K % 8 == 0.
struct BwdDataGradLoader : GatherLoader<BwdDataGradLoader, true> {
  ConvGeom g;
  __device__ int64_t offset(int pix, int t) const {
    if (pix >= g.nhw || t >= g.rsk) return -1;
    const int w = pix % g.w, nh = pix / g.w, h = nh % g.h, img = nh / g.h;
    const int k = t % g.k, rs = t / g.k, s = rs % g.s, r = rs / g.s;
    const int ph = h + g.pad - r, pw = w + g.pad - s;
    if (ph < 0 || pw < 0 || ph % g.stride != 0 || pw % g.stride != 0) return -1;
    const int p = ph / g.stride, q = pw / g.stride;
    if (p >= g.p || q >= g.q) return -1;
    return ((int64_t(img) * g.p + p) * g.q + q) * g.k + k;
  }
};

// Backward-data B: w[k, r, s, c] as element (c, t), t = (r * S + s) * K + k, contiguous along
// c. vec needs C % 8 == 0.
struct BwdDataWeightLoader : GatherLoader<BwdDataWeightLoader, false> {
  ConvGeom g;
  __device__ int64_t offset(int c, int t) const {
    if (c >= g.c || t >= g.rsk) return -1;
    const int k = t % g.k, rs = t / g.k;
    return (int64_t(k) * g.r * g.s + rs) * g.c + c;
  }
};

// Backward-weight A: x(pix, tap) as element (tap, pix), contiguous along the taps' c.
// vec needs C % 8 == 0.
struct BwdWeightInputLoader : GatherLoader<BwdWeightInputLoader, false> {
  ConvGeom g;
  __device__ int64_t offset(int tap, int pix) const { return conv_input_offset(g, pix, tap); }
};

}  // namespace sp::kernels::cuda::detail::mma
