// The elementwise math of cpu/vec.h (exp, log, tanh, erf, sigmoid, min, max,
// comparisons, select) on every CPU ISA, against double-precision std::
// references, and math_fns.h's float/double versions that the shared
// (host/device) formulas call.
//
// Each ISA's vector code has to be compiled inside that ISA's region, so this
// file includes itself three times between cpu/isa_begin.h and cpu/isa_end.h
// (the part under TWSL_VEC_MATH_ISA_BODY below), as a kernel file includes its
// impl header. The sweep takes every TWSL_VEC_MATH_STRIDE-th float bit pattern
// (default 1021; all signs, subnormals, infinities and NaNs among them), and
// with TWSL_VEC_MATH_EXHAUSTIVE=1 also every float where the function is not
// constant: the run the bounds in cpu/vec.h were measured with (minutes).
#ifndef TWSL_VEC_MATH_ISA_BODY

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/isa_prelude.h"
#include "math_fns.h"

// Formulas written the way a shared math header writes them (outside any ISA
// region, names brought in from torch_wsl::fn, unqualified calls), so the test
// checks that argument-dependent lookup reaches the vector overloads and that
// they compile and inline into the ISA code.
namespace vec_math_test_shared {
using torch_wsl::fn::erf;
using torch_wsl::fn::exp;
using torch_wsl::fn::gt;
using torch_wsl::fn::log;
using torch_wsl::fn::max;
using torch_wsl::fn::select;
using torch_wsl::fn::sigmoid;
using torch_wsl::fn::splat;
using torch_wsl::fn::tanh;

template <typename T>
TWSL_HOST_DEVICE T silu(T x) {
  return x * sigmoid(x);
}
template <typename T>
TWSL_HOST_DEVICE T gelu(T x) {
  return splat<T>(0.5) * x * (splat<T>(1) + erf(x * splat<T>(0.70710678118654752)));
}
template <typename T>
TWSL_HOST_DEVICE T gelu_tanh(T x) {
  const T inner = splat<T>(0.79788456080286536) * (x + splat<T>(0.044715) * x * x * x);
  return splat<T>(0.5) * x * (splat<T>(1) + tanh(inner));
}
template <typename T>
TWSL_HOST_DEVICE T softcap(T x) {
  const T cap = splat<T>(30);
  return cap * tanh(x / cap);
}
// log(1 + exp(x)) stable: max(x, 0) + log(1 + exp(-|x|)), with a branch-free
// select for |x|.
template <typename T>
TWSL_HOST_DEVICE T softplus(T x) {
  const T zero = splat<T>(0);
  const T ax = select(gt(x, zero), x, zero - x);
  return max(x, zero) + log(splat<T>(1) + exp(zero - ax));
}
}  // namespace vec_math_test_shared

namespace {

enum class Op { kExp, kLog, kTanh, kErf, kSigmoid, kSilu, kGelu, kGeluTanh, kSoftcap, kSoftplus };
// Two-input operations: out = f(a, b).
enum class Op2 {
  kMax,
  kMin,
  kSelectLt,
  kSelectLe,
  kSelectGt,
  kSelectGe,
  kSelectEq,
  kSelectNotLt,
  kSelectLtOrGt,
  kSelectLtAndLe,
};

// Evaluates op over [0, n): vector steps then a scalar tail, or scalar only.
using EvalFn = void (*)(Op op, const float* in, float* out, int64_t n, bool scalar_only);
using Eval2Fn = void (*)(Op2 op, const float* a, const float* b, float* out, int64_t n);

}  // namespace

#define TWSL_VEC_MATH_ISA_BODY
#define TWSL_ISA_DEFAULT
#include "cpu/isa_begin.h"
#include "test_vec_math.cpp"
#include "cpu/isa_end.h"
#undef TWSL_ISA_DEFAULT

#define TWSL_ISA_AVX2
#include "cpu/isa_begin.h"
#include "test_vec_math.cpp"
#include "cpu/isa_end.h"
#undef TWSL_ISA_AVX2

#define TWSL_ISA_AVX512
#include "cpu/isa_begin.h"
#include "test_vec_math.cpp"
#include "cpu/isa_end.h"
#undef TWSL_ISA_AVX512
#undef TWSL_VEC_MATH_ISA_BODY

