// CUDA backends of the caching allocator: device memory (cudaMalloc/cudaFree)
// as PyTorch's CUDA allocator, and pinned host memory (cudaHostAlloc, with a
// pageable fallback pool) as PyTorch's CUDA host allocator. CUDA virtual
// memory (expandable segments) is not used: it fails on some WSL drivers
// (pytorch/pytorch#192330), and plain cached segments keep driver calls out
// of the steady state anyway.
//
// The device allocator subclasses torch's CUDAPluggableAllocator rather
// than CUDAAllocator: the base class has an implementation of every virtual
// of the torch version at hand (torch 2.8 to 2.14 differ), and we override
// what torch_wsl serves itself. Tensor deleters never throw (std::terminate
// would kill the process): errors there are counted and printed once.
// torch's header uses std::hardware_destructive_interference_size, which GCC warns about.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#include <ATen/core/CachingHostAllocator.h>
#pragma GCC diagnostic pop
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
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
#include <cstdio>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "alloc/cuda_api.h"
#include "alloc/no_destructor.h"

extern "C" void* torch_wsl_malloc(ssize_t size, int device, cudaStream_t stream);
extern "C" void torch_wsl_free(void* ptr, ssize_t size, int device, cudaStream_t stream);

namespace torch_wsl::alloc::cuda {

namespace {

constexpr int kMaxDevices = 64;

// At interpreter exit the CUDA runtime may unload before the last tensors
// are freed; nothing is left to do for them then.
bool unloading(cudaError_t err) { return err == cudaErrorCudartUnloading; }

// Errors in tensor deleters: counted, the first printed (a deleter cannot
// throw, and a warning handler may not be safe to call from there).
std::atomic<std::int64_t> g_deleter_errors{0};

void report_deleter_error(const char* what) noexcept {
  if (g_deleter_errors.fetch_add(1) == 0)
    std::fprintf(stderr,
                 "torch_wsl allocator: freeing memory failed (%s). The memory stays reserved and accounted "
                 "(torch_wsl.memory.stats()); later errors of this kind are counted, not printed.\n",
                 what);
}

template <class F>
void no_throw(F&& f) noexcept {
  try {
    f();
  } catch (const std::exception& e) {
    report_deleter_error(e.what());
  } catch (...) {
    report_deleter_error("unknown error");
  }
}

// cudaEvent_t's are created once and reused: on WSL2 creating one is a VM-bus round trip too.
class EventPool {
 public:
  EventId record(cudaStream_t stream, int device) {
    Pooled* e = acquire(device);
    if (e == nullptr) return 0;  // the runtime is unloading: nothing will run any more
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    const cudaError_t err = cudaEventRecord(e->event, stream);
    if (unloading(err)) {
      release(reinterpret_cast<EventId>(e));
      return 0;
    }
    if (err != cudaSuccess) release(reinterpret_cast<EventId>(e));
    C10_CUDA_CHECK(err);
    return reinterpret_cast<EventId>(e);
  }
  bool query(EventId id) {
    const cudaError_t err = cudaEventQuery(get(id)->event);
    if (err == cudaErrorNotReady) {
      (void)cudaGetLastError();
      return false;
    }
    if (unloading(err)) return true;
    C10_CUDA_CHECK(err);
    return true;
  }
  void synchronize(EventId id) {
    const cudaError_t err = cudaEventSynchronize(get(id)->event);
    if (!unloading(err)) C10_CUDA_CHECK(err);
  }
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
    const cudaError_t err = cudaEventCreateWithFlags(&e->event, cudaEventDisableTiming);
    if (unloading(err)) return nullptr;
    C10_CUDA_CHECK(err);
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
  int device() const { return device_; }

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
    const cudaError_t err = cudaFree(ptr);
    if (!unloading(err)) C10_CUDA_CHECK(err);
  }
  std::optional<MemInfo> mem_info() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    std::size_t free = 0, total = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return MemInfo{free, total};
  }
  EventId record_event(StreamId stream, int device) override {
    return events().record(reinterpret_cast<cudaStream_t>(stream), device == kOwnDevice ? device_ : device);
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

void check_device(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "torch_wsl allocator: device index ", device, " out of range [0, ",
              kMaxDevices, ")");
}

CachingAllocator& device_ref(int device) {
  check_device(device);
  CachingAllocator* a = registry().fast[device].load(std::memory_order_acquire);
  return a != nullptr ? *a : *device_allocator(device, true);
}

int device_of(const CachingAllocator& a) {
  return static_cast<const CudaDeviceBackend&>(*a.backend_ptr()).device();
}

// A stream's device as the core wants it: kOwnDevice for the allocator's own.
int use_device(const CachingAllocator& a, int stream_device) {
  return stream_device == device_of(a) ? kOwnDevice : stream_device;
}

StreamId stream_id(cudaStream_t s) { return reinterpret_cast<StreamId>(s); }

PoolId pool_id(const c10::cuda::MempoolId_t& id) {
  return {static_cast<std::uint64_t>(id.first), static_cast<std::uint64_t>(id.second)};
}

// A CUDA out-of-memory error as PyTorch raises it (torch.OutOfMemoryError in Python).
template <class F>
auto translate_oom(F&& f) {
  try {
    return f();
  } catch (const OutOfMemoryError& e) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, e.what());
  }
}

