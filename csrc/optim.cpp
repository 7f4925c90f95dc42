// Fused multi-tensor optimizers and gradient clipping: schemas, argument
// checks, and the CPU kernels' registration. The CUDA registration is in
// cuda/optim_kernels.cu.
#include "optim.h"

#include <cmath>
#include <limits>
#include <string>

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>

#include "checks.h"
#include "cpu/optim_kernel.h"
#include "dtypes.h"
#include "optim_math.h"

namespace torch_wsl {
namespace {

std::string item_name(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

void check_length(const char* op, const char* list, size_t got, size_t want) {
  TORCH_CHECK(got == want, "torch_wsl.", op, ": expected ", list, " to hold ", want,
              " tensors (one per param), got ", got);
}

void check_device(const char* op, const std::string& name, const Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "torch_wsl.", op, ": expected ", name, " to be on the device of params[0] (",
              device, "), got ", t.device(), "; a call takes the tensors of one device");
}

void check_param(const char* op, size_t i, const Tensor& p, const at::Device& device) {
  const std::string name = item_name("params", i);
  TORCH_CHECK(p.defined(), "torch_wsl.", op, ": expected ", name, " to be a tensor, got None");
  TORCH_CHECK(p.layout() == at::kStrided, "torch_wsl.", op, ": expected ", name, " to be a dense tensor, got layout ",
              p.layout());
  TORCH_CHECK(!at::isComplexType(p.scalar_type()), "torch_wsl.", op, ": expected ", name,
              " to be real: complex parameters are not supported (optimize torch.view_as_real(param) instead), got ",
              check::dtype_name(p.scalar_type()));
  check::floating(op, name, p);
  check_device(op, name, p, device);
}

// grads[i], exp_avgs[i], ...: param i's shape, dtype and device.
void check_like_param(const char* op, const char* list, size_t i, const Tensor& t, const Tensor& p,
                      const at::Device& device) {
  const std::string name = item_name(list, i);
  TORCH_CHECK(t.defined(), "torch_wsl.", op, ": expected ", name, " to be a tensor, got None");
  TORCH_CHECK(t.layout() == at::kStrided, "torch_wsl.", op, ": expected ", name,
              " to be a dense tensor, got layout ", t.layout(),
              (std::string(list) == "grads" ? " (sparse gradients are not supported)" : ""));
  check_device(op, name, t, device);
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), "torch_wsl.", op, ": expected ", name, " to have the dtype of params[",
              i, "] (", check::dtype_name(p.scalar_type()), "), got ", check::dtype_name(t.scalar_type()));
  TORCH_CHECK(t.sizes() == p.sizes(), "torch_wsl.", op, ": expected ", name, " to have the shape of params[", i, "] ",
              p.sizes(), ", got ", t.sizes());
}

// A one-element float32 tensor on `device` (state steps, grad_scale, found_inf).
void check_scalar_f32(const char* op, const std::string& name, const Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.layout() == at::kStrided && t.numel() == 1 && t.scalar_type() == at::kFloat, "torch_wsl.", op,
              ": expected ", name, " to be a one-element float32 tensor, got shape ", t.sizes(), " and dtype ",
              check::dtype_name(t.scalar_type()));
  check_device(op, name, t, device);
}

void check_lr_tensor(const char* op, const Tensor& lr, const at::Device& device) {
  TORCH_CHECK(lr.numel() == 1 && at::isFloatingType(lr.scalar_type()), "torch_wsl.", op,
              ": expected lr to be a one-element floating tensor, got shape ", lr.sizes(), " and dtype ",
              check::dtype_name(lr.scalar_type()));
  TORCH_CHECK(lr.device() == device || lr.is_cpu(), "torch_wsl.", op,
              ": expected lr to be on the CPU or on the device of params[0] (", device, "), got ", lr.device());
}

// A tensor the operator writes must not have elements that share memory
// (e.g. from expand()): its staged copy could not be written back, and that
// failure would come after the kernel had updated the other tensors. Checked
// while preparing, before anything is written.
void check_writable(const Tensor& t) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes,
              "torch_wsl: a tensor the operator writes (a parameter, optimizer state, or a gradient it unscales or "
              "clips) has internally overlapping memory (e.g. from expand()); clone() it first");
}

