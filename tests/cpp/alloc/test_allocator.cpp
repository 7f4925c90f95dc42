// The allocator core on the simulated backend: best fit, split and merge,
// pools, streams and events, the out-of-memory ladder, the budget,
// statistics against a shadow model, the trace, replay. No torch here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "alloc/core/allocator.h"
#include "alloc/core/host_backend.h"
#include "alloc/core/no_caching.h"
#include "alloc/core/replay.h"
#include "alloc/core/sim_backend.h"
#include "sim_fixture.h"

namespace {

using namespace torch_wsl::alloc;

constexpr std::size_t KiB = 1 << 10;
constexpr std::size_t MiB = 1 << 20;

std::uintptr_t addr(void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// The tests were written against PyTorch's pool sizes (1 MiB small requests,
// 20 MiB segments, 1 MiB split remainder); the numbers in them follow from these.
Policy pytorch_sizes() {
  Policy p;
  p.small_size = 1 << 20;
  p.large_segment_size = 20 << 20;
  p.large_split_min = 1 << 20;
  return p;
}

struct Fixture : test_support::SimFixture {
  explicit Fixture(Policy policy = pytorch_sizes(), SimulatedConfig cfg = {}) : SimFixture(policy, cfg) {}
};

const BlockInfo* find_block(const std::vector<SegmentInfo>& snap, std::uintptr_t a) {
  for (const auto& s : snap)
    for (const auto& b : s.blocks)
      if (b.addr == a) return &b;
  return nullptr;
}

// ------------------------------------------------------------------ sizes

TEST(AllocSizes, RoundingAndSegmentSizes) {
  Fixture f;
  EXPECT_EQ(f.alloc.round_size(1), 512u);
  EXPECT_EQ(f.alloc.round_size(512), 512u);
  EXPECT_EQ(f.alloc.round_size(513), 1024u);
  EXPECT_EQ(f.alloc.segment_size_for(512), 2 * MiB);
  EXPECT_EQ(f.alloc.segment_size_for(1 * MiB), 2 * MiB);
  EXPECT_EQ(f.alloc.segment_size_for(1 * MiB + 512), 20 * MiB);
  EXPECT_EQ(f.alloc.segment_size_for(10 * MiB), 10 * MiB);
  EXPECT_EQ(f.alloc.segment_size_for(11 * MiB), 12 * MiB);
}

TEST(AllocSizes, PowerOfTwoDivisions) {
  Policy p = pytorch_sizes();
  p.roundup_power2_divisions = 4;
  Fixture f(p);
  EXPECT_EQ(f.alloc.round_size(1 * MiB + 1), 1 * MiB + 256 * KiB);  // steps of 1/4 of 1 MiB
  EXPECT_EQ(f.alloc.round_size(5 * MiB), 5 * MiB);
  EXPECT_EQ(f.alloc.round_size(5 * MiB + 1), 6 * MiB);
  EXPECT_EQ(f.alloc.round_size(1000), 1024u);  // small requests: plain rounding
}

TEST(AllocSizes, BinsAreMonotonicAndNarrow) {
  int last = -1;
  for (std::uint64_t u = 1; u < (1u << 20); u += 1 + u / 97) {
    const int b = detail::bin_of(u);
    EXPECT_GE(b, last);
    last = b;
  }
  EXPECT_LT(detail::bin_of(~0ull), detail::kNumBins);
  // Units below 64 have a bin each.
  for (std::uint64_t u = 1; u < 64; ++u) EXPECT_EQ(detail::bin_of(u), static_cast<int>(u));
}

TEST(AllocSizes, BinBitmapFindsNextNonEmpty) {
  detail::BinBitmap bits;
  EXPECT_EQ(bits.next_at_or_after(0), -1);
  bits.set(5);
  bits.set(700);
  bits.set(1900);
  EXPECT_EQ(bits.next_at_or_after(0), 5);
  EXPECT_EQ(bits.next_at_or_after(5), 5);
  EXPECT_EQ(bits.next_at_or_after(6), 700);
  EXPECT_EQ(bits.next_at_or_after(701), 1900);
  bits.clear(700);
  EXPECT_EQ(bits.next_at_or_after(6), 1900);
  EXPECT_EQ(bits.next_at_or_after(1901), -1);
}

TEST(AllocSizes, FlatPtrMapMatchesUnorderedMap) {
  detail::FlatPtrMap<int> map;
  std::unordered_map<std::uintptr_t, int*> ref;
  std::vector<int> values(1);
  std::mt19937_64 rng(1);
  std::vector<std::uintptr_t> keys;
  for (int i = 0; i < 20000; ++i) {
    if (keys.empty() || rng() % 3 != 0) {
      const std::uintptr_t k = ((rng() % 5000) + 1) * 512;
      if (ref.count(k)) continue;
      map.insert(k, values.data());
      ref[k] = values.data();
      keys.push_back(k);
    } else {
      const std::size_t j = rng() % keys.size();
      EXPECT_EQ(map.erase(keys[j]), ref[keys[j]]);
      ref.erase(keys[j]);
      keys[j] = keys.back();
      keys.pop_back();
    }
    if (i % 1000 == 0) {
      for (std::uintptr_t k = 512; k < 5001 * 512; k += 512 * 7) EXPECT_EQ(map.find(k), ref.count(k) ? ref[k] : nullptr);
      // Key 0 (a null pointer) is the empty-slot marker: never found, and erasing it changes nothing.
      EXPECT_EQ(map.find(0), nullptr);
      EXPECT_EQ(map.erase(0), nullptr);
      EXPECT_EQ(map.size(), ref.size());
    }
  }
  EXPECT_EQ(map.size(), ref.size());
}

// ------------------------------------------------------------------ best fit, split, merge

TEST(AllocCore, BestFitPicksTheSmallestBlockThatFits) {
  Fixture f;
  void* a = f.alloc.malloc(4 * KiB);
  void* b = f.alloc.malloc(8 * KiB);
  void* c = f.alloc.malloc(4 * KiB);
  void* d = f.alloc.malloc(16 * KiB);
  void* e = f.alloc.malloc(4 * KiB);
  ASSERT_EQ(f.stat("num_device_alloc"), 1);  // all carved from one small segment
  f.alloc.free(d);                           // holes: 8 KiB at b, 16 KiB at d, and the segment's tail
  f.alloc.free(b);
  EXPECT_EQ(addr(f.alloc.malloc(6 * KiB)), addr(b));   // 8 KiB hole: the best fit
  EXPECT_EQ(addr(f.alloc.malloc(12 * KiB)), addr(d));  // 16 KiB hole
  void* g = f.alloc.malloc(64 * KiB);                   // only the tail fits
  EXPECT_GT(addr(g), addr(e));
  EXPECT_EQ(f.stat("num_device_alloc"), 1);
  (void)a;
  (void)c;
}

TEST(AllocCore, SplitThenMergeBackIntoOneBlock) {
  Fixture f;
  void* x = f.alloc.malloc(10 * KiB);
  void* y = f.alloc.malloc(20 * KiB);
  void* z = f.alloc.malloc(30 * KiB);
  EXPECT_EQ(addr(y), addr(x) + 10 * KiB);
  EXPECT_EQ(addr(z), addr(y) + 20 * KiB);
  auto snap = f.alloc.snapshot();
  ASSERT_EQ(snap.size(), 1u);
  EXPECT_EQ(snap[0].blocks.size(), 4u);  // x, y, z, free tail
  EXPECT_EQ(f.stat("inactive_split.all.current"), 1);
  EXPECT_EQ(f.stat("inactive_split_bytes.all.current"), static_cast<std::int64_t>(2 * MiB - 60 * KiB));

  f.alloc.free(y);  // a hole between two allocated blocks
  snap = f.alloc.snapshot();
  const BlockInfo* hole = find_block(snap, addr(y));
  ASSERT_NE(hole, nullptr);
  EXPECT_EQ(hole->state, BlockState::kFree);
  EXPECT_EQ(hole->size, 20 * KiB);
  EXPECT_EQ(f.stat("inactive_split.all.current"), 2);

  f.alloc.free(x);  // merges with y's hole
  snap = f.alloc.snapshot();
  const BlockInfo* merged = find_block(snap, addr(x));
  ASSERT_NE(merged, nullptr);
  EXPECT_EQ(merged->size, 30 * KiB);
  EXPECT_EQ(find_block(snap, addr(y)), nullptr);

  f.alloc.free(z);  // everything merges into one block covering the segment
  snap = f.alloc.snapshot();
  ASSERT_EQ(snap[0].blocks.size(), 1u);
  EXPECT_EQ(snap[0].blocks[0].size, 2 * MiB);
  EXPECT_EQ(f.stat("inactive_split.all.current"), 0);
  EXPECT_EQ(f.stat("inactive_split_bytes.all.current"), 0);
  EXPECT_EQ(addr(f.alloc.malloc(1 * MiB)), snap[0].addr);  // the largest small request fits the merged block
}

TEST(AllocCore, SmallAndLargePoolsAreSeparate) {
  Fixture f;
  void* big = f.alloc.malloc(2 * MiB);  // large pool: a 20 MiB segment
  auto snap = f.alloc.snapshot();
  ASSERT_EQ(snap.size(), 1u);
  EXPECT_FALSE(snap[0].small_pool);
  EXPECT_EQ(snap[0].size, 20 * MiB);
  f.alloc.free(big);
  void* small = f.alloc.malloc(64 * KiB);  // does not come from the cached large segment
  EXPECT_EQ(f.stat("num_device_alloc"), 2);
  EXPECT_EQ(f.stat("segment.small_pool.current"), 1);
  EXPECT_EQ(f.stat("segment.large_pool.current"), 1);
  EXPECT_EQ(f.stat("reserved_bytes.small_pool.current"), static_cast<std::int64_t>(2 * MiB));
  EXPECT_EQ(f.stat("reserved_bytes.large_pool.current"), static_cast<std::int64_t>(20 * MiB));
  void* huge = f.alloc.malloc(11 * MiB);  // >= min_large_alloc: its own segment, rounded to 2 MiB
  EXPECT_EQ(f.stat("num_device_alloc"), 2);  // ... but the cached 20 MiB segment fits it
  void* huge2 = f.alloc.malloc(11 * MiB);
  EXPECT_EQ(f.stat("num_device_alloc"), 3);
  bool found = false;
  for (const auto& s : f.alloc.snapshot())
    if (s.addr == addr(huge2)) found = s.size == 12 * MiB;
  EXPECT_TRUE(found);
  f.alloc.free(small);
  f.alloc.free(huge);
  f.alloc.free(huge2);
}

TEST(AllocCore, LargePoolDoesNotLeaveTinyRemainders) {
  Fixture f;
  void* a = f.alloc.malloc(19 * MiB + 512 * KiB);  // 20 MiB segment, 512 KiB would remain: not split
  auto snap = f.alloc.snapshot();
  ASSERT_EQ(snap[0].blocks.size(), 1u);
  EXPECT_EQ(f.stat("allocated_bytes.all.current"), static_cast<std::int64_t>(20 * MiB));
  EXPECT_EQ(f.stat("requested_bytes.all.current"), static_cast<std::int64_t>(19 * MiB + 512 * KiB));
  f.alloc.free(a);
}

// ------------------------------------------------------------------ streams and events

TEST(AllocStreams, FreeBlocksAreReusedOnlyOnTheirStream) {
  Fixture f;
  void* p = f.alloc.malloc(4 * KiB, /*stream=*/1);
  f.alloc.free(p);
  void* q = f.alloc.malloc(4 * KiB, /*stream=*/2);
  EXPECT_NE(addr(q), addr(p));
  EXPECT_EQ(f.stat("num_device_alloc"), 2);  // stream 2 got its own segment
  void* r = f.alloc.malloc(4 * KiB, /*stream=*/1);
  EXPECT_EQ(addr(r), addr(p));
  EXPECT_EQ(f.stat("num_device_alloc"), 2);
  for (const auto& s : f.alloc.snapshot()) EXPECT_TRUE(s.stream == 1 || s.stream == 2);
  f.alloc.free(q);
  f.alloc.free(r);
}

TEST(AllocStreams, RecordStreamDefersReuseUntilTheEventCompletes) {
  Fixture f;
  void* p = f.alloc.malloc(4 * KiB, 0);
  f.alloc.record_stream(p, 7);
  f.sim->submit_work(7);  // work on stream 7 that uses p, still running
  f.alloc.free(p);
  EXPECT_EQ(f.stat("allocated_bytes.all.current"), 0);
  EXPECT_EQ(f.stat("active.all.current"), 1);  // waiting for stream 7
  const auto snap = f.alloc.snapshot();
  const BlockInfo* b = find_block(snap, addr(p));
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->state, BlockState::kPendingEvents);
  void* q = f.alloc.malloc(4 * KiB, 0);
  EXPECT_NE(addr(q), addr(p));  // not reused while stream 7 may still read it
  f.sim->complete_work(7);
  void* r = f.alloc.malloc(4 * KiB, 0);  // malloc processes completed events first
  EXPECT_EQ(addr(r), addr(p));
  EXPECT_EQ(f.sim->counters().live_events, 0);
  f.alloc.free(q);
  f.alloc.free(r);
}

TEST(AllocStreams, RecordingTheOwnStreamNeedsNoEvent) {
  Fixture f;
  void* p = f.alloc.malloc(4 * KiB, 3);
  f.alloc.record_stream(p, 3);
  f.sim->submit_work(3);
  f.alloc.free(p);
  EXPECT_EQ(f.sim->counters().live_events, 0);
  EXPECT_EQ(addr(f.alloc.malloc(4 * KiB, 3)), addr(p));
}

TEST(AllocStreams, EmptyCacheWaitsForPendingEvents) {
  Fixture f;
  void* p = f.alloc.malloc(4 * KiB, 0);
  f.alloc.record_stream(p, 9);
  f.sim->submit_work(9);
  f.alloc.free(p);
  f.alloc.empty_cache();  // synchronizes the event, then releases the segment
  EXPECT_EQ(f.stat("reserved_bytes.all.current"), 0);
  EXPECT_EQ(f.sim->counters().live_bytes, 0u);
  EXPECT_EQ(f.stat("num_sync_all_streams"), 1);
}

// ------------------------------------------------------------------ out-of-memory ladder

TEST(AllocOom, CachedBlocksAreReusedWithoutBackendCalls) {
  Fixture f;
  for (int i = 0; i < 100; ++i) {
    void* a = f.alloc.malloc(300 * KiB);
    void* b = f.alloc.malloc(3 * MiB);
    f.alloc.free(a);
    f.alloc.free(b);
  }
  EXPECT_EQ(f.stat("num_device_alloc"), 2);
  EXPECT_EQ(f.stat("num_device_free"), 0);
}

TEST(AllocOom, BackendFailureReleasesTheCacheAndRetries) {
  Fixture f;
  void* a = f.alloc.malloc(64 * KiB, /*stream=*/1);  // a cached small segment on another stream
  f.alloc.free(a);
  f.sim->fail_nth_alloc(1);
  void* b = f.alloc.malloc(64 * KiB, /*stream=*/0);
  EXPECT_NE(b, nullptr);
  EXPECT_EQ(f.stat("num_alloc_retries"), 1);
  EXPECT_EQ(f.stat("num_device_free"), 1);          // the cached segment went back first
  EXPECT_EQ(f.stat("num_device_alloc_failed"), 1);
  EXPECT_EQ(f.stat("num_ooms"), 0);
  f.alloc.free(b);
}

TEST(AllocOom, PaddedSegmentFallsBackToTheExactSize) {
  SimulatedConfig cfg;
  cfg.capacity = 16 * MiB;  // a 20 MiB segment cannot exist
  Fixture f(pytorch_sizes(), cfg);
  void* p = f.alloc.malloc(3 * MiB);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(f.alloc.snapshot()[0].size, 4 * MiB);  // rounded to large_round instead
  EXPECT_EQ(f.stat("num_ooms"), 0);
  f.alloc.free(p);
}

TEST(AllocOom, RaisesWithStatisticsWhenEverythingFails) {
  SimulatedConfig cfg;
  cfg.capacity = 64 * MiB;
  Fixture f(pytorch_sizes(), cfg);
  void* a = f.alloc.malloc(30 * MiB);
  void* b = f.alloc.malloc(30 * MiB);
  try {
    f.alloc.malloc(30 * MiB);
    FAIL() << "expected OutOfMemoryError";
  } catch (const OutOfMemoryError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("Tried to allocate 30.00 MiB"), std::string::npos) << msg;
    EXPECT_NE(msg.find("Allocated: 60.00 MiB"), std::string::npos) << msg;
    EXPECT_NE(msg.find("reserved: 60.00 MiB"), std::string::npos) << msg;
    EXPECT_NE(msg.find("budget: none"), std::string::npos) << msg;
    EXPECT_EQ(e.requested, 30 * MiB);
    EXPECT_EQ(e.allocated, 60 * MiB);
  }
  EXPECT_EQ(f.stat("num_ooms"), 1);
  EXPECT_EQ(f.stat("num_alloc_retries"), 1);
  f.alloc.free(a);  // after an OOM the allocator still works
  void* c = f.alloc.malloc(30 * MiB);
  EXPECT_EQ(addr(c), addr(a));
  f.alloc.free(b);
  f.alloc.free(c);
}

