// LayerNorm / RMSNorm CPU kernels, compiled once per ISA: included by
// norm_kernel_{default,avx2,avx512}.cpp inside their `#pragma GCC target`
// region, with TWSL_CPU_ISA_NS and TWSL_CPU_ISA_LEVEL set. No includes here
// (see isa_prelude.h). The arithmetic is norm_math.h's, shared with CUDA.
//
// Each row is converted once into an fp32 (fp64 for double) scratch row that
// stays in L1/L2, so DRAM sees each input byte read once and each output byte
// written once; the loops over the scratch row are vectorized by the compiler
// (`omp simd`) for the ISA of the region. Rows are split across threads; the
// weight/bias gradients are reduced in two stages (per-thread partial sums,
// then a parallel sum over threads).

namespace torch_wsl::cpu::TWSL_CPU_ISA_NS {
namespace {

#include "cpu/vec_convert.h"

namespace nm = torch_wsl::norm_math;

template <typename acc_t>
acc_t row_sum(const acc_t* v, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

template <typename acc_t>
acc_t row_dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename acc_t>
acc_t row_sum_sq_dev(const acc_t* v, acc_t mean, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = v[i] - mean;
    s += d * d;
  }
  return s;
}

// dst[i] = affine(normalize(v[i])), with the affine parameters that exist.
template <typename acc_t>
void normalize_row(const acc_t* v, acc_t* dst, int64_t n, acc_t mean, acc_t rstd, const acc_t* w, const acc_t* b) {
  if (w != nullptr && b != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = nm::affine(nm::normalize(v[i], mean, rstd), w[i], b[i]);
  } else if (w != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = nm::affine(nm::normalize(v[i], mean, rstd), w[i], acc_t(0));
  } else if (b != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = nm::affine(nm::normalize(v[i], mean, rstd), acc_t(1), b[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = nm::normalize(v[i], mean, rstd);
  }
}

template <typename scalar_t, typename acc_t>
void forward_rows(const NormForwardArgs& a, int64_t begin, int64_t end) {
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t n = a.cols;
  const auto* x = static_cast<const scalar_t*>(a.input);
  const auto* res = static_cast<const scalar_t*>(a.residual);
  const auto* w = static_cast<const acc_t*>(a.weight);
  const auto* b = static_cast<const acc_t*>(a.bias);
  auto* y = static_cast<scalar_t*>(a.output);
  auto* res_out = static_cast<scalar_t*>(a.residual_out);
  auto* mean_out = static_cast<acc_t*>(a.mean);
  auto* rstd_out = static_cast<acc_t*>(a.rstd);
  const auto eps = static_cast<acc_t>(a.eps);

  std::vector<acc_t> scratch(2 * static_cast<size_t>(n));
  acc_t* const buf = scratch.data();
  acc_t* const tmp = buf + n;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t off = r * n;
    const acc_t* row = buf;  // the row to normalize, in the accumulation type
    if constexpr (kSameType) {
      if (res != nullptr) {
        // Sum straight into residual_out; that row is the one normalized.
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) res_out[off + i] = x[off + i] + res[off + i];
        row = res_out + off;
      } else {
        row = x + off;
      }
    } else {
      to_acc(x + off, buf, n);
      if (res != nullptr) {
        to_acc(res + off, tmp, n);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) buf[i] += tmp[i];
        from_acc(buf, res_out + off, n);
        to_acc(res_out + off, buf, n);  // normalize the rounded sum that was stored, as eager does
      }
    }

    const acc_t mean = (a.center && n > 0) ? row_sum(row, n) / static_cast<acc_t>(n) : acc_t(0);
    const acc_t rstd = nm::row_rstd(row_sum_sq_dev(row, mean, n), n, eps);
    if (mean_out != nullptr) mean_out[r] = mean;
    rstd_out[r] = rstd;

    if constexpr (kSameType) {
      normalize_row(row, y + off, n, mean, rstd, w, b);
    } else {
      normalize_row(buf, buf, n, mean, rstd, w, b);
      from_acc(buf, y + off, n);
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_rows(const NormBackwardArgs& a, int64_t begin, int64_t end, acc_t* dw, acc_t* db) {
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t n = a.cols;
  const auto* dy = static_cast<const scalar_t*>(a.grad_output);
  const auto* dres = static_cast<const scalar_t*>(a.grad_residual_out);
  const auto* x = static_cast<const scalar_t*>(a.input);
  const auto* mean_in = static_cast<const acc_t*>(a.mean);
  const auto* rstd_in = static_cast<const acc_t*>(a.rstd);
  const auto* w = static_cast<const acc_t*>(a.weight);
  auto* dx = static_cast<scalar_t*>(a.grad_input);

  std::vector<acc_t> scratch(3 * static_cast<size_t>(n));
  acc_t* xhat = scratch.data();
  acc_t* gw = xhat + n;
  acc_t* tmp = gw + n;
  const auto inv_n = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t off = r * n;
    const acc_t mean = a.center ? mean_in[r] : acc_t(0);
    const acc_t rstd = rstd_in[r];
    to_acc(x + off, xhat, n);
    to_acc(dy + off, gw, n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) xhat[i] = nm::normalize(xhat[i], mean, rstd);
    if (dw != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dw[i] += gw[i] * xhat[i];
    }
    if (db != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) db[i] += gw[i];
    }
    if (w != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gw[i] *= w[i];
    }
    const acc_t mean_gw = a.center ? row_sum(gw, n) * inv_n : acc_t(0);
    const acc_t mean_gw_xhat = row_dot(gw, xhat, n) * inv_n;

    acc_t* out = nullptr;
    if constexpr (kSameType) {
      out = dx + off;
    } else {
      out = tmp;
    }
    if (dres != nullptr) {
      const acc_t* pass = nullptr;
      if constexpr (kSameType) {
        pass = dres + off;
      } else {
        to_acc(dres + off, tmp, n);
        pass = tmp;
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = nm::grad_input(gw[i], xhat[i], rstd, mean_gw, mean_gw_xhat) + pass[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = nm::grad_input(gw[i], xhat[i], rstd, mean_gw, mean_gw_xhat);
    }
    if constexpr (!kSameType) from_acc(out, dx + off, n);
  }
}

template <typename scalar_t, typename acc_t>
void forward_impl(const NormForwardArgs& a) {
  // About 64 KiB of row data per task, so small rows are not split too finely.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(a.cols, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) { forward_rows<scalar_t, acc_t>(a, begin, end); });
}

template <typename scalar_t, typename acc_t>
void backward_impl(const NormBackwardArgs& a) {
  const int64_t n = a.cols;
  auto* dw = static_cast<acc_t*>(a.grad_weight);
  auto* db = static_cast<acc_t*>(a.grad_bias);
  if (dw == nullptr && db == nullptr) {
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(n, 1));
    at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t, acc_t>(a, begin, end, nullptr, nullptr);
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
                                     db ? p + (dw ? n : 0) : nullptr);
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

template <template <typename, typename> class Fn, typename Args>
void dispatch_dtype(const Args& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return Fn<float, float>::run(a);
    case c10::ScalarType::Double: return Fn<double, double>::run(a);
    case c10::ScalarType::BFloat16: return Fn<c10::BFloat16, float>::run(a);
    case c10::ScalarType::Half: return Fn<c10::Half, float>::run(a);
    default: TORCH_CHECK(false, "torch_wsl: norm CPU kernel got unsupported dtype ", a.dtype);
  }
}

template <typename scalar_t, typename acc_t>
struct ForwardFn {
  static void run(const NormForwardArgs& a) { forward_impl<scalar_t, acc_t>(a); }
};
template <typename scalar_t, typename acc_t>
struct BackwardFn {
  static void run(const NormBackwardArgs& a) { backward_impl<scalar_t, acc_t>(a); }
};

}  // namespace

void norm_forward(const NormForwardArgs& args) { dispatch_dtype<ForwardFn>(args); }
void norm_backward(const NormBackwardArgs& args) { dispatch_dtype<BackwardFn>(args); }

}  // namespace torch_wsl::cpu::TWSL_CPU_ISA_NS
