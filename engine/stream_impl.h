// Constructors of the two stream/event implementations (internal to engine/).
#pragma once

#include <memory>

#include "engine/stream.h"

namespace sp {

std::unique_ptr<Stream> make_cpu_stream(const StreamOptions& options, Device device = Device::cpu());
std::unique_ptr<Event> make_cpu_event(bool timing, Device device = Device::cpu());
// Throw sp::NotSupportedError in a build without CUDA, sp::CudaError without a usable GPU.
std::unique_ptr<Stream> make_cuda_stream(Device device);
std::unique_ptr<Event> make_cuda_event(Device device, bool timing);

}  // namespace sp
