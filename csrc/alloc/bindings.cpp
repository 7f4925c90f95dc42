// pybind11 bindings of the caching allocator: torch_wsl._C._alloc, used by
// torch_wsl.memory. Like csrc/bindings.cpp this avoids torch's pybind11
// casters: pointers cross as ints, statistics as dicts.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "alloc/core/allocator.h"
#include "alloc/core/host_backend.h"
#include "alloc/core/no_caching.h"
#include "alloc/core/replay.h"
#include "alloc/core/sim_backend.h"
#include "alloc/cuda_api.h"
#include "alloc/python.h"
#include "alloc/torch_cpu_allocator.h"

namespace py = pybind11;

namespace torch_wsl::alloc {

namespace {

Policy policy_from(const py::dict& d) {
  Policy p;
  for (const auto& item : d) {
    if (item.second.is_none()) continue;
    p.set(py::cast<std::string>(item.first), py::cast<double>(item.second));
  }
  p.validate();
  return p;
}

py::dict policy_to(const Policy& p) {
  py::dict d;
  d["min_block_size"] = p.min_block_size;
  d["small_size"] = p.small_size;
  d["small_segment_size"] = p.small_segment_size;
  d["large_segment_size"] = p.large_segment_size;
  d["min_large_alloc"] = p.min_large_alloc;
  d["large_round"] = p.large_round;
  d["roundup_power2_divisions"] = p.roundup_power2_divisions;
  d["max_split_size"] = p.max_split_size == SIZE_MAX ? py::object(py::none()) : py::int_(p.max_split_size);
  d["large_split_min"] = p.large_split_min;
  d["budget_bytes"] = p.budget_bytes;
  d["budget_fraction"] = p.budget_fraction;
  d["trace_capacity"] = p.trace_capacity;
  return d;
}

py::dict stats_to(const Stats& s) {
  py::dict d;
  for (const auto& [k, v] : s.items()) d[py::str(k)] = v;
  return d;
}

py::list snapshot_to(const std::vector<SegmentInfo>& snap) {
  py::list out;
  for (const SegmentInfo& s : snap) {
    py::list blocks;
    std::size_t allocated = 0, active = 0, requested = 0;
    for (const BlockInfo& b : s.blocks) {
      py::dict bd;
      bd["address"] = b.addr;
      bd["size"] = b.size;
      bd["requested_size"] = b.requested;
      bd["state"] = block_state_name(b.state);
      blocks.append(bd);
      if (b.state == BlockState::kAllocated) allocated += b.size;
      if (b.state != BlockState::kFree) active += b.size;
      requested += b.requested;
    }
    py::dict sd;
    sd["address"] = s.addr;
    sd["total_size"] = s.size;
    sd["stream"] = s.stream;
    sd["segment_type"] = s.small_pool ? "small" : "large";
    sd["segment_pool_id"] = py::make_tuple(s.pool.first, s.pool.second);
    sd["allocated_size"] = allocated;
    sd["active_size"] = active;
    sd["requested_size"] = requested;
    sd["blocks"] = blocks;
    out.append(sd);
  }
  return out;
}

py::list trace_to(const std::vector<TraceEntry>& entries) {
  py::list out;
  for (const TraceEntry& e : entries) {
    py::dict d;
    d["action"] = trace_action_name(e.action);
    d["addr"] = e.addr;
    d["size"] = e.size;
    d["stream"] = e.stream;
    d["time_ns"] = e.time_ns;
    out.append(d);
  }
  return out;
}

std::uintptr_t as_int(void* p) { return reinterpret_cast<std::uintptr_t>(p); }
void* as_ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

}  // namespace

void init_bindings(py::module_& parent) {
  py::module_ m = parent.def_submodule("_alloc", "torch_wsl's caching allocator (use torch_wsl.memory)");

  // OutOfMemoryError -> torch.OutOfMemoryError (a RuntimeError), like PyTorch's own allocators.
  static PyObject* torch_oom = [] {
    PyObject* t = py::module_::import("torch").attr("OutOfMemoryError").ptr();
    Py_INCREF(t);
    return t;
  }();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OutOfMemoryError& e) {
      PyErr_SetString(torch_oom, e.what());
    }
  });

  py::class_<Backend, std::shared_ptr<Backend>>(m, "Backend")
      .def_property_readonly("name", &Backend::name)
      .def("mem_info", [](Backend& b) -> py::object {
        const auto info = b.mem_info();
        if (!info) return py::none();
        return py::make_tuple(info->free_bytes, info->total_bytes);
      });

  py::class_<SimulatedBackend, Backend, std::shared_ptr<SimulatedBackend>>(m, "SimulatedBackend")
      .def(py::init([](std::size_t capacity, double malloc_cost_us, double free_cost_us, std::size_t alignment) {
             SimulatedConfig c;
             c.capacity = capacity;
             c.malloc_cost_us = malloc_cost_us;
             c.free_cost_us = free_cost_us;
             c.alignment = alignment;
             if (malloc_cost_us < 0 || free_cost_us < 0) throw std::invalid_argument("simulated costs must be >= 0");
             return std::make_shared<SimulatedBackend>(c);
           }),
           py::arg("capacity") = std::size_t{16} << 30, py::arg("malloc_cost_us") = 0.0,
           py::arg("free_cost_us") = 0.0, py::arg("alignment") = 512)
      .def("submit_work", &SimulatedBackend::submit_work, py::arg("stream"))
      .def("complete_work", &SimulatedBackend::complete_work, py::arg("stream"))
      .def("fail_nth_alloc", &SimulatedBackend::fail_nth_alloc, py::arg("n") = 1)
      .def("set_capacity", &SimulatedBackend::set_capacity, py::arg("capacity"))
      .def("set_costs", &SimulatedBackend::set_costs, py::arg("malloc_cost_us"), py::arg("free_cost_us"))
      .def("counters", [](const SimulatedBackend& b) {
        const auto c = b.counters();
        py::dict d;
        d["alloc_calls"] = c.alloc_calls;
        d["free_calls"] = c.free_calls;
        d["failed_allocs"] = c.failed_allocs;
        d["live_segments"] = c.live_segments;
        d["live_bytes"] = c.live_bytes;
        d["peak_live_bytes"] = c.peak_live_bytes;
        d["live_events"] = c.live_events;
        d["events_recorded"] = c.events_recorded;
        d["events_queried"] = c.events_queried;
        d["last_event_device"] = c.last_event_device;
        return d;
      })
      .def_property_readonly("config", [](const SimulatedBackend& b) {
        const auto c = b.config();
        py::dict d;
        d["capacity"] = c.capacity;
        d["malloc_cost_us"] = c.malloc_cost_us;
        d["free_cost_us"] = c.free_cost_us;
        d["alignment"] = c.alignment;
        return d;
      });

  py::class_<HostBackend, Backend, std::shared_ptr<HostBackend>>(m, "HostBackend")
      .def(py::init([](std::size_t alignment, bool huge_pages) {
             return std::make_shared<HostBackend>(HostConfig{alignment, huge_pages, 2 << 20});
           }),
           py::arg("alignment") = 64, py::arg("huge_pages") = false)
      .def_property_readonly("alloc_calls", &HostBackend::alloc_calls)
      .def_property_readonly("free_calls", &HostBackend::free_calls);

  py::class_<AllocatorInterface, std::shared_ptr<AllocatorInterface>>(m, "AllocatorInterface")
      .def("malloc", [](AllocatorInterface& a, std::size_t n, std::uint64_t s) { return as_int(a.malloc(n, s)); },
           py::arg("nbytes"), py::arg("stream") = 0)
      .def("free", [](AllocatorInterface& a, std::uintptr_t p) { a.free(as_ptr(p)); }, py::arg("ptr"))
      .def("stats", [](const AllocatorInterface& a) { return stats_to(a.stats()); });

  py::class_<CachingAllocator, AllocatorInterface, std::shared_ptr<CachingAllocator>>(m, "CachingAllocator")
      .def(py::init([](std::shared_ptr<Backend> backend, const py::dict& policy) {
             return std::make_shared<CachingAllocator>(std::move(backend), policy_from(policy));
           }),
           py::arg("backend"), py::arg("policy") = py::dict())
      .def("record_stream",
           [](CachingAllocator& a, std::uintptr_t p, std::uint64_t s, int device) {
             a.record_stream(as_ptr(p), s, device);
           },
           py::arg("ptr"), py::arg("stream"), py::arg("device") = kOwnDevice)
      .def("snapshot", [](const CachingAllocator& a) { return snapshot_to(a.snapshot()); })
      .def("trace", [](const CachingAllocator& a) { return trace_to(a.trace()); })
      .def("set_trace_capacity", &CachingAllocator::set_trace_capacity, py::arg("capacity"))
      .def("empty_cache", static_cast<void (CachingAllocator::*)()>(&CachingAllocator::empty_cache),
           py::call_guard<py::gil_scoped_release>())
      .def("process_events", &CachingAllocator::process_events)
      .def("reset_peak_stats", &CachingAllocator::reset_peak_stats)
      .def("reset_accumulated_stats", &CachingAllocator::reset_accumulated_stats)
      .def("set_budget", &CachingAllocator::set_budget, py::arg("bytes") = py::none(),
           py::arg("fraction") = py::none())
      .def("set_memory_fraction", &CachingAllocator::set_memory_fraction, py::arg("fraction"))
      .def_property_readonly("budget", &CachingAllocator::budget)
      .def_property_readonly("budget_headroom", &CachingAllocator::budget_headroom)
      .def("largest_free_block", &CachingAllocator::largest_free_block, py::arg("stream") = 0)
      .def_property_readonly("policy", [](const CachingAllocator& a) { return policy_to(a.policy()); })
      .def_property_readonly("backend", &CachingAllocator::backend_ptr)
      .def("round_size", &CachingAllocator::round_size, py::arg("nbytes"));

  py::class_<NoCachingAllocator, AllocatorInterface, std::shared_ptr<NoCachingAllocator>>(m, "NoCachingAllocator")
      .def(py::init([](std::shared_ptr<Backend> backend, std::size_t min_block_size) {
             return std::make_shared<NoCachingAllocator>(std::move(backend), min_block_size);
           }),
           py::arg("backend"), py::arg("min_block_size") = 512);

  py::class_<AllocTrace, std::shared_ptr<AllocTrace>>(m, "AllocTrace")
      .def(py::init<>())
      .def("__len__", &AllocTrace::size)
      .def_property_readonly("num_steps", &AllocTrace::num_steps)
      .def_property_readonly("recording", &AllocTrace::recording)
      .def("record_alloc", &AllocTrace::record_alloc, py::arg("nbytes"))
      .def("record_free", &AllocTrace::record_free, py::arg("id"))
      .def("mark_step", &AllocTrace::mark_step)
      .def("stop", &AllocTrace::stop)
      .def("events",
           [](const AllocTrace& t) {
             py::list out;
             static const char* const kOps[] = {"alloc", "free", "step"};
             for (const TraceEvent& e : t.events())
               out.append(py::make_tuple(kOps[static_cast<int>(e.op)], e.id, e.size));
             return out;
           })
      .def("to_bytes", [](const AllocTrace& t) { return py::bytes(t.serialize()); })
      .def_static("from_bytes", [](const py::bytes& b) {
        return std::make_shared<AllocTrace>(AllocTrace::deserialize(std::string(b)));
      });

  m.def(
      "replay",
      [](const AllocTrace& trace, AllocatorInterface& target, int passes) {
        const std::vector<TraceEvent> events = trace.events();
        ReplayResult r;
        {
          py::gil_scoped_release nogil;
          r = replay(events, target, passes);
        }
        py::list steps;
        for (const ReplayStep& s : r.steps) {
          py::dict d;
          d["pass"] = s.pass;
          d["step"] = s.step;
          d["mallocs"] = s.mallocs;
          d["frees"] = s.frees;
          d["device_allocs"] = s.device_allocs;
          d["device_frees"] = s.device_frees;
          d["ns"] = s.ns;
          steps.append(d);
        }
        py::dict out;
        out["steps"] = steps;
        out["peak_requested"] = r.peak_requested;
        out["peak_reserved"] = r.peak_reserved;
        out["unmatched_frees"] = r.unmatched_frees;
        out["leaked_at_end"] = r.leaked_at_end;
        return out;
      },
      py::arg("trace"), py::arg("allocator"), py::arg("passes") = 1,
      "Replays a trace through an allocator inside C++; per-step backend calls and host nanoseconds.");

  m.def("policy_fields", &Policy::field_names);
  m.def("default_policy", [] { return policy_to(Policy{}); });

  // CPU tensors.
  m.def(
      "cpu_enable",
      [](const py::dict& policy, std::size_t alignment, bool huge_pages) {
        return cpu_enable(policy_from(policy), HostConfig{alignment, huge_pages, 2 << 20});
      },
      py::arg("policy"), py::arg("alignment") = 64, py::arg("huge_pages") = false);
  m.def("cpu_disable", &cpu_disable);
  m.def("cpu_current", &cpu_current);
  m.def("cpu_trace_start", &cpu_trace_start);
  m.def("cpu_trace_stop", &cpu_trace_stop, py::arg("trace"));

