// CUDA backends of the caching allocator: device memory (cudaMalloc/cudaFree)
// behind torch.cuda.memory.CUDAPluggableAllocator, and pinned host memory
// (cudaHostAlloc with a pageable fallback) behind PyTorch's CUDA host
// allocator. CUDA virtual memory (expandable segments) is not used: it fails
// on some WSL drivers (pytorch/pytorch#192330), and plain cached segments keep
// driver calls out of the steady state anyway.
// torch's header uses std::hardware_destructive_interference_size, which GCC warns about.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#include <ATen/core/CachingHostAllocator.h>
#pragma GCC diagnostic pop
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#include <sys/types.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "alloc/cuda_api.h"
#include "alloc/no_destructor.h"

namespace torch_wsl::alloc::cuda {

namespace {

constexpr int kMaxDevices = 64;

// cudaEvent_t's are created once and reused: on WSL2 creating one is a VM-bus round trip too.
class EventPool {
 public:
  EventId record(cudaStream_t stream, int device) {
    Pooled* e = acquire(device);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    C10_CUDA_CHECK(cudaEventRecord(e->event, stream));
    return reinterpret_cast<EventId>(e);
  }
  bool query(EventId id) {
    const cudaError_t err = cudaEventQuery(get(id)->event);
    if (err == cudaErrorNotReady) {
      (void)cudaGetLastError();
      return false;
    }
    C10_CUDA_CHECK(err);
    return true;
  }
  void synchronize(EventId id) { C10_CUDA_CHECK(cudaEventSynchronize(get(id)->event)); }
  void release(EventId id) {
    Pooled* e = get(id);
    std::lock_guard<std::mutex> g(mutex_);
    free_[e->device].push_back(e);
  }

 private:
  struct Pooled {
    cudaEvent_t event;
    int device;
  };
  static Pooled* get(EventId id) { return reinterpret_cast<Pooled*>(id); }
  Pooled* acquire(int device) {
    std::lock_guard<std::mutex> g(mutex_);
    auto& free = free_[device];
    if (!free.empty()) {
      Pooled* e = free.back();
      free.pop_back();
      return e;
    }
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    auto e = std::make_unique<Pooled>();
    e->device = device;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&e->event, cudaEventDisableTiming));
    all_.push_back(std::move(e));
    return all_.back().get();
  }
  std::mutex mutex_;
  std::vector<std::unique_ptr<Pooled>> all_;  // never destroyed (process lifetime)
  std::unordered_map<int, std::vector<Pooled*>> free_;
};

EventPool& events() {
  static NoDestructor<EventPool> pool;
  return pool.get();
}

class CudaDeviceBackend final : public Backend {
 public:
  explicit CudaDeviceBackend(int device) : device_(device), name_("cuda:" + std::to_string(device)) {}
  const char* name() const override { return name_.c_str(); }

  void* allocate(std::size_t nbytes) override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, nbytes);
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();  // clear the sticky-looking error: out of memory is an answer, not a fault
      return nullptr;
    }
    C10_CUDA_CHECK(err);
    return p;
  }
  void deallocate(void* ptr, std::size_t /*nbytes*/) override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    C10_CUDA_CHECK(cudaFree(ptr));
  }
  std::optional<MemInfo> mem_info() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    std::size_t free = 0, total = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return MemInfo{free, total};
  }
  EventId record_event(StreamId stream) override {
    return events().record(reinterpret_cast<cudaStream_t>(stream), device_);
  }
  bool query_event(EventId e) override { return events().query(e); }
  void synchronize_event(EventId e) override { events().synchronize(e); }
  void release_event(EventId e) override { events().release(e); }

 private:
  int device_;
  std::string name_;
};

struct DeviceRegistry {
  std::mutex mutex;
  Policy policy;
  std::array<std::atomic<CachingAllocator*>, kMaxDevices> fast{};
  std::array<std::shared_ptr<CachingAllocator>, kMaxDevices> owned;
};

DeviceRegistry& registry() {
  static NoDestructor<DeviceRegistry> r;
  return r.get();
}

CachingAllocator& device_ref(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "torch_wsl allocator: device index ", device, " out of range");
  CachingAllocator* a = registry().fast[device].load(std::memory_order_acquire);
  return a != nullptr ? *a : *device_allocator(device, true);
}

}  // namespace

void set_device_policy(const Policy& policy) {
  policy.validate();
  std::lock_guard<std::mutex> g(registry().mutex);
  registry().policy = policy;
}

std::shared_ptr<CachingAllocator> device_allocator(int device, bool create) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "torch_wsl allocator: device index ", device, " out of range");
  DeviceRegistry& r = registry();
  std::lock_guard<std::mutex> g(r.mutex);
  if (!r.owned[device] && create) {
    r.owned[device] = std::make_shared<CachingAllocator>(std::make_shared<CudaDeviceBackend>(device), r.policy);
    r.fast[device].store(r.owned[device].get(), std::memory_order_release);
  }
  return r.owned[device];
}

