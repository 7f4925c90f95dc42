// LayerNorm / RMSNorm CPU kernels, compiled once per ISA: included by
// norm_kernel_{default,avx2,avx512}.cpp inside the region opened by
// cpu/isa_begin.h (TWSL_CPU_ISA_NS and TWSL_CPU_ISA_LEVEL set). No includes
// here (see isa_prelude.h). The arithmetic is norm_math.h's, shared with CUDA; here
// it runs on vectors of fp32 lanes (vec.h).
//
// DRAM sees each input byte read once and each output byte written once: a
// row is read (and converted to fp32) in one pass that also accumulates the
// row's statistic; the remaining passes run on that row while it sits in
// L1/L2. Rows are split across threads; weight/bias gradients are reduced in
// two stages (per-thread partial sums, then a parallel sum over threads).

namespace torch_wsl::cpu::TWSL_CPU_ISA_NS {
namespace {

#include "cpu/vec.h"

namespace nm = torch_wsl::norm_math;

// Outputs at least this large are written with non-temporal stores: they
// cannot stay in the last-level cache for the next operator anyway, and
// streaming them skips the read-for-ownership that costs a third of the
// write bandwidth. Smaller outputs are stored normally, to stay cached.
constexpr int64_t kStreamingStoreMinBytes = int64_t{16} << 20;

// Rows are processed one after another, each in a few passes; prefetching
// the next row's inputs during the current row keeps DRAM busy across the
// passes that run from cache (measured: bf16 add_rms_norm forward 1.45x).
constexpr bool kPrefetch = true;

template <typename acc_t, typename T>
bool use_streaming_stores(const T* out, int64_t rows, int64_t cols) {
  return rows * cols * static_cast<int64_t>(sizeof(T)) >= kStreamingStoreMinBytes && can_stream<acc_t>(out, cols);
}

template <typename scalar_t, typename acc_t>
void forward_rows(const NormForwardArgs& a, int64_t begin, int64_t end, bool stream) {
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t n = a.cols;
  const auto* w = static_cast<const acc_t*>(a.weight);
  const auto* b = static_cast<const acc_t*>(a.bias);
  auto* mean_out = static_cast<acc_t*>(a.mean);
  auto* rstd_out = static_cast<acc_t*>(a.rstd);
  const auto eps = static_cast<acc_t>(a.eps);
  const bool center = a.center;
  const bool round_xhat = a.round_xhat;

  // fp32/fp64 rows without a residual are read in place; other rows are formed
  // once into `buf`, which later passes read from L1/L2.
  const bool in_place = kSameType && a.residual == nullptr;
  std::vector<acc_t> scratch(in_place ? 0 : static_cast<size_t>(n));
  acc_t* const buf = scratch.data();
  for (int64_t r = begin; r < end; ++r) {
    const int64_t off = r * n;
    const scalar_t* x = static_cast<const scalar_t*>(a.input) + off;
    const scalar_t* res = a.residual ? static_cast<const scalar_t*>(a.residual) + off : nullptr;
    scalar_t* res_out = a.residual_out ? static_cast<scalar_t*>(a.residual_out) + off : nullptr;
    scalar_t* y = static_cast<scalar_t*>(a.output) + off;
    const acc_t* row = in_place ? reinterpret_cast<const acc_t*>(x) : buf;  // the row to normalize
    const bool prefetch = kPrefetch && r + 1 < end;

    // Pass 1 (DRAM): form the row (x, or x + residual stored to residual_out
    // and rounded to its dtype, as eager normalizes the stored sum) and sum it
    // (LayerNorm) or its squares (RMSNorm).
    const acc_t first = sum_lanes<acc_t>(n, [&](auto tag, int64_t i) {
      using V = decltype(tag);
      if (prefetch) {  // the next row's inputs, while this row computes
        __builtin_prefetch(x + n + i);
        if (res != nullptr) __builtin_prefetch(res + n + i);
      }
      V v = V::load(x + i);
      if (res != nullptr) {
        v = (v + V::load(res + i)).template rounded<scalar_t>();
        if (stream) {
          v.store_stream(res_out + i);
        } else {
          v.store(res_out + i);
        }
      }
      if (!in_place) v.store(buf + i);
      return center ? v : v * v;
    });
    acc_t mean = 0;
    acc_t sum_sq = first;
    if (center) {  // Pass 2 (cache): squared deviations from the mean.
      mean = n > 0 ? first / static_cast<acc_t>(n) : acc_t(0);
      sum_sq = sum_lanes<acc_t>(n, [&](auto tag, int64_t i) {
        using V = decltype(tag);
        const V d = V::load(row + i) - V::broadcast(mean);
        return d * d;
      });
    }
    const acc_t rstd = nm::row_rstd(sum_sq, n, eps);
    if (mean_out != nullptr) mean_out[r] = mean;
    rstd_out[r] = rstd;

    // Pass 3 (cache in, DRAM out): y = affine(normalize(row)).
    for_each_lane<acc_t>(n, [&](auto tag, int64_t i) {
      using V = decltype(tag);
      V xhat = nm::normalize(V::load(row + i), V::broadcast(mean), V::broadcast(rstd));
      if (round_xhat) xhat = xhat.template rounded<scalar_t>();
      const V wv = w != nullptr ? V::load(w + i) : V::broadcast(acc_t(1));
      const V bv = b != nullptr ? V::load(b + i) : V::zero();
      const V out = nm::affine(xhat, wv, bv);
      if (stream) {
        out.store_stream(y + i);
      } else {
        out.store(y + i);
      }
    });
  }
  if (stream) stream_fence();
}

template <typename scalar_t, typename acc_t>
void backward_rows(const NormBackwardArgs& a, int64_t begin, int64_t end, acc_t* dw, acc_t* db, bool stream) {
  const int64_t n = a.cols;
  const auto* mean_in = static_cast<const acc_t*>(a.mean);
  const auto* rstd_in = static_cast<const acc_t*>(a.rstd);
  const auto* w = static_cast<const acc_t*>(a.weight);
  const bool center = a.center;
  const auto inv_n = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);