namespace {

struct IsaCase {
  const char* name;
  int lanes;
  bool (*supported)();
  EvalFn eval;
  Eval2Fn eval2;
};

bool has_avx2() {
#if TWSL_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;  // the portable build under the AVX2 name
#endif
}
bool has_avx512() {
#if TWSL_X86
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return true;
#endif
}
bool always() { return true; }

const IsaCase kIsas[] = {
    {"default", torch_wsl::cpu::isa_default::kTestLanes, always, torch_wsl::cpu::isa_default::vec_math_eval,
     torch_wsl::cpu::isa_default::vec_math_eval2},
    {"avx2", torch_wsl::cpu::isa_avx2::kTestLanes, has_avx2, torch_wsl::cpu::isa_avx2::vec_math_eval,
     torch_wsl::cpu::isa_avx2::vec_math_eval2},
    {"avx512", torch_wsl::cpu::isa_avx512::kTestLanes, has_avx512, torch_wsl::cpu::isa_avx512::vec_math_eval,
     torch_wsl::cpu::isa_avx512::vec_math_eval2},
};

constexpr float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

double ref_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double reference(Op op, double x) {
  switch (op) {
    case Op::kExp: return std::exp(x);
    case Op::kLog: return std::log(x);
    case Op::kTanh: return std::tanh(x);
    case Op::kErf: return std::erf(x);
    case Op::kSigmoid: return ref_sigmoid(x);
    case Op::kSilu: return x * ref_sigmoid(x);
    case Op::kGelu: return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752));
    case Op::kGeluTanh: return 0.5 * x * (1.0 + std::tanh(0.79788456080286536 * (x + 0.044715 * x * x * x)));
    case Op::kSoftcap: return 30.0 * std::tanh(x / 30.0);
    case Op::kSoftplus: return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x)));
  }
  return 0;
}
const char* op_name(Op op) {
  switch (op) {
    case Op::kExp: return "exp";
    case Op::kLog: return "log";
    case Op::kTanh: return "tanh";
    case Op::kErf: return "erf";
    case Op::kSigmoid: return "sigmoid";
    default: return "composite";
  }
}

// The spacing of floats at |ref| (subnormal spacing below FLT_MIN).
double float_ulp(double ref) {
  const double a = std::fabs(ref);
  if (a < static_cast<double>(std::numeric_limits<float>::min())) return std::ldexp(1.0, -149);
  uint64_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  // a in [2^e, 2^(e+1)): float spacing 2^(e - 23), built from the biased exponent.
  const uint64_t ulp_bits = ((bits >> 52) - 23) << 52;
  double ulp;
  std::memcpy(&ulp, &ulp_bits, sizeof ulp);
  return ulp;
}

// Error of got in ulps of the reference; NaN must match NaN, an infinite
// reference needs that infinity, and an infinite result counts as 2^128
// (the next power of two after FLT_MAX), so overflow is right exactly when
// the reference rounds to inf.
double ulp_error(float got, double ref) {
  if (std::isnan(ref) || std::isnan(got)) return std::isnan(ref) && std::isnan(got) ? 0.0 : kInf;
  if (std::isinf(ref)) return got == static_cast<float>(ref) ? 0.0 : kInf;
  const double top = std::ldexp(1.0, 128);
  const double g = std::isinf(got) ? std::copysign(top, static_cast<double>(got)) : got;
  const double r = std::fabs(ref) > top ? std::copysign(top, ref) : ref;  // beyond float: as inf
  return std::fabs(g - r) / float_ulp(r);
}

uint32_t sweep_stride() {
  const char* env = std::getenv("TWSL_VEC_MATH_STRIDE");
  const long v = env != nullptr ? std::atol(env) : 0;
  return v > 0 ? static_cast<uint32_t>(v) : 1021u;  // about 4.2M inputs
}
bool exhaustive() {
  const char* env = std::getenv("TWSL_VEC_MATH_EXHAUSTIVE");
  return env != nullptr && std::atol(env) > 0;
}

// Where a function's results are not all the same (0, 1, inf, NaN) in float:
// the exhaustive run takes every float there. tanh and erf are odd (checked
// bit for bit), so their positive half stands for both.
std::pair<float, float> live_range(Op op) {
  switch (op) {
    case Op::kExp: return {-104.0f, 89.0f};
    case Op::kLog: return {0.0f, std::numeric_limits<float>::max()};
    case Op::kTanh: return {0.0f, 9.5f};
    case Op::kErf: return {0.0f, 4.5f};
    case Op::kSigmoid: return {-104.0f, 17.5f};
    default: return {0.0f, 0.0f};
  }
}

