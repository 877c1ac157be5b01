"""csrc/sinkhorn.cu (through the sim, via ctypes) against guider_fast.reference.sinkhorn.

The kernel runs the Triton twin's loop (kernels/sinkhorn.py::solve_onchip) in
float32 with costs from direct differences; the reference here runs in float64
(its centred, expanded cost is then exact to ~1e-16, so the comparison measures
the kernel's float32 rounding alone).  Tolerances, with u = 2^-24:

* a cost entry C/eps carries a relative rounding of ~(d + 2) u, i.e. an absolute
  error ~(d + 2) u C_max / eps in the exponent; one soft-min half-step turns that
  into ~(d + 2) u C_max in f or g (eps cancels), plus ~u |f| from the LSE itself;
  the Sinkhorn map is 1-Lipschitz in the sup norm, so k iterations add at most k
  such errors (they random-walk: sqrt(k) in practice).  The bound used is
  POTENTIAL_ULPS * u (C_max + |f|_max) sqrt(k + 1).
* The float32 expanded form (the reference in float32, and the Triton twin) has
  error ~u (|x_c|^2 + |y_c|^2) per entry instead, far larger where clouds are
  close relative to their spread; the direct form's error is ~d u C_ij.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from guider_fast.reference import sinkhorn as ref

ORDERS = {"forward": 0, "reverse": 1, "random": 2}
U = 2.0 ** -24
POTENTIAL_ULPS = 16
F64 = torch.float64


_P, _I64, _F32, _I32, _STR = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float, ctypes.c_int, ctypes.c_char_p
SIGNATURES = {  # sinkhorn_capi.cpp's entry points (and sim_capi.cpp's order switch)
    "gf_sim_set_order": [_I32, ctypes.c_ulonglong],
    "gf_sim_sinkhorn_tiny": [_P] * 4 + [_I64] * 4 + [_I32, _F32, _I64, _F32] + [_P] * 4 + [_STR, _I32],
    "gf_sim_sinkhorn_tiny_envelope": [_P] * 7 + [_I64] * 4 + [_I32, _F32, _P, _P, _STR, _I32],
}


def open_library(path):
    """The ctypes handle of sinkhorn_capi.cpp's library, its signatures set."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    return lib


@pytest.fixture(scope="module")
def lib(sinkhorn_library):
    lib = open_library(sinkhorn_library)
    yield lib
    lib.gf_sim_set_order(0, 0)


def _check(status, error):
    assert status == 0, f"status {status}: {error.value.decode()}"


def sim_solve(lib, x, y, a, b, eps, p, n_iters, tol=None, order="forward", seed=0):
    """(f, g, marginal_error, iterations) from the sim's sinkhorn_tiny."""
    lib.gf_sim_set_order(ORDERS[order], seed)
    batch, n, d = x.shape
    m = y.shape[1]
    f, g = torch.full((batch, n), float("nan")), torch.full((batch, m), float("nan"))
    err, iters = torch.full((batch,), float("nan")), torch.full((batch,), -1, dtype=torch.int32)
    error = ctypes.create_string_buffer(2048)
    status = lib.gf_sim_sinkhorn_tiny(x.data_ptr(), y.data_ptr(), a.data_ptr(), b.data_ptr(), batch, n, m, d, p,
                                      eps, n_iters, -1.0 if tol is None else tol, f.data_ptr(), g.data_ptr(),
                                      err.data_ptr(), iters.data_ptr(), error, len(error))
    _check(status, error)
    return f, g, err, iters


def sim_envelope(lib, x, y, a, b, f, g, eps, p, scale):
    """(grad_x, grad_y) from the sim's sinkhorn_tiny_envelope (float32 inputs)."""
    args = [t.float().contiguous() for t in (x, y, a, b, f, g, scale)]
    batch, n, d = x.shape
    gx, gy = torch.full((batch, n, d), float("nan")), torch.full((batch, y.shape[1], d), float("nan"))
    error = ctypes.create_string_buffer(2048)
    status = lib.gf_sim_sinkhorn_tiny_envelope(*[t.data_ptr() for t in args], batch, n, y.shape[1], d, p, eps,
                                               gx.data_ptr(), gy.data_ptr(), error, len(error))
    _check(status, error)
    return gx, gy


