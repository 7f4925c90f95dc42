// An allocator on a fresh simulated backend, for the core's tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>

#include "alloc/core/allocator.h"
#include "alloc/core/sim_backend.h"

namespace torch_wsl::alloc::test_support {

struct SimFixture {
  explicit SimFixture(Policy policy, SimulatedConfig cfg = {})
      : sim(std::make_shared<SimulatedBackend>(cfg)), alloc(sim, policy) {}
  // A statistic by its torch.cuda.memory_stats() name ("reserved_bytes.all.current").
  std::int64_t stat(const std::string& key) const {
    for (const auto& [k, v] : alloc.stats().items())
      if (k == key) return v;
    ADD_FAILURE() << "no statistic " << key;
    return -1;
  }
  std::shared_ptr<SimulatedBackend> sim;
  CachingAllocator alloc;
};

}  // namespace torch_wsl::alloc::test_support
