// Tensor: a dense, contiguous, row-major array with a shape, a dtype and a device.
//
// Owning tensors hold a reference to storage from the device's caching allocator; views share
// the storage of the tensor they come from (view(), slice()), or wrap memory the caller owns
// (from_blob(), which never frees). Copies of a Tensor are shallow: they share storage, which
// lives until the last Tensor referring to it is gone. Work queued on a stream does not keep
// storage alive, on the CPU emulation as on CUDA: the engine's CPU dispatch captures only the
// memory (ops.cpp: borrow), so memory used by several streams must be kept by its owner until
// an event orders the uses (allocator.h).
//
// Layout conventions: activations NHWC, conv weights KRSC (see kernels/common/shapes.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/device.h"

namespace sp {

class Stream;
using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& shape);

// Overrides STALEPROP_ALLOC_POISON (tensor.cpp): CPU blocks of the caching allocator filled with
// NaN bytes when handed out, in stream order, to show any reuse that breaks the allocator's rule.
void set_allocation_poison(bool on);
int64_t shape_numel(const Shape& shape);

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::F32;
};
template <>
struct DTypeOf<uint16_t> {  // bf16 bit patterns
  static constexpr DType value = DType::BF16;
};
template <>
struct DTypeOf<uint8_t> {
  static constexpr DType value = DType::U8;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::I32;
};

class Tensor {
 public:
  Tensor() = default;  // undefined: no storage (used for optional op arguments)

  // Uninitialised memory from the device's caching allocator. `stream` is the stream on which
  // the memory will be used (see allocator.h on stream ordering); nullptr for long-lived data.
  // While the stream has an arena (ArenaScope), the memory comes from the arena instead (while a
  // Planned arena records: a caching-allocator block whose release the arena traces).
  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::cpu(), const Stream* stream = nullptr);
  // A non-owning view of caller-owned memory.
  static Tensor from_blob(void* data, const Shape& shape, DType dtype, Device device = Device::cpu());

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim() const { return int64_t(shape_.size()); }
  int64_t size(int64_t i) const;  // negative i counts from the end
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  // True when this tensor's storage came from the caching allocator (not from_blob or an arena's
  // own memory; a recording arena hands out the caching allocator's blocks, see allocator.h).
  bool owns_memory() const;

  void* raw_data() const;
  template <typename T>
  T* data() const {
    check_dtype(DTypeOf<T>::value);
    return static_cast<T*>(raw_data());
  }

  // Same storage, new shape with the same number of elements.
  Tensor view(const Shape& shape) const;
  // Rows [start, start + length) of dimension 0, sharing storage.
  Tensor slice(int64_t start, int64_t length) const;

  std::string str() const;  // e.g. "f32[128, 32, 32, 16] on cpu"

  // CPU tensors only: element access for tests and tools.
  template <typename T>
  T& at(int64_t flat_index) const {
    return data<T>()[flat_index];
  }

 private:
  struct Storage;
  void check_dtype(DType expected) const;
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes from the start of the storage
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_;
};

}  // namespace sp
