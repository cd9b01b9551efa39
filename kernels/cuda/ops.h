// CUDA kernels: the twin of every CPU reference kernel (kernels/cpu/ops.h), in fp32.
//
// Each function mirrors its CPU reference one for one (same name, same arguments in the same
// order, same semantics: see kernels/cpu/ops.h for the formulas) and adds a trailing stream.
// All pointers are device pointers; the call only enqueues work on `stream` and returns, so
// inputs must stay alive and outputs must not be read until the stream's work is ordered.
// Launch-configuration errors throw sp::CudaError at the call site.
//
// Determinism: no float atomics anywhere. Every reduction (GEMM/convolution split-K, batch
// statistics, bias gradients, the loss) runs in an order fixed by the shape alone, so the same
// inputs give bit-identical outputs on every run.
//
// Differences from the CPU reference, all deliberate:
//   * GEMM and convolutions accumulate in a different order (and convolutions never form an
//     im2col buffer): results agree to rounding, not bit for bit.
//   * softmax_cross_entropy writes the hit count as int32 to device memory, and a label
//     outside [0, classes) cannot throw from a kernel: that sample's loss term and dlogits row
//     become NaN (so the batch loss is NaN) and it counts as a miss.
//   * sgd_step takes the non-template SgdTensor below.
// Scratch memory (split-K partials, reduction partials) comes from cudaMallocAsync on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "kernels/common/shapes.h"

