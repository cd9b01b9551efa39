// Checked calls into the CUDA runtime, cuBLAS(Lt), cuDNN and NCCL.
//
// Each macro evaluates the call once; on failure it throws sp::CudaError naming the call text,
// the file and line, the numeric status and the library's own error string.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/common/error.h"

namespace sp::detail {
[[noreturn]] void throw_cuda(const char* lib, const char* call, const char* file, int line, long long code,
                             const char* what);
}  // namespace sp::detail

#define SP_CUDA_CHECK(call)                                                                        \
  do {                                                                                             \
    cudaError_t sp_status_ = (call);                                                               \
    if (sp_status_ != cudaSuccess)                                                                 \
      ::sp::detail::throw_cuda("CUDA", #call, __FILE__, __LINE__, (long long)sp_status_,           \
                               cudaGetErrorString(sp_status_));                                    \
  } while (0)

#define SP_CUBLAS_CHECK(call)                                                                      \
  do {                                                                                             \
    cublasStatus_t sp_status_ = (call);                                                            \
    if (sp_status_ != CUBLAS_STATUS_SUCCESS)                                                       \
      ::sp::detail::throw_cuda("cuBLAS", #call, __FILE__, __LINE__, (long long)sp_status_,         \
                               cublasGetStatusString(sp_status_));                                 \
  } while (0)

#define SP_CUDNN_CHECK(call)                                                                       \
  do {                                                                                             \
    cudnnStatus_t sp_status_ = (call);                                                             \
    if (sp_status_ != CUDNN_STATUS_SUCCESS)                                                        \
      ::sp::detail::throw_cuda("cuDNN", #call, __FILE__, __LINE__, (long long)sp_status_,          \
                               cudnnGetErrorString(sp_status_));                                   \
  } while (0)

#define SP_NCCL_CHECK(call)                                                                        \
  do {                                                                                             \
    ncclResult_t sp_status_ = (call);                                                              \
    if (sp_status_ != ncclSuccess)                                                                 \
      ::sp::detail::throw_cuda("NCCL", #call, __FILE__, __LINE__, (long long)sp_status_,           \
                               ncclGetErrorString(sp_status_));                                    \
  } while (0)
