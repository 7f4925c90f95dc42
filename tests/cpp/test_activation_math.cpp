// The shared arithmetic of the gated activations (csrc/activation_math.h) on
// plain float and double: the instantiation the CUDA kernels run (the CPU
// kernels run it on vec.h's types, which the Python tests cover), against the
// same formulas in double and against closed forms.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "activation_math.h"

namespace am = torch_wsl::act_math;
using am::Activation;

namespace {

constexpr double kEps = 1.1920928955078125e-07;  // float's machine epsilon

// act(x) and act'(x) in double by formulas without cancellation.
void reference(Activation a, double x, double& value, double& grad) {
  const auto sig = [](double z) { return z >= 0 ? 1 / (1 + std::exp(-z)) : std::exp(z) / (1 + std::exp(z)); };
  if (a == Activation::kSilu) {
    const double s = sig(x);
    value = x * s;
    grad = s * (1 + x * sig(-x));
  } else if (a == Activation::kGelu) {
    const double p = 0.5 * std::erfc(-x / std::sqrt(2.0));
    value = x * p;
    grad = p + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
  } else {
    const double b = std::sqrt(2 / M_PI), k = 0.044715;
    const double z = 2 * b * (x + k * x * x * x);
    const double h = sig(z), c = sig(-z);
    value = x * h;
    grad = h + x * c * h * 2 * b * (1 + 3 * k * x * x);
  }
}

template <Activation A>
void expect_float_accuracy(double fwd_ulps) {
  for (int i = -80000; i <= 80000; ++i) {
    const float x = static_cast<float>(i) * 1e-4f;  // [-8, 8]
    const am::ValueGrad<float> got = am::activation<A, true>(x);
    double value, grad;
    reference(A, x, value, grad);
    if (std::fabs(value) > 1e-30) {
      const double ulp = std::ldexp(1.0, std::ilogb(static_cast<float>(value)) - 23);
      // gelu_tanh's exponent 2u is rounded in float: exp turns that into |2u| ulps (see the Python test).
      const double z = 2 * std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x);
      const double cond = A == Activation::kGeluTanh && z < 0 ? 3 * -z : 0;
      ASSERT_LE(std::fabs(got.value - value) / ulp, fwd_ulps + cond) << "x = " << x;
    }
    ASSERT_LE(std::fabs(got.grad - grad), 4 * kEps * std::fmax(std::fabs(grad), 1.0)) << "x = " << x;
  }
}

}  // namespace

TEST(ActivationMath, FloatSiluIsAccurate) { expect_float_accuracy<Activation::kSilu>(4); }
TEST(ActivationMath, FloatGeluIsAccurate) { expect_float_accuracy<Activation::kGelu>(8); }
TEST(ActivationMath, FloatGeluTanhIsAccurate) { expect_float_accuracy<Activation::kGeluTanh>(5); }

TEST(ActivationMath, DoubleIsDoubleAccurate) {
  for (const Activation a : {Activation::kSilu, Activation::kGelu, Activation::kGeluTanh}) {
    for (double x = -12; x <= 12; x += 0.01) {
      double value, grad;
      reference(a, x, value, grad);
      am::ValueGrad<double> got{};
      if (a == Activation::kSilu) got = am::activation<Activation::kSilu, true>(x);
      if (a == Activation::kGelu) got = am::activation<Activation::kGelu, true>(x);
      if (a == Activation::kGeluTanh) got = am::activation<Activation::kGeluTanh, true>(x);
      ASSERT_NEAR(got.value, value, 1e-15 + 1e-13 * std::fabs(value)) << "x = " << x;
      ASSERT_NEAR(got.grad, grad, 1e-15 + 1e-13 * std::fabs(grad)) << "x = " << x;
    }
  }
}

TEST(ActivationMath, LogisticAndItsComplementSumToOne) {
  for (const float x : {-90.0f, -20.0f, -1.5f, -0.0f, 0.0f, 1e-8f, 0.7f, 17.0f, 100.0f}) {
    const am::Logistic<float> l = am::logistic(x);
    EXPECT_NEAR(l.s + l.c, 1.0f, 2e-7f) << x;
    EXPECT_EQ(l.c, am::logistic(-x).s) << x;  // 1 - sigmoid(x) is formed as sigmoid(-x)
  }
  EXPECT_EQ(am::logistic(-std::numeric_limits<float>::infinity()).s, 0.0f);
  EXPECT_EQ(am::logistic(std::numeric_limits<float>::infinity()).s, 1.0f);
}

TEST(ActivationMath, NormalCdfAndDensity) {
  for (const float x : {-12.0f, -5.0f, -1.0f, 0.0f, 0.5f, 3.0f, 9.0f}) {
    float density = 0;
    const float p = am::normal_cdf_f32(x, &density);
    EXPECT_NEAR(p, 0.5 * std::erfc(-x / std::sqrt(2.0)), 4 * kEps * p) << x;
    EXPECT_NEAR(density, std::exp(-0.5 * double(x) * x) / std::sqrt(2 * M_PI), 4 * kEps * density + 1e-45) << x;
  }
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(am::normal_cdf_f32(inf, static_cast<float*>(nullptr)), 1.0f);
  EXPECT_EQ(am::normal_cdf_f32(-inf, static_cast<float*>(nullptr)), 0.0f);
  EXPECT_EQ(am::normal_cdf_f32(3e38f, static_cast<float*>(nullptr)), 1.0f);  // no inf * 0 from x^2
}

TEST(ActivationMath, NonFiniteValuesFollowTheFormulas) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const Activation a : {Activation::kSilu, Activation::kGelu, Activation::kGeluTanh}) {
    am::ValueGrad<float> pos{}, neg{}, n{};
    if (a == Activation::kSilu) {
      pos = am::activation<Activation::kSilu, true>(inf);
      neg = am::activation<Activation::kSilu, true>(-inf);
      n = am::activation<Activation::kSilu, true>(nan);
    } else if (a == Activation::kGelu) {
      pos = am::activation<Activation::kGelu, true>(inf);
      neg = am::activation<Activation::kGelu, true>(-inf);
      n = am::activation<Activation::kGelu, true>(nan);
    } else {
      pos = am::activation<Activation::kGeluTanh, true>(inf);
      neg = am::activation<Activation::kGeluTanh, true>(-inf);
      n = am::activation<Activation::kGeluTanh, true>(nan);
    }
    EXPECT_EQ(pos.value, inf);              // x * 1
    EXPECT_TRUE(std::isnan(neg.value));     // -inf * 0, as eager
    EXPECT_TRUE(std::isnan(pos.grad));      // inf * 0 in the derivative, as eager
    EXPECT_TRUE(std::isnan(neg.grad));
    EXPECT_TRUE(std::isnan(n.value) && std::isnan(n.grad));
  }
}

TEST(ActivationMath, GatedBackwardIsTheProductRule) {
  float grad_gate = 0, grad_up = 0;
  am::gated_backward<Activation::kSilu>(2.0f, 0.5f, -3.0f, grad_gate, grad_up);
  const am::ValueGrad<float> a = am::activation<Activation::kSilu, true>(0.5f);
  EXPECT_EQ(grad_up, 2.0f * a.value);
  EXPECT_EQ(grad_gate, 2.0f * -3.0f * a.grad);
  EXPECT_EQ(am::gated_forward<Activation::kSilu>(0.5f, -3.0f), a.value * -3.0f);
}
