"""GUIDER's two per-batch ops on CPU: guider_fast vs the plain-torch / GeomLoss code they replace.

Run:  pytest benchmarks/bench_ops_cpu.py --benchmark-only

* ``dbpr_loss`` forward+backward at Amazon Baby sizes (19,445 users x 7,050
  items, D = 64) on a 65,536-triplet batch, with one and with K = 5 negatives
  per triplet, against the naive autograd version.
* ``calibrate`` on 64-d rows, against GUIDER's reference path
  (``baselines.reference_calibrate``): a GeomLoss
  ``SamplesLoss("sinkhorn", p=1, blur=0.1)`` distance on one-point clouds,
  then min-max normalisation, threshold and sign-code weights.
* ``GuiderLoss`` (calibration + DBPR) forward+backward on a GUIDER batch of
  2,048 triplets with 384-d text and 4,096-d image item features, in its
  per-batch-projection and frozen-item (``precompute_items``) modes, against a
  naive GUIDER step built from the same ``nn.Linear`` layers
  (``baselines.reference_guider_step``).  The naive DBPR is ``baselines.naive_dbpr_loss``.

guider_fast runs with its value checks (NaN/Inf, index range) on by default;
each group also times it with ``guider_fast.set_checks(False)``, because on
CPU those checks are a visible part of the cost.

At these sizes page faults on fresh temporaries weigh as much as the
arithmetic, and they depend on the allocator's state (results/RESULTS.md, "Page
faults"); ``interleaved_ops.py`` re-times the large groups round-robin with the
builders below (``checked_dbpr_batch_for``, ``checked_calibration_inputs_for``,
``checked_guider_problem``).
"""

from __future__ import annotations

import pytest
import torch

import guider_fast
from baselines import (CALIBRATION_THRESHOLD as THRESHOLD, assert_close, naive_dbpr_loss,
                       reference_calibrate, reference_guider_step)

# Amazon Baby, as preprocessed for GUIDER.
N_USERS, N_ITEMS, EMBED_DIM = 19_445, 7_050, 64
DBPR_BATCH = 65_536
DBPR_NEGATIVES = (1, 5)
CALIBRATION_BATCHES = (2_048, 65_536)
FEATURE_DIM, HASH_BITS = 64, 64

DBPR_ROUNDS = {1: 50, 5: 20}
CALIBRATION_ROUNDS = {2_048: 300, 65_536: 40}


def _generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def checked():
    """``checked(build, key)``: ``build(key)`` (inputs cross-checked inside), once per module."""
    caches = {}

    def get(build, key):
        return caches.setdefault(build, checked_once(build))(key)

    return get


def measure_contender(measure, run, contender, **info):
    """Time ``run`` as ``contender`` (the checks-off variant with the value checks off)."""
    if contender == "guider_fast (checks off)":
        run = without_value_checks(run)
    measure(run, contender=contender, baseline=contender == "guider_fast", **info)


def without_value_checks(fn):
    """``fn`` run with guider_fast's value checks off (the production-loop setting)."""

    def run():
        guider_fast.set_checks(False)
        try:
            return fn()
        finally:
            guider_fast.set_checks(None)

    return run


def checked_once(build):
    """``key -> build(key)``, built (and cross-checked inside ``build``) once per key."""
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = build(key)
        return cache[key]

    return get


# --------------------------------------------------------------------------
# DBPR
# --------------------------------------------------------------------------

DBPR_CONTENDERS = {
    "guider_fast": guider_fast.dbpr_loss,
    "guider_fast (checks off)": guider_fast.dbpr_loss,
    "naive torch": naive_dbpr_loss,
}


def make_dbpr_batch(negatives):
    g = _generator()
    # Tables at the scale of a freshly initialised model (xavier-like std).
    user_emb = torch.randn(N_USERS, EMBED_DIM, generator=g) * 0.1
    item_emb = torch.randn(N_ITEMS, EMBED_DIM, generator=g) * 0.1
    users = torch.randint(0, N_USERS, (DBPR_BATCH,), generator=g)
    pos_items = torch.randint(0, N_ITEMS, (DBPR_BATCH,), generator=g)
    # One negative per triplet is (B,), as GUIDER samples it; K > 1 is (B, K).
    neg_shape = (DBPR_BATCH,) if negatives == 1 else (DBPR_BATCH, negatives)
    neg_items = torch.randint(0, N_ITEMS, neg_shape, generator=g)
    weights = torch.rand(DBPR_BATCH, generator=g)
    return user_emb, item_emb, users, pos_items, neg_items, weights


