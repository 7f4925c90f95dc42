// CPU kernels of the LayerNorm / RMSNorm family, one build per ISA (see isa.h).
// The operator layer (csrc/norm.cpp) validates arguments and allocates outputs;
// these functions only compute, on contiguous row-major data.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "cpu/kernel_table.h"
#include "dtypes.h"
#include "norm_math.h"

namespace torch_wsl::cpu {

// Pointers are to contiguous [rows, cols] data of `dtype`, except weight/bias
// (cols values of the accumulation type: float, or double for double inputs)
// and mean/rstd (rows values of the accumulation type). Optional ones are null.
struct NormForwardArgs {
  const void* input = nullptr;
  const void* residual = nullptr;  // when set, residual_out = input + residual is normalized
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* output = nullptr;
  void* residual_out = nullptr;    // set iff residual is set
  void* mean = nullptr;            // LayerNorm only
  void* rstd = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  double eps = 0.0;
  bool center = true;              // LayerNorm (true) or RMSNorm (false)
  bool round_xhat = false;         // the normalized row rounded to dtype before the weight (casting_mode "llama")
  c10::ScalarType dtype = c10::ScalarType::Float;
};

struct NormBackwardArgs {
  const void* grad_output = nullptr;
  const void* grad_residual_out = nullptr;  // optional: gradient flowing past the norm, added to grad_input
  const void* input = nullptr;              // what was normalized (residual_out for the fused add)
  const void* mean = nullptr;               // LayerNorm only
  const void* rstd = nullptr;
  const void* weight = nullptr;             // accumulation type, or null
  void* grad_input = nullptr;
  void* grad_weight = nullptr;              // accumulation type, cols values, or null when not wanted
  void* grad_bias = nullptr;                // accumulation type, cols values, or null when not wanted
  int64_t rows = 0;
  int64_t cols = 0;
  bool center = true;
  bool round_xhat = false;                  // as the forward's: dw sums dy * (xhat rounded to dtype)
  c10::ScalarType dtype = c10::ScalarType::Float;
};

// The kernels of the ISA in use: cpu::norm_kernels().forward(args).
struct NormKernels {
  void (*forward)(const NormForwardArgs& args);
  void (*backward)(const NormBackwardArgs& args);
};
TORCH_WSL_DECLARE_CPU_KERNELS(NormKernels, norm_kernels)

}  // namespace torch_wsl::cpu
