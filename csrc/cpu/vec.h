// A small SIMD vocabulary for the CPU kernels: a vector of fp32 lanes whose
// width is the ISA's (TWSL_CPU_ISA_LEVEL: 0 one lane, 1 AVX2 eight, 2 AVX-512
// sixteen), loads that convert from the storage dtype and stores that convert
// back. Kernels are written once against it; `Scalar<acc_t>` serves as the
// one-lane type for tails and for double.
// Included inside an ISA region (see isa_prelude.h); no includes here.
// Operators are members, not hidden friends: GCC does not give in-class
// friend definitions the region's target ISA.
//
// Rounding is round-to-nearest-even and NaN stays NaN, as c10's conversions,
// so vector bodies and scalar tails agree bit for bit.

// One lane of the accumulation type (float or double).
template <typename acc_t>
struct Scalar {
  static constexpr int kLanes = 1;
  acc_t v;
  static Scalar zero() { return {acc_t(0)}; }
  static Scalar broadcast(acc_t x) { return {x}; }
  template <typename T>
  static Scalar load(const T* p) { return {static_cast<acc_t>(*p)}; }
  template <typename T>
  void store(T* p) const { *p = static_cast<T>(v); }
  template <typename T>
  void store_stream(T* p) const { store(p); }
  // The value rounded to T and back: what storing to T and reloading gives.
  template <typename T>
  Scalar rounded() const { return {static_cast<acc_t>(static_cast<T>(v))}; }
  Scalar operator+(Scalar b) const { return {v + b.v}; }
  Scalar operator-(Scalar b) const { return {v - b.v}; }
  Scalar operator*(Scalar b) const { return {v * b.v}; }
  Scalar operator/(Scalar b) const { return {v / b.v}; }
  // The product rounded on its own (the register barrier keeps the compiler
  // from contracting it with a following add).
  Scalar mul_rn(Scalar b) const {
    acc_t r = v * b.v;
#if TWSL_X86
    asm("" : "+x"(r));
#endif
    return {r};
  }
  Scalar neg() const { return {-v}; }
  Scalar sqrt() const { return {std::sqrt(v)}; }
  Scalar abs() const { return {std::fabs(v)}; }
  // NaN from either side propagates, as torch.maximum.
  Scalar maximum(Scalar b) const { return {v != v ? v : (b.v != b.v ? b.v : (v > b.v ? v : b.v))}; }
  Scalar minimum(Scalar b) const { return {v != v ? v : (b.v != b.v ? b.v : (v < b.v ? v : b.v))}; }
  // a * b + c, rounded once.
  static Scalar fmadd(Scalar a, Scalar b, Scalar c) { return {std::fma(a.v, b.v, c.v)}; }
  acc_t sum() const { return v; }
};

