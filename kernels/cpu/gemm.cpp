// Cache-blocked GEMM (Goto/BLIS structure) for the CPU reference.
//
//   for each K block (kGemmKc deep):            partial sums of at most kGemmKc terms
//     for each N panel (kNc wide):  pack B      lives in L2/L3, shared by all threads
//       tasks = M blocks (kMc) x N sub-panels:  each task packs its own A block (L2)
//         micro-tiles MR x kNr                  registers (MR: the micro-kernel's rows)
// (Narrow products skip some packing: op(A) is read in place when N <= kInPlaceAMaxN, and B's
// whole strips when M <= kInPlaceBMaxM; see gemm_accumulate.)
// Tasks partition C, so every output element is written by one thread in a fixed order:
// the result does not depend on the number of threads.
//
// Small outputs with a long K (convolution weight gradients: C is K x RSC, K = N*P*Q) would
// leave most threads idle, or make them meet once per K block, so a K longer than kSplitK is cut
// into ceil(K / kSplitK) chunks of whole kGemmKc blocks, shared out evenly, whose partial
// products are computed in parallel and then summed in chunk order (deterministic, and
// independent of the thread count since the chunking depends only on k).
//
// The micro-kernel is chosen by instruction set at run time (gemm_kernel()); its tile height
// MR sets the A panels' interleave, so a GEMM reads the choice once and uses it throughout.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/common/sanitizers.h"
#include "kernels/common/switches.h"
#include "kernels/cpu/gemm_micro.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

#if defined(SP_SANITIZE_ADDRESS)
#include <sanitizer/asan_interface.h>

#include <cstdio>
#elif defined(SP_SANITIZE_THREAD)
// ThreadSanitizer's record of a read or write of a range (exported by its runtime, which the
// compiler's instrumentation calls; its public header does not declare them).
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#endif

