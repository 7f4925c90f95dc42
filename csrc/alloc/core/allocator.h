// The caching allocator core: plain C++ (no torch, no CUDA headers).
//
// Segments come from a Backend; blocks are carved out of them with best fit,
// split, and merged again when freed. Small requests (<= small_size) and
// large ones live in separate pools with their own segment sizes. Free
// blocks are cached per stream; a block used on another stream
// (record_stream) returns to the cache only once that stream's work is done
// (events). Memory goes back to the backend only on empty_cache() or under
// pressure (the out-of-memory ladder), so a training loop's steady state
// makes no backend calls at all -- on WSL2 each one crosses the VM bus.
//
// Out-of-memory ladder: reuse a cached block; ask the backend (within the
// budget); release every cached free segment and ask again; raise
// OutOfMemoryError with the statistics.
//
// Private pools (CUDA graphs, torch.cuda.MemPool): while allocations are
// routed to a pool, requests on the streams its filter accepts are served
// from segments of that pool alone, and blocks freed there stay in the pool
// (a graph's replays keep using its memory) until the pool is released and
// the cache emptied. During a stream capture no event is queried or recorded
// and nothing goes back to the backend (cudaFree and event queries are not
// allowed while capturing).
//
// Thread-safe: one mutex per allocator, released around backend calls
// (allocate, deallocate). The hot path (a cached block is reused) does not
// allocate memory: blocks come from an object pool and pointers are tracked
// in an open-addressing map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "alloc/core/backend.h"
#include "alloc/core/detail.h"
#include "alloc/core/stats.h"
#include "alloc/core/trace.h"

namespace torch_wsl::alloc {

// How the allocator rounds, pools and caps memory.
//
// The structure is PyTorch's CUDA caching allocator's
// (c10/cuda/CUDACachingAllocator.cpp); three defaults differ, chosen on
// allocation traces of CPU training steps (GPT-2 and ResNet-50, the
// benchmark's workloads) and checked on six held-out traces (other batch
// sizes, ResNet-18, BERT): small_size 256 KiB (PyTorch: 1 MiB),
// large_segment_size 12 MiB (20 MiB) and large_split_min 256 KiB (1 MiB).
// Peak reserved / peak requested went from 1.11-1.24 to 1.05-1.23, never
// worse by more than 0.013, with no backend call in the steady state either way.
struct Policy {
  std::size_t min_block_size = 512;           // rounding quantum and block alignment (a power of two)
  std::size_t small_size = 256 << 10;         // requests up to this use the small pool
  std::size_t small_segment_size = 2 << 20;   // segment size of the small pool
  std::size_t large_segment_size = 12 << 20;  // segment size for large requests below min_large_alloc
  std::size_t min_large_alloc = 10 << 20;     // from here a request gets a segment of its own size...
  std::size_t large_round = 2 << 20;          // ...rounded up to a multiple of this
  int roundup_power2_divisions = 0;           // > 0: round large requests up to one of N steps per power of two
  std::size_t max_split_size = SIZE_MAX;      // cached blocks this large are never split ("oversize")
  std::size_t large_split_min = 256 << 10;    // in the large pool, split only if more than this remains
  std::size_t budget_bytes = 0;               // hard cap on reserved bytes; 0: none
  double budget_fraction = 0.0;               // cap as a fraction of the backend's free memory at start; 0: none
  std::size_t trace_capacity = 0;             // events kept in the trace ring; 0: no tracing

  // Throws std::invalid_argument naming the field when a value is unusable.
  void validate() const;

