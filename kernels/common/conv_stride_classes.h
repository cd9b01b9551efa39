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

#include <vector>

#include "kernels/common/shapes.h"

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

}  // namespace sp::kernels
