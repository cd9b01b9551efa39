// bf16 tensor-core GEMM (tensor_core.h): the strided-matrix instance of the main loop in
// mma_mainloop.cuh.
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
      if (n <= 64)
        run_mma_tiles<MmaTileMedium>(la, lb, mi, ni, ki, ep, stream);
      else
        run_mma_tiles<MmaTileLarge>(la, lb, mi, ni, ki, ep, stream);
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