  // Sets one field by name (the names above); throws std::invalid_argument
  // for an unknown name or a bad value.
  void set(const std::string& name, double value);
  static const std::vector<std::string>& field_names();
};

// Raised at the end of the out-of-memory ladder. what() carries the numbers.
class OutOfMemoryError : public std::runtime_error {
 public:
  OutOfMemoryError(const std::string& message, std::size_t requested, std::size_t allocated,
                   std::size_t reserved, std::size_t cached_free, std::size_t budget)
      : std::runtime_error(message),
        requested(requested),
        allocated(allocated),
        reserved(reserved),
        cached_free(cached_free),
        budget(budget) {}
  std::size_t requested, allocated, reserved, cached_free, budget;
};

// What replay() and the benchmarks drive: the caching allocator, or the
// pass-through "no caching" baseline.
class AllocatorInterface {
 public:
  virtual ~AllocatorInterface() = default;
  virtual void* malloc(std::size_t nbytes, StreamId stream = 0) = 0;
  virtual void free(void* ptr) = 0;
  virtual Stats stats() const = 0;
};

// A private pool's id: the two halves of PyTorch's MempoolId_t.
using PoolId = std::pair<std::uint64_t, std::uint64_t>;
// Whether a request on this stream goes to the pool (during a capture: is
// the stream being captured into this graph).
using StreamFilter = std::function<bool(StreamId)>;

enum class BlockState : std::uint8_t { kFree, kAllocated, kPendingEvents };
const char* block_state_name(BlockState state);

struct BlockInfo {
  std::uintptr_t addr;
  std::size_t size;
  std::size_t requested;  // 0 unless allocated
  BlockState state;
};

struct SegmentInfo {
  std::uintptr_t addr;
  std::size_t size;
  StreamId stream;
  bool small_pool;
  std::vector<BlockInfo> blocks;  // in address order, covering the segment
  PoolId pool{0, 0};              // the private pool it belongs to ({0, 0}: none)
};

struct Block;    // opaque outside allocator.cpp
struct Segment;
struct StreamPools;
struct PrivatePool;


// An allocation from the handle API: the pointer and the block to release.
struct Allocation {
  void* ptr = nullptr;
  Block* handle = nullptr;
};

class CachingAllocator final : public AllocatorInterface {
 public:
  explicit CachingAllocator(std::shared_ptr<Backend> backend, Policy policy = {});
  ~CachingAllocator() override;
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Pointer API: `free` finds the block through a pointer map. nbytes == 0
  // returns nullptr; free(nullptr) does nothing.
  void* malloc(std::size_t nbytes, StreamId stream = 0) override;
  void free(void* ptr) override;
  // free() for a pointer that may belong to someone else: false (and
  // nothing done) if it is not a live allocation of this allocator. On
  // success `requested` gets the size that was asked for.
  bool try_free(void* ptr, std::size_t* requested = nullptr);
  // The block is also used on `stream` (of `device`, or of the backend's own
  // device): after free() it is reused only once that stream's work queued
  // so far is done.
  void record_stream(void* ptr, StreamId stream, int device = kOwnDevice);
  // The same for a pointer that may belong to someone else: false if it is
  // not a live allocation of this allocator.
  bool try_record_stream(void* ptr, StreamId stream, int device = kOwnDevice);

  // Handle API (the CPU tensor allocator's deleter context): no pointer map.
  Allocation allocate(std::size_t nbytes, StreamId stream = 0);
  static void release(Block* handle);
  static CachingAllocator& owner(const Block* handle);
  static void* address(const Block* handle);
  static std::size_t requested_size(const Block* handle);
  void record_stream(Block* handle, StreamId stream, int device = kOwnDevice);

  // Private pools. begin_allocate_to_pool creates the pool (or adds a use to
  // it) and routes requests on streams that `filter` accepts into it until
  // end_allocate_to_pool; create_or_incref_pool only adds a use;
  // release_pool drops one, and a pool without uses gives its segments back
  // on the next empty_cache() (or under memory pressure) once its blocks are
  // freed. Throws std::logic_error on misuse (a pool routed twice, ended or
  // released when it is not).
  void begin_allocate_to_pool(PoolId pool, StreamFilter filter);
  void end_allocate_to_pool(PoolId pool);
  void create_or_incref_pool(PoolId pool);
  void release_pool(PoolId pool);
  int pool_use_count(PoolId pool) const;  // 0 for an unknown pool
  // A stream capture began / ended on this allocator's device (nested
  // captures count). While one runs, and while any pool is being allocated
  // to (a capture may be starting or ending then, on another thread): no
  // event queries or records (frees of blocks used on other streams are
  // deferred until then), no memory back to the backend (the out-of-memory
  // ladder stops before releasing the cache; empty_cache() does nothing).
  void capture_begin();
  void capture_end();
  bool capturing() const;
  bool events_blocked() const;

  // Waits for pending events, then returns every fully free segment to the
  // backend (not those of private pools still in use).
  void empty_cache();
  // The same for one private pool's segments, once the pool is released.
  void empty_cache(PoolId pool);
  // Returns blocks whose streams' work completed to the cache (malloc does this too).
  void process_events();

  Stats stats() const override;
  void reset_peak_stats();
  void reset_accumulated_stats();
  std::vector<SegmentInfo> snapshot() const;
  std::vector<TraceEntry> trace() const;
  void set_trace_capacity(std::size_t capacity);

