"""guider_fast.dbpr_loss against an independent autograd computation of the DBPR formula."""

import pytest
import torch
import torch.nn.functional as F

import guider_fast as gf

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.bfloat16: dict(rtol=8e-3, atol=4e-3), torch.float16: dict(rtol=1e-3, atol=5e-4)}


def formula(user_emb, item_emb, users, pos, neg, weights, reduction):
    """Spec section 2 written with plain indexing and autograd (float32/64 math)."""
    u = user_emb[users].to(torch.float64)
    p = item_emb[pos].to(torch.float64)
    n = item_emb[neg if neg.dim() == 2 else neg[:, None]].to(torch.float64)
    margin = (u * p).sum(-1, keepdim=True) - (u[:, None, :] * n).sum(-1)
    terms = F.logsigmoid(margin).mean(1)
    if weights is not None:
        terms = weights.to(torch.float64) * terms
    rows = -terms
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def _tables(gen, n_users, n_items, dim, dtype):
    user = (torch.randn(n_users, dim, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    item = (torch.randn(n_items, dim, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    return user.requires_grad_(), item.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [None, 1, 5])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_formula_with_duplicates(gen, dtype, k, with_weights, reduction):
    n_users, n_items, dim, batch = 11, 7, 13, 37  # few rows: many duplicate indices
    user, item = _tables(gen, n_users, n_items, dim, dtype)
    users = torch.randint(0, n_users, (batch,), generator=gen)
    pos = torch.randint(0, n_items, (batch,), generator=gen)
    neg = torch.randint(0, n_items, (batch,) if k is None else (batch, k), generator=gen)
    weights = torch.rand(batch, generator=gen).to(dtype) + 0.1 if with_weights else None

    out = gf.dbpr_loss(user, item, users, pos, neg, weights, reduction=reduction)
    grads = torch.autograd.grad(out.sum(), (user, item))
    # Oracle in float64 on the same (rounded) table values: our gradients are
    # accumulated in float32 and rounded once, so they must sit within one
    # rounding of the exact answer.
    user2, item2 = user.detach().double().requires_grad_(), item.detach().double().requires_grad_()
    want = formula(user2, item2, users, pos, neg, weights, reduction)
    want_grads = torch.autograd.grad(want.sum(), (user2, item2))

    assert out.dtype == dtype and grads[0].dtype == dtype
    torch.testing.assert_close(out.double(), want.double(), **TOL[dtype])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=TOL[dtype]["rtol"],
                                   atol=TOL[dtype]["atol"] * max(1.0, w.abs().max().item()))


def test_gradcheck_float64_including_weights(gen):
    user, item = _tables(gen, 5, 6, 4, torch.float64)
    users = torch.tensor([0, 3, 3, 4, 1])
    pos = torch.tensor([2, 2, 5, 0, 1])
    neg = torch.tensor([[1, 4], [4, 4], [0, 3], [5, 2], [2, 2]])
    weights = torch.rand(5, generator=gen, dtype=torch.float64).requires_grad_()
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda u, i, w: gf.dbpr_loss(u, i, users, pos, neg, w, reduction=reduction),
            (user, item, weights))


def test_weights_gradient_only_when_required(gen):
    user, item = _tables(gen, 4, 4, 3, torch.float32)
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), torch.tensor([3, 0, 1])
    weights = torch.rand(3, generator=gen)
    loss = gf.dbpr_loss(user, item, users, pos, neg, weights)
    loss.backward()
    assert weights.grad is None and user.grad is not None and item.grad is not None


def test_int32_indices_accepted(gen):
    user, item = _tables(gen, 6, 9, 5, torch.float32)
    users = torch.randint(0, 6, (8,), generator=gen)
    pos = torch.randint(0, 9, (8,), generator=gen)
    neg = torch.randint(0, 9, (8, 3), generator=gen)
    a = gf.dbpr_loss(user, item, users, pos, neg)
    b = gf.dbpr_loss(user, item, users.int(), pos.int(), neg.int())
    torch.testing.assert_close(a, b)
