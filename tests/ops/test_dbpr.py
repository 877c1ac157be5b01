"""guider_fast.dbpr_loss: every backend, gradient layout and dtype against the float64 DBPR formula."""

import pytest
import torch

import guider_fast as gf
from guider_fast import _library

from .properties import given, st
from .backends import KERNEL_BACKENDS, dtypes_for, reason, require
from .problems import dbpr_formula, dbpr_oracle, triplets
from .tolerances import tolerance

CUDA_ONLY = pytest.mark.cuda_only
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Gradient layouts: dense (deterministic=False: atomic adds on a GPU), sorted segment
# sums (deterministic=True), per-occurrence sparse rows.
LAYOUTS = {"dense": dict(deterministic=False), "deterministic": dict(deterministic=True),
           "sparse": dict(sparse_grad=True)}
# Every reduction with the dense layout and every layout with "mean", plus two more pairs.
REDUCTION_LAYOUTS = [("mean", "dense"), ("sum", "dense"), ("none", "dense"), ("mean", "deterministic"),
                     ("mean", "sparse"), ("sum", "sparse"), ("none", "deterministic")]


def _loss_and_grads(user, item, users, pos, neg, weights, reduction="mean", grad_out=None, **kw):
    u = user.detach().clone().requires_grad_()
    i = item.detach().clone().requires_grad_()
    w = None if weights is None else weights.detach().clone().requires_grad_()
    out = gf.dbpr_loss(u, i, users, pos, neg, w, reduction=reduction, **kw)
    inputs = (u, i) if w is None else (u, i, w)
    upstream = torch.ones_like(out) if grad_out is None else grad_out.to(out)
    return out.detach(), list(torch.autograd.grad(out, inputs, upstream))


def assert_matches_formula(problem, backend, dtype, reduction="mean", layout="dense"):
    user, item, users, pos, neg, weights = problem
    # reduction "none": a random upstream gradient per triplet (never all ones).
    grad_out = None
    if reduction == "none":
        grad_out = torch.rand(users.shape[0], generator=torch.Generator().manual_seed(7),
                              dtype=torch.float64) + 0.5
    out, grads = _loss_and_grads(*problem, reduction, grad_out, backend=backend, **LAYOUTS[layout])
    leaves = [t.detach().cpu().double().requires_grad_() for t in (user, item)]
    w = None if weights is None else weights.detach().cpu().double().requires_grad_()
    want = dbpr_formula(*leaves, users, pos, neg, w, reduction)
    want_grads = torch.autograd.grad(want, leaves + ([w] if w is not None else []),
                                     None if grad_out is None else grad_out)
    tol = tolerance("dbpr", backend, dtype)
    assert out.dtype == dtype and out.shape == want.shape and out.device == user.device
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=tol.rtol,
                               atol=tol.atol * max(1.0, want.abs().max().item()))
    touched = (users, torch.cat([pos, neg.reshape(-1)]))
    for k, (got, expected) in enumerate(zip(grads, want_grads)):
        assert got.dtype == dtype and got.shape == expected.shape
        assert got.is_sparse == (layout == "sparse" and k < 2)
        if got.is_sparse:
            # Per-occurrence rows (uncoalesced), summed here in float64: rounding the
            # sum back to a half dtype would add an error the op does not make.
            got = torch.sparse_coo_tensor(got._indices(), got._values().double(), got.shape,
                                          check_invariants=False).to_dense()
        got = got.double().cpu()
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, expected, rtol=tol.rtol,
                                   atol=tol.atol * max(1.0, expected.abs().max().item()))
        if k < 2:  # rows outside the batch get exactly zero
            untouched = torch.ones(got.shape[0], dtype=torch.bool)
            untouched[touched[k].cpu()] = False
            assert bool((got[untouched] == 0).all())