void install_device_hooks() {
  auto* pluggable =
      dynamic_cast<torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator*>(c10::cuda::CUDACachingAllocator::get());
  TORCH_CHECK(pluggable != nullptr,
              "torch_wsl: the current CUDA allocator is not the pluggable allocator torch_wsl installed");
  pluggable->set_record_stream_fn([](void* ptr, cudaStream_t stream) {
    for (auto& slot : registry().fast)
      if (CachingAllocator* a = slot.load(std::memory_order_acquire))
        if (a->try_record_stream(ptr, reinterpret_cast<StreamId>(stream))) return;
  });
  pluggable->set_reset_fn([] {  // torch.cuda.empty_cache()
    for (auto& slot : registry().fast)
      if (CachingAllocator* a = slot.load(std::memory_order_acquire)) a->empty_cache();
  });
  pluggable->set_memory_fraction_fn([](double fraction, int device) {
    device_allocator(device, true)->set_budget(std::nullopt, fraction);
  });
}

DriverCost measure_driver_cost(int device, std::size_t nbytes, int reps) {
  TORCH_CHECK(reps > 0 && nbytes > 0, "measure_driver_cost: reps and nbytes must be > 0");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  C10_CUDA_CHECK(cudaFree(nullptr));  // context creation is not part of the measurement
  std::vector<double> m, f;
  using clock = std::chrono::steady_clock;
  for (int i = 0; i <= reps; ++i) {
    void* p = nullptr;
    const auto t0 = clock::now();
    C10_CUDA_CHECK(cudaMalloc(&p, nbytes));
    const auto t1 = clock::now();
    C10_CUDA_CHECK(cudaFree(p));
    const auto t2 = clock::now();
    if (i == 0) continue;  // warm-up
    m.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    f.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  }
  auto median = [](std::vector<double>& v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  return DriverCost{median(m), median(f)};
}

// ------------------------------------------------------------ pinned host memory

PinnedHostBackend::PinnedHostBackend(std::size_t pinned_budget_bytes)
    : budget_(pinned_budget_bytes), pageable_(HostConfig{64, false, 2 << 20}) {}

void* PinnedHostBackend::allocate(std::size_t nbytes) {
  std::string reason;
  bool try_pinned;
  {
    std::lock_guard<std::mutex> g(mutex_);
    try_pinned = counters_.pinned_bytes + nbytes <= budget_;
    if (try_pinned) counters_.pinned_bytes += nbytes;  // reserved while the driver is asked
    else ++counters_.budget_refusals;
  }
  if (try_pinned) {
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, nbytes, cudaHostAllocDefault);
    std::lock_guard<std::mutex> g(mutex_);
    if (err == cudaSuccess) {
      pinned_[reinterpret_cast<std::uintptr_t>(p)] = true;
      ++counters_.pinned_segments;
      return p;
    }
    (void)cudaGetLastError();
    counters_.pinned_bytes -= nbytes;
    ++counters_.driver_refusals;
    reason = std::string("the driver refused cudaHostAlloc (") + cudaGetErrorString(err) + ")";
  } else {
    reason = "the pinned budget of " + format_bytes(budget_) + " is used up";
  }
  void* q = pageable_.allocate(nbytes);
  if (q == nullptr) return nullptr;
  std::lock_guard<std::mutex> g(mutex_);
  pinned_[reinterpret_cast<std::uintptr_t>(q)] = false;
  ++counters_.pageable_segments;
  counters_.pageable_bytes += nbytes;
  if (!warned_) {
    warned_ = true;
    warning_ = "torch_wsl: pinned host memory falls back to pageable memory (" + reason +
               "); copies from these buffers are correct but synchronous. WSL2 limits pinned memory "
               "(microsoft/WSL#14078, #8447); the budget comes from torch_wsl.env.recommended_settings()"
               ".pinned_budget_bytes and can be set with TORCH_WSL_ALLOC_CONF=pinned.budget:<bytes>. "
               "This warning is shown once.";
  }
  return q;
}

void PinnedHostBackend::deallocate(void* ptr, std::size_t nbytes) {
  bool pinned;
  {
    std::lock_guard<std::mutex> g(mutex_);
    auto it = pinned_.find(reinterpret_cast<std::uintptr_t>(ptr));
    TORCH_CHECK(it != pinned_.end(), "torch_wsl pinned backend: deallocate of an unknown region");
    pinned = it->second;
    pinned_.erase(it);
    if (pinned) {
      --counters_.pinned_segments;
      counters_.pinned_bytes -= nbytes;
    } else {
      --counters_.pageable_segments;
      counters_.pageable_bytes -= nbytes;
    }
  }
  if (pinned) C10_CUDA_CHECK(cudaFreeHost(ptr));
  else pageable_.deallocate(ptr, nbytes);
}

EventId PinnedHostBackend::record_event(StreamId stream) {
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  int device = 0;
  C10_CUDA_CHECK(cudaStreamGetDevice(s, &device));
  return events().record(s, device);
}
bool PinnedHostBackend::query_event(EventId e) { return events().query(e); }
void PinnedHostBackend::synchronize_event(EventId e) { events().synchronize(e); }
void PinnedHostBackend::release_event(EventId e) { events().release(e); }

