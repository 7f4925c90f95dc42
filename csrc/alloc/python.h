// Entry point of the allocator's pybind11 bindings (csrc/alloc/bindings.cpp),
// called from the module definition in csrc/bindings.cpp.
#pragma once

namespace pybind11 {
class module_;
}

namespace torch_wsl::alloc {
void init_bindings(pybind11::module_& m);
}
