// The project's dtypes in one place, for CPU and CUDA code: the floating
// dtypes the kernels accept, the type they accumulate in, and the dispatch
// from a run-time dtype to a C++ type.
#pragma once

#include <type_traits>

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace torch_wsl {

// What kernels accumulate in: float for float/half/bfloat16, double for double.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The dtypes users train in, plus float64 (for gradcheck).
inline bool is_kernel_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16 || t == c10::kDouble;
}

inline c10::ScalarType acc_scalar_type(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }

// Calls fn(scalar_t{}) for one of is_kernel_float's dtypes; `what` names the
// caller in the (internal) error for any other dtype, which the operator's
// argument checks have already rejected.
template <typename Fn>
decltype(auto) visit_float_dtype(c10::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Double: return fn(double{});
    case c10::ScalarType::BFloat16: return fn(c10::BFloat16{});
    case c10::ScalarType::Half: return fn(c10::Half{});
    default: TORCH_CHECK(false, "torch_wsl: internal error: ", what, " got unsupported dtype ", dtype);
  }
}

}  // namespace torch_wsl

// ATen's dispatch macro over is_kernel_float's dtypes (scalar_t in the body).
#define TORCH_WSL_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