  std::vector<acc_t> scratch(2 * static_cast<size_t>(n));
  acc_t* xhat_buf = scratch.data();
  acc_t* gw_buf = xhat_buf + n;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t off = r * n;
    const scalar_t* x = static_cast<const scalar_t*>(a.input) + off;
    const scalar_t* dy = static_cast<const scalar_t*>(a.grad_output) + off;
    const scalar_t* dres = a.grad_residual_out ? static_cast<const scalar_t*>(a.grad_residual_out) + off : nullptr;
    scalar_t* dx = static_cast<scalar_t*>(a.grad_input) + off;
    const acc_t mean = center ? mean_in[r] : acc_t(0);
    const acc_t rstd = rstd_in[r];
    const bool prefetch = kPrefetch && r + 1 < end;

    // Pass 1 (DRAM): xhat and dy*w into the scratch rows, partial dw/db, and
    // the two row sums the input gradient needs.
    acc_t sum_gw = 0;
    const acc_t sum_gw_xhat = sum_lanes<acc_t>(n, [&](auto tag, int64_t i) {
      using V = decltype(tag);
      if (prefetch) {  // the next row's inputs, while this row computes
        __builtin_prefetch(x + n + i);
        __builtin_prefetch(dy + n + i);
      }
      const V xhat = nm::normalize(V::load(x + i), V::broadcast(mean), V::broadcast(rstd));
      const V g = V::load(dy + i);
      if (dw != nullptr) {
        const V xr = a.round_xhat ? xhat.template rounded<scalar_t>() : xhat;
        (V::load(dw + i) + g * xr).store(dw + i);
      }
      if (db != nullptr) (V::load(db + i) + g).store(db + i);
      const V gw = w != nullptr ? g * V::load(w + i) : g;
      xhat.store(xhat_buf + i);
      gw.store(gw_buf + i);
      return gw * xhat;
    });
    if (center) {
      sum_gw = sum_lanes<acc_t>(n, [&](auto tag, int64_t i) {
        using V = decltype(tag);
        return V::load(gw_buf + i);
      });
    }
    const acc_t mean_gw = sum_gw * inv_n;
    const acc_t mean_gw_xhat = sum_gw_xhat * inv_n;