template <class A>
void copy_stat(const Stat& from, A& to) {
  to.current = from.current;
  to.peak = from.peak;
  to.allocated = from.allocated;
  to.freed = from.freed;
}

template <class A>
void copy_stat_array(const StatArray& from, A& to) {
  for (std::size_t i = 0; i < 3 && i < to.size(); ++i) copy_stat(from[i], to[i]);
}

// The deleter of every DataPtr and raw_alloc pointer (context == pointer, as
// c10's raw_allocate and third-party users of raw_deleter() expect): the
// pointer is found in the devices' pointer maps.
void delete_raw(void* ptr) noexcept {
  if (ptr == nullptr) return;
  no_throw([&] {
    for (auto& slot : registry().fast)
      if (CachingAllocator* a = slot.load(std::memory_order_acquire))
        if (a->try_free(ptr)) return;
    report_deleter_error("free of a pointer torch_wsl's CUDA allocator did not hand out, or freed twice");
  });
}

// Whether torch's CUDAAllocator announces stream captures itself
// (markCaptureBegin/End, newer torch); older ones only route allocations
// to pools, and then a routed pool is treated as a capture.
template <class T, class = void>
struct HasMarkCapture : std::false_type {};
template <class T>
struct HasMarkCapture<T, std::void_t<decltype(&T::markCaptureBegin)>> : std::true_type {};
constexpr bool kTorchMarksCaptures = HasMarkCapture<c10::cuda::CUDACachingAllocator::CUDAAllocator>::value;

using Pluggable = torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;

class DeviceAllocator final : public Pluggable {
 public:
  DeviceAllocator() : Pluggable(&torch_wsl_malloc, &torch_wsl_free) {
    set_memory_fraction_fn([](double fraction, int device) {  // torch.cuda.set_per_process_memory_fraction
      TORCH_CHECK(fraction >= 0 && fraction <= 1, "set_per_process_memory_fraction: expected a fraction in [0, 1], got ",
                  fraction);
      device_ref(device).set_memory_fraction(fraction);
    });
  }

  std::string name() override { return "torch_wsl"; }

  c10::DataPtr allocate(size_t nbytes) override {
    const c10::DeviceIndex device = c10::cuda::current_device();
    const c10::Device where(c10::DeviceType::CUDA, device);
    if (nbytes == 0) return {nullptr, nullptr, &delete_raw, where};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    CachingAllocator& a = device_ref(device);
    void* p = translate_oom([&] { return a.malloc(nbytes, stream_id(stream)); });
    return {p, p, &delete_raw, where};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_raw; }
  void* raw_alloc(size_t nbytes) override {
    return raw_alloc_with_stream(nbytes, c10::cuda::getCurrentCUDAStream().stream());
  }
  void* raw_alloc_with_stream(size_t nbytes, cudaStream_t stream) override {
    if (nbytes == 0) return nullptr;
    CachingAllocator& a = device_ref(c10::cuda::current_device());
    return translate_oom([&] { return a.malloc(nbytes, stream_id(stream)); });
  }
  void raw_delete(void* ptr) override { delete_raw(ptr); }

