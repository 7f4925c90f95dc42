// CPU host memory for the caching allocator that serves PyTorch's CPU tensors.
//
// Segments of huge_page_size or more are mapped directly (mmap), aligned to
// huge_page_size and advised MADV_HUGEPAGE: with transparent huge pages in
// "madvise" mode (the common default) a cached 20 MiB segment then costs 10
// page faults instead of 5120, once. Smaller ones use posix_memalign.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "alloc/core/backend.h"

namespace torch_wsl::alloc {

struct HostConfig {
  std::size_t alignment = 64;                // of posix_memalign'ed regions (PyTorch's CPU alignment)
  bool huge_pages = true;                    // mmap + MADV_HUGEPAGE for large regions
  std::size_t huge_page_size = 2 << 20;
};

class HostBackend final : public Backend {
 public:
  explicit HostBackend(HostConfig config = {});
  const char* name() const override { return "host"; }
  void* allocate(std::size_t nbytes) override;
  void deallocate(void* ptr, std::size_t nbytes) override;
  std::optional<MemInfo> mem_info() override;
  const HostConfig& config() const { return config_; }
  std::int64_t alloc_calls() const { return alloc_calls_.load(); }
  std::int64_t free_calls() const { return free_calls_.load(); }

 private:
  bool mapped(std::size_t nbytes) const { return config_.huge_pages && nbytes >= config_.huge_page_size; }
  HostConfig config_;
  std::atomic<std::int64_t> alloc_calls_{0};
  std::atomic<std::int64_t> free_calls_{0};
};

}  // namespace torch_wsl::alloc
