#include <gtest/gtest.h>

// Under AddressSanitizer (STALEPROP_ASAN) or ThreadSanitizer (STALEPROP_TSAN), an allocation too
// large to serve returns null as malloc does, instead of ending the process: the tests of
// out-of-memory errors need that.
#if defined(__SANITIZE_ADDRESS__)
extern "C" const char* __asan_default_options() { return "allocator_may_return_null=1"; }
#endif
#if defined(__SANITIZE_THREAD__)
extern "C" const char* __tsan_default_options() { return "allocator_may_return_null=1"; }
#endif

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