  using Pluggable::recordStream;
  void recordStream(const c10::DataPtr& ptr, c10::cuda::CUDAStream stream) override {
    if (ptr.get() == nullptr) return;
    // Not ours (from_blob and the like): nothing to do, as in PyTorch's allocator.
    if (ptr.get_deleter() != &delete_raw) return;
    const StreamId s = stream_id(stream.stream());
    for (auto& slot : registry().fast)
      if (CachingAllocator* a = slot.load(std::memory_order_acquire))
        if (a->try_record_stream(ptr.get_context(), s, use_device(*a, stream.device_index()))) return;
  }

  // cuDNN sizes its benchmark workspace from this: the largest block that
  // could be had without an error on the current stream -- a cached free
  // block, or fresh memory within the budget and what the driver reports
  // free (less one rounding step: segments are rounded up to large_round).
  void cacheInfo(c10::DeviceIndex device, size_t* largest) override {
    CachingAllocator& a = device_ref(device);
    if (*largest == 0) {
      c10::cuda::CUDAGuard guard(device);
      std::size_t free = 0, total = 0;
      C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
      const std::size_t fresh = std::min(free, a.budget_headroom());
      const std::size_t round = a.policy().large_round;
      *largest = fresh > round ? fresh - round : 0;
    }
    const StreamId s = stream_id(c10::cuda::getCurrentCUDAStream(device).stream());
    *largest = std::max<std::size_t>(*largest, a.largest_free_block(s));
  }

