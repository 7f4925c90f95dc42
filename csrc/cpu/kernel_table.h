// One dispatch table per CPU kernel family: a struct of function pointers,
// defined once per ISA by the family's <family>_kernel_impl.h, and an
// accessor that returns the table of the ISA in use (isa.h).
//
// In <family>_kernel.h, after the table struct:
//   TORCH_WSL_DECLARE_CPU_KERNELS(NormKernels, norm_kernels)
// declares isa_{default,avx2,avx512}::norm_kernels and defines
// cpu::norm_kernels(), which callers use: cpu::norm_kernels().forward(args).
// At the end of <family>_kernel_impl.h (inside the ISA namespace):
//   const NormKernels norm_kernels = {&forward, &backward};
// The build compiles the impl once per ISA from cpu/isa_unit.cpp.in.
#pragma once

#include "cpu/isa.h"

namespace torch_wsl::cpu {

template <typename Table>
const Table& table_for_active_isa(const Table& isa_default, const Table& isa_avx2, const Table& isa_avx512) {
  switch (active_isa()) {
    case Isa::kAvx512: return isa_avx512;
    case Isa::kAvx2: return isa_avx2;
    default: return isa_default;
  }
}

}  // namespace torch_wsl::cpu

// Use inside namespace torch_wsl::cpu.
#define TORCH_WSL_DECLARE_CPU_KERNELS(Table, name)                                         \
  namespace isa_default {                                                                  \
  extern const Table name;                                                                 \
  }                                                                                        \
  namespace isa_avx2 {                                                                     \
  extern const Table name;                                                                 \
  }                                                                                        \
  namespace isa_avx512 {                                                                   \
  extern const Table name;                                                                 \
  }                                                                                        \
  inline const Table& name() {                                                             \
    return table_for_active_isa<Table>(isa_default::name, isa_avx2::name, isa_avx512::name); \
  }
