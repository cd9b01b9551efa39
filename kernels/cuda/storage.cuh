// Element storage of activations: fp32, or bf16 bit patterns (uint16_t) that an fp32 op widens
// on load and rounds (to nearest even) on store. Kernels templated on a storage policy S compute
// in fp32 in both cases, so their bf16 instance gives exactly what widening the inputs, running
// the fp32 instance and rounding the outputs would give, without the extra passes.
#pragma once

#include <cstdint>

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

struct F32 {
  using Storage = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
struct BF16 {
  using Storage = uint16_t;
  __device__ static float load(uint16_t v) { return f32_from_bf16(v); }
  __device__ static uint16_t store(float v) { return bf16_from_f32(v); }
};

}  // namespace sp::kernels::cuda::detail
