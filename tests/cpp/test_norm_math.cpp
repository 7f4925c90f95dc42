// The shared arithmetic (csrc/norm_math.h) that both CPU and CUDA kernels run.
#include <gtest/gtest.h>

#include <cmath>

#include "norm_math.h"

namespace nm = torch_wsl::norm_math;

TEST(NormMath, RowRstdIsInverseStdOfTheMeanSquare) {
  // Row {1, 3}: centered deviations {-1, 1}, sum of squares 2, variance 1.
  EXPECT_FLOAT_EQ(nm::row_rstd(2.0f, 2, 0.0f), 1.0f);
  EXPECT_NEAR(nm::row_rstd(2.0f, 2, 3.0f), 0.5f, 1e-7f);
  EXPECT_DOUBLE_EQ(nm::row_rstd(8.0, 2, 0.0), 0.5);
}

TEST(NormMath, RowRstdClampsRoundingNoiseAndEmptyRows) {
  // A variance made slightly negative by rounding must not give NaN.
  EXPECT_FLOAT_EQ(nm::row_rstd(-1e-9f, 4, 1e-5f), 1.0f / std::sqrt(1e-5f));
  // An empty row has zero variance, not 0/0.
  EXPECT_FLOAT_EQ(nm::row_rstd(0.0f, 0, 0.25f), 2.0f);
}

TEST(NormMath, RowRstdPropagatesNaN) {
  // A row holding Inf or NaN has a NaN variance; it must not become 1/sqrt(eps).
  EXPECT_TRUE(std::isnan(nm::row_rstd(std::nanf(""), 4, 1e-5f)));
  EXPECT_TRUE(std::isnan(nm::row_rstd(std::nan(""), 4, 1e-5)));
}

TEST(NormMath, NormalizeAndAffine) {
  EXPECT_FLOAT_EQ(nm::normalize(5.0f, 3.0f, 0.5f), 1.0f);
  EXPECT_FLOAT_EQ(nm::affine(1.5f, 2.0f, -1.0f), 2.0f);
}

TEST(NormMath, GradInputMatchesTheClosedForm) {
  // dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))
  const double rstd = 2.0, gw = 0.7, xhat = -1.2, mean_gw = 0.1, mean_gw_xhat = 0.3;
  EXPECT_DOUBLE_EQ(nm::grad_input(gw, xhat, rstd, mean_gw, mean_gw_xhat), 2.0 * (0.7 - 0.1 + 1.2 * 0.3));
}

TEST(NormMath, GradInputOfAConstantRowIsZero) {
  // One element: xhat = 0 and gw equals its own mean, so nothing flows back.
  EXPECT_DOUBLE_EQ(nm::grad_input(0.9, 0.0, 316.0, 0.9, 0.0), 0.0);
}

#include "row_split.h"

// The CUDA row kernels' split of a row into scalar head, aligned vector body
// and scalar tail: every element covered once, every body vector aligned.
TEST(RowSplit, CoversTheRowExactlyWithAlignedBody) {
  constexpr int kVec = 8;
  for (int64_t start : {0, 1, 5, 7, 8, 13, 4096, 4099}) {
    for (int64_t cols : {0, 1, 3, 7, 8, 9, 15, 16, 17, 769, 5125}) {
      const auto s = torch_wsl::split_row<kVec>(start, cols);
      ASSERT_LE(0, s.head_end);
      ASSERT_LE(s.head_end, s.body_end);
      ASSERT_LE(s.body_end, cols);
      ASSERT_LT(s.head_end, kVec) << "head longer than one vector";
      ASSERT_EQ((s.body_end - s.head_end) % kVec, 0);
      ASSERT_LT(cols - s.body_end, kVec + (s.head_end == cols ? cols : 0)) << "tail longer than one vector";
      if (s.body_end > s.head_end) {
        ASSERT_EQ((start + s.head_end) % kVec, 0) << "body not aligned";
      }
    }
  }
  const auto scalar = torch_wsl::split_row<1>(3, 10);
  EXPECT_EQ(scalar.head_end, 0);
  EXPECT_EQ(scalar.body_end, 10);
}

