#include "engine/module.h"

#include <set>

#include "engine/ops.h"
#include "kernels/common/error.h"

namespace sp {

namespace {
void add_storage(const Context& ctx, std::set<const void*>& seen, size_t& bytes) {
  for (const Tensor& t : ctx.saved)
    if (t.defined() && seen.insert(t.raw_data()).second) bytes += t.nbytes();
  for (const Context& c : ctx.children) add_storage(c, seen, bytes);
}
}  // namespace

size_t Context::saved_bytes(std::set<const void*>* seen) const {
  std::set<const void*> local;
  size_t bytes = 0;
  add_storage(*this, seen ? *seen : local, bytes);
  return bytes;
}

size_t saved_bytes(const std::vector<Context>& contexts, std::set<const void*>* seen) {
  std::set<const void*> local;
  size_t bytes = 0;
  for (const Context& c : contexts) bytes += c.saved_bytes(seen ? seen : &local);
  return bytes;
}

std::string join_name(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

Tensor new_activation(Stream& s, const Shape& shape, DType dtype) {
  return Tensor::empty(shape, dtype, s.device(), &s);
}

void Module::to(Device device, Stream& s) {
  ModuleState st;
  collect("", st);
  std::vector<Tensor> old;  // kept until the copies have read them (queued work holds none)
  auto move = [&](Tensor& t) {
    if (!t.defined() || t.device() == device) return;
    Tensor moved = Tensor::empty(t.shape(), t.dtype(), device);
    ops::copy(s, t, moved);
    old.push_back(t);
    t = moved;
  };
  for (auto& [name, p] : st.params) {
    // A copy already on `device` stays as it is (the value it copies does not change); one
    // elsewhere is dropped, and allocated again on the new device at its first use there.
    // (Dropped unconditionally, a copy could go back to the allocator while another stream's
    // queued step still wrote it.)
    const bool stays =
        p->value.defined() && p->value.device() == device && (!p->bf16.defined() || p->bf16.device() == device);
    move(p->value);
    move(p->grad);
    if (stays) continue;
    if (p->bf16.defined()) old.push_back(p->bf16);
    p->bf16 = Tensor();
    p->value_changed();
  }
  for (auto& [name, b] : st.buffers) move(*b);
  s.synchronize();  // the old copies go when `old` does, after the copies ran
}

void Module::backward_accumulate(Stream& s, const Tensor& dy, Context& ctx, const Tensor& into) {
  const Tensor dx = backward(s, dy, ctx, true);
  ops::add(s, into, dx, into);
}

double Module::forward_flops(const Shape&, Shape*) const {
  throw Error("modules of type " + type() + " have no FLOPs count (Module::forward_flops)");
}

}  // namespace sp
