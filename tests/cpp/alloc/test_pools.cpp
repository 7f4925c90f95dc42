// Private pools (CUDA graph capture, torch.cuda.MemPool), capture-time rules,
// stream devices, failing frees, the memory-fraction cap and cacheInfo's
// inputs: the allocator core on the simulated backend. No torch, no CUDA.
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <stdexcept>
#include <utility>
#include <string>
#include <vector>

#include "alloc/core/allocator.h"
#include "alloc/core/sim_backend.h"
#include "sim_fixture.h"

namespace {

using namespace torch_wsl::alloc;

constexpr std::size_t KiB = 1 << 10;
constexpr std::size_t MiB = 1 << 20;
constexpr StreamId kEager = 0;
constexpr StreamId kCapture = 5;
const PoolId kGraphPool{1, 0};

std::uintptr_t addr(void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// A backend that forwards to the simulated one and can be told to fail
// record_event, as a broken driver would.
class FlakyEvents final : public Backend {
 public:
  explicit FlakyEvents(std::shared_ptr<SimulatedBackend> sim) : sim_(std::move(sim)) {}
  const char* name() const override { return "flaky"; }
  void* allocate(std::size_t n) override { return sim_->allocate(n); }
  void deallocate(void* p, std::size_t n) override { sim_->deallocate(p, n); }
  std::optional<MemInfo> mem_info() override { return sim_->mem_info(); }
  EventId record_event(StreamId s, int device) override {
    if (fail_records) throw std::runtime_error("simulated driver error in record_event");
    return sim_->record_event(s, device);
  }
  bool query_event(EventId e) override { return sim_->query_event(e); }
  void synchronize_event(EventId e) override { sim_->synchronize_event(e); }
  void release_event(EventId e) override { sim_->release_event(e); }
  bool fail_records = false;

 private:
  std::shared_ptr<SimulatedBackend> sim_;
};

struct Fixture : test_support::SimFixture {
  explicit Fixture(Policy policy = {}, SimulatedConfig cfg = {}) : SimFixture(policy, cfg) {}
  // Routes requests on kCapture into `pool`, as torch.cuda.graph does.
  void begin(PoolId pool = kGraphPool) {
    alloc.begin_allocate_to_pool(pool, [](StreamId s) { return s == kCapture; });
  }
};

// ------------------------------------------------------------------ private pools

TEST(AllocPools, CaptureAllocationsComeFromThePoolAndStayThere) {
  Fixture f;
  // Memory cached by eager code is not handed to the capture...
  void* eager = f.alloc.malloc(4 * MiB, kCapture);
  f.alloc.free(eager);
  const auto segments_before = f.sim->counters().alloc_calls;
  f.begin();
  f.alloc.capture_begin();
  void* g = f.alloc.malloc(4 * MiB, kCapture);
  EXPECT_NE(addr(g), addr(eager));
  EXPECT_EQ(f.sim->counters().alloc_calls, segments_before + 1);  // a segment of the pool's own
  // ...a stream outside the capture still uses the shared cache...
  void* other = f.alloc.malloc(4 * MiB, kEager + 1);
  f.alloc.free(other);
  // ...and memory freed inside the capture is reused inside it.
  f.alloc.free(g);
  void* g2 = f.alloc.malloc(4 * MiB, kCapture);
  EXPECT_EQ(addr(g2), addr(g));
  f.alloc.capture_end();
  f.alloc.end_allocate_to_pool(kGraphPool);

  // After the capture, the graph's freed memory is not handed to eager code.
  f.alloc.free(g2);
  void* e2 = f.alloc.malloc(4 * MiB, kCapture);
  EXPECT_NE(addr(e2), addr(g));
  EXPECT_EQ(addr(e2), addr(eager));  // the shared cache serves eager requests
  f.alloc.free(e2);

  EXPECT_EQ(f.stat("private_pools.current"), 1);
  EXPECT_GT(f.stat("private_pool_reserved_bytes.current"), 0);
  // A live pool keeps its memory through empty_cache().
  f.alloc.empty_cache();
  EXPECT_GT(f.stat("private_pool_reserved_bytes.current"), 0);
  EXPECT_EQ(f.stat("reserved_bytes.all.current"), f.stat("private_pool_reserved_bytes.current"));
}

TEST(AllocPools, ASharedPoolServesASecondCaptureFromTheFirstOnesMemory) {
  Fixture f;
  f.begin();
  f.alloc.capture_begin();
  void* a = f.alloc.malloc(2 * MiB, kCapture);
  f.alloc.free(a);
  f.alloc.capture_end();
  f.alloc.end_allocate_to_pool(kGraphPool);
  const auto calls = f.sim->counters().alloc_calls;
  f.begin();  // a second graph captured with pool=first.pool()
  EXPECT_EQ(f.alloc.pool_use_count(kGraphPool), 2);
  void* b = f.alloc.malloc(2 * MiB, kCapture);
  EXPECT_EQ(addr(b), addr(a));
  EXPECT_EQ(f.sim->counters().alloc_calls, calls);
  f.alloc.end_allocate_to_pool(kGraphPool);
  f.alloc.free(b);
}

TEST(AllocPools, ReleasedPoolsGiveTheirMemoryBackOnEmptyCache) {
  Fixture f;
  f.begin();
  void* a = f.alloc.malloc(3 * MiB, kCapture);
  void* kept = f.alloc.malloc(1 * KiB, kCapture);  // a static output that outlives the graph
  f.alloc.end_allocate_to_pool(kGraphPool);
  f.alloc.free(a);
  f.alloc.release_pool(kGraphPool);  // the graph is destroyed
  EXPECT_EQ(f.alloc.pool_use_count(kGraphPool), 0);
  EXPECT_EQ(f.stat("private_pools.current"), 1);  // still owns memory
  // A released pool's memory still is not handed to eager code.
  void* e = f.alloc.malloc(3 * MiB, kCapture);
  EXPECT_NE(addr(e), addr(a));
  f.alloc.free(e);
  f.alloc.empty_cache();  // the large segment goes; the small one holds `kept`
  EXPECT_EQ(f.stat("private_pools.current"), 1);
  f.alloc.free(kept);
  f.alloc.empty_cache();
  EXPECT_EQ(f.stat("private_pools.current"), 0);
  EXPECT_EQ(f.stat("private_pool_reserved_bytes.current"), 0);
  EXPECT_EQ(f.stat("reserved_bytes.all.current"), 0);
  EXPECT_EQ(f.sim->counters().live_bytes, 0u);
}

TEST(AllocPools, OutOfMemoryLadderReleasesDeadPoolsButNotLiveOnes) {
  SimulatedConfig cfg;
  cfg.capacity = 64 * MiB;
  Fixture f({}, cfg);
  const PoolId live{2, 0}, dead{3, 0};
  f.begin(live);
  f.alloc.free(f.alloc.malloc(20 * MiB, kCapture));
  f.alloc.end_allocate_to_pool(live);
  f.begin(dead);
  f.alloc.free(f.alloc.malloc(20 * MiB, kCapture));
  f.alloc.end_allocate_to_pool(dead);
  f.alloc.release_pool(dead);
  // 40 MiB are reserved by the two pools; 30 MiB fit only if the dead pool's memory goes.
  void* big = f.alloc.malloc(30 * MiB, kEager);
  EXPECT_EQ(f.stat("num_alloc_retries"), 1);
  EXPECT_EQ(f.stat("private_pools.current"), 1);
  EXPECT_EQ(f.alloc.pool_use_count(live), 1);
  EXPECT_EQ(f.stat("private_pool_reserved_bytes.current"), static_cast<std::int64_t>(20 * MiB));
  // The live pool's 20 MiB are never taken: 30 more MiB cannot be had.
  EXPECT_THROW(f.alloc.malloc(30 * MiB, kEager), OutOfMemoryError);
  f.alloc.free(big);
}

TEST(AllocPools, MemPoolScopesUseTheSameMachinery) {
  Fixture f;
  const PoolId mempool{0, 7};  // torch.cuda.MemPool ids have the first half 0
  f.alloc.create_or_incref_pool(mempool);  // MemPool()
  f.alloc.begin_allocate_to_pool(mempool, [](StreamId) { return true; });  // use_mem_pool(pool)
  void* p = f.alloc.malloc(64 * KiB, kEager);
  f.alloc.end_allocate_to_pool(mempool);
  f.alloc.release_pool(mempool);  // leaving the scope
  EXPECT_EQ(f.alloc.pool_use_count(mempool), 1);
  const auto snap = f.alloc.snapshot();
  ASSERT_EQ(snap.size(), 1u);
  EXPECT_EQ(snap[0].pool, mempool);
  f.alloc.free(p);
  f.alloc.release_pool(mempool);  // del pool
  f.alloc.empty_cache();
  EXPECT_EQ(f.stat("private_pools.current"), 0);
  EXPECT_EQ(f.stat("reserved_bytes.all.current"), 0);
}

TEST(AllocPools, PoolThatNeverGotMemoryGoesAtRelease) {
  Fixture f;
  f.alloc.create_or_incref_pool(kGraphPool);
  EXPECT_EQ(f.stat("private_pools.current"), 1);
  f.alloc.release_pool(kGraphPool);
  EXPECT_EQ(f.stat("private_pools.current"), 0);
  EXPECT_EQ(f.alloc.pool_use_count(kGraphPool), 0);
}

TEST(AllocPools, MisuseIsReported) {
  Fixture f;
  EXPECT_THROW(f.alloc.end_allocate_to_pool(kGraphPool), std::logic_error);
  EXPECT_THROW(f.alloc.release_pool(kGraphPool), std::logic_error);
  f.begin();
  EXPECT_THROW(f.begin(), std::logic_error);  // already routed
  EXPECT_THROW(f.alloc.begin_allocate_to_pool({0, 0}, [](StreamId) { return true; }), std::logic_error);
  EXPECT_THROW(f.alloc.begin_allocate_to_pool({9, 9}, StreamFilter{}), std::invalid_argument);
  f.alloc.end_allocate_to_pool(kGraphPool);
  EXPECT_THROW(f.alloc.capture_end(), std::logic_error);
}

// ------------------------------------------------------------------ capture-time rules

TEST(AllocCapture, NoEventQueriesOrRecordsAndNoReleaseDuringCapture) {
  Fixture f;
  void* used = f.alloc.malloc(8 * KiB, kCapture);
  f.alloc.record_stream(used, 9);
  f.sim->submit_work(9);
  void* pending = f.alloc.malloc(8 * KiB, kEager);
  f.alloc.record_stream(pending, 9);
  f.alloc.free(pending);  // an event on stream 9, not yet complete
  const auto queried = f.sim->counters().events_queried;
  const auto recorded = f.sim->counters().events_recorded;

  f.begin();
  f.alloc.capture_begin();
  EXPECT_TRUE(f.alloc.capturing());
  f.alloc.free(f.alloc.malloc(8 * KiB, kCapture));  // malloc would process events outside a capture
  f.alloc.free(used);                               // used on stream 9: its event is deferred
  EXPECT_EQ(f.sim->counters().events_queried, queried);
  EXPECT_EQ(f.sim->counters().events_recorded, recorded);
  const auto reserved = f.stat("reserved_bytes.all.current");
  f.alloc.empty_cache();  // nothing may be freed during a capture: a no-op
  EXPECT_EQ(f.stat("reserved_bytes.all.current"), reserved);
  EXPECT_EQ(f.sim->counters().free_calls, 0);
  EXPECT_EQ(f.sim->counters().events_queried, queried);
  f.alloc.capture_end();
  f.alloc.end_allocate_to_pool(kGraphPool);

  EXPECT_FALSE(f.alloc.capturing());
  EXPECT_EQ(f.sim->counters().events_recorded, recorded + 1);  // recorded once the capture ended
  // `used` is reused only after stream 9's work completes.
  void* again = f.alloc.malloc(8 * KiB, kCapture);
  EXPECT_NE(addr(again), addr(used));
  f.sim->complete_work(9);
  void* later = f.alloc.malloc(8 * KiB, kCapture);
  EXPECT_EQ(addr(later), addr(used));
  f.alloc.free(again);
  f.alloc.free(later);
  f.alloc.empty_cache();
  EXPECT_EQ(f.sim->counters().live_events, 0);
}

TEST(AllocCapture, OutOfMemoryDuringCaptureSaysWhyItCannotRetry) {
  SimulatedConfig cfg;
  cfg.capacity = 32 * MiB;
  Fixture f({}, cfg);
  f.alloc.free(f.alloc.malloc(24 * MiB, kEager));  // cached, cannot be released during the capture
  f.begin();
  f.alloc.capture_begin();
  const auto frees = f.sim->counters().free_calls;
  try {
    f.alloc.malloc(24 * MiB, kCapture);
    ADD_FAILURE() << "expected OutOfMemoryError";
  } catch (const OutOfMemoryError& e) {
    EXPECT_NE(std::string(e.what()).find("graph capture"), std::string::npos) << e.what();
  }
  EXPECT_EQ(f.sim->counters().free_calls, frees);
  f.alloc.capture_end();
  f.alloc.end_allocate_to_pool(kGraphPool);
  void* ok = f.alloc.malloc(24 * MiB, kCapture);  // after the capture: the ladder releases the cache
  f.alloc.free(ok);
}

// ------------------------------------------------------------------ streams of other devices

TEST(AllocStreams, UsesOnAnotherDevicesStreamRecordUnderThatDevice) {
  Fixture f;
  void* p = f.alloc.malloc(4 * KiB, kEager);
  f.alloc.record_stream(p, kEager, 1);  // the default stream (0) of device 1: not the block's own stream
  f.alloc.record_stream(p, kEager);     // its own stream: nothing to record
  f.alloc.free(p);
  EXPECT_EQ(f.sim->counters().events_recorded, 1);
  EXPECT_EQ(f.sim->counters().last_event_device, 1);
}

// ------------------------------------------------------------------ failing frees

TEST(AllocFree, AFailedEventRecordKeepsTheBlockOutOfTheCacheAndAccounted) {
  auto sim = std::make_shared<SimulatedBackend>();
  auto flaky = std::make_shared<FlakyEvents>(sim);
  CachingAllocator alloc(flaky);
  void* p = alloc.malloc(4 * KiB, kEager);
  alloc.record_stream(p, 3);
  flaky->fail_records = true;
  EXPECT_THROW(alloc.free(p), std::runtime_error);
  flaky->fail_records = false;
  const Stats s = alloc.stats();
  EXPECT_EQ(s.num_free_errors, 1);
  EXPECT_EQ(s.allocation[kAll].current, 0);           // freed as far as the caller is concerned
  EXPECT_EQ(s.active[kAll].current, 1);               // but kept out of the cache
  EXPECT_GT(s.active_bytes[kAll].current, 0);
  void* q = alloc.malloc(4 * KiB, kEager);
  EXPECT_NE(addr(q), addr(p));                        // never handed out again
  alloc.free(q);
  alloc.empty_cache();                                // its segment stays
  EXPECT_GT(alloc.stats().reserved_bytes[kAll].current, 0);
  EXPECT_FALSE(alloc.try_free(p));                    // and a second free is not a double free
}

// ------------------------------------------------------------------ budget and cacheInfo inputs

TEST(AllocBudget, MemoryFractionCapsAtTotalMemoryAndKeepsTheByteBudget) {
  SimulatedConfig cfg;
  cfg.capacity = 1000 * MiB;
  Policy p;
  p.budget_bytes = 300 * MiB;
  Fixture f(p, cfg);
  void* held = f.alloc.malloc(100 * MiB);  // free memory drops; the fraction is of the total
  EXPECT_EQ(f.alloc.set_memory_fraction(0.5), 300 * MiB);  // the byte budget is smaller and stays
  EXPECT_EQ(f.alloc.set_memory_fraction(0.2), 200 * MiB);
  EXPECT_EQ(f.alloc.budget(), 200 * MiB);
  EXPECT_EQ(f.alloc.set_budget(std::nullopt, std::nullopt), 200 * MiB);  // dropping the byte budget keeps the fraction
  EXPECT_EQ(f.alloc.set_memory_fraction(0.0), 0u);                      // and dropping both leaves none
  EXPECT_EQ(f.alloc.budget_headroom(), SIZE_MAX);
  f.alloc.set_memory_fraction(0.25);
  EXPECT_EQ(f.alloc.budget_headroom(), 250 * MiB - static_cast<std::size_t>(f.stat("reserved_bytes.all.current")));
  EXPECT_THROW(f.alloc.set_memory_fraction(1.5), std::invalid_argument);
  f.alloc.free(held);
}

TEST(AllocCache, LargestFreeBlockIsWhatTheStreamCouldBeServed) {
  Fixture f;
  EXPECT_EQ(f.alloc.largest_free_block(1), 0u);
  void* a = f.alloc.malloc(40 * MiB, 1);
  f.alloc.free(a);
  EXPECT_EQ(f.alloc.largest_free_block(1), 40 * MiB);
  EXPECT_EQ(f.alloc.largest_free_block(2), 0u);  // another stream's cache does not serve it
  f.begin();
  void* g = f.alloc.malloc(64 * MiB, kCapture);
  f.alloc.free(g);
  EXPECT_EQ(f.alloc.largest_free_block(kCapture), 64 * MiB);  // routed: the pool's cache
  EXPECT_EQ(f.alloc.largest_free_block(1), 40 * MiB);
  f.alloc.end_allocate_to_pool(kGraphPool);
  EXPECT_EQ(f.alloc.largest_free_block(kCapture), 0u);  // not routed: the shared cache of that stream
}

TEST(AllocPools, RoutingAloneBlocksEventsUntilItEnds) {
  // torch routes allocations to the pool before cudaStreamBeginCapture and
  // stops after cudaStreamEndCapture: another thread's free in between must
  // not record or query events.
  Fixture f;
  void* used = f.alloc.malloc(8 * KiB, kEager);
  f.alloc.record_stream(used, 9);
  f.begin();
  EXPECT_TRUE(f.alloc.events_blocked());
  f.alloc.free(used);
  EXPECT_EQ(f.sim->counters().events_recorded, 0);
  f.alloc.end_allocate_to_pool(kGraphPool);
  EXPECT_FALSE(f.alloc.events_blocked());
  EXPECT_EQ(f.sim->counters().events_recorded, 1);  // recorded when the routing ended
}

TEST(AllocPools, EmptyCacheOfOnePoolLeavesTheRest) {
  Fixture f;
  f.alloc.free(f.alloc.malloc(4 * MiB, kEager));
  const PoolId mempool{0, 3};
  f.alloc.create_or_incref_pool(mempool);
  f.alloc.begin_allocate_to_pool(mempool, [](StreamId) { return true; });
  f.alloc.free(f.alloc.malloc(4 * MiB, kEager));
  f.alloc.end_allocate_to_pool(mempool);
  f.alloc.release_pool(mempool);
  f.alloc.empty_cache(mempool);  // a live pool (one use left) keeps its memory
  EXPECT_EQ(f.stat("segment.all.current"), 2);
  f.alloc.release_pool(mempool);
  f.alloc.empty_cache(mempool);  // ~MemPool: only that pool's memory goes
  EXPECT_EQ(f.stat("segment.all.current"), 1);
  EXPECT_EQ(f.stat("private_pools.current"), 0);
}

// A backend that runs a callback inside allocate(), when the allocator's lock is released.
class CallbackBackend final : public Backend {
 public:
  explicit CallbackBackend(std::shared_ptr<SimulatedBackend> sim) : sim_(std::move(sim)) {}
  const char* name() const override { return "callback"; }
  void* allocate(std::size_t n) override {
    if (on_allocate) std::exchange(on_allocate, nullptr)();
    return sim_->allocate(n);
  }
  void deallocate(void* p, std::size_t n) override { sim_->deallocate(p, n); }
  std::function<void()> on_allocate;

 private:
  std::shared_ptr<SimulatedBackend> sim_;
};

TEST(AllocPools, APoolIsNotDeletedWhileASegmentIsBeingAskedForIt) {
  auto sim = std::make_shared<SimulatedBackend>();
  auto backend = std::make_shared<CallbackBackend>(sim);
  CachingAllocator alloc(backend);
  alloc.begin_allocate_to_pool(kGraphPool, [](StreamId s) { return s == kCapture; });
  // Another thread ends the capture and destroys the graph while cudaMalloc runs.
  backend->on_allocate = [&] {
    alloc.end_allocate_to_pool(kGraphPool);
    alloc.release_pool(kGraphPool);
  };
  void* p = alloc.malloc(1 * MiB, kCapture);
  const auto snap = alloc.snapshot();
  ASSERT_EQ(snap.size(), 1u);
  EXPECT_EQ(snap[0].pool, kGraphPool);  // the segment joined a pool that still exists
  alloc.free(p);
  alloc.empty_cache();
  for (const auto& [k, v] : alloc.stats().items()) {
    if (k == "private_pools.current" || k == "reserved_bytes.all.current") EXPECT_EQ(v, 0) << k;
  }
}

}  // namespace
