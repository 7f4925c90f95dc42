// Fused optimizer and gradient-clipping CPU kernels, compiled once per ISA:
// included by optim_kernel_{default,avx2,avx512}.cpp inside the region opened
// by cpu/isa_begin.h. No includes here (see isa_prelude.h). The arithmetic is
// optim_math.h's, shared with CUDA; here it runs on vectors of fp32 lanes.
//
// One pass over memory per step: each chunk reads param, grad and the state
// once and writes param and the state once (AdamW fp32: 16 bytes read and 12
// written per element). Updates are in place, so the cache lines being written
// were just read: plain stores, no read-for-ownership to avoid.

namespace torch_wsl::cpu::TWSL_CPU_ISA_NS {
namespace {

#include "cpu/vec.h"

namespace om = torch_wsl::optim_math;

template <typename scalar_t>
using acc_of = torch_wsl::acc_type_t<scalar_t>;

// Elements per thread below which a call stays on the calling thread: waking
// the pool costs more than it saves, and a pool thread that is descheduled
// (another process on its core) would stall even a tiny step.
constexpr int64_t kMinElemsPerThread = int64_t{1} << 16;

// A run of chunk indices [head, tail) that its owner takes from the front and
// other threads from the back, in one atomic word.
struct alignas(64) Range {
  std::atomic<uint64_t> ht{0};  // head << 32 | tail
  bool take_front(int64_t& out) {
    uint64_t cur = ht.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t h = cur >> 32, t = cur & 0xffffffffu;
      if (h >= t) return false;
      if (ht.compare_exchange_weak(cur, ((h + 1) << 32) | t, std::memory_order_relaxed)) {
        out = static_cast<int64_t>(h);
        return true;
      }
    }
  }
  bool take_back(int64_t& out) {
    uint64_t cur = ht.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t h = cur >> 32, t = cur & 0xffffffffu;
      if (h >= t) return false;
      if (ht.compare_exchange_weak(cur, (h << 32) | (t - 1), std::memory_order_relaxed)) {
        out = static_cast<int64_t>(t - 1);
        return true;
      }
    }
  }
};

// Runs fn(c) for every chunk index c in one parallel region. Each thread owns
// a contiguous run of chunks (one long stream through memory, as a static
// split gives) and takes them from the front; a thread that runs out takes
// the others' remaining chunks from the back. So a thread slowed down by
// something else on its core (the usual state of a desktop running WSL2)
// ends up with fewer chunks instead of holding everyone at the end. (Handing
// out chunks round-robin from one counter balanced as well but measured ~12%
// slower here: the threads then stream through neighbouring memory.)
template <typename Fn>
void for_each_chunk(const std::vector<TensorChunk>& chunks, Fn&& fn) {
  const auto count = static_cast<int64_t>(chunks.size());
  int64_t elems = 0;
  for (const TensorChunk& ch : chunks) elems += ch.end - ch.begin;
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), count, elems / kMinElemsPerThread}));
  if (workers == 1) {
    for (int64_t c = 0; c < count; ++c) fn(c);
    return;
  }
  std::vector<Range> ranges(static_cast<size_t>(workers));
  for (int64_t w = 0; w < workers; ++w) {
    const auto b = static_cast<uint64_t>(count * w / workers);
    const auto t = static_cast<uint64_t>(count * (w + 1) / workers);
    ranges[static_cast<size_t>(w)].ht.store((b << 32) | t, std::memory_order_relaxed);
  }
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      int64_t c = 0;
      while (ranges[static_cast<size_t>(w)].take_front(c)) fn(c);
      for (int64_t k = 1; k < workers; ++k) {
        Range& r = ranges[static_cast<size_t>((w + k) % workers)];
        while (r.take_back(c)) fn(c);
      }
    }
  });
}

// Software prefetch this far ahead in every stream of the optimizer loops
// (AdamW fp32 at 124M parameters, 2 threads: ~3% faster than without; past
// the end of a tensor it is a harmless hint).
constexpr int64_t kPrefetchBytes = 2048;

template <typename... T>
inline void prefetch(int64_t i, const T*... ptrs) {
#if TWSL_X86
  (_mm_prefetch(reinterpret_cast<const char*>(ptrs + i), _MM_HINT_T0), ...);
#endif
}

