// A small fork-join thread pool for the CPU reference kernels.
//
// parallel_for(n, grain, fn) splits [0, n) into fixed chunks of at least `grain` items and
// calls fn(begin, end) for each, on the pool's workers and on the calling thread, returning
// when all chunks are done. Chunk boundaries depend only on n, grain and the pool size, so a
// kernel that writes each output from exactly one chunk is deterministic. Several threads may
// call parallel_for at once (each CPU stream is a thread); nested calls run inline.
// Thread count: $STALEPROP_NUM_THREADS, else std::thread::hardware_concurrency().
#pragma once

#include <cstdint>
#include <functional>

namespace sp::kernels::cpu {

int num_threads();
constexpr int kMaxThreads = 1024;  // the most STALEPROP_NUM_THREADS (or --threads) may ask for
// $STALEPROP_NUM_THREADS's value: a whole number from 1 to kMaxThreads (empty or null: 0, meaning every
// core). Anything else throws sp::Error naming the variable, rather than quietly using every
// core. The pool reads it once, at its first use.
int parse_num_threads(const char* text);
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace sp::kernels::cpu
