"""Every CUDA C++ op once, on small random inputs, each result checked against backend="torch".

The short subset that ``device_check.sh`` runs under ``compute-sanitizer`` (memcheck,
racecheck); on a CPU machine it runs the same calls through the emulation build:

    compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/cuda_sanitizer_subset.py
    python benchmarks/cuda_sanitizer_subset.py --device cpu    # emulation (builds it: ~1 min cold)

Cases: calibrate (rows, both distances), calibrate_items (packed-code cache), dbpr_loss
forward + backward (float32 at an odd and a 16-byte-multiple D, bfloat16), dbpr_step
(sorted SGD, sorted row-wise Adagrad, sorted SGD on bfloat16, atomic SGD), Sinkhorn for
tiny clouds (ragged, p = 1 and 2, fixed iterations and tol, a full 32-lane warp) with its
envelope backward.  Sizes are odd and indices duplicate-heavy, so partial warps, tails of
16-byte rows and sorted runs longer than one are all exercised.

Inputs are drawn on the CPU and copied to the device, and the references run on the CPU
copies: under the sanitizer nearly every kernel launched is one of ours.  The caching
allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1, before torch is imported) so
that every tensor is its own allocation and memcheck sees a write past a tensor's end.

Exit status: 0 every case ran and matched; 1 some case failed (each says why); 2 the CUDA
backend is not available here (the reason is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Before torch is imported: memcheck only sees the bounds of real allocations, and the caching
# allocator would hand out slices of larger blocks.
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

import guider_fast as gf  # noqa: E402
from guider_fast import _cuda_build  # noqa: E402

# Tolerances of this check (max |got - ref| relative to the scale named per case), loose next
# to the op tests' table (tests/ops/tolerances.py): the point here is that every kernel runs
# and produces its op's values, on a GPU whose libm and FMA contraction differ from the CPU
# reference's.  float32 results agree to ~1e-6 in the op tests.
TOL_F32 = 1e-4
# bfloat16 tables are rounded once on write-back: one bfloat16 ulp (2^-8 relative) of the row,
# either neighbour, next to an update of ~0.05 of the row's size (LR below): 2^-7 / 0.05 < 0.2.
TOL_BF16_STEP = 0.2
TOL_BF16_LOSS = 2e-2  # bfloat16 gradients: one rounding of each output, 2^-8 relative
# Hogwild: a later block may read rows that an earlier block has already moved (the
# emulation runs blocks in order, a GPU in any order).  With updates ~0.05 of the rows, a
# stale read changes a gradient by about that share of itself.
TOL_ATOMIC = 0.15
# Sinkhorn, fixed iterations: the envelope gradient divides the potentials' rounding by eps
# (0.5 here).
TOL_SINKHORN_VALUE, TOL_SINKHORN_GRAD = 1e-4, 1e-3
# With tol, the kernel stops each problem on its own and torch stops them all together: both
# are within tol of the fixed point, so they differ by about tol (marginal L1 error) times the
# potentials' scale; the kernel's own per-problem marginal error must be <= tol.
TOL_SINKHORN_STOPPED = 1e-2


def rel(got, want, scale=None) -> float:
    """max |got - want| / max |scale| (scale defaults to want); inf where got is not finite."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    scale = want if scale is None else scale.detach().cpu().double()
    return (got - want).abs().max().item() / (scale.abs().max().item() or 1.0)


