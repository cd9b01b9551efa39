// CIFAR ResNet builders.
//
//   resnet20/32/44/56/110  He et al. 2016, section 4.2: 3x3 conv (16) then three stages of n
//                          BasicBlocks (16, 32, 64 channels, depth 6n+2), option-A shortcuts,
//                          global average pool, linear. 0.27M/0.46M/0.66M/0.85M/1.7M params.
//   resnet18               the CIFAR variant of ResNet-18: 3x3 stem (64), no max-pool, stages
//                          of 2 BasicBlocks (64, 128, 256, 512) with option-B projections.
//
// Blocks (the finest cut for the decoupled trainer): the stem, each residual block, the head
// (pool + linear). State names match the common PyTorch implementations (conv1.weight,
// bn1.running_mean, layer2.0.conv1.weight, layer2.0.shortcut.0.weight, linear.weight, ...).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/network.h"

namespace sp::layers {

// The cut points FDG's reference code uses (Zhuang et al., arXiv 1906.09108) for `k` modules,
// as first-block indices of modules 2..k in the networks built here: resnet20 (k = 2, 3),
// resnet56 (2-4), resnet110 (2-5), resnet18 (2, 3). Throws sp::Error when there is none.
std::vector<size_t> fdg_preset_cuts(const std::string& model, int k);

// Throws sp::Error listing the known names for an unknown one.
Network build_resnet(const std::string& name, int num_classes = 10, uint64_t seed = 0);
const std::vector<std::string>& resnet_names();

}  // namespace sp::layers
