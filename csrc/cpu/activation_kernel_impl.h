// Gated MLP activation CPU kernels, compiled once per ISA inside the region
// opened by cpu/isa_begin.h (TWSL_CPU_ISA_NS and TWSL_CPU_ISA_LEVEL set). No
// includes here (see isa_prelude.h). The arithmetic is activation_math.h's,
// shared with CUDA; here it runs on vectors of fp32 lanes (vec.h).
//
// Purely elementwise and memory-bound: each input byte is read once and each
// output byte written once, in one pass. The [rows, cols] elements are split
// into equal contiguous ranges across threads (a dense tensor is one long
// row, see activation.cpp); each range is walked as runs along its rows.
// Outputs that cannot stay in the last-level cache are written with
// non-temporal stores.

namespace torch_wsl::cpu::TWSL_CPU_ISA_NS {
namespace {

#include "cpu/vec.h"

namespace am = torch_wsl::act_math;
using am::Activation;

// activation_math.h's primitives for this ISA's types (found there by
// argument-dependent lookup). These kernels' throughput is bounded by the
// latency of each element's chain of dependent operations (a few dozen in
// flight fill the scheduler), not by their count, so the vector versions
// trade a few operations for shorter chains.

template <typename acc_t>
Scalar<acc_t> exp_neg_abs(Scalar<acc_t> x) {
  return {std::exp(-std::fabs(x.v))};
}
template <typename acc_t>
Scalar<acc_t> reciprocal_ge1(Scalar<acc_t> d) {
  return {acc_t(1) / d.v};
}
template <typename acc_t>
Scalar<acc_t> normal_cdf(Scalar<acc_t> x, Scalar<acc_t>* density) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return {am::normal_cdf(x.v, density != nullptr ? &density->v : nullptr)};
  } else {
    return am::normal_cdf_f32(x, density);
  }
}

#if TWSL_CPU_ISA_LEVEL >= 1
// exp(-|x|): vec.h's exp (its reduction and polynomial) where the argument is
// never positive: one clamp instead of two, -|x| in one operation, the
// polynomial by Estrin's scheme (depth 3 instead of 5), and the reduced
// argument's two parts summed first (vec.h keeps them apart, a quarter ulp
// more accurate for three more operations on the chain; the activations'
// products add several ulps of their own).
inline VecF exp_neg_abs(VecF x) {
  using namespace vec_math_detail;
#if TWSL_CPU_ISA_LEVEL >= 2
  const VecF neg_abs{_mm512_or_ps(x.v, _mm512_set1_ps(-0.0f))};
#else
  const VecF neg_abs{_mm256_or_ps(x.v, _mm256_set1_ps(-0.0f))};
#endif
  const VecF y = max_keep_nan(neg_abs, splat(-104.0f));  // exp is 0 in float below
  const VecF n = round_nearest(y * splat(1.44269502f));
  const VecF r = VecF::fmadd(n, splat(-kLn2Lo), VecF::fmadd(n, splat(-kLn2Hi), y));
  const VecF r2 = r * r;
  const VecF lo = VecF::fmadd(splat(0.16666521f), r, splat(0.49999994f));
  const VecF hi = VecF::fmadd(splat(0.008368675f), r, splat(0.041668262f));
  const VecF q = VecF::fmadd(VecF::fmadd(splat(0.0013821055f), r2, hi), r2, lo);
  return scale_pow2(VecF::fmadd(r2, q, r) + splat(1.0f), n);
}

inline VecF normal_cdf(VecF x, VecF* density) { return am::normal_cdf_f32(x, density); }
#endif

#if TWSL_CPU_ISA_LEVEL >= 2
// The hardware estimate (relative error 2^-14) and one Newton step
// r + r (1 - d r): within an ulp of 1 / d, without the divider (vdivps alone
// would bound a vector's cost here).
inline VecF reciprocal_ge1(VecF d) {
  const __m512 r = _mm512_rcp14_ps(d.v);
  return {_mm512_fmadd_ps(r, _mm512_fnmadd_ps(d.v, r, _mm512_set1_ps(1.0f)), r)};
}
#elif TWSL_CPU_ISA_LEVEL >= 1
// AVX2's estimate has 12 bits; refining it to float accuracy takes two
// Newton steps, no shorter than the (8-lane) division.
inline VecF reciprocal_ge1(VecF d) { return VecF::broadcast(1.0f) / d; }
#endif

