#include "engine/allocator.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

#include "engine/stream.h"
#include "kernels/common/error.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/common/cuda_check.h"
#endif

namespace sp {

CachingAllocator::CachingAllocator(std::string name, RawAlloc raw_alloc, RawFree raw_free)
    : name_(std::move(name)), raw_alloc_(std::move(raw_alloc)), raw_free_(std::move(raw_free)) {}

CachingAllocator::~CachingAllocator() { empty_cache(); }

size_t CachingAllocator::round_size(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = size_t(1) << 20;
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
  auto& pool = free_[stream_key];
  // Best fit among cached blocks of this stream, accepting at most 2x waste.
  auto it = pool.lower_bound(size);
  if (it != pool.end() && it->first <= 2 * size) {
    ptr = it->second;
    live_[ptr] = Block{it->first, stream_key};
    stats_.allocated_bytes += it->first;
    pool.erase(it);
  } else {
    ptr = raw_alloc_(size);
    if (!ptr) {
      // Out of memory: give every cached block back and try once more.
      release_cached_locked();
      ptr = raw_alloc_(size);
      SP_CHECK(ptr != nullptr, name_, ": out of memory allocating ", bytes, " bytes (", stats_.allocated_bytes,
               " bytes in use, ", stats_.reserved_bytes, " reserved)");
    }
    ++stats_.backend_allocs;
    stats_.reserved_bytes += size;
    stats_.allocated_bytes += size;
    live_[ptr] = Block{size, stream_key};
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
  free_[it->second.key].emplace(it->second.size, ptr);
  live_.erase(it);
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lk(mu_);
  release_cached_locked();
}

void CachingAllocator::release_cached_locked() {
  for (auto& [key, blocks] : free_)
    for (auto& [sz, p] : blocks) {
      raw_free_(p);
      ++stats_.backend_frees;
      stats_.reserved_bytes -= sz;
    }
  free_.clear();
}

AllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void CachingAllocator::reset_peak() {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.peak_allocated_bytes = stats_.allocated_bytes;
  stats_.peak_reserved_bytes = stats_.reserved_bytes;
}

namespace {

void* host_alloc(size_t bytes) { return std::aligned_alloc(64, (bytes + 63) / 64 * 64); }

std::unique_ptr<CachingAllocator> make_device_allocator(Device device) {
  if (device.is_cpu()) return std::make_unique<CachingAllocator>("cpu allocator", host_alloc, std::free);
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

CachingAllocator& device_allocator(Device device) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, std::unique_ptr<CachingAllocator>> allocators;
  std::lock_guard<std::mutex> lk(mu);
  auto& slot = allocators[{int(device.type), device.is_cpu() ? 0 : device.index}];
  if (!slot) slot = make_device_allocator(device);
  return *slot;
}

Arena::Arena(Device device, size_t chunk_bytes) : device_(device), chunk_bytes_(std::max<size_t>(chunk_bytes, 256)) {}

Arena::~Arena() {
  CachingAllocator& backend = device_allocator(device_);
  for (const Chunk& c : chunks_) backend.deallocate(c.data);
}

void* Arena::allocate(size_t bytes) {
  constexpr size_t kAlign = 256;
  const size_t size = std::max<size_t>(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  // The first chunk from the current one on with room at its end; the sequence of chunks
  // visited depends only on the sequence of sizes since reset(), so addresses repeat.
  while (chunk_ < chunks_.size() && offset_ + size > chunks_[chunk_].size) ++chunk_, offset_ = 0;
  if (chunk_ == chunks_.size()) {
    const size_t chunk_size = std::max(chunk_bytes_, size);
    chunks_.push_back({device_allocator(device_).allocate(chunk_size), chunk_size});
    offset_ = 0;
  }
  void* ptr = static_cast<char*>(chunks_[chunk_].data) + offset_;
  offset_ += size;
  used_ += size;
  peak_used_ = std::max(peak_used_, used_);
  return ptr;
}

void Arena::reset() { chunk_ = 0, offset_ = 0, used_ = 0; }

size_t Arena::reserved_bytes() const {
  size_t n = 0;
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
