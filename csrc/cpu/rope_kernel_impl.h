// Rotary position embedding CPU kernels, compiled once per ISA from
// cpu/isa_unit.cpp.in inside the region opened by cpu/isa_begin.h. No
// includes here (see isa_prelude.h). The arithmetic is rope_math.h's, shared
// with CUDA; here it runs on vectors of fp32 lanes (vec.h).
//
// One parallel pass over the rows of q and then k (one "launch"): each row is
// read once and written once, its table rows come from cache (they are shared
// by every head), and rows run in the output's memory order (the operator
// layer sorted and merged the dimensions), so reads and writes stream.
// Rotate-half pairs element i with i + rotary_dim / 2: two vectors, one from
// each half, combine lane by lane. Interleaved pairs are neighbours in one
// vector: a swap of adjacent lanes and a sign flip form the partner term.

namespace torch_wsl::cpu::TWSL_CPU_ISA_NS {
namespace {

#include "cpu/vec.h"

namespace rm = torch_wsl::rope_math;

// Outputs at least this large are written with non-temporal stores: they
// cannot stay in the last-level cache for the next operator anyway, and
// streaming them skips the read-for-ownership that costs a third of the
// traffic of this read-once, write-once kernel.
constexpr int64_t kStreamingStoreMinBytes = int64_t{16} << 20;

#if TWSL_CPU_ISA_LEVEL >= 2
// [x1, x0, x3, x2, ...]
inline VecF swap_pairs(VecF v) { return {_mm512_permute_ps(v.v, 0xB1)}; }
// Sign of the even (a) or odd (b) lanes flipped.
inline VecF flip_even(VecF v) {
  return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v.v), _mm512_set1_epi64(0x80000000LL)))};
}
inline VecF flip_odd(VecF v) {
  return {_mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(v.v), _mm512_set1_epi64(static_cast<long long>(0x8000000000000000ULL))))};
}
#elif TWSL_CPU_ISA_LEVEL >= 1
inline VecF swap_pairs(VecF v) { return {_mm256_permute_ps(v.v, 0xB1)}; }
inline VecF flip_even(VecF v) { return {_mm256_xor_ps(v.v, _mm256_castsi256_ps(_mm256_set1_epi64x(0x80000000LL)))}; }
inline VecF flip_odd(VecF v) {
  return {_mm256_xor_ps(v.v,
                        _mm256_castsi256_ps(_mm256_set1_epi64x(static_cast<long long>(0x8000000000000000ULL))))};
}
#endif

template <bool kStream, typename V, typename T>
inline void put(const V& v, T* p) {
  if constexpr (kStream) {
    v.store_stream(p);
  } else {
    v.store(p);
  }
}

#if TWSL_CPU_ISA_LEVEL >= 1
// One non-temporal store of kBytes (16, 32, or 64 with AVX-512) from s to d, aligned to kBytes.
template <int64_t kBytes>
inline void stream_chunk(const char* s, char* d) {
#if TWSL_CPU_ISA_LEVEL >= 2
  if constexpr (kBytes == 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
  }
#endif
  if constexpr (kBytes == 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  } else if constexpr (kBytes == 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
}
#endif

// Copies n elements bit for bit (NaN payloads too, as torch.cat does). When
// kStream, dst is aligned to a vector store of T (can_stream_rows) and whole
// vectors go out non-temporally; the tail with ordinary stores.
template <bool kStream, typename T>
inline void copy_row_tail(const T* src, T* dst, int64_t n) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const char* s = reinterpret_cast<const char*>(src);
  char* d = reinterpret_cast<char*>(dst);
  int64_t i = 0;
#if TWSL_CPU_ISA_LEVEL >= 1
  constexpr int64_t kBytes = VecOf<torch_wsl::acc_type_t<T>>::kLanes * static_cast<int64_t>(sizeof(T));
  if constexpr (kStream && (kBytes == 16 || kBytes == 32 || (kBytes == 64 && TWSL_CPU_ISA_LEVEL >= 2))) {
    for (; i + kBytes <= bytes; i += kBytes) stream_chunk<kBytes>(s + i, d + i);
  }
#endif
  if (i < bytes) std::memcpy(d + i, s + i, static_cast<size_t>(bytes - i));
}