namespace sp::kernels::cpu {
namespace {

using gemm_detail::MicroKernel;
using gemm_detail::MicroTile;

#if defined(SP_SANITIZE_ADDRESS) || defined(SP_SANITIZE_THREAD)
// Under the sanitizers the micro-kernels run uninstrumented (kernels/CMakeLists.txt): checking
// each of their vector loads made the ASan build's training tests 2.5x slower. Instead the
// GEMM tells the sanitizer, call by call, of the memory gemm_micro.h's contract lets the kernel
// touch: A's panel, rows or columns and B's panel or rows (read), C's mr x nr corner (written,
// and read unless overwritten). AddressSanitizer checks that all of it is addressable before
// the kernel runs (else the run stops with its description of the address); ThreadSanitizer
// records the reads and writes, so a race on them shows as it would in instrumented code.
enum class Access { kRead, kWrite, kReadWrite };
void sanitize_region(const void* begin, size_t bytes, Access access, const char* what) {
#if defined(SP_SANITIZE_ADDRESS)
  (void)access;
  if (void* bad = __asan_region_is_poisoned(const_cast<void*>(begin), bytes)) {
    std::fprintf(stderr, "GEMM micro-kernel: its %s reaches unaddressable memory at %p\n", what, bad);
    __asan_describe_address(bad);
    std::abort();
  }
#else
  (void)what;
  if (access != Access::kWrite) __tsan_read_range(const_cast<void*>(begin), bytes);
  if (access != Access::kRead) __tsan_write_range(const_cast<void*>(begin), bytes);
#endif
}

template <typename T>
void sanitize_micro_call(int64_t kc, const T* ap, int64_t lda, const T* bp, int64_t ldb, const T* c, int64_t ldc,
                         int tile_rows, int mr, int nr, bool overwrite) {
  constexpr int NR = MicroTile<T>::kNr;
  const size_t row_bytes = sizeof(T) * size_t(kc);
  const Access r = Access::kRead;
  if (lda == 0)
    sanitize_region(ap, row_bytes * size_t(tile_rows), r, "packed A panel");
  else if (lda > 0)
    for (int i = 0; i < tile_rows; ++i) sanitize_region(ap + i * lda, row_bytes, r, "row of A read in place");
  else
    for (int64_t k = 0; k < kc; ++k) sanitize_region(ap + k * -lda, sizeof(T) * size_t(tile_rows), r, "column of A");
  if (ldb == 0)
    sanitize_region(bp, row_bytes * NR, r, "packed B panel");
  else
    for (int64_t k = 0; k < kc; ++k) sanitize_region(bp + k * ldb, sizeof(T) * NR, r, "row of B read in place");
  for (int i = 0; i < mr; ++i)
    sanitize_region(c + i * ldc, sizeof(T) * size_t(nr), overwrite ? Access::kWrite : Access::kReadWrite, "row of C");
}
#endif

constexpr int64_t kMc = 96;    // rows of A per packed block (a multiple of every kernel's MR)
constexpr int64_t kNc = 1024;  // columns of B per packed panel (multiple of kNr)
constexpr int64_t kSplitK = 4096;              // longest K chunk of the split-K path
constexpr int64_t kSplitKMaxOutput = 1 << 16;  // outputs (m * n) small enough for split-K
constexpr int64_t kInPlaceAMaxN = 64;          // N up to which op(A) is read in place
constexpr int64_t kInPlaceBMaxM = 16;          // M up to which B's rows are read in place

// The micro-kernels, narrowest first; the default is the last this CPU supports.
struct KernelEntry {
  const char* name;
  bool (*supported)();
  MicroKernel<float> f32;
  MicroKernel<double> f64;
  int mr;  // the tile's rows
};
const std::vector<KernelEntry>& kernel_table() {
#if defined(STALEPROP_X86_DISPATCH)
  __builtin_cpu_init();  // needed where this runs before main (a static constructor's GEMM)
#endif
  static const std::vector<KernelEntry> table = {
    {"generic", [] { return true; }, &gemm_detail::generic::micro_kernel, &gemm_detail::generic::micro_kernel,
     gemm_detail::generic::kTileRows},
#if defined(STALEPROP_X86_DISPATCH)
    {"avx2", [] { return bool(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")); },
     &gemm_detail::avx2::micro_kernel, &gemm_detail::avx2::micro_kernel, gemm_detail::avx2::kTileRows},
    // __builtin_cpu_supports also checks that the operating system saves the AVX-512 registers.
    {"avx512", [] { return bool(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")); },
     &gemm_detail::avx512::micro_kernel, &gemm_detail::avx512::micro_kernel, gemm_detail::avx512::kTileRows},
#endif
  };
  return table;
}

// A packed A block holds whole tiles of every kernel, none taller than kMaxTileRows.
template <int kRows>
constexpr bool fits_blocks() {
  return kMc % kRows == 0 && kRows <= gemm_detail::kMaxTileRows;
}
static_assert(fits_blocks<gemm_detail::generic::kTileRows>() && fits_blocks<gemm_detail::avx2::kTileRows>() &&
                  fits_blocks<gemm_detail::avx512::kTileRows>(),
              "a packed A block holds whole tiles");

std::string supported_names() {
  std::string names;
  for (const KernelEntry& e : kernel_table())
    if (e.supported()) names += (names.empty() ? "" : ", ") + std::string(e.name);
  return names;
}

// The entry named `name` (which this CPU must support), told as `what` in an error.
int kernel_index(const std::string& name, const char* what) {
  const auto& table = kernel_table();
  for (size_t i = 0; i < table.size(); ++i)
    if (name == table[i].name) {
      SP_CHECK(table[i].supported(), what, ": this CPU cannot run the ", name, " GEMM kernel; it can run ",
               supported_names());
      return int(i);
    }
  throw Error(std::string(what) + ": unknown GEMM kernel '" + name + "'; this CPU can run " + supported_names());
}

int widest_supported() {
  int best = 0;
  for (size_t j = 0; j < kernel_table().size(); ++j)
    if (kernel_table()[j].supported()) best = int(j);
  return best;
}

// A name, or "auto" for the widest this CPU supports.
int choose(const std::string& name, const char* what) {
  return name == "auto" ? widest_supported() : kernel_index(name, what);
}

std::atomic<int> g_kernel{-1};

const KernelEntry& current_kernel() {
  const int i = setting(g_kernel, "STALEPROP_CPU_GEMM",
                        [](const char* env) { return choose(env ? env : "auto", "STALEPROP_CPU_GEMM"); });
  return kernel_table()[size_t(i)];
}

template <typename T>
MicroKernel<T> kernel_function(const KernelEntry& e) {
  if constexpr (std::is_same_v<T, float>)
    return e.f32;
  else
    return e.f64;
}

// 64-byte aligned scratch that grows as needed in buf.
template <typename T>
T* scratch(std::vector<T, std::allocator<T>>& buf, size_t n) {
  if (buf.size() < n + 64 / sizeof(T)) buf.resize(n + 64 / sizeof(T));
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((addr + 63) & ~uintptr_t(63));
}

// The calling thread's buffer for packed panels of A, kept between calls. A function, so that
// each thread that asks (a pool worker included) passes the declaration and so constructs its
// own buffer and has it destroyed when the thread ends; a thread_local named directly in a
// lambda that a worker runs would be the worker's, never constructed and never freed.
template <typename T>
std::vector<T>& a_panel_buffer() {
  static thread_local std::vector<T> buf;
  return buf;
}

template <typename T>
void pack_a(int MR, bool trans, const T* a, int64_t lda, int64_t i0, int64_t mc, int64_t p0, int64_t kc, T* ap) {
  for (int64_t is = 0; is < mc; is += MR) {
    const int64_t rows = std::min<int64_t>(MR, mc - is);
    T* dst = ap + is * kc;
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = i0 + is + i, col = p0 + k;
        dst[k * MR + i] = trans ? a[col * lda + r] : a[r * lda + col];
      }
      for (int64_t i = rows; i < MR; ++i) dst[k * MR + i] = T(0);
    }
  }
}

template <typename T>
void pack_b_strip(bool trans, const T* b, int64_t ldb, int64_t p0, int64_t kc, int64_t j0, int64_t cols, T* bp) {
  constexpr int NR = MicroTile<T>::kNr;
  for (int64_t k = 0; k < kc; ++k) {
    T* dst = bp + k * NR;
    const int64_t row = p0 + k;
    if (!trans) {
      const T* src = b + row * ldb + j0;
      for (int64_t j = 0; j < cols; ++j) dst[j] = src[j];
    } else {
      for (int64_t j = 0; j < cols; ++j) dst[j] = b[(j0 + j) * ldb + row];
    }
    for (int64_t j = cols; j < NR; ++j) dst[j] = T(0);
  }
}

template <typename T>
void scale_c(int64_t m, int64_t n, T beta, T* c, int64_t ldc) {
  parallel_for(m, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T* row = c + i * ldc;
      if (beta == T(0))
        std::fill(row, row + n, T(0));  // beta == 0 must not propagate NaN from C
      else
        for (int64_t j = 0; j < n; ++j) row[j] *= beta;
    }
  });
}

// C += alpha * op(A) * op(B) (C already scaled by beta), or with overwrite C = 0 + alpha * op(A) *
// op(B) without reading C (beta == 0; the first K block overwrites, the later ones add).
// Where N is narrow (a convolution's few output channels), the micro-kernel reads op(A) in
// place instead of packing it (A's rows, or for a transposed A its columns): packing would copy
// all of A to use each element for only a few columns. Likewise B's whole strips where op(B)
// is B and M is at most kInPlaceBMaxM rows (e.g. a pointwise weight gradient with few output
// channels), whose packed panel would serve only a few micro-tiles. The sums are the same
// either way.
template <typename T>
void gemm_accumulate(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                     const T* b, int64_t ldb, T* c, int64_t ldc, const KernelEntry& kernel, bool overwrite = false) {
  constexpr int NR = MicroTile<T>::kNr;
  const int MR = kernel.mr;
  const MicroKernel<T> micro = kernel_function<T>(kernel);
  std::vector<T> b_buf;

  const int64_t m_blocks = (m + kMc - 1) / kMc;
  const bool a_in_place = n <= kInPlaceAMaxN;
  const bool b_in_place = !trans_b && m <= kInPlaceBMaxM;
  for (int64_t p0 = 0; p0 < k; p0 += kGemmKc) {
    const bool first = overwrite && p0 == 0;
    const int64_t kc = std::min(kGemmKc, k - p0);
    for (int64_t j0 = 0; j0 < n; j0 += kNc) {
      const int64_t nc = std::min(kNc, n - j0);
      const int64_t strips = (nc + NR - 1) / NR;
      T* bp = scratch(b_buf, size_t(strips * NR * kc));
      // Strip s is read in place when b_in_place and it is whole; only the others are packed.
      const auto strip_in_place = [&](int64_t s) { return b_in_place && (s + 1) * NR <= nc; };
      parallel_for(strips, 4, [&](int64_t sb, int64_t se) {
        for (int64_t s = sb; s < se; ++s)
          if (!strip_in_place(s))
            pack_b_strip(trans_b, b, ldb, p0, kc, j0 + s * NR, std::min<int64_t>(NR, nc - s * NR), bp + s * NR * kc);
      });
      // Split the N panel too when there are too few M blocks to keep every thread busy.
      const int64_t want = 2 * int64_t(num_threads());
      const int64_t n_split = m_blocks >= want ? 1 : std::min(strips, (want + m_blocks - 1) / m_blocks);
      const int64_t strips_per_task = (strips + n_split - 1) / n_split;
      parallel_for(m_blocks * n_split, 1, [&](int64_t tb, int64_t te) {
        for (int64_t t = tb; t < te; ++t) {
          const int64_t ib = t / n_split, sb = (t % n_split) * strips_per_task;
          const int64_t se = std::min(strips, sb + strips_per_task);
          const int64_t i0 = ib * kMc, mc = std::min(kMc, m - i0);
          // Rows [0, whole) are read in place when a_in_place; the rest (all, or the last
          // partial group of MR rows, which a packed panel pads with zeros) are packed.
          const int64_t whole = a_in_place ? mc / MR * MR : 0;
          T* ap = scratch(a_panel_buffer<T>(), size_t(((mc - whole + MR - 1) / MR) * MR * kc));
          if (whole < mc) pack_a(MR, trans_a, a, lda, i0 + whole, mc - whole, p0, kc, ap);
          for (int64_t s = sb; s < se; ++s) {
            const int64_t jj = j0 + s * NR;
            const int nr = int(std::min<int64_t>(NR, n - jj));
            const bool b_rows = strip_in_place(s);
            for (int64_t is = 0; is < mc; is += MR) {
              const bool in_place = is < whole;
              // In place: rows of A at a + row * lda, or columns of A (trans_a) at a + k * lda + row.
              const T* a_at = trans_a ? a + p0 * lda + (i0 + is) : a + (i0 + is) * lda + p0;
              const T* a_arg = in_place ? a_at : ap + (is - whole) * kc;
              const int64_t lda_arg = in_place ? (trans_a ? -lda : lda) : 0;
              const T* b_arg = b_rows ? b + p0 * ldb + jj : bp + s * NR * kc;
              const int64_t ldb_arg = b_rows ? ldb : 0;
              T* c_at = c + (i0 + is) * ldc + jj;
              const int mr = int(std::min<int64_t>(MR, mc - is));
#if defined(SP_SANITIZE_ADDRESS) || defined(SP_SANITIZE_THREAD)
              sanitize_micro_call(kc, a_arg, lda_arg, b_arg, ldb_arg, c_at, ldc, MR, mr, nr, first);
#endif
              micro(kc, a_arg, lda_arg, b_arg, ldb_arg, c_at, ldc, alpha, mr, nr, first);
            }
          }
        }
      });
    }
  }
}

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const bool direct = k > 0 && alpha != T(0) && (k <= kSplitK || m * n > kSplitKMaxOutput);
  // beta == 0 on the direct path: the first K block overwrites C instead of a zero fill first.
  const bool overwrite = direct && beta == T(0);
  if (beta != T(1) && !overwrite) scale_c(m, n, beta, c, ldc);
  if (k <= 0 || alpha == T(0)) return;
  const KernelEntry& kernel = current_kernel();
  if (direct) {
    gemm_accumulate(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc, kernel, overwrite);
    return;
  }
  // ceil(k / kSplitK) chunks; the ceil(k / kGemmKc) blocks of kGemmKc (the last perhaps
  // shorter) shared out evenly: chunk ch takes blocks [ch * blocks / chunks, (ch + 1) * blocks /
  // chunks), at most kSplitK / kGemmKc of them.
  const int64_t chunks = (k + kSplitK - 1) / kSplitK, blocks = (k + kGemmKc - 1) / kGemmKc;
  std::vector<T> partial(size_t(chunks * m * n), T(0));
  parallel_for(chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t p0 = ch * blocks / chunks * kGemmKc;
      const int64_t kc = std::min(k, (ch + 1) * blocks / chunks * kGemmKc) - p0;
      const T* a_chunk = trans_a ? a + p0 * lda : a + p0;
      const T* b_chunk = trans_b ? b + p0 : b + p0 * ldb;
      gemm_accumulate(trans_a, trans_b, m, n, kc, T(1), a_chunk, lda, b_chunk, ldb, partial.data() + ch * m * n, n,
                      kernel);
    }
  });
  parallel_for(m, 1, [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i)
      for (int64_t j = 0; j < n; ++j) {
        T sum = T(0);
        for (int64_t ch = 0; ch < chunks; ++ch) sum += partial[size_t((ch * m + i) * n + j)];
        c[i * ldc + j] += alpha * sum;
      }
  });
}

std::vector<std::string> gemm_kernels() {
  std::vector<std::string> names;
  for (const KernelEntry& e : kernel_table())
    if (e.supported()) names.push_back(e.name);
  return names;
}
std::string gemm_kernel() { return current_kernel().name; }
void set_gemm_kernel(const std::string& name) {
  g_kernel.store(choose(name, "set_gemm_kernel"), std::memory_order_relaxed);
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t);

}  // namespace sp::kernels::cpu
