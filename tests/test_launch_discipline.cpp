// The launch discipline of the CUDA kernels (kernels/cuda/common.cuh), checked on the sources so
// that it holds without a GPU: with programmatic dependent launch on (STALEPROP_PDL=1) a kernel
// may start before the previous kernel in its stream has finished, which is safe only because
// every kernel first waits for it (pdl_prologue). So:
//   * every __global__ function's body begins with pdl_prologue();
//   * no kernel is launched with <<< >>>: launches go through launch_kernel (which sets the
//     attribute) or, for the cooperative batch norm, cudaLaunchKernelEx in batchnorm.cu.
// A kernel added without the prologue, or launched another way, fails here.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "tests/source_dir.h"

namespace {
namespace test = sp::test;

namespace fs = std::filesystem;

// The text with // and /* */ comments blanked out (string literals in these files hold no
// comment markers).
std::string without_comments(const std::string& s) {
  std::string out = s;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s.compare(i, 2, "//") == 0) {
      while (i < s.size() && s[i] != '\n') out[i++] = ' ';
    } else if (s.compare(i, 2, "/*") == 0) {
      const size_t end = s.find("*/", i + 2);
      const size_t stop = end == std::string::npos ? s.size() : end + 2;
      for (; i < stop; ++i)
        if (s[i] != '\n') out[i] = ' ';
      --i;
    }
  }
  return out;
}

std::string code_of(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return without_comments(ss.str());
}

// Every file under kernels/ (CUDA code may only live in kernels/cuda, but a kernel elsewhere
// must follow the discipline too).
std::vector<fs::path> kernel_sources() {
  std::vector<fs::path> files;
  const fs::path dir = fs::path(test::source_dir()) / "kernels";
  if (!fs::is_directory(dir)) return files;  // the test says where it looked
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) files.push_back(e.path());
  return files;
}

// A kernel launch other than through launch_kernel: chevrons, or a runtime or driver launch call.
bool has_other_launch(const std::string& code) {
  static const std::regex launch("<<<|\\bcu(da)?Launch\\w*|\\bcudaGraphAddKernelNode|\\bcuGraphAddKernelNode");
  return std::regex_search(code, launch);
}

// Each __global__ function of the code: its line and whether its body begins with the prologue.
struct KernelStart {
  int line;
  bool waits;
};
std::vector<KernelStart> kernel_starts(const std::string& code) {
  std::vector<KernelStart> starts;
  for (size_t at = code.find("__global__"); at != std::string::npos; at = code.find("__global__", at + 1)) {
    const size_t body = code.find('{', at);
    const size_t first = body == std::string::npos ? body : code.find_first_not_of(" \t\n", body + 1);
    const int line = int(std::count(code.begin(), code.begin() + long(at), '\n')) + 1;
    starts.push_back({line, first != std::string::npos && code.compare(first, 16, "pdl_prologue();\n") == 0});
  }
  return starts;
}

TEST(LaunchDiscipline, EveryKernelBeginsByWaitingForTheKernelBeforeIt) {
  const std::vector<fs::path> files = kernel_sources();
  ASSERT_GT(files.size(), 5u) << "kernels/ not found under " << test::source_dir();
  size_t kernels = 0;
  for (const fs::path& f : files)
    for (const KernelStart& k : kernel_starts(code_of(f))) {
      EXPECT_TRUE(k.waits) << f.filename().string() << ":" << k.line << ": a kernel must begin with pdl_prologue()";
      ++kernels;
    }
  EXPECT_GE(kernels, 30u) << "fewer kernels than the sources hold: is the scan broken?";
}

TEST(LaunchDiscipline, KernelsAreLaunchedOnlyThroughTheLaunchHelpers) {
  // common.cuh holds launch_kernel and its siblings (launch_kernel_with, _in_clusters, ...); batchnorm.cu builds the
  // cooperative kernels' launch attribute (no PDL attribute) for launch_kernel_with, and may name launch
  // attributes, but launches nothing itself.
  const std::vector<fs::path> files = kernel_sources();
  ASSERT_GT(files.size(), 5u) << "kernels/ not found under " << test::source_dir();
  size_t exempt = 0, scanned = 0;
  for (const fs::path& f : files) {
    const std::string name = f.filename().string();
    if (name == "common.cuh") {
      EXPECT_EQ(code_of(f).find("<<<"), std::string::npos) << name;
      ++exempt;
      continue;
    }
    std::string code = code_of(f);
    if (name == "batchnorm.cu") {
      ++exempt;
      const std::string attributes = std::regex_replace(code, std::regex("\\bcudaLaunchAttribute\\w*"), "");
      EXPECT_NE(attributes, code) << name << ": it no longer builds a launch attribute: the exemption is stale";
      code = attributes;
    }
    EXPECT_FALSE(has_other_launch(code)) << name << ": launch through launch_kernel";
    scanned += f.extension() == ".cu";
  }
  EXPECT_EQ(exempt, 2u) << "common.cuh or batchnorm.cu not found: the exemptions are stale";
  EXPECT_GE(scanned, 8u) << "fewer .cu files than kernels/cuda holds: is the scan broken?";
}

// The scans themselves: a kernel without the prologue, one whose prologue is only in a comment,
// and the launches that bypass launch_kernel are seen; comments are not.
TEST(LaunchDiscipline, TheScansSeeWhatTheyMustAndNothingElse) {
  const std::string code = without_comments(
      "// __global__ in a comment is no kernel, nor is k<<<1, 1>>>() here\n"
      "__global__ void good(int* p) {\n  pdl_prologue();\n  *p = 1;\n}\n"
      "__global__ void bad(int* p) {\n  *p = 1;  /* pdl_prologue(); */\n}\n");
  const std::vector<KernelStart> starts = kernel_starts(code);
  ASSERT_EQ(starts.size(), 2u);
  EXPECT_TRUE(starts[0].waits);
  EXPECT_FALSE(starts[1].waits);
  EXPECT_EQ(starts[1].line, 6);
  EXPECT_FALSE(has_other_launch(code));
  for (const char* launch : {"k<<<grid, 256>>>(x);", "cudaLaunchKernelExC(&cfg, f, args);",
                             "cudaLaunchCooperativeKernel(f, g, b, a, 0, s);", "cuLaunchKernel(f, 1, 1, 1);",
                             "cudaGraphAddKernelNode(&n, g, nullptr, 0, &p);"})
    EXPECT_TRUE(has_other_launch(launch)) << launch;
  EXPECT_FALSE(has_other_launch("launch_kernel(k, grid, 256, 0, stream, x);"));
}

}  // namespace
