"""csrc's calibration kernels (through the sim, via ctypes) against guider_fast.reference.

The kernels compute the Triton twin's semantics (see csrc/guider_fast_cuda.h):
everything but the distance is an exact function of the distance and the
integer sign counts, so those are compared bit for bit; the distance itself
agrees with the reference up to the dot-product rounding order and GeomLoss's
self-cost cancellation residue.  The cached path gathers the distances, so it
must equal the reference bit for bit.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from guider_fast.reference import calibration as ref

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ORDERS = {"forward": 0, "reverse": 1, "random": 2}
F32 = torch.float32


@pytest.fixture(scope="module")
def lib(sim_library):
    lib = ctypes.CDLL(str(sim_library))
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float, ctypes.c_int
    lib.gf_sim_set_order.argtypes = [i32, ctypes.c_ulonglong]
    lib.gf_sim_calibration_workspace_floats.argtypes = [i64]
    lib.gf_sim_calibration_workspace_floats.restype = i64
    lib.gf_sim_calibrate_rows.argtypes = [p, p, i32, p, p, p, i32, p, i64, i64, i64, f32, i32,
                                          p, p, p, p, p, ctypes.c_char_p, i32]
    lib.gf_sim_calibrate_cached.argtypes = [p, p, p, i32, i64, i64, p, p, p, p, i64, i64, i64, f32,
                                            p, p, p, p, p, ctypes.c_char_p, i32]
    yield lib
    lib.gf_sim_set_order(0, 0)


def _outputs(lib, batch):
    return (torch.full((batch,), float("nan")), torch.zeros(batch, dtype=torch.uint8),
            torch.full((batch,), float("nan")), torch.full((batch,), float("nan")),
            torch.full((lib.gf_sim_calibration_workspace_floats(batch),), float("nan")))


def _check(lib, status, error):
    assert status == 0, f"status {status}: {error.value.decode()}"


def sim_calibrate(lib, t, v, u, tc, vc, threshold, distance, order="forward", seed=0):
    """(weights, clean, distance, normalized) from the sim's calibrate_rows."""
    lib.gf_sim_set_order(ORDERS[order], seed)
    batch, dim = t.shape
    bits = u.shape[1]
    strides = (ctypes.c_longlong * 10)(*[s for x in (t, v, u, tc, vc) for s in x.stride()])
    w, c, d, n, ws = _outputs(lib, batch)
    error = ctypes.create_string_buffer(2048)
    status = lib.gf_sim_calibrate_rows(t.data_ptr(), v.data_ptr(), DTYPES[t.dtype], u.data_ptr(), tc.data_ptr(),
                                       vc.data_ptr(), DTYPES[u.dtype], strides, batch, dim, bits, threshold,
                                       int(distance == "euclidean"), w.data_ptr(), c.data_ptr(), d.data_ptr(),
                                       n.data_ptr(), ws.data_ptr(), error, len(error))
    _check(lib, status, error)
    return w, c.bool(), d, n


def _inputs(batch, dim, bits, feat, code, seed, transposed=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, dim, generator=g)
    # Half the rows close (clean), half far: both branches of the weights.
    noise = torch.randn(batch, dim, generator=g) * torch.where(torch.arange(batch) % 2 == 0, 0.05, 1.0)[:, None]
    v = t + noise
    codes = []
    for _ in range(3):
        c = torch.randn(batch, bits, generator=g)
        c[torch.rand(batch, bits, generator=g) < 0.2] = 0.0  # ternary: sign(0) = 0
        codes.append(c.to(code))
    t, v = t.to(feat), v.to(feat)
    if transposed:  # column-major storage: strided rows
        t = t.t().contiguous().t()
        codes[1] = codes[1].t().contiguous().t()
    return (t, v, *codes)


def _distance_tolerance(t, v, distance):
    t, v = t.float(), v.float()
    if distance == "euclidean":
        return 4e-6 * torch.linalg.vector_norm(t - v, dim=1) + 1e-7
    # GeomLoss's expanded cost: the reference's C(x, x) keeps a residue up to
    # ~sqrt(few ulp(|x|^2)), the kernel's is exactly sqrt(1e-8); the cross term
    # sqrt(sq) differs by the dot products' rounding order.
    sq = (t * t).sum(1) + (v * v).sum(1)
    eps = torch.finfo(torch.float32).eps
    return 2.0 * torch.sqrt(8 * eps * sq) + 1e-6


CASES = [  # (batch, dim, bits, features dtype, codes dtype, distance, column-major)
    (1, 1, 1, torch.float32, torch.float32, "geomloss", False),
    (7, 5, 63, torch.float16, torch.bfloat16, "euclidean", False),
    (33, 64, 64, torch.float32, torch.float16, "geomloss", True),
    (33, 70, 65, torch.bfloat16, torch.float32, "geomloss", False),
    (130, 64, 130, torch.float32, torch.float32, "euclidean", True),
    (130, 70, 1, torch.float16, torch.float16, "geomloss", False),
]


@pytest.mark.parametrize("batch, dim, bits, feat, code, distance, transposed", CASES)
def test_rows_match_reference(lib, batch, dim, bits, feat, code, distance, transposed):
    threshold = 0.4
    t, v, u, tc, vc = _inputs(batch, dim, bits, feat, code, seed=batch * 1000 + dim + bits, transposed=transposed)
    w, clean, d, n = sim_calibrate(lib, t, v, u, tc, vc, threshold, distance)
    check_rows_against_reference(t, v, u, tc, vc, threshold, distance, w, clean, d, n)


