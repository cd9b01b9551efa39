// Helpers shared by the GPU test files (test_cuda_ops, test_vendor_ops, test_cuda_tensor_core):
// seeded host data, the relative-error metric, the convolution shapes of the bf16 tensor-core
// tests (also test_conv_loaders, on the CPU), NaN-poisoned device arrays, a fixture that skips
// without a GPU, and engine tensors copied to and from the device.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/shapes.h"
#include "kernels/cpu/ops.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "engine/device.h"
#include "kernels/common/cuda_check.h"
#endif
#include "engine/ops.h"
#include "engine/stream.h"
#include "engine/tensor.h"

namespace sp::test {

// Sets a process-wide kernel switch (kernels/cuda: get/set pairs such as conv_tma/set_conv_tma)
// for a scope, on unless told otherwise, and restores it however the scope ends; set() changes
// it within the scope.
class ScopedSwitch {
 public:
  ScopedSwitch(bool (*get)(), void (*set)(bool), bool value = true) : set_(set), before_(get()) { set_(value); }
  ~ScopedSwitch() { set_(before_); }
  ScopedSwitch(const ScopedSwitch&) = delete;
  ScopedSwitch& operator=(const ScopedSwitch&) = delete;
  void set(bool value) const { set_(value); }

 private:
  void (*set_)(bool);
  bool before_;
};

constexpr double kTol = 1e-5;  // relative Frobenius error of fp32 results against double

inline std::vector<float> random_vector(size_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

inline std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// ||got - ref|| / ||ref|| (the absolute error when ref is zero); NaN when got has a NaN.
// Overloads rather than a template, so a braced list converts to a double reference.
template <typename Ref>
double relative_error(const std::vector<float>& got, const std::vector<Ref>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    const double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num) / (den > 0.0 ? std::sqrt(den) : 1.0);
}
inline double rel_error(const std::vector<float>& got, const std::vector<double>& ref) {
  return relative_error(got, ref);
}
inline double rel_error(const std::vector<float>& got, const std::vector<float>& ref) {
  return relative_error(got, ref);
}

inline std::string conv_str(const kernels::Conv2dShape& s) {
  return "conv n" + std::to_string(s.n) + " " + std::to_string(s.h) + "x" + std::to_string(s.w) + "x" +
         std::to_string(s.c) + " k" + std::to_string(s.k) + " " + std::to_string(s.r) + "x" + std::to_string(s.s) +
         " stride " + std::to_string(s.stride) + " pad " + std::to_string(s.pad);
}

// A square-filter convolution (pad = pad on both sides).
inline kernels::Conv2dShape conv(int n, int h, int w, int c, int k, int r, int stride, int pad) {
  kernels::Conv2dShape s;
  s.n = n, s.h = h, s.w = w, s.c = c, s.k = k, s.r = r, s.s = r, s.stride = stride, s.pad = pad;
  return s;
}

// Every distinct convolution of the CIFAR ResNet-20 (option A: no projection) and ResNet-18
// (option B: 1x1 stride-2 projections) at batch 2, then awkward ones.
inline std::vector<kernels::Conv2dShape> conv_cases() {
  return {
      // ResNet-20
      conv(2, 32, 32, 3, 16, 3, 1, 1), conv(2, 32, 32, 16, 16, 3, 1, 1), conv(2, 32, 32, 16, 32, 3, 2, 1),
      conv(2, 16, 16, 32, 32, 3, 1, 1), conv(2, 16, 16, 32, 64, 3, 2, 1), conv(2, 8, 8, 64, 64, 3, 1, 1),
      // ResNet-18
      conv(2, 32, 32, 3, 64, 3, 1, 1), conv(2, 32, 32, 64, 64, 3, 1, 1), conv(2, 32, 32, 64, 128, 3, 2, 1),
      conv(2, 32, 32, 64, 128, 1, 2, 0), conv(2, 16, 16, 128, 128, 3, 1, 1), conv(2, 16, 16, 128, 256, 3, 2, 1),
      conv(2, 16, 16, 128, 256, 1, 2, 0), conv(2, 8, 8, 256, 256, 3, 1, 1), conv(2, 8, 8, 256, 512, 3, 2, 1),
      conv(2, 8, 8, 256, 512, 1, 2, 0), conv(2, 4, 4, 512, 512, 3, 1, 1),
      // awkward: C = 3, K = 10, batch 1, 5x7, stride 2, 1x1 stride 2 pad 0 on odd sizes,
      // C = 12 (no 16-byte chunks), K = 10 gradients (no chunks for dy), a 5x5 filter
      conv(1, 5, 7, 3, 10, 3, 1, 1), conv(1, 5, 7, 12, 10, 3, 2, 1), conv(1, 7, 5, 16, 10, 1, 2, 0),
      conv(3, 9, 9, 8, 24, 3, 2, 0), conv(1, 6, 6, 16, 8, 5, 1, 2), conv(1, 1, 1, 1, 1, 1, 1, 0),
  };
}

// An fp32 host tensor of seeded values in [-1, 1).
inline Tensor host_tensor(const Shape& shape, uint32_t seed) {
  Tensor t = Tensor::empty(shape, DType::F32);
  const std::vector<float> v = random_vector(size_t(t.numel()), seed);
  std::memcpy(t.data<float>(), v.data(), v.size() * sizeof(float));
  return t;
}

// Engine tensors across the PCIe bus on stream s: a copy of host tensor t on device d
// (enqueued), and a host copy of device tensor t (waits for it); the values of an fp32 host tensor.
inline Tensor to_device(Stream& s, const Tensor& t, Device d) {
  Tensor out = Tensor::empty(t.shape(), t.dtype(), d);
  ops::copy(s, t, out);
  return out;
}
inline Tensor to_host(Stream& s, const Tensor& t) {
  Tensor out = Tensor::empty(t.shape(), t.dtype());
  ops::copy(s, t, out);
  s.synchronize();
  return out;
}
inline std::vector<float> host_values(const Tensor& t) { return {t.data<float>(), t.data<float>() + t.numel()}; }

#if STALEPROP_WITH_CUDA

// A cudaMalloc'ed array, filled with 0xFF bytes (NaN as floats) on creation, so an element a
// kernel fails to write shows up. An empty array still gets a one-element allocation, so that
// get() is a valid device pointer.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    SP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), std::max(bytes(), sizeof(T))));
    poison();
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() { cudaFree(p_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return p_; }
  // Waits for the fill: it runs on the legacy default stream, which the engine's non-blocking
  // streams do not wait for.
  void poison() {
    SP_CUDA_CHECK(cudaMemset(p_, 0xFF, bytes()));
    SP_CUDA_CHECK(cudaDeviceSynchronize());
  }
  void upload(const std::vector<T>& host) {
    ASSERT_EQ(host.size(), n_);
    SP_CUDA_CHECK(cudaMemcpy(p_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    SP_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> host(n_);
    SP_CUDA_CHECK(cudaMemcpy(host.data(), p_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  size_t bytes() const { return n_ * sizeof(T); }
  size_t n_;
  T* p_ = nullptr;
};

// After every op: the kernels ran to completion without a (sticky or launch) error.
inline void sync_and_check() {
  SP_CUDA_CHECK(cudaDeviceSynchronize());
  SP_CUDA_CHECK(cudaGetLastError());
}

// Skips, saying why, without a GPU; otherwise gives each test its own stream.
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: these kernels need a GPU to run";
    SP_CUDA_CHECK(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
};

// Runs `gemm` (the signature of kernels::cuda::gemm) on operands that start one float into their
// allocations, so 16-byte alignment fails, and checks C against the double reference.
template <class Gemm>
void check_gemm_on_unaligned_pointers(const Gemm& gemm, cudaStream_t stream) {
  const int64_t m = 70, n = 90, k = 50;
  const std::vector<float> a = random_vector(size_t(m * k), 31), b = random_vector(size_t(k * n), 32);
  DeviceArray<float> da(a.size() + 1), db(b.size() + 1), dc(size_t(m * n) + 1);
  SP_CUDA_CHECK(cudaMemcpy(da.get() + 1, a.data(), a.size() * sizeof(float), cudaMemcpyHostToDevice));
  SP_CUDA_CHECK(cudaMemcpy(db.get() + 1, b.data(), b.size() * sizeof(float), cudaMemcpyHostToDevice));
  gemm(false, false, m, n, k, 1.f, da.get() + 1, k, db.get() + 1, n, 0.f, dc.get() + 1, n, stream);
  sync_and_check();
  std::vector<float> got = dc.download();
  got.erase(got.begin());
  std::vector<double> ref(size_t(m * n));
  kernels::cpu::gemm<double>(false, false, m, n, k, 1.0, to_double(a).data(), k, to_double(b).data(), n, 0.0,
                             ref.data(), n);
  EXPECT_LE(rel_error(got, ref), kTol);
}

#endif  // STALEPROP_WITH_CUDA

}  // namespace sp::test