TEST(AllocOom, InjectedFailuresOnEveryRungRaise) {
  Fixture f;
  f.sim->fail_nth_alloc(1);
  f.sim->fail_nth_alloc(2);
  EXPECT_THROW(f.alloc.malloc(4 * KiB), OutOfMemoryError);
  EXPECT_EQ(f.sim->counters().alloc_calls, 2);  // asked, released (nothing), asked again
  EXPECT_NE(f.alloc.malloc(4 * KiB), nullptr);  // the third call succeeds
}

TEST(AllocOom, AbsurdRequestsRaiseWithoutBackendCalls) {
  Fixture f;
  EXPECT_THROW(f.alloc.malloc(SIZE_MAX - 5), OutOfMemoryError);
  EXPECT_EQ(f.sim->counters().alloc_calls, 0);
}

// ------------------------------------------------------------------ budget

TEST(AllocBudget, CapsReservedBytesAndFailsFast) {
  Policy p = pytorch_sizes();
  p.budget_bytes = 48 * MiB;
  Fixture f(p);
  void* a = f.alloc.malloc(20 * MiB);
  void* b = f.alloc.malloc(20 * MiB);
  const auto calls = f.sim->counters().alloc_calls;
  try {
    f.alloc.malloc(20 * MiB);
    FAIL() << "expected OutOfMemoryError";
  } catch (const OutOfMemoryError& e) {
    EXPECT_NE(std::string(e.what()).find("exceed the budget of 48.00 MiB"), std::string::npos) << e.what();
    EXPECT_EQ(e.budget, 48 * MiB);
  }
  EXPECT_EQ(f.sim->counters().alloc_calls, calls);  // the device was never asked
  EXPECT_LE(f.stat("reserved_bytes.all.peak"), static_cast<std::int64_t>(48 * MiB));
  EXPECT_EQ(f.stat("budget_bytes"), static_cast<std::int64_t>(48 * MiB));
  // Within the budget, smaller requests still work.
  void* c = f.alloc.malloc(6 * MiB);
  EXPECT_NE(c, nullptr);
  f.alloc.free(a);
  f.alloc.free(b);
  f.alloc.free(c);
}

