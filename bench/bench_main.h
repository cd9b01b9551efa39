// The main of the Google Benchmark programs: BENCHMARK_MAIN's, with the build that made the
// figures (version, commit, backends: tools/build_info.h) in the JSON context as staleprop_build.
#pragma once

#include <benchmark/benchmark.h>

#include "tools/build_info.h"

namespace sp::bench {

inline void add_build_context() { benchmark::AddCustomContext("staleprop_build", sp::build::describe()); }

inline int benchmark_main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  add_build_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace sp::bench
