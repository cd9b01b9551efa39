// Device time per op: while an OpProfile is alive, every op of the op contract (ops.h) issued
// on a stream is bracketed by two timing events recorded on that stream (the start before the
// op issues anything, the end after its last work), and collect() gives the time between them,
// summed over the calls of each op on each set of operand shapes.
//
// An op's time runs from when the device (CUDA) or the stream's worker thread (CPU emulation)
// reached its start to when it finished the op's work. When the device was already busy as the
// op was issued, that is the op's own work; when it was idle, it also includes the host's time
// issuing the op's kernels. So on one stream, wall time minus the summed op time is time the
// device certainly waited for the host between ops, a lower bound on launch overhead. Ops on
// several streams may overlap, and then their times add up to more than the wall time.
//
// Only the outermost op is timed: an op that runs others (bf16 through the fp32 kernels with
// widening casts) is timed as a whole. An op that throws is not timed. Nothing is recorded on
// a stream that is capturing a graph, so graph replays are not seen; profile eager work.
// Recording costs host time (two events per op), so a profiled run is slower than an
// unprofiled one: time throughput without it.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace sp {

class Event;
class Stream;
class Tensor;

// One timed call, for timelines: its stream, and its start counted from an origin event.
struct OpSpan {
  const Stream* stream = nullptr;
  std::string op, shapes;
  double start_ms = 0, duration_ms = 0;
};

struct OpTime {
  std::string op;      // e.g. "conv2d_forward"
  std::string shapes;  // dtype of the first operand and the operands' shapes, e.g. "bf16 [128,32,32,16] [16,3,3,16]"
  int64_t calls = 0;
  double ms = 0;  // summed over the calls
};

class OpProfile {
 public:
  // Starts recording; only one profile can be alive at a time (throws otherwise).
  OpProfile();
  ~OpProfile();  // stops recording
  OpProfile(const OpProfile&) = delete;
  OpProfile& operator=(const OpProfile&) = delete;

  // Waits for the events of every call whose issue has ended and returns the totals per (op,
  // shapes), largest time first. Those calls are consumed: a second collect() sees only later
  // ones (and calls still being issued on another thread, once they end).
  std::vector<OpTime> collect();
  // The same calls one by one (consumed alike): each call's start counted from origin_of(its
  // stream), an event of that stream's device recorded before the call (streams of one device
  // share a clock); calls on a stream for which it returns nullptr are left out. completed_only:
  // only the calls whose stream has finished them, without waiting (the others stay for later),
  // so that a long run can be read as it goes and keeps few events.
  std::vector<OpSpan> collect_spans(const std::function<Event*(const Stream*)>& origin_of, bool completed_only = false);

  struct State;

 private:
  // Shared with the ops being issued on other threads when the profile goes (they finish their
  // record into a state no one reads, and the last of them frees it).
  std::shared_ptr<State> state_;
};

// Used by the ops (ops.cpp): records the start event when a profile is alive, the stream is
// not capturing and no enclosing op is being timed on this thread, and the end event on
// destruction. `operands` name the shapes (an undefined tensor is left out).
struct OpRecord;

class OpScope {
 public:
  OpScope(Stream& s, const char* op, std::initializer_list<const Tensor*> operands);
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

 private:
  std::shared_ptr<OpRecord> record_;  // null: not timing
  Stream* stream_ = nullptr;
  int exceptions_ = 0;  // std::uncaught_exceptions() at construction
};

// The totals of several ops as text: one line per op (all shapes together), then the `top`
// most expensive (op, shapes), each with ms per step (over `steps`) and share of the summed time.
std::string format_op_profile(const std::vector<OpTime>& times, int64_t steps, size_t top = 15);

}  // namespace sp
