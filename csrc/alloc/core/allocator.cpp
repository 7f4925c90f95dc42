#include "alloc/core/allocator.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>

namespace torch_wsl::alloc {

using detail::BinBitmap;
using detail::bin_of;
using detail::kNumBins;

// A block: a contiguous piece of a segment, free (in a bin), allocated, or
// waiting for events of streams it was used on.
struct Block {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  std::size_t requested = 0;
  Block* prev = nullptr;  // neighbours in the segment, in address order
  Block* next = nullptr;
  Block* bin_prev = nullptr;  // free list of its bin
  Block* bin_next = nullptr;
  Block* pool_next = nullptr;  // ObjectPool's free list
  Segment* segment = nullptr;
  int bin = -1;
  BlockState state = BlockState::kFree;
  int pending_events = 0;
  // Streams (and their devices) it is used on besides its own; allocates
  // only when record_stream is used.
  std::vector<std::pair<StreamId, int>> stream_uses;

  void reset() {
    addr = 0;
    size = requested = 0;
    prev = next = bin_prev = bin_next = nullptr;
    segment = nullptr;
    bin = -1;
    state = BlockState::kFree;
    pending_events = 0;
    stream_uses.clear();
  }
};

// The free blocks of one pool of one stream, binned by size.
struct FreeBins {
  std::array<Block*, kNumBins> heads{};
  BinBitmap bits;
};

struct StreamPools {
  StreamId stream = 0;
  PrivatePool* pool = nullptr;  // nullptr: the shared (eager) cache
  FreeBins small;
  FreeBins large;
};

// A private pool: its own per-stream caches, so its memory serves only the
// captures (or MemPool scopes) routed to it.
struct PrivatePool {
  PoolId id;
  int use_count = 0;
  std::int64_t segments = 0;
  int growing = 0;  // segments being asked of the backend for it right now (the lock is released then)
  std::vector<std::unique_ptr<StreamPools>> streams;
};

struct Segment {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  StreamId stream = 0;
  bool small = false;
  CachingAllocator* owner = nullptr;
  StreamPools* pools = nullptr;
  Block* first = nullptr;
  Segment* prev = nullptr;  // the allocator's segment list
  Segment* next = nullptr;
};

namespace {

std::size_t round_up(std::size_t n, std::size_t q) { return (n + q - 1) / q * q; }

bool is_pow2(std::size_t n) { return n != 0 && (n & (n - 1)) == 0; }

template <class F>
void for_each_stat(Stats& s, F&& f) {
  for (StatArray* a : {&s.allocation, &s.segment, &s.active, &s.inactive_split, &s.allocated_bytes,
                       &s.reserved_bytes, &s.active_bytes, &s.inactive_split_bytes, &s.requested_bytes})
    for (Stat& st : *a) f(st);
  f(s.oversize_allocations);
  f(s.oversize_segments);
  f(s.private_pools);
  f(s.private_pool_reserved_bytes);
}

}  // namespace

const char* trace_action_name(TraceAction action) {
  switch (action) {
    case TraceAction::kAlloc: return "alloc";
    case TraceAction::kFreeRequested: return "free_requested";
    case TraceAction::kFreeCompleted: return "free_completed";
    case TraceAction::kSegmentAlloc: return "segment_alloc";
    case TraceAction::kSegmentFree: return "segment_free";
    case TraceAction::kOom: return "oom";
    case TraceAction::kEmptyCache: return "empty_cache";
  }
  return "?";
}

const char* block_state_name(BlockState state) {
  switch (state) {
    case BlockState::kFree: return "inactive";
    case BlockState::kAllocated: return "active_allocated";
    case BlockState::kPendingEvents: return "active_pending_free";
  }
  return "?";
}

std::string format_bytes(std::size_t bytes) {
  static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0)
    std::snprintf(buf, sizeof(buf), "%zu B", bytes);
  else
    std::snprintf(buf, sizeof(buf), "%.2f %s", v, kUnits[u]);
  return buf;
}

// ---------------------------------------------------------------- Policy

const std::vector<std::string>& Policy::field_names() {
  static const std::vector<std::string> names = {
      "min_block_size", "small_size",     "small_segment_size", "large_segment_size",
      "min_large_alloc", "large_round",   "roundup_power2_divisions", "max_split_size",
      "large_split_min", "budget_bytes",  "budget_fraction",    "trace_capacity"};
  return names;
}

