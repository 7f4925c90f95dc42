#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace torch_wsl::cpu {
namespace {

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

Isa parse_isa(const std::string& name) {
  if (name == "default") return Isa::kDefault;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  TORCH_CHECK(false, "torch_wsl: unknown CPU ISA '", name, "'; expected one of: default, avx2, avx512");
}

Isa initial_isa() {
  const Isa best = detected_isa();
  const char* env = std::getenv("TORCH_WSL_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const Isa wanted = parse_isa(env);
  // Asking for more than the CPU has must not crash with SIGILL: keep the best.
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = cpu_has_avx512() ? Isa::kAvx512 : cpu_has_avx2() ? Isa::kAvx2 : Isa::kDefault;
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

std::string set_cpu_isa(const std::string& name) {
  const Isa wanted = parse_isa(name);
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(detected_isa()), "torch_wsl: this CPU does not support ISA '",
              name, "' (best available: ", isa_name(detected_isa()), ")");
  const Isa previous = static_cast<Isa>(active().exchange(static_cast<int>(wanted)));
  return isa_name(previous);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace torch_wsl::cpu
