#include "kernels/common/cuda_check.h"

namespace sp::detail {

void throw_cuda(const char* lib, const char* call, const char* file, int line, long long code, const char* what) {
  throw CudaError(concat(lib, " error ", code, " (", what ? what : "unknown", ") in `", call, "` at ", file, ":",
                         line));
}

}  // namespace sp::detail
