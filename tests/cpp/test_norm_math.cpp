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
      if (s.body_end > s.head_end) ASSERT_EQ((start + s.head_end) % kVec, 0) << "body not aligned";
    }
  }
  const auto scalar = torch_wsl::split_row<1>(3, 10);
  EXPECT_EQ(scalar.head_end, 0);
  EXPECT_EQ(scalar.body_end, 10);
}
