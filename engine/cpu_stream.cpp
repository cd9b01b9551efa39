// CPU emulation of streams and events (see stream.h for the semantics kept from CUDA).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "engine/allocator.h"
#include "engine/stream_impl.h"
#include "kernels/common/error.h"

namespace sp {
namespace {

using Clock = std::chrono::steady_clock;

std::atomic<int64_t> g_jittered{0};  // cpu_stream_jittered_closures()

// Shared by the event object and the closures that complete it, which may outlive it.
struct CpuEventState {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0;          // generation of the most recent record() call
  std::set<uint64_t> pending;     // generations recorded but not yet reached by their stream
  // When the most recent record completed (as CUDA times an event by its latest record: an
  // older record that completes later does not move it); unset until that record completes.
  Clock::time_point completed_at;
  bool timed = false;

  bool done(uint64_t gen) const { return gen == 0 || pending.count(gen) == 0; }
};

class CpuEvent final : public Event {
 public:
  CpuEvent(bool timing, Device device)
      : timing_(timing), device_(device), state_(std::make_shared<CpuEventState>()) {}
  Device device() const override { return device_; }
  bool query() override {
    std::lock_guard<std::mutex> lk(state_->mu);
    return state_->done(state_->recorded);
  }
  void synchronize() override {
    std::unique_lock<std::mutex> lk(state_->mu);
    const uint64_t gen = state_->recorded;
    state_->cv.wait(lk, [&] { return state_->done(gen); });
  }
  float elapsed_ms_since(Event& start) override {
    auto* s = dynamic_cast<CpuEvent*>(&start);
    SP_CHECK(s != nullptr && s->device_ == device_, "elapsed_ms_since: events of different devices (",
             start.device().str(), " and ", device_.str(), ")");
    SP_CHECK(timing_ && s->timing_, "elapsed_ms_since: both events must be created with timing = true");
    SP_CHECK(query() && s->query(), "elapsed_ms_since: both events must have completed");
    Clock::time_point a, b;
    bool timed_a, timed_b;
    {
      std::lock_guard<std::mutex> lk(s->state_->mu);
      a = s->state_->completed_at, timed_a = s->state_->timed;
    }
    {
      std::lock_guard<std::mutex> lk(state_->mu);
      b = state_->completed_at, timed_b = state_->timed;
    }
    SP_CHECK(timed_a && timed_b, "elapsed_ms_since: both events must have been recorded");
    return std::chrono::duration<float, std::milli>(b - a).count();
  }
  const std::shared_ptr<CpuEventState>& state() const { return state_; }

 private:
  bool timing_;
  Device device_;
  std::shared_ptr<CpuEventState> state_;
};

CpuEvent& as_cpu_event(Event& e) {
  auto* ce = dynamic_cast<CpuEvent*>(&e);
  SP_CHECK(ce != nullptr, "a CPU stream can only record or wait on CPU events, got an event of ",
           e.device().str());
  return *ce;
}

class CpuStream;

// A captured list of closures and event operations, re-enqueued by each launch.
class CpuGraph final : public Graph {
 public:
  enum class Kind { Host, Record, Wait };
  struct Node {
    Kind kind;
    std::function<void()> fn;              // Host
    std::shared_ptr<CpuEventState> event;  // Record, Wait
  };
  explicit CpuGraph(Device device) : device(device) {}
  void launch(Stream& s) override;
  size_t size() const override { return nodes.size(); }
  Device device;  // of the stream it was captured on
  std::vector<Node> nodes;
};

class CpuStream final : public Stream {
 public:
  CpuStream(const StreamOptions& opt, Device device) : device_(device), jitter_us_(opt.jitter_max_us), rng_(opt.seed) {
    if (jitter_us_ == 0)
      if (const char* env = std::getenv("STALEPROP_CPU_STREAM_JITTER_US")) jitter_us_ = std::max(0, std::atoi(env));
    worker_ = std::thread([this] { loop(); });
  }
  ~CpuStream() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();  // like cudaStreamDestroy, pending work still completes
    retire_stream_memory(device_, this);
  }

  Device device() const override { return device_; }

  void enqueue_host(std::function<void()> fn) override {
    // What the closure allocates counts for the enqueuing thread's owner (AllocationOwner).
    if (const int owner = AllocationOwner::current(); owner != 0)
      fn = [owner, f = std::move(fn)] {
        const AllocationOwner as(owner, AllocationOwner::Adopt{});
        f();
      };
    if (capture_) {
      capture_->nodes.push_back({CpuGraph::Kind::Host, std::move(fn), nullptr});
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.push_back(std::move(fn));
      ++enqueued_;
    }
    cv_.notify_all();
  }

