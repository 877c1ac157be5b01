"""guider_fast.sinkhorn (torch reference) against POT, and its gradient modes."""

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import guider_fast as gf
from guider_fast.reference import sinkhorn as ref

from conftest import RTOL, assert_close, ragged_lengths, random_weights


def _ragged_problem(gen, batch=5, n=9, m=13, d=5, dtype=torch.float64):
    x = torch.randn(batch, n, d, generator=gen, dtype=torch.float64).to(dtype)
    y = (torch.randn(batch, m, d, generator=gen, dtype=torch.float64) * 1.3 + 0.4).to(dtype)
    a = random_weights(batch, n, ragged_lengths(batch, n, gen), gen, dtype)
    b = random_weights(batch, m, ragged_lengths(batch, m, gen), gen, dtype)
    return x, y, a, b


def _pot_cost(x, y, p):
    sq = ot.dist(x, y, metric="sqeuclidean")
    return sq / 2 if p == 2 else np.sqrt(np.maximum(sq, 0))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_value_linear_and_potentials_match_pot_sinkhorn2(gen, p, eps):
    x, y, a, b = _ragged_problem(gen)
    res = gf.sinkhorn(x, y, a, b, eps=eps, p=p, n_iters=5000, tol=1e-11)
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


def test_marginals_satisfied_at_convergence(gen):
    x, y, a, b = _ragged_problem(gen, batch=4, n=11, m=6)
    res = gf.sinkhorn(x, y, a, b, eps=0.1, n_iters=5000, tol=1e-10)
    assert res.n_iters < 5000 and res.n_iters % ref.CHECK_EVERY == 0
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_iterations_equal_pot_batch_solver(gen, dtype):
    """Uniform weights: the very iterates of ot.batch.solve_sample_batch (same update order).

    (POT starts from log-scalings v = 0, we from g = 0, i.e. v = log b: the two
    coincide for uniform weights; with other weights only the limits agree.)
    """
    x, y, _, _ = _ragged_problem(gen, batch=6, n=7, m=13, d=5, dtype=dtype)
    eps = 0.2
    res = gf.sinkhorn(x, y, eps=eps, n_iters=30)
    # POT's sqeuclidean cost is |x-y|^2 = 2 C, so reg = 2 eps solves the same problem.
    pot = ot.batch.solve_sample_batch(x, y, reg=2 * eps, metric="sqeuclidean",
                                      max_iter=30, tol=0.0, method="log_sinkhorn", grad="detach")
    assert_close(res.value_linear, pot.value_linear / 2, dtype)
    assert_close(res.plan(), pot.plan, dtype, scale=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ragged_batch_converges_to_pot_batch_solver(gen, dtype):
    x, y, a, b = _ragged_problem(gen, batch=6, n=7, m=13, d=5, dtype=dtype)
    eps = 0.2
    res = gf.sinkhorn(x, y, a, b, eps=eps, n_iters=3000, tol=1e-7)
    pot = ot.batch.solve_sample_batch(x, y, reg=2 * eps, a=a, b=b, metric="sqeuclidean",
                                      max_iter=3000, tol=1e-9, method="log_sinkhorn", grad="detach")
    torch.testing.assert_close(res.value_linear, pot.value_linear / 2, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_solved_in_float32(gen, dtype):
    """Half inputs are rounded once, then solved in float32: equal to float32 on the rounded points."""
    x, y, a, b = _ragged_problem(gen, batch=3, n=8, m=5, d=4, dtype=torch.float32)
    xl, yl = x.to(dtype), y.to(dtype)
    res = gf.sinkhorn(xl, yl, a, b, eps=0.3, n_iters=200)
    assert res.value.dtype == dtype and res.f.dtype == dtype
    want = gf.sinkhorn(xl.float(), yl.float(), a, b, eps=0.3, n_iters=200)
    # Only the final rounding of the outputs to the half dtype differs.
    torch.testing.assert_close(res.value, want.value.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(res.f, want.f.to(dtype), rtol=0, atol=0)


def test_tol_with_autodiff(gen):
    x, y, a, b = _ragged_problem(gen, batch=2, n=6, m=7, d=3)
    x.requires_grad_()
    res = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=1000, tol=1e-9, grad="autodiff")
    assert res.n_iters < 1000 and bool((res.marginal_error <= 1e-9).all())
    (grad,) = torch.autograd.grad(res.value.sum(), x)
    env = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=1000, tol=1e-12)
    (grad_env,) = torch.autograd.grad(env.value.sum(), x)
    torch.testing.assert_close(grad, grad_env, rtol=1e-5, atol=1e-7)


def test_offset_clouds_keep_float32_accuracy(gen):
    """Costs are centred per problem before the expanded |x|^2 - 2x.y + |y|^2 form."""
    x, y, a, b = _ragged_problem(gen, batch=2, n=9, m=7, d=16)
    offset = 300.0
    res32 = gf.sinkhorn((x + offset).float(), (y + offset).float(), a.float(), b.float(), eps=0.5, n_iters=100)
    res64 = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=100)
    torch.testing.assert_close(res32.value_linear.double(), res64.value_linear, rtol=1e-4, atol=0)