namespace sp::kernels::cuda {

// ---- GEMM ---------------------------------------------------------------------------------
// Row-major C[M,N] = alpha * op(A) * op(B) + beta * C; beta == 0 never reads C; alpha == 0 or
// K == 0 never reads A or B.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, cudaStream_t stream);

// ---- Convolution (NHWC activations, KRSC weights), implicit GEMM ----------------------------
void conv2d_forward(const Conv2dShape& sh, const float* x, const float* w, const float* bias /*nullable*/, float* y,
                    cudaStream_t stream);
// dx = data gradient + beta * dx (beta == 0: dx is not read), as the CPU reference.
void conv2d_backward_data(const Conv2dShape& sh, const float* dy, const float* w, float* dx, cudaStream_t stream,
                          float beta = 0.f);
void conv2d_backward_weight(const Conv2dShape& sh, const float* x, const float* dy, float* dw,
                            float* dbias /*nullable*/, cudaStream_t stream);

// ---- Batch normalisation over NHWC viewed as [m = N*H*W, c] ---------------------------------
void batchnorm_forward_training(int64_t m, int64_t c, const float* x, const float* gamma, const float* beta, float eps,
                                float momentum, float* running_mean, float* running_var, float* y, float* save_mean,
                                float* save_invstd, cudaStream_t stream);
void batchnorm_forward_inference(int64_t m, int64_t c, const float* x, const float* gamma, const float* beta,
                                 const float* running_mean, const float* running_var, float eps, float* y,
                                 cudaStream_t stream);
void batchnorm_backward(int64_t m, int64_t c, const float* x, const float* dy, const float* gamma,
                        const float* save_mean, const float* save_invstd, float* dx, float* dgamma, float* dbeta,
                        cudaStream_t stream);

// Fused BN+ReLU / BN+add+ReLU (residual nullable), as in the CPU reference.
void batchnorm_add_relu_forward_training(int64_t m, int64_t c, const float* x, const float* residual,
                                         const float* gamma, const float* beta, float eps, float momentum,
                                         float* running_mean, float* running_var, float* y, float* save_mean,
                                         float* save_invstd, cudaStream_t stream);
void batchnorm_add_relu_forward_inference(int64_t m, int64_t c, const float* x, const float* residual,
                                          const float* gamma, const float* beta, const float* running_mean,
                                          const float* running_var, float eps, bool relu, float* y,
                                          cudaStream_t stream);
void batchnorm_add_relu_backward(int64_t m, int64_t c, const float* x, const float* y, const float* dy,
                                 const float* gamma, const float* save_mean, const float* save_invstd, float* dx,
                                 float* dresidual, float* dgamma, float* dbeta, cudaStream_t stream);

// bf16 activations (x, residual, y, dy, dx, dresidual: bf16 bit patterns) with fp32
// parameters, statistics and reductions, covering the plain and the fused forms (residual
// nullable, relu a flag; the backward's y is null for the plain form and then no ReLU mask
// applies). Bit-identical to widening the activations, running the fp32 kernels above and
// rounding the outputs, in one pass fewer each way.
void batchnorm_forward_training_bf16(int64_t m, int64_t c, const uint16_t* x, const uint16_t* residual, bool relu,
                                     const float* gamma, const float* beta, float eps, float momentum,
                                     float* running_mean, float* running_var, uint16_t* y, float* save_mean,
                                     float* save_invstd, cudaStream_t stream);
void batchnorm_forward_inference_bf16(int64_t m, int64_t c, const uint16_t* x, const uint16_t* residual, bool relu,
                                      const float* gamma, const float* beta, const float* running_mean,
                                      const float* running_var, float eps, uint16_t* y, cudaStream_t stream);
void batchnorm_backward_bf16(int64_t m, int64_t c, const uint16_t* x, const uint16_t* y, const uint16_t* dy,
                             const float* gamma, const float* save_mean, const float* save_invstd, uint16_t* dx,
                             uint16_t* dresidual, float* dgamma, float* dbeta, cudaStream_t stream);

// The persistent form of the training forward and the backward (fp32 and bf16, plain and
// fused): the statistics pass, the per-channel finalisation and the element pass as one
// cooperative kernel with two grid barriers, instead of three kernels. Its co-resident blocks
// keep the chunks they read in shared memory where they fit (kernels/cuda/column_plan.h,
// PersistentPlan), so the element pass reads those from shared memory rather than from L2 or
// DRAM, and two launches are saved. Same bits as the three kernels (same reduction plan and
// arithmetic). Off unless set, or the environment variable STALEPROP_BN_PERSISTENT is 1: on an H100
// (bench/results/nvidia-h100/2026-11-27-summary.md) it gave the same bits, compute-sanitizer memcheck was clean
// and it planned inside a stream capture, but it ran the benchmark's shapes 0.76x to 1.20x as fast as the three
// kernels (slower on ResNet-18's 128- and 256-channel layers). Where the device has no cooperative launch the
// three kernels run.
void set_bn_persistent(bool on);
bool bn_persistent();
// How many persistent batch-norm kernels this process has enqueued, stream captures included
// (not graph replays), so that a test can tell that the persistent form ran rather than the
// three kernels.
int64_t bn_persistent_launches();
// The persistent form's plan for an [m, c] batch norm on the current device: its grid (0: the
// three kernels run), the chunks each block keeps in shared memory, and how many of the total
// chunks are kept. bf16 or fp32 activations, training forward or backward, chunked loads (vec:
// c % 8 == 0 and 16-byte aligned pointers) or single elements.
struct BnPersistentPlan {
  int grid = 0, slots = 0;
  int64_t cached = 0, total = 0;
};
BnPersistentPlan bn_persistent_plan(int64_t m, int64_t c, bool bf16, bool backward, bool vec);

// Programmatic dependent launch (kernels/cuda/common.cuh, launch_kernel): each of our kernels
// may be scheduled while the previous kernel in its stream finishes, and waits for it inside
// (griddepcontrol.wait) before touching memory, which hides the gap between dependent kernels.
// Same results (every kernel waits before its first memory access; its tests passed on an H100, 2026-11-27).
// Timed on its own on an H100 (2026-11-27b): 1.03x on ResNet-56's training step from graphs, one run each.
// Off unless set, or the environment variable STALEPROP_PDL is 1.
// The switch is honoured only where the device is compute capability 9.0 or later and this
// build's kernels were compiled for it (their prologue holds the wait).
void set_programmatic_launch(bool on);
bool programmatic_launch();
// Whether launches on the current device carry the attribute now: the switch, on a device and
// build that take it.
bool programmatic_launch_active();
// Launches, through launch_kernel with the current switch, a kernel that spins for about 0.1 ms
// and then writes a flag, and right after it one that reads the flag after its prologue; true
// when the reader saw the write (it must, whether or not it was scheduled early). Synchronises
// the stream.
bool programmatic_launch_selftest(cudaStream_t stream);

// ---- Elementwise -------------------------------------------------------------------------
void relu_forward(int64_t n, const float* x, float* y, cudaStream_t stream);
void relu_backward(int64_t n, const float* y, const float* dy, float* dx, cudaStream_t stream);
void add(int64_t n, const float* a, const float* b, float* y, cudaStream_t stream);
void scale(int64_t n, float alpha, const float* x, float* y, cudaStream_t stream);
// y[i] = value (the engine's ops::fill; the CPU does this inline)
void fill(int64_t n, float value, float* y, cudaStream_t stream);

// bf16 variants (bit patterns stored as uint16_t): each element is widened to fp32, the fp32
// op above is applied, and the result is rounded to nearest even, exactly like composing
// bf16_to_f32, the fp32 op and f32_to_bf16. Same aliasing rules as the fp32 ops.
void relu_forward_bf16(int64_t n, const uint16_t* x, uint16_t* y, cudaStream_t stream);
void relu_backward_bf16(int64_t n, const uint16_t* y, const uint16_t* dy, uint16_t* dx, cudaStream_t stream);
void add_bf16(int64_t n, const uint16_t* a, const uint16_t* b, uint16_t* y, cudaStream_t stream);
void scale_bf16(int64_t n, float alpha, const uint16_t* x, uint16_t* y, cudaStream_t stream);

// ---- Option-A shortcut ----------------------------------------------------------------------
void shortcut_a_forward(const ShortcutAShape& sh, const float* x, float* y, cudaStream_t stream);
void shortcut_a_backward(const ShortcutAShape& sh, const float* dy, float* dx, cudaStream_t stream);

// ---- Pooling -------------------------------------------------------------------------------
void maxpool2d_forward(const Pool2dShape& sh, const float* x, float* y, cudaStream_t stream);
// A gather over the windows covering each input element (no scatter, no atomics); the sum
// over overlapping windows runs in the CPU's (row-major window) order, so it matches it exactly.
void maxpool2d_backward(const Pool2dShape& sh, const float* x, const float* dy, float* dx, cudaStream_t stream);
void global_avgpool_forward(int64_t n, int64_t hw, int64_t c, const float* x, float* y, cudaStream_t stream);
void global_avgpool_backward(int64_t n, int64_t hw, int64_t c, const float* dy, float* dx, cudaStream_t stream);

// ---- Linear (weight [out, in]) -------------------------------------------------------------
void linear_forward(int64_t n, int64_t in, int64_t out, const float* x, const float* w, const float* b /*nullable*/,
                    float* y, cudaStream_t stream);
void linear_backward(int64_t n, int64_t in, int64_t out, const float* x, const float* w, const float* dy, float* dx,
                     float* dw, float* db, cudaStream_t stream);

// ---- Loss ----------------------------------------------------------------------------------
// loss: one float, correct: one int32, both in device memory (see the header comment on labels).
void softmax_cross_entropy(int64_t n, int64_t classes, const float* logits, const int32_t* labels, float smoothing,
                           float* loss, float* dlogits, int32_t* correct, cudaStream_t stream);

// ---- Optimiser -----------------------------------------------------------------------------
struct SgdTensor {
  float* param;
  const float* grad;
  float* momentum;  // may be null when SgdParams::momentum == 0
  int64_t size;
  // Optional: receives the updated param rounded to bf16, bit for bit as f32_to_bf16 would
  // (mixed precision's weight copy, written by the step instead of by a cast before each use).
  uint16_t* param_bf16 = nullptr;
};
// Updates every tensor of the list in one kernel launch (lists longer than kSgdMaxTensors
// take one launch per kSgdMaxTensors tensors). The list is copied into the launch's
// arguments, so it may be destroyed as soon as the call returns.
void sgd_step(const std::vector<SgdTensor>& tensors, const SgdParams& p, cudaStream_t stream);
constexpr int kSgdMaxTensors = 640;

// ---- Precision conversion ------------------------------------------------------------------
// Bit-identical to the CPU conversions: round to nearest even, NaN stays (a quiet) NaN.
void f32_to_bf16(int64_t n, const float* x, uint16_t* y, cudaStream_t stream);
void bf16_to_f32(int64_t n, const uint16_t* x, float* y, cudaStream_t stream);

}  // namespace sp::kernels::cuda
