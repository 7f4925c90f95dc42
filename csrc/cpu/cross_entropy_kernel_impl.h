// Cross-entropy CPU kernels, compiled once per ISA: included by the generated
// cross_entropy_kernel_{default,avx2,avx512}.cpp inside the region opened by
// cpu/isa_begin.h. No includes here (see isa_prelude.h). The arithmetic is
// cross_entropy_math.h's, shared with CUDA; here it runs on vectors of fp32
// lanes (vec.h).
//
// A row is walked in tiles of kTile logits that stay in L1: the first pass
// over a tile (from memory) takes its maximum (and the smoothing sum, and
// stores the softcapped values), the second (from L1) sums exp(z - max), and
// the running sum is rescaled once per tile. So each logit costs one exp in
// the forward and one in the gradient, and memory sees each row once per
// operator. The in-place loss-and-gradient kernel forms a row's gradient
// right after its log-sum-exp, while the row is still in L2.

namespace torch_wsl::cpu::TWSL_CPU_ISA_NS {
namespace {

#include "cpu/vec.h"

namespace cm = torch_wsl::ce_math;

// exp and tanh on vectors are vec.h's (found by ADL from cross_entropy_math.h).
using torch_wsl::fn::exp;
using torch_wsl::fn::tanh;

// ---------------------------------------------------------------- helpers

// Logits per tile: 8 KiB of fp32, so a tile and its softcapped copy stay in L1.
constexpr int64_t kTile = 2048;
// Gradients at least this large are written with non-temporal stores (see
// norm_kernel_impl.h): they cannot stay cached for the next operator anyway.
constexpr int64_t kStreamingStoreMinBytes = int64_t{16} << 20;

// Smoothing: none, uniform over the classes, or by class weight.
enum Smooth : int { kNoSmooth = 0, kUniformSmooth = 1, kWeightedSmooth = 2 };

template <typename T>
inline T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// max(acc, z) per lane, ignoring a NaN z (one instruction; a NaN in a row
// still reaches the row's sum of exponentials, see row_stats).
template <typename V>
inline V max_ignoring_nan(V acc, V z) {
  if constexpr (V::kLanes == 1) {
    return {z.v > acc.v ? z.v : acc.v};
  } else {
#if TWSL_CPU_ISA_LEVEL >= 2
    return {_mm512_max_ps(z.v, acc.v)};  // the second operand when either is NaN
#elif TWSL_CPU_ISA_LEVEL >= 1
    return {_mm256_max_ps(z.v, acc.v)};
#endif
  }
}

template <typename acc_t, typename V>
inline acc_t max_lanes(V v) {
  if constexpr (V::kLanes == 1) {
    return v.v;
  } else {
    alignas(64) acc_t lanes[V::kLanes];
    v.store(lanes);
    acc_t m = lanes[0];
    for (int k = 1; k < V::kLanes; ++k) m = nan_max(lanes[k], m);
    return m;
  }
}

inline double read_scalar(const void* p, c10::ScalarType t, int64_t i) {
  switch (t) {
    case c10::ScalarType::Double: return static_cast<const double*>(p)[i];
    case c10::ScalarType::BFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case c10::ScalarType::Half: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline int64_t target_at(const CrossEntropyRows& r, int64_t i) {
  return r.target_int32 ? static_cast<const int32_t*>(r.target)[i] : static_cast<const int64_t*>(r.target)[i];
}

// The run-time constants of one call, in the accumulation type.
template <typename acc_t>
struct Consts {
  acc_t cap = 0;
  acc_t inv_cap = 0;
  acc_t smoothing = 0;
  acc_t weight_sum = 0;
  const acc_t* weight = nullptr;
  int64_t classes = 0;

  explicit Consts(const CrossEntropyRows& r)
      : cap(static_cast<acc_t>(r.softcap)),
        inv_cap(r.softcap > 0 ? acc_t(1) / static_cast<acc_t>(r.softcap) : acc_t(0)),
        smoothing(static_cast<acc_t>(r.label_smoothing)),
        weight_sum(static_cast<acc_t>(r.weight_sum)),
        weight(static_cast<const acc_t*>(r.weight)),
        classes(r.classes) {}

  acc_t w(int64_t j) const { return weight != nullptr ? weight[j] : acc_t(1); }
};

// One logit as the loss sees it (softcapped or not), for the scalar paths.
template <bool kCap, typename acc_t, typename scalar_t>
inline acc_t logit_at(const scalar_t* x, int64_t j, const Consts<acc_t>& k) {
  const acc_t v = static_cast<acc_t>(x[j]);
  return kCap ? k.cap * std::tanh(v * k.inv_cap) : v;
}

template <typename acc_t>
struct RowStats {
  acc_t lse;
  acc_t z_target;
  acc_t ref;  // the smoothing sum's reference
  acc_t lin;  // sum_j w_j (z_j - ref)
};

// Log-sum-exp (and the smoothing sum) of one row in one pass over memory.
// `buf` holds kTile values of scratch (the softcapped tile).
template <typename scalar_t, typename acc_t, bool kCap, int kSmooth>
RowStats<acc_t> row_stats(const scalar_t* x, int64_t target, const Consts<acc_t>& k, acc_t* buf) {
  using V = VecOf<acc_t>;
  using S = Scalar<acc_t>;
  constexpr int64_t L = V::kLanes;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t C = k.classes;
  const V vcap = V::broadcast(k.cap), vinv = V::broadcast(k.inv_cap);
  const S scap = S::broadcast(k.cap), sinv = S::broadcast(k.inv_cap);
  RowStats<acc_t> st{};
  st.ref = kSmooth != kNoSmooth ? cm::smoothing_reference(logit_at<kCap>(x, 0, k)) : acc_t(0);
  const V vref = V::broadcast(st.ref);
  const S sref = S::broadcast(st.ref);
  acc_t m = kNegInf, s = 0, lin = 0;
  for (int64_t t0 = 0; t0 < C; t0 += kTile) {
    const int64_t n = std::min(kTile, C - t0);
    const scalar_t* xt = x + t0;
    const acc_t* wt = k.weight != nullptr ? k.weight + t0 : nullptr;
    // Pass A (memory): the tile's max; the softcapped tile into buf; the smoothing sum.
    V vmax0 = V::broadcast(kNegInf), vmax1 = vmax0;
    V vlin = V::zero();
    int64_t i = 0;
    auto step = [&](auto z_in, int64_t j, auto& vmax) {
      using W = decltype(z_in);
      W z = z_in;
      if constexpr (kCap) {
        if constexpr (W::kLanes == 1) {
          z = cm::softcap(z, scap, sinv);
        } else {
          z = cm::softcap(z, vcap, vinv);
        }
        z.store(buf + j);
      }
      vmax = max_ignoring_nan(vmax, z);
      if constexpr (kSmooth == kUniformSmooth) {
        if constexpr (W::kLanes == 1) {
          lin += (z - sref).v;
        } else {
          vlin = vlin + (z - vref);
        }
      } else if constexpr (kSmooth == kWeightedSmooth) {
        if constexpr (W::kLanes == 1) {
          lin += wt[j] * (z - sref).v;
        } else {
          vlin = V::fmadd(V::load(wt + j), z - vref, vlin);
        }
      }
    };
    for (; i + 2 * L <= n; i += 2 * L) {
      step(V::load(xt + i), i, vmax0);
      step(V::load(xt + i + L), i + L, vmax1);
    }
    for (; i + L <= n; i += L) step(V::load(xt + i), i, vmax0);
    acc_t tmax = max_lanes<acc_t>(vmax0.maximum(vmax1));
    if constexpr (kSmooth != kNoSmooth) lin += vlin.sum();
    for (; i < n; ++i) {
      S one = S::broadcast(kNegInf);
      step(S::load(xt + i), i, one);
      tmax = nan_max(one.v, tmax);
    }
    // Pass B (L1): rescale the running sum once, add this tile's exponentials.
    // The maxima skip NaNs; a NaN logit makes its exponential, and so the
    // row's sum and log-sum-exp, NaN, as in eager PyTorch. A tile with no
    // value above -inf yet adds nothing, unless it holds a NaN.
    const acc_t m_new = nan_max(tmax, m);
    if (m_new == kNegInf) {
      for (int64_t j = 0; j < n; ++j) {
        const acc_t z = kCap ? buf[j] : static_cast<acc_t>(xt[j]);
        if (z != z) {
          m = z;
          s = z;
          break;
        }
      }
      continue;
    }
    const acc_t ts = sum_lanes<acc_t>(n, [&](auto tag, int64_t j) {
      using W = decltype(tag);
      const W z = kCap ? W::load(buf + j) : W::load(xt + j);
      return exp(z - W::broadcast(m_new));
    });
    s = (s == acc_t(0) ? acc_t(0) : s * std::exp(m - m_new)) + ts;
    m = m_new;
  }
  st.lse = cm::lse_of(cm::MaxSum<acc_t>{m, s});
  st.z_target = logit_at<kCap>(x, target, k);
  st.lin = lin;
  return st;
}

// Writes one row's gradient (ignored rows: zeros). x and g may be the same
// row (the in-place kernel).
template <typename scalar_t, typename acc_t, bool kCap, int kSmooth>
void row_grad(const scalar_t* x, scalar_t* g, int64_t target, acc_t lse, acc_t z_target, acc_t scale,
              const Consts<acc_t>& k, bool stream) {
  using V = VecOf<acc_t>;
  constexpr int64_t L = V::kLanes;
  const int64_t C = k.classes;
  if (target < 0) {  // ignored
    for_each_lane<acc_t>(C, [&](auto tag, int64_t i) {
      using W = decltype(tag);
      W::zero().store(g + i);
    });
    return;
  }
  const cm::RowTerms<acc_t> terms = cm::row_terms(k.w(target), k.smoothing, C, k.weight_sum);
  const acc_t prob_s = scale * terms.prob_coef;
  const acc_t smooth_s = scale * terms.smooth_coef;
  const acc_t target_s = scale * terms.target_coef;
  // The target's own term, -target_s * slope(z_t), added to its lane below.
  const acc_t target_fix =
      -target_s * (kCap ? cm::softcap_slope(z_target, k.inv_cap) : acc_t(1));
  for_each_lane<acc_t>(C, [&](auto tag, int64_t i) {
    using W = decltype(tag);
    W z = W::load(x + i);
    if constexpr (kCap) z = cm::softcap(z, W::broadcast(k.cap), W::broadcast(k.inv_cap));
    const W p = exp(z - W::broadcast(lse));
    W sm = W::broadcast(smooth_s);
    if constexpr (kSmooth == kWeightedSmooth) sm = sm * W::load(k.weight + i);
    W gv = cm::logit_grad(p, W::broadcast(prob_s), sm);
    if constexpr (kCap) gv = gv * cm::softcap_slope(z, W::broadcast(k.inv_cap));
    if (C10_UNLIKELY(target >= i && target < i + W::kLanes)) {
      alignas(64) acc_t lanes[W::kLanes];
      gv.store(lanes);
      lanes[target - i] += target_fix;
      gv = W::load(lanes);
    }
    if constexpr (W::kLanes == L && L > 1) {
      if (stream) {
        gv.store_stream(g + i);
        return;
      }
    }
    gv.store(g + i);
  });
}

// About 128 KiB of fp32 logits per task, so short rows are not split too finely.
inline int64_t row_grain(int64_t classes) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(classes, 1));
}

// Row targets as the row passes take them: -1 for an ignored row.
inline int64_t row_target(const CrossEntropyRows& r, int64_t i) {
  const int64_t t = target_at(r, i);
  return t == r.ignore_index ? -1 : t;
}

template <typename acc_t>
acc_t row_scale(const void* scale, c10::ScalarType dt, bool per_row, const void* divisor, int64_t i) {
  const acc_t s = static_cast<acc_t>(read_scalar(scale, dt, per_row ? i : 0));
  if (divisor == nullptr) return s;
  return s / *static_cast<const acc_t*>(divisor);
}

// ---------------------------------------------------------------- kernels

template <typename scalar_t, typename acc_t, bool kCap, int kSmooth>
void forward_impl(const CrossEntropyForwardArgs& a) {
  const CrossEntropyRows& r = a.r;
  const Consts<acc_t> k(r);
  auto* loss = static_cast<acc_t*>(a.loss);
  auto* lse = static_cast<acc_t*>(a.lse);
  at::parallel_for(0, r.rows, row_grain(r.classes), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kCap ? kTile : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = row_target(r, i);
      if (t < 0) {
        loss[i] = 0;
        lse[i] = 0;
        continue;
      }
      const scalar_t* x = static_cast<const scalar_t*>(r.logits) + i * r.row_stride;
      const RowStats<acc_t> st = row_stats<scalar_t, acc_t, kCap, kSmooth>(x, t, k, buf.data());
      const cm::RowTerms<acc_t> terms = cm::row_terms(k.w(t), k.smoothing, r.classes, k.weight_sum);
      loss[i] = cm::row_loss(terms, st.lse, st.z_target, st.ref, k.weight_sum, st.lin);
      lse[i] = st.lse;
    }
  });
}