struct SweepResult {
  double max_ulp = 0;
  float worst_x = 0;
  int64_t count = 0;
  int64_t odd_mismatches = 0;
};

// The maximum ulp error of op over the strided bit-pattern sweep (plus the
// floats near `extra`, where the algorithms switch between approximations).
SweepResult sweep(const IsaCase& isa, Op op, bool scalar_only, const std::vector<float>& extra = {}) {
  const uint32_t stride = sweep_stride();
  constexpr int64_t kChunk = int64_t{1} << 20;
  std::vector<float> in, out;
  in.reserve(kChunk);
  out.resize(kChunk);
  SweepResult r;
  const bool odd = op == Op::kTanh || op == Op::kErf;
  std::vector<float> neg_out(kChunk), neg_in(kChunk);
  auto flush = [&]() {
    const int64_t n = static_cast<int64_t>(in.size());
    isa.eval(op, in.data(), out.data(), n, scalar_only);
    if (odd) {
      for (int64_t i = 0; i < n; ++i) neg_in[i] = -in[i];
      isa.eval(op, neg_in.data(), neg_out.data(), n, scalar_only);
    }
    for (int64_t i = 0; i < n; ++i) {
      const double e = ulp_error(out[i], reference(op, in[i]));
      if (!(e <= r.max_ulp)) {
        r.max_ulp = e;
        r.worst_x = in[i];
      }
      if (odd && !std::isnan(in[i]) && to_bits(neg_out[i]) != to_bits(-out[i])) ++r.odd_mismatches;
    }
    r.count += n;
    in.clear();
  };
  auto push = [&](float x) {
    in.push_back(x);
    if (static_cast<int64_t>(in.size()) == kChunk) flush();
  };
  // Odd offset: both signs, every exponent, varied low mantissa bits.
  for (uint64_t b = 12345 % stride; b <= 0xffffffffull; b += stride) push(from_bits(static_cast<uint32_t>(b)));
  if (exhaustive()) {
    const auto [lo, hi] = live_range(op);
    if (lo < 0) {
      for (uint32_t b = 0x80000001u; b <= to_bits(lo); ++b) push(from_bits(b));
    }
    for (uint32_t b = 0; b <= to_bits(hi); ++b) push(from_bits(b));
  }
  for (float c : extra) {
    for (float s : {1.0f, -1.0f}) {
      const uint32_t cb = to_bits(c);
      for (uint32_t d = 0; d < (1u << 16); ++d) push(s * from_bits(cb - (1u << 15) + d));
    }
  }
  flush();
  return r;
}

std::vector<float> thresholds(Op op) {
  switch (op) {
    case Op::kExp: return {88.72283935f, -87.33654785f, -103.97f, 0.34657359f};
    case Op::kLog: return {1.0f, 1.41421354f, 0.70710677f, 1.17549435e-38f};
    case Op::kTanh: return {0.625f, 9.0f};
    case Op::kErf: return {1.0f, 3.9f, 4.0f};
    case Op::kSigmoid: return {0.0f + 1e-30f, 16.0f, -88.0f, -103.0f};
    default: return {};
  }
}

bool isa_supported(int isa) { return kIsas[isa].supported(); }

class VecMath : public ::testing::TestWithParam<int> {
 protected:
  const IsaCase& isa() const { return kIsas[GetParam()]; }
  void SetUp() override {
    if (!isa_supported(GetParam())) GTEST_SKIP() << "this CPU lacks " << isa().name;
  }
};

// Bounds in ulps of the float lanes (relative everywhere, subnormals
// included): the vector code, as documented in cpu/vec.h, and std:: (glibc),
// which the scalar tails and the portable build use.
struct Bound {
  double vector_ulp;
  double std_ulp;
};
Bound bound_of(Op op) {
  switch (op) {
    case Op::kExp: return {1.0, 1.0};
    case Op::kLog: return {1.0, 1.0};
    case Op::kTanh: return {1.0, 2.5};
    case Op::kErf: return {1.5, 2.5};
    case Op::kSigmoid: return {2.5, 2.5};
    default: return {0, 0};
  }
}

constexpr Op kFunctions[] = {Op::kExp, Op::kLog, Op::kTanh, Op::kErf, Op::kSigmoid};

