// CPU reference kernels: the specification every other implementation is tested against.
//
// Each function is a plain, synchronous computation over raw pointers and a shape; it knows
// nothing about tensors, streams or models (the engine's dispatch runs these on a CPU stream).
// Every op is a template over the element type and is instantiated for float (the engine's
// type) and double (the finite-difference tests). Long sums (batch statistics, reductions over
// N*H*W) accumulate in double; GEMM-based ops accumulate in blocks of at most kGemmKc terms.
// Outputs are fully overwritten unless the comment says "accumulates".
// Shapes follow kernels/common/shapes.h. Work is spread over the CPU thread pool (parallel.h)
// with a fixed partition, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/common/shapes.h"

namespace sp::kernels::cpu {

// ---- GEMM ---------------------------------------------------------------------------------
// Row-major C[M,N] = alpha * op(A) * op(B) + beta * C, op(X) = X or X^T.
// lda/ldb/ldc are row strides of A, B, C as stored. beta == 0 ignores C's prior contents (NaN-safe).
// A's and B's rows may overlap (lda or ldb smaller than the row length; the framed convolutions
// read a padded image so), since only C is written; lda/ldb must be positive.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc);

// The GEMM's micro-kernel, by instruction set: "generic" (the target's baseline), and on x86-64
// "avx2" (AVX2 and FMA, 6 x 16 float tiles) and "avx512" (AVX-512F, 12 x 16) where the CPU has
// them. By default the widest this CPU has; $STALEPROP_CPU_GEMM (read at the first GEMM) or
// set_gemm_kernel names another, or "auto" for the default. A name this CPU cannot run, or an
// unknown one, throws sp::Error naming the variable (or set_gemm_kernel) and the choices.
// avx2 and avx512 give the same bits (the same fused multiply-adds in the same order); generic
// (separate multiplies and adds) does not. Every convolution and linear layer goes through it.
std::vector<std::string> gemm_kernels();        // those this CPU can run, narrowest first
std::string gemm_kernel();                      // the one in use
void set_gemm_kernel(const std::string& name);  // from the next GEMM on

// ---- Convolution (NHWC activations, KRSC weights) ------------------------------------------
// y[n,p,q,k] = bias[k] + sum_{r,s,c} x[n, p*stride - pad + r, q*stride - pad + s, c] * w[k,r,s,c]
template <typename T>
void conv2d_forward(const Conv2dShape& sh, const T* x, const T* w, const T* bias /*nullable*/, T* y);
// dx = d(loss)/dx given dy, plus beta * dx (beta == 0: dx is not read). With beta, the data
// gradient is computed whole and then added to beta * dx, element by element: beta = 1 gives
// add(dgrad, dx)'s bits (a residual block accumulates into its shortcut's gradient so).
template <typename T>
void conv2d_backward_data(const Conv2dShape& sh, const T* dy, const T* w, T* dx, T beta = T(0));
// dw (and dbias when non-null) given x and dy
template <typename T>
void conv2d_backward_weight(const Conv2dShape& sh, const T* x, const T* dy, T* dw, T* dbias /*nullable*/);

// ---- Batch normalisation over NHWC viewed as [m = N*H*W, c] ---------------------------------
// Training: batch mean / biased variance normalise; running stats updated with momentum using
// the unbiased variance (PyTorch): running = (1 - momentum) * running + momentum * batch_stat.
// save_mean / save_invstd (= 1/sqrt(var + eps)) are what the backward needs.
template <typename T>
void batchnorm_forward_training(int64_t m, int64_t c, const T* x, const T* gamma, const T* beta, T eps, T momentum,
                                T* running_mean, T* running_var, T* y, T* save_mean, T* save_invstd);
template <typename T>
void batchnorm_forward_inference(int64_t m, int64_t c, const T* x, const T* gamma, const T* beta,
                                 const T* running_mean, const T* running_var, T eps, T* y);
template <typename T>
void batchnorm_backward(int64_t m, int64_t c, const T* x, const T* dy, const T* gamma, const T* save_mean,
                        const T* save_invstd, T* dx, T* dgamma, T* dbeta);

// Fused variants: y = relu(bn(x) + residual), residual nullable (then BN+ReLU). Bit-identical
// to composing the unfused ops (batchnorm, add, relu_forward). The inference form makes the
// ReLU optional so that it also serves the plain batchnorm_forward_inference.
template <typename T>
void batchnorm_add_relu_forward_training(int64_t m, int64_t c, const T* x, const T* residual /*nullable*/,
                                         const T* gamma, const T* beta, T eps, T momentum, T* running_mean,
                                         T* running_var, T* y, T* save_mean, T* save_invstd);
template <typename T>
void batchnorm_add_relu_forward_inference(int64_t m, int64_t c, const T* x, const T* residual /*nullable*/,
                                          const T* gamma, const T* beta, const T* running_mean, const T* running_var,
                                          T eps, bool relu, T* y);
// Backward of the fused forward given its output y: g = dy where y > 0 else 0, then the
// batchnorm_backward formulas with g for dy; dresidual = g (nullable; may alias dy, never x or
// dx: the CUDA form writes g there first and reads it back).
template <typename T>
void batchnorm_add_relu_backward(int64_t m, int64_t c, const T* x, const T* y, const T* dy, const T* gamma,
                                 const T* save_mean, const T* save_invstd, T* dx, T* dresidual /*nullable*/,
                                 T* dgamma, T* dbeta);

// ---- Elementwise -------------------------------------------------------------------------
template <typename T>
void relu_forward(int64_t n, const T* x, T* y);
// dx = dy where y > 0 else 0 (y is the forward output; in-place dx == dy allowed)
template <typename T>
void relu_backward(int64_t n, const T* y, const T* dy, T* dx);
// y = a + b (y may alias a or b)
template <typename T>
void add(int64_t n, const T* a, const T* b, T* y);
// y = alpha * x (y may alias x): gradient shrink and 1/N averaging
template <typename T>
void scale(int64_t n, T alpha, const T* x, T* y);

// ---- Option-A shortcut ----------------------------------------------------------------------
template <typename T>
void shortcut_a_forward(const ShortcutAShape& sh, const T* x, T* y);
template <typename T>
void shortcut_a_backward(const ShortcutAShape& sh, const T* dy, T* dx);

// ---- Pooling -------------------------------------------------------------------------------
// Max pool; padding acts as -infinity. Backward routes dy to the first maximum in each window
// (row-major window order), recomputed from x.
template <typename T>
void maxpool2d_forward(const Pool2dShape& sh, const T* x, T* y);
template <typename T>
void maxpool2d_backward(const Pool2dShape& sh, const T* x, const T* dy, T* dx);
// Global average pool: x [n, hw, c] -> y [n, c]
template <typename T>
void global_avgpool_forward(int64_t n, int64_t hw, int64_t c, const T* x, T* y);
template <typename T>
void global_avgpool_backward(int64_t n, int64_t hw, int64_t c, const T* dy, T* dx);

// ---- Linear (weight [out, in]) -------------------------------------------------------------
// y[n,out] = x[n,in] * w^T + b
template <typename T>
void linear_forward(int64_t n, int64_t in, int64_t out, const T* x, const T* w, const T* b /*nullable*/, T* y);
// dx = dy * w; dw = dy^T * x; db = sum_n dy. Any of dx/dw/db may be null to skip it.
template <typename T>
void linear_backward(int64_t n, int64_t in, int64_t out, const T* x, const T* w, const T* dy, T* dx, T* dw, T* db);

// ---- Loss ----------------------------------------------------------------------------------
// Softmax cross-entropy with label smoothing eps over `classes` classes, mean over the batch.
// Target distribution q = (1 - eps) * onehot(label) + eps / classes.
// Writes loss (scalar mean), dlogits = (softmax - q) / n, and correct = #(argmax == label)
// (argmax takes the first maximum). Labels must lie in [0, classes); else throws sp::Error.
template <typename T>
void softmax_cross_entropy(int64_t n, int64_t classes, const T* logits, const int32_t* labels, T smoothing, T* loss,
                           T* dlogits, int64_t* correct);

// ---- Optimiser -----------------------------------------------------------------------------
template <typename T>
struct SgdTensor {
  T* param;
  const T* grad;
  T* momentum;  // may be null when SgdParams::momentum == 0
  int64_t size;
  // Optional (float only): receives the updated param rounded to bf16 (f32_to_bf16's rounding),
  // mixed precision's weight copy written by the step instead of by a cast before each use.
  uint16_t* param_bf16 = nullptr;
};
// One call updates every tensor in the list (see SgdParams for the formula).
template <typename T>
void sgd_step(const std::vector<SgdTensor<T>>& tensors, const SgdParams& p);

// ---- Precision conversion ------------------------------------------------------------------
// bf16 stored as uint16_t; float -> bf16 rounds to nearest even (NaN stays NaN).
void f32_to_bf16(int64_t n, const float* x, uint16_t* y);
void bf16_to_f32(int64_t n, const uint16_t* x, float* y);

// Block depth of the GEMM's K loop (the length of each fp32 partial sum).
constexpr int64_t kGemmKc = 256;

}  // namespace sp::kernels::cpu
