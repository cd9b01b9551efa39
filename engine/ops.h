// The op contract at the tensor level: every op of the engine, as a function over tensors and
// a stream, dispatched by device.
//
//   CPU tensors  -> kernels/cpu (fp32), enqueued on the CPU stream (runs asynchronously;
//                   call stream.synchronize() before reading results on the host)
//   CUDA tensors -> kernels/cuda on the stream's cudaStream_t (ops without a CUDA kernel in
//                   this build throw sp::NotSupportedError), or kernels/vendor for gemm,
//                   convolutions and linear layers when set_kernel_backend(KernelBackend::Vendor)
//
// bf16 (mixed precision): any f32 tensor argument of the ops below except sgd_step and fill
// may be bf16. The result is what widening every bf16 input to fp32, running the fp32 op and
// rounding every bf16 output to nearest even gives (on the CPU, and on CUDA for ops without a
// bf16 kernel, that is literally how it runs). CUDA has native bf16 kernels for gemm and the
// convolutions (tensor cores: bf16 operands, fp32 accumulation; fp32 weight gradients), batch
// norm (bf16 activations, fp32 parameters and statistics), relu, add and scale; these agree
// with the widened reference to rounding (the tensor cores sum in their own order).
//
// Every op checks that its tensors live on the stream's device, have the expected dtype and
// mutually consistent shapes, and throws sp::ShapeError naming the shapes involved otherwise.
// Optional tensor arguments are passed as an undefined Tensor().
// Shapes: activations NHWC [N, H, W, C]; conv weights KRSC [K, R, S, C]; linear weight
// [out, in]; batch-norm parameters [C]; labels i32 [N].
#pragma once

#include <string>
#include <vector>

#include "engine/stream.h"
#include "engine/tensor.h"
#include "kernels/common/shapes.h"