// Walks rows begin, begin + 1, ... of a layout, keeping the element offsets
// of the current row (an odometer over the merged dimensions).
struct RowCursor {
  const rm::RowLayout& l;
  int64_t idx[rm::kMaxDims] = {};
  rm::RowOffsets off;

  RowCursor(const rm::RowLayout& layout, int64_t r) : l(layout), off(rm::row_offsets(layout, r)) {
    for (int d = l.ndim - 1; d >= 0; --d) {
      idx[d] = r % l.size[d];
      r /= l.size[d];
    }
  }

  void next() {
    for (int d = l.ndim - 1; d >= 0; --d) {
      off.x += l.x_stride[d];
      off.y += l.y_stride[d];
      off.cos += l.cos_stride[d];
      off.sin += l.sin_stride[d];
      if (++idx[d] < l.size[d]) return;
      off.x -= l.x_stride[d] * l.size[d];
      off.y -= l.y_stride[d] * l.size[d];
      off.cos -= l.cos_stride[d] * l.size[d];
      off.sin -= l.sin_stride[d] * l.size[d];
      idx[d] = 0;
    }
  }
};

template <bool kBackward, typename V>
inline void pair(V xa, V xb, V ca, V cb, V sa, V sb, V& ya, V& yb) {
  if constexpr (kBackward) {
    rm::backward_pair(xa, xb, ca, cb, sa, sb, ya, yb);
  } else {
    rm::forward_pair(xa, xb, ca, cb, sa, sb, ya, yb);
  }
}

// Rotate-half: element j pairs with j + half; vectors of j's from each half.
template <bool kBackward, bool kStream, typename scalar_t, typename acc_t>
void rotate_half_row(const scalar_t* x, scalar_t* y, const scalar_t* c, const scalar_t* s, int64_t half) {
  for_each_lane<acc_t>(half, [&](auto tag, int64_t j) {
    using V = decltype(tag);
    V ya, yb;
    pair<kBackward>(V::load(x + j), V::load(x + half + j), V::load(c + j), V::load(c + half + j), V::load(s + j),
                    V::load(s + half + j), ya, yb);
    put<kStream>(ya, y + j);
    put<kStream>(yb, y + half + j);
  });
}

// Interleaved: element 2i pairs with 2i + 1, both in the same vector.
template <bool kBackward, bool kStream, typename scalar_t, typename acc_t>
void interleaved_row(const scalar_t* x, scalar_t* y, const scalar_t* c, const scalar_t* s, int64_t rotary) {
  using V = VecOf<acc_t>;
  int64_t j = 0;
  if constexpr (V::kLanes >= 2) {
    for (; j + V::kLanes <= rotary; j += V::kLanes) {
      const V xv = V::load(x + j);
      const V cv = V::load(c + j);
      const V sv = V::load(s + j);
      V out;
      if constexpr (kBackward) {
        out = rm::backward(xv, cv, flip_odd(swap_pairs(rm::mul_rn(xv, sv))));  // rot^T(dy * s)
      } else {
        out = rm::forward(xv, flip_even(swap_pairs(xv)), cv, sv);  // rot(x)
      }
      put<kStream>(out, y + j);
    }
  }
  using S = Scalar<acc_t>;
  for (; j < rotary; j += 2) {
    S ya, yb;
    pair<kBackward>(S::load(x + j), S::load(x + j + 1), S::load(c + j), S::load(c + j + 1), S::load(s + j),
                    S::load(s + j + 1), ya, yb);
    ya.store(y + j);
    yb.store(y + j + 1);
  }
}

