#include "engine/allocator.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <memory>
#include <vector>

#include "engine/stream.h"
#include "kernels/common/error.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/common/cuda_check.h"
#endif

namespace sp {

namespace {
thread_local int t_owner = 0;
std::atomic<int> g_next_owner{1};
}  // namespace

AllocationOwner::AllocationOwner() : id_(g_next_owner.fetch_add(1)), outer_(t_owner) { t_owner = id_; }
AllocationOwner::AllocationOwner(int id, Adopt) : id_(id), outer_(t_owner) { t_owner = id_; }
AllocationOwner::~AllocationOwner() { t_owner = outer_; }
int AllocationOwner::current() { return t_owner; }

CachingAllocator::CachingAllocator(std::string name, RawAlloc raw_alloc, RawFree raw_free, bool free_waits)
    : name_(std::move(name)),
      raw_alloc_(std::move(raw_alloc)),
      raw_free_(std::move(raw_free)),
      free_waits_(free_waits) {}

CachingAllocator::~CachingAllocator() { empty_cache(); }

size_t CachingAllocator::round_size(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = size_t(1) << 20;
  // No backend holds 2^62 bytes; above that the steps below would overflow.
  SP_CHECK(bytes <= (size_t(1) << 62), "cannot allocate ", bytes, " bytes (over 2^62)");
  if (bytes == 0) bytes = 1;
  if (bytes <= kLarge) return (bytes + kSmall - 1) / kSmall * kSmall;
  size_t pow2 = kLarge;
  while (pow2 * 2 < bytes) pow2 *= 2;
  const size_t step = pow2 / 8;
  return (bytes + step - 1) / step * step;
}

void* CachingAllocator::allocate(size_t bytes, const void* stream_key) {
  const size_t size = round_size(bytes);
  std::lock_guard<std::mutex> lk(mu_);
  ++stats_.allocs;
  void* ptr = nullptr;
  // Best fit among cached blocks of this stream, else among those of destroyed streams,
  // accepting at most 2x waste.
  const int owner = t_owner;
  size_t got = 0;
  auto take = [&](std::multimap<size_t, void*>& pool) {
    auto it = pool.lower_bound(size);
    if (it == pool.end() || it->first > 2 * size) return false;
    ptr = it->second;
    got = it->first;
    live_[ptr] = Block{it->first, stream_key, owner};
    stats_.allocated_bytes += it->first;
    pool.erase(it);
    return true;
  };
  if (!take(free_[stream_key]) && !take(free_[retired_key()])) {
    ptr = raw_alloc_(size);
    if (!ptr) {
      // Out of memory: give cached blocks back and try once more. Every one where the backend's
      // free waits for the work queued on the device (cudaFree does). Otherwise (the CPU
      // emulation's free) only those of destroyed streams, whose work is done: a block cached
      // for a live stream may still be written by its queued work.
      if (free_waits_) {
        release_cached_locked();
      } else if (auto retired = free_.find(retired_key()); retired != free_.end()) {
        release_blocks_locked(retired->second);
        free_.erase(retired);
      }
      ptr = raw_alloc_(size);
    }
    SP_CHECK(ptr != nullptr, name_, ": out of memory allocating ", bytes, " bytes (", stats_.allocated_bytes,
             " bytes in use, ", stats_.reserved_bytes, " reserved)");
    ++stats_.backend_allocs;
    stats_.reserved_bytes += size;
    stats_.allocated_bytes += size;
    live_[ptr] = Block{size, stream_key, owner};
    got = size;
  }
  if (owner != 0) {
    OwnerStats& o = owners_[owner];
    o.allocated_bytes += got;
    o.peak_allocated_bytes = std::max(o.peak_allocated_bytes, o.allocated_bytes);
  }
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  stats_.peak_reserved_bytes = std::max(stats_.peak_reserved_bytes, stats_.reserved_bytes);
  return ptr;
}

void CachingAllocator::deallocate(void* ptr) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lk(mu_);
  auto it = live_.find(ptr);
  SP_CHECK(it != live_.end(), name_, ": deallocate of a pointer this allocator did not hand out");
  stats_.allocated_bytes -= it->second.size;
  if (it->second.owner != 0) owners_[it->second.owner].allocated_bytes -= it->second.size;
  if (it->second.key == orphaned_key()) stats_.orphaned_bytes += it->second.size;
  free_[it->second.key].emplace(it->second.size, ptr);
  live_.erase(it);
}