class VecMathUlp : public ::testing::TestWithParam<std::tuple<int, Op>> {
 protected:
  const IsaCase& isa() const { return kIsas[std::get<0>(GetParam())]; }
  Op op() const { return std::get<1>(GetParam()); }
  void SetUp() override {
    if (!isa_supported(std::get<0>(GetParam()))) GTEST_SKIP() << "this CPU lacks " << isa().name;
  }
};

// On "default" this is the std:: path (VecF is Scalar<float> there), which
// is also every ISA's scalar tail.
TEST_P(VecMathUlp, MaxErrorOverTheFloatRange) {
  const bool portable = isa().lanes == 1;
  const SweepResult r = sweep(isa(), op(), false, thresholds(op()));
  const double bound = portable ? bound_of(op()).std_ulp : bound_of(op()).vector_ulp;
  std::printf("[ %-7s ] %-7s max %.3f ulp at %.9g (%lld inputs)\n", isa().name, op_name(op()), r.max_ulp,
              static_cast<double>(r.worst_x), static_cast<long long>(r.count));
  EXPECT_LE(r.max_ulp, bound) << op_name(op()) << " worst at x = " << r.worst_x;
  EXPECT_EQ(r.odd_mismatches, 0) << op_name(op()) << ": f(-x) != -f(x)";
}

INSTANTIATE_TEST_SUITE_P(Isas, VecMathUlp, ::testing::Combine(::testing::Range(0, 3), ::testing::ValuesIn(kFunctions)),
                         [](const ::testing::TestParamInfo<std::tuple<int, Op>>& info) {
                           return std::string(kIsas[std::get<0>(info.param)].name) + "_" +
                                  op_name(std::get<1>(info.param));
                         });

// The AVX2 and AVX-512 versions differ only in how they scale by 2^n and split
// off the exponent, both exact: their results agree bit for bit.
TEST(VecMathIsas, Avx2AndAvx512AgreeBitForBit) {
  if (!isa_supported(2)) GTEST_SKIP() << "this CPU lacks avx512";
  const uint32_t stride = sweep_stride();
  constexpr int64_t kChunk = int64_t{1} << 20;
  std::vector<float> in, a(kChunk), b(kChunk);
  in.reserve(kChunk);
  for (Op op : kFunctions) {
    int64_t mismatches = 0;
    float first = 0;
    auto flush = [&]() {
      const int64_t n = static_cast<int64_t>(in.size());
      kIsas[1].eval(op, in.data(), a.data(), n, false);
      kIsas[2].eval(op, in.data(), b.data(), n, false);
      for (int64_t i = 0; i < n; ++i) {
        if (to_bits(a[i]) != to_bits(b[i]) && !(std::isnan(a[i]) && std::isnan(b[i]))) {
          if (mismatches++ == 0) first = in[i];
        }
      }
      in.clear();
    };
    for (uint64_t bits = 777 % stride; bits <= 0xffffffffull; bits += stride) {
      in.push_back(from_bits(static_cast<uint32_t>(bits)));
      if (static_cast<int64_t>(in.size()) == kChunk) flush();
    }
    flush();
    EXPECT_EQ(mismatches, 0) << op_name(op) << " first at x = " << first;
  }
}

// Runs op on a list of inputs, each repeated to fill vector steps and a tail,
// and checks the exact results (bit for bit, so the sign of zero counts).
void expect_exact(const IsaCase& isa, Op op, const std::vector<std::pair<float, float>>& cases) {
  for (auto [x, want] : cases) {
    for (bool scalar_only : {false, true}) {
      const int64_t n = 3 * isa.lanes + 1;
      std::vector<float> in(n, x), out(n);
      isa.eval(op, in.data(), out.data(), n, scalar_only);
      for (int64_t i = 0; i < n; ++i) {
        const bool ok = std::isnan(want) ? std::isnan(out[i]) : to_bits(out[i]) == to_bits(want);
        ASSERT_TRUE(ok) << op_name(op) << "(" << x << ") = " << out[i] << ", want " << want
                        << (scalar_only ? " (scalar)" : " (vector)") << " at " << i;
      }
    }
  }
}