TEST(AllocBudget, BudgetPushesOutCachedSegmentsBeforeFailing) {
  Policy p = pytorch_sizes();
  p.budget_bytes = 40 * MiB;
  Fixture f(p);
  void* a = f.alloc.malloc(30 * MiB);
  f.alloc.free(a);  // 30 MiB cached
  void* b = f.alloc.malloc(36 * MiB);  // does not fit next to the cache: the cache goes back
  EXPECT_NE(b, nullptr);
  EXPECT_EQ(f.stat("num_alloc_retries"), 1);
  EXPECT_EQ(f.stat("reserved_bytes.all.current"), static_cast<std::int64_t>(36 * MiB));
  f.alloc.free(b);
}

TEST(AllocBudget, FractionOfFreeMemory) {
  Policy p = pytorch_sizes();
  p.budget_fraction = 0.5;
  SimulatedConfig cfg;
  cfg.capacity = 100 * MiB;
  Fixture f(p, cfg);
  EXPECT_EQ(f.alloc.budget(), 50 * MiB);
  EXPECT_THROW(f.alloc.malloc(52 * MiB), OutOfMemoryError);
  EXPECT_EQ(f.alloc.set_budget(std::nullopt, 0.9), 90 * MiB);
  void* a = f.alloc.malloc(52 * MiB);
  EXPECT_EQ(f.alloc.set_budget(8 * MiB, 0.9), 8 * MiB);  // the smaller cap wins
  EXPECT_EQ(f.alloc.set_budget(std::nullopt, std::nullopt), 0u);
  f.alloc.free(a);
}

