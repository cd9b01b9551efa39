// Every tile of the warp-specialised TMA main loop (kernels/cuda/wgmma_tma_mainloop.cuh) with
// each A source the library launches it with, and the halo convolution kernel
// (wgmma_halo_mainloop.cuh), instantiated on their own so that ptxas's report
// on them can be checked in seconds (check_ptxas.cmake): no wgmma serialised (C7515), no
// spills. The library's translation units (gemm_bf16.cu, conv_bf16.cu) instantiate the same
// templates, so they compile to the same code.
#include "kernels/cuda/wgmma_halo_mainloop.cuh"
#include "kernels/cuda/wgmma_tma_mainloop.cuh"

namespace sp::kernels::cuda::detail::wgmma {

#define SP_WGMMA_TMA_INSTANCE(TILE, SOURCE, CONTIG_B, T)                                                           \
  template __global__ void wgmma_tma_gemm_kernel<TILE, SOURCE, CONTIG_B, T>(                                      \
      const __grid_constant__ CUtensorMap, const __grid_constant__ CUtensorMap, const __grid_constant__ SOURCE, \
      mma::MmaGeometry, mma::MmaEpilogue<T>, float*);

#define SP_WGMMA_TMA_TILE(TILE)                                   \
  SP_WGMMA_TMA_INSTANCE(TILE, PlainSource<true>, false, uint16_t) \
  SP_WGMMA_TMA_INSTANCE(TILE, PlainSource<false>, true, float)    \
  SP_WGMMA_TMA_INSTANCE(TILE, ConvSource, true, uint16_t)         \
  SP_WGMMA_TMA_INSTANCE(TILE, ConvWgradSource, false, float)

SP_WGMMA_TMA_TILE(WgTmaTile)
SP_WGMMA_TMA_TILE(WgTmaTileNarrow)
SP_WGMMA_TMA_TILE(WgTmaTileWide)
SP_WGMMA_TMA_TILE(WgTmaTileCluster)
SP_WGMMA_TMA_TILE(WgTmaTileWideCluster)

// The halo kernels of the stride-1 convolutions (wgmma_halo_mainloop.cuh), bf16 output: streaming and resident.
template __global__ void wgmma_halo_conv_kernel<WgHaloTile, uint16_t>(const __grid_constant__ CUtensorMap,
                                                                      const __grid_constant__ CUtensorMap,
                                                                      const __grid_constant__ HaloConvSource,
                                                                      mma::MmaGeometry, mma::MmaEpilogue<uint16_t>,
                                                                      int);
template __global__ void wgmma_halo_resident_kernel<WgHaloResidentTile, uint16_t>(
    const __grid_constant__ CUtensorMap, const __grid_constant__ CUtensorMap, const __grid_constant__ HaloConvSource,
    mma::MmaGeometry, mma::MmaEpilogue<uint16_t>, int, int);

}  // namespace sp::kernels::cuda::detail::wgmma
