// LayerNorm/RMSNorm CPU kernels for the 'avx512' ISA (see cpu/isa.h, cpu/norm_kernel_impl.h).
// GCC 12 warns inside its own AVX-512 intrinsics (_mm512_undefined_*): a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/isa_prelude.h"
#include "cpu/norm_kernel.h"
#include "norm_math.h"

#define TWSL_CPU_ISA_NS isa_avx512
#if TWSL_X86
#define TWSL_CPU_ISA_LEVEL 2
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#else
#define TWSL_CPU_ISA_LEVEL 0  // not x86: the portable code under this ISA's name
#endif
#include "cpu/norm_kernel_impl.h"
#if TWSL_X86
#pragma GCC pop_options
#endif
