// Project-wide macros shared by host (g++) and device (nvcc) code.
// Kept free of torch headers so the arithmetic headers stay cheap to include.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TWSL_HOST_DEVICE __host__ __device__ __forceinline__
#else
// always_inline: the CPU kernels call these with SIMD vector types from
// ISA-specific code, where an out-of-line call would lose the ISA.
#define TWSL_HOST_DEVICE inline __attribute__((always_inline))
#endif
