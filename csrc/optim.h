// The operator layer of the fused multi-tensor optimizers (adam_, adamw_,
// sgd_) and of gradient clipping (total_norm, clip_grads_with_norm_), shared
// by the CPU (csrc/optim.cpp) and CUDA (csrc/cuda/optim_kernels.cu)
// registrations: argument checks with messages that name the argument, the
// staging of tensors the kernels cannot address linearly, and the
// registration of every operator for one backend. A backend supplies
// `adam(AdamCall&)`, `sgd(SgdCall&)`, `total_norm(NormCall&)` and `clip(ClipCall&)`.
//
// All checks run before anything is written: a bad list is an error, never a
// partial update.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace torch_wsl {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Tensors the kernels read or write in place of a caller's tensor that was not
// dense in the parameter's layout; copied back (when written) after the kernel.
struct Staging {
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (caller's tensor, staged copy)
  void finish();
};

// One call of adam_ / adamw_. The work lists hold the tensors with elements,
// each dense and in its parameter's layout; `steps` holds every state step
// (an empty parameter's step advances too) and `work_steps` the step of each
// work tensor.
struct AdamCall {
  std::vector<Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, work_steps;
  std::vector<Tensor> steps;
  double lr = 0.0;
  Tensor lr_tensor;  // defined for the tensor_lr overload
  double beta1 = 0.0, beta2 = 0.0, weight_decay = 0.0, eps = 0.0;
  bool amsgrad = false, maximize = false, decoupled_weight_decay = false;
  Tensor grad_scale;  // undefined when absent
  Tensor found_inf;   // undefined when absent
  Staging staging;
};

struct SgdCall {
  std::vector<Tensor> params, grads, momentum_buffers;  // buffers empty without momentum
  double lr = 0.0;
  Tensor lr_tensor;
  double momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false, maximize = false, first_step = false;
  Tensor grad_scale;
  Tensor found_inf;
  Staging staging;
};

// norm_order: 0 = inf, 1, 2 (optim_math::NormOrder).
struct NormCall {
  std::vector<Tensor> tensors;  // dense, with elements
  int norm_order = 2;
  at::ScalarType out_dtype = at::kFloat;
  at::Device device = at::kCPU;
};

struct ClipCall {
  std::vector<Tensor> grads;  // dense, with elements
  Tensor total_norm;          // one element, on the grads' device
  double max_norm = 0.0;
  Staging staging;
};

AdamCall prepare_adam(const char* op, bool decoupled, at::TensorList params, at::TensorList grads,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                      at::TensorList state_steps, double lr, const OptTensor& lr_tensor, double beta1, double beta2,
                      double weight_decay, double eps, bool amsgrad, bool maximize, const OptTensor& grad_scale,
                      const OptTensor& found_inf);
SgdCall prepare_sgd(const char* op, at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    double weight_decay, double momentum, double lr, const OptTensor& lr_tensor, double dampening,
                    bool nesterov, bool maximize, bool is_first_step, const OptTensor& grad_scale,
                    const OptTensor& found_inf);
NormCall prepare_total_norm(at::TensorList tensors, double norm_type);
// The total norm of no tensors: a float32 zero on the CPU, as torch's.
Tensor empty_total_norm();
ClipCall prepare_clip(at::TensorList grads, double max_norm, const Tensor& total_norm);

// Registers adam_, adamw_, sgd_ (each with its .tensor_lr overload),
// total_norm and clip_grads_with_norm_ for one dispatch key.
template <typename Backend>
void register_optim_kernels(torch::Library& m) {
  auto adam_like = [](const char* op, bool decoupled) {
    return [op, decoupled](at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                           const OptTensor& lr_tensor, double lr, double beta1, double beta2, double weight_decay,
                           double eps, bool amsgrad, bool maximize, const OptTensor& grad_scale,
                           const OptTensor& found_inf) {
      AdamCall c = prepare_adam(op, decoupled, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                                lr_tensor, beta1, beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf);
      Backend::adam(c);
      c.staging.finish();
    };
  };
  // The schemas differ only in lr's type; both land in one function.
  auto adam_float = [](auto fn) {
    return [fn](at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
                double weight_decay, double eps, bool amsgrad, bool maximize, const OptTensor& grad_scale,
                const OptTensor& found_inf) {
      fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, std::nullopt, lr, beta1, beta2,
         weight_decay, eps, amsgrad, maximize, grad_scale, found_inf);
    };
  };
  auto adam_tensor = [](auto fn) {
    return [fn](at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const Tensor& lr, double beta1,
                double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                const OptTensor& grad_scale, const OptTensor& found_inf) {
      fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, 0.0, beta1, beta2, weight_decay, eps,
         amsgrad, maximize, grad_scale, found_inf);
    };
  };
  m.impl("adam_", adam_float(adam_like("adam_", false)));
  m.impl("adam_.tensor_lr", adam_tensor(adam_like("adam_", false)));
  m.impl("adamw_", adam_float(adam_like("adamw_", true)));
  m.impl("adamw_.tensor_lr", adam_tensor(adam_like("adamw_", true)));

  auto sgd = [](at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double weight_decay,
                double momentum, const OptTensor& lr_tensor, double lr, double dampening, bool nesterov,
                bool maximize, bool is_first_step, const OptTensor& grad_scale, const OptTensor& found_inf) {
    SgdCall c = prepare_sgd("sgd_", params, grads, momentum_buffers, weight_decay, momentum, lr, lr_tensor, dampening,
                            nesterov, maximize, is_first_step, grad_scale, found_inf);
    Backend::sgd(c);
    c.staging.finish();
  };
  m.impl("sgd_", [sgd](at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                       double weight_decay, double momentum, double lr, double dampening, bool nesterov,
                       bool maximize, bool is_first_step, const OptTensor& grad_scale, const OptTensor& found_inf) {
    sgd(params, grads, momentum_buffers, weight_decay, momentum, std::nullopt, lr, dampening, nesterov, maximize,
        is_first_step, grad_scale, found_inf);
  });
  m.impl("sgd_.tensor_lr", [sgd](at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                 double weight_decay, double momentum, const Tensor& lr, double dampening,
                                 bool nesterov, bool maximize, bool is_first_step, const OptTensor& grad_scale,
                                 const OptTensor& found_inf) {
    sgd(params, grads, momentum_buffers, weight_decay, momentum, lr, 0.0, dampening, nesterov, maximize,
        is_first_step, grad_scale, found_inf);
  });

  m.impl("total_norm", [](at::TensorList tensors, double norm_type) {
    if (tensors.empty()) return empty_total_norm();
    NormCall c = prepare_total_norm(tensors, norm_type);
    return Backend::total_norm(c);
  });
  m.impl("clip_grads_with_norm_", [](at::TensorList grads, double max_norm, const Tensor& total_norm) {
    ClipCall c = prepare_clip(grads, max_norm, total_norm);
    Backend::clip(c);
    c.staging.finish();
  });
}

}  // namespace torch_wsl
