// Process-wide on/off switches of kernels and layers (e.g. STALEPROP_DGRAD_CLASSES,
// STALEPROP_BF16_WEIGHT_COPIES): a value set by the program, else read once from the environment.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace sp::kernels {

// The value of a switch kept in `slot` (-1: not chosen yet): what was set (slot 0 or 1), else, at
// first use, the environment variable `var` ("1" on, "0" off, anything else or unset: default_on),
// kept from then on. A set_switch racing the first read wins or is seen by it, never overwritten.
inline bool env_switch(std::atomic<int>& slot, const char* var, bool default_on) {
  const int v = slot.load(std::memory_order_relaxed);
  if (v >= 0) return v == 1;
  const char* env = std::getenv(var);
  const int chosen = env && std::strcmp(env, "1") == 0 ? 1 : env && std::strcmp(env, "0") == 0 ? 0 : default_on;
  int expected = -1;
  return (slot.compare_exchange_strong(expected, chosen, std::memory_order_relaxed) ? chosen : expected) == 1;
}
// Sets such a switch, overriding the environment from then on.
inline void set_switch(std::atomic<int>& slot, bool on) { slot.store(on ? 1 : 0, std::memory_order_relaxed); }

}  // namespace sp::kernels
