// CUDA streams and events behind the engine's Stream/Event API.
#include "engine/stream_impl.h"
#include "kernels/common/error.h"

#if STALEPROP_WITH_CUDA
#include <cuda_runtime_api.h>

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
    if (st == cudaErrorNotReady) return false;
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

class CudaStream final : public Stream {
 public:
  explicit CudaStream(Device d) : device_(d) {
    SP_CUDA_CHECK(cudaSetDevice(d.index));
    SP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  ~CudaStream() override { cudaStreamDestroy(stream_); }
  Device device() const override { return device_; }

  void enqueue_host(std::function<void()> fn) override {
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
    SP_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e.native_handle()), stream_));
  }
  void wait(Event& e) override {
    SP_CHECK(e.device().is_cuda(), "a CUDA stream can only wait on CUDA events, got ", e.device().str());
    SP_CUDA_CHECK(cudaStreamWaitEvent(stream_, static_cast<cudaEvent_t>(e.native_handle()), 0));
  }
  void synchronize() override { SP_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  bool query() override {
    const cudaError_t st = cudaStreamQuery(stream_);
    if (st == cudaErrorNotReady) return false;
    SP_CUDA_CHECK(st);
    return true;
  }
  void* native_handle() const override { return stream_; }

 private:
  Device device_;
  cudaStream_t stream_ = nullptr;
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
