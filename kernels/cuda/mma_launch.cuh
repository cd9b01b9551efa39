// Host side of the bf16 tensor-core main loops (mma_mainloop.cuh, wgmma_mainloop.cuh): the
// deterministic split-K plan (the fp32 GEMM's, gemm.cu), the launch, the choice of main loop,
// the kernel that adds the split-K partials in slice order and applies the epilogue, and the
// entry points the bf16 kernel files share.
// Everything that launches a kernel lives here or in a .cu file, none of it in
// mma_mainloop.cuh, whose device code is plain enough to compile for a host emulation.
#pragma once

#include <atomic>
#include <type_traits>

#include "kernels/cuda/gemm_mainloop.cuh"
#include "kernels/cuda/mma_mainloop.cuh"
#include "kernels/cuda/tensor_core.h"
#include "kernels/cuda/wgmma_halo_mainloop.cuh"
#include "kernels/cuda/wgmma_mainloop.cuh"
#include "kernels/cuda/wgmma_tma_mainloop.cuh"

namespace sp::kernels::cuda::detail::mma {

// C = epilogue(sum over z < splits of partials[z][M][N]), the slices added in order; with
// splits == 0 it writes epilogue(0) (alpha == 0 or K == 0).
template <typename T>
__global__ void mma_splitk_reduce_kernel(const float* partials, int splits, int m, int n, MmaEpilogue<T> ep) {
  pdl_prologue();
  const int64_t total = int64_t(m) * n;
  for (int64_t idx = global_thread_index(); idx < total; idx += grid_stride()) {
    float sum = 0.f;
    for (int z = 0; z < splits; ++z) sum += partials[z * total + idx];
    ep.apply(int(idx / n), int(idx % n), sum);
  }
}

template <typename T>
void mma_splitk_reduce(const float* partials, int splits, int m, int n, const MmaEpilogue<T>& ep,
                       cudaStream_t stream) {
  const int64_t total = int64_t(m) * n;
  if (total == 0) return;
  launch_kernel(mma_splitk_reduce_kernel<T>, element_blocks(total), kElementThreads, 0, stream, partials, splits, m, n,
                ep);
}

// Whether the wgmma main loop is selected (tensor_core.h); throws where it was selected but
// cannot run. use_wgmma_tma(), asked only after use_wgmma() said yes: whether the selection is
// wgmma_tma or auto (the GEMM of two TMA-addressable matrices then takes the TMA kernel).
// Defined in tensor_core_select.cu.
bool use_wgmma();
bool use_wgmma_tma();
// tma_launches()'s counters (tensor_core.h).
void count_conv_tma_launch();
void count_wide_tma_launch();
void count_cluster_tma_launch();
void count_class_direct_launch();  // dgrad_class_direct_launches() (tensor_core.h)
void count_transposed_filter();    // dgrad_transposed_filters() (tensor_core.h)
void count_persistent_tma_launch();
void count_halo_launch();           // conv_halo_launches() (tensor_core.h)
void count_halo_resident_launch();  // conv_halo_resident_launches()
int sm_count(int device);  // the device's SMs (asked once per device)
// The TMA descriptor of a bf16 matrix at p (16-byte aligned) shaped as `shape` says, with the
// 128-byte swizzle and zero fill outside it. Throws sp::Error where the driver refuses.
CUtensorMap encode_tensor_map_bf16(const void* p, const wgmma::TmaMapShape& shape);
// The same for a 4-D map (a convolution's NHWC source, conv_tma.h).
CUtensorMap encode_tensor_map_4d_bf16(const void* p, const wgmma::TmaMap4d& shape);

// Whether the cp.async path may read rows of ld bf16 starting at p: p 16-byte aligned, ld % 8 == 0.
inline bool chunk_ok(const void* p, int64_t ld) { return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 8 == 0; }

// Tile::kCluster where the tile has one (the wgmma_tma tiles), else 1.
template <class Tile, class = void>
struct TileCluster : std::integral_constant<int, 1> {};
template <class Tile>
struct TileCluster<Tile, std::void_t<decltype(Tile::kCluster)>> : std::integral_constant<int, Tile::kCluster> {};

template <class Tile, class = void>
struct RebalancesRegisters : std::false_type {};
template <class Tile>
struct RebalancesRegisters<Tile, std::void_t<decltype(Tile::kProducerRegs)>>
    : std::bool_constant<(Tile::kProducerRegs > 0)> {};

// A tile whose warpgroups rebalance registers (setmaxnreg) needs every thread to start with the
// registers the consumers' increase takes from the pool: with fewer, that increase would wait
// forever, and the launch hang. ptxas 13 gives the 128 x 256 tile's instances exactly
// 3 x 168 / 3 = 168 (-Xptxas -v); another compiler or flags might not, which fails here instead.
template <class Tile, class Kernel>
void check_register_rebalance(Kernel kernel) {
  if constexpr (RebalancesRegisters<Tile>::value) {
    cudaFuncAttributes attr{};
    SP_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    // Registers are allocated to a thread in multiples of 8: what it starts with is numRegs so rounded.
    const int need = (Tile::kProducerRegs + 2 * Tile::kConsumerRegs + 2) / 3, have = (attr.numRegs + 7) / 8 * 8;
    SP_CHECK(have >= need, "wgmma_tma: the ", Tile::kBM, " x ", Tile::kBN, " TMA tile was compiled with ", attr.numRegs,
             " registers per thread, but its setmaxnreg rebalancing (", Tile::kProducerRegs, " / ", Tile::kConsumerRegs,
             ") needs ", need,
             " at launch, or the launch would hang; set STALEPROP_TMA_WIDE=0 and STALEPROP_TMA_WIDE_BY_SHAPE=0");
  } else {
    (void)kernel;
  }
}

// Lets Kernel take `bytes` of dynamic shared memory (more than 48 KiB needs the opt-in), with
// all of L1 as shared memory where it helps, once per kernel and device; on that first call
// also runs first_use() (a check that throws leaves the device to be asked again).
template <auto Kernel, class FirstUse>
void opt_in_shared_memory(int bytes, const FirstUse& first_use) {
  static std::atomic<uint64_t> opted_in{0};  // bit d: done on device d (devices >= 64 always ask)
  int device = 0;
  SP_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if ((opted_in.load(std::memory_order_relaxed) & bit) == 0 || bit == 0) {
    SP_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    SP_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                       int(cudaSharedmemCarveoutMaxShared)));
    first_use();
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
}
template <auto Kernel>
void opt_in_shared_memory(int bytes) {
  opt_in_shared_memory<Kernel>(bytes, [] {});
}

