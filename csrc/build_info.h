// Facts about this build, for torch_wsl.build_info().
#pragma once

namespace torch_wsl {

// CUDA runtime version the CUDA kernels were compiled with (e.g. 13000), or 0
// when the build has no CUDA kernels. Defined in cuda/ when CUDA is built.
int cuda_runtime_version_built();

}  // namespace torch_wsl
