"""csrc's fused DBPR steps (dbpr_step.cu, through the sim via ctypes) against the torch step
(guider_fast.reference.dbpr_step): the sorted-exact step (SGD, row-wise Adagrad), bitwise
across thread orders, and the atomic (Hogwild) SGD step."""

from __future__ import annotations

import ctypes

import pytest
import torch

from guider_fast.reference import dbpr_step as ref_step

from .test_sim_dbpr import DTYPES

# Tables after a step: the float32 result rounded once to the table dtype (one ulp there).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.fixture(scope="module")
def step_lib(sim_library):
    lib = ctypes.CDLL(str(sim_library))
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float, ctypes.c_int
    lib.gf_sim_dbpr_step.argtypes = [p, i64, i64, p, i64, i64, i32, p, p, p, i64, i64, p, i32, i64, p, p, p, p, p, p,
                                     i64, i64, i64, f32, f32, f32, p, p, p, ctypes.c_char_p, i32]
    lib.gf_sim_dbpr_atomic_sgd_step.argtypes = [p, i64, i64, p, i64, i64, p, p, p, i64, i64, p, i32, i64, i64, i64,
                                                i64, f32, f32, f32, p, p, ctypes.c_char_p, i32]
    lib.gf_sim_dbpr_step_workspace_floats.restype = i64
    lib.gf_sim_set_order.argtypes = [i32, ctypes.c_ulonglong]
    yield lib
    lib.gf_sim_set_order(0, 0)


def _weights_args(weights):
    if weights is None:
        return None, 0, 0
    return weights.data_ptr(), DTYPES[weights.dtype], weights.stride(0)


def sim_step(lib, user, item, users, pos, neg, weights, lr, l2=0.0, scale=1.0, acc=None, order=0, seed=1):
    """One sorted step in place on (user, item) (and acc = (user_acc, item_acc)): (rows, margins)."""
    lib.gf_sim_set_order(order, seed)
    batch, k = neg.shape
    (uk, uo), (ik, io) = ref_step._sort_rows(users, torch.cat([pos, neg.reshape(-1)]), user.shape[0])
    runs = [x.long().contiguous() for x in (uk, uo, ik, io)]
    rows, margins = torch.full((batch,), float("nan")), torch.full((batch, k), float("nan"))
    workspace = torch.full((lib.gf_sim_dbpr_step_workspace_floats(batch, k, user.shape[1]),), float("nan"))
    error = ctypes.create_string_buffer(2048)
    status = lib.gf_sim_dbpr_step(
        user.data_ptr(), *user.stride(), item.data_ptr(), *item.stride(), DTYPES[user.dtype], users.data_ptr(),
        pos.data_ptr(), neg.data_ptr(), *neg.stride(), *_weights_args(weights), *(r.data_ptr() for r in runs),
        None if acc is None else acc[0].data_ptr(), None if acc is None else acc[1].data_ptr(),
        batch, k, user.shape[1], lr, l2, scale, rows.data_ptr(), margins.data_ptr(), workspace.data_ptr(),
        error, len(error))
    assert status == 0, error.value.decode()
    return rows, margins


def sim_atomic_step(lib, user, item, users, pos, neg, weights, lr, l2=0.0, scale=1.0, order=0, seed=1):
    lib.gf_sim_set_order(order, seed)
    batch, k = neg.shape
    rows, margins = torch.full((batch,), float("nan")), torch.full((batch, k), float("nan"))
    error = ctypes.create_string_buffer(2048)
    status = lib.gf_sim_dbpr_atomic_sgd_step(
        user.data_ptr(), *user.stride(), item.data_ptr(), *item.stride(), users.data_ptr(), pos.data_ptr(),
        neg.data_ptr(), *neg.stride(), *_weights_args(weights), batch, k, user.shape[1], lr, l2, scale,
        rows.data_ptr(), margins.data_ptr(), error, len(error))
    assert status == 0, error.value.decode()
    return rows, margins


def problem(batch, k, dim, dtype, weighted, seed, n_users=7, n_items=11, transposed=False):
    """Small tables: many duplicate rows per batch."""
    g = torch.Generator().manual_seed(seed)
    user = (torch.randn(n_users, dim, generator=g) * 0.5).to(dtype)
    item = (torch.randn(n_items, dim, generator=g) * 0.5).to(dtype)
    if transposed:  # strided rows: the kernels' scalar path
        user, item = user.t().contiguous().t(), item.t().contiguous().t()
    users = torch.randint(0, n_users, (batch,), generator=g)
    pos = torch.randint(0, n_items, (batch,), generator=g)
    neg = torch.randint(0, n_items, (batch, k), generator=g)
    weights = torch.rand(batch, generator=g).to(dtype) if weighted else None
    return user, item, users, pos, neg, weights


def reference_step(user, item, users, pos, neg, weights, lr, optimizer, acc, l2, reduction):
    """The torch step in float32 on copies: (user, item, loss, margins, acc)."""
    u, i = user.float().clone(), item.float().clone()
    acc = None if acc is None else tuple(a.clone() for a in acc)
    loss, margins = ref_step.dbpr_step(u, i, users, pos, neg, None if weights is None else weights.float(), lr,
                                       optimizer, *(acc or (None, None)), l2, reduction)
    return u, i, loss, margins, acc


