#include "cpu/norm_kernel.h"

#include "cpu/isa.h"

namespace torch_wsl::cpu {

void norm_forward(const NormForwardArgs& args) {
  switch (active_isa()) {
    case Isa::kAvx512: return isa_avx512::norm_forward(args);
    case Isa::kAvx2: return isa_avx2::norm_forward(args);
    default: return isa_default::norm_forward(args);
  }
}

void norm_backward(const NormBackwardArgs& args) {
  switch (active_isa()) {
    case Isa::kAvx512: return isa_avx512::norm_backward(args);
    case Isa::kAvx2: return isa_avx2::norm_backward(args);
    default: return isa_default::norm_backward(args);
  }
}

}  // namespace torch_wsl::cpu
