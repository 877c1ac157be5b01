"""The torch binding (csrc/binding.cpp) of the calibration kernels, on CPU tensors through
the emulation build, via the real dispatch path (``backend="cuda"``).

The kernels are the ones test_sim_calibration.py checks through ctypes; here the
point is the binding and the integration: the same bits through
``torch.ops.guider_fast_cuda.*`` as through the C API, the reference's values
(tolerances justified there), the argument checks' messages, opcheck and
torch.compile(fullgraph=True).  The real build's binding is syntax-checked
against the CPU wheel's c10/cuda headers (it cannot be linked without CUDA).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import guider_fast as gf
from guider_fast import _cuda_build, _dispatch

from .test_sim_calibration import (CACHED_CASES, CASES, _inputs, cached_case, check_rows_against_reference,
                                   lib, sim_calibrate)  # noqa: F401  (lib: the ctypes fixture)

OPS = torch.ops.guider_fast_cuda


def test_real_binding_compiles_against_the_cuda_headers(binding_syntax):
    # The job fails the fixture on any error or warning (-Wall -Wextra -Werror on our code).
    assert "binding.cpp" in binding_syntax


@pytest.mark.parametrize("batch, dim, bits, feat, code, distance, transposed", CASES)
def test_calibrate_through_dispatch_matches_reference(sim_extension, lib, batch, dim, bits, feat, code, distance,
                                                      transposed):
    threshold = 0.4
    t, v, u, tc, vc = _inputs(batch, dim, bits, feat, code, seed=batch * 1000 + dim + bits + 1,
                              transposed=transposed)
    out = gf.calibrate(t, v, u, tc, vc, threshold=threshold, distance=distance, backend="cuda")
    check_rows_against_reference(t, v, u, tc, vc, threshold, distance, out.weights, out.clean, out.distance,
                                 out.normalized)
    # The very bits of the C API (same kernels, same emulation).
    for got, want in zip((out.weights, out.clean, out.distance, out.normalized),
                         sim_calibrate(lib, t, v, u, tc, vc, threshold, distance)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("batch, bits, code", CACHED_CASES)
def test_calibrate_items_through_dispatch_is_bitwise_the_reference(sim_extension, batch, bits, code):
    items, item_distance, packed, u, threshold, reference = cached_case(batch, bits, code)
    cache = gf.ItemCalibration(item_distance, *packed, bits)
    out = gf.calibrate_items(cache, u, items.int(), threshold=threshold, backend="cuda")
    torch_out = gf.calibrate_items(cache, u, items, threshold=threshold, backend="torch")
    for got, want, ref_torch in zip((out.weights, out.clean, out.distance, out.normalized), reference,
                                    (torch_out.weights, torch_out.clean, torch_out.distance, torch_out.normalized)):
        assert torch.equal(got, want)
        assert torch.equal(got, ref_torch)


def test_outputs_carry_no_gradient(sim_extension):
    t, v, u, tc, vc = (x.requires_grad_() for x in _inputs(6, 3, 8, torch.float32, torch.float32, seed=2))
    out = gf.calibrate(t, v, u, tc, vc, backend="cuda")
    items, item_distance, packed, u_items, threshold, _ = cached_case(7, 70, torch.float32)
    cached = gf.calibrate_items(gf.ItemCalibration(item_distance, *packed, 70), u_items.requires_grad_(), items,
                                backend="cuda")
    for x in (out.weights, out.distance, out.normalized, cached.weights, cached.normalized):
        assert not x.requires_grad and x.grad_fn is None


def test_dispatch_limits_and_auto(sim_extension):
    t, v, u, tc, vc = _inputs(4, 3, 8, torch.float32, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run calibrate: the CUDA calibration kernel takes "
                                           r"\(B, d\) rows"):
        gf.calibrate(t[:, None], v[:, None], u, tc, vc, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run calibrate: the cuda kernel for calibrate "
                                           "takes float32, float16, bfloat16 inputs, got float64"):
        gf.calibrate(t.double(), v.double(), u, tc, vc, backend="cuda")
    # The emulation is a test vehicle: auto stays torch on CPU.
    assert _dispatch.resolve("calibrate", "auto", torch.device("cpu"), torch.float32, (2, torch.float32))[0] == "torch"
    assert _dispatch.unavailable_reason("calibrate", "cuda", torch.device("cpu")) is None


def _rows_args(batch=5, dim=3, bits=9):
    t, v, u, tc, vc = _inputs(batch, dim, bits, torch.float32, torch.float32, seed=3)
    return [t, v, u, tc, vc, 0.5, False]


def _cached_args():
    items, item_distance, packed, u, threshold, _ = cached_case(7, 70, torch.float32)
    return [items, item_distance, u, *packed, threshold]


def _with(args, index, value):
    args = list(args)
    args[index] = value(args[index]) if callable(value) else value
    return args


HUGE = 2**31  # zero-stride (expanded) tensors: past the 32-bit limits without the memory
BAD_ROWS = [
    (0, lambda t: t.double(), "argument 't' must be float32, float16 or bfloat16, got Double"),
    (1, lambda v: v.half(), r"argument 'v' must have the dtype of 't' \(Float\), got Half"),
    (0, lambda t: t[None], r"argument 't' must be \(B, d\) rows \(2-D\), got shape \[1, 5, 3\]"),
    (1, lambda v: v[:, :2], r"argument 'v' must have the shape of 't' \[5, 3\], got \[5, 2\]"),
    (2, lambda u: u[:4], r"argument 'u_code' must have size 5 in dimension 0"),
    (2, lambda u: u[:, :0], "argument 'u_code' has 0 bits, needs at least 1"),
    (2, lambda u: u.to(torch.int32), "argument 'u_code' must be float32, float16 or bfloat16, got Int"),
    (3, lambda c: c.bfloat16(), r"argument 't_code' must have the dtype of 'u_code' \(Float\), got BFloat16"),
    (4, lambda c: c[:, 1:], r"argument 'v_code' must have the shape of 'u_code' \[5, 9\], got \[5, 8\]"),
    (0, lambda t: t[:0], "argument 't' has 0 rows, needs at least 1"),
]
BAD_CACHED = [
    (0, lambda i: i.int(), "argument 'items' must be Long, got Int"),
    (0, lambda i: i.repeat_interleave(2)[::2], "argument 'items' must be contiguous"),
    (0, lambda i: i + 100, r"argument 'items' holds indices in \[\d+, \d+\], outside the 13 rows of 'item_distance'"),
    (1, lambda d: d.double(), "argument 'item_distance' must be Float, got Double"),
    (2, lambda u: u[:, :64], r"argument 'text_sign' must have size 1 in dimension 1 \(ceil\(bits / 64\) words"),
    (4, lambda z: z[:12], r"argument 'text_nonzero' must have size 13 in dimension 0 \(one row per item"),
    (5, lambda s: s.t().contiguous().t(), "argument 'image_sign' must be contiguous"),
    (6, lambda z: z.float(), "argument 'image_nonzero' must be Long, got Float"),
]


@pytest.mark.parametrize("index, bad, message", BAD_ROWS)
def test_bad_rows_arguments_name_the_argument(sim_extension, index, bad, message):
    with pytest.raises(RuntimeError, match="guider_fast_cuda::calibrate_rows: " + message):
        OPS.calibrate_rows(*_with(_rows_args(), index, bad))


@pytest.mark.parametrize("index, bad, message", BAD_CACHED)
def test_bad_cached_arguments_name_the_argument(sim_extension, index, bad, message):
    with pytest.raises(RuntimeError, match="guider_fast_cuda::calibrate_cached: " + message):
        OPS.calibrate_cached(*_with(_cached_args(), index, bad))


def test_32_bit_limits(sim_extension):
    row = torch.zeros(1, 1)
    with pytest.raises(RuntimeError, match=f"argument 't': the batch size is {HUGE}, over the kernels' 32-bit"):
        OPS.calibrate_rows(row.expand(HUGE, 1), row.expand(HUGE, 1), *[row.expand(HUGE, 4)] * 3, 0.5, False)
    with pytest.raises(RuntimeError, match=f"argument 'u_code': the code length is {HUGE}, over the kernels'"):
        OPS.calibrate_rows(row, row, *[row.expand(1, HUGE)] * 3, 0.5, False)


def test_opcheck(sim_extension):
    torch.library.opcheck(OPS.calibrate_rows.default, _rows_args())
    torch.library.opcheck(OPS.calibrate_rows.default, _with(_rows_args(33, 70, 65), 6, True))
    torch.library.opcheck(OPS.calibrate_cached.default, _cached_args())


def test_compile_fullgraph(sim_extension):
    """fullgraph=True fails on any graph break; value checks (a host read) are off, as in production."""
    t, v, u, tc, vc = _inputs(9, 6, 70, torch.float32, torch.bfloat16, seed=4)
    items, item_distance, packed, u_items, threshold, _ = cached_case(7, 70, torch.float32)
    cache = gf.ItemCalibration(item_distance, *packed, 70)

    user, item = torch.randn(5, 12).requires_grad_(), torch.randn(7, 12).requires_grad_()
    users, pos, neg = torch.randint(0, 5, (9,)), torch.randint(0, 7, (9,)), torch.randint(0, 7, (9, 3))

    def step(t, v, u, tc, vc, u_items, items, user, item):
        """A GUIDER step: calibration weights into the DBPR loss."""
        rows = gf.calibrate(t, v, u, tc, vc, threshold=0.5, backend="cuda")
        cached = gf.calibrate_items(cache, u_items, items, threshold=threshold, backend="cuda")
        loss = gf.dbpr_loss(user, item, users, pos, neg, rows.weights, backend="cuda")
        return rows.clean, cached.weights, cached.normalized, loss

    gf.set_checks(False)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = compiled(t, v, u, tc, vc, u_items, items, user, item)
        got = (*got, *torch.autograd.grad(got[-1], (user, item)))  # the compiled backward
    finally:
        gf.set_checks(None)
    want = step(t, v, u, tc, vc, u_items, items, user, item)
    want = (*want, *torch.autograd.grad(want[-1], (user, item)))
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    for a, b in zip(got[3:], want[3:]):  # the atomics' order may differ between the two runs
        torch.testing.assert_close(a, b)


def _python(code, **env):
    full_env = {**os.environ, **env}
    for name in ("GUIDER_FAST_CUDA_SIM", "GUIDER_FAST_BACKEND"):
        if name not in env:
            full_env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_nothing_loads_at_import_and_the_reason_says_how():
    out = _python("import sys, torch, guider_fast\n"
                  "from guider_fast import _cuda_build, _dispatch\n"
                  "assert _cuda_build.sim_loaded() is None and 'guider_fast._C' not in sys.modules\n"
                  "print(_dispatch.unavailable_reason('calibrate', 'cuda', torch.device('cpu')))\n")
    assert "GUIDER_FAST_CUDA_SIM=1" in out and "CUDA tensors" in out


def test_environment_builds_the_emulation_at_first_dispatch(sim_extension):
    # Warm: the session's build directory already holds an up-to-date library.
    out = _python("import torch, guider_fast as gf\n"
                  "from guider_fast import _cuda_build\n"
                  "t = torch.randn(3, 2)\n"
                  "assert _cuda_build.sim_loaded() is None\n"
                  "c = gf.calibrate(t, t + 1, *torch.randn(3, 3, 4), backend='cuda')\n"
                  "print(_cuda_build.sim_loaded(), c.clean.dtype)\n",
                  GUIDER_FAST_CUDA_SIM="1", GUIDER_FAST_CUDA_BUILD_DIR=str(os.path.dirname(os.path.dirname(
                      sim_extension))))
    assert out.split() == [sim_extension, "torch.bool"]


def test_cli_info_reports_the_extension():
    out = _python("from guider_fast import cli; cli.info()")
    assert "CUDA C++ extension guider_fast._C: " in out
    if _cuda_build.real_built() is None:
        assert "guider_fast._C: not built: " in out


# ------------------------------------------------------------------------------- DBPR

from .test_sim_dbpr import BACKWARD_CASES, _problem, reference_gradients  # noqa: E402

# tests/ops/tolerances.py's dbpr rows for fused kernels: half-precision gradients are
# the float32 ones rounded once to the table dtype.
DBPR_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=5e-4),
            torch.bfloat16: dict(rtol=8e-3, atol=4e-3)}


@pytest.mark.parametrize("batch, k, dim, dtype, weighted", BACKWARD_CASES)
def test_dbpr_loss_through_dispatch_matches_reference(sim_extension, batch, k, dim, dtype, weighted):
    user, item, users, pos, neg, weights = _problem(batch, k, dim, dtype, weighted, seed=batch * 7 + k + dim)
    if k == 1:
        neg = neg[:, 0]  # the (B,) form
    u, i = user.clone().requires_grad_(), item.clone().requires_grad_()
    w = None if weights is None else weights.float().requires_grad_()
    loss = gf.dbpr_loss(u, i, users, pos, neg, w, reduction="sum", backend="cuda")
    negatives = neg[:, None] if neg.dim() == 1 else neg
    want = gf.dbpr_loss(user.float(), item.float(), users, pos, negatives,
                        None if weights is None else weights.float(), reduction="sum", backend="torch")
    torch.testing.assert_close(loss.float(), want, **DBPR_TOL[dtype])
    grads = torch.autograd.grad(loss, (u, i) if w is None else (u, i, w))
    ones = torch.ones(batch)
    want_user, want_item = reference_gradients(user, item, users, pos, negatives, weights, ones)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    torch.testing.assert_close(grads[0].float(), want_user, **DBPR_TOL[dtype])
    torch.testing.assert_close(grads[1].float(), want_item, **DBPR_TOL[dtype])
    if w is not None:
        wf = weights.float().requires_grad_()
        rows = gf.dbpr_loss(user.float(), item.float(), users, pos, negatives, wf, reduction="sum",
                            backend="torch")
        torch.testing.assert_close(grads[2], torch.autograd.grad(rows, wf)[0], **DBPR_TOL[dtype])


def test_dbpr_dispatch_limits(sim_extension):
    user, item, users, pos, neg, weights = _problem(5, 2, 4, torch.float32, True, seed=1)
    for kwargs in (dict(deterministic=True), dict(sparse_grad=True)):
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run dbpr: the CUDA DBPR backward is the "
                                               "atomic scatter only"):
            gf.dbpr_loss(user, item, users, pos, neg, weights, backend="cuda", **kwargs)


def _dbpr_args():
    user, item, users, pos, neg, weights = _problem(7, 3, 5, torch.float32, True, seed=2)
    return [user, item, users, pos, neg, weights]


def _backward_args():
    args = _dbpr_args()
    _, coef, _ = OPS.dbpr_forward(*args)
    return [*args[:5], coef, torch.randn(7)]


BAD_DBPR = [
    (0, lambda t: t.double(), "dbpr_forward", "argument 'user_table' must be float32, float16 or bfloat16, got Double"),
    (1, lambda t: t.half(), "dbpr_forward", r"argument 'item_table' must have the dtype of 'user_table' \(Float\)"),
    (1, lambda t: t[:, :4], "dbpr_forward", r"argument 'item_table' must have size 5 in dimension 1"),
    (2, lambda i: i.int(), "dbpr_forward", "argument 'users' must be Long, got Int"),
    (2, lambda i: i + 11, "dbpr_forward", r"argument 'users' holds indices in \[\d+, \d+\], outside the 11 rows"),
    (3, lambda i: i[:6], "dbpr_forward", "argument 'pos_items' must have size 7 in dimension 0"),
    (4, lambda i: i[:, 0], "dbpr_forward", r"argument 'neg_items' must be an index matrix \(B, K\) \(2-D\)"),
    (4, lambda i: i[:, :0], "dbpr_forward", "argument 'neg_items' has 0 negatives per triplet"),
    (4, lambda i: -i - 1, "dbpr_forward", r"argument 'neg_items' holds indices in \[-\d+, -\d+\], outside"),
    (5, lambda w: w[:3], "dbpr_forward", "argument 'weights' must have size 7 in dimension 0"),
    (5, lambda w: w.double(), "dbpr_forward", "argument 'weights' must be float32, float16 or bfloat16"),
    (5, lambda c: c[:, 1:], "dbpr_backward", r"argument 'coef' must have size 4 in dimension 1 \(K\+1"),
    (5, lambda c: c.t().contiguous().t(), "dbpr_backward", "argument 'coef' must be contiguous"),
    (6, lambda g: g.half(), "dbpr_backward", "argument 'grad_rows' must be Float, got Half"),
]


@pytest.mark.parametrize("index, bad, op, message", BAD_DBPR)
def test_bad_dbpr_arguments_name_the_argument(sim_extension, index, bad, op, message):
    args = _dbpr_args() if op == "dbpr_forward" else _backward_args()
    with pytest.raises(RuntimeError, match=f"guider_fast_cuda::{op}: " + message):
        getattr(OPS, op)(*_with(args, index, bad))


def test_dbpr_opcheck(sim_extension):
    torch.library.opcheck(OPS.dbpr_forward.default, _dbpr_args())
    torch.library.opcheck(OPS.dbpr_forward.default, _with(_dbpr_args(), 5, None))
    torch.library.opcheck(OPS.dbpr_backward.default, _backward_args())


def test_setup_hook_says_why_it_builds_nothing_here():
    """setup.py loads guider_fast/_cuda_build.py by path (no guider_fast import) and calls extension_modules()."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('_gf_cuda_build', {str(_cuda_build.__file__)!r})\n"
            "build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)\n"
            "assert 'guider_fast' not in sys.modules\n"
            "print(build.extension_modules(), build.build_cmdclass())\n")
    missing = _cuda_build.real_build_missing()
    if missing is None:
        pytest.skip("this machine can build guider_fast._C")
    out = _python(code)
    assert "not building the CUDA extension guider_fast._C: " + missing in out and "[] {}" in out
    assert "GUIDER_FAST_BUILD_CUDA=0: not building" in _python(code, GUIDER_FAST_BUILD_CUDA="0")
    failed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "GUIDER_FAST_BUILD_CUDA": "1"})
    assert failed.returncode != 0 and "GUIDER_FAST_BUILD_CUDA=1 but guider_fast._C cannot be built" in failed.stderr


