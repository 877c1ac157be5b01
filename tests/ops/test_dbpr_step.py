"""guider_fast.dbpr_step: each fused sparse step equals dense float64 autograd followed by the optimizer."""

import math

import pytest
import torch

import guider_fast as gf
from guider_fast import _library

from .properties import given, st
from .backends import KERNEL_BACKENDS, dtypes_for, require
from .problems import step_oracle, triplets
from .tolerances import tolerance, ulp

CUDA_ONLY = pytest.mark.cuda_only
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (k, l2, reduction): K = None / 1 / 5 with and without L2, both reductions.
SETTINGS = [(None, 0.0, "mean"), (1, 0.01, "sum"), (5, 0.0, "sum"), (5, 0.01, "mean")]


def _touched(users, pos, neg, n_users, n_items):
    rows_u = torch.zeros(n_users, dtype=torch.bool, device=users.device)
    rows_i = torch.zeros(n_items, dtype=torch.bool, device=users.device)
    rows_u[users] = True
    rows_i[pos] = True
    rows_i[neg.reshape(-1)] = True
    return rows_u, rows_i


def assert_step_matches(tables, before, want, tol, lr, grad_rms=None, what=""):
    """|got - want| <= ulp(storage) |want| + tol.update * scale * cond.

    scale: the largest update max|want - before|, or lr max|row| if larger (each
    gradient contribution is at most about a row, sigmoid <= 1: float32 residues
    stay relative to that when the exact update cancels to nearly nothing).

    ``grad_rms`` (row-wise Adagrad): the step is lr * g / rms(g) per row, so the
    float32 error of g, relative to the batch's largest gradient, is divided by
    the row's own RMS: cond = max RMS / row RMS.  A row whose exact gradient
    cancels to 0 (its item both positive and negative of one triplet, nowhere
    else) gets a step along the rounding residue: only bounded by lr sqrt(D) (|g_j| / rms(g) <= sqrt(D)).
    """
    for k, (got, start, expected) in enumerate(zip(tables, before, want)):
        got, start, expected = got.detach().double().cpu(), start.double().cpu(), expected.double()
        assert bool(torch.isfinite(got).all()), what
        update = max((expected - start).abs().max().item(), lr * start.abs().max().item())
        excess = ((got - expected).abs() - ulp(tables[0].dtype) * expected.abs()).clamp_min(0)
        cond = torch.ones(got.shape[0], dtype=torch.float64)
        if grad_rms is not None:
            rms = grad_rms[k]
            cond = (max(rms.max().item(), 1e-300) / rms).clamp(min=1.0)
            cancelled = rms <= 1e-5 * rms.max()
            bound = (got - start).abs()[cancelled]
            assert bool((bound <= 1.01 * lr * got.shape[1] ** 0.5).all()), what
            excess[cancelled] = 0.0
        worst = (excess.max(1).values / cond).max().item()
        assert worst <= tol.update * update, f"{what}: {worst:.2e} beyond one ulp, update {update:.2e}"


def run_steps(problem, backend, lr, optimizer, l2, reduction, steps=2):
    """``steps`` steps of ``backend``, each checked against the exact step from the tables before it."""
    user, item, users, pos, neg, weights = problem
    dtype = user.dtype
    tol = tolerance("dbpr_step", backend, dtype)
    u, i = user.clone(), item.clone()
    state = gf.RowwiseAdagradState(u, i) if optimizer == "rowwise_adagrad" else None
    rows_u, rows_i = _touched(users, pos, neg, u.shape[0], i.shape[0])
    for step in range(steps):  # the second step sees non-zero accumulators
        before = (u.clone(), i.clone())
        want_u, want_i, want_loss, want_margins, acc_u, acc_i, grad_rms = step_oracle(
            u, i, users, pos, neg, weights, lr, optimizer, l2, reduction, state)
        loss, margins = gf.dbpr_step(u, i, users, pos, neg, weights, lr=lr, optimizer=optimizer, state=state,
                                     l2=l2, reduction=reduction, return_scores=True, backend=backend)
        what = f"{backend} {dtype} {optimizer} step {step}"
        assert u.dtype == dtype and not loss.requires_grad and loss.device == u.device
        torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=tol.loss, atol=tol.loss, msg=what)
        torch.testing.assert_close(margins.double().cpu(), want_margins, rtol=0, atol=tol.margins, msg=what)
        assert_step_matches((u, i), before, (want_u, want_i), tol, lr,
                            grad_rms if optimizer == "rowwise_adagrad" else None, what)
        assert torch.equal(u[~rows_u], before[0][~rows_u]) and torch.equal(i[~rows_i], before[1][~rows_i])
        if state is not None:
            for got, want in ((state.user, acc_u), (state.item, acc_i)):
                torch.testing.assert_close(got.double().cpu(), want.double(), rtol=tol.accumulators,
                                           atol=1e-30, msg=what)
            assert bool((state.item[~rows_i] == 0).all()) and bool((state.user[~rows_u] == 0).all())
    return u, i, state


