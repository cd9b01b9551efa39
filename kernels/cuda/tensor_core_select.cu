// The choice of bf16 tensor-core main loop (tensor_core.h, MmaMainloop).
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma_launch.cuh"
#include "kernels/cuda/tensor_core.h"

namespace sp::kernels::cuda {
namespace {

// -1: not chosen yet (the environment decides at first use), else an MmaMainloop.
std::atomic<int> g_mainloop{-1};
// -1: not chosen yet, else 0 / 1 (dgrad_by_stride_class, dgrad_transposed_filter).
std::atomic<int> g_dgrad_classes{-1}, g_dgrad_class_direct{-1}, g_dgrad_wt{-1}, g_conv_tma{-1}, g_tma_wide{-1},
    g_tma_wide_by_shape{-1}, g_tma_cluster{-1}, g_tma_persistent{-1}, g_tma_l2_prefetch{-1}, g_conv_halo{-1},
    g_halo_desc_phase{-1}, g_halo_resident{-1};
std::atomic<int64_t> g_conv_tma_launches{0}, g_wide_launches{0}, g_cluster_launches{0}, g_class_direct_launches{0},
    g_persistent_launches{0}, g_halo_launches{0}, g_halo_resident_launches{0}, g_transposed_filters{0};

}  // namespace

const char* mainloop_name(MmaMainloop m) {
  switch (m) {
    case MmaMainloop::kAuto: return "auto";
    case MmaMainloop::kMmaSync: return "mma_sync";
    case MmaMainloop::kWgmma: return "wgmma";
    case MmaMainloop::kWgmmaTma: return "wgmma_tma";
  }
  return "?";
}

MmaMainloop parse_mainloop(const std::string& name) {
  if (name == "auto") return MmaMainloop::kAuto;
  if (name == "mma_sync") return MmaMainloop::kMmaSync;
  if (name == "wgmma") return MmaMainloop::kWgmma;
  if (name == "wgmma_tma") return MmaMainloop::kWgmmaTma;
  throw Error("unknown tensor-core main loop '" + name + "': use auto, mma_sync, wgmma or wgmma_tma");
}

bool wgmma_available() {
#if STALEPROP_HAVE_SM90A
  // Per device: 0 not asked yet, 1 no, 2 yes (devices past the table are asked every time).
  static std::atomic<int8_t> known[64] = {};
  int device = 0;
  SP_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= 0 && device < 64) {
    const int8_t k = known[device].load(std::memory_order_relaxed);
    if (k != 0) return k == 2;
  }
  int major = 0, minor = 0;
  SP_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  SP_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const bool yes = major == 9 && minor == 0;
  if (device >= 0 && device < 64) known[device].store(yes ? 2 : 1, std::memory_order_relaxed);
  return yes;
#else
  return false;
#endif
}

void set_mma_mainloop(MmaMainloop m) { g_mainloop.store(int(m), std::memory_order_relaxed); }

MmaMainloop mma_mainloop() {
  return MmaMainloop(kernels::setting(g_mainloop, "STALEPROP_MAINLOOP", [](const char* env) {
    try {
      return int(env ? parse_mainloop(env) : MmaMainloop::kAuto);
    } catch (const Error& e) {
      throw Error(std::string("$STALEPROP_MAINLOOP: ") + e.what());
    }
  }));
}

