// cuBLASLt / cuDNN baselines (see vendor.h).
#include "kernels/vendor/vendor.h"

#include <cublasLt.h>
#include <cudnn.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/common/cuda_check.h"
#include "kernels/common/error.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/tensor_core.h"

namespace sp::kernels::vendor {
namespace {

std::atomic<bool> g_deterministic{false};

constexpr size_t kLtMaxWorkspace = size_t(32) << 20;     // cuBLASLt heuristic workspace cap
constexpr size_t kCudnnMaxWorkspace = size_t(1) << 30;   // convolution algorithms needing more are skipped

int current_device() {
  int dev = 0;
  SP_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// ---- Handles: one per host thread and device at a time -------------------------------------------
// A thread takes a handle from a process-wide pool on first use (creating one, under the pool's
// lock, where none is free: cuDNN advises against creating handles concurrently) and gives it
// back when it exits; none is destroyed before the process ends. cudnnDestroy synchronises the
// device: a sweep's worker thread ending while another run captures a CUDA graph would have
// invalidated that capture (and stalled every stream).
struct HandlePool {
  std::mutex mu;
  std::map<int, std::vector<cudnnHandle_t>> cudnn;
  std::map<int, std::vector<cublasLtHandle_t>> lt;
};
HandlePool& handle_pool() {
  static HandlePool* pool = new HandlePool;  // never destroyed: threads return handles at exit
  return *pool;
}

struct ThreadHandles {
  std::map<int, cudnnHandle_t> cudnn;
  std::map<int, cublasLtHandle_t> lt;
  ~ThreadHandles() {
    HandlePool& pool = handle_pool();
    std::lock_guard<std::mutex> lk(pool.mu);
    for (auto& [dev, h] : cudnn) pool.cudnn[dev].push_back(h);
    for (auto& [dev, h] : lt) pool.lt[dev].push_back(h);
  }
};
thread_local ThreadHandles t_handles;

// This thread's handle for `dev`: its own, else a free one of the pool, else a new one.
template <typename Handle, typename Create>
Handle thread_handle(std::map<int, Handle>& mine, std::map<int, std::vector<Handle>> HandlePool::*free_of, int dev,
                     const Create& create) {
  auto it = mine.find(dev);
  if (it != mine.end()) return it->second;
  HandlePool& pool = handle_pool();
  std::lock_guard<std::mutex> lk(pool.mu);
  std::vector<Handle>& free = (pool.*free_of)[dev];
  Handle h{};
  if (free.empty()) {
    create(&h);
  } else {
    h = free.back();
    free.pop_back();
  }
  mine.emplace(dev, h);
  return h;
}

cudnnHandle_t cudnn_handle(int dev) {
  return thread_handle(t_handles.cudnn, &HandlePool::cudnn, dev,
                       [](cudnnHandle_t* h) { SP_CUDNN_CHECK(cudnnCreate(h)); });
}

cublasLtHandle_t lt_handle(int dev) {
  return thread_handle(t_handles.lt, &HandlePool::lt, dev,
                       [](cublasLtHandle_t* h) { SP_CUBLAS_CHECK(cublasLtCreate(h)); });
}

// ---- Workspace: stream-ordered, from the default pool kept warm --------------------------------
void retain_pool_memory(int dev) {
  static std::mutex mu;
  static std::set<int> done;
  std::lock_guard<std::mutex> lk(mu);
  if (!done.insert(dev).second) return;
  cudaMemPool_t pool;
  SP_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
  uint64_t keep_all = UINT64_MAX;
  SP_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all));
}

class Workspace {
 public:
  Workspace(int dev, size_t bytes, cudaStream_t stream) : stream_(stream), bytes_(bytes) {
    if (bytes == 0) return;
    retain_pool_memory(dev);
    SP_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~Workspace() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);  // after the work enqueued with it
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* get() const { return ptr_; }
  size_t size() const { return bytes_; }