// Outputs at least this large (all outputs of a call together) are streamed:
// they would not stay in the last-level cache for the next operator anyway,
// and a non-temporal store skips the read-for-ownership that costs a third
// of the write traffic. Smaller outputs are stored normally, to stay cached.
constexpr int64_t kStreamingStoreMinBytes = int64_t{16} << 20;

// Elements per parallel task at least: far more than a thread start costs.
constexpr int64_t kGrain = int64_t{1} << 15;

// Bytes a streamed vector of T must be aligned to.
template <typename acc_t, typename T>
constexpr int64_t stream_align() {
  return static_cast<int64_t>(VecOf<acc_t>::kLanes * sizeof(T));
}

// Whether the outputs can be streamed: large enough, and (with two outputs)
// both have the same misalignment at every element, so the scalar head of a
// run that aligns one aligns the other (the two halves of a packed gradient
// do when I * sizeof(T) is a multiple of the vector size).
template <typename acc_t, typename T>
bool stream_outputs(int64_t out_bytes, const T* first, int64_t first_stride, const T* second = nullptr,
                    int64_t second_stride = 0) {
  constexpr int64_t align = stream_align<acc_t, T>();
  if (VecOf<acc_t>::kLanes == 1 || out_bytes < kStreamingStoreMinBytes) return false;
  if (second == nullptr) return true;
  const auto diff = reinterpret_cast<intptr_t>(second) - reinterpret_cast<intptr_t>(first);
  const auto stride_diff = (second_stride - first_stride) * static_cast<int64_t>(sizeof(T));
  return diff % align == 0 && stride_diff % align == 0;
}

// Scalar elements before the first aligned vector store at `out` (n at most).
template <typename acc_t, typename T>
int64_t head_to_align(const T* out, int64_t n) {
  constexpr int64_t align = stream_align<acc_t, T>();
  const auto mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % align);
  const int64_t head = mis == 0 ? 0 : (align - mis) / static_cast<int64_t>(sizeof(T));
  return std::min(head, n);
}

template <typename V, typename T>
void put(V v, T* p, bool stream) {
  if (stream) {
    v.store_stream(p);
  } else {
    v.store(p);
  }
}

// Inputs are prefetched this far ahead of the vector being computed. The
// hardware prefetchers alone fall behind: each cache line takes dozens of
// dependent operations here (measured: fp32 SwiGLU fwd+bwd at 4096 x 11008
// 1.17x faster with 2 to 8 KiB; neutral for bf16, which spends more time per
// byte).
constexpr int64_t kPrefetchBytes = 4096;

template <typename T>
void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

// Runs body(V{}, i, stream) over [0, n): scalar head (up to the aligned
// output when streaming), whole vectors, scalar tail.
template <typename acc_t, typename T, typename Body>
void walk_run(const T* aligned_out, int64_t n, bool stream, Body&& body) {
  using V = VecOf<acc_t>;
  using S = Scalar<acc_t>;
  int64_t i = 0;
  if (stream) {
    for (const int64_t head = head_to_align<acc_t>(aligned_out, n); i < head; ++i) body(S{}, i, false);
  }
  for (; i + V::kLanes <= n; i += V::kLanes) body(V{}, i, stream);
  for (; i < n; ++i) body(S{}, i, false);
}

// Splits [0, rows * cols) into ranges across threads, each walked as runs
// fn(row, col, n) of consecutive columns of one row.
template <typename Fn>
void parallel_runs(int64_t rows, int64_t cols, bool stream, Fn&& fn) {
  at::parallel_for(0, rows * cols, kGrain, [&](int64_t begin, int64_t end) {
    int64_t r = begin / cols;
    int64_t c = begin % cols;
    while (begin < end) {
      const int64_t n = std::min(cols - c, end - begin);
      fn(r, c, n);
      begin += n;
      ++r;
      c = 0;
    }
    if (stream) stream_fence();
  });
}