TEST(AllocBudget, FractionNeedsMemInfo) {
  Policy p;
  p.budget_fraction = 0.5;
  struct NoInfo : Backend {
    const char* name() const override { return "noinfo"; }
    void* allocate(std::size_t) override { return nullptr; }
    void deallocate(void*, std::size_t) override {}
  };
  EXPECT_THROW(CachingAllocator(std::make_shared<NoInfo>(), p), std::invalid_argument);
}

// ------------------------------------------------------------------ caching and release

TEST(AllocCache, MemoryStaysCachedUntilEmptyCache) {
  Fixture f;
  std::vector<void*> ptrs;
  for (int i = 0; i < 10; ++i) ptrs.push_back(f.alloc.malloc((i + 1) * 700 * KiB));
  for (void* p : ptrs) f.alloc.free(p);
  EXPECT_GT(f.stat("reserved_bytes.all.current"), 0);
  EXPECT_EQ(f.stat("num_device_free"), 0);
  void* live = f.alloc.malloc(100);
  f.alloc.empty_cache();  // the segment holding `live` stays
  EXPECT_EQ(f.stat("segment.all.current"), 1);
  EXPECT_EQ(f.stat("reserved_bytes.all.current"), static_cast<std::int64_t>(2 * MiB));
  f.alloc.free(live);
  f.alloc.empty_cache();
  EXPECT_EQ(f.stat("reserved_bytes.all.current"), 0);
  EXPECT_EQ(f.sim->counters().live_bytes, 0u);
  EXPECT_EQ(f.stat("num_device_free"), f.stat("num_device_alloc"));
}

