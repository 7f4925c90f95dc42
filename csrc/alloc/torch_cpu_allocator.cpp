#include "alloc/torch_cpu_allocator.h"

#include <pthread.h>

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include "alloc/no_destructor.h"

namespace torch_wsl::alloc {

namespace {

// The slot priority torch_wsl installs its CPU allocators with: the same as
// PyTorch's default CPU allocator (REGISTER_ALLOCATOR, priority 0), so that
// putting the previous allocator back works too.
constexpr std::uint8_t kPriority = 0;

struct CpuState;
CpuState& state();
bool route_free(void* ptr);
void route_traced_free(void* ptr);

// c10::Allocator over a CachingAllocator. DataPtrs are "simple" (context ==
// data, with a raw deleter) because PyTorch's raw_allocate/raw_deallocate
// need that (oneDNN's scratchpad uses them). The deleter routes a pointer to
// the allocator that made it -- the current one first, then earlier ones --
// so a tensor outlives its allocator's turn in the slot.
class CpuCachingAdapter final : public c10::Allocator {
 public:
  explicit CpuCachingAdapter(std::shared_ptr<CachingAllocator> core) : core_(std::move(core)) {}

  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes == 0) return c10::DataPtr(nullptr, nullptr, &release, cpu);
    void* p = nullptr;
    try {
      p = core_->malloc(nbytes, 0);
    } catch (const OutOfMemoryError& e) {
      if (c10::memoryProfilingEnabled())
        c10::reportOutOfMemoryToProfiler(static_cast<int64_t>(nbytes), e.allocated, e.reserved, cpu);
      TORCH_CHECK_WITH(OutOfMemoryError, false, e.what());
    }
    if (c10::memoryProfilingEnabled()) report(p, static_cast<int64_t>(nbytes), *core_);
    return c10::DataPtr(p, p, &release, cpu);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
  const std::shared_ptr<CachingAllocator>& core() const { return core_; }

  static void report(void* ptr, int64_t delta, const CachingAllocator& core) {
    const Stats s = core.stats();
    c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<size_t>(s.allocated_bytes[kAll].current),
                                     static_cast<size_t>(s.reserved_bytes[kAll].current),
                                     c10::Device(c10::DeviceType::CPU));
  }

 private:
  static void release(void* ptr) {
    if (ptr != nullptr && !route_free(ptr))
      TORCH_WARN("torch_wsl CPU allocator: freeing a pointer no torch_wsl allocator owns (ignored)");
  }

  std::shared_ptr<CachingAllocator> core_;
};

// Wraps whatever allocator serves CPU tensors and records each allocation
// and free into an AllocTrace. Simple DataPtrs too: the inner DataPtr is
// kept in a map until the pointer is freed.
class TracingAdapter final : public c10::Allocator {
 public:
  explicit TracingAdapter(std::shared_ptr<AllocTrace> trace) : trace_(std::move(trace)) {}