TEST_P(VecMath, ExpSpecialValues) {
  expect_exact(isa(), Op::kExp,
               {{0.0f, 1.0f}, {-0.0f, 1.0f}, {-kInf, 0.0f}, {kInf, kInf}, {kNaN, kNaN}, {-kNaN, kNaN},
                {88.8f, kInf}, {100.0f, kInf}, {1e30f, kInf}, {-104.0f, 0.0f}, {-1e30f, 0.0f},
                {std::numeric_limits<float>::max(), kInf}, {-std::numeric_limits<float>::max(), 0.0f}});
  // The largest finite result and the first subnormal ones.
  std::vector<float> in = {88.72283f, -87.5f, -100.0f, -103.5f};
  for (float x : in) {
    std::vector<float> v(2 * isa().lanes, x), out(v.size());
    isa().eval(Op::kExp, v.data(), out.data(), static_cast<int64_t>(v.size()), false);
    EXPECT_LE(ulp_error(out[0], std::exp(static_cast<double>(x))), 1.0) << "exp(" << x << ") = " << out[0];
    EXPECT_GT(out[0], 0.0f);
  }
}

TEST_P(VecMath, LogSpecialValues) {
  expect_exact(isa(), Op::kLog,
               {{1.0f, 0.0f}, {0.0f, -kInf}, {-0.0f, -kInf}, {kInf, kInf}, {-kInf, kNaN}, {-1.0f, kNaN},
                {-1e-40f, kNaN}, {kNaN, kNaN}});
  const float tiny = std::numeric_limits<float>::denorm_min();
  std::vector<float> v(2 * isa().lanes, tiny), out(v.size());
  isa().eval(Op::kLog, v.data(), out.data(), static_cast<int64_t>(v.size()), false);
  EXPECT_LE(ulp_error(out[0], std::log(static_cast<double>(tiny))), 1.0) << out[0];
}

TEST_P(VecMath, TanhErfSpecialValues) {
  const float tiny = std::numeric_limits<float>::denorm_min();
  for (Op op : {Op::kTanh, Op::kErf}) {
    expect_exact(isa(), op,
                 {{0.0f, 0.0f}, {-0.0f, -0.0f}, {kInf, 1.0f}, {-kInf, -1.0f}, {kNaN, kNaN}, {20.0f, 1.0f},
                  {-20.0f, -1.0f}, {1e30f, 1.0f}, {-1e30f, -1.0f}, {std::numeric_limits<float>::max(), 1.0f}});
  }
  // tanh(x) = x for tiny x; erf(x) = 2/sqrt(pi) x, rounded.
  expect_exact(isa(), Op::kTanh, {{tiny, tiny}, {-tiny, -tiny}, {1e-20f, 1e-20f}, {-1e-20f, -1e-20f}});
  expect_exact(isa(), Op::kErf, {{1e-20f, static_cast<float>(static_cast<double>(1e-20f) * 1.1283791670955126)}});
}

TEST_P(VecMath, SigmoidSpecialValues) {
  expect_exact(isa(), Op::kSigmoid,
               {{0.0f, 0.5f}, {-0.0f, 0.5f}, {kInf, 1.0f}, {-kInf, 0.0f}, {kNaN, kNaN}, {100.0f, 1.0f},
                {-200.0f, 0.0f}, {-1e30f, 0.0f}, {1e30f, 1.0f}});
  // exp(-100) is subnormal: the result follows it instead of flushing or NaN.
  std::vector<float> v(2 * isa().lanes, -100.0f), out(v.size());
  isa().eval(Op::kSigmoid, v.data(), out.data(), static_cast<int64_t>(v.size()), false);
  EXPECT_LE(ulp_error(out[0], ref_sigmoid(-100.0)), 2.0) << out[0];
}

// The formulas written against torch_wsl::fn (outside the ISA region) give
// on vectors what they give on double, to the accuracy of their functions.
TEST_P(VecMath, SharedFormulasReachTheVectorFunctions) {
  std::vector<float> in;
  for (float x = -12.0f; x <= 12.0f; x += 0.0137f) in.push_back(x);
  const int64_t n = static_cast<int64_t>(in.size());
  std::vector<float> out(n);
  for (Op op : {Op::kSilu, Op::kGelu, Op::kGeluTanh, Op::kSoftcap, Op::kSoftplus}) {
    isa().eval(op, in.data(), out.data(), n, false);
    for (int64_t i = 0; i < n; ++i) {
      const double ref = reference(op, in[i]);
      ASSERT_NEAR(out[i], ref, 1e-6 + 4e-7 * std::fabs(ref)) << static_cast<int>(op) << " at x = " << in[i];
    }
  }
}

