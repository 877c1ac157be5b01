"""guider_fast.calibrate / precompute_item_calibration / calibrate_items: the torch reference
against GUIDER's computation through geomloss, every backend against the float64 AMSC formula."""

import pytest
import torch

import guider_fast as gf
from guider_fast import _library
from guider_fast.reference import calibration as ref

from .properties import given, st
from .backends import dtypes_for, require
from .problems import reference_guider_weights, calibration_oracle, calibration_rows, ternary_codes
from .tolerances import cancellation_tolerance, tolerance

CUDA_ONLY = pytest.mark.cuda_only
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
THRESHOLD = 0.7


def assert_matches(got, want, distance_atol, threshold=THRESHOLD, weights_atol=0.0, what=""):
    """got: a Calibration; want: (weights, clean, distance, normalized) or a Calibration.

    A row whose normalised distance sits within the distance error of the
    threshold may flip; every other flag must agree, and the weights wherever
    the flags do.
    """
    if isinstance(want, gf.Calibration):
        want = (want.weights, want.clean, want.distance, want.normalized)
    w_want, clean_want, d_want, n_want = (x.cpu() for x in want)
    weights, clean, distance, normalized = (x.cpu() for x in (got.weights, got.clean, got.distance,
                                                                got.normalized))
    assert clean.dtype == torch.bool and weights.shape == w_want.shape
    torch.testing.assert_close(distance.double(), d_want.double(), rtol=0, atol=distance_atol,
                               msg=f"{what}: distance")
    spread = max((d_want.max() - d_want.min()).item(), 1e-6)
    margin = 2.0 * distance_atol / spread + 1e-6
    torch.testing.assert_close(normalized.double(), n_want.double(), rtol=0, atol=margin,
                               msg=f"{what}: normalized")
    decided = (n_want.double() - threshold).abs() > margin
    assert torch.equal(clean[decided], clean_want[decided]), f"{what}: clean flags"
    same = clean == clean_want
    torch.testing.assert_close(weights[same].double(), w_want[same].double(), rtol=0, atol=weights_atol,
                               msg=f"{what}: weights")


def distance_tolerance(t, v, distance, backend, dtype, want_distance):
    if distance == "geomloss":
        return cancellation_tolerance(t, v)
    tol = tolerance("calibrate", backend, dtype).euclidean
    return tol * max(1.0, want_distance.abs().max().item())


# ---------------------------------------------------------- the reference vs GUIDER via geomloss


@pytest.mark.parametrize("batch", [1, 7, 33, 2048])
def test_reference_matches_guider_through_geomloss(gen, batch):
    t = torch.randn(batch, 64, generator=gen) * 0.2
    v = torch.randn(batch, 64, generator=gen) * 0.2 + 0.05
    codes = [torch.randn(batch, 64, generator=gen) for _ in range(3)]
    cal = gf.calibrate(t, v, *codes, backend="torch")
    w, clean, d, normalized = reference_guider_weights(t, v, *codes)
    # The closed form equals GeomLoss's fp32 output up to a few ulps of the distance.
    torch.testing.assert_close(cal.distance, d, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(cal.normalized, normalized, rtol=1e-5, atol=1e-5)
    # Rows sitting within rounding of the threshold may flip; none do at these seeds.
    assert torch.equal(cal.clean, clean)
    torch.testing.assert_close(cal.weights, w, rtol=0, atol=1e-7)


def test_reference_sign_of_zero_is_zero_and_threshold_applies(gen):
    t, v, u_code, t_code, v_code = calibration_rows(gen, 12, 64, 8)
    u_code[:, :3] = 0.0  # ternary codes: zero bits contribute nothing
    cal = gf.calibrate(t, v, u_code, t_code, v_code, threshold=0.5, backend="torch")
    w, clean, _, _ = reference_guider_weights(t, v, u_code, t_code, v_code, threshold=0.5)
    assert torch.equal(cal.clean, clean)
    torch.testing.assert_close(cal.weights, w, rtol=0, atol=1e-7)
    assert bool((cal.weights[~cal.clean] == 1).all())


def test_reference_euclidean_distance_is_exact(gen):
    t, v, *codes = calibration_rows(gen, 19, 64, 64)
    cal = gf.calibrate(t, v, *codes, distance="euclidean", backend="torch")
    torch.testing.assert_close(cal.distance, (t - v).norm(dim=1), rtol=0, atol=0)


def test_reference_clouds_use_the_debiased_divergence(gen):
    t, v, *codes = calibration_rows(gen, 6, 8, 16, points=(4, 3))
    cal = gf.calibrate(t, v, *codes, backend="torch")
    geomloss = pytest.importorskip("geomloss")
    want = geomloss.SamplesLoss("sinkhorn", p=1, blur=0.1)(t, v + 1e-8)
    torch.testing.assert_close(cal.distance, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 63, 64, 65, 130])
