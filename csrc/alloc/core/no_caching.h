// The baseline without caching: every malloc and free goes to the backend
// (what a program sees when each tensor is a cudaMalloc/cudaFree).
#pragma once

#include <memory>
#include <mutex>
#include <unordered_map>

#include "alloc/core/allocator.h"

namespace torch_wsl::alloc {

class NoCachingAllocator final : public AllocatorInterface {
 public:
  explicit NoCachingAllocator(std::shared_ptr<Backend> backend, std::size_t min_block_size = 512);
  void* malloc(std::size_t nbytes, StreamId stream = 0) override;
  void free(void* ptr) override;
  Stats stats() const override;
  Backend& backend() { return *backend_; }

 private:
  std::shared_ptr<Backend> backend_;
  std::size_t min_block_size_;
  mutable std::mutex mutex_;
  struct Live {
    std::size_t size;
    std::size_t requested;
  };
  std::unordered_map<std::uintptr_t, Live> live_;
  Stats stats_;
};

}  // namespace torch_wsl::alloc
