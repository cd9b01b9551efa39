// Element storage of activations: fp32, or bf16 bit patterns (uint16_t) that an fp32 op widens
// on load and rounds (to nearest even) on store. Kernels templated on a storage policy S compute
// in fp32 in both cases, so their bf16 instance gives exactly what widening the inputs, running
// the fp32 instance and rounding the outputs would give, without the extra passes.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include <type_traits>

namespace sp::kernels::cuda::detail {

// bf16 <-> f32, bit-identical to kernels/cpu/elementwise.cpp.
__device__ __forceinline__ uint16_t bf16_from_f32(float f) {
  uint32_t bits = __float_as_uint(f);
  // A NaN keeps its sign and top payload bits and gets the quiet bit, so it cannot round to infinity.
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x0040u);
  // Round to nearest, ties to even; a carry into the exponent is the correct rounding.
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}
__device__ __forceinline__ float f32_from_bf16(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

// load8/store8 move eight consecutive elements (column_plan.h's kChunkElems) with 16-byte
// accesses: p must be 16-byte aligned. Element e of the chunk is v[e], widened or rounded exactly
// as load/store do one at a time.
struct F32 {
  using Storage = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
  __device__ static void load8(const float* p, float (&v)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
  __device__ static void store8(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};
struct BF16 {
  using Storage = uint16_t;
  __device__ static float load(uint16_t v) { return f32_from_bf16(v); }
  __device__ static uint16_t store(float v) { return bf16_from_f32(v); }
  // Little-endian: the element at the lower address is the low half of each 32-bit word.
  __device__ static void load8(const uint16_t* p, float (&v)[8]) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = __uint_as_float(w[k] << 16);
      v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
  __device__ static void store8(uint16_t* p, const float (&v)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      w[k] = uint32_t(bf16_from_f32(v[2 * k])) | (uint32_t(bf16_from_f32(v[2 * k + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <int W>
using Width = std::integral_constant<int, W>;

// W elements from p into v: a 16-byte chunk load when W is 8 (p aligned), else one at a time.
template <class S, int W>
__device__ __forceinline__ void load_elems(const typename S::Storage* p, float (&v)[W]) {
  if constexpr (W == 8) {
    S::load8(p, v);
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) v[e] = S::load(p[e]);
  }
}
template <class S, int W>
__device__ __forceinline__ void store_elems(typename S::Storage* p, const float (&v)[W]) {
  if constexpr (W == 8) {
    S::store8(p, v);
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) p[e] = S::store(v[e]);
  }
}

// The first n <= 8 elements of a chunk one at a time and zeros after them (a chunk cut at the
// row end, or any chunk on the single-element path).
template <class S>
__device__ __forceinline__ void load_elems_partial(const typename S::Storage* p, int n, float (&v)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = e < n ? S::load(p[e]) : 0.f;
}

// Whether every non-null pointer is 16-byte aligned (the chunk loads' requirement).
template <class... P>
inline bool all_aligned16(const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}

}  // namespace sp::kernels::cuda::detail
