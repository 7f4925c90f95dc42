// Rotary position embedding operators: schemas, argument checks, output
// allocation and the CPU kernels' registration. The CUDA registration is in
// cuda/rope_kernels.cu. The fake kernels (torch_wsl/ops/rope.py) mirror the
// checks below in the same order and words, and allocate the same layout.
#include "rope.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>

#include "checks.h"
#include "cpu/rope_kernel.h"
#include "dtypes.h"

namespace torch_wsl {
namespace {

constexpr const char* kForwardOp = "apply_rotary_pos_emb";
constexpr const char* kBackwardOp = "apply_rotary_pos_emb_backward";
constexpr int64_t kMaxRank = rope_math::kMaxDims + 1;

// check::that with the message formatted only on failure: these checks run
// on every call, and building their strings cost more than a small kernel.
template <typename Expectation, typename Got>
void require(bool ok, const char* op, const char* arg, Expectation&& expectation, Got&& got) {
  if (C10_UNLIKELY(!ok)) check::fail(op, arg, expectation(), got());
}

// check::same_device and check::same_dtype, entered only when they fail (they
// format their expectation before testing it).
void same_device_and_dtype(const char* op, const char* arg, const Tensor& t, const char* ref_arg, const Tensor& ref) {
  if (C10_UNLIKELY(t.device() != ref.device())) check::same_device(op, arg, t, ref_arg, ref);
  if (C10_UNLIKELY(t.scalar_type() != ref.scalar_type())) check::same_dtype(op, arg, t, ref_arg, ref);
}

// A row's elements must be contiguous for the kernels; anything else (rare:
// no projection produces it) is copied once.
Tensor head_dim_contiguous(const Tensor& t) {
  return (t.dim() > 0 && t.size(-1) > 1 && t.stride(-1) != 1) ? t.contiguous() : t;
}

// cos or sin as transformers' apply_rotary_pos_emb sees it, after
// `cos.unsqueeze(unsqueeze_dim)`.
struct Table {
  Tensor t;  // last dimension contiguous
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int64_t rotary_dim() const { return sizes.back(); }
};

Table unsqueezed(const char* op, const char* name, const Tensor& table, int64_t unsqueeze_dim) {
  if (C10_UNLIKELY(table.dim() < 1)) check::dim_at_least(op, name, table, 1);  // formats before testing
  const int64_t n = table.dim();
  require(
      unsqueeze_dim >= -(n + 1) && unsqueeze_dim <= n, op, "unsqueeze_dim",
      [&] {
        return c10::str("to be in [", -(n + 1), ", ", n, "] (a position for ", name, ".unsqueeze, ", name, " has ", n,
                        " dimensions)");
      },
      [&] { return c10::str(unsqueeze_dim); });
  Table out;
  out.t = head_dim_contiguous(table);
  out.sizes = out.t.sizes().vec();
  out.strides = out.t.strides().vec();
  const int64_t pos = unsqueeze_dim < 0 ? unsqueeze_dim + n + 1 : unsqueeze_dim;
  out.sizes.insert(out.sizes.begin() + pos, 1);
  out.strides.insert(out.strides.begin() + pos, 0);
  return out;
}

void check_tables(const char* op, const Table& cos, const Tensor& cos_arg, const Table& sin, const Tensor& sin_arg) {
  const int64_t rotary = cos.rotary_dim();
  require(
      sin.rotary_dim() == rotary, op, "sin",
      [&] { return c10::str("to have the last dimension of cos unsqueezed (", rotary, ")"); },
      [&] { return c10::str("shape ", sin_arg.sizes(), " (", at::IntArrayRef(sin.sizes), " unsqueezed)"); });
  require(
      rotary % 2 == 0, op, "cos",
      [] { return std::string("to have an even last dimension (the rotary dimension, whose elements rotate in pairs)"); },
      [&] { return c10::str("shape ", cos_arg.sizes(), " (", at::IntArrayRef(cos.sizes), " unsqueezed)"); });
}

void check_rank(const char* op, const char* name, const Tensor& x) {
  require(
      x.dim() >= 1 && x.dim() <= kMaxRank, op, name, [] { return c10::str("to have 1 to ", kMaxRank, " dimensions"); },
      [&] { return c10::str("shape ", x.sizes()); });
}

// The table fits x: its rotary dimension at most x's head dimension, and its
// other dimensions broadcast to x's (the output keeps x's shape, so a table
// may not add dimensions or grow one of x's).
void check_fits(const char* op, const char* xname, const Tensor& x, const char* tname, const Tensor& targ,
                const Table& t, int64_t unsqueeze_dim) {
  require(
      t.rotary_dim() <= x.size(-1), op, tname,
      [&] {
        return c10::str("to have a last dimension (the rotary dimension) of at most the head dimension of ", xname,
                        " (", x.size(-1), ")");
      },
      [&] { return c10::str("shape ", targ.sizes()); });
  const int64_t nd = x.dim();
  const int64_t nt = static_cast<int64_t>(t.sizes.size());
  bool ok = nt <= nd;
  for (int64_t i = 0; ok && i + 1 < nt; ++i) {
    const int64_t ts = t.sizes[i];
    ok = ts == 1 || ts == x.size(nd - nt + i);
  }
  require(
      ok, op, tname,
      [&] {
        return c10::str("unsqueezed at dim ", unsqueeze_dim, " to broadcast to the shape of ", xname, " ", x.sizes(),
                        " in all but the last dimension");
      },
      [&] { return c10::str("shape ", targ.sizes(), " (", at::IntArrayRef(t.sizes), " unsqueezed)"); });
}

// A dense tensor of `sizes` whose leading dimensions are laid out in the
// order of `order_strides` (largest first, ties in logical order) and whose
// last dimension is contiguous: the memory order of the tensor the strides
// came from. For q = x.view(b, s, h, d).transpose(1, 2) this is q's own
// layout, so the attention that follows (and, for gradients, the view back
// to the projection's output) needs no copy.
Tensor empty_in_order(at::IntArrayRef sizes, at::IntArrayRef order_strides, const at::TensorOptions& opts) {
  const int64_t nd = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> strides(nd, 1);
  if (nd == 0) return at::empty_strided(sizes, strides, opts);
  std::vector<int64_t> order(nd - 1);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return order_strides[a] > order_strides[b]; });
  int64_t running = std::max<int64_t>(sizes[nd - 1], 1);
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    strides[*it] = running;
    running *= std::max<int64_t>(sizes[*it], 1);
  }
  return at::empty_strided(sizes, strides, opts);
}

