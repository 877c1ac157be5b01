"""guider_fast.calibrate and GuiderLoss against the reference GUIDER computation (via geomloss)."""

import geomloss
import pytest
import torch
import torch.nn.functional as F

import guider_fast as gf


def reference_guider_weights(t, v, u_code, t_code, v_code, threshold=0.7):
    """GUIDER's AMSC as the public code does it: geomloss on one-point clouds, then the formula."""
    d = geomloss.SamplesLoss("sinkhorn", p=1, blur=0.1)(t[:, None, :], v[:, None, :] + 1e-8)
    normalized = (d - d.min()) / (d.max() - d.min() + 1e-7)
    clean = normalized < threshold
    h_u, h_t, h_v = torch.sign(u_code), torch.sign(t_code), torch.sign(v_code)
    bits = u_code.shape[1]
    s_t = (h_u * h_t).sum(1) / bits
    s_v = (h_u * h_v).sum(1) / bits
    w = torch.clamp(((s_t + 1) / 2 + (s_v + 1) / 2) / 2, 0, 1)
    return torch.where(clean, w, torch.ones_like(w)), clean, d, normalized


def _inputs(gen, batch=33, dim=64, bits=64):
    t = torch.randn(batch, dim, generator=gen) * 0.2
    v = torch.randn(batch, dim, generator=gen) * 0.2 + 0.05
    codes = [torch.randn(batch, bits, generator=gen) for _ in range(3)]
    return t, v, *codes


@pytest.mark.parametrize("batch", [1, 7, 33, 2048])
def test_geomloss_distance_and_weights_match_reference(gen, batch):
    t, v, u_code, t_code, v_code = _inputs(gen, batch=batch)
    cal = gf.calibrate(t, v, u_code, t_code, v_code)
    w, clean, d, normalized = reference_guider_weights(t, v, u_code, t_code, v_code)
    # The closed form equals GeomLoss's fp32 output up to a few ulps of the distance.
    torch.testing.assert_close(cal.distance, d, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(cal.normalized, normalized, rtol=1e-5, atol=1e-5)
    # Rows sitting within rounding of the threshold may flip; none do at these seeds.
    assert torch.equal(cal.clean, clean)
    torch.testing.assert_close(cal.weights, w, rtol=0, atol=1e-7)


def test_clouds_use_the_debiased_divergence(gen):
    t = torch.randn(6, 4, 8, generator=gen)
    v = torch.randn(6, 3, 8, generator=gen)
    codes = [torch.randn(6, 16, generator=gen) for _ in range(3)]
    cal = gf.calibrate(t, v, *codes)
    want = geomloss.SamplesLoss("sinkhorn", p=1, blur=0.1)(t, v + 1e-8)
    torch.testing.assert_close(cal.distance, want, rtol=1e-4, atol=1e-6)


def test_euclidean_distance_is_exact(gen):
    t, v, u_code, t_code, v_code = _inputs(gen, batch=19)
    cal = gf.calibrate(t, v, u_code, t_code, v_code, distance="euclidean")
    torch.testing.assert_close(cal.distance, (t - v).norm(dim=1), rtol=0, atol=0)


def test_sign_of_zero_is_zero_and_threshold_applies(gen):
    t, v, u_code, t_code, v_code = _inputs(gen, batch=12, bits=8)
    u_code[:, :3] = 0.0  # ternary codes: zero bits contribute nothing
    cal = gf.calibrate(t, v, u_code, t_code, v_code, threshold=0.5)
    w, clean, _, _ = reference_guider_weights(t, v, u_code, t_code, v_code, threshold=0.5)
    assert torch.equal(cal.clean, clean)
    torch.testing.assert_close(cal.weights, w, rtol=0, atol=1e-7)
    assert bool((cal.weights[~cal.clean] == 1).all())


def test_equal_distances_normalise_to_zero(gen):
    t = torch.randn(5, 4, generator=gen)
    cal = gf.calibrate(t, t.clone(), *[torch.randn(5, 8, generator=gen) for _ in range(3)],
                       distance="euclidean")
    assert bool((cal.normalized == 0).all()) and bool(cal.clean.all())


def test_outputs_carry_no_gradient(gen):
    t, v, u_code, t_code, v_code = [x.requires_grad_() for x in _inputs(gen, batch=9)]
    cal = gf.calibrate(t, v, u_code, t_code, v_code)
    for field in (cal.weights, cal.distance, cal.normalized):
        assert not field.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_calibrated_in_float32(gen, dtype):
    t, v, u_code, t_code, v_code = [x.to(dtype) for x in _inputs(gen, batch=2048)]
    cal = gf.calibrate(t, v, u_code, t_code, v_code)
    want = gf.calibrate(t.float(), v.float(), u_code.float(), t_code.float(), v_code.float())
    assert cal.weights.dtype == torch.float32
    torch.testing.assert_close(cal.distance, want.distance, rtol=0, atol=0)
    assert torch.equal(cal.clean, want.clean)
    torch.testing.assert_close(cal.weights, want.weights, rtol=0, atol=0)


def test_double_inputs(gen):
    t, v, u_code, t_code, v_code = [x.double() for x in _inputs(gen, batch=9)]
    cal = gf.calibrate(t, v, u_code, t_code, v_code, distance="euclidean")
    assert cal.weights.dtype == torch.float64


# ---------------------------------------------------------------- GuiderLoss


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
    """Spec sections 1-2 recomputed independently: geomloss calibration + weighted BPR."""
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


@pytest.mark.parametrize("bits", [1, 63, 64, 65, 130])
def test_packed_ternary_codes_give_the_exact_similarity(gen, bits):
    from guider_fast.reference import calibration as ref

    a = torch.randn(41, bits, generator=gen)
    b = torch.randn(41, bits, generator=gen)
    a[:, ::5] = 0.0  # sign(0) = 0: ternary codes
    b[::3, 1::4] = 0.0
    packed_a, packed_b = ref.pack_sign_codes(a), ref.pack_sign_codes(b)
    assert packed_a[0].dtype == torch.int64 and packed_a[0].shape == (41, (bits + 63) // 64)
    got = ref.packed_sign_similarity(*packed_a, *packed_b, bits)
    torch.testing.assert_close(got, ref.sign_similarity(a, b), rtol=0, atol=0)