  c10::DataPtr allocate(size_t nbytes) override {
    c10::DataPtr inner = inner_.load()->allocate(nbytes);
    if (nbytes == 0 || inner.get() == nullptr) return inner;
    void* data = inner.get();
    const std::uint64_t id = trace_->record_alloc(nbytes);
    {
      std::lock_guard<std::mutex> g(mutex_);
      live_.emplace(data, Live{std::move(inner), id});
    }
    return c10::DataPtr(data, data, &release, c10::Device(c10::DeviceType::CPU));
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
  void set_inner(c10::Allocator* inner) { inner_.store(inner); }
  const std::shared_ptr<AllocTrace>& trace() const { return trace_; }

  // Frees `ptr` if it came from this tracer.
  bool try_free(void* ptr) {
    c10::DataPtr inner;
    std::uint64_t id;
    {
      std::lock_guard<std::mutex> g(mutex_);
      auto it = live_.find(ptr);
      if (it == live_.end()) return false;
      inner = std::move(it->second.inner);
      id = it->second.id;
      live_.erase(it);
    }
    trace_->record_free(id);
    return true;  // `inner` frees the memory through its own deleter here
  }

 private:
  struct Live {
    c10::DataPtr inner;
    std::uint64_t id;
  };
  static void release(void* ptr) {
    if (ptr != nullptr) route_traced_free(ptr);
  }
  std::atomic<c10::Allocator*> inner_{nullptr};
  std::shared_ptr<AllocTrace> trace_;
  std::mutex mutex_;
  std::unordered_map<void*, Live> live_;
};

// What torch_wsl has installed in the CPU slot, and everything it ever
// created (kept alive: tensors may outlive their allocator's turn).
struct CpuState {
  std::mutex mutex;
  c10::Allocator* base = nullptr;  // the allocator found in the slot before torch_wsl installed anything
  CpuCachingAdapter* caching = nullptr;
  TracingAdapter* tracing = nullptr;
  std::atomic<CachingAllocator*> current_core{nullptr};  // the deleter's fast path
  std::atomic<TracingAdapter*> current_tracer{nullptr};
  std::vector<std::unique_ptr<CpuCachingAdapter>> adapters;
  std::vector<std::unique_ptr<TracingAdapter>> tracers;
  std::vector<std::shared_ptr<CachingAllocator>> cores;  // for fork handlers
  bool atfork_registered = false;
};

CpuState& state() {
  static NoDestructor<CpuState> s;
  return s.get();
}

bool route_free(void* ptr) {
  CpuState& s = state();
  const bool profiling = c10::memoryProfilingEnabled();
  std::size_t n = 0;
  CachingAllocator* owner = s.current_core.load(std::memory_order_acquire);
  if (owner == nullptr || !owner->try_free(ptr, &n)) {
    owner = nullptr;
    std::lock_guard<std::mutex> g(s.mutex);
    for (auto it = s.cores.rbegin(); it != s.cores.rend() && owner == nullptr; ++it)
      if ((*it)->try_free(ptr, &n)) owner = it->get();
  }
  if (owner != nullptr && profiling) CpuCachingAdapter::report(ptr, -static_cast<int64_t>(n), *owner);
  return owner != nullptr;
}

void route_traced_free(void* ptr) {
  CpuState& s = state();
  TracingAdapter* t = s.current_tracer.load(std::memory_order_acquire);
  if (t != nullptr && t->try_free(ptr)) return;
  std::lock_guard<std::mutex> g(s.mutex);
  for (auto it = s.tracers.rbegin(); it != s.tracers.rend(); ++it)
    if ((*it)->try_free(ptr)) return;
  TORCH_WARN("torch_wsl trace recorder: freeing a pointer it does not know (ignored)");
}

// A forked child (DataLoader workers) must not inherit an allocator mutex
// held by another thread of the parent.
void fork_prepare() {
  CpuState& s = state();
  s.mutex.lock();
  for (const auto& c : s.cores) c->lock_for_fork();
}
void fork_release() {
  CpuState& s = state();
  for (auto it = s.cores.rbegin(); it != s.cores.rend(); ++it) (*it)->unlock_after_fork();
  s.mutex.unlock();
}

// Puts the right allocator in the slot: tracer -> caching -> base.
void reinstall_locked(CpuState& s) {
  c10::Allocator* below = s.caching != nullptr ? static_cast<c10::Allocator*>(s.caching) : s.base;
  if (s.tracing != nullptr) s.tracing->set_inner(below);
  c10::Allocator* top = s.tracing != nullptr ? static_cast<c10::Allocator*>(s.tracing) : below;
  s.current_core.store(s.caching != nullptr ? s.caching->core().get() : nullptr, std::memory_order_release);
  s.current_tracer.store(s.tracing, std::memory_order_release);
  c10::SetCPUAllocator(top, kPriority);
  TORCH_CHECK(c10::GetCPUAllocator() == top,
              "torch_wsl could not install its CPU allocator: another allocator holds the CPU slot with a "
              "higher priority (c10::SetCPUAllocator)");
}

bool ours_installed(const CpuState& s) { return s.caching != nullptr || s.tracing != nullptr; }

}  // namespace

std::shared_ptr<CachingAllocator> cpu_enable(const Policy& policy, const HostConfig& host) {
  auto core = std::make_shared<CachingAllocator>(std::make_shared<HostBackend>(host), policy);
  CpuState& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  if (!ours_installed(s)) s.base = c10::GetCPUAllocator();
  if (!s.atfork_registered) {
    pthread_atfork(&fork_prepare, &fork_release, &fork_release);
    s.atfork_registered = true;
  }
  CpuCachingAdapter* previous = s.caching;
  s.adapters.push_back(std::make_unique<CpuCachingAdapter>(core));
  s.cores.push_back(core);
  s.caching = s.adapters.back().get();
  reinstall_locked(s);
  if (previous != nullptr) previous->core()->empty_cache();
  return core;
}

bool cpu_disable() {
  CpuState& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  if (s.caching == nullptr) return false;
  CpuCachingAdapter* previous = s.caching;
  s.caching = nullptr;
  reinstall_locked(s);
  previous->core()->empty_cache();
  return true;
}

std::shared_ptr<CachingAllocator> cpu_current() {
  CpuState& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  return s.caching != nullptr ? s.caching->core() : nullptr;
}

std::shared_ptr<AllocTrace> cpu_trace_start() {
  CpuState& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  TORCH_CHECK(s.tracing == nullptr, "a CPU allocation trace is already being recorded");
  if (!ours_installed(s)) s.base = c10::GetCPUAllocator();
  auto trace = std::make_shared<AllocTrace>();
  s.tracers.push_back(std::make_unique<TracingAdapter>(trace));
  s.tracing = s.tracers.back().get();
  reinstall_locked(s);
  return trace;
}

void cpu_trace_stop(const std::shared_ptr<AllocTrace>& trace) {
  CpuState& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  TORCH_CHECK(s.tracing != nullptr && s.tracing->trace() == trace, "this trace is not being recorded");
  trace->stop();
  s.tracing = nullptr;
  reinstall_locked(s);
}

}  // namespace torch_wsl::alloc
