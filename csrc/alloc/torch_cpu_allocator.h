// The caching allocator behind PyTorch's CPU tensors (c10::SetCPUAllocator),
// and the recorder of CPU tensor allocation traces. No pybind11 here.
#pragma once

#include <memory>

#include "alloc/core/allocator.h"
#include "alloc/core/host_backend.h"
#include "alloc/core/replay.h"

namespace torch_wsl::alloc {

// Installs a caching allocator for CPU tensors with this policy (replacing
// one installed before by cpu_enable). Tensors allocated earlier keep their
// own deleters, so they are freed by whoever allocated them. Throws if
// another allocator with a higher priority owns the CPU slot.
std::shared_ptr<CachingAllocator> cpu_enable(const Policy& policy, const HostConfig& host);

// Puts back the allocator that was there before cpu_enable and returns the
// cached free memory to the system; tensors still alive keep working (their
// allocator stays alive). Returns whether a caching allocator was installed.
bool cpu_disable();

// The installed CPU caching allocator, or nullptr.
std::shared_ptr<CachingAllocator> cpu_current();

// Records the allocations and frees of CPU tensors until cpu_trace_stop,
// whichever allocator serves them. One recording at a time.
std::shared_ptr<AllocTrace> cpu_trace_start();
void cpu_trace_stop(const std::shared_ptr<AllocTrace>& trace);

}  // namespace torch_wsl::alloc
