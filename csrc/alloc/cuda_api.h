// The CUDA side of the allocator, implemented in csrc/cuda/alloc_cuda.cpp
// (built only with CUDA). Declarations use no CUDA types, so the bindings
// can include this in every build and call it under TORCH_WSL_WITH_CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "alloc/core/allocator.h"
#include "alloc/core/host_backend.h"

namespace torch_wsl::alloc::cuda {

// ------------------------------------------------------------ device memory
// torch_wsl_malloc / torch_wsl_free (extern "C", loaded by
// torch.cuda.memory.CUDAPluggableAllocator) create each device's allocator
// on first use with this policy; its budget fraction applies to the free
// memory cudaMemGetInfo reports then.
void set_device_policy(const Policy& policy);

// The allocator of `device`; nullptr if it does not exist and !create.
std::shared_ptr<CachingAllocator> device_allocator(int device, bool create);

// After Python made the pluggable allocator current: route
// Tensor.record_stream, torch.cuda.empty_cache and
// torch.cuda.set_per_process_memory_fraction to torch_wsl's allocators.
void install_device_hooks();

// Times `reps` cudaMalloc + cudaFree pairs of `nbytes` on `device` (what the
// simulated backend's malloc_cost_us / free_cost_us stand for).
struct DriverCost {
  double malloc_us;
  double free_us;
};
DriverCost measure_driver_cost(int device, std::size_t nbytes, int reps);

// ------------------------------------------------------------ pinned host memory
// cudaHostAlloc'ed segments while under the pinned budget; past it, or when
// the driver refuses (WSL2's ceiling is low and driver-dependent), pageable
// memory instead, with one warning -- never a crash. Copies from pageable
// memory are still correct, only synchronous.
class PinnedHostBackend final : public Backend {
 public:
  explicit PinnedHostBackend(std::size_t pinned_budget_bytes);
  const char* name() const override { return "cuda_pinned"; }
  void* allocate(std::size_t nbytes) override;
  void deallocate(void* ptr, std::size_t nbytes) override;
  EventId record_event(StreamId stream) override;
  bool query_event(EventId event) override;
  void synchronize_event(EventId event) override;
  void release_event(EventId event) override;

  // The fallback warning the first time pageable memory was handed out; empty afterwards.
  std::string take_warning();

  struct Counters {
    std::int64_t pinned_segments = 0;
    std::size_t pinned_bytes = 0;
    std::int64_t pageable_segments = 0;
    std::size_t pageable_bytes = 0;
    std::int64_t driver_refusals = 0;  // cudaHostAlloc failed
    std::int64_t budget_refusals = 0;  // over the pinned budget
  };
  Counters counters() const;
  std::size_t budget() const { return budget_; }

 private:
  std::size_t budget_;
  HostBackend pageable_;
  mutable std::mutex mutex_;
  std::unordered_map<std::uintptr_t, bool> pinned_;  // segment -> pinned (or pageable)
  Counters counters_;
  std::string warning_;
  bool warned_ = false;
};

// The stream id the pinned pool allocates on: no CUDA stream, so every
// stream a block is used on (record_event) gets an event.
constexpr StreamId kHostStream = ~StreamId{0};

// The process's pinned pool (created on first call with these settings).
std::shared_ptr<CachingAllocator> pinned_pool(const Policy& policy, std::size_t pinned_budget_bytes);
std::shared_ptr<CachingAllocator> pinned_pool_if_created();

// Makes the pinned pool PyTorch's CUDA host allocator: tensor.pin_memory(),
// torch.empty(..., pin_memory=True) and DataLoader(pin_memory=True) then
// allocate from it, and non_blocking copies record their streams on it.
void install_pinned_host_allocator();

}  // namespace torch_wsl::alloc::cuda
