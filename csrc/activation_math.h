// The arithmetic of the gated MLP activations, defined once for the CPU
// kernels (csrc/cpu/activation_kernel_impl.h, on vec.h's vectors) and the CUDA
// kernels (csrc/cuda/activation_kernels.cu, on float and double), so the CPU
// tests exercise the formulas that run on the GPU.
//
//   forward   out = act(gate) * up
//   backward  grad_up = dy * act(gate),  grad_gate = dy * up * act'(gate)
//             (act recomputed from gate: nothing but the inputs is saved)
//
//   silu       act(x) = x s,  s = sigmoid(x)        act'(x) = s (1 + x (1 - s))   (1 - s = sigmoid(-x))
//   gelu       act(x) = x P,  P = Phi(x) = erfc(-x / sqrt 2) / 2
//                                                    act'(x) = P + x exp(-x^2 / 2) / sqrt(2 pi)
//   gelu_tanh  act(x) = x h,  h = (1 + tanh(u)) / 2 = sigmoid(2 u),  u = b (x + k x^3),
//              b = sqrt(2 / pi),  k = 0.044715    act'(x) = h + 2 x (1 - h) h b (1 + 3 k x^2)
//
// These are torch's formulas (aten/src/ATen/native/cpu/Activation.cpp) up to
// two identities that need fewer transcendentals and avoid cancellation:
// (1 + tanh(u)) / 2 = sigmoid(2 u), and the normal CDF from erfc rather than
// (1 + erf(x / sqrt 2)) / 2, which loses the relative accuracy of Phi(x) for
// x < 0 and needs a second exponential for the derivative (see normal_cdf).
// Products are grouped so each output is rounded once in the accumulation
// type (fp32 for fp16/bf16 storage): eager rounds act(gate) to the storage
// dtype before the product, the fused kernel does not (tests/test_activation.py
// bounds the difference). Non-finite values follow the formulas, so NaN
// propagates and +-inf give what eager float64 gives: act(-inf) and
// act'(+-inf) are NaN (inf * 0), act(+inf) = +inf. One float32 limit is
// eager float32's too: gelu_tanh's derivative squares x, so it is NaN for
// |x| > 1.8e19.
//
// Two primitives have faster versions for the CPU vector types, defined in
// cpu/activation_kernel_impl.h and found by argument-dependent lookup:
// exp_neg_abs, reciprocal_ge1 and normal_cdf (so call them unqualified).
#pragma once

#include <cmath>
#include <type_traits>

#include "common.h"
#include "math_fns.h"

namespace torch_wsl::act_math {

using torch_wsl::fn::abs;
using torch_wsl::fn::exp;
using torch_wsl::fn::ge;
using torch_wsl::fn::lt;
using torch_wsl::fn::select;
using torch_wsl::fn::splat;

enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kKappa = 0.044715;

// a * b + c rounded once: the same instruction on the CPU (vfmadd, through the
// vector types' fmadd) and the GPU (fma).
template <typename T>
TWSL_HOST_DEVICE T madd(T a, T b, T c) {
  if constexpr (std::is_arithmetic_v<T>) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<T, float>) {
      return ::fmaf(a, b, c);
    } else {
      return ::fma(a, b, c);
    }
#else
    return std::fma(a, b, c);
#endif
  } else {
    return T::fmadd(a, b, c);
  }
}

// exp(-|x|), in [0, 1].
TWSL_HOST_DEVICE float exp_neg_abs(float x) { return exp(-abs(x)); }
TWSL_HOST_DEVICE double exp_neg_abs(double x) { return exp(-abs(x)); }

// 1 / d for finite d >= 1 (the only denominators below).
TWSL_HOST_DEVICE float reciprocal_ge1(float d) { return 1.0f / d; }
TWSL_HOST_DEVICE double reciprocal_ge1(double d) { return 1.0 / d; }

// sigmoid(x) = 1 / (1 + exp(-x)) and its complement 1 - sigmoid(x) =
// sigmoid(-x), both formed from e = exp(-|x|) in [0, 1] (which never
// overflows) as 1 / (1 + e) and e / (1 + e): each accurate to a few ulps
// relative everywhere (1 - s would lose the complement's digits for x > 0,
// where the derivatives need it), -> 0 for x -> -inf, NaN for NaN.
template <typename T>
struct Logistic {
  T s;  // sigmoid(x)
  T c;  // 1 - sigmoid(x)
};

template <typename T>
TWSL_HOST_DEVICE Logistic<T> logistic(T x) {
  const T e = exp_neg_abs(x);
  const T r = reciprocal_ge1(splat<T>(1) + e);
  const auto nonneg = ge(x, splat<T>(0));
  return {select(nonneg, splat<T>(1), e) * r, select(nonneg, e, splat<T>(1)) * r};
}

