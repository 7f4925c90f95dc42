// Allocation traces of real workloads, and their replay through an
// allocator inside C++ (calling through Python per malloc would measure Python).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "alloc/core/allocator.h"

namespace torch_wsl::alloc {

enum class TraceOp : std::uint8_t { kAlloc = 0, kFree = 1, kStep = 2 };

struct TraceEvent {
  TraceOp op;
  std::uint64_t id;    // allocation id (kAlloc, kFree)
  std::uint64_t size;  // bytes (kAlloc)
};

// A recorder and container of alloc/free/step events. Thread-safe.
class AllocTrace {
 public:
  AllocTrace() = default;
  explicit AllocTrace(std::vector<TraceEvent> events);

  // Recording: ids are dense, from 0. Frees after stop() are ignored.
  std::uint64_t record_alloc(std::size_t size);
  void record_free(std::uint64_t id);
  void mark_step();
  void stop() { recording_.store(false); }
  bool recording() const { return recording_.load(); }

  std::vector<TraceEvent> events() const;
  std::size_t size() const;
  std::int64_t num_steps() const;

  // A portable byte string ("TWSLTRC1", count, then op/id/size records).
  std::string serialize() const;
  static std::vector<TraceEvent> deserialize(const std::string& bytes);

 private:
  mutable std::mutex mutex_;
  std::vector<TraceEvent> events_;
  std::uint64_t next_id_ = 0;
  std::atomic<bool> recording_{true};
};

struct ReplayStep {
  int pass;
  int step;                   // events up to the first step marker are step 0
  std::int64_t mallocs;
  std::int64_t frees;
  std::int64_t device_allocs;  // backend calls during the step
  std::int64_t device_frees;
  std::int64_t ns;             // host wall time of the step's malloc and free calls
};

struct ReplayResult {
  std::vector<ReplayStep> steps;
  std::size_t peak_requested = 0;  // peak of live requested bytes (exact sizes)
  std::size_t peak_reserved = 0;   // the allocator's reserved_bytes peak
  std::int64_t unmatched_frees = 0;
  std::int64_t leaked_at_end = 0;  // allocations never freed in the trace (freed by replay after each pass)
};

// Replays `events` `passes` times in a row through `target` (the target
// stays warm between passes; live allocations are freed after each pass).
ReplayResult replay(const std::vector<TraceEvent>& events, AllocatorInterface& target, int passes = 1);

}  // namespace torch_wsl::alloc
