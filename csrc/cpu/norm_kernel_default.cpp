// LayerNorm/RMSNorm CPU kernels built for the 'default' ISA (see cpu/isa_begin.h).
#include "cpu/isa_prelude.h"
#include "cpu/norm_kernel.h"
#include "norm_math.h"

#define TWSL_ISA_DEFAULT
#include "cpu/isa_begin.h"
#include "cpu/norm_kernel_impl.h"
#include "cpu/isa_end.h"