 private:
  cudaStream_t stream_;
  size_t bytes_;
  void* ptr_ = nullptr;
};

// ---- cuBLASLt GEMM plans -------------------------------------------------------------------------
// The largest power of two (at most 256) dividing the address, down to a bf16 element's 2
// bytes: the alignment class the heuristic is told about, so the chosen algorithm is valid for
// these pointers (bf16 operands at an odd element were told 4). Deterministic: 16, 4 or 2, the
// same algorithm for every pointer of a class.
uint32_t alignment_of(const void* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 2 && (addr % a) != 0) a /= 2;
  if (g_deterministic.load(std::memory_order_relaxed)) a = a >= 16 ? 16 : a >= 4 ? 4 : 2;
  return a;
}

using GemmKey = std::tuple<int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t, uint32_t,
                           uint32_t, bool>;

struct GemmPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;  // in cuBLASLt's (column-major) roles
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
  ~GemmPlan() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct PreferenceGuard {
  cublasLtMatmulPreference_t p = nullptr;
  ~PreferenceGuard() {
    if (p) cublasLtMatmulPreferenceDestroy(p);
  }
};

// Row-major C[M,N] = op(A) op(B) is column-major C^T[N,M] = op(B)^T op(A)^T over the same
// memory: cuBLASLt's "A" is our B (transposed iff trans_b), its "B" is our A, m' = N, n' = M.
std::unique_ptr<GemmPlan> make_gemm_plan(cublasLtHandle_t lt, const GemmKey& key) {
  const auto& [dev, ta, tb, m, n, k, lda, ldb, ldc, al_a, al_b, al_c, det] = key;
  (void)dev;
  (void)det;
  auto plan = std::make_unique<GemmPlan>();
  SP_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = tb ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  SP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  SP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  // Stored (column-major) extents: lt-A is N x K (K x N when transposed), lt-B is K x M (M x K).
  SP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_32F, uint64_t(tb ? k : n), uint64_t(tb ? n : k), ldb));
  SP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_32F, uint64_t(ta ? m : k), uint64_t(ta ? k : m), lda));
  SP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, CUDA_R_32F, uint64_t(n), uint64_t(m), ldc));

  PreferenceGuard pref;
  SP_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.p));
  const size_t max_ws = kLtMaxWorkspace;
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_ws, sizeof(max_ws)));
  // Our B is cuBLASLt's A and vice versa.
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_b, sizeof(al_b)));
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_a, sizeof(al_a)));
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)));

  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  SP_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt, plan->op, plan->a, plan->b, plan->c, plan->c, pref.p, 1, &result,
                                                 &returned));
  if (returned < 1 || result.state != CUBLAS_STATUS_SUCCESS)
    throw CudaError(detail::concat("vendor gemm: cuBLASLt has no algorithm for ", m, "x", n, "x", k,
                                   ta ? " A^T" : "", tb ? " B^T" : "", " lda ", lda, " ldb ", ldb, " ldc ", ldc));
  plan->algo = result.algo;
  plan->workspace = result.workspaceSize;
  return plan;
}

const GemmPlan& gemm_plan(cublasLtHandle_t lt, const GemmKey& key) {
  static std::mutex mu;
  static std::map<GemmKey, std::unique_ptr<GemmPlan>> cache;  // entries never move or die
  std::lock_guard<std::mutex> lk(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, make_gemm_plan(lt, key)).first;
  return *it->second;
}

// ---- cuDNN convolution plans -------------------------------------------------------------------
// (device, n, h, w, c, k, r, s, stride, pad, deterministic, bf16)
using ConvKey = std::tuple<int, int, int, int, int, int, int, int, int, int, bool, bool>;

