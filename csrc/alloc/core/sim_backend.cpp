#include "alloc/core/sim_backend.h"

#include <chrono>
#include <stdexcept>
#include <string>

namespace torch_wsl::alloc {

namespace {
// The fake address range: far from anything real, and large enough that
// a simulated device never runs out of addresses before capacity.
constexpr std::uintptr_t kBase = std::uintptr_t{1} << 44;
constexpr std::size_t kRange = std::size_t{1} << 46;
}  // namespace

void busy_wait_us(double us) {
  if (us <= 0) return;
  const auto end = std::chrono::steady_clock::now() + std::chrono::nanoseconds(static_cast<std::int64_t>(us * 1000));
  while (std::chrono::steady_clock::now() < end) {
  }
}

SimulatedBackend::SimulatedBackend(SimulatedConfig config) : config_(config) {
  if (config_.alignment == 0 || (config_.alignment & (config_.alignment - 1)) != 0)
    throw std::invalid_argument("simulated backend: alignment must be a power of two");
  give_range(kBase, kRange);
}

void SimulatedBackend::take_range(std::uintptr_t addr, std::size_t size) {
  free_by_addr_.erase(addr);
  free_by_size_.erase({size, addr});
}

void SimulatedBackend::give_range(std::uintptr_t addr, std::size_t size) {
  auto next = free_by_addr_.lower_bound(addr);
  if (next != free_by_addr_.end() && addr + size == next->first) {  // merge with the following range
    size += next->second;
    free_by_size_.erase({next->second, next->first});
    next = free_by_addr_.erase(next);
  }
  if (next != free_by_addr_.begin()) {  // and the preceding one
    auto prev = std::prev(next);
    if (prev->first + prev->second == addr) {
      free_by_size_.erase({prev->second, prev->first});
      addr = prev->first;
      size += prev->second;
      free_by_addr_.erase(prev);
    }
  }
  free_by_addr_[addr] = size;
  free_by_size_.insert({size, addr});
}

void* SimulatedBackend::allocate(std::size_t nbytes) {
  double cost;
  {
    std::lock_guard<std::mutex> g(mutex_);
    cost = config_.malloc_cost_us;
  }
  busy_wait_us(cost);
  std::lock_guard<std::mutex> g(mutex_);
  const std::int64_t call = ++counters_.alloc_calls;
  const std::size_t size = (nbytes + config_.alignment - 1) / config_.alignment * config_.alignment;
  const bool injected = fail_at_.erase(call) > 0;
  if (injected || nbytes == 0 || counters_.live_bytes + size > config_.capacity) {
    ++counters_.failed_allocs;
    return nullptr;
  }
  auto it = free_by_size_.lower_bound({size, 0});
  if (it == free_by_size_.end()) {
    ++counters_.failed_allocs;
    return nullptr;
  }
  const auto [range_size, addr] = *it;
  take_range(addr, range_size);
  if (range_size > size) give_range(addr + size, range_size - size);
  live_[addr] = nbytes;
  counters_.live_bytes += size;
  ++counters_.live_segments;
  if (counters_.live_bytes > counters_.peak_live_bytes) counters_.peak_live_bytes = counters_.live_bytes;
  return reinterpret_cast<void*>(addr);
}

void SimulatedBackend::deallocate(void* ptr, std::size_t nbytes) {
  double cost;
  {
    std::lock_guard<std::mutex> g(mutex_);
    cost = config_.free_cost_us;
  }
  busy_wait_us(cost);
  std::lock_guard<std::mutex> g(mutex_);
  ++counters_.free_calls;
  const auto addr = reinterpret_cast<std::uintptr_t>(ptr);
  auto it = live_.find(addr);
  if (it == live_.end())
    throw std::logic_error("simulated backend: deallocate() of an address it did not hand out (or twice)");
  if (it->second != nbytes)
    throw std::logic_error("simulated backend: deallocate() with size " + std::to_string(nbytes) +
                           " of a region allocated with size " + std::to_string(it->second));
  live_.erase(it);
  const std::size_t size = (nbytes + config_.alignment - 1) / config_.alignment * config_.alignment;
  give_range(addr, size);
  counters_.live_bytes -= size;
  --counters_.live_segments;
}

std::optional<MemInfo> SimulatedBackend::mem_info() {
  std::lock_guard<std::mutex> g(mutex_);
  const std::size_t used = counters_.live_bytes;
  return MemInfo{config_.capacity > used ? config_.capacity - used : 0, config_.capacity};
}

EventId SimulatedBackend::record_event(StreamId stream, int device) {
  std::lock_guard<std::mutex> g(mutex_);
  ++counters_.events_recorded;
  counters_.last_event_device = device;
  const EventId id = next_event_++;
  events_[id] = SimEvent{stream, streams_[stream].submitted};
  counters_.live_events = static_cast<std::int64_t>(events_.size());
  return id;
}

bool SimulatedBackend::query_event(EventId event) {
  std::lock_guard<std::mutex> g(mutex_);
  ++counters_.events_queried;
  auto it = events_.find(event);
  if (it == events_.end()) throw std::logic_error("simulated backend: query of an unknown event");
  return streams_[it->second.stream].completed >= it->second.target;
}

void SimulatedBackend::synchronize_event(EventId event) {
  std::lock_guard<std::mutex> g(mutex_);
  ++counters_.events_queried;
  auto it = events_.find(event);
  if (it == events_.end()) throw std::logic_error("simulated backend: synchronize of an unknown event");
  StreamWork& w = streams_[it->second.stream];
  if (w.completed < it->second.target) w.completed = it->second.target;  // the device finishes that work
}

void SimulatedBackend::release_event(EventId event) {
  std::lock_guard<std::mutex> g(mutex_);
  if (events_.erase(event) == 0) throw std::logic_error("simulated backend: release of an unknown event");
  counters_.live_events = static_cast<std::int64_t>(events_.size());
}

void SimulatedBackend::submit_work(StreamId stream) {
  std::lock_guard<std::mutex> g(mutex_);
  ++streams_[stream].submitted;
}

void SimulatedBackend::complete_work(StreamId stream) {
  std::lock_guard<std::mutex> g(mutex_);
  StreamWork& w = streams_[stream];
  w.completed = w.submitted;
}

void SimulatedBackend::fail_nth_alloc(std::int64_t n) {
  if (n < 1) throw std::invalid_argument("fail_nth_alloc: n must be >= 1 (1 is the next call)");
  std::lock_guard<std::mutex> g(mutex_);
  fail_at_.insert(counters_.alloc_calls + n);
}

void SimulatedBackend::set_capacity(std::size_t capacity) {
  std::lock_guard<std::mutex> g(mutex_);
  config_.capacity = capacity;
}

void SimulatedBackend::set_costs(double malloc_cost_us, double free_cost_us) {
  if (malloc_cost_us < 0 || free_cost_us < 0) throw std::invalid_argument("simulated costs must be >= 0");
  std::lock_guard<std::mutex> g(mutex_);
  config_.malloc_cost_us = malloc_cost_us;
  config_.free_cost_us = free_cost_us;
}

SimulatedBackend::Counters SimulatedBackend::counters() const {
  std::lock_guard<std::mutex> g(mutex_);
  return counters_;
}

SimulatedConfig SimulatedBackend::config() const {
  std::lock_guard<std::mutex> g(mutex_);
  return config_;
}

}  // namespace torch_wsl::alloc
