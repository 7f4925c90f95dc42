// The operators through the dispatcher, on every CPU ISA the machine has,
// against ATen's own layer_norm / rms_norm.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <tuple>
#include <vector>

#include "cpu/isa.h"
#include "isa_scope.h"

namespace {

using at::Tensor;
using torch_wsl::cpu::Isa;

using torch_wsl::testing::available_isas;
using torch_wsl::testing::IsaScope;

auto layer_norm_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("torch_wsl::layer_norm", "")
      .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, c10::SymIntArrayRef, const std::optional<Tensor>&,
                                                const std::optional<Tensor>&, double)>();
}

auto add_rms_norm_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("torch_wsl::add_rms_norm", "")
      .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, c10::SymIntArrayRef,
                                                const std::optional<Tensor>&, std::optional<double>, double,
                                                c10::string_view)>();
}

std::vector<c10::SymInt> sym(std::vector<int64_t> v) { return {v.begin(), v.end()}; }

class NormOps : public ::testing::TestWithParam<std::string> {};

TEST_P(NormOps, LayerNormMatchesATen) {
  IsaScope scope(GetParam());
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    const auto x = at::randn({19, 1031}).to(dtype);
    const auto w = at::randn({1031}).to(dtype);
    const auto b = at::randn({1031}).to(dtype);
    auto [out, mean, rstd] = layer_norm_op().call(x, sym({1031}), w, b, 1e-5);
    const auto ref = at::layer_norm(x.to(at::kDouble), {1031}, w.to(at::kDouble), b.to(at::kDouble), 1e-5);
    const double tol = dtype == at::kBFloat16 ? 3e-2 : dtype == at::kHalf ? 3e-3 : 1e-4;
    EXPECT_EQ(out.scalar_type(), dtype);
    EXPECT_TRUE(at::allclose(out.to(at::kDouble), ref, tol, tol)) << "dtype " << dtype;
    EXPECT_EQ(rstd.sizes(), at::IntArrayRef({19}));
  }
}

TEST_P(NormOps, AddRmsNormMatchesATenAndStoresTheSum) {
  IsaScope scope(GetParam());
  const auto x = at::randn({7, 4099});
  const auto r = at::randn({7, 4099});
  const auto w = at::randn({4099});
  auto [out, res_out, rstd] = add_rms_norm_op().call(x, r, sym({4099}), w, 1e-6, 0.0, "torch");
  EXPECT_TRUE(at::equal(res_out, x + r));
  EXPECT_TRUE(at::allclose(out, at::rms_norm(x + r, {4099}, w, 1e-6), 1e-5, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(EveryIsa, NormOps, ::testing::ValuesIn(available_isas()));

TEST(NormOpsErrors, WeightShapeMismatchNamesTheArgument) {
  const auto x = at::randn({4, 8});
  try {
    layer_norm_op().call(x, sym({8}), at::randn({7}), std::nullopt, 1e-5);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("expected weight to have shape normalized_shape [8]"), std::string::npos) << msg;
  }
}

TEST(NormOpsErrors, ResidualShapeMismatchNamesTheArgument) {
  try {
    add_rms_norm_op().call(at::randn({4, 8}), at::randn({4, 9}), sym({8}), std::nullopt, std::nullopt, 0.0, "torch");
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("residual"), std::string::npos);
  }
}

TEST(CpuIsa, UnknownOrUnsupportedIsaIsRejected) {
  EXPECT_THROW(torch_wsl::cpu::set_cpu_isa("sse9"), c10::Error);
  EXPECT_LE(static_cast<int>(torch_wsl::cpu::active_isa()), static_cast<int>(torch_wsl::cpu::detected_isa()));
}

}  // namespace
