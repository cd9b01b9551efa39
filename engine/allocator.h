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
#include <memory>
#include <mutex>
#include <string>
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
  // Cached bytes that are handed out no more: blocks given back after the stream they were
  // keyed to was destroyed (see retire_stream), until empty_cache().
  size_t orphaned_bytes = 0;
};

class CachingAllocator {
 public:
  using RawAlloc = std::function<void*(size_t)>;  // returns nullptr when out of memory
  using RawFree = std::function<void(void*)>;

  // free_waits: raw_free waits for the work queued on the device (cudaFree does; the CPU
  // emulation's std::free does not). An allocation the backend refuses then empties the whole
  // cache and tries once more; without it, only the blocks of destroyed streams (retire_stream)
  // are given back before the second try.
  CachingAllocator(std::string name, RawAlloc raw_alloc, RawFree raw_free, bool free_waits = true);
  ~CachingAllocator();  // returns cached blocks; blocks still handed out are leaked by the owner
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Throws sp::Error naming the size and the allocator's state when the backend is out of
  // memory (even after the cache was emptied, where free_waits), or the size is over 2^62.
  void* allocate(size_t bytes, const void* stream_key = nullptr);
  void deallocate(void* ptr);
  // Returns every cached (unused) block to the backend. cudaFree waits for the device's queued
  // work; the CPU emulation's free does not, so on the CPU call it only with the device's
  // streams idle (the allocator's destructor at exit), which is why the out-of-memory retry
  // needs free_waits.
  void empty_cache();
  AllocatorStats stats() const;
  void reset_peak();
  // The stream `stream_key` is destroyed and its work done: its cached blocks may serve
  // allocations of any stream (tried after the allocating stream's own). Blocks still handed
  // out under it are not reused once they come back (another stream's work may still read
  // them, and none orders after it); empty_cache() returns them, and so does the out-of-memory
  // retry where the backend's free waits for queued work (CUDA; the CPU emulation's retry
  // returns only the blocks cached under retired streams).
  // Keys are stream addresses, which a later stream may get again; retiring keeps such a
  // stream from inheriting blocks it cannot order.
  void retire_stream(const void* stream_key);

  // Bytes handed out, and their high-water mark since reset_owner_peak(), of the blocks
  // allocated while `owner` was the calling thread's AllocationOwner (freed from any thread):
  // one training run's own memory when several share the allocator (staleprop sweep).
  struct OwnerStats {
    size_t allocated_bytes = 0, peak_allocated_bytes = 0;
  };
  OwnerStats owner_stats(int owner) const;
  void reset_owner_peak(int owner);

  // Size classes: multiples of 512 B up to 1 MiB, then 1/8-power-of-two steps.
  static size_t round_size(size_t bytes);

 private:
  void release_cached_locked();  // empty_cache() with mu_ held
  void release_blocks_locked(const std::multimap<size_t, void*>& blocks);  // to the backend; mu_ held
  static const void* retired_key();   // the key of destroyed streams' cached blocks
  static const void* orphaned_key();  // the key of blocks returned after their stream was destroyed
  struct Block {
    size_t size;
    const void* key;
    int owner;  // the allocating thread's AllocationOwner (0: none)
  };
  std::unordered_map<int, OwnerStats> owners_;
  std::string name_;
  RawAlloc raw_alloc_;
  RawFree raw_free_;
  bool free_waits_ = true;
  mutable std::mutex mu_;
  std::unordered_map<void*, Block> live_;
  // Cached free blocks per stream key, ordered by size for best fit.
  std::map<const void*, std::multimap<size_t, void*>> free_;
  AllocatorStats stats_;
};

// The process-wide allocator of a device (CPU memory is 64-byte aligned).
CachingAllocator& device_allocator(Device device);

// While it lives, what the constructing thread allocates is counted for a fresh owner id as
// well (CachingAllocator::owner_stats), so one run among several in a process can report its own
// memory. Nests: the innermost owner counts. A CPU stream runs each closure under the owner of
// the thread that enqueued it, so what its ops allocate on the worker counts for that owner.
class AllocationOwner {
 public:
  struct Adopt {};
  AllocationOwner();
  AllocationOwner(int id, Adopt);  // counts for an existing owner (0: none) instead
  ~AllocationOwner();
  AllocationOwner(const AllocationOwner&) = delete;
  AllocationOwner& operator=(const AllocationOwner&) = delete;
  int id() const { return id_; }
  static int current();  // the calling thread's innermost owner, 0 when none

 private:
  int id_, outer_;
};

// device_allocator(device).retire_stream(stream_key), called by a stream's destructor once its
// work is done.
void retire_stream_memory(Device device, const void* stream_key);

