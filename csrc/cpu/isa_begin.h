// Opens the ISA region of a kernel file compiled once per ISA. Define exactly
// one of TWSL_ISA_DEFAULT, TWSL_ISA_AVX2, TWSL_ISA_AVX512, include
// cpu/isa_prelude.h and the family's declarations, then:
//
//   #include "cpu/isa_begin.h"
//   #include "cpu/<family>_kernel_impl.h"   // defines functions in TWSL_CPU_ISA_NS
//   #include "cpu/isa_end.h"
//
// Everything between begin and end is compiled for that ISA and lives in the
// namespace torch_wsl::cpu::isa_<name>, so nothing built for a newer ISA can
// be picked by the linker for an older CPU. No header may be included in the
// region except the kernel's own impl and cpu/vec.h (see isa_prelude.h).
// No include guard: one use per file.

#if defined(TWSL_ISA_AVX512)
#define TWSL_CPU_ISA_NS isa_avx512
#elif defined(TWSL_ISA_AVX2)
#define TWSL_CPU_ISA_NS isa_avx2
#elif defined(TWSL_ISA_DEFAULT)
#define TWSL_CPU_ISA_NS isa_default
#else
#error "define one of TWSL_ISA_DEFAULT, TWSL_ISA_AVX2, TWSL_ISA_AVX512 before including cpu/isa_begin.h"
#endif

#if TWSL_X86 && defined(TWSL_ISA_AVX512)
#define TWSL_CPU_ISA_LEVEL 2
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
// GCC 12 warns inside its own AVX-512 intrinsics (_mm512_undefined_*): a known false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#elif TWSL_X86 && defined(TWSL_ISA_AVX2)
#define TWSL_CPU_ISA_LEVEL 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic push
#else
// The portable build, also used under the AVX names on non-x86 machines.
#define TWSL_CPU_ISA_LEVEL 0
#endif