#ifdef TORCH_WSL_WITH_CUDA
  m.attr("has_cuda") = true;
  py::class_<cuda::PinnedHostBackend, Backend, std::shared_ptr<cuda::PinnedHostBackend>>(m, "PinnedHostBackend")
      .def(py::init([](std::size_t budget) { return std::make_shared<cuda::PinnedHostBackend>(budget); }),
           py::arg("pinned_budget_bytes"))
      .def_property_readonly("budget", &cuda::PinnedHostBackend::budget)
      .def("last_refusal", &cuda::PinnedHostBackend::last_refusal)
      .def("counters", [](const cuda::PinnedHostBackend& b) {
        const auto c = b.counters();
        py::dict d;
        d["pinned_segments"] = c.pinned_segments;
        d["pinned_bytes"] = c.pinned_bytes;
        d["driver_refusals"] = c.driver_refusals;
        d["budget_refusals"] = c.budget_refusals;
        return d;
      });
  py::class_<cuda::PinnedPool, std::shared_ptr<cuda::PinnedPool>>(m, "PinnedPool")
      .def(py::init([](const py::dict& policy, std::size_t budget) {
             return std::make_shared<cuda::PinnedPool>(policy_from(policy), budget);
           }),
           py::arg("policy"), py::arg("pinned_budget_bytes"))
      .def("malloc", [](cuda::PinnedPool& p, std::size_t n) { return as_int(p.malloc(n)); }, py::arg("nbytes"))
      .def("free", [](cuda::PinnedPool& p, std::uintptr_t ptr) { p.free(as_ptr(ptr)); }, py::arg("ptr"))
      .def("empty_cache", &cuda::PinnedPool::empty_cache, py::call_guard<py::gil_scoped_release>())
      .def("take_warning", &cuda::PinnedPool::take_warning)
      .def_property_readonly("pinned", &cuda::PinnedPool::pinned_ptr)
      .def_property_readonly("pageable", &cuda::PinnedPool::pageable_ptr)
      .def_property_readonly("backend", [](cuda::PinnedPool& p) { return p.pinned_ptr()->backend_ptr(); });
  m.attr("HOST_STREAM") = cuda::kHostStream;
  m.def("cuda_set_device_policy", [](const py::dict& p) { cuda::set_device_policy(policy_from(p)); });
  m.def("cuda_device_allocator", &cuda::device_allocator, py::arg("device"), py::arg("create") = false);
  m.def("cuda_install", &cuda::install_device_allocator);
  m.def("cuda_deleter_errors", &cuda::deleter_errors);
  m.def("cuda_try_host_alloc", &cuda::try_host_alloc, py::arg("nbytes"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "cuda_measure_driver_cost",
      [](int device, std::size_t nbytes, int reps) {
        const cuda::DriverCost c = cuda::measure_driver_cost(device, nbytes, reps);
        py::dict d;
        d["malloc_us"] = c.malloc_us;
        d["free_us"] = c.free_us;
        return d;
      },
      py::arg("device"), py::arg("nbytes"), py::arg("reps"));
  m.def(
      "pinned_pool",
      [](const py::dict& policy, std::size_t budget) { return cuda::process_pinned_pool(policy_from(policy), budget); },
      py::arg("policy"), py::arg("pinned_budget_bytes"));
  m.def("pinned_pool_if_created", &cuda::process_pinned_pool_if_created);
  m.def("pinned_install", &cuda::install_pinned_host_allocator);
#else
  m.attr("has_cuda") = false;
#endif
}

}  // namespace torch_wsl::alloc