  void record(Event& event) override {
    // As on CUDA, a stream records only its own device's events (it may wait on any).
    SP_CHECK(event.device() == device_, "record: event on ", event.device().str(), ", stream on ", device_.str());
    auto state = as_cpu_event(event).state();
    if (capture_) {
      capture_->nodes.push_back({CpuGraph::Kind::Record, nullptr, state});
      return;
    }
    record_state(state);
  }

  void wait(Event& event) override {
    auto state = as_cpu_event(event).state();
    if (capture_) {
      capture_->nodes.push_back({CpuGraph::Kind::Wait, nullptr, state});
      return;
    }
    wait_state(state);
  }

  void begin_capture() override {
    SP_CHECK(!capture_, "begin_capture: the stream is already capturing");
    capture_ = std::make_unique<CpuGraph>(device_);
    capturing_ = true;
  }

  std::unique_ptr<Graph> end_capture() override {
    SP_CHECK(capture_ != nullptr, "end_capture: the stream is not capturing");
    capturing_ = false;
    return std::move(capture_);
  }

  void record_state(const std::shared_ptr<CpuEventState>& state) {
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(state->mu);
      gen = ++state->recorded;
      state->pending.insert(gen);
    }
    enqueue_host([state, gen] {
      {
        std::lock_guard<std::mutex> lk(state->mu);
        state->pending.erase(gen);
        if (gen == state->recorded) state->completed_at = Clock::now(), state->timed = true;
      }
      state->cv.notify_all();
    });
  }

  void wait_state(const std::shared_ptr<CpuEventState>& state) {
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(state->mu);
      gen = state->recorded;  // the wait refers to the record made before this call
    }
    if (gen == 0) return;
    enqueue_host([state, gen] {
      std::unique_lock<std::mutex> lk(state->mu);
      state->cv.wait(lk, [&] { return state->done(gen); });
    });
  }

  void synchronize() override {
    SP_CHECK(!capture_, "synchronize: the stream is capturing a graph");
    std::unique_lock<std::mutex> lk(mu_);
    const uint64_t target = enqueued_;
    idle_.wait(lk, [&] { return completed_ >= target; });
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

  bool query() override {
    SP_CHECK(!capture_, "query: the stream is capturing a graph");
    std::lock_guard<std::mutex> lk(mu_);
    return completed_ == enqueued_;
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop_ and drained
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
      if (jitter_us_ > 0) {
        const int us = std::uniform_int_distribution<int>(0, jitter_us_)(rng_);
        std::this_thread::sleep_for(std::chrono::microseconds(us));
        if (us > 0) g_jittered.fetch_add(1, std::memory_order_relaxed);
      }
      std::exception_ptr err;
      try {
        fn();
      } catch (...) {
        err = std::current_exception();
      }
      fn = nullptr;  // release what the closure captured before reporting completion
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (err && !error_) error_ = err;
        ++completed_;
      }
      idle_.notify_all();
    }
  }

  Device device_;
  int jitter_us_;
  std::mt19937_64 rng_;  // used only by the worker thread
  std::mutex mu_;
  std::condition_variable cv_, idle_;
  std::deque<std::function<void()>> queue_;
  uint64_t enqueued_ = 0, completed_ = 0;
  std::exception_ptr error_;
  bool stop_ = false;
  std::unique_ptr<CpuGraph> capture_;  // set while capturing (touched by the host thread only)
  std::thread worker_;
};

void CpuGraph::launch(Stream& s) {
  auto* cs = dynamic_cast<CpuStream*>(&s);
  SP_CHECK(cs != nullptr && s.device() == device, "a graph captured on ", device.str(),
           " can only be launched on a stream of that device, not on ", s.device().str());
  SP_CHECK(!cs->capturing(), "launching a graph into a capturing stream is not supported");
  for (const Node& n : nodes) {
    switch (n.kind) {
      case Kind::Host: cs->enqueue_host(n.fn); break;
      case Kind::Record: cs->record_state(n.event); break;
      case Kind::Wait: cs->wait_state(n.event); break;
    }
  }
}

}  // namespace

int64_t cpu_stream_jittered_closures() { return g_jittered.load(std::memory_order_relaxed); }

std::unique_ptr<Stream> make_cpu_stream(const StreamOptions& options, Device device) {
  require_device(device);
  return std::make_unique<CpuStream>(options, device);
}
std::unique_ptr<Event> make_cpu_event(bool timing, Device device) {
  require_device(device);
  return std::make_unique<CpuEvent>(timing, device);
}

std::unique_ptr<Stream> make_stream(Device device, const StreamOptions& options) {
  if (device.is_cpu()) return make_cpu_stream(options, device);
  return make_cuda_stream(device);
}

std::unique_ptr<Event> make_event(Device device, bool timing) {
  if (device.is_cpu()) return make_cpu_event(timing, device);
  return make_cuda_event(device, timing);
}

}  // namespace sp