@pytest.mark.parametrize("k,l2,reduction", SETTINGS, ids=[f"k{k}-l2_{l2}-{r}" for k, l2, r in SETTINGS])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_two_steps_equal_exact_steps(gen, backend, device, dtype, optimizer, k, l2, reduction):
    problem = triplets(gen, k=k, dim=19, dtype=dtype, device=device, weights_dtype=torch.float32)
    require("dbpr_step", backend, device, dtype)
    run_steps(problem, backend, 0.1, optimizer, l2, reduction)


# (n_users, n_items, D, B, K, l2, reduction): the torch CPU step's size-dependent
# routes (sort by padding to the radix threshold, radix sort on int32 keys) with
# many repeated rows, then GPU sizes.
SIZES = [(300, 5000, 8, 3_000, 1, 0.01, "sum"), (300, 5000, 8, 20_000, 3, 0.0, "sum"),
         (300, 5000, 8, 40_000, 1, 0.0, "mean")]
SIZES += [pytest.param(case, marks=CUDA_ONLY) for case in [
    (5, 7, 64, 3000, 1, 0.0, "mean"), (5, 7, 64, 3000, 5, 0.01, "sum"),
    (1000, 5001, 100, 4097, 5, 0.0, "mean"), (37, 2, 256, 70_000, 1, 0.01, "mean")]]


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SIZES, ids=lambda c: "-".join(map(str, c)))
def test_large_batches_equal_exact_steps(gen, backend, device, case, dtype, optimizer):
    if backend != "torch" and device.type == "cpu":
        pytest.skip("sizes for the torch CPU step's routes: the interpreted kernels take the small cases")
    n_users, n_items, dim, batch, k, l2, reduction = case
    problem = triplets(gen, n_users, n_items, dim, batch, k, dtype, device, weights_dtype=torch.float32)
    require("dbpr_step", backend, device, dtype)
    # SGD: an update large next to the rows' rounding (the mean divides by B).
    lr = (0.05 * (batch if reduction == "mean" else 1)) if optimizer == "sgd" else 0.05
    run_steps(problem, backend, lr, optimizer, l2, reduction)


