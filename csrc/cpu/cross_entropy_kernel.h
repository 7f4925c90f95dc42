// CPU kernels of the cross-entropy family, one build per ISA (see isa.h).
// The operator layer (csrc/cross_entropy.cpp) validates arguments (targets in
// range included), allocates outputs and reduces the per-row losses; these
// functions only compute, row by row.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "cpu/kernel_table.h"
#include "cross_entropy_math.h"
#include "dtypes.h"

namespace torch_wsl::cpu {

// What every row pass needs. Logits are `rows` rows of `classes` elements of
// `dtype`, row i starting at logits + i * row_stride (elements; the classes of
// a row are contiguous). Per-row and per-class arrays of the accumulation type
// (float, or double for double logits) are marked "acc".
struct CrossEntropyRows {
  const void* logits = nullptr;
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t row_stride = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
  const void* target = nullptr;  // rows class indices, int64 (or int32 when target_int32), all valid or ignore_index
  bool target_int32 = false;
  int64_t ignore_index = -100;
  const void* weight = nullptr;  // acc, classes values, or null (all 1)
  double weight_sum = 0.0;       // sum of weight (classes when weight is null)
  double label_smoothing = 0.0;
  double softcap = 0.0;          // 0: none
};

// Forward: per-row loss (acc, 0 for ignored rows) and log-sum-exp (acc).
struct CrossEntropyForwardArgs {
  CrossEntropyRows r;
  void* loss = nullptr;  // acc, rows values
  void* lse = nullptr;   // acc, rows values
};

// Gradient of the logits, grad[i, j] = scale_i * d loss_i / d x_ij, written
// to `grad` (rows x classes, row i at grad + i * grad_row_stride, dtype of the
// logits). scale_i = scale[per_row_scale ? i : 0] (dtype scale_dtype) divided
// by *divisor when divisor is set (acc; the "mean" reduction's total weight).
struct CrossEntropyBackwardArgs {
  CrossEntropyRows r;
  const void* lse = nullptr;  // acc, rows values, from the forward
  const void* scale = nullptr;
  c10::ScalarType scale_dtype = c10::ScalarType::Float;
  bool per_row_scale = false;
  const void* divisor = nullptr;
  void* grad = nullptr;
  int64_t grad_row_stride = 0;
};

// Loss and gradient in one call, the gradient overwriting the logits
// (r.logits is written): each row is read from memory once for its
// log-sum-exp, then its gradient is formed from the cached row. Scale as for
// the backward; loss as for the forward.
struct CrossEntropyLossGradArgs {
  CrossEntropyRows r;
  const void* scale = nullptr;
  c10::ScalarType scale_dtype = c10::ScalarType::Float;
  bool per_row_scale = false;
  const void* divisor = nullptr;
  void* loss = nullptr;  // acc, rows values
};

// A float32 sum kept in two 16-bit halves: hi (the upper 16 bits of each
// value's float32 pattern) and lo (the lower 16). The linear cross-entropy's
// weight gradient is accumulated this way in the storage of its bfloat16 /
// float16 result plus a 16-bit side buffer: exact float32 accumulation with 2
// bytes per element beyond the result, instead of a 4-byte float32 copy next
// to it.
struct SplitAccumulateArgs {
  uint16_t* hi = nullptr;
  uint16_t* lo = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;                // row stride of hi and lo (elements)
  const void* add = nullptr;     // rows x cols of add_dtype, row stride add_ld; added to the sum
  int64_t add_ld = 0;
  c10::ScalarType add_dtype = c10::ScalarType::BFloat16;
  bool zero_first = false;       // the sum starts at 0 (ignore hi/lo's contents)
};

// Rounds the split sums (rows x cols, row stride ld) to `out_dtype` (bfloat16
// or float16), written in place over hi.
struct SplitFinishArgs {
  uint16_t* hi = nullptr;
  const uint16_t* lo = nullptr;
  int64_t n = 0;  // contiguous elements
  c10::ScalarType out_dtype = c10::ScalarType::BFloat16;
};

// The kernels of the ISA in use: cpu::cross_entropy_kernels().forward(args).
struct CrossEntropyKernels {
  void (*forward)(const CrossEntropyForwardArgs& args);
  void (*backward)(const CrossEntropyBackwardArgs& args);
  void (*loss_grad)(const CrossEntropyLossGradArgs& args);
  void (*split_accumulate)(const SplitAccumulateArgs& args);
  void (*split_finish)(const SplitFinishArgs& args);
};
TORCH_WSL_DECLARE_CPU_KERNELS(CrossEntropyKernels, cross_entropy_kernels)

}  // namespace torch_wsl::cpu
