// The arithmetic of the gated MLP activations, defined once for the CPU
// kernels (csrc/cpu/activation_kernel_impl.h, on vec.h's vectors) and the CUDA
// kernels (csrc/cuda/activation_kernels.cu, on float and double), so the CPU
// tests exercise the formulas that run on the GPU.
//
//   forward   out = act(gate) * up
//   backward  grad_up = dy * act(gate),  grad_gate = dy * up * act'(gate)
//             (act recomputed from gate: nothing but the inputs is saved)
//
//   silu       act(x) = x s,  s = sigmoid(x)           act'(x) = s (1 + x (1 - s))
//   gelu       act(x) = x P,  P = (1 + erf(x / sqrt 2)) / 2
//                                                       act'(x) = P + x exp(-x^2 / 2) / sqrt(2 pi)
//   gelu_tanh  act(x) = x h,  h = (1 + t) / 2,  t = tanh(b (x + k x^3)),  b = sqrt(2 / pi),  k = 0.044715
//                                                       act'(x) = h + x (1 - t) h b (1 + 3 k x^2)
//
// These are torch's formulas (aten/src/ATen/native/cpu/Activation.cpp) with
// the products grouped so each value is rounded once in the accumulation type
// (fp32 for fp16/bf16 storage): eager rounds act(gate) to the storage dtype
// before the product, the fused kernel does not (tests/test_activation.py
// bounds the difference). Non-finite values follow the same formulas, so
// NaN propagates and +-inf give what eager float64 gives: act(-inf) and
// act'(+-inf) are NaN (inf * 0), silu(+inf) = gelu(+inf) = +inf.
#pragma once

#include <cmath>
#include <type_traits>

#include "common.h"
#include "math_fns.h"

namespace torch_wsl::act_math {

using torch_wsl::fn::erf;
using torch_wsl::fn::exp;
using torch_wsl::fn::sigmoid;
using torch_wsl::fn::splat;
using torch_wsl::fn::tanh;

enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

constexpr double kSqrtHalf = 0.70710678118654752440;      // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;   // sqrt(2 / pi)
constexpr double kKappa = 0.044715;

// a * b + c rounded once: the same instruction on the CPU (vfmadd, through the
// vector types' fmadd) and the GPU (fma).
template <typename T>
TWSL_HOST_DEVICE T madd(T a, T b, T c) {
  if constexpr (std::is_arithmetic_v<T>) {
#if defined(__CUDA_ARCH__)
    return ::fma(a, b, c);
#else
    return std::fma(a, b, c);
#endif
  } else {
    return T::fmadd(a, b, c);
  }
}

template <typename T>
struct ValueGrad {
  T value;  // act(x)
  T grad;   // act'(x)
};

template <typename T>
TWSL_HOST_DEVICE ValueGrad<T> silu(T x) {
  const T s = sigmoid(x);
  return {x * s, madd(x, splat<T>(1) - s, splat<T>(1)) * s};
}

template <bool kGrad, typename T>
TWSL_HOST_DEVICE ValueGrad<T> gelu(T x) {
  const T p = madd(erf(x * splat<T>(kSqrtHalf)), splat<T>(0.5), splat<T>(0.5));
  if constexpr (!kGrad) return {x * p, p};
  const T pdf = splat<T>(kInvSqrt2Pi) * exp(splat<T>(-0.5) * x * x);
  return {x * p, madd(x, pdf, p)};
}

template <bool kGrad, typename T>
TWSL_HOST_DEVICE ValueGrad<T> gelu_tanh(T x) {
  const T x2 = x * x;
  const T t = tanh(splat<T>(kSqrt2OverPi) * x * madd(splat<T>(kKappa), x2, splat<T>(1)));
  const T h = madd(t, splat<T>(0.5), splat<T>(0.5));
  if constexpr (!kGrad) return {x * h, h};
  const T d_inner = splat<T>(kSqrt2OverPi) * madd(splat<T>(3 * kKappa), x2, splat<T>(1));
  return {x * h, madd(x * (splat<T>(1) - t) * h, d_inner, h)};
}

// act(x) and, with kGrad, act'(x) (else .grad is not the derivative); silu's
// derivative costs no transcendental, so it is always formed (and dropped by
// the compiler when unused).
template <Activation A, bool kGrad, typename T>
TWSL_HOST_DEVICE ValueGrad<T> activation(T x) {
  if constexpr (A == Activation::kSilu) {
    return silu(x);
  } else if constexpr (A == Activation::kGelu) {
    return gelu<kGrad>(x);
  } else {
    return gelu_tanh<kGrad>(x);
  }
}

// out = act(gate) * up.
template <Activation A, typename T>
TWSL_HOST_DEVICE T gated_forward(T gate, T up) {
  return activation<A, false>(gate).value * up;
}

// grad_up = dy * act(gate), grad_gate = (dy * up) * act'(gate) (eager's order:
// the product's gradient dy * up, then the activation's backward).
template <Activation A, typename T>
TWSL_HOST_DEVICE void gated_backward(T dy, T gate, T up, T& grad_gate, T& grad_up) {
  const ValueGrad<T> a = activation<A, true>(gate);
  grad_up = dy * a.value;
  grad_gate = dy * up * a.grad;
}

}  // namespace torch_wsl::act_math