#if TWSL_CPU_ISA_LEVEL >= 2
struct VecF {
  static constexpr int kLanes = 16;
  // The zero-masked forms of the AVX-512 intrinsics with this mask are the
  // plain instructions; the unmasked forms start from _mm512_undefined_ps,
  // which GCC 12 reports as used uninitialized (-Wuninitialized) wherever they
  // end up in a function that is not inlined.
  static constexpr __mmask16 kAllLanes = 0xffff;
  __m512 v;
  static VecF zero() { return {_mm512_setzero_ps()}; }
  static VecF broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecF load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  static VecF load(const c10::Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  // bf16 bits (round to nearest even, NaN kept) in the low half of each lane.
  __m512i bf16_bits() const {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
  }
  void store(c10::BFloat16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits()));
  }
  template <typename T>
  VecF rounded() const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return {_mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(), 16))};
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      return {_mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))};
    } else {
      return *this;
    }
  }
  void store(c10::Half* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Non-temporal stores (bypass the caches, no read-for-ownership); p must be
  // aligned to the stored width, see can_stream().
  void store_stream(float* p) const { _mm512_stream_ps(p, v); }
  void store_stream(c10::BFloat16* p) const { stream_half_width(p); }
  void store_stream(c10::Half* p) const { stream_half_width(p); }
  template <typename T>
  void stream_half_width(T* p) const {
    alignas(32) T tmp[16];
    store(tmp);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp)));
  }
  VecF operator+(VecF b) const { return {_mm512_add_ps(v, b.v)}; }
  VecF operator-(VecF b) const { return {_mm512_sub_ps(v, b.v)}; }
  VecF operator*(VecF b) const { return {_mm512_mul_ps(v, b.v)}; }
  VecF operator/(VecF b) const { return {_mm512_div_ps(v, b.v)}; }
  VecF mul_rn(VecF b) const {
    __m512 r = _mm512_mul_ps(v, b.v);
    asm("" : "+v"(r));
    return {r};
  }
  VecF neg() const { return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)))}; }
  VecF sqrt() const { return {_mm512_sqrt_ps(v)}; }
  VecF abs() const { return {_mm512_abs_ps(v)}; }
  // NaN from either side propagates (vmaxps alone returns its second operand).
  VecF maximum(VecF b) const {
    const __mmask16 nan = _mm512_cmp_ps_mask(v, b.v, _CMP_UNORD_Q);
    return {_mm512_mask_blend_ps(nan, _mm512_max_ps(v, b.v), _mm512_add_ps(v, b.v))};
  }
  VecF minimum(VecF b) const {
    const __mmask16 nan = _mm512_cmp_ps_mask(v, b.v, _CMP_UNORD_Q);
    return {_mm512_mask_blend_ps(nan, _mm512_maskz_min_ps(kAllLanes, v, b.v), _mm512_add_ps(v, b.v))};
  }
  static VecF fmadd(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  float sum() const { return _mm512_reduce_add_ps(v); }
};
#elif TWSL_CPU_ISA_LEVEL >= 1
struct VecF {
  static constexpr int kLanes = 8;
  __m256 v;
  static VecF zero() { return {_mm256_setzero_ps()}; }
  static VecF broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecF load(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  static VecF load(const c10::Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  // bf16 bits (round to nearest even, NaN kept) in the low half of each lane.
  __m256i bf16_bits() const {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  }
  void store(c10::BFloat16* p) const {
    const __m256i r = bf16_bits();
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  template <typename T>
  VecF rounded() const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return {_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(), 16))};
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      return {_mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))};
    } else {
      return *this;
    }
  }
  void store(c10::Half* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store_stream(float* p) const { _mm256_stream_ps(p, v); }
  void store_stream(c10::BFloat16* p) const { stream_half_width(p); }
  void store_stream(c10::Half* p) const { stream_half_width(p); }
  template <typename T>
  void stream_half_width(T* p) const {
    alignas(16) T tmp[8];
    store(tmp);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
  VecF operator+(VecF b) const { return {_mm256_add_ps(v, b.v)}; }
  VecF operator-(VecF b) const { return {_mm256_sub_ps(v, b.v)}; }
  VecF operator*(VecF b) const { return {_mm256_mul_ps(v, b.v)}; }
  VecF operator/(VecF b) const { return {_mm256_div_ps(v, b.v)}; }
  VecF mul_rn(VecF b) const {
    __m256 r = _mm256_mul_ps(v, b.v);
    asm("" : "+x"(r));
    return {r};
  }
  VecF neg() const { return {_mm256_xor_ps(v, _mm256_set1_ps(-0.0f))}; }
  VecF sqrt() const { return {_mm256_sqrt_ps(v)}; }
  VecF abs() const { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)}; }
  // NaN from either side propagates (vmaxps alone returns its second operand).
  VecF maximum(VecF b) const {
    const __m256 nan = _mm256_cmp_ps(v, b.v, _CMP_UNORD_Q);
    return {_mm256_blendv_ps(_mm256_max_ps(v, b.v), _mm256_add_ps(v, b.v), nan)};
  }
  VecF minimum(VecF b) const {
    const __m256 nan = _mm256_cmp_ps(v, b.v, _CMP_UNORD_Q);
    return {_mm256_blendv_ps(_mm256_min_ps(v, b.v), _mm256_add_ps(v, b.v), nan)};
  }
  static VecF fmadd(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  float sum() const {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
};
#else
using VecF = Scalar<float>;
#endif

// ---------------------------------------------------------------- elementwise math
// Free functions (not members: generic code calls them unqualified, see
// math_fns.h, which gives float and double the same names, so argument-
// dependent lookup finds these for VecF and Scalar). Each works lane by lane
// on VecF and on Scalar<acc_t>:
//
//   exp, log, tanh, erf, sigmoid   transcendental functions
//   max, min                       NaN from either side propagates (torch.maximum/minimum)
//   abs
//   lt, le, gt, ge, eq             ordered comparisons (false where a lane is NaN); MaskF for
//                                  VecF, bool for Scalar; masks combine with &, | and !
//   select(mask, a, b)             a where the mask is set, else b
//
// Scalar<acc_t> (the tails, double, and VecF itself on the portable build)
// forwards to std::. VecF at AVX2 and AVX-512 has its own range-reduced
// polynomial versions below. Their error in float lanes, in ulps of the exact
// result, measured over every float where the result is not a constant
// (tests/cpp/test_vec_math.cpp, TWSL_VEC_MATH_EXHAUSTIVE=1), relative
// everywhere, near 0 and for subnormal results too:
//   exp     < 1 ulp (max 0.83): faithfully rounded. Overflow gives inf;
//           underflow is gradual (subnormal results rounded once, not
//           flushed); exp(-inf) = 0, exp(+inf) = inf
//   log     < 1 ulp (max 0.76); log(+-0) = -inf, log(x < 0) = NaN,
//           log(inf) = inf; subnormal inputs are handled
//   tanh    < 1 ulp (max 0.98); odd bit for bit, tanh(+-0) = +-0, saturates to +-1
//   erf     < 1.5 ulp (max 1.04); odd bit for bit, erf(+-0) = +-0, saturates to +-1
//   sigmoid < 2.5 ulp (max 2.40); 1 / (1 + exp(-x)) written so that nothing
//           overflows: -> 0 (through the subnormals) for x -> -inf, -> 1 for x -> +inf
// and NaN in gives NaN out for all. AVX2 and AVX-512 give the same bits. A
// vector body and a scalar tail (glibc: exp, log within 1 ulp, tanh, erf and
// sigmoid within 2.5) may differ in the last bit or two of these five
// functions; everything else in this file agrees bit for bit.
//
// They are `inline`, not always_inline: the shared formulas that call them are
// compiled without the ISA's target (their templates are defined outside the
// region), and GCC refuses to force a target function into such a caller. The
// formulas are always_inline (TWSL_HOST_DEVICE), so once inlined into the ISA
// code these calls are ordinary same-target calls, inlined or not.

template <typename acc_t>
inline Scalar<acc_t> exp(Scalar<acc_t> x) { return {std::exp(x.v)}; }
template <typename acc_t>
inline Scalar<acc_t> log(Scalar<acc_t> x) { return {std::log(x.v)}; }
template <typename acc_t>
inline Scalar<acc_t> tanh(Scalar<acc_t> x) { return {std::tanh(x.v)}; }
template <typename acc_t>
inline Scalar<acc_t> erf(Scalar<acc_t> x) { return {std::erf(x.v)}; }
// exp of -|x| only, so nothing overflows; e / (1 + e) for x < 0.
template <typename acc_t>
inline Scalar<acc_t> sigmoid(Scalar<acc_t> x) {
  const acc_t e = std::exp(-std::fabs(x.v));
  return {(x.v >= acc_t(0) ? acc_t(1) : e) / (acc_t(1) + e)};
}
template <typename acc_t>
inline Scalar<acc_t> max(Scalar<acc_t> a, Scalar<acc_t> b) { return a.maximum(b); }
template <typename acc_t>
inline Scalar<acc_t> min(Scalar<acc_t> a, Scalar<acc_t> b) { return a.minimum(b); }
template <typename acc_t>
inline Scalar<acc_t> abs(Scalar<acc_t> x) { return x.abs(); }
template <typename acc_t>
inline bool lt(Scalar<acc_t> a, Scalar<acc_t> b) { return a.v < b.v; }
template <typename acc_t>
inline bool le(Scalar<acc_t> a, Scalar<acc_t> b) { return a.v <= b.v; }
template <typename acc_t>
inline bool gt(Scalar<acc_t> a, Scalar<acc_t> b) { return a.v > b.v; }
template <typename acc_t>
inline bool ge(Scalar<acc_t> a, Scalar<acc_t> b) { return a.v >= b.v; }
template <typename acc_t>
inline bool eq(Scalar<acc_t> a, Scalar<acc_t> b) { return a.v == b.v; }
template <typename acc_t>
inline Scalar<acc_t> select(bool mask, Scalar<acc_t> a, Scalar<acc_t> b) { return mask ? a : b; }

#if TWSL_CPU_ISA_LEVEL >= 2
// The lanes of VecF where a comparison held.
struct MaskF {
  __mmask16 m;
  MaskF operator&(MaskF b) const { return {static_cast<__mmask16>(m & b.m)}; }
  MaskF operator|(MaskF b) const { return {static_cast<__mmask16>(m | b.m)}; }
  MaskF operator!() const { return {static_cast<__mmask16>(~m)}; }
  bool any() const { return m != 0; }
  bool all() const { return m == 0xffff; }
};
inline MaskF lt(VecF a, VecF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline MaskF le(VecF a, VecF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ)}; }
inline MaskF gt(VecF a, VecF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
inline MaskF ge(VecF a, VecF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ)}; }
inline MaskF eq(VecF a, VecF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
inline VecF select(MaskF mask, VecF a, VecF b) { return {_mm512_mask_blend_ps(mask.m, b.v, a.v)}; }

namespace vec_math_detail {
inline MaskF is_nan(VecF x) { return {_mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q)}; }
// min(x, hi) and max(x, lo) that keep a NaN x (vminps/vmaxps return their
// second operand when either is NaN).
inline VecF min_keep_nan(VecF x, VecF hi) { return {_mm512_maskz_min_ps(VecF::kAllLanes, hi.v, x.v)}; }
inline VecF max_keep_nan(VecF x, VecF lo) { return {_mm512_maskz_max_ps(VecF::kAllLanes, lo.v, x.v)}; }
inline VecF round_nearest(VecF x) {
  return {_mm512_maskz_roundscale_ps(VecF::kAllLanes, x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// p * 2^n for integral n in [-252, 254], rounded once (inf on overflow,
// subnormal or 0 on underflow).
inline VecF scale_pow2(VecF p, VecF n) { return {_mm512_maskz_scalef_ps(VecF::kAllLanes, p.v, n.v)}; }
// The magnitude of `mag` with the sign of `sgn`.
inline VecF copysign(VecF mag, VecF sgn) {
  // Bitwise select: bits of sgn where the constant is set (the sign), else of mag.
  return {_mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_set1_epi32(INT32_MIN), _mm512_castps_si512(sgn.v),
                                                        _mm512_castps_si512(mag.v), 0xca))};
}
// x = m * 2^e with m in [sqrt(1/2), sqrt(2)) (float bounds), for finite x > 0, subnormals included.
inline void split_exponent(VecF x, VecF& m, VecF& e) {
  const __m512 mant = _mm512_maskz_getmant_ps(VecF::kAllLanes, x.v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);  // [1, 2)
  const __m512 expo = _mm512_maskz_getexp_ps(VecF::kAllLanes, x.v);  // floor(log2 x)
  const __mmask16 high = _mm512_cmp_ps_mask(mant, _mm512_set1_ps(1.41421354f), _CMP_GE_OQ);
  m = {_mm512_mask_mul_ps(mant, high, mant, _mm512_set1_ps(0.5f))};
  e = {_mm512_mask_add_ps(expo, high, expo, _mm512_set1_ps(1.0f))};
}
}  // namespace vec_math_detail
#elif TWSL_CPU_ISA_LEVEL >= 1
// The lanes of VecF where a comparison held (all bits set there).
struct MaskF {
  __m256 m;
  MaskF operator&(MaskF b) const { return {_mm256_and_ps(m, b.m)}; }
  MaskF operator|(MaskF b) const { return {_mm256_or_ps(m, b.m)}; }
  MaskF operator!() const { return {_mm256_xor_ps(m, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))}; }
  bool any() const { return _mm256_movemask_ps(m) != 0; }
  bool all() const { return _mm256_movemask_ps(m) == 0xff; }
};
inline MaskF lt(VecF a, VecF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline MaskF le(VecF a, VecF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
inline MaskF gt(VecF a, VecF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline MaskF ge(VecF a, VecF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
inline MaskF eq(VecF a, VecF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
inline VecF select(MaskF mask, VecF a, VecF b) { return {_mm256_blendv_ps(b.v, a.v, mask.m)}; }

namespace vec_math_detail {
inline MaskF is_nan(VecF x) { return {_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q)}; }
inline VecF min_keep_nan(VecF x, VecF hi) { return {_mm256_min_ps(hi.v, x.v)}; }
inline VecF max_keep_nan(VecF x, VecF lo) { return {_mm256_max_ps(lo.v, x.v)}; }
inline VecF round_nearest(VecF x) { return {_mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// p * 2^n for integral n in [-252, 254]: two factors 2^(n/2) and 2^(n - n/2),
// each a normal float; p * the first is exact, so the result is rounded once.
inline VecF scale_pow2(VecF p, VecF n) {
  const __m256i ni = _mm256_cvtps_epi32(n.v);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return {_mm256_mul_ps(_mm256_mul_ps(p.v, s1), s2)};
}
inline VecF copysign(VecF mag, VecF sgn) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_or_ps(_mm256_andnot_ps(sign, mag.v), _mm256_and_ps(sign, sgn.v))};
}
// x = m * 2^e with m in [sqrt(1/2), sqrt(2)) (float bounds), for finite x > 0, subnormals
// included (scaled by 2^23 first): subtracting the bits of sqrt(1/2) moves the exponent
// boundary there.
inline void split_exponent(VecF x, VecF& m, VecF& e) {
  const __m256 sub = _mm256_cmp_ps(x.v, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);  // below FLT_MIN
  const __m256 xs = _mm256_blendv_ps(x.v, _mm256_mul_ps(x.v, _mm256_set1_ps(8388608.0f)), sub);  // * 2^23
  const __m256i k = _mm256_set1_epi32(0x3f3504f3);                                           // sqrt(1/2)
  const __m256i ix = _mm256_sub_epi32(_mm256_castps_si256(xs), k);
  m = {_mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(ix, _mm256_set1_epi32(0x007fffff)), k))};
  e = {_mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(ix, 23)), _mm256_and_ps(sub, _mm256_set1_ps(-23.0f)))};
}
}  // namespace vec_math_detail
#endif