// Runs C = epilogue(A * B) for M x N x K: Kernel(operands..., geometry, ep, partials) on
// Tile::kBM x Tile::kBN tiles, K split in multiples of Tile::kBK where the output has few tiles.
// The operands are the loaders (mma_gemm_kernel, wgmma::wgmma_gemm_kernel) or the TMA maps
// (wgmma::wgmma_tma_gemm_kernel). kPersistent: the kernel takes a grid of fewer blocks than
// tiles (wgmma_tma_gemm_kernel), which it gets where tma_persistent() is on, the tile is not
// clustered and the tiles outnumber the blocks the SMs hold (Tile::kMinBlocks each).
template <class Tile, auto Kernel, bool kPersistent = false, typename T, class... Operands>
void launch_tiles_of(int m, int n, int k, const MmaEpilogue<T>& ep, cudaStream_t stream, const Operands&... operands) {
  if (m == 0 || n == 0) return;
  if (k == 0 || ep.alpha == 0.f) {
    mma_splitk_reduce<T>(nullptr, 0, m, n, ep, stream);
    return;
  }
  const int64_t m_tiles = ceil_div(m, Tile::kBM), n_tiles = ceil_div(n, Tile::kBN);
  SP_CHECK(n_tiles <= 65535, "gemm_bf16: N = ", n, " needs ", n_tiles, " column tiles, more than grid.y allows");
  // At most one wave of the tile's blocks by default (kTensorCoreSplitMaxBlocks per block an SM holds).
  const SplitPlan plan = plan_split_k(m_tiles * n_tiles, k, Tile::kBK, tensor_core_split_cap(Tile::kMinBlocks));
  dim3 grid(unsigned(m_tiles), unsigned(n_tiles), unsigned(plan.splits));
  MmaGeometry g{m, n, k, plan.k_per_split};
  if constexpr (kPersistent) g.l2_prefetch = tma_l2_prefetch() ? 1 : 0;  // the TMA kernel's producer
  // All of L1 as shared memory where it helps, so the tiles' blocks per SM (kMinBlocks) fit.
  opt_in_shared_memory<Kernel>(Tile::kSmemBytes, [] { check_register_rebalance<Tile>(Kernel); });
  if constexpr (kPersistent) {
    // The kernel numbers its tiles in 32 bits (tile_plan.h, tile_work).
    const int64_t tiles = m_tiles * n_tiles * plan.splits;
    SP_CHECK(tiles < (int64_t(1) << 30), "gemm_bf16: ", m, " x ", n, " x ", k, " needs ", tiles,
             " tiles, more than the TMA kernel numbers");
    if (TileCluster<Tile>::value == 1 && tma_persistent()) {
      int device = 0;
      SP_CUDA_CHECK(cudaGetDevice(&device));
      const int64_t resident = int64_t(sm_count(device)) * Tile::kMinBlocks;
      if (tiles > resident) {
        grid = dim3(unsigned(resident), 1, 1);
        count_persistent_tma_launch();
      }
    }
  }
  const auto go = [&](float* partials) {
    if constexpr (TileCluster<Tile>::value > 1) {
      SP_CHECK(m_tiles % TileCluster<Tile>::value == 0, "a clustered tile needs whole clusters of row tiles, not ",
               m_tiles);
      launch_kernel_in_clusters(Kernel, grid, Tile::kThreads, Tile::kSmemBytes, stream,
                                unsigned(TileCluster<Tile>::value), operands..., g, ep, partials);
    } else {
      launch_kernel(Kernel, grid, Tile::kThreads, Tile::kSmemBytes, stream, operands..., g, ep, partials);
    }
  };
  if (plan.splits == 1) {
    go(nullptr);
    return;
  }
  Workspace partials(sizeof(float) * size_t(plan.splits) * size_t(m) * size_t(n), stream);
  go(partials.as<float>());
  mma_splitk_reduce<T>(partials.as<float>(), plan.splits, m, n, ep, stream);
}