TEST(AllocCache, OversizeBlocksAreNotSplitForSmallerRequests) {
  Policy p = pytorch_sizes();
  p.max_split_size = 32 * MiB;
  Fixture f(p);
  void* big = f.alloc.malloc(40 * MiB);
  EXPECT_EQ(f.stat("oversize_allocations.current"), 1);
  f.alloc.free(big);
  void* mid = f.alloc.malloc(4 * MiB);  // does not take the cached 40 MiB block
  EXPECT_EQ(f.stat("num_device_alloc"), 2);
  void* big2 = f.alloc.malloc(36 * MiB);  // an oversize request may take it (waste < a large segment)
  EXPECT_EQ(addr(big2), addr(big));
  EXPECT_EQ(f.stat("oversize_segments.current"), 1);
  f.alloc.free(mid);
  f.alloc.free(big2);
}

// ------------------------------------------------------------------ API edges

TEST(AllocApi, BadFreesThrow) {
  Fixture f;
  int local = 0;
  EXPECT_THROW(f.alloc.free(&local), std::invalid_argument);
  void* p = f.alloc.malloc(100);
  f.alloc.free(p);
  EXPECT_THROW(f.alloc.free(p), std::invalid_argument);
  EXPECT_THROW(f.alloc.record_stream(p, 1), std::invalid_argument);
  f.alloc.free(nullptr);
  EXPECT_EQ(f.alloc.malloc(0), nullptr);
}