void Policy::set(const std::string& name, double value) {
  if (!(value >= 0) || !std::isfinite(value))
    throw std::invalid_argument("allocator policy '" + name + "' must be a finite number >= 0");
  auto as_size = [&]() -> std::size_t {
    if (value != std::floor(value)) throw std::invalid_argument("allocator policy '" + name + "' must be an integer");
    if (value >= 18446744073709551615.0) return SIZE_MAX;
    return static_cast<std::size_t>(value);
  };
  if (name == "min_block_size") min_block_size = as_size();
  else if (name == "small_size") small_size = as_size();
  else if (name == "small_segment_size") small_segment_size = as_size();
  else if (name == "large_segment_size") large_segment_size = as_size();
  else if (name == "min_large_alloc") min_large_alloc = as_size();
  else if (name == "large_round") large_round = as_size();
  else if (name == "roundup_power2_divisions") roundup_power2_divisions = static_cast<int>(as_size());
  else if (name == "max_split_size") max_split_size = value == 0 ? SIZE_MAX : as_size();
  else if (name == "large_split_min") large_split_min = as_size();
  else if (name == "budget_bytes") budget_bytes = as_size();
  else if (name == "budget_fraction") budget_fraction = value;
  else if (name == "trace_capacity") trace_capacity = as_size();
  else {
    std::string known;
    for (const auto& n : field_names()) known += (known.empty() ? "" : ", ") + n;
    throw std::invalid_argument("unknown allocator policy '" + name + "' (known: " + known + ")");
  }
}

void Policy::validate() const {
  auto bad = [](const std::string& what) { throw std::invalid_argument("allocator policy: " + what); };
  if (!is_pow2(min_block_size)) bad("min_block_size must be a power of two");
  if (small_size < min_block_size) bad("small_size must be >= min_block_size");
  if (small_segment_size < small_size || small_segment_size % min_block_size != 0)
    bad("small_segment_size must be >= small_size and a multiple of min_block_size");
  if (large_round == 0 || large_round % min_block_size != 0) bad("large_round must be a multiple of min_block_size");
  if (min_large_alloc <= small_size) bad("min_large_alloc must be > small_size");
  if (large_segment_size < min_large_alloc || large_segment_size % min_block_size != 0)
    bad("large_segment_size must be >= min_large_alloc and a multiple of min_block_size");
  if (roundup_power2_divisions < 0 || roundup_power2_divisions > 64 ||
      (roundup_power2_divisions > 0 && !is_pow2(static_cast<std::size_t>(roundup_power2_divisions))))
    bad("roundup_power2_divisions must be 0 or a power of two up to 64");
  if (max_split_size <= small_size) bad("max_split_size must be > small_size (0 for no limit)");
  if (budget_fraction < 0 || budget_fraction > 1) bad("budget_fraction must be in [0, 1]");
}

// ---------------------------------------------------------------- construction

CachingAllocator::CachingAllocator(std::shared_ptr<Backend> backend, Policy policy)
    : backend_(std::move(backend)), policy_(policy), unit_shift_(0) {
  if (!backend_) throw std::invalid_argument("CachingAllocator needs a backend");
  policy_.validate();
  unit_shift_ = __builtin_ctzll(policy_.min_block_size);
  budget_base_ = compute_budget(policy_.budget_bytes, policy_.budget_fraction);
  apply_budget_locked();
  trace_.set_capacity(policy_.trace_capacity);
}

CachingAllocator::~CachingAllocator() {
  Lock lk(mutex_);
  for (const PendingEvent& pe : pending_events_) {
    try {
      backend_->synchronize_event(pe.event);
      backend_->release_event(pe.event);
    } catch (...) {  // a destructor must not throw; the driver is going away anyway
    }
  }
  pending_events_.clear();
  for (Segment* s = segments_; s != nullptr; s = s->next) {
    try {
      backend_->deallocate(reinterpret_cast<void*>(s->addr), s->size);
    } catch (...) {
    }
  }
}

std::size_t CachingAllocator::compute_budget(std::size_t bytes, double fraction) {
  std::size_t b = bytes;
  if (fraction > 0) {
    const auto info = backend_->mem_info();
    if (!info)
      throw std::invalid_argument(std::string("a budget fraction needs a backend that reports its free memory (") +
                                  backend_->name() + " does not); give budget_bytes instead");
    const double usable = static_cast<double>(info->free_bytes) +
                          static_cast<double>(stats_.reserved_bytes[kAll].current);
    const auto f = static_cast<std::size_t>(usable * fraction);
    b = b == 0 ? f : std::min(b, f);
  }
  return b;
}

void CachingAllocator::apply_budget_locked() {
  const std::size_t a = budget_base_, b = budget_fraction_cap_;
  budget_ = a == 0 ? b : (b == 0 ? a : std::min(a, b));
}

std::size_t CachingAllocator::set_budget(std::optional<std::size_t> bytes, std::optional<double> fraction) {
  if (fraction && (*fraction < 0 || *fraction > 1)) throw std::invalid_argument("budget fraction must be in [0, 1]");
  Lock lk(mutex_);
  budget_base_ = compute_budget(bytes.value_or(0), fraction.value_or(0.0));
  apply_budget_locked();
  return budget_;
}

std::size_t CachingAllocator::set_memory_fraction(double fraction) {
  if (!(fraction >= 0 && fraction <= 1)) throw std::invalid_argument("memory fraction must be in [0, 1]");
  Lock lk(mutex_);
  std::size_t cap = 0;
  if (fraction > 0) {
    const auto info = backend_->mem_info();
    if (!info)
      throw std::invalid_argument(std::string("a memory fraction needs a backend that reports its total memory (") +
                                  backend_->name() + " does not)");
    cap = std::max<std::size_t>(1, static_cast<std::size_t>(static_cast<double>(info->total_bytes) * fraction));
  }
  budget_fraction_cap_ = cap;
  memory_fraction_ = fraction;
  apply_budget_locked();
  return budget_;
}

