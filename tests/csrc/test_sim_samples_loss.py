"""csrc/samples_loss.cu (through the sim, via ctypes) against guider_fast.reference.samples_loss.

The kernel runs GeomLoss's annealed, debiased loop and its last extrapolation (the Triton
twin kernels/sinkhorn.py::samples_loss_potentials) in float32, costs from direct
differences; the reference runs in float64 on the same float32 inputs and the same
float32-rounded schedule (the kernel's eps values), so the comparison measures the
kernel's float32 rounding alone.  Tolerance, with u = 2^-24 and per problem
scale = C_max + max |potential|:

* a cost entry is a sum of d FMAs plus the halving / sqrt: ~sqrt(d + 2) u C_max of
  rounding (random signs), i.e. that over eps in the exponent h_j - C_ij / eps; the fma
  forming the exponent and h = log w + f / eps add ~u |f| / eps, the chains' sums ~u; one
  soft-min multiplies exponent errors by eps, so one step adds ~u sqrt(d + 2) scale to
  every potential;
* the soft-min is 1-Lipschitz in the sup norm and the averaged update keeps that, so the
  n_eps + 2 steps (init, schedule, extrapolation) add their errors; they random-walk:
  bound = POTENTIAL_ULPS u scale sqrt((d + 2)(n_eps + 2)).  Across this file's cases the
  largest error is under a quarter of it (printed with -s), and a one-step change of the
  schedule moves the potentials by > 100x the bound (test_tolerance_separates_schedules).
* the value sum a (f_new - f_aa_new) + sum b (g_new - g_bb_new) (weights summing to 1):
  4 x bound.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import pytest
import torch

from guider_fast.reference import samples_loss as ref

ORDERS = {"forward": 0, "reverse": 1, "random": 2}
U = 2.0 ** -24
POTENTIAL_ULPS = 4
BUDGET = 227 * 1024  # kSamplesLossSharedBudget
KERNEL = Path(__file__).resolve().parents[2] / "csrc" / "samples_loss.cu"

_P, _I64, _I32, _STR = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_char_p
SIGNATURES = {  # samples_loss_capi.cpp's entry points (and sim_capi.cpp's order switch)
    "gf_sim_set_order": [_I32, ctypes.c_ulonglong],
    "gf_sim_samples_loss": [_P] * 5 + [_I64] * 5 + [_I32, _I32, _P, _STR, _I32],
    "gf_sim_samples_loss_planned": [_P] * 5 + [_I64] * 5 + [_I32, _I32, _P, _P, _STR, _I32],
    "gf_sim_samples_loss_plan": [_I64] * 3 + [_I32, _I64, _P],
}
WORST = []  # (error / bound, case) of every reference comparison, reported at the end


def open_library(path):
    """The ctypes handle of samples_loss_capi.cpp's library, its signatures set."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    lib.gf_sim_samples_loss_plan.restype = ctypes.c_longlong
    return lib


@pytest.fixture(scope="module")
def lib(samples_loss_library):
    lib = open_library(samples_loss_library)
    yield lib
    lib.gf_sim_set_order(0, 0)
    if WORST:
        ratio, case = max(WORST)
        print(f"\nsamples_loss: largest error / bound {ratio:.3f} ({case}), {len(WORST)} comparisons")


def _check(status, error):
    assert status == 0, f"status {status}: {error.value.decode()}"


def packed_floats(n, m, debias):
    return 2 * (n + m) * (2 if debias else 1)


