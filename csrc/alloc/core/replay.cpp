#include "alloc/core/replay.h"

#include <chrono>
#include <cstring>
#include <stdexcept>

namespace torch_wsl::alloc {

AllocTrace::AllocTrace(std::vector<TraceEvent> events) : events_(std::move(events)) {
  for (const TraceEvent& e : events_)
    if (e.op == TraceOp::kAlloc && e.id >= next_id_) next_id_ = e.id + 1;
  recording_.store(false);
}

std::uint64_t AllocTrace::record_alloc(std::size_t size) {
  std::lock_guard<std::mutex> g(mutex_);
  const std::uint64_t id = next_id_++;
  if (recording_.load()) events_.push_back({TraceOp::kAlloc, id, size});
  return id;
}

void AllocTrace::record_free(std::uint64_t id) {
  if (!recording_.load()) return;
  std::lock_guard<std::mutex> g(mutex_);
  events_.push_back({TraceOp::kFree, id, 0});
}

void AllocTrace::mark_step() {
  std::lock_guard<std::mutex> g(mutex_);
  events_.push_back({TraceOp::kStep, 0, 0});
}

std::vector<TraceEvent> AllocTrace::events() const {
  std::lock_guard<std::mutex> g(mutex_);
  return events_;
}

std::size_t AllocTrace::size() const {
  std::lock_guard<std::mutex> g(mutex_);
  return events_.size();
}

std::int64_t AllocTrace::num_steps() const {
  std::lock_guard<std::mutex> g(mutex_);
  std::int64_t n = 0;
  for (const TraceEvent& e : events_) n += e.op == TraceOp::kStep;
  return n;
}

namespace {
constexpr char kMagic[8] = {'T', 'W', 'S', 'L', 'T', 'R', 'C', '1'};
constexpr std::size_t kRecord = 1 + 8 + 8;
}  // namespace

std::string AllocTrace::serialize() const {
  const std::vector<TraceEvent> ev = events();
  std::string out(sizeof(kMagic) + 8 + ev.size() * kRecord, '\0');
  char* p = out.data();
  std::memcpy(p, kMagic, sizeof(kMagic));
  p += sizeof(kMagic);
  const std::uint64_t n = ev.size();
  std::memcpy(p, &n, 8);
  p += 8;
  for (const TraceEvent& e : ev) {
    *p++ = static_cast<char>(e.op);
    std::memcpy(p, &e.id, 8);
    std::memcpy(p + 8, &e.size, 8);
    p += 16;
  }
  return out;
}

std::vector<TraceEvent> AllocTrace::deserialize(const std::string& bytes) {
  if (bytes.size() < sizeof(kMagic) + 8 || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0)
    throw std::invalid_argument("not a torch_wsl allocation trace (bad header)");
  std::uint64_t n;
  std::memcpy(&n, bytes.data() + sizeof(kMagic), 8);
  if (bytes.size() != sizeof(kMagic) + 8 + n * kRecord)
    throw std::invalid_argument("truncated or corrupt torch_wsl allocation trace");
  std::vector<TraceEvent> ev(n);
  const char* p = bytes.data() + sizeof(kMagic) + 8;
  for (TraceEvent& e : ev) {
    const auto op = static_cast<std::uint8_t>(*p++);
    if (op > 2) throw std::invalid_argument("corrupt torch_wsl allocation trace (bad event kind)");
    e.op = static_cast<TraceOp>(op);
    std::memcpy(&e.id, p, 8);
    std::memcpy(&e.size, p + 8, 8);
    p += 16;
  }
  return ev;
}

ReplayResult replay(const std::vector<TraceEvent>& events, AllocatorInterface& target, int passes) {
  if (passes < 1) throw std::invalid_argument("replay: passes must be >= 1");
  std::uint64_t max_id = 0;
  for (const TraceEvent& e : events)
    if (e.op != TraceOp::kStep && e.id + 1 > max_id) max_id = e.id + 1;
  std::vector<void*> ptrs(max_id, nullptr);
  std::vector<std::size_t> sizes(max_id, 0);
  ReplayResult result;
  using clock = std::chrono::steady_clock;
  for (int pass = 0; pass < passes; ++pass) {
    std::size_t live_requested = 0;
    int step = 0;
    std::int64_t mallocs = 0, frees = 0;
    Stats before = target.stats();
    std::int64_t ns = 0;
    auto close_step = [&](bool is_marker) {
      const Stats after = target.stats();
      result.steps.push_back(ReplayStep{pass, step, mallocs, frees, after.num_device_alloc - before.num_device_alloc,
                                        after.num_device_free - before.num_device_free, ns});
      before = after;
      mallocs = frees = ns = 0;
      if (is_marker) ++step;
    };
    std::size_t i = 0;
    while (i < events.size()) {
      // Time a run of alloc/free events up to the next step marker.
      const auto t0 = clock::now();
      for (; i < events.size() && events[i].op != TraceOp::kStep; ++i) {
        const TraceEvent& e = events[i];
        if (e.op == TraceOp::kAlloc) {
          if (ptrs[e.id] != nullptr) target.free(ptrs[e.id]);  // an id reused by a corrupt trace
          ptrs[e.id] = target.malloc(e.size, 0);
          sizes[e.id] = e.size;
          live_requested += e.size;
          if (live_requested > result.peak_requested) result.peak_requested = live_requested;
          ++mallocs;
        } else if (ptrs[e.id] != nullptr) {
          target.free(ptrs[e.id]);
          ptrs[e.id] = nullptr;
          live_requested -= sizes[e.id];
          ++frees;
        } else if (pass == 0) {
          ++result.unmatched_frees;
        }
      }
      ns += std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count();
      if (i < events.size()) {  // a step marker
        close_step(true);
        ++i;
      }
    }
    if (mallocs + frees > 0) close_step(false);
    for (std::size_t id = 0; id < ptrs.size(); ++id) {
      if (ptrs[id] != nullptr) {
        if (pass == 0) ++result.leaked_at_end;
        target.free(ptrs[id]);
        ptrs[id] = nullptr;
      }
    }
  }
  result.peak_reserved = static_cast<std::size_t>(target.stats().reserved_bytes[kAll].peak);
  return result;
}

}  // namespace torch_wsl::alloc