#if TWSL_CPU_ISA_LEVEL >= 1
inline VecF max(VecF a, VecF b) { return a.maximum(b); }
inline VecF min(VecF a, VecF b) { return a.minimum(b); }
inline VecF abs(VecF x) { return x.abs(); }

namespace vec_math_detail {
inline VecF splat(float c) { return VecF::broadcast(c); }
// c0 + x * (c1 + x * (c2 + ...)), by Horner's rule with FMAs.
inline VecF poly(VecF, float c0) { return splat(c0); }
template <typename... Rest>
inline VecF poly(VecF x, float c0, Rest... rest) {
  return VecF::fmadd(poly(x, rest...), x, splat(c0));
}
constexpr float kLn2Hi = 0.693147182f;     // ln 2 rounded to float
constexpr float kLn2Lo = -1.90465421e-9f;  // ln 2 - kLn2Hi
}  // namespace vec_math_detail

// exp(x) = 2^n e^(r + c), n = round(x / ln 2), r = x - n kLn2Hi (exact with
// FMA), c = -n kLn2Lo the rest of the reduced argument (|r + c| <= ln(2) / 2,
// |c| < 3e-7), kept apart: folding it into r would round r, an error of up to
// a quarter ulp. e^r = 1 + r + r^2 q(r), q a degree-4 minimax fit (relative
// error 3e-9), and e^c = 1 + c to 5e-14. Inputs are clamped to [-104, 89],
// beyond which the float result is 0 or inf anyway.
inline VecF exp(VecF x) {
  using namespace vec_math_detail;
  x = min_keep_nan(max_keep_nan(x, splat(-104.0f)), splat(89.0f));
  const VecF n = round_nearest(x * splat(1.44269502f));
  const VecF r = VecF::fmadd(n, splat(-kLn2Hi), x);
  const VecF c = n * splat(-kLn2Lo);
  const VecF q = poly(r, 0.49999994f, 0.16666521f, 0.041668262f, 0.008368675f, 0.0013821055f);
  // e^(r + c) - 1 - r = r^2 q (1 + c) + c (1 + r), rounded once in r + t and once in + 1.
  const VecF t = VecF::fmadd(r * r, VecF::fmadd(q, c, q), VecF::fmadd(c, r, c));
  return scale_pow2((r + t) + splat(1.0f), n);
}