# (batch, K, D, dtype, weighted, transposed): odd D on the scalar path, whole 16-byte
# packs (D = 64 float32, 16 / 256 16-bit) on the vector path, 257 > one 128-wide chunk.
CASES = [(1, 1, 1, torch.float32, False, False), (40, 5, 13, torch.float32, True, False),
         (33, 1, 70, torch.bfloat16, True, False), (24, 5, 257, torch.float32, False, False),
         (50, 1, 64, torch.float32, True, False), (30, 5, 16, torch.bfloat16, False, False),
         (20, 3, 256, torch.float16, True, False), (20, 2, 12, torch.float32, True, True)]


@pytest.mark.parametrize("batch, k, dim, dtype, weighted, transposed", CASES)
@pytest.mark.parametrize("optimizer, l2", [("sgd", 0.0), ("sgd", 0.05), ("rowwise_adagrad", 0.05)])
def test_sorted_step_matches_torch_step(step_lib, batch, k, dim, dtype, weighted, transposed, optimizer, l2):
    user, item, users, pos, neg, weights = problem(batch, k, dim, dtype, weighted, seed=batch + k + dim,
                                                   transposed=transposed)
    adagrad = optimizer == "rowwise_adagrad"
    acc = (torch.zeros(user.shape[0]), torch.zeros(item.shape[0])) if adagrad else None
    want_u, want_i, want_acc = user.float(), item.float(), acc
    for _ in range(2 if adagrad else 1):  # Adagrad: the second step reads the first's sums
        want_u, want_i, want_loss, want_margins, want_acc = reference_step(
            want_u.to(dtype), want_i.to(dtype), users, pos, neg, weights, 0.1, optimizer, want_acc, l2, "mean")
        rows, margins = sim_step(step_lib, user, item, users, pos, neg, weights, 0.1, l2, 1.0 / batch, acc)
        torch.testing.assert_close(rows.sum() / batch, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(margins, want_margins, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(user.float(), want_u.to(dtype).float(), **TOL[dtype])
        torch.testing.assert_close(item.float(), want_i.to(dtype).float(), **TOL[dtype])
        if adagrad:
            for got, want in zip(acc, want_acc):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype, dim, optimizer", [(torch.bfloat16, 70, "rowwise_adagrad"),
                                                   (torch.float32, 257, "sgd"), (torch.float16, 16, "sgd"),
                                                   (torch.float32, 64, "rowwise_adagrad")])
def test_sorted_step_is_identical_across_thread_orders(step_lib, dtype, dim, optimizer):
    base = problem(45, 3, dim, dtype, True, seed=dim)
    results = []
    for order, seed in ((0, 0), (1, 0), (2, 1), (2, 2)):
        user, item, *rest = (x.clone() if x is not None else None for x in base)
        acc = (torch.zeros(user.shape[0]), torch.zeros(item.shape[0])) if optimizer != "sgd" else None
        rows, margins = sim_step(step_lib, user, item, *rest, 0.1, 0.01, 1.0 / 45, acc, order, seed)
        results.append((rows, margins, user, item, *(acc or ())))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                               b.view(torch.int16 if b.element_size() == 2 else torch.int32))


# ------------------------------------------------------------------ atomic (Hogwild) SGD

@pytest.mark.parametrize("k, dim, l2, transposed", [(1, 16, 0.0, False), (4, 13, 0.05, False),
                                                    (5, 256, 0.0, False), (2, 16, 0.05, True)])
def test_atomic_step_within_one_block_is_the_exact_step(step_lib, k, dim, l2, transposed):
    # 16 triplets: one block on both paths; every row read before any atomic add.
    user, item, users, pos, neg, weights = problem(16, k, dim, torch.float32, True, seed=k + dim,
                                                   transposed=transposed)
    want_u, want_i, want_loss, want_margins, _ = reference_step(user, item, users, pos, neg, weights, 0.2, "sgd",
                                                                None, l2, "mean")
    rows, margins = sim_atomic_step(step_lib, user, item, users, pos, neg, weights, 0.2, l2, 1.0 / 16, order=2)
    # With L2 the decay of a repeated negative re-reads its row (as the Triton kernel).
    tol = dict(rtol=1e-5, atol=1e-6) if l2 == 0 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows.sum() / 16, want_loss, **tol)
    torch.testing.assert_close(margins, want_margins, rtol=1e-5, atol=1e-5)  # D = 256 dots: sum order
    torch.testing.assert_close(user, want_u, **tol)
    torch.testing.assert_close(item, want_i, **tol)


def test_atomic_step_across_blocks_stays_close_and_lowers_the_loss(step_lib):
    user, item, users, pos, neg, weights = problem(300, 2, 16, torch.float32, True, seed=5, n_users=30,
                                                   n_items=40)
    want_u, want_i, first, _, _ = reference_step(user, item, users, pos, neg, weights, 0.05, "sgd", None, 0.0,
                                                 "mean")
    sim_atomic_step(step_lib, user, item, users, pos, neg, weights, 0.05, 0.0, 1.0 / 300)
    # Later blocks see earlier blocks' updates: second-order differences only.
    torch.testing.assert_close(user, want_u, rtol=0, atol=1e-3)
    torch.testing.assert_close(item, want_i, rtol=0, atol=1e-3)
    _, _, second, _, _ = reference_step(user, item, users, pos, neg, weights, 0.05, "sgd", None, 0.0, "mean")
    assert second < first
