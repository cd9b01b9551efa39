// Device time per op (see op_profile.h).
#include "engine/op_profile.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <mutex>
#include <sstream>
#include <utility>

#include "engine/stream.h"
#include "engine/tensor.h"
#include "kernels/common/error.h"

namespace sp {

struct OpProfile::State {
  struct Record {
    const char* op;
    std::string shapes;
    std::unique_ptr<Event> start, end;
  };
  std::mutex mu;
  std::vector<Record> records;
};

namespace {

std::atomic<OpProfile::State*> g_active{nullptr};
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

OpProfile::OpProfile() : state_(std::make_unique<State>()) {
  State* none = nullptr;
  SP_CHECK(g_active.compare_exchange_strong(none, state_.get()), "OpProfile: another profile is already recording");
}

OpProfile::~OpProfile() {
  State* mine = state_.get();
  g_active.compare_exchange_strong(mine, nullptr);
}

std::vector<OpTime> OpProfile::collect() {
  std::vector<State::Record> records;
  {
    std::lock_guard<std::mutex> lk(state_->mu);
    records.swap(state_->records);
  }
  std::map<std::pair<std::string, std::string>, OpTime> totals;
  for (State::Record& r : records) {
    SP_CHECK(r.end != nullptr, "OpProfile::collect: op ", r.op, " has not finished being issued");
    r.end->synchronize();
    OpTime& t = totals[{r.op, r.shapes}];
    t.op = r.op;
    t.shapes = r.shapes;
    ++t.calls;
    t.ms += double(r.end->elapsed_ms_since(*r.start));
  }
  std::vector<OpTime> out;
  out.reserve(totals.size());
  for (auto& kv : totals) out.push_back(std::move(kv.second));
  std::stable_sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  return out;
}

OpScope::OpScope(Stream& s, const char* op, std::initializer_list<const Tensor*> operands) {
  if (t_depth++ > 0) return;
  OpProfile::State* st = g_active.load();
  if (st == nullptr || s.capturing()) return;
  OpProfile::State::Record r{op, describe(operands), make_event(s.device(), true), nullptr};
  s.record(*r.start);
  std::lock_guard<std::mutex> lk(st->mu);
  record_ = st->records.size();
  st->records.push_back(std::move(r));
  stream_ = &s;
}

OpScope::~OpScope() {
  --t_depth;
  if (stream_ == nullptr) return;
  OpProfile::State* st = g_active.load();
  if (st == nullptr) return;  // the profile ended while the op ran
  auto end = make_event(stream_->device(), true);
  stream_->record(*end);
  std::lock_guard<std::mutex> lk(st->mu);
  if (record_ < st->records.size()) st->records[record_].end = std::move(end);
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
