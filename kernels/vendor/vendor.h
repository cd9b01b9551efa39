// Vendor baselines: the GEMM and the convolutions of kernels/cuda/ops.h computed by NVIDIA's
// libraries (cuBLASLt for the GEMM, cuDNN for the convolutions), for comparison with our own
// kernels. Selected at run time (engine/ops.h: set_kernel_backend); never used by the custom
// kernels. Only built with CUDA.
//
// Contract: identical to the kernels::cuda twin of the same name (same arguments, same
// semantics: row-major GEMM with beta == 0 never reading C and alpha == 0 / K == 0 never
// reading A or B; NHWC activations, KRSC weights, cross-correlation; outputs fully
// overwritten). Every call only enqueues work on `stream` on the current device.
//
// Precision (fp32 ops): full fp32. cuBLASLt runs with CUBLAS_COMPUTE_32F (never the TF32 "fast" compute
// type); cuDNN convolutions are restricted to CUDNN_FMA_MATH algorithms (no tensor-core TF32).
// Should no FMA-only algorithm exist for a shape, the best remaining one is used and a
// one-line warning goes to stderr (set NVIDIA_TF32_OVERRIDE=0 to rule out TF32 entirely).
//
// bf16 ops (the baselines of kernels/cuda/tensor_core.h, same contract): bf16 data, fp32
// compute. cuBLASLt: bf16 A/B, CUBLAS_COMPUTE_32F, fp32 or bf16 C/D, bias (fp32) and ReLU fused
// in its epilogue. cuDNN: the bf16 configuration (x, w, y bf16, fp32 compute), tensor-core
// math allowed. Where cuDNN's types differ from the contract the result is converted with our
// own f32<->bf16 kernels, which costs extra rounding (see vendor.cpp): the forward bias is
// rounded to bf16 and added after y was rounded; dw and dbias come out of cuDNN as bf16 and
// are widened to fp32. The GEMM with alpha == 0 or K == 0 runs our epilogue kernel.
//
// Algorithms: chosen once per (device, shape) by the libraries' heuristics
// (cublasLtMatmulAlgoGetHeuristic, cudnnGetConvolution*Algorithm_v7) and cached together with
// their descriptors in a process-wide, thread-safe cache. Library handles are per host thread
// and per device; cudnnSetStream / the stream argument binds each call to `stream`.
// Workspace: a stream-ordered allocation (cudaMallocAsync / cudaFreeAsync on `stream`) per
// call, from the device's default memory pool, which is told to keep freed memory; so it is
// safe when several streams use the baselines concurrently, and costs no driver allocation
// once the pool is warm.
//
// Determinism: with set_deterministic(true), convolutions only use algorithms that cuDNN
// reports as CUDNN_DETERMINISTIC (bias gradients use cudnnConvolutionBackwardBias, a fixed-order
// reduction). cuBLASLt matmuls are bit-reproducible for a fixed algorithm on a given GPU; the
// algorithm depends on the shape and on the operands' alignment class, which in deterministic
// mode is clamped to {4, 16} bytes so that allocator placement cannot change the choice.
// The switch applies to shapes first seen after it is set (it is part of the cache key).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/shapes.h"

namespace sp::kernels::vendor {

// Process-wide; default false (the libraries' fastest algorithms).
void set_deterministic(bool on);
bool deterministic();

// ---- GEMM (cuBLASLt) -------------------------------------------------------------------------
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, cudaStream_t stream);

// ---- Convolution (cuDNN, NHWC activations, KRSC weights) --------------------------------------
void conv2d_forward(const Conv2dShape& sh, const float* x, const float* w, const float* bias /*nullable*/, float* y,
                    cudaStream_t stream);
void conv2d_backward_data(const Conv2dShape& sh, const float* dy, const float* w, float* dx, cudaStream_t stream,
                          float beta = 0.f);
void conv2d_backward_weight(const Conv2dShape& sh, const float* x, const float* dy, float* dw,
                            float* dbias /*nullable*/, cudaStream_t stream);

// ---- bf16 (cuBLASLt / cuDNN, fp32 compute): same signatures as kernels/cuda/tensor_core.h ------
void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
               int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc,
               const float* bias /*nullable*/, bool relu, cudaStream_t stream);
void gemm_bf16_out_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                        int64_t lda, const uint16_t* b, int64_t ldb, float beta, uint16_t* c, int64_t ldc,
                        const float* bias /*nullable*/, bool relu, cudaStream_t stream);
void conv2d_forward_bf16(const Conv2dShape& sh, const uint16_t* x, const uint16_t* w, const float* bias /*nullable*/,
                         uint16_t* y, cudaStream_t stream);
void conv2d_backward_data_bf16(const Conv2dShape& sh, const uint16_t* dy, const uint16_t* w, uint16_t* dx,
                               cudaStream_t stream, float beta = 0.f);
void conv2d_backward_weight_bf16(const Conv2dShape& sh, const uint16_t* x, const uint16_t* dy, float* dw,
                                 float* dbias /*nullable*/, cudaStream_t stream);

}  // namespace sp::kernels::vendor