class Cases:
    def __init__(self, device, seed=0):
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.results = []  # (name, error or None, detail)

    # --------------------------------------------------------------- helpers

    def randn(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.gen) * scale

    def randint(self, high, *shape):
        return torch.randint(0, high, shape, generator=self.gen)

    def dev(self, *tensors):
        return [t.to(self.device) for t in tensors]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # a kernel's fault is reported by the case that launched it

    def run(self, name, fn):
        start = time.perf_counter()
        try:
            errors = fn()
            self.sync()
            bad = {k: v for k, (v, tol) in errors.items() if not v <= tol}  # NaN fails too
            detail = ", ".join(f"{k} {v:.2e} (tol {tol:g})" for k, (v, tol) in errors.items())
            why = None if not bad else "above tolerance: " + ", ".join(bad)
        except Exception as exc:  # reported, and the next case still runs
            why, detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", ""
        self.results.append((name, why))
        status = "ok  " if why is None else "FAIL"
        print(f"{status} {name} [{time.perf_counter() - start:.1f} s] {detail}"
              + (f" -- {why}" if why else ""), flush=True)

    # --------------------------------------------------------------- calibration

    def calibrate_rows(self, distance, batch=37, dim=13, bits=70, code_dtype=torch.float32):
        t = self.randn(batch, dim)
        v = t + 0.5 * self.randn(batch, dim)
        codes = [self.randn(batch, bits).to(code_dtype) for _ in range(3)]
        # float64 reference: the float32 torch "geomloss" distance keeps GeomLoss's expanded-cost
        # cancellation residue (~1e-3 here, see gf.calibrate), which the kernels do not have.
        ref = gf.calibrate(t.double(), v.double(), *(c.double() for c in codes), distance=distance,
                           backend="torch")
        out = gf.calibrate(*self.dev(t, v, *codes), distance=distance, backend="cuda")
        return self._calibration_errors(out, ref)

    def calibrate_items(self, batch=41, n_items=50, dim=13, bits=70):
        t_all = self.randn(n_items, dim)
        v_all = t_all + 0.5 * self.randn(n_items, dim)
        t_code, v_code, u_code = self.randn(n_items, bits), self.randn(n_items, bits), self.randn(batch, bits)
        items = self.randint(n_items, batch)  # duplicates: 41 draws from 50 items
        cache = gf.precompute_item_calibration(t_all, v_all, t_code, v_code)
        ref = gf.calibrate_items(cache, u_code, items, backend="torch")
        out = gf.calibrate_items(cache.to(self.device), *self.dev(u_code, items), backend="cuda")
        return self._calibration_errors(out, ref)

    @staticmethod
    def _calibration_errors(out, ref):
        # A row whose normalised distance sits within rounding of the threshold may flip its
        # clean flag; random rows at these sizes never come that close.
        return {"weights": (rel(out.weights, ref.weights), TOL_F32),
                "distance": (rel(out.distance, ref.distance), TOL_F32),
                "clean mismatches": (float((out.clean.cpu() != ref.clean).sum()), 0.0)}

    # --------------------------------------------------------------- DBPR

    def dbpr_problem(self, batch, dim, k, n_users=23, n_items=31, dtype=torch.float32):
        # Tables smaller than the batch: every row occurs several times.
        U, I = self.randn(n_users, dim, scale=0.3).to(dtype), self.randn(n_items, dim, scale=0.3).to(dtype)
        users, pos, neg = self.randint(n_users, batch), self.randint(n_items, batch), self.randint(n_items, batch, k)
        w = torch.rand(batch, generator=self.gen) + 0.1
        return U, I, users, pos, neg, w

    def dbpr_loss(self, dim, dtype=torch.float32, batch=37, k=3):
        U, I, users, pos, neg, w = self.dbpr_problem(batch, dim, k, dtype=dtype)

        def loss_and_grads(backend, tensors):
            Ul, Il = (t.detach().requires_grad_() for t in tensors[:2])
            loss = gf.dbpr_loss(Ul, Il, *tensors[2:], backend=backend)
            return (loss,) + torch.autograd.grad(loss, (Ul, Il))

        ref = loss_and_grads("torch", (U, I, users, pos, neg, w))
        out = loss_and_grads("cuda", self.dev(U, I, users, pos, neg, w))
        tol = TOL_F32 if dtype == torch.float32 else TOL_BF16_LOSS
        return {name: (rel(o, r), tol) for name, o, r in zip(("loss", "grad U", "grad I"), out, ref)}

    def dbpr_step(self, optimizer="sgd", duplicates="sorted", dim=13, dtype=torch.float32, batch=37, k=3):
        U, I, users, pos, neg, w = self.dbpr_problem(batch, dim, k, dtype=dtype)
        # Mean reduction: lr x B moves each touched row by ~0.05 of its size in one step, far
        # above float32 rounding and small enough for Hogwild's stale reads (TOL_ATOMIC).
        lr = (0.05 if optimizer == "sgd" else 0.01) * batch

        def step(backend, tensors):
            tables = [t.clone() for t in tensors[:2]]
            state = gf.RowwiseAdagradState(*tables) if optimizer == "rowwise_adagrad" else None
            loss = gf.dbpr_step(*tables, *tensors[2:], lr=lr, optimizer=optimizer, state=state,
                                duplicates=duplicates, backend=backend)
            return loss, tables, state

        ref_loss, ref_tables, ref_state = step("torch", (U, I, users, pos, neg, w))
        loss, tables, state = step("cuda", self.dev(U, I, users, pos, neg, w))
        tol = TOL_ATOMIC if duplicates == "atomic" else TOL_BF16_STEP if dtype != torch.float32 else TOL_F32
        errors = {"loss": (rel(loss, ref_loss), TOL_F32 if duplicates == "sorted" else TOL_ATOMIC)}
        for name, got, want, start in zip(("U", "I"), tables, ref_tables, (U, I)):
            # Relative to the update: a step that did nothing fails.
            errors[f"{name} vs update"] = (rel(got, want, want.double() - start.double()), tol)
        if state is not None:
            errors["accumulators"] = (max(rel(state.user, ref_state.user), rel(state.item, ref_state.item)),
                                      TOL_F32)
        return errors

    # --------------------------------------------------------------- Sinkhorn (tiny clouds)

    def sinkhorn(self, batch, n, m, dim, p=2, tol=None, ragged=True):
        x, y = self.randn(batch, n, dim), self.randn(batch, m, dim) + 0.2
        a, b = torch.rand(batch, n, generator=self.gen) + 0.2, torch.rand(batch, m, generator=self.gen) + 0.2
        if ragged:  # zero weights mark padding: problem i keeps n - i % 3 and m - i % 4 points
            for i in range(batch):
                a[i, n - i % 3:] = 0
                b[i, m - i % 4:] = 0
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
        # With tol, room to converge (10x): the marginal-error check below assumes it did.
        kw = dict(eps=0.5, p=p, n_iters=60 if tol is None else 600, tol=tol)

        def solve(backend, tensors):
            xl, yl = (t.detach().requires_grad_() for t in tensors[:2])
            res = gf.sinkhorn(xl, yl, *tensors[2:], backend=backend, **kw)
            gx, gy = torch.autograd.grad(res.value.sum(), (xl, yl))
            return res.value, res.f, gx, gy, res.marginal_error

        ref = solve("torch", (x, y, a, b))
        out = solve("cuda", self.dev(x, y, a, b))
        # f is defined up to its padding entries (weight 0): compare it where a > 0.
        keep = a > 0
        value_tol, grad_tol = ((TOL_SINKHORN_VALUE, TOL_SINKHORN_GRAD) if tol is None else
                               (TOL_SINKHORN_STOPPED, TOL_SINKHORN_STOPPED))
        errors = {"value": (rel(out[0], ref[0]), value_tol),
                  "f": (rel(out[1].cpu()[keep], ref[1][keep]), value_tol),
                  "grad x": (rel(out[2], ref[2]), grad_tol),
                  "grad y": (rel(out[3], ref[3]), grad_tol)}
        if tol is not None:
            # 1% slack: the error returned is recomputed from the final potentials, which may round
            # differently from the stop test's own sum on a GPU (FMA contraction).
            errors["marginal error / tol"] = (out[4].max().item() / tol, 1.01)
        return errors

    # --------------------------------------------------------------- all

    def all(self):
        self.run("calibrate rows geomloss B=37 d=13 bits=70", lambda: self.calibrate_rows("geomloss"))
        self.run("calibrate rows euclidean B=37 d=13 bits=70 fp16 codes",
                 lambda: self.calibrate_rows("euclidean", code_dtype=torch.float16))
        self.run("calibrate_items (cached) B=41 items=50 bits=70", self.calibrate_items)
        self.run("dbpr_loss fwd+bwd fp32 B=37 D=13 K=3", lambda: self.dbpr_loss(13))
        self.run("dbpr_loss fwd+bwd fp32 B=37 D=64 K=3", lambda: self.dbpr_loss(64))
        self.run("dbpr_loss fwd+bwd bf16 B=37 D=24 K=3", lambda: self.dbpr_loss(24, torch.bfloat16))
        self.run("dbpr_step sorted sgd fp32 B=37 D=13 K=3", lambda: self.dbpr_step())
        self.run("dbpr_step sorted sgd fp32 B=37 D=64 K=3", lambda: self.dbpr_step(dim=64))
        self.run("dbpr_step sorted rowwise_adagrad fp32 B=37 D=13 K=3",
                 lambda: self.dbpr_step("rowwise_adagrad"))
        self.run("dbpr_step sorted sgd bf16 B=37 D=24 K=3", lambda: self.dbpr_step(dim=24, dtype=torch.bfloat16))
        self.run("dbpr_step atomic sgd fp32 B=37 D=13 K=3", lambda: self.dbpr_step(duplicates="atomic"))
        self.run("sinkhorn tiny + envelope p=2 B=5 n=7 m=11 d=5 ragged", lambda: self.sinkhorn(5, 7, 11, 5))
        self.run("sinkhorn tiny + envelope p=1 B=3 n=9 m=4 d=3 ragged", lambda: self.sinkhorn(3, 9, 4, 3, p=1))
        self.run("sinkhorn tiny + envelope tol=1e-3 B=4 n=13 m=13 d=6 ragged",
                 lambda: self.sinkhorn(4, 13, 13, 6, tol=1e-3))
        self.run("sinkhorn tiny + envelope p=2 B=3 n=32 m=32 d=16 (full warp)",
                 lambda: self.sinkhorn(3, 32, 32, 16, ragged=False))
        return self.results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: guider_fast._C on the GPU; cpu: the emulation build; auto: cuda if "
                             "there is a GPU (default)")
    parser.add_argument("--seed", type=int, default=0, help="of the random inputs (default 0)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    gf.set_checks(False)  # production setting: no value-check syncs between the kernels
    try:
        library = _cuda_build.load_extension(emulate=device.type == "cpu")
    except RuntimeError as exc:
        print(f"cuda_sanitizer_subset: the CUDA backend is not available on {device.type}: {exc}", flush=True)
        return 2
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (emulation build)"
    print(f"cuda_sanitizer_subset on {where}: {library}", flush=True)
    results = Cases(device, args.seed).all()
    failed = [name for name, why in results if why is not None]
    print(f"{len(results) - len(failed)}/{len(results)} cases ok"
          + (f"; FAILED: {'; '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