// Phi(x), the standard normal CDF, at float accuracy; with `density`, also
// exp(-x^2 / 2) / sqrt(2 pi) there. q = erfc(|x| / sqrt 2) / 2 is formed
// directly (no 1 - erf cancellation, so Phi keeps its relative accuracy for
// x < 0) as exp(-x^2 / 2) t P(t), t = 1 / (1 + p w), w = |x| / sqrt 2, with P
// our degree-8 fit of erfcx(w) / t on [0, 16] (weighted least squares
// iterated to minimax, Lawson's method; relative error 4e-8 with these float
// coefficients, which carry Phi's 1/2), evaluated by Estrin's scheme (depth 4,
// not Horner's 8: the CPU kernels are bound by their chains' latency);
// Phi = q for x < 0, 1 - q for x >= 0. exp(-x^2 / 2) is taken of the rounded
// square and corrected by (1 - lo / 2), lo the square's rounding error (exact
// by FMA); the density is the same exponential, so the backward pass needs no
// second one. Both are formed from |x| capped at 16: the exponential is 0
// there already, so q = 0 and Phi(+inf) = 1, with no inf * 0 from the square
// or the reciprocal (NaN x still gives NaN: the caller multiplies by x).
template <typename T>
TWSL_HOST_DEVICE T normal_cdf_f32(T x, T* density) {
  const T ax = abs(x);
  const T xc = select(lt(ax, splat<T>(16)), ax, splat<T>(16));  // exp(-128) is 0 in float; x^2 stays finite
  const T hi = xc * xc;
  const T lo = madd(xc, xc, splat<T>(0) - hi);
  const T e0 = exp_neg_abs(splat<T>(0.5) * hi);
  const T e = madd(e0, splat<T>(-0.5) * lo, e0);
  const T t = reciprocal_ge1(madd(splat<T>(0.385f * kSqrtHalf), xc, splat<T>(1)));
  const T t2 = t * t;
  const T t4 = t2 * t2;
  const T p01 = madd(splat<T>(0.5 * 0.21697935461997986), t, splat<T>(0.5 * 0.21722109615802765));
  const T p23 = madd(splat<T>(0.5 * 0.15041697025299072), t, splat<T>(0.5 * 0.20392358303070068));
  const T p45 = madd(splat<T>(0.5 * -0.10810547322034836), t, splat<T>(0.5 * 0.19775272905826569));
  const T p67 = madd(splat<T>(0.5 * -0.23977838456630707), t, splat<T>(0.5 * 0.30498605966567993));
  const T p03 = madd(p23, t2, p01);
  const T p47 = madd(p67, t2, p45);
  const T p = madd(madd(splat<T>(0.5 * 0.05660410225391388), t4, p47), t4, p03);
  const T q = e * t * p;
  if (density != nullptr) *density = splat<T>(kInvSqrt2Pi) * e;
  return select(ge(x, splat<T>(0)), splat<T>(1) - q, q);
}

// normal_cdf: the float fit above, and for double erfc itself (the fit is
// float-accurate only). The CPU vector types forward to normal_cdf_f32.
TWSL_HOST_DEVICE float normal_cdf(float x, float* density) { return normal_cdf_f32(x, density); }
TWSL_HOST_DEVICE double normal_cdf(double x, double* density) {
#if defined(__CUDA_ARCH__)
  if (density != nullptr) *density = kInvSqrt2Pi * ::exp(-0.5 * x * x);
  return 0.5 * ::erfc(-x * kSqrtHalf);
#else
  if (density != nullptr) *density = kInvSqrt2Pi * std::exp(-0.5 * x * x);
  return 0.5 * std::erfc(-x * kSqrtHalf);
#endif
}

template <typename T>
struct ValueGrad {
  T value;  // act(x)
  T grad;   // act'(x)
};

template <typename T>
TWSL_HOST_DEVICE ValueGrad<T> silu(T x) {
  const Logistic<T> l = logistic(x);
  return {x * l.s, madd(x, l.c, splat<T>(1)) * l.s};
}

template <bool kGrad, typename T>
TWSL_HOST_DEVICE ValueGrad<T> gelu(T x) {
  if constexpr (kGrad) {
    T density;
    const T p = normal_cdf(x, &density);
    return {x * p, madd(x, density, p)};
  } else {
    const T p = normal_cdf(x, static_cast<T*>(nullptr));
    return {x * p, p};
  }
}

template <bool kGrad, typename T>
TWSL_HOST_DEVICE ValueGrad<T> gelu_tanh(T x) {
  const T x2 = x * x;
  const Logistic<T> l = logistic(splat<T>(2 * kSqrt2OverPi) * x * madd(splat<T>(kKappa), x2, splat<T>(1)));
  if constexpr (kGrad) {
    const T d_inner = splat<T>(2 * kSqrt2OverPi) * madd(splat<T>(3 * kKappa), x2, splat<T>(1));
    return {x * l.s, madd(x * l.c * l.s, d_inner, l.s)};
  } else {
    return {x * l.s, l.s};
  }
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