struct ConvPlan {
  cudnnTensorDescriptor_t x = nullptr, y = nullptr, bias = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t fwd_conv = nullptr, bwd_data_conv = nullptr, bwd_filter_conv = nullptr;
  cudnnConvolutionFwdAlgo_t fwd_algo{};
  cudnnConvolutionBwdDataAlgo_t bwd_data_algo{};
  cudnnConvolutionBwdFilterAlgo_t bwd_filter_algo{};
  size_t fwd_ws = 0, bwd_data_ws = 0, bwd_filter_ws = 0;
  ~ConvPlan() {
    for (cudnnConvolutionDescriptor_t d : {fwd_conv, bwd_data_conv, bwd_filter_conv})
      if (d) cudnnDestroyConvolutionDescriptor(d);
    if (w) cudnnDestroyFilterDescriptor(w);
    for (cudnnTensorDescriptor_t d : {x, y, bias})
      if (d) cudnnDestroyTensorDescriptor(d);
  }
};

std::string conv_str(const Conv2dShape& s) {
  return detail::concat("n", s.n, " ", s.h, "x", s.w, "x", s.c, " k", s.k, " ", s.r, "x", s.s, " stride ", s.stride,
                        " pad ", s.pad);
}

// Compute type fp32 in both precisions. fp32 data: FMA math only (no TF32 tensor cores);
// bf16 data: tensor cores allowed (the bf16 twin of our mma.sync kernels).
cudnnConvolutionDescriptor_t make_conv_desc(const Conv2dShape& sh, bool bf16) {
  cudnnConvolutionDescriptor_t d = nullptr;
  SP_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&d));
  SP_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(d, sh.pad, sh.pad, sh.stride, sh.stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                                 CUDNN_DATA_FLOAT));
  SP_CUDNN_CHECK(cudnnSetConvolutionMathType(d, bf16 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH));
  return d;
}

// Picks from heuristic results (best first): status SUCCESS, deterministic when required, a
// workspace query that succeeds within the cap; for fp32 data FMA-only math preferred,
// anything else only as a last resort (with a warning); for bf16 data (any_math) the best
// result of any math type. Sets the descriptor's math type to the chosen result's.
template <typename Perf, typename Algo, typename WsQuery>
void choose(const std::vector<Perf>& perfs, bool det, bool any_math, cudnnConvolutionDescriptor_t conv,
            WsQuery ws_query, const char* what, const Conv2dShape& sh, Algo* algo, size_t* ws) {
  for (int pass = 0; pass < 2; ++pass) {
    for (const Perf& p : perfs) {
      if (p.status != CUDNN_STATUS_SUCCESS) continue;
      if (det && p.determinism != CUDNN_DETERMINISTIC) continue;
      if (pass == 0 && !any_math && p.mathType != CUDNN_FMA_MATH) continue;
      if (cudnnSetConvolutionMathType(conv, p.mathType) != CUDNN_STATUS_SUCCESS) continue;
      size_t bytes = 0;
      if (ws_query(p.algo, &bytes) != CUDNN_STATUS_SUCCESS || bytes > kCudnnMaxWorkspace) continue;
      if (pass == 1)
        std::fprintf(stderr, "staleprop: vendor %s %s: no FMA-only cuDNN algorithm, using math type %d\n", what,
                     conv_str(sh).c_str(), int(p.mathType));
      *algo = p.algo;
      *ws = bytes;
      return;
    }
  }
  throw CudaError(detail::concat("vendor ", what, " ", conv_str(sh), ": cuDNN offers no usable",
                                 det ? " deterministic" : "", " algorithm"));
}

