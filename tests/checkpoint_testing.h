// expect_same_tensors: two safetensors checkpoints hold the same tensors, bit for bit;
// any_tensor_differs: some tensor of the two differs (shared by the test files that compare
// whole runs).
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

// Whether the two checkpoints hold the same tensor names and shapes but some tensor's bytes differ:
// the control that a change to a run reached its weights.
inline bool any_tensor_differs(const std::string& a, const std::string& b) {
  const io::SafetensorsFile fa = io::read_safetensors(a), fb = io::read_safetensors(b);
  EXPECT_EQ(fa.tensors.size(), fb.tensors.size());
  bool differs = false;
  for (const io::TensorRecord& r : fa.tensors) {
    const io::TensorRecord* o = fb.find(r.name);
    EXPECT_NE(o, nullptr) << r.name;
    if (o == nullptr) continue;
    EXPECT_EQ(r.shape, o->shape) << r.name;
    differs = differs || !(r.data == o->data);
  }
  return differs;
}

}  // namespace sp::test
