// Fused optimizer / gradient-clipping CPU kernels built for the 'avx512' ISA (see cpu/isa_begin.h).
#include "cpu/isa_prelude.h"
#include "cpu/optim_kernel.h"
#include "optim_math.h"

#define TWSL_ISA_AVX512
#include "cpu/isa_begin.h"
#include "cpu/optim_kernel_impl.h"
#include "cpu/isa_end.h"