# ------------------------------------------------------------------------- DBPR step

from .test_sim_dbpr_step import TOL as STEP_TOL  # noqa: E402
from .test_sim_dbpr_step import problem as step_problem, reference_step, sim_step, step_lib  # noqa: E402,F401


@pytest.mark.parametrize("dtype, dim, k, optimizer", [(torch.float32, 13, 1, "sgd"), (torch.bfloat16, 16, 5, "sgd"),
                                                      (torch.float16, 70, 2, "rowwise_adagrad"),
                                                      (torch.float32, 64, 5, "rowwise_adagrad")])
def test_dbpr_step_through_dispatch_matches_torch_step(sim_extension, step_lib, dtype, dim, k, optimizer):
    user, item, users, pos, neg, weights = step_problem(33, k, dim, dtype, True, seed=dim + k)
    if k == 1:
        neg = neg[:, 0]  # the (B,) form
    negatives = neg[:, None] if neg.dim() == 1 else neg
    state = gf.RowwiseAdagradState(user, item) if optimizer != "sgd" else None
    u, i = user.clone(), item.clone()
    loss, margins = gf.dbpr_step(u, i, users, pos, neg, weights, lr=0.1, optimizer=optimizer, state=state, l2=0.01,
                                 return_scores=True, backend="cuda")
    acc = None if state is None else (torch.zeros(user.shape[0]), torch.zeros(item.shape[0]))
    want_u, want_i, want_loss, want_margins, want_acc = reference_step(user, item, users, pos, negatives, weights,
                                                                       0.1, optimizer, acc, 0.01, "mean")
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(margins, want_margins, rtol=1e-5, atol=1e-5)
    assert u.dtype == dtype
    torch.testing.assert_close(u.float(), want_u.to(dtype).float(), **STEP_TOL[dtype])
    torch.testing.assert_close(i.float(), want_i.to(dtype).float(), **STEP_TOL[dtype])
    # The very bits of the C API (same kernels, same runs).
    cu, ci = user.clone(), item.clone()
    sim_acc = None if state is None else (torch.zeros(user.shape[0]), torch.zeros(item.shape[0]))
    rows, sim_margins = sim_step(step_lib, cu, ci, users, pos, negatives, weights, 0.1, 0.01, 1.0 / 33, sim_acc)
    assert torch.equal(u, cu) and torch.equal(i, ci) and torch.equal(margins, sim_margins)
    if state is not None:
        assert torch.equal(state.user, sim_acc[0]) and torch.equal(state.item, sim_acc[1])


