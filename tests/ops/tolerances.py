"""The op tests' one tolerance table: family -> (backend, dtype) -> tolerances, each with its reason.

Every comparison is against a float64 oracle evaluated on the inputs as the op
sees them (half inputs already rounded), so a tolerance only has to cover the
op's own arithmetic: float32 compute (half inputs are computed in float32) or
float64, and the final rounding of its outputs to the input dtype.  Unit
roundoff u = eps/2: float32 6e-8, float16 4.9e-4, bfloat16 3.9e-3.  Measured
worst cases (4 seeds x every shape of the tests) are quoted to show the margin.

Keys: ``(backend, dtype)``.  ``"kernel"`` is the entry of every backend with
fused float32 kernels that has no entry of its own (triton, cuda, and cpu, the CPU
C++ extension): they accumulate in float32 in another order than torch.  The cpu
backend's exp is ATen's Vectorized<float>::exp_u20 (within ~20 ulp, 1.2e-6 relative);
measured against the float64 oracles it stays at the torch path's error (Sinkhorn
potentials 4e-7, value 1.4e-7; tests/ops/test_cpu_fast_path.py), inside these rows.
``tolerance(family, backend, dtype)`` does that lookup.
"""

from types import SimpleNamespace as T

import torch

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
EPS32 = torch.finfo(torch.float32).eps


def ulp(dtype):
    """One unit in the last place, relative (eps): one rounding may land on either neighbour."""
    return torch.finfo(dtype).eps