template <bool kBackward, bool kStream, typename scalar_t>
void rotate_rows_impl(const RopeRows& rows, const scalar_t* cos, const scalar_t* sin, int64_t rotary,
                      bool interleaved, int64_t begin, int64_t end) {
  using acc_t = torch_wsl::acc_type_t<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(rows.x);
  auto* y = static_cast<scalar_t*>(rows.y);
  const int64_t pass = rows.layout.head_dim - rotary;
  RowCursor cur(rows.layout, begin);
  for (int64_t r = begin; r < end; ++r, cur.next()) {
    const scalar_t* xr = x + cur.off.x;
    scalar_t* yr = y + cur.off.y;
    const scalar_t* cr = cos + cur.off.cos;
    const scalar_t* sr = sin + cur.off.sin;
    if (interleaved) {
      interleaved_row<kBackward, kStream, scalar_t, acc_t>(xr, yr, cr, sr, rotary);
    } else {
      rotate_half_row<kBackward, kStream, scalar_t, acc_t>(xr, yr, cr, sr, rotary / 2);
    }
    if (pass > 0) copy_row_tail<kStream>(xr + rotary, yr + rotary, pass);
  }
}

template <bool kBackward, typename scalar_t>
void rotate_rows(const RopeRows& rows, const scalar_t* cos, const scalar_t* sin, int64_t rotary, bool interleaved,
                 int64_t begin, int64_t end, bool stream) {
  if (stream) {
    rotate_rows_impl<kBackward, true>(rows, cos, sin, rotary, interleaved, begin, end);
  } else {
    rotate_rows_impl<kBackward, false>(rows, cos, sin, rotary, interleaved, begin, end);
  }
}

// Whether every full vector a row stores lands on the vector alignment.
template <typename scalar_t>
bool can_stream_rows(const RopeRows& rows, int64_t rotary, bool interleaved) {
  using V = VecOf<torch_wsl::acc_type_t<scalar_t>>;
  if constexpr (V::kLanes == 1) {
    return false;
  } else {
    constexpr int64_t align = V::kLanes * sizeof(scalar_t);
    if (reinterpret_cast<uintptr_t>(rows.y) % align != 0) return false;
    if ((interleaved ? rotary : rotary / 2) % V::kLanes != 0) return false;  // no scalar tail
    for (int i = 0; i < rows.layout.ndim; ++i) {
      if ((rows.layout.y_stride[i] * static_cast<int64_t>(sizeof(scalar_t))) % align != 0) return false;
    }
    return true;
  }
}

template <bool kBackward, typename scalar_t>
void apply_impl(const RopeArgs& a) {
  const int64_t rq = a.q.layout.rows;
  const int64_t rk = a.k.layout.rows;
  const auto* cos = static_cast<const scalar_t*>(a.cos);
  const auto* sin = static_cast<const scalar_t*>(a.sin);
  const int64_t out_bytes =
      (rq * a.q.layout.head_dim + rk * a.k.layout.head_dim) * static_cast<int64_t>(sizeof(scalar_t));
  const bool big = out_bytes >= kStreamingStoreMinBytes;
  const bool stream_q = big && rq > 0 && can_stream_rows<scalar_t>(a.q, a.rotary_dim, a.interleaved);
  const bool stream_k = big && rk > 0 && can_stream_rows<scalar_t>(a.k, a.rotary_dim, a.interleaved);
  // About 16K elements per task, so short rows are not split too finely.
  const int64_t d = std::max<int64_t>({a.q.layout.head_dim, a.k.layout.head_dim, int64_t{1}});
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / d);
  at::parallel_for(0, rq + rk, grain, [&](int64_t begin, int64_t end) {
    if (begin < rq) {
      rotate_rows<kBackward>(a.q, cos, sin, a.rotary_dim, a.interleaved, begin, std::min(end, rq), stream_q);
    }
    if (end > rq) {
      rotate_rows<kBackward>(a.k, cos, sin, a.rotary_dim, a.interleaved, std::max(begin, rq) - rq, end - rq,
                             stream_k);
    }
    if (stream_q || stream_k) stream_fence();
  });
}

void apply(const RopeArgs& a) {
  torch_wsl::visit_float_dtype(a.dtype, "rope CPU kernel", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (a.backward) {
      apply_impl<true, scalar_t>(a);
    } else {
      apply_impl<false, scalar_t>(a);
    }
  });
}

}  // namespace

const RopeKernels rope_kernels = {&apply};

}  // namespace torch_wsl::cpu::TWSL_CPU_ISA_NS
