#include "alloc/core/no_caching.h"

#include <stdexcept>

namespace torch_wsl::alloc {

NoCachingAllocator::NoCachingAllocator(std::shared_ptr<Backend> backend, std::size_t min_block_size)
    : backend_(std::move(backend)), min_block_size_(min_block_size) {
  if (!backend_) throw std::invalid_argument("NoCachingAllocator needs a backend");
  if (min_block_size_ == 0) throw std::invalid_argument("min_block_size must be > 0");
}

void* NoCachingAllocator::malloc(std::size_t nbytes, StreamId /*stream*/) {
  if (nbytes == 0) return nullptr;
  const std::size_t size = (nbytes + min_block_size_ - 1) / min_block_size_ * min_block_size_;
  void* p = backend_->allocate(size);
  std::lock_guard<std::mutex> g(mutex_);
  ++stats_.num_device_alloc;
  if (p == nullptr) {
    ++stats_.num_device_alloc_failed;
    ++stats_.num_ooms;
    throw OutOfMemoryError(std::string("no-caching allocator (") + backend_->name() + "): out of memory allocating " +
                               format_bytes(size),
                           size, static_cast<std::size_t>(stats_.allocated_bytes[kAll].current),
                           static_cast<std::size_t>(stats_.reserved_bytes[kAll].current), 0, 0);
  }
  live_[reinterpret_cast<std::uintptr_t>(p)] = Live{size, nbytes};
  const auto s = static_cast<std::int64_t>(size);
  for (StatArray* a : {&stats_.allocated_bytes, &stats_.reserved_bytes, &stats_.active_bytes}) (*a)[kAll].update(s);
  for (StatArray* a : {&stats_.allocation, &stats_.segment, &stats_.active}) (*a)[kAll].update(1);
  stats_.requested_bytes[kAll].update(static_cast<std::int64_t>(nbytes));
  return p;
}

void NoCachingAllocator::free(void* ptr) {
  if (ptr == nullptr) return;
  Live live;
  {
    std::lock_guard<std::mutex> g(mutex_);
    auto it = live_.find(reinterpret_cast<std::uintptr_t>(ptr));
    if (it == live_.end()) throw std::invalid_argument("free(): the pointer was not allocated by this allocator");
    live = it->second;
    live_.erase(it);
  }
  backend_->deallocate(ptr, live.size);
  std::lock_guard<std::mutex> g(mutex_);
  ++stats_.num_device_free;
  const auto s = static_cast<std::int64_t>(live.size);
  for (StatArray* a : {&stats_.allocated_bytes, &stats_.reserved_bytes, &stats_.active_bytes}) (*a)[kAll].update(-s);
  for (StatArray* a : {&stats_.allocation, &stats_.segment, &stats_.active}) (*a)[kAll].update(-1);
  stats_.requested_bytes[kAll].update(-static_cast<std::int64_t>(live.requested));
}

Stats NoCachingAllocator::stats() const {
  std::lock_guard<std::mutex> g(mutex_);
  return stats_;
}

}  // namespace torch_wsl::alloc