// bf16: every tensor (x, y, w and the bias) is bf16, computed in fp32 (cuDNN's BFLOAT16
// configuration of the legacy convolution API).
std::unique_ptr<ConvPlan> make_conv_plan(cudnnHandle_t h, const Conv2dShape& sh, bool det, bool bf16) {
  const cudnnDataType_t dt = bf16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
  auto pl = std::make_unique<ConvPlan>();
  SP_CUDNN_CHECK(cudnnCreateTensorDescriptor(&pl->x));
  SP_CUDNN_CHECK(cudnnSetTensor4dDescriptor(pl->x, CUDNN_TENSOR_NHWC, dt, sh.n, sh.c, sh.h, sh.w));
  SP_CUDNN_CHECK(cudnnCreateTensorDescriptor(&pl->y));
  SP_CUDNN_CHECK(cudnnSetTensor4dDescriptor(pl->y, CUDNN_TENSOR_NHWC, dt, sh.n, sh.k, sh.p(), sh.q()));
  SP_CUDNN_CHECK(cudnnCreateTensorDescriptor(&pl->bias));
  SP_CUDNN_CHECK(cudnnSetTensor4dDescriptor(pl->bias, CUDNN_TENSOR_NHWC, dt, 1, sh.k, 1, 1));
  SP_CUDNN_CHECK(cudnnCreateFilterDescriptor(&pl->w));
  // NHWC filter format = K x R x S x C in memory (our KRSC).
  SP_CUDNN_CHECK(cudnnSetFilter4dDescriptor(pl->w, dt, CUDNN_TENSOR_NHWC, sh.k, sh.c, sh.r, sh.s));
  pl->fwd_conv = make_conv_desc(sh, bf16);
  pl->bwd_data_conv = make_conv_desc(sh, bf16);
  pl->bwd_filter_conv = make_conv_desc(sh, bf16);

  int n_out = 0, max_count = 0;
  {
    SP_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithmMaxCount(h, &max_count));
    std::vector<cudnnConvolutionFwdAlgoPerf_t> perfs(size_t(std::max(max_count, 1)));
    SP_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(h, pl->x, pl->w, pl->fwd_conv, pl->y, int(perfs.size()),
                                                         &n_out, perfs.data()));
    perfs.resize(size_t(n_out));
    auto q = [&](cudnnConvolutionFwdAlgo_t a, size_t* bytes) {
      return cudnnGetConvolutionForwardWorkspaceSize(h, pl->x, pl->w, pl->fwd_conv, pl->y, a, bytes);
    };
    choose(perfs, det, bf16, pl->fwd_conv, q, "conv2d_forward", sh, &pl->fwd_algo, &pl->fwd_ws);
  }
  {
    SP_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithmMaxCount(h, &max_count));
    std::vector<cudnnConvolutionBwdDataAlgoPerf_t> perfs(size_t(std::max(max_count, 1)));
    SP_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(h, pl->w, pl->y, pl->bwd_data_conv, pl->x,
                                                              int(perfs.size()), &n_out, perfs.data()));
    perfs.resize(size_t(n_out));
    auto q = [&](cudnnConvolutionBwdDataAlgo_t a, size_t* bytes) {
      return cudnnGetConvolutionBackwardDataWorkspaceSize(h, pl->w, pl->y, pl->bwd_data_conv, pl->x, a, bytes);
    };
    choose(perfs, det, bf16, pl->bwd_data_conv, q, "conv2d_backward_data", sh, &pl->bwd_data_algo, &pl->bwd_data_ws);
  }
  {
    SP_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(h, &max_count));
    std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> perfs(size_t(std::max(max_count, 1)));
    SP_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, pl->x, pl->y, pl->bwd_filter_conv, pl->w,
                                                                int(perfs.size()), &n_out, perfs.data()));
    perfs.resize(size_t(n_out));
    auto q = [&](cudnnConvolutionBwdFilterAlgo_t a, size_t* bytes) {
      return cudnnGetConvolutionBackwardFilterWorkspaceSize(h, pl->x, pl->y, pl->bwd_filter_conv, pl->w, a, bytes);
    };
    choose(perfs, det, bf16, pl->bwd_filter_conv, q, "conv2d_backward_weight", sh, &pl->bwd_filter_algo,
           &pl->bwd_filter_ws);
  }
  return pl;
}

// The plan of this shape on the current device, with the thread's cuDNN handle bound to `stream`.
struct ConvCall {
  int dev;
  cudnnHandle_t h;
  const ConvPlan* plan;
};