def sim_run(lib, x, y, a, b, eps_list, p, debias, plan=None, order="forward", seed=0):
    """The (B, 2 or 4 (n + m)) packed potentials from the sim (default plan, or plan =
    (rows_xy, rows_xx, rows_yy, stage_points))."""
    lib.gf_sim_set_order(ORDERS[order], seed)
    batch, n, d = x.shape
    m = y.shape[1]
    eps = torch.tensor(eps_list, dtype=torch.float32)
    out = torch.full((batch, packed_floats(n, m, debias)), float("nan"))
    error = ctypes.create_string_buffer(2048)
    args = [x.data_ptr(), y.data_ptr(), a.data_ptr(), b.data_ptr(), eps.data_ptr(), len(eps_list), batch, n, m, d,
            p, int(debias)]
    if plan is None:
        status = lib.gf_sim_samples_loss(*args, out.data_ptr(), error, len(error))
    else:
        chosen = torch.tensor(plan, dtype=torch.int64)
        status = lib.gf_sim_samples_loss_planned(*args, chosen.data_ptr(), out.data_ptr(), error, len(error))
    _check(status, error)
    return out


def default_plan(lib, n, m, d, debias, budget=BUDGET):
    """(plan, its shared bytes) from samples_loss_plan / samples_loss_shared_bytes."""
    plan = torch.zeros(4, dtype=torch.int64)
    nbytes = lib.gf_sim_samples_loss_plan(n, m, d, int(debias), budget, plan.data_ptr())
    return tuple(plan.tolist()), nbytes


def problems(batch, n, m, d, seed, ragged=True):
    """Float32 (x, y, a, b) off the origin; ragged: trailing zero weights of random length
    (at least one point left) and an interior zero in every other problem."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=gen) + 3.0
    y = 0.8 * torch.randn(batch, m, d, generator=gen) + 3.5
    a = torch.rand(batch, n, generator=gen) + 0.1
    b = torch.rand(batch, m, generator=gen) + 0.1
    if ragged:
        for i in range(batch):
            a[i, n - int(torch.randint(0, n, (1,), generator=gen)):] = 0.0
            b[i, m - int(torch.randint(0, m, (1,), generator=gen)):] = 0.0
            if n > 2 and i % 2:
                a[i, 1] = 0.0
    return x, y, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


def schedule32(x, y, p, blur, scaling):
    """GeomLoss's eps list for these clouds, rounded to the float32 the kernel reads."""
    return torch.tensor(ref.schedule(x, y, p, blur, scaling), dtype=torch.float32).tolist()


def reference(x, y, a, b, eps_list, p, debias):
    """The packed layout in float64 from the reference's own loop and extrapolation soft-min."""
    x, y, a, b = (t.double() for t in (x, y, a, b))
    f_ba, g_ab, f_aa, g_bb = ref.annealed_potentials(a, x, b, y, p, eps_list, debias)
    eps = eps_list[-1]
    a_log, b_log = ref.geomloss_log_weights(a), ref.geomloss_log_weights(b)
    soft = ref.ExtrapolatedSoftmin.apply
    parts = [f_ba, g_ab, soft(x, y, b_log + g_ab / eps, eps, p), soft(y, x, a_log + f_ba / eps, eps, p)]
    if debias:
        parts += [f_aa, g_bb, soft(x, x, a_log + f_aa / eps, eps, p), soft(y, y, b_log + g_bb / eps, eps, p)]
    return torch.cat(parts, 1)


def bound(x, y, p, eps_list, expected):
    """(B, 1) tolerance of every packed potential (module docstring)."""
    cost_max = ref.geomloss_cost(x.double(), y.double(), p).amax(dim=(1, 2))
    scale = cost_max + expected.abs().amax(1)
    steps = len(eps_list) + 2
    return (POTENTIAL_ULPS * U * scale * math.sqrt((x.shape[2] + 2) * steps))[:, None]


def assert_matches_reference(x, y, p, eps_list, packed, expected, case):
    tol = bound(x, y, p, eps_list, expected)
    ratio = float(((packed.double() - expected).abs() / tol).max())
    WORST.append((ratio, case))
    assert ratio <= 1.0, f"{case}: error / bound {ratio:.3f}"


def same_bits(u, v):
    return torch.equal(u.view(torch.int32), v.view(torch.int32))


