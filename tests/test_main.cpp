#include <gtest/gtest.h>

#if defined(__SANITIZE_ADDRESS__)
// Under AddressSanitizer (STALEPROP_ASAN), an allocation too large to serve returns null as
// malloc does, instead of ending the process: the tests of out-of-memory errors need that.
extern "C" const char* __asan_default_options() { return "allocator_may_return_null=1"; }
#endif

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
