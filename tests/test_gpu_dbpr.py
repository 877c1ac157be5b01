"""GPU checks of the DBPR, dbpr_step and calibration Triton kernels against backend="torch".

Skipped without a CUDA device; CUDA is queried inside the fixture, never at collection.
tests/conftest.py turns Triton's interpreter on unless TRITON_INTERPRET is set: run with
TRITON_INTERPRET=0 on the GPU machine (benchmarks/device_check.sh does) to test the
compiled kernels.  Every check draws fresh random inputs (never zeros), with many
duplicate indices where the summation of gradients is under test.
"""


import pytest
import torch

import guider_fast as gf


def _need_free(gib):
    free = torch.cuda.mem_get_info()[0]
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free device memory, {free / 2**30:.1f} GiB free")


def _problem(device, n_users, n_items, dim, batch, k, dtype, seed=0, weights=True):
    gen = torch.Generator().manual_seed(seed)
    user = (torch.randn(n_users, dim, generator=gen) * 0.3).to(device=device, dtype=dtype)
    item = (torch.randn(n_items, dim, generator=gen) * 0.3).to(device=device, dtype=dtype)
    users = torch.randint(0, n_users, (batch,), generator=gen).to(device)
    pos = torch.randint(0, n_items, (batch,), generator=gen).to(device)
    neg = torch.randint(0, n_items, (batch,) if k is None else (batch, k), generator=gen).to(device)
    w = (torch.rand(batch, generator=gen) + 0.1).to(device) if weights else None
    return user, item, users, pos, neg, w


def _loss_and_grads(user, item, users, pos, neg, w, reduction="mean", grad_out_seed=None, **kw):
    u = user.detach().clone().requires_grad_()
    i = item.detach().clone().requires_grad_()
    out = gf.dbpr_loss(u, i, users, pos, neg, w, reduction=reduction, **kw)
    grad_out = None
    if reduction == "none":
        gen = torch.Generator().manual_seed(grad_out_seed or 0)
        grad_out = (torch.rand(out.shape, generator=gen) + 0.5).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (u, i), grad_out)
    return out.detach(), grads


def _assert_rows_close(got, want, tol, what):
    """max|got - want| <= tol * max|want| (gradient sums in another order; NaN fails)."""
    got, want = got.double(), want.double()
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item() / scale
    assert err <= tol, f"{what}: max error {err:.2e} of the largest value (tolerance {tol:.0e})"


GRAD_TOL = {torch.float32: 5e-5, torch.bfloat16: 1.6e-2}
LOSS_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}