// split_row_at: the split from the addresses of one row in every tensor a
// kernel walks together (16-byte vectors: 8 halfs or 4 floats).
namespace {

// Checks the invariants of a split of `cols` elements of ELEM_BYTES at `addrs`:
// head, body and tail partition the row, the body is whole vectors, and every
// body vector is 16-byte aligned in every present tensor.
template <int VEC, int ELEM_BYTES, int N>
void expect_valid_split(const uintptr_t (&addrs)[N], int64_t cols) {
  const torch_wsl::RowSplit s = torch_wsl::split_row_at<VEC, ELEM_BYTES>(addrs, cols);
  ASSERT_LE(0, s.head_end);
  ASSERT_LE(s.head_end, s.body_end);
  ASSERT_LE(s.body_end, cols);
  ASSERT_EQ((s.body_end - s.head_end) % VEC, 0);
  for (int64_t i = s.head_end; i < s.body_end; i += VEC) {
    for (const uintptr_t a : addrs) {
      if (a != 0) {
        ASSERT_EQ((a + static_cast<uintptr_t>(i) * ELEM_BYTES) % (VEC * ELEM_BYTES), 0u) << "column " << i;
      }
    }
  }
  if (s.body_end > s.head_end) {
    ASSERT_LT(s.head_end, VEC) << "head longer than one vector";
    ASSERT_LT(cols - s.body_end, VEC) << "tail longer than one vector";
  }
}

}  // namespace

TEST(RowSplitAt, AlignedPointersHaveNoHead) {
  const uintptr_t addrs[4] = {0x1000, 0x2000, 0, 0x30000};
  const auto s = torch_wsl::split_row_at<8, 2>(addrs, 20);
  EXPECT_EQ(s.head_end, 0);
  EXPECT_EQ(s.body_end, 16);
}

TEST(RowSplitAt, SharedMisalignmentPeelsAScalarHead) {
  // Every pointer 6 bytes past a 16-byte boundary: 5 halfs (10 bytes) reach the next one.
  const uintptr_t halfs[3] = {0x1006, 0x20006, 0x3f6};
  const auto h = torch_wsl::split_row_at<8, 2>(halfs, 100);
  EXPECT_EQ(h.head_end, 5);
  EXPECT_EQ(h.body_end, 5 + 88);
  // Floats 12 bytes past: one float of head.
  const uintptr_t floats[2] = {0x100c, 0x200c};
  const auto f = torch_wsl::split_row_at<4, 4>(floats, 9);
  EXPECT_EQ(f.head_end, 1);
  EXPECT_EQ(f.body_end, 9);
  // Doubles 8 bytes past: one double of head, then pairs.
  const uintptr_t doubles[2] = {0x1008, 0x5008};
  const auto d = torch_wsl::split_row_at<2, 8>(doubles, 6);
  EXPECT_EQ(d.head_end, 1);
  EXPECT_EQ(d.body_end, 5);
}

TEST(RowSplitAt, DifferentMisalignmentsFallBackToScalar) {
  const uintptr_t addrs[4] = {0x1000, 0x2002, 0, 0};
  const auto s = torch_wsl::split_row_at<8, 2>(addrs, 100);
  EXPECT_EQ(s.head_end, 100);
  EXPECT_EQ(s.body_end, 100);
  EXPECT_EQ((torch_wsl::common_misalignment<8, 2>(addrs)), -1);
  // Equal modulo 8 but not modulo 16 is still different.
  const uintptr_t eight[2] = {0x1000, 0x2008};
  EXPECT_EQ((torch_wsl::split_row_at<4, 4>(eight, 64).body_end), 64);
  EXPECT_EQ((torch_wsl::split_row_at<4, 4>(eight, 64).head_end), 64);
}

TEST(RowSplitAt, AddressesOffTheElementGridFallBackToScalar) {
  // A float at an odd address can never be 16-byte aligned at any column.
  const uintptr_t addrs[2] = {0x1001, 0x2001};
  EXPECT_EQ((torch_wsl::common_misalignment<4, 4>(addrs)), -1);
  const auto s = torch_wsl::split_row_at<4, 4>(addrs, 10);
  EXPECT_EQ(s.head_end, 10);
  EXPECT_EQ(s.body_end, 10);
}

TEST(RowSplitAt, RowsShorterThanTheHeadAreAllHead) {
  const uintptr_t addrs[2] = {0x1002, 0x2002};  // 7 halfs of head
  for (int64_t cols = 0; cols <= 7; ++cols) {
    const auto s = torch_wsl::split_row_at<8, 2>(addrs, cols);
    EXPECT_EQ(s.head_end, cols);
    EXPECT_EQ(s.body_end, cols);
  }
  const auto s = torch_wsl::split_row_at<8, 2>(addrs, 8);  // head of 7, one element of tail
  EXPECT_EQ(s.head_end, 7);
  EXPECT_EQ(s.body_end, 7);
  const auto t = torch_wsl::split_row_at<8, 2>(addrs, 15);  // head of 7, one vector
  EXPECT_EQ(t.head_end, 7);
  EXPECT_EQ(t.body_end, 15);
}

