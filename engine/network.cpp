#include "engine/network.h"

#include <algorithm>

namespace sp {

void Network::add(std::string prefix, std::unique_ptr<Module> block) {
  blocks_.emplace_back(std::move(prefix), std::move(block));
}

ModuleState Network::state(size_t begin, size_t end) const {
  ModuleState st;
  end = std::min(end, blocks_.size());
  for (size_t i = begin; i < end; ++i) blocks_[i].second->collect(blocks_[i].first, st);
  return st;
}

int64_t Network::num_parameters() const {
  int64_t n = 0;
  for (auto& [name, p] : state().params) n += p->value.numel();
  return n;
}

std::vector<double> Network::block_forward_flops(const Shape& input) const {
  std::vector<double> flops;
  Shape x = input;
  for (auto& [prefix, b] : blocks_) {
    Shape y;
    flops.push_back(b->forward_flops(x, &y));
    x = y;
  }
  return flops;
}

void Network::set_training(bool training) {
  for (auto& [prefix, b] : blocks_) b->set_training(training);
}

void Network::to(Device device, Stream& s) {
  for (auto& [prefix, b] : blocks_) b->to(device, s);
}

}  // namespace sp
