"""Triton DBPR kernels (forward, atomic / sorted-segment / sparse backward, fused step) against
the torch reference, run by Triton's interpreter on CPU tensors."""

import pytest
import torch

import guider_fast as gf
from guider_fast import _library

pytest.importorskip("triton")

TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against a float64 oracle on the same (rounded) table values: the loss is one
# float32 reduction away; gradients are float32 sums rounded once to the table dtype.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=8e-3, atol=4e-3),
       torch.float16: dict(rtol=1e-3, atol=5e-4)}
LAYOUTS = [dict(), dict(deterministic=True), dict(deterministic=False), dict(sparse_grad=True)]


def _problem(gen, n_users=11, n_items=7, dim=13, batch=37, k=1, dtype=torch.float32,
             with_weights=True):
    """Few rows for many triplets: every row repeats (popular items)."""
    user = (torch.randn(n_users, dim, generator=gen, dtype=torch.float64) * 0.4).to(dtype)
    item = (torch.randn(n_items, dim, generator=gen, dtype=torch.float64) * 0.4).to(dtype)
    users = torch.randint(0, n_users, (batch,), generator=gen)
    pos = torch.randint(0, n_items, (batch,), generator=gen)
    neg = torch.randint(0, n_items, (batch,) if k is None else (batch, k), generator=gen)
    weights = (torch.rand(batch, generator=gen) + 0.1).to(dtype) if with_weights else None
    return user, item, users, pos, neg, weights


def _loss_and_grads(user, item, users, pos, neg, weights, reduction="mean", **kw):
    u = user.detach().clone().requires_grad_()
    i = item.detach().clone().requires_grad_()
    w = None if weights is None else weights.detach().clone().requires_grad_()
    out = gf.dbpr_loss(u, i, users, pos, neg, w, reduction=reduction, **kw)
    inputs = (u, i) if w is None else (u, i, w)
    grads = torch.autograd.grad(out.sum(), inputs)
    return out, [g.to_dense() for g in grads]


def _oracle(user, item, users, pos, neg, weights, reduction="mean"):
    return _loss_and_grads(user.double(), item.double(), users, pos, neg,
                           None if weights is None else weights.double(), reduction,
                           backend="torch")


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("k", [None, 1, 5])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["auto", "deterministic", "atomic", "sparse"])
def test_loss_and_gradients_match_reference(gen, dtype, k, with_weights, layout):
    problem = _problem(gen, k=k, dtype=dtype, with_weights=with_weights)
    out, grads = _loss_and_grads(*problem, backend="triton", **layout)
    want, want_grads = _oracle(*problem)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=TOL[dtype]["rtol"],
                                   atol=TOL[dtype]["atol"] * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dim", [1, 70, 257])
def test_reductions_and_odd_widths(gen, reduction, dim):
    problem = _problem(gen, n_users=23, n_items=19, dim=dim, batch=61, k=3)
    out, grads = _loss_and_grads(*problem, reduction=reduction, backend="triton", deterministic=True)
    want, want_grads = _oracle(*problem, reduction=reduction)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, **TOL[torch.float32])


def test_one_hot_popular_item_and_single_triplet(gen):
    """Every positive the same item (one long sorted run), and B = 1."""
    user, item, users, pos, neg, weights = _problem(gen, batch=45, k=2)
    pos = torch.full_like(pos, 3)
    for args in ((user, item, users, pos, neg, weights),
                 (user, item, users[:1], pos[:1], neg[:1], weights[:1])):
        out, grads = _loss_and_grads(*args, backend="triton", deterministic=True)
        want, want_grads = _oracle(*args)
        torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got.double(), expected, **TOL[torch.float32])


