// The arithmetic of LayerNorm and RMSNorm, defined once for the CPU kernels
// (csrc/cpu/norm_kernel.h) and the CUDA kernels (csrc/cuda/norm_kernels.cu),
// so the CPU tests exercise the formulas that run on the GPU.
//
// Notation, per row of n elements (RMSNorm is LayerNorm with mean fixed at 0
// and no bias):
//   mean = sum(x) / n,  rstd = 1 / sqrt(sum((x - mean)^2) / n + eps)
//   xhat = (x - mean) * rstd,  y = xhat * w + b
//   backward, with gw = dy * w:
//   dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)),  dw = sum_rows(dy * xhat),  db = sum_rows(dy)
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace torch_wsl::norm_math {

// 1 / sqrt(x), in the accumulation type.
template <typename acc_t>
TWSL_HOST_DEVICE acc_t reciprocal_sqrt(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::rsqrt(x);
#else
  return acc_t(1) / std::sqrt(x);
#endif
}

// rstd from the sum of squared deviations of a row (centered for LayerNorm,
// raw for RMSNorm). A sum of squares is never negative; the clamp is written
// so that NaN (from NaN or Inf inputs) propagates, as in eager PyTorch.
template <typename acc_t>
TWSL_HOST_DEVICE acc_t row_rstd(acc_t sum_sq, int64_t n, acc_t eps) {
  acc_t var = n > 0 ? sum_sq / static_cast<acc_t>(n) : acc_t(0);
  var = var < acc_t(0) ? acc_t(0) : var;
  return reciprocal_sqrt(var + eps);
}

template <typename acc_t>
TWSL_HOST_DEVICE acc_t normalize(acc_t x, acc_t mean, acc_t rstd) {
  return (x - mean) * rstd;
}

template <typename acc_t>
TWSL_HOST_DEVICE acc_t affine(acc_t xhat, acc_t w, acc_t b) {
  return xhat * w + b;
}

// Gradient of the input of one element; mean_gw is 0 for RMSNorm.
template <typename acc_t>
TWSL_HOST_DEVICE acc_t grad_input(acc_t gw, acc_t xhat, acc_t rstd, acc_t mean_gw, acc_t mean_gw_xhat) {
  return rstd * (gw - mean_gw - xhat * mean_gw_xhat);
}

}  // namespace torch_wsl::norm_math
