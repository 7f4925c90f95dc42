#include "alloc/core/host_backend.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace torch_wsl::alloc {

namespace {
std::size_t page_size() {
  static const std::size_t size = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return size;
}
std::size_t round_up(std::size_t n, std::size_t q) { return (n + q - 1) / q * q; }
}  // namespace

HostBackend::HostBackend(HostConfig config) : config_(config) {
  auto pow2 = [](std::size_t n) { return n != 0 && (n & (n - 1)) == 0; };
  if (!pow2(config_.alignment) || config_.alignment < sizeof(void*))
    throw std::invalid_argument("host backend: alignment must be a power of two >= 8");
  if (!pow2(config_.huge_page_size) || config_.huge_page_size < page_size())
    throw std::invalid_argument("host backend: huge_page_size must be a power of two >= the page size");
}

void* HostBackend::allocate(std::size_t nbytes) {
  alloc_calls_.fetch_add(1, std::memory_order_relaxed);
  if (nbytes == 0) return nullptr;
  if (!mapped(nbytes)) {
    void* p = nullptr;
    return posix_memalign(&p, config_.alignment, nbytes) == 0 ? p : nullptr;
  }
  // Over-map by one huge page, then trim head and tail to an aligned region.
  const std::size_t len = round_up(nbytes, page_size());
  const std::size_t huge = config_.huge_page_size;
  void* raw = mmap(nullptr, len + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t aligned = round_up(start, huge);
  if (aligned > start) munmap(raw, aligned - start);
  const std::uintptr_t end = start + len + huge;
  if (end > aligned + len) munmap(reinterpret_cast<void*>(aligned + len), end - (aligned + len));
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), len, MADV_HUGEPAGE);  // advice only; fine if refused
#endif
  return reinterpret_cast<void*>(aligned);
}

void HostBackend::deallocate(void* ptr, std::size_t nbytes) {
  free_calls_.fetch_add(1, std::memory_order_relaxed);
  if (ptr == nullptr) return;
  if (!mapped(nbytes)) {
    std::free(ptr);
    return;
  }
  if (munmap(ptr, round_up(nbytes, page_size())) != 0)
    throw std::runtime_error(std::string("host backend: munmap failed: ") + std::strerror(errno));
}

std::optional<MemInfo> HostBackend::mem_info() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long avail = sysconf(_SC_AVPHYS_PAGES);
  if (pages <= 0 || avail < 0) return std::nullopt;
  return MemInfo{static_cast<std::size_t>(avail) * page_size(), static_cast<std::size_t>(pages) * page_size()};
}

}  // namespace torch_wsl::alloc
