// CPU host memory for the caching allocator that serves PyTorch's CPU tensors.
//
// Regions come from posix_memalign. With huge_pages (off by default),
// regions of huge_page_size or more are mapped directly (mmap), aligned to
// huge_page_size and advised MADV_HUGEPAGE: fewer TLB misses and page
// faults, but in a VM whose memory the host backs lazily the first touch of
// a huge page can cost far more than 512 small ones (measured ~5x per byte
// in a Firecracker guest), so it is a policy to try, not a default.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "alloc/core/backend.h"

namespace torch_wsl::alloc {

struct HostConfig {
  std::size_t alignment = 64;                // of posix_memalign'ed regions (PyTorch's CPU alignment)
  bool huge_pages = false;                   // mmap + MADV_HUGEPAGE for large regions
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
