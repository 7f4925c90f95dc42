// The shared arithmetic (csrc/optim_math.h) that both the CPU and CUDA optimizer kernels run.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "cpu/optim_kernel.h"
#include "optim_math.h"

namespace om = torch_wsl::optim_math;

namespace {

om::AdamCoeffs<float> coeffs(double lr, double wd, bool decoupled, bool amsgrad, bool maximize, double step) {
  return om::adam_coeffs<float>(lr, 0.9, 0.999, wd, 1e-8, amsgrad, maximize, decoupled,
                                om::adam_step_scalars(lr, 0.9, 0.999, step));
}

}  // namespace

TEST(OptimMath, StepScalarsAreTorchsBiasCorrections) {
  const auto s = om::adam_step_scalars(1e-3, 0.9, 0.999, 1.0);
  EXPECT_DOUBLE_EQ(s.step_size, 1e-3 / (1.0 - 0.9));
  EXPECT_DOUBLE_EQ(s.bias_correction2_sqrt, std::sqrt(1.0 - 0.999));
  const auto s10 = om::adam_step_scalars(2e-3, 0.8, 0.99, 10.0);
  EXPECT_DOUBLE_EQ(s10.step_size, 2e-3 / (1.0 - std::pow(0.8, 10.0)));
}

TEST(OptimMath, LerpMatchesAtensTwoBranches) {
  // |w| < 0.5: start + w * (end - start); else end + (w - 1) * (end - start); both fused.
  EXPECT_FLOAT_EQ(om::lerp(1.0f, 3.0f, 0.25f, true), 1.5f);
  EXPECT_FLOAT_EQ(om::lerp(1.0f, 3.0f, 0.75f, false), 2.5f);
  EXPECT_EQ(om::lerp(1.0f, 3.0f, 0.0f, true), 1.0f);   // the endpoints exactly
  EXPECT_EQ(om::lerp(1.0f, 3.0f, 1.0f, false), 3.0f);
  EXPECT_EQ(om::lerp(0.1f, 0.7f, 0.1f, true), std::fma(0.1f, 0.7f - 0.1f, 0.1f));
}

TEST(OptimMath, MaximumPropagatesNanFromEitherSide) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(om::maximum(nan, 1.0f)));
  EXPECT_TRUE(std::isnan(om::maximum(1.0f, nan)));
  EXPECT_EQ(om::maximum(-2.0f, 3.0f), 3.0f);
}

TEST(OptimMath, AdamWStepFollowsTheDocumentedFormula) {
  const auto c = coeffs(1e-2, 0.1, /*decoupled=*/true, false, false, 3.0);
  float p = 1.5f, m = 0.1f, v = 0.2f, unused = 0.0f;
  const float g = 0.5f;
  om::adam_update(p, g, m, v, unused, c);
  // Recomputed step by step as torch.optim rounds it.
  const float p_decayed = 1.5f * static_cast<float>(1.0 - 1e-2 * 0.1);
  const float m_want = std::fma(0.1f, 0.5f - 0.1f, 0.1f);
  const float v_want = std::fma(0.001f * 0.5f, 0.5f, 0.2f * 0.999f);
  const auto s = om::adam_step_scalars(1e-2, 0.9, 0.999, 3.0);
  const float denom = std::sqrt(v_want) / static_cast<float>(s.bias_correction2_sqrt) + 1e-8f;
  const float p_want = p_decayed + (static_cast<float>(-s.step_size) * m_want) / denom;
  EXPECT_EQ(m, m_want);
  EXPECT_EQ(v, v_want);
  EXPECT_EQ(p, p_want);
}

TEST(OptimMath, AdamCoupledWeightDecayEntersTheGradient) {
  const auto c = coeffs(1e-2, 0.5, /*decoupled=*/false, false, false, 1.0);
  float p = 2.0f, m = 0.0f, v = 0.0f, unused = 0.0f;
  om::adam_update(p, 1.0f, m, v, unused, c);
  // g = 1 + 0.5 * 2 = 2; first step: m = 0.1 * 2, v = 0.001 * 4; the update is -lr * sign(g).
  EXPECT_FLOAT_EQ(m, 0.2f);
  EXPECT_FLOAT_EQ(v, 0.004f);
  EXPECT_NEAR(p, 2.0f - 1e-2f, 1e-6f);
}