def test_deterministic_mode_is_bit_identical_and_follows_torch_flag(gen):
    problem = _problem(gen, n_users=3, n_items=4, batch=200, k=5)
    first = _loss_and_grads(*problem, backend="triton", deterministic=True)
    second = _loss_and_grads(*problem, backend="triton", deterministic=True)
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        flagged = _loss_and_grads(*problem, backend="triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first[1], flagged[1]):
        assert torch.equal(a, b)  # None follows the flag: the sorted-segment kernels


def test_sparse_gradients_feed_sparse_adam(gen):
    user, item, users, pos, neg, weights = _problem(gen, k=2)
    user_emb = torch.nn.Embedding.from_pretrained(user.clone(), freeze=False, sparse=True)
    item_emb = torch.nn.Embedding.from_pretrained(item.clone(), freeze=False, sparse=True)
    optimizer = torch.optim.SparseAdam([user_emb.weight, item_emb.weight], lr=0.05)
    loss = gf.dbpr_loss(user_emb.weight, item_emb.weight, users, pos, neg, weights,
                        backend="triton", sparse_grad=True)
    loss.backward()
    assert user_emb.weight.grad.is_sparse and item_emb.weight.grad.is_sparse
    assert user_emb.weight.grad._nnz() == users.shape[0]
    assert item_emb.weight.grad._nnz() == pos.shape[0] + neg.numel()
    _, (want_user, want_item, _) = _oracle(user, item, users, pos, neg, weights)
    torch.testing.assert_close(user_emb.weight.grad.to_dense().double(), want_user, **TOL[torch.float32])
    torch.testing.assert_close(item_emb.weight.grad.to_dense().double(), want_item, **TOL[torch.float32])
    before = item_emb.weight.detach().clone()
    optimizer.step()
    touched = torch.zeros(item.shape[0], dtype=torch.bool)
    touched[pos] = True
    touched[neg.reshape(-1)] = True
    assert not torch.equal(item_emb.weight[touched], before[touched])
    assert torch.equal(item_emb.weight[~touched], before[~touched])


def test_float64_tables_are_refused_by_triton_with_reason(gen):
    user, item, users, pos, neg, _ = _problem(gen, dtype=torch.float64, with_weights=False)
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16"):
        gf.dbpr_loss(user, item, users, pos, neg, backend="triton")
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, backend="triton")


# ------------------------------------------------------------------------------ fused step

STEP_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float16: dict(rtol=2e-3, atol=1e-3)}


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("k", [None, 5])
@pytest.mark.parametrize("l2", [0.0, 0.02])
def test_fused_step_matches_torch_step(gen, dtype, optimizer, k, l2):
    user, item, users, pos, neg, weights = _problem(gen, k=k, dtype=dtype, dim=19)
    tables = {name: (user.clone(), item.clone()) for name in ("torch", "triton")}
    states = {name: gf.RowwiseAdagradState(user, item) if optimizer == "rowwise_adagrad" else None
              for name in tables}
    results = {}
    for step in range(2):  # the second step sees non-zero accumulators
        for name, (u, i) in tables.items():
            results[name] = gf.dbpr_step(u, i, users, pos, neg, weights, lr=0.1, optimizer=optimizer,
                                         state=states[name], l2=l2, return_scores=True, backend=name)
    (loss_t, margins_t), (loss_k, margins_k) = results["torch"], results["triton"]
    tol = STEP_TOL[dtype]
    torch.testing.assert_close(loss_k.double(), loss_t.double(), **tol)
    torch.testing.assert_close(margins_k.double(), margins_t.double(), **tol)
    for got, want in zip(tables["triton"], tables["torch"]):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), **tol)
    if optimizer == "rowwise_adagrad":
        acc_tol = dict(rtol=max(1e-4, tol["rtol"]), atol=1e-7)
        torch.testing.assert_close(states["triton"].user, states["torch"].user, **acc_tol)
        torch.testing.assert_close(states["triton"].item, states["torch"].item, **acc_tol)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_step_equals_float64_dense_autograd(gen, reduction):
    user, item, users, pos, neg, weights = _problem(gen, n_users=5, n_items=4, batch=80, k=3, dim=70)
    u64 = user.double().requires_grad_()
    i64 = item.double().requires_grad_()
    want_loss = gf.dbpr_loss(u64, i64, users, pos, neg, weights.double(), reduction=reduction)
    grad_user, grad_item = torch.autograd.grad(want_loss, (u64, i64))
    untouched = torch.ones(item.shape[0] + 3, dtype=torch.bool)
    item_padded = torch.cat([item, torch.randn(3, item.shape[1], generator=gen)])
    before = item_padded.clone()
    untouched[pos] = False
    untouched[neg.reshape(-1)] = False
    loss = gf.dbpr_step(user, item_padded, users, pos, neg, weights, lr=0.3, reduction=reduction,
                        backend="triton")
    torch.testing.assert_close(loss.double(), want_loss.detach(), **STEP_TOL[torch.float32])
    torch.testing.assert_close(user.double(), u64.detach() - 0.3 * grad_user, **STEP_TOL[torch.float32])
    torch.testing.assert_close(item_padded[:item.shape[0]].double(), i64.detach() - 0.3 * grad_item,
                               **STEP_TOL[torch.float32])
    assert torch.equal(item_padded[untouched], before[untouched])  # only the batch's rows move


