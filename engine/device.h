// Devices and element types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace sp {

enum class DeviceType { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;

  static Device cpu() { return {DeviceType::CPU, 0}; }
  static Device cuda(int i = 0) { return {DeviceType::CUDA, i}; }
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && (type == DeviceType::CPU || index == o.index); }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;  // "cpu" or "cuda:N"
  // Parses "cpu", "cuda", "cuda:N"; throws sp::Error otherwise.
  static Device parse(const std::string& s);
};

enum class DType { F32, BF16, U8, I32 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

// True when this build has the CUDA backend (it may still find no GPU at run time).
bool cuda_built();
// Number of CUDA devices visible now; 0 without a GPU or without the CUDA backend.
int cuda_device_count();
// Throws sp::Error, saying why, unless `d` can be used here: the CPU always; cuda:N when this
// build has the CUDA backend and GPU N is visible.
void require_device(Device d);
// A device in words, for logs and results: "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)", or for the
// CPU "cpu (N threads)".
std::string device_description(Device d);

}  // namespace sp