// The tensor the kernel uses for `t`: `t` itself when it is dense in `layout`'s
// strides, else a staged copy in that layout (copied back by Staging::finish
// when `written`).
Tensor usable(const Tensor& t, const Tensor& layout, bool written, Staging& staging) {
  if (written) check_writable(t);
  if (t.is_non_overlapping_and_dense() && t.strides() == layout.strides()) return t;
  Tensor staged = at::empty_like(layout);
  staged.copy_(t);
  if (written) staging.write_back.emplace_back(t, staged);
  return staged;
}

// The layout all of param i's tensors are brought to: the param's own when it
// is dense (so nothing is copied in the usual case), else a contiguous copy.
Tensor layout_of(const Tensor& p, Staging& staging) {
  check_writable(p);
  if (p.is_non_overlapping_and_dense()) return p;
  Tensor staged = p.contiguous();
  staging.write_back.emplace_back(p, staged);
  return staged;
}

void check_hyper(const char* op, const char* name, double value, bool ok, const char* want) {
  TORCH_CHECK(ok, "torch_wsl.", op, ": expected ", name, " ", want, ", got ", value);
}

}  // namespace

void Staging::finish() {
  for (auto& [original, staged] : write_back) original.copy_(staged);
  write_back.clear();
}

AdamCall prepare_adam(const char* op, bool decoupled, at::TensorList params, at::TensorList grads,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                      at::TensorList state_steps, double lr, const OptTensor& lr_tensor, double beta1, double beta2,
                      double weight_decay, double eps, bool amsgrad, bool maximize, const OptTensor& grad_scale,
                      const OptTensor& found_inf) {
  const size_t n = params.size();
  check_length(op, "grads", grads.size(), n);
  check_length(op, "exp_avgs", exp_avgs.size(), n);
  check_length(op, "exp_avg_sqs", exp_avg_sqs.size(), n);
  check_length(op, "state_steps", state_steps.size(), n);
  if (amsgrad) {
    check_length(op, "max_exp_avg_sqs", max_exp_avg_sqs.size(), n);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, "torch_wsl.", op,
                ": expected max_exp_avg_sqs to be empty or hold ", n, " tensors, got ", max_exp_avg_sqs.size());
  }
  check_hyper(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyper(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyper(op, "eps", eps, eps >= 0.0, ">= 0");
  AdamCall c;
  c.lr = lr;
  c.beta1 = beta1;
  c.beta2 = beta2;
  c.weight_decay = weight_decay;
  c.eps = eps;
  c.amsgrad = amsgrad;
  c.maximize = maximize;
  c.decoupled_weight_decay = decoupled;
  if (n == 0) return c;

  const at::Device device = params[0].defined() ? params[0].device() : at::Device(at::kCPU);
  for (const auto i : c10::irange(n)) {
    const Tensor& p = params[i];
    check_param(op, i, p, device);
    check_like_param(op, "grads", i, grads[i], p, device);
    check_like_param(op, "exp_avgs", i, exp_avgs[i], p, device);
    check_like_param(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, device);
    if (amsgrad) check_like_param(op, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], p, device);
    check_scalar_f32(op, item_name("state_steps", i), state_steps[i], device);
  }
  if (lr_tensor) check_lr_tensor(op, *lr_tensor, device);
  if (grad_scale) check_scalar_f32(op, "grad_scale", *grad_scale, device);
  if (found_inf) check_scalar_f32(op, "found_inf", *found_inf, device);
  if (!lr_tensor) check_hyper(op, "lr", lr, lr >= 0.0, ">= 0");

  // Checks done: from here on nothing can fail but the kernel itself.
  c.lr_tensor = lr_tensor ? *lr_tensor : Tensor();
  c.grad_scale = grad_scale ? *grad_scale : Tensor();
  c.found_inf = found_inf ? *found_inf : Tensor();
  const bool unscale = c.grad_scale.defined();
  c.steps.assign(state_steps.begin(), state_steps.end());
  for (const auto i : c10::irange(n)) {
    if (params[i].numel() == 0) continue;
    const Tensor layout = layout_of(params[i], c.staging);
    c.params.push_back(layout);
    c.grads.push_back(usable(grads[i], layout, unscale, c.staging));
    c.exp_avgs.push_back(usable(exp_avgs[i], layout, true, c.staging));
    c.exp_avg_sqs.push_back(usable(exp_avg_sqs[i], layout, true, c.staging));
    if (amsgrad) c.max_exp_avg_sqs.push_back(usable(max_exp_avg_sqs[i], layout, true, c.staging));
    c.work_steps.push_back(state_steps[i]);
  }
  return c;
}

