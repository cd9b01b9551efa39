// Every kind of error path: failed CUDA / cuBLAS / cuDNN / NCCL calls, shape and dtype
// mismatches in ops, tensors on the wrong device, errors raised inside stream work.
#include <gtest/gtest.h>

#include <string>

#include "engine/device.h"
#include "engine/ops.h"
#include "kernels/common/error.h"

#if STALEPROP_WITH_CUDA
#include <cublas_v2.h>
#include <cudnn.h>
#include <nccl.h>

#include "kernels/common/cuda_check.h"
#endif

using namespace sp;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

#define EXPECT_THROW_WITH(stmt, type, ...)                                        \
  do {                                                                            \
    try {                                                                         \
      stmt;                                                                       \
      ADD_FAILURE() << "no exception from " #stmt;                                \
    } catch (const type& e) {                                                     \
      for (const char* part : {__VA_ARGS__}) EXPECT_TRUE(contains(e.what(), part)) \
          << "message lacks '" << part << "': " << e.what();                      \
    }                                                                             \
  } while (0)

#if STALEPROP_WITH_CUDA
TEST(VendorErrors, CudaRuntimeFailureNamesCallFileLineAndReason) {
  EXPECT_THROW_WITH(SP_CUDA_CHECK(cudaErrorInvalidValue), CudaError, "CUDA error 1", "cudaErrorInvalidValue",
                    "test_errors.cpp:", "invalid argument");
  // A real failing call: an absurd device ordinal fails with or without a GPU.
  EXPECT_THROW_WITH(SP_CUDA_CHECK(cudaSetDevice(4096)), CudaError, "cudaSetDevice(4096)", "test_errors.cpp:");
  cudaGetLastError();
}

TEST(VendorErrors, CublasCudnnAndNcclFailuresUseTheLibraryErrorString) {
  EXPECT_THROW_WITH(SP_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE), CudaError, "cuBLAS error",
                    "CUBLAS_STATUS_INVALID_VALUE", "test_errors.cpp:");
  EXPECT_THROW_WITH(SP_CUDNN_CHECK(CUDNN_STATUS_BAD_PARAM), CudaError, "cuDNN error", "CUDNN_STATUS_BAD_PARAM",
                    "test_errors.cpp:");
  EXPECT_THROW_WITH(SP_NCCL_CHECK(ncclInvalidArgument), CudaError, "NCCL error", "ncclInvalidArgument",
                    "invalid argument", "test_errors.cpp:");
  // A real failing cuDNN call: a null handle pointer.
  EXPECT_THROW_WITH(SP_CUDNN_CHECK(cudnnCreateTensorDescriptor(nullptr)), CudaError, "cudnnCreateTensorDescriptor");
}

TEST(VendorErrors, NoGpuMeansCudaStreamsFailClearly) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present; this checks the no-GPU failure";
  EXPECT_THROW(make_stream(Device::cuda(0)), CudaError);
}
#else
TEST(VendorErrors, CudaBackendAbsent) {
  EXPECT_THROW_WITH(make_stream(Device::cuda(0)), NotSupportedError, "no CUDA backend");
}
#endif

TEST(OpErrors, ConvolutionChannelMismatchNamesBothShapes) {
  auto s = make_stream(Device::cpu());
  Tensor x = Tensor::empty({2, 8, 8, 3}, DType::F32), w = Tensor::empty({16, 3, 3, 4}, DType::F32);
  Tensor y = Tensor::empty({2, 8, 8, 16}, DType::F32);
  EXPECT_THROW_WITH(ops::conv2d_forward(*s, x, w, Tensor(), y, 1, 1), ShapeError, "conv2d_forward",
                    "[2, 8, 8, 3]", "[16, 3, 3, 4]");
}

TEST(OpErrors, WrongOutputShapeNamesGivenAndRequiredShapes) {
  auto s = make_stream(Device::cpu());
  Tensor x = Tensor::empty({2, 8, 8, 3}, DType::F32), w = Tensor::empty({16, 3, 3, 3}, DType::F32);
  Tensor y = Tensor::empty({2, 8, 8, 16}, DType::F32);
  EXPECT_THROW_WITH(ops::conv2d_forward(*s, x, w, Tensor(), y, 2, 1), ShapeError, "[2, 8, 8, 16]",
                    "[2, 4, 4, 16]");
  Tensor a = Tensor::empty({4, 5}, DType::F32), b = Tensor::empty({6, 7}, DType::F32);
  Tensor c = Tensor::empty({4, 7}, DType::F32);
  EXPECT_THROW_WITH(ops::gemm(*s, false, false, 1.f, a, b, 0.f, c), ShapeError, "[4, 5]", "[6, 7]");
  Tensor lx = Tensor::empty({3, 10}, DType::F32), lw = Tensor::empty({5, 11}, DType::F32);
  Tensor ly = Tensor::empty({3, 5}, DType::F32);
  EXPECT_THROW_WITH(ops::linear_forward(*s, lx, lw, Tensor(), ly), ShapeError, "[3, 10]", "[5, 11]");
  Tensor bx = Tensor::empty({2, 4, 4, 8}, DType::F32), g7 = Tensor::empty({7}, DType::F32);
  EXPECT_THROW_WITH(ops::batchnorm_forward_inference(*s, bx, g7, g7, g7, g7, bx, 1e-5f), ShapeError, "[7]",
                    "[8]");
}

