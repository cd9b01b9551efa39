// Device time per op: while an OpProfile is alive, every op of the op contract (ops.h) issued
// on a stream is bracketed by two timing events recorded on that stream, and collect() gives
// the time between them, summed over the calls of each op on each set of operand shapes.
//
// The events time what the device (CUDA) or the stream's worker thread (CPU emulation) spent
// from the op's first work to its last, so the time of an op includes any gap its kernels
// leave between them but not the gaps before or after it: on one stream, wall time minus the
// summed op time is the time the device waited for the host (launch overhead). Ops on several
// streams may overlap, and then their times add up to more than the wall time.
//
// Only the outermost op is timed: an op that runs others (bf16 through the fp32 kernels with
// widening casts) is timed as a whole. Nothing is recorded on a stream that is capturing a
// graph, so graph replays are not seen; profile eager work. Recording costs host time (two
// event records per op), so a profiled run is slower than an unprofiled one: time throughput
// without it.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace sp {

class Stream;
class Tensor;

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

  // Waits for every recorded event and returns the totals per (op, shapes), largest time
  // first. The recorded calls are consumed: a second collect() sees only later ones.
  std::vector<OpTime> collect();

  struct State;

 private:
  std::unique_ptr<State> state_;
};

// Used by the ops (ops.cpp): records the start event when a profile is alive, the stream is
// not capturing and no enclosing op is being timed on this thread, and the end event on
// destruction. `operands` name the shapes (an undefined tensor is left out).
class OpScope {
 public:
  OpScope(Stream& s, const char* op, std::initializer_list<const Tensor*> operands);
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

 private:
  Stream* stream_ = nullptr;  // null: not timing
  size_t record_ = 0;
};

// The totals of several ops as text: one line per op (all shapes together), then the `top`
// most expensive (op, shapes), each with ms per step (over `steps`) and share of the summed time.
std::string format_op_profile(const std::vector<OpTime>& times, int64_t steps, size_t top = 15);

}  // namespace sp