template <typename scalar_t, typename acc_t, bool kCap, int kSmooth>
void backward_impl(const CrossEntropyBackwardArgs& a) {
  const CrossEntropyRows& r = a.r;
  const Consts<acc_t> k(r);
  const auto* lse = static_cast<const acc_t*>(a.lse);
  auto* grad = static_cast<scalar_t*>(a.grad);
  const bool stream = r.rows * r.classes * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamingStoreMinBytes &&
                      can_stream<acc_t>(grad, a.grad_row_stride);
  at::parallel_for(0, r.rows, row_grain(r.classes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = row_target(r, i);
      const scalar_t* x = static_cast<const scalar_t*>(r.logits) + i * r.row_stride;
      scalar_t* g = grad + i * a.grad_row_stride;
      const acc_t scale = t < 0 ? acc_t(0) : row_scale<acc_t>(a.scale, a.scale_dtype, a.per_row_scale, a.divisor, i);
      const acc_t z_t = t < 0 ? acc_t(0) : logit_at<kCap>(x, t, k);
      row_grad<scalar_t, acc_t, kCap, kSmooth>(x, g, t, t < 0 ? acc_t(0) : lse[i], z_t, scale, k, stream);
    }
    if (stream) stream_fence();
  });
}

template <typename scalar_t, typename acc_t, bool kCap, int kSmooth>
void loss_grad_impl(const CrossEntropyLossGradArgs& a) {
  const CrossEntropyRows& r = a.r;
  const Consts<acc_t> k(r);
  auto* loss = static_cast<acc_t*>(a.loss);
  at::parallel_for(0, r.rows, row_grain(r.classes), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kCap ? kTile : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = row_target(r, i);
      // const_cast: this kernel's logits are its gradient's buffer.
      scalar_t* x = const_cast<scalar_t*>(static_cast<const scalar_t*>(r.logits)) + i * r.row_stride;
      if (t < 0) {
        loss[i] = 0;
        row_grad<scalar_t, acc_t, kCap, kSmooth>(x, x, t, 0, 0, 0, k, false);
        continue;
      }
      const RowStats<acc_t> st = row_stats<scalar_t, acc_t, kCap, kSmooth>(x, t, k, buf.data());
      const cm::RowTerms<acc_t> terms = cm::row_terms(k.w(t), k.smoothing, r.classes, k.weight_sum);
      loss[i] = cm::row_loss(terms, st.lse, st.z_target, st.ref, k.weight_sum, st.lin);
      const acc_t scale = row_scale<acc_t>(a.scale, a.scale_dtype, a.per_row_scale, a.divisor, i);
      row_grad<scalar_t, acc_t, kCap, kSmooth>(x, x, t, st.lse, st.z_target, scale, k, false);
    }
  });
}