void set_dgrad_by_stride_class(bool on) { detail::set_switch(g_dgrad_classes, on); }
bool dgrad_by_stride_class() { return detail::env_switch(g_dgrad_classes, "STALEPROP_DGRAD_CLASSES", true); }
void set_dgrad_class_direct(bool on) { detail::set_switch(g_dgrad_class_direct, on); }
bool dgrad_class_direct() { return detail::env_switch(g_dgrad_class_direct, "STALEPROP_DGRAD_CLASS_DIRECT", true); }
int64_t dgrad_class_direct_launches() { return g_class_direct_launches.load(std::memory_order_relaxed); }
void set_dgrad_transposed_filter(bool on) { detail::set_switch(g_dgrad_wt, on); }
bool dgrad_transposed_filter() { return detail::env_switch(g_dgrad_wt, "STALEPROP_DGRAD_WT", true); }
int64_t dgrad_transposed_filters() { return g_transposed_filters.load(std::memory_order_relaxed); }
void set_conv_tma(bool on) { detail::set_switch(g_conv_tma, on); }
bool conv_tma() { return detail::env_switch(g_conv_tma, "STALEPROP_CONV_TMA", true); }
void set_tma_wide_tile(bool on) { detail::set_switch(g_tma_wide, on); }
bool tma_wide_tile() { return detail::env_switch(g_tma_wide, "STALEPROP_TMA_WIDE", false); }
void set_tma_wide_by_shape(bool on) { detail::set_switch(g_tma_wide_by_shape, on); }
bool tma_wide_by_shape() { return detail::env_switch(g_tma_wide_by_shape, "STALEPROP_TMA_WIDE_BY_SHAPE", true); }
void set_tma_cluster(bool on) { detail::set_switch(g_tma_cluster, on); }
bool tma_cluster() { return detail::env_switch(g_tma_cluster, "STALEPROP_TMA_CLUSTER", false); }
void set_tma_persistent(bool on) { detail::set_switch(g_tma_persistent, on); }
bool tma_persistent() { return detail::env_switch(g_tma_persistent, "STALEPROP_TMA_PERSISTENT", true); }
void set_tma_l2_prefetch(bool on) { detail::set_switch(g_tma_l2_prefetch, on); }
bool tma_l2_prefetch() { return detail::env_switch(g_tma_l2_prefetch, "STALEPROP_TMA_L2_PREFETCH", false); }

void set_conv_halo(int mode) {
  SP_CHECK(mode >= 0 && mode <= 2, "conv_halo: mode 0 (off), 1 or 2, not ", mode);
  g_conv_halo.store(mode, std::memory_order_relaxed);
}
int conv_halo() {
  return kernels::setting(g_conv_halo, "STALEPROP_CONV_HALO", [](const char* env) {
    if (env == nullptr || std::strcmp(env, "0") == 0) return 0;
    if (std::strcmp(env, "1") == 0) return 1;
    if (std::strcmp(env, "2") == 0) return 2;
    throw Error(std::string("$STALEPROP_CONV_HALO must be 0, 1 or 2, not '") + env + "'");
  });
}
double conv_halo_min_used() {
  const int mode = conv_halo();
  return mode == 1 ? 0.8 : mode == 2 ? 0.6 : 0.0;
}
int64_t conv_halo_launches() { return g_halo_launches.load(std::memory_order_relaxed); }
void set_halo_resident(bool on) { detail::set_switch(g_halo_resident, on); }
bool halo_resident() { return detail::env_switch(g_halo_resident, "STALEPROP_HALO_RESIDENT", false); }
int64_t conv_halo_resident_launches() { return g_halo_resident_launches.load(std::memory_order_relaxed); }
void set_halo_desc_phase(bool on) { detail::set_switch(g_halo_desc_phase, on); }
bool halo_desc_phase() { return detail::env_switch(g_halo_desc_phase, "STALEPROP_HALO_DESC_PHASE", false); }

TmaLaunches tma_launches() {
  TmaLaunches t;
  t.conv = g_conv_tma_launches.load(std::memory_order_relaxed);
  t.wide_gemm = g_wide_launches.load(std::memory_order_relaxed);
  t.cluster = g_cluster_launches.load(std::memory_order_relaxed);
  t.persistent = g_persistent_launches.load(std::memory_order_relaxed);
  return t;
}

MmaMainloop effective_mma_mainloop() {
  const MmaMainloop m = mma_mainloop();
  if (m != MmaMainloop::kAuto) return m;
  return wgmma_available() ? MmaMainloop::kWgmmaTma : MmaMainloop::kMmaSync;
}

