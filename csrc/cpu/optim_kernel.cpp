#include "cpu/optim_kernel.h"

#include <c10/util/Exception.h>


namespace torch_wsl::cpu {
namespace {

// Elements per chunk: 128 KiB of float32 per stream. Large enough that the
// per-chunk bookkeeping vanishes, small enough that two threads split even a
// 10M-parameter model into ~100 pieces each.
constexpr int64_t kChunkElems = int64_t{1} << 15;

template <typename T>
std::vector<int64_t> numels_of(const std::vector<T>& tensors) {
  std::vector<int64_t> n;
  n.reserve(tensors.size());
  for (const T& t : tensors) n.push_back(t.numel);
  return n;
}

}  // namespace

std::vector<TensorChunk> multi_tensor_chunks(const std::vector<int64_t>& numels, int64_t chunk) {
  TORCH_CHECK(chunk > 0 && chunk % 64 == 0, "torch_wsl: chunk length must be a positive multiple of 64, got ", chunk);
  std::vector<TensorChunk> chunks;
  int64_t total = 0;
  for (const int64_t n : numels) total += (n + chunk - 1) / chunk;
  chunks.reserve(static_cast<size_t>(total));
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t b = 0; b < numels[i]; b += chunk) {
      chunks.push_back({static_cast<int64_t>(i), b, std::min(numels[i], b + chunk)});
    }
  }
  return chunks;
}

void adam_step(const AdamArgs& args) {
  const auto chunks = multi_tensor_chunks(numels_of(args.tensors), kChunkElems);
  if (chunks.empty()) return;
  optim_kernels().adam_step(args, chunks);
}

void sgd_step(const SgdArgs& args) {
  const auto chunks = multi_tensor_chunks(numels_of(args.tensors), kChunkElems);
  if (chunks.empty()) return;
  optim_kernels().sgd_step(args, chunks);
}

double total_norm(const NormArgs& args) {
  namespace om = torch_wsl::optim_math;
  const auto ord = static_cast<om::NormOrder>(args.norm_order);
  const auto chunks = multi_tensor_chunks(numels_of(args.tensors), kChunkElems);
  std::vector<double> partials(chunks.size(), 0.0);
  if (!chunks.empty()) {
    optim_kernels().norm_partials(args, chunks, partials.data());
  }
  // Combined in chunk order: the result does not depend on the thread count.
  double acc = 0.0;
  for (const double p : partials) acc = om::norm_combine(acc, p, ord);
  return om::norm_finish(acc, ord);
}

void scale_(const std::vector<ScaleTensor>& tensors, double coef) {
  const auto chunks = multi_tensor_chunks(numels_of(tensors), kChunkElems);
  if (chunks.empty()) return;
  optim_kernels().scale_(tensors, coef, chunks);
}

}  // namespace torch_wsl::cpu
