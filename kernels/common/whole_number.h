// A whole number read from an environment variable or a flag, within a range: anything else
// (text after the digits, a sign, a value outside the range) throws sp::Error naming `what`,
// rather than falling back to a default without a word. Shared by the CPU pool's thread count
// (kernels/cpu/parallel.cpp) and the tiled launches' split cap (kernels/cuda/tile_plan.h).
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels/common/error.h"

namespace sp::kernels {

// `what` must be a whole number of `unit` from lo to hi.
inline int64_t parse_whole_number(const char* what, const char* unit, const char* text, int64_t lo, int64_t hi) {
  char* end = nullptr;
  errno = 0;
  const long long v = text ? std::strtoll(text, &end, 10) : 0;
  if (!text || *text < '0' || *text > '9' || *end != '\0' || errno == ERANGE || v < lo || v > hi)
    throw Error(std::string(what) + " must be a whole number of " + unit + " from " + std::to_string(lo) + " to " +
                std::to_string(hi) + ", got '" + (text ? text : "") + "'");
  return v;
}

}  // namespace sp::kernels