// ---------------------------------------------------------------------- Adam

template <typename scalar_t>
void adam_chunk(const AdamArgs& a, const AdamTensor& t, const om::AdamStepScalars& s, int64_t begin, int64_t end) {
  using acc_t = acc_of<scalar_t>;
  const om::AdamCoeffs<acc_t> c = om::adam_coeffs<acc_t>(a.lr, a.beta1, a.beta2, a.weight_decay, a.eps, a.amsgrad,
                                                         a.maximize, a.decoupled_weight_decay, s);
  scalar_t* p = static_cast<scalar_t*>(t.param) + begin;
  scalar_t* g = static_cast<scalar_t*>(t.grad) + begin;
  scalar_t* m = static_cast<scalar_t*>(t.exp_avg) + begin;
  scalar_t* v = static_cast<scalar_t*>(t.exp_avg_sq) + begin;
  scalar_t* vmax = a.amsgrad ? static_cast<scalar_t*>(t.max_exp_avg_sq) + begin : nullptr;
  const bool unscale = a.unscale;
  const auto grad_scale = static_cast<acc_t>(a.grad_scale);
  constexpr int64_t ahead = kPrefetchBytes / static_cast<int64_t>(sizeof(scalar_t));
  for_each_lane<acc_t>(end - begin, [&](auto tag, int64_t i) {
    using V = decltype(tag);
    if constexpr (V::kLanes > 1) prefetch(ahead + i, p, g, m, v);
    V pv = V::load(p + i);
    V gv = V::load(g + i);
    if (unscale) {
      gv = gv / V::broadcast(grad_scale);
      gv.store(g + i);
    }
    V mv = V::load(m + i);
    V vv = V::load(v + i);
    V xv = vmax != nullptr ? V::load(vmax + i) : V::zero();
    om::adam_update(pv, gv, mv, vv, xv, c);
    pv.store(p + i);
    mv.store(m + i);
    vv.store(v + i);
    if (vmax != nullptr) xv.store(vmax + i);
  });
}

// ----------------------------------------------------------------------- SGD

template <typename scalar_t>
void sgd_chunk(const SgdArgs& a, const SgdTensor& t, int64_t begin, int64_t end) {
  using acc_t = acc_of<scalar_t>;
  const om::SgdCoeffs<acc_t> c =
      om::sgd_coeffs<acc_t>(a.lr, a.momentum, a.dampening, a.weight_decay, a.nesterov, a.maximize, a.first_step);
  scalar_t* p = static_cast<scalar_t*>(t.param) + begin;
  scalar_t* g = static_cast<scalar_t*>(t.grad) + begin;
  scalar_t* buf = c.has_momentum ? static_cast<scalar_t*>(t.momentum_buffer) + begin : nullptr;
  const bool read_buf = buf != nullptr && !c.first_step;
  const bool unscale = a.unscale;
  const auto grad_scale = static_cast<acc_t>(a.grad_scale);
  constexpr int64_t ahead = kPrefetchBytes / static_cast<int64_t>(sizeof(scalar_t));
  for_each_lane<acc_t>(end - begin, [&](auto tag, int64_t i) {
    using V = decltype(tag);
    if constexpr (V::kLanes > 1) prefetch(ahead + i, p, g, read_buf ? buf : p);
    V pv = V::load(p + i);
    V gv = V::load(g + i);
    if (unscale) {
      gv = gv / V::broadcast(grad_scale);
      gv.store(g + i);
    }
    V bv = read_buf ? V::load(buf + i) : V::zero();
    om::sgd_update(pv, gv, bv, c);
    pv.store(p + i);
    if (buf != nullptr) bv.store(buf + i);
  });
}

// --------------------------------------------------------------------- norms

