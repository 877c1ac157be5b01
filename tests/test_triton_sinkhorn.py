"""The Triton Sinkhorn kernels against the torch reference, run by Triton's interpreter on CPU."""

import os

import pytest
import torch

pytest.importorskip("triton")

import guider_fast as gf  # noqa: E402

from conftest import random_weights, ragged_lengths  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the Triton interpreter on CPU tensors", allow_module_level=True)

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _problem(gen, batch, n, m, d, dtype):
    x = torch.randn(batch, n, d, generator=gen).to(dtype)
    y = (torch.randn(batch, m, d, generator=gen) * 1.2 + 0.3).to(dtype)
    a = random_weights(batch, n, ragged_lengths(batch, n, gen), gen, torch.float32)
    b = random_weights(batch, m, ragged_lengths(batch, m, gen), gen, torch.float32)
    return x, y, a, b


def _both(x, y, a, b, **kwargs):
    results = []
    for backend in ("triton", "torch"):
        inputs = [t.clone().requires_grad_() for t in (x, y, a, b)]
        res = gf.sinkhorn(*inputs, backend=backend, **kwargs)
        grads = torch.autograd.grad(res.value.sum(), inputs)
        results.append((res, grads))
    return results


def _centred(f, weights):
    mask = weights > 0
    mean = (f * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    return torch.where(mask, f - mean, torch.zeros_like(f))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 13, 5), (2, 1, 9, 70), (2, 17, 1, 3), (1, 33, 20, 16)])
def test_fixed_iterations_match_reference(gen, p, dtype, shape):
    x, y, a, b = _problem(gen, *shape, dtype)
    (tri, tri_grads), (ref, ref_grads) = _both(x, y, a, b, eps=0.4, p=p, n_iters=40)
    assert tri.n_iters == ref.n_iters == 40
    assert tri.value.dtype == dtype
    # Both paths solve in float32 on the same (rounded) inputs: float32 agreement.
    tol = TOL[torch.float32] if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(tri.value.float(), ref.value.float(), **tol)
    torch.testing.assert_close(_centred(tri.f.float(), a), _centred(ref.f.float(), a), **tol)
    torch.testing.assert_close(tri.marginal_error.float(), ref.marginal_error.float(), rtol=1e-3, atol=1e-6)
    # Point gradients amplify the potentials' fp32 rounding: compare against their scale.
    for g_tri, g_ref in zip(tri_grads[:2], ref_grads[:2]):
        scale = g_ref.float().abs().max().clamp_min(1e-6)
        assert (g_tri.float() - g_ref.float()).abs().max() <= 10 * tol["rtol"] * scale
    # Weight gradients are the potentials (defined up to a constant per problem).
    potential_scale = max(1.0, ref.f.float().abs().max().item(), ref.g.float().abs().max().item())
    for g_tri, g_ref, w in zip(tri_grads[2:], ref_grads[2:], (a, b)):
        torch.testing.assert_close(_centred(g_tri.float(), w), _centred(g_ref.float(), w),
                                   rtol=0, atol=tol["rtol"] * potential_scale)


@pytest.mark.parametrize("p", [1, 2])
def test_tolerance_stopping_per_problem(gen, p):
    x, y, a, b = _problem(gen, 4, 9, 6, 4, torch.float32)
    tri = gf.sinkhorn(x, y, a, b, eps=0.5, p=p, n_iters=2000, tol=1e-6, backend="triton")
    ref = gf.sinkhorn(x, y, a, b, eps=0.5, p=p, n_iters=2000, tol=1e-9, backend="torch")
    assert tri.n_iters < 2000 and tri.n_iters % 10 == 0
    assert bool((tri.marginal_error <= 1e-6).all())
    torch.testing.assert_close(tri.value, ref.value, rtol=1e-5, atol=1e-6)


def test_unbatched_and_strided_inputs(gen):
    x = torch.randn(11, 4, generator=gen)
    y = torch.randn(4, 8, generator=gen).t()  # non-contiguous (8, 4)
    tri = gf.sinkhorn(x, y, eps=0.3, backend="triton")
    ref = gf.sinkhorn(x, y.contiguous(), eps=0.3, backend="torch")
    assert tri.value.shape == () and tri.f.shape == (11,)
    torch.testing.assert_close(tri.value, ref.value, **TOL[torch.float32])