int64_t table_stride(const Table& t, int64_t dim, int64_t nd) {
  const int64_t ti = dim - (nd - static_cast<int64_t>(t.sizes.size()));
  if (ti < 0 || t.sizes[ti] == 1) return 0;  // broadcast
  return t.strides[ti];
}

// x's rows against the tables: dimensions of size 1 dropped, the rest in
// the output's memory order (outermost first), merged where every operand
// is contiguous across the pair.
rope_math::RowLayout make_layout(const Tensor& x, const Tensor& y, const Table& cos, const Table& sin) {
  rope_math::RowLayout l;
  l.head_dim = x.size(-1);
  if (x.numel() == 0) return l;  // rows = 0
  struct Dim {
    int64_t size, xs, ys, cs, ss;
  };
  const int64_t nd = x.dim();
  std::vector<Dim> dims;
  for (int64_t i = 0; i + 1 < nd; ++i) {
    if (x.size(i) == 1) continue;
    dims.push_back({x.size(i), x.stride(i), y.stride(i), table_stride(cos, i, nd), table_stride(sin, i, nd)});
  }
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& a, const Dim& b) { return a.ys > b.ys; });
  std::vector<Dim> merged;
  for (const Dim& d : dims) {
    if (!merged.empty()) {
      Dim& o = merged.back();
      if (o.xs == d.xs * d.size && o.ys == d.ys * d.size && o.cs == d.cs * d.size && o.ss == d.ss * d.size) {
        o = {o.size * d.size, d.xs, d.ys, d.cs, d.ss};
        continue;
      }
    }
    merged.push_back(d);
  }
  l.ndim = static_cast<int>(merged.size());
  l.rows = 1;
  for (int i = 0; i < l.ndim; ++i) {
    l.size[i] = merged[i].size;
    l.x_stride[i] = merged[i].xs;
    l.y_stride[i] = merged[i].ys;
    l.cos_stride[i] = merged[i].cs;
    l.sin_stride[i] = merged[i].ss;
    l.rows *= merged[i].size;
  }
  return l;
}

RopeOperand make_operand(const Tensor& x, at::IntArrayRef order_strides, const Table& cos, const Table& sin) {
  RopeOperand o;
  o.input = head_dim_contiguous(x);
  o.output = empty_in_order(x.sizes(), order_strides, x.options());
  o.layout = make_layout(o.input, o.output, cos, sin);
  return o;
}

}  // namespace

RopeProblem prepare_rope_forward(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                 int64_t unsqueeze_dim, bool interleaved) {
  const char* op = kForwardOp;
  check::floating(op, "q", q);
  same_device_and_dtype(op, "k", k, "q", q);
  same_device_and_dtype(op, "cos", cos, "q", q);
  same_device_and_dtype(op, "sin", sin, "q", q);
  check_rank(op, "q", q);
  check_rank(op, "k", k);
  const Table c = unsqueezed(op, "cos", cos, unsqueeze_dim);
  const Table s = unsqueezed(op, "sin", sin, unsqueeze_dim);
  check_tables(op, c, cos, s, sin);
  check_fits(op, "q", q, "cos", cos, c, unsqueeze_dim);
  check_fits(op, "q", q, "sin", sin, s, unsqueeze_dim);
  check_fits(op, "k", k, "cos", cos, c, unsqueeze_dim);
  check_fits(op, "k", k, "sin", sin, s, unsqueeze_dim);

  RopeProblem p;
  const Tensor qc = head_dim_contiguous(q);
  const Tensor kc = head_dim_contiguous(k);
  p.q = make_operand(qc, qc.strides(), c, s);
  p.k = make_operand(kc, kc.strides(), c, s);
  p.cos = c.t;
  p.sin = s.t;
  p.rotary_dim = c.rotary_dim();
  p.interleaved = interleaved;
  p.backward = false;
  return p;
}