TEST(RowSplitAt, EmptyRowsAndNoTensors) {
  const uintptr_t same[2] = {0x1004, 0x2004};
  const uintptr_t diff[2] = {0x1004, 0x2000};
  const uintptr_t none[3] = {0, 0, 0};
  for (const auto& s : {torch_wsl::split_row_at<8, 2>(same, 0), torch_wsl::split_row_at<8, 2>(diff, 0),
                        torch_wsl::split_row_at<8, 2>(none, 0)}) {
    EXPECT_EQ(s.head_end, 0);
    EXPECT_EQ(s.body_end, 0);
  }
  EXPECT_EQ((torch_wsl::common_misalignment<8, 2>(none)), 0);
}

TEST(RowSplitAt, ScalarWidthIsAllBody) {
  const uintptr_t addrs[2] = {0x1001, 0x2002};
  const auto s = torch_wsl::split_row_at<1, 1>(addrs, 10);
  EXPECT_EQ(s.head_end, 0);
  EXPECT_EQ(s.body_end, 10);
}

TEST(RowSplitAt, EveryRowOfAContiguousTensorSplitsValidly) {
  // Rows of `cols` halfs / floats / doubles from bases at every element offset of
  // a 16-byte line (the input a view at a storage offset, the outputs alike or
  // freshly allocated): the invariants hold for each row.
  for (uintptr_t base_mis = 0; base_mis < 16; base_mis += 2) {
    for (int64_t cols : {1, 2, 3, 7, 8, 9, 31, 32, 33, 64, 100, 255, 256, 769}) {
      for (int64_t row = 0; row < 5; ++row) {
        const uintptr_t off = static_cast<uintptr_t>(row * cols);
        const uintptr_t same[4] = {0x10000 + base_mis + off * 2, 0, 0x80000 + base_mis + off * 2,
                                   0x90000 + base_mis + off * 2};
        expect_valid_split<8, 2>(same, cols);
        const uintptr_t mixed[2] = {0x10000 + base_mis + off * 2, 0x80000 + off * 2};
        expect_valid_split<8, 2>(mixed, cols);
        const auto s = torch_wsl::split_row_at<8, 2>(same, cols);
        if (cols >= 16) {
          EXPECT_GT(s.body_end, s.head_end) << "a shared misalignment must vectorize";
        }
        if (base_mis % 4 == 0) {
          const uintptr_t f[2] = {0x10000 + base_mis + off * 4, 0x80000 + base_mis + off * 4};
          expect_valid_split<4, 4>(f, cols);
        }
        if (base_mis % 8 == 0) {
          const uintptr_t d[2] = {0x10000 + base_mis + off * 8, 0x80000 + base_mis + off * 8};
          expect_valid_split<2, 8>(d, cols);
        }
      }
    }
  }
}

TEST(RowSplitAt, AgreesWithSplitRowForAlignedBases) {
  // Bases 16-byte aligned: the address form gives the index form's split.
  for (int64_t start : {0, 1, 5, 7, 8, 13, 4096, 4099}) {
    for (int64_t cols : {0, 1, 3, 7, 8, 9, 15, 16, 17, 769}) {
      const uintptr_t addrs[2] = {0x4000 + static_cast<uintptr_t>(start) * 2, 0x8000 + static_cast<uintptr_t>(start) * 2};
      const auto a = torch_wsl::split_row_at<8, 2>(addrs, cols);
      const auto b = torch_wsl::split_row<8>(start, cols);
      EXPECT_EQ(a.head_end, b.head_end);
      EXPECT_EQ(a.body_end, b.body_end);
    }
  }
}

#include "cuda/norm_launch.h"

namespace nl = torch_wsl::norm_launch;

// The CUDA norm kernels' launch geometry (no GPU needed to check the arithmetic).
TEST(NormLaunch, ShortRowsGetAWarpEachLongRowsABlock) {
  for (const int64_t cols : {0, 1, 31, 64, 128, 256}) {
    const auto g = nl::row_geometry(1000, cols, 8);
    EXPECT_TRUE(g.warp_per_row) << cols;
    EXPECT_EQ(g.threads, nl::kWarpRowThreads);
    EXPECT_EQ(g.blocks, (1000 + nl::kWarpRowsPerBlock - 1) / nl::kWarpRowsPerBlock);
  }
  const auto a = nl::row_geometry(1000, 257, 8);
  EXPECT_FALSE(a.warp_per_row);
  EXPECT_EQ(a.threads, 64);  // 33 vectors: two warps
  EXPECT_EQ(a.blocks, 1000);
  EXPECT_EQ(nl::row_geometry(3, 257, 1).threads, 256);  // scalar: 257 elements, capped at 8 warps
  EXPECT_EQ(nl::row_geometry(3, 4096, 8).threads, nl::kMaxRowThreads);
  // One row, fewer rows than a block's warps, and more rows than the grid cap.
  EXPECT_EQ(nl::row_geometry(1, 64, 8).blocks, 1);
  EXPECT_EQ(nl::row_geometry(7, 64, 8).blocks, 1);
  EXPECT_EQ(nl::row_geometry(9, 64, 8).blocks, 2);
  EXPECT_EQ(nl::row_geometry(int64_t{3} << 31, 64, 8).blocks, nl::kMaxRowBlocks);
  EXPECT_EQ(nl::row_geometry(int64_t{3} << 31, 1024, 8).blocks, nl::kMaxRowBlocks);
  for (const int64_t cols : std::initializer_list<int64_t>{0, 1, 257, 300, 1000, 2048, 5125, 1 << 20}) {
    for (const int vec : {1, 2, 4, 8}) {
      const int t = nl::row_geometry(5, cols, vec).threads;
      EXPECT_EQ(t % 32, 0);
      EXPECT_GE(t, 32);
      EXPECT_LE(t, nl::kMaxRowThreads);
    }
  }
}

