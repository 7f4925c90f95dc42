// The optimizer operators through the dispatcher, on every CPU ISA the machine
// has: every SIMD build must give the bits of the scalar formula in optim_math.h.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

#include "cpu/isa.h"
#include "isa_scope.h"
#include "optim_math.h"

namespace {

using at::Tensor;
using torch_wsl::cpu::Isa;
namespace om = torch_wsl::optim_math;

using torch_wsl::testing::available_isas;
using torch_wsl::testing::IsaScope;

auto adamw_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("torch_wsl::adamw_", "")
      .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                  double, double, double, double, double, bool, bool, const std::optional<Tensor>&,
                  const std::optional<Tensor>&)>();
}

auto total_norm_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("torch_wsl::total_norm", "")
      .typed<Tensor(at::TensorList, double)>();
}

class OptimOps : public ::testing::TestWithParam<std::string> {};

TEST_P(OptimOps, AdamWIsTheScalarFormulaBitForBit) {
  IsaScope scope(GetParam());
  const int64_t n = 16 * 9 + 7;  // vector bodies and a tail
  std::vector<Tensor> p = {at::randn({n}), at::randn({3, 5})};
  std::vector<Tensor> g, m, v, vmax, steps;
  for (const auto& t : p) {
    g.push_back(at::randn(t.sizes()));
    m.push_back(at::randn(t.sizes()) * 0.1);
    v.push_back(at::rand(t.sizes()));
    vmax.push_back(at::rand(t.sizes()));
    steps.push_back(at::full({}, 6.0f));
  }
  std::vector<Tensor> p0, g0, m0, v0, x0;
  for (size_t i = 0; i < p.size(); ++i) {
    p0.push_back(p[i].clone());
    g0.push_back(g[i].clone());
    m0.push_back(m[i].clone());
    v0.push_back(v[i].clone());
    x0.push_back(vmax[i].clone());
  }
  const auto grad_scale = at::full({}, 4.0f);
  adamw_op().call(p, g, m, v, vmax, steps, 1e-2, 0.9, 0.999, 0.1, 1e-8, true, false, grad_scale, std::nullopt);

  const auto c = om::adam_coeffs<float>(1e-2, 0.9, 0.999, 0.1, 1e-8, true, false, true,
                                        om::adam_step_scalars(1e-2, 0.9, 0.999, 7.0));
  for (size_t t = 0; t < p.size(); ++t) {
    EXPECT_EQ(steps[t].item<float>(), 7.0f);
    const auto* pp = p0[t].data_ptr<float>();
    for (int64_t i = 0; i < p0[t].numel(); ++i) {
      float pv = pp[i], gv = g0[t].data_ptr<float>()[i] / 4.0f, mv = m0[t].data_ptr<float>()[i];
      float vv = v0[t].data_ptr<float>()[i], xv = x0[t].data_ptr<float>()[i];
      EXPECT_EQ(g[t].data_ptr<float>()[i], gv) << "unscaled gradient written back";
      om::adam_update(pv, gv, mv, vv, xv, c);
      ASSERT_EQ(p[t].data_ptr<float>()[i], pv) << "tensor " << t << " element " << i;
      ASSERT_EQ(m[t].data_ptr<float>()[i], mv);
      ASSERT_EQ(v[t].data_ptr<float>()[i], vv);
      ASSERT_EQ(vmax[t].data_ptr<float>()[i], xv);
    }
  }
}

TEST_P(OptimOps, FoundInfSkipsEverything) {
  IsaScope scope(GetParam());
  std::vector<Tensor> p = {at::randn({40})}, g = {at::randn({40})}, m = {at::zeros({40})}, v = {at::zeros({40})};
  std::vector<Tensor> steps = {at::zeros({})};
  const auto p0 = p[0].clone();
  adamw_op().call(p, g, m, v, {}, steps, 1e-2, 0.9, 0.999, 0.0, 1e-8, false, false, std::nullopt, at::ones({}));
  EXPECT_TRUE(at::equal(p[0], p0));
  EXPECT_EQ(steps[0].item<float>(), 0.0f);
  EXPECT_EQ(m[0].abs().sum().item<float>(), 0.0f);
}

TEST_P(OptimOps, TotalNormMatchesDoubleReference) {
  IsaScope scope(GetParam());
  std::vector<Tensor> ts = {at::randn({300007}), at::randn({17, 3}), at::randn({0})};  // big enough for the pool
  const double sum_sq = (ts[0].to(at::kDouble).square().sum() + ts[1].to(at::kDouble).square().sum()).item<double>();
  EXPECT_NEAR(total_norm_op().call(ts, 2.0).item<double>(), std::sqrt(sum_sq), std::sqrt(sum_sq) * 1e-6);
  const double l1 = (ts[0].to(at::kDouble).abs().sum() + ts[1].to(at::kDouble).abs().sum()).item<double>();
  EXPECT_NEAR(total_norm_op().call(ts, 1.0).item<double>(), l1, l1 * 1e-6);
  const float linf = std::max(ts[0].abs().max().item<float>(), ts[1].abs().max().item<float>());
  EXPECT_EQ(total_norm_op().call(ts, std::numeric_limits<double>::infinity()).item<float>(), linf);
}

INSTANTIATE_TEST_SUITE_P(EveryIsa, OptimOps, ::testing::ValuesIn(available_isas()));

TEST(OptimOpsErrors, MismatchedListsNameTheArgument) {
  std::vector<Tensor> p = {at::randn({4}), at::randn({4})};
  std::vector<Tensor> one = {at::randn({4})};
  std::vector<Tensor> two = {at::zeros({}), at::zeros({})};
  try {
    adamw_op().call(p, one, p, p, {}, two, 1e-3, 0.9, 0.999, 0.0, 1e-8, false, false, std::nullopt, std::nullopt);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("torch_wsl.adamw_: expected grads to hold 2 tensors"), std::string::npos) << msg;
  }
}

}  // namespace