def test_unbatched_inputs_give_unbatched_outputs(gen):
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    res = gf.sinkhorn(x, y, eps=0.2, n_iters=50)
    batched = gf.sinkhorn(x[None], y[None], eps=0.2, n_iters=50)
    assert res.value.shape == () and res.f.shape == (7,) and res.plan().shape == (7, 4)
    torch.testing.assert_close(res.value, batched.value[0])


def test_small_eps_stays_finite_and_accurate(gen):
    """eps = 1e-3 of the cost scale: log-domain updates must neither overflow nor underflow."""
    x, y, a, b = _ragged_problem(gen, batch=3, n=10, m=10, d=3, dtype=torch.float32)
    scale = ref.cost_matrix(x.double(), y.double(), 2).amax().item()
    res32 = gf.sinkhorn(x, y, a, b, eps=1e-3 * scale, n_iters=300)
    res64 = gf.sinkhorn(x.double(), y.double(), a.double(), b.double(), eps=1e-3 * scale, n_iters=300)
    assert bool(torch.isfinite(res32.f).all() and torch.isfinite(res32.g).all())
    torch.testing.assert_close(res32.value.double(), res64.value, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("p", [1, 2])
def test_envelope_gradients_match_autodiff_at_convergence(gen, p):
    x, y, a, b = _ragged_problem(gen, batch=3, n=6, m=5, d=3)
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
        mask = w > 0
        diff = (g_env - g_auto).masked_fill(~mask, 0)
        centred = diff - (diff.sum(1, keepdim=True) / mask.sum(1, keepdim=True)) * mask
        assert centred.abs().max() < 1e-6


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


def test_detach_and_grad_mode_untouched(gen):
    x = torch.randn(2, 5, 3, generator=gen, requires_grad=True)
    y = torch.randn(2, 6, 3, generator=gen)
    res = gf.sinkhorn(x, y, eps=0.3, grad="detach")
    assert not res.value.requires_grad
    assert torch.is_grad_enabled()
    with torch.no_grad():
        gf.sinkhorn(x, y, eps=0.3)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert gf.sinkhorn(x, y, eps=0.3).value.requires_grad
    assert not gf.sinkhorn(x, y, eps=0.3).value_linear.requires_grad


def test_tol_stops_early_and_reports_error(gen):
    x, y, a, b = _ragged_problem(gen, batch=4, n=9, m=9, d=3, dtype=torch.float32)
    fixed = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=1000)
    early = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=1000, tol=1e-5)
    assert early.n_iters < 1000 and bool((early.marginal_error <= 1e-5).all())
    assert fixed.n_iters == 1000
    torch.testing.assert_close(early.value, fixed.value, rtol=1e-4, atol=1e-5)