std::string PinnedHostBackend::take_warning() {
  std::lock_guard<std::mutex> g(mutex_);
  return std::exchange(warning_, std::string());
}

PinnedHostBackend::Counters PinnedHostBackend::counters() const {
  std::lock_guard<std::mutex> g(mutex_);
  return counters_;
}

namespace {

struct PinnedState {
  std::mutex mutex;
  std::shared_ptr<CachingAllocator> pool;
  std::shared_ptr<PinnedHostBackend> backend;
};

PinnedState& pinned_state() {
  static NoDestructor<PinnedState> s;
  return s.get();
}

// PyTorch's CUDA host allocator interface over the pinned pool. The DataPtr
// context is the allocation's base pointer, which record_event uses to find
// the block (a view's data pointer may point inside it).
class PinnedHostAllocator final : public at::HostAllocator {
 public:
  at::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes == 0) return {nullptr, nullptr, &release, cpu};
    PinnedState& s = pinned_state();
    void* p;
    try {
      p = s.pool->malloc(nbytes, kHostStream);
    } catch (const OutOfMemoryError& e) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, e.what());
    }
    const std::string warning = s.backend->take_warning();
    if (!warning.empty()) TORCH_WARN(warning);
    return {p, p, &release, cpu};
  }
  bool record_event(void* /*ptr*/, void* ctx, c10::Stream stream) override {
    if (stream.device_type() != c10::DeviceType::CUDA || ctx == nullptr) return false;
    const c10::cuda::CUDAStream cs(c10::cuda::CUDAStream::UNCHECKED, stream);
    return pinned_state().pool->try_record_stream(ctx, reinterpret_cast<StreamId>(cs.stream()));
  }
  void empty_cache() override { pinned_state().pool->empty_cache(); }
  at::HostStats get_stats() override {
    const Stats st = pinned_state().pool->stats();
    at::HostStats h;
    auto copy = [](const Stat& from, c10::CachingAllocator::Stat& to) {
      to.current = from.current;
      to.peak = from.peak;
      to.allocated = from.allocated;
      to.freed = from.freed;
    };
    copy(st.allocation[kAll], h.active_requests);
    copy(st.allocated_bytes[kAll], h.active_bytes);
    copy(st.segment[kAll], h.allocations);
    copy(st.reserved_bytes[kAll], h.allocated_bytes);
    h.num_host_alloc = st.num_device_alloc;
    h.num_host_free = st.num_device_free;
    return h;
  }
  void reset_accumulated_stats() override { pinned_state().pool->reset_accumulated_stats(); }
  void reset_peak_stats() override { pinned_state().pool->reset_peak_stats(); }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* ptr) {
    if (ptr != nullptr) pinned_state().pool->free(ptr);
  }
};

}  // namespace

std::shared_ptr<CachingAllocator> pinned_pool(const Policy& policy, std::size_t pinned_budget_bytes) {
  PinnedState& s = pinned_state();
  std::lock_guard<std::mutex> g(s.mutex);
  if (!s.pool) {
    s.backend = std::make_shared<PinnedHostBackend>(pinned_budget_bytes);
    s.pool = std::make_shared<CachingAllocator>(s.backend, policy);
  }
  return s.pool;
}

std::shared_ptr<CachingAllocator> pinned_pool_if_created() {
  PinnedState& s = pinned_state();
  std::lock_guard<std::mutex> g(s.mutex);
  return s.pool;
}

void install_pinned_host_allocator() {
  TORCH_CHECK(pinned_pool_if_created() != nullptr, "torch_wsl: create the pinned pool before installing it");
  static NoDestructor<PinnedHostAllocator> instance;
  at::setHostAllocator(at::kCUDA, &instance.get(), /*priority=*/1);
  TORCH_CHECK(at::getHostAllocator(at::kCUDA) == &instance.get(),
              "torch_wsl could not install its pinned host allocator: another one holds the slot with a higher "
              "priority (at::setHostAllocator)");
}

}  // namespace torch_wsl::alloc::cuda

// ------------------------------------------------------------ entry points for CUDAPluggableAllocator
// Signatures required by torch.cuda.memory.CUDAPluggableAllocator. An
// out-of-memory error is raised as c10::OutOfMemoryError, which reaches
// Python as torch.OutOfMemoryError carrying the allocator's statistics.
extern "C" __attribute__((visibility("default"))) void* torch_wsl_malloc(ssize_t size, int device,
                                                                         cudaStream_t stream) {
  using namespace torch_wsl::alloc;
  CachingAllocator& a = cuda::device_ref(device);
  try {
    return a.malloc(static_cast<std::size_t>(size), reinterpret_cast<StreamId>(stream));
  } catch (const OutOfMemoryError& e) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, e.what());
  }
}

extern "C" __attribute__((visibility("default"))) void torch_wsl_free(void* ptr, ssize_t /*size*/, int device,
                                                                      cudaStream_t /*stream*/) {
  torch_wsl::alloc::cuda::device_ref(device).free(ptr);
}
