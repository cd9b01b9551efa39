// One value's bf16 conversions, shared by the conversion ops (elementwise.cpp) and by the
// optimizer's bf16 weight copies (optim.cpp), so both round alike. The CUDA twins are in
// kernels/cuda/storage.cuh and give the same bits.
#pragma once

#include <cstdint>
#include <cstring>

namespace sp::kernels::cpu {

// Round to nearest, ties to even; NaN stays NaN.
inline uint16_t bf16_from_f32(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    // Truncating a NaN could clear every mantissa bit left and turn it into infinity;
    // setting the quiet bit keeps it a NaN (and makes a signalling NaN quiet).
    return uint16_t((bits >> 16) | 0x0040u);
  }
  // Round to nearest, ties to even: add just under half an ulp of bf16, plus one more when
  // the bit that will become the last kept one is odd. A carry into the exponent is the
  // correct rounding (up to the next binade, or to infinity past the largest finite value).
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float f32_from_bf16(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace sp::kernels::cpu