namespace detail::mma {

bool use_wgmma() {
  const MmaMainloop m = mma_mainloop();
  if (m == MmaMainloop::kAuto) return wgmma_available();
  if (m != MmaMainloop::kWgmma && m != MmaMainloop::kWgmmaTma) return false;
#if STALEPROP_HAVE_SM90A
  SP_CHECK(wgmma_available(), "the ", mainloop_name(m), " main loop needs a compute capability 9.0 GPU (H100/H200); "
           "this device is not one: select mma_sync (STALEPROP_MAINLOOP=mma_sync)");
#else
  SP_CHECK(false, "the ", mainloop_name(m), " main loop is not in this build: configure with "
           "CMAKE_CUDA_ARCHITECTURES=90a, or select mma_sync (STALEPROP_MAINLOOP=mma_sync)");
#endif
  return true;
}

// Asked only after use_wgmma() said yes, so auto here means wgmma_available().
void count_conv_tma_launch() { g_conv_tma_launches.fetch_add(1, std::memory_order_relaxed); }
void count_wide_tma_launch() { g_wide_launches.fetch_add(1, std::memory_order_relaxed); }
void count_cluster_tma_launch() { g_cluster_launches.fetch_add(1, std::memory_order_relaxed); }
void count_persistent_tma_launch() { g_persistent_launches.fetch_add(1, std::memory_order_relaxed); }
void count_halo_launch() { g_halo_launches.fetch_add(1, std::memory_order_relaxed); }
void count_halo_resident_launch() { g_halo_resident_launches.fetch_add(1, std::memory_order_relaxed); }

int sm_count(int device) {
  // Per device, asked once (devices beyond the first 64 each time).
  static std::atomic<int> counts[64] = {};
  if (device >= 0 && device < 64) {
    const int known = counts[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0;
  SP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) counts[device].store(sms, std::memory_order_relaxed);
  return sms;
}
void count_class_direct_launch() { g_class_direct_launches.fetch_add(1, std::memory_order_relaxed); }
void count_transposed_filter() { g_transposed_filters.fetch_add(1, std::memory_order_relaxed); }

bool use_wgmma_tma() {
  const MmaMainloop m = mma_mainloop();
  return m == MmaMainloop::kWgmmaTma || m == MmaMainloop::kAuto;
}

namespace {
// The driver's encoder through the runtime, so nothing links libcuda directly.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    SP_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    SP_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
             "the CUDA driver has no cuTensorMapEncodeTiled (TMA needs a CUDA 12 driver or newer): "
             "select the wgmma or mma_sync main loop");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}
}  // namespace

CUtensorMap encode_tensor_map_bf16(const void* p, const wgmma::TmaMapShape& shape) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {shape.dim[0], shape.dim[1]};
  const cuuint64_t strides[1] = {shape.stride_bytes};
  const cuuint32_t box[2] = {shape.box[0], shape.box[1]};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(p), dims,
                                          strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  SP_CHECK(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (CUresult ", int(r), ") for a bf16 ", shape.dim[0], " x ",
           shape.dim[1], " matrix, row stride ", shape.stride_bytes, " bytes, box ", shape.box[0], " x ", shape.box[1]);
  return map;
}

CUtensorMap encode_tensor_map_4d_bf16(const void* p, const wgmma::TmaMap4d& shape) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {shape.dim[0], shape.dim[1], shape.dim[2], shape.dim[3]};
  const cuuint64_t strides[3] = {shape.stride_bytes[0], shape.stride_bytes[1], shape.stride_bytes[2]};
  const cuuint32_t box[4] = {shape.box[0], shape.box[1], shape.box[2], shape.box[3]};
  const cuuint32_t element_strides[4] = {shape.element_stride[0], shape.element_stride[1], shape.element_stride[2],
                                         shape.element_stride[3]};
  const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<void*>(p), dims,
                                          strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  SP_CHECK(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (CUresult ", int(r), ") for a bf16 NHWC tensor {C, W, H, N} = {",
           shape.dim[0], ", ", shape.dim[1], ", ", shape.dim[2], ", ", shape.dim[3], "}, box {", shape.box[0], ", ",
           shape.box[1], ", ", shape.box[2], ", ", shape.box[3], "}, element strides {1, ", shape.element_stride[1], ", ",
           shape.element_stride[2], ", 1}");
  return map;
}

}  // namespace detail::mma
}  // namespace sp::kernels::cuda
