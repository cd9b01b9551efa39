// Learning-rate schedules (engine/schedule.h) against their formulas, written out here step by
// step: warm-up, multistep milestones, cosine and one-cycle decay, their ends and their midpoints.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/schedule.h"
#include "kernels/common/error.h"

using namespace sp;

namespace {

constexpr double kPi = 3.14159265358979323846;

LrSchedule schedule(LrSchedule::Kind kind, int64_t total, int64_t warmup) {
  LrSchedule s;
  s.kind = kind;
  s.base_lr = 0.2f;
  s.total_steps = total;
  s.warmup_steps = warmup;
  return s;
}

// Within 4 float ulps of the rate computed in double (the base rate and gamma are floats, each
// a rounding away, and the rate is rounded once more): relative, so that a step off by one near
// the end of a decay, where the rate is small, is seen.
void expect_lr(const LrSchedule& s, int64_t step, double want) {
  EXPECT_NEAR(s.at(step), want, 4 * std::numeric_limits<float>::epsilon() * std::fabs(want) + 1e-30) << "step " << step;
}

TEST(LrSchedule, WarmUpRisesLinearlyToTheBaseRateForEveryKind) {
  for (const auto kind : {LrSchedule::Kind::Constant, LrSchedule::Kind::MultiStep, LrSchedule::Kind::Cosine,
                          LrSchedule::Kind::OneCycle}) {
    const LrSchedule s = schedule(kind, 100, 8);
    // Step i of the warm-up runs at (i + 1)/8 of the rate: the first step already moves.
    for (int64_t i = 0; i < 8; ++i) expect_lr(s, i, 0.2 * double(i + 1) / 8);
    expect_lr(s, 8, 0.2);  // the warm-up's end is where every decay starts
  }
}

TEST(LrSchedule, MultiStepMultipliesByGammaAtEachMilestone) {
  LrSchedule s = schedule(LrSchedule::Kind::MultiStep, 100, 0);
  s.milestones = {50, 75};
  s.gamma = 0.1f;
  expect_lr(s, 0, 0.2);
  expect_lr(s, 49, 0.2);
  expect_lr(s, 50, 0.02);
  expect_lr(s, 74, 0.02);
  expect_lr(s, 75, 0.002);
  expect_lr(s, 99, 0.002);
}

TEST(LrSchedule, CosineDecaysAlongAHalfCosineAfterTheWarmUp) {
  for (const int64_t warmup : {0, 10}) {
    const LrSchedule s = schedule(LrSchedule::Kind::Cosine, 110, warmup);
    const double span = double(110 - warmup);
    for (int64_t step = warmup; step <= 110; ++step)
      expect_lr(s, step, 0.2 * 0.5 * (1 + std::cos(kPi * double(step - warmup) / span)));
    expect_lr(s, warmup + int64_t(span / 2), 0.1);  // half way: half the rate
    expect_lr(s, 110, 0.0);
    expect_lr(s, 200, 0.0);  // past the end it stays at the end
  }
  LrSchedule floor = schedule(LrSchedule::Kind::Cosine, 100, 0);
  floor.final_lr_fraction = 0.1f;
  expect_lr(floor, 50, 0.2 * (0.1 + 0.9 * 0.5));
  expect_lr(floor, 100, 0.02);
}

TEST(LrSchedule, OneCycleDecaysLinearlyToTheEndAfterItsRise) {
  const LrSchedule s = schedule(LrSchedule::Kind::OneCycle, 110, 10);
  for (int64_t step = 10; step <= 110; ++step) expect_lr(s, step, 0.2 * (1 - double(step - 10) / 100));
  expect_lr(s, 60, 0.1);
  expect_lr(s, 110, 0.0);
  LrSchedule floor = s;
  floor.final_lr_fraction = 0.04f;
  expect_lr(floor, 60, 0.2 * (1 - 0.96 * 0.5));
  expect_lr(floor, 110, 0.2 * 0.04);
}

TEST(LrSchedule, ConstantStaysAndUnknownKindsAreRefused) {
  const LrSchedule s = schedule(LrSchedule::Kind::Constant, 10, 0);
  for (int64_t step = 0; step < 20; ++step) expect_lr(s, step, 0.2);
  EXPECT_EQ(LrSchedule::parse_kind("onecycle"), LrSchedule::Kind::OneCycle);
  EXPECT_EQ(LrSchedule::parse_kind("cosine"), LrSchedule::Kind::Cosine);
  EXPECT_EQ(LrSchedule::parse_kind("multistep"), LrSchedule::Kind::MultiStep);
  EXPECT_EQ(LrSchedule::parse_kind("constant"), LrSchedule::Kind::Constant);
  EXPECT_THROW(LrSchedule::parse_kind("step"), Error);
}

}  // namespace
