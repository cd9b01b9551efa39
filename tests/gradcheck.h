// Test helpers for the CPU op tests: seeded random fills, central finite differences and
// element-wise comparisons with readable failure messages.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace sp::testing {

inline std::vector<double> random_uniform(size_t n, double lo, double hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

// Values at least `gap` apart from each other (a shuffled grid plus small jitter): ops with
// kinks at ties (max pooling) stay differentiable within a finite-difference step.
inline std::vector<double> random_distinct(size_t n, double gap, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<double> v(n);
  std::iota(v.begin(), v.end(), -double(n) / 2);
  std::shuffle(v.begin(), v.end(), rng);
  std::uniform_real_distribution<double> jitter(0.0, 0.25);
  for (double& x : v) x = (x + jitter(rng)) * gap;
  return v;
}

// Values with |x| in [lo, hi] and random sign: keeps ReLU inputs away from its kink at zero.
inline std::vector<double> random_away_from_zero(size_t n, double lo, double hi, uint64_t seed) {
  std::vector<double> v = random_uniform(n, lo, hi, seed);
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  for (double& x : v)
    if (rng() & 1) x = -x;
  return v;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Central differences of loss() with respect to every element of x (x is restored).
inline std::vector<double> numerical_gradient(std::vector<double>& x, const std::function<double()>& loss,
                                              double h = 1e-6) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = loss();
    x[i] = saved - h;
    const double down = loss();
    x[i] = saved;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

// |actual - expected| <= rtol * max(|actual|, |expected|) + atol for every element.
template <typename A, typename E>
void expect_all_near(const std::vector<A>& actual, const std::vector<E>& expected, double rtol, double atol,
                     const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double a = double(actual[i]), e = double(expected[i]);
    const double tol = rtol * std::max(std::abs(a), std::abs(e)) + atol;
    if (!(std::abs(a - e) <= tol) && reported++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: got " << a << ", expected " << e << " (tolerance " << tol << ")";
  }
  EXPECT_EQ(reported, 0) << what << ": mismatching elements";
}

// Analytic gradient vs central differences of a double-precision loss. With h = 1e-6 the
// truncation error is ~1e-12, but rounding in a loss of size ~10 adds up to ~1e-8 absolute
// to every difference quotient: hence the absolute floor for near-zero gradients.
inline void expect_gradient_matches(const std::vector<double>& analytic, std::vector<double>& x,
                                    const std::function<double()>& loss, const std::string& what) {
  expect_all_near(analytic, numerical_gradient(x, loss), 1e-6, 1e-7, what);
}

inline std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

}  // namespace sp::testing