def test_packed_ternary_codes_give_the_exact_similarity(gen, bits):
    a = torch.randn(41, bits, generator=gen)
    b = torch.randn(41, bits, generator=gen)
    a[:, ::5] = 0.0  # sign(0) = 0: ternary codes
    b[::3, 1::4] = 0.0
    packed_a, packed_b = ref.pack_sign_codes(a), ref.pack_sign_codes(b)
    assert packed_a[0].dtype == torch.int64 and packed_a[0].shape == (41, (bits + 63) // 64)
    got = ref.packed_sign_similarity(*packed_a, *packed_b, bits)
    torch.testing.assert_close(got, ref.sign_similarity(a, b), rtol=0, atol=0)


# ----------------------------------------------------------- every backend vs the formula


def assert_rows_match_oracle(t, v, codes, backend, dtype, distance, threshold=THRESHOLD):
    got = gf.calibrate(t, v, *codes, threshold=threshold, distance=distance, backend=backend)
    want = calibration_oracle(t, v, *codes, threshold, distance)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.weights.dtype == got.distance.dtype == out_dtype and got.weights.device == t.device
    tol = tolerance("calibrate", backend, dtype)
    assert_matches(got, want, distance_tolerance(t, v, distance, backend, dtype, want[2]), threshold,
                   tol.weights, f"{backend} {dtype} {distance}")


SHAPES = [(1, 5, 3), (37, 64, 64), (130, 70, 129),
          pytest.param((7, 13, 100), marks=CUDA_ONLY), pytest.param((2049, 64, 64), marks=CUDA_ONLY),
          pytest.param((65_537, 64, 64), marks=CUDA_ONLY), pytest.param((65_537, 13, 100), marks=CUDA_ONLY)]


@pytest.mark.parametrize("distance", ["geomloss", "euclidean"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rows_match_oracle(gen, backend, device, shape, dtype, distance):
    t, v, *codes = calibration_rows(gen, *shape, dtype=dtype, device=device)
    require("calibrate", backend, device, dtype, (t.dim(), codes[0].dtype))
    assert_rows_match_oracle(t, v, codes, backend, dtype, distance)


@given(data=st.data(), batch=st.integers(1, 40), dim=st.integers(1, 70), bits=st.integers(1, 130),
       distance=st.sampled_from(["geomloss", "euclidean"]), threshold=st.sampled_from([0.3, 0.7, 1.5]),
       seed=st.integers(0, 2**31 - 1))
def test_property_rows_match_oracle(backend, device, data, batch, dim, bits, distance, threshold, seed):
    require("calibrate", backend, device)
    dtype = data.draw(st.sampled_from(dtypes_for("calibrate", backend, device)), label="dtype")
    t, v, *codes = calibration_rows(torch.Generator().manual_seed(seed), batch, dim, bits, dtype=dtype,
                                    device=device)
    require("calibrate", backend, device, dtype, (t.dim(), codes[0].dtype))
    assert_rows_match_oracle(t, v, codes, backend, dtype, distance, threshold)


def test_outputs_carry_no_gradient(gen, backend, device):
    """Documented: "nothing returned carries gradients", even for inputs that require grad."""
    t, v, *codes = calibration_rows(gen, 9, 64, 64, device=device)
    require("calibrate", backend, device, t.dtype, (2, t.dtype))
    cache = gf.precompute_item_calibration(t, v, codes[1], codes[2])
    items = torch.randint(0, 9, (11,), generator=gen).to(device)
    u_code = ternary_codes(gen, 11, 64).to(device).requires_grad_()
    cal = gf.calibrate(*(x.requires_grad_() for x in (t, v, *codes)), backend=backend)
    cached = gf.calibrate_items(cache, u_code, items, backend=backend)
    for field in (cal.weights, cal.distance, cal.normalized, cached.weights, cached.normalized):
        assert not field.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_are_calibrated_in_float32(gen, backend, device, dtype):
    t, v, *codes = calibration_rows(gen, 2048, 64, 64, dtype=dtype, device=device)
    require("calibrate", backend, device, dtype, (2, dtype))
    cal = gf.calibrate(t, v, *codes, backend=backend)
    want = gf.calibrate(t.float(), v.float(), *(c.float() for c in codes), backend=backend)
    assert cal.weights.dtype == torch.float32
    torch.testing.assert_close(cal.distance, want.distance, rtol=0, atol=0)
    assert torch.equal(cal.clean, want.clean)
    torch.testing.assert_close(cal.weights, want.weights, rtol=0, atol=0)


def test_identical_rows_normalise_to_zero(gen, backend, device):
    """Zero disagreement everywhere: min == max, every row normalises to 0 and is clean."""
    t, _, *codes = calibration_rows(gen, 9, 16, 64, device=device)
    require("calibrate", backend, device, t.dtype, (2, t.dtype))
    got = gf.calibrate(t, t.clone(), *codes, distance="euclidean", backend=backend)
    assert torch.equal(got.normalized, torch.zeros(9, device=device)) and bool(got.clean.all())
    w, _, _, _ = calibration_oracle(t, t, *codes, THRESHOLD, "euclidean")
    torch.testing.assert_close(got.weights.double().cpu(), w, rtol=0, atol=4 * torch.finfo(torch.float32).eps)


def test_similarities_are_exact_counts(gen, backend, device):
    """Code similarities are exact counts: weights equal the reference formula bit for bit."""
    t, v, *codes = calibration_rows(gen, 200, 8, 130, device=device)
    require("calibrate", backend, device, t.dtype, (2, t.dtype))
    got = gf.calibrate(t, v, *codes, distance="euclidean", threshold=2.0, backend=backend)
    sim_t = ref.sign_similarity(codes[0], codes[1])
    sim_v = ref.sign_similarity(codes[0], codes[2])
    assert bool(got.clean.all())
    assert torch.equal(got.weights, ref.calibration_weights(got.clean, sim_t, sim_v))


def test_float64_rows(gen, backend, device):
    t, v, *codes = calibration_rows(gen, 9, 64, 64, dtype=torch.float64, device=device)
    require("calibrate", backend, device, torch.float64, (2, torch.float64))
    cal = gf.calibrate(t, v, *codes, distance="euclidean", backend=backend)
    assert cal.weights.dtype == torch.float64


# ------------------------------------------------------------------ frozen-item cache


@pytest.mark.parametrize("bits", [1, 63, 64, 65, 130])
def test_cached_calibration_equals_calibrate_on_features(gen, backend, device, bits):
    n_items, batch = 50, 83  # more interactions than items: duplicate items
    t, v, _, t_code, v_code = calibration_rows(gen, n_items, 24, bits, device=device)
    require("calibrate_items", backend, device, t.dtype)
    u_code = ternary_codes(gen, batch, bits).to(device)
    items = torch.randint(0, n_items, (batch,), generator=gen).to(device)
    cache = gf.precompute_item_calibration(t, v, t_code, v_code)
    assert cache.text_sign.dtype == torch.int64 and cache.text_sign.shape == (n_items, (bits + 63) // 64)
    got = gf.calibrate_items(cache, u_code, items, backend=backend)
    want = gf.calibrate(t[items], v[items], u_code, t_code[items], v_code[items], backend="torch")
    # The same per-item distances: everything equal bit for bit, the popcount included.
    assert torch.equal(got.distance, want.distance)
    assert torch.equal(got.clean, want.clean)
    assert torch.equal(got.weights, want.weights)
    torch.testing.assert_close(got.normalized, want.normalized, rtol=0, atol=1e-7)


@pytest.mark.parametrize("distance", ["geomloss", "euclidean"])
@pytest.mark.parametrize("n_items,batch,bits", [(3, 500, 64), pytest.param(7050, 2048, 64, marks=CUDA_ONLY),
                                                pytest.param(1001, 65_537, 100, marks=CUDA_ONLY)])
def test_cached_calibration_matches_oracle(gen, backend, device, n_items, batch, bits, distance):
    t, v, _, t_code, v_code = calibration_rows(gen, n_items, 64, bits, device=device)
    require("calibrate_items", backend, device, t.dtype)
    cache = gf.precompute_item_calibration(t, v, t_code, v_code, distance=distance)
    u_code = ternary_codes(gen, batch, bits).to(device)
    items = torch.randint(0, n_items, (batch,), generator=gen).to(device)
    got = gf.calibrate_items(cache, u_code, items, backend=backend)
    want = calibration_oracle(t[items], v[items], u_code, t_code[items], v_code[items], THRESHOLD, distance)
    atol = distance_tolerance(t, v, distance, backend, t.dtype, want[2])
    assert_matches(got, want, atol, weights_atol=4 * torch.finfo(torch.float32).eps, what="calibrate_items")


@given(n_items=st.integers(1, 30), batch=st.integers(1, 60), dim=st.integers(1, 20), bits=st.integers(1, 130),
       distance=st.sampled_from(["geomloss", "euclidean"]), threshold=st.sampled_from([0.3, 0.7]),
       seed=st.integers(0, 2**31 - 1))
def test_property_cached_calibration_equals_calibrate(backend, device, n_items, batch, dim, bits, distance,
                                                      threshold, seed):
    """Random catalogues with duplicate items in the batch: the cache gives calibrate's outputs."""
    require("calibrate_items", backend, device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    t, v, _, t_code, v_code = calibration_rows(gen, n_items, dim, bits, device=device)
    u_code = ternary_codes(gen, batch, bits).to(device)
    items = torch.randint(0, n_items, (batch,), generator=gen).to(device)
    cache = gf.precompute_item_calibration(t, v, t_code, v_code, distance=distance, chunk_size=7)
    got = gf.calibrate_items(cache, u_code, items, threshold=threshold, backend=backend)
    want = gf.calibrate(t[items], v[items], u_code, t_code[items], v_code[items], threshold=threshold,
                        distance=distance, backend="torch")
    assert torch.equal(got.distance, want.distance) and torch.equal(got.clean, want.clean)
    assert torch.equal(got.weights, want.weights)
    torch.testing.assert_close(got.normalized, want.normalized, rtol=0, atol=1e-7)


def test_cached_calibration_errors_name_the_argument(gen):
    t, v, _, t_code, v_code = calibration_rows(gen, 10, 8, 64)
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


def test_triton_custom_ops_pass_opcheck(gen, device):
    require("calibrate", "triton", device, torch.float32)
    t, v, u_code, t_code, v_code = calibration_rows(gen, 21, 16, 70, device=device)
    torch.library.opcheck(_library.calibrate_rows, (t, v, u_code, t_code, v_code, 0.7, False))
    cache = gf.precompute_item_calibration(t, v, t_code, v_code)
    items = torch.randint(0, 21, (17,), generator=gen).to(device)
    torch.library.opcheck(_library.calibrate_cached,
                          (items, cache.distance, u_code[:17], cache.text_sign, cache.text_nonzero,
                           cache.image_sign, cache.image_nonzero, 0.7))