SgdCall prepare_sgd(const char* op, at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    double weight_decay, double momentum, double lr, const OptTensor& lr_tensor, double dampening,
                    bool nesterov, bool maximize, bool is_first_step, const OptTensor& grad_scale,
                    const OptTensor& found_inf) {
  const size_t n = params.size();
  check_length(op, "grads", grads.size(), n);
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) {
    check_length(op, "momentum_buffers", momentum_buffers.size(), n);
  } else {
    TORCH_CHECK(momentum_buffers.empty() || momentum_buffers.size() == n, "torch_wsl.", op,
                ": expected momentum_buffers to be empty or hold ", n, " tensors, got ", momentum_buffers.size());
  }
  check_hyper(op, "momentum", momentum, momentum >= 0.0, ">= 0");
  TORCH_CHECK(!nesterov || (momentum > 0.0 && dampening == 0.0), "torch_wsl.", op,
              ": nesterov momentum requires momentum > 0 and dampening == 0, got momentum ", momentum,
              " and dampening ", dampening);
  SgdCall c;
  c.lr = lr;
  c.momentum = momentum;
  c.dampening = dampening;
  c.weight_decay = weight_decay;
  c.nesterov = nesterov;
  c.maximize = maximize;
  c.first_step = is_first_step;
  if (n == 0) return c;

  const at::Device device = params[0].defined() ? params[0].device() : at::Device(at::kCPU);
  for (const auto i : c10::irange(n)) {
    check_param(op, i, params[i], device);
    check_like_param(op, "grads", i, grads[i], params[i], device);
    if (has_momentum) check_like_param(op, "momentum_buffers", i, momentum_buffers[i], params[i], device);
  }
  if (lr_tensor) check_lr_tensor(op, *lr_tensor, device);
  if (grad_scale) check_scalar_f32(op, "grad_scale", *grad_scale, device);
  if (found_inf) check_scalar_f32(op, "found_inf", *found_inf, device);
  if (!lr_tensor) check_hyper(op, "lr", lr, lr >= 0.0, ">= 0");

  c.lr_tensor = lr_tensor ? *lr_tensor : Tensor();
  c.grad_scale = grad_scale ? *grad_scale : Tensor();
  c.found_inf = found_inf ? *found_inf : Tensor();
  const bool unscale = c.grad_scale.defined();
  for (const auto i : c10::irange(n)) {
    if (params[i].numel() == 0) continue;
    const Tensor layout = layout_of(params[i], c.staging);
    c.params.push_back(layout);
    c.grads.push_back(usable(grads[i], layout, unscale, c.staging));
    // On the first step the buffer is only written, so a staged copy need not be filled.
    if (has_momentum) c.momentum_buffers.push_back(usable(momentum_buffers[i], layout, true, c.staging));
  }
  return c;
}

NormCall prepare_total_norm(at::TensorList tensors, double norm_type) {
  const char* op = "total_norm";
  NormCall c;
  if (std::isinf(norm_type) && norm_type > 0) {
    c.norm_order = 0;
  } else if (norm_type == 1.0) {
    c.norm_order = 1;
  } else if (norm_type == 2.0) {
    c.norm_order = 2;
  } else {
    TORCH_CHECK(false, "torch_wsl.", op, ": expected norm_type to be 1, 2 or inf, got ", norm_type,
                " (torch.nn.utils.get_total_norm computes other orders)");
  }
  c.device = tensors[0].device();
  bool first = true;
  for (const auto i : c10::irange(tensors.size())) {
    const Tensor& t = tensors[i];
    const std::string name = item_name("tensors", i);
    TORCH_CHECK(t.defined() && t.layout() == at::kStrided, "torch_wsl.", op, ": expected ", name,
                " to be a dense tensor");
    check::floating(op, name, t);
    TORCH_CHECK(t.device() == c.device, "torch_wsl.", op, ": expected ", name, " to be on the device of tensors[0] (",
                c.device, "), got ", t.device());
    c.out_dtype = first ? t.scalar_type() : at::promoteTypes(c.out_dtype, t.scalar_type());
    first = false;
  }
  for (const Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    // The norm ignores layout: any dense tensor is read linearly.
    c.tensors.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  }
  return c;
}

