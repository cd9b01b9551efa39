// The backward-data pass of a strided convolution as stride^2 dense sub-problems.
//
// dx(h, w) sums dy(p, q) * w(r, s) over the taps with p * stride - pad + r == h (and the same for
// w, q, s). With stride > 1 most (pixel, tap) pairs of the implicit GEMM fail that test: for a
// 3x3 stride-2 layer, three in four of its K = R * S * K products are structural zeros. Split
// the input pixels by residue, h = a + stride * i and w = b + stride * j: within class (a, b)
// exactly the taps r = r0 + stride * rr with r0 = (a + pad) % stride reach a pixel (and the same
// for s), and the output row is p = i + dh - rr with dh = (a + pad - r0) / stride, exactly, no
// division. So each class is a dense implicit GEMM with M = N * hc * wc rows and
// K = rc * sc * K, and the classes together do only the products that are not zero. A class
// whose rc or sc is 0 (pad 0, 1x1 stride 2: the odd pixels) gets no gradient: zeros.
// Plain C++, so the CPU tests check the decomposition (tests/test_conv_stride_classes.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/common/shapes.h"

#if defined(__CUDACC__)
#define SP_CLASS_HD __host__ __device__ __forceinline__
#else
#define SP_CLASS_HD inline
#endif

namespace sp::kernels {

struct StrideClass {
  int a, b;    // the class's residues: input pixels h = a + stride * i, w = b + stride * j
  int hc, wc;  // i < hc, j < wc
  int r0, s0;  // its first taps: r = r0 + stride * rr, s = s0 + stride * ss
  int rc, sc;  // rr < rc, ss < sc
  int dh, dw;  // output row p = i + dh - rr, column q = j + dw - ss (valid where inside P x Q)
};

inline int ceil_div_nonneg(int x, int y) { return x <= 0 ? 0 : (x + y - 1) / y; }

// The stride^2 classes of sh's input pixels, a in the outer loop. Classes may be empty
// (hc * wc == 0, when stride > H or W) or have no taps (rc * sc == 0).
inline std::vector<StrideClass> stride_classes(const Conv2dShape& sh) {
  std::vector<StrideClass> out;
  const int st = sh.stride;
  for (int a = 0; a < st; ++a)
    for (int b = 0; b < st; ++b) {
      StrideClass c;
      c.a = a, c.b = b;
      c.hc = ceil_div_nonneg(sh.h - a, st), c.wc = ceil_div_nonneg(sh.w - b, st);
      c.r0 = (a + sh.pad) % st, c.s0 = (b + sh.pad) % st;
      c.rc = ceil_div_nonneg(sh.r - c.r0, st), c.sc = ceil_div_nonneg(sh.s - c.s0, st);
      c.dh = (a + sh.pad - c.r0) / st, c.dw = (b + sh.pad - c.s0) / st;
      out.push_back(c);
    }
  return out;
}

// Where a GEMM epilogue can write class c's dense data gradient straight into dx [N, H, W, C]
// instead of a scratch matrix that a scatter then copies: row r = (img * hc + i) * wc + j of the
// class's result is input pixel (img, a + stride * i, b + stride * j), whose C channels start at
//   base + (r / wc) * group_stride + (r % wc) * row_stride   (elements of dx)
// with base = (a * W + b) * C, row_stride = stride * C and group_stride = stride * W * C. The
// groups (img, i) follow each other at one step only where the class's rows tile the image's
// height, H == stride * hc (an even H under stride 2, as in every CIFAR ResNet): otherwise ok is
// false and the class keeps the scratch and the scatter.
struct ClassRowMap {
  bool ok = false;
  int64_t base = 0, row_stride = 0, group_stride = 0;
  int group = 0;  // wc: the rows of one (img, i)
};

inline ClassRowMap class_row_map(const Conv2dShape& sh, const StrideClass& c) {
  ClassRowMap m;
  if (c.hc <= 0 || c.wc <= 0 || sh.h != sh.stride * c.hc) return m;
  m.ok = true;
  m.base = (int64_t(c.a) * sh.w + c.b) * sh.c;
  m.row_stride = int64_t(sh.stride) * sh.c;
  m.group_stride = int64_t(sh.stride) * sh.w * sh.c;
  m.group = c.wc;
  return m;
}

// Row i's offset in an output whose rows come in groups of `group`, the groups group_stride
// apart and a group's rows row_stride apart; with group 0, plainly i * row_stride. The tensor-core
// epilogue places its rows by it (kernels/cuda/mma_mainloop.cuh, MmaEpilogue::row_offset), once
// per row. The row is an int (a GEMM's M is), so that the division is a 32-bit one: a 64-bit
// division is a called subroutine on the GPU, and evaluated per element it slowed the bf16 GEMM
// 1.5x at 4096^3 on an H100 (bench/results/nvidia-h100/2026-11-27c-summary.md).
SP_CLASS_HD int64_t grouped_row_offset(int i, int64_t row_stride, int group, int64_t group_stride) {
  return group > 0 ? int64_t(i / group) * group_stride + int64_t(i % group) * row_stride : int64_t(i) * row_stride;
}

// The offset of row r (r < 2^31, as every GEMM's M) under m, as the epilogue computes it.
inline int64_t class_row_offset(const ClassRowMap& m, int64_t r) {
  return m.base + grouped_row_offset(int(r), m.row_stride, m.group, m.group_stride);
}

}  // namespace sp::kernels