def compute_eps(dtype):
    """eps of the dtype the ops compute in: float64 for float64 inputs, float32 otherwise."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


# Sinkhorn, fixed iterations, against a float64 log-domain loop (problems.SinkhornOracle).
# value: relative; potentials: atol relative to max(1, |f|, |g|), compared centred;
# grad: max error relative to the largest point gradient; marginal error: see
# ``marginal_error_tolerance``.
_SINKHORN_F32 = T(
    # 40 float32 log-sum-exp half-steps; Sinkhorn contracts, so the rounding does
    # not accumulate: measured 1.7e-7 (value), 3.8e-7 (potentials).
    value=2e-6, potentials=2e-6,
    # The plan exp((f + g - C)/eps) turns the potentials' absolute rounding into a
    # relative one divided by eps (0.4): measured 6.6e-6 (torch), 1.8e-5 (triton).
    grad=1e-4)
_SINKHORN = {
    # float64 throughout: only summation order differs from the oracle (measured 2e-14).
    ("torch", F64): T(value=1e-12, potentials=1e-12, grad=1e-12),
    ("torch", F32): _SINKHORN_F32,
    ("kernel", F32): _SINKHORN_F32,
    # float16 outputs (value, f, g, point gradients) are rounded once: 2u = 9.8e-4
    # (measured 4.2e-4) on top of the float32 solve.
    ("torch", F16): T(value=1e-3, potentials=1e-3, grad=1e-3),
    ("kernel", F16): T(value=1e-3, potentials=1e-3, grad=1e-3),
    # bfloat16 outputs rounded once: 2u = 7.8e-3 (measured 3.6e-3).
    ("torch", BF16): T(value=8e-3, potentials=8e-3, grad=8e-3),
    ("kernel", BF16): T(value=8e-3, potentials=8e-3, grad=8e-3),
}


def marginal_error_tolerance(dtype, n, m):
    """(rtol, atol) for ``SinkhornResult.marginal_error``.

    The marginal error sum_i |a_i - sum_j P_ij| is a cancellation quantity
    (about 1e-5 after 40 iterations, 0 at convergence): its rounding error does
    not scale with its value but with the computation that cancels.  Each of
    the n row sums adds m terms, and the last f update a log-sum-exp over m
    terms, each within a few ulps of the compute dtype: absolute, 4 (n + m)
    eps (measured at most 0.12 of it in float32).  The result is returned in
    the input dtype: one rounding, ``ulp(dtype)`` relative (bfloat16: measured
    1.2e-5 absolute on a 3e-3 error, one bfloat16 rounding; the 1e-6 absolute
    this replaces failed there at 1.07e-6).
    """
    return ulp(dtype) if dtype in (F16, BF16) else 0.0, 4 * (n + m) * compute_eps(dtype)


# SamplesLoss against the torch reference in float64 (itself pinned to GeomLoss in
# test_samples_loss.py::test_reference_matches_geomloss).  value: relative
# (plus ``self_cost_residue`` for p=1 debiased); grad: max error relative to the
# largest gradient of each input.
_SAMPLES_F32 = T(
    # A fixed schedule of float32 log-sum-exp passes: measured 1.6e-7.
    value=2e-6,
    # The last extrapolation runs at eps = blur^p (2.5e-3 for p=2, blur=0.05):
    # float32 cost rounding divided by eps, measured 8.1e-4 (torch), 4.2e-4 (triton)
    # of the largest gradient; GeomLoss in float32 is as far off (its own 1e-3).
    grad=2e-3)
_SAMPLES = {
    ("torch", F32): _SAMPLES_F32,
    ("kernel", F32): _SAMPLES_F32,
    # One float16 rounding of the outputs (2u = 9.8e-4, measured 4.8e-4) on top
    # of the float32 gradient error above.
    ("torch", F16): T(value=1e-3, grad=2e-3),
    ("kernel", F16): T(value=1e-3, grad=2e-3),
    # One bfloat16 rounding of the outputs: 2u = 7.8e-3 (measured 3.8e-3).
    ("torch", BF16): T(value=8e-3, grad=8e-3),
    ("kernel", BF16): T(value=8e-3, grad=8e-3),
}


def self_cost_residue(x, y):
    """Absolute error of GeomLoss's p=1 self-costs C(x_i, x_i) = sqrt(max(|x|^2 - 2x.x + |x|^2, 1e-8))
    in float32: the expanded form leaves up to a few ulps of |x|^2 of residue, and
    sqrt(r) of it survives (sqrt(s + r) - sqrt(s) <= sqrt(r)); GeomLoss has the same."""
    sq = max(x.detach().double().pow(2).sum(-1).max().item(), y.detach().double().pow(2).sum(-1).max().item())
    return 2.0 * (4 * sq * EPS32) ** 0.5


# dbpr_loss against the float64 formula.  assert_close(rtol, atol * max(1, |want|)).
_DBPR_F32 = T(
    # The loss is one float32 reduction over B terms; the gradients are float32
    # sums of up to B contributions per row: measured 3.5e-7 (loss), 1.6e-7 (grads).
    rtol=1e-5, atol=1e-6)
_DBPR = {
    # float64 throughout (measured 8e-16).
    ("torch", F64): T(rtol=1e-10, atol=1e-12),
    ("torch", F32): _DBPR_F32,
    ("kernel", F32): _DBPR_F32,
    # Loss and gradients are rounded once to float16 (2u = 9.8e-4); the float32
    # math under it is negligible (measured 8.4e-4 relative element-wise).
    ("torch", F16): T(rtol=1e-3, atol=5e-4),
    ("kernel", F16): T(rtol=1e-3, atol=5e-4),
    # Rounded once to bfloat16 (2u = 7.8e-3; measured 6.6e-3).
    ("torch", BF16): T(rtol=8e-3, atol=4e-3),
    ("kernel", BF16): T(rtol=8e-3, atol=4e-3),
}

# dbpr_step, each step against one exact float64 step from the same stored tables
# (problems.step_oracle).  Tables: |got - want| <= ulp(storage) |want| + update *
# max|want - before| (one rounding on write-back, which may land on either
# neighbour; the Triton interpreter truncates there, also within one ulp), plus
# the float32 math relative to the update's size.  loss: relative; margins: absolute.
_STEP_F32 = T(
    # float32 gradient sums of up to B = 37 contributions: measured 2.9e-7 of the
    # largest update (Adagrad), 1.4e-7 (loss), 5.9e-7 (margins, D = 19 products).
    loss=2e-6, margins=4e-6, update=4e-6,
    # float32 accumulators (by design, as FBGEMM's): measured 1e-6 relative.
    accumulators=1e-5)
_STEP = {
    # float64 math, but the Adagrad accumulators stay float32: the step size
    # carries their eps32 (measured 4.4e-8 of the update; SGD 5e-16).
    ("torch", F64): T(loss=1e-12, margins=1e-12, update=1e-6, accumulators=1e-5),
    ("torch", F32): _STEP_F32,
    ("kernel", F32): _STEP_F32,
    # Half tables are read exactly into float32: the float32 entry, plus the ulp
    # of the write-back (measured: nothing beyond that ulp).
    ("torch", F16): _STEP_F32,
    ("kernel", F16): _STEP_F32,
    ("torch", BF16): _STEP_F32,
    ("kernel", BF16): _STEP_F32,
}

# calibrate against the float64 AMSC formula (problems.calibration_oracle).
_CALIBRATION_F32 = T(
    # "euclidean": |t - v| in float32, relative (measured ~1e-7).
    euclidean=1e-5,
    # Weights ((s_t + 1)/2 + (s_v + 1)/2)/2 from exact integer counts: a few float32
    # roundings of values <= 1.
    weights=4 * EPS32)
_CALIBRATION = {
    ("torch", F64): T(euclidean=1e-12, weights=1e-15),
    ("torch", F32): _CALIBRATION_F32,
    ("kernel", F32): _CALIBRATION_F32,
    # Half inputs are computed in float32 and the outputs are float32.
    ("torch", F16): _CALIBRATION_F32,
    ("kernel", F16): _CALIBRATION_F32,
    ("torch", BF16): _CALIBRATION_F32,
    ("kernel", BF16): _CALIBRATION_F32,
}


def cancellation_tolerance(t, v):
    """Absolute error of GeomLoss's "geomloss" distance in float32.

    Its expanded cost |t|^2 - 2 t.v + |v|^2 leaves up to a few ulps of |x|^2 of
    residue, and under the sqrt that is sqrt(residue): 4 sqrt(eps32 |x|^2) + 1e-5.
    (The Triton kernel takes C(t, t) = sqrt(1e-8) exactly, the float64 oracle too;
    the torch reference keeps GeomLoss's residue.)  float64 inputs: the same with eps64.
    """
    eps = compute_eps(t.dtype)
    norms = torch.maximum(t.double().pow(2).sum(-1), v.double().pow(2).sum(-1)).max().item()
    return 4.0 * (norms * eps) ** 0.5 + (1e-5 if t.dtype != torch.float64 else 1e-12)


TOLERANCES = {"sinkhorn": _SINKHORN, "samples_loss": _SAMPLES, "dbpr": _DBPR, "dbpr_step": _STEP,
              "calibrate": _CALIBRATION}


def tolerance(family, backend, dtype):
    """The entry for (backend, dtype), else the shared ``"kernel"`` entry for a kernel backend."""
    table = TOLERANCES[family]
    if (backend, dtype) in table:
        return table[(backend, dtype)]
    if backend != "torch" and ("kernel", dtype) in table:
        return table[("kernel", dtype)]
    raise KeyError(f"no {family} tolerance for backend={backend!r}, dtype={dtype}: add one to "
                   f"tests/ops/tolerances.py with its reason")
