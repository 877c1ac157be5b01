"""csrc's DBPR forward kernel (through the sim, via ctypes) against guider_fast.reference.dbpr."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from guider_fast.reference import dbpr as ref

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def lib(sim_library):
    lib = ctypes.CDLL(str(sim_library))
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float, ctypes.c_int
    lib.gf_sim_dbpr_forward.argtypes = [p, i64, i64, p, i64, i64, i32, p, p, p, i64, i64, p, i32, i64,
                                        i64, i64, i64, f32, f32, p, p, p, p, ctypes.c_char_p, i32]
    lib.gf_sim_dbpr_backward.argtypes = [p, i64, i64, p, i64, i64, i32, p, p, p, i64, i64, p, p, i64,
                                         i64, i64, i64, p, p, ctypes.c_char_p, i32]
    lib.gf_sim_set_order.argtypes = [i32, ctypes.c_ulonglong]
    yield lib
    lib.gf_sim_set_order(0, 0)


def sim_dbpr_forward(lib, user, item, users, pos, neg, weights, scale=1.0, l2=0.0, order=0):
    lib.gf_sim_set_order(order, 1)
    batch, k = neg.shape
    rows, log_sig = torch.full((batch,), float("nan")), torch.full((batch,), float("nan"))
    coef, margins = torch.full((batch, k + 1), float("nan")), torch.full((batch, k), float("nan"))
    error = ctypes.create_string_buffer(2048)
    status = lib.gf_sim_dbpr_forward(
        user.data_ptr(), *user.stride(), item.data_ptr(), *item.stride(), DTYPES[user.dtype], users.data_ptr(),
        pos.data_ptr(), neg.data_ptr(), *neg.stride(), None if weights is None else weights.data_ptr(),
        0 if weights is None else DTYPES[weights.dtype], 0 if weights is None else weights.stride(0),
        batch, k, user.shape[1], scale, l2, rows.data_ptr(), coef.data_ptr(), log_sig.data_ptr(),
        margins.data_ptr(), error, len(error))
    assert status == 0, error.value.decode()
    return rows, coef, log_sig, margins


def _problem(batch, k, dim, dtype, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    user = (torch.randn(11, dim, generator=g) * 0.5).to(dtype)
    item = (torch.randn(19, dim, generator=g) * 0.5).to(dtype)
    users = torch.randint(0, 11, (batch,), generator=g)
    pos = torch.randint(0, 19, (batch,), generator=g)
    neg = torch.randint(0, 19, (batch, k), generator=g)
    weights = torch.rand(batch, generator=g).to(dtype) if weighted else None
    return user, item, users, pos, neg, weights


@pytest.mark.parametrize("batch, k, dim, dtype, weighted", [
    (1, 1, 1, torch.float32, False), (7, 3, 5, torch.float16, True), (33, 1, 64, torch.bfloat16, True),
    (33, 4, 70, torch.float32, True), (130, 2, 64, torch.float32, False),
])
def test_forward_matches_reference(lib, batch, k, dim, dtype, weighted):
    user, item, users, pos, neg, weights = _problem(batch, k, dim, dtype, weighted, seed=batch + k + dim)
    rows, coef, log_sig, margins = sim_dbpr_forward(lib, user, item, users, pos, neg, weights)

    u, p, n, margin_ref = ref.gather_and_score(user, item, users, pos, neg)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(margins, margin_ref, **tol)
    torch.testing.assert_close(log_sig, F.logsigmoid(margin_ref).mean(1), **tol)
    rows_ref = ref.dbpr_rows(user.float(), item.float(), users, pos, neg,
                             None if weights is None else weights.float())
    torch.testing.assert_close(rows, rows_ref, **tol)
    # G from the reference's backward pieces: s = c_b sigmoid(-margin), G_b0 = -sum_k s_bk.
    w = torch.ones(batch) if weights is None else weights.float()
    s, s_total = ref.scaled_sigmoid(margin_ref, w)
    torch.testing.assert_close(coef, torch.cat([-s_total, s], 1), **tol)


def test_scale_and_l2(lib):
    user, item, users, pos, neg, weights = _problem(33, 3, 40, torch.float32, True, seed=3)
    rows, coef, _, _ = sim_dbpr_forward(lib, user, item, users, pos, neg, weights, scale=2.0, l2=0.1)
    base, coef1, _, _ = sim_dbpr_forward(lib, user, item, users, pos, neg, weights)
    squares = (user[users] ** 2).sum(1) + (item[pos] ** 2).sum(1) + (item[neg] ** 2).sum((1, 2))
    torch.testing.assert_close(rows, base + 0.05 * squares, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coef, 2.0 * coef1, rtol=0, atol=0)  # exact: scaling by 2


def test_forward_identical_across_thread_orders(lib):
    problem = _problem(33, 4, 70, torch.bfloat16, True, seed=9)
    runs = [sim_dbpr_forward(lib, *problem, order=order) for order in (0, 1, 2)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def sim_dbpr_backward(lib, user, item, users, pos, neg, coef, grad_rows, order=0, seed=1):
    lib.gf_sim_set_order(order, seed)
    batch, k = neg.shape
    grad_user, grad_item = torch.zeros(user.shape, dtype=torch.float32), torch.zeros(item.shape, dtype=torch.float32)
    error = ctypes.create_string_buffer(2048)
    status = lib.gf_sim_dbpr_backward(
        user.data_ptr(), *user.stride(), item.data_ptr(), *item.stride(), DTYPES[user.dtype], users.data_ptr(),
        pos.data_ptr(), neg.data_ptr(), *neg.stride(), coef.data_ptr(), grad_rows.data_ptr(), grad_rows.stride(0),
        batch, k, user.shape[1], grad_user.data_ptr(), grad_item.data_ptr(), error, len(error))
    assert status == 0, error.value.decode()
    return grad_user, grad_item


BACKWARD_CASES = [(1, 1, 1, torch.float32, False), (7, 3, 5, torch.float16, True), (33, 1, 64, torch.bfloat16, True),
                  (33, 4, 70, torch.float32, True), (130, 2, 33, torch.float32, False)]


def reference_gradients(user, item, users, pos, neg, weights, grad_rows):
    """Autograd through guider_fast.reference.dbpr's rows, float32 tables."""
    u, i = user.float().requires_grad_(), item.float().requires_grad_()
    rows = ref.dbpr_rows(u, i, users, pos, neg, None if weights is None else weights.float())
    return torch.autograd.grad(rows, (u, i), grad_rows)


