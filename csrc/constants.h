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

}  // namespace constants
}  // namespace guider_fast
