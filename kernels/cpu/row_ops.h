// Helpers over row-major [m, c] matrices shared by several CPU kernels: per-column reductions
// over the batch (batch-norm statistics, bias gradients) and bias broadcasting.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/cpu/parallel.h"

namespace sp::kernels::cpu::detail {

// Elements per reduction block: large enough to amortise the partial buffers, small enough
// that a CIFAR-sized batch still yields many blocks to spread over the threads.
constexpr int64_t kColumnSumBlockElems = 32768;

// Computes `sums` column reductions of an [m, c] matrix at once, deterministically: the rows
// are cut into blocks whose size depends only on c, each block fills its own double partials,
// and the partials are added in block order, so the result does not depend on how
// parallel_for spreads the blocks over threads.
// accumulate(row_begin, row_end, acc) adds the contributions of rows [row_begin, row_end) to
// acc[s * c + j] (s < sums, j < c); acc starts at zero. out gets the totals in that layout.
template <typename Accumulate>
void column_sums(int64_t m, int64_t c, int sums, const Accumulate& accumulate, double* out) {
  const int64_t width = sums * c;
  std::fill(out, out + width, 0.0);
  if (m <= 0) return;
  const int64_t rows_per_block = std::max<int64_t>(1, kColumnSumBlockElems / std::max<int64_t>(1, c));
  const int64_t blocks = (m + rows_per_block - 1) / rows_per_block;
  std::vector<double> partial(blocks * width, 0.0);
  parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      accumulate(b * rows_per_block, std::min(m, (b + 1) * rows_per_block), partial.data() + b * width);
  });
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t j = 0; j < width; ++j) out[j] += partial[b * width + j];
}

// Rows of work per parallel_for chunk so that a chunk covers roughly `elems` elements.
inline int64_t row_grain(int64_t row_len, int64_t elems = 16384) {
  return std::max<int64_t>(1, elems / std::max<int64_t>(1, row_len));
}

// y[i, :] = bias for every row: the GEMM then adds its product on top with beta = 1.
template <typename T>
void broadcast_rows(int64_t m, int64_t c, const T* bias, T* y) {
  parallel_for(m, row_grain(c), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::copy(bias, bias + c, y + i * c);
  });
}

}  // namespace sp::kernels::cpu::detail
