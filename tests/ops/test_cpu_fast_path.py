"""The CPU C++ extension (backend="cpu", csrc/cpu/sinkhorn_cpu.cpp): what the per-op grid does not
reach.  Both of its soft-min layouts (a transposed copy for rows of <= 128 columns, horizontal
rows beyond), row blocks that are all padding, each problem stopping on its own, the fused
envelope and SamplesLoss backwards, the custom ops' contracts, its argument errors, its
accuracy next to float32's own, and how it is built and found.

The grid of tests/ops/test_sinkhorn.py and test_samples_loss.py runs the same backend
against the float64 oracles through tests/ops/backends.py.
"""

import subprocess
import sys

import pytest
import torch

import guider_fast as gf
from guider_fast import _cpu_build
from guider_fast.reference import samples_loss as ref_samples
from guider_fast.reference import sinkhorn as ref

from .backends import require
from .problems import SinkhornOracle, centred, clouds
from .test_samples_loss import assert_matches_oracle as assert_samples_loss_matches_oracle
from .test_sinkhorn import _solve_with_grads, assert_matches_oracle
from .tolerances import tolerance

F32 = torch.float32


@pytest.fixture
def ops():
    require("sinkhorn", "cpu", "cpu", F32)
    return _cpu_build.ops()


def _pad_tail(w, count):
    """Zero weights on the last ``count`` points of every problem but the first, renormalised."""
    w = w.clone()
    w[1:, -count:] = 0
    return w / w.sum(1, keepdim=True)


# ---------------------------------------------------------------- both layouts vs the oracle

# m <= 128: rows reduced on a transposed copy; m > 128: horizontal rows fused with the column fold.
LAYOUT_SHAPES = [(3, 37, 129, 7), (2, 150, 140, 5), (2, 131, 17, 3), (1, 9, 300, 4)]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_both_layouts_match_the_oracle(gen, ops, shape, p):
    x, y, a, b = clouds(gen, *shape, F32)
    # Whole row blocks (16 rows) of padding, and padded columns, on top of the ragged tails.
    a, b = _pad_tail(a, min(shape[1] - 1, 35)), _pad_tail(b, min(shape[2] - 1, 9))
    res, grads = _solve_with_grads(x, y, a, b, "cpu", eps=0.4, p=p, n_iters=30)
    assert_matches_oracle(res, grads, SinkhornOracle(x, y, a, b, 0.4, p, 30), x, y, a, b, "cpu", F32)


def test_small_eps_far_below_the_cost_scale(gen, ops):
    """eps = 2e-3 of the largest cost: most exp arguments fall below the -80 floor."""
    x, y, a, b = clouds(gen, 2, 40, 150, 3, F32)
    scale = ref.cost_matrix(x.double(), y.double(), 2).amax().item()
    res = gf.sinkhorn(x, y, a, b, eps=2e-3 * scale, n_iters=200, backend="cpu")
    oracle = SinkhornOracle(x, y, a, b, 2e-3 * scale, 2, 200)
    assert bool(torch.isfinite(res.f).all() and torch.isfinite(res.g).all())
    torch.testing.assert_close(res.value.double(), oracle.value, rtol=1e-4, atol=1e-5 * scale)


def test_each_problem_stops_on_its_own(gen, ops):
    """A fast and a slow problem in one batch: each stops at its own first passing check."""
    x, y, a, b = clouds(gen, 2, 12, 9, 3, F32, ragged=False)
    y[1] = y[1] * 4  # the second problem: larger costs at the same eps, slower convergence
    res = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=3000, tol=1e-5, backend="cpu")
    iterations = res._n_iters
    assert isinstance(iterations, torch.Tensor) and iterations.dtype == torch.int32
    assert bool((iterations % 10 == 0).all()) and iterations[0] < iterations[1] < 3000
    assert res.n_iters == int(iterations.max())
    assert bool((res.marginal_error <= 1e-5).all())
    # Each problem equals its own solve with the iteration count it stopped at.
    for k in range(2):
        alone = gf.sinkhorn(x[k:k + 1], y[k:k + 1], a[k:k + 1], b[k:k + 1], eps=0.5,
                            n_iters=int(iterations[k]), backend="cpu")
        torch.testing.assert_close(res.f[k], alone.f[0], rtol=0, atol=0)