double CachingAllocator::memory_fraction() const {
  Lock lk(mutex_);
  return memory_fraction_;
}

std::size_t CachingAllocator::budget_headroom() const {
  Lock lk(mutex_);
  if (budget_ == 0) return SIZE_MAX;
  const std::size_t used = static_cast<std::size_t>(stats_.reserved_bytes[kAll].current) + pending_reserve_;
  return budget_ > used ? budget_ - used : 0;
}

std::size_t CachingAllocator::largest_free_block(StreamId stream) const {
  Lock lk(mutex_);
  // The caches a request on `stream` would be served from (a routed pool's or the shared one).
  const PrivatePool* pool = nullptr;
  for (const Routing& r : routing_)
    if (r.filter(stream)) {
      pool = r.pool;
      break;
    }
  const auto& list = pool != nullptr ? pool->streams : streams_;
  std::size_t best = 0;
  auto scan = [&](const FreeBins& fb) {
    int last = -1;
    for (int bin = fb.bits.next_at_or_after(0); bin >= 0; bin = fb.bits.next_at_or_after(bin + 1)) last = bin;
    if (last < 0) return;
    for (const Block* b = fb.heads[last]; b != nullptr; b = b->bin_next) best = std::max(best, b->size);
  };
  for (const auto& p : list) {
    if (p->stream != stream) continue;
    scan(p->small);
    scan(p->large);
  }
  return best;
}

bool CachingAllocator::events_blocked() const {
  Lock lk(mutex_);
  return events_blocked_locked();
}

std::size_t CachingAllocator::budget() const {
  Lock lk(mutex_);
  return budget_;
}

// ---------------------------------------------------------------- sizes

std::size_t CachingAllocator::round_size(std::size_t nbytes) const {
  const std::size_t q = policy_.min_block_size;
  if (nbytes <= q) return q;
  if (policy_.roundup_power2_divisions > 0 && nbytes > policy_.small_size) {
    const std::size_t floor2 = std::size_t{1} << (63 - __builtin_clzll(nbytes));
    const std::size_t step = floor2 / static_cast<std::size_t>(policy_.roundup_power2_divisions);
    if (step > q) return round_up(nbytes, step);
  }
  return round_up(nbytes, q);
}

std::size_t CachingAllocator::segment_size_for(std::size_t size) const {
  if (size <= policy_.small_size) return policy_.small_segment_size;
  if (size < policy_.min_large_alloc) return policy_.large_segment_size;
  return round_up(size, policy_.large_round);
}

bool CachingAllocator::fits_budget(std::size_t nbytes) const {
  return budget_ == 0 ||
         static_cast<std::size_t>(stats_.reserved_bytes[kAll].current) + pending_reserve_ + nbytes <= budget_;
}

// ---------------------------------------------------------------- bins

StreamPools& CachingAllocator::pools_for(StreamId stream, PrivatePool* pool) {
  if (last_pools_ != nullptr && last_pools_->stream == stream && last_pools_->pool == pool) return *last_pools_;
  auto& list = pool != nullptr ? pool->streams : streams_;
  for (const auto& p : list) {
    if (p->stream == stream) {
      last_pools_ = p.get();
      return *p;
    }
  }
  list.push_back(std::make_unique<StreamPools>());
  list.back()->stream = stream;
  list.back()->pool = pool;
  last_pools_ = list.back().get();
  return *last_pools_;
}

// The caches a request on `stream` is served from: the first private pool
// being allocated to whose filter accepts the stream, else the shared cache.
StreamPools& CachingAllocator::target_pools_locked(StreamId stream) {
  for (const Routing& r : routing_)
    if (r.filter(stream)) return pools_for(stream, r.pool);
  return pools_for(stream, nullptr);
}

void CachingAllocator::bin_insert(Block* b) {
  Segment* seg = b->segment;
  FreeBins& fb = seg->small ? seg->pools->small : seg->pools->large;
  const int bin = bin_of(b->size >> unit_shift_);
  b->bin = bin;
  b->state = BlockState::kFree;
  b->bin_prev = nullptr;
  b->bin_next = fb.heads[bin];
  if (b->bin_next != nullptr) b->bin_next->bin_prev = b;
  else fb.bits.set(bin);
  fb.heads[bin] = b;
  if (b->prev != nullptr || b->next != nullptr) {
    update(stats_.inactive_split, seg->small, 1);
    update(stats_.inactive_split_bytes, seg->small, static_cast<std::int64_t>(b->size));
  }
}

void CachingAllocator::bin_remove(Block* b) {
  Segment* seg = b->segment;
  FreeBins& fb = seg->small ? seg->pools->small : seg->pools->large;
  if (b->bin_prev != nullptr) b->bin_prev->bin_next = b->bin_next;
  else fb.heads[b->bin] = b->bin_next;
  if (b->bin_next != nullptr) b->bin_next->bin_prev = b->bin_prev;
  if (fb.heads[b->bin] == nullptr) fb.bits.clear(b->bin);
  b->bin_prev = b->bin_next = nullptr;
  b->bin = -1;
  if (b->prev != nullptr || b->next != nullptr) {
    update(stats_.inactive_split, seg->small, -1);
    update(stats_.inactive_split_bytes, seg->small, -static_cast<std::int64_t>(b->size));
  }
}

