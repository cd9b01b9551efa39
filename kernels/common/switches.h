// Process-wide on/off switches of kernels and layers (e.g. STALEPROP_DGRAD_CLASSES,
// STALEPROP_BF16_WEIGHT_COPIES): a value set by the program, else read once from the environment.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace sp::kernels {

// A process-wide setting kept in `slot` (-1: not chosen yet, else a value >= 0): what was set,
// else, at first use, from_env(the environment variable `var`, nullptr when unset or empty), kept
// from then on. A value set racing the first read wins or is seen by it, never overwritten.
template <class FromEnv>
int setting(std::atomic<int>& slot, const char* var, const FromEnv& from_env) {
  const int v = slot.load(std::memory_order_relaxed);
  if (v >= 0) return v;
  const char* env = std::getenv(var);
  const int chosen = from_env(env && *env ? env : nullptr);
  int expected = -1;
  return slot.compare_exchange_strong(expected, chosen, std::memory_order_relaxed) ? chosen : expected;
}

// An on/off switch: "1" on, "0" off, anything else or unset: default_on.
inline bool env_switch(std::atomic<int>& slot, const char* var, bool default_on) {
  return setting(slot, var, [default_on](const char* env) {
           return env && std::strcmp(env, "1") == 0 ? 1 : env && std::strcmp(env, "0") == 0 ? 0 : int(default_on);
         }) == 1;
}
// Sets such a switch, overriding the environment from then on.
inline void set_switch(std::atomic<int>& slot, bool on) { slot.store(on ? 1 : 0, std::memory_order_relaxed); }

}  // namespace sp::kernels