template <typename S, typename A, bool C, int M>
struct ForwardKernel {
  static void run(const CrossEntropyForwardArgs& a) { forward_impl<S, A, C, M>(a); }
};
template <typename S, typename A, bool C, int M>
struct BackwardKernel {
  static void run(const CrossEntropyBackwardArgs& a) { backward_impl<S, A, C, M>(a); }
};
template <typename S, typename A, bool C, int M>
struct LossGradKernel {
  static void run(const CrossEntropyLossGradArgs& a) { loss_grad_impl<S, A, C, M>(a); }
};

template <template <typename, typename, bool, int> class K, typename S, typename A, bool C, typename Args>
void run_smooth(const Args& a, int smooth) {
  switch (smooth) {
    case kNoSmooth: K<S, A, C, kNoSmooth>::run(a); break;
    case kUniformSmooth: K<S, A, C, kUniformSmooth>::run(a); break;
    default: K<S, A, C, kWeightedSmooth>::run(a); break;
  }
}

// Runs K<scalar_t, acc_t, softcap?, smoothing kind>::run(a) for the call's dtype and options.
template <template <typename, typename, bool, int> class K, typename Args>
void dispatch_rows(const Args& a) {
  const CrossEntropyRows& r = a.r;
  const int smooth = r.label_smoothing == 0.0 ? kNoSmooth : (r.weight != nullptr ? kWeightedSmooth : kUniformSmooth);
  torch_wsl::visit_float_dtype(r.dtype, "cross_entropy CPU kernel", [&](auto tag) {
    using S = decltype(tag);
    using A = torch_wsl::acc_type_t<S>;
    if (r.softcap > 0) {
      run_smooth<K, S, A, true>(a, smooth);
    } else {
      run_smooth<K, S, A, false>(a, smooth);
    }
  });
}

