#pragma once

#include <cstdint>

namespace torch_wsl::cpu {

// a[i] = b[i] + s * c[i] over n floats, in parallel; with non-temporal stores
// when asked (needs AVX2 and a 64-byte aligned `a`).
void stream_triad(float* a, const float* b, const float* c, float s, int64_t n, bool nontemporal);

}  // namespace torch_wsl::cpu
