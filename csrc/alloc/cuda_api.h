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
// install_device_allocator() makes torch_wsl's allocator PyTorch's CUDA
// allocator: a subclass of torch's CUDAPluggableAllocator that serves
// tensors (allocate/raw_alloc), record_stream, empty_cache,
// set_per_process_memory_fraction, the device statistics
// (torch.cuda.memory_stats and friends), cacheInfo (cuDNN's workspace
// sizing) and the private pools of CUDA graph capture and
// torch.cuda.MemPool. Each device's allocator is created on first use with
// this policy; a budget fraction applies to the free memory
// cudaMemGetInfo reports then. min_block_size must be at least 512 (the
// alignment cuBLASLt, Triton and Inductor rely on).
void set_device_policy(const Policy& policy);

// The allocator of `device`; nullptr if it does not exist and !create.
std::shared_ptr<CachingAllocator> device_allocator(int device, bool create);

// Must run before CUDA is initialized (PyTorch refuses to swap an
// initialized allocator; the error says so).
void install_device_allocator();

// Frees that failed inside a tensor deleter (which must not throw): the
// memory stays accounted in the allocator, and the first error is printed.
std::int64_t deleter_errors();

// Times `reps` cudaMalloc + cudaFree pairs of `nbytes` on `device` (what the
// simulated backend's malloc_cost_us / free_cost_us stand for).
struct DriverCost {
  double malloc_us;
  double free_us;
};
DriverCost measure_driver_cost(int device, std::size_t nbytes, int reps);

// Tries one cudaHostAlloc of `nbytes` and frees it: "" on success, else
// the driver's error (the pinned-ceiling probe bisects with this, not with
// PyTorch's host allocator, which rounds requests up to powers of two).
std::string try_host_alloc(std::size_t nbytes);

// ------------------------------------------------------------ pinned host memory
// cudaHostAlloc'ed segments while under the pinned budget; nullptr past it
// or when the driver refuses (WSL2's ceiling is low and driver-dependent),
// so that the pool's out-of-memory ladder first gives cached pinned memory
// back and retries.
class PinnedHostBackend final : public Backend {
 public:
  explicit PinnedHostBackend(std::size_t pinned_budget_bytes);
  const char* name() const override { return "cuda_pinned"; }
  void* allocate(std::size_t nbytes) override;
  void deallocate(void* ptr, std::size_t nbytes) override;
  EventId record_event(StreamId stream, int device) override;
  bool query_event(EventId event) override;
  void synchronize_event(EventId event) override;
  void release_event(EventId event) override;

  struct Counters {
    std::int64_t pinned_segments = 0;
    std::size_t pinned_bytes = 0;
    std::int64_t driver_refusals = 0;  // cudaHostAlloc failed
    std::int64_t budget_refusals = 0;  // over the pinned budget
  };
  Counters counters() const;
  std::size_t budget() const { return budget_; }
  // Why the newest refused request was refused ("" if none was).
  std::string last_refusal() const;

 private:
  std::size_t budget_;
  mutable std::mutex mutex_;
  Counters counters_;
  std::string last_refusal_;
};

// The stream id the pinned pool allocates on: no CUDA stream, so every
// stream a block is used on (record_stream) gets an event.
constexpr StreamId kHostStream = ~StreamId{0};

// Pinned memory with a pageable fallback kept apart: requests are served
// from the pinned pool; when it cannot serve one (budget or driver), from a
// separate pool of pageable memory, with one warning. Pageable blocks go
// back to their own pool, so they are never handed out as pinned later.
// Copies from pageable memory are still correct, only synchronous.
class PinnedPool {
 public:
  PinnedPool(const Policy& policy, std::size_t pinned_budget_bytes);
  // Throws OutOfMemoryError only if the pageable fallback fails too.
  void* malloc(std::size_t nbytes);
  // Throws std::invalid_argument for a pointer neither pool handed out.
  void free(void* ptr);
  // `ptr` is used on `stream` of `device`: false if neither pool handed it out.
  bool record_stream(void* ptr, StreamId stream, int device);
  void empty_cache();
  // The fallback warning the first time pageable memory was handed out; empty afterwards.
  std::string take_warning();
  CachingAllocator& pinned() { return *pinned_; }
  const std::shared_ptr<CachingAllocator>& pinned_ptr() const { return pinned_; }
  const std::shared_ptr<CachingAllocator>& pageable_ptr() const { return pageable_; }

 private:
  void note_fallback(const std::string& why);
  std::shared_ptr<PinnedHostBackend> backend_;
  std::shared_ptr<CachingAllocator> pinned_;
  std::shared_ptr<CachingAllocator> pageable_;
  std::mutex mutex_;
  std::string warning_;
  bool warned_ = false;
};

// The process's pinned pool (created on first call with these settings).
std::shared_ptr<PinnedPool> process_pinned_pool(const Policy& policy, std::size_t pinned_budget_bytes);
std::shared_ptr<PinnedPool> process_pinned_pool_if_created();

// Makes the process's pinned pool PyTorch's CUDA host allocator:
// tensor.pin_memory(), torch.empty(..., pin_memory=True) and
// DataLoader(pin_memory=True) then allocate from it, and non_blocking copies
// record their streams (with their devices) on it.
void install_pinned_host_allocator();

}  // namespace torch_wsl::alloc::cuda