void forward(const CrossEntropyForwardArgs& a) { dispatch_rows<ForwardKernel>(a); }
void backward(const CrossEntropyBackwardArgs& a) { dispatch_rows<BackwardKernel>(a); }
void loss_grad(const CrossEntropyLossGradArgs& a) { dispatch_rows<LossGradKernel>(a); }

// ---------------------------------------------------------------- split float32 sums

inline float split_load(const uint16_t* hi, const uint16_t* lo, int64_t j) {
  const uint32_t u = (static_cast<uint32_t>(hi[j]) << 16) | lo[j];
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline void split_store(uint16_t* hi, uint16_t* lo, int64_t j, float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  hi[j] = static_cast<uint16_t>(u >> 16);
  lo[j] = static_cast<uint16_t>(u & 0xffffu);
}

#if TWSL_CPU_ISA_LEVEL >= 2
constexpr int64_t kSplitLanes = 16;
inline __m512 split_load_vec(const uint16_t* hi, const uint16_t* lo) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)));
  const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_slli_epi32(h, 16), l));
}
inline void split_store_vec(uint16_t* hi, uint16_t* lo, __m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), _mm512_cvtepi32_epi16(u));  // truncation keeps the low half
}
#elif TWSL_CPU_ISA_LEVEL >= 1
constexpr int64_t kSplitLanes = 8;
inline __m256 split_load_vec(const uint16_t* hi, const uint16_t* lo) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)));
  const __m256i l = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo)));
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_slli_epi32(h, 16), l));
}
inline void split_store_vec(uint16_t* hi, uint16_t* lo, __m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i h = _mm256_srli_epi32(u, 16);
  const __m256i l = _mm256_and_si256(u, _mm256_set1_epi32(0xffff));
  // packus works within 128-bit lanes: reorder the 64-bit quarters afterwards.
  const __m256i hp = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
  const __m256i lp = _mm256_permute4x64_epi64(_mm256_packus_epi32(l, l), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm256_castsi256_si128(hp));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm256_castsi256_si128(lp));
}
#else
constexpr int64_t kSplitLanes = 1;
#endif