@pytest.mark.parametrize("reduction,layout", REDUCTION_LAYOUTS, ids=["-".join(c) for c in REDUCTION_LAYOUTS])
@pytest.mark.parametrize("with_weights", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("k", [None, 1, 5])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_matches_formula_with_duplicates(gen, backend, device, dtype, k, with_weights, reduction, layout):
    problem = triplets(gen, k=k, dtype=dtype, device=device, weights=with_weights)
    require("dbpr", backend, device, dtype, (layout,))
    assert_matches_formula(problem, backend, dtype, reduction, layout)


# (n_users, n_items, D, B, K, weights, dtype, reduction): odd widths, then GPU sizes
# (few rows -> many duplicates; K None/1/5; both dtypes).
SIZES = [(23, 19, 1, 61, 3, True, torch.float32, "sum"), (23, 19, 70, 61, 3, False, torch.float32, "none"),
         (23, 19, 257, 61, 3, True, torch.float32, "sum"), (1, 1, 1, 1, None, False, torch.float32, "mean")]
SIZES += [pytest.param(case, marks=CUDA_ONLY) for case in [
    (97, 333, 64, 1000, None, True, torch.bfloat16, "mean"),
    (97, 333, 64, 1000, 5, True, torch.float32, "none"),
    (1000, 2001, 256, 4099, 1, False, torch.float32, "sum"),
    (1000, 2001, 256, 4099, 5, True, torch.bfloat16, "none"),
    (20, 10, 100, 5000, 5, True, torch.float32, "mean"),
    (20, 10, 100, 5000, 1, False, torch.bfloat16, "mean"),
    (3000, 7050, 64, 65537, 1, True, torch.float32, "mean"),
    (3000, 7050, 48, 65537, 5, True, torch.bfloat16, "sum")]]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", SIZES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_sizes_match_formula(gen, backend, device, case, layout):
    n_users, n_items, dim, batch, k, with_weights, dtype, reduction = case
    problem = triplets(gen, n_users, n_items, dim, batch, k, dtype, device, with_weights)
    require("dbpr", backend, device, dtype, (layout,))
    assert_matches_formula(problem, backend, dtype, reduction, layout)


def test_one_popular_item_and_a_single_triplet(gen, backend, device):
    """Every positive the same item (one long sorted run), and B = 1."""
    user, item, users, pos, neg, weights = triplets(gen, batch=45, k=2, device=device)
    require("dbpr", backend, device, user.dtype, ("dense",))
    pos = torch.full_like(pos, 3)
    for layout in [name for name in LAYOUTS if reason("dbpr", backend, device, user.dtype, (name,)) is None]:
        assert_matches_formula((user, item, users, pos, neg, weights), backend, user.dtype, "mean", layout)
        assert_matches_formula((user, item, users[:1], pos[:1], neg[:1], weights[:1]), backend,
                               user.dtype, "sum", layout)


@given(data=st.data(), n_users=st.integers(1, 9), n_items=st.integers(1, 9), dim=st.integers(1, 40),
       batch=st.integers(1, 40), k=st.sampled_from([None, 1, 2, 3, 7]), with_weights=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**31 - 1))
def test_property_matches_formula(backend, device, data, n_users, n_items, dim, batch, k, with_weights,
                                  reduction, seed):
    require("dbpr", backend, device, problem=("dense",))
    dtype = data.draw(st.sampled_from(dtypes_for("dbpr", backend, device)), label="dtype")
    layout = data.draw(st.sampled_from([name for name in LAYOUTS
                                        if reason("dbpr", backend, device, dtype, (name,)) is None]),
                       label="layout")
    problem = triplets(torch.Generator().manual_seed(seed), n_users, n_items, dim, batch, k, dtype, device,
                       with_weights)
    assert_matches_formula(problem, backend, dtype, reduction, layout)


def test_gradcheck_float64_including_weights(gen):
    user = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    item = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    users = torch.tensor([0, 3, 3, 4, 1])
    pos = torch.tensor([2, 2, 5, 0, 1])
    neg = torch.tensor([[1, 4], [4, 4], [0, 3], [5, 2], [2, 2]])
    weights = torch.rand(5, generator=gen, dtype=torch.float64).requires_grad_()
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda u, i, w: gf.dbpr_loss(u, i, users, pos, neg, w, reduction=reduction, backend="torch"),
            (user, item, weights))


def test_weights_gradient_only_when_required(gen, backend, device):
    user, item, users, pos, neg, weights = triplets(gen, 4, 4, 3, 3, device=device)
    require("dbpr", backend, device, user.dtype, ("dense",))
    user.requires_grad_()
    item.requires_grad_()
    gf.dbpr_loss(user, item, users, pos, neg, weights, backend=backend).backward()
    assert weights.grad is None and user.grad is not None and item.grad is not None


def test_int32_indices_accepted(gen, backend, device):
    user, item, users, pos, neg, _ = triplets(gen, 6, 9, 5, 8, 3, device=device)
    require("dbpr", backend, device, user.dtype, ("dense",))
    a = gf.dbpr_loss(user, item, users, pos, neg, backend=backend)
    b = gf.dbpr_loss(user, item, users.int(), pos.int(), neg.int(), backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", [(3, 4, 13, 200, 5), pytest.param((13, 10, 64, 20_000, 5), marks=CUDA_ONLY)],
                         ids=lambda s: "x".join(map(str, s)))
def test_deterministic_layout_follows_the_torch_flag(gen, backend, device, size, dtype):
    """deterministic=None under torch.use_deterministic_algorithms(True) gives the sorted
    segment sums bit for bit; on a GPU, repeated runs are bit-identical too (on CPU every
    layout is deterministic by construction, so the repeat only tests something there)."""
    n_users, n_items, dim, batch, k = size
    problem = triplets(gen, n_users, n_items, dim, batch, k, dtype, device)
    require("dbpr", backend, device, dtype, ("deterministic",))
    first = _loss_and_grads(*problem, backend=backend, deterministic=True)
    runs = [first]
    if device.type != "cpu":
        runs.append(_loss_and_grads(*problem, backend=backend, deterministic=True))
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        runs.append(_loss_and_grads(*problem, backend=backend))
    finally:
        torch.use_deterministic_algorithms(previous)
    for loss, grads in runs[1:]:
        assert torch.equal(loss, first[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, first[1]))