// Memory whose addresses must repeat, for captured graphs. The scheduler resets a module's
// arena where a captured unit of work begins, so eager runs, the capture and every replay of
// that work place their tensors at the same addresses. The owner makes sure that work reading
// memory handed out before a reset() is ordered before work writing it after (the scheduler:
// one stream per arena, and every user of the memory on that stream).
//
// Two policies:
//   * Bump: allocate() hands out consecutive pieces of chunks taken from the device's caching
//     allocator at offsets that are multiples of 256 bytes (so aligned as the chunks are: 256
//     bytes on CUDA, 64 on the CPU); reset() starts again from the first chunk, so the same
//     sequence of sizes after each reset() gets the same addresses. Nothing is reused within a
//     cycle (reset to reset): a cycle holds the sum of everything it allocated.
//   * Planned: the arena first records cycles. A recording cycle hands out ordinary blocks of
//     the caching allocator (keyed to the stream, as eager work gets them) and notes each
//     allocation's size and when its memory was released: how many allocations of the cycle
//     had been made when its last tensor died. Once two consecutive cycles record the same
//     trace, the arena plans it (plan_arena: offsets in one block such that allocations whose
//     lifetimes overlap get disjoint bytes) and from then on hands allocation i of every cycle
//     the planned address, checking that its size is the recorded one. A cycle that departs
//     from the plan turns the arena into a Bump one (what was planned keeps its block, for
//     graphs already captured from it), unless a capture is running: a captured unit's work
//     must be the work the arena planned, and anything else is an error. A released
//     tensor's bytes are reused only by allocations made after the host let go of it, which
//     the same stream orders after all the work that used it: the caching allocator's rule.
//     The releases noted are the host's: queued work holds no tensors (CUDA kernels hold
//     none, and the CPU emulation's closures borrow theirs, ops.cpp). If the traces do not
//     settle within kMaxRecordings cycles the arena falls back to Bump.
class ArenaLease;

struct ArenaAllocation {
  void* data = nullptr;
  CachingAllocator* owner = nullptr;  // set: the caller gives `data` back to it (a recording cycle)
  std::unique_ptr<ArenaLease> lease;  // set: destroy it when the memory's last user is gone
};

// Offsets for a cycle of allocations: allocation i takes sizes[i] bytes and stays live until
// released[i] allocations of the cycle have been made (i < released[i] <= n; n: live at the
// end). Allocations i < j overlap in time when j < released[i]; those get disjoint byte
// ranges, others may share. Greedy by size (largest first, each at the best-fitting gap among
// the ranges of the placed allocations it overlaps). bytes: the end of the highest range.
struct ArenaPlan {
  std::vector<size_t> offsets;
  size_t bytes = 0;
};
ArenaPlan plan_arena(const std::vector<size_t>& sizes, const std::vector<size_t>& released);

class Arena {
 public:
  enum class Policy { Bump, Planned };
  static constexpr int kMaxRecordings = 6;

  explicit Arena(Device device, size_t chunk_bytes = size_t(4) << 20, Policy policy = Policy::Bump);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  Device device() const { return device_; }
  // `stream_key`: the stream whose work uses the memory (the key of the caching allocator's
  // blocks the arena takes). `capturing`: a graph capture is running on that stream.
  ArenaAllocation allocate(size_t bytes, const void* stream_key = nullptr, bool capturing = false);
  // Ends the current cycle (Planned: its trace may complete the recording) and starts one.
  void reset();

  Policy policy() const { return policy_; }  // Bump after a Planned arena gave up
  // Planned and still recording: allocations are the caching allocator's, addresses vary.
  bool recording() const { return policy_ == Policy::Planned && !planned_; }
  // Addresses of a repeated sequence of sizes repeat from now on (Bump, or a Planned arena
  // whose plan is made).
  bool stable() const { return !recording(); }
  // The arena's own memory (chunks, planned block; not a recording cycle's blocks, which the
  // caching allocator counts): the end of what this cycle was handed, the most any cycle was
  // (Planned: the plan's size), and what the arena holds.
  size_t used_bytes() const { return used_; }
  size_t peak_used_bytes() const { return peak_used_; }
  size_t reserved_bytes() const;
  int recorded_cycles() const { return recordings_; }

  struct Trace;  // shared with the leases, which may outlive the arena

 private:
  // A bump allocation; a new chunk is a block of the caching allocator keyed to `stream_key`
  // (so that, the arena gone, only that stream, which orders its queued work first, takes it
  // again; under the null key another stream or the host could have had it while the arena's
  // stream still used it). An arena should go before its stream: chunks given back after the
  // stream was retired stay with the retired streams' blocks, unused until empty_cache().
  void* bump(size_t size, const void* stream_key);
  struct Chunk {
    void* data;
    size_t size;
  };
  Device device_;
  size_t chunk_bytes_;
  Policy policy_;
  std::vector<Chunk> chunks_;
  size_t chunk_ = 0, offset_ = 0, used_ = 0, peak_used_ = 0;
  // Planned
  std::shared_ptr<Trace> trace_;
  std::vector<size_t> previous_sizes_, previous_released_;
  int recordings_ = 0;
  bool begun_ = false, planned_ = false;
  ArenaPlan plan_;
  std::vector<size_t> plan_sizes_;
  void* block_ = nullptr;
  const void* key_ = nullptr;  // the stream key of the recorded allocations
  size_t next_ = 0;
};

// Reports the release of a recorded allocation to its arena's trace (from any thread).
class ArenaLease {
 public:
  ArenaLease(std::shared_ptr<Arena::Trace> trace, uint64_t cycle, size_t index)
      : trace_(std::move(trace)), cycle_(cycle), index_(index) {}
  ~ArenaLease();
  ArenaLease(const ArenaLease&) = delete;
  ArenaLease& operator=(const ArenaLease&) = delete;

 private:
  std::shared_ptr<Arena::Trace> trace_;
  uint64_t cycle_;
  size_t index_;
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
