#include "engine/tensor.h"

#include <atomic>
#include <cstring>

#include "engine/allocator.h"
#include "engine/stream.h"
#include "kernels/common/error.h"
#include "kernels/common/switches.h"

namespace sp {

struct Tensor::Storage {
  void* data = nullptr;
  size_t bytes = 0;
  CachingAllocator* allocator = nullptr;  // null: caller-owned memory (from_blob) or an arena's
  std::unique_ptr<ArenaLease> lease;      // a recording arena's: notes the release
  ~Storage() {
    if (allocator) allocator->deallocate(data);
  }
};

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {
// Dimensions are not negative, and the tensor's bytes fit in 2^62 (no element count or byte
// size computed from the shape can overflow then).
void check_shape(const Shape& shape, size_t element_bytes) {
  constexpr int64_t kMaxBytes = int64_t(1) << 62;
  int64_t n = int64_t(element_bytes);
  for (int64_t d : shape) {
    SP_CHECK(d >= 0, "negative dimension in shape ", shape_str(shape));
    SP_CHECK(d == 0 || n <= kMaxBytes / d, "shape ", shape_str(shape), " is too large (over 2^62 bytes)");
    n *= d;
  }
}
}  // namespace

namespace {
std::atomic<int> g_poison{-1};

// STALEPROP_ALLOC_POISON=1 (the CPU emulation): the memory of every new tensor, from the caching
// allocator or an arena, is filled with 0xFF bytes (NaN in f32 and bf16) in the order the
// allocator's rule promises is safe: on the stream it is keyed to, after the work queued there
// (the memory's earlier users on that stream; in a captured unit, at each replay), or at once for
// a block of the null key, which no queued work may still use. A block reused while another
// stream (or the host) has yet to read it then reads NaN: the tests run with it see such a breach
// as wrong values wherever the poison runs before the late read (without it, only where the new
// owner's own writes do).
bool poison_allocations() { return kernels::env_switch(g_poison, "STALEPROP_ALLOC_POISON", false); }

void poison(void* data, size_t bytes, const Stream* stream) {
  if (bytes == 0) return;
  if (stream == nullptr) {
    std::memset(data, 0xFF, bytes);
    return;
  }
  const_cast<Stream*>(stream)->enqueue_host([data, bytes] { std::memset(data, 0xFF, bytes); });
}
}  // namespace

void set_allocation_poison(bool on) { kernels::set_switch(g_poison, on); }

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device, const Stream* stream) {
  check_shape(shape, dtype_size(dtype));
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  // A block is keyed to a stream of its own device: that device's allocator retires it with
  // the stream (allocator.h).
  SP_CHECK(stream == nullptr || stream->device() == device, "Tensor::empty on ", device.str(), " keyed to a stream on ",
           stream->device().str());
  if (Arena* arena = stream ? stream->arena() : nullptr) {
    // Graph-safe memory (allocator.h): the arena owns it and the tensor views it, or, while a
    // Planned arena records, the tensor owns a block and tells the arena when it is let go.
    SP_CHECK(arena->device() == device, "Tensor::empty on ", device.str(), " with a stream whose arena is on ",
             arena->device().str());
    SP_CHECK(!stream->capturing() || arena->stable(), "Tensor::empty ", shape_str(shape),
             ": allocation on a capturing stream from an arena that is still recording; its addresses are not "
             "settled yet");
    ArenaAllocation a = arena->allocate(t.storage_->bytes, stream, stream->capturing());
    t.storage_->data = a.data;
    t.storage_->allocator = a.owner;
    t.storage_->lease = std::move(a.lease);
    // In the stream's order (captured, where it captures, and replayed with the unit).
    if (device.is_cpu() && poison_allocations()) poison(t.storage_->data, t.storage_->bytes, stream);
  } else {
    SP_CHECK(stream == nullptr || !stream->capturing(), "Tensor::empty ", shape_str(shape),
             ": allocation on a capturing stream outside an arena; the address would not stay valid when the "
             "graph is replayed");
    t.storage_->allocator = &device_allocator(device);
    t.storage_->data = t.storage_->allocator->allocate(t.storage_->bytes, stream);
    if (device.is_cpu() && poison_allocations()) poison(t.storage_->data, t.storage_->bytes, stream);
  }
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = device;
  return t;
}

Tensor Tensor::from_blob(void* data, const Shape& shape, DType dtype, Device device) {
  check_shape(shape, dtype_size(dtype));
  SP_CHECK(data != nullptr || shape_numel(shape) == 0, "from_blob: null data for shape ", shape_str(shape));
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->data = data;
  t.storage_->bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = device;
  return t;
}

int64_t Tensor::size(int64_t i) const {
  const int64_t d = dim();
  if (i < 0) i += d;
  SP_CHECK(i >= 0 && i < d, "dimension ", i, " out of range for ", str());
  return shape_[size_t(i)];
}

bool Tensor::owns_memory() const { return storage_ && storage_->allocator != nullptr; }

void* Tensor::raw_data() const {
  SP_CHECK(defined(), "access to an undefined tensor");
  return static_cast<char*>(storage_->data) + offset_;
}

void Tensor::check_dtype(DType expected) const {
  if (dtype_ != expected)
    throw ShapeError(detail::concat("tensor ", str(), " accessed as ", dtype_name(expected)));
}

Tensor Tensor::view(const Shape& shape) const {
  check_shape(shape, 1);
  SP_SHAPE_CHECK(shape_numel(shape) == numel(), "view: cannot view ", str(), " as ", shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::slice(int64_t start, int64_t length) const {
  SP_SHAPE_CHECK(dim() >= 1 && start >= 0 && length >= 0 && start <= shape_[0] && length <= shape_[0] - start,
                 "slice of ", length, " from ", start, " out of range for ", str());
  Tensor t = *this;
  t.shape_[0] = length;
  t.offset_ += size_t(start) * (shape_[0] ? nbytes() / size_t(shape_[0]) : 0);
  return t;
}

std::string Tensor::str() const {
  if (!defined()) return "undefined tensor";
  return detail::concat(dtype_name(dtype_), shape_str(shape_), " on ", device_.str());
}

}  // namespace sp