  // Sets the hard cap on reserved bytes: the smaller of `bytes` and
  // `fraction` of the backend's free memory now (plus what is reserved);
  // a zero or missing value drops that cap. Returns the effective budget,
  // which is also bounded by set_memory_fraction's cap.
  std::size_t set_budget(std::optional<std::size_t> bytes, std::optional<double> fraction);
  // torch.cuda.set_per_process_memory_fraction: a cap of `fraction` of the
  // backend's total memory, kept alongside the budget above (the smaller
  // wins); 0 drops it. Returns the effective budget.
  std::size_t set_memory_fraction(double fraction);
  double memory_fraction() const;  // the last fraction set (0: none)
  std::size_t budget() const;
  // Bytes that can still be reserved under the budget (SIZE_MAX: no budget).
  std::size_t budget_headroom() const;
  // The largest cached free block a request on `stream` could be served
  // from right now (its private pool's if it is routed to one; 0: none).
  std::size_t largest_free_block(StreamId stream) const;

  const Policy& policy() const { return policy_; }
  Backend& backend() { return *backend_; }
  const std::shared_ptr<Backend>& backend_ptr() const { return backend_; }

  // The block size a request of `nbytes` gets, and the segment size that a
  // request of that block size asks the backend for.
  std::size_t round_size(std::size_t nbytes) const;
  std::size_t segment_size_for(std::size_t block_size) const;

  // For pthread_atfork: a forked child must not inherit a locked mutex.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

 private:
  using Lock = std::unique_lock<std::mutex>;

  Block* allocate_locked(Lock& lk, std::size_t nbytes, StreamId stream);
  StreamPools& target_pools_locked(StreamId stream);
  PrivatePool* find_pool_locked(PoolId id) const;
  PrivatePool& incref_pool_locked(PoolId id);
  void forget_segment_locked(Segment* s);
  void record_deferred_events_locked();
  void record_use_events_locked(Block* b);
  Block* grow_locked(Lock& lk, StreamPools& pools, bool small, std::size_t size, std::size_t nbytes);
  Block* take_locked(Block* b, std::size_t size, std::size_t nbytes);
  void release_locked(Block* b);
  void free_block_locked(Block* b);
  void record_stream_locked(Block* b, StreamId stream, int device);
  void process_events_locked();
  void synchronize_events_locked();
  std::size_t release_cached_locked(Lock& lk, const PrivatePool* only_pool);
  bool events_blocked_locked() const { return capture_depth_ > 0 || !routing_.empty(); }
  bool pool_is_dead_locked(const PrivatePool& p) const;
  void erase_dead_pools_locked();
  Block* best_fit_locked(StreamPools& pools, bool small, std::size_t size);
  StreamPools& pools_for(StreamId stream, PrivatePool* pool);
  void bin_insert(Block* b);
  void bin_remove(Block* b);
  bool fits_budget(std::size_t nbytes) const;
  std::size_t compute_budget(std::size_t bytes, double fraction);
  void apply_budget_locked();
  [[noreturn]] void raise_oom_locked(std::size_t nbytes, std::size_t size, const std::string& why);
  void update(StatArray& s, bool small, std::int64_t delta) {
    s[kAll].update(delta);
    s[small ? kSmallPool : kLargePool].update(delta);
  }

  std::shared_ptr<Backend> backend_;
  Policy policy_;
  int unit_shift_;  // log2(min_block_size)
  std::size_t budget_ = 0;             // the effective cap: the smaller non-zero of the two below
  std::size_t budget_base_ = 0;        // from the policy / set_budget
  std::size_t budget_fraction_cap_ = 0;  // from set_memory_fraction
  double memory_fraction_ = 0.0;
  std::size_t pending_reserve_ = 0;  // bytes being asked of the backend right now (counted against the budget)

  mutable std::mutex mutex_;
  Stats stats_;
  TraceRing trace_;
  detail::FlatPtrMap<Block> ptr_map_;
  detail::ObjectPool<Block> block_pool_;
  std::vector<std::unique_ptr<StreamPools>> streams_;
  StreamPools* last_pools_ = nullptr;
  Segment* segments_ = nullptr;  // intrusive list of every segment
  std::vector<std::unique_ptr<Segment>> segment_store_;
  std::vector<Segment*> free_segments_;  // Segment objects to reuse
  struct PendingEvent {
    EventId event;
    Block* block;
  };
  std::vector<PendingEvent> pending_events_;

  std::vector<std::unique_ptr<PrivatePool>> private_pools_;
  struct Routing {
    PrivatePool* pool;
    StreamFilter filter;
  };
  std::vector<Routing> routing_;           // pools receiving allocations now
  int capture_depth_ = 0;
  std::vector<Block*> deferred_events_;    // freed during a capture, used on other streams
};

// "1.50 GiB", "512 B": for messages.
std::string format_bytes(std::size_t bytes);

}  // namespace torch_wsl::alloc