# (n_users, n_items, D, B, K, weights, dtype, reduction): odd sizes, K None/1/5, weights
# None/given, both dtypes; few rows -> many duplicates.
LOSS_CASES = [
    (1, 1, 1, 1, None, False, torch.float32, "mean"),
    (11, 7, 13, 37, 1, True, torch.float32, "mean"),
    (11, 7, 13, 37, 5, False, torch.bfloat16, "sum"),
    (97, 333, 64, 1000, None, True, torch.bfloat16, "mean"),
    (97, 333, 64, 1000, 5, True, torch.float32, "none"),
    (1000, 2001, 256, 4099, 1, False, torch.float32, "sum"),
    (1000, 2001, 256, 4099, 5, True, torch.bfloat16, "none"),
    (20, 10, 100, 5000, 5, True, torch.float32, "mean"),
    (20, 10, 100, 5000, 1, False, torch.bfloat16, "mean"),
    (3000, 7050, 64, 65537, 1, True, torch.float32, "mean"),
    (3000, 7050, 48, 65537, 5, True, torch.bfloat16, "sum"),
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_dbpr_loss_triton_matches_torch(cuda, case):
    n_users, n_items, dim, batch, k, with_w, dtype, reduction = case
    user, item, users, pos, neg, w = _problem(cuda, n_users, n_items, dim, batch, k, dtype, weights=with_w)
    loss_tri, grads_tri = _loss_and_grads(user, item, users, pos, neg, w, reduction, backend="triton",
                                          deterministic=False)
    loss_ref, grads_ref = _loss_and_grads(user, item, users, pos, neg, w, reduction, backend="torch")
    assert loss_tri.dtype == loss_ref.dtype and loss_tri.shape == loss_ref.shape
    torch.testing.assert_close(loss_tri.double(), loss_ref.double(), **LOSS_TOL[dtype])
    negatives = neg.reshape(-1)
    for g_tri, g_ref, touched, name in ((grads_tri[0], grads_ref[0], users, "user grad"),
                                        (grads_tri[1], grads_ref[1], torch.cat([pos, negatives]), "item grad")):
        assert g_tri.dtype == dtype and g_tri.shape == g_ref.shape and not g_tri.is_sparse
        _assert_rows_close(g_tri, g_ref, GRAD_TOL[dtype], name)
        untouched = torch.ones(g_tri.shape[0], dtype=torch.bool, device=cuda)
        untouched[touched] = False
        assert bool((g_tri[untouched] == 0).all()), f"{name}: rows outside the batch were written"


def test_dbpr_loss_triton_weight_gradient(cuda):
    user, item, users, pos, neg, w = _problem(cuda, 50, 40, 64, 3001, 3, torch.float32)
    results = []
    for backend in ("triton", "torch"):
        wr = w.detach().clone().requires_grad_()
        u = user.detach().clone().requires_grad_()
        loss = gf.dbpr_loss(u, item, users, pos, neg, wr, backend=backend)
        results.append(torch.autograd.grad(loss, (u, wr)))
    for got, want in zip(*results):
        _assert_rows_close(got, want, GRAD_TOL[torch.float32], "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5])
def test_dbpr_loss_deterministic_is_bit_identical(cuda, dtype, k):
    # 20,000 triplets on 10 items: thousands of contributions per gradient row.
    user, item, users, pos, neg, w = _problem(cuda, 13, 10, 64, 20_000, k, dtype, seed=k)
    runs = [_loss_and_grads(user, item, users, pos, neg, w, backend="triton", deterministic=True)
            for _ in range(2)]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:  # deterministic=None follows the global switch
        runs.append(_loss_and_grads(user, item, users, pos, neg, w, backend="triton"))
    finally:
        torch.use_deterministic_algorithms(previous)
    (loss0, grads0) = runs[0]
    for loss, grads in runs[1:]:
        assert torch.equal(loss, loss0)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads0))
    _, grads_ref = _loss_and_grads(user, item, users, pos, neg, w, backend="torch")
    for got, want in zip(grads0, grads_ref):
        _assert_rows_close(got, want, GRAD_TOL[dtype], "deterministic gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 5])
def test_dbpr_loss_sparse_grad_matches_dense(cuda, dtype, k):
    user, item, users, pos, neg, w = _problem(cuda, 40, 30, 72, 4001, k, dtype, seed=3)
    loss_sp, grads_sp = _loss_and_grads(user, item, users, pos, neg, w, backend="triton", sparse_grad=True)
    loss_dn, grads_dn = _loss_and_grads(user, item, users, pos, neg, w, backend="triton", deterministic=True)
    _, grads_ref = _loss_and_grads(user, item, users, pos, neg, w, backend="torch", sparse_grad=True)
    torch.testing.assert_close(loss_sp, loss_dn, rtol=0, atol=0)

    def dense32(g):  # per-occurrence rows summed in float32 (bf16 sums would add rounding)
        return torch.sparse_coo_tensor(g.indices(), g.values().float(), g.shape).to_dense()

    for sp, dn, ref, table in zip(grads_sp, grads_dn, grads_ref, (user, item)):
        assert sp.is_sparse and sp.layout == torch.sparse_coo
        assert sp.shape == table.shape and sp.dtype == dtype
        _assert_rows_close(dense32(sp), dense32(ref), GRAD_TOL[dtype], "sparse gradient vs torch")
        if dtype == torch.float32:
            _assert_rows_close(sp.to_dense(), dn, GRAD_TOL[dtype], "sparse gradient vs dense")


# (n_users, n_items, D, B, K, l2, reduction): many duplicates first, then odd sizes.
STEP_CASES = [
    (5, 7, 64, 3000, 1, 0.0, "mean"),
    (5, 7, 64, 3000, 5, 0.01, "sum"),
    (1000, 5001, 100, 4097, 5, 0.0, "mean"),
    (37, 2, 256, 70_000, 1, 0.01, "mean"),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dbpr_step_triton_matches_torch(cuda, case, optimizer, dtype):
    n_users, n_items, dim, batch, k, l2, reduction = case
    user, item, users, pos, neg, w = _problem(cuda, n_users, n_items, dim, batch, k, dtype, seed=batch)
    # lr so that the update is large next to the rounding of the rows.
    lr = 0.05 * (batch if reduction == "mean" else 1) if optimizer == "sgd" else 0.05
    tables, states, outs = {}, {}, {}
    for backend in ("triton", "torch"):
        u, i = user.clone(), item.clone()
        state = gf.RowwiseAdagradState(u, i) if optimizer == "rowwise_adagrad" else None
        outs[backend] = [gf.dbpr_step(u, i, users, pos, neg, w, lr=lr, optimizer=optimizer, state=state,
                                      l2=l2, reduction=reduction, return_scores=True, backend=backend)
                         for _ in range(2)]
        tables[backend], states[backend] = (u, i), state
    # The second step starts from tables that differ by rounding: looser there.
    for step, ((loss_t, marg_t), (loss_r, marg_r)) in enumerate(zip(outs["triton"], outs["torch"])):
        tol = (1e-5 if dtype == torch.float32 else 1.6e-2) * (1 if step == 0 else 100 if dtype == torch.float32
                                                              else 4)
        _assert_rows_close(loss_t.reshape(1), loss_r.reshape(1), tol, f"loss of step {step}")
        _assert_rows_close(marg_t, marg_r, tol, f"margins of step {step}")
    touched = (users, torch.cat([pos, neg.reshape(-1)]))
    for got, want, start, rows, name in zip(tables["triton"], tables["torch"], (user, item), touched,
                                            ("user table", "item table")):
        assert got.dtype == dtype
        # Error relative to the largest update of the two steps.
        update = (want.double() - start.double()).abs().max().item()
        err = (got.double() - want.double()).abs().max().item()
        limit = 1e-4 * update if dtype == torch.float32 else 1.6e-2 * want.double().abs().max().item()
        assert bool(torch.isfinite(got).all()) and err <= limit, f"{name}: error {err:.2e} (limit {limit:.2e})"
        untouched = torch.ones(got.shape[0], dtype=torch.bool, device=cuda)
        untouched[rows] = False
        assert torch.equal(got[untouched], start[untouched]), f"{name}: rows outside the batch moved"
    if optimizer == "rowwise_adagrad":
        for name in ("user", "item"):
            _assert_rows_close(getattr(states["triton"], name), getattr(states["torch"], name),
                               1e-4 if dtype == torch.float32 else 3e-2, f"{name} accumulators")


def _codes(batch, bits, gen, device, zeros=0.1):
    """Real-valued hash outputs with some exact zeros (sign(0) = 0: ternary codes)."""
    code = torch.randn(batch, bits, generator=gen)
    code[torch.rand(batch, bits, generator=gen) < zeros] = 0.0
    return code.to(device)


def _assert_calibration_close(got, want, threshold, what):
    scale = want.distance.abs().max().item()
    torch.testing.assert_close(got.distance.double(), want.distance.double(), rtol=1e-5, atol=1e-5 * scale,
                               msg=f"{what}: distance")
    torch.testing.assert_close(got.normalized.double(), want.normalized.double(), rtol=1e-5, atol=1e-5,
                               msg=f"{what}: normalized")
    # A row may flip only where its normalised distance sits on the threshold.
    flipped = got.clean != want.clean
    assert bool(((want.normalized[flipped] - threshold).abs() < 1e-4).all()), f"{what}: clean flags differ"
    same = ~flipped
    torch.testing.assert_close(got.weights[same].double(), want.weights[same].double(), rtol=1e-6, atol=1e-6,
                               msg=f"{what}: weights")
    assert got.clean.dtype == torch.bool and got.weights.shape == want.weights.shape


@pytest.mark.parametrize("batch", [1, 7, 2049, 65_537])
@pytest.mark.parametrize("d,bits", [(64, 64), (13, 100)])
@pytest.mark.parametrize("distance", ["geomloss", "euclidean"])
def test_calibrate_triton_matches_torch(cuda, batch, d, bits, distance):
    gen = torch.Generator().manual_seed(batch + d + bits)
    t = torch.randn(batch, d, generator=gen).to(cuda)
    v = (t.cpu() + 0.5 * torch.randn(batch, d, generator=gen)).to(cuda)
    codes = [_codes(batch, bits, gen, cuda) for _ in range(3)]
    got = gf.calibrate(t, v, *codes, distance=distance, backend="triton")
    want = gf.calibrate(t, v, *codes, distance=distance, backend="torch")
    _assert_calibration_close(got, want, 0.7, "calibrate")


def test_calibrate_triton_bfloat16(cuda):
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(4097, 64, generator=gen).to(cuda, torch.bfloat16)
    v = torch.randn(4097, 64, generator=gen).to(cuda, torch.bfloat16)
    codes = [_codes(4097, 64, gen, cuda).to(torch.bfloat16) for _ in range(3)]
    got = gf.calibrate(t, v, *codes, backend="triton")
    want = gf.calibrate(t, v, *codes, backend="torch")
    assert got.weights.dtype == want.weights.dtype
    _assert_calibration_close(got, want, 0.7, "calibrate bf16")


@pytest.mark.parametrize("n_items,batch,bits", [(7050, 2048, 64), (1001, 65_537, 100), (3, 500, 64)])
@pytest.mark.parametrize("distance", ["geomloss", "euclidean"])
def test_calibrate_items_triton_matches_torch(cuda, n_items, batch, bits, distance):
    gen = torch.Generator().manual_seed(n_items + batch)
    t = torch.randn(n_items, 64, generator=gen).to(cuda)
    v = (t.cpu() + 0.5 * torch.randn(n_items, 64, generator=gen)).to(cuda)
    t_code, v_code = _codes(n_items, bits, gen, cuda), _codes(n_items, bits, gen, cuda)
    cache = gf.precompute_item_calibration(t, v, t_code, v_code, distance=distance)
    u_code = _codes(batch, bits, gen, cuda)
    items = torch.randint(0, n_items, (batch,), generator=gen).to(cuda)
    got = gf.calibrate_items(cache, u_code, items, backend="triton")
    want = gf.calibrate_items(cache, u_code, items, backend="torch")
    _assert_calibration_close(got, want, 0.7, "calibrate_items triton vs torch")
    # ... and both equal calibrate on the gathered rows.
    direct = gf.calibrate(t[items], v[items], u_code, t_code[items], v_code[items], distance=distance,
                          backend="torch")
    _assert_calibration_close(got, direct, 0.7, "calibrate_items vs calibrate")


def _big_step_check(cuda, n_items, dim, batch, dtype, optimizer):
    """dbpr_step triton vs torch on a table too large for 32-bit offsets (or nearly)."""
    gen = torch.Generator(device=cuda).manual_seed(n_items)
    user = torch.randn(1000, dim, device=cuda, generator=gen).mul_(0.1).to(dtype)
    item = torch.randn(n_items, dim, device=cuda, generator=gen).mul_(0.1).to(dtype)
    users = torch.randint(0, 1000, (batch,), device=cuda, generator=gen)
    pos = torch.randint(0, n_items, (batch,), device=cuda, generator=gen)
    neg = torch.randint(n_items - 5000, n_items, (batch, 1), device=cuda, generator=gen)  # the last rows
    pos[:100] = n_items - 1
    w = torch.rand(batch, device=cuda, generator=gen).add_(0.1)
    ref_user, ref_item = user.clone(), item.clone()
    lr = 0.05 * batch
    states = [gf.RowwiseAdagradState(u, i) if optimizer == "rowwise_adagrad" else None
              for u, i in ((user, item), (ref_user, ref_item))]
    loss = gf.dbpr_step(user, item, users, pos, neg, w, lr=lr, optimizer=optimizer, state=states[0],
                        backend="triton")
    ref_loss = gf.dbpr_step(ref_user, ref_item, users, pos, neg, w, lr=lr, optimizer=optimizer,
                            state=states[1], backend="torch")
    torch.testing.assert_close(loss.double(), ref_loss.double(), **LOSS_TOL[dtype])
    rows = torch.cat([pos, neg.reshape(-1)]).unique()
    got, want = item.index_select(0, rows).double(), ref_item.index_select(0, rows).double()
    assert bool(torch.isfinite(got).all())
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= (1e-5 if dtype == torch.float32 else 1.6e-2) * scale
    # Whole table, in chunks: nothing but the batch rows differs from the torch step.
    moved = torch.zeros(n_items, dtype=torch.bool, device=cuda)
    for start in range(0, n_items, 1 << 20):
        stop = min(start + (1 << 20), n_items)
        moved[start:stop] = (item[start:stop] != ref_item[start:stop]).any(1)
    in_batch = torch.zeros(n_items, dtype=torch.bool, device=cuda)
    in_batch[rows] = True
    assert not bool((moved & ~in_batch).any()), "rows outside the batch differ"


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_dbpr_step_ten_million_row_table(cuda, optimizer):
    _need_free(8)
    _big_step_check(cuda, 10_000_000, 64, 1 << 16, torch.float32, optimizer)


def test_dbpr_step_and_loss_beyond_32_bit_offsets(cuda):
    """item rows x D > 2^31 elements: row offsets must be 64-bit."""
    n_items = (1 << 31) // 256 + 4099
    _need_free(22)
    _big_step_check(cuda, n_items, 256, 1 << 14, torch.float32, "sgd")
    torch.cuda.empty_cache()
    gen = torch.Generator(device=cuda).manual_seed(1)
    item = torch.randn(n_items, 256, device=cuda, generator=gen).mul_(0.1)
    user = torch.randn(100, 256, device=cuda, generator=gen).mul_(0.1)
    users = torch.randint(0, 100, (4096,), device=cuda, generator=gen)
    pos = torch.randint(n_items - 100, n_items, (4096,), device=cuda, generator=gen)
    neg = torch.randint(n_items - 1000, n_items, (4096, 5), device=cuda, generator=gen)
    losses = []
    for backend in ("triton", "torch"):
        it = item.detach().requires_grad_()
        loss = gf.dbpr_loss(user, it, users, pos, neg, backend=backend, sparse_grad=True)
        grad = torch.autograd.grad(loss, it)[0].coalesce()
        losses.append((loss.detach(), grad))
    (loss_t, grad_t), (loss_r, grad_r) = losses
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    assert torch.equal(grad_t.indices(), grad_r.indices())
    _assert_rows_close(grad_t.values(), grad_r.values(), GRAD_TOL[torch.float32], "sparse item gradient")
