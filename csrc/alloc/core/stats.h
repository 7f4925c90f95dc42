// Allocator statistics with the keys of torch.cuda.memory_stats().
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace torch_wsl::alloc {

// One statistic: its current value, its peak, and the totals of its
// increases and decreases since the last reset.
struct Stat {
  std::int64_t current = 0;
  std::int64_t peak = 0;
  std::int64_t allocated = 0;
  std::int64_t freed = 0;

  void update(std::int64_t delta) {
    current += delta;
    if (delta >= 0) {
      allocated += delta;
      if (current > peak) peak = current;
    } else {
      freed -= delta;
    }
  }
  void reset_peak() { peak = current; }
  void reset_accumulated() { allocated = freed = 0; }
};

// Index into a StatArray: all pools, the small pool, the large pool.
enum StatPool : int { kAll = 0, kSmallPool = 1, kLargePool = 2 };
using StatArray = std::array<Stat, 3>;

struct Stats {
  StatArray allocation;            // blocks handed out and not yet freed
  StatArray segment;               // segments obtained from the backend
  StatArray active;                // allocated blocks plus blocks waiting for other streams' events
  StatArray inactive_split;        // cached free blocks inside segments that are split
  StatArray allocated_bytes;       // bytes of allocated blocks (rounded sizes)
  StatArray reserved_bytes;        // bytes of segments
  StatArray active_bytes;
  StatArray inactive_split_bytes;
  StatArray requested_bytes;       // bytes asked for (before rounding)
  Stat oversize_allocations;       // allocations of blocks >= max_split_size
  Stat oversize_segments;
  std::int64_t num_alloc_retries = 0;  // out-of-memory ladder: cache released and the backend asked again
  std::int64_t num_ooms = 0;           // out-of-memory errors raised
  std::int64_t num_sync_all_streams = 0;
  std::int64_t num_device_alloc = 0;   // backend allocate() calls (including refused ones)
  std::int64_t num_device_free = 0;    // backend deallocate() calls
  std::int64_t num_device_alloc_failed = 0;
  std::int64_t max_split_size = 0;
  std::int64_t budget_bytes = 0;       // hard cap on reserved bytes (0: none)
  // Private pools (CUDA graph capture, torch.cuda.MemPool): how many exist,
  // and the bytes of their segments (also counted in reserved_bytes).
  Stat private_pools;
  Stat private_pool_reserved_bytes;
  // Frees whose stream events could not be recorded (a driver error): the
  // block is kept out of the cache for good and stays counted as active.
  std::int64_t num_free_errors = 0;

  // Flattened "name.pool.metric" -> value, as torch.cuda.memory_stats() spells it.
  std::vector<std::pair<std::string, std::int64_t>> items() const {
    std::vector<std::pair<std::string, std::int64_t>> out;
    static const char* const kPools[] = {"all", "small_pool", "large_pool"};
    auto add = [&](const std::string& key, const Stat& s) {
      out.emplace_back(key + ".current", s.current);
      out.emplace_back(key + ".peak", s.peak);
      out.emplace_back(key + ".allocated", s.allocated);
      out.emplace_back(key + ".freed", s.freed);
    };
    auto add_array = [&](const char* name, const StatArray& a) {
      for (int p = 0; p < 3; ++p) add(std::string(name) + "." + kPools[p], a[p]);
    };
    add_array("allocation", allocation);
    add_array("segment", segment);
    add_array("active", active);
    add_array("inactive_split", inactive_split);
    add_array("allocated_bytes", allocated_bytes);
    add_array("reserved_bytes", reserved_bytes);
    add_array("active_bytes", active_bytes);
    add_array("inactive_split_bytes", inactive_split_bytes);
    add_array("requested_bytes", requested_bytes);
    add("oversize_allocations", oversize_allocations);
    add("oversize_segments", oversize_segments);
    out.emplace_back("num_alloc_retries", num_alloc_retries);
    out.emplace_back("num_ooms", num_ooms);
    out.emplace_back("num_sync_all_streams", num_sync_all_streams);
    out.emplace_back("num_device_alloc", num_device_alloc);
    out.emplace_back("num_device_free", num_device_free);
    out.emplace_back("num_device_alloc_failed", num_device_alloc_failed);
    out.emplace_back("max_split_size", max_split_size);
    out.emplace_back("budget_bytes", budget_bytes);
    add("private_pools", private_pools);
    add("private_pool_reserved_bytes", private_pool_reserved_bytes);
    out.emplace_back("num_free_errors", num_free_errors);
    return out;
  }
};

}  // namespace torch_wsl::alloc
