// Which sanitizer instruments this translation unit: SP_SANITIZE_ADDRESS (AddressSanitizer) or
// SP_SANITIZE_THREAD (ThreadSanitizer), from GCC's __SANITIZE_*__ macros or Clang's
// __has_feature. The builds that set them: STALEPROP_ASAN and STALEPROP_TSAN (CMakeLists.txt).
#pragma once

#if defined(__SANITIZE_ADDRESS__)
#define SP_SANITIZE_ADDRESS 1
#elif defined(__SANITIZE_THREAD__)
#define SP_SANITIZE_THREAD 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SP_SANITIZE_ADDRESS 1
#elif __has_feature(thread_sanitizer)
#define SP_SANITIZE_THREAD 1
#endif
#endif