def test_dbpr_atomic_step_through_dispatch(sim_extension):
    user, item, users, pos, neg, weights = step_problem(16, 3, 16, torch.float32, True, seed=3)
    u, i = user.clone(), item.clone()
    loss = gf.dbpr_step(u, i, users, pos, neg, weights, lr=0.2, duplicates="atomic", backend="cuda")
    want_u, want_i, want_loss, _, _ = reference_step(user, item, users, pos, neg, weights, 0.2, "sgd", None, 0.0,
                                                     "mean")
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u, want_u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(i, want_i, rtol=1e-5, atol=1e-6)
    wide = torch.zeros(3, 257)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run dbpr_step: the CUDA atomic step keeps its "
                                           "rows in registers: D <= 256, got D = 257"):
        gf.dbpr_step(wide, wide, users[:2] % 3, pos[:2] % 3, neg[:2] % 3, lr=0.1, duplicates="atomic",
                     backend="cuda")


def _step_args(adagrad=True):
    user, item, users, pos, neg, weights = step_problem(7, 3, 5, torch.float32, True, seed=2)
    (uk, uo), (ik, io) = gf.reference.dbpr_step._sort_rows(users, torch.cat([pos, neg.reshape(-1)]), 7)
    acc = [torch.zeros(7), torch.zeros(11)] if adagrad else [None, None]
    return [user, item, users, pos, neg, weights, uk.long(), uo, ik.long(), io, *acc, 0.1, 0.01, 1.0 / 7]


