"""Bad input raises ValueError / TypeError / IndexError whose message names the argument.

Checks run before dispatch, so they are backend-independent: tested once, on CPU
(GuiderLoss's are in tests/test_losses.py, dbpr_step's and calibrate_items' beside their ops).
"""

import math

import pytest
import torch

import guider_fast as gf

X = torch.randn(3, 5, 4)
Y = torch.randn(3, 6, 4)
A = torch.full((3, 5), 0.2)
B = torch.full((3, 6), 1 / 6)


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


SINKHORN_CASES = [
    (dict(x=torch.randn(5)), ValueError, "x must be 2-D or 3-D"),
    (dict(x=torch.randn(2, 3, 5, 4)), ValueError, "x must be 2-D or 3-D"),
    (dict(x=torch.randn(5, 4)), ValueError, "x and y must both be batched"),
    (dict(y=torch.randn(4, 6, 4)), ValueError, "same batch size"),
    (dict(y=torch.randn(3, 6, 7)), ValueError, "same feature size"),
    (dict(x=torch.randint(0, 5, (3, 5, 4))), TypeError, "x must be a floating-point"),
    (dict(y=torch.randint(0, 5, (3, 6, 4))), TypeError, "y must be a floating-point"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(y=Y.double()), TypeError, "y must have the dtype of x"),
    (dict(x=torch.randn(3, 0, 4)), ValueError, "empty"),
    (dict(x=torch.randn(0, 5, 4), y=torch.randn(0, 6, 4), a=None, b=None), ValueError, "empty"),
    (dict(x=_with(X, (1, 2, 3), math.nan)), ValueError, "x contains NaN or Inf"),
    (dict(y=_with(Y, (0, 0, 0), math.inf)), ValueError, "y contains NaN or Inf"),
    (dict(a=torch.full((3, 4), 0.25)), ValueError, r"a must have shape \(3, 5\)"),
    (dict(b=torch.full((6,), 1 / 6)), ValueError, r"b must have shape \(3, 6\)"),
    (dict(a=A * 1.5), ValueError, "a must sum to 1"),
    (dict(b=_with(B, (2, 1), -0.1)), ValueError, "b has negative weights|b must sum to 1"),
    (dict(a=_with(A, (1, 1), math.nan)), ValueError, "a contains NaN"),
    (dict(a=A.long()), TypeError, "a must be a floating-point"),
    (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
    (dict(eps=-1.0), ValueError, "eps must be a finite number > 0"),
    (dict(eps=math.nan), ValueError, "eps must be a finite number > 0"),
    (dict(eps=torch.tensor(0.1)), TypeError, "eps must be a positive real number"),
    (dict(p=3), ValueError, "p must be one of"),
    (dict(p=True), ValueError, "p must be one of"),
    (dict(eps=1e-40), ValueError, "eps must be >="),
    (dict(n_iters=2.5), ValueError, "n_iters must be an integer"),
    (dict(n_iters=0), ValueError, "n_iters must be an integer >= 1"),
    (dict(tol=-1e-3), ValueError, "tol must be a finite number > 0"),
    (dict(grad="implicit"), ValueError, "grad must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("override,exc,match", SINKHORN_CASES)
def test_sinkhorn_rejects(override, exc, match):
    args = dict(x=X, y=Y, a=A, b=B, eps=0.1)
    args.update(override)
    with pytest.raises(exc, match=match):
        gf.sinkhorn(args.pop("x"), args.pop("y"), args.pop("a"), args.pop("b"), **args)


def test_negative_weight_message_names_argument():
    a = A.clone()
    a[0, 0], a[0, 1] = -0.2, 0.6  # still sums to 1
    with pytest.raises(ValueError, match="a has negative weights"):
        gf.sinkhorn(X, Y, a, B, eps=0.1)


def test_mismatched_devices_are_named():
    with pytest.raises(ValueError, match="y is on meta"):
        gf.sinkhorn(X, Y.to("meta"), eps=0.1)


SAMPLES_CASES = [
    (dict(blur=0.0), ValueError, "blur must be a finite number > 0"),
    (dict(blur=-0.5), ValueError, "blur must be a finite number > 0"),
    (dict(scaling=1.5), ValueError, "scaling must be in"),
    (dict(p=4), ValueError, "p must be one of"),
    (dict(loss="energy"), ValueError, "loss must be one of"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,match", SAMPLES_CASES)
def test_samples_loss_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gf.SamplesLoss(**kwargs)


def test_samples_loss_call_rejects():
    loss = gf.SamplesLoss()
    with pytest.raises(TypeError, match=r"\(x, y\) or \(a, x, b, y\)"):
        loss(X)
    with pytest.raises(ValueError, match="x contains NaN"):
        loss(_with(X, (0, 0, 0), math.nan), Y)
    with pytest.raises(ValueError, match="b must sum to 1"):
        loss(A, X, B * 2, Y)
    with pytest.raises(ValueError, match="same feature size"):
        loss(X, torch.randn(3, 6, 2))
    negative = A.clone()
    negative[1, 0], negative[1, 1] = -0.1, 0.5
    with pytest.raises(ValueError, match="a has negative weights"):
        loss(negative, X, B, Y)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        loss(X.long(), Y)


USERS = torch.tensor([0, 2, 1])
POS = torch.tensor([1, 3, 0])
NEG = torch.tensor([2, 2, 4])
UE = torch.randn(3, 8)
IE = torch.randn(5, 8)

DBPR_CASES = [
    (dict(users=torch.tensor([0.0, 1.0, 2.0])), TypeError, "users must be an integer"),
    (dict(pos_items=torch.tensor([1.0, 3.0, 0.0])), TypeError, "pos_items must be an integer"),
    (dict(users=torch.tensor([0, 3, 1])), IndexError, "users has indices outside"),
    (dict(users=torch.tensor([0, -1, 1])), IndexError, "users has indices outside"),
    (dict(pos_items=torch.tensor([1, 5, 0])), IndexError, "pos_items has indices outside"),
    (dict(neg_items=torch.tensor([[2, 9], [1, 1], [0, 0]])), IndexError, "neg_items has indices outside"),
    (dict(neg_items=torch.tensor([-2, 1, 1])), IndexError, "neg_items has indices outside"),
    (dict(users=torch.tensor([[0, 2, 1]])), ValueError, "users must be 1-D"),
    (dict(pos_items=torch.tensor([1, 3])), ValueError, r"pos_items must have shape \(3,\)"),
    (dict(neg_items=torch.tensor([1, 3])), ValueError, "neg_items must have shape"),
    (dict(users=torch.tensor([], dtype=torch.long), pos_items=torch.tensor([], dtype=torch.long),
          neg_items=torch.tensor([], dtype=torch.long)), ValueError, "users is empty"),
    (dict(user_emb=torch.randn(3, 7)), ValueError, "same embedding size"),
    (dict(user_emb=torch.randn(3)), ValueError, "user_emb must be 2-D"),
    (dict(item_emb=torch.randint(0, 3, (5, 8))), TypeError, "item_emb must be a floating-point"),
    (dict(item_emb=IE.double()), TypeError, "item_emb must have the dtype of user_emb"),
    (dict(weights=torch.rand(4)), ValueError, r"weights must have shape \(3,\)"),
    (dict(weights=torch.tensor([1.0, math.nan, 0.5])), ValueError, "weights contains NaN"),
    (dict(weights=torch.tensor([1, 1, 1])), TypeError, "weights must be a floating-point"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("override,exc,match", DBPR_CASES)
def test_dbpr_rejects(override, exc, match):
    args = dict(user_emb=UE, item_emb=IE, users=USERS, pos_items=POS, neg_items=NEG, weights=None)
    args.update(override)
    reduction = args.pop("reduction", "mean")
    with pytest.raises(exc, match=match):
        gf.dbpr_loss(**args, reduction=reduction)


T = torch.randn(4, 6)
CODES = torch.randn(4, 16)

CALIBRATE_CASES = [
    (dict(t=torch.randn(4)), ValueError, "t must be 2-D or 3-D"),
    (dict(v=torch.randn(5, 6)), ValueError, "v must have batch size 4"),
    (dict(v=torch.randn(4, 7)), ValueError, "same feature size"),
    (dict(t=torch.randn(0, 6), v=torch.randn(0, 6)), ValueError, "t is empty"),
    (dict(t=torch.randint(0, 2, (4, 6))), TypeError, "t must be a floating-point"),
    (dict(u_code=torch.randn(4, 8)), ValueError, "t_code must have shape"),
    (dict(v_code=torch.randn(3, 16)), ValueError, "v_code must have shape"),
    (dict(u_code=torch.randn(16)), ValueError, "u_code must be 2-D"),
    (dict(t=_with(T, (2, 2), math.inf)), ValueError, "t contains NaN or Inf"),
    (dict(u_code=_with(CODES, (0, 5), math.nan)), ValueError, "u_code contains NaN"),
    (dict(distance="cosine"), ValueError, "distance must be one of"),
    (dict(threshold="high"), TypeError, "threshold must be a real number"),
    (dict(threshold=math.nan), ValueError, "threshold must be finite"),
    (dict(v=torch.randint(0, 2, (4, 6))), TypeError, "v must be a floating-point"),
    (dict(v=torch.randn(4, 6, dtype=torch.float64)), TypeError, "v must have the dtype of t"),
    (dict(t_code=torch.randn(4, 16, dtype=torch.float64)), TypeError, "t_code must have the dtype of u_code"),
]


@pytest.mark.parametrize("override,exc,match", CALIBRATE_CASES)
def test_calibrate_rejects(override, exc, match):
    args = dict(t=T, v=torch.randn(4, 6), u_code=CODES, t_code=torch.randn(4, 16),
                v_code=torch.randn(4, 16))
    args.update(override)
    kwargs = {k: args.pop(k) for k in ("distance", "threshold") if k in args}
    with pytest.raises(exc, match=match):
        gf.calibrate(**args, **kwargs)


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    res = gf.sinkhorn(X, Y, eps=np.float32(0.5), n_iters=np.int64(5))
    assert res.n_iters == 5


def test_checks_can_be_disabled_and_restored():
    bad = _with(X, (0, 0, 0), math.nan)
    gf.set_checks(False)
    try:
        assert not gf.checks_enabled()
        res = gf.sinkhorn(bad, Y, eps=0.1, n_iters=3)  # no value check: NaN propagates
        assert bool(torch.isnan(res.value[0]))
    finally:
        gf.set_checks(None)
    assert gf.checks_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        gf.set_checks("yes")


def test_checks_environment_variable(monkeypatch):
    monkeypatch.setenv("GUIDER_FAST_CHECKS", "0")
    assert not gf.checks_enabled()
    res = gf.sinkhorn(_with(X, (0, 0, 0), math.nan), Y, eps=0.1, n_iters=3)
    assert bool(torch.isnan(res.value[0]))
    assert gf.dbpr_loss(UE, IE, USERS, POS, NEG).isfinite()
    monkeypatch.setenv("GUIDER_FAST_CHECKS", "1")
    assert gf.checks_enabled()