ConvCall conv_call(const Conv2dShape& sh, cudaStream_t stream, bool bf16 = false) {
  SP_CHECK(sh.valid(), "vendor conv2d: invalid shape ", conv_str(sh));
  const int dev = current_device();
  cudnnHandle_t h = cudnn_handle(dev);
  SP_CUDNN_CHECK(cudnnSetStream(h, stream));
  const bool det = g_deterministic.load(std::memory_order_relaxed);
  const ConvKey key{dev, sh.n, sh.h, sh.w, sh.c, sh.k, sh.r, sh.s, sh.stride, sh.pad, det, bf16};
  static std::mutex mu;
  static std::map<ConvKey, std::unique_ptr<ConvPlan>> cache;  // entries never move or die
  std::lock_guard<std::mutex> lk(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, make_conv_plan(h, sh, det, bf16)).first;
  return {dev, h, it->second.get()};
}

// ---- cuBLASLt bf16 GEMM plans --------------------------------------------------------------------
// (device, trans_a, trans_b, m, n, k, lda, ldb, ldc, alignment of a, b, c and bias, deterministic,
//  C is bf16, bias, relu)
using Bf16GemmKey = std::tuple<int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t, uint32_t,
                               uint32_t, uint32_t, bool, bool, bool, bool>;

// The bias pointer is an attribute of the matmul descriptor, so calls with a bias set it and
// run under the plan's mutex (cublasLtMatmul reads the descriptor before it returns).
struct Bf16GemmPlan : GemmPlan {
  std::mutex mu;
  bool bias_bf16 = false;  // cuBLASLt took no fp32 bias with this C: the bias goes in as bf16
};

// bf16 A and B, fp32 compute (CUBLAS_COMPUTE_32F) and scale type, C/D fp32 or bf16, the bias
// (fp32, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE) and ReLU fused through the epilogue. Same
// operand swap as make_gemm_plan.
std::unique_ptr<Bf16GemmPlan> make_bf16_gemm_plan(cublasLtHandle_t lt, const Bf16GemmKey& key, const float* bias) {
  const auto& [dev, ta, tb, m, n, k, lda, ldb, ldc, al_a, al_b, al_c, al_bias, det, c_bf16, has_bias, relu] = key;
  (void)dev;
  (void)det;
  (void)al_bias;
  auto plan = std::make_unique<Bf16GemmPlan>();
  SP_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = tb ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  SP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  SP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  const cublasLtEpilogue_t epi = has_bias ? (relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS)
                                          : (relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT);
  SP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  auto set_bias_type = [&](cudaDataType_t t) {
    const int32_t bias_type = t;
    SP_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
  };
  if (has_bias) {
    set_bias_type(CUDA_R_32F);  // our bias is fp32 whatever C's type
    // The heuristic reads the pointer's alignment (part of the key); calls set their own.
    SP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  const cudaDataType_t c_type = c_bf16 ? CUDA_R_16BF : CUDA_R_32F;
  SP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, uint64_t(tb ? k : n), uint64_t(tb ? n : k), ldb));
  SP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, uint64_t(ta ? m : k), uint64_t(ta ? k : m), lda));
  SP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, c_type, uint64_t(n), uint64_t(m), ldc));

  PreferenceGuard pref;
  SP_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.p));
  const size_t max_ws = kLtMaxWorkspace;
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_ws, sizeof(max_ws)));
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_b, sizeof(al_b)));
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_a, sizeof(al_a)));
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
  SP_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)));

  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  auto heuristic = [&] {
    returned = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt, plan->op, plan->a, plan->b, plan->c, plan->c, pref.p,
                                                             1, &result, &returned);
    // No algorithm for the combination shows up as NOT_SUPPORTED or (seen on H200, CUDA 13,
    // fp32 bias with a bf16 D) INVALID_VALUE.
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) SP_CUBLAS_CHECK(st);
    return st == CUBLAS_STATUS_SUCCESS && returned >= 1 && result.state == CUBLAS_STATUS_SUCCESS;
  };
  bool found = heuristic();
  if (!found && has_bias && c_bf16) {
    // cuBLASLt may refuse an fp32 bias with a bf16 D: fall back to a bf16 bias (the baseline
    // then rounds the bias once more than our kernel).
    set_bias_type(CUDA_R_16BF);
    plan->bias_bf16 = true;
    found = heuristic();
  }
  if (!found)
    throw CudaError(detail::concat("vendor gemm_bf16: cuBLASLt has no algorithm for ", m, "x", n, "x", k,
                                   ta ? " A^T" : "", tb ? " B^T" : "", " lda ", lda, " ldb ", ldb, " ldc ", ldc,
                                   c_bf16 ? " bf16 C" : " fp32 C", has_bias ? " bias" : "", relu ? " relu" : ""));
  plan->algo = result.algo;
  plan->workspace = result.workspaceSize;
  return plan;
}

