// What this binary was built from, so that every result it writes can name it: the version,
// the commit (git's HEAD when built, "-dirty" when tracked files differed from it, "unknown"
// outside a git tree), the build type and the compiled-in backends. Generated at every build
// by tools/build_info.cmake.
#pragma once

#include <string>

namespace sp::build {

const char* version();
const char* commit();
const char* build_type();
const char* backends();

// One line: "staleprop 0.1.0 (commit 0123456789ab, Release, CPU + CUDA 13.0 (sm_90a))".
inline std::string describe() {
  return std::string("staleprop ") + version() + " (commit " + commit() + ", " + build_type() + ", " + backends() + ")";
}

}  // namespace sp::build
