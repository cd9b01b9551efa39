// The fp32 SIMT GEMM main loop shared by the plain GEMM (gemm.cu) and the implicit-GEMM
// convolutions (conv.cu):
//
//   C[i, j] = epilogue( sum_k  A(i, k) * B(k, j) ),   i < M, j < N, k < K
//
// A and B are not matrices here but *loaders*: small structs that return four elements of
// an operand tile at a time (zero outside the operand). A strided matrix is one loader
// (MatrixLoader below); a convolution's input gathered through its filter window is another
// (conv.cu), which is what makes the convolution an "implicit" GEMM: no im2col buffer.
//
// Hierarchy (TileShape names every level):
//   block tile  kBM x kBN, marching along K in steps of kBK through shared memory, double
//               buffered: while the block multiplies the tile in one buffer, each thread
//               holds the next tile's elements in registers and stores them into the other
//               buffer afterwards, so one __syncthreads per K step suffices;
//   warp tile   kWM x kWN, a kWarpsM x kWarpsN grid of warps covers the block tile;
//   thread tile kTM x kTN accumulators in registers, made of 4x4 fragments. The 32 lanes of
//               a warp form a 4 x 8 grid (8 x 4 for the slim tile); fragment f of a lane sits
//               f * 16 rows (f * 32 columns) further on (32 and 16 on the slim tile), so at
//               each step the lanes of a warp read 16 consecutive floats of A's shared-memory
//               row and 32 of B's (32 and 16 on the slim tile) as float4s: no bank conflicts.
// Shared memory holds both operand tiles K-major (tile[k][x]), so the inner loop reads a
// column of A and a row of B as float4s. Rows are padded by kPad floats: this keeps float4
// alignment and spreads the transposing stores of K-contiguous operands over the banks.
//
// Split K: for a small output (few block tiles) and a long K, grid.z splits K into slices of
// whole kBK steps; each slice writes its raw partial tile to a workspace and a second kernel
// adds the slices in slice order and applies the epilogue. The split depends only on the
// shape, so the result is deterministic.
#pragma once

#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/tile_plan.h"

namespace sp::kernels::cuda::detail {

template <int BM, int BN, int BK, int WarpsM, int WarpsN, int FragsM, int FragsN, int LanesM = 4, int LanesN = 8>
struct TileShape {
  static constexpr int kBM = BM, kBN = BN, kBK = BK;  // block tile and K step
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN;
  static constexpr int kThreads = kWarpSize * kWarpsM * kWarpsN;
  static constexpr int kLanesM = LanesM, kLanesN = LanesN;  // a warp's lanes as a grid (4 x 8 or 8 x 4)
  static constexpr int kFrag = 4;                 // fragments are 4 x 4
  static constexpr int kFragsM = FragsM, kFragsN = FragsN;
  static constexpr int kTM = kFrag * kFragsM, kTN = kFrag * kFragsN;  // thread tile
  static constexpr int kWM = kLanesM * kTM, kWN = kLanesN * kTN;      // warp tile
  static constexpr int kFragStrideM = kLanesM * kFrag;                // rows between fragments
  static constexpr int kFragStrideN = kLanesN * kFrag;                // columns between fragments
  static constexpr int kPad = 4;  // floats of padding per shared-memory row (keeps float4 alignment)

  static_assert(kLanesM * kLanesN == kWarpSize, "a warp is 32 lanes");
  static_assert(kBM == kWarpsM * kWM && kBN == kWarpsN * kWN, "the warps must tile the block tile");
  static_assert(kBK % 4 == 0 && kBM % 4 == 0 && kBN % 4 == 0, "operand tiles load in chunks of 4");
  static_assert(2 * kBK * (kBM + kBN + 2 * kPad) * 4 <= 48 * 1024, "static shared memory is limited to 48 KiB");
};

// 128 x 128 block, 8 warps of 32 x 64, 8 x 8 per thread (64 FMAs per 16 shared-memory
// floats): for GEMMs with N > 64.
using TileLarge = TileShape<128, 128, 8, 4, 2, 2, 2>;
// 128 x 32 block, 4 warps of 32 x 32, 8 x 4 per thread: for N <= 64, where a 128-wide tile
// would mostly compute padding (CIFAR ResNets have 16, 32 and 64 channels).
using TileNarrow = TileShape<128, 32, 8, 4, 1, 2, 1>;
// 256 x 16 block, 4 warps of 64 x 16 with the lanes as an 8 x 4 grid, 8 x 4 per thread: for
// N <= 16 (ResNet-20/56's first stage, the classifier's 10 outputs), where a 32-wide tile would
// spend half its multiply-adds on padding. A warp reads 32 consecutive floats of A's row and
// 16 of B's per fragment step, each float4 shared by the lanes of a row or column: no conflicts.
using TileSlim = TileShape<256, 16, 8, 4, 1, 2, 1, 8, 4>;

// ---- Operand loaders -----------------------------------------------------------------------
// A loader presents an operand as elements (x, k): x runs along M for A and along N for B.
// It provides
//   __device__ bool contiguous_k() const;       whether 4 consecutive elements along K (true)
//                                               or along X (false) are adjacent in memory;
//                                               the same for every thread
//   __device__ float4 load4(int x, int k) const; elements (x, k..k+3) or (x..x+3, k), zero
//                                               where outside the operand
// load4 is only called with the starting coordinate along the contiguous dimension a
// multiple of 4 (tiles start at multiples of kBK and kBM/kBN, chunks at multiples of 4); a
// loader may rely on this for aligned float4 loads.

// A strided matrix: element (x, k) at p[x * ld + k] (contiguous along K) or p[k * ld + x].
struct MatrixLoader {
  const float* p;
  int64_t ld;
  int x_extent, k_extent;
  bool contig_k;
  bool vec;  // float4 loads allowed: p 16-byte aligned and ld % 4 == 0 (checked at launch)

