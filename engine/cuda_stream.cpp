// CUDA streams and events behind the engine's Stream/Event API.
#include "engine/allocator.h"
#include "engine/stream_impl.h"
#include "kernels/common/error.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels/common/cuda_check.h"
#endif

namespace sp {

#if STALEPROP_WITH_CUDA
namespace {

class CudaEvent final : public Event {
 public:
  CudaEvent(Device d, bool timing) : device_(d) {
    SP_CUDA_CHECK(cudaSetDevice(d.index));
    SP_CUDA_CHECK(cudaEventCreateWithFlags(&event_, timing ? cudaEventDefault : cudaEventDisableTiming));
  }
  ~CudaEvent() override { cudaEventDestroy(event_); }
  Device device() const override { return device_; }
  bool query() override {
    const cudaError_t st = cudaEventQuery(event_);
    if (st == cudaErrorNotReady) {
      // Also the thread's last error: cleared, so that no later check (ours, cuBLAS's or
      // cuDNN's) reads it as a failure.
      (void)cudaGetLastError();
      return false;
    }
    SP_CUDA_CHECK(st);
    return true;
  }
  void synchronize() override { SP_CUDA_CHECK(cudaEventSynchronize(event_)); }
  float elapsed_ms_since(Event& start) override {
    float ms = 0;
    SP_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.native_handle()), event_));
    return ms;
  }
  void* native_handle() const override { return event_; }

 private:
  Device device_;
  cudaEvent_t event_ = nullptr;
};

using HostFns = std::vector<std::unique_ptr<std::function<void()>>>;

// An instantiated CUDA graph. The host functions captured into it run at every launch; they
// are owned by a CUDA user object retained by the graph, so CUDA deletes them only after the
// last launch that may call them has completed, even if this object is destroyed earlier.
class CudaGraph final : public Graph {
 public:
  CudaGraph(Device d, cudaGraph_t graph, HostFns host_fns) : device_(d), graph_(graph) {
    try {
      if (!host_fns.empty()) {
        auto* owned = new HostFns(std::move(host_fns));
        cudaUserObject_t object = nullptr;
        const cudaError_t st = cudaUserObjectCreate(
            &object, owned, [](void* p) { delete static_cast<HostFns*>(p); }, 1, cudaUserObjectNoDestructorSync);
        if (st != cudaSuccess) delete owned;
        SP_CUDA_CHECK(st);
        const cudaError_t retained = cudaGraphRetainUserObject(graph_, object, 1, cudaGraphUserObjectMove);
        if (retained != cudaSuccess) cudaUserObjectRelease(object, 1);  // deletes the closures
        SP_CUDA_CHECK(retained);
      }
      SP_CUDA_CHECK(cudaGraphGetNodes(graph_, nullptr, &nodes_));
      SP_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph_, 0));
    } catch (...) {  // no destructor runs for a half-built object: let the graph go here
      if (exec_) cudaGraphExecDestroy(exec_);
      cudaGraphDestroy(graph_);
      throw;
    }
  }
  ~CudaGraph() override {
    if (exec_) cudaGraphExecDestroy(exec_);
    if (graph_) cudaGraphDestroy(graph_);
  }
  void launch(Stream& s) override {
    SP_CHECK(s.device() == device_, "a graph captured on ", device_.str(), " launched on ", s.device().str());
    SP_CUDA_CHECK(cudaGraphLaunch(exec_, static_cast<cudaStream_t>(s.native_handle())));
  }
  size_t size() const override { return nodes_; }

 private:
  Device device_;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  size_t nodes_ = 0;
};

class CudaStream final : public Stream {
 public:
  explicit CudaStream(Device d) : device_(d) {
    SP_CUDA_CHECK(cudaSetDevice(d.index));
    SP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  // Like the CPU emulation's stream, waits for the work enqueued (so that no kernel still uses
  // memory its owner frees next, or that the caching allocator hands out again), then gives the
  // blocks cached for it to the streams that come after it (CachingAllocator::retire_stream).
  ~CudaStream() override {
    cudaSetDevice(device_.index);
    if (capturing_) {
      // Destroyed inside a capture (an error between begin_capture and end_capture): the
      // capture ends here and its graph goes, so that this thread is left capturing nothing.
      cudaGraph_t graph = nullptr;
      if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph != nullptr) cudaGraphDestroy(graph);
      (void)cudaGetLastError();
    }
    cudaStreamSynchronize(stream_);  // an error here was, or will be, reported where it arose
    cudaStreamDestroy(stream_);
    retire_stream_memory(device_, this);
  }
  Device device() const override { return device_; }

