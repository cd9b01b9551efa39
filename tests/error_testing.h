// expect_error: a call that must throw, with a message naming what went wrong (shared by the
// test files that check the engine's error messages).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "kernels/common/error.h"

namespace sp::test {

// Runs fn, expecting an exception of type E whose message contains every one of `parts`.
template <typename E = Error>
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning '" << parts.back() << "'";
  } catch (const E& e) {
    for (const std::string& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

}  // namespace sp::test
