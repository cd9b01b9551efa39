// Reading and writing the safetensors format (https://github.com/huggingface/safetensors), the
// checkpoint format of staleprop, so checkpoints can be inspected with the Python tooling.
//
// Layout: an 8-byte little-endian u64 N; N bytes of UTF-8 JSON header
//   {"__metadata__":{"k":"v",...},"name":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},...}
// padded with spaces to a multiple of 8; then the data buffer. Offsets are relative to the start
// of the data buffer; each tensor is contiguous, row-major, little-endian. Metadata values are
// strings.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/tensor.h"

namespace sp::io {

struct TensorRecord {
  std::string name;
  std::string dtype;           // "F32", "BF16", "F16", "I64", "I32", "U8", "F64"
  std::vector<int64_t> shape;  // [] is a scalar with one element
  std::vector<uint8_t> data;   // numel(shape) * dtype size bytes
};

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  std::vector<TensorRecord> tensors;  // in the order of their data in the file
  // The tensor called `name`, or nullptr.
  const TensorRecord* find(const std::string& name) const;
};

// Bytes per element of a safetensors dtype name; throws sp::Error for a name not listed above.
size_t safetensors_dtype_size(const std::string& dtype);

// Writes the tensors after a header that lists "__metadata__" first (when not empty) and then the
// tensors in the order of their data, in compact JSON. The data are in the given order within
// each element size, the largest sizes first, so that every tensor is aligned to its element
// size. Atomic: the file is written to a new temporary file PATH.tmp.<pid>.<n> (created
// exclusively, never through an existing file or link: a name already taken, say by a writer
// with the same pid in another container, is passed over for the next n), flushed to disk,
// renamed over PATH and the directory flushed, so PATH holds either the old or the complete new
// file even if the process or machine dies. Throws sp::Error naming the path for invalid records
// (duplicate or empty names, data size not matching dtype and shape) and for I/O failures
// (leaving no temporary file behind).
void write_safetensors(const std::string& path, const std::vector<TensorRecord>& tensors,
                       const std::map<std::string, std::string>& metadata);

// Reads and validates a whole file. Throws sp::Error naming the file for what is not a regular
// file (a FIFO is refused, not waited on), a malformed header (bad JSON, unknown dtype or key,
// duplicate names, non-string metadata), a header longer than the file, and offsets that are out
// of range, overlap, leave gaps or do not match dtype and shape.
SafetensorsFile read_safetensors(const std::string& path);

// The CRC-32 (ISO-HDLC, as zlib's crc32) of `size` bytes, continuing from `crc` (0 to begin).
uint32_t crc32(const void* data, size_t size, uint32_t crc = 0);

// A record holding a copy of CPU tensor `t` (dtype f32, bf16, i32 or u8).
TensorRecord tensor_record(const std::string& name, const Tensor& t);

// Copies `record` into CPU tensor `dst`. Throws sp::ShapeError naming both when the dtype or
// the shape differ.
void copy_record_to_tensor(const TensorRecord& record, const Tensor& dst);

}  // namespace sp::io