// Best fit: the smallest cached block of at least `size` (the most recently
// freed among equals). A bin's blocks differ in size by < 1/32, so the scan
// of the request's own bin and of the next non-empty bin finds the global best.
Block* CachingAllocator::best_fit_locked(StreamPools& pools, bool small, std::size_t size) {
  FreeBins& fb = small ? pools.small : pools.large;
  const int bin = bin_of(size >> unit_shift_);
  Block* best = nullptr;
  for (Block* b = fb.heads[bin]; b != nullptr; b = b->bin_next) {
    if (b->size >= size && (best == nullptr || b->size < best->size)) {
      best = b;
      if (b->size == size) break;
    }
  }
  if (best == nullptr) {
    const int next = fb.bits.next_at_or_after(bin + 1);
    if (next < 0) return nullptr;
    for (Block* b = fb.heads[next]; b != nullptr; b = b->bin_next)
      if (best == nullptr || b->size < best->size) best = b;
  }
  // Oversize blocks (>= max_split_size) serve only oversize requests that
  // waste less than a large segment of them.
  const std::size_t max_split = policy_.max_split_size;
  if (max_split != SIZE_MAX) {
    if (size < max_split && best->size >= max_split) return nullptr;
    if (size >= max_split && best->size >= size + policy_.large_segment_size) return nullptr;
  }
  return best;
}

// ---------------------------------------------------------------- allocation

void* CachingAllocator::malloc(std::size_t nbytes, StreamId stream) {
  if (nbytes == 0) return nullptr;
  Lock lk(mutex_);
  Block* b = allocate_locked(lk, nbytes, stream);
  ptr_map_.insert(b->addr, b);
  return reinterpret_cast<void*>(b->addr);
}

Allocation CachingAllocator::allocate(std::size_t nbytes, StreamId stream) {
  if (nbytes == 0) return {};
  Lock lk(mutex_);
  Block* b = allocate_locked(lk, nbytes, stream);
  return {reinterpret_cast<void*>(b->addr), b};
}

Block* CachingAllocator::allocate_locked(Lock& lk, std::size_t nbytes, StreamId stream) {
  if (nbytes > (SIZE_MAX >> 2)) raise_oom_locked(nbytes, nbytes, "the request is larger than any backend can provide");
  const std::size_t size = round_size(nbytes);
  if (!pending_events_.empty() && !events_blocked_locked()) process_events_locked();
  StreamPools& pools = routing_.empty() ? pools_for(stream, nullptr) : target_pools_locked(stream);
  const bool small = size <= policy_.small_size;
  Block* b = best_fit_locked(pools, small, size);
  if (b != nullptr) bin_remove(b);
  else b = grow_locked(lk, pools, small, size, nbytes);
  take_locked(b, size, nbytes);
  trace_.push(TraceAction::kAlloc, b->addr, b->size, stream);
  return b;
}

Block* CachingAllocator::grow_locked(Lock& lk, StreamPools& pools, bool small, std::size_t size,
                                     std::size_t nbytes) {
  const std::size_t preferred = segment_size_for(size);
  // If the preferred (padded) segment does not fit, the smallest one that
  // holds the request may: under a budget or near the device's end.
  const std::size_t minimal = small ? preferred : round_up(size, policy_.large_round);
  std::string why;
  for (bool released = false;; released = true) {
    const std::size_t wants[2] = {preferred, minimal};
    for (int i = 0; i < (minimal < preferred ? 2 : 1); ++i) {
      const std::size_t want = wants[i];
      if (!fits_budget(want)) {
        why = "budget";
        continue;
      }
      pending_reserve_ += want;
      if (pools.pool != nullptr) ++pools.pool->growing;  // keeps the pool alive while unlocked
      lk.unlock();
      void* p = nullptr;
      try {
        p = backend_->allocate(want);
      } catch (...) {
        lk.lock();
        if (pools.pool != nullptr) --pools.pool->growing;
        pending_reserve_ -= want;
        ++stats_.num_device_alloc;
        ++stats_.num_device_alloc_failed;
        throw;
      }
      lk.lock();
      if (pools.pool != nullptr) --pools.pool->growing;
      pending_reserve_ -= want;
      ++stats_.num_device_alloc;
      if (p == nullptr) {
        ++stats_.num_device_alloc_failed;
        why = "backend";
        continue;
      }
      Segment* seg;
      if (free_segments_.empty()) {
        segment_store_.push_back(std::make_unique<Segment>());
        seg = segment_store_.back().get();
      } else {
        seg = free_segments_.back();
        free_segments_.pop_back();
      }
      *seg = Segment{};
      seg->addr = reinterpret_cast<std::uintptr_t>(p);
      seg->size = want;
      seg->stream = pools.stream;
      seg->small = small;
      seg->owner = this;
      seg->pools = &pools;
      seg->next = segments_;
      if (segments_ != nullptr) segments_->prev = seg;
      segments_ = seg;
      Block* b = block_pool_.make();
      b->addr = seg->addr;
      b->size = want;
      b->segment = seg;
      seg->first = b;
      update(stats_.segment, small, 1);
      update(stats_.reserved_bytes, small, static_cast<std::int64_t>(want));
      if (pools.pool != nullptr) {
        ++pools.pool->segments;
        stats_.private_pool_reserved_bytes.update(static_cast<std::int64_t>(want));
      }
      if (want >= policy_.max_split_size) stats_.oversize_segments.update(1);
      trace_.push(TraceAction::kSegmentAlloc, seg->addr, want, pools.stream);
      return b;
    }
    // Memory cannot go back to the backend during a capture (cudaFree is not allowed then).
    if (released || events_blocked_locked()) break;
    // Rung 3: give every cached free segment back and try again.
    ++stats_.num_alloc_retries;
    release_cached_locked(lk, nullptr);
    if (Block* b = best_fit_locked(pools, small, size)) {  // events may have returned blocks
      bin_remove(b);
      return b;
    }
  }
  raise_oom_locked(nbytes, size, why);
}

