// Helpers for C++ tests that run a case on every CPU ISA the machine has.
#pragma once

#include <string>
#include <vector>

#include "cpu/isa.h"

namespace torch_wsl::testing {

inline std::vector<std::string> available_isas() {
  using torch_wsl::cpu::Isa;
  std::vector<std::string> names = {"default"};
  if (static_cast<int>(torch_wsl::cpu::detected_isa()) >= static_cast<int>(Isa::kAvx2)) names.push_back("avx2");
  if (torch_wsl::cpu::detected_isa() == Isa::kAvx512) names.push_back("avx512");
  return names;
}

// Selects an ISA for the lifetime of the object, then restores the previous one.
struct IsaScope {
  explicit IsaScope(const std::string& name) : previous(torch_wsl::cpu::set_cpu_isa(name)) {}
  ~IsaScope() { torch_wsl::cpu::set_cpu_isa(previous); }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;
  std::string previous;
};

}  // namespace torch_wsl::testing
