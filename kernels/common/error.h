// Error reporting shared by every floor of staleprop.
//
// All failures surface as sp::Error (or a subclass) whose message names what failed and where.
// The vendor-library check macros (CUDA runtime, cuBLAS, cuDNN, NCCL) live in cuda_check.h so
// that CPU-only translation units do not need the CUDA headers.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace sp {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A tensor argument of the wrong shape or dtype for an op.
class ShapeError : public Error {
 public:
  using Error::Error;
};

// A call into the CUDA runtime or a CUDA library returned an error status.
class CudaError : public Error {
 public:
  using Error::Error;
};

// The requested combination (op, device, dtype) has no implementation in this build.
class NotSupportedError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
[[noreturn]] inline void throw_check(const char* cond, const char* file, int line, const std::string& msg) {
  throw Error(concat("check failed: ", cond, " at ", file, ":", line, ": ", msg));
}
}  // namespace detail

}  // namespace sp

// SP_CHECK(cond, parts...): throw sp::Error with the streamed message parts when cond is false.
#define SP_CHECK(cond, ...)                                                               \
  do {                                                                                    \
    if (!(cond)) ::sp::detail::throw_check(#cond, __FILE__, __LINE__, ::sp::detail::concat(__VA_ARGS__)); \
  } while (0)

// SP_SHAPE_CHECK(cond, parts...): throw sp::ShapeError (for argument shape/dtype mismatches).
#define SP_SHAPE_CHECK(cond, ...)                                                          \
  do {                                                                                     \
    if (!(cond)) throw ::sp::ShapeError(::sp::detail::concat(__VA_ARGS__, " [", #cond, "]")); \
  } while (0)