BAD_STEP = [
    (6, lambda k: k.flip(0), "argument 'user_keys' must be sorted"),
    (6, lambda k: k.int(), "argument 'user_keys' must be Long, got Int"),
    (7, lambda o: o[:6], r"argument 'user_order' must have size 7 in dimension 0 \(the sort order of 'users'"),
    (7, lambda o: o + 7, r"argument 'user_order' holds indices in \[\d+, \d+\], outside the 7 rows of 'users'"),
    (8, lambda k: (k + 1).clamp(max=10), r"argument 'item_keys' must equal the rows at its order"),
    (9, lambda o: o[::2], "argument 'item_order' must have size 28"),
    (10, lambda a: a.double(), "argument 'user_accumulator' must be Float, got Double"),
    (11, lambda a: a[:10], r"argument 'item_accumulator' must have size 11 in dimension 0 \(the rows of 'item_table'"),
    (11, None, "arguments 'user_accumulator' and 'item_accumulator' must be given together"),
    (0, lambda t: t.double(), "argument 'user_table' must be float32, float16 or bfloat16, got Double"),
    (5, lambda w: w[:3], "argument 'weights' must have size 7 in dimension 0"),
]


@pytest.mark.parametrize("index, bad, message", BAD_STEP)
def test_bad_dbpr_step_arguments_name_the_argument(sim_extension, index, bad, message):
    with pytest.raises(RuntimeError, match="guider_fast_cuda::dbpr_step: " + message):
        OPS.dbpr_step(*_with(_step_args(), index, bad))