// The partial result (sum of |x|, of x^2, or max |x|) of n elements, summed in
// blocks of 2048 in the accumulation type and across blocks in double.
template <typename scalar_t>
double norm_chunk(const scalar_t* x, int64_t n, om::NormOrder ord) {
  using acc_t = acc_of<scalar_t>;
  using V = VecOf<acc_t>;
  constexpr int64_t kBlock = 2048;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const scalar_t* xb = x + b;
    acc_t part = 0;
    if (ord == om::NormOrder::kInf) {
      V acc = V::zero();
      int64_t i = 0;
      for (; i + V::kLanes <= len; i += V::kLanes) acc = acc.maximum(V::load(xb + i).abs());
      alignas(64) acc_t lanes[V::kLanes];
      acc.store(lanes);
      for (int k = 0; k < V::kLanes; ++k) part = om::maximum(part, lanes[k]);
      for (; i < len; ++i) part = om::maximum(part, om::abs_(static_cast<acc_t>(xb[i])));
    } else {
      part = sum_lanes<acc_t>(len, [&](auto tag, int64_t i) {
        using W = decltype(tag);
        return om::norm_term(W::load(xb + i), ord);
      });
    }
    total = om::norm_combine(total, static_cast<double>(part), ord);
  }
  return total;
}

template <typename scalar_t>
void scale_chunk(scalar_t* x, int64_t n, double coef) {
  using acc_t = acc_of<scalar_t>;
  const auto c = static_cast<acc_t>(coef);
  for_each_lane<acc_t>(n, [&](auto tag, int64_t i) {
    using V = decltype(tag);
    (V::load(x + i) * V::broadcast(c)).store(x + i);
  });
}

void adam_step(const AdamArgs& args, const std::vector<TensorChunk>& chunks) {
  // Bias corrections once per tensor (each tensor has its own step count).
  std::vector<om::AdamStepScalars> scalars;
  scalars.reserve(args.tensors.size());
  for (const AdamTensor& t : args.tensors) {
    scalars.push_back(om::adam_step_scalars(args.lr, args.beta1, args.beta2, t.step));
  }
  for_each_chunk(chunks, [&](int64_t c) {
    const TensorChunk& ch = chunks[static_cast<size_t>(c)];
    const auto i = static_cast<size_t>(ch.index);
    const AdamTensor& t = args.tensors[i];
    torch_wsl::visit_float_dtype(t.dtype, "optimizer CPU kernel", [&](auto tag) {
      adam_chunk<decltype(tag)>(args, t, scalars[i], ch.begin, ch.end);
    });
  });
}

void sgd_step(const SgdArgs& args, const std::vector<TensorChunk>& chunks) {
  for_each_chunk(chunks, [&](int64_t c) {
    const TensorChunk& ch = chunks[static_cast<size_t>(c)];
    const SgdTensor& t = args.tensors[static_cast<size_t>(ch.index)];
    torch_wsl::visit_float_dtype(t.dtype, "optimizer CPU kernel", [&](auto tag) { sgd_chunk<decltype(tag)>(args, t, ch.begin, ch.end); });
  });
}

void norm_partials(const NormArgs& args, const std::vector<TensorChunk>& chunks, double* partials) {
  const auto ord = static_cast<om::NormOrder>(args.norm_order);
  for_each_chunk(chunks, [&](int64_t c) {
    const TensorChunk& ch = chunks[static_cast<size_t>(c)];
    const NormTensor& t = args.tensors[static_cast<size_t>(ch.index)];
    torch_wsl::visit_float_dtype(t.dtype, "optimizer CPU kernel", [&](auto tag) {
      using scalar_t = decltype(tag);
      partials[c] = norm_chunk(static_cast<const scalar_t*>(t.data) + ch.begin, ch.end - ch.begin, ord);
    });
  });
}

void scale_(const std::vector<ScaleTensor>& tensors, double coef, const std::vector<TensorChunk>& chunks) {
  for_each_chunk(chunks, [&](int64_t c) {
    const TensorChunk& ch = chunks[static_cast<size_t>(c)];
    const ScaleTensor& t = tensors[static_cast<size_t>(ch.index)];
    torch_wsl::visit_float_dtype(t.dtype, "optimizer CPU kernel", [&](auto tag) {
      using scalar_t = decltype(tag);
      scale_chunk(static_cast<scalar_t*>(t.data) + ch.begin, ch.end - ch.begin, coef);
    });
  });
}

}  // namespace

const OptimKernels optim_kernels = {&adam_step, &sgd_step, &norm_partials, &scale_};

}  // namespace torch_wsl::cpu::TWSL_CPU_ISA_NS
