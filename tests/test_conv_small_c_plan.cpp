// The plan of the direct convolutions for few input channels (kernels/cuda/conv_small_c_plan.h),
// on the host: which shapes take them, and that the forward's blocks and the weight gradient's
// chunks cover every output pixel exactly once, as the kernels (conv_small_c.cu) walk them.
// The GPU test TensorCore.ConvolutionsWithFewChannelsRunDirect checks the kernels' arithmetic.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/conv_small_c_plan.h"

namespace {

using sp::kernels::Conv2dShape;
using namespace sp::kernels::cuda::detail;

Conv2dShape conv(int n, int h, int w, int c, int k, int r, int stride, int pad) {
  Conv2dShape s;
  s.n = n, s.h = h, s.w = w, s.c = c, s.k = k, s.r = r, s.s = r, s.stride = stride, s.pad = pad;
  return s;
}

std::string str(const Conv2dShape& s) {
  return std::to_string(s.n) + "x" + std::to_string(s.h) + "x" + std::to_string(s.w) + "x" + std::to_string(s.c) +
         " -> " + std::to_string(s.k) + " " + std::to_string(s.r) + "x" + std::to_string(s.s) + " s" +
         std::to_string(s.stride) + " p" + std::to_string(s.pad);
}

TEST(ConvSmallCPlan, TakesTheStemsAndLeavesTheRest) {
  // The CIFAR stems at every batch the benchmarks and training use, and ImageNet's (its weight
  // gradient's 147 x 64 sums are more than the kernel's threads hold).
  for (int n : {1, 128, 512, 1024}) {
    const SmallCPlan r18 = plan_small_c(conv(n, 32, 32, 3, 64, 3, 1, 1));
    EXPECT_TRUE(r18.fwd && r18.wgrad) << n;
    EXPECT_EQ(r18.taps, 27);
    const SmallCPlan r20 = plan_small_c(conv(n, 32, 32, 3, 16, 3, 1, 1));
    EXPECT_TRUE(r20.fwd && r20.wgrad) << n;
  }
  const SmallCPlan imagenet = plan_small_c(conv(8, 224, 224, 3, 64, 7, 2, 3));
  EXPECT_TRUE(imagenet.fwd);
  EXPECT_FALSE(imagenet.wgrad);
  // Not taken: more than 4 channels (every other ResNet layer), K not a multiple of 8, more than
  // kSmallCMaxTaps taps, an invalid shape.
  for (const Conv2dShape& s :
       {conv(2, 32, 32, 16, 16, 3, 1, 1), conv(2, 32, 32, 5, 64, 3, 1, 1), conv(2, 32, 32, 3, 10, 3, 1, 1),
        conv(2, 32, 32, 4, 64, 7, 1, 3), conv(2, 4, 4, 3, 64, 7, 1, 0)}) {
    const SmallCPlan p = plan_small_c(s);
    EXPECT_FALSE(p.fwd || p.wgrad) << str(s);
  }
  // The forward's shared memory is its fp32 filter, taps x K: 36 x 256 (36 KiB, taken) for a
  // 4-channel 3x3 layer of 256 outputs, 147 x 64 (37 KiB, taken) for the 7x7 stem, 147 x 96
  // (56 KiB, past the default 48 KiB: refused). Their weight gradients are refused for too many
  // units of 2 taps x 4 channels (18 x 64 = 1152 and 74 x 16 = 1184, past 256 threads x 2 units).
  const SmallCPlan wide = plan_small_c(conv(2, 32, 32, 4, 256, 3, 1, 1));
  EXPECT_TRUE(wide.fwd);
  EXPECT_EQ(wide.fwd_smem, 36 * 256 * 4);
  EXPECT_FALSE(wide.wgrad);
  EXPECT_EQ(wide.units, 18 * 64);
  const SmallCPlan stem7 = plan_small_c(conv(2, 32, 32, 3, 64, 7, 2, 3));
  EXPECT_TRUE(stem7.fwd);
  EXPECT_EQ(stem7.fwd_smem, 147 * 64 * 4);
  EXPECT_FALSE(stem7.wgrad);
  EXPECT_EQ(stem7.units, 74 * 16);
  const SmallCPlan filter96 = plan_small_c(conv(2, 32, 32, 3, 96, 7, 2, 3));
  EXPECT_EQ(filter96.fwd_smem, 147 * 96 * 4);
  EXPECT_FALSE(filter96.fwd);
}

TEST(ConvSmallCPlan, EveryOutputPixelIsComputedAndSummedOnce) {
  for (const Conv2dShape& s :
       {conv(1, 1, 1, 3, 8, 1, 1, 0), conv(1, 6, 6, 3, 16, 3, 1, 0), conv(3, 32, 32, 3, 16, 3, 1, 1),
        conv(2, 9, 7, 1, 8, 5, 2, 2), conv(5, 7, 5, 2, 24, 3, 1, 1), conv(2, 13, 11, 3, 64, 7, 2, 3),
        conv(128, 32, 32, 3, 64, 3, 1, 1), conv(7, 33, 31, 3, 256, 3, 1, 1), conv(2, 8, 8, 4, 256, 3, 1, 1),
        conv(2, 8, 8, 3, 128, 3, 1, 1)}) {
    const SmallCPlan p = plan_small_c(s);
    ASSERT_TRUE(p.fwd) << str(s);
    const int64_t pixels = int64_t(s.n) * s.p() * s.q();
    EXPECT_EQ(p.pixels, pixels) << str(s);
    // Forward: thread t of block b computes channels 8 * (t % (K / 8)) .. + 7 of pixels
    // b * pixels_per_block + slot + j * slots, slot = t / (K / 8), j < kSmallCPixelsPerThread
    // (the kernel's indexing); every (pixel, channel) once.
    ASSERT_EQ(p.threads_per_pixel * kSmallCOutputsPerThread, s.k) << str(s);
    ASSERT_LE(p.slots * p.threads_per_pixel, kSmallCThreads) << str(s);
    ASSERT_EQ(p.pixels_per_block, p.slots * kSmallCPixelsPerThread) << str(s);
    std::vector<uint8_t> seen(size_t(pixels) * size_t(s.k), 0);
    for (int64_t b = 0; b < p.fwd_blocks; ++b)
      for (int t = 0; t < kSmallCThreads; ++t) {
        const int slot = t / p.threads_per_pixel;
        if (slot >= p.slots) continue;
        const int k0 = (t - slot * p.threads_per_pixel) * kSmallCOutputsPerThread;
        ASSERT_LE(k0 + kSmallCOutputsPerThread, s.k) << str(s) << ": thread " << t << " past the channels";
        for (int j = 0; j < kSmallCPixelsPerThread; ++j) {
          const int64_t pixel = b * p.pixels_per_block + slot + int64_t(j) * p.slots;
          if (pixel >= pixels) continue;
          for (int e = 0; e < kSmallCOutputsPerThread; ++e) ++seen[size_t(pixel) * size_t(s.k) + size_t(k0 + e)];
        }
      }
    for (size_t i = 0; i < seen.size(); ++i) ASSERT_EQ(seen[i], 1) << str(s) << ": forward output " << i;
    if (!p.wgrad) continue;
    // Weight gradient: chunk b covers pixels [b * chunk, min((b + 1) * chunk, pixels)); none is
    // empty, together they cover every pixel once, and every one of the taps * K sums has a
    // thread (t + j * kSmallCThreads, j < kSmallCOutputsPerThread).
    EXPECT_GE(p.wgrad_blocks, 1);
    EXPECT_LE(p.wgrad_blocks, kSmallCWgradBlocks);
    EXPECT_LT(int64_t(p.wgrad_blocks - 1) * p.chunk, pixels) << str(s) << ": an empty chunk";
    EXPECT_GE(int64_t(p.wgrad_blocks) * p.chunk, pixels) << str(s) << ": pixels left out";
    // Its sums o = tap * K + k: unit u (2 taps x 4 channels: taps 2 * (u / (K / 4)) + 0, 1 below
    // taps, channels 4 * (u % (K / 4)) + 0..3), units t + j * kSmallCThreads of thread t,
    // j < kSmallCMaxUnitsPerThread; every sum once.
    EXPECT_EQ(p.taps_pad % 2, 0);
    EXPECT_GE(p.taps_pad, p.taps);
    EXPECT_LE(p.units, kSmallCThreads * kSmallCMaxUnitsPerThread) << str(s);
    std::vector<int> sums(size_t(p.taps) * size_t(s.k), 0);
    for (int t = 0; t < kSmallCThreads; ++t)
      for (int j = 0; j < kSmallCMaxUnitsPerThread; ++j) {
        const int u = t + j * kSmallCThreads;
        if (u >= p.units) break;
        const int kq = s.k / 4, t0 = 2 * (u / kq), k0 = 4 * (u % kq);
        ASSERT_LT(t0, p.taps) << str(s) << ": unit " << u << " past the taps";
        ASSERT_LE(k0 + 4, s.k) << str(s) << ": unit " << u << " past the channels";
        for (int e = 0; e < 4; ++e) {
          ++sums[size_t(t0) * size_t(s.k) + size_t(k0 + e)];
          if (t0 + 1 < p.taps) ++sums[size_t(t0 + 1) * size_t(s.k) + size_t(k0 + e)];
        }
      }
    for (size_t o = 0; o < sums.size(); ++o) ASSERT_EQ(sums[o], 1) << str(s) << ": weight-gradient sum " << o;
    EXPECT_LE(p.wgrad_smem, kSmallCSmemLimit) << str(s);
  }
  // A thread with two units (448 of them: 14 tap pairs x 32 channel groups).
  const SmallCPlan two = plan_small_c(conv(2, 8, 8, 3, 128, 3, 1, 1));
  EXPECT_TRUE(two.wgrad);
  EXPECT_GT(two.units, kSmallCThreads);
}

}  // namespace
