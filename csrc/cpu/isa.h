// Run-time choice of the SIMD instruction set for the CPU kernels.
//
// Each CPU kernel is compiled once per ISA (csrc/cpu/*_avx2.cpp, *_avx512.cpp,
// *_default.cpp); the best one the running CPU supports is used, unless the
// TORCH_WSL_CPU_ISA environment variable or set_cpu_isa() asks for a lower one
// (tests use that to cover every path on one machine).
#pragma once

#include <string>

namespace torch_wsl::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA this CPU supports.
Isa detected_isa();
// The ISA the kernels use now.
Isa active_isa();
// Selects the ISA by name ("default", "avx2", "avx512"); throws if the name is
// unknown or the CPU lacks it. Returns the previous name.
std::string set_cpu_isa(const std::string& name);
const char* isa_name(Isa isa);

}  // namespace torch_wsl::cpu