Tensor empty_total_norm() { return at::zeros({}, at::TensorOptions().dtype(at::kFloat)); }

ClipCall prepare_clip(at::TensorList grads, double max_norm, const Tensor& total_norm) {
  const char* op = "clip_grads_with_norm_";
  ClipCall c;
  c.max_norm = max_norm;
  TORCH_CHECK(total_norm.numel() == 1 && is_kernel_float(total_norm.scalar_type()), "torch_wsl.", op,
              ": expected total_norm to be a one-element floating tensor, got shape ", total_norm.sizes(),
              " and dtype ", check::dtype_name(total_norm.scalar_type()));
  if (grads.empty()) return c;
  const at::Device device = grads[0].device();
  for (const auto i : c10::irange(grads.size())) {
    const Tensor& g = grads[i];
    const std::string name = item_name("grads", i);
    TORCH_CHECK(g.defined() && g.layout() == at::kStrided, "torch_wsl.", op, ": expected ", name,
                " to be a dense tensor (sparse gradients are not supported)");
    check::floating(op, name, g);
    TORCH_CHECK(g.device() == device, "torch_wsl.", op, ": expected ", name, " to be on the device of grads[0] (",
                device, "), got ", g.device());
  }
  TORCH_CHECK(total_norm.device() == device, "torch_wsl.", op, ": expected total_norm to be on the device of grads (",
              device, "), got ", total_norm.device());
  c.total_norm = total_norm;
  for (const Tensor& g : grads) {
    if (g.numel() == 0) continue;
    c.grads.push_back(layout_of(g, c.staging));
  }
  return c;
}

namespace {

float read_f32(const Tensor& t) { return *t.const_data_ptr<float>(); }

// lr, whichever overload gave it (a CPU tensor is read on the host: no sync).
double host_lr(double lr, const Tensor& lr_tensor) { return lr_tensor.defined() ? lr_tensor.item<double>() : lr; }

struct CpuOptimBackend {
  static void adam(AdamCall& c) {
    if (c.found_inf.defined() && read_f32(c.found_inf) != 0.0f) return;  // AMP skipped this step
    cpu::AdamArgs a;
    a.lr = host_lr(c.lr, c.lr_tensor);
    a.beta1 = c.beta1;
    a.beta2 = c.beta2;
    a.weight_decay = c.weight_decay;
    a.eps = c.eps;
    a.amsgrad = c.amsgrad;
    a.maximize = c.maximize;
    a.decoupled_weight_decay = c.decoupled_weight_decay;
    a.unscale = c.grad_scale.defined();
    a.grad_scale = a.unscale ? read_f32(c.grad_scale) : 1.0;
    a.tensors.reserve(c.params.size());
    for (const auto i : c10::irange(c.params.size())) {
      cpu::AdamTensor t;
      t.param = c.params[i].mutable_data_ptr();
      t.grad = c.grads[i].mutable_data_ptr();
      t.exp_avg = c.exp_avgs[i].mutable_data_ptr();
      t.exp_avg_sq = c.exp_avg_sqs[i].mutable_data_ptr();
      t.max_exp_avg_sq = c.amsgrad ? c.max_exp_avg_sqs[i].mutable_data_ptr() : nullptr;
      t.numel = c.params[i].numel();
      t.dtype = c.params[i].scalar_type();
      t.step = static_cast<double>(read_f32(c.work_steps[i])) + 1.0;
      a.tensors.push_back(t);
    }
    cpu::adam_step(a);
    for (Tensor& s : c.steps) *s.mutable_data_ptr<float>() += 1.0f;
  }

  static void sgd(SgdCall& c) {
    if (c.found_inf.defined() && read_f32(c.found_inf) != 0.0f) return;
    cpu::SgdArgs a;
    a.lr = host_lr(c.lr, c.lr_tensor);
    a.momentum = c.momentum;
    a.dampening = c.dampening;
    a.weight_decay = c.weight_decay;
    a.nesterov = c.nesterov;
    a.maximize = c.maximize;
    a.first_step = c.first_step;
    a.unscale = c.grad_scale.defined();
    a.grad_scale = a.unscale ? read_f32(c.grad_scale) : 1.0;
    a.tensors.reserve(c.params.size());
    for (const auto i : c10::irange(c.params.size())) {
      cpu::SgdTensor t;
      t.param = c.params[i].mutable_data_ptr();
      t.grad = c.grads[i].mutable_data_ptr();
      t.momentum_buffer = c.momentum_buffers.empty() ? nullptr : c.momentum_buffers[i].mutable_data_ptr();
      t.numel = c.params[i].numel();
      t.dtype = c.params[i].scalar_type();
      a.tensors.push_back(t);
    }
    cpu::sgd_step(a);
  }