@given(data=st.data(), n_users=st.integers(1, 9), n_items=st.integers(1, 9), dim=st.integers(1, 33),
       batch=st.integers(1, 40), k=st.sampled_from([None, 1, 2, 3, 6]),
       optimizer=st.sampled_from(["sgd", "rowwise_adagrad"]), l2=st.sampled_from([0.0, 0.03]),
       reduction=st.sampled_from(["mean", "sum"]), with_weights=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_steps_equal_exact_steps(backend, device, data, n_users, n_items, dim, batch, k, optimizer,
                                          l2, reduction, with_weights, seed):
    require("dbpr_step", backend, device)
    dtype = data.draw(st.sampled_from(dtypes_for("dbpr_step", backend, device)), label="dtype")
    problem = triplets(torch.Generator().manual_seed(seed), n_users, n_items, dim, batch, k, dtype, device,
                       with_weights, weights_dtype=torch.float32)
    run_steps(problem, backend, 0.2, optimizer, l2, reduction)


def test_step_is_bit_identical_across_runs_on_gpu(gen, backend, device):
    """duplicates="sorted" promises bit-identical steps on the GPU too (on CPU every path
    is sequential, deterministic by construction: nothing to test there)."""
    if device.type == "cpu":
        pytest.skip("deterministic by construction on CPU")
    user, item, users, pos, neg, weights = triplets(gen, 3, 4, 64, 20_000, 3, device=device)
    require("dbpr_step", backend, device, user.dtype)
    results = []
    for _ in range(2):
        u, i = user.clone(), item.clone()
        state = gf.RowwiseAdagradState(u, i)
        loss = gf.dbpr_step(u, i, users, pos, neg, weights, lr=0.05, optimizer="rowwise_adagrad",
                            state=state, backend=backend)
        results.append((loss, u, i, state.user, state.item))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_workspace_reuse_is_safe(gen):
    """The torch CPU step reuses its gathered-row buffers: repeats after steps of other sizes
    are bit-identical, and returned margins are not views of the workspace."""
    user, item, users, pos, neg, weights = triplets(gen, 50, 40_000, 16, 30_000, 2)
    small = triplets(gen, 50, 40, 16, 100, 1)
    results = []
    for other in (None, small):
        if other is not None:
            gf.dbpr_step(other[0].clone(), other[1].clone(), *other[2:], lr=0.1, backend="torch")
        u, i = user.clone(), item.clone()
        loss, margins = gf.dbpr_step(u, i, users, pos, neg, weights, lr=0.05, return_scores=True,
                                     backend="torch")
        kept = margins.clone()
        gf.dbpr_step(u.clone(), i.clone(), users, pos, neg, weights, lr=0.05, backend="torch")
        assert torch.equal(margins, kept)
        results.append((loss, margins, u, i))
    for a, b in zip(*results):
        assert torch.equal(a, b)


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


def test_parameters_are_updated_in_place_without_grad(gen, backend, device):
    user, item, users, pos, neg, weights = triplets(gen, device=device)
    require("dbpr_step", backend, device, user.dtype)
    user_param, item_param = torch.nn.Parameter(user.clone()), torch.nn.Parameter(item.clone())
    for duplicates in ("sorted", "atomic"):
        loss = gf.dbpr_step(user_param, item_param, users, pos, neg, weights, lr=0.1, duplicates=duplicates,
                            backend=backend)
        assert not loss.requires_grad
    assert user_param.grad is None and item_param.grad is None
    assert not torch.equal(user_param.detach(), user) and not torch.equal(item_param.detach(), item)


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_cancelling_gradients_leave_rows_exactly_unchanged(gen, backend, device, optimizer):
    """A triplet whose negative is its positive has a zero gradient (G_b0 = -G_b1): its user row
    must not move.  Row-wise Adagrad divides by sqrt(acc) + 1e-10, so a rounding residue
    (an fma of the cancelling terms) would turn into a step of about lr."""
    require("dbpr_step", backend, device, torch.float32)
    user = torch.randn(6, 9, generator=gen).to(device)
    item = torch.randn(7, 9, generator=gen).to(device)
    users = torch.tensor([0, 1, 2, 3, 1], device=device)
    pos = torch.tensor([4, 2, 5, 0, 6], device=device)
    neg = torch.tensor([[4], [3], [5], [1], [6]], device=device)  # rows 0, 2 and 4 cancel
    new_user, new_item = user.clone(), item.clone()
    kwargs = dict(optimizer=optimizer)
    if optimizer == "rowwise_adagrad":
        kwargs["state"] = gf.RowwiseAdagradState(new_user, new_item)
    gf.dbpr_step(new_user, new_item, users, pos, neg, lr=0.5, backend=backend, **kwargs)
    for row in (0, 2):
        assert torch.equal(new_user[row], user[row]), (optimizer, row)
    assert not torch.equal(new_user[1], user[1])


# ------------------------------------------------------------------- atomic (Hogwild) step

@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_atomic_step_equals_exact_step_within_one_block(gen, backend, device, k, l2):
    """One block of triplets reads every row before adding: then Hogwild is the exact step
    (up to summation order; with L2, the decay of a repeated negative re-reads its row)."""
    user, item, users, pos, neg, weights = triplets(gen, k=k, dim=16, batch=20, device=device)
    require("dbpr_step", backend, device, user.dtype, ("atomic", 16, l2))
    u, i = user.clone(), item.clone()
    loss, margins = gf.dbpr_step(u, i, users, pos, neg, weights, lr=0.2, l2=l2, return_scores=True,
                                 duplicates="atomic", backend=backend)
    want_u, want_i, want_loss, want_margins, *_ = step_oracle(user, item, users, pos, neg, weights, 0.2,
                                                                "sgd", l2, "mean")
    tol = dict(rtol=1e-5, atol=1e-6) if l2 == 0 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double().cpu(), want_loss, **tol)
    torch.testing.assert_close(margins.double().cpu(), want_margins, **tol)
    torch.testing.assert_close(u.double().cpu(), want_u.double(), **tol)
    torch.testing.assert_close(i.double().cpu(), want_i.double(), **tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_atomic_step_across_blocks_stays_close_and_lowers_the_loss(gen, backend, device):
    user, item, users, pos, neg, weights = triplets(gen, 30, 40, 16, 1000, 2, device=device)
    require("dbpr_step", backend, device, user.dtype)
    atomic = (user.clone(), item.clone())
    first = gf.dbpr_step(*atomic, users, pos, neg, weights, lr=0.05, duplicates="atomic", backend=backend)
    want_u, want_i, *_ = step_oracle(user, item, users, pos, neg, weights, 0.05, "sgd", 0.0, "mean")
    # Blocks that run later see earlier blocks' updates: second-order differences only.
    for a, b in zip(atomic, (want_u, want_i)):
        torch.testing.assert_close(a.double().cpu(), b.double(), rtol=0, atol=1e-3)
    second = gf.dbpr_loss(*atomic, users, pos, neg, weights, backend="torch")
    assert second < first


def test_step_rejects_bad_input(gen):
    user, item, users, pos, neg, weights = triplets(gen)
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
    state = gf.RowwiseAdagradState(user, item)
    with pytest.raises(ValueError, match="only SGD"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, optimizer="rowwise_adagrad", state=state,
                     duplicates="atomic")
    with pytest.raises(TypeError, match="float32"):
        gf.dbpr_step(user.bfloat16(), item.bfloat16(), users, pos, neg, lr=0.1, duplicates="atomic")
    with pytest.raises(ValueError, match="duplicates"):
        gf.dbpr_step(user, item, users, pos, neg, lr=0.1, duplicates="hogwild")


def test_triton_custom_ops_pass_opcheck(gen, device):
    require("dbpr_step", "triton", device, torch.float32)
    user, item, users, pos, neg, weights = triplets(gen, k=2, device=device)
    state = gf.RowwiseAdagradState(user, item)
    torch.library.opcheck(_library.dbpr_fused_step,
                          (user.clone(), item.clone(), users, pos, neg, weights, state.user.clone(),
                           state.item.clone(), 0.1, 0.01, 1.0 / users.shape[0]))
    torch.library.opcheck(_library.dbpr_atomic_sgd_step,
                          (user.clone(), item.clone(), users, pos, neg, weights, 0.1, 0.01, 1.0))


# ------------------------------------------------------------ GPU-sized tables (cuda only)


def _need_free(gib):
    free = torch.cuda.mem_get_info()[0]
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free device memory, {free / 2**30:.1f} GiB free")


def _big_step_check(backend, device, n_items, dim, batch, optimizer):
    """``backend`` vs the torch step on a table too large for 32-bit offsets (or nearly)."""
    gen = torch.Generator(device=device).manual_seed(n_items)
    user = torch.randn(1000, dim, device=device, generator=gen).mul_(0.1)
    item = torch.randn(n_items, dim, device=device, generator=gen).mul_(0.1)
    users = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    pos = torch.randint(0, n_items, (batch,), device=device, generator=gen)
    neg = torch.randint(n_items - 5000, n_items, (batch, 1), device=device, generator=gen)  # the last rows
    pos[:100] = n_items - 1
    w = torch.rand(batch, device=device, generator=gen).add_(0.1)
    ref_user, ref_item = user.clone(), item.clone()
    lr = 0.05 * batch
    states = [gf.RowwiseAdagradState(u, i) if optimizer == "rowwise_adagrad" else None
              for u, i in ((user, item), (ref_user, ref_item))]
    loss = gf.dbpr_step(user, item, users, pos, neg, w, lr=lr, optimizer=optimizer, state=states[0],
                        backend=backend)
    ref_loss = gf.dbpr_step(ref_user, ref_item, users, pos, neg, w, lr=lr, optimizer=optimizer,
                            state=states[1], backend="torch")
    tol = tolerance("dbpr_step", backend, torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=tol.loss, atol=tol.loss)
    rows = torch.cat([pos, neg.reshape(-1)]).unique()
    got, want = item.index_select(0, rows).double(), ref_item.index_select(0, rows).double()
    assert bool(torch.isfinite(got).all())
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    # Whole table, in chunks: nothing but the batch rows differs from the torch step.
    moved = torch.zeros(n_items, dtype=torch.bool, device=device)
    for start in range(0, n_items, 1 << 20):
        stop = min(start + (1 << 20), n_items)
        moved[start:stop] = (item[start:stop] != ref_item[start:stop]).any(1)
    in_batch = torch.zeros(n_items, dtype=torch.bool, device=device)
    in_batch[rows] = True
    assert not bool((moved & ~in_batch).any()), "rows outside the batch differ"


@pytest.mark.cuda_only
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_ten_million_row_table(backend, device, optimizer):
    require("dbpr_step", backend, device, torch.float32)
    _need_free(8)
    _big_step_check(backend, device, 10_000_000, 64, 1 << 16, optimizer)


@pytest.mark.cuda_only
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_step_beyond_32_bit_offsets(backend, device):
    """item rows x D > 2^31 elements: row offsets must be 64-bit."""
    require("dbpr_step", backend, device, torch.float32)
    _need_free(22)
    _big_step_check(backend, device, (1 << 31) // 256 + 4099, 256, 1 << 14, "sgd")
