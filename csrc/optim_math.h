// The arithmetic of the fused optimizers (Adam, AdamW, SGD) and of gradient
// clipping, defined once for the CPU kernels (csrc/cpu/optim_kernel_impl.h,
// on SIMD vectors) and the CUDA kernels (csrc/cuda/optim_kernels.cu, on
// floats), so the CPU tests exercise the formulas that run on the GPU.
//
// Every formula follows torch.optim's single-tensor implementation operation
// by operation (torch/optim/adam.py, sgd.py; ATen's lerp, addcmul, addcdiv and
// add-with-alpha kernels), in the accumulation type (float for
// float/half/bfloat16, double for double), so a float32 trajectory stays
// within a few ulps of torch.optim's:
//
//   Adam(W), per element, step t (maximize: g = -g):
//     AdamW: p = p * (1 - lr * wd)          Adam: g = g + wd * p
//     m = lerp(m, g, 1 - beta1)             v = fma((1 - beta2) * g, g, v * beta2)
//     amsgrad: vmax = max(vmax, v), and vmax replaces v below
//     p = p + (-lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//   SGD (maximize: g = -g):
//     g = g + wd * p
//     momentum: buf = g on the first step, else buf = buf * momentum + (1 - dampening) * g;
//               g = nesterov ? g + momentum * buf : buf
//     p = p - lr * g
//   Gradient clipping: g = g * min(max_norm * (1 / (total_norm + 1e-6)), 1)
//
// The templates take a scalar (float, double) or a SIMD vector type with the
// members of cpu/vec.h (broadcast, sqrt, maximum, neg, static fmadd).
#pragma once

#include <cmath>
#include <type_traits>

#include "common.h"

namespace torch_wsl::optim_math {

// ---------------------------------------------------------------- elementary
// Scalars here; vector types through their members.

template <typename T, typename S>
TWSL_HOST_DEVICE T splat(S x) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<T>(x);
  } else {
    return T::broadcast(x);
  }
}

TWSL_HOST_DEVICE float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
TWSL_HOST_DEVICE double fmadd(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
// a * b + c with one rounding, as ATen's vec::fmadd.
template <typename V>
TWSL_HOST_DEVICE V fmadd(const V& a, const V& b, const V& c) {
  return V::fmadd(a, b, c);
}

TWSL_HOST_DEVICE float sqrt_(float x) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
TWSL_HOST_DEVICE double sqrt_(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}
template <typename V>
TWSL_HOST_DEVICE V sqrt_(const V& x) {
  return x.sqrt();
}

// max(a, b) that propagates NaN from either side, as torch.maximum.
template <typename T>
TWSL_HOST_DEVICE T maximum(const T& a, const T& b) {
  if constexpr (std::is_arithmetic_v<T>) {
    if (a != a) return a;
    if (b != b) return b;
    return a > b ? a : b;
  } else {
    return a.maximum(b);
  }
}

// a * b rounded on its own: never contracted with a following add into an
// FMA (compilers contract by default), where torch rounds the product first.
TWSL_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  float r = a * b;
#if defined(__x86_64__)
  asm("" : "+x"(r));
#endif
  return r;
#endif
}
TWSL_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  double r = a * b;
#if defined(__x86_64__)
  asm("" : "+x"(r));
#endif
  return r;
#endif
}
template <typename V>
TWSL_HOST_DEVICE V mul_rn(const V& a, const V& b) {
  return a.mul_rn(b);
}

template <typename T>
TWSL_HOST_DEVICE T neg(const T& x) {
  if constexpr (std::is_arithmetic_v<T>) {
    return -x;
  } else {
    return x.neg();
  }
}

TWSL_HOST_DEVICE float abs_(float x) {
#if defined(__CUDA_ARCH__)
  return ::fabsf(x);
#else
  return std::fabs(x);
#endif
}
TWSL_HOST_DEVICE double abs_(double x) {
#if defined(__CUDA_ARCH__)
  return ::fabs(x);
#else
  return std::fabs(x);
#endif
}
template <typename V>
TWSL_HOST_DEVICE V abs_(const V& x) {
  return x.abs();
}

