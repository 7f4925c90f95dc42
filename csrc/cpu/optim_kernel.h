// CPU kernels of the fused optimizers and of gradient clipping, one build per
// ISA (see isa.h). The operator layer (csrc/optim.cpp) validates the tensor
// lists and reads the host-side scalars (steps, lr, grad_scale); these
// functions only compute, on dense tensors given by data pointer and length.
//
// Every kernel makes one parallel pass over all tensors of a call: the tensors
// are cut into chunks (multi_tensor_chunks) that the threads of one
// at::parallel_for region claim one after another; each chunk is one
// vectorized loop.
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/ScalarType.h>

#include "cpu/kernel_table.h"
#include "dtypes.h"
#include "optim_math.h"

namespace torch_wsl::cpu {

// A piece of one tensor of a multi-tensor call: elements [begin, end) of tensor `index`.
struct TensorChunk {
  int64_t index;
  int64_t begin;
  int64_t end;
};

// Chunks of at most `chunk` elements (a multiple of 64 bytes of any dtype, so
// only a tensor's last chunk has a vector tail), in tensor order.
std::vector<TensorChunk> multi_tensor_chunks(const std::vector<int64_t>& numels, int64_t chunk);

// One tensor of an Adam(W) step: data of `dtype` (float, double, half,
// bfloat16), all of `numel` elements and one layout. max_exp_avg_sq is null
// unless amsgrad.
struct AdamTensor {
  void* param = nullptr;
  void* grad = nullptr;
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  void* max_exp_avg_sq = nullptr;
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
  double step = 1.0;  // this step's count (the state step after the increment)
};

struct AdamArgs {
  std::vector<AdamTensor> tensors;
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double weight_decay = 0.0;
  double eps = 1e-8;
  bool amsgrad = false;
  bool maximize = false;
  bool decoupled_weight_decay = false;  // AdamW
  // AMP: grads are divided by grad_scale and the unscaled values written back.
  bool unscale = false;
  double grad_scale = 1.0;
};

struct SgdTensor {
  void* param = nullptr;
  void* grad = nullptr;
  void* momentum_buffer = nullptr;  // null without momentum
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

struct SgdArgs {
  std::vector<SgdTensor> tensors;
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool maximize = false;
  bool first_step = false;  // momentum buffers are set from the gradient
  bool unscale = false;
  double grad_scale = 1.0;
};

struct NormTensor {
  const void* data = nullptr;
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

// norm_order: 0 = inf, 1, 2 (optim_math::NormOrder).
struct NormArgs {
  std::vector<NormTensor> tensors;
  int norm_order = 2;
};

struct ScaleTensor {
  void* data = nullptr;
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

// Entry points: dispatch on the active ISA.
void adam_step(const AdamArgs& args);
void sgd_step(const SgdArgs& args);
// The norm of all tensors together, in double; NaN/inf propagate.
double total_norm(const NormArgs& args);
// tensors *= coef (in the accumulation type), in place.
void scale_(const std::vector<ScaleTensor>& tensors, double coef);

// The per-ISA kernels behind the entry points (cpu/kernel_table.h).
struct OptimKernels {
  void (*adam_step)(const AdamArgs& args, const std::vector<TensorChunk>& chunks);
  void (*sgd_step)(const SgdArgs& args, const std::vector<TensorChunk>& chunks);
  void (*norm_partials)(const NormArgs& args, const std::vector<TensorChunk>& chunks, double* partials);
  void (*scale_)(const std::vector<ScaleTensor>& tensors, double coef, const std::vector<TensorChunk>& chunks);
};
TORCH_WSL_DECLARE_CPU_KERNELS(OptimKernels, optim_kernels)

}  // namespace torch_wsl::cpu
