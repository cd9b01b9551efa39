// expect_same_tensors: two safetensors checkpoints hold the same tensors, bit for bit (shared
// by the test files that compare whole runs).
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "engine/safetensors.h"

namespace sp::test {

inline void expect_same_tensors(const std::string& a, const std::string& b) {
  const io::SafetensorsFile fa = io::read_safetensors(a), fb = io::read_safetensors(b);
  ASSERT_EQ(fa.tensors.size(), fb.tensors.size());
  for (const io::TensorRecord& r : fa.tensors) {
    const io::TensorRecord* o = fb.find(r.name);
    ASSERT_NE(o, nullptr) << r.name;
    EXPECT_EQ(r.shape, o->shape) << r.name;
    EXPECT_TRUE(r.data == o->data) << r.name << " differs between " << a << " and " << b;
  }
}

}  // namespace sp::test
