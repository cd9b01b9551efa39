#include "kernels/common/error.h"

namespace sp {

std::string shape_str(const std::vector<long long>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

}  // namespace sp