TEST(AllocApi, HandleApi) {
  Fixture f;
  Allocation a = f.alloc.allocate(1000);
  ASSERT_NE(a.handle, nullptr);
  EXPECT_EQ(&CachingAllocator::owner(a.handle), &f.alloc);
  EXPECT_EQ(CachingAllocator::address(a.handle), a.ptr);
  EXPECT_EQ(CachingAllocator::requested_size(a.handle), 1000u);
  EXPECT_THROW(f.alloc.free(a.ptr), std::invalid_argument);  // handle allocations are not in the pointer map
  CachingAllocator::release(a.handle);
  EXPECT_EQ(f.stat("allocation.all.current"), 0);
  Allocation b = f.alloc.allocate(1000);
  EXPECT_EQ(b.ptr, a.ptr);
  CachingAllocator::release(b.handle);
  EXPECT_EQ(f.alloc.allocate(0).handle, nullptr);
}

TEST(AllocApi, PolicyValidation) {
  Policy p;
  EXPECT_NO_THROW(p.validate());
  p.min_block_size = 500;
  EXPECT_THROW(p.validate(), std::invalid_argument);
  p = Policy{};
  p.small_segment_size = 128 * KiB;  // below small_size
  EXPECT_THROW(p.validate(), std::invalid_argument);
  p = Policy{};
  p.budget_fraction = 1.5;
  EXPECT_THROW(p.validate(), std::invalid_argument);
  p = Policy{};
  EXPECT_THROW(p.set("no_such_field", 1), std::invalid_argument);
  EXPECT_THROW(p.set("small_size", 1.5), std::invalid_argument);
  EXPECT_THROW(p.set("small_size", -1), std::invalid_argument);
  p.set("large_segment_size", 40 * MiB);
  EXPECT_EQ(p.large_segment_size, 40 * MiB);
  p.set("max_split_size", 0);
  EXPECT_EQ(p.max_split_size, SIZE_MAX);
  EXPECT_THROW(CachingAllocator(std::make_shared<SimulatedBackend>(), [] {
                 Policy q;
                 q.min_large_alloc = 100;
                 return q;
               }()),
               std::invalid_argument);
}

TEST(AllocApi, TraceKeepsTheNewestEntries) {
  Policy p = pytorch_sizes();
  p.trace_capacity = 4;
  Fixture f(p);
  void* a = f.alloc.malloc(100);  // segment_alloc, alloc
  f.alloc.free(a);                // free_requested, free_completed
  void* b = f.alloc.malloc(100);  // alloc
  auto t = f.alloc.trace();
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0].action, TraceAction::kAlloc);
  EXPECT_EQ(t[1].action, TraceAction::kFreeRequested);
  EXPECT_EQ(t[2].action, TraceAction::kFreeCompleted);
  EXPECT_EQ(t[3].action, TraceAction::kAlloc);
  EXPECT_EQ(t[3].addr, addr(b));
  for (std::size_t i = 1; i < t.size(); ++i) EXPECT_LE(t[i - 1].time_ns, t[i].time_ns);
  f.alloc.set_trace_capacity(0);
  f.alloc.free(b);
  EXPECT_TRUE(f.alloc.trace().empty());
}

// ------------------------------------------------------------------ statistics against a shadow model