// ATen's lerp(start, end, weight): fmadd(w, end - start, start) for |w| < 0.5,
// else fmadd(w - 1, end - start, end). `small` is |w| < 0.5, decided once.
template <typename T, typename S>
TWSL_HOST_DEVICE T lerp(const T& start, const T& end, S weight, bool small) {
  const T diff = end - start;
  return small ? fmadd(splat<T>(weight), diff, start) : fmadd(splat<T>(weight - S(1)), diff, end);
}

// ---------------------------------------------------------------------- Adam

// Host-side scalars of one Adam(W) step of one tensor, in double as
// torch.optim computes them in Python.
struct AdamStepScalars {
  double step_size;              // lr / (1 - beta1^step)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

TWSL_HOST_DEVICE AdamStepScalars adam_step_scalars(double lr, double beta1, double beta2, double step) {
#if defined(__CUDA_ARCH__)
  const double bc1 = 1.0 - ::pow(beta1, step);
  const double bc2 = 1.0 - ::pow(beta2, step);
  return {lr / bc1, ::sqrt(bc2)};
#else
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  return {lr / bc1, std::sqrt(bc2)};
#endif
}

// Hyperparameters of one Adam(W) step in the accumulation type (rounded once
// from the double values, as ATen rounds a Python scalar operand).
template <typename acc_t>
struct AdamCoeffs {
  acc_t lerp_weight;            // 1 - beta1
  bool lerp_small;              // |1 - beta1| < 0.5
  acc_t beta2;
  acc_t one_minus_beta2;
  acc_t eps;
  acc_t weight_decay;           // coupled (Adam) weight decay, 0 for none
  acc_t decay;                  // decoupled (AdamW) factor 1 - lr * wd
  bool decoupled;               // AdamW's p * decay instead of Adam's g + wd * p
  bool has_weight_decay;
  bool maximize;
  bool amsgrad;
  acc_t neg_step_size;          // -step_size
  acc_t bias_correction2_sqrt;
};

template <typename acc_t>
TWSL_HOST_DEVICE AdamCoeffs<acc_t> adam_coeffs(double lr, double beta1, double beta2, double weight_decay, double eps,
                                               bool amsgrad, bool maximize, bool decoupled,
                                               const AdamStepScalars& s) {
  AdamCoeffs<acc_t> c;
  const double w = 1.0 - beta1;
  c.lerp_weight = static_cast<acc_t>(w);
  c.lerp_small = (w < 0 ? -w : w) < 0.5;
  c.beta2 = static_cast<acc_t>(beta2);
  c.one_minus_beta2 = static_cast<acc_t>(1.0 - beta2);
  c.eps = static_cast<acc_t>(eps);
  c.has_weight_decay = weight_decay != 0.0;
  c.decoupled = decoupled;
  c.weight_decay = static_cast<acc_t>(weight_decay);
  c.decay = static_cast<acc_t>(1.0 - lr * weight_decay);
  c.maximize = maximize;
  c.amsgrad = amsgrad;
  c.neg_step_size = static_cast<acc_t>(-s.step_size);
  c.bias_correction2_sqrt = static_cast<acc_t>(s.bias_correction2_sqrt);
  return c;
}

// One Adam(W) step on one element (or one vector of elements). `vmax` is read
// and written only when c.amsgrad.
template <typename T, typename acc_t>
TWSL_HOST_DEVICE void adam_update(T& p, T g, T& m, T& v, T& vmax, const AdamCoeffs<acc_t>& c) {
  if (c.maximize) g = neg(g);
  if (c.has_weight_decay) {
    if (c.decoupled) {
      p = mul_rn(p, splat<T>(c.decay));  // torch's p.mul_(1 - lr * wd), rounded before the update
    } else {
      g = fmadd(p, splat<T>(c.weight_decay), g);
    }
  }
  m = lerp(m, g, c.lerp_weight, c.lerp_small);
  // torch's v.mul_(beta2).addcmul_(g, g, 1 - beta2); ATen's addcmul fuses the last multiply-add.
  v = fmadd(splat<T>(c.one_minus_beta2) * g, g, mul_rn(v, splat<T>(c.beta2)));
  T second = v;
  if (c.amsgrad) {
    vmax = maximum(vmax, v);
    second = vmax;
  }
  const T denom = sqrt_(second) / splat<T>(c.bias_correction2_sqrt) + splat<T>(c.eps);
  p = p + (splat<T>(c.neg_step_size) * m) / denom;
}

// ----------------------------------------------------------------------- SGD

template <typename acc_t>
struct SgdCoeffs {
  acc_t weight_decay;
  acc_t momentum;
  acc_t one_minus_dampening;
  acc_t neg_lr;
  bool has_weight_decay;
  bool has_momentum;
  bool nesterov;
  bool maximize;
  bool first_step;  // the momentum buffer is initialized from the gradient
};

template <typename acc_t>
TWSL_HOST_DEVICE SgdCoeffs<acc_t> sgd_coeffs(double lr, double momentum, double dampening, double weight_decay,
                                             bool nesterov, bool maximize, bool first_step) {
  SgdCoeffs<acc_t> c;
  c.weight_decay = static_cast<acc_t>(weight_decay);
  c.momentum = static_cast<acc_t>(momentum);
  c.one_minus_dampening = static_cast<acc_t>(1.0 - dampening);
  c.neg_lr = static_cast<acc_t>(-lr);
  c.has_weight_decay = weight_decay != 0.0;
  c.has_momentum = momentum != 0.0;
  c.nesterov = nesterov;
  c.maximize = maximize;
  c.first_step = first_step;
  return c;
}

// One SGD step on one element; `buf` (the momentum buffer) is used only with momentum.
template <typename T, typename acc_t>
TWSL_HOST_DEVICE void sgd_update(T& p, T g, T& buf, const SgdCoeffs<acc_t>& c) {
  if (c.maximize) g = neg(g);
  if (c.has_weight_decay) g = fmadd(p, splat<T>(c.weight_decay), g);
  if (c.has_momentum) {
    buf = c.first_step ? g : fmadd(g, splat<T>(c.one_minus_dampening), mul_rn(buf, splat<T>(c.momentum)));
    g = c.nesterov ? fmadd(buf, splat<T>(c.momentum), g) : buf;
  }
  p = fmadd(g, splat<T>(c.neg_lr), p);
}

// ------------------------------------------------------------ gradient norms

enum class NormOrder : int { kInf = 0, kOne = 1, kTwo = 2 };

// What one element contributes to a partial result: |x|, |x| or x^2.
template <typename T>
TWSL_HOST_DEVICE T norm_term(const T& x, NormOrder ord) {
  return ord == NormOrder::kTwo ? x * x : abs_(x);
}

// Combines two partial results (sums, or NaN-propagating maxima for inf).
template <typename T>
TWSL_HOST_DEVICE T norm_combine(const T& a, const T& b, NormOrder ord) {
  return ord == NormOrder::kInf ? maximum(a, b) : a + b;
}

// The norm from the combined partial result.
template <typename acc_t>
TWSL_HOST_DEVICE acc_t norm_finish(acc_t partial, NormOrder ord) {
  return ord == NormOrder::kTwo ? sqrt_(partial) : partial;
}

// min(max_norm / (total_norm + 1e-6), 1) as torch.nn.utils.clip_grad_norm_
// computes it on the total-norm tensor: Python's `max_norm / t` is
// t.reciprocal() * max_norm, and clamp keeps NaN.
template <typename acc_t>
TWSL_HOST_DEVICE acc_t clip_coef(acc_t total_norm, acc_t max_norm) {
  const acc_t c = (acc_t(1) / (total_norm + acc_t(1e-6))) * max_norm;
  return c > acc_t(1) ? acc_t(1) : c;
}

}  // namespace torch_wsl::optim_math