  static Tensor total_norm(NormCall& c) {
    cpu::NormArgs a;
    a.norm_order = c.norm_order;
    for (const Tensor& t : c.tensors) a.tensors.push_back({t.const_data_ptr(), t.numel(), t.scalar_type()});
    const double norm = cpu::total_norm(a);
    return at::scalar_tensor(norm, at::TensorOptions().dtype(c.out_dtype).device(c.device));
  }

  static void clip(ClipCall& c) {
    if (c.grads.empty()) return;
    const double total = c.total_norm.item<double>();
    // The coefficient in the total norm's accumulation type, as torch computes it on that tensor.
    const double coef = c.total_norm.scalar_type() == at::kDouble
                            ? optim_math::clip_coef<double>(total, c.max_norm)
                            : static_cast<double>(optim_math::clip_coef<float>(static_cast<float>(total),
                                                                               static_cast<float>(c.max_norm)));
    std::vector<cpu::ScaleTensor> tensors;
    tensors.reserve(c.grads.size());
    for (const Tensor& g : c.grads) tensors.push_back({g.mutable_data_ptr(), g.numel(), g.scalar_type()});
    cpu::scale_(tensors, coef);
  }
};

// Registered for the sparse dispatch keys, which a sparse gradient selects:
// the argument checks then reject it with a message naming the tensor,
// instead of the dispatcher's "could not run with arguments from SparseCPU".
struct SparseRejectingBackend {
  [[noreturn]] static void unreachable() {
    TORCH_CHECK(false, "torch_wsl: optimizer operators do not support sparse tensors");
  }
  static void adam(AdamCall&) { unreachable(); }
  static void sgd(SgdCall&) { unreachable(); }
  static Tensor total_norm(NormCall&) { unreachable(); }
  static void clip(ClipCall&) { unreachable(); }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(torch_wsl, m) {
  // Adam and AdamW, as torch's _fused_adam_ / _fused_adamw_, with two
  // differences: state_steps are incremented by the operator itself (so one
  // operator is the whole step), and grads are mutable because with
  // grad_scale the unscaled gradients are written back (as torch's fused
  // kernels do). Skipped entirely, steps included, when found_inf is nonzero.
  const char* adam_args =
      "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()";
  const char* adam_tensor_lr_args =
      "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, Tensor lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()";
  m.def((std::string("adam_") + adam_args).c_str());
  m.def((std::string("adam_.tensor_lr") + adam_tensor_lr_args).c_str());
  m.def((std::string("adamw_") + adam_args).c_str());
  m.def((std::string("adamw_.tensor_lr") + adam_tensor_lr_args).c_str());
  // SGD as torch's _fused_sgd_: is_first_step sets the momentum buffers from the gradients.
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, float weight_decay, "
      "float momentum, float lr, float dampening, bool nesterov, bool maximize, bool is_first_step, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "sgd_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, "
      "float weight_decay, float momentum, Tensor lr, float dampening, bool nesterov, bool maximize, "
      "bool is_first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // The norm of all tensors together (norm_type 1, 2 or inf), a 0-dim tensor
  // of their promoted dtype on their device; and grads *= min(max_norm /
  // (total_norm + 1e-6), 1) with the coefficient computed on the device.
  m.def("total_norm(Tensor[] tensors, float norm_type=2.0) -> Tensor");
  m.def("clip_grads_with_norm_(Tensor(a!)[] grads, float max_norm, Tensor total_norm) -> ()");
}

TORCH_LIBRARY_IMPL(torch_wsl, CPU, m) { register_optim_kernels<CpuOptimBackend>(m); }
TORCH_LIBRARY_IMPL(torch_wsl, SparseCPU, m) { register_optim_kernels<SparseRejectingBackend>(m); }
TORCH_LIBRARY_IMPL(torch_wsl, SparseCUDA, m) { register_optim_kernels<SparseRejectingBackend>(m); }

}  // namespace torch_wsl