Bf16GemmPlan& bf16_gemm_plan(cublasLtHandle_t lt, const Bf16GemmKey& key, const float* bias) {
  static std::mutex mu;
  static std::map<Bf16GemmKey, std::unique_ptr<Bf16GemmPlan>> cache;  // entries never move or die
  std::lock_guard<std::mutex> lk(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, make_bf16_gemm_plan(lt, key, bias)).first;
  return *it->second;
}

// C (fp32, or bf16 when c_bf16) = relu?(alpha op(A) op(B) + beta C + bias).
void lt_gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                  int64_t lda, const uint16_t* b, int64_t ldb, float beta, void* c, int64_t ldc, bool c_bf16,
                  const float* bias, bool relu, cudaStream_t stream) {
  SP_CHECK(m >= 0 && n >= 0 && k >= 0, "vendor gemm_bf16: negative size ", m, "x", n, "x", k);
  if (m == 0 || n == 0) return;
  if (alpha == 0.f || k == 0) {
    // C = relu?(beta C + bias) without reading A or B: cuBLASLt has no K = 0 matmul, so this
    // degenerate case runs our own epilogue kernel (no arithmetic to compare anyway).
    if (c_bf16)
      cuda::gemm_bf16_out_bf16(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, static_cast<uint16_t*>(c), ldc,
                               bias, relu, stream);
    else
      cuda::gemm_bf16(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, static_cast<float*>(c), ldc, bias, relu,
                      stream);
    return;
  }
  const int dev = current_device();
  cublasLtHandle_t lt = lt_handle(dev);
  const Bf16GemmKey key{dev,
                        trans_a,
                        trans_b,
                        m,
                        n,
                        k,
                        lda,
                        ldb,
                        ldc,
                        alignment_of(a),
                        alignment_of(b),
                        alignment_of(c),
                        bias ? alignment_of(bias) : 0u,
                        g_deterministic.load(std::memory_order_relaxed),
                        c_bf16,
                        bias != nullptr,
                        relu};
  Bf16GemmPlan& plan = bf16_gemm_plan(lt, key, bias);
  Workspace ws(dev, plan.workspace, stream);
  std::lock_guard<std::mutex> lk(plan.mu);
  const void* bias_ptr = bias;
  Workspace bias16(dev, plan.bias_bf16 ? size_t(n) * sizeof(uint16_t) : 0, stream);
  if (plan.bias_bf16) {
    cuda::f32_to_bf16(n, bias, static_cast<uint16_t*>(bias16.get()), stream);
    bias_ptr = bias16.get();
  }
  if (bias)
    SP_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
  SP_CUBLAS_CHECK(cublasLtMatmul(lt, plan.op, &alpha, b, plan.a, a, plan.b, &beta, c, plan.c, c, plan.c, &plan.algo,
                                 ws.get(), ws.size(), stream));
}

const float kOne = 1.f, kZero = 0.f;

}  // namespace

