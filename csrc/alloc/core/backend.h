// Where the allocator's segments come from: the interface every backend
// implements (CUDA device, CUDA pinned host, CPU host, simulated device).
//
// Plain C++: no torch, no CUDA headers. Every method may be called from
// several threads at once (the allocator calls allocate/deallocate without
// holding its own lock), so implementations synchronize themselves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

namespace torch_wsl::alloc {

// A stream the memory is used on: a cudaStream_t's value (0 is the default
// stream). Host backends have one stream, 0.
using StreamId = std::uint64_t;

// An event recorded on a stream, opaque to the allocator (a cudaEvent_t, or
// the simulated backend's id). 0 means "no event: already complete".
using EventId = std::uint64_t;

// The device a stream belongs to, when a block is used on a stream of
// another device than its own (record_stream across GPUs): a bare
// cudaStream_t does not say (the default stream is 0 on every device).
// kOwnDevice: the backend's own device.
constexpr int kOwnDevice = -1;

struct MemInfo {
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // A short name for messages ("cuda:0", "host", "simulated").
  virtual const char* name() const = 0;

  // A region of exactly `nbytes` bytes (the allocator rounds sizes itself),
  // or nullptr when the backend is out of memory. Out of memory is not an
  // exception: the allocator's out-of-memory ladder handles it. Other
  // failures (a broken driver) may throw.
  virtual void* allocate(std::size_t nbytes) = 0;

  // Returns a region from allocate(), with the size it was allocated with.
  virtual void deallocate(void* ptr, std::size_t nbytes) = 0;

  // Free and total memory as the backend sees it (for a budget given as a
  // fraction of free memory); nullopt when unknown.
  virtual std::optional<MemInfo> mem_info() { return std::nullopt; }

  // Events, for blocks used on other streams than the one they were
  // allocated on (record_stream); `device` is the stream's device. A backend
  // without streams returns 0 from record_event, which the allocator treats
  // as complete.
  virtual EventId record_event(StreamId /*stream*/, int /*device*/) { return 0; }
  virtual bool query_event(EventId /*event*/) { return true; }
  virtual void synchronize_event(EventId /*event*/) {}
  virtual void release_event(EventId /*event*/) {}
};

}  // namespace torch_wsl::alloc