def test_what_the_triton_backend_refuses(gen):
    x, y, a, b = _problem(gen, 2, 5, 6, 3, torch.float32)
    with pytest.raises(RuntimeError, match="takes float16, bfloat16, float32 inputs, got float64"):
        gf.sinkhorn(x.double(), y.double(), eps=0.3, backend="triton")
    with pytest.raises(RuntimeError, match="300 points exceed the on-chip Triton kernel"):
        gf.SamplesLoss(backend="triton")(torch.randn(1, 300, 3), torch.randn(1, 5, 3))
    with pytest.raises(RuntimeError, match="grad='autodiff'"):
        gf.sinkhorn(x, y, eps=0.3, grad="autodiff", backend="triton")
    # auto on CPU stays on the torch reference even when the interpreter is on.
    assert gf.sinkhorn(x, y, eps=0.3, grad="autodiff").value.requires_grad is False


def test_registered_custom_op_passes_opcheck(gen):
    x, y, a, b = _problem(gen, 2, 5, 7, 3, torch.float32)
    op = torch.ops.guider_fast.sinkhorn_onchip.default
    torch.library.opcheck(op, (x, y, a, b, 0.3, 2, 20, None))
    torch.library.opcheck(op, (x, y, a, b, 0.3, 1, 50, 1e-5))


def test_n_iters_is_read_lazily(gen):
    x, y, a, b = _problem(gen, 3, 6, 5, 2, torch.float32)
    res = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=500, tol=1e-5, backend="triton")
    assert isinstance(res._n_iters, torch.Tensor)  # no sync until asked
    assert isinstance(res.n_iters, int) and 0 < res.n_iters < 500


def test_torch_compile_traces_without_graph_breaks(gen):
    """fullgraph=True fails on any graph break; value checks (a host read) are off, as in production."""
    x, y, _, _ = _problem(gen, 2, 5, 6, 3, torch.float32)
    x.requires_grad_()

    def loss(x, y):
        return gf.sinkhorn(x, y, eps=0.3, n_iters=20, backend="triton").value.sum()

    gf.set_checks(False)
    try:
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        (grad_compiled,) = torch.autograd.grad(compiled(x, y), x)
        (grad_eager,) = torch.autograd.grad(loss(x, y), x)
    finally:
        gf.set_checks(None)
    torch.testing.assert_close(grad_compiled, grad_eager)


# ------------------------------------------------------------------ SamplesLoss


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blur,scaling", [(0.05, 0.5), (0.3, 0.8)])
def test_samples_loss_matches_reference(gen, p, debias, dtype, blur, scaling):
    x, y, a, b = _problem(gen, 3, 7, 13, 5, dtype)
    results = []
    for backend in ("triton", "torch"):
        inputs = [t.clone().requires_grad_() for t in (a, x, b, y)]
        value = gf.SamplesLoss(p=p, blur=blur, scaling=scaling, debias=debias, backend=backend)(*inputs)
        results.append((value, torch.autograd.grad(value.sum(), inputs)))
    (v_tri, g_tri), (v_ref, g_ref) = results
    assert v_tri.dtype == dtype
    # p=1 self-costs C(x_i, x_i) = sqrt(max(rounding residue, 1e-8)) depend on the
    # summation order of the dot products: GeomLoss's own float32 noise, ~1e-4.
    rtol = 3e-4 if (p == 1 and debias) else 2e-5
    if dtype != torch.float32:
        rtol = TOL[dtype]["rtol"]
    torch.testing.assert_close(v_tri.float(), v_ref.float(), rtol=rtol, atol=rtol)
    for grad_tri, grad_ref in zip(g_tri, g_ref):
        scale = grad_ref.float().abs().max().clamp_min(1e-6)
        assert (grad_tri.float() - grad_ref.float()).abs().max() <= 20 * rtol * scale