void set_deterministic(bool on) { g_deterministic.store(on); }
bool deterministic() { return g_deterministic.load(); }

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, cudaStream_t stream) {
  SP_CHECK(m >= 0 && n >= 0 && k >= 0, "vendor gemm: negative size ", m, "x", n, "x", k);
  if (m == 0 || n == 0) return;
  const int dev = current_device();
  if (alpha == 0.f || k == 0) {  // C = beta * C, A and B unread
    if (beta == 1.f) return;
    if (beta == 0.f) {
      SP_CUDA_CHECK(cudaMemset2DAsync(c, size_t(ldc) * sizeof(float), 0, size_t(n) * sizeof(float), size_t(m), stream));
      return;
    }
    SP_CHECK(m <= INT_MAX && n <= INT_MAX && ldc <= INT_MAX && m * ldc <= INT_MAX,
             "vendor gemm: C too large for the beta-only path");
    cudnnHandle_t h = cudnn_handle(dev);
    SP_CUDNN_CHECK(cudnnSetStream(h, stream));
    cudnnTensorDescriptor_t desc = nullptr;
    SP_CUDNN_CHECK(cudnnCreateTensorDescriptor(&desc));
    const cudnnStatus_t st =
        cudnnSetTensor4dDescriptorEx(desc, CUDNN_DATA_FLOAT, 1, 1, int(m), int(n), int(m * ldc), int(m * ldc),
                                     int(ldc), 1);
    const cudnnStatus_t st2 = st == CUDNN_STATUS_SUCCESS ? cudnnScaleTensor(h, desc, c, &beta) : st;
    cudnnDestroyTensorDescriptor(desc);
    SP_CUDNN_CHECK(st2);
    return;
  }
  cublasLtHandle_t lt = lt_handle(dev);
  const GemmKey key{dev,
                    trans_a,
                    trans_b,
                    m,
                    n,
                    k,
                    lda,
                    ldb,
                    ldc,
                    alignment_of(a),
                    alignment_of(b),
                    alignment_of(c),
                    g_deterministic.load(std::memory_order_relaxed)};
  const GemmPlan& plan = gemm_plan(lt, key);
  Workspace ws(dev, plan.workspace, stream);
  SP_CUBLAS_CHECK(cublasLtMatmul(lt, plan.op, &alpha, b, plan.a, a, plan.b, &beta, c, plan.c, c, plan.c, &plan.algo,
                                 ws.get(), ws.size(), stream));
}

void conv2d_forward(const Conv2dShape& sh, const float* x, const float* w, const float* bias, float* y,
                    cudaStream_t stream) {
  const ConvCall cc = conv_call(sh, stream);
  const ConvPlan& p = *cc.plan;
  Workspace ws(cc.dev, p.fwd_ws, stream);
  SP_CUDNN_CHECK(cudnnConvolutionForward(cc.h, &kOne, p.x, x, p.w, w, p.fwd_conv, p.fwd_algo, ws.get(), ws.size(),
                                         &kZero, p.y, y));
  if (bias) SP_CUDNN_CHECK(cudnnAddTensor(cc.h, &kOne, p.bias, bias, &kOne, p.y, y));
}

void conv2d_backward_data(const Conv2dShape& sh, const float* dy, const float* w, float* dx, cudaStream_t stream,
                          float beta) {
  const ConvCall cc = conv_call(sh, stream);
  const ConvPlan& p = *cc.plan;
  Workspace ws(cc.dev, p.bwd_data_ws, stream);
  SP_CUDNN_CHECK(cudnnConvolutionBackwardData(cc.h, &kOne, p.w, w, p.y, dy, p.bwd_data_conv, p.bwd_data_algo, ws.get(),
                                              ws.size(), &beta, p.x, dx));
}

void conv2d_backward_weight(const Conv2dShape& sh, const float* x, const float* dy, float* dw, float* dbias,
                            cudaStream_t stream) {
  const ConvCall cc = conv_call(sh, stream);
  const ConvPlan& p = *cc.plan;
  Workspace ws(cc.dev, p.bwd_filter_ws, stream);
  SP_CUDNN_CHECK(cudnnConvolutionBackwardFilter(cc.h, &kOne, p.x, x, p.y, dy, p.bwd_filter_conv, p.bwd_filter_algo,
                                                ws.get(), ws.size(), &kZero, p.w, dw));
  if (dbias) SP_CUDNN_CHECK(cudnnConvolutionBackwardBias(cc.h, &kOne, p.y, dy, &kZero, p.bias, dbias));
}

