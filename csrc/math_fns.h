// TEMPORARY stand-in for the shared csrc/math_fns.h (another engineer's, not
// yet on main): scalar transcendentals for float and double, host and device,
// under the names the shared header declares. Dropped when it lands.
#pragma once

#include <cmath>

#include "common.h"

namespace torch_wsl::fn {

#if defined(__CUDA_ARCH__)
TWSL_HOST_DEVICE float exp(float x) { return ::expf(x); }
TWSL_HOST_DEVICE double exp(double x) { return ::exp(x); }
TWSL_HOST_DEVICE float log(float x) { return ::logf(x); }
TWSL_HOST_DEVICE double log(double x) { return ::log(x); }
TWSL_HOST_DEVICE float tanh(float x) { return ::tanhf(x); }
TWSL_HOST_DEVICE double tanh(double x) { return ::tanh(x); }
#else
TWSL_HOST_DEVICE float exp(float x) { return std::exp(x); }
TWSL_HOST_DEVICE double exp(double x) { return std::exp(x); }
TWSL_HOST_DEVICE float log(float x) { return std::log(x); }
TWSL_HOST_DEVICE double log(double x) { return std::log(x); }
TWSL_HOST_DEVICE float tanh(float x) { return std::tanh(x); }
TWSL_HOST_DEVICE double tanh(double x) { return std::tanh(x); }
#endif

}  // namespace torch_wsl::fn
