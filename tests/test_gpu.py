"""GPU checks of the Triton kernels against the torch reference (skipped without a CUDA device).

CUDA is queried inside the fixture, never at collection.  tests/conftest.py turns
Triton's interpreter on unless TRITON_INTERPRET is set: run with TRITON_INTERPRET=0
on the GPU machine (benchmarks/device_check.sh does) to test the compiled kernels.
"""


import pytest
import torch

import guider_fast as gf
from guider_fast.reference import sinkhorn as ref

from conftest import random_weights, ragged_lengths


def _problem(batch, n, m, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=gen).to(device=device, dtype=dtype)
    y = (torch.randn(batch, m, d, generator=gen) + 0.3).to(device=device, dtype=dtype)
    a = random_weights(batch, n, ragged_lengths(batch, n, gen), gen, torch.float32).to(device)
    b = random_weights(batch, m, ragged_lengths(batch, m, gen), gen, torch.float32).to(device)
    return x, y, a, b


def test_softmin_log_softmax_trick_on_gpu(cuda):
    """The reference soft-min (log_softmax pivot) equals logsumexp on the GPU too."""
    for n, m in ((7, 13), (33, 1100), (1500, 9)):
        cost = torch.rand(3, n, m, device=cuda) * 5
        h = torch.randn(3, m, device=cuda)
        h[:, -2:] = float("-inf")
        got = ref.softmin_(cost, h, 0.1, torch.empty_like(cost), dim=2)
        want = -0.1 * torch.logsumexp(h[:, None, :] - cost / 0.1, 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        h_rows = torch.randn(3, n, device=cuda)
        got = ref.softmin_(cost, h_rows, 0.1, torch.empty_like(cost), dim=1)
        want = -0.1 * torch.logsumexp(h_rows[:, :, None] - cost / 0.1, 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 1, 1, 16), (64, 7, 13, 5), (16, 64, 64, 64), (4, 256, 200, 64),
                                   (1, 1000, 700, 64), (1, 300, 300, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [1, 2])
def test_sinkhorn_triton_matches_reference(cuda, shape, dtype, p):
    x, y, a, b = _problem(*shape, dtype, cuda)
    x.requires_grad_()
    results = []
    for backend in ("triton", "torch"):
        res = gf.sinkhorn(x, y, a, b, eps=0.5, p=p, n_iters=50, backend=backend)
        results.append((res, torch.autograd.grad(res.value.sum(), x)[0]))
    (tri, grad_tri), (want, grad_want) = results
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(tri.value.float(), want.value.float(), rtol=rtol, atol=rtol)
    scale = grad_want.float().abs().max()
    assert (grad_tri.float() - grad_want.float()).abs().max() <= 10 * rtol * scale


def test_sinkhorn_triton_tol_and_auto(cuda):
    x, y, a, b = _problem(32, 40, 24, 16, torch.float32, cuda)
    res = gf.sinkhorn(x, y, a, b, eps=0.5, n_iters=2000, tol=1e-6)  # auto picks triton on CUDA
    assert bool((res.marginal_error <= 1e-6).all()) and res.n_iters < 2000


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias", [True, False])
def test_samples_loss_triton_matches_reference(cuda, p, debias):
    x, y, a, b = _problem(32, 50, 37, 64, torch.float32, cuda)
    loss_tri = gf.SamplesLoss(p=p, debias=debias, backend="triton")(a, x, b, y)
    loss_ref = gf.SamplesLoss(p=p, debias=debias, backend="torch")(a, x, b, y)
    torch.testing.assert_close(loss_tri, loss_ref, rtol=3e-4, atol=1e-5)


def test_torch_ops_on_gpu(cuda):
    gen = torch.Generator().manual_seed(3)
    user = torch.randn(100, 32, generator=gen).to(cuda).requires_grad_()
    item = torch.randn(80, 32, generator=gen).to(cuda).requires_grad_()
    users = torch.randint(0, 100, (64,), generator=gen).to(cuda)
    pos = torch.randint(0, 80, (64,), generator=gen).to(cuda)
    neg = torch.randint(0, 80, (64, 3), generator=gen).to(cuda)
    loss = gf.dbpr_loss(user, item, users, pos, neg)
    loss.backward()
    cpu = gf.dbpr_loss(user.detach().cpu(), item.detach().cpu(), users.cpu(), pos.cpu(), neg.cpu())
    torch.testing.assert_close(loss.cpu(), cpu, rtol=1e-5, atol=1e-6)
    t, v = torch.randn(64, 32, device=cuda), torch.randn(64, 32, device=cuda)
    codes = [torch.randn(64, 16, device=cuda) for _ in range(3)]
    cal = gf.calibrate(t, v, *codes)
    want = gf.calibrate(t.cpu(), v.cpu(), *[c.cpu() for c in codes])
    torch.testing.assert_close(cal.weights.cpu(), want.weights, rtol=1e-5, atol=1e-6)
