"""Numerical constants that the torch reference and the kernels must share.

A kernel that used a different floor or epsilon than the reference would agree
with it on most inputs and drift on the edge cases the constant exists for, so
both import the value from here.  This module imports nothing.
"""

# Row-wise Adagrad: row -= lr * grad / (sqrt(acc) + ADAGRAD_EPS); it only matters for a
# row whose accumulated squared gradient is still 0.
ADAGRAD_EPS = 1e-10

# GUIDER's calibration shifts the image side before GeomLoss (``v + 1e-8``), so a
# row with t == v still has a strictly positive p=1 cost.
CALIBRATION_IMAGE_OFFSET = 1e-8
# The reference's batch min-max normalisation: (d - min) / (max - min + eps);
# an all-equal batch normalises to 0 instead of 0/0.
CALIBRATION_MINMAX_EPS = 1e-7

# GeomLoss's p=1 cost is sqrt(max(|x|^2 - 2x.y + |y|^2, floor)): the floor keeps its
# gradient finite at coincident points (and is the cost of a point with itself).
GEOMLOSS_SQRT_FLOOR = 1e-8
# GeomLoss writes log(0) as this finite value for zero weights (not -inf).
GEOMLOSS_LOG_ZERO = -100000.0

# exp() of arguments in [-103, -88] gives float32 subnormals, which torch's CPU exp
# computes about 140x slower; the terms clamped here are < 1.9e-35 next to a row
# maximum's exp(0) = 1, far below one ulp of the sum.
EXP_FLOOR = -80.0

# Floor of |x - y| where the reference's sinkhorn (p=1) divides by it or takes the
# gradient of its sqrt: changes no float32/float64 distance that is not already ~0.
DISTANCE_FLOOR = 1e-30

# The tol-based Sinkhorn stopping rule reads the marginal error every CHECK_EVERY
# iterations (one host sync per check on the torch path, a branch in the kernels).
SINKHORN_CHECK_EVERY = 10