// launch_tiles_of with the loaders as the operands.
template <class Tile, auto Kernel, class LoaderA, class LoaderB, typename T>
void launch_tiles(const LoaderA& a, const LoaderB& b, int m, int n, int k, const MmaEpilogue<T>& ep,
                  cudaStream_t stream) {
  launch_tiles_of<Tile, Kernel>(m, n, k, ep, stream, a, b);
}

template <class Loader>
struct IsMatrixLoader : std::false_type {};
template <bool ContigK>
struct IsMatrixLoader<MatrixLoader<ContigK>> : std::true_type {};

// Whether the 128 x 256 tile runs an M x N x K product: where N fills it (wide_tile_width) and
// tma_wide_tile() is on, or tma_wide_by_shape() is and the shape's rule takes it (wide_tile_pays,
// tile_plan.h).
inline bool wide_tile_for(int m, int n, int k) {
  return wide_tile_width(n) && (tma_wide_tile() || (tma_wide_by_shape() && wide_tile_pays(m, n, k)));
}

// B's tensor map for Tile: the whole stage's boxes, or in a cluster each block's part of them
// (TmaStage::part_map_shape).
template <class Tile, bool ContigB>
CUtensorMap b_operand_map(const MatrixLoader<ContigB>& b) {
  using Stage = wgmma::TmaStage<Tile::kBN>;
  if constexpr (Tile::kCluster > 1)
    return encode_tensor_map_bf16(
        b.p, Stage::template part_map_shape<ContigB, Tile::kCluster>(b.x_extent, b.k_extent, b.ld));
  else
    return encode_tensor_map_bf16(b.p, Stage::template map_shape<ContigB>(b.x_extent, b.k_extent, b.ld));
}

// Whether an M-row product runs in clusters of two (tma_cluster() on, an even number of row tiles).
inline bool cluster_for(int m) { return tma_cluster() && ceil_div(m, wgmma::WgTmaTile::kBM) % 2 == 0; }

// Launches `launch` with the tile wide_tile_for and cluster_for choose for an M x N x K product
// (128 x 256 or 128 x 128, in clusters of two or not), and counts the launch.
template <class Launch>
void with_tma_tile(int m, int n, int k, const Launch& launch) {
  const bool wide = wide_tile_for(m, n, k), cluster = cluster_for(m);
  if (wide && cluster)
    launch(wgmma::WgTmaTileWideCluster{});
  else if (wide)
    launch(wgmma::WgTmaTileWide{});
  else if (cluster)
    launch(wgmma::WgTmaTileCluster{});
  else
    launch(wgmma::WgTmaTile{});
  if (wide) count_wide_tma_launch();
  if (cluster) count_cluster_tma_launch();
}