def problems(batch, n, m, d, seed, ragged=True):
    """Float32 (x, y, a, b): y a shifted, scaled copy of the x cloud's law; ragged zero weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=gen) + 3.0  # off the origin: the reference must centre
    y = 0.8 * torch.randn(batch, m, d, generator=gen) + 3.5
    a = torch.rand(batch, n, generator=gen) + 0.1
    b = torch.rand(batch, m, generator=gen) + 0.1
    if ragged:
        for i in range(batch):  # trailing padding of a random length, and an interior zero
            a[i, n - int(torch.randint(0, n, (1,), generator=gen)):] = 0.0
            b[i, m - int(torch.randint(0, m, (1,), generator=gen)):] = 0.0
            if n > 2 and i % 2:
                a[i, 1] = 0.0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return x, y, a, b


def epsilon(x, y, p):
    """A blur well inside the cost range (C_max / eps = 100): dozens of iterations to converge."""
    return 0.01 * float(ref.cost_matrix(x.double(), y.double(), p).max())


def reference(x, y, a, b, eps, p, n_iters, tol=None):
    """The float64 reference solved problem by problem (its batch stops together; the kernel's
    problems stop one by one): (f, g, marginal_error, iterations)."""
    out = []
    for i in range(x.shape[0]):
        xi, yi, ai, bi = (t[i:i + 1].double() for t in (x, y, a, b))
        state = ref.solve_detached(ref.cost_matrix(xi, yi, p), ai, bi, eps, n_iters, tol)
        out.append((state.f, state.g, state.marginal_error, state.n_iters))
    return (torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]), torch.cat([o[2] for o in out]),
            torch.tensor([o[3] for o in out], dtype=torch.int32))


def assert_potentials_close(x, y, p, eps, sim, expected):
    f, g, err, iters = sim
    f_ref, g_ref, err_ref, iters_ref = expected
    assert torch.equal(iters, iters_ref)
    cost_max = ref.cost_matrix(x.double(), y.double(), p).amax(dim=(1, 2))
    scale = cost_max + torch.maximum(f_ref.abs().amax(1), g_ref.abs().amax(1))
    bound = (POTENTIAL_ULPS * U * scale * torch.sqrt(iters_ref.double() + 1))[:, None]
    assert torch.all((f.double() - f_ref).abs() <= bound), ((f.double() - f_ref).abs() / bound).max()
    assert torch.all((g.double() - g_ref).abs() <= bound), ((g.double() - g_ref).abs() / bound).max()
    # err = sum_i a_i |exp(df_i / eps) - 1|: an f error e moves it by at most ~2 e / eps.
    assert torch.all((err.double() - err_ref).abs() <= 2 * bound[:, 0] / eps + 1e-6 * err_ref), (err, err_ref)


SIZES = [  # (batch, n, m, d): n, m in 1, 7, 13, 32; d in 1, 5, 64; tiles 8, 16, 32
    (3, 1, 7, 5), (5, 7, 13, 1), (3, 13, 1, 64), (2, 13, 32, 5), (2, 32, 32, 64), (6, 7, 7, 64), (2, 32, 13, 1),
]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("batch, n, m, d", SIZES)
def test_fixed_iterations_match_reference(lib, batch, n, m, d, p):
    x, y, a, b = problems(batch, n, m, d, seed=100 * n + 10 * m + d + p)
    eps, n_iters = epsilon(x, y, p), 23
    sim = sim_solve(lib, x, y, a, b, eps, p, n_iters)
    assert_potentials_close(x, y, p, eps, sim, reference(x, y, a, b, eps, p, n_iters))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("batch, n, m, d", [(4, 7, 13, 5), (3, 32, 32, 64), (4, 13, 1, 1)])
def test_tol_stops_each_problem_on_its_own(lib, batch, n, m, d, p):
    x, y, a, b = problems(batch, n, m, d, seed=7 * n + m + d + p)
    eps, tol, n_iters = epsilon(x, y, p), 1e-3, 400
    expected = reference(x, y, a, b, eps, p, n_iters, tol)
    # The case is not a float32 coin toss: a 2% change of tol stops every problem at the same check.
    for nearby in (0.98 * tol, 1.02 * tol):
        assert torch.equal(reference(x, y, a, b, eps, p, n_iters, nearby)[3], expected[3])
    assert torch.all(expected[3] < n_iters) and torch.all(expected[3] % 10 == 0)
    sim = sim_solve(lib, x, y, a, b, eps, p, n_iters, tol)
    assert_potentials_close(x, y, p, eps, sim, expected)
    assert torch.all(sim[2] <= tol)
    if min(n, m) > 1:  # the problems did not all stop together (one point on a side: one step)
        assert len(set(sim[3].tolist())) > 1


def test_zero_iterations(lib):
    x, y, a, b = problems(3, 7, 13, 5, seed=3)
    eps = epsilon(x, y, 2)
    f, g, err, iters = sim_solve(lib, x, y, a, b, eps, 2, 0)
    assert torch.equal(f, torch.zeros_like(f)) and torch.equal(g, torch.zeros_like(g))
    assert torch.equal(iters, torch.zeros_like(iters))
    assert_potentials_close(x, y, 2, eps, (f, g, err, iters), reference(x, y, a, b, eps, 2, 0))


def test_close_clouds_beat_the_float32_expanded_cost(lib):
    # A student converging to its teacher: y = x + tiny noise, far from the origin, eps at the
    # matched pairs' scale.  The float32 expanded cost (even centred) carries ~u (|x_c|^2 + |y_c|^2)
    # of noise per entry, far above C_ii; the direct differences keep C_ii to a few ulp of itself.
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 13, 64, generator=gen) * 4.0 + 50.0
    y = x + 1e-3 * torch.randn(2, 13, 64, generator=gen)
    a = b = torch.full((2, 13), 1.0 / 13)
    eps, n_iters = 1e-4, 15
    f, _, _, _ = sim_solve(lib, x, y, a, b, eps, 2, n_iters)
    f_ref = reference(x, y, a, b, eps, 2, n_iters)[0]
    f_expanded = ref.solve_detached(ref.cost_matrix(x, y, 2), a, b, eps, n_iters).f
    kernel_error = (f.double() - f_ref).abs().max()
    expanded_error = (f_expanded.double() - f_ref).abs().max()
    assert kernel_error * 20 < expanded_error, (kernel_error, expanded_error)


@pytest.mark.parametrize("p", [1, 2])
def test_identical_across_thread_orders(lib, p):
    x, y, a, b = problems(5, 13, 32, 5, seed=5)
    eps = epsilon(x, y, p)
    runs = [sim_solve(lib, x, y, a, b, eps, p, 40, 1e-3, order, seed) for order, seed in
            (("forward", 0), ("reverse", 0), ("random", 1))]
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert torch.equal(u.view(torch.uint8), v.view(torch.uint8))


def test_against_pot(lib):
    ot = pytest.importorskip("ot")
    # POT starts from log v = 0 (our g = -eps log b), so only the converged plans agree.
    x, y, a, b = problems(2, 7, 13, 5, seed=9, ragged=False)
    eps, tol = 5 * epsilon(x, y, 2), 1e-5
    f, g, err, iters = sim_solve(lib, x, y, a, b, eps, 2, 1000, tol)
    assert torch.all(err <= tol) and torch.all(iters < 1000)
    for i in range(2):
        cost = torch.from_numpy(ot.dist(x[i].double().numpy(), y[i].double().numpy()) / 2)
        a_i, b_i = a[i].double(), b[i].double()
        # ot.sinkhorn updates its second marginal's potential first: solve the transposed
        # problem, whose first half-step is then our f-update.  Its plan is exp(log_u + log_v - C/eps).
        _, log = ot.sinkhorn(b_i.numpy(), a_i.numpy(), cost.T.contiguous().numpy(), eps, method="sinkhorn_log",
                             numItermax=2000, stopThr=1e-7, log=True)
        plan_pot = torch.exp(torch.from_numpy(log["log_v"])[:, None] + torch.from_numpy(log["log_u"])[None, :]
                             - cost / eps)
        plan = a_i[:, None] * b_i[None, :] * torch.exp((f[i].double()[:, None] + g[i].double()[None, :] - cost) / eps)
        assert (plan - plan_pot).abs().sum() <= 4 * tol, (plan - plan_pot).abs().sum()


# ------------------------------------------------------------------ envelope backward

def envelope_bound(x, y, a, b, f, g, eps, p, scale):
    """Per-entry bound: the float32 rounding of log P (~(d + 8) u (C_max + |f| + |g|) / eps,
    relative in w) and of the differences, times sum_j w_ij |x_i - y_j| (grad_x) or its column twin."""
    x, y, a, b, f, g = (t.double() for t in (x, y, a, b, f, g))
    cost = ref.cost_matrix(x, y, p)
    w = torch.exp(ref.log_plan(cost, a, b, f, g, eps).clamp(min=-80.0)) * (a > 0)[:, :, None] * (b > 0)[:, None, :]
    if p == 1:
        w = torch.where(cost > 0, w / cost.clamp_min(1e-30), torch.zeros_like(w))
    dist = (x[:, :, None, :] - y[:, None, :, :]).abs()
    d = x.shape[2]
    size = (cost.amax((1, 2)) + f.abs().amax(1) + g.abs().amax(1)) / eps
    rel = (4 * (d + 8) * U * (size + 4) * scale.double().abs())[:, None, None]
    return rel * (w[..., None] * dist).sum(2) + 1e-30, rel * (w[..., None] * dist).sum(1) + 1e-30


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("batch, n, m, d", [(3, 1, 7, 5), (2, 13, 32, 64), (5, 7, 13, 1), (2, 32, 32, 5)])
def test_envelope_matches_reference(lib, batch, n, m, d, p):
    x, y, a, b = problems(batch, n, m, d, seed=31 * n + m + d + p)
    eps = epsilon(x, y, p)
    f, g, _, _ = sim_solve(lib, x, y, a, b, eps, p, 30)
    scale = torch.linspace(-1.5, 2.0, batch)
    gx, gy = sim_envelope(lib, x, y, a, b, f, g, eps, p, scale)
    gx_ref, gy_ref = ref.scaled_envelope_point_gradients(x.double(), y.double(), a.double(), b.double(),
                                                         f.double(), g.double(), eps, p, scale.double())
    bx, by = envelope_bound(x, y, a, b, f, g, eps, p, scale)
    assert torch.all((gx.double() - gx_ref).abs() <= bx), ((gx.double() - gx_ref).abs() / bx).max()
    assert torch.all((gy.double() - gy_ref).abs() <= by), ((gy.double() - gy_ref).abs() / by).max()
    # Padded points get exactly zero gradient.
    assert torch.all(gx[a == 0] == 0) and torch.all(gy[b == 0] == 0)


def test_envelope_value_backward_takes_the_kernel(lib):
    # The binding's signature: EnvelopeValue's point_gradients(x, y, a, b, f, g, eps, p, scale).
    x, y, a, b = problems(3, 7, 13, 5, seed=4)
    eps = epsilon(x, y, 2)
    f, g, _, _ = sim_solve(lib, x, y, a, b, eps, 2, 30)
    grads = []
    for point_gradients in (None, lambda *args: sim_envelope(lib, *args)):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        value = ref.EnvelopeValue.apply(xs, ys, a, b, f, g, eps, 2, point_gradients)
        (value * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads.append((xs.grad, ys.grad))
    for kernel, torch_ref in zip(grads[1], grads[0]):
        assert torch.allclose(kernel, torch_ref, rtol=1e-3, atol=1e-5)


def test_envelope_coincident_points_p1(lib):
    # p = 1 at x_i = y_j: C = 0 exactly (direct differences), so that entry adds nothing.
    x, y, a, b = problems(1, 7, 7, 5, seed=2, ragged=False)
    y[0, 3] = x[0, 2]
    eps = epsilon(x, y, 1)
    f, g, _, _ = sim_solve(lib, x, y, a, b, eps, 1, 20)
    gx, gy = sim_envelope(lib, x, y, a, b, f, g, eps, 1, torch.ones(1))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()


def test_envelope_identical_across_thread_orders(lib):
    x, y, a, b = problems(5, 13, 32, 5, seed=6)
    eps = epsilon(x, y, 2)
    f, g, _, _ = sim_solve(lib, x, y, a, b, eps, 2, 20)
    runs = []
    for order, seed in (("forward", 0), ("reverse", 0), ("random", 3)):
        lib.gf_sim_set_order(ORDERS[order], seed)
        runs.append(sim_envelope(lib, x, y, a, b, f, g, eps, 2, torch.ones(5)))
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert torch.equal(u.view(torch.int32), v.view(torch.int32))


def test_invalid_arguments_launch_nothing(lib):
    x, y, a, b = problems(2, 7, 7, 3, seed=0)
    out = [torch.full((2, 7), float("nan")), torch.full((2, 7), float("nan")), torch.full((2,), float("nan")),
           torch.full((2,), -1, dtype=torch.int32)]
    error = ctypes.create_string_buffer(256)
    for n, m, d, p, eps, n_iters in [(33, 7, 3, 2, 1.0, 5), (7, 0, 3, 2, 1.0, 5), (7, 7, 0, 2, 1.0, 5),
                                     (7, 7, 3, 3, 1.0, 5), (7, 7, 3, 2, 0.0, 5), (7, 7, 3, 2, 1.0, -1),
                                     (7, 7, 3, 2, 1.0, 1 << 31)]:
        status = lib.gf_sim_sinkhorn_tiny(x.data_ptr(), y.data_ptr(), a.data_ptr(), b.data_ptr(), 2, n, m, d, p,
                                          eps, n_iters, -1.0, *[t.data_ptr() for t in out], error, len(error))
        assert status == 1  # cudaErrorInvalidValue
    assert all(torch.isnan(t).all() for t in out[:3]) and torch.all(out[3] == -1)
    assert lib.gf_sim_sinkhorn_tiny_envelope(*[t.data_ptr() for t in (x, y, a, b, a, b, a[:, 0].contiguous())],
                                             2, 7, 7, 3, 2, -1.0, out[0].data_ptr(), out[1].data_ptr(), error,
                                             len(error)) == 1
    assert math.isnan(float(out[0][0, 0]))
