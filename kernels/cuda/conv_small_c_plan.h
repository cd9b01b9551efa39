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
//   forward          each thread computes 8 consecutive output channels of 4 output pixels on
//                    CUDA cores, the filter in shared memory as fp32 [tap][k] (two 16-byte reads
//                    per tap serve 32 FMAs), the patches read through L1, and stores each
//                    pixel's 8 channels as one 16-byte chunk;
//   weight gradient  each block sums dw over a fixed chunk of the output pixels, staging 64
//                    pixels' patches and gradients in shared memory at a time, every thread
//                    owning units of 2 taps x 4 channels of the R*S*C*K sums (three shared-memory
//                    reads per 8 FMAs); a second kernel adds the blocks' partial sums in block
//                    order. The chunks depend on the shape alone, so the result is the same bits
//                    on every run.
// The data gradient of such a layer is the network's input gradient, which training never
// computes; it keeps the general path.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/common/shapes.h"

namespace sp::kernels::cuda::detail {

constexpr int kSmallCThreads = 256;         // threads per block of both kernels
constexpr int kSmallCMaxChannels = 4;       // C at most
constexpr int kSmallCMaxTaps = 160;         // R*S*C at most (a 7x7 ImageNet stem has 147)
constexpr int kSmallCOutputsPerThread = 8;  // forward: output channels per thread and pixel
constexpr int kSmallCPixelsPerThread = 4;   // forward: output pixels per thread
constexpr int kSmallCWgradTile = 64;        // weight gradient: pixels staged in shared memory per round
constexpr int kSmallCWgradBlocks = 264;     // at most (two per SM of an H100; a constant: see above)
constexpr int kSmallCWgradMinChunk = 64;  // pixels per block at least
constexpr int kSmallCMaxUnitsPerThread = 2;  // weight gradient: 2 taps x 4 channels of sums each
constexpr int kSmallCSmemLimit = 48 * 1024;

struct SmallCPlan {
  bool fwd = false, wgrad = false;  // whether each direction takes the direct kernel
  int taps = 0;                     // R*S*C
  // Forward: K / 8 threads per output pixel; a block's kSmallCThreads / that slots of threads
  // each compute kSmallCPixelsPerThread pixels, slot + j * slots of the block's pixels.
  int threads_per_pixel = 0, slots = 0, pixels_per_block = 0;
  int64_t pixels = 0, fwd_blocks = 0;  // output pixels N*P*Q, and the forward's grid
  // Weight gradient: `wgrad_blocks` chunks of `chunk` output pixels (the last may be shorter).
  // Its sums, o = tap * K + k, are dealt in units of 2 taps x 4 channels (taps_pad: taps rounded
  // up to even), unit u = tap pair u / (K / 4), channels 4 * (u % (K / 4)) .. + 3; thread t owns
  // units t, t + kSmallCThreads, ...
  int64_t chunk = 0;
  int wgrad_blocks = 0, taps_pad = 0, units = 0;
  // Dynamic shared memory of each kernel, in bytes.
  int fwd_smem = 0, wgrad_smem = 0;
};

// The weight gradient's shared memory: the staged patches [tile][taps_pad] and gradients
// [tile][K] as fp32, each tap's (r, s, c) and each staged pixel's (image offset, h0, w0).
inline int small_c_wgrad_smem(int taps_pad, int k) {
  return kSmallCWgradTile * (taps_pad + k) * int(sizeof(float)) + 3 * taps_pad * int(sizeof(int)) +
         kSmallCWgradTile * (int(sizeof(int64_t)) + 2 * int(sizeof(int)));
}

inline SmallCPlan plan_small_c(const Conv2dShape& sh) {
  SmallCPlan p;
  if (!sh.valid() || sh.c > kSmallCMaxChannels || sh.k % kSmallCOutputsPerThread != 0 || sh.k > 256) return p;
  p.taps = sh.r * sh.s * sh.c;
  if (p.taps > kSmallCMaxTaps) return p;
  p.pixels = int64_t(sh.n) * sh.p() * sh.q();
  p.threads_per_pixel = sh.k / kSmallCOutputsPerThread;
  p.slots = kSmallCThreads / p.threads_per_pixel;
  p.pixels_per_block = p.slots * kSmallCPixelsPerThread;
  p.fwd_blocks = (p.pixels + p.pixels_per_block - 1) / p.pixels_per_block;
  p.fwd_smem = p.taps * sh.k * int(sizeof(float));
  p.fwd = p.fwd_smem <= kSmallCSmemLimit && p.fwd_blocks <= (int64_t(1) << 31) - 1;
  p.taps_pad = (p.taps + 1) / 2 * 2;
  p.units = p.taps_pad / 2 * (sh.k / 4);
  p.wgrad_smem = small_c_wgrad_smem(p.taps_pad, sh.k);
  if (p.units <= kSmallCThreads * kSmallCMaxUnitsPerThread && p.wgrad_smem <= kSmallCSmemLimit) {
    const int64_t blocks = std::min<int64_t>(kSmallCWgradBlocks, std::max<int64_t>(1, p.pixels / kSmallCWgradMinChunk));
    p.chunk = (p.pixels + blocks - 1) / blocks;
    p.wgrad_blocks = int((p.pixels + p.chunk - 1) / p.chunk);  // no empty chunk
    p.wgrad = true;
  }
  return p;
}

}  // namespace sp::kernels::cuda::detail