const void* CachingAllocator::retired_key() {
  static const char tag = 0;
  return &tag;
}

const void* CachingAllocator::orphaned_key() {
  static const char tag = 0;
  return &tag;
}

void CachingAllocator::retire_stream(const void* stream_key) {
  if (stream_key == nullptr) return;
  std::lock_guard<std::mutex> lk(mu_);
  auto it = free_.find(stream_key);
  if (it != free_.end()) {
    free_[retired_key()].merge(it->second);
    free_.erase(it);
  }
  // Blocks still in use may be read by another stream's work when they come back, and no
  // stream orders after that: they stay cached but are handed out no more (orphaned_key()'s
  // pool is never drawn from), until the cache is emptied.
  for (auto& [ptr, block] : live_)
    if (block.key == stream_key) block.key = orphaned_key();
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lk(mu_);
  release_cached_locked();
}

void CachingAllocator::release_blocks_locked(const std::multimap<size_t, void*>& blocks) {
  for (auto& [sz, p] : blocks) {
    raw_free_(p);
    ++stats_.backend_frees;
    stats_.reserved_bytes -= sz;
  }
}

void CachingAllocator::release_cached_locked() {
  for (auto& [key, blocks] : free_) release_blocks_locked(blocks);
  free_.clear();
  stats_.orphaned_bytes = 0;
}

AllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

CachingAllocator::OwnerStats CachingAllocator::owner_stats(int owner) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = owners_.find(owner);
  return it == owners_.end() ? OwnerStats{} : it->second;
}

void CachingAllocator::reset_owner_peak(int owner) {
  std::lock_guard<std::mutex> lk(mu_);
  OwnerStats& o = owners_[owner];
  o.peak_allocated_bytes = o.allocated_bytes;
}

void CachingAllocator::reset_peak() {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.peak_allocated_bytes = stats_.allocated_bytes;
  stats_.peak_reserved_bytes = stats_.reserved_bytes;
}

namespace {

void* host_alloc(size_t bytes) { return std::aligned_alloc(64, (bytes + 63) / 64 * 64); }

std::unique_ptr<CachingAllocator> make_device_allocator(Device device) {
  if (device.is_cpu()) {
    SP_CHECK(device.index >= 0 && device.index < Device::kMaxCpuDevices, "no emulated device ", device.str());
    return std::make_unique<CachingAllocator>(device.str() + " allocator", host_alloc, std::free, false);
  }
#if STALEPROP_WITH_CUDA
  const int index = device.index;
  SP_CHECK(index >= 0 && index < cuda_device_count(), "no CUDA device ", device.str(), " (", cuda_device_count(),
           " visible)");
  return std::make_unique<CachingAllocator>(
      device.str() + " allocator",
      [index](size_t bytes) -> void* {
        SP_CUDA_CHECK(cudaSetDevice(index));
        void* p = nullptr;
        const cudaError_t st = cudaMalloc(&p, bytes);
        if (st == cudaErrorMemoryAllocation) {
          cudaGetLastError();  // clear the sticky-free OOM status; the caller retries or throws
          return nullptr;
        }
        SP_CUDA_CHECK(st);
        return p;
      },
      [index](void* p) {
        cudaSetDevice(index);
        cudaFree(p);
      });
#else
  throw NotSupportedError("no allocator for " + device.str() + ": this build has no CUDA backend");
#endif
}

}  // namespace

namespace {

// The device allocators, made at first use (a stream's destructor only looks one up).
struct Allocators {
  std::mutex mu;
  std::map<std::pair<int, int>, std::unique_ptr<CachingAllocator>> by_device;
  static std::pair<int, int> key(Device d) { return {int(d.type), d.index}; }
};
Allocators& allocators() {
  static Allocators a;
  return a;
}

}  // namespace

void retire_stream_memory(Device device, const void* stream_key) {
  // From a destructor: never make an allocator (nothing of this stream's is cached if there is
  // none), and never throw.
  Allocators& all = allocators();
  CachingAllocator* found = nullptr;
  {
    std::lock_guard<std::mutex> lk(all.mu);
    auto it = all.by_device.find(Allocators::key(device));
    if (it != all.by_device.end()) found = it->second.get();
  }
  if (found) found->retire_stream(stream_key);
}