  // torch.cuda.empty_cache() ({0, 0}: every cache) and ~MemPool (that pool's memory).
  void emptyCache(c10::cuda::MempoolId_t mempool_id) override {
    const bool all = mempool_id.first == 0 && mempool_id.second == 0;
    for (auto& slot : registry().fast)
      if (CachingAllocator* a = slot.load(std::memory_order_acquire)) {
        if (all) a->empty_cache();
        else a->empty_cache(pool_id(mempool_id));
      }
  }
  double getMemoryFraction(c10::DeviceIndex device) override {
    const double f = device_ref(device).memory_fraction();
    return f > 0 ? f : 1.0;
  }

  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    check_device(device);
    c10::CachingDeviceAllocator::DeviceStats out;
    const std::shared_ptr<CachingAllocator> a = device_allocator(device, false);
    if (!a) return out;  // never used: all zeros, as PyTorch reports
    const Stats s = a->stats();
    copy_stat_array(s.allocation, out.allocation);
    copy_stat_array(s.segment, out.segment);
    copy_stat_array(s.active, out.active);
    copy_stat_array(s.inactive_split, out.inactive_split);
    copy_stat_array(s.allocated_bytes, out.allocated_bytes);
    copy_stat_array(s.reserved_bytes, out.reserved_bytes);
    copy_stat_array(s.active_bytes, out.active_bytes);
    copy_stat_array(s.inactive_split_bytes, out.inactive_split_bytes);
    copy_stat_array(s.requested_bytes, out.requested_bytes);
    copy_stat(s.oversize_allocations, out.oversize_allocations);
    copy_stat(s.oversize_segments, out.oversize_segments);
    out.num_alloc_retries = s.num_alloc_retries;
    out.num_ooms = s.num_ooms;
    out.num_sync_all_streams = s.num_sync_all_streams;
    out.num_device_alloc = s.num_device_alloc;
    out.num_device_free = s.num_device_free;
    out.max_split_size = s.max_split_size;
    return out;
  }
  void resetAccumulatedStats(c10::DeviceIndex device) override {
    check_device(device);
    if (auto a = device_allocator(device, false)) a->reset_accumulated_stats();
  }
  void resetPeakStats(c10::DeviceIndex device) override {
    check_device(device);
    if (auto a = device_allocator(device, false)) a->reset_peak_stats();
  }

  // CUDA graph capture (torch.cuda.graph, make_graphed_callables,
  // torch.compile's cudagraphs) and torch.cuda.use_mem_pool: see the core's
  // private pools.
  void beginAllocateToPool(c10::DeviceIndex device, c10::cuda::MempoolId_t mempool_id,
                           std::function<bool(cudaStream_t)> filter) override {
    CachingAllocator& a = device_ref(device);
    a.begin_allocate_to_pool(pool_id(mempool_id),
                             [f = std::move(filter)](StreamId s) { return f(reinterpret_cast<cudaStream_t>(s)); });
    if (!kTorchMarksCaptures) a.capture_begin();
    pinned_capture(pool_id(mempool_id), true);
  }
  void endAllocateToPool(c10::DeviceIndex device, c10::cuda::MempoolId_t mempool_id) override {
    CachingAllocator& a = device_ref(device);
    a.end_allocate_to_pool(pool_id(mempool_id));
    if (!kTorchMarksCaptures) a.capture_end();
    pinned_capture(pool_id(mempool_id), false);
  }
  void releasePool(c10::DeviceIndex device, c10::cuda::MempoolId_t mempool_id) override {
    device_ref(device).release_pool(pool_id(mempool_id));
  }
  // These exist in newer torch only, so they are declared without
  // `override`: where the base class has them they override it, elsewhere
  // they are never called.
  void markCaptureBegin(c10::DeviceIndex device) { device_ref(device).capture_begin(); }
  void markCaptureEnd(c10::DeviceIndex device) { device_ref(device).capture_end(); }
  int getPoolUseCount(c10::DeviceIndex device, c10::cuda::MempoolId_t mempool_id) {
    return device_ref(device).pool_use_count(pool_id(mempool_id));
  }
  // torch.cuda.MemPool(): torch 2.8 passes the allocator as a raw pointer, later ones as a shared_ptr.
  void createOrIncrefPool(c10::DeviceIndex device, c10::cuda::MempoolId_t mempool_id,
                          std::shared_ptr<c10::cuda::CUDACachingAllocator::CUDAAllocator> allocator = nullptr) {
    create_pool(device, mempool_id, allocator.get());
  }
  void createOrIncrefPool(c10::DeviceIndex device, c10::cuda::MempoolId_t mempool_id,
                          c10::cuda::CUDACachingAllocator::CUDAAllocator* allocator) {
    create_pool(device, mempool_id, allocator);
  }
  // MemPool(use_on_oom=True) / the no-split option: not implemented; turning them off is a no-op
  // (~MemPool does that, and a destructor must not throw).
  void setUseOnOOM(c10::DeviceIndex /*device*/, c10::cuda::MempoolId_t /*mempool_id*/, bool use_on_oom) {
    if (use_on_oom) {
      TORCH_WARN_ONCE("torch_wsl allocator: MemPool(use_on_oom=True) is not supported; ignored");
    }
  }
  void setNoSplit(c10::DeviceIndex /*device*/, c10::cuda::MempoolId_t /*mempool_id*/) {
    TORCH_WARN_ONCE("torch_wsl allocator: MemPool(no_split=True) is not supported; blocks may be split");
  }

 private:
  // The pinned pool records its events on CUDA streams too, so it holds
  // them back while the device's allocations go to a pool (older torch does
  // not tell the host allocator about captures).
  void pinned_capture(PoolId id, bool begin) {
    const std::shared_ptr<PinnedPool> pool = process_pinned_pool_if_created();
    std::lock_guard<std::mutex> g(pinned_mutex_);
    if (begin && pool) {
      pool->pinned().capture_begin();
      pinned_marked_.push_back({id, pool});
    } else if (!begin) {
      for (auto it = pinned_marked_.begin(); it != pinned_marked_.end(); ++it)
        if (it->first == id) {
          it->second->pinned().capture_end();
          pinned_marked_.erase(it);
          break;
        }
    }
  }
  std::mutex pinned_mutex_;
  std::vector<std::pair<PoolId, std::shared_ptr<PinnedPool>>> pinned_marked_;

  void create_pool(c10::DeviceIndex device, c10::cuda::MempoolId_t mempool_id,
                   c10::cuda::CUDACachingAllocator::CUDAAllocator* allocator) {
    TORCH_CHECK(allocator == nullptr || allocator == this,
                "torch_wsl allocator: torch.cuda.MemPool(allocator=...) with another allocator is not supported "
                "while torch_wsl serves CUDA memory");
    device_ref(device).create_or_incref_pool(pool_id(mempool_id));
  }
};

}  // namespace