// log(x) = e ln 2 + log(m), x = m 2^e, m in [sqrt(1/2), sqrt(2)]. With
// f = m - 1 (exact) and s = f / (2 + f): log(m) = 2 atanh(s) = 2s + s R(s^2)
// = f - (f^2/2 - s (f^2/2 + R)), which keeps the exact f as the leading term;
// R is a degree-3 minimax fit (relative error of log(m) 1e-9).
inline VecF log(VecF x) {
  using namespace vec_math_detail;
  VecF m, e;
  split_exponent(x, m, e);
  const VecF f = m - splat(1.0f);
  const VecF hfsq = splat(0.5f) * f * f;
  const VecF s = f / (f + splat(2.0f));
  const VecF z = s * s;
  const VecF big_r = z * poly(z, 0.66666776f, 0.39977568f, 0.2987146f);
  const VecF t = VecF::fmadd(s, hfsq + big_r, e * splat(kLn2Lo));
  VecF y = VecF::fmadd(e, splat(kLn2Hi), f - (hfsq - t));
  y = select(eq(x, VecF::zero()), splat(-__builtin_inff()), y);
  y = select(eq(x, splat(__builtin_inff())), x, y);
  return select(lt(x, VecF::zero()) | is_nan(x), splat(__builtin_nanf("")), y);
}

