// Where the tests find the source tree and the real CIFAR-10 files. A build carried to another
// machine (tools/gpu_prepare.sh's prebuilt tests, run where the tree lies elsewhere) names the
// tree there in $STALEPROP_SOURCE_DIR; otherwise it is the tree the test was built from.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "tools/cifar10.h"

namespace sp::test {

inline std::string source_dir() {
  if (const char* env = std::getenv("STALEPROP_SOURCE_DIR"); env && *env) return env;
  return STALEPROP_SOURCE_DIR;
}

// $CIFAR10_DIR, else <source_dir()>/data/cifar-10-batches-bin: the first that holds every file
// of the official binary version; empty when neither does.
inline std::string real_cifar10_dir() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("CIFAR10_DIR"); env && *env) candidates.push_back(env);
  candidates.push_back(source_dir() + "/data/cifar-10-batches-bin");
  for (const std::string& dir : candidates) {
    bool all = true;
    for (const data::Split s : {data::Split::Train, data::Split::Test})
      for (const std::string& name : data::cifar10_file_names(s))
        all = all && std::filesystem::is_regular_file(std::filesystem::path(dir) / name);
    if (all) return dir;
  }
  return "";
}

// Why a test needing the real data skips.
inline std::string no_cifar10_reason() {
  return "CIFAR-10 not found in $CIFAR10_DIR or " + source_dir() +
         "/data/cifar-10-batches-bin (fetch it with tools/fetch_cifar10.sh)";
}

}  // namespace sp::test
