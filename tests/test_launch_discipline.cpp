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

namespace {

namespace fs = std::filesystem;

// The file's text with // and /* */ comments blanked out (string literals in these files hold
// no comment markers).
std::string code_of(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string s = ss.str();
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

std::vector<fs::path> cuda_sources() {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(fs::path(STALEPROP_SOURCE_DIR) / "kernels" / "cuda")) {
    const std::string ext = e.path().extension().string();
    if (ext == ".cu" || ext == ".cuh" || ext == ".h") files.push_back(e.path());
  }
  return files;
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
  const std::vector<fs::path> files = cuda_sources();
  ASSERT_GT(files.size(), 5u) << "kernels/cuda not found under " << STALEPROP_SOURCE_DIR;
  size_t kernels = 0;
  for (const fs::path& f : files)
    for (const KernelStart& k : kernel_starts(code_of(f))) {
      EXPECT_TRUE(k.waits) << f.filename().string() << ":" << k.line << ": a kernel must begin with pdl_prologue()";
      ++kernels;
    }
  EXPECT_GE(kernels, 30u) << "fewer kernels than the sources hold: is the scan broken?";
}

TEST(LaunchDiscipline, KernelsAreLaunchedOnlyThroughTheLaunchHelpers) {
  for (const fs::path& f : cuda_sources()) {
    const std::string code = code_of(f), name = f.filename().string();
    EXPECT_EQ(code.find("<<<"), std::string::npos) << name << ": launch through launch_kernel, not <<< >>>";
    const bool allowed = name == "common.cuh" || name == "batchnorm.cu";
    const std::regex ex("cudaLaunch(KernelEx|CooperativeKernel|Kernel)\\b");
    if (!allowed) EXPECT_FALSE(std::regex_search(code, ex)) << name << ": launch through launch_kernel";
  }
}

// The scan itself: a kernel without the prologue, and a chevron launch, are seen.
TEST(LaunchDiscipline, TheScanSeesAMissingPrologue) {
  const fs::path dir = fs::temp_directory_path() / "staleprop_launch_discipline";
  fs::create_directories(dir);
  const fs::path f = dir / "bad.cu";
  std::ofstream(f) << "// __global__ in a comment is no kernel\n"
                      "__global__ void good(int* p) {\n  pdl_prologue();\n  *p = 1;\n}\n"
                      "__global__ void bad(int* p) {\n  *p = 1;  /* pdl_prologue(); */\n}\n";
  const std::vector<KernelStart> starts = kernel_starts(code_of(f));
  ASSERT_EQ(starts.size(), 2u);
  EXPECT_TRUE(starts[0].waits);
  EXPECT_FALSE(starts[1].waits);
  EXPECT_EQ(starts[1].line, 6);
  fs::remove_all(dir);
}

}  // namespace