def test_fused_step_is_bit_identical_across_runs(gen):
    user, item, users, pos, neg, weights = _problem(gen, n_users=3, n_items=4, batch=300, k=2)
    results = []
    for _ in range(2):
        u, i = user.clone(), item.clone()
        state = gf.RowwiseAdagradState(u, i)
        loss = gf.dbpr_step(u, i, users, pos, neg, weights, lr=0.05, optimizer="rowwise_adagrad",
                            state=state, backend="triton")
        results.append((loss, u, i, state.user, state.item))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_custom_ops_pass_opcheck(gen):
    user, item, users, pos, neg, weights = _problem(gen, k=2)
    rows, coef, log_sig = _library.dbpr_forward(user, item, users, pos, neg, weights)
    torch.library.opcheck(_library.dbpr_forward, (user, item, users, pos, neg, weights))
    torch.library.opcheck(_library.dbpr_forward, (user, item, users, pos, neg, None))
    grad_rows = torch.rand(users.shape[0], generator=gen)
    for mode in ("atomic", "deterministic", "sparse"):
        torch.library.opcheck(_library.dbpr_backward,
                              (user, item, users, pos, neg, coef, grad_rows, mode))
    state = gf.RowwiseAdagradState(user, item)
    torch.library.opcheck(_library.dbpr_fused_step,
                          (user.clone(), item.clone(), users, pos, neg, weights, state.user.clone(),
                           state.item.clone(), 0.1, 0.01, 1.0 / users.shape[0]))
    torch.library.opcheck(_library.dbpr_atomic_sgd_step,
                          (user.clone(), item.clone(), users, pos, neg, weights, 0.1, 0.01, 1.0))


def test_compiled_training_step_traces_without_graph_breaks(gen):
    """fullgraph=True fails on any graph break; value checks (a host read) are off, as in production."""
    user, item, users, pos, neg, weights = _problem(gen, k=2)
    u = user.clone().requires_grad_()
    i = item.clone().requires_grad_()

    def loss_fn(u, i):
        return gf.dbpr_loss(u, i, users, pos, neg, weights, backend="triton", deterministic=True)

    gf.set_checks(False)
    try:
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(u, i), (u, i))
        want = torch.autograd.grad(loss_fn(u, i), (u, i))
    finally:
        gf.set_checks(None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------- atomic (Hogwild) step

@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_atomic_step_equals_exact_step_within_one_block(gen, k, l2):
    """One block of triplets reads every row before adding: then Hogwild is the exact step
    (up to summation order; with L2, the decay of a repeated negative re-reads its row)."""
    user, item, users, pos, neg, weights = _problem(gen, k=k, dim=16, batch=20)
    exact = (user.clone(), item.clone())
    atomic = (user.clone(), item.clone())
    want = gf.dbpr_step(*exact, users, pos, neg, weights, lr=0.2, l2=l2, return_scores=True,
                        backend="torch")
    got = gf.dbpr_step(*atomic, users, pos, neg, weights, lr=0.2, l2=l2, return_scores=True,
                       duplicates="atomic", backend="triton")
    tol = STEP_TOL[torch.float32] if l2 == 0 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(got + atomic, want + exact):
        torch.testing.assert_close(a, b, **tol)


def test_atomic_step_across_blocks_stays_close_and_lowers_the_loss(gen):
    user, item, users, pos, neg, weights = _problem(gen, n_users=30, n_items=40, k=2, dim=16,
                                                    batch=1000)
    exact = (user.clone(), item.clone())
    atomic = (user.clone(), item.clone())
    first = gf.dbpr_step(*atomic, users, pos, neg, weights, lr=0.05, duplicates="atomic",
                         backend="triton")
    gf.dbpr_step(*exact, users, pos, neg, weights, lr=0.05, backend="torch")
    # Blocks that run later see earlier blocks' updates: second-order differences only.
    for a, b in zip(atomic, exact):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    second = gf.dbpr_loss(*atomic, users, pos, neg, weights, backend="torch")
    assert second < first


def test_atomic_policy_errors(gen):
    user, item, users, pos, neg, weights = _problem(gen)
    state = gf.RowwiseAdagradState(user, item)
    with pytest.raises(ValueError, match="only SGD"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, optimizer="rowwise_adagrad", state=state,
                     duplicates="atomic")
    with pytest.raises(TypeError, match="float32"):
        gf.dbpr_step(user.bfloat16(), item.bfloat16(), users, pos, neg, lr=0.1, duplicates="atomic")
    with pytest.raises(ValueError, match="duplicates"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, duplicates="hogwild")


def test_step_on_parameters_that_require_grad(gen):
    user, item, users, pos, neg, weights = _problem(gen)
    user_param, item_param = torch.nn.Parameter(user.clone()), torch.nn.Parameter(item.clone())
    for duplicates in ("sorted", "atomic"):
        gf.dbpr_step(user_param, item_param, users, pos, neg, weights, lr=0.1, duplicates=duplicates,
                     backend="triton")
    assert user_param.grad is None and not torch.equal(user_param.detach(), user)
