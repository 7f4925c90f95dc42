// A simulated paravirtualized device for tests and benchmarks.
//
// Each backend call costs a configurable number of microseconds, spent
// busy-waiting: on WSL2 every cudaMalloc/cudaFree crosses the VM bus to the
// Windows driver, and no published figure gives that cost per call (see
// DESIGN.md), so it is a named parameter -- malloc_cost_us / free_cost_us --
// that a user measures on their own machine (torch_wsl.memory.measure_driver_cost()).
// It also has a capacity, counts calls, checks every deallocate against what
// it handed out, injects failures, and simulates streams and events.
//
// Addresses are fake (from a private address range) and must never be dereferenced.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>

#include "alloc/core/backend.h"

namespace torch_wsl::alloc {

struct SimulatedConfig {
  std::size_t capacity = std::size_t{16} << 30;  // bytes the device holds
  double malloc_cost_us = 0.0;                   // busy-wait per allocate() call
  double free_cost_us = 0.0;                     // busy-wait per deallocate() call
  std::size_t alignment = 512;                   // of returned addresses (cudaMalloc: 256 or more)
};

class SimulatedBackend final : public Backend {
 public:
  explicit SimulatedBackend(SimulatedConfig config = {});

  const char* name() const override { return "simulated"; }
  void* allocate(std::size_t nbytes) override;
  void deallocate(void* ptr, std::size_t nbytes) override;
  std::optional<MemInfo> mem_info() override;

  // Events: work submitted to a stream completes only when complete_work()
  // is called for it (or an event on it is synchronized). An event completes
  // once the work submitted before it was recorded has completed.
  EventId record_event(StreamId stream, int device) override;
  bool query_event(EventId event) override;
  void synchronize_event(EventId event) override;
  void release_event(EventId event) override;
  void submit_work(StreamId stream);
  void complete_work(StreamId stream);

  // The nth allocate() call from now (1: the next one) fails as if the
  // device were out of memory. Several can be pending.
  void fail_nth_alloc(std::int64_t n);
  void set_capacity(std::size_t capacity);
  void set_costs(double malloc_cost_us, double free_cost_us);

  struct Counters {
    std::int64_t alloc_calls = 0;
    std::int64_t free_calls = 0;
    std::int64_t failed_allocs = 0;
    std::int64_t live_segments = 0;
    std::size_t live_bytes = 0;
    std::size_t peak_live_bytes = 0;
    std::int64_t live_events = 0;
    std::int64_t events_recorded = 0;
    std::int64_t events_queried = 0;  // query_event + synchronize_event calls
    int last_event_device = kOwnDevice;  // the device the newest event was recorded for
  };
  Counters counters() const;
  SimulatedConfig config() const;

 private:
  void take_range(std::uintptr_t addr, std::size_t size);
  void give_range(std::uintptr_t addr, std::size_t size);

  mutable std::mutex mutex_;
  SimulatedConfig config_;
  Counters counters_;
  std::set<std::int64_t> fail_at_;                 // absolute allocate-call numbers that fail
  std::map<std::uintptr_t, std::size_t> free_by_addr_;
  std::set<std::pair<std::size_t, std::uintptr_t>> free_by_size_;
  std::unordered_map<std::uintptr_t, std::size_t> live_;  // address -> size asked for
  struct StreamWork {
    std::uint64_t submitted = 0;
    std::uint64_t completed = 0;
  };
  std::unordered_map<StreamId, StreamWork> streams_;
  struct SimEvent {
    StreamId stream;
    std::uint64_t target;
  };
  std::unordered_map<EventId, SimEvent> events_;
  EventId next_event_ = 1;
};

// Spins for `us` microseconds (the simulated driver's cost of one call).
void busy_wait_us(double us);

}  // namespace torch_wsl::alloc