# (batch, n, m, d, blur, scaling): odd and non-power-of-two sizes, n != m, one point on a
# side, the 256 limits (n = m = 256 takes the default plan's partial cache and staged
# points; d = 120 there leaves the points in global memory), wide points.
SIZES = [
    (2, 37, 200, 5, 0.05, 0.5),
    (1, 256, 1, 3, 0.5, 0.8),
    (2, 1, 97, 4, 0.01, 0.7),
    (3, 13, 7, 64, 0.05, 0.5),
    (2, 1, 1, 3, 0.05, 0.5),
    (1, 256, 256, 5, 0.05, 0.5),
]


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("batch, n, m, d, blur, scaling", SIZES)
def test_matches_reference(lib, batch, n, m, d, blur, scaling, p, debias):
    x, y, a, b = problems(batch, n, m, d, seed=7 * n + m + d + p)
    eps_list = schedule32(x, y, p, blur, scaling)
    packed = sim_run(lib, x, y, a, b, eps_list, p, debias)
    assert_matches_reference(x, y, p, eps_list, packed, reference(x, y, a, b, eps_list, p, debias),
                             f"B={batch} n={n} m={m} d={d} p={p} debias={debias} blur={blur} scaling={scaling}")


@pytest.mark.parametrize("p", [1, 2])
def test_points_beyond_shared_memory(lib, p):
    # n = m = 256 and d = 120: the points (242 KiB at stride 121) do not fit next to the
    # buffers, so the default plan caches 218 rows of C(x, y) and recomputes every other
    # entry from global memory.
    x, y, a, b = problems(1, 256, 256, 120, seed=40 + p)
    plan, nbytes = default_plan(lib, 256, 256, 120, True)
    assert plan[3] == 0 and 0 < plan[0] < 256 and plan[1:3] == (0, 0) and nbytes <= BUDGET
    eps_list = schedule32(x, y, p, 0.1, 0.5)
    packed = sim_run(lib, x, y, a, b, eps_list, p, True)
    assert_matches_reference(x, y, p, eps_list, packed, reference(x, y, a, b, eps_list, p, True),
                             f"n=m=256 d=120 p={p} (points in global memory)")


def test_value_through_the_packed_layout_consumer(lib):
    # guider_fast.ot's _TritonSamplesLossValue turns the packed potentials into GeomLoss's
    # value: fed with the kernel's output, it gives the float64 divergence.
    from guider_fast.ot import _TritonSamplesLossValue

    x, y, a, b = problems(3, 37, 50, 6, seed=12)
    for p, debias in ((2, True), (1, True), (2, False)):
        eps_list = schedule32(x, y, p, 0.05, 0.5)
        packed = sim_run(lib, x, y, a, b, eps_list, p, debias)
        with torch.no_grad():
            value = _TritonSamplesLossValue.apply(a, x, b, y, packed, eps_list[-1], p, debias)
        xd, yd, ad, bd = (t.double() for t in (x, y, a, b))
        potentials = ref.annealed_potentials(ad, xd, bd, yd, p, eps_list, debias)
        expected = ref.extrapolated_divergence(ad, xd, bd, yd, p, eps_list[-1], potentials)
        tol = 4 * bound(x, y, p, eps_list, reference(x, y, a, b, eps_list, p, debias))[:, 0]
        assert torch.all((value.double() - expected).abs() <= tol), (value, expected, tol)


def test_zero_weights_are_geomloss_log_zero(lib):
    # A cloud whose weights are all 0 (problem 1's y) makes GeomLoss's log weights the
    # finite LOG_ZERO everywhere: f = eps 1e5 + ..., finite.  With -inf it would be +inf.
    x, y, a, b = problems(2, 13, 9, 4, seed=3)
    b[1] = 0.0
    eps_list = schedule32(x, y, 2, 0.5, 0.5)
    packed = sim_run(lib, x, y, a, b, eps_list, 2, True)
    expected = reference(x, y, a, b, eps_list, 2, True)
    assert torch.isfinite(packed).all() and float(packed[1, :13].min()) > 1e4 * eps_list[-1]
    assert_matches_reference(x, y, 2, eps_list, packed, expected, "all-zero y weights")


