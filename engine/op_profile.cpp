// Device time per op (see op_profile.h).
#include "engine/op_profile.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <exception>
#include <map>
#include <mutex>
#include <sstream>
#include <utility>

#include "engine/stream.h"
#include "engine/tensor.h"
#include "kernels/common/error.h"

namespace sp {

// A timed call: both events are made before the start is recorded, so that making the end
// event costs the op nothing; `state` says whether the end was recorded.
struct OpRecord {
  enum : int { kIssuing = 0, kEnded = 1, kAbandoned = 2 };
  const char* op;
  std::string shapes;
  const Stream* stream = nullptr;
  std::unique_ptr<Event> start, end;
  std::atomic<int> state{kIssuing};
};

struct OpProfile::State {
  std::mutex mu;
  std::vector<std::shared_ptr<OpRecord>> records;
};

namespace {

// The recording profile's state, read and written only with std::atomic_load/store/exchange: an
// op on another thread holds it while it records, so the profile's end cannot free it under it.
std::shared_ptr<OpProfile::State> g_active;
thread_local int t_depth = 0;  // ops being run on this thread (only the outermost is timed)

std::string describe(std::initializer_list<const Tensor*> operands) {
  std::string dtype, shapes;
  for (const Tensor* t : operands) {
    if (t == nullptr || !t->defined()) continue;
    if (dtype.empty()) dtype = dtype_name(t->dtype());
    std::string dims;
    for (size_t d = 0; d < t->shape().size(); ++d) dims += (d ? "," : "") + std::to_string(t->shape()[d]);
    shapes += " [" + dims + "]";
  }
  return dtype + shapes;
}

}  // namespace

OpProfile::OpProfile() : state_(std::make_shared<State>()) {
  std::shared_ptr<State> none;
  SP_CHECK(std::atomic_compare_exchange_strong(&g_active, &none, state_),
           "OpProfile: another profile is already recording");
}

OpProfile::~OpProfile() {
  std::shared_ptr<State> mine = state_;
  std::atomic_compare_exchange_strong(&g_active, &mine, std::shared_ptr<State>());
}

namespace {

// Takes the ended calls (with completed_only, those whose end the stream has reached) and drops
// the abandoned ones; the others stay.
std::vector<std::shared_ptr<OpRecord>> take_ended(OpProfile::State& state, bool completed_only = false) {
  std::vector<std::shared_ptr<OpRecord>> done;
  std::lock_guard<std::mutex> lk(state.mu);
  std::vector<std::shared_ptr<OpRecord>> keep;
  for (std::shared_ptr<OpRecord>& r : state.records) {
    const int st = r->state.load();
    if (st == OpRecord::kEnded && (!completed_only || r->end->query()))
      done.push_back(std::move(r));
    else if (st != OpRecord::kAbandoned)
      keep.push_back(std::move(r));
  }
  state.records.swap(keep);
  return done;
}

}  // namespace

std::vector<OpSpan> OpProfile::collect_spans(const std::function<Event*(const Stream*)>& origin_of,
                                             bool completed_only) {
  std::vector<OpSpan> out;
  for (const std::shared_ptr<OpRecord>& r : take_ended(*state_, completed_only)) {
    Event* origin = origin_of(r->stream);
    if (!origin) continue;
    r->end->synchronize();
    // Start and end from the origin, as the pipeline's stages, so that rounding keeps an op
    // inside its stage and apart from the next op.
    const double start = r->start->elapsed_ms_since(*origin), end = r->end->elapsed_ms_since(*origin);
    out.push_back({r->stream, r->op, r->shapes, start, std::max(0.0, end - start)});
  }
  std::stable_sort(out.begin(), out.end(), [](const OpSpan& a, const OpSpan& b) { return a.start_ms < b.start_ms; });
  return out;
}

std::vector<OpTime> OpProfile::collect() {
  const std::vector<std::shared_ptr<OpRecord>> done = take_ended(*state_);
  std::map<std::pair<std::string, std::string>, OpTime> totals;
  for (const std::shared_ptr<OpRecord>& r : done) {
    r->end->synchronize();
    OpTime& t = totals[{r->op, r->shapes}];
    t.op = r->op;
    t.shapes = r->shapes;
    ++t.calls;
    t.ms += double(r->end->elapsed_ms_since(*r->start));
  }
  std::vector<OpTime> out;
  out.reserve(totals.size());
  for (auto& kv : totals) out.push_back(std::move(kv.second));
  std::stable_sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  return out;
}

OpScope::OpScope(Stream& s, const char* op, std::initializer_list<const Tensor*> operands) {
  const std::shared_ptr<OpProfile::State> st = t_depth == 0 ? std::atomic_load(&g_active) : nullptr;
  if (st != nullptr && !s.capturing()) {
    auto r = std::make_shared<OpRecord>();
    r->op = op;
    r->shapes = describe(operands);
    r->stream = &s;
    r->start = make_event(s.device(), true);
    r->end = make_event(s.device(), true);
    s.record(*r->start);
    {
      std::lock_guard<std::mutex> lk(st->mu);
      st->records.push_back(r);
    }
    record_ = std::move(r);
    stream_ = &s;
    exceptions_ = std::uncaught_exceptions();
  }
  ++t_depth;  // after everything that may throw: a constructor that throws runs no destructor
}

OpScope::~OpScope() {
  --t_depth;
  if (!record_) return;
  // An op that throws is not timed; and a destructor must not throw (a CUDA error while
  // recording abandons the call).
  int outcome = OpRecord::kAbandoned;
  if (std::uncaught_exceptions() == exceptions_) {
    try {
      stream_->record(*record_->end);
      outcome = OpRecord::kEnded;
    } catch (...) {
    }
  }
  record_->state.store(outcome);
}

std::string format_op_profile(const std::vector<OpTime>& times, int64_t steps, size_t top) {
  const double per = steps > 0 ? double(steps) : 1.0;
  double total = 0;
  std::map<std::string, OpTime> by_op;
  for (const OpTime& t : times) {
    total += t.ms;
    OpTime& o = by_op[t.op];
    o.op = t.op;
    o.calls += t.calls;
    o.ms += t.ms;
  }
  std::vector<OpTime> ops;
  for (auto& kv : by_op) ops.push_back(kv.second);
  std::stable_sort(ops.begin(), ops.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  auto line = [&](const OpTime& t, const std::string& what) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "  %9.3f  %5.1f%%  %8.1f  ", t.ms / per, total > 0 ? 100.0 * t.ms / total : 0.0,
                  double(t.calls) / per);
    return std::string(buf) + what + "\n";
  };
  std::ostringstream out;
  char head[128];
  std::snprintf(head, sizeof head, "op time: %.3f ms per step over %lld steps\n", total / per, (long long)steps);
  out << head << "  ms/step   share  calls/step  op\n";
  for (const OpTime& o : ops) out << line(o, o.op);
  out << "the " << std::min(top, times.size()) << " most expensive shapes:\n"
      << "  ms/step   share  calls/step  op, dtype and operand shapes\n";
  for (size_t i = 0; i < times.size() && i < top; ++i) out << line(times[i], times[i].op + " " + times[i].shapes);
  return out.str();
}

}  // namespace sp
