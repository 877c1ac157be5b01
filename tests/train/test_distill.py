"""Streamed KL distillation against the dense reference; OT distillation; argument errors."""

import math

import pytest
import torch

import guider_fast.train.distill as gd
from guider_fast.train.distill import kl_distill_dense, kl_distill_loss, ot_distill_loss
from guider_fast.ot import SamplesLoss


def _tables(gen, n_users=13, n_items=101, d=6, dt=4, dtype=torch.float64, scale=1.5):
    su = (torch.randn(n_users, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    si = (torch.randn(n_items, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    tu = (torch.randn(n_users, dt, generator=gen, dtype=torch.float64) * scale).to(dtype)
    ti = (torch.randn(n_items, dt, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return su, si, tu, ti


def _users(gen, batch, n_users):
    users = torch.randint(0, n_users, (batch,), generator=gen)
    users[1] = users[0]  # duplicates for sure
    users[-1] = users[0]
    return users


@pytest.mark.parametrize("tile", [None, (7, 3)], ids=["default-tiles", "tiny-tiles"])
@pytest.mark.parametrize("block_size", [1, 3, 16, 100, 101, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_streamed_equals_dense_value_and_grads(gen, monkeypatch, block_size, reduction, tile):
    if tile is not None:  # force several user chunks and item sub-blocks per tile
        monkeypatch.setattr(gd, "_TILE_ELEMENTS", tile[0])
        monkeypatch.setattr(gd, "_TILE_COLS", tile[1])
    su, si, tu, ti = _tables(gen)
    users = _users(gen, 29, su.shape[0])
    s_user, s_item = su.clone().requires_grad_(), si.clone().requires_grad_()
    d_user, d_item = su.clone().requires_grad_(), si.clone().requires_grad_()
    got = kl_distill_loss(s_user, s_item, tu, ti, users, block_size=block_size, reduction=reduction)
    want = kl_distill_dense(d_user, d_item, tu, ti, users, reduction=reduction)
    assert got.shape == want.shape == ((29,) if reduction == "none" else ())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_out = torch.rand(got.shape, generator=gen, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(got, (s_user, s_item), g_out)
    grads_ref = torch.autograd.grad(want, (d_user, d_item), g_out)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    # Users outside the batch get zero gradient; duplicated ones accumulate (checked above).
    unused = torch.ones(su.shape[0], dtype=torch.bool)
    unused[users] = False
    assert (grads[0][unused] == 0).all()


def test_gradcheck(gen):
    su, si, tu, ti = _tables(gen, n_users=5, n_items=11, d=3, dt=2, scale=1.0)
    users = torch.tensor([0, 3, 3, 4, 1, 0, 2])
    su.requires_grad_()
    si.requires_grad_()
    for block in (1, 4, 11, 50):
        assert torch.autograd.gradcheck(
            lambda a, b: kl_distill_loss(a, b, tu, ti, users, block_size=block, reduction="none"),
            (su, si))


def test_values_are_kl(gen):
    # KL >= 0, and 0 when the student equals the teacher.
    su, si, _, _ = _tables(gen)
    users = _users(gen, 17, su.shape[0])
    rows = kl_distill_loss(su, si, su, si, users, block_size=8, reduction="none")
    assert rows.abs().max() < 1e-12
    _, _, tu, ti = _tables(gen, d=su.shape[1], dt=su.shape[1])
    assert (kl_distill_loss(su, si, tu, ti, users, reduction="none") > 0).all()


def test_large_scores_and_denormal_clamp(gen):
    # Score spreads of several hundred: exp underflows inside each row; still exact.
    su, si, tu, ti = _tables(gen, n_items=300, scale=6.0)
    users = _users(gen, 9, su.shape[0])
    for dtype in (torch.float64, torch.float32):
        args = [t.to(dtype) for t in (su, si, tu, ti)]
        got = kl_distill_loss(*args, users, block_size=64, reduction="none")
        want = kl_distill_dense(su, si, tu, ti, users, reduction="none")
        tol = 1e-9 if dtype == torch.float64 else 2e-3
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 50)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision(gen, dtype):
    su, si, tu, ti = _tables(gen, scale=0.7)
    users = _users(gen, 21, su.shape[0])
    args = [t.to(dtype) for t in (su, si, tu, ti)]
    s_user, s_item = args[0].clone().requires_grad_(), args[1].clone().requires_grad_()
    got = kl_distill_loss(s_user, s_item, args[2], args[3], users, block_size=16)
    assert got.dtype == dtype
    # Reference: float64 on the rounded inputs.
    r_user, r_item = args[0].double().requires_grad_(), args[1].double().requires_grad_()
    want = kl_distill_dense(r_user, r_item, args[2].double(), args[3].double(), users)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    got.backward()
    want.backward()
    assert s_user.grad.dtype == dtype and s_item.grad.dtype == dtype
    gtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(s_user.grad.double(), r_user.grad, rtol=gtol, atol=gtol)
    torch.testing.assert_close(s_item.grad.double(), r_item.grad, rtol=gtol, atol=gtol)


def test_teacher_gets_no_gradient(gen):
    su, si, tu, ti = _tables(gen)
    for t in (su, si, tu, ti):
        t.requires_grad_()
    users = _users(gen, 10, su.shape[0])
    kl_distill_loss(su, si, tu, ti, users, block_size=10).backward()
    assert su.grad is not None and si.grad is not None
    assert tu.grad is None and ti.grad is None
    # Only the student item table may require grad.
    su2 = su.detach()
    si2 = si.detach().clone().requires_grad_()
    kl_distill_loss(su2, si2, tu, ti, users).backward()
    assert si2.grad is not None and si2.grad.abs().sum() > 0


def test_memory_is_blocked(gen, monkeypatch):
    """No tensor of B x n_items elements is ever created: every product and workspace
    is bounded by B * block_size (or an (n_items, D) gradient table)."""
    batch, n_items, d, block = 64, 20_000, 4, 512
    su, si, tu, ti = _tables(gen, n_users=100, n_items=n_items, d=d, dt=d, dtype=torch.float32)
    su.requires_grad_()
    si.requires_grad_()
    users = torch.randint(0, 100, (batch,), generator=gen)
    sizes = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            sizes.append(out.numel())
            return out
        return wrapper

    for name in ("mm", "addmm", "matmul", "empty", "zeros", "full", "sub", "exp", "maximum"):
        monkeypatch.setattr(torch, name, recording(getattr(torch, name)))
    for name in ("__matmul__", "mm", "exp", "sub"):
        monkeypatch.setattr(torch.Tensor, name, recording(getattr(torch.Tensor, name)))
    # The hooks do catch a dense (B, n_items) product.
    sizes.clear()
    kl_distill_dense(su, si, tu, ti, users)
    assert max(sizes) >= batch * n_items
    for block_size in (block, 16384):
        sizes.clear()
        kl_distill_loss(su, si, tu, ti, users, block_size=block_size).backward()
        assert sizes, "the recording hooks saw no allocation"
        bound = max(batch * min(block_size, gd._TILE_COLS), n_items * d)
        assert max(sizes) <= bound, (max(sizes), bound)
        assert max(sizes) < batch * n_items // 4


def test_errors_name_arguments(gen):
    su, si, tu, ti = _tables(gen)
    users = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="student_item"):
        kl_distill_loss(su, si[:, :3], tu, ti, users)
    with pytest.raises(ValueError, match="teacher_item"):
        kl_distill_loss(su, si, tu, ti[:, :3], users)
    with pytest.raises(ValueError, match="teacher_item"):
        kl_distill_loss(su, si, tu, ti[:50], users)
    with pytest.raises(ValueError, match="student_user"):
        kl_distill_loss(su[0], si, tu, ti, users)
    with pytest.raises(TypeError, match="teacher_user"):
        kl_distill_loss(su, si, tu.long(), ti, users)
    with pytest.raises(TypeError, match="users"):
        kl_distill_loss(su, si, tu, ti, users.double())
    with pytest.raises(ValueError, match="users"):
        kl_distill_loss(su, si, tu, ti, users.view(3, 1))
    with pytest.raises(ValueError, match="users"):
        kl_distill_loss(su, si, tu, ti, users[:0])
    with pytest.raises(IndexError, match="users"):
        kl_distill_loss(su, si, tu, ti, torch.tensor([0, su.shape[0]]))
    with pytest.raises(IndexError, match="users"):
        kl_distill_loss(su, si, tu, ti, torch.tensor([-1, 0]))
    with pytest.raises(IndexError, match="users"):  # teacher table shorter than the student's
        kl_distill_loss(su, si, tu[:5], ti, torch.tensor([6]))
    with pytest.raises(ValueError, match="block_size"):
        kl_distill_loss(su, si, tu, ti, users, block_size=0)
    with pytest.raises(ValueError, match="reduction"):
        kl_distill_loss(su, si, tu, ti, users, reduction="max")
    bad = si.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match="student_item"):
        kl_distill_loss(su, bad, tu, ti, users)
    bad = tu.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match="teacher_user"):
        kl_distill_loss(su, si, bad, ti, users)
    # A non-finite row outside the batch does not matter.
    bad[2, 0] = 0.0
    bad[10, 0] = float("nan")
    assert math.isfinite(float(kl_distill_loss(su, si, bad, ti, users)))


def test_ot_distill_matches_samples_loss(gen):
    su, si, tu, ti = _tables(gen, scale=0.5)
    su.requires_grad_()
    si.requires_grad_()
    tu.requires_grad_()
    users = _users(gen, 12, su.shape[0])
    items = torch.randint(0, si.shape[0], (12,), generator=gen)
    got = ot_distill_loss(su, si, tu, ti, users, items, blur=0.1, p=2)
    x = su[users] @ si[items].T
    y = (tu[users] @ ti[items].T).detach()
    want = SamplesLoss("sinkhorn", p=2, blur=0.1)(x, y)
    torch.testing.assert_close(got, want)
    got.backward()
    assert su.grad is not None and si.grad is not None and tu.grad is None
    # items=None: the reference form over the whole catalogue.
    full = ot_distill_loss(su, si, tu, ti, users)
    want_full = SamplesLoss("sinkhorn", p=2, blur=0.05)(su[users] @ si.T, (tu[users] @ ti.T).detach())
    torch.testing.assert_close(full, want_full)
    assert float(ot_distill_loss(su, si, su, si, users, items).detach()) == pytest.approx(0.0, abs=1e-8)


def test_ot_distill_errors(gen):
    su, si, tu, ti = _tables(gen)
    users = torch.tensor([0, 1, 2])
    with pytest.raises(IndexError, match="items"):
        ot_distill_loss(su, si, tu, ti, users, torch.tensor([0, si.shape[0]]))
    with pytest.raises(ValueError, match="items"):
        ot_distill_loss(su, si, tu, ti, users, torch.tensor([], dtype=torch.long))
    with pytest.raises(IndexError, match="users"):
        ot_distill_loss(su, si, tu, ti, torch.tensor([99]))
    with pytest.raises(ValueError, match="p"):
        ot_distill_loss(su, si, tu, ti, users, p=3)
    with pytest.raises(ValueError, match="blur"):
        ot_distill_loss(su, si, tu, ti, users, blur=0)
