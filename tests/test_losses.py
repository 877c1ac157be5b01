"""GuiderLoss (calibration + DBPR as one module) against GUIDER's computation through geomloss,
its frozen-item cache, its argument checks, and every kernel backend against backend="torch"."""

import math

import geomloss
import pytest
import torch
import torch.nn.functional as F

import guider_fast as gf

from ops.backends import KERNEL_BACKENDS, require
from ops.problems import reference_guider_weights

UE = torch.randn(3, 8)
IE = torch.randn(5, 8)
USERS = torch.tensor([0, 2, 1])
POS = torch.tensor([1, 3, 0])
NEG = torch.tensor([2, 2, 4])


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _guider_setup(gen, n_users=13, n_items=17, batch=29):
    torch.manual_seed(1234)
    loss_fn = gf.GuiderLoss(text_dim=24, image_dim=40, embed_dim=16, feat_embed_dim=8, hash_bits=12)
    user = (torch.randn(n_users, 16, generator=gen) * 0.3).requires_grad_()
    item = (torch.randn(n_items, 16, generator=gen) * 0.3).requires_grad_()
    text = torch.randn(n_items, 24, generator=gen)
    image = torch.randn(n_items, 40, generator=gen)
    users = torch.randint(0, n_users, (batch,), generator=gen)
    pos = torch.randint(0, n_items, (batch,), generator=gen)
    neg = torch.randint(0, n_items, (batch,), generator=gen)
    return loss_fn, user, item, text, image, users, pos, neg


def reference_guider_loss(loss_fn, user, item, text, image, users, pos, neg):
    """GUIDER's loss recomputed independently: geomloss calibration + weighted BPR."""
    with torch.no_grad():
        t = loss_fn.text_proj(text[pos])
        v = loss_fn.image_proj(image[pos])
        w, _, _, _ = reference_guider_weights(
            t, v, loss_fn.user_hash(user[users]), loss_fn.text_hash(t), loss_fn.image_hash(v),
            threshold=loss_fn.threshold)
    u, p, n = user[users], item[pos], item[neg]
    return -(w * F.logsigmoid((u * p).sum(1) - (u * n).sum(1))).mean()


def test_guider_loss_matches_reference(gen):
    loss_fn, user, item, text, image, users, pos, neg = _guider_setup(gen)
    loss = loss_fn(user, item, users, pos, neg, text, image)
    grads = torch.autograd.grad(loss, (user, item))
    want = reference_guider_loss(loss_fn, user, item, text, image, users, pos, neg)
    want_grads = torch.autograd.grad(want, (user, item))
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    cal = loss_fn.last_calibration
    assert cal.weights.shape == (29,) and cal.clean.dtype == torch.bool
    assert 0 < int(cal.clean.sum()) < 29  # both clean and noisy rows exercised


def test_precomputed_items_equal_per_batch_projection(gen):
    loss_fn, user, item, text, image, users, pos, neg = _guider_setup(gen)
    direct = loss_fn(user, item, users, pos, neg, text, image)
    direct_cal = loss_fn.last_calibration
    loss_fn.precompute_items(text, image, chunk_size=5)
    cached = loss_fn(user, item, users, pos, neg)
    torch.testing.assert_close(cached, direct, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss_fn.last_calibration.weights, direct_cal.weights, rtol=0, atol=1e-6)
    assert torch.equal(loss_fn.last_calibration.clean, direct_cal.clean)


