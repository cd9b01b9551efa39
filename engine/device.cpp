#include "engine/device.h"

#include <cstdio>

#include "kernels/common/error.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/common/cuda_check.h"
#endif

namespace sp {

std::string Device::str() const {
  if (is_cpu()) return index == 0 ? std::string("cpu") : "cpu:" + std::to_string(index);
  return "cuda:" + std::to_string(index);
}

Device Device::parse(const std::string& s) {
  if (s == "cpu") return cpu();
  if (s == "cuda") return cuda(0);
  for (const std::string prefix : {"cpu:", "cuda:"}) {
    const size_t n = prefix.size();
    if (s.rfind(prefix, 0) == 0 && s.size() > n && s.size() <= n + 6 &&
        s.find_first_not_of("0123456789", n) == std::string::npos) {
      const int index = std::stoi(s.substr(n));
      return prefix == "cpu:" ? cpu(index) : cuda(index);
    }
  }
  throw Error("unknown device '" + s + "' (expected cpu, cpu:N, cuda or cuda:N)");
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::U8: return 1;
    case DType::I32: return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::U8: return "u8";
    case DType::I32: return "i32";
  }
  return "?";
}

bool cuda_built() { return STALEPROP_WITH_CUDA != 0; }

int cuda_device_count() {
#if STALEPROP_WITH_CUDA
  int n = 0;
  // No driver or no device is a normal answer here ("no GPU"), not an error.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

void require_device(Device d) {
  if (d.is_cpu()) {
    if (d.index < 0 || d.index >= Device::kMaxCpuDevices)
      throw Error("device " + d.str() + ": the CPU emulates devices cpu:0 to cpu:" +
                  std::to_string(Device::kMaxCpuDevices - 1));
    return;
  }
  if (!cuda_built()) throw Error("device " + d.str() + ": this build has no CUDA backend (configure with a CUDA toolkit)");
  const int n = cuda_device_count();
  if (n == 0) throw Error("device " + d.str() + ": no CUDA device is visible (no GPU, or no usable driver)");
  if (d.index >= n)
    throw Error("device " + d.str() + ": only " + std::to_string(n) + " CUDA device" + (n == 1 ? " is" : "s are") +
                " visible");
}

bool enable_peer_access(Device from, Device to) {
  SP_CHECK(from.type == to.type, "peer access between ", from.str(), " and ", to.str(), ": not of one kind");
  if (from.is_cpu() || from == to) return true;
#if STALEPROP_WITH_CUDA
  int can = 0;
  if (cudaDeviceCanAccessPeer(&can, from.index, to.index) != cudaSuccess || can == 0) {
    cudaGetLastError();
    return false;
  }
  int current = 0;
  SP_CUDA_CHECK(cudaGetDevice(&current));
  SP_CUDA_CHECK(cudaSetDevice(from.index));
  const cudaError_t st = cudaDeviceEnablePeerAccess(to.index, 0);
  SP_CUDA_CHECK(cudaSetDevice(current));
  if (st == cudaSuccess) return true;
  cudaGetLastError();  // the call's error is also the thread's last error, which later launch checks read
  if (st == cudaErrorPeerAccessAlreadyEnabled) return true;
  // Peer access only speeds the copies up: without it they are staged by the driver.
  std::fprintf(stderr, "staleprop: warning: no peer access from %s to %s (%s); copies between them are staged\n",
               from.str().c_str(), to.str().c_str(), cudaGetErrorString(st));
  return false;
#else
  return false;
#endif
}

std::string device_description(Device d) {
  if (d.is_cpu())
    return (d.index == 0 ? std::string("cpu (") : d.str() + ", emulated on the cpu (") +
           std::to_string(kernels::cpu::num_threads()) + " threads, " + kernels::cpu::gemm_kernel() + " GEMM)";
#if STALEPROP_WITH_CUDA
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, d.index) == cudaSuccess) {
    char buf[320];
    std::snprintf(buf, sizeof buf, "%s (sm_%d%d, %.1f GiB)", p.name, p.major, p.minor,
                  double(p.totalGlobalMem) / double(1ull << 30));
    return buf;
  }
  cudaGetLastError();
#endif
  return d.str();
}

}  // namespace sp
