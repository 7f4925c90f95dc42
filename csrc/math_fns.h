// Elementary functions for the shared (host and device) kernel math, on float
// and double, with the same names that cpu/vec.h gives its SIMD types.
//
//   exp, log, tanh, erf     host: std::, device: CUDA's accurate functions
//                           (expf, logf, tanhf, erff: 2, 1, 2 and 2 ulp as CUDA
//                           documents them, and the double versions), never the
//                           __expf-style intrinsics (only --use_fast_math swaps those in)
//   sigmoid                 1 / (1 + exp(-x)), written so that nothing
//                           overflows or gives NaN: -> 0 for x -> -inf, -> 1 for x -> +inf
//   max, min                NaN from either side propagates, as torch.maximum/minimum
//   abs
//   lt, le, gt, ge, eq      a < b etc. (false for NaN); a bool here, a lane mask for the
//                           SIMD types (cpu/vec.h's MaskF): combine with &, |, ! (not &&, ||)
//   select(mask, a, b)      mask ? a : b, lane by lane
//   splat<T>(c)             the constant c as a T (T::broadcast for SIMD types)
//
// How a shared math header uses them: bring the names in with using-
// declarations (or `using namespace torch_wsl::fn;`) and call them
// *unqualified*. For float and double (device, host, gradcheck) the using-
// declarations find these overloads; for the CPU kernels' VecF and
// Scalar<acc_t> argument-dependent lookup finds the ones cpu/vec.h defines in
// the ISA's own namespace (compiled for that ISA). Write comparisons and
// branches through lt/gt/select so one formula serves scalars and vectors:
//
//   #include "math_fns.h"
//   namespace torch_wsl::act_math {
//   using torch_wsl::fn::erf;
//   using torch_wsl::fn::select;
//   using torch_wsl::fn::sigmoid;
//   using torch_wsl::fn::splat;
//   template <typename T>
//   TWSL_HOST_DEVICE T silu(T x) { return x * sigmoid(x); }
//   template <typename T>
//   TWSL_HOST_DEVICE T gelu(T x) {
//     return splat<T>(0.5) * x * (splat<T>(1) + erf(x * splat<T>(0.70710678118654752)));
//   }
//   }
//
// (A qualified call, fn::exp(v), would never see the vector overloads.)
// splat<T> names T explicitly (nothing to deduce it from). The SIMD types have
// the arithmetic operators but no unary minus: write splat<T>(0) - x.
// Accuracy of the SIMD versions: see cpu/vec.h.
#pragma once

#include <cmath>
#include <type_traits>

#include "common.h"

namespace torch_wsl::fn {

#if defined(__CUDA_ARCH__)
#define TWSL_FN_DEVICE_OR_HOST(device_call, host_call) return device_call
#else
#define TWSL_FN_DEVICE_OR_HOST(device_call, host_call) return host_call
#endif

TWSL_HOST_DEVICE float exp(float x) { TWSL_FN_DEVICE_OR_HOST(::expf(x), std::exp(x)); }
TWSL_HOST_DEVICE double exp(double x) { TWSL_FN_DEVICE_OR_HOST(::exp(x), std::exp(x)); }
TWSL_HOST_DEVICE float log(float x) { TWSL_FN_DEVICE_OR_HOST(::logf(x), std::log(x)); }
TWSL_HOST_DEVICE double log(double x) { TWSL_FN_DEVICE_OR_HOST(::log(x), std::log(x)); }
TWSL_HOST_DEVICE float tanh(float x) { TWSL_FN_DEVICE_OR_HOST(::tanhf(x), std::tanh(x)); }
TWSL_HOST_DEVICE double tanh(double x) { TWSL_FN_DEVICE_OR_HOST(::tanh(x), std::tanh(x)); }
TWSL_HOST_DEVICE float erf(float x) { TWSL_FN_DEVICE_OR_HOST(::erff(x), std::erf(x)); }
TWSL_HOST_DEVICE double erf(double x) { TWSL_FN_DEVICE_OR_HOST(::erf(x), std::erf(x)); }
TWSL_HOST_DEVICE float abs(float x) { TWSL_FN_DEVICE_OR_HOST(::fabsf(x), std::fabs(x)); }
TWSL_HOST_DEVICE double abs(double x) { TWSL_FN_DEVICE_OR_HOST(::fabs(x), std::fabs(x)); }

#undef TWSL_FN_DEVICE_OR_HOST

// Only exp(-|x|) is formed, which never overflows: 1 / (1 + e) for x >= 0,
// e / (1 + e) for x < 0 (exact to the last ulps there too, rather than 1 - ...).
// NaN: x >= 0 is false and e is NaN.
TWSL_HOST_DEVICE float sigmoid(float x) {
  const float e = exp(-abs(x));
  return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}
TWSL_HOST_DEVICE double sigmoid(double x) {
  const double e = exp(-abs(x));
  return (x >= 0.0 ? 1.0 : e) / (1.0 + e);
}

// NaN-propagating, as torch.maximum and torch.minimum; of two equal values
// (+0 and -0) b, as the SIMD versions (vmaxps/vminps).
TWSL_HOST_DEVICE float max(float a, float b) { return a != a ? a : (b != b ? b : (a > b ? a : b)); }
TWSL_HOST_DEVICE double max(double a, double b) { return a != a ? a : (b != b ? b : (a > b ? a : b)); }
TWSL_HOST_DEVICE float min(float a, float b) { return a != a ? a : (b != b ? b : (a < b ? a : b)); }
TWSL_HOST_DEVICE double min(double a, double b) { return a != a ? a : (b != b ? b : (a < b ? a : b)); }

// Comparisons as functions, so that generic code gets a bool here and a lane
// mask for the SIMD types; all false where either side is NaN.
TWSL_HOST_DEVICE bool lt(float a, float b) { return a < b; }
TWSL_HOST_DEVICE bool lt(double a, double b) { return a < b; }
TWSL_HOST_DEVICE bool le(float a, float b) { return a <= b; }
TWSL_HOST_DEVICE bool le(double a, double b) { return a <= b; }
TWSL_HOST_DEVICE bool gt(float a, float b) { return a > b; }
TWSL_HOST_DEVICE bool gt(double a, double b) { return a > b; }
TWSL_HOST_DEVICE bool ge(float a, float b) { return a >= b; }
TWSL_HOST_DEVICE bool ge(double a, double b) { return a >= b; }
TWSL_HOST_DEVICE bool eq(float a, float b) { return a == b; }
TWSL_HOST_DEVICE bool eq(double a, double b) { return a == b; }

TWSL_HOST_DEVICE float select(bool mask, float a, float b) { return mask ? a : b; }
TWSL_HOST_DEVICE double select(bool mask, double a, double b) { return mask ? a : b; }

// A constant as a T: a cast for float and double, T::broadcast for the SIMD
// types (cpu/vec.h's VecF and Scalar<acc_t>).
template <typename T, typename S>
TWSL_HOST_DEVICE T splat(S c) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<T>(c);
  } else {
    return T::broadcast(c);
  }
}

}  // namespace torch_wsl::fn