def test_softmin_matches_logsumexp(gen):
    """The fused log-softmax soft-min equals -eps*logsumexp, with -inf (padding) entries present."""
    for dtype in (torch.float32, torch.float64):
        cost = torch.rand(4, 7, 13, generator=gen, dtype=torch.float64).to(dtype) * 3
        h = torch.randn(4, 13, generator=gen, dtype=torch.float64).to(dtype)
        h[:, -4:] = float("-inf")
        work = torch.empty_like(cost)
        for eps in (1.0, 0.01):
            got = ref.softmin_(cost, h, eps, work, dim=2)
            want = -eps * torch.logsumexp(h.double()[:, None, :] - cost.double() / eps, 2)
            torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=RTOL[dtype] * 3)
            h_rows = torch.randn(4, 7, generator=gen, dtype=torch.float64).to(dtype)
            got = ref.softmin_(cost, h_rows, eps, work, dim=1)
            want = -eps * torch.logsumexp(h_rows.double()[:, :, None] - cost.double() / eps, 1)
            torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=RTOL[dtype] * 3)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 4), n=st.integers(1, 9), m=st.integers(1, 9), d=st.integers(1, 6),
       p=st.sampled_from([1, 2]), eps=st.floats(0.05, 2.0), seed=st.integers(0, 2**31 - 1))
def test_property_converged_plan_has_the_marginals(batch, n, m, d, p, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, m, d, generator=gen, dtype=torch.float64)
    a = random_weights(batch, n, ragged_lengths(batch, n, gen), gen)
    b = random_weights(batch, m, ragged_lengths(batch, m, gen), gen)
    res = gf.sinkhorn(x, y, a, b, eps=eps, p=p, n_iters=20000, tol=1e-11)
    plan = res.plan()
    torch.testing.assert_close(plan.sum(2), a, atol=1e-9, rtol=0)
    torch.testing.assert_close(plan.sum(1), b, atol=1e-8, rtol=0)
    torch.testing.assert_close(res.value, (a * res.f).sum(1) + (b * res.g).sum(1))
    # At the optimum the dual value is the primal one: <P, C> + eps * KL(P | a x b).
    outer = a.unsqueeze(2) * b.unsqueeze(1)
    kl = torch.where(plan > 0, plan * (plan / outer.clamp_min(1e-300)).log(), torch.zeros_like(plan))
    torch.testing.assert_close(res.value, res.value_linear + eps * kl.sum((1, 2)), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("p", [1, 2])
def test_value_matches_geomloss_entropic_ot_at_fixed_eps(gen, p):
    """GeomLoss's OT_eps (debias=False) run at one fixed eps converges to our ``value``."""
    from geomloss._legacy.sinkhorn_divergence import log_weights, sinkhorn_loop
    from geomloss._legacy.sinkhorn_samples import cost_routines, softmin_tensorized

    x, y, a, b = _ragged_problem(gen, batch=4, n=8, m=11, d=3)
    eps = 0.3
    cost = cost_routines[p]
    _, _, g_ab, f_ba = sinkhorn_loop(softmin_tensorized, log_weights(a), log_weights(b), None, None,
                                     cost(x, y), cost(y, x), [eps] * 2000, None, debias=False)
    value_geomloss = (a * f_ba).sum(1) + (b * g_ab).sum(1)
    ours = gf.sinkhorn(x, y, a, b, eps=eps, p=p, n_iters=2000, tol=1e-12)
    torch.testing.assert_close(ours.value, value_geomloss, rtol=1e-6, atol=1e-8)


def test_envelope_backward_in_row_blocks_equals_one_block(gen, monkeypatch):
    x, y, a, b = _ragged_problem(gen, batch=3, n=23, m=9, d=4)
    x.requires_grad_()
    y.requires_grad_()
    res = gf.sinkhorn(x, y, a, b, eps=0.3, n_iters=50)
    whole = torch.autograd.grad(res.value.sum(), (x, y))
    monkeypatch.setattr(ref, "ENVELOPE_BLOCK_ELEMENTS", 3 * 9 * 5)  # blocks of 5 rows
    res = gf.sinkhorn(x, y, a, b, eps=0.3, n_iters=50)
    blocked = torch.autograd.grad(res.value.sum(), (x, y))
    for g_blocked, g_whole in zip(blocked, whole):
        torch.testing.assert_close(g_blocked, g_whole, rtol=1e-12, atol=1e-14)