def test_bad_dbpr_atomic_step_arguments_name_the_argument(sim_extension):
    args = _step_args()
    atomic = [*args[:6], 0.1, 0.0, 1.0]
    with pytest.raises(RuntimeError, match="guider_fast_cuda::dbpr_atomic_sgd_step: argument 'user_table' must be "
                                           "Float, got BFloat16"):
        OPS.dbpr_atomic_sgd_step(*_with(_with(atomic, 0, lambda t: t.bfloat16()), 1, lambda t: t.bfloat16()))
    wide = torch.zeros(7, 300)
    with pytest.raises(RuntimeError, match="dbpr_atomic_sgd_step: argument 'user_table' has D = 300 features, over"):
        OPS.dbpr_atomic_sgd_step(wide, torch.zeros(11, 300), *atomic[2:])


def test_dbpr_step_opcheck(sim_extension):
    torch.library.opcheck(OPS.dbpr_step.default, _step_args())
    torch.library.opcheck(OPS.dbpr_step.default, _step_args(adagrad=False))
    torch.library.opcheck(OPS.dbpr_atomic_sgd_step.default, [*_step_args()[:6], 0.1, 0.01, 1.0])


# ------------------------------------------------------------------ Sinkhorn (tiny clouds)


@pytest.fixture(scope="module")
def sinkhorn_lib(sinkhorn_library):
    from .test_sim_sinkhorn import open_library

    lib = open_library(sinkhorn_library)
    yield lib
    lib.gf_sim_set_order(0, 0)


