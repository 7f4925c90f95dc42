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