void set_device_policy(const Policy& policy) {
  policy.validate();
  TORCH_CHECK(policy.min_block_size >= 512,
              "torch_wsl CUDA allocator: expected min_block_size >= 512 bytes (the alignment cuBLASLt, Triton and "
              "Inductor rely on), got ",
              policy.min_block_size);
  std::lock_guard<std::mutex> g(registry().mutex);
  registry().policy = policy;
}

std::shared_ptr<CachingAllocator> device_allocator(int device, bool create) {
  check_device(device);
  DeviceRegistry& r = registry();
  std::lock_guard<std::mutex> g(r.mutex);
  if (!r.owned[device] && create) {
    r.owned[device] = std::make_shared<CachingAllocator>(std::make_shared<CudaDeviceBackend>(device), r.policy);
    r.fast[device].store(r.owned[device].get(), std::memory_order_release);
  }
  return r.owned[device];
}

void install_device_allocator() {
  static NoDestructor<std::shared_ptr<DeviceAllocator>> instance;  // outlives every tensor
  std::shared_ptr<DeviceAllocator>& a = instance.get();
  if (a && c10::cuda::CUDACachingAllocator::get() == a.get()) return;
  auto fresh = std::make_shared<DeviceAllocator>();
  // Raises "Can't swap an already initialized allocator" once CUDA is in use.
  torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(fresh);
  // c10::GetAllocator(kCUDA) (torch.accelerator.memory_*, getDeviceAllocator
  // users) still points at the native allocator after the swap above.
  c10::SetAllocator(c10::DeviceType::CUDA, fresh.get(), /*priority=*/1);
  a = std::move(fresh);
}

std::int64_t deleter_errors() { return g_deleter_errors.load(); }

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

std::string try_host_alloc(std::size_t nbytes) {
  void* p = nullptr;
  const cudaError_t err = cudaHostAlloc(&p, nbytes, cudaHostAllocDefault);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaGetErrorString(err);
  }
  C10_CUDA_CHECK(cudaFreeHost(p));
  return "";
}

// ------------------------------------------------------------ pinned host memory

PinnedHostBackend::PinnedHostBackend(std::size_t pinned_budget_bytes) : budget_(pinned_budget_bytes) {}

void* PinnedHostBackend::allocate(std::size_t nbytes) {
  {
    std::lock_guard<std::mutex> g(mutex_);
    if (counters_.pinned_bytes + nbytes > budget_) {
      ++counters_.budget_refusals;
      last_refusal_ = "the pinned budget of " + format_bytes(budget_) + " is used up";
      return nullptr;
    }
    counters_.pinned_bytes += nbytes;  // reserved while the driver is asked
  }
  void* p = nullptr;
  const cudaError_t err = cudaHostAlloc(&p, nbytes, cudaHostAllocDefault);
  std::lock_guard<std::mutex> g(mutex_);
  if (err == cudaSuccess) {
    ++counters_.pinned_segments;
    return p;
  }
  (void)cudaGetLastError();
  counters_.pinned_bytes -= nbytes;
  ++counters_.driver_refusals;
  last_refusal_ = std::string("the driver refused cudaHostAlloc (") + cudaGetErrorString(err) + ")";
  return nullptr;
}

void PinnedHostBackend::deallocate(void* ptr, std::size_t nbytes) {
  {
    std::lock_guard<std::mutex> g(mutex_);
    --counters_.pinned_segments;
    counters_.pinned_bytes -= nbytes;
  }
  const cudaError_t err = cudaFreeHost(ptr);
  if (!unloading(err)) C10_CUDA_CHECK(err);
}

// A pinned block is used by copies on CUDA streams of any device: each event
// is recorded on the stream's own device (a bare cudaStream_t would not say
// which: the default stream is 0 on every device).
EventId PinnedHostBackend::record_event(StreamId stream, int device) {
  return events().record(reinterpret_cast<cudaStream_t>(stream),
                         device == kOwnDevice ? static_cast<int>(c10::cuda::current_device()) : device);
}
bool PinnedHostBackend::query_event(EventId e) { return events().query(e); }
void PinnedHostBackend::synchronize_event(EventId e) { events().synchronize(e); }
void PinnedHostBackend::release_event(EventId e) { events().release(e); }

PinnedHostBackend::Counters PinnedHostBackend::counters() const {
  std::lock_guard<std::mutex> g(mutex_);
  return counters_;
}

