// fp32 GEMM on CUDA cores: the strided-matrix instance of the main loop in gemm_mainloop.cuh,
// plus the split-K reduction that the convolutions share (the split itself: tile_plan.h).
#include "kernels/cuda/gemm_mainloop.cuh"
#include "kernels/cuda/ops.h"

namespace sp::kernels::cuda {
namespace detail {
namespace {

__global__ void splitk_reduce_kernel(const float* partials, int splits, int m, int n, Epilogue ep) {
  pdl_prologue();
  const int64_t total = int64_t(m) * n;
  for (int64_t idx = global_thread_index(); idx < total; idx += grid_stride()) {
    float sum = 0.f;
    for (int z = 0; z < splits; ++z) sum += partials[z * total + idx];
    ep.apply(int(idx / n), int(idx % n), sum);
  }
}

}  // namespace

void splitk_reduce(const float* partials, int splits, int m, int n, const Epilogue& ep, cudaStream_t stream) {
  const int64_t total = int64_t(m) * n;
  if (total == 0) return;
  launch_kernel(splitk_reduce_kernel, element_blocks(total), kElementThreads, 0, stream, partials, splits, m, n, ep);
}

void gemm_bias(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const float* bias, cudaStream_t stream) {
  check_gemm_dims("gemm", m, n, k);
  // op(A)(i, k): A is M x K (contiguous along K) or, transposed, K x M (contiguous along M).
  const MatrixLoader la{a, lda, int(m), int(k), !trans_a, float4_ok(a, lda)};
  // op(B)(k, j): B is K x N (contiguous along N) or, transposed, N x K (contiguous along K).
  const MatrixLoader lb{b, ldb, int(n), int(k), trans_b, float4_ok(b, ldb)};
  const Epilogue ep = row_major_epilogue(c, ldc, alpha, beta, bias);
  with_tile_for(int(n), [&](auto tile) { run_gemm_tiles<decltype(tile)>(la, lb, int(m), int(n), int(k), ep, stream); });
}

}  // namespace detail

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, cudaStream_t stream) {
  detail::gemm_bias(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nullptr, stream);
}

}  // namespace sp::kernels::cuda