// The wgmma_tma kernel on two plain matrices (both with vec set: TMA-addressable), M, N, K > 0:
// on the tile with_tma_tile chooses (128 x 256 where wide_tile_for(M, N, K), else 128 x 128; in
// clusters of two where cluster_for(M)).
template <bool ContigA, bool ContigB, typename T>
void run_wgmma_tma(const MatrixLoader<ContigA>& a, const MatrixLoader<ContigB>& b, int m, int n, int k,
                   const MmaEpilogue<T>& ep, cudaStream_t stream) {
  with_tma_tile(m, n, k, [&](auto tile) {
    using Tile = decltype(tile);
    const CUtensorMap map_a = encode_tensor_map_bf16(
        a.p, wgmma::TmaStage<Tile::kBM>::template map_shape<ContigA>(a.x_extent, a.k_extent, a.ld));
    const CUtensorMap map_b = b_operand_map<Tile>(b);
    launch_tiles_of<Tile, &wgmma::wgmma_tma_gemm_kernel<Tile, wgmma::PlainSource<ContigA>, ContigB, T>, true>(
        m, n, k, ep, stream, map_a, map_b, wgmma::PlainSource<ContigA>{});
  });
}

// A convolution's implicit GEMM on the wgmma_tma kernel: A from `src` (16-byte aligned) through
// `source` (wgmma::ConvSource or ConvWgradSource) on the 4-D `map` (conv_tma.h), B a plain
// matrix with vec set. M, N, K > 0 (ConvSource: K a multiple of kBK, one tap per step). The
// 128 x 64 tile where N <= 64, else the tile with_tma_tile chooses.
template <class Source, bool ContigB, typename T>
void run_wgmma_tma_conv(const Source& source, const wgmma::TmaMap4d& map, const uint16_t* src,
                        const MatrixLoader<ContigB>& b, int m, int n, int k, const MmaEpilogue<T>& ep,
                        cudaStream_t stream) {
  const CUtensorMap map_a = encode_tensor_map_4d_bf16(src, map);
  const auto launch = [&](auto tile) {
    using Tile = decltype(tile);
    const CUtensorMap map_b = b_operand_map<Tile>(b);
    launch_tiles_of<Tile, &wgmma::wgmma_tma_gemm_kernel<Tile, Source, ContigB, T>, true>(m, n, k, ep, stream, map_a,
                                                                                         map_b, source);
  };
  if (n <= 64)
    launch(wgmma::WgTmaTileNarrow{});
  else
    with_tma_tile(m, n, k, launch);
  count_conv_tma_launch();
}

// Whether the TMA convolution (run_wgmma_tma_conv) of an M x N x K product would run without a
// split of K: on its tile (128 x 64 for N <= 64, else with_tma_tile's width; clusters do not
// change the split), plan_split_k's split is 1.
inline bool tma_conv_unsplit(int m, int n, int k) {
  const auto splits = [&](auto tile) {
    using Tile = decltype(tile);
    return plan_split_k(ceil_div(m, Tile::kBM) * ceil_div(n, Tile::kBN), k, Tile::kBK,
                        tensor_core_split_cap(Tile::kMinBlocks))
        .splits;
  };
  if (n <= 64) return splits(wgmma::WgTmaTileNarrow{}) == 1;
  if (wide_tile_for(m, n, k)) return splits(wgmma::WgTmaTileWide{}) == 1;
  return splits(wgmma::WgTmaTile{}) == 1;
}

