// The shared arithmetic of cross-entropy (csrc/cross_entropy_math.h). The
// CPU kernels take a row's log-sum-exp tile by tile; the CUDA kernels merge
// per-thread (max, sum) states with cm::merge, which only these tests run on
// a machine without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cross_entropy_math.h"

namespace cm = torch_wsl::ce_math;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The state of one thread that saw `values`: (max, sum of exp(v - max)), as the kernels build it.
cm::MaxSum<double> state_of(const std::vector<double>& values) {
  cm::MaxSum<double> st{-kInf, 0.0};
  for (double v : values) st = cm::merge(st, cm::MaxSum<double>{v, v == -kInf ? 0.0 : 1.0});
  return st;
}

double lse_direct(const std::vector<double>& values) {
  double s = 0;
  for (double v : values) s += std::exp(v);
  return std::log(s);
}

}  // namespace

TEST(CrossEntropyMath, MergeGivesTheLogSumExpInAnyOrder) {
  const std::vector<double> a = {0.5, -3.0, 2.0}, b = {7.0, -1.0};
  std::vector<double> all = a;
  all.insert(all.end(), b.begin(), b.end());
  const double want = lse_direct(all);
  EXPECT_NEAR(cm::lse_of(cm::merge(state_of(a), state_of(b))), want, 1e-12);
  EXPECT_NEAR(cm::lse_of(cm::merge(state_of(b), state_of(a))), want, 1e-12);
}

TEST(CrossEntropyMath, EmptyAndMaskedStatesContributeNothing) {
  // A thread with no element, or only masked (-inf) logits, must not turn the row into NaN.
  const cm::MaxSum<double> empty{-kInf, 0.0};
  const cm::MaxSum<double> row = state_of({1.0, 2.0});
  EXPECT_NEAR(cm::lse_of(cm::merge(empty, row)), lse_direct({1.0, 2.0}), 1e-12);
  EXPECT_NEAR(cm::lse_of(cm::merge(row, empty)), lse_direct({1.0, 2.0}), 1e-12);
  EXPECT_NEAR(cm::lse_of(cm::merge(state_of({-kInf, -kInf}), row)), lse_direct({1.0, 2.0}), 1e-12);
  // Every logit masked: log(0) = -inf, as torch's logsumexp gives.
  EXPECT_EQ(cm::lse_of(cm::merge(empty, empty)), -kInf);
}

TEST(CrossEntropyMath, NaNPropagatesThroughMerge) {
  const cm::MaxSum<double> nan{std::nan(""), std::nan("")};
  EXPECT_TRUE(std::isnan(cm::lse_of(cm::merge(nan, state_of({1.0})))));
  EXPECT_TRUE(std::isnan(cm::lse_of(cm::merge(state_of({1.0}), nan))));
  EXPECT_TRUE(std::isnan(cm::lse_of(cm::merge(cm::MaxSum<double>{-kInf, 0.0}, nan))));
}

TEST(CrossEntropyMath, RowLossIsTorchsFormula) {
  // loss = (1 - e) w_t (lse - z_t) + (e / C) sum_j w_j (lse - z_j)
  const std::vector<double> z = {1.0, -2.0, 0.5, 3.0}, w = {0.5, 2.0, 1.0, 1.5};
  const double lse = lse_direct(z), e = 0.2;
  const int t = 2;
  double wsum = 0, smooth = 0;
  for (size_t j = 0; j < z.size(); ++j) {
    wsum += w[j];
    smooth += w[j] * (lse - z[j]);
  }
  const double want = (1 - e) * w[t] * (lse - z[t]) + e / z.size() * smooth;
  const double ref = z[0];
  double lin = 0;
  for (size_t j = 0; j < z.size(); ++j) lin += w[j] * (z[j] - ref);
  const auto k = cm::row_terms(w[t], e, static_cast<int64_t>(z.size()), wsum);
  EXPECT_NEAR(cm::row_loss(k, lse, z[t], ref, wsum, lin), want, 1e-12);
}

TEST(CrossEntropyMath, GradientSumsToZeroWithoutWeights) {
  // Without class weights d loss / d z sums to 0 over a row, with or without smoothing.
  const std::vector<double> z = {0.3, -1.0, 2.0, 0.0, 1.5};
  const double lse = lse_direct(z);
  for (double e : {0.0, 0.1, 1.0}) {
    const auto k = cm::row_terms(1.0, e, static_cast<int64_t>(z.size()), static_cast<double>(z.size()));
    double total = 0;
    for (size_t j = 0; j < z.size(); ++j) {
      const double p = std::exp(z[j] - lse);
      total += j == 1 ? cm::target_grad(p, k.prob_coef, k.smooth_coef, k.target_coef)
                      : cm::logit_grad(p, k.prob_coef, k.smooth_coef);
    }
    EXPECT_NEAR(total, 0.0, 1e-12) << "smoothing " << e;
  }
}

TEST(CrossEntropyMath, SoftcapAndItsSlope) {
  const double cap = 30.0, inv = 1.0 / cap;
  for (double x : {-100.0, -5.0, 0.0, 0.25, 12.0, 300.0}) {
    const double z = cm::softcap(x, cap, inv);
    EXPECT_NEAR(z, cap * std::tanh(x / cap), 1e-12);
    const double h = 1e-6;
    const double numeric = (cm::softcap(x + h, cap, inv) - cm::softcap(x - h, cap, inv)) / (2 * h);
    EXPECT_NEAR(cm::softcap_slope(z, inv), numeric, 1e-8);
  }
}

TEST(CrossEntropyMath, SmoothingReferenceAvoidsMaskedLogits) {
  EXPECT_EQ(cm::smoothing_reference(2.5), 2.5);
  EXPECT_EQ(cm::smoothing_reference(-kInf), 0.0);
  EXPECT_EQ(cm::smoothing_reference(std::nan("")), 0.0);
}
