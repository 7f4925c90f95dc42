// A STREAM-like triad (a = b + s * c), the memory-bandwidth roofline of the
// benchmark harness. With non-temporal stores it shows the best a kernel can
// do here, which torch.add(out=) (plain stores) does not.
#include "cpu/bandwidth.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "cpu/isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace torch_wsl::cpu {
namespace {

constexpr int64_t kBlock = 16;  // floats per step: 64 bytes, one cache line

void triad_plain(float* a, const float* b, const float* c, float s, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) a[i] = b[i] + s * c[i];
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void triad_streaming(float* a, const float* b, const float* c, float s,
                                                         int64_t begin, int64_t end) {
  const __m256 sv = _mm256_set1_ps(s);
  for (int64_t i = begin; i < end; i += 8) {
    _mm256_stream_ps(a + i, _mm256_fmadd_ps(sv, _mm256_loadu_ps(c + i), _mm256_loadu_ps(b + i)));
  }
  _mm_sfence();
}
#endif

}  // namespace

void stream_triad(float* a, const float* b, const float* c, float s, int64_t n, bool nontemporal) {
  bool streaming = false;
#if defined(__x86_64__)
  streaming = nontemporal && detected_isa() != Isa::kDefault && reinterpret_cast<uintptr_t>(a) % 64 == 0;
#endif
  TORCH_CHECK(!nontemporal || streaming, "torch_wsl: non-temporal triad needs AVX2 and a 64-byte aligned output");
  const int64_t blocks = n / kBlock;
  at::parallel_for(0, blocks, 4096, [&](int64_t b0, int64_t b1) {
#if defined(__x86_64__)
    if (streaming) return triad_streaming(a, b, c, s, b0 * kBlock, b1 * kBlock);
#endif
    triad_plain(a, b, c, s, b0 * kBlock, b1 * kBlock);
  });
  triad_plain(a, b, c, s, blocks * kBlock, n);
}

}  // namespace torch_wsl::cpu