// Geometry a kernel cannot take is refused before any arithmetic on it: a zero stride (a division
// by zero), a pad that overflows the padded size, a filter larger than the padded input.
TEST(OpErrors, ConvolutionGeometryIsCheckedBeforeItIsUsed) {
  const Shape x{2, 8, 8, 3}, w{16, 3, 3, 3};
  EXPECT_THROW_WITH(ops::conv2d_output_shape(x, w, 0, 1), ShapeError, "stride 0");
  EXPECT_THROW_WITH(ops::conv2d_output_shape(x, w, 1, -1), ShapeError, "pad -1");
  EXPECT_THROW_WITH(ops::conv2d_output_shape(x, w, 1, 2147483647), ShapeError, "pad 2147483647");
  EXPECT_THROW_WITH(ops::conv2d_output_shape(x, {16, 11, 11, 3}, 1, 1), ShapeError, "[16, 11, 11, 3]",
                    "the filter must fit");
  EXPECT_THROW_WITH(ops::conv2d_output_shape({2, int64_t(1) << 32, 8, 3}, w, 1, 1), ShapeError, "over 2^31 - 1");
  EXPECT_EQ(ops::conv2d_output_shape(x, w, 2, 1), (Shape{2, 4, 4, 16}));
}

// Max pooling's geometry likewise (a pad near 2^31 overflowed the padded size in int, a window
// larger than the padded input gave a negative output size).
TEST(OpErrors, PoolingGeometryIsCheckedBeforeItIsUsed) {
  const Shape x{2, 8, 8, 3};
  EXPECT_THROW_WITH(ops::maxpool2d_output_shape(x, 3, 0, 1), ShapeError, "stride 0");
  EXPECT_THROW_WITH(ops::maxpool2d_output_shape(x, 3, 1, 3), ShapeError, "pad 3", "the pad in [0, window)");
  EXPECT_THROW_WITH(ops::maxpool2d_output_shape(x, 2147483647, 1, 2147483646), ShapeError, "pad 2147483646");
  EXPECT_THROW_WITH(ops::maxpool2d_output_shape({2, 3, 3, 3}, 9, 1, 0), ShapeError, "window 9",
                    "must fit the padded input");
  EXPECT_THROW_WITH(ops::maxpool2d_output_shape({2, 8, 8}, 2, 2, 0), ShapeError, "rank 4");
  EXPECT_THROW_WITH(ops::maxpool2d_output_shape({int64_t(1) << 32, 8, 8, 3}, 2, 2, 0), ShapeError, "over 2^31 - 1");
  EXPECT_EQ(ops::maxpool2d_output_shape(x, 3, 2, 1), (Shape{2, 4, 4, 3}));
  EXPECT_EQ(ops::maxpool2d_output_shape({1, 7, 5, 4}, 2, 2, 0), (Shape{1, 3, 2, 4}));
}