std::string PinnedHostBackend::last_refusal() const {
  std::lock_guard<std::mutex> g(mutex_);
  return last_refusal_;
}

PinnedPool::PinnedPool(const Policy& policy, std::size_t pinned_budget_bytes)
    : backend_(std::make_shared<PinnedHostBackend>(pinned_budget_bytes)),
      pinned_(std::make_shared<CachingAllocator>(backend_, policy)),
      pageable_(std::make_shared<CachingAllocator>(std::make_shared<HostBackend>(HostConfig{64, false, 2 << 20}),
                                                   policy)) {}

void PinnedPool::note_fallback(const std::string& why) {
  std::lock_guard<std::mutex> g(mutex_);
  if (warned_) return;
  warned_ = true;
  warning_ = "torch_wsl: pinned host memory falls back to pageable memory (" +
             (why.empty() ? std::string("the pinned pool is out of memory") : why) +
             "); copies from these buffers are correct but synchronous. WSL2 limits pinned memory "
             "(microsoft/WSL#14078, #8447); the budget comes from torch_wsl.env.recommended_settings()"
             ".pinned_budget_bytes and can be set with TORCH_WSL_ALLOC_CONF=pinned.budget:<bytes>. "
             "This warning is shown once.";
}

void* PinnedPool::malloc(std::size_t nbytes) {
  if (nbytes == 0) return nullptr;
  try {
    return pinned_->malloc(nbytes, kHostStream);
  } catch (const OutOfMemoryError&) {
  }
  void* p = pageable_->malloc(nbytes, kHostStream);
  note_fallback(backend_->last_refusal());
  return p;
}

void PinnedPool::free(void* ptr) {
  if (ptr == nullptr || pinned_->try_free(ptr) || pageable_->try_free(ptr)) return;
  throw std::invalid_argument("free(): the pointer was not allocated by this pinned pool, or was freed already");
}

bool PinnedPool::record_stream(void* ptr, StreamId stream, int device) {
  // A pageable block gets no event (its backend has no streams: copies from it are synchronous).
  return pinned_->try_record_stream(ptr, stream, device) || pageable_->try_record_stream(ptr, stream, device);
}

void PinnedPool::empty_cache() {
  pinned_->empty_cache();
  pageable_->empty_cache();
}

std::string PinnedPool::take_warning() {
  std::lock_guard<std::mutex> g(mutex_);
  return std::exchange(warning_, std::string());
}

