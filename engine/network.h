// A network as an ordered list of blocks: the unit the trainers work on. The decoupled
// scheduler cuts it into K modules at block boundaries, so a block is the finest cut.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/module.h"

namespace sp {

class Network {
 public:
  explicit Network(std::string name = "") : name_(std::move(name)) {}

  // `prefix` is prepended to the block's state names ("" keeps them as they are).
  void add(std::string prefix, std::unique_ptr<Module> block);
  size_t size() const { return blocks_.size(); }
  Module& block(size_t i) const { return *blocks_[i].second; }
  const std::string& prefix(size_t i) const { return blocks_[i].first; }
  const std::string& name() const { return name_; }

  // State of blocks [begin, end) (all blocks by default), with PyTorch-style names.
  ModuleState state(size_t begin = 0, size_t end = SIZE_MAX) const;
  int64_t num_parameters() const;
  // Each block's FLOPs of one forward of a batch of shape `input` (Module::forward_flops): the
  // cost model of --split-by flops.
  std::vector<double> block_forward_flops(const Shape& input) const;
  void set_training(bool training);
  void to(Device device, Stream& s);

 private:
  std::string name_;
  std::vector<std::pair<std::string, std::unique_ptr<Module>>> blocks_;
};

}  // namespace sp
