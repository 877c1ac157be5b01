// Numerical constants shared with the torch reference.
//
// Every value here MUST equal the constant of the same name in
// guider_fast/_constants.py: tests/csrc/test_constants.py parses both files
// and fails on a missing or different value.  The kernels compute in float32
// and use them as float32 (as the reference does for float32 tensors).
#pragma once

namespace guider_fast {
namespace constants {

// GUIDER's calibration shifts the image side before GeomLoss (v + 1e-8).
constexpr double CALIBRATION_IMAGE_OFFSET = 1e-8;
// Batch min-max normalisation: (d - min) / (max - min + eps).
constexpr double CALIBRATION_MINMAX_EPS = 1e-7;
// GeomLoss's p=1 cost is sqrt(max(|x|^2 - 2x.y + |y|^2, floor)).
constexpr double GEOMLOSS_SQRT_FLOOR = 1e-8;
// GeomLoss writes log(0) (a zero weight) as this finite value.
constexpr double GEOMLOSS_LOG_ZERO = -100000.0;

// Sinkhorn (csrc/sinkhorn.cu): the tol test reads the row-marginal error every
// SINKHORN_CHECK_EVERY iterations; the envelope backward clamps log P_ij at
// EXP_FLOOR and divides by max(|x - y|, DISTANCE_FLOOR) for p=1.
constexpr double SINKHORN_CHECK_EVERY = 10;
constexpr double EXP_FLOOR = -80.0;
constexpr double DISTANCE_FLOOR = 1e-30;

// Row-wise Adagrad (csrc/dbpr_step.cu): row -= lr * grad / (sqrt(acc) + ADAGRAD_EPS).
constexpr double ADAGRAD_EPS = 1e-10;

}  // namespace constants
}  // namespace guider_fast
