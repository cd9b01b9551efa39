// Streams and events: one API, two implementations.
//
//   CUDA:  a cudaStream_t / cudaEvent_t.
//   CPU:   a stream is a worker thread running its FIFO of closures in order; an event keeps
//          CUDA's meaning: record() captures "all work enqueued on this stream so far",
//          wait() makes a stream block (in stream order, not on the host) until the most
//          recent record made before the wait() call has completed; waiting on a never-recorded
//          event is a no-op; query()/synchronize() look at the most recent record. Queued CPU
//          work holds no tensors (ops.cpp: borrow), as CUDA kernels hold none.
//
// Everything above the runtime (scheduler, trainer) uses only this API, so the code that
// drives the GPU is the code tested on the CPU. CPU streams can inject random delays before
// each closure (StreamOptions::jitter_max_us, or $STALEPROP_CPU_STREAM_JITTER_US) so that a
// missing wait shows up as a wrong result in tests rather than as a rare race on a GPU.
//
// Graphs (CUDA graphs; a list of recorded closures on the CPU): between begin_capture() and
// end_capture() the work enqueued on a stream is recorded instead of run, and end_capture()
// returns it as a Graph that launch() enqueues again, as often as wanted, with the same
// addresses and arguments. Event records and waits made while capturing become event nodes
// (CUDA: cudaEventRecordExternal / cudaEventWaitExternal) that act at each launch as the
// captured call would have acted there: a wait node waits on the most recent record made
// before that launch, a record node records the event anew. Memory that the captured work
// uses must keep its address until the graph's last launch has run: allocations keyed to a
// capturing stream must come from an Arena (allocator.h), and anything else is an error.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>

#include "engine/device.h"

namespace sp {

class Arena;
class Event;
class Graph;

struct StreamOptions {
  int jitter_max_us = 0;  // CPU only: sleep a random 0..jitter_max_us before each closure
  uint64_t seed = 0;      // CPU only: seed of the jitter generator
};

// Closures the CPU streams of this process have run after a random delay (of 1 us or more):
// lets a test see that the jitter it asked for was applied.
int64_t cpu_stream_jittered_closures();

class Stream {
 public:
  virtual ~Stream() = default;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  virtual Device device() const = 0;
  // Runs fn on the host after all work enqueued before it (CPU: on the worker thread; CUDA:
  // cudaLaunchHostFunc, so fn must not call CUDA). CPU kernels are dispatched this way.
  virtual void enqueue_host(std::function<void()> fn) = 0;
  virtual void record(Event& event) = 0;
  virtual void wait(Event& event) = 0;
  // Blocks the calling thread until all enqueued work is done. An exception thrown by a closure
  // enqueue_host ran is rethrown here (the first one, once; the later work still ran). A closure
  // captured into a graph reports to the stream that launches the graph on the CPU, and to the
  // stream that captured it on CUDA (the pipeline launches each graph on its capturing stream).
  virtual void synchronize() = 0;
  // True when all enqueued work is done.
  virtual bool query() = 0;
  // The cudaStream_t for CUDA streams, nullptr for CPU streams.
  virtual void* native_handle() const { return nullptr; }

  // Starts recording this stream's work into a graph (see above). Only one stream of a thread
  // may capture at a time; the stream must not be synchronized or queried while it captures.
  virtual void begin_capture() = 0;
  // Ends the capture and returns the graph, instantiated and ready to launch.
  virtual std::unique_ptr<Graph> end_capture() = 0;
  bool capturing() const { return capturing_; }

  // Allocations keyed to this stream (Tensor::empty with this stream, new_activation) come
  // from `arena` while it is set (nullptr: from the caching allocator). See ArenaScope.
  void set_arena(Arena* arena) { arena_ = arena; }
  Arena* arena() const { return arena_; }

 protected:
  Stream() = default;
  bool capturing_ = false;

 private:
  Arena* arena_ = nullptr;
};

// Work captured from a stream, replayed by launch().
class Graph {
 public:
  virtual ~Graph() = default;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  // Enqueues one run of the captured work on s (a stream of the device it was captured on).
  virtual void launch(Stream& s) = 0;
  // How many operations (closures, kernels, copies, event nodes) one launch runs.
  virtual size_t size() const = 0;

 protected:
  Graph() = default;
};

class Event {
 public:
  virtual ~Event() = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  virtual Device device() const = 0;
  // True when the most recent record has completed (or the event was never recorded).
  virtual bool query() = 0;
  // Blocks the calling thread until the most recent record has completed.
  virtual void synchronize() = 0;
  // Milliseconds from `start`'s completion to this event's completion; both must be timing
  // events of the same device whose most recent records have completed.
  virtual float elapsed_ms_since(Event& start) = 0;
  virtual void* native_handle() const { return nullptr; }

 protected:
  Event() = default;
};

std::unique_ptr<Stream> make_stream(Device device, const StreamOptions& options = {});
// timing == false is cheaper on CUDA (cudaEventDisableTiming); elapsed_ms_since needs true.
std::unique_ptr<Event> make_event(Device device, bool timing = false);

// Waits for a stream's work, swallowing its error (reported where it arose, or being reported by
// the exception that is unwinding the stack): for destructors, which must not throw.
inline void synchronize_quietly(Stream& stream) noexcept {
  try {
    stream.synchronize();
  } catch (const std::exception&) {
  }
}

// synchronize_quietly() when it goes out of scope. Declared after what a stream's work uses, it
// keeps an error that unwinds the stack from freeing memory the stream's kernels still use,
// which the caching allocator could hand out again at once.
struct Drain {
  Stream& stream;
  ~Drain() { synchronize_quietly(stream); }
};

}  // namespace sp