def test_samples_loss_unbatched_and_one_point(gen):
    x = torch.randn(9, 4, generator=gen)
    y = torch.randn(12, 4, generator=gen)
    for p in (1, 2):
        tri = gf.SamplesLoss(p=p, backend="triton")(x, y)
        ref = gf.SamplesLoss(p=p, backend="torch")(x, y)
        assert tri.shape == ()
        torch.testing.assert_close(tri, ref, rtol=3e-4, atol=1e-5)
    t, v = torch.randn(16, 1, 8, generator=gen), torch.randn(16, 1, 8, generator=gen)
    torch.testing.assert_close(gf.SamplesLoss(p=1, blur=0.1, backend="triton")(t, v),
                               gf.SamplesLoss(p=1, blur=0.1, backend="torch")(t, v))


def test_samples_loss_custom_op_passes_opcheck(gen):
    x, y, a, b = _problem(gen, 2, 5, 7, 3, torch.float32)
    op = torch.ops.guider_fast.samples_loss_onchip.default
    torch.library.opcheck(op, (x, y, a, b, [2.0, 1.0, 0.5, 0.25], 2, True))
    torch.library.opcheck(op, (x, y, a, b, [1.5, 0.1], 1, False))


# ------------------------------------------------------------------ streamed regime


@pytest.mark.parametrize("p", [1, 2])
def test_streamed_kernel_matches_reference(gen, p):
    """Small blocks so that rows, columns and features each span several blocks."""
    from guider_fast.kernels import sinkhorn as kernels
    from guider_fast.reference import sinkhorn as ref

    x, y, a, b = _problem(gen, 2, 37, 50, 20, torch.float32)
    f, g, error, n_iters = kernels.solve_streamed(x, y, a, b, 0.3, p, 10, None,
                                                  block_points=16, block_features=16)
    want = ref.solve_detached(ref.cost_matrix(x, y, p), a, b, 0.3, 10)
    assert n_iters == 10
    scale = max(1.0, want.f.abs().max().item())
    torch.testing.assert_close(_centred(f, a), _centred(want.f, a), rtol=0, atol=2e-6 * scale)
    torch.testing.assert_close(_centred(g, b), _centred(want.g, b), rtol=0, atol=2e-6 * scale)
    torch.testing.assert_close(error, want.marginal_error, rtol=1e-3, atol=1e-6)


def test_large_clouds_take_the_streamed_kernel(gen):
    x = torch.randn(1, 300, 6, generator=gen)
    y = torch.randn(1, 270, 6, generator=gen)
    results = []
    for backend in ("triton", "torch"):
        xr = x.clone().requires_grad_()
        res = gf.sinkhorn(xr, y, eps=0.5, n_iters=4, backend=backend)
        results.append((res, torch.autograd.grad(res.value.sum(), xr)[0]))
    (tri, grad_tri), (ref, grad_ref) = results
    assert tri.n_iters == 4
    torch.testing.assert_close(tri.value, ref.value, **TOL[torch.float32])
    torch.testing.assert_close(grad_tri, grad_ref, rtol=1e-4, atol=1e-7)


def test_streamed_custom_op_passes_opcheck(gen):
    x, y, a, b = _problem(gen, 2, 9, 11, 3, torch.float32)
    torch.library.opcheck(torch.ops.guider_fast.sinkhorn_streamed.default,
                          (x, y, a, b, 0.4, 2, 5, None, 16, 16))


def test_regime_rule():
    from guider_fast.ot import sinkhorn_regime

    assert sinkhorn_regime(4096, 32, 32, 64) == "onchip"
    assert sinkhorn_regime(256, 256, 256, 8192) == "onchip"
    assert sinkhorn_regime(1, 4096, 4096, 64) == "streamed"
    assert sinkhorn_regime(1, 2048, 2048, 7050) == "precomputed"
    assert sinkhorn_regime(1, 65536, 65536, 7050) == "streamed"  # 16 GiB of cost: stream


