#include "engine/schedule.h"

#include <algorithm>
#include <cmath>

#include "kernels/common/error.h"

namespace sp {

float LrSchedule::at(int64_t step) const {
  if (warmup_steps > 0 && step < warmup_steps) return base_lr * float(step + 1) / float(warmup_steps);
  const double pi = 3.14159265358979323846;
  // In double: 1 - fraction in float would lose the fraction's last bits to cancellation.
  const double floor = final_lr_fraction;
  switch (kind) {
    case Kind::Constant:
      return base_lr;
    case Kind::MultiStep: {
      float lr = base_lr;
      for (int64_t m : milestones)
        if (step >= m) lr *= gamma;
      return lr;
    }
    case Kind::Cosine: {
      const double t = double(step - warmup_steps) / double(std::max<int64_t>(1, total_steps - warmup_steps));
      const double f = floor + (1 - floor) * 0.5 * (1 + std::cos(pi * std::min(1.0, t)));
      return float(base_lr * f);
    }
    case Kind::OneCycle: {
      // After the warm-up, linear decay from base_lr to final_lr_fraction * base_lr.
      const double t = double(step - warmup_steps) / double(std::max<int64_t>(1, total_steps - warmup_steps));
      return float(base_lr * (1 - (1 - floor) * std::min(1.0, t)));
    }
  }
  return base_lr;
}

LrSchedule::Kind LrSchedule::parse_kind(const std::string& s) {
  if (s == "constant") return Kind::Constant;
  if (s == "multistep") return Kind::MultiStep;
  if (s == "cosine") return Kind::Cosine;
  if (s == "onecycle") return Kind::OneCycle;
  throw Error("unknown schedule '" + s + "' (expected constant, multistep, cosine or onecycle)");
}

}  // namespace sp