namespace {

struct PinnedState {
  std::mutex mutex;
  std::shared_ptr<PinnedPool> pool;
};

PinnedState& pinned_state() {
  static NoDestructor<PinnedState> s;
  return s.get();
}

PinnedPool& pinned_ref() { return *pinned_state().pool; }

// at::HostStats names its fields differently in torch 2.8 and in later versions.
template <class H>
auto fill_host_stats(H& h, const Stats& st, int) -> decltype(h.active_requests, void()) {
  copy_stat(st.allocation[kAll], h.active_requests);
  copy_stat(st.allocated_bytes[kAll], h.active_bytes);
  copy_stat(st.segment[kAll], h.allocations);
  copy_stat(st.reserved_bytes[kAll], h.allocated_bytes);
}
template <class H>
void fill_host_stats(H& h, const Stats& st, long) {
  copy_stat(st.allocation[kAll], h.allocation);
  copy_stat(st.segment[kAll], h.segment);
  copy_stat(st.allocated_bytes[kAll], h.allocated_bytes);
  copy_stat(st.reserved_bytes[kAll], h.reserved_bytes);
}

// PyTorch's CUDA host allocator interface over the pinned pool. Contexts
// are the allocations' base pointers (a view's data pointer may point
// inside one); record_event is called for every non_blocking copy, pinned or
// not, so it only acts on pointers the pools know.
class PinnedHostAllocator final : public at::HostAllocator {
 public:
  at::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes == 0) return {nullptr, nullptr, &release, cpu};
    PinnedPool& pool = pinned_ref();
    void* p = translate_oom([&] { return pool.malloc(nbytes); });
    const std::string warning = pool.take_warning();
    if (!warning.empty()) TORCH_WARN(warning);
    return {p, p, &release, cpu};
  }
  bool record_event(void* /*ptr*/, void* ctx, c10::Stream stream) override {
    if (stream.device_type() != c10::DeviceType::CUDA || ctx == nullptr) return false;
    const c10::cuda::CUDAStream cs(c10::cuda::CUDAStream::UNCHECKED, stream);
    return pinned_ref().record_stream(ctx, stream_id(cs.stream()), static_cast<int>(stream.device_index()));
  }
  void empty_cache() override { pinned_ref().empty_cache(); }
  at::HostStats get_stats() override {
    const Stats st = pinned_ref().pinned().stats();
    at::HostStats h;
    fill_host_stats(h, st, 0);
    h.num_host_alloc = st.num_device_alloc;
    h.num_host_free = st.num_device_free;
    return h;
  }
  void reset_accumulated_stats() override { pinned_ref().pinned().reset_accumulated_stats(); }
  void reset_peak_stats() override { pinned_ref().pinned().reset_peak_stats(); }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // CUDA graph capture (torch 2.11 and later ask the host allocator too):
  // pinned buffers allocated while the current stream is being captured
  // come from a private pool, and its events wait as the device pool's do.
  // Declared without `override`: older torch has no such hooks.
  void begin_allocate_to_pool(c10::cuda::MempoolId_t pool, std::function<bool(c10::Stream)> filter) {
    pinned_ref().pinned().begin_allocate_to_pool(
        pool_id(pool), [f = std::move(filter)](StreamId) { return f(c10::cuda::getCurrentCUDAStream()); });
  }
  void end_allocate_to_pool(c10::cuda::MempoolId_t pool) { pinned_ref().pinned().end_allocate_to_pool(pool_id(pool)); }
  void release_pool(c10::cuda::MempoolId_t pool) { pinned_ref().pinned().release_pool(pool_id(pool)); }

 private:
  static void release(void* ptr) noexcept {
    if (ptr != nullptr) no_throw([&] { pinned_ref().free(ptr); });
  }
};

}  // namespace

std::shared_ptr<PinnedPool> process_pinned_pool(const Policy& policy, std::size_t pinned_budget_bytes) {
  PinnedState& s = pinned_state();
  std::lock_guard<std::mutex> g(s.mutex);
  if (!s.pool) s.pool = std::make_shared<PinnedPool>(policy, pinned_budget_bytes);
  return s.pool;
}

std::shared_ptr<PinnedPool> process_pinned_pool_if_created() {
  PinnedState& s = pinned_state();
  std::lock_guard<std::mutex> g(s.mutex);
  return s.pool;
}

void install_pinned_host_allocator() {
  TORCH_CHECK(process_pinned_pool_if_created() != nullptr, "torch_wsl: create the pinned pool before installing it");
  static NoDestructor<PinnedHostAllocator> instance;
  at::setHostAllocator(at::kCUDA, &instance.get(), /*priority=*/1);
  TORCH_CHECK(at::getHostAllocator(at::kCUDA) == &instance.get(),
              "torch_wsl could not install its pinned host allocator: another one holds the slot with a higher "
              "priority (at::setHostAllocator)");
}

}  // namespace torch_wsl::alloc::cuda

// ------------------------------------------------------------ C entry points
// The signatures of torch.cuda.memory.CUDAPluggableAllocator, for users who
// load torch_wsl's allocator that way; install_device_allocator() does not
// need them. Out of memory raises c10::OutOfMemoryError (torch.OutOfMemoryError).
extern "C" __attribute__((visibility("default"))) void* torch_wsl_malloc(ssize_t size, int device,
                                                                         cudaStream_t stream) {
  using namespace torch_wsl::alloc;
  CachingAllocator& a = cuda::device_ref(device);
  return cuda::translate_oom([&] { return a.malloc(static_cast<std::size_t>(size), reinterpret_cast<StreamId>(stream)); });
}

extern "C" __attribute__((visibility("default"))) void torch_wsl_free(void* ptr, ssize_t /*size*/, int device,
                                                                      cudaStream_t /*stream*/) {
  using namespace torch_wsl::alloc::cuda;
  no_throw([&] {
    if (ptr != nullptr && !device_ref(device).try_free(ptr))
      report_deleter_error("free of a pointer torch_wsl's CUDA allocator did not hand out, or freed twice");
  });
}