@pytest.mark.parametrize("p", [1, 2])
def test_every_plan_gives_the_same_bits(lib, p):
    # Cached rows, staged or global points only change where an entry comes from, never its
    # bits; odd row counts also split a soft-min's 4-entry groups between cache and recompute.
    n, m, d = 37, 50, 6
    x, y, a, b = problems(2, n, m, d, seed=20 + p)
    eps_list = schedule32(x, y, p, 0.05, 0.5)
    base = sim_run(lib, x, y, a, b, eps_list, p, True)
    assert default_plan(lib, n, m, d, True)[0] == (n, n, m, 0)
    for plan in [(0, 0, 0, 1), (0, 0, 0, 0), (5, 3, 49, 1), (33, 36, 1, 0), (n, 0, m, 1), (1, n, 0, 0)]:
        assert same_bits(sim_run(lib, x, y, a, b, eps_list, p, True, plan), base), plan
    no_debias = sim_run(lib, x, y, a, b, eps_list, p, False)
    assert same_bits(no_debias, base[:, :2 * (n + m)])  # debiasing leaves the xy potentials alone
    for plan in [(0, 0, 0, 1), (17, 0, 0, 0)]:
        assert same_bits(sim_run(lib, x, y, a, b, eps_list, p, False, plan), no_debias), plan


@pytest.mark.parametrize("plan", [None, (9, 20, 3, 1)])
def test_identical_across_thread_orders(lib, plan):
    # 64 threads for n = 37, m = 50: idle threads in the last warp, rows and columns of
    # different lengths; the mixed plan stages points and fills part of every tile.
    x, y, a, b = problems(3, 37, 50, 6, seed=8)
    eps_list = schedule32(x, y, 2, 0.05, 0.5)
    runs = [sim_run(lib, x, y, a, b, eps_list, 2, True, plan, order, seed)
            for order, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))]
    for other in runs[1:]:
        assert same_bits(other, runs[0])


def test_default_plans(lib):
    # Everything fits: all tiles cached, points not staged.
    assert default_plan(lib, 64, 64, 64, True) == ((64, 64, 64, 0), 4 * (2 * 256 + 64 * 65 + 2 * 64 * 64))
    # The largest clouds cached whole at 227 KiB: n = m = 137 debiased, 239 without.
    assert default_plan(lib, 137, 137, 4, True)[0] == (137, 137, 137, 0)
    assert default_plan(lib, 138, 138, 4, True)[0][3] == 1
    assert default_plan(lib, 239, 239, 4, False)[0] == (239, 0, 0, 0)
    assert default_plan(lib, 240, 240, 4, False)[0][3] == 1
    # Points at n = m = 256 fit up to d = 109 (stride 109, next to the 8 KiB of buffers).
    assert default_plan(lib, 256, 256, 109, True)[0][3] == 1
    assert default_plan(lib, 256, 256, 110, True)[0][3] == 0
    # Debiased 256 x 256: points staged (stride 5), the rest to C(x, y) rows first.
    plan, nbytes = default_plan(lib, 256, 256, 5, True)
    assert plan == (208, 0, 0, 1) and nbytes == 4 * (2 * 1024 + 512 * 5 + 208 * 257) and nbytes <= BUDGET
    # An even d is padded to d + 1 in the staging; a small budget leaves only the buffers.
    assert default_plan(lib, 256, 256, 8, True)[1] <= BUDGET
    assert default_plan(lib, 256, 256, 8, True, budget=4 * 2048)[0] == (0, 0, 0, 0)
    assert default_plan(lib, 128, 100, 4, True, budget=48 * 1024)[1] <= 48 * 1024