TEST(OptimMath, AmsgradKeepsTheMaximumAndMaximizeFlipsTheGradient) {
  auto c = coeffs(1e-2, 0.0, true, /*amsgrad=*/true, /*maximize=*/true, 5.0);
  float p = 0.0f, m = 0.0f, v = 0.01f, vmax = 1.0f;
  om::adam_update(p, 0.3f, m, v, vmax, c);
  EXPECT_EQ(vmax, 1.0f);  // v stayed below the running maximum
  EXPECT_LT(m, 0.0f);     // maximize: the moment follows -g
  EXPECT_GT(p, 0.0f);     // and the parameter climbs
  float p2 = 0.0f, m2 = 0.0f, v2 = 0.01f, vmax2 = 1.0f;
  c.amsgrad = false;
  om::adam_update(p2, 0.3f, m2, v2, vmax2, c);
  EXPECT_GT(p2, p);  // without the larger maximum in the denominator the step is longer
}

TEST(OptimMath, SgdMomentumDampeningNesterov) {
  auto c = om::sgd_coeffs<float>(0.1, 0.9, 0.5, 0.0, false, false, /*first_step=*/true);
  float p = 1.0f, buf = 123.0f;
  om::sgd_update(p, 2.0f, buf, c);
  EXPECT_EQ(buf, 2.0f);  // the first step takes the gradient, undamped
  EXPECT_FLOAT_EQ(p, 0.8f);
  c.first_step = false;
  om::sgd_update(p, 2.0f, buf, c);
  EXPECT_FLOAT_EQ(buf, 0.9f * 2.0f + 0.5f * 2.0f);
  EXPECT_FLOAT_EQ(p, 0.8f - 0.1f * 2.8f);
  auto n = om::sgd_coeffs<float>(0.1, 0.9, 0.0, 0.0, /*nesterov=*/true, false, false);
  float q = 0.0f, b = 1.0f;
  om::sgd_update(q, 1.0f, b, n);
  EXPECT_FLOAT_EQ(b, 1.9f);
  EXPECT_FLOAT_EQ(q, -0.1f * (1.0f + 0.9f * 1.9f));
  auto plain = om::sgd_coeffs<float>(0.5, 0.0, 0.0, 0.1, false, /*maximize=*/true, false);
  float r = 2.0f, unused = 0.0f;
  om::sgd_update(r, 1.0f, unused, plain);
  EXPECT_FLOAT_EQ(r, 2.0f - 0.5f * (-1.0f + 0.1f * 2.0f));
  EXPECT_EQ(unused, 0.0f);  // no momentum: the buffer is never touched
}

TEST(OptimMath, ClipCoefficientClampsAtOneAndKeepsNan) {
  EXPECT_EQ(om::clip_coef(0.0f, 1.0f), 1.0f);
  EXPECT_EQ(om::clip_coef(0.5f, 1.0f), 1.0f);
  EXPECT_FLOAT_EQ(om::clip_coef(4.0f, 1.0f), (1.0f / (4.0f + 1e-6f)) * 1.0f);
  EXPECT_EQ(om::clip_coef(std::numeric_limits<float>::infinity(), 1.0f), 0.0f);
  EXPECT_TRUE(std::isnan(om::clip_coef(std::numeric_limits<float>::quiet_NaN(), 1.0f)));
  EXPECT_DOUBLE_EQ(om::clip_coef(9.0, 3.0), (1.0 / (9.0 + 1e-6)) * 3.0);
}

TEST(OptimMath, NormTermsCombineAndFinish) {
  using om::NormOrder;
  EXPECT_EQ(om::norm_term(-3.0f, NormOrder::kTwo), 9.0f);
  EXPECT_EQ(om::norm_term(-3.0f, NormOrder::kOne), 3.0f);
  EXPECT_EQ(om::norm_combine(2.0, 5.0, NormOrder::kInf), 5.0);
  EXPECT_EQ(om::norm_combine(2.0, 5.0, NormOrder::kOne), 7.0);
  EXPECT_TRUE(std::isnan(om::norm_combine(std::nan(""), 5.0, NormOrder::kInf)));
  EXPECT_EQ(om::norm_finish(25.0, NormOrder::kTwo), 5.0);
  EXPECT_EQ(om::norm_finish(25.0, NormOrder::kInf), 25.0);
}

TEST(OptimKernel, ChunksCoverEveryElementInOrder) {
  const auto chunks = torch_wsl::cpu::multi_tensor_chunks({0, 100, 64, 129}, 64);
  // tensor 0 is empty; 100 -> [0,64) [64,100); 64 -> [0,64); 129 -> three chunks.
  ASSERT_EQ(chunks.size(), 6u);
  EXPECT_EQ(chunks[0].index, 1);
  EXPECT_EQ(chunks[1].begin, 64);
  EXPECT_EQ(chunks[1].end, 100);
  EXPECT_EQ(chunks[2].index, 2);
  EXPECT_EQ(chunks[5].index, 3);
  EXPECT_EQ(chunks[5].begin, 128);
  EXPECT_EQ(chunks[5].end, 129);
  EXPECT_THROW(torch_wsl::cpu::multi_tensor_chunks({10}, 100), c10::Error);
}