  void enqueue_host(std::function<void()> fn) override {
    // An exception must not unwind through the driver's C callback (that ends the process): it
    // is kept, the later work still runs, and synchronize() rethrows the first, once (as the
    // CPU emulation's stream does). The slot is shared, so a graph's host node that runs after
    // this stream is gone writes into it harmlessly. A captured closure's error is kept by the
    // capturing stream, wherever its graph is launched (the pipeline launches each graph on the
    // stream that captured it; the CPU emulation reports on the launching stream).
    fn = [slot = host_error_, fn = std::move(fn)] {
      try {
        fn();
      } catch (...) {
        std::lock_guard<std::mutex> lk(slot->mu);
        if (!slot->error) slot->error = std::current_exception();
      }
    };
    if (capturing_) {
      // A host node runs at every launch: the graph keeps the closure.
      captured_fns_.push_back(std::make_unique<std::function<void()>>(std::move(fn)));
      SP_CUDA_CHECK(cudaLaunchHostFunc(
          stream_, [](void* p) { (*static_cast<std::function<void()>*>(p))(); }, captured_fns_.back().get()));
      return;
    }
    auto* heap = new std::function<void()>(std::move(fn));
    const cudaError_t st = cudaLaunchHostFunc(
        stream_,
        [](void* p) {
          auto* f = static_cast<std::function<void()>*>(p);
          (*f)();
          delete f;
        },
        heap);
    if (st != cudaSuccess) delete heap;
    SP_CUDA_CHECK(st);
  }
  void record(Event& e) override {
    SP_CHECK(e.device() == device_, "record: event on ", e.device().str(), ", stream on ", device_.str());
    // While capturing: an event record node, so that other streams and the host can wait on it.
    SP_CUDA_CHECK(cudaEventRecordWithFlags(static_cast<cudaEvent_t>(e.native_handle()), stream_,
                                           capturing_ ? cudaEventRecordExternal : cudaEventRecordDefault));
  }
  void wait(Event& e) override {
    SP_CHECK(e.device().is_cuda(), "a CUDA stream can only wait on CUDA events, got ", e.device().str());
    SP_CUDA_CHECK(cudaStreamWaitEvent(stream_, static_cast<cudaEvent_t>(e.native_handle()),
                                      capturing_ ? cudaEventWaitExternal : cudaEventWaitDefault));
  }
  void begin_capture() override {
    SP_CHECK(!capturing_, "begin_capture: the stream is already capturing");
    SP_CUDA_CHECK(cudaSetDevice(device_.index));
    // Thread-local: other threads' unsafe calls (e.g. a producer thread's synchronous copies)
    // do not invalidate this capture.
    SP_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    capturing_ = true;
  }
  std::unique_ptr<Graph> end_capture() override {
    SP_CHECK(capturing_, "end_capture: the stream is not capturing");
    capturing_ = false;
    HostFns fns = std::move(captured_fns_);  // none carries over into a later capture, even on failure
    captured_fns_.clear();
    cudaGraph_t graph = nullptr;
    SP_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    return std::make_unique<CudaGraph>(device_, graph, std::move(fns));
  }
  void synchronize() override {
    SP_CHECK(!capturing_, "synchronize: the stream is capturing a graph");
    SP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::exception_ptr e;
    {
      std::lock_guard<std::mutex> lk(host_error_->mu);
      std::swap(e, host_error_->error);
    }
    if (e) std::rethrow_exception(e);
  }
  bool query() override {
    SP_CHECK(!capturing_, "query: the stream is capturing a graph");
    const cudaError_t st = cudaStreamQuery(stream_);
    if (st == cudaErrorNotReady) {
      (void)cudaGetLastError();  // as CudaEvent::query
      return false;
    }
    SP_CUDA_CHECK(st);
    return true;
  }
  void* native_handle() const override { return stream_; }

 private:
  Device device_;
  cudaStream_t stream_ = nullptr;
  HostFns captured_fns_;
  struct HostError {
    std::mutex mu;
    std::exception_ptr error;  // the first exception a host function threw since synchronize()
  };
  std::shared_ptr<HostError> host_error_ = std::make_shared<HostError>();
};

}  // namespace

std::unique_ptr<Stream> make_cuda_stream(Device device) { return std::make_unique<CudaStream>(device); }
std::unique_ptr<Event> make_cuda_event(Device device, bool timing) {
  return std::make_unique<CudaEvent>(device, timing);
}

#else

std::unique_ptr<Stream> make_cuda_stream(Device device) {
  throw NotSupportedError("cannot create a stream on " + device.str() + ": this build has no CUDA backend");
}
std::unique_ptr<Event> make_cuda_event(Device device, bool) {
  throw NotSupportedError("cannot create an event on " + device.str() + ": this build has no CUDA backend");
}

#endif

}  // namespace sp
