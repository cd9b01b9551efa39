// Caching allocator: device memory is requested from the backend (cudaMalloc, or aligned host
// memory for the CPU) only when no cached block fits, so a training step that repeats the same
// allocation pattern stops calling the backend after its first iteration.
//
// Stream ordering (as in PyTorch's caching allocator): a block is cached under the stream key it
// was allocated with and reused only by allocations with the same key. Work on one stream is
// ordered, so a block freed on the host while its last kernel is still queued cannot be handed
// to a kernel of another stream. Memory used by several streams must be kept alive by its owner
// until an event orders the uses (the scheduler's queues own persistent buffers for this).
// The key nullptr is for long-lived allocations (parameters, optimizer state).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "engine/device.h"

namespace sp {

struct AllocatorStats {
  size_t allocated_bytes = 0;       // bytes in blocks handed out now (rounded sizes)
  size_t peak_allocated_bytes = 0;  // high-water mark of allocated_bytes since reset_peak()
  size_t reserved_bytes = 0;        // allocated + cached, i.e. what the backend holds for us
  size_t peak_reserved_bytes = 0;
  uint64_t backend_allocs = 0;  // calls to the backend's allocate (cudaMalloc on a GPU)
  uint64_t backend_frees = 0;
  uint64_t allocs = 0;  // calls to allocate()
};

class CachingAllocator {
 public:
  using RawAlloc = std::function<void*(size_t)>;  // returns nullptr when out of memory
  using RawFree = std::function<void(void*)>;

  CachingAllocator(std::string name, RawAlloc raw_alloc, RawFree raw_free);
  ~CachingAllocator();  // returns cached blocks; blocks still handed out are leaked by the owner
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Throws sp::Error naming the size and the allocator's state when the backend is out of
  // memory even after the cache was emptied.
  void* allocate(size_t bytes, const void* stream_key = nullptr);
  void deallocate(void* ptr);
  void empty_cache();  // returns every cached (unused) block to the backend
  AllocatorStats stats() const;
  void reset_peak();

  // Size classes: multiples of 512 B up to 1 MiB, then 1/8-power-of-two steps.
  static size_t round_size(size_t bytes);

 private:
  void release_cached_locked();  // empty_cache() with mu_ held
  struct Block {
    size_t size;
    const void* key;
  };
  std::string name_;
  RawAlloc raw_alloc_;
  RawFree raw_free_;
  mutable std::mutex mu_;
  std::unordered_map<void*, Block> live_;
  // Cached free blocks per stream key, ordered by size for best fit.
  std::map<const void*, std::multimap<size_t, void*>> free_;
  AllocatorStats stats_;
};

// The process-wide allocator of a device (CPU memory is 64-byte aligned).
CachingAllocator& device_allocator(Device device);

// A bump allocator for memory whose addresses must repeat: allocate() hands out consecutive
// pieces of chunks taken from a device's caching allocator, at offsets that are multiples of
// 256 bytes (so aligned as the chunks are: 256 bytes on CUDA, 64 on the CPU), and reset()
// starts again from the first chunk, so the same sequence of sizes after each reset() gets
// the same addresses. This is what lets a captured graph be replayed: the scheduler resets a
// module's arena where its captured work begins, so eager runs, the capture and every replay
// of that work place their tensors at the same addresses. Nothing is freed before the arena
// is destroyed; a chunk is added when the current ones are full. The owner makes sure that
// work reading memory handed out before a reset() is ordered before work writing it after
// (the scheduler: one stream per arena).
class Arena {
 public:
  explicit Arena(Device device, size_t chunk_bytes = size_t(4) << 20);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  Device device() const { return device_; }
  void* allocate(size_t bytes);
  void reset();
  size_t used_bytes() const { return used_; }          // handed out since the last reset()
  size_t peak_used_bytes() const { return peak_used_; }  // most handed out between resets
  size_t reserved_bytes() const;                          // held in chunks

 private:
  struct Chunk {
    void* data;
    size_t size;
  };
  Device device_;
  size_t chunk_bytes_;
  std::vector<Chunk> chunks_;
  size_t chunk_ = 0, offset_ = 0, used_ = 0, peak_used_ = 0;
};

class Stream;

// Routes the allocations keyed to `s` to `arena` (nullptr: none) for the scope's lifetime.
class ArenaScope {
 public:
  ArenaScope(Stream& s, Arena* arena);
  ~ArenaScope();
  ArenaScope(const ArenaScope&) = delete;
  ArenaScope& operator=(const ArenaScope&) = delete;

 private:
  Stream& s_;
  Arena* previous_;
};

// Page-locked host memory for asynchronous host<->device copies; ordinary aligned memory in a
// build without CUDA or on a machine without a GPU.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& o) noexcept;
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return bytes_; }
  bool pinned() const { return pinned_; }

 private:
  void release();
  void* data_ = nullptr;
  size_t bytes_ = 0;
  bool pinned_ = false;
};

}  // namespace sp
