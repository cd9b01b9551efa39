// Error reporting shared by every floor of staleprop.
//
// All failures surface as sp::Error (or a subclass) whose message names what failed and where.
// The vendor-library check macros (CUDA runtime, cuBLAS, cuDNN, NCCL) live in cuda_check.h so
// that CPU-only translation units do not need the CUDA headers.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace sp {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  // what(): the whole message; for a failed SP_CHECK that starts with the condition and the
  // source line, and message() is the part written for the user (what the command line prints).
  Error(const std::string& what, std::string message) : std::runtime_error(what), message_(std::move(message)) {}
  const char* message() const noexcept { return message_.empty() ? what() : message_.c_str(); }

 private:
  std::string message_;
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

// The part of an exception's message written for the user (Error::message() for ours).
inline const char* user_message(const std::exception& e) noexcept {
  const auto* ours = dynamic_cast<const Error*>(&e);
  return ours ? ours->message() : e.what();
}

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
[[noreturn]] inline void throw_check(const char* cond, const char* file, int line, const std::string& msg) {
  throw Error(concat("check failed: ", cond, " at ", file, ":", line, ": ", msg), msg);
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
