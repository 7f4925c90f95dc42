// Host-side cost of the allocator core's malloc+free, in a warm steady state
// (no backend calls): the median over batches of 1000 pairs of each batch's
// mean, so the clock's own cost is amortized.
//
//   build/torch_wsl_alloc_microbench            (cmake target of the same name)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "alloc/core/allocator.h"
#include "alloc/core/sim_backend.h"

using namespace torch_wsl::alloc;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class Body>
double ns_per_pair(Body&& body, int batches = 400, int pairs = 1000) {
  std::vector<double> per;
  for (int b = 0; b < batches; ++b) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < pairs; ++i) body(i);
    const auto t1 = std::chrono::steady_clock::now();
    per.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / pairs);
  }
  return median(per);
}

}  // namespace

int main() {
  auto sim = std::make_shared<SimulatedBackend>();
  CachingAllocator alloc(sim);

  // 1. One size, allocated and freed right away (the best case).
  alloc.free(alloc.malloc(4096));
  const double same = ns_per_pair([&](int) { alloc.free(alloc.malloc(4096)); });

  // 2. A working set of 256 live blocks of random sizes (1 B .. 4 MiB, log-uniform):
  //    each step frees a random one and allocates a new random size (split/merge every time).
  std::mt19937_64 rng(1);
  std::vector<std::size_t> sizes(1 << 16);
  for (auto& s : sizes) s = 1 + rng() % (std::size_t{1} << (rng() % 23));
  std::vector<void*> live(256);
  for (std::size_t i = 0; i < live.size(); ++i) live[i] = alloc.malloc(sizes[i]);
  std::vector<std::uint32_t> slot(1 << 16);
  for (auto& s : slot) s = static_cast<std::uint32_t>(rng() % live.size());
  std::size_t k = 0;
  auto churn = [&](int) {
    const std::uint32_t j = slot[k & 0xffff];
    alloc.free(live[j]);
    live[j] = alloc.malloc(sizes[k & 0xffff]);
    ++k;
  };
  for (int i = 0; i < 1000000; ++i) churn(i);  // warm: the cache reaches its steady size (~400k steps)
  const auto calls = alloc.stats().num_device_alloc;
  const double mixed = ns_per_pair(churn);
  const bool steady = alloc.stats().num_device_alloc == calls;

  // 3. The handle API (what the CPU tensor allocator uses: no pointer map).
  const double handle = ns_per_pair([&](int) { CachingAllocator::release(alloc.allocate(4096).handle); });

  std::printf("{\"same_size_ns\": %.1f, \"random_working_set_ns\": %.1f, \"handle_api_ns\": %.1f, "
              "\"steady_state_no_backend_calls\": %s}\n",
              same, mixed, handle, steady ? "true" : "false");
  for (void* p : live) alloc.free(p);
  return 0;
}