TEST_P(VecMath, MinMaxPropagateNaNAndCompareSelect) {
  const std::vector<float> a = {1.0f, 2.0f, kNaN, 3.0f, kNaN, -kInf, -0.0f, 5.0f};
  const std::vector<float> b = {2.0f, 1.0f, 1.0f, kNaN, kNaN, 0.0f, 0.0f, 5.0f};
  // Repeat to fill vector steps and a tail.
  std::vector<float> va, vb;
  for (int r = 0; r < 2 * isa().lanes + 1; ++r) {
    va.insert(va.end(), a.begin(), a.end());
    vb.insert(vb.end(), b.begin(), b.end());
  }
  const int64_t n = static_cast<int64_t>(va.size());
  std::vector<float> out(n);
  auto check = [&](Op2 op, auto want_fn, const char* what) {
    isa().eval2(op, va.data(), vb.data(), out.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const float want = want_fn(va[i], vb[i]);
      const bool ok = std::isnan(want) ? std::isnan(out[i]) : out[i] == want;
      ASSERT_TRUE(ok) << what << "(" << va[i] << ", " << vb[i] << ") = " << out[i] << ", want " << want;
    }
  };
  auto nan_max = [](float x, float y) { return x != x ? x : (y != y ? y : std::max(x, y)); };
  auto nan_min = [](float x, float y) { return x != x ? x : (y != y ? y : std::min(x, y)); };
  check(Op2::kMax, nan_max, "max");
  check(Op2::kMin, nan_min, "min");
  check(Op2::kSelectLt, [](float x, float y) { return x < y ? x : y; }, "select(lt)");
  check(Op2::kSelectLe, [](float x, float y) { return x <= y ? x : y; }, "select(le)");
  check(Op2::kSelectGt, [](float x, float y) { return x > y ? x : y; }, "select(gt)");
  check(Op2::kSelectGe, [](float x, float y) { return x >= y ? x : y; }, "select(ge)");
  check(Op2::kSelectEq, [](float x, float y) { return x == y ? x : y; }, "select(eq)");
  check(Op2::kSelectNotLt, [](float x, float y) { return !(x < y) ? x : y; }, "select(!lt)");
  check(Op2::kSelectLtOrGt, [](float x, float y) { return (x < y || x > y) ? x : y; }, "select(lt | gt)");
  check(Op2::kSelectLtAndLe, [](float x, float y) { return (x < y && x <= y) ? x : y; }, "select(lt & le)");
}