CachingAllocator& device_allocator(Device device) {
  Allocators& all = allocators();
  std::lock_guard<std::mutex> lk(all.mu);
  auto& slot = all.by_device[Allocators::key(device)];
  if (!slot) slot = make_device_allocator(device);
  return *slot;
}

ArenaPlan plan_arena(const std::vector<size_t>& sizes, const std::vector<size_t>& released) {
  const size_t n = sizes.size();
  SP_CHECK(released.size() == n, "plan_arena: ", n, " sizes but ", released.size(), " release points");
  for (size_t i = 0; i < n; ++i)
    SP_CHECK(released[i] > i && released[i] <= n, "plan_arena: allocation ", i, " released after ", released[i],
             " of ", n, " allocations");
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return sizes[a] > sizes[b]; });
  ArenaPlan plan;
  plan.offsets.assign(n, 0);
  std::vector<size_t> placed;
  std::vector<std::pair<size_t, size_t>> busy;  // [begin, end) of the placed ones live with i
  for (const size_t i : order) {
    busy.clear();
    for (const size_t j : placed) {
      const size_t first = std::min(i, j), second = std::max(i, j);
      if (second < released[first]) busy.push_back({plan.offsets[j], plan.offsets[j] + sizes[j]});
    }
    std::sort(busy.begin(), busy.end());
    // The smallest gap that holds sizes[i]; else above everything.
    size_t best = SIZE_MAX, best_gap = SIZE_MAX, cursor = 0;
    for (const auto& [begin, end] : busy) {
      if (begin > cursor && begin - cursor >= sizes[i] && begin - cursor < best_gap)
        best = cursor, best_gap = begin - cursor;
      cursor = std::max(cursor, end);
    }
    plan.offsets[i] = best != SIZE_MAX ? best : cursor;
    plan.bytes = std::max(plan.bytes, plan.offsets[i] + sizes[i]);
    placed.push_back(i);
  }
  return plan;
}

// What a recording cycle notes; leases write to it from whichever thread drops a tensor.
struct Arena::Trace {
  std::mutex mu;
  uint64_t cycle = 1;
  std::vector<size_t> sizes, released;  // released: SIZE_MAX while live
};

ArenaLease::~ArenaLease() {
  std::lock_guard<std::mutex> lk(trace_->mu);
  if (trace_->cycle == cycle_ && trace_->released[index_] == SIZE_MAX) trace_->released[index_] = trace_->sizes.size();
}

Arena::Arena(Device device, size_t chunk_bytes, Policy policy)
    : device_(device), chunk_bytes_(std::max<size_t>(chunk_bytes, 256)), policy_(policy) {
  if (policy_ == Policy::Planned) trace_ = std::make_shared<Trace>();
}

Arena::~Arena() {
  CachingAllocator& backend = device_allocator(device_);
  for (const Chunk& c : chunks_) backend.deallocate(c.data);
  if (block_) backend.deallocate(block_);
}

void* Arena::bump(size_t size, const void* stream_key) {
  // The first chunk from the current one on with room at its end; the sequence of chunks
  // visited depends only on the sequence of sizes since reset(), so addresses repeat.
  while (chunk_ < chunks_.size() && offset_ + size > chunks_[chunk_].size) ++chunk_, offset_ = 0;
  if (chunk_ == chunks_.size()) {
    const size_t chunk_size = std::max(chunk_bytes_, size);
    chunks_.push_back({device_allocator(device_).allocate(chunk_size, stream_key), chunk_size});
    offset_ = 0;
  }
  void* ptr = static_cast<char*>(chunks_[chunk_].data) + offset_;
  offset_ += size;
  used_ += size;
  peak_used_ = std::max(peak_used_, used_);
  return ptr;
}

