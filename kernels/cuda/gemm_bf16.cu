// bf16 tensor-core GEMM (tensor_core.h): the strided-matrix instance of the main loop in
// mma_mainloop.cuh, one kernel per (transpose pair, tile, C type).
//
// Measured with cuobjdump --dump-resource-usage (CUDA 13.0, sm_90a, -O3), no stack in any
// instance, mma.sync main loop:
//   128 x 128 tile (N > 64)    127-128 registers (capped: 2 blocks per SM), 61,440 B dynamic smem
//   128 x 64 tile  (N <= 64)   171-198 registers,                           46,080 B dynamic smem
// and cuobjdump -sass shows the main loop as HMMA.16816.F32.BF16, LDSM.16.M88.4 (ldmatrix),
// LDSM.16.MT88.4 (ldmatrix .trans), LDGSTS.E.BYPASS.128.ZFILL (cp.async.cg 16 B, zero fill)
// with LDGDEPBAR / DEPBAR.LE (commit_group / wait_group).
#include "kernels/cuda/mma_launch.cuh"
#include "kernels/cuda/tensor_core.h"

namespace sp::kernels::cuda {
namespace {

using namespace detail::mma;

template <typename T>
void gemm_bf16_any(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                   int64_t lda, const uint16_t* b, int64_t ldb, float beta, T* c, int64_t ldc, const float* bias,
                   bool relu, cudaStream_t stream) {
  detail::check_gemm_dims("gemm_bf16", m, n, k);
  const MmaEpilogue<T> ep{c, ldc, 1, alpha, beta, bias, relu};
  const int mi = int(m), ni = int(n), ki = int(k);
  // op(A)(i, k): A is M x K (contiguous along K) or, transposed, K x M (contiguous along M).
  // op(B)(k, j): B is K x N (contiguous along N) or, transposed, N x K (contiguous along K).
  auto with_b = [&](const auto& la) {
    auto go = [&](const auto& lb) {
      run_tensor_core(la, lb, mi, ni, ki, ep, stream, [](int cols, const auto& launch) {
        if (cols <= 64)
          launch(MmaTileMedium{});
        else
          launch(MmaTileLarge{});
      });
    };
    if (trans_b)
      go(MatrixLoader<true>{b, ldb, ni, ki, chunk_ok(b, ldb)});
    else
      go(MatrixLoader<false>{b, ldb, ni, ki, chunk_ok(b, ldb)});
  };
  if (trans_a)
    with_b(MatrixLoader<false>{a, lda, mi, ki, chunk_ok(a, lda)});
  else
    with_b(MatrixLoader<true>{a, lda, mi, ki, chunk_ok(a, lda)});
}

}  // namespace

void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
               int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc, const float* bias,
               bool relu, cudaStream_t stream) {
  gemm_bf16_any<float>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bias, relu, stream);
}

void gemm_bf16_out_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                        int64_t lda, const uint16_t* b, int64_t ldb, float beta, uint16_t* c, int64_t ldc,
                        const float* bias, bool relu, cudaStream_t stream) {
  gemm_bf16_any<uint16_t>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bias, relu, stream);
}

}  // namespace sp::kernels::cuda
