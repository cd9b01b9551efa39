// Devices and element types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace sp {

enum class DeviceType { CPU, CUDA };

// cpu:N (N > 0) are emulated devices: they share the host's memory and threads, but each has
// its own allocator, and its streams keep a device's rules (a stream records only its own
// device's events; tensors of another device are refused by ops other than copies). They let
// the CPU run and test the code paths of several GPUs, such as a pipeline over --devices.
struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;

  static constexpr int kMaxCpuDevices = 16;  // cpu:0 .. cpu:15
  static Device cpu(int i = 0) { return {DeviceType::CPU, i}; }
  static Device cuda(int i = 0) { return {DeviceType::CUDA, i}; }
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;  // "cpu", "cpu:N" (N > 0) or "cuda:N"
  // Parses "cpu", "cpu:N", "cuda", "cuda:N"; throws sp::Error otherwise.
  static Device parse(const std::string& s);
};

enum class DType { F32, BF16, U8, I32 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

// True when this build has the CUDA backend (it may still find no GPU at run time).
bool cuda_built();
// Number of CUDA devices visible now; 0 without a GPU or without the CUDA backend.
int cuda_device_count();
// Throws sp::Error, saying why, unless `d` can be used here: cpu:N for N < kMaxCpuDevices
// always; cuda:N when this build has the CUDA backend and GPU N is visible.
void require_device(Device d);
// Lets work on `from` (kernels, copies issued there) read and write `to`'s memory directly: CUDA
// peer access, enabled where the hardware allows (without it, copies between the GPUs still work,
// staged by the driver). Returns whether the access is direct: always for one device, and for
// the CPU's emulated devices, which share the host's memory.
bool enable_peer_access(Device from, Device to);
// A device in words, for logs and results: "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)", or for the
// CPU "cpu (N threads)".
std::string device_description(Device d);

}  // namespace sp