Block* CachingAllocator::take_locked(Block* b, std::size_t size, std::size_t nbytes) {
  Segment* seg = b->segment;
  const bool small = seg->small;
  const std::size_t remaining = b->size - size;
  const bool split = small ? remaining >= policy_.min_block_size
                           : (size < policy_.max_split_size && remaining > policy_.large_split_min);
  if (split) {
    Block* r = block_pool_.make();
    r->addr = b->addr + size;
    r->size = remaining;
    r->segment = seg;
    r->prev = b;
    r->next = b->next;
    if (b->next != nullptr) b->next->prev = r;
    b->next = r;
    b->size = size;
    bin_insert(r);
  }
  b->state = BlockState::kAllocated;
  b->requested = nbytes;
  const auto bytes = static_cast<std::int64_t>(b->size);
  update(stats_.allocation, small, 1);
  update(stats_.allocated_bytes, small, bytes);
  update(stats_.requested_bytes, small, static_cast<std::int64_t>(nbytes));
  update(stats_.active, small, 1);
  update(stats_.active_bytes, small, bytes);
  if (b->size >= policy_.max_split_size) stats_.oversize_allocations.update(1);
  return b;
}

// ---------------------------------------------------------------- free

void CachingAllocator::free(void* ptr) {
  if (ptr == nullptr) return;
  Lock lk(mutex_);
  Block* b = ptr_map_.erase(reinterpret_cast<std::uintptr_t>(ptr));
  if (b == nullptr)
    throw std::invalid_argument("free(): the pointer was not allocated by this allocator, or was freed already");
  release_locked(b);
}

bool CachingAllocator::try_free(void* ptr, std::size_t* requested) {
  Lock lk(mutex_);
  Block* b = ptr_map_.erase(reinterpret_cast<std::uintptr_t>(ptr));
  if (b == nullptr) return false;
  if (requested != nullptr) *requested = b->requested;
  release_locked(b);
  return true;
}

CachingAllocator& CachingAllocator::owner(const Block* handle) { return *handle->segment->owner; }
void* CachingAllocator::address(const Block* handle) { return reinterpret_cast<void*>(handle->addr); }
std::size_t CachingAllocator::requested_size(const Block* handle) { return handle->requested; }

void CachingAllocator::release(Block* handle) {
  if (handle == nullptr) return;
  // The block is allocated, so its segment (and owner) cannot go away under us.
  CachingAllocator& self = *handle->segment->owner;
  Lock lk(self.mutex_);
  self.release_locked(handle);
}

void CachingAllocator::release_locked(Block* b) {
  const bool small = b->segment->small;
  const auto bytes = static_cast<std::int64_t>(b->size);
  update(stats_.allocation, small, -1);
  update(stats_.allocated_bytes, small, -bytes);
  update(stats_.requested_bytes, small, -static_cast<std::int64_t>(b->requested));
  if (b->size >= policy_.max_split_size) stats_.oversize_allocations.update(-1);
  trace_.push(TraceAction::kFreeRequested, b->addr, b->size, b->segment->stream);
  if (b->stream_uses.empty()) {
    free_block_locked(b);
    return;
  }
  b->state = BlockState::kPendingEvents;
  if (events_blocked_locked()) {  // an event recorded now could become part of a graph
    deferred_events_.push_back(b);
    return;
  }
  record_use_events_locked(b);
}

// Reuse waits until the work queued so far on the streams the block was
// used on is done: one event per stream. If the backend fails to record
// one, the block is kept out of the cache for good (an extra pending count
// that never completes) and stays counted as active, then the error
// propagates: reusing memory another stream may still touch would corrupt data.
void CachingAllocator::record_use_events_locked(Block* b) {
  try {
    for (const auto& [stream, device] : b->stream_uses) {
      const EventId ev = backend_->record_event(stream, device);
      if (ev != 0) {
        pending_events_.push_back({ev, b});
        ++b->pending_events;
      }
    }
  } catch (...) {
    b->stream_uses.clear();
    ++b->pending_events;
    ++stats_.num_free_errors;
    throw;
  }
  b->stream_uses.clear();
  if (b->pending_events == 0) free_block_locked(b);
}