  __device__ bool contiguous_k() const { return contig_k; }
  __device__ float4 load4(int x, int k) const {
    const int outer = contig_k ? x : k, inner = contig_k ? k : x;
    const int outer_extent = contig_k ? x_extent : k_extent, inner_extent = contig_k ? k_extent : x_extent;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (outer >= outer_extent) return v;
    const float* row = p + int64_t(outer) * ld;
    if (vec && inner + 3 < inner_extent) return *reinterpret_cast<const float4*>(row + inner);
    if (inner + 0 < inner_extent) v.x = row[inner + 0];
    if (inner + 1 < inner_extent) v.y = row[inner + 1];
    if (inner + 2 < inner_extent) v.z = row[inner + 2];
    if (inner + 3 < inner_extent) v.w = row[inner + 3];
    return v;
  }
};

// Whether float4 accesses may be used on rows of ld floats starting at p (rows of a matrix,
// or runs of channels): p 16-byte aligned and ld a multiple of 4.
inline bool float4_ok(const void* p, int64_t ld) { return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 4 == 0; }

// ---- Epilogue ------------------------------------------------------------------------------
// C(i, j) = alpha * acc + beta * C(i, j) + bias[j], with C(i, j) at c[i * row_stride +
// j * col_stride] (col_stride != 1 writes a transposed result). beta == 0 never reads C.
struct Epilogue {
  float* c;
  int64_t row_stride, col_stride;
  float alpha, beta;
  const float* bias;  // nullable, indexed by the column j
  bool vec;           // float4 stores allowed: col_stride == 1, row_stride % 4 == 0, c 16-byte aligned

  __device__ void apply(int i, int j, float acc) const {
    float* out = c + int64_t(i) * row_stride + int64_t(j) * col_stride;
    float v = alpha * acc;
    if (beta != 0.f) v += beta * *out;
    if (bias) v += bias[j];
    *out = v;
  }
  // Columns j..j+3 of row i (j a multiple of 4), those below n only.
  __device__ void apply4(int i, int j, int n, const float* acc) const {
    if (!(vec && j + 3 < n)) {
      for (int t = 0; t < 4 && j + t < n; ++t) apply(i, j + t, acc[t]);
      return;
    }
    float4* out = reinterpret_cast<float4*>(c + int64_t(i) * row_stride + j);
    float4 v = make_float4(alpha * acc[0], alpha * acc[1], alpha * acc[2], alpha * acc[3]);
    if (beta != 0.f) {
      const float4 old = *out;
      v.x += beta * old.x, v.y += beta * old.y, v.z += beta * old.z, v.w += beta * old.w;
    }
    if (bias) v.x += bias[j], v.y += bias[j + 1], v.z += bias[j + 2], v.w += bias[j + 3];
    *out = v;
  }
};

// Epilogue writing C (row-major, leading dimension ldc) with the alignment check for float4 stores.
inline Epilogue row_major_epilogue(float* c, int64_t ldc, float alpha, float beta, const float* bias) {
  return Epilogue{c, ldc, 1, alpha, beta, bias, float4_ok(c, ldc)};
}

// M, N and K are int inside the kernels; this bound also keeps K rounded up to a K step in range.
constexpr int64_t kMaxGemmDim = int64_t(1) << 30;
inline void check_gemm_dims(const char* op, int64_t m, int64_t n, int64_t k) {
  SP_CHECK(m >= 0 && n >= 0 && k >= 0 && m <= kMaxGemmDim && n <= kMaxGemmDim && k <= kMaxGemmDim, op,
           ": unsupported GEMM size ", m, " x ", n, " x ", k);
}

struct GemmGeometry {
  int m, n, k;
  int k_per_split;  // K slice of each blockIdx.z, a multiple of kBK
};

// ---- Operand tile: global -> registers -> shared memory ------------------------------------
// A kX x kBK tile is cut into kX * kBK / 4 chunks of 4 elements adjacent in memory; thread t
// takes chunks t, t + kThreads, ...
template <int kX, int kBK, int kThreads, int kPad>
struct TileFetch {
  static constexpr int kChunks = kX * kBK / 4;
  static constexpr int kPerThread = (kChunks + kThreads - 1) / kThreads;
  float4 reg[kPerThread];

