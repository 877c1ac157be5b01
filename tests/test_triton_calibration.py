"""Triton AMSC calibration kernels (feature rows, and the frozen-item cache with packed codes)
against the torch reference, run by Triton's interpreter on CPU tensors."""

import pytest
import torch

import guider_fast as gf
from guider_fast import _library
from guider_fast.reference import calibration as ref

pytest.importorskip("triton")

THRESHOLD = 0.7


def _rows(gen, batch, dim, bits, dtype=torch.float32, code_dtype=None, zeros=True):
    t = torch.randn(batch, dim, generator=gen) * 2.0
    v = t + torch.rand(batch, 1, generator=gen) * torch.randn(batch, dim, generator=gen)
    codes = [torch.randn(batch, bits, generator=gen) for _ in range(3)]
    if zeros:  # sign(0) = 0: ternary codes
        for code in codes:
            code[torch.rand(batch, bits, generator=gen) < 0.1] = 0.0
    code_dtype = code_dtype or dtype
    return (t.to(dtype), v.to(dtype), *(c.to(code_dtype) for c in codes))


def _cancellation_tolerance(t, v):
    """GeomLoss's expanded cost leaves up to ~sqrt(ulp(|x|^2)) of residue in C(x, x)."""
    norms = torch.maximum(t.float().pow(2).sum(1), v.float().pow(2).sum(1))
    return 4.0 * torch.sqrt(norms * torch.finfo(torch.float32).eps) + 1e-5


def _assert_matches(got, want, distance_atol, threshold=THRESHOLD):
    torch.testing.assert_close(got.distance, want.distance.float(), rtol=0, atol=distance_atol)
    # A row whose normalised distance sits on the threshold may flip with the residue.
    spread = (want.distance.max() - want.distance.min()).clamp_min(1e-6)
    margin = 2.0 * distance_atol / spread
    decided = (want.normalized - threshold).abs() > margin
    torch.testing.assert_close(got.normalized, want.normalized.float(), rtol=0,
                               atol=margin.item() if torch.is_tensor(margin) else margin)
    assert got.clean.dtype == torch.bool
    assert torch.equal(got.clean[decided], want.clean[decided])
    same = got.clean == want.clean
    assert torch.equal(got.weights[same], want.weights.float()[same])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5, 3), (37, 64, 64), (130, 70, 129)])
@pytest.mark.parametrize("distance", ["geomloss", "euclidean"])
def test_rows_kernel_matches_reference(gen, dtype, shape, distance):
    t, v, u_code, t_code, v_code = _rows(gen, *shape, dtype=dtype)
    want = gf.calibrate(t, v, u_code, t_code, v_code, distance=distance, backend="torch")
    got = gf.calibrate(t, v, u_code, t_code, v_code, distance=distance, backend="triton")
    if distance == "geomloss":
        atol = _cancellation_tolerance(t, v).max().item()
    else:
        atol = 1e-5 * want.distance.abs().max().item() + 1e-6
    _assert_matches(got, want, atol)


def test_rows_kernel_handles_identical_and_single_rows(gen):
    t, v, u_code, t_code, v_code = _rows(gen, 9, 16, 64)
    v = t.clone()  # zero disagreement everywhere: min == max, every row normalises to 0
    got = gf.calibrate(t, v, u_code, t_code, v_code, distance="euclidean", backend="triton")
    assert torch.equal(got.normalized, torch.zeros(9)) and bool(got.clean.all())
    want = gf.calibrate(t, v, u_code, t_code, v_code, distance="euclidean", backend="torch")
    assert torch.equal(got.weights, want.weights)


def test_similarities_are_exact(gen):
    """Code similarities are exact counts: weights equal the reference bit for bit."""
    t, v, u_code, t_code, v_code = _rows(gen, 200, 8, 130)
    got = gf.calibrate(t, v, u_code, t_code, v_code, distance="euclidean", threshold=2.0,
                       backend="triton")
    sim_t = ref.sign_similarity(u_code, t_code)
    sim_v = ref.sign_similarity(u_code, v_code)
    assert bool(got.clean.all())
    assert torch.equal(got.weights, ref.calibration_weights(got.clean, sim_t, sim_v))


def test_clouds_and_float64_fall_back_or_refuse(gen):
    t, v, u_code, t_code, v_code = _rows(gen, 4, 8, 16)
    clouds = (t.view(4, 2, 4), v.view(4, 2, 4))
    with pytest.raises(RuntimeError, match="point clouds"):
        gf.calibrate(*clouds, u_code, t_code, v_code, backend="triton")
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16"):
        gf.calibrate(t.double(), v.double(), u_code.double(), t_code.double(), v_code.double(),
                     backend="triton")


# ------------------------------------------------------------------ frozen-item cache

@pytest.mark.parametrize("bits", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cached_calibration_equals_calibrate_on_features(gen, bits, backend):
    n_items, batch = 50, 83
    t, v, _, t_code, v_code = _rows(gen, n_items, 24, bits)
    u_code = torch.randn(batch, bits, generator=gen)
    u_code[torch.rand(batch, bits, generator=gen) < 0.1] = 0.0
    items = torch.randint(0, n_items, (batch,), generator=gen)
    cache = gf.precompute_item_calibration(t, v, t_code, v_code)
    assert cache.text_sign.dtype == torch.int64 and cache.text_sign.shape == (n_items, (bits + 63) // 64)
    got = gf.calibrate_items(cache, u_code, items, backend=backend)
    want = gf.calibrate(t[items], v[items], u_code, t_code[items], v_code[items], backend="torch")
    # The same per-item distances: everything equal bit for bit, the popcount included.
    assert torch.equal(got.distance, want.distance)
    assert torch.equal(got.clean, want.clean)
    assert torch.equal(got.weights, want.weights)
    torch.testing.assert_close(got.normalized, want.normalized, rtol=0, atol=1e-7)


def test_cached_calibration_errors_name_the_argument(gen):
    t, v, _, t_code, v_code = _rows(gen, 10, 8, 64)
    cache = gf.precompute_item_calibration(t, v, t_code, v_code)
    u_code = torch.randn(4, 64, generator=gen)
    with pytest.raises(IndexError, match="items"):
        gf.calibrate_items(cache, u_code, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="u_code"):
        gf.calibrate_items(cache, torch.randn(4, 32), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="cache"):
        gf.calibrate_items((cache.distance,), u_code, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="items is empty"):
        gf.calibrate_items(cache, u_code[:0], torch.tensor([], dtype=torch.long))


def test_custom_ops_pass_opcheck(gen):
    t, v, u_code, t_code, v_code = _rows(gen, 21, 16, 70)
    torch.library.opcheck(_library.calibrate_rows, (t, v, u_code, t_code, v_code, 0.7, False))
    cache = gf.precompute_item_calibration(t, v, t_code, v_code)
    items = torch.randint(0, 21, (17,), generator=gen)
    torch.library.opcheck(_library.calibrate_cached,
                          (items, cache.distance, u_code[:17], cache.text_sign, cache.text_nonzero,
                           cache.image_sign, cache.image_nonzero, 0.7))


def test_guider_loss_on_triton_matches_torch(gen):
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
    fast = gf.GuiderLoss(24, 40, embed_dim=16, feat_embed_dim=16, backend="triton",
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