@pytest.mark.parametrize("batch, k, dim, dtype, weighted", BACKWARD_CASES)
def test_backward_matches_reference(lib, batch, k, dim, dtype, weighted):
    user, item, users, pos, neg, weights = _problem(batch, k, dim, dtype, weighted, seed=batch + 2 * k + dim)
    _, coef, _, _ = sim_dbpr_forward(lib, user, item, users, pos, neg, weights)
    grad_rows = torch.randn(batch, generator=torch.Generator().manual_seed(batch)) / batch
    for order in (0, 1, 2):  # the sums of duplicate rows follow the atomics' order: close, not equal
        grad_user, grad_item = sim_dbpr_backward(lib, user, item, users, pos, neg, coef, grad_rows, order)
        want_user, want_item = reference_gradients(user, item, users, pos, neg, weights, grad_rows)
        torch.testing.assert_close(grad_user, want_user, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_item, want_item, rtol=1e-5, atol=1e-6)


def test_backward_without_duplicates_is_identical_across_thread_orders(lib):
    # Distinct rows everywhere: each gradient word gets one atomic, so no order can change a bit.
    batch, k, dim = 9, 2, 70
    g = torch.Generator().manual_seed(4)
    user, item = torch.randn(batch, dim, generator=g).bfloat16(), torch.randn(batch * (k + 1), dim, generator=g)
    item = item.bfloat16()
    users, order_items = torch.randperm(batch, generator=g), torch.randperm(batch * (k + 1), generator=g)
    pos, neg = order_items[:batch].contiguous(), order_items[batch:].reshape(batch, k)
    _, coef, _, _ = sim_dbpr_forward(lib, user, item, users, pos, neg, None)
    grad_rows = torch.randn(batch, generator=g)
    runs = [sim_dbpr_backward(lib, user, item, users, pos, neg, coef, grad_rows, order, seed)
            for order, seed in ((0, 0), (1, 0), (2, 1), (2, 2))]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