def _sinkhorn_args(batch=3, n=7, m=13, d=5, seed=3):
    from .test_sim_sinkhorn import problems

    return [*problems(batch, n, m, d, seed), 0.3, 2, 40, None]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("tol", [None, 1e-4])
def test_sinkhorn_through_dispatch_is_bitwise_the_kernel(sim_extension, sinkhorn_lib, p, tol):
    """backend="cuda" runs exactly sinkhorn_tiny and its envelope (the bits of the C API)."""
    from .test_sim_sinkhorn import sim_envelope, sim_solve

    x, y, a, b = _sinkhorn_args(4, 13, 32, 6)[:4]
    res = gf.sinkhorn(x.requires_grad_(), y.requires_grad_(), a, b, eps=0.2, p=p, n_iters=200, tol=tol,
                      backend="cuda")
    f, g, err, iters = sim_solve(sinkhorn_lib, x.detach(), y.detach(), a, b, 0.2, p, 200, tol)
    assert torch.equal(res.f, f) and torch.equal(res.g, g) and torch.equal(res.marginal_error, err)
    assert res.n_iters == int(iters.max())
    scale = torch.tensor([1.0, -0.5, 2.0, 0.25])
    grad_x, grad_y = torch.autograd.grad((res.value * scale).sum(), (x, y))
    want_x, want_y = sim_envelope(sinkhorn_lib, x.detach(), y.detach(), a, b, f, g, 0.2, p, scale)
    assert torch.equal(grad_x, want_x) and torch.equal(grad_y, want_y)