def check_rows_against_reference(t, v, u, tc, vc, threshold, distance, w, clean, d, n):
    """The kernels' (weights, clean, distance, normalized) against guider_fast.reference."""
    batch = t.shape[0]
    d_ref = ref.modality_distance(t, v, distance)
    assert d_ref.dtype == F32 and d.dtype == F32
    assert torch.all((d - d_ref).abs() <= _distance_tolerance(t, v, distance)), (d - d_ref).abs().max()

    # Exact given the kernel's own distances: the normalisation, the mask and the weights.
    assert torch.equal(n, ref.minmax_normalize(d))
    assert torch.equal(clean, n < threshold)
    s_t, s_v = ref.sign_similarity(u, tc), ref.sign_similarity(u, vc)
    assert torch.equal(w, ref.calibration_weights(clean, s_t.float(), s_v.float()))
    if batch > 2:
        assert clean.any() and (~clean).any()

    # And the reference's whole calibrate, where the mask is not within the distance tolerance of the threshold.
    w_ref, clean_ref, _, n_ref = ref.calibrate(t, v, u, tc, vc, threshold, distance)
    spread = (d_ref.max() - d_ref.min()).clamp_min(1e-6)
    safe = (n_ref - threshold).abs() > 4 * _distance_tolerance(t, v, distance).max() / spread
    assert torch.equal(clean[safe], clean_ref[safe])
    assert torch.equal(w[safe], w_ref[safe])


@pytest.mark.parametrize("batch, dim, bits, feat, code, distance, transposed", CASES[2:4])
def test_rows_identical_across_thread_orders(lib, batch, dim, bits, feat, code, distance, transposed):
    t, v, u, tc, vc = _inputs(batch, dim, bits, feat, code, seed=7, transposed=transposed)
    runs = [sim_calibrate(lib, t, v, u, tc, vc, 0.5, distance, order, seed) for order, seed in
            (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _cache(t, v, t_code, v_code, distance):
    """precompute_item_calibration's fields, from the reference alone."""
    return (ref.modality_distance(t, v, distance).float().contiguous(), *ref.pack_sign_codes(t_code),
            *ref.pack_sign_codes(v_code))


CACHED_CASES = [(1, 1, torch.float32), (7, 63, torch.bfloat16), (33, 64, torch.float16), (130, 65, torch.float32),
                (33, 130, torch.bfloat16)]


def cached_case(batch, bits, code, n_items=13, threshold=0.6):
    """(items, item_distance, (ts, tn, vs, vn), u, threshold, reference (w, clean, d, normalized))."""
    t, v, _, t_code, v_code = _inputs(n_items, 8, bits, torch.float32, code, seed=bits)
    item_distance, ts, tn, vs, vn = _cache(t, v, t_code, v_code, "geomloss")
    g = torch.Generator().manual_seed(batch)
    items = torch.randint(0, n_items, (batch,), generator=g)
    u = torch.randn(batch, bits, generator=g)
    u[torch.rand(batch, bits, generator=g) < 0.2] = 0.0
    u = u.to(code)
    if batch % 2:
        u = u.t().contiguous().t()

    # The reference's cached calibration (guider_fast.calibration._calibrate_items_torch).
    d_ref = item_distance.index_select(0, items)
    us, un = ref.pack_sign_codes(u)
    sims = [ref.packed_sign_similarity(us, un, s.index_select(0, items), z.index_select(0, items), bits)
            for s, z in ((ts, tn), (vs, vn))]
    w_ref, clean_ref, n_ref = ref.weights_from_similarities(d_ref, sims[0], sims[1], threshold)
    return items, item_distance, (ts, tn, vs, vn), u, threshold, (w_ref, clean_ref, d_ref, n_ref)


@pytest.mark.parametrize("batch, bits, code", CACHED_CASES)
def test_cached_matches_reference_bitwise(lib, batch, bits, code):
    items, item_distance, (ts, tn, vs, vn), u, threshold, (w_ref, clean_ref, d_ref, n_ref) = cached_case(
        batch, bits, code)
    for order in ORDERS:
        lib.gf_sim_set_order(ORDERS[order], 5)
        w, c, d, n, ws = _outputs(lib, batch)
        error = ctypes.create_string_buffer(2048)
        status = lib.gf_sim_calibrate_cached(items.data_ptr(), item_distance.data_ptr(), u.data_ptr(), DTYPES[code],
                                             u.stride(0), u.stride(1), ts.data_ptr(), tn.data_ptr(), vs.data_ptr(),
                                             vn.data_ptr(), ts.shape[1], batch, bits, threshold, w.data_ptr(),
                                             c.data_ptr(), d.data_ptr(), n.data_ptr(), ws.data_ptr(), error,
                                             len(error))
        _check(lib, status, error)
        assert torch.equal(d, d_ref)
        assert torch.equal(n, n_ref)
        assert torch.equal(c.bool(), clean_ref)
        assert torch.equal(w, w_ref)


def test_invalid_arguments_launch_nothing(lib):
    t, v, u, tc, vc = _inputs(3, 4, 8, torch.float32, torch.float32, seed=0)
    w, c, d, n, ws = _outputs(lib, 3)
    error = ctypes.create_string_buffer(256)
    strides = (ctypes.c_longlong * 10)(*[1] * 10)
    status = lib.gf_sim_calibrate_rows(t.data_ptr(), v.data_ptr(), 0, u.data_ptr(), tc.data_ptr(), vc.data_ptr(), 0,
                                       strides, 3, 4, 0, 0.5, 0, w.data_ptr(), c.data_ptr(), d.data_ptr(),
                                       n.data_ptr(), ws.data_ptr(), error, len(error))
    assert status == 1  # cudaErrorInvalidValue: bits = 0
    assert torch.isnan(w).all()
