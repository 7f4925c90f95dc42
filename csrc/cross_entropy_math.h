// The arithmetic of cross-entropy over class indices (with label smoothing,
// class weights and Gemma 2's logit softcap), defined once for the CPU kernels
// (csrc/cpu/cross_entropy_kernel_impl.h, on vec.h's vectors of fp32 lanes) and
// the CUDA kernels (csrc/cuda/cross_entropy_kernels.cu, on float/double), so
// the CPU tests exercise the formulas that run on the GPU.
//
// Notation for one row of C logits x with target t (rows whose target is
// ignore_index contribute nothing: loss 0, weight 0, gradient 0):
//   z_j = cap * tanh(x_j / cap) with a softcap, else x_j
//   lse = log(sum_j exp(z_j)) = m + log(sum_j exp(z_j - m)),  m = max_j z_j
//   w_j = class weight (1 without weights),  W = sum_j w_j,  e = label_smoothing
//   loss = (1 - e) * w_t * (lse - z_t) + (e / C) * sum_j w_j * (lse - z_j)
//   row weight = w_t (the "mean" reduction divides the summed losses by the
//   summed row weights, as torch.nn.functional.cross_entropy does, also for
//   the smoothing term)
//   d loss / d z_j = p_j * ((1 - e) w_t + (e / C) W) - (e / C) w_j - [j == t] (1 - e) w_t,  p_j = exp(z_j - lse)
//   d z_j / d x_j = 1 - (z_j / cap)^2
// The smoothing sum is accumulated as sum_j w_j (z_j - r) for a reference r
// (the row's first logit), so that W * (lse - r) - sum_j w_j (z_j - r) does
// not cancel when every logit of a row carries the same large offset.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"
#include "math_fns.h"

namespace torch_wsl::ce_math {

using torch_wsl::fn::exp;
using torch_wsl::fn::log;
using torch_wsl::fn::tanh;

// A constant as the kernel's value type: float/double as is, vector types
// (vec.h) broadcast to every lane.
template <typename V, typename T>
TWSL_HOST_DEVICE V splat(T x) {
  if constexpr (std::is_arithmetic_v<V>) {
    return static_cast<V>(x);
  } else {
    return V::broadcast(x);
  }
}

// Gemma 2's final_logit_softcapping: cap * tanh(x / cap).
template <typename V>
TWSL_HOST_DEVICE V softcap(V x, V cap, V inv_cap) {
  return tanh(x * inv_cap) * cap;
}

// d softcap(x) / dx, from the capped value z: 1 - tanh^2 = 1 - (z / cap)^2.
template <typename V>
TWSL_HOST_DEVICE V softcap_slope(V z, V inv_cap) {
  const V t = z * inv_cap;
  return splat<V>(1.0f) - t * t;
}

// Two partial log-sum-exp states (running max m, sum of exp(z - m)) merged
// into one. A state with s == 0 holds no element (or only -inf logits) and
// contributes nothing; NaN maxima propagate.
template <typename acc_t>
struct MaxSum {
  acc_t m;
  acc_t s;
};

template <typename acc_t>
TWSL_HOST_DEVICE MaxSum<acc_t> merge(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  if (b.s == acc_t(0) && !(b.m != b.m)) return a;
  if (a.s == acc_t(0) && !(a.m != a.m)) return b;
  const acc_t m = (a.m != a.m || a.m > b.m) ? a.m : b.m;
  return {m, a.s * exp(a.m - m) + b.s * exp(b.m - m)};
}

template <typename acc_t>
TWSL_HOST_DEVICE acc_t lse_of(MaxSum<acc_t> st) {
  return st.m + log(st.s);
}

// The smoothing sums' reference: the row's first logit, unless it is not
// finite (a masked -inf logit), then 0.
template <typename acc_t>
TWSL_HOST_DEVICE acc_t smoothing_reference(acc_t z0) {
  const acc_t big = std::numeric_limits<acc_t>::max();
  return (z0 >= -big && z0 <= big) ? z0 : acc_t(0);
}

// The per-row constants of the loss and its gradient.
template <typename acc_t>
struct RowTerms {
  acc_t target_coef;  // (1 - e) * w_t
  acc_t prob_coef;    // (1 - e) * w_t + (e / C) * W
  acc_t smooth_coef;  // e / C
};

template <typename acc_t>
TWSL_HOST_DEVICE RowTerms<acc_t> row_terms(acc_t w_target, acc_t smoothing, int64_t classes, acc_t weight_sum) {
  const acc_t smooth = smoothing / static_cast<acc_t>(classes);
  const acc_t target = (acc_t(1) - smoothing) * w_target;
  return {target, target + smooth * weight_sum, smooth};
}

// The row's loss from its log-sum-exp, target logit and smoothing sum
// lin = sum_j w_j (z_j - ref) (unused when smoothing is 0).
template <typename acc_t>
TWSL_HOST_DEVICE acc_t row_loss(const RowTerms<acc_t>& k, acc_t lse, acc_t z_target, acc_t ref, acc_t weight_sum,
                                acc_t lin) {
  acc_t loss = k.target_coef * (lse - z_target);
  if (k.smooth_coef != acc_t(0)) loss += k.smooth_coef * (weight_sum * (lse - ref) - lin);
  return loss;
}

// Gradient of one logit (before the softcap's slope), with the row's scale
// folded into the coefficients: prob_s = scale * prob_coef, smooth_s =
// scale * smooth_coef * w_j; the target's own -scale * target_coef is added
// by target_grad.
template <typename V>
TWSL_HOST_DEVICE V logit_grad(V p, V prob_s, V smooth_s) {
  return prob_s * p - smooth_s;
}

template <typename acc_t>
TWSL_HOST_DEVICE acc_t target_grad(acc_t p, acc_t prob_s, acc_t smooth_s, acc_t target_s) {
  return prob_s * p - smooth_s - target_s;
}

}  // namespace torch_wsl::ce_math