// The halo convolution (wgmma_halo_mainloop.cuh) of `plan` (ok) over `src` (16-byte aligned): the
// output's `rows` rows (n * P * Q) x N columns, K = taps x source channels, B a plain K-contiguous
// matrix with vec set. No split of K. The resident form where halo_resident() is on, the plan's
// filter and patch ring fit a block's shared memory and there are enough tiles per SM
// (conv_halo.h: halo_resident_fits, halo_resident_pays; a persistent block per SM); else the
// streaming kernel, a block per tile.
template <typename T>
void run_wgmma_halo_conv(const wgmma::HaloConvPlan& plan, const uint16_t* src, const MatrixLoader<true>& b,
                         int64_t rows, int n, int k, const MmaEpilogue<T>& ep, cudaStream_t stream) {
  using Tile = wgmma::WgHaloTile;
  using Resident = wgmma::WgHaloResidentTile;
  static_assert(Tile::kBN == Resident::kBN, "one B map serves both forms");
  const int64_t n_tiles = ceil_div(n, Tile::kBN);
  SP_CHECK(plan.ok && plan.src.chunks <= Tile::kMaxChunks && plan.tiles < (int64_t(1) << 31) && n_tiles <= 65535 &&
               rows < (int64_t(1) << 31),
           "conv (halo): ", plan.tiles, " x ", n_tiles, " tiles are past the grid");
  const CUtensorMap map_a = encode_tensor_map_4d_bf16(src, plan.map);
  const CUtensorMap map_b = b_operand_map<Tile>(b);
  const MmaGeometry g{int(rows), n, k, k};
  const int desc_phase = halo_desc_phase() ? 1 : 0;
  int device = 0;
  SP_CUDA_CHECK(cudaGetDevice(&device));
  const int64_t sms = sm_count(device);
  if (halo_resident() && Resident::fits(plan.src) && wgmma::halo_resident_pays(plan.tiles, sms)) {
    constexpr auto kernel = &wgmma::wgmma_halo_resident_kernel<Resident, T>;
    opt_in_shared_memory<kernel>(227 * 1024);
    launch_kernel(kernel, dim3(unsigned(sms), unsigned(n_tiles), 1), Resident::kThreads,
                  size_t(Resident::smem_bytes(plan.src)), stream, map_a, map_b, plan.src, g, ep, int(plan.tiles),
                  desc_phase);
    count_halo_resident_launch();
  } else {
    constexpr auto kernel = &wgmma::wgmma_halo_conv_kernel<Tile, T>;
    const int64_t smem = int64_t(plan.src.patch_bytes) * plan.src.chunks + Tile::kFixedSmemBytes;
    SP_CHECK(smem <= 227 * 1024, "conv (halo): ", smem, " bytes of shared memory");
    opt_in_shared_memory<kernel>(227 * 1024);
    launch_kernel(kernel, dim3(unsigned(plan.tiles), unsigned(n_tiles), 1), Tile::kThreads, size_t(smem), stream, map_a,
                  map_b, plan.src, g, ep, desc_phase);
  }
  count_halo_launch();
}

// The mma.sync main loop on Tile.
template <class Tile, class LoaderA, class LoaderB, typename T>
void run_mma_tiles(const LoaderA& a, const LoaderB& b, int m, int n, int k, const MmaEpilogue<T>& ep,
                   cudaStream_t stream) {
  launch_tiles<Tile, &mma_gemm_kernel<Tile, LoaderA, LoaderB, T>>(a, b, m, n, k, ep, stream);
}

// The bf16 GEMM view C = epilogue(A * B) on the main loop tensor_core.h selects: wgmma where it
// was chosen (its tile by N; with wgmma_tma, the TMA kernel for two plain matrices TMA can
// address and N > 64), otherwise mma.sync on the tile `mma_tile` gives for N (a callable taking
// a tile tag and the launch).
template <class LoaderA, class LoaderB, typename T, class MmaTileFor>
void run_tensor_core(const LoaderA& a, const LoaderB& b, int m, int n, int k, const MmaEpilogue<T>& ep,
                     cudaStream_t stream, const MmaTileFor& mma_tile) {
  if (use_wgmma()) {
    if constexpr (IsMatrixLoader<LoaderA>::value && IsMatrixLoader<LoaderB>::value) {
      if (use_wgmma_tma() && n > 64 && m > 0 && k > 0 && ep.alpha != 0.f && a.vec && b.vec) {
        run_wgmma_tma(a, b, m, n, k, ep, stream);
        return;
      }
    }
    if (n <= 64)
      launch_tiles<wgmma::WgTileNarrow, &wgmma::wgmma_gemm_kernel<wgmma::WgTileNarrow, LoaderA, LoaderB, T>>(
          a, b, m, n, k, ep, stream);
    else
      launch_tiles<wgmma::WgTileWide, &wgmma::wgmma_gemm_kernel<wgmma::WgTileWide, LoaderA, LoaderB, T>>(
          a, b, m, n, k, ep, stream);
    return;
  }
  mma_tile(n, [&](auto tile) { run_mma_tiles<decltype(tile)>(a, b, m, n, k, ep, stream); });
}

}  // namespace sp::kernels::cuda::detail::mma