void CachingAllocator::free_block_locked(Block* b) {
  Segment* seg = b->segment;
  update(stats_.active, seg->small, -1);
  update(stats_.active_bytes, seg->small, -static_cast<std::int64_t>(b->size));
  b->requested = 0;
  if (Block* p = b->prev; p != nullptr && p->state == BlockState::kFree) {
    bin_remove(p);
    b->addr = p->addr;
    b->size += p->size;
    b->prev = p->prev;
    if (p->prev != nullptr) p->prev->next = b;
    else seg->first = b;
    block_pool_.recycle(p);
  }
  if (Block* n = b->next; n != nullptr && n->state == BlockState::kFree) {
    bin_remove(n);
    b->size += n->size;
    b->next = n->next;
    if (n->next != nullptr) n->next->prev = b;
    block_pool_.recycle(n);
  }
  bin_insert(b);
  trace_.push(TraceAction::kFreeCompleted, b->addr, b->size, seg->stream);
}

// ---------------------------------------------------------------- streams and events

void CachingAllocator::record_stream(void* ptr, StreamId stream, int device) {
  Lock lk(mutex_);
  Block* b = ptr_map_.find(reinterpret_cast<std::uintptr_t>(ptr));
  if (b == nullptr) throw std::invalid_argument("record_stream(): the pointer is not a live allocation of this allocator");
  record_stream_locked(b, stream, device);
}

bool CachingAllocator::try_record_stream(void* ptr, StreamId stream, int device) {
  Lock lk(mutex_);
  Block* b = ptr_map_.find(reinterpret_cast<std::uintptr_t>(ptr));
  if (b == nullptr) return false;
  record_stream_locked(b, stream, device);
  return true;
}

void CachingAllocator::record_stream(Block* handle, StreamId stream, int device) {
  Lock lk(mutex_);
  record_stream_locked(handle, stream, device);
}

void CachingAllocator::record_stream_locked(Block* b, StreamId stream, int device) {
  // The block's own stream on its own device is ordered with it already.
  if (stream == b->segment->stream && device == kOwnDevice) return;
  const std::pair<StreamId, int> use{stream, device};
  if (std::find(b->stream_uses.begin(), b->stream_uses.end(), use) == b->stream_uses.end())
    b->stream_uses.push_back(use);
}

void CachingAllocator::process_events() {
  Lock lk(mutex_);
  if (!events_blocked_locked()) process_events_locked();
}

void CachingAllocator::process_events_locked() {
  std::size_t keep = 0, i = 0;
  try {
    for (; i < pending_events_.size(); ++i) {
      const PendingEvent pe = pending_events_[i];
      if (backend_->query_event(pe.event)) {
        backend_->release_event(pe.event);
        if (--pe.block->pending_events == 0) free_block_locked(pe.block);
      } else {
        pending_events_[keep++] = pe;
      }
    }
  } catch (...) {  // a driver error: keep the events not yet processed, then report it
    pending_events_.erase(pending_events_.begin() + static_cast<std::ptrdiff_t>(keep),
                          pending_events_.begin() + static_cast<std::ptrdiff_t>(i));
    throw;
  }
  pending_events_.resize(keep);
}

void CachingAllocator::synchronize_events_locked() {
  if (pending_events_.empty()) return;
  ++stats_.num_sync_all_streams;
  for (const PendingEvent& pe : pending_events_) {
    backend_->synchronize_event(pe.event);
    backend_->release_event(pe.event);
    if (--pe.block->pending_events == 0) free_block_locked(pe.block);
  }
  pending_events_.clear();
}

// ---------------------------------------------------------------- private pools and capture

PrivatePool* CachingAllocator::find_pool_locked(PoolId id) const {
  for (const auto& p : private_pools_)
    if (p->id == id) return p.get();
  return nullptr;
}

PrivatePool& CachingAllocator::incref_pool_locked(PoolId id) {
  if (id == PoolId{0, 0}) throw std::logic_error("private pool id {0, 0} is reserved for the shared cache");
  PrivatePool* p = find_pool_locked(id);
  if (p == nullptr) {
    private_pools_.push_back(std::make_unique<PrivatePool>());
    p = private_pools_.back().get();
    p->id = id;
    stats_.private_pools.update(1);
  }
  ++p->use_count;
  return *p;
}

void CachingAllocator::create_or_incref_pool(PoolId pool) {
  Lock lk(mutex_);
  incref_pool_locked(pool);
}

void CachingAllocator::begin_allocate_to_pool(PoolId pool, StreamFilter filter) {
  if (!filter) throw std::invalid_argument("begin_allocate_to_pool: the stream filter is empty");
  Lock lk(mutex_);
  for (const Routing& r : routing_)
    if (r.pool->id == pool) throw std::logic_error("begin_allocate_to_pool: allocations already go to this pool");
  PrivatePool& p = incref_pool_locked(pool);
  routing_.push_back(Routing{&p, std::move(filter)});
}

