// Launch geometry of the LayerNorm / RMSNorm CUDA kernels (norm_kernels.cu):
// which rows get a warp and which a block, block sizes, grid sizes, and the
// row groups of the weight/bias-gradient reduction. Plain C++ with no CUDA,
// so the arithmetic is tested on CPU (tests/cpp/test_norm_math.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

namespace torch_wsl::norm_launch {

// Threads of a block-per-row block, at most (longer rows loop).
constexpr int kMaxRowThreads = 256;
// Rows of at most this many elements get one warp each, kWarpRowsPerBlock of
// them per block: a 32-thread block per row would leave most of an SM's
// thread slots empty (resident blocks per SM are capped), and a row this
// short is a few vectors per lane.
constexpr int64_t kWarpRowMaxCols = 256;
constexpr int kWarpRowsPerBlock = 8;
constexpr int kWarpRowThreads = kWarpRowsPerBlock * 32;
static_assert(kMaxRowThreads % 32 == 0 && kWarpRowThreads <= kMaxRowThreads, "row blocks are whole warps");
// Row-kernel grids stop growing here; the kernels stride over further rows.
constexpr int64_t kMaxRowBlocks = int64_t{1} << 20;

// Weight/bias gradients: blocks of kTileCols columns x kTileRows thread rows.
constexpr int kTileCols = 32;
constexpr int kTileRows = 8;
// Stage 1 aims at about this many blocks per SM, with groups of at least
// kMinGroupRows rows; gridDim.y allows at most kMaxGridY groups.
constexpr int64_t kParamGradBlocksPerSM = 4;
constexpr int64_t kMinGroupRows = 64;
constexpr int64_t kMaxGridY = 65535;

// Threads per row-block: enough to cover the row once with `vec`-wide
// groups, in whole warps, at least one warp and at most kMaxRowThreads.
inline int row_threads(int64_t cols, int vec) {
  const int64_t vectors = (cols + vec - 1) / vec;
  const int64_t warps = (vectors + 31) / 32;
  const int64_t capped = std::max<int64_t>(1, std::min<int64_t>(warps, kMaxRowThreads / 32));
  return static_cast<int>(capped * 32);
}

struct RowGeometry {
  bool warp_per_row;
  int threads;      // whole warps, at most kMaxRowThreads
  int64_t blocks;   // >= 1 when rows >= 1, at most kMaxRowBlocks
};

// rows >= 1, cols >= 0; `vec` is the vector width the rows can use (1 when
// the tensors' misalignments differ), which sizes block-per-row blocks.
inline RowGeometry row_geometry(int64_t rows, int64_t cols, int vec) {
  RowGeometry g{};
  g.warp_per_row = cols <= kWarpRowMaxCols;
  g.threads = g.warp_per_row ? kWarpRowThreads : row_threads(cols, vec);
  const int64_t rows_per_block = g.warp_per_row ? g.threads / 32 : 1;
  g.blocks = std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, kMaxRowBlocks);
  return g;
}

// Row groups of the weight/bias gradients' first stage: group g sums rows
// [g * rows_per_group, min((g + 1) * rows_per_group, rows)); every group
// holds at least one row and together they cover [0, rows).
struct RowGroups {
  int64_t groups;
  int64_t rows_per_group;
};

// rows >= 1, col_tiles >= 1, sms = the device's SM count. Groups such that
// col_tiles * groups is about kParamGradBlocksPerSM * sms; fewer when rows
// are few (at least kMinGroupRows rows each) and one when the column tiles
// alone fill the GPU.
inline RowGroups param_grad_groups(int64_t rows, int64_t col_tiles, int64_t sms) {
  const int64_t target = kParamGradBlocksPerSM * std::max<int64_t>(sms, 1);
  int64_t groups = (target + col_tiles - 1) / col_tiles;
  groups = std::min(groups, (rows + kMinGroupRows - 1) / kMinGroupRows);
  groups = std::clamp<int64_t>(groups, 1, kMaxGridY);
  const int64_t rows_per_group = (rows + groups - 1) / groups;
  // ceil(rows / rows_per_group) <= groups: no group starts past the last row.
  return {(rows + rows_per_group - 1) / rows_per_group, rows_per_group};
}

}  // namespace torch_wsl::norm_launch
