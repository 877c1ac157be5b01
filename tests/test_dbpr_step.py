"""guider_fast.dbpr_step: the fused sparse step equals dense autograd followed by the optimizer."""

import math

import pytest
import torch

import guider_fast as gf

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _batch(gen, n_users=11, n_items=7, dim=13, batch=37, k=1, dtype=torch.float32):
    user = (torch.randn(n_users, dim, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    item = (torch.randn(n_items, dim, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    users = torch.randint(0, n_users, (batch,), generator=gen)
    pos = torch.randint(0, n_items, (batch,), generator=gen)
    neg = torch.randint(0, n_items, (batch,) if k is None else (batch, k), generator=gen)
    weights = torch.rand(batch, generator=gen) + 0.1
    return user, item, users, pos, neg, weights


def _dense_gradients(user, item, users, pos, neg, weights, l2, reduction):
    """The oracle: dbpr_loss + L2 term through autograd, on float64 copies."""
    u64 = user.detach().double().requires_grad_()
    i64 = item.detach().double().requires_grad_()
    loss = gf.dbpr_loss(u64, i64, users, pos, neg, weights.double(), reduction=reduction)
    negatives = neg if neg.dim() == 2 else neg[:, None]
    reg = 0.5 * l2 * (u64[users].pow(2).sum() + i64[pos].pow(2).sum() + i64[negatives].pow(2).sum())
    loss = loss + (reg / users.shape[0] if reduction == "mean" else reg)
    grad_user, grad_item = torch.autograd.grad(loss, (u64, i64))
    return loss.detach(), grad_user, grad_item


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 1, 5])
@pytest.mark.parametrize("l2", [0.0, 0.01])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sgd_step_equals_dense_autograd(gen, dtype, k, l2, reduction):
    user, item, users, pos, neg, weights = _batch(gen, k=k, dtype=dtype)
    want_loss, grad_user, grad_item = _dense_gradients(user, item, users, pos, neg, weights, l2, reduction)
    want_user = user.double() - 0.1 * grad_user
    want_item = item.double() - 0.1 * grad_item
    untouched_users = torch.ones(user.shape[0], dtype=torch.bool)
    untouched_users[users] = False
    before = user.clone()
    loss = gf.dbpr_step(user, item, users, pos, neg, weights, lr=0.1, l2=l2, reduction=reduction)
    torch.testing.assert_close(loss.double(), want_loss, **TOL[dtype])
    torch.testing.assert_close(user.double(), want_user.to(dtype).double(), **TOL[dtype])
    torch.testing.assert_close(item.double(), want_item.to(dtype).double(), **TOL[dtype])
    assert torch.equal(user[untouched_users], before[untouched_users])  # only batch rows move


@pytest.mark.parametrize("k", [1, 4])
def test_rowwise_adagrad_two_steps(gen, k):
    user, item, users, pos, neg, weights = _batch(gen, k=k, dtype=torch.float64)
    state = gf.RowwiseAdagradState(user, item)
    ref_user, ref_item = user.clone(), item.clone()
    acc_user = torch.zeros(user.shape[0], dtype=torch.float64)
    acc_item = torch.zeros(item.shape[0], dtype=torch.float64)
    for _ in range(2):
        _, grad_user, grad_item = _dense_gradients(ref_user, ref_item, users, pos, neg, weights, 0.0, "mean")
        for table, acc, grad in ((ref_user, acc_user, grad_user), (ref_item, acc_item, grad_item)):
            acc += grad.pow(2).mean(1)
            table -= 0.5 * grad / (acc.sqrt().unsqueeze(1) + 1e-10)
        gf.dbpr_step(user, item, users, pos, neg, weights, lr=0.5, optimizer="rowwise_adagrad", state=state)
    # The accumulators are float32 by design (as FBGEMM's): 1e-5 against float64 math.
    torch.testing.assert_close(user, ref_user, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(item, ref_item, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(state.user.double(), acc_user, rtol=1e-6, atol=1e-12)


def test_step_is_deterministic_with_many_duplicates(gen):
    user, item, users, pos, neg, weights = _batch(gen, n_users=3, n_items=4, batch=500, k=3)
    results = []
    for _ in range(2):
        u, i = user.clone(), item.clone()
        gf.dbpr_step(u, i, users, pos, neg, weights, lr=0.05)
        results.append((u, i))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_return_scores_and_parameters_updated_in_place(gen):
    user, item, users, pos, neg, weights = _batch(gen)
    table = torch.nn.Parameter(user.clone())
    want = (user[users] * item[pos]).sum(1) - (user[users] * item[neg[:, 0]]).sum(1)  # before the update
    loss, margins = gf.dbpr_step(table, item, users, pos, neg, lr=0.1, return_scores=True)
    torch.testing.assert_close(margins[:, 0], want)
    assert not torch.equal(table.detach(), user) and table.grad is None and not loss.requires_grad


def test_step_rejects_bad_input(gen):
    user, item, users, pos, neg, weights = _batch(gen)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, optimizer="adam")
    with pytest.raises(ValueError, match="needs state=RowwiseAdagradState"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, optimizer="rowwise_adagrad")
    with pytest.raises(ValueError, match="state holds"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, optimizer="rowwise_adagrad",
                     state=gf.RowwiseAdagradState(user[:3], item))
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, l2=-1.0)
    with pytest.raises(IndexError, match="pos_items has indices outside"):
        gf.dbpr_step(user, item, users, pos + 100, neg, lr=0.1)
    with pytest.raises(TypeError, match="item_table must have the dtype of user_table"):
        gf.dbpr_step(user, item.double(), users, pos, neg, lr=0.1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, reduction="none")
    with pytest.raises(ValueError, match="weights contains NaN"):
        gf.dbpr_step(user, item, users, pos, neg, weights.clone().fill_(math.nan), lr=0.1)


# Batches large enough for the CPU step's size-dependent routes (sort by padding to
# torch's radix threshold, radix sort on int32 keys, workspace reuse), with many
# repeated rows.

@pytest.mark.parametrize("n", [1, 7, 2_048, 3_000, 4_096, 5_000, 32_767, 32_768, 40_000])
def test_stable_sort_routes_equal_torch_stable_sort(gen, n):
    from guider_fast.reference.dbpr_step import _stable_sort

    for high in (5, 1_000_000):
        index = torch.randint(0, high, (n,), generator=gen)
        want_keys, want_order = torch.sort(index, stable=True)
        keys, order = _stable_sort(index)
        assert torch.equal(keys.long(), want_keys) and torch.equal(order, want_order)
    index = torch.tensor([2**40, 3, 2**40, 0] * 1_500)  # keys past int32: plain stable sort
    assert torch.equal(_stable_sort(index)[1], torch.sort(index, stable=True)[1])


@pytest.mark.parametrize("batch", [5, 1_000, 12_000])
def test_joint_sort_equals_separate_stable_sorts(gen, batch):
    from guider_fast.reference.dbpr_step import _sort_rows

    users = torch.randint(0, 50, (batch,), generator=gen)
    items = torch.randint(0, 30, (2 * batch,), generator=gen)
    (user_keys, user_order), (item_keys, item_order) = _sort_rows(users, items, 50)
    for keys, order, index in ((user_keys, user_order, users), (item_keys, item_order, items)):
        want_keys, want_order = torch.sort(index, stable=True)
        assert torch.equal(keys.long(), want_keys) and torch.equal(order, want_order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [3_000, 20_000])
def test_large_batch_sgd_equals_dense_autograd(gen, dtype, k, batch):
    user, item, users, pos, neg, weights = _batch(gen, n_users=300, n_items=5_000, dim=8,
                                                  batch=batch, k=k, dtype=dtype)
    for l2 in (0.0, 0.01):
        u, i = user.clone(), item.clone()
        want_loss, grad_user, grad_item = _dense_gradients(u, i, users, pos, neg, weights, l2, "sum")
        loss = gf.dbpr_step(u, i, users, pos, neg, weights, lr=1e-3, l2=l2, reduction="sum")
        tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.double(), want_loss, **TOL[dtype])
        torch.testing.assert_close(u.double(), user.double() - 1e-3 * grad_user, **tol)
        torch.testing.assert_close(i.double(), item.double() - 1e-3 * grad_item, **tol)


def test_large_batch_rowwise_adagrad(gen):
    user, item, users, pos, neg, weights = _batch(gen, n_users=300, n_items=5_000, dim=8,
                                                  batch=40_000, k=1, dtype=torch.float64)
    state = gf.RowwiseAdagradState(user, item)
    ref_user, ref_item = user.clone(), item.clone()
    _, grad_user, grad_item = _dense_gradients(ref_user, ref_item, users, pos, neg, weights, 0.0, "mean")
    for table, grad in ((ref_user, grad_user), (ref_item, grad_item)):
        acc = grad.pow(2).mean(1)
        table -= 0.5 * grad / (acc.sqrt().unsqueeze(1) + 1e-10)
    gf.dbpr_step(user, item, users, pos, neg, weights, lr=0.5, optimizer="rowwise_adagrad", state=state)
    torch.testing.assert_close(user, ref_user, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(item, ref_item, rtol=1e-5, atol=1e-8)
    touched = torch.zeros(item.shape[0], dtype=torch.bool)
    touched[pos] = touched[neg] = True
    assert torch.all(state.item[~touched] == 0) and torch.all(state.item[touched] > 0)


def test_large_batch_deterministic_and_workspace_safe(gen):
    """Bit-identical repeats, also after steps of other sizes reused the workspace;
    returned margins are not workspace views."""
    big = _batch(gen, n_users=50, n_items=40_000, dim=16, batch=30_000, k=2)
    small = _batch(gen, n_users=50, n_items=40, dim=16, batch=100, k=1)
    user, item, users, pos, neg, weights = big
    results = []
    for other in (None, small):
        if other is not None:
            gf.dbpr_step(*(t.clone() if t.is_floating_point() else t for t in other[:2]), *other[2:], lr=0.1)
        u, i = user.clone(), item.clone()
        loss, margins = gf.dbpr_step(u, i, users, pos, neg, weights, lr=0.05, return_scores=True)
        kept = margins.clone()
        gf.dbpr_step(u.clone(), i.clone(), users, pos, neg, weights, lr=0.05)  # reuses the buffers
        assert torch.equal(margins, kept)
        results.append((loss, u, i))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bfloat16_tables_large_batch(gen):
    user, item, users, pos, neg, weights = _batch(gen, n_users=300, n_items=5_000, dim=8,
                                                  batch=20_000, k=1, dtype=torch.bfloat16)
    _, grad_user, grad_item = _dense_gradients(user, item, users, pos, neg, weights, 0.0, "sum")
    want_user = (user.double() - 1e-3 * grad_user).to(torch.bfloat16)
    want_item = (item.double() - 1e-3 * grad_item).to(torch.bfloat16)
    before = item.clone()
    gf.dbpr_step(user, item, users, pos, neg, weights, lr=1e-3, reduction="sum")
    torch.testing.assert_close(user.double(), want_user.double(), **TOL[torch.bfloat16])
    torch.testing.assert_close(item.double(), want_item.double(), **TOL[torch.bfloat16])
    untouched = torch.ones(item.shape[0], dtype=torch.bool)
    untouched[pos] = untouched[neg[:, 0]] = False
    assert torch.equal(item[untouched], before[untouched])
