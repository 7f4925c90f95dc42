// CPU kernels of the gated MLP activations, one build per ISA (see isa.h).
// The operator layer (csrc/activation.cpp) validates arguments, forms the
// [rows, cols] views and allocates outputs; these functions only compute.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "activation_math.h"
#include "cpu/kernel_table.h"
#include "dtypes.h"

namespace torch_wsl::cpu {

// Every pointer is to [rows, cols] elements of `dtype`, element (r, c) at
// ptr + r * <its row stride> + c (strides in elements, any value for inputs;
// outputs do not overlap each other or the inputs).
struct GatedForwardArgs {
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
  int64_t gate_stride = 0;
  int64_t up_stride = 0;
  int64_t out_stride = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  act_math::Activation act = act_math::Activation::kSilu;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

struct GatedBackwardArgs {
  const void* grad_output = nullptr;
  const void* gate = nullptr;
  const void* up = nullptr;
  void* grad_gate = nullptr;
  void* grad_up = nullptr;
  int64_t grad_output_stride = 0;
  int64_t gate_stride = 0;
  int64_t up_stride = 0;
  int64_t grad_gate_stride = 0;
  int64_t grad_up_stride = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  act_math::Activation act = act_math::Activation::kSilu;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

// The kernels of the ISA in use: cpu::activation_kernels().forward(args).
struct ActivationKernels {
  void (*forward)(const GatedForwardArgs& args);
  void (*backward)(const GatedBackwardArgs& args);
};
TORCH_WSL_DECLARE_CPU_KERNELS(ActivationKernels, activation_kernels)

}  // namespace torch_wsl::cpu