// Single-thread throughput against a scalar std:: loop, over 16M floats
// streamed from DRAM and over the same count as passes over a 16 KiB block
// that stays in L1 (not run by default:
// --gtest_also_run_disabled_tests --gtest_filter='*Throughput*').
TEST_P(VecMath, DISABLED_Throughput) {
  constexpr int64_t n = int64_t{16} << 20;
  constexpr int64_t block = 4096;
  std::vector<float> in(n), out(n);
  for (int64_t i = 0; i < n; ++i) in[i] = -10.0f + 20.0f * static_cast<float>(i % 100003) / 100003.0f;
  // The thread's CPU time (a shared machine's other load does not count), best of 5.
  auto cpu_seconds = [] {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  };
  auto time_it = [&](auto&& body) {
    body();  // warm up (page faults, caches)
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      const double t0 = cpu_seconds();
      body();
      best = std::min(best, cpu_seconds() - t0);
    }
    return 1e9 * best / n;  // ns per element
  };
  auto std_loop = [&](float (*f)(float), bool cached) {
    return time_it([&] {
      const int64_t len = cached ? block : n;
      for (int64_t rep = 0; rep < n / len; ++rep) {
        for (int64_t i = 0; i < len; ++i) out[i] = f(in[i]);
        asm volatile("" ::: "memory");  // every pass is done (std::tanh is pure: passes could merge)
      }
    });
  };
  auto vec_loop = [&](Op op, bool cached) {
    return time_it([&] {
      const int64_t len = cached ? block : n;
      for (int64_t rep = 0; rep < n / len; ++rep) isa().eval(op, in.data(), out.data(), len, false);
    });
  };
  for (bool cached : {false, true}) {
    const double std_exp = std_loop([](float x) { return std::exp(x); }, cached);
    const double std_tanh = std_loop([](float x) { return std::tanh(x); }, cached);
    for (Op op : {Op::kExp, Op::kTanh, Op::kSigmoid, Op::kErf, Op::kLog}) {
      const double t = vec_loop(op, cached);
      const double base = op == Op::kTanh ? std_tanh : std_exp;
      std::printf("[ %-7s ] %-4s %-7s %6.3f ns/elem  %5.2f Gelem/s   std::%s loop %6.3f ns/elem: x%.1f\n",
                  isa().name, cached ? "L1" : "DRAM", op_name(op), t, 1.0 / t, op == Op::kTanh ? "tanh" : "exp ",
                  base, base / t);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isas, VecMath, ::testing::Range(0, 3),
                         [](const ::testing::TestParamInfo<int>& info) { return std::string(kIsas[info.param].name); });

// ------------------------------------------------------------ math_fns.h

namespace fn = torch_wsl::fn;

TEST(MathFns, FloatAndDoubleForwardToStd) {
  for (float x : {-3.5f, -0.25f, 0.0f, 0.75f, 2.0f, 40.0f}) {
    EXPECT_EQ(fn::exp(x), std::exp(x));
    EXPECT_EQ(fn::tanh(x), std::tanh(x));
    EXPECT_EQ(fn::erf(x), std::erf(x));
    EXPECT_EQ(fn::exp(static_cast<double>(x)), std::exp(static_cast<double>(x)));
    EXPECT_EQ(fn::erf(static_cast<double>(x)), std::erf(static_cast<double>(x)));
  }
  EXPECT_EQ(fn::log(2.5f), std::log(2.5f));
  EXPECT_EQ(fn::log(2.5), std::log(2.5));
  EXPECT_EQ(fn::abs(-2.0f), 2.0f);
}

TEST(MathFns, SigmoidHasNoOverflowOrNaN) {
  EXPECT_EQ(fn::sigmoid(0.0f), 0.5f);
  EXPECT_EQ(fn::sigmoid(-kInf), 0.0f);
  EXPECT_EQ(fn::sigmoid(kInf), 1.0f);
  EXPECT_EQ(fn::sigmoid(-1000.0f), 0.0f);
  EXPECT_EQ(fn::sigmoid(1000.0f), 1.0f);
  EXPECT_EQ(fn::sigmoid(-1000.0), 0.0);
  EXPECT_TRUE(std::isnan(fn::sigmoid(kNaN)));
  EXPECT_TRUE(std::isnan(fn::sigmoid(std::nan(""))));
  EXPECT_GT(fn::sigmoid(-100.0f), 0.0f);  // subnormal, not flushed
  for (double x : {-30.0, -3.0, -0.5, 0.5, 3.0, 30.0}) {
    EXPECT_NEAR(fn::sigmoid(x), ref_sigmoid(x), 1e-16);
    EXPECT_LE(ulp_error(fn::sigmoid(static_cast<float>(x)), ref_sigmoid(x)), 2.0);
  }
}

TEST(MathFns, MinMaxSelectCompare) {
  EXPECT_EQ(fn::max(1.0f, 2.0f), 2.0f);
  EXPECT_EQ(fn::min(1.0, 2.0), 1.0);
  EXPECT_TRUE(std::isnan(fn::max(kNaN, 1.0f)));
  EXPECT_TRUE(std::isnan(fn::max(1.0f, kNaN)));
  EXPECT_TRUE(std::isnan(fn::min(kNaN, 1.0f)));
  EXPECT_TRUE(std::isnan(fn::min(1.0, std::nan(""))));
  EXPECT_TRUE(fn::lt(1.0f, 2.0f));
  EXPECT_FALSE(fn::lt(kNaN, 2.0f));
  EXPECT_FALSE(fn::ge(kNaN, 2.0f));
  EXPECT_TRUE(fn::le(2.0, 2.0));
  EXPECT_TRUE(fn::gt(3.0, 2.0));
  EXPECT_TRUE(fn::eq(2.0f, 2.0f));
  EXPECT_EQ(fn::select(true, 1.0f, 2.0f), 1.0f);
  EXPECT_EQ(fn::select(false, 1.0, 2.0), 2.0);
  EXPECT_EQ(fn::splat<float>(0.5), 0.5f);
}

TEST(MathFns, SharedFormulasOnScalars) {
  namespace sh = vec_math_test_shared;
  for (double x : {-5.0, -1.0, -0.1, 0.0, 0.3, 2.0, 7.0}) {
    EXPECT_NEAR(sh::silu(x), reference(Op::kSilu, x), 1e-15);
    EXPECT_NEAR(sh::gelu(static_cast<float>(x)), reference(Op::kGelu, static_cast<float>(x)), 1e-6);
    EXPECT_NEAR(sh::softplus(x), reference(Op::kSoftplus, x), 1e-15);
  }
}

}  // namespace

