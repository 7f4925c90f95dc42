// Project-wide macros shared by host (g++) and device (nvcc) code.
// Kept free of torch headers so the arithmetic headers stay cheap to include.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TWSL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TWSL_HOST_DEVICE inline
#endif