  __device__ static bool has_chunk(int i) {
    return kChunks % kThreads == 0 || int(threadIdx.x) + i * kThreads < kChunks;
  }
  // Tile coordinates (x, k) of the first element of chunk i of this thread.
  __device__ static void coords(bool contig_k, int i, int& x, int& k) {
    const int chunk = int(threadIdx.x) + i * kThreads;
    if (contig_k) {
      x = chunk / (kBK / 4), k = chunk % (kBK / 4) * 4;
    } else {
      k = chunk / (kX / 4), x = chunk % (kX / 4) * 4;
    }
  }

  template <class Loader>
  __device__ void load(const Loader& ld, int x0, int k0) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (!has_chunk(i)) continue;
      int x, k;
      coords(ld.contiguous_k(), i, x, k);
      reg[i] = ld.load4(x0 + x, k0 + k);
    }
  }

  __device__ void store(bool contig_k, float (*tile)[kX + kPad]) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (!has_chunk(i)) continue;
      int x, k;
      coords(contig_k, i, x, k);
      if (contig_k) {  // transpose into the K-major tile
        tile[k + 0][x] = reg[i].x;
        tile[k + 1][x] = reg[i].y;
        tile[k + 2][x] = reg[i].z;
        tile[k + 3][x] = reg[i].w;
      } else {
        *reinterpret_cast<float4*>(&tile[k][x]) = reg[i];
      }
    }
  }
};