template <typename add_t>
void split_accumulate_rows(const SplitAccumulateArgs& a) {
  at::parallel_for(0, a.rows, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(a.cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       uint16_t* hi = a.hi + r * a.ld;
                       uint16_t* lo = a.lo + r * a.ld;
                       const add_t* add = static_cast<const add_t*>(a.add) + r * a.add_ld;
                       int64_t j = 0;
#if TWSL_CPU_ISA_LEVEL >= 1
                       for (; j + kSplitLanes <= a.cols; j += kSplitLanes) {
                         const VecF v = VecF::load(add + j);
                         const VecF sum = a.zero_first ? v : VecF{split_load_vec(hi + j, lo + j)} + v;
                         split_store_vec(hi + j, lo + j, sum.v);
                       }
#endif
                       for (; j < a.cols; ++j) {
                         const float v = static_cast<float>(add[j]);
                         split_store(hi, lo, j, a.zero_first ? v : split_load(hi, lo, j) + v);
                       }
                     }
                   });
}

void split_accumulate(const SplitAccumulateArgs& a) {
  switch (a.add_dtype) {
    case c10::ScalarType::BFloat16: split_accumulate_rows<c10::BFloat16>(a); break;
    case c10::ScalarType::Half: split_accumulate_rows<c10::Half>(a); break;
    default: split_accumulate_rows<float>(a); break;
  }
}

template <typename out_t>
void split_finish_as(const SplitFinishArgs& a) {
  // In place: element j of the result overwrites hi[j], after hi[j] was read.
  out_t* out = reinterpret_cast<out_t*>(a.hi);
  at::parallel_for(0, a.n, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
#if TWSL_CPU_ISA_LEVEL >= 1
    for (; j + kSplitLanes <= end; j += kSplitLanes) VecF{split_load_vec(a.hi + j, a.lo + j)}.store(out + j);
#endif
    for (; j < end; ++j) out[j] = static_cast<out_t>(split_load(a.hi, a.lo, j));
  });
}

void split_finish(const SplitFinishArgs& a) {
  if (a.out_dtype == c10::ScalarType::Half) {
    split_finish_as<c10::Half>(a);
  } else {
    split_finish_as<c10::BFloat16>(a);
  }
}

}  // namespace

const CrossEntropyKernels cross_entropy_kernels = {&forward, &backward, &loss_grad, &split_accumulate, &split_finish};

}  // namespace torch_wsl::cpu::TWSL_CPU_ISA_NS