    // Pass 2 (cache in, DRAM out): the input gradient, plus the gradient that
    // flowed past the norm through residual_out.
    for_each_lane<acc_t>(n, [&](auto tag, int64_t i) {
      using V = decltype(tag);
      V g = nm::grad_input(V::load(gw_buf + i), V::load(xhat_buf + i), V::broadcast(rstd), V::broadcast(mean_gw),
                           V::broadcast(mean_gw_xhat));
      if (dres != nullptr) {
        if (prefetch) __builtin_prefetch(dres + n + i);
        g = g + V::load(dres + i);
      }
      if (stream) {
        g.store_stream(dx + i);
      } else {
        g.store(dx + i);
      }
    });
  }
  if (stream) stream_fence();
}

template <typename scalar_t, typename acc_t>
void forward_impl(const NormForwardArgs& a) {
  // About 64 KiB of row data per task, so small rows are not split too finely.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(a.cols, 1));
  const bool stream = use_streaming_stores<acc_t>(static_cast<const scalar_t*>(a.output), a.rows, a.cols);
  at::parallel_for(0, a.rows, grain,
                   [&](int64_t begin, int64_t end) { forward_rows<scalar_t, acc_t>(a, begin, end, stream); });
}

template <typename scalar_t, typename acc_t>
void backward_impl(const NormBackwardArgs& a) {
  const int64_t n = a.cols;
  auto* dw = static_cast<acc_t*>(a.grad_weight);
  auto* db = static_cast<acc_t*>(a.grad_bias);
  const bool stream = use_streaming_stores<acc_t>(static_cast<const scalar_t*>(a.grad_input), a.rows, n);
  if (dw == nullptr && db == nullptr) {
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(n, 1));
    at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t, acc_t>(a, begin, end, nullptr, nullptr, stream);
    });
    return;
  }
  // Stage 1: each block of rows accumulates its own partial dw/db.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), a.rows));
  const int64_t per_block = (dw ? n : 0) + (db ? n : 0);
  std::vector<acc_t> partial(static_cast<size_t>(blocks * per_block), acc_t(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      acc_t* p = partial.data() + blk * per_block;
      backward_rows<scalar_t, acc_t>(a, a.rows * blk / blocks, a.rows * (blk + 1) / blocks, dw ? p : nullptr,
                                     db ? p + (dw ? n : 0) : nullptr, stream);
    }
  });
  // Stage 2: sum the partials over blocks, in parallel over columns.
  at::parallel_for(0, n, 2048, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t sw = 0, sb = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const acc_t* p = partial.data() + blk * per_block;
        if (dw) sw += p[c];
        if (db) sb += p[(dw ? n : 0) + c];
      }
      if (dw) dw[c] = sw;
      if (db) db[c] = sb;
    }
  });
}

template <typename Args, typename Impl>
void for_dtype(const Args& a, Impl&& impl) {
  torch_wsl::visit_float_dtype(a.dtype, "norm CPU kernel", [&](auto tag) {
    using scalar_t = decltype(tag);
    impl(scalar_t{}, torch_wsl::acc_type_t<scalar_t>{});
  });
}

void forward(const NormForwardArgs& a) {
  for_dtype(a, [&](auto s, auto acc) { forward_impl<decltype(s), decltype(acc)>(a); });
}
void backward(const NormBackwardArgs& a) {
  for_dtype(a, [&](auto s, auto acc) { backward_impl<decltype(s), decltype(acc)>(a); });
}

}  // namespace

const NormKernels norm_kernels = {&forward, &backward};

}  // namespace torch_wsl::cpu::TWSL_CPU_ISA_NS
