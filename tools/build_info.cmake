# Run at every build (cmake -P, from tools/CMakeLists.txt): writes OUT, the C++ source of
# tools/build_info.h, with the commit the sources were built from. OUT is rewritten only when
# its text changes, so an unchanged commit recompiles nothing.
#   SRC         the source tree
#   OUT         the file to write
#   VERSION     the project's version
#   BUILD_TYPE  CMAKE_BUILD_TYPE
#   BACKEND     the compiled-in backends, e.g. "CPU" or "CPU + CUDA 13.0 (sm_90a)"
# The commit is git's HEAD, with "-dirty" when tracked files differ from it. A tree without
# .git (the copy the lent GPU machine builds) takes the commit tools/gpu_prepare.sh wrote in
# .carry/commit, else "unknown".
set(commit "unknown")
find_package(Git QUIET)
if(GIT_FOUND AND EXISTS "${SRC}/.git")
  execute_process(COMMAND "${GIT_EXECUTABLE}" -C "${SRC}" rev-parse --short=12 HEAD
                  OUTPUT_VARIABLE head RESULT_VARIABLE rc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(rc EQUAL 0 AND NOT head STREQUAL "")
    set(commit "${head}")
    execute_process(COMMAND "${GIT_EXECUTABLE}" -C "${SRC}" status --porcelain --untracked-files=no
                    OUTPUT_VARIABLE changes RESULT_VARIABLE rc ERROR_QUIET)
    if(NOT rc EQUAL 0 OR NOT changes STREQUAL "")
      string(APPEND commit "-dirty")
    endif()
  endif()
elseif(EXISTS "${SRC}/.carry/commit")
  file(STRINGS "${SRC}/.carry/commit" carried LIMIT_COUNT 1)
  if(carried MATCHES "^([0-9a-f]+)(-dirty)?$")
    string(SUBSTRING "${CMAKE_MATCH_1}" 0 12 commit)
    string(APPEND commit "${CMAKE_MATCH_2}")
  endif()
endif()
if(BUILD_TYPE STREQUAL "")
  set(BUILD_TYPE "unspecified")
endif()
set(text "// Written by tools/build_info.cmake at build time; do not edit.
#include \"tools/build_info.h\"

namespace sp::build {
const char* version() { return \"${VERSION}\"; }
const char* commit() { return \"${commit}\"; }
const char* build_type() { return \"${BUILD_TYPE}\"; }
const char* backends() { return \"${BACKEND}\"; }
}  // namespace sp::build
")
if(EXISTS "${OUT}")
  file(READ "${OUT}" old)
  if(old STREQUAL text)
    return()
  endif()
endif()
file(WRITE "${OUT}" "${text}")