// The fused BN backward's dresidual may be dy, written as it is consumed, never x or dx, which
// both kernels use after their pass over it.
TEST(OpErrors, ResidualGradientMayAliasOnlyDy) {
  auto s = make_stream(Device::cpu());
  const Tensor x = Tensor::empty({2, 4, 4, 8}, DType::F32), y = Tensor::empty({2, 4, 4, 8}, DType::F32),
               dy = Tensor::empty({2, 4, 4, 8}, DType::F32), dx = Tensor::empty({2, 4, 4, 8}, DType::F32);
  const Tensor g = Tensor::empty({8}, DType::F32), m = Tensor::empty({8}, DType::F32),
               i = Tensor::empty({8}, DType::F32), dg = Tensor::empty({8}, DType::F32),
               db = Tensor::empty({8}, DType::F32);
  for (const Tensor* bad : {&x, &y, &dx})
    EXPECT_THROW_WITH(ops::batchnorm_add_relu_backward(*s, x, y, dy, g, m, i, dx, *bad, dg, db), ShapeError,
                      "dresidual may alias dy, never x, y or dx");
  // A view of dx counts as dx; part of dy (one image on) is no alias of it; in bf16 too, where
  // widening gives each tensor a temporary.
  EXPECT_THROW_WITH(ops::batchnorm_add_relu_backward(*s, x, y, dy, g, m, i, dx, dx.view({2, 4, 4, 8}), dg, db),
                    ShapeError, "never x, y or dx");
  const Tensor both = Tensor::empty({3, 4, 4, 8}, DType::F32);
  EXPECT_THROW_WITH(ops::batchnorm_add_relu_backward(*s, x, y, both.slice(0, 2), g, m, i, dx, both.slice(1, 2), dg, db),
                    ShapeError, "nor part of dy");
  const Tensor xb = Tensor::empty({2, 4, 4, 8}, DType::BF16), yb = Tensor::empty({2, 4, 4, 8}, DType::BF16),
               dxb = Tensor::empty({2, 4, 4, 8}, DType::BF16), bothb = Tensor::empty({3, 4, 4, 8}, DType::BF16);
  EXPECT_THROW_WITH(
      ops::batchnorm_add_relu_backward(*s, xb, yb, bothb.slice(0, 2), g, m, i, dxb, bothb.slice(1, 2), dg, db),
      ShapeError, "nor part of dy");
  ops::fill(*s, x, 1.f), ops::fill(*s, y, 1.f), ops::fill(*s, dy, 1.f), ops::fill(*s, g, 1.f);
  ops::fill(*s, m, 0.f), ops::fill(*s, i, 1.f);
  ops::batchnorm_add_relu_backward(*s, x, y, dy, g, m, i, dx, dy, dg, db);  // over dy: allowed
  const Tensor dyb = Tensor::empty({2, 4, 4, 8}, DType::BF16);
  for (const Tensor* t : {&xb, &yb, &dyb}) ops::cast(*s, x, *t);
  ops::batchnorm_add_relu_backward(*s, xb, yb, dyb, g, m, i, dxb, dyb, dg, db);  // in bf16 too
  s->synchronize();
}

TEST(OpErrors, DtypeAndDeviceMismatches) {
  auto s = make_stream(Device::cpu());
  Tensor x = Tensor::empty({4, 4}, DType::F32), xi = Tensor::empty({4, 4}, DType::I32);
  EXPECT_THROW_WITH(ops::relu_forward(*s, xi, x), ShapeError, "relu_forward", "i32[4, 4]", "f32");
  // A tensor claiming to live on a GPU cannot be used on a CPU stream (no memory is touched).
  float dummy[16];
  Tensor on_gpu = Tensor::from_blob(dummy, {4, 4}, DType::F32, Device::cuda(0));
  EXPECT_THROW_WITH(ops::relu_forward(*s, on_gpu, x), ShapeError, "not on the stream's device", "cuda:0");
  EXPECT_THROW_WITH(ops::relu_forward(*s, Tensor(), x), ShapeError, "undefined");
  Tensor labels = Tensor::empty({4}, DType::F32), loss = Tensor::empty({1}, DType::F32);
  Tensor correct = Tensor::empty({1}, DType::I32);
  EXPECT_THROW_WITH(ops::softmax_cross_entropy(*s, x, labels, 0.f, loss, x, correct), ShapeError, "labels", "i32");
}

TEST(OpErrors, ErrorsInsideStreamWorkSurfaceAtSynchronize) {
  auto s = make_stream(Device::cpu());
  Tensor logits = Tensor::empty({2, 3}, DType::F32), dlogits = Tensor::empty({2, 3}, DType::F32);
  Tensor labels = Tensor::empty({2}, DType::I32), loss = Tensor::empty({1}, DType::F32);
  Tensor correct = Tensor::empty({1}, DType::I32);
  for (int i = 0; i < 6; ++i) logits.at<float>(i) = 0.f;
  labels.at<int32_t>(0) = 1;
  labels.at<int32_t>(1) = 3;  // out of range for 3 classes
  ops::softmax_cross_entropy(*s, logits, labels, 0.f, loss, dlogits, correct);
  EXPECT_THROW(s->synchronize(), Error);
}

TEST(OpErrors, CheckMacrosCarryLocation) {
  EXPECT_THROW_WITH(SP_CHECK(1 + 1 == 3, "arithmetic ", 42), Error, "1 + 1 == 3", "arithmetic 42",
                    "test_errors.cpp:");
}

}  // namespace