TEST(NormLaunch, ParamGradGroupsCoverEveryRowWithoutEmptyGroups) {
  for (const int64_t sms : {1, 30, 132, 170}) {
    for (const int64_t rows : std::initializer_list<int64_t>{1, 2, 63, 64, 65, 100, 1000, 4097, 65536, 1000003, int64_t{5} << 31}) {
      for (const int64_t col_tiles : {1, 2, 3, 4, 128, 1000, 100000}) {
        const auto g = nl::param_grad_groups(rows, col_tiles, sms);
        ASSERT_GE(g.groups, 1);
        ASSERT_LE(g.groups, nl::kMaxGridY);
        ASSERT_GE(g.rows_per_group, 1);
        ASSERT_GE(g.groups * g.rows_per_group, rows) << "rows left uncovered";
        ASSERT_LT((g.groups - 1) * g.rows_per_group, rows) << "an empty last group";
        if (g.groups > 1) {
          ASSERT_GE(g.rows_per_group, nl::kMinGroupRows / 2) << "groups too short";
          // About kParamGradBlocksPerSM blocks per SM, never far above.
          ASSERT_LE(g.groups * col_tiles, nl::kParamGradBlocksPerSM * sms + col_tiles);
        }
      }
    }
  }
  // Few column tiles and many rows: the row groups fill the GPU.
  const auto qk = nl::param_grad_groups(1 << 20, 2, 132);
  EXPECT_EQ(qk.groups, 264);
  // Columns alone fill the GPU: one group, no second stage.
  EXPECT_EQ(nl::param_grad_groups(1 << 20, 1000, 132).groups, 1);
  // Few rows: at least kMinGroupRows each.
  EXPECT_EQ(nl::param_grad_groups(100, 1, 132).groups, 2);
  EXPECT_EQ(nl::param_grad_groups(64, 1, 132).groups, 1);
}

#include <vector>

// for_row, the loop every CUDA row kernel runs per thread: over all members of
// a team (a warp, or a block of whole warps), every element of the row is
// visited exactly once, vector groups only inside the body and at vector
// steps from its start.
TEST(ForRow, TeamCoversTheRowOnceWithVectorsOnlyInTheBody) {
  constexpr int kVec = 8;
  const uintptr_t bases[][2] = {{0x1000, 0x2000}, {0x1006, 0x2006}, {0x100e, 0x200e}, {0x1000, 0x2002}};
  for (const auto& base : bases) {
    for (const int64_t cols : {0, 1, 2, 7, 8, 9, 31, 32, 33, 64, 100, 255, 256, 257, 769, 5125}) {
      for (const int64_t row : {0, 1, 3}) {
        const uintptr_t addrs[2] = {base[0] + static_cast<uintptr_t>(row * cols) * 2,
                                    base[1] + static_cast<uintptr_t>(row * cols) * 2};
        const torch_wsl::RowSplit split = torch_wsl::split_row_at<kVec, 2>(addrs, cols);
        for (const int size : {32, 64, 256}) {
          std::vector<int> seen(static_cast<size_t>(cols), 0);
          for (int rank = 0; rank < size; ++rank) {
            torch_wsl::for_row<kVec>(split, cols, rank, size, [&](auto width, int64_t i) {
              constexpr int W = decltype(width)::value;
              ASSERT_GE(i, 0);
              ASSERT_LE(i + W, cols);
              if (W > 1) {
                ASSERT_GE(i, split.head_end);
                ASSERT_LE(i + W, split.body_end);
                ASSERT_EQ((i - split.head_end) % W, 0);
                ASSERT_EQ((addrs[0] + static_cast<uintptr_t>(i) * 2) % 16, 0u);
              }
              for (int k = 0; k < W; ++k) ++seen[static_cast<size_t>(i + k)];
            });
          }
          for (int64_t i = 0; i < cols; ++i) ASSERT_EQ(seen[static_cast<size_t>(i)], 1) << "cols " << cols << " i " << i;
        }
      }
    }
  }
}