// ---- bf16 -----------------------------------------------------------------------------------------
void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
               int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc, const float* bias,
               bool relu, cudaStream_t stream) {
  lt_gemm_bf16(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, false, bias, relu, stream);
}

void gemm_bf16_out_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                        int64_t lda, const uint16_t* b, int64_t ldb, float beta, uint16_t* c, int64_t ldc,
                        const float* bias, bool relu, cudaStream_t stream) {
  lt_gemm_bf16(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, true, bias, relu, stream);
}

void conv2d_forward_bf16(const Conv2dShape& sh, const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y,
                         cudaStream_t stream) {
  const ConvCall cc = conv_call(sh, stream, true);
  const ConvPlan& p = *cc.plan;
  Workspace ws(cc.dev, p.fwd_ws, stream);
  SP_CUDNN_CHECK(cudnnConvolutionForward(cc.h, &kOne, p.x, x, p.w, w, p.fwd_conv, p.fwd_algo, ws.get(), ws.size(),
                                         &kZero, p.y, y));
  if (bias) {
    // cuDNN's bf16 configuration adds a bf16 bias to the already rounded bf16 y: the fp32 bias
    // is rounded to bf16 first (our conversion kernel), so y is rounded up to three times where
    // our kernel rounds once. Fine for a timing baseline; the tests allow for it.
    Workspace bias16(cc.dev, sizeof(uint16_t) * size_t(sh.k), stream);
    cuda::f32_to_bf16(sh.k, bias, static_cast<uint16_t*>(bias16.get()), stream);
    SP_CUDNN_CHECK(cudnnAddTensor(cc.h, &kOne, p.bias, bias16.get(), &kOne, p.y, y));
  }
}

void conv2d_backward_data_bf16(const Conv2dShape& sh, const uint16_t* dy, const uint16_t* w, uint16_t* dx,
                               cudaStream_t stream, float beta) {
  const ConvCall cc = conv_call(sh, stream, true);
  const ConvPlan& p = *cc.plan;
  Workspace ws(cc.dev, p.bwd_data_ws, stream);
  SP_CUDNN_CHECK(cudnnConvolutionBackwardData(cc.h, &kOne, p.w, w, p.y, dy, p.bwd_data_conv, p.bwd_data_algo, ws.get(),
                                              ws.size(), &beta, p.x, dx));
}

void conv2d_backward_weight_bf16(const Conv2dShape& sh, const uint16_t* x, const uint16_t* dy, float* dw,
                                 float* dbias, cudaStream_t stream) {
  const ConvCall cc = conv_call(sh, stream, true);
  const ConvPlan& p = *cc.plan;
  // cuDNN's bf16 configuration writes dw (and dbias) as bf16, like x and dy: it goes to a bf16
  // scratch tensor and is widened into the fp32 dw (our conversion kernel). So the vendor dw
  // carries one bf16 rounding that ours does not (relative error ~1e-3 against the reference).
  Workspace ws(cc.dev, p.bwd_filter_ws, stream);
  Workspace dw16(cc.dev, sizeof(uint16_t) * size_t(sh.w_size()), stream);
  SP_CUDNN_CHECK(cudnnConvolutionBackwardFilter(cc.h, &kOne, p.x, x, p.y, dy, p.bwd_filter_conv, p.bwd_filter_algo,
                                                ws.get(), ws.size(), &kZero, p.w, dw16.get()));
  cuda::bf16_to_f32(sh.w_size(), static_cast<const uint16_t*>(dw16.get()), dw, stream);
  // cuDNN has no bf16 backward-bias (CUDNN_STATUS_NOT_SUPPORTED, cuDNN 9 on an H200): the bias
  // gradient, a plain column sum of dy, comes from our reduction instead.
  if (dbias) cuda::column_sums_bf16(int64_t(sh.n) * sh.p() * sh.q(), sh.k, dy, dbias, stream);
}

}  // namespace sp::kernels::vendor