template <Activation A, typename scalar_t, typename acc_t>
void forward_impl(const GatedForwardArgs& a) {
  const auto* gate = static_cast<const scalar_t*>(a.gate);
  const auto* up = static_cast<const scalar_t*>(a.up);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t out_bytes = a.rows * a.cols * static_cast<int64_t>(sizeof(scalar_t));
  const bool stream = stream_outputs<acc_t>(out_bytes, out, a.out_stride);
  parallel_runs(a.rows, a.cols, stream, [&](int64_t r, int64_t c, int64_t n) {
    const scalar_t* g = gate + r * a.gate_stride + c;
    const scalar_t* u = up + r * a.up_stride + c;
    scalar_t* o = out + r * a.out_stride + c;
    walk_run<acc_t>(o, n, stream, [&](auto tag, int64_t i, bool st) {
      using V = decltype(tag);
      if constexpr (V::kLanes > 1) {
        prefetch_ahead(g + i);
        prefetch_ahead(u + i);
      }
      put(am::gated_forward<A>(V::load(g + i), V::load(u + i)), o + i, st);
    });
  });
}

template <Activation A, typename scalar_t, typename acc_t>
void backward_impl(const GatedBackwardArgs& a) {
  const auto* dy = static_cast<const scalar_t*>(a.grad_output);
  const auto* gate = static_cast<const scalar_t*>(a.gate);
  const auto* up = static_cast<const scalar_t*>(a.up);
  auto* grad_gate = static_cast<scalar_t*>(a.grad_gate);
  auto* grad_up = static_cast<scalar_t*>(a.grad_up);
  const int64_t out_bytes = 2 * a.rows * a.cols * static_cast<int64_t>(sizeof(scalar_t));
  const bool stream = stream_outputs<acc_t>(out_bytes, grad_gate, a.grad_gate_stride, grad_up, a.grad_up_stride);
  parallel_runs(a.rows, a.cols, stream, [&](int64_t r, int64_t c, int64_t n) {
    const scalar_t* d = dy + r * a.grad_output_stride + c;
    const scalar_t* g = gate + r * a.gate_stride + c;
    const scalar_t* u = up + r * a.up_stride + c;
    scalar_t* gg = grad_gate + r * a.grad_gate_stride + c;
    scalar_t* gu = grad_up + r * a.grad_up_stride + c;
    walk_run<acc_t>(gg, n, stream, [&](auto tag, int64_t i, bool st) {
      using V = decltype(tag);
      V dg, du;
      if constexpr (V::kLanes > 1) {
        prefetch_ahead(d + i);
        prefetch_ahead(g + i);
        prefetch_ahead(u + i);
      }
      am::gated_backward<A>(V::load(d + i), V::load(g + i), V::load(u + i), dg, du);
      put(dg, gg + i, st);
      put(du, gu + i, st);
    });
  });
}

// Calls fn(Activation constant, scalar_t{}, acc_t{}) for the run-time activation and dtype.
template <typename Fn>
void dispatch(Activation act, c10::ScalarType dtype, Fn&& fn) {
  torch_wsl::visit_float_dtype(dtype, "activation CPU kernel", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = torch_wsl::acc_type_t<scalar_t>;
    switch (act) {
      case Activation::kSilu: return fn(std::integral_constant<Activation, Activation::kSilu>{}, scalar_t{}, acc_t{});
      case Activation::kGelu: return fn(std::integral_constant<Activation, Activation::kGelu>{}, scalar_t{}, acc_t{});
      case Activation::kGeluTanh:
        return fn(std::integral_constant<Activation, Activation::kGeluTanh>{}, scalar_t{}, acc_t{});
    }
  });
}

void forward(const GatedForwardArgs& a) {
  dispatch(a.act, a.dtype, [&](auto act, auto s, auto acc) {
    forward_impl<decltype(act)::value, decltype(s), decltype(acc)>(a);
  });
}

void backward(const GatedBackwardArgs& a) {
  dispatch(a.act, a.dtype, [&](auto act, auto s, auto acc) {
    backward_impl<decltype(act)::value, decltype(s), decltype(acc)>(a);
  });
}

}  // namespace

const ActivationKernels activation_kernels = {&forward, &backward};

}  // namespace torch_wsl::cpu::TWSL_CPU_ISA_NS