def test_sinkhorn_dispatch_limits(sim_extension):
    x, y = torch.randn(2, 33, 3), torch.randn(2, 5, 3)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run sinkhorn: clouds of 33 points exceed "
                                           "the CUDA tiny-cloud kernel's 32"):
        gf.sinkhorn(x, y, eps=0.3, backend="cuda")
    with pytest.raises(RuntimeError, match="takes float16, bfloat16, float32 inputs, got float64"):
        gf.sinkhorn(y.double(), y.double(), eps=0.3, backend="cuda")
    with pytest.raises(RuntimeError, match="runs on the torch backend only"):
        gf.sinkhorn(y, y, eps=0.3, grad="autodiff", backend="cuda")
    # The emulation is a test vehicle: auto never takes it.
    assert _dispatch.resolve("sinkhorn", "auto", torch.device("cpu"), torch.float32, (5, 5, 3))[0] != "cuda"


BAD_SINKHORN = [
    (0, lambda x: x.double(), "argument 'x' must be Float, got Double"),
    (1, lambda y: y[0], r"argument 'y' must be a batch of point clouds \(B, m, d\) \(3-D\)"),
    (1, lambda y: y[:, :, :2], "argument 'y' must have size 5 in dimension 2 \\(the feature size of 'x'\\)"),
    (1, lambda y: y[:2], "argument 'y' must have size 3 in dimension 0"),
    (0, lambda x: torch.cat([x] * 5, 1), "clouds of 35 and 13 points: the tiny-cloud kernel .* at most 32"),
    (0, lambda x: x[:, :0], "argument 'x' has 0 points, needs at least 1"),
    (2, lambda a: a[:, 1:], "argument 'a' must have size 7 in dimension 1"),
    (3, lambda b: b.t().contiguous().t(), "argument 'b' must be contiguous"),
    (3, lambda b: b.half(), "argument 'b' must be Float, got Half"),
    (4, lambda eps: 0.0, "argument 'eps' must be positive and finite in float32, got 0"),
    (4, lambda eps: 1e300, "argument 'eps' must be positive and finite in float32"),
    (5, lambda p: 3, "argument 'p' must be 1 or 2, got 3"),
    (6, lambda n: -1, r"argument 'n_iters' must be in \[0, 2147483647\], got -1"),
]


@pytest.mark.parametrize("index, bad, message", BAD_SINKHORN)
def test_bad_sinkhorn_arguments_name_the_argument(sim_extension, index, bad, message):
    with pytest.raises(RuntimeError, match="guider_fast_cuda::sinkhorn_tiny: " + message):
        OPS.sinkhorn_tiny(*_with(_sinkhorn_args(), index, bad))


def test_bad_sinkhorn_envelope_arguments_name_the_argument(sim_extension):
    x, y, a, b = _sinkhorn_args()[:4]
    f, g, scale = torch.randn(3, 7), torch.randn(3, 13), torch.ones(3)
    op = "guider_fast_cuda::sinkhorn_tiny_envelope: "
    with pytest.raises(RuntimeError, match=op + "argument 'g' must have size 13 in dimension 1"):
        OPS.sinkhorn_tiny_envelope(x, y, a, b, f, g[:, 1:], 0.3, 2, scale)
    with pytest.raises(RuntimeError, match=op + "argument 'f' must be Float, got Double"):
        OPS.sinkhorn_tiny_envelope(x, y, a, b, f.double(), g, 0.3, 2, scale)
    with pytest.raises(RuntimeError, match=op + "argument 'scale' must have size 3 in dimension 0"):
        OPS.sinkhorn_tiny_envelope(x, y, a, b, f, g, 0.3, 2, scale[:2])


