// Types shared by the CUDA kernels: the accumulation type of a storage dtype
// and an aligned pack of N elements for vector loads and stores.
#pragma once

namespace torch_wsl::gpu {

// float for float/half/bfloat16, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// N elements moved as one aligned access (16 bytes for the vector widths used).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

}  // namespace torch_wsl::gpu
