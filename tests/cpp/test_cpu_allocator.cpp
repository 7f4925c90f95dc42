// torch_wsl's caching allocator in PyTorch's CPU allocator slot: tensors,
// raw_allocate/raw_deallocate (oneDNN's scratchpad path), frees that cross
// enable/disable, and the trace recorder.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include "alloc/torch_cpu_allocator.h"

namespace {

using namespace torch_wsl::alloc;

struct Enabled {
  explicit Enabled(const Policy& p = {}) : core(cpu_enable(p, HostConfig{})) {}
  ~Enabled() { cpu_disable(); }
  std::shared_ptr<CachingAllocator> core;
};

TEST(CpuAllocator, TensorsComeFromTheCache) {
  at::Tensor before = at::ones({1000});
  Enabled on;
  EXPECT_EQ(cpu_current(), on.core);
  const auto s0 = on.core->stats();
  at::Tensor x = at::empty({256, 1024});
  const auto s1 = on.core->stats();
  EXPECT_EQ(s1.allocation[kAll].current, s0.allocation[kAll].current + 1);
  EXPECT_EQ(s1.requested_bytes[kAll].current - s0.requested_bytes[kAll].current, 256 * 1024 * 4);
  before.reset();  // allocated by the default allocator: freed by it
  at::Tensor y = (x.fill_(2) * 3).sum();
  EXPECT_EQ(y.item<float>(), 6.0f * 256 * 1024);
  x.reset();
  y.reset();
  EXPECT_EQ(on.core->stats().allocation[kAll].current, s0.allocation[kAll].current);
}

TEST(CpuAllocator, RawAllocateUsesSimpleDataPtrs) {
  Enabled on;
  c10::Allocator* a = c10::GetCPUAllocator();
  void* p = a->raw_allocate(12345);  // asserts context == data inside PyTorch
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(on.core->stats().requested_bytes[kAll].current, 12345);
  a->raw_deallocate(p);
  EXPECT_EQ(on.core->stats().requested_bytes[kAll].current, 0);
}

TEST(CpuAllocator, TensorsOutliveTheirAllocatorsTurn) {
  at::Tensor survivor;
  std::shared_ptr<CachingAllocator> first;
  {
    Enabled on;
    first = on.core;
    survivor = at::full({4096}, 7.0);
  }  // disabled: the default allocator is back
  EXPECT_NE(c10::GetCPUAllocator(), nullptr);
  EXPECT_EQ(first->stats().allocation[kAll].current, 1);
  {
    Enabled second;  // a new allocator; the survivor still belongs to the first
    EXPECT_NE(second.core, first);
    EXPECT_EQ(survivor.sum().item<double>(), 7.0 * 4096);
    survivor.reset();
    EXPECT_EQ(first->stats().allocation[kAll].current, 0);
    EXPECT_EQ(second.core->stats().allocation[kAll].allocated, 1);  // the sum's result
  }
}

TEST(CpuAllocator, BudgetRaisesOutOfMemoryError) {
  Policy p;
  p.budget_bytes = 32 << 20;
  Enabled on(p);
  EXPECT_THROW(at::empty({64 << 20}, at::kByte), c10::OutOfMemoryError);
  EXPECT_EQ(on.core->stats().num_ooms, 1);
}

TEST(CpuAllocator, TraceRecordsAllocationsAndFrees) {
  auto trace = cpu_trace_start();
  {
    at::Tensor a = at::empty({100});
    at::Tensor b = at::empty({200});
  }
  void* raw = c10::GetCPUAllocator()->raw_allocate(64);
  c10::GetCPUAllocator()->raw_deallocate(raw);
  trace->mark_step();
  cpu_trace_stop(trace);
  const auto events = trace->events();
  ASSERT_EQ(events.size(), 7u);
  EXPECT_EQ(events[0].op, TraceOp::kAlloc);
  EXPECT_EQ(events[0].size, 400u);
  EXPECT_EQ(events[1].size, 800u);
  EXPECT_EQ(events[2].op, TraceOp::kFree);
  EXPECT_EQ(events[4].size, 64u);
  EXPECT_EQ(events[6].op, TraceOp::kStep);
  EXPECT_THROW(cpu_trace_stop(trace), c10::Error);
}

}  // namespace