void CachingAllocator::end_allocate_to_pool(PoolId pool) {
  Lock lk(mutex_);
  for (auto it = routing_.begin(); it != routing_.end(); ++it) {
    if (it->pool->id == pool) {
      routing_.erase(it);
      if (!events_blocked_locked()) record_deferred_events_locked();
      return;
    }
  }
  throw std::logic_error("end_allocate_to_pool: allocations do not go to this pool");
}

void CachingAllocator::release_pool(PoolId pool) {
  Lock lk(mutex_);
  PrivatePool* p = find_pool_locked(pool);
  if (p == nullptr || p->use_count == 0) throw std::logic_error("release_pool: the pool is not in use");
  --p->use_count;
  // Its memory goes back on the next empty_cache() or under pressure, once
  // its blocks are freed; a pool that never got memory goes now.
  erase_dead_pools_locked();
}

bool CachingAllocator::pool_is_dead_locked(const PrivatePool& p) const {
  const bool routed = std::any_of(routing_.begin(), routing_.end(), [&](const Routing& r) { return r.pool == &p; });
  return p.use_count == 0 && p.segments == 0 && p.growing == 0 && !routed;
}

void CachingAllocator::erase_dead_pools_locked() {
  const auto dead = [this](const std::unique_ptr<PrivatePool>& p) { return pool_is_dead_locked(*p); };
  const auto n = std::count_if(private_pools_.begin(), private_pools_.end(), dead);
  if (n == 0) return;
  stats_.private_pools.update(-static_cast<std::int64_t>(n));
  private_pools_.erase(std::remove_if(private_pools_.begin(), private_pools_.end(), dead), private_pools_.end());
  last_pools_ = nullptr;
}

int CachingAllocator::pool_use_count(PoolId pool) const {
  Lock lk(mutex_);
  const PrivatePool* p = find_pool_locked(pool);
  return p == nullptr ? 0 : p->use_count;
}

void CachingAllocator::capture_begin() {
  Lock lk(mutex_);
  ++capture_depth_;
}

void CachingAllocator::capture_end() {
  Lock lk(mutex_);
  if (capture_depth_ == 0) throw std::logic_error("capture_end() without capture_begin()");
  if (--capture_depth_ == 0 && !events_blocked_locked()) record_deferred_events_locked();
}

bool CachingAllocator::capturing() const {
  Lock lk(mutex_);
  return capture_depth_ > 0;
}

// Frees deferred while events were blocked get their stream events now. A
// failure keeps that block out of the cache (counted in num_free_errors)
// and does not stop the others: this runs at the end of a capture, from
// torch's clean-up paths, which must not throw.
void CachingAllocator::record_deferred_events_locked() {
  std::vector<Block*> blocks;
  blocks.swap(deferred_events_);
  for (Block* b : blocks) {
    try {
      record_use_events_locked(b);
    } catch (...) {
    }
  }
}

// ---------------------------------------------------------------- releasing memory

void CachingAllocator::empty_cache() {
  Lock lk(mutex_);
  // While allocations go to a private pool a capture may be running, and
  // cudaFree or an event wait would break it: nothing is released then.
  if (events_blocked_locked()) return;
  release_cached_locked(lk, nullptr);
}

void CachingAllocator::empty_cache(PoolId pool) {
  Lock lk(mutex_);
  if (events_blocked_locked()) return;
  PrivatePool* p = find_pool_locked(pool);
  if (p == nullptr) return;
  release_cached_locked(lk, p);
}

// Unlinks a fully free segment and drops it from the statistics (its memory
// is handed back by the caller).
void CachingAllocator::forget_segment_locked(Segment* s) {
  Block* b = s->first;
  bin_remove(b);
  block_pool_.recycle(b);
  if (s->prev != nullptr) s->prev->next = s->next;
  else segments_ = s->next;
  if (s->next != nullptr) s->next->prev = s->prev;
  update(stats_.segment, s->small, -1);
  update(stats_.reserved_bytes, s->small, -static_cast<std::int64_t>(s->size));
  if (s->size >= policy_.max_split_size) stats_.oversize_segments.update(-1);
  if (PrivatePool* pool = s->pools->pool) {
    --pool->segments;
    stats_.private_pool_reserved_bytes.update(-static_cast<std::int64_t>(s->size));
  }
  *s = Segment{};
  free_segments_.push_back(s);
}