def test_threads_do_not_change_the_result(gen, ops):
    x, y, a, b = clouds(gen, 5, 20, 140, 4, F32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gf.sinkhorn(x, y, a, b, eps=0.3, n_iters=20, backend="cpu")
        torch.set_num_threads(2)
        two = gf.sinkhorn(x, y, a, b, eps=0.3, n_iters=20, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one.f, two.f, rtol=0, atol=0)
    torch.testing.assert_close(one.g, two.g, rtol=0, atol=0)


# ------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("m", [20, 1000])
def test_soft_min_is_as_accurate_as_float32_rounding(gen, ops, m):
    """One iteration is one row and one column soft-min: within 4e-7 of the float64 values,
    relative to max(1, |f|), the size of the torch reference's own error here (the
    approximate exp, ~20 ulp, adds nothing visible next to the cost's rounding)."""
    x, y, a, b = clouds(gen, 4, 60, m, 8, F32)
    cost32 = ref.cost_matrix(x, y, 2)
    for eps in (0.05, 1.0, 20.0):
        f, g, _, _ = ops.sinkhorn(cost32, a, b, eps, 1, None)
        oracle = SinkhornOracle(x, y, a, b, eps, 2, 1)
        torch_f = ref.solve_detached(cost32, a, b, eps, 1).f
        scale = max(1.0, oracle.f.abs().max().item())
        err = (f.double() - oracle.f).abs().max().item() / scale
        err_torch = (torch_f.double() - oracle.f).abs().max().item() / scale
        assert err <= max(4e-7, 2 * err_torch), (eps, err, err_torch)


def test_gradients_match_the_torch_path_including_coincident_points(gen, ops):
    """p=1 with points that coincide (zero cost, no gradient contribution) and per-problem scales."""
    x, y, a, b = clouds(gen, 3, 10, 140, 4, F32)
    y[:, :3] = x[:, :3]
    for p in (1, 2):
        got = _solve_with_grads(x, y, a, b, "cpu", eps=0.4, p=p, n_iters=50)[1]
        want = _solve_with_grads(x, y, a, b, "torch", eps=0.4, p=p, n_iters=50)[1]
        tol = tolerance("sinkhorn", "cpu", F32)
        for g_cpu, g_torch in zip(got[:2], want[:2]):
            assert (g_cpu - g_torch).abs().max() <= tol.grad * g_torch.abs().max()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias", [True, False])
def test_samples_loss_with_wide_rows(gen, ops, p, debias):
    """n, m > 128: the horizontal layout for C(x, y) and the self-costs."""
    x, y, a, b = clouds(gen, 1, 140, 150, 4, F32)
    assert_samples_loss_matches_oracle(dict(p=p, blur=0.1, scaling=0.5, debias=debias), a, x, b, y, "cpu", F32)


# --------------------------------------------------------------------- the custom ops


def test_custom_ops_pass_opcheck(gen, ops):
    x, y, a, b = clouds(gen, 2, 5, 7, 3, F32)
    cost = ref.cost_matrix(x, y, 2)
    torch.library.opcheck(ops.sinkhorn.default, (cost, a, b, 0.3, 20, None))
    torch.library.opcheck(ops.sinkhorn.default, (cost, a, b, 0.3, 50, 1e-5))
    state = ref.solve_detached(cost, a, b, 0.3, 20)
    scale = torch.tensor([1.0, -0.5])
    torch.library.opcheck(ops.plan_weights_.default, (cost.clone(), a, b, state.f, state.g, 0.3, 2, scale))
    torch.library.opcheck(ops.plan_weights_.default,
                          (ref.cost_matrix(x, y, 1), a, b, state.f, state.g, 0.3, 1, scale))
    h = torch.randn(2, 7, generator=gen)
    torch.library.opcheck(ops.softmax_weights_.default, (cost.clone(), h, torch.rand(2, 5, generator=gen), 0.3, 2))
    c_xy, c_xx, c_yy = (ref_samples.geomloss_cost(u, v, 2) for u, v in ((x, y), (x, x), (y, y)))
    logs = ref_samples.geomloss_log_weights(a), ref_samples.geomloss_log_weights(b)
    torch.library.opcheck(ops.samples_loss.default, (c_xy, c_xx, c_yy, a, b, *logs, [2.0, 1.0, 0.25]))
    torch.library.opcheck(ops.samples_loss.default, (c_xy, None, None, a, b, *logs, [0.5]))


def test_argument_errors_name_the_op_and_the_argument(gen, ops):
    x, y, a, b = clouds(gen, 2, 5, 7, 3, F32)
    cost = ref.cost_matrix(x, y, 2)
    with pytest.raises(RuntimeError, match=r"guider_fast_cpu::sinkhorn: argument 'cost' must be float32"):
        ops.sinkhorn(cost.double(), a, b, 0.3, 5, None)
    with pytest.raises(RuntimeError, match=r"argument 'a' must have shape \[2, 5\]"):
        ops.sinkhorn(cost, b, b, 0.3, 5, None)
    with pytest.raises(RuntimeError, match="argument 'eps' must be positive"):
        ops.sinkhorn(cost, a, b, -1.0, 5, None)
    with pytest.raises(RuntimeError, match="argument 'n_iters' must be >= 1"):
        ops.sinkhorn(cost, a, b, 0.3, 0, None)
    with pytest.raises(RuntimeError, match="argument 'p' must be 1 or 2"):
        ops.plan_weights_(cost, a, b, a, b, 0.3, 3, torch.ones(2))
    with pytest.raises(RuntimeError, match="'c_xx' and 'c_yy' must both be given"):
        ops.samples_loss(cost, cost, None, a, b, a, b, [1.0])
    with pytest.raises(RuntimeError, match="'eps_list' must not be empty"):
        ops.samples_loss(cost, None, None, a, b, a, b, [])
    # The public entry point refuses what the extension does not compute, naming the reason.
    with pytest.raises(RuntimeError, match="takes float16, bfloat16, float32 inputs, got float64"):
        gf.sinkhorn(x.double(), y.double(), eps=0.3, backend="cpu")
    with pytest.raises(RuntimeError, match="grad='autodiff'"):
        gf.sinkhorn(x, y, eps=0.3, grad="autodiff", backend="cpu")


# ------------------------------------------------------------------------ build and load


def test_library_is_named_after_an_instruction_set_this_cpu_runs():
    assert _cpu_build.build_isa() in _cpu_build.usable_isas()
    assert _cpu_build.usable_isas()[-1] == "default"
    for isa in _cpu_build.ISAS:
        assert _cpu_build.module_name(isa) == f"guider_fast._cpu_{isa}"
        assert f"-DCPU_CAPABILITY={isa.upper()}" in _cpu_build.compile_flags(isa)
    assert _cpu_build.sources() and all(p.suffix == ".cpp" for p in _cpu_build.sources())


def test_status_and_hiding(ops):
    assert _cpu_build.status().startswith("loaded (")
    _cpu_build.hide()
    try:
        assert "hidden" in _cpu_build.reason()
        assert gf.sinkhorn(torch.randn(2, 3, 2), torch.randn(2, 4, 2), eps=0.5).n_iters == 100  # torch path
        with pytest.raises(RuntimeError, match="backend='cpu' cannot run sinkhorn: the CPU extension is hidden"):
            gf.sinkhorn(torch.randn(2, 3, 2), torch.randn(2, 4, 2), eps=0.5, backend="cpu")
    finally:
        _cpu_build.hide(False)
    assert _cpu_build.reason() is None


def test_import_loads_nothing_and_a_missing_build_says_how_to_get_one(tmp_path):
    """Importing guider_fast neither loads nor builds the extension; without a build, backend="cpu"
    raises with the way to build it and auto runs the torch path."""
    code = ("import sys, torch, guider_fast as gf\n"
            "from guider_fast import _cpu_build\n"
            "assert _cpu_build.loaded() is None\n"
            "assert not hasattr(torch.ops.guider_fast_cpu, 'sinkhorn')\n"
            "_cpu_build.installed = lambda: None  # as on a machine where setup.py did not build it\n"
            "x, y = torch.randn(2, 5, 3), torch.randn(2, 4, 3)\n"
            "assert gf.sinkhorn(x, y, eps=0.5).value.shape == (2,)\n"
            "try:\n"
            "    gf.sinkhorn(x, y, eps=0.5, backend='cpu')\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "GUIDER_FAST_CPU_JIT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "backend='cpu' cannot run sinkhorn: the CPU extension is not built" in out.stdout
    assert "--no-build-isolation" in out.stdout and "GUIDER_FAST_CPU_JIT=1" in out.stdout
