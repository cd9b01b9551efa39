#include "layers/resnet.h"

#include <map>
#include <memory>

#include "kernels/common/error.h"
#include "layers/layers.h"

namespace sp::layers {
namespace {

std::unique_ptr<Sequential> stem(int channels, Rng& rng) {
  auto s = std::make_unique<Sequential>();
  s->add("conv1", std::make_unique<Conv2d>(3, channels, 3, 1, 1, false, rng));
  s->add("bn1", std::make_unique<BatchNorm2d>(channels, /*fuse_relu=*/true));  // BN + ReLU, fused
  return s;
}

std::unique_ptr<Sequential> head(int features, int classes, Rng& rng) {
  auto h = std::make_unique<Sequential>();
  h->add("avgpool", std::make_unique<GlobalAvgPool>());
  h->add("linear", std::make_unique<Linear>(features, classes, rng));
  return h;
}

Network cifar_resnet(const std::string& name, int blocks_per_stage, int classes, Rng& rng) {
  Network net(name);
  net.add("", stem(16, rng));
  int in = 16;
  const int widths[3] = {16, 32, 64};
  for (int stage = 0; stage < 3; ++stage)
    for (int b = 0; b < blocks_per_stage; ++b) {
      const int stride = (stage > 0 && b == 0) ? 2 : 1;
      net.add("layer" + std::to_string(stage + 1) + "." + std::to_string(b),
              std::make_unique<BasicBlock>(in, widths[stage], stride, Shortcut::A, rng));
      in = widths[stage];
    }
  net.add("", head(64, classes, rng));
  return net;
}

Network resnet18(int classes, Rng& rng) {
  Network net("resnet18");
  net.add("", stem(64, rng));
  int in = 64;
  const int widths[4] = {64, 128, 256, 512};
  for (int stage = 0; stage < 4; ++stage)
    for (int b = 0; b < 2; ++b) {
      const int stride = (stage > 0 && b == 0) ? 2 : 1;
      net.add("layer" + std::to_string(stage + 1) + "." + std::to_string(b),
              std::make_unique<BasicBlock>(in, widths[stage], stride, Shortcut::B, rng));
      in = widths[stage];
    }
  net.add("", head(512, classes, rng));
  return net;
}

}  // namespace

const std::vector<std::string>& resnet_names() {
  static const std::vector<std::string> names = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                                                 "resnet18"};
  return names;
}

std::vector<size_t> fdg_preset_cuts(const std::string& model, int k) {
  // Block 0 is the stem; a CIFAR ResNet with n blocks per stage has layer1.i at 1 + i,
  // layer2.i at 1 + n + i and layer3.i at 1 + 2n + i; ResNet-18 has layer s.i at 1 + 2(s-1) + i.
  // FDG's modules end with the pooling and linear layers, which is our head block.
  static const std::map<std::pair<std::string, int>, std::vector<size_t>> presets = {
      {{"resnet20", 2}, {5}},                // layer2[1:]
      {{"resnet20", 3}, {4, 7}},             // layer2 | layer3
      {{"resnet56", 2}, {14}},               // layer2[4:]
      {{"resnet56", 3}, {10, 19}},           // layer2 | layer3
      {{"resnet56", 4}, {7, 14, 21}},        // layer1[6:] | layer2[4:] | layer3[2:]
      {{"resnet110", 2}, {28}},              // layer2[9:]
      {{"resnet110", 3}, {19, 37}},          // layer2 | layer3
      {{"resnet110", 4}, {14, 28, 42}},      // layer1[13:] | layer2[9:] | layer3[5:]
      {{"resnet110", 5}, {11, 22, 33, 44}},  // layer1[10:] | layer2[3:] | layer2[14:] | layer3[7:]
      {{"resnet18", 2}, {5}},                // layer3
      {{"resnet18", 3}, {3, 6}},             // layer2 | layer3[1:]
  };
  auto it = presets.find({model, k});
  if (it == presets.end())
    throw Error("no FDG preset split of " + model + " into " + std::to_string(k) +
                " modules (presets, K given by --split: resnet20 K=2,3; resnet56 K=2-4; resnet110 K=2-5; resnet18 "
                "K=2,3)");
  return it->second;
}

Network build_resnet(const std::string& name, int num_classes, uint64_t seed) {
  Rng rng(seed);
  if (name == "resnet18") return resnet18(num_classes, rng);
  for (int depth : {20, 32, 44, 56, 110})
    if (name == "resnet" + std::to_string(depth)) return cifar_resnet(name, (depth - 2) / 6, num_classes, rng);
  std::string known;
  for (auto& n : resnet_names()) known += (known.empty() ? "" : ", ") + n;
  throw Error("unknown model '" + name + "' (known: " + known + ")");
}

}  // namespace sp::layers
