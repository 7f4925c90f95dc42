// LayerNorm/RMSNorm CPU kernels for the 'default' ISA (see cpu/isa.h, cpu/norm_kernel_impl.h).
#include "cpu/isa_prelude.h"
#include "cpu/norm_kernel.h"
#include "norm_math.h"

#define TWSL_CPU_ISA_NS isa_default
#define TWSL_CPU_ISA_LEVEL 0
#include "cpu/norm_kernel_impl.h"