namespace sp::ops {

using kernels::SgdParams;

// ---- Kernel backend for CUDA tensors (process-wide; default Custom) --------------------------
// Custom: our kernels (kernels/cuda). Vendor: the cuBLASLt / cuDNN baselines (kernels/vendor)
// for gemm, the three convolutions and the linear layer's GEMMs (its bias and bias gradient as
// products with a column of ones); every other op stays on our kernels. CPU tensors always
// use the CPU reference. Takes effect for ops issued after the call.
enum class KernelBackend { Custom, Vendor };
void set_kernel_backend(KernelBackend backend);
KernelBackend kernel_backend();

// ---- Main loop of our bf16 tensor-core kernels (process-wide) ---------------------------------
// "mma_sync" (any GPU from sm_80), "wgmma" (Hopper: an sm_90a build on a compute capability 9.0
// GPU), "wgmma_tma" (wgmma, the GEMM's plain matrices loaded by TMA) or "auto" (wgmma_tma where
// wgmma can run, else mma_sync; decided per device); see
// kernels/cuda/tensor_core.h. The default is $STALEPROP_MAINLOOP when set, else auto.
// tensor_core_mainloop() is the selection, tensor_core_mainloop_in_use() what the kernels run on
// the current device ("none" without a CUDA device). Without CUDA both are "none" and setting one
// throws; an unknown name throws; selecting wgmma where it cannot run throws at the first bf16
// GEMM/convolution.
void set_tensor_core_mainloop(const std::string& name);
std::string tensor_core_mainloop();
std::string tensor_core_mainloop_in_use();
bool wgmma_available();  // this build has sm_90a code and the current GPU is compute capability 9.0
// The other kernel switches (kernels/cuda/tensor_core.h, and the persistent batch norm of
// kernels/cuda/ops.h; set from the environment), as
// "dgrad_wt=1,dgrad_classes=1,dgrad_class_direct=1,conv_tma=1,tma_wide=0,tma_wide_by_shape=1,tma_cluster=0,
// tma_persistent=1,conv_small_c=1,bn_persistent=0,pdl=0,conv_halo=0,halo_resident=0,tma_l2_prefetch=0" by default;
// "none" without CUDA.
std::string tensor_core_switches();

// C = alpha * op(A) * op(B) + beta * C for 2-D tensors (row-major).
void gemm(Stream& s, bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta,
          const Tensor& c);

// ---- Convolution ---------------------------------------------------------------------------
void conv2d_forward(Stream& s, const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& y, int stride,
                    int pad);
// dx = the data gradient + beta * dx (beta == 0: dx is not read; beta == 1 accumulates, as a
// residual block adds its main path's gradient to its shortcut's).
void conv2d_backward_data(Stream& s, const Tensor& dy, const Tensor& w, const Tensor& dx, int stride, int pad,
                          float beta = 0.f);
void conv2d_backward_weight(Stream& s, const Tensor& x, const Tensor& dy, const Tensor& dw, const Tensor& dbias,
                            int stride, int pad);
// The output shape [N, P, Q, K] of a convolution of x by w.
Shape conv2d_output_shape(const Shape& x, const Shape& w, int stride, int pad);

// ---- Batch normalisation (NHWC; statistics over N, H, W) --------------------------------------
void batchnorm_forward_training(Stream& s, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                const Tensor& running_mean, const Tensor& running_var, const Tensor& y,
                                const Tensor& save_mean, const Tensor& save_invstd, float eps, float momentum);
void batchnorm_forward_inference(Stream& s, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                 const Tensor& running_mean, const Tensor& running_var, const Tensor& y, float eps);
void batchnorm_backward(Stream& s, const Tensor& x, const Tensor& dy, const Tensor& gamma, const Tensor& save_mean,
                        const Tensor& save_invstd, const Tensor& dx, const Tensor& dgamma, const Tensor& dbeta);

// Fused BN+ReLU and BN+add+ReLU: y = relu(bn(x) + residual), residual optional (undefined:
// BN+ReLU). Results are bit-identical to composing batchnorm_*, add and relu_* on the CPU.
void batchnorm_add_relu_forward_training(Stream& s, const Tensor& x, const Tensor& residual, const Tensor& gamma,
                                         const Tensor& beta, const Tensor& running_mean, const Tensor& running_var,
                                         const Tensor& y, const Tensor& save_mean, const Tensor& save_invstd,
                                         float eps, float momentum);
void batchnorm_add_relu_forward_inference(Stream& s, const Tensor& x, const Tensor& residual, const Tensor& gamma,
                                          const Tensor& beta, const Tensor& running_mean, const Tensor& running_var,
                                          const Tensor& y, float eps);
// Backward from the fused forward's output y: dx, dgamma, dbeta, and dresidual (optional; the
// gradient of the residual input, which may be dy itself: dy is then consumed; never x or dx).
void batchnorm_add_relu_backward(Stream& s, const Tensor& x, const Tensor& y, const Tensor& dy, const Tensor& gamma,
                                 const Tensor& save_mean, const Tensor& save_invstd, const Tensor& dx,
                                 const Tensor& dresidual, const Tensor& dgamma, const Tensor& dbeta);

// ---- Elementwise ---------------------------------------------------------------------------
void relu_forward(Stream& s, const Tensor& x, const Tensor& y);
void relu_backward(Stream& s, const Tensor& y, const Tensor& dy, const Tensor& dx);
void add(Stream& s, const Tensor& a, const Tensor& b, const Tensor& y);
void scale(Stream& s, float alpha, const Tensor& x, const Tensor& y);
void fill(Stream& s, const Tensor& t, float value);  // f32 tensors
// Copies between any two devices (same dtype, same element count); a copy that involves a
// CUDA tensor must be issued on a CUDA stream.
void copy(Stream& s, const Tensor& src, const Tensor& dst);
// f32 <-> bf16 (round to nearest even)
void cast(Stream& s, const Tensor& src, const Tensor& dst);

// ---- Option-A shortcut: x [N,H,W,Cin] -> y [N,ceil(H/stride),ceil(W/stride),Cout] ----------
void shortcut_a_forward(Stream& s, const Tensor& x, const Tensor& y, int stride);
void shortcut_a_backward(Stream& s, const Tensor& dy, const Tensor& dx, int stride);

// ---- Pooling -------------------------------------------------------------------------------
void maxpool2d_forward(Stream& s, const Tensor& x, const Tensor& y, int window, int stride, int pad);
void maxpool2d_backward(Stream& s, const Tensor& x, const Tensor& dy, const Tensor& dx, int window, int stride,
                        int pad);
// The output shape [N, P, Q, C] of max pooling x.
Shape maxpool2d_output_shape(const Shape& x, int window, int stride, int pad);
// x [N,H,W,C] -> y [N,C]
void global_avgpool_forward(Stream& s, const Tensor& x, const Tensor& y);
void global_avgpool_backward(Stream& s, const Tensor& dy, const Tensor& dx);

// ---- Linear --------------------------------------------------------------------------------
void linear_forward(Stream& s, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y);
void linear_backward(Stream& s, const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                     const Tensor& dw, const Tensor& db);

// ---- Loss ----------------------------------------------------------------------------------
// logits f32 [N, classes], labels i32 [N] -> loss f32 [1] (batch mean), dlogits f32 [N, classes]
// (gradient of the mean loss), correct i32 [1] (top-1 hits).
void softmax_cross_entropy(Stream& s, const Tensor& logits, const Tensor& labels, float smoothing, const Tensor& loss,
                           const Tensor& dlogits, const Tensor& correct);

// ---- Optimiser -----------------------------------------------------------------------------
// One launch updates every (param, grad, momentum) triple; momentum tensors may be undefined
// when p.momentum == 0. When `lr` is given (a one-element f32 tensor on the stream's device),
// the update reads the learning rate from it as it runs and p.lr is ignored: a replayed graph
// then uses the rate written into `lr` before the launch. `params_bf16`, empty or one per param
// (each undefined or a bf16 tensor of the param's shape), receives the updated params rounded as
// cast() rounds them: mixed precision's weight copies, written in the same launch.
void sgd_step(Stream& s, const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
              const std::vector<Tensor>& momenta, const SgdParams& p, const Tensor& lr = Tensor(),
              const std::vector<Tensor>& params_bf16 = {});

}  // namespace sp::ops
