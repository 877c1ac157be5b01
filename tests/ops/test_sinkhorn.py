"""guider_fast.sinkhorn: the reference against POT and GeomLoss, every backend against a float64 oracle.

Layout: oracle checks of the torch reference (POT, GeomLoss, duality, float64
gradchecks); then the backend x device tests against ``problems.SinkhornOracle``;
then what only the kernel backends have (custom ops, torch.compile, regimes).
"""

import numpy as np
import pytest
import torch

import guider_fast as gf
from guider_fast.ot import sinkhorn_regime
from guider_fast.reference import sinkhorn as ref

from conftest import RTOL, assert_close, ragged_lengths, random_weights

from .properties import given, st
from .backends import KERNEL_BACKENDS, dtypes_for, require
from .problems import SinkhornOracle, centred, clouds
from .tolerances import marginal_error_tolerance, tolerance

CHECK_EVERY = 10  # documented: tol is checked every 10 iterations
CUDA_ONLY = pytest.mark.cuda_only
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _problem_key(x, y):
    return (x.shape[-2], y.shape[-2], x.shape[-1])


def _pot():
    """POT, the oracle of the reference (not installed on the GPU machine: skipped there)."""
    return pytest.importorskip("ot")


def _pot_cost(x, y, p):
    sq = _pot().dist(x, y, metric="sqeuclidean")
    return sq / 2 if p == 2 else np.sqrt(np.maximum(sq, 0))


