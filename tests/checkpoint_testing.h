// Comparing the tensors of two safetensors checkpoints (shared by the test files that compare
// whole runs): expect_same_tensors, they hold the same tensors bit for bit; any_tensor_differs,
// some tensor's bytes differ (the control that a change to a run reached its weights). Both
// require the same names, dtypes and shapes.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine/safetensors.h"

namespace sp::test {

// The names of the tensors whose bytes differ; a name in one file only, or another shape, is a
// test failure.
inline std::vector<std::string> differing_tensors(const std::string& a, const std::string& b) {
  const io::SafetensorsFile fa = io::read_safetensors(a), fb = io::read_safetensors(b);
  EXPECT_EQ(fa.tensors.size(), fb.tensors.size()) << a << " and " << b;
  std::vector<std::string> differ;
  for (const io::TensorRecord& r : fa.tensors) {
    const io::TensorRecord* o = fb.find(r.name);
    EXPECT_NE(o, nullptr) << r.name << " is in " << a << ", not in " << b;
    if (o == nullptr) continue;
    EXPECT_EQ(r.dtype, o->dtype) << r.name;
    EXPECT_EQ(r.shape, o->shape) << r.name;
    if (!(r.data == o->data)) differ.push_back(r.name);
  }
  return differ;
}

inline void expect_same_tensors(const std::string& a, const std::string& b) {
  for (const std::string& name : differing_tensors(a, b))
    ADD_FAILURE() << name << " differs between " << a << " and " << b;
}

inline bool any_tensor_differs(const std::string& a, const std::string& b) { return !differing_tensors(a, b).empty(); }

}  // namespace sp::test
