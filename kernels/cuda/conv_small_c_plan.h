// The direct convolutions for inputs with few channels (conv_small_c.cu: the stem of a CIFAR or
// ImageNet ResNet, C = 3), as plain C++ so that the CPU tests (tests/test_conv_small_c_plan.cpp)
// check without a GPU which shapes they take and that their work split covers every pixel once.
//
// Why: with C = 3 the implicit GEMM's reduction is R*S*C = 27 long, under half of one 64-deep
// tensor-core K step, and its operand rows are not 16-byte chunks, so the tensor-core kernels
// gather them element by element. ResNet-18's stem (3 -> 64, 3x3, 32 px, batch 512, bf16) ran
// its forward in 218 us and its weight gradient in 302 us on an H100 (bench/results/nvidia-h100/
// 2026-11-27-summary.md), against some 22 us to write the forward's 67 MB at the copy's rate:
// both are bound by their memory traffic, not by their 1.8 GFLOP each. Here:
//   forward          each thread computes 8 consecutive output channels of one output pixel on
//                    CUDA cores, the filter in shared memory as fp32 [tap][k], the pixel's patch
//                    read through L1, and stores them as one 16-byte chunk;
//   weight gradient  each block sums dw over a fixed chunk of the output pixels, staging 32
//                    pixels' patches and gradients in shared memory at a time, every thread
//                    owning up to 8 of the R*S*C*K sums; a second kernel adds the blocks'
//                    partial sums in block order. The chunks depend on the shape alone, so the
//                    result is the same bits on every run.
// The data gradient of such a layer is the network's input gradient, which training never
// computes; it keeps the general path.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/common/shapes.h"

namespace sp::kernels::cuda::detail {

constexpr int kSmallCThreads = 256;    // threads per block of both kernels
constexpr int kSmallCMaxChannels = 4;  // C at most
constexpr int kSmallCMaxTaps = 160;    // R*S*C at most (a 7x7 ImageNet stem has 147)
constexpr int kSmallCOutputsPerThread = 8;
constexpr int kSmallCWgradTile = 32;      // pixels staged in shared memory per round
constexpr int kSmallCWgradBlocks = 264;   // at most (two per SM of an H100; a constant: see above)
constexpr int kSmallCWgradMinChunk = 64;  // pixels per block at least

struct SmallCPlan {
  bool fwd = false, wgrad = false;  // whether each direction takes the direct kernel
  int taps = 0;                     // R*S*C
  // Forward: K / 8 threads per output pixel, kSmallCThreads / that pixels per block.
  int threads_per_pixel = 0, pixels_per_block = 0;
  int64_t pixels = 0, fwd_blocks = 0;  // output pixels N*P*Q, and the forward's grid
  // Weight gradient: `wgrad_blocks` chunks of `chunk` output pixels (the last may be shorter).
  int64_t chunk = 0;
  int wgrad_blocks = 0;
  // Dynamic shared memory of each kernel, in bytes.
  int fwd_smem = 0, wgrad_smem = 0;
};

inline SmallCPlan plan_small_c(const Conv2dShape& sh) {
  SmallCPlan p;
  if (!sh.valid() || sh.c > kSmallCMaxChannels || sh.k % kSmallCOutputsPerThread != 0 || sh.k > 256) return p;
  p.taps = sh.r * sh.s * sh.c;
  if (p.taps > kSmallCMaxTaps) return p;
  p.pixels = int64_t(sh.n) * sh.p() * sh.q();
  p.threads_per_pixel = sh.k / kSmallCOutputsPerThread;
  p.pixels_per_block = kSmallCThreads / p.threads_per_pixel;
  p.fwd_blocks = (p.pixels + p.pixels_per_block - 1) / p.pixels_per_block;
  p.fwd_smem = p.taps * sh.k * int(sizeof(float));
  p.fwd = p.fwd_smem <= 48 * 1024 && p.fwd_blocks <= (int64_t(1) << 31) - 1;
  // Each thread owns at most kSmallCOutputsPerThread of the taps * K sums.
  if (int64_t(p.taps) * sh.k <= int64_t(kSmallCThreads) * kSmallCOutputsPerThread) {
    p.wgrad_smem = kSmallCWgradTile * (p.taps + sh.k) * int(sizeof(float));
    const int64_t blocks = std::min<int64_t>(kSmallCWgradBlocks, std::max<int64_t>(1, p.pixels / kSmallCWgradMinChunk));
    p.chunk = (p.pixels + blocks - 1) / blocks;
    p.wgrad_blocks = int((p.pixels + p.chunk - 1) / p.chunk);  // no empty chunk
    p.wgrad = p.wgrad_smem <= 48 * 1024;
  }
  return p;
}

}  // namespace sp::kernels::cuda::detail