// |x| < 0.9: |x| + |x|^3 P(x^2), P a degree-6 minimax fit (relative error
// 1e-9); beyond: 1 - 2 / (exp(2|x|) + 1) (from 0.9 on, the cancellation costs
// under half an ulp; exp(2|x|) = inf gives 1); then the sign of x, so the
// function is exactly odd and keeps -0.
inline VecF tanh(VecF x) {
  using namespace vec_math_detail;
  const VecF ax = x.abs();
  const VecF z = ax * ax;
  const VecF p = poly(z, -0.33333322f, 0.13332981f, -0.053929474f, 0.021664092f, -0.008265455f, 0.002583426f,
                      -0.00045571016f);
  const VecF near0 = VecF::fmadd(ax * z, p, ax);
  const VecF one = splat(1.0f);
  const VecF far = one - splat(2.0f) / (exp(ax + ax) + one);
  return copysign(select(lt(ax, splat(0.9f)), near0, far), x);
}

// |x| < 1: |x| + |x| P(x^2), P a degree-6 minimax fit (relative error
// 1.5e-9); beyond: 1 - exp(Q(|x| - 1)), Q a degree-6 fit of log(erfc) on
// [1, 4] weighted by erfc / erf (it errs in erf by 1e-8, a sixth of an ulp).
// erf(4) rounds to 1 in float, so |x| is clamped there. Then the sign of x.
inline VecF erf(VecF x) {
  using namespace vec_math_detail;
  const VecF ax = x.abs();
  const VecF z = ax * ax;
  const VecF p = poly(z, 0.12837917f, -0.37612626f, 0.11283579f, -0.026853347f, 0.005187162f, -0.0007997853f,
                      7.806904e-05f);
  const VecF near0 = VecF::fmadd(ax, p, ax);
  const VecF u = min_keep_nan(ax, splat(4.0f)) - splat(1.0f);
  const VecF q = poly(u, -1.8496056f, -2.6389627f, -0.8431726f, -0.041260745f, 0.009450703f, -0.001481313f,
                      9.092966e-05f);
  const VecF far = splat(1.0f) - exp(q);
  return copysign(select(lt(ax, splat(1.0f)), near0, far), x);
}

