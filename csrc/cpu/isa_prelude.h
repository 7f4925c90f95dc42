// Everything an ISA-specific kernel file needs, included *before* the
// `#pragma GCC target` region of that file. Headers included inside the region
// would have their inline functions compiled for that ISA and could be picked
// by the linker for callers on older CPUs (an ODR hazard); only our own
// ISA-namespaced code may live inside the region.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TWSL_X86 1
#else
#define TWSL_X86 0
#endif