TEST(AllocStats, MatchAShadowModel) {
  // With large_split_min = 0 every block is exactly round_size(request), so
  // the model predicts allocated bytes without looking at the allocator.
  Policy p = pytorch_sizes();
  p.large_split_min = 0;
  Fixture f(p);
  std::mt19937_64 rng(42);
  struct Live {
    std::size_t requested, rounded;
    bool small;
  };
  std::map<void*, Live> live;
  std::int64_t peak_alloc = 0, peak_req = 0, n_allocs = 0, n_frees = 0, cum_req = 0;
  auto sum = [&](auto field, int pool) {
    std::int64_t s = 0;
    for (const auto& [p, l] : live)
      if (pool == 0 || (pool == 1) == l.small) s += static_cast<std::int64_t>(field(l));
    return s;
  };
  for (int i = 0; i < 4000; ++i) {
    if (live.empty() || rng() % 5 < 3) {
      const int shift = static_cast<int>(rng() % 25);  // 1 B .. 16 MiB, log-uniform
      const std::size_t n = 1 + rng() % (std::size_t{1} << shift);
      void* p = f.alloc.malloc(n, rng() % 2);
      const std::size_t r = f.alloc.round_size(n);
      live[p] = Live{n, r, r <= f.alloc.policy().small_size};
      ++n_allocs;
      cum_req += static_cast<std::int64_t>(n);
    } else {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      f.alloc.free(it->first);
      live.erase(it);
      ++n_frees;
    }
    const std::int64_t alloc_now = sum([](const Live& l) { return l.rounded; }, 0);
    const std::int64_t req_now = sum([](const Live& l) { return l.requested; }, 0);
    peak_alloc = std::max(peak_alloc, alloc_now);
    peak_req = std::max(peak_req, req_now);
    if (i % 97 != 0) continue;
    const Stats s = f.alloc.stats();
    ASSERT_EQ(s.allocation[kAll].current, static_cast<std::int64_t>(live.size()));
    ASSERT_EQ(s.allocated_bytes[kAll].current, alloc_now);
    ASSERT_EQ(s.allocated_bytes[kSmallPool].current, sum([](const Live& l) { return l.rounded; }, 1));
    ASSERT_EQ(s.allocated_bytes[kLargePool].current, sum([](const Live& l) { return l.rounded; }, 2));
    ASSERT_EQ(s.allocated_bytes[kAll].peak, peak_alloc);
    ASSERT_EQ(s.requested_bytes[kAll].current, req_now);
    ASSERT_EQ(s.requested_bytes[kAll].peak, peak_req);
    ASSERT_EQ(s.requested_bytes[kAll].allocated, cum_req);
    ASSERT_EQ(s.allocation[kAll].allocated, n_allocs);
    ASSERT_EQ(s.allocation[kAll].freed, n_frees);
    ASSERT_EQ(s.active_bytes[kAll].current, alloc_now);  // no record_stream: active == allocated
    // Reserved bytes and inactive splits against the snapshot and the backend.
    std::int64_t reserved = 0, split_blocks = 0, split_bytes = 0;
    for (const auto& seg : f.alloc.snapshot()) {
      reserved += static_cast<std::int64_t>(seg.size);
      std::size_t covered = 0;
      for (const auto& b : seg.blocks) {
        EXPECT_EQ(b.addr, seg.addr + covered);
        covered += b.size;
        if (b.state == BlockState::kFree && seg.blocks.size() > 1) {
          ++split_blocks;
          split_bytes += static_cast<std::int64_t>(b.size);
        }
      }
      EXPECT_EQ(covered, seg.size);
    }
    ASSERT_EQ(s.reserved_bytes[kAll].current, reserved);
    ASSERT_EQ(static_cast<std::size_t>(reserved), f.sim->counters().live_bytes);
    ASSERT_EQ(s.inactive_split[kAll].current, split_blocks);
    ASSERT_EQ(s.inactive_split_bytes[kAll].current, split_bytes);
    ASSERT_EQ(s.segment[kAll].current, f.sim->counters().live_segments);
    ASSERT_EQ(s.num_device_alloc, f.sim->counters().alloc_calls);
    ASSERT_EQ(s.num_device_free, f.sim->counters().free_calls);
  }
  for (const auto& [p, l] : live) f.alloc.free(p);
  f.alloc.empty_cache();
  EXPECT_EQ(f.sim->counters().live_bytes, 0u);
  const Stats s = f.alloc.stats();
  EXPECT_EQ(s.allocated_bytes[kAll].current, 0);
  EXPECT_EQ(s.reserved_bytes[kAll].current, 0);
  EXPECT_EQ(s.inactive_split[kAll].current, 0);
  f.alloc.reset_peak_stats();
  EXPECT_EQ(f.stat("allocated_bytes.all.peak"), 0);
  f.alloc.reset_accumulated_stats();
  EXPECT_EQ(f.stat("allocation.all.allocated"), 0);
  EXPECT_EQ(f.stat("num_device_alloc"), 0);
}

TEST(AllocStats, KeysFollowTorchCudaMemoryStats) {
  Fixture f;
  std::map<std::string, std::int64_t> items;
  for (const auto& [k, v] : f.alloc.stats().items()) items[k] = v;
  for (const char* key : {"allocated_bytes.all.current", "reserved_bytes.all.peak", "inactive_split_bytes.all.current",
                          "requested_bytes.large_pool.freed", "active.small_pool.allocated", "num_alloc_retries",
                          "num_ooms", "num_device_alloc", "num_device_free", "oversize_allocations.current"})
    EXPECT_EQ(items.count(key), 1u) << key;
}