#else  // TWSL_VEC_MATH_ISA_BODY: compiled once per ISA, inside its region

namespace torch_wsl::cpu::TWSL_CPU_ISA_NS {
namespace {

#include "cpu/vec.h"

constexpr int kTestLanes = VecF::kLanes;

// out[i] = f(in[i]): vector steps, then the scalar tail (all scalar if asked).
template <typename F>
void apply(const float* in, float* out, int64_t n, bool scalar_only, F f) {
  if (scalar_only) {
    for (int64_t i = 0; i < n; ++i) f(Scalar<float>::load(in + i)).store(out + i);
    return;
  }
  for_each_lane<float>(n, [&](auto tag, int64_t i) {
    using V = decltype(tag);
    f(V::load(in + i)).store(out + i);
  });
}

void vec_math_eval(Op op, const float* in, float* out, int64_t n, bool scalar_only) {
  namespace sh = vec_math_test_shared;
  switch (op) {
    case Op::kExp: return apply(in, out, n, scalar_only, [](auto v) { return exp(v); });
    case Op::kLog: return apply(in, out, n, scalar_only, [](auto v) { return log(v); });
    case Op::kTanh: return apply(in, out, n, scalar_only, [](auto v) { return tanh(v); });
    case Op::kErf: return apply(in, out, n, scalar_only, [](auto v) { return erf(v); });
    case Op::kSigmoid: return apply(in, out, n, scalar_only, [](auto v) { return sigmoid(v); });
    case Op::kSilu: return apply(in, out, n, scalar_only, [](auto v) { return sh::silu(v); });
    case Op::kGelu: return apply(in, out, n, scalar_only, [](auto v) { return sh::gelu(v); });
    case Op::kGeluTanh: return apply(in, out, n, scalar_only, [](auto v) { return sh::gelu_tanh(v); });
    case Op::kSoftcap: return apply(in, out, n, scalar_only, [](auto v) { return sh::softcap(v); });
    case Op::kSoftplus: return apply(in, out, n, scalar_only, [](auto v) { return sh::softplus(v); });
  }
}

template <typename F>
void apply2(const float* a, const float* b, float* out, int64_t n, F f) {
  for_each_lane<float>(n, [&](auto tag, int64_t i) {
    using V = decltype(tag);
    f(V::load(a + i), V::load(b + i)).store(out + i);
  });
}

void vec_math_eval2(Op2 op, const float* a, const float* b, float* out, int64_t n) {
  switch (op) {
    case Op2::kMax: return apply2(a, b, out, n, [](auto x, auto y) { return max(x, y); });
    case Op2::kMin: return apply2(a, b, out, n, [](auto x, auto y) { return min(x, y); });
    case Op2::kSelectLt: return apply2(a, b, out, n, [](auto x, auto y) { return select(lt(x, y), x, y); });
    case Op2::kSelectLe: return apply2(a, b, out, n, [](auto x, auto y) { return select(le(x, y), x, y); });
    case Op2::kSelectGt: return apply2(a, b, out, n, [](auto x, auto y) { return select(gt(x, y), x, y); });
    case Op2::kSelectGe: return apply2(a, b, out, n, [](auto x, auto y) { return select(ge(x, y), x, y); });
    case Op2::kSelectEq: return apply2(a, b, out, n, [](auto x, auto y) { return select(eq(x, y), x, y); });
    case Op2::kSelectNotLt: return apply2(a, b, out, n, [](auto x, auto y) { return select(!lt(x, y), x, y); });
    case Op2::kSelectLtOrGt:
      return apply2(a, b, out, n, [](auto x, auto y) { return select(lt(x, y) | gt(x, y), x, y); });
    case Op2::kSelectLtAndLe:
      return apply2(a, b, out, n, [](auto x, auto y) { return select(lt(x, y) & le(x, y), x, y); });
  }
}

}  // namespace
}  // namespace torch_wsl::cpu::TWSL_CPU_ISA_NS

#endif  // TWSL_VEC_MATH_ISA_BODY
