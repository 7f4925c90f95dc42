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
  // a * b + c, rounded once.
  static Scalar fmadd(Scalar a, Scalar b, Scalar c) { return {std::fma(a.v, b.v, c.v)}; }
  acc_t sum() const { return v; }
};

#if TWSL_CPU_ISA_LEVEL >= 2
struct VecF {
  static constexpr int kLanes = 16;
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
