// CPU kernels of the rotary position embedding family, one build per ISA
// (see isa.h). The operator layer (csrc/rope.cpp) validates arguments,
// allocates outputs and lays out the rows; these functions only compute.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "cpu/kernel_table.h"
#include "dtypes.h"
#include "rope_math.h"

namespace torch_wsl::cpu {

// The rows of q or k (or of their gradients): x in, y out, both `dtype`,
// at the layout's element offsets. Unused when layout.rows == 0.
struct RopeRows {
  rope_math::RowLayout layout;
  const void* x = nullptr;
  void* y = nullptr;
};

// Every row of q and of k is rotated in one parallel pass. Its first
// rotary_dim elements rotate (rotate-half or interleaved pairs) against the
// table rows at the layout's cos/sin offsets (rotary_dim values each, dtype
// `dtype`); the rest of the row is copied.
struct RopeArgs {
  RopeRows q;
  RopeRows k;
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t rotary_dim = 0;
  bool interleaved = false;
  bool backward = false;  // the transposed rotation (the gradient)
  c10::ScalarType dtype = c10::ScalarType::Float;
};

// The kernels of the ISA in use: cpu::rope_kernels().apply(args).
struct RopeKernels {
  void (*apply)(const RopeArgs& args);
};
TORCH_WSL_DECLARE_CPU_KERNELS(RopeKernels, rope_kernels)

}  // namespace torch_wsl::cpu
