#include "engine/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>

#include "engine/ops.h"
#include "engine/safetensors.h"
#include "kernels/common/error.h"

namespace sp {
namespace {

const char* kMomentumPrefix = "_optim.momentum.";

// A host copy of t (t itself when it is already on the CPU); s orders the copy.
Tensor to_host(const Tensor& t, Stream& s) {
  if (t.device().is_cpu()) return t;
  Tensor h = Tensor::empty(t.shape(), t.dtype());
  ops::copy(s, t, h);
  return h;
}

// KRSC <-> KCRS for a [K, R, S, C] tensor (to_pytorch) or a [K, C, R, S] one (back).
Tensor permute_conv(const Tensor& t, bool to_pytorch) {
  const Shape& sh = t.shape();
  const int64_t k = sh[0];
  const int64_t r = to_pytorch ? sh[1] : sh[2], s = to_pytorch ? sh[2] : sh[3], c = to_pytorch ? sh[3] : sh[1];
  Tensor out = Tensor::empty(to_pytorch ? Shape{k, c, r, s} : Shape{k, r, s, c}, DType::F32);
  const float* src = t.data<float>();
  float* dst = out.data<float>();
  for (int64_t ki = 0; ki < k; ++ki)
    for (int64_t ri = 0; ri < r; ++ri)
      for (int64_t si = 0; si < s; ++si)
        for (int64_t ci = 0; ci < c; ++ci) {
          const int64_t krsc = ((ki * r + ri) * s + si) * c + ci, kcrs = ((ki * c + ci) * r + ri) * s + si;
          if (to_pytorch)
            dst[kcrs] = src[krsc];
          else
            dst[krsc] = src[kcrs];
        }
  return out;
}

Shape pytorch_shape(const Tensor& t, ParamLayout layout) {
  const Shape& sh = t.shape();
  return layout == ParamLayout::KRSC ? Shape{sh[0], sh[3], sh[1], sh[2]} : sh;
}

// The layout of the parameter a momentum buffer belongs to (buffers are named after it).
ParamLayout layout_of(const ModuleState& st, const std::string& param_name) {
  for (auto& [name, p] : st.params)
    if (name == param_name) return p->layout;
  throw Error("optimizer state for '" + param_name + "', which is not a parameter of the network");
}

// Every checkpoint records the CRC-32 of its tensors (in the order of their names: each name, its
// dtype and its data), so that damage to the data, which the format alone cannot see, is found.
const char* kCrcKey = "tensors_crc32";

std::string tensors_crc32(std::vector<const io::TensorRecord*> records) {
  std::sort(records.begin(), records.end(),
            [](const io::TensorRecord* a, const io::TensorRecord* b) { return a->name < b->name; });
  uint32_t crc = 0;
  for (const io::TensorRecord* r : records) {
    crc = io::crc32(r->name.c_str(), r->name.size() + 1, crc);  // with its terminating 0
    crc = io::crc32(r->dtype.c_str(), r->dtype.size() + 1, crc);
    crc = io::crc32(r->data.data(), r->data.size(), crc);
  }
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08x", crc);
  return hex;
}

// "NaN (element i)" or "an infinity (element i)" for the first such element of an f32 tensor;
// "" where there is none.
std::string non_finite(const Tensor& t) {
  if (t.dtype() != DType::F32) return "";
  const float* v = t.data<float>();
  const float* bad = std::find_if(v, v + t.numel(), [](float x) { return !std::isfinite(x); });
  if (bad == v + t.numel()) return "";
  return detail::concat(std::isnan(*bad) ? "NaN" : "an infinity", " (element ", bad - v, ")");
}

}  // namespace

void save_checkpoint(const std::string& path, const Network& net, const std::vector<const Sgd*>& opts,
                     const std::map<std::string, std::string>& metadata, Stream& s) {
  const ModuleState st = net.state();
  // Gather host copies first (one synchronisation), then convert layouts.
  std::vector<std::pair<std::string, Tensor>> host;
  std::vector<ParamLayout> layouts;
  for (auto& [name, p] : st.params) host.emplace_back(name, to_host(p->value, s)), layouts.push_back(p->layout);
  for (auto& [name, b] : st.buffers) host.emplace_back(name, to_host(*b, s)), layouts.push_back(ParamLayout::Same);
  for (const Sgd* opt : opts)
    for (auto& [name, m] : opt->momentum_buffers()) {
      host.emplace_back(kMomentumPrefix + name, to_host(m, s));
      layouts.push_back(layout_of(st, name));
    }
  s.synchronize();
  // A diverged run's weights are no state to go on from: nothing is written (nor replaced).
  for (const auto& [name, t] : host) {
    const std::string bad = non_finite(t);
    SP_CHECK(bad.empty(), path, ": not written: ", name, " holds ", bad, ", the run diverged");
  }
  std::vector<io::TensorRecord> records;
  for (size_t i = 0; i < host.size(); ++i) {
    const Tensor& t = layouts[i] == ParamLayout::KRSC ? permute_conv(host[i].second, true) : host[i].second;
    records.push_back(io::tensor_record(host[i].first, t));
  }
  for (auto& [name, counter] : st.counters) {
    io::TensorRecord r{name, "I64", {}, std::vector<uint8_t>(8)};
    std::memcpy(r.data.data(), counter, 8);
    records.push_back(std::move(r));
  }
  std::vector<const io::TensorRecord*> all;
  for (const io::TensorRecord& r : records) all.push_back(&r);
  std::map<std::string, std::string> meta = metadata;
  meta[kCrcKey] = tensors_crc32(all);
  io::write_safetensors(path, records, meta);
}

std::map<std::string, std::string> load_checkpoint(const std::string& path, const Network& net,
                                                   const std::vector<Sgd*>& opts, Stream& s) {
  const io::SafetensorsFile file = io::read_safetensors(path);
  // A file written by another tool (PyTorch's save_file) has no CRC to check; ours always do.
  if (auto it = file.metadata.find(kCrcKey); it != file.metadata.end()) {
    std::vector<const io::TensorRecord*> all;
    for (const io::TensorRecord& r : file.tensors) all.push_back(&r);
    const std::string crc = tensors_crc32(all);
    SP_CHECK(crc == it->second, path, ": the tensors' CRC-32 is ", crc, " where the file records ", it->second,
             ": the file is damaged");
  }
  const ModuleState st = net.state();
  std::set<std::string> used;
  // Whether the file holds any optimizer state: one without (weights alone, as PyTorch's save_file
  // of a state_dict writes) is not another model's when only the momenta are missing.
  const bool has_momenta = std::any_of(file.tensors.begin(), file.tensors.end(),
                                       [](const io::TensorRecord& r) { return r.name.rfind(kMomentumPrefix, 0) == 0; });
  auto find = [&](const std::string& name) -> const io::TensorRecord& {
    const io::TensorRecord* r = file.find(name);
    SP_CHECK(r != nullptr || has_momenta || name.rfind(kMomentumPrefix, 0) != 0, path,
             ": checkpoint holds no optimizer state (no '", kMomentumPrefix,
             "*' tensors): weights alone can be evaluated (staleprop eval), but training resumes only from a "
             "checkpoint staleprop train wrote");
    SP_CHECK(r != nullptr, path, ": checkpoint has no tensor '", name, "' (was it saved from another model?)");
    used.insert(name);
    return *r;
  };
  // Every tensor is read and checked (name, shape, dtype) into a host copy before any is
  // written, so a checkpoint refused part-way leaves the network and optimizer as they were.
  // The host copies stay alive until the copies to the device have completed.
  std::vector<std::pair<Tensor, Tensor>> staged;  // (host copy, destination)
  auto stage = [&](const std::string& name, const Tensor& dst, ParamLayout layout) {
    const io::TensorRecord& r = find(name);
    Tensor host = Tensor::empty(pytorch_shape(dst, layout), dst.dtype());
    try {
      io::copy_record_to_tensor(r, host);
    } catch (const ShapeError& e) {  // the same names, other shapes: another width or depth
      throw ShapeError(path + ": " + user_message(e) + " (was it saved from another model?)");
    }
    const std::string bad = non_finite(host);
    SP_CHECK(bad.empty(), path, ": '", name, "' holds ", bad, ": no state to go on from");
    staged.emplace_back(layout == ParamLayout::KRSC ? permute_conv(host, false) : host, dst);
  };
  for (auto& [name, p] : st.params) stage(name, p->value, p->layout);
  for (auto& [name, b] : st.buffers) stage(name, *b, ParamLayout::Same);
  std::vector<int64_t> counts;
  for (auto& [name, counter] : st.counters) {
    const io::TensorRecord& r = find(name);
    SP_CHECK(r.dtype == "I64" && r.data.size() == 8, path, ": '", name, "' must be an int64 scalar");
    counts.emplace_back();
    std::memcpy(&counts.back(), r.data.data(), 8);
  }
  for (Sgd* opt : opts)
    for (auto& [name, m] : opt->momentum_buffers()) stage(kMomentumPrefix + name, m, layout_of(st, name));
  // As PyTorch's strict load_state_dict: a tensor the network does not name means another model
  // (a deeper ResNet's names include a shallower one's). The optimizer's state is not read when no
  // optimizer is given (evaluation).
  std::string unexpected;
  int n_unexpected = 0;
  for (const io::TensorRecord& r : file.tensors) {
    if (used.count(r.name) || (opts.empty() && r.name.rfind(kMomentumPrefix, 0) == 0)) continue;
    if (n_unexpected++ < 3) unexpected += (unexpected.empty() ? "'" : ", '") + r.name + "'";
  }
  SP_CHECK(n_unexpected == 0, path, ": checkpoint has ", n_unexpected, " tensor", n_unexpected == 1 ? "" : "s",
           " this network", opts.empty() ? "" : " and optimizer", " does not name (", unexpected,
           n_unexpected > 3 ? ", ..." : "", "): was it saved from another model?");

  s.synchronize();  // nothing may still be using the tensors we overwrite from the host
  for (auto& [host, dst] : staged) {
    if (dst.device().is_cpu())
      std::memcpy(dst.raw_data(), host.raw_data(), host.nbytes());
    else
      ops::copy(s, host, dst);
  }
  for (auto& [name, p] : st.params) p->value_changed();
  for (size_t i = 0; i < counts.size(); ++i) *st.counters[i].second = counts[i];
  s.synchronize();
  return file.metadata;
}

}  // namespace sp
