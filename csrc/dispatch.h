// The project's dtype sets for kernel dispatch, in one place.
#pragma once

#include <ATen/Dispatch.h>

// Training dtypes (float32, float16, bfloat16) plus float64 for gradcheck.
#define TWSL_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
