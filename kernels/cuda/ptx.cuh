// The inline PTX of the tensor-core path (mma_mainloop.cuh), and nothing else: every
// instruction the bf16 main loop issues that CUDA C++ has no intrinsic for lives here, behind
// small wrappers that take generic pointers to shared memory. Keeping it in one header means a
// host emulation of exactly these wrappers can stand in for it (fragment layouts as in the PTX
// ISA, "Matrix Fragments for mma.m16n8k16" and "ldmatrix").
//
// Fragment layouts (g = lane / 4, t = lane % 4; each uint32_t holds two bf16, the lower
// column / k index in the low half):
//   A 16x16 (row-major)  a[0] = A(g, 2t..2t+1)   a[1] = A(g+8, 2t..)  a[2] = A(g, 2t+8..)  a[3] = A(g+8, 2t+8..)
//   B 16x8  ("col")      b[0] = B(2t..2t+1, g)   b[1] = B(2t+8.., g)
//   C/D 16x8 (fp32)      d[0], d[1] = D(g, 2t), D(g, 2t+1)   d[2], d[3] = D(g+8, 2t), D(g+8, 2t+1)
// ldmatrix.x4: lanes 8j..8j+7 give the row addresses (16 bytes each) of 8x8 matrix j, and
// register j of lane l receives row l / 4, elements 2(l % 4)..+1 of matrix j; with .trans it
// receives column l / 4, elements (rows) 2(l % 4)..+1 instead.
#pragma once

#include <cstdint>

namespace sp::kernels::cuda::ptx {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The dynamic shared memory of the launch (its size is the launch's third argument).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char sp_dynamic_smem[];
  return sp_dynamic_smem;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

// d = a * b + d, bf16 inputs, fp32 accumulation.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Copies 16 bytes global -> shared bypassing L1; only the first src_bytes (0..16) are read, the
// rest of the 16 shared bytes are zero-filled. Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace sp::kernels::cuda::ptx