def test_sinkhorn_opcheck(sim_extension):
    args = _sinkhorn_args()
    torch.library.opcheck(OPS.sinkhorn_tiny.default, args)
    torch.library.opcheck(OPS.sinkhorn_tiny.default, _with(_with(args, 5, lambda p: 1), 7, lambda t: 1e-5))
    x, y, a, b = args[:4]
    f, g, _, _ = OPS.sinkhorn_tiny(*args)
    torch.library.opcheck(OPS.sinkhorn_tiny_envelope.default, (x, y, a, b, f, g, 0.3, 2, torch.rand(3) + 0.5))


# ------------------------------------------------------------------ SamplesLoss (on chip)


@pytest.fixture(scope="module")
def samples_lib(samples_loss_library):
    from .test_sim_samples_loss import open_library

    lib = open_library(samples_loss_library)
    yield lib
    lib.gf_sim_set_order(0, 0)


def _samples_args(batch=2, n=9, m=40, d=5, debias=True):
    from .test_sim_samples_loss import problems

    return [*problems(batch, n, m, d, 11), [2.0, 0.5, 0.125, 0.05], 2, debias]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias", [False, True])
def test_samples_loss_through_dispatch_is_bitwise_the_kernel(sim_extension, samples_lib, p, debias):
    """The op returns the C API's packed potentials bit for bit, and SamplesLoss(backend="cuda")
    takes its value from them (the reference's extrapolation) with gradients."""
    from guider_fast.reference import samples_loss as ref_samples

    from .test_sim_samples_loss import sim_run

    x, y, a, b, eps_list, _, _ = _samples_args(3, 37, 70, 6, debias)
    packed = OPS.samples_loss_onchip(x, y, a, b, eps_list, p, debias)
    assert torch.equal(packed, sim_run(samples_lib, x, y, a, b, eps_list, p, debias))
    loss = gf.SamplesLoss(p=p, blur=0.1, debias=debias, backend="cuda")
    xg = x.clone().requires_grad_()
    value = loss(a, xg, b, y)
    eps_list = ref_samples.schedule(x, y, p, 0.1, 0.5, None)
    n, m = x.shape[1], y.shape[1]
    parts = torch.split(OPS.samples_loss_onchip(x, y, a, b, eps_list, p, debias), [n, m, n, m] * (2 if debias else 1), 1)
    potentials = (parts[0], parts[1], parts[4], parts[5]) if debias else (parts[0], parts[1], None, None)
    assert torch.equal(value, ref_samples.extrapolated_divergence(a, x, b, y, p, eps_list[-1], potentials))
    (grad,) = torch.autograd.grad(value.sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_samples_loss_dispatch_limits(sim_extension):
    x = torch.randn(2, 257, 3)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run samples_loss: clouds of 257 points exceed "
                                           "the on-chip CUDA kernel's 256"):
        gf.SamplesLoss(backend="cuda")(x, x[:, :5])
    with pytest.raises(RuntimeError, match="takes float16, bfloat16, float32 inputs, got float64"):
        gf.SamplesLoss(backend="cuda")(x.double()[:, :5], x.double()[:, :5])


BAD_SAMPLES = [
    (0, lambda x: x.double(), "argument 'x' must be Float, got Double"),
    (1, lambda y: y[:, :, 1:], r"argument 'y' must have size 5 in dimension 2 \(the feature size of 'x'\)"),
    (0, lambda x: torch.cat([x] * 29, 1), "clouds of 261 and 40 points: the on-chip kernel .* at most 256"),
    (2, lambda a: a[:1], "argument 'a' must have size 2 in dimension 0"),
    (3, lambda b: b.t().contiguous().t(), "argument 'b' must be contiguous"),
    (4, lambda eps: [], "argument 'eps_list' is empty"),
    (4, lambda eps: [1.0, 0.0], "argument 'eps_list' must hold positive values finite in float32, got 0 at "
                                "position 1"),
    (4, lambda eps: [1e300], "argument 'eps_list' must hold positive values finite in float32"),
    (5, lambda p: 0, "argument 'p' must be 1 or 2, got 0"),
]


@pytest.mark.parametrize("index, bad, message", BAD_SAMPLES)
def test_bad_samples_loss_arguments_name_the_argument(sim_extension, index, bad, message):
    with pytest.raises(RuntimeError, match="guider_fast_cuda::samples_loss_onchip: " + message):
        OPS.samples_loss_onchip(*_with(_samples_args(), index, bad))


def test_samples_loss_opcheck(sim_extension):
    torch.library.opcheck(OPS.samples_loss_onchip.default, _samples_args())
    torch.library.opcheck(OPS.samples_loss_onchip.default, _with(_samples_args(debias=False), 5, 1))
