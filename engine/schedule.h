// Learning-rate schedules, evaluated per optimisation step.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sp {

struct LrSchedule {
  enum class Kind { Constant, MultiStep, Cosine, OneCycle };
  Kind kind = Kind::MultiStep;
  float base_lr = 0.1f;
  int64_t total_steps = 1;
  int64_t warmup_steps = 0;              // linear warm-up from 0 (all kinds)
  std::vector<int64_t> milestones;       // MultiStep: steps at which lr *= gamma
  float gamma = 0.1f;
  float final_lr_fraction = 0.f;         // Cosine / OneCycle: lr at the end relative to base

  float at(int64_t step) const;          // lr for the step with this 0-based index
  static Kind parse_kind(const std::string& s);  // constant | multistep | cosine | onecycle
};

}  // namespace sp
