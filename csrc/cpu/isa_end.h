// Closes the region opened by cpu/isa_begin.h.
#if TWSL_CPU_ISA_LEVEL > 0
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#undef TWSL_CPU_ISA_LEVEL
#undef TWSL_CPU_ISA_NS