def dbpr_runner(loss_fn, batch):
    """Forward + backward into fresh leaf tables; returns (loss, grad_user, grad_item)."""
    user_table, item_table, users, pos_items, neg_items, weights = batch
    user_emb = user_table.clone().requires_grad_()
    item_emb = item_table.clone().requires_grad_()

    def run():
        user_emb.grad = None
        item_emb.grad = None
        loss = loss_fn(user_emb, item_emb, users, pos_items, neg_items, weights)
        loss.backward()
        return loss, user_emb.grad, item_emb.grad

    return run


def checked_dbpr_batch_for(negatives):
    """The batch of ``negatives``, cross-checked against the naive version."""
    batch = make_dbpr_batch(negatives)
    ours = dbpr_runner(guider_fast.dbpr_loss, batch)()
    naive = dbpr_runner(naive_dbpr_loss, batch)()
    for name, a, b in zip(("loss", "grad user_emb", "grad item_emb"), ours, naive):
        assert_close(f"dbpr K={negatives} {name}", a, b)
    return batch


@pytest.mark.parametrize("negatives", DBPR_NEGATIVES)
@pytest.mark.parametrize("contender", list(DBPR_CONTENDERS))
def test_dbpr_forward_backward(measure, checked, negatives, contender):
    run = dbpr_runner(DBPR_CONTENDERS[contender], checked(checked_dbpr_batch_for, negatives))
    workload = f"B{DBPR_BATCH}" if negatives == 1 else f"B{DBPR_BATCH}_K{negatives}"
    measure_contender(measure, run, contender,
                      group=f"dbpr_loss forward+backward | B={DBPR_BATCH}, K={negatives} "
                            f"negative{'s' if negatives > 1 else ''}, tables "
                            f"{N_USERS}x{EMBED_DIM} / {N_ITEMS}x{EMBED_DIM}",
                      rounds=DBPR_ROUNDS[negatives], family="dbpr", workload=workload, mode="forward+backward")


# --------------------------------------------------------------------------
# Calibration (AMSC)
# --------------------------------------------------------------------------

def guider_fast_calibrate(t, v, u_code, t_code, v_code, threshold=THRESHOLD):
    result = guider_fast.calibrate(t, v, u_code, t_code, v_code, threshold=threshold)
    return result.weights, result.clean, result.distance


CALIBRATION_CONTENDERS = {
    "guider_fast": guider_fast_calibrate,
    "guider_fast (checks off)": guider_fast_calibrate,
    "GUIDER reference (GeomLoss)": reference_calibrate,
}


def checked_calibration_inputs_for(batch):
    """(t, v, u_code, t_code, v_code) of ``batch`` rows, cross-checked against the reference."""
    g = _generator()
    t = torch.randn(batch, FEATURE_DIM, generator=g)
    v = torch.randn(batch, FEATURE_DIM, generator=g)
    # Real-valued hash-layer outputs (tanh), signed inside calibrate.
    codes = [torch.tanh(torch.randn(batch, HASH_BITS, generator=g)) for _ in range(3)]
    inputs = (t, v, *codes)
    ours, theirs = guider_fast_calibrate(*inputs), reference_calibrate(*inputs)
    assert torch.equal(ours[1], theirs[1]), "calibrate: clean masks differ"
    assert_close("calibrate weights", ours[0], theirs[0])
    assert_close("calibrate distance", ours[2], theirs[2])
    return inputs


@pytest.mark.parametrize("batch", CALIBRATION_BATCHES)
@pytest.mark.parametrize("contender", list(CALIBRATION_CONTENDERS))
def test_calibrate(measure, checked, batch, contender):
    inputs = checked(checked_calibration_inputs_for, batch)
    fn = CALIBRATION_CONTENDERS[contender]

    def run():
        return fn(*inputs)

    measure_contender(measure, run, contender,
                      group=f"calibrate | B={batch}, {FEATURE_DIM}-d rows, {HASH_BITS}-bit codes",
                      rounds=CALIBRATION_ROUNDS[batch], family="calibrate", workload=f"B{batch}", mode="forward")