// Gives fully free segments back: all of them (only_pool == nullptr), or
// only those of one private pool.
std::size_t CachingAllocator::release_cached_locked(Lock& lk, const PrivatePool* only_pool) {
  synchronize_events_locked();
  std::vector<std::pair<std::uintptr_t, std::size_t>> to_free;
  bool pool_emptied = false;
  for (Segment* s = segments_; s != nullptr;) {
    Segment* next = s->next;
    const Block* b = s->first;
    const PrivatePool* pool = s->pools->pool;
    // A pool still in use keeps its memory: its graphs' replays write there.
    if (b->state == BlockState::kFree && b->next == nullptr && (pool == nullptr || pool->use_count == 0) &&
        (only_pool == nullptr || pool == only_pool)) {
      pool_emptied = pool_emptied || pool != nullptr;
      to_free.emplace_back(s->addr, s->size);
      forget_segment_locked(s);
    }
    s = next;
  }
  if (pool_emptied) erase_dead_pools_locked();  // pools without uses or memory are gone
  if (to_free.empty()) return 0;
  trace_.push(TraceAction::kEmptyCache, 0, 0, 0);
  std::size_t bytes = 0;
  std::exception_ptr error;
  lk.unlock();
  for (const auto& [addr, size] : to_free) {
    try {
      backend_->deallocate(reinterpret_cast<void*>(addr), size);
    } catch (...) {
      if (!error) error = std::current_exception();
    }
    bytes += size;
  }
  lk.lock();
  stats_.num_device_free += static_cast<std::int64_t>(to_free.size());
  for (const auto& [addr, size] : to_free) trace_.push(TraceAction::kSegmentFree, addr, size, 0);
  if (error) std::rethrow_exception(error);
  return bytes;
}

void CachingAllocator::raise_oom_locked(std::size_t nbytes, std::size_t size, const std::string& why) {
  ++stats_.num_ooms;
  trace_.push(TraceAction::kOom, 0, size, 0);
  const auto allocated = static_cast<std::size_t>(stats_.allocated_bytes[kAll].current);
  const auto reserved = static_cast<std::size_t>(stats_.reserved_bytes[kAll].current);
  const auto active = static_cast<std::size_t>(stats_.active_bytes[kAll].current);
  const std::size_t cached_free = reserved - std::min(reserved, active);
  std::string msg = std::string("torch_wsl allocator (") + backend_->name() + "): out of memory. Tried to allocate " +
                    format_bytes(size) + " (" + std::to_string(nbytes) + " bytes requested); ";
  if (why == "budget")
    msg += "that would exceed the budget of " + format_bytes(budget_) +
           ". The budget caps reserved memory so that a job fails here instead of spilling into "
           "shared system memory (WSL2 does that silently, several times slower); reduce the batch "
           "size, or raise the budget (torch_wsl.memory.set_budget, TORCH_WSL_ALLOC_CONF) if the device "
           "really has room.";
  else if (why == "backend" && capture_depth_ > 0)
    msg += "the backend refused it, and during a CUDA graph capture cached memory cannot be released to retry "
           "(free memory before capturing, e.g. torch.cuda.empty_cache(), or capture a smaller graph).";
  else if (why == "backend")
    msg += "the backend refused it even after the cached free memory was released.";
  else
    msg += why + ".";
  msg += " Allocated: " + format_bytes(allocated) + "; reserved: " + format_bytes(reserved) + " (" +
         format_bytes(cached_free) + " free in cache); budget: " + (budget_ ? format_bytes(budget_) : "none") + ".";
  throw OutOfMemoryError(msg, size, allocated, reserved, cached_free, budget_);
}

// ---------------------------------------------------------------- introspection

Stats CachingAllocator::stats() const {
  Lock lk(mutex_);
  Stats s = stats_;
  s.max_split_size = policy_.max_split_size == SIZE_MAX ? -1 : static_cast<std::int64_t>(policy_.max_split_size);
  s.budget_bytes = static_cast<std::int64_t>(budget_);
  return s;
}

void CachingAllocator::reset_peak_stats() {
  Lock lk(mutex_);
  for_each_stat(stats_, [](Stat& s) { s.reset_peak(); });
}

void CachingAllocator::reset_accumulated_stats() {
  Lock lk(mutex_);
  for_each_stat(stats_, [](Stat& s) { s.reset_accumulated(); });
  stats_.num_alloc_retries = stats_.num_ooms = stats_.num_sync_all_streams = 0;
  stats_.num_device_alloc = stats_.num_device_free = stats_.num_device_alloc_failed = 0;
  stats_.num_free_errors = 0;
}

std::vector<SegmentInfo> CachingAllocator::snapshot() const {
  Lock lk(mutex_);
  std::vector<SegmentInfo> out;
  for (const Segment* s = segments_; s != nullptr; s = s->next) {
    SegmentInfo info{s->addr, s->size, s->stream, s->small, {}, {0, 0}};
    if (s->pools->pool != nullptr) info.pool = s->pools->pool->id;
    for (const Block* b = s->first; b != nullptr; b = b->next)
      info.blocks.push_back(BlockInfo{b->addr, b->size, b->requested, b->state});
    out.push_back(std::move(info));
  }
  std::sort(out.begin(), out.end(), [](const SegmentInfo& a, const SegmentInfo& b) { return a.addr < b.addr; });
  return out;
}

std::vector<TraceEntry> CachingAllocator::trace() const {
  Lock lk(mutex_);
  return trace_.entries();
}

void CachingAllocator::set_trace_capacity(std::size_t capacity) {
  Lock lk(mutex_);
  trace_.set_capacity(capacity);
}

}  // namespace torch_wsl::alloc