// 1 / (1 + exp(-x)) for x >= 0 and exp(x) / (1 + exp(x)) for x < 0: only
// exp(-|x|) is formed, which never overflows.
inline VecF sigmoid(VecF x) {
  using namespace vec_math_detail;
  const VecF e = exp(x.abs().neg());
  const VecF one = splat(1.0f);
  return select(ge(x, VecF::zero()), one, e) / (one + e);
}
#else
using MaskF = bool;
#endif

// The widest vector for an accumulation type (double stays scalar: it is
// there for gradcheck, not speed).
template <typename acc_t>
using VecOf = std::conditional_t<std::is_same_v<acc_t, float>, VecF, Scalar<acc_t>>;

// Runs body(V{}, i) over [0, n) in vector steps, then body(Scalar{}, i) over
// the tail. The body is a generic lambda, so each loop is written once.
template <typename acc_t, typename Body>
inline void for_each_lane(int64_t n, Body&& body) {
  using V = VecOf<acc_t>;
  int64_t i = 0;
  for (; i + V::kLanes <= n; i += V::kLanes) body(V{}, i);
  for (; i < n; ++i) body(Scalar<acc_t>{}, i);
}

// Sums body(V{}, i) (a vector) over [0, n) with four independent accumulators,
// so the adds do not wait on each other; returns the scalar total.
template <typename acc_t, typename Body>
inline acc_t sum_lanes(int64_t n, Body&& body) {
  using V = VecOf<acc_t>;
  constexpr int64_t L = V::kLanes;
  V a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    a0 = a0 + body(V{}, i);
    a1 = a1 + body(V{}, i + L);
    a2 = a2 + body(V{}, i + 2 * L);
    a3 = a3 + body(V{}, i + 3 * L);
  }
  for (; i + L <= n; i += L) a0 = a0 + body(V{}, i);
  acc_t total = ((a0 + a1) + (a2 + a3)).sum();
  for (; i < n; ++i) total += body(Scalar<acc_t>{}, i).sum();
  return total;
}

// Whether full vectors of T can be stored non-temporally at every row start:
// the base pointer and the row pitch keep the vector alignment.
template <typename acc_t, typename T>
inline bool can_stream(const T* base, int64_t cols) {
  using V = VecOf<acc_t>;
  if constexpr (V::kLanes == 1) {
    return false;
  } else {
    constexpr int64_t align = V::kLanes * sizeof(T);
    return reinterpret_cast<uintptr_t>(base) % align == 0 && (cols * static_cast<int64_t>(sizeof(T))) % align == 0;
  }
}

// Orders this thread's non-temporal stores before what follows (they are
// weakly ordered); called at the end of each parallel chunk that streamed.
inline void stream_fence() {
#if TWSL_CPU_ISA_LEVEL >= 1
  _mm_sfence();
#endif
}