// ---- The kernel ----------------------------------------------------------------------------
// grid = (M tiles, N tiles, K slices). With partials == nullptr (one slice) the epilogue
// writes C; otherwise slice z writes its raw sums to partials[z][M][N] (row-major) and
// splitk_reduce (gemm.cu) finishes.
template <class Tile, class LoaderA, class LoaderB>
__global__ void __launch_bounds__(Tile::kThreads)
    gemm_tile_kernel(LoaderA a, LoaderB b, GemmGeometry g, Epilogue ep, float* partials) {
  pdl_prologue();
  constexpr int BM = Tile::kBM, BN = Tile::kBN, BK = Tile::kBK, PAD = Tile::kPad;
  __shared__ __align__(16) float a_tile[2][BK][BM + PAD];
  __shared__ __align__(16) float b_tile[2][BK][BN + PAD];

  const int m0 = int(blockIdx.x) * BM, n0 = int(blockIdx.y) * BN;
  const int k_begin = int(blockIdx.z) * g.k_per_split;
  const int k_end = min(g.k, k_begin + g.k_per_split);
  const int k_steps = (k_end - k_begin + BK - 1) / BK;  // >= 1: the host never launches an empty slice

  const int warp = int(threadIdx.x) / kWarpSize, lane = int(threadIdx.x) % kWarpSize;
  const int row0 = warp / Tile::kWarpsN * Tile::kWM + lane / Tile::kLanesN * Tile::kFrag;
  const int col0 = warp % Tile::kWarpsN * Tile::kWN + lane % Tile::kLanesN * Tile::kFrag;

  TileFetch<BM, BK, Tile::kThreads, PAD> fetch_a;
  TileFetch<BN, BK, Tile::kThreads, PAD> fetch_b;
  fetch_a.load(a, m0, k_begin);
  fetch_b.load(b, n0, k_begin);
  fetch_a.store(a.contiguous_k(), a_tile[0]);
  fetch_b.store(b.contiguous_k(), b_tile[0]);
  __syncthreads();

  float acc[Tile::kTM][Tile::kTN] = {};
  for (int step = 0; step < k_steps; ++step) {
    const int cur = step & 1;
    const bool more = step + 1 < k_steps;
    // Issue the next tile's global loads first; their latency hides behind the FMAs below.
    if (more) {
      fetch_a.load(a, m0, k_begin + (step + 1) * BK);
      fetch_b.load(b, n0, k_begin + (step + 1) * BK);
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float ra[Tile::kTM], rb[Tile::kTN];
#pragma unroll
      for (int f = 0; f < Tile::kFragsM; ++f) {
        const float4 v = *reinterpret_cast<const float4*>(&a_tile[cur][kk][row0 + f * Tile::kFragStrideM]);
        ra[4 * f + 0] = v.x, ra[4 * f + 1] = v.y, ra[4 * f + 2] = v.z, ra[4 * f + 3] = v.w;
      }
#pragma unroll
      for (int f = 0; f < Tile::kFragsN; ++f) {
        const float4 v = *reinterpret_cast<const float4*>(&b_tile[cur][kk][col0 + f * Tile::kFragStrideN]);
        rb[4 * f + 0] = v.x, rb[4 * f + 1] = v.y, rb[4 * f + 2] = v.z, rb[4 * f + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < Tile::kTM; ++i)
#pragma unroll
        for (int j = 0; j < Tile::kTN; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
    }
    // The other buffer was last read in the previous step, which every thread has finished
    // (the barrier that ended it); this step's barrier publishes the stores to the next one.
    if (more) {
      fetch_a.store(a.contiguous_k(), a_tile[cur ^ 1]);
      fetch_b.store(b.contiguous_k(), b_tile[cur ^ 1]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int fm = 0; fm < Tile::kFragsM; ++fm)
#pragma unroll
    for (int i = 0; i < Tile::kFrag; ++i) {
      const int row = m0 + row0 + fm * Tile::kFragStrideM + i;
      if (row >= g.m) continue;
#pragma unroll
      for (int fn = 0; fn < Tile::kFragsN; ++fn) {
        const int col = n0 + col0 + fn * Tile::kFragStrideN;
        if (col >= g.n) continue;
        const float* v = &acc[fm * Tile::kFrag + i][fn * Tile::kFrag];
        if (partials == nullptr) {
          ep.apply4(row, col, g.n, v);
        } else {
          float* out = partials + (int64_t(blockIdx.z) * g.m + row) * g.n + col;
          for (int t = 0; t < Tile::kFrag && col + t < g.n; ++t) out[t] = v[t];
        }
      }
    }
}

// ---- Host side -----------------------------------------------------------------------------
// The K split for an output of `tiles` block tiles: plan_split_k (tile_plan.h, shape only), by
// the target rule unless STALEPROP_SPLIT_MAX_BLOCKS says otherwise.
// gemm.cu: C = epilogue(sum over the slices of partials[z][M][N]); with splits == 0 it writes
// epilogue(0), the whole result when alpha == 0 or K == 0.
void splitk_reduce(const float* partials, int splits, int m, int n, const Epilogue& ep, cudaStream_t stream);

// Runs C = epilogue(A * B) for M x N x K through loaders a and b with tile shape Tile.
template <class Tile, class LoaderA, class LoaderB>
void run_gemm_tiles(const LoaderA& a, const LoaderB& b, int m, int n, int k, const Epilogue& ep, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  if (k == 0 || ep.alpha == 0.f) {
    splitk_reduce(nullptr, 0, m, n, ep, stream);
    return;
  }
  const int64_t m_tiles = ceil_div(m, Tile::kBM), n_tiles = ceil_div(n, Tile::kBN);
  SP_CHECK(n_tiles <= 65535, "gemm: N = ", n, " needs ", n_tiles, " column tiles, more than grid.y allows");
  const SplitPlan plan = plan_split_k(m_tiles * n_tiles, k, Tile::kBK, split_max_blocks(0));
  const dim3 grid(unsigned(m_tiles), unsigned(n_tiles), unsigned(plan.splits));
  const GemmGeometry g{m, n, k, plan.k_per_split};
  auto* kernel = &gemm_tile_kernel<Tile, LoaderA, LoaderB>;
  if (plan.splits == 1) {
    launch_kernel(kernel, grid, Tile::kThreads, 0, stream, a, b, g, ep, nullptr);
    return;
  }
  Workspace partials(sizeof(float) * size_t(plan.splits) * size_t(m) * size_t(n), stream);
  launch_kernel(kernel, grid, Tile::kThreads, 0, stream, a, b, g, ep, partials.as<float>());
  splitk_reduce(partials.as<float>(), plan.splits, m, n, ep, stream);
}

// The tile shape for an output N columns wide.
template <class Fn>
void with_tile_for(int n, const Fn& fn) {
  if (n <= 16)
    fn(TileSlim{});
  else if (n <= 64)
    fn(TileNarrow{});
  else
    fn(TileLarge{});
}

}  // namespace sp::kernels::cuda::detail
