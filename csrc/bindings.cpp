// Runtime services exposed to Python through pybind11 (operators go through
// the dispatcher instead; see TORCH_LIBRARY_FRAGMENT in the op files).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

// TORCH_VERSION: newer torch keeps it in its header-only library, torch 2.8 in torch/version.h.
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include "alloc/python.h"
#include "build_info.h"
#include "cpu/bandwidth.h"
#include "cpu/isa.h"

#ifndef TORCH_WSL_CUDA_ARCHS
#define TORCH_WSL_CUDA_ARCHS ""
#endif

namespace py = pybind11;

#ifndef TORCH_WSL_WITH_CUDA
int torch_wsl::cuda_runtime_version_built() { return 0; }
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_wsl runtime services (operators live in torch.ops.torch_wsl)";
  m.def("_build_info", [] {
    py::dict info;
    info["torch_version"] = TORCH_VERSION;
    const int cuda = torch_wsl::cuda_runtime_version_built();
    info["cuda_version"] = cuda == 0 ? py::object(py::none())
                                     : py::object(py::str(std::to_string(cuda / 1000) + "." +
                                                          std::to_string((cuda % 1000) / 10)));
    info["cuda_kernels"] = cuda != 0;
    info["cuda_archs"] = std::string(TORCH_WSL_CUDA_ARCHS);
    info["cpu_simd"] = torch_wsl::cpu::isa_name(torch_wsl::cpu::active_isa());
    info["cpu_simd_best"] = torch_wsl::cpu::isa_name(torch_wsl::cpu::detected_isa());
    return info;
  });
  // Takes data pointers rather than tensors to keep torch's pybind11 casters
  // (a heavy header) out of this file; torch_wsl's harness passes
  // contiguous float32 CPU tensors' data_ptr().
  m.def(
      "_stream_triad",
      [](uintptr_t a, uintptr_t b, uintptr_t c, double s, int64_t n, bool nontemporal) {
        torch_wsl::cpu::stream_triad(reinterpret_cast<float*>(a), reinterpret_cast<const float*>(b),
                                     reinterpret_cast<const float*>(c), static_cast<float>(s), n, nontemporal);
      },
      py::arg("a"), py::arg("b"), py::arg("c"), py::arg("s"), py::arg("n"), py::arg("nontemporal"),
      "STREAM-like triad a = b + s * c over n floats (the benchmark harness's roofline)");
  m.def("set_cpu_isa", &torch_wsl::cpu::set_cpu_isa, py::arg("name"),
        "Select the CPU kernels' ISA ('default', 'avx2', 'avx512'); returns the previous one.");
  torch_wsl::alloc::init_bindings(m);
}