# --------------------------------------------------------------------------
# GuiderLoss (calibration + DBPR), one GUIDER training batch
# --------------------------------------------------------------------------

# Amazon Baby item features as GUIDER loads them: 384-d sentence-embedding text
# features and 4,096-d CNN image features, one row per item.
TEXT_DIM, IMAGE_DIM = 384, 4_096
GUIDER_BATCH = 2_048
GUIDER_ROUNDS = 60


GUIDER_CONTENDERS = ("guider_fast", "guider_fast (checks off)", "GUIDER reference (GeomLoss)")
GUIDER_MODES = {
    "per-batch projection": "features passed to every call",
    "frozen items": "precompute_items() once in setup",
}


def checked_guider_problem():
    """(GuiderLoss, tables, batch indices, item features), cross-checked once per mode."""
    torch.manual_seed(0)  # the Linear layers' initialisation
    loss_fn = guider_fast.GuiderLoss(text_dim=TEXT_DIM, image_dim=IMAGE_DIM, embed_dim=EMBED_DIM)
    g = _generator()
    user_emb = torch.randn(N_USERS, EMBED_DIM, generator=g) * 0.1
    item_emb = torch.randn(N_ITEMS, EMBED_DIM, generator=g) * 0.1
    text_feat = torch.randn(N_ITEMS, TEXT_DIM, generator=g)
    image_feat = torch.randn(N_ITEMS, IMAGE_DIM, generator=g)
    users = torch.randint(0, N_USERS, (GUIDER_BATCH,), generator=g)
    pos_items = torch.randint(0, N_ITEMS, (GUIDER_BATCH,), generator=g)
    neg_items = torch.randint(0, N_ITEMS, (GUIDER_BATCH,), generator=g)
    problem = (loss_fn, user_emb, item_emb, users, pos_items, neg_items, text_feat, image_feat)

    reference = guider_runner(problem, "GUIDER reference (GeomLoss)", "per-batch projection")()
    for mode in GUIDER_MODES:
        ours = guider_runner(problem, "guider_fast", mode)()
        for name, a, b in zip(("loss", "grad user_emb", "grad item_emb"), ours, reference):
            assert_close(f"GuiderLoss ({mode}) {name}", a, b)
    clean = loss_fn.last_calibration.clean
    assert 0 < int(clean.sum()) < GUIDER_BATCH, "both clean and noisy rows should be exercised"
    return problem


@pytest.fixture(scope="module")
def guider_problem():
    return checked_guider_problem()


def guider_runner(problem, contender, mode):
    """Forward + backward of one batch into fresh leaf tables; returns (loss, grad_user, grad_item).

    Sets the shared GuiderLoss's item cache for ``mode`` (tests run one at a
    time, so each runner is built right before it is timed).
    """
    loss_fn, user_table, item_table, users, pos_items, neg_items, text_feat, image_feat = problem
    user_emb = user_table.clone().requires_grad_()
    item_emb = item_table.clone().requires_grad_()
    if contender == "GUIDER reference (GeomLoss)":
        def loss():
            return reference_guider_step(loss_fn, user_emb, item_emb, users, pos_items, neg_items,
                                         text_feat, image_feat)
    elif mode == "frozen items":
        loss_fn.precompute_items(text_feat, image_feat)

        def loss():
            return loss_fn(user_emb, item_emb, users, pos_items, neg_items)
    else:
        loss_fn.clear_item_cache()

        def loss():
            return loss_fn(user_emb, item_emb, users, pos_items, neg_items, text_feat, image_feat)

    def run():
        user_emb.grad = None
        item_emb.grad = None
        value = loss()
        value.backward()
        return value, user_emb.grad, item_emb.grad

    return run


@pytest.mark.parametrize("mode", list(GUIDER_MODES))
@pytest.mark.parametrize("contender", GUIDER_CONTENDERS)
def test_guider_loss(measure, guider_problem, mode, contender):
    measure_contender(measure, guider_runner(guider_problem, contender, mode), contender,
                      group=f"GuiderLoss forward+backward, {mode} ({GUIDER_MODES[mode]}) | B={GUIDER_BATCH}, "
                            f"features {N_ITEMS}x{TEXT_DIM} / {N_ITEMS}x{IMAGE_DIM}",
                      rounds=GUIDER_ROUNDS, family="guider_loss", workload=f"B{GUIDER_BATCH}", mode=mode)
