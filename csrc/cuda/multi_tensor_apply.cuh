// Multi-tensor apply: one kernel launch covers many tensors. The tensors'
// pointers and lengths travel in the kernel's argument struct, which CUDA
// limits to 4 KiB (32 KiB from CUDA 12.1 on Volta and newer; 4 KiB works on
// every driver WSL2 users run, so that is the budget); a list that does not
// fit is split into as many launches as the budget needs, and only then.
//
// Unlike PyTorch's MultiTensorApply.cuh, the argument struct carries no
// per-block table: block b finds its tensor by a binary search over the
// tensors' first-block indices, so one launch covers every chunk of every
// tensor in it (PyTorch's launches are also bounded by a 320-block table,
// ~21M elements per launch at its chunk size).
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <limits>
#include <vector>

namespace torch_wsl::gpu {

constexpr int kArgBudgetBytes = 4096;
// Room left in the budget for the kernel's other (hyperparameter) arguments.
constexpr int kHyperBytes = 256;
// Elements per block, and threads per block.
constexpr int64_t kChunk = 16384;
constexpr int kThreads = 512;

// Up to kMax tensors, each given by kLists pointers (one per tensor list; a
// list may hold one-element tensors such as step counts) and its length.
template <int kLists>
struct TensorBatch {
  static constexpr int kMax = (kArgBudgetBytes - kHyperBytes - 8) / (8 * kLists + 8 + 4) - 1;
  void* ptr[kLists][kMax];
  int64_t numel[kMax];
  int32_t first_block[kMax + 1];  // tensor t has blocks [first_block[t], first_block[t + 1])
  int32_t count;
};

// The tensor block `b` works on: the last t with first_block[t] <= b.
template <int kLists>
__device__ __forceinline__ int tensor_of_block(const TensorBatch<kLists>& batch, int32_t b) {
  int lo = 0;
  int hi = batch.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (batch.first_block[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

inline int64_t blocks_for(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Packs the tensors into batches and calls launch(batch, blocks, first_global_block)
// once per batch; `first_global_block` numbers blocks across batches (for
// kernels that write one partial result per block).
template <int kLists, typename Launch>
void for_each_batch(const std::vector<std::array<void*, kLists>>& tensors, const std::vector<int64_t>& numels,
                    Launch&& launch) {
  using Batch = TensorBatch<kLists>;
  static_assert(sizeof(Batch) + kHyperBytes <= kArgBudgetBytes, "kernel arguments over the 4 KiB budget");
  Batch batch{};
  int64_t blocks = 0;
  int64_t global = 0;
  auto flush = [&] {
    if (batch.count == 0) return;
    batch.first_block[batch.count] = static_cast<int32_t>(blocks);
    launch(batch, blocks, global);
    global += blocks;
    blocks = 0;
    batch.count = 0;
  };
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t nb = blocks_for(numels[i]);
    if (nb == 0) continue;
    if (batch.count == Batch::kMax || blocks + nb > std::numeric_limits<int32_t>::max()) flush();
    for (int l = 0; l < kLists; ++l) batch.ptr[l][batch.count] = tensors[i][l];
    batch.numel[batch.count] = numels[i];
    batch.first_block[batch.count] = static_cast<int32_t>(blocks);
    ++batch.count;
    blocks += nb;
  }
  flush();
}

}  // namespace torch_wsl::gpu