// ------------------------------------------------------------------ replay

TEST(AllocReplay, CachingMakesNoBackendCallsInTheSteadyState) {
  // Three "steps" of the same allocation pattern.
  AllocTrace trace;
  std::mt19937_64 rng(3);
  std::vector<std::size_t> sizes;
  for (int i = 0; i < 50; ++i) sizes.push_back(1 + rng() % (4 * MiB));
  const std::uint64_t param = trace.record_alloc(8 * MiB);  // lives across steps
  for (int step = 0; step < 3; ++step) {
    std::vector<std::uint64_t> ids;
    for (std::size_t s : sizes) ids.push_back(trace.record_alloc(s));
    for (std::size_t i = 0; i < ids.size(); i += 2) trace.record_free(ids[i]);
    for (std::size_t i = 1; i < ids.size(); i += 2) trace.record_free(ids[i]);
    trace.mark_step();
  }
  trace.record_free(param);
  const auto events = trace.events();

  auto sim = std::make_shared<SimulatedBackend>();
  CachingAllocator caching(sim);
  const ReplayResult rc = replay(events, caching, 2);
  ASSERT_EQ(rc.steps.size(), 2u * 4u);  // 3 steps and the tail with the final free, per pass
  EXPECT_GT(rc.steps[0].device_allocs, 0);
  for (const ReplayStep& s : rc.steps) {
    if (s.pass == 0 && s.step == 0) continue;
    EXPECT_EQ(s.device_allocs, 0) << "pass " << s.pass << " step " << s.step;
    EXPECT_EQ(s.device_frees, 0);
  }
  std::size_t expect_peak = 8 * MiB;
  for (std::size_t s : sizes) expect_peak += s;
  EXPECT_EQ(rc.peak_requested, expect_peak);
  EXPECT_GE(rc.peak_reserved, expect_peak);

  NoCachingAllocator none(std::make_shared<SimulatedBackend>());
  const ReplayResult rn = replay(events, none, 1);
  EXPECT_EQ(rn.steps[1].device_allocs, 50);
  EXPECT_EQ(rn.steps[1].device_frees, 50);
  EXPECT_EQ(rn.peak_requested, expect_peak);

  // Serialization round trip.
  const std::string bytes = trace.serialize();
  const auto back = AllocTrace::deserialize(bytes);
  ASSERT_EQ(back.size(), events.size());
  for (std::size_t i = 0; i < back.size(); ++i) {
    EXPECT_EQ(back[i].op, events[i].op);
    EXPECT_EQ(back[i].id, events[i].id);
    EXPECT_EQ(back[i].size, events[i].size);
  }
  EXPECT_THROW(AllocTrace::deserialize("garbage"), std::invalid_argument);
  EXPECT_THROW(AllocTrace::deserialize(bytes.substr(0, bytes.size() - 1)), std::invalid_argument);
}

// ------------------------------------------------------------------ host backend

TEST(AllocHost, RealMemoryIsAlignedAndWritable) {
  HostConfig cfg;
  cfg.huge_pages = true;
  auto host = std::make_shared<HostBackend>(cfg);
  CachingAllocator alloc(host, [] {
    Policy p;
    p.min_block_size = 64;
    return p;
  }());
  std::vector<std::pair<void*, std::size_t>> ptrs;
  for (std::size_t n : {std::size_t{1}, std::size_t{100}, 64 * KiB, 3 * MiB + 7, 12 * MiB}) {
    void* p = alloc.malloc(n);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(addr(p) % 64, 0u);
    std::memset(p, 0xAB, n);  // ASan checks the whole block is addressable
    ptrs.emplace_back(p, n);
  }
  for (const auto& seg : alloc.snapshot())
    if (seg.size >= 2 * MiB) {
      EXPECT_EQ(seg.addr % (2 * MiB), 0u);  // huge-page aligned mapping
    }
  for (auto& [p, n] : ptrs) alloc.free(p);
  alloc.empty_cache();
  EXPECT_EQ(host->alloc_calls(), host->free_calls());
  ASSERT_TRUE(host->mem_info().has_value());
  EXPECT_GT(host->mem_info()->total_bytes, 0u);
}

TEST(AllocHost, SmallRegionsUsePosixMemalign) {
  HostConfig cfg;
  cfg.alignment = 256;
  HostBackend host(cfg);
  void* p = host.allocate(1000);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(addr(p) % 256, 0u);
  std::memset(p, 1, 1000);
  host.deallocate(p, 1000);
  EXPECT_THROW(HostBackend(HostConfig{3, true, 2 * MiB}), std::invalid_argument);
}

}  // namespace
