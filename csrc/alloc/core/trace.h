// A bounded trace of allocator events (a ring buffer: the newest
// `capacity` entries), for debugging fragmentation and out-of-memory errors.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "alloc/core/backend.h"

namespace torch_wsl::alloc {

enum class TraceAction : std::uint8_t {
  kAlloc,          // a block handed out
  kFreeRequested,  // free() called; the block waits for other streams' events
  kFreeCompleted,  // the block returned to the cache
  kSegmentAlloc,   // backend allocate()
  kSegmentFree,    // backend deallocate()
  kOom,            // out-of-memory error raised
  kEmptyCache,     // empty_cache() or the out-of-memory ladder released the cache
};

const char* trace_action_name(TraceAction action);

struct TraceEntry {
  TraceAction action;
  std::uint64_t addr;
  std::uint64_t size;
  StreamId stream;
  std::int64_t time_ns;  // steady clock
};

class TraceRing {
 public:
  explicit TraceRing(std::size_t capacity = 0) { set_capacity(capacity); }

  bool enabled() const { return !entries_.empty(); }

  // Drops what was recorded; 0 disables tracing.
  void set_capacity(std::size_t capacity) {
    entries_.assign(capacity, TraceEntry{});
    next_ = 0;
    count_ = 0;
  }

  void push(TraceAction action, std::uint64_t addr, std::uint64_t size, StreamId stream) {
    if (entries_.empty()) return;
    const auto now = std::chrono::steady_clock::now().time_since_epoch();
    entries_[next_] = TraceEntry{action, addr, size, stream,
                                 std::chrono::duration_cast<std::chrono::nanoseconds>(now).count()};
    next_ = next_ + 1 == entries_.size() ? 0 : next_ + 1;
    if (count_ < entries_.size()) ++count_;
  }

  // Oldest first.
  std::vector<TraceEntry> entries() const {
    std::vector<TraceEntry> out;
    out.reserve(count_);
    const std::size_t start = count_ < entries_.size() ? 0 : next_;
    for (std::size_t i = 0; i < count_; ++i) out.push_back(entries_[(start + i) % entries_.size()]);
    return out;
  }

 private:
  std::vector<TraceEntry> entries_;
  std::size_t next_ = 0;
  std::size_t count_ = 0;
};

}  // namespace torch_wsl::alloc