def test_precomputed_regime_matches_reference(gen):
    x = torch.randn(1, 260, 600, generator=gen)
    y = torch.randn(1, 270, 600, generator=gen)
    tri = gf.sinkhorn(x, y, eps=50.0, n_iters=5, backend="triton")
    ref = gf.sinkhorn(x, y, eps=50.0, n_iters=5, backend="torch")
    torch.testing.assert_close(tri.value, ref.value)


@pytest.mark.parametrize("p", [1, 2])
def test_envelope_kernel_matches_reference_backward(gen, p):
    """Several row/column blocks; a per-problem upstream scale."""
    from guider_fast.kernels import sinkhorn as kernels
    from guider_fast.reference import sinkhorn as ref

    x, y, a, b = _problem(gen, 2, 37, 50, 20, torch.float32)
    state = ref.solve_detached(ref.cost_matrix(x, y, p), a, b, 0.3, 50)
    scale = torch.tensor([1.0, -2.5])
    got = kernels.envelope_gradients(x, y, a, b, state.f, state.g, 0.3, p, scale, block_points=16)
    want = ref.scaled_envelope_point_gradients(x, y, a, b, state.f, state.g, 0.3, p, scale)
    for g_kernel, g_ref in zip(got, want):
        torch.testing.assert_close(g_kernel, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())


def test_wide_points_fall_back_to_the_reference_backward(gen):
    x, y, a, b = _problem(gen, 2, 7, 9, 300, torch.float32)
    results = []
    for backend in ("triton", "torch"):
        xr = x.clone().requires_grad_()
        res = gf.sinkhorn(xr, y, a, b, eps=30.0, n_iters=20, backend=backend)
        results.append(torch.autograd.grad(res.value.sum(), xr)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_envelope_custom_op_passes_opcheck(gen):
    from guider_fast.reference import sinkhorn as ref

    x, y, a, b = _problem(gen, 2, 9, 11, 3, torch.float32)
    state = ref.solve_detached(ref.cost_matrix(x, y, 2), a, b, 0.4, 20)
    torch.library.opcheck(torch.ops.guider_fast.sinkhorn_envelope_grad.default,
                          (x, y, a, b, state.f, state.g, 0.4, 2, torch.tensor([1.0, 0.5])))
    # A transposed (non-contiguous) y: the fake's layout must match the kernel's output.
    y_strided = y.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.guider_fast.sinkhorn_envelope_grad.default,
                          (x, y_strided, a, b, state.f, state.g, 0.4, 2, torch.tensor([1.0, 0.5])))


def test_streamed_block_sizes_are_checked(gen):
    from guider_fast.kernels import sinkhorn as kernels

    x, y, a, b = _problem(gen, 1, 5, 6, 3, torch.float32)
    for bad in (8, 48):
        with pytest.raises(ValueError, match="block_points must be a power of two >= 16"):
            kernels.solve_streamed(x, y, a, b, 0.3, 2, 2, None, block_points=bad)


@pytest.mark.parametrize("p", [1, 2])
def test_samples_loss_gradient_accuracy_against_float64(gen, p):
    """The tile-wise backward normalises soft-max rows: as accurate as GeomLoss in float32."""
    x, y, a, b = _problem(gen, 3, 7, 13, 5, torch.float32)
    x64 = x.double().requires_grad_()
    exact = gf.SamplesLoss(p=p, blur=0.05, backend="torch")(a.double(), x64, b.double(), y.double())
    (grad_exact,) = torch.autograd.grad(exact.sum(), x64)
    x32 = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(gf.SamplesLoss(p=p, blur=0.05, backend="triton")(a, x32, b, y).sum(), x32)
    assert (grad.double() - grad_exact).abs().max() <= 5e-5 * grad_exact.abs().max()


def test_weighted_cost_gradient_custom_op_passes_opcheck(gen):
    u = torch.randn(2, 6, 3, generator=gen)
    v = torch.randn(2, 9, 3, generator=gen)
    rows, cols = torch.randn(2, 6, generator=gen), torch.randn(2, 9, generator=gen)
    scale = torch.rand(2, 6, generator=gen)
    torch.library.opcheck(torch.ops.guider_fast.weighted_cost_gradient.default,
                          (u, v, rows, cols, scale, 0.5, 1, True, True))