# ------------------------------------------------------------ the reference vs POT / GeomLoss


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_reference_matches_pot_sinkhorn2(gen, p, eps):
    ot = _pot()
    x, y, a, b = clouds(gen, 5, 9, 13, 5, torch.float64)
    res = gf.sinkhorn(x, y, a, b, eps=eps, p=p, n_iters=5000, tol=1e-11, backend="torch")
    for k in range(x.shape[0]):
        rows, cols = a[k] > 0, b[k] > 0
        xs, ys = x[k][rows].numpy(), y[k][cols].numpy()
        cost = _pot_cost(xs, ys, p)
        value_pot, log = ot.sinkhorn2(a[k][rows].numpy(), b[k][cols].numpy(), cost, eps,
                                      method="sinkhorn_log", numItermax=20000, stopThr=1e-13, log=True)
        np.testing.assert_allclose(res.value_linear[k].item(), value_pot, rtol=1e-4)
        # POT: P = exp(log_u + log_v - C/eps) with log_u = log a + f/eps.
        f_pot = eps * (log["log_u"] - np.log(a[k][rows].numpy()))
        g_pot = eps * (log["log_v"] - np.log(b[k][cols].numpy()))
        f_ours, g_ours = res.f[k][rows].numpy(), res.g[k][cols].numpy()
        shift = (f_ours - f_pot).mean()
        np.testing.assert_allclose(f_ours - shift, f_pot, atol=1e-6 * max(1.0, np.abs(f_pot).max()))
        np.testing.assert_allclose(g_ours + shift, g_pot, atol=1e-6 * max(1.0, np.abs(g_pot).max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_fixed_iterations_equal_pot_batch_solver(gen, dtype):
    """Uniform weights: the very iterates of ot.batch.solve_sample_batch (same update order).

    (POT starts from log-scalings v = 0, we from g = 0, i.e. v = log b: the two
    coincide for uniform weights; with other weights only the limits agree.)
    """
    ot = _pot()
    x, y, _, _ = clouds(gen, 6, 7, 13, 5, dtype)
    eps = 0.2
    res = gf.sinkhorn(x, y, eps=eps, n_iters=30, backend="torch")
    # POT's sqeuclidean cost is |x-y|^2 = 2 C, so reg = 2 eps solves the same problem.
    pot = ot.batch.solve_sample_batch(x, y, reg=2 * eps, metric="sqeuclidean",
                                      max_iter=30, tol=0.0, method="log_sinkhorn", grad="detach")
    assert_close(res.value_linear, pot.value_linear / 2, dtype)
    assert_close(res.plan(), pot.plan, dtype, scale=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_ragged_batch_converges_to_pot_batch_solver(gen, dtype):
    ot = _pot()
    x, y, a, b = clouds(gen, 6, 7, 13, 5, dtype)
    eps = 0.2
    res = gf.sinkhorn(x, y, a, b, eps=eps, n_iters=3000, tol=1e-7, backend="torch")
    pot = ot.batch.solve_sample_batch(x, y, reg=2 * eps, a=a, b=b, metric="sqeuclidean",
                                      max_iter=3000, tol=1e-9, method="log_sinkhorn", grad="detach")
    torch.testing.assert_close(res.value_linear, pot.value_linear / 2, rtol=1e-4, atol=0)


@pytest.mark.parametrize("p", [1, 2])
def test_reference_value_matches_geomloss_entropic_ot_at_fixed_eps(gen, p):
    """GeomLoss's OT_eps (debias=False) run at one fixed eps converges to our ``value``."""
    pytest.importorskip("geomloss")
    from geomloss._legacy.sinkhorn_divergence import log_weights, sinkhorn_loop
    from geomloss._legacy.sinkhorn_samples import cost_routines, softmin_tensorized

    x, y, a, b = clouds(gen, 4, 8, 11, 3, torch.float64)
    eps = 0.3
    cost = cost_routines[p]
    _, _, g_ab, f_ba = sinkhorn_loop(softmin_tensorized, log_weights(a), log_weights(b), None, None,
                                     cost(x, y), cost(y, x), [eps] * 2000, None, debias=False)
    value_geomloss = (a * f_ba).sum(1) + (b * g_ab).sum(1)
    ours = gf.sinkhorn(x, y, a, b, eps=eps, p=p, n_iters=2000, tol=1e-12, backend="torch")
    torch.testing.assert_close(ours.value, value_geomloss, rtol=1e-6, atol=1e-8)


def test_reference_converged_plan_has_the_marginals(gen):
    x, y, a, b = clouds(gen, 4, 11, 6, 5, torch.float64)
    res = gf.sinkhorn(x, y, a, b, eps=0.1, n_iters=5000, tol=1e-10, backend="torch")
    assert res.n_iters < 5000 and res.n_iters % CHECK_EVERY == 0
    assert bool((res.marginal_error <= 1e-10).all())
    plan = res.plan()
    assert plan.shape == (4, 11, 6)
    torch.testing.assert_close(plan.sum(2), a, atol=1e-9, rtol=0)
    torch.testing.assert_close(plan.sum(1), b, atol=1e-9, rtol=0)
    # Padding carries exactly no mass.
    assert bool((plan[a == 0] == 0).all()) and bool((plan.transpose(1, 2)[b == 0] == 0).all())
    # <P, C> from the plan equals value_linear.
    cost = ref.cost_matrix(x, y, 2)
    torch.testing.assert_close((plan * cost).sum((1, 2)), res.value_linear, rtol=1e-10, atol=0)


@given(batch=st.integers(1, 4), n=st.integers(1, 9), m=st.integers(1, 9), d=st.integers(1, 6),
       p=st.sampled_from([1, 2]), eps=st.floats(0.05, 2.0), seed=st.integers(0, 2**31 - 1))
def test_property_reference_converged_plan_is_optimal(batch, n, m, d, p, eps, seed):
    """Converged: the plan has the marginals and the dual value equals the primal one."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, m, d, generator=gen, dtype=torch.float64)
    a = random_weights(batch, n, ragged_lengths(batch, n, gen), gen)
    b = random_weights(batch, m, ragged_lengths(batch, m, gen), gen)
    res = gf.sinkhorn(x, y, a, b, eps=eps, p=p, n_iters=20000, tol=1e-11, backend="torch")
    plan = res.plan()
    torch.testing.assert_close(plan.sum(2), a, atol=1e-9, rtol=0)
    torch.testing.assert_close(plan.sum(1), b, atol=1e-8, rtol=0)
    torch.testing.assert_close(res.value, (a * res.f).sum(1) + (b * res.g).sum(1))
    # At the optimum the dual value is the primal one: <P, C> + eps * KL(P | a x b).
    outer = a.unsqueeze(2) * b.unsqueeze(1)
    kl = torch.where(plan > 0, plan * (plan / outer.clamp_min(1e-300)).log(), torch.zeros_like(plan))
    torch.testing.assert_close(res.value, res.value_linear + eps * kl.sum((1, 2)), rtol=1e-7, atol=1e-8)


# ------------------------------------------------------------------- gradients of the reference


@pytest.mark.parametrize("p", [1, 2])
def test_envelope_gradients_match_autodiff_at_convergence(gen, p):
    x, y, a, b = clouds(gen, 3, 6, 5, 3, torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, y, a, b)]
    env = gf.sinkhorn(*inputs, eps=0.3, p=p, n_iters=3000, tol=1e-12, grad="envelope")
    grads_env = torch.autograd.grad(env.value.sum(), inputs)
    inputs2 = [t.clone().requires_grad_() for t in (x, y, a, b)]
    auto = gf.sinkhorn(*inputs2, eps=0.3, p=p, n_iters=400, grad="autodiff")
    grads_auto = torch.autograd.grad(auto.value.sum(), inputs2)
    torch.testing.assert_close(env.value, auto.value.detach(), rtol=1e-8, atol=1e-10)
    for g_env, g_auto in zip(grads_env[:2], grads_auto[:2]):
        torch.testing.assert_close(g_env, g_auto, rtol=1e-6, atol=1e-8)
    # Weights live on the simplex: their gradients agree up to a constant per problem.
    for g_env, g_auto, w in zip(grads_env[2:], grads_auto[2:], (a, b)):
        assert (centred(g_env, w) - centred(g_auto, w)).abs().max() < 1e-6


def test_tol_with_autodiff(gen):
    x, y, a, b = clouds(gen, 2, 6, 7, 3, torch.float64)
    x.requires_grad_()
    res = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=1000, tol=1e-9, grad="autodiff")
    assert res.n_iters < 1000 and bool((res.marginal_error <= 1e-9).all())
    (grad,) = torch.autograd.grad(res.value.sum(), x)
    env = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=1000, tol=1e-12)
    (grad_env,) = torch.autograd.grad(env.value.sum(), x)
    torch.testing.assert_close(grad, grad_env, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p", [1, 2])
def test_gradcheck_envelope_float64(gen, p):
    x = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def value(x, y):
        return gf.sinkhorn(x, y, eps=0.5, p=p, n_iters=5000, tol=1e-14).value

    assert torch.autograd.gradcheck(value, (x, y), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_autodiff_float64(gen):
    x = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y: gf.sinkhorn(x, y, eps=0.4, n_iters=20, grad="autodiff").value, (x, y))


def test_envelope_backward_in_row_blocks_equals_one_block(gen, monkeypatch):
    x, y, a, b = clouds(gen, 3, 23, 9, 4, torch.float64)
    x.requires_grad_()
    y.requires_grad_()
    res = gf.sinkhorn(x, y, a, b, eps=0.3, n_iters=50, backend="torch")
    whole = torch.autograd.grad(res.value.sum(), (x, y))
    monkeypatch.setattr(ref, "ENVELOPE_BLOCK_ELEMENTS", 3 * 9 * 5)  # blocks of 5 rows
    res = gf.sinkhorn(x, y, a, b, eps=0.3, n_iters=50, backend="torch")
    blocked = torch.autograd.grad(res.value.sum(), (x, y))
    for g_blocked, g_whole in zip(blocked, whole):
        torch.testing.assert_close(g_blocked, g_whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n,m", [(7, 13), pytest.param(33, 1100, marks=CUDA_ONLY),
                                 pytest.param(1500, 9, marks=CUDA_ONLY)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_softmin_matches_logsumexp(gen, device, dtype, n, m):
    """The fused log-softmax soft-min equals -eps*logsumexp, with -inf (padding) entries present."""
    cost = (torch.rand(4, n, m, generator=gen, dtype=torch.float64) * 3).to(device, dtype)
    h = torch.randn(4, m, generator=gen, dtype=torch.float64).to(device, dtype)
    h[:, -4:] = float("-inf")
    work = torch.empty_like(cost)
    for eps in (1.0, 0.01):
        got = ref.softmin_(cost, h, eps, work, dim=2)
        want = -eps * torch.logsumexp(h.double()[:, None, :] - cost.double() / eps, 2)
        torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=RTOL[dtype] * 3)
        h_rows = torch.randn(4, n, generator=gen, dtype=torch.float64).to(device, dtype)
        got = ref.softmin_(cost, h_rows, eps, work, dim=1)
        want = -eps * torch.logsumexp(h_rows.double()[:, :, None] - cost.double() / eps, 1)
        torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=RTOL[dtype] * 3)


# --------------------------------------------------------------- every backend vs the oracle


def _solve_with_grads(x, y, a, b, backend, **kwargs):
    inputs = [t.clone().requires_grad_() for t in (x, y, a, b)]
    res = gf.sinkhorn(*inputs, backend=backend, **kwargs)
    return res, torch.autograd.grad(res.value.sum(), inputs)


def assert_matches_oracle(res, grads, oracle, x, y, a, b, backend, dtype):
    tol = tolerance("sinkhorn", backend, dtype)
    n, m = x.shape[-2], y.shape[-2]
    assert res.value.dtype == dtype and res.f.dtype == dtype and res.value.device == x.device
    torch.testing.assert_close(res.value.double().cpu(), oracle.value, rtol=tol.value,
                               atol=tol.value * max(1.0, oracle.value.abs().max().item()))
    scale = max(1.0, oracle.f.abs().max().item(), oracle.g.abs().max().item())
    torch.testing.assert_close(centred(res.f, a), centred(oracle.f, a), rtol=0, atol=tol.potentials * scale)
    torch.testing.assert_close(centred(res.g, b), centred(oracle.g, b), rtol=0, atol=tol.potentials * scale)
    rtol, atol = marginal_error_tolerance(dtype, n, m)
    torch.testing.assert_close(res.marginal_error.double().cpu(), oracle.marginal_error, rtol=rtol, atol=atol)
    grad_scale = max(oracle.grad_x.abs().max().item(), oracle.grad_y.abs().max().item(), 1e-12)
    for got, want, name in ((grads[0], oracle.grad_x, "grad x"), (grads[1], oracle.grad_y, "grad y")):
        assert got.dtype == dtype
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= tol.grad * grad_scale, f"{name}: {err:.2e} of {grad_scale:.2e} (tol {tol.grad:.0e})"
    # Weight gradients are the potentials (defined up to a constant per problem).
    for got, want, w in ((grads[2], oracle.f, a), (grads[3], oracle.g, b)):
        torch.testing.assert_close(centred(got, w), centred(want, w), rtol=0, atol=tol.potentials * scale)


SHAPES = [(3, 7, 13, 5), (2, 1, 9, 70), (2, 17, 1, 3), (1, 33, 20, 16),
          # GPU sizes: every regime (on chip up to 256 points, streamed, precomputed cost).
          pytest.param((8, 1, 1, 16), marks=CUDA_ONLY), pytest.param((64, 7, 13, 5), marks=CUDA_ONLY),
          pytest.param((16, 64, 64, 64), marks=CUDA_ONLY), pytest.param((4, 256, 200, 64), marks=CUDA_ONLY),
          pytest.param((1, 1000, 700, 64), marks=CUDA_ONLY), pytest.param((1, 300, 300, 1000), marks=CUDA_ONLY)]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fixed_iterations_match_oracle(gen, backend, device, shape, dtype, p):
    """Value, potentials, marginal error and all four gradients after 40 iterations."""
    x, y, a, b = clouds(gen, *shape, dtype, device)
    require("sinkhorn", backend, device, dtype, _problem_key(x, y))
    res, grads = _solve_with_grads(x, y, a, b, backend, eps=0.4, p=p, n_iters=40)
    assert res.n_iters == 40
    assert_matches_oracle(res, grads, SinkhornOracle(x, y, a, b, 0.4, p, 40), x, y, a, b, backend, dtype)


@given(data=st.data(), batch=st.integers(1, 3), n=st.integers(1, 12), m=st.integers(1, 12),
       d=st.integers(1, 9), p=st.sampled_from([1, 2]), eps=st.floats(0.2, 2.0),
       n_iters=st.integers(1, 12), ragged=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_matches_oracle(backend, device, data, batch, n, m, d, p, eps, n_iters, ragged, seed):
    require("sinkhorn", backend, device)
    dtype = data.draw(st.sampled_from(dtypes_for("sinkhorn", backend, device)), label="dtype")
    x, y, a, b = clouds(torch.Generator().manual_seed(seed), batch, n, m, d, dtype, device, ragged)
    res, grads = _solve_with_grads(x, y, a, b, backend, eps=eps, p=p, n_iters=n_iters)
    assert_matches_oracle(res, grads, SinkhornOracle(x, y, a, b, eps, p, n_iters), x, y, a, b, backend, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_are_solved_in_float32(gen, backend, device, dtype):
    """Half inputs are rounded once, then solved in float32: equal to float32 on the rounded points."""
    x, y, a, b = clouds(gen, 3, 8, 5, 4, dtype, device)
    require("sinkhorn", backend, device, dtype)
    res = gf.sinkhorn(x, y, a, b, eps=0.3, n_iters=200, backend=backend)
    want = gf.sinkhorn(x.float(), y.float(), a, b, eps=0.3, n_iters=200, backend=backend)
    assert res.value.dtype == dtype and res.f.dtype == dtype
    # Only the final rounding of the outputs to the half dtype differs.
    torch.testing.assert_close(res.value, want.value.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(res.f, want.f.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("p", [1, 2])
def test_tol_stops_each_problem_and_reports_its_error(gen, backend, device, p):
    x, y, a, b = clouds(gen, 4, 9, 6, 3, torch.float32, device)
    require("sinkhorn", backend, device, torch.float32)
    fixed = gf.sinkhorn(x, y, a, b, eps=1.0, p=p, n_iters=300, backend=backend)
    early = gf.sinkhorn(x, y, a, b, eps=1.0, p=p, n_iters=300, tol=1e-5, backend=backend)
    assert fixed.n_iters == 300
    assert 0 < early.n_iters < 300 and early.n_iters % CHECK_EVERY == 0
    assert bool((early.marginal_error <= 1e-5).all())
    torch.testing.assert_close(early.value, fixed.value, rtol=1e-4, atol=1e-5)


def test_offset_clouds_keep_float32_accuracy(gen, backend, device):
    """Costs are centred per problem before the expanded |x|^2 - 2x.y + |y|^2 form."""
    x, y, a, b = clouds(gen, 2, 9, 7, 16, torch.float64)
    require("sinkhorn", backend, device, torch.float32)
    offset = 300.0
    res32 = gf.sinkhorn(*((t + offset).float().to(device) for t in (x, y)), a.float().to(device),
                        b.float().to(device), eps=0.5, n_iters=100, backend=backend)
    oracle = SinkhornOracle(x, y, a, b, 0.5, 2, 100)
    torch.testing.assert_close(res32.value.double().cpu(), oracle.value, rtol=1e-4, atol=0)


def test_small_eps_stays_finite_and_accurate(gen, backend, device):
    """eps = 1e-3 of the cost scale: log-domain updates must neither overflow nor underflow."""
    x, y, a, b = clouds(gen, 3, 10, 10, 3, torch.float32, device)
    require("sinkhorn", backend, device, torch.float32)
    scale = ref.cost_matrix(x.double(), y.double(), 2).amax().item()
    res32 = gf.sinkhorn(x, y, a, b, eps=1e-3 * scale, n_iters=300, backend=backend)
    oracle = SinkhornOracle(x, y, a, b, 1e-3 * scale, 2, 300)
    assert bool(torch.isfinite(res32.f).all() and torch.isfinite(res32.g).all())
    torch.testing.assert_close(res32.value.double().cpu(), oracle.value, rtol=1e-4, atol=1e-5 * scale)


def test_unbatched_and_strided_inputs(gen, backend, device):
    x = torch.randn(11, 4, generator=gen).to(device)
    y = torch.randn(4, 8, generator=gen).to(device).t()  # non-contiguous (8, 4)
    require("sinkhorn", backend, device, x.dtype)
    res = gf.sinkhorn(x, y, eps=0.3, n_iters=50, backend=backend)
    batched = gf.sinkhorn(x[None], y.contiguous()[None], eps=0.3, n_iters=50, backend=backend)
    assert res.value.shape == () and res.f.shape == (11,) and res.plan().shape == (11, 8)
    torch.testing.assert_close(res.value, batched.value[0])
    ones = torch.full((1, 11), 1 / 11, dtype=torch.float64), torch.full((1, 8), 1 / 8, dtype=torch.float64)
    oracle = SinkhornOracle(x[None], y[None], *ones, 0.3, 2, 50)
    torch.testing.assert_close(res.value.double().cpu(), oracle.value[0], rtol=2e-6, atol=2e-6)


def test_detach_and_grad_mode_untouched(gen, backend, device):
    x = torch.randn(2, 5, 3, generator=gen).to(device).requires_grad_()
    y = torch.randn(2, 6, 3, generator=gen).to(device)
    require("sinkhorn", backend, device, x.dtype)
    res = gf.sinkhorn(x, y, eps=0.3, grad="detach", backend=backend)
    assert not res.value.requires_grad
    assert torch.is_grad_enabled()
    with torch.no_grad():
        gf.sinkhorn(x, y, eps=0.3, backend=backend)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert gf.sinkhorn(x, y, eps=0.3, backend=backend).value.requires_grad
    assert not gf.sinkhorn(x, y, eps=0.3, backend=backend).value_linear.requires_grad


def test_large_clouds_beyond_the_on_chip_size(gen, backend, device):
    """300 x 270 points: the Triton backend streams cost tiles (n, m > 256)."""
    x, y, a, b = clouds(gen, 1, 300, 270, 6, torch.float32, device, ragged=False)
    require("sinkhorn", backend, device, x.dtype, _problem_key(x, y))
    res, grads = _solve_with_grads(x, y, a, b, backend, eps=0.5, n_iters=4)
    assert res.n_iters == 4
    assert_matches_oracle(res, grads, SinkhornOracle(x, y, a, b, 0.5, 2, 4), x, y, a, b, backend,
                          torch.float32)


def test_wide_points_and_precomputed_cost(gen, backend, device):
    """d = 300 (> 256: the reference's backward) and 260 x 270 x 600 (d > 512: one cost product)."""
    for shape, eps, n_iters in (((2, 7, 9, 300), 30.0, 20), ((1, 260, 270, 600), 50.0, 5)):
        x, y, a, b = clouds(gen, *shape, torch.float32, device)
        require("sinkhorn", backend, device, x.dtype, _problem_key(x, y))
        res, grads = _solve_with_grads(x, y, a, b, backend, eps=eps, n_iters=n_iters)
        assert_matches_oracle(res, grads, SinkhornOracle(x, y, a, b, eps, 2, n_iters), x, y, a, b,
                              backend, torch.float32)


# ------------------------------------------------------------------ kernel backends only


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_n_iters_is_read_lazily(gen, backend, device):
    x, y, a, b = clouds(gen, 3, 6, 5, 2, torch.float32, device)
    require("sinkhorn", backend, device, x.dtype)
    res = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=500, tol=1e-5, backend=backend)
    assert isinstance(res._n_iters, torch.Tensor)  # no sync until asked
    assert isinstance(res.n_iters, int) and 0 < res.n_iters < 500


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_traces_without_graph_breaks(gen, backend, device):
    """fullgraph=True fails on any graph break; value checks (a host read) are off, as in production."""
    x, y, _, _ = clouds(gen, 2, 5, 6, 3, torch.float32, device)
    require("sinkhorn", backend, device, x.dtype)
    x.requires_grad_()

    def loss(x, y):
        return gf.sinkhorn(x, y, eps=0.3, n_iters=20, backend=backend).value.sum()

    gf.set_checks(False)
    try:
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        (grad_compiled,) = torch.autograd.grad(compiled(x, y), x)
        (grad_eager,) = torch.autograd.grad(loss(x, y), x)
    finally:
        gf.set_checks(None)
    torch.testing.assert_close(grad_compiled, grad_eager)


def test_triton_custom_ops_pass_opcheck(gen, device):
    require("sinkhorn", "triton", device, torch.float32)
    x, y, a, b = clouds(gen, 2, 5, 7, 3, torch.float32, device)
    onchip = torch.ops.guider_fast.sinkhorn_onchip.default
    torch.library.opcheck(onchip, (x, y, a, b, 0.3, 2, 20, None))
    torch.library.opcheck(onchip, (x, y, a, b, 0.3, 1, 50, 1e-5))
    x, y, a, b = clouds(gen, 2, 9, 11, 3, torch.float32, device)
    torch.library.opcheck(torch.ops.guider_fast.sinkhorn_streamed.default,
                          (x, y, a, b, 0.4, 2, 5, None, 16, 16))
    state = ref.solve_detached(ref.cost_matrix(x, y, 2), a, b, 0.4, 20)
    scale = torch.tensor([1.0, 0.5], device=device)
    envelope = torch.ops.guider_fast.sinkhorn_envelope_grad.default
    torch.library.opcheck(envelope, (x, y, a, b, state.f, state.g, 0.4, 2, scale))
    # A transposed (non-contiguous) y: the fake's layout must match the kernel's output.
    y_strided = y.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(envelope, (x, y_strided, a, b, state.f, state.g, 0.4, 2, scale))


@pytest.mark.parametrize("p", [1, 2])
def test_triton_streamed_kernel_in_small_blocks(gen, device, p):
    """Small blocks so that rows, columns and features each span several blocks."""
    require("sinkhorn", "triton", device, torch.float32)
    from guider_fast.kernels import sinkhorn as kernels

    x, y, a, b = clouds(gen, 2, 37, 50, 20, torch.float32, device)
    f, g, error, n_iters = kernels.solve_streamed(x, y, a, b, 0.3, p, 10, None,
                                                  block_points=16, block_features=16)
    oracle = SinkhornOracle(x, y, a, b, 0.3, p, 10)
    assert n_iters == 10
    tol = tolerance("sinkhorn", "triton", torch.float32)
    scale = max(1.0, oracle.f.abs().max().item())
    torch.testing.assert_close(centred(f, a), centred(oracle.f, a), rtol=0, atol=tol.potentials * scale)
    torch.testing.assert_close(centred(g, b), centred(oracle.g, b), rtol=0, atol=tol.potentials * scale)
    rtol, atol = marginal_error_tolerance(torch.float32, 37, 50)
    torch.testing.assert_close(error.double().cpu(), oracle.marginal_error, rtol=rtol, atol=atol)


@pytest.mark.parametrize("p", [1, 2])
def test_triton_envelope_kernel_in_small_blocks(gen, device, p):
    """Several row/column blocks; a per-problem upstream scale."""
    require("sinkhorn", "triton", device, torch.float32)
    from guider_fast.kernels import sinkhorn as kernels

    x, y, a, b = clouds(gen, 2, 37, 50, 20, torch.float32, device)
    state = ref.solve_detached(ref.cost_matrix(x, y, p), a, b, 0.3, 50)
    scale = torch.tensor([1.0, -2.5], device=device)
    got = kernels.envelope_gradients(x, y, a, b, state.f, state.g, 0.3, p, scale, block_points=16)
    want = ref.scaled_envelope_point_gradients(x, y, a, b, state.f, state.g, 0.3, p, scale)
    for g_kernel, g_ref in zip(got, want):
        torch.testing.assert_close(g_kernel, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())


def test_triton_streamed_block_sizes_are_checked(gen):
    require("sinkhorn", "triton", "cpu", torch.float32)
    from guider_fast.kernels import sinkhorn as kernels

    x, y, a, b = clouds(gen, 1, 5, 6, 3, torch.float32)
    for bad in (8, 48):
        with pytest.raises(ValueError, match="block_points must be a power of two >= 16"):
            kernels.solve_streamed(x, y, a, b, 0.3, 2, 2, None, block_points=bad)


def test_regime_rule():
    assert sinkhorn_regime(4096, 32, 32, 64) == "onchip"
    assert sinkhorn_regime(256, 256, 256, 8192) == "onchip"
    assert sinkhorn_regime(1, 4096, 4096, 64) == "streamed"
    assert sinkhorn_regime(1, 2048, 2048, 7050) == "precomputed"
    assert sinkhorn_regime(1, 65536, 65536, 7050) == "streamed"  # 16 GiB of cost: stream