def test_tolerance_separates_schedules():
    # The bound is tight enough to see semantics: dropping the schedule's last step (or
    # stopping the extrapolation one eps early) moves the float64 potentials far past it.
    x, y, a, b = problems(2, 37, 50, 6, seed=30)
    eps_list = schedule32(x, y, 2, 0.05, 0.5)
    expected = reference(x, y, a, b, eps_list, 2, True)
    shorter = reference(x, y, a, b, eps_list[:-1], 2, True)
    assert float(((shorter - expected).abs() / bound(x, y, 2, eps_list, expected)).max()) > 100


@pytest.mark.parametrize("p, debias", [(2, True), (1, False)])
def test_matches_the_triton_twin(lib, p, debias):
    # The Triton kernel (its interpreter, on CPU) computes the same packed layout in
    # float32 from the expanded cost |x|^2 - 2 x.y + |y|^2, whose rounding is
    # ~u (|x|^2 + |y|^2) per entry: the two agree within that plus the kernel's bound.
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET=1 runs the twin on CPU)")
    from guider_fast.kernels import sinkhorn as twin

    x, y, a, b = problems(2, 37, 20, 5, seed=50 + p)
    eps_list = schedule32(x, y, p, 0.05, 0.5)
    packed = sim_run(lib, x, y, a, b, eps_list, p, debias)
    theirs = twin.samples_loss_potentials(x, y, a, b, eps_list, p, debias)
    assert theirs.shape == packed.shape
    expected = reference(x, y, a, b, eps_list, p, debias)
    norms = (x.double() ** 2).sum(2).amax(1) + (y.double() ** 2).sum(2).amax(1)
    expanded = (POTENTIAL_ULPS * U * norms * math.sqrt(len(eps_list) + 2))[:, None]
    tol = bound(x, y, p, eps_list, expected) + expanded
    assert torch.all((theirs.double() - packed.double()).abs() <= tol), ((theirs - packed).abs() / tol).max()


def test_invalid_arguments_launch_nothing(lib):
    x, y, a, b = problems(2, 7, 9, 3, seed=0)
    eps = torch.tensor([4.0, 1.0, 0.25])
    out = torch.full((2, packed_floats(7, 9, True)), float("nan"))
    error = ctypes.create_string_buffer(256)

    def call(batch=2, n=7, m=9, d=3, p=2, n_eps=3, debias=1, plan=None, out_ptr=out.data_ptr()):
        args = [x.data_ptr(), y.data_ptr(), a.data_ptr(), b.data_ptr(), eps.data_ptr(), n_eps, batch, n, m, d, p,
                debias]
        if plan is None:
            return lib.gf_sim_samples_loss(*args, out_ptr, error, len(error))
        chosen = torch.tensor(plan, dtype=torch.int64)
        return lib.gf_sim_samples_loss_planned(*args, chosen.data_ptr(), out_ptr, error, len(error))

    bad = [dict(batch=0), dict(batch=1 << 31), dict(n=0), dict(n=257), dict(m=0), dict(m=257), dict(d=0),
           dict(d=1 << 31), dict(p=0), dict(p=3), dict(n_eps=0), dict(n_eps=1 << 31), dict(out_ptr=None),
           dict(plan=(8, 0, 0, 0)), dict(plan=(7, 8, 0, 0)), dict(plan=(7, 0, 10, 0)), dict(plan=(-1, 0, 0, 0)),
           dict(plan=(7, 7, 9, 0), debias=0), dict(d=30000, plan=(0, 0, 0, 1))]  # staged points: 7 MiB
    for kwargs in bad:
        assert call(**kwargs) == 1, kwargs  # cudaErrorInvalidValue
    assert torch.isnan(out).all()
    assert call() == 0 and torch.isfinite(out).all()  # the same arguments, valid
    plan = torch.zeros(4, dtype=torch.int64)
    assert lib.gf_sim_samples_loss_plan(0, 9, 3, 1, BUDGET, plan.data_ptr()) == -1
