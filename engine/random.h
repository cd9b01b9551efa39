// Counter-based randomness: draws derived from hashes of (seed, stream, a, b) rather than from
// one long generator, so any draw can be made without making the ones before it (prefetching,
// resuming at any point, parallel augmentation), and with the same results on every standard
// library (std::*_distribution's outputs are not specified bit for bit).
#pragma once

#include <cstdint>

namespace sp {

// SplitMix64's output function: a bijective 64-bit mixer.
inline uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The key of draw (a, b) of `stream` under `seed`: distinct streams give independent draws.
inline uint64_t random_key(uint64_t seed, uint64_t stream, uint64_t a, uint64_t b) {
  return mix64(mix64(mix64(seed ^ mix64(stream)) + a) + b);
}

// SplitMix64 generator with an unbiased bounded draw.
class SplitMix {
 public:
  explicit SplitMix(uint64_t state) : state_(state) {}
  uint64_t next() {
    state_ += 0x9e3779b97f4a7c15ull;
    return mix64(state_);
  }
  // Uniform in [0, bound), bound > 0, by rejecting the top partial range of 64-bit values.
  uint64_t below(uint64_t bound) {
    const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t r;
    do r = next();
    while (r >= limit);
    return r % bound;
  }

 private:
  uint64_t state_;
};

}  // namespace sp
