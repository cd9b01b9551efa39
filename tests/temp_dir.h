// A fresh directory under the system's temporary directory for one test, removed with its
// contents when the test's TempDir goes out of scope; and write_bytes, which fills files there.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace sp::test {

struct TempDir {
  std::filesystem::path path;
  // prefix names the directory (prefix_XXXXXX), so that one left by a crash says whose it is.
  explicit TempDir(const std::string& prefix = "staleprop_test") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "_XXXXXX")).string();
    if (::mkdtemp(tmpl.data()) == nullptr) ADD_FAILURE() << "cannot create a directory " << tmpl;
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
  // The names of the entries in the directory, in the order the file system lists them.
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(path)) names.push_back(e.path().filename().string());
    return names;
  }
};

// Writes bytes to a new file at path (replacing one there); a failure fails the test.
inline void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  // fwrite's buffer may not be null, even for no bytes (an empty vector's data() may be).
  if (!bytes.empty()) {
    ASSERT_EQ(std::fwrite(bytes.data(), 1, bytes.size(), f), bytes.size()) << path;
  }
  std::fclose(f);
}

}  // namespace sp::test