RopeProblem prepare_rope_backward(const std::optional<Tensor>& grad_q_embed, const std::optional<Tensor>& grad_k_embed,
                                  const Tensor& cos, const Tensor& sin, int64_t unsqueeze_dim, bool interleaved,
                                  at::IntArrayRef q_stride, at::IntArrayRef k_stride) {
  const char* op = kBackwardOp;
  const Tensor* ref = nullptr;
  const char* ref_name = nullptr;
  if (grad_q_embed) {
    check::floating(op, "grad_q_embed", *grad_q_embed);
    ref = &*grad_q_embed;
    ref_name = "grad_q_embed";
  }
  if (grad_k_embed) {
    if (ref != nullptr) {
      same_device_and_dtype(op, "grad_k_embed", *grad_k_embed, ref_name, *ref);
    } else {
      check::floating(op, "grad_k_embed", *grad_k_embed);
      ref = &*grad_k_embed;
      ref_name = "grad_k_embed";
    }
  }
  if (ref != nullptr) {
    same_device_and_dtype(op, "cos", cos, ref_name, *ref);
    same_device_and_dtype(op, "sin", sin, ref_name, *ref);
  }
  if (grad_q_embed) check_rank(op, "grad_q_embed", *grad_q_embed);
  if (grad_k_embed) check_rank(op, "grad_k_embed", *grad_k_embed);
  const Table c = unsqueezed(op, "cos", cos, unsqueeze_dim);
  const Table s = unsqueezed(op, "sin", sin, unsqueeze_dim);
  check_tables(op, c, cos, s, sin);
  auto check_grad = [&](const std::optional<Tensor>& g, const char* name, const char* stride_name,
                        at::IntArrayRef stride) {
    if (!g) return;
    check_fits(op, name, *g, "cos", cos, c, unsqueeze_dim);
    check_fits(op, name, *g, "sin", sin, s, unsqueeze_dim);
    require(
        static_cast<int64_t>(stride.size()) == g->dim(), op, stride_name,
        [&] { return c10::str("to have one entry per dimension of ", name, " (", g->dim(), ")"); },
        [&] { return c10::str(stride.size(), " entries"); });
  };
  check_grad(grad_q_embed, "grad_q_embed", "q_stride", q_stride);
  check_grad(grad_k_embed, "grad_k_embed", "k_stride", k_stride);

  RopeProblem p;
  auto operand = [&](const std::optional<Tensor>& g, at::IntArrayRef stride) {
    if (g) return make_operand(*g, stride, c, s);
    RopeOperand none;
    none.output = at::empty({0}, cos.options());
    return none;
  };
  p.q = operand(grad_q_embed, q_stride);
  p.k = operand(grad_k_embed, k_stride);
  p.cos = c.t;
  p.sin = s.t;
  p.rotary_dim = c.rotary_dim();
  p.interleaved = interleaved;
  p.backward = true;
  return p;
}

namespace {

cpu::RopeRows cpu_rows(const RopeOperand& o) {
  cpu::RopeRows r;
  r.layout = o.layout;
  if (o.layout.rows > 0) {
    r.x = o.input.const_data_ptr();
    r.y = o.output.mutable_data_ptr();
  }
  return r;
}

struct CpuRopeBackend {
  static void apply(RopeProblem& p) {
    if (p.rows() == 0) return;
    cpu::RopeArgs a;
    a.q = cpu_rows(p.q);
    a.k = cpu_rows(p.k);
    a.cos = p.cos.const_data_ptr();
    a.sin = p.sin.const_data_ptr();
    a.rotary_dim = p.rotary_dim;
    a.interleaved = p.interleaved;
    a.backward = p.backward;
    a.dtype = p.cos.scalar_type();
    cpu::rope_kernels().apply(a);
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(torch_wsl, m) {
  m.def(
      "apply_rotary_pos_emb(Tensor q, Tensor k, Tensor cos, Tensor sin, int unsqueeze_dim=1, bool interleaved=False)"
      " -> (Tensor q_embed, Tensor k_embed)");
  m.def(
      "apply_rotary_pos_emb_backward(Tensor? grad_q_embed, Tensor? grad_k_embed, Tensor cos, Tensor sin, "
      "int unsqueeze_dim, bool interleaved, SymInt[] q_stride, SymInt[] k_stride) -> (Tensor grad_q, Tensor grad_k)");
}

TORCH_LIBRARY_IMPL(torch_wsl, CPU, m) { register_rope_kernels<CpuRopeBackend>(m); }

}  // namespace torch_wsl
