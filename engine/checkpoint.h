// Checkpoints as safetensors files that PyTorch users can load.
//
// Model state is stored under the PyTorch names of the network (conv1.weight, bn1.running_var,
// bn1.num_batches_tracked, layer1.0.conv1.weight, ..., linear.weight) in PyTorch's layouts:
// conv weights are converted from KRSC to KCRS (OIHW), counters are int64. The optimizer's
// momentum buffers are stored under "_optim.momentum.<param name>" in the same layouts, and
// the training position in the metadata, so a run can resume exactly. A PyTorch user loads the
// weights with
//     sd = {k: v for k, v in safetensors.torch.load_file(path).items() if not k.startswith("_optim.")}
//     model.load_state_dict(sd)
// Files are written atomically (temporary file, fsync, rename). The metadata also records the
// CRC-32 of the tensors ("tensors_crc32"), which loading checks where present.
#pragma once

#include <map>
#include <string>

#include "engine/network.h"
#include "engine/optimizer.h"
#include "engine/stream.h"

namespace sp {

// `s` issues the copies (a stream of the network's device; with several devices no stream may
// be using the tensors); the call returns once the file is written. `opts` are the optimizers
// whose momentum buffers are saved (one per pipeline module; none to save weights only). A
// weight, buffer or momentum that holds NaN or an infinity (a diverged run) is refused, naming
// it, and nothing is written: a file already at `path` stays as it was.
void save_checkpoint(const std::string& path, const Network& net, const std::vector<const Sgd*>& opts,
                     const std::map<std::string, std::string>& metadata, Stream& s);
// Restores every tensor of the network (and of the optimizers given); throws sp::Error naming
// the file, and the tensor where there is one, when one is missing, has another shape or holds
// NaN or an infinity, when the file holds a tensor the network (or, where optimizers are given,
// their momenta) does not name, as PyTorch's strict load_state_dict, or when its tensors do not
// match the CRC-32 it records. Nothing is restored then. Returns the metadata.
std::map<std::string, std::string> load_checkpoint(const std::string& path, const Network& net,
                                                   const std::vector<Sgd*>& opts, Stream& s);

}  // namespace sp
