// Checks shared by the CPU (test_streams) and CUDA (test_cuda_runtime) stream tests: an SGD
// update captured into a graph, with a host function and an event record node, replayed with a
// new learning rate written into a device scalar before each launch; and host functions that
// throw.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <random>
#include <stdexcept>
#include <vector>

#include "engine/ops.h"
#include "engine/stream.h"
#include "engine/tensor.h"
#include "kernels/cpu/ops.h"

namespace sp::test {

inline void check_sgd_graph_replays(Device device) {
  auto s = make_stream(device);
  auto done = make_event(device);
  const int64_t n = 5000;  // more than one block of the CUDA kernel
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> param(n), grad(n), mom(n, 0.f);
  for (int64_t i = 0; i < n; ++i) param[size_t(i)] = u(rng), grad[size_t(i)] = u(rng);
  auto upload = [&](std::vector<float>& v) {
    Tensor d = Tensor::empty({n}, DType::F32, device);
    ops::copy(*s, Tensor::from_blob(v.data(), {n}, DType::F32), d);
    return d;
  };
  Tensor p = upload(param), g = upload(grad), m = upload(mom);
  Tensor lr = Tensor::empty({1}, DType::F32, device);
  s->synchronize();
  kernels::SgdParams sp;
  sp.lr = 123.f;  // ignored: the rate comes from `lr`
  sp.momentum = 0.9f, sp.weight_decay = 1e-2f, sp.nesterov = true, sp.grad_scale = 0.5f;
  std::atomic<int> host_runs{0};
  s->begin_capture();
  ops::sgd_step(*s, {p}, {g}, {m}, sp, lr);
  s->enqueue_host([&host_runs] { ++host_runs; });
  s->record(*done);
  std::unique_ptr<Graph> graph = s->end_capture();
  EXPECT_GE(graph->size(), 3u);
  const float rates[] = {0.1f, 0.05f, 0.3f, 0.0f, 0.2f};
  std::vector<kernels::cpu::SgdTensor<float>> ref = {{param.data(), grad.data(), mom.data(), n}};
  for (float r : rates) {
    ops::fill(*s, lr, r);
    graph->launch(*s);
    kernels::SgdParams host = sp;
    host.lr = r;
    kernels::cpu::sgd_step<float>(ref, host);
  }
  done->synchronize();  // the record node of the last launch
  std::vector<float> got(static_cast<size_t>(n));
  ops::copy(*s, p, Tensor::from_blob(got.data(), {n}, DType::F32));
  s->synchronize();
  EXPECT_EQ(host_runs.load(), 5);
  double worst = 0;
  for (int64_t i = 0; i < n; ++i)
    worst = std::max(worst, std::abs(double(got[size_t(i)]) - double(param[size_t(i)])) /
                                (1.0 + std::abs(double(param[size_t(i)]))));
  // CPU: the same code, bit for bit; CUDA: the same formula, up to fused multiply-adds.
  if (device.is_cpu())
    EXPECT_EQ(worst, 0.0);
  else
    EXPECT_LE(worst, 1e-6);
}

// Host functions that throw on a stream of `device`: the work after them still runs, and
// synchronize() rethrows the first error, once.
inline void check_host_errors_rethrown_once(Device device) {
  auto s = make_stream(device);
  std::atomic<bool> later_ran{false};
  s->enqueue_host([] { throw std::runtime_error("first"); });
  s->enqueue_host([] { throw std::runtime_error("second"); });
  s->enqueue_host([&] { later_ran = true; });
  try {
    s->synchronize();
    FAIL() << "synchronize did not rethrow";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "first");
  }
  EXPECT_TRUE(later_ran);
  EXPECT_NO_THROW(s->synchronize());
}

}  // namespace sp::test