def test_guider_loss_several_negatives(gen):
    loss_fn, user, item, text, image, users, pos, _ = _guider_setup(gen)
    neg = torch.randint(0, item.shape[0], (users.shape[0], 4), generator=gen)
    loss = loss_fn(user, item, users, pos, neg, text, image)
    with torch.no_grad():
        t, v = loss_fn.text_proj(text[pos]), loss_fn.image_proj(image[pos])
        w, _, _, _ = reference_guider_weights(t, v, loss_fn.user_hash(user[users]), loss_fn.text_hash(t),
                                              loss_fn.image_hash(v))
    u = user[users]
    margins = (u * item[pos]).sum(1, keepdim=True) - (u[:, None] * item[neg]).sum(2)
    want = -(w * F.logsigmoid(margins).mean(1)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("feature_dtype,table_dtype", [(torch.float16, torch.float32),
                                                       (torch.bfloat16, torch.bfloat16),
                                                       (torch.float64, torch.float32)])
def test_guider_loss_other_storage_dtypes(gen, feature_dtype, table_dtype):
    loss_fn, user, item, text, image, users, pos, neg = _guider_setup(gen)
    text_l, image_l = text.to(feature_dtype), image.to(feature_dtype)
    user_l = user.detach().to(table_dtype).requires_grad_()
    item_l = item.detach().to(table_dtype).requires_grad_()
    loss = loss_fn(user_l, item_l, users, pos, neg, text_l, image_l)
    loss.backward()
    assert loss.dtype == table_dtype and user_l.grad.dtype == table_dtype
    want = reference_guider_loss(loss_fn, user_l.detach().float(), item_l.detach().float(),
                                 text_l.float(), image_l.float(), users, pos, neg)
    torch.testing.assert_close(loss.float(), want, rtol=1e-2 if table_dtype == torch.bfloat16 else 1e-6,
                               atol=1e-6)
    loss_fn.precompute_items(text_l, image_l)
    torch.testing.assert_close(loss_fn(user_l, item_l, users, pos, neg), loss)


def test_stale_item_cache_is_detected(gen):
    loss_fn, user, item, text, image, users, pos, neg = _guider_setup(gen)
    loss_fn.precompute_items(text, image)
    with torch.no_grad():
        loss_fn.text_proj.weight.add_(0.1)  # what an optimizer step would do
    with pytest.raises(RuntimeError, match="stale"):
        loss_fn(user, item, users, pos, neg)
    for change in ("rebind", "distance"):
        loss_fn.precompute_items(text, image)
        if change == "rebind":
            loss_fn.image_hash.weight.data = loss_fn.image_hash.weight.data.clone()
        else:
            loss_fn.distance = "euclidean"
        with pytest.raises(RuntimeError, match="stale"):
            loss_fn(user, item, users, pos, neg)
    loss_fn.clear_item_cache()
    with pytest.raises(ValueError, match="text_feat"):
        loss_fn(user, item, users, pos, neg)
    assert loss_fn(user, item, users, pos, neg, text, image).requires_grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_match_the_torch_backend(gen, backend):
    """The module on a kernel backend (calibration and DBPR kernels) against backend="torch",
    per-batch projection and frozen-item cache ("euclidean": no cancellation residue to flip flags)."""
    require("calibrate", backend, "cpu", torch.float32)
    n_users, n_items, batch = 40, 30, 57
    text_feat, image_feat = torch.randn(n_items, 24, generator=gen), torch.randn(n_items, 40, generator=gen)
    user_emb = torch.randn(n_users, 16, generator=gen)
    item_emb = torch.randn(n_items, 16, generator=gen)
    users = torch.randint(0, n_users, (batch,), generator=gen)
    pos = torch.randint(0, n_items, (batch,), generator=gen)
    neg = torch.randint(0, n_items, (batch, 3), generator=gen)
    torch.manual_seed(5)
    reference = gf.GuiderLoss(24, 40, embed_dim=16, feat_embed_dim=16, backend="torch",
                              distance="euclidean")
    fast = gf.GuiderLoss(24, 40, embed_dim=16, feat_embed_dim=16, backend=backend,
                         distance="euclidean")
    fast.load_state_dict(reference.state_dict())
    for frozen in (False, True):
        if frozen:
            reference.precompute_items(text_feat, image_feat)
            fast.precompute_items(text_feat, image_feat)
        results = []
        for module in (reference, fast):
            u, i = user_emb.clone().requires_grad_(), item_emb.clone().requires_grad_()
            features = (None, None) if frozen else (text_feat, image_feat)
            loss = module(u, i, users, pos, neg, *features)
            results.append((loss, *torch.autograd.grad(loss, (u, i)), module.last_calibration))
        (loss_r, gu_r, gi_r, cal_r), (loss_f, gu_f, gi_f, cal_f) = results
        assert torch.equal(cal_f.clean, cal_r.clean)
        torch.testing.assert_close(cal_f.weights, cal_r.weights)
        torch.testing.assert_close(loss_f, loss_r, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(gu_f, gu_r, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(gi_f, gi_r, rtol=2e-5, atol=1e-6)


def test_guider_loss_rejects():
    loss = gf.GuiderLoss(text_dim=6, image_dim=5, embed_dim=8, feat_embed_dim=4, hash_bits=8)
    text, image = torch.randn(5, 6), torch.randn(5, 5)
    with pytest.raises(IndexError, match="pos_items has indices outside"):
        loss(UE, IE, USERS, torch.tensor([1, 7, 0]), NEG, text, image)
    with pytest.raises(ValueError, match="text_feat must have shape"):
        loss(UE, IE, USERS, POS, NEG, torch.randn(5, 3), image)
    with pytest.raises(ValueError, match="image_feat must have shape"):
        loss(UE, IE, USERS, POS, NEG, text, torch.randn(4, 5))
    with pytest.raises(ValueError, match="text_feat has 6 rows"):
        loss(UE, IE, USERS, POS, NEG, torch.randn(6, 6), torch.randn(6, 5))
    with pytest.raises(ValueError, match="hash_bits must be a positive integer"):
        gf.GuiderLoss(text_dim=6, image_dim=5, hash_bits=0)
    with pytest.raises(ValueError, match="distance must be one of"):
        gf.GuiderLoss(text_dim=6, image_dim=5, distance="cosine")
    with pytest.raises(ValueError, match="backend must be one of"):
        gf.GuiderLoss(text_dim=6, image_dim=5, backend="gpu")
    with pytest.raises(TypeError, match="threshold must be a real number"):
        gf.GuiderLoss(text_dim=6, image_dim=5, threshold="high")
    with pytest.raises(ValueError, match=r"text_feat \(rows projected by text_proj\) contains NaN"):
        loss(UE, IE, USERS, POS, NEG, _with(text, (1, 1), math.nan), image)