ArenaAllocation Arena::allocate(size_t bytes, const void* stream_key, bool capturing) {
  constexpr size_t kAlign = 256;
  const size_t size = std::max<size_t>(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  ArenaAllocation a;
  if (policy_ == Policy::Planned && planned_) {
    const size_t i = next_++;
    if (i < plan_sizes_.size() && plan_sizes_[i] == size) {
      a.data = static_cast<char*>(block_) + plan_.offsets[i];
      used_ = std::max(used_, plan_.offsets[i] + size);
      return a;
    }
    SP_CHECK(!capturing, "arena: allocation ", i, " of a captured cycle asks for ", size, " bytes but the plan recorded ",
             i < plan_sizes_.size() ? std::to_string(plan_sizes_[i]) + " bytes"
                                    : std::to_string(plan_sizes_.size()) + " allocations",
             ": the captured work is not the work the arena planned");
    // The work changed: keep everything from here on (the block stays, with what the cycle
    // placed in it and what captured graphs use).
    policy_ = Policy::Bump;
    used_ = 0;
  }
  if (policy_ == Policy::Bump) {
    a.data = bump(size, stream_key);
  } else {
    CachingAllocator& backend = device_allocator(device_);
    a.data = backend.allocate(size, stream_key);
    a.owner = &backend;
    key_ = stream_key;
    std::lock_guard<std::mutex> lk(trace_->mu);
    a.lease = std::make_unique<ArenaLease>(trace_, trace_->cycle, trace_->sizes.size());
    trace_->sizes.push_back(size);
    trace_->released.push_back(SIZE_MAX);
  }
  return a;
}

void Arena::reset() {
  chunk_ = 0, offset_ = 0, used_ = 0, next_ = 0;
  if (!recording()) return;
  std::vector<size_t> sizes, released;
  {
    std::lock_guard<std::mutex> lk(trace_->mu);
    if (!begun_) {  // the first reset() starts the first cycle (unless work came before it)
      begun_ = true;
      if (trace_->sizes.empty()) return;
    }
    sizes.swap(trace_->sizes);
    released.swap(trace_->released);
    ++trace_->cycle;  // releases of the finished cycle's tensors are not noted any more
  }
  for (size_t& r : released) r = std::min(r, sizes.size());  // live at the end
  ++recordings_;
  if (recordings_ >= 2 && sizes == previous_sizes_ && released == previous_released_) {
    plan_ = plan_arena(sizes, released);
    plan_sizes_ = std::move(sizes);
    if (plan_.bytes > 0) block_ = device_allocator(device_).allocate(plan_.bytes, key_);
    peak_used_ = plan_.bytes;
    planned_ = true;
    trace_.reset();
    return;
  }
  if (recordings_ >= kMaxRecordings) {
    policy_ = Policy::Bump;  // the work does not repeat exactly: keep everything instead
    trace_.reset();
    return;
  }
  previous_sizes_ = std::move(sizes);
  previous_released_ = std::move(released);
}

size_t Arena::reserved_bytes() const {
  size_t n = block_ ? plan_.bytes : 0;
  for (const Chunk& c : chunks_) n += c.size;
  return n;
}

ArenaScope::ArenaScope(Stream& s, Arena* arena) : s_(s), previous_(s.arena()) {
  SP_CHECK(arena == nullptr || arena->device() == s.device(), "an arena of ", arena ? arena->device().str() : "",
           " cannot serve a stream of ", s.device().str());
  s_.set_arena(arena);
}

ArenaScope::~ArenaScope() { s_.set_arena(previous_); }

PinnedBuffer::PinnedBuffer(size_t bytes) : bytes_(bytes) {
#if STALEPROP_WITH_CUDA
  if (cuda_device_count() > 0) {
    SP_CUDA_CHECK(cudaHostAlloc(&data_, bytes, cudaHostAllocDefault));
    pinned_ = true;
    return;
  }
#endif
  data_ = host_alloc(bytes);
  SP_CHECK(data_ != nullptr, "out of host memory allocating ", bytes, " bytes");
}

PinnedBuffer::~PinnedBuffer() { release(); }

PinnedBuffer::PinnedBuffer(PinnedBuffer&& o) noexcept : data_(o.data_), bytes_(o.bytes_), pinned_(o.pinned_) {
  o.data_ = nullptr;
  o.bytes_ = 0;
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    bytes_ = o.bytes_;
    pinned_ = o.pinned_;
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void PinnedBuffer::release() {
  if (!data_) return;
#if STALEPROP_WITH_CUDA
  if (pinned_) {
    cudaFreeHost(data_);
    data_ = nullptr;
    return;
  }
#endif
  std::free(data_);
  data_ = nullptr;
}

}  // namespace sp