def test_sparse_gradients_feed_sparse_adam(gen, backend, device):
    user, item, users, pos, neg, weights = triplets(gen, k=2, device=device)
    require("dbpr", backend, device, user.dtype, ("sparse",))
    require("dbpr", backend, device, user.dtype, ("deterministic",))
    user_emb = torch.nn.Embedding.from_pretrained(user.clone(), freeze=False, sparse=True)
    item_emb = torch.nn.Embedding.from_pretrained(item.clone(), freeze=False, sparse=True)
    optimizer = torch.optim.SparseAdam([user_emb.weight, item_emb.weight], lr=0.05)
    loss = gf.dbpr_loss(user_emb.weight, item_emb.weight, users, pos, neg, weights,
                        backend=backend, sparse_grad=True)
    loss.backward()
    assert user_emb.weight.grad.is_sparse and item_emb.weight.grad.is_sparse
    assert user_emb.weight.grad._nnz() == users.shape[0]
    assert item_emb.weight.grad._nnz() == pos.shape[0] + neg.numel()
    dense_loss, _ = _loss_and_grads(user, item, users, pos, neg, weights, backend=backend, deterministic=True)
    torch.testing.assert_close(loss.detach(), dense_loss, rtol=0, atol=0)  # same forward
    _, want_user, want_item, _ = dbpr_oracle(user, item, users, pos, neg, weights)
    tol = tolerance("dbpr", backend, user.dtype)
    torch.testing.assert_close(user_emb.weight.grad.to_dense().double().cpu(), want_user,
                               rtol=tol.rtol, atol=tol.atol)
    torch.testing.assert_close(item_emb.weight.grad.to_dense().double().cpu(), want_item,
                               rtol=tol.rtol, atol=tol.atol)
    before = item_emb.weight.detach().clone()
    optimizer.step()
    touched = torch.zeros(item.shape[0], dtype=torch.bool, device=device)
    touched[pos] = True
    touched[neg.reshape(-1)] = True
    assert not torch.equal(item_emb.weight[touched], before[touched])
    assert torch.equal(item_emb.weight[~touched], before[~touched])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_training_step_traces_without_graph_breaks(gen, backend, device):
    """fullgraph=True fails on any graph break; value checks (a host read) are off, as in production."""
    user, item, users, pos, neg, weights = triplets(gen, k=2, device=device)
    require("dbpr", backend, device, user.dtype, ("deterministic",))
    u = user.clone().requires_grad_()
    i = item.clone().requires_grad_()

    def loss_fn(u, i):
        return gf.dbpr_loss(u, i, users, pos, neg, weights, backend=backend, deterministic=True)

    gf.set_checks(False)
    try:
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(u, i), (u, i))
        want = torch.autograd.grad(loss_fn(u, i), (u, i))
    finally:
        gf.set_checks(None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_triton_custom_ops_pass_opcheck(gen, device):
    require("dbpr", "triton", device, torch.float32)
    user, item, users, pos, neg, weights = triplets(gen, k=2, device=device)
    _, coef, _ = _library.dbpr_forward(user, item, users, pos, neg, weights)
    torch.library.opcheck(_library.dbpr_forward, (user, item, users, pos, neg, weights))
    torch.library.opcheck(_library.dbpr_forward, (user, item, users, pos, neg, None))
    grad_rows = torch.rand(users.shape[0], generator=gen).to(device)
    for mode in ("atomic", "deterministic", "sparse"):
        torch.library.opcheck(_library.dbpr_backward, (user, item, users, pos, neg, coef, grad_rows, mode))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.cuda_only
def test_loss_beyond_32_bit_offsets(backend, device):
    """item rows x D > 2^31 elements: row offsets must be 64-bit (compared with the torch backend)."""
    require("dbpr", backend, device, torch.float32, ("sparse",))
    n_items = (1 << 31) // 256 + 4099
    free = torch.cuda.mem_get_info()[0]
    if free < 12 * 2**30:
        pytest.skip(f"needs 12 GiB of free device memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device=device).manual_seed(1)
    item = torch.randn(n_items, 256, device=device, generator=gen).mul_(0.1)
    user = torch.randn(100, 256, device=device, generator=gen).mul_(0.1)
    users = torch.randint(0, 100, (4096,), device=device, generator=gen)
    pos = torch.randint(n_items - 100, n_items, (4096,), device=device, generator=gen)
    neg = torch.randint(n_items - 1000, n_items, (4096, 5), device=device, generator=gen)
    results = []
    for name in (backend, "torch"):
        it = item.detach().requires_grad_()
        loss = gf.dbpr_loss(user, it, users, pos, neg, backend=name, sparse_grad=True)
        results.append((loss.detach(), torch.autograd.grad(loss, it)[0].coalesce()))
    (loss_k, grad_k), (loss_t, grad_t) = results
    tol = tolerance("dbpr", backend, torch.float32)
    torch.testing.assert_close(loss_k, loss_t, rtol=tol.rtol, atol=tol.atol)
    assert torch.equal(grad_k.indices(), grad_t.indices())
    scale = grad_t.values().abs().max().item()
    assert (grad_k.values() - grad_t.values()).abs().max().item() <= 5e-5 * scale
