"""GPU side-by-side of batched Sinkhorn: guider_fast triton vs cuda vs torch vs POT vs GeomLoss.

    python benchmarks/bench_gpu.py --results OUT.jsonl --md OUT.md [--json OUT.json] [--summary OUT.md]
                                   [--budget SECONDS] [--quick] [--smoke] [--plan]

Same work for everyone: float32 clouds, cost |x-y|^2/2 (POT: |x-y|^2 with reg = 2 eps),
one eps (0.05 x the median cost of the first problem), 100 fixed iterations, uniform
weights; the peers are ``baselines.pot_sinkhorn`` and ``baselines.geomloss_sinkhorn``.
Times are medians of ``triton.testing.do_bench`` (CUDA events); peak memory is
``torch.cuda.max_memory_allocated`` above the inputs.  A peer that is missing, runs out
of memory or fails is reported with its reason.  Runs under the one runner
(``runner.py``): one worker process per workload, a time budget, and the rows measured
so far kept when the script is killed.  Run by device_check.sh.

Two matrices, in this order:

* **tiny clouds** (``TINY_SECTIONS``, one worker per batch size): B = 4,096 and 65,536 x
  n = m = 8 / 16 / 32 x d = 16 / 64, forward and forward+backward (envelope), guider_fast
  triton vs cuda (the CUDA C++ one-warp-per-problem kernel, ``backend="cuda"``) vs torch.
  The target: the CUDA kernel beats its Triton twin there (cuda/triton < 1).
* **peers** (``WORKLOADS``, one worker each): up to 4,096 points, with POT and GeomLoss and a
  tol-stopped forward.  The CUDA kernel takes n, m <= 32 only: at larger clouds it is
  reported as skipped with the dispatcher's reason.

The forward's first call of each guider_fast contender is checked against the torch
backend's value (``check``: max relative error).  The "CUDA C++ vs Triton" section lists
cuda ms / triton ms per shape and mode.  ``--smoke`` runs tiny sizes on CPU (Triton's
interpreter, the CUDA C++ kernels through their emulation build, GUIDER_FAST_CUDA_SIM=1).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys

import torch

import guider_fast as gf
import runner
from baselines import N_ITERS, fixed_eps, geomloss_sinkhorn, peer_missing, pot_sinkhorn, relative_error
from guider_fast import _dispatch
from runner import Env, cleanup, describe, first_call

WORKLOADS = [(4096, 32, 32, 64), (1024, 64, 64, 64), (256, 256, 256, 64),
             (1, 4096, 4096, 64), (1, 2048, 2048, 7050)]
QUICK_WORKLOADS = [(1024, 64, 64, 64), (1, 4096, 4096, 64)]
# Smoke: one 32-point (full warp) tiny shape, and a 40-point peer workload where the CUDA
# kernel is skipped with the dispatcher's reason.
SMOKE_WORKLOADS = [(2, 16, 16, 4), (2, 40, 33, 4)]
# Tiny clouds, the CUDA C++ kernel's range (n, m <= 32): one section per batch size, shapes in
# priority order (the full warp and the wider points first: a budget cut keeps those).
TINY_SECTIONS = {f"tiny_B{batch}": [(batch, n, n, d) for d in (64, 16) for n in (32, 16, 8)]
                 for batch in (4096, 65536)}
SMOKE_TINY_SECTIONS = {"tiny_smoke": [(8, 8, 8, 4), (4, 32, 32, 4)]}
TINY_SHARE = 0.5  # of --budget for the tiny sections together; the peers share the rest
MODES = ("forward", "forward+backward", "forward tol=1e-5")
TINY_MODES = MODES[:2]
CONTENDERS = ("guider_fast triton", "guider_fast cuda", "guider_fast torch", "POT solve_sample_batch",
              "GeomLoss tensorized")
TINY_CONTENDERS = CONTENDERS[:3]
BASE = "guider_fast triton"
CUDA, CUDA_TWIN = "guider_fast cuda", BASE
# Iterations of every contender (the tol-stopped forward: at most 10x).  --smoke takes 5: the
# Triton interpreter spends seconds per 100 iterations even on the tiny smoke clouds.
ITERS = {"run": N_ITERS}
SMOKE_ITERS = 5
# H100 SXM rates used for the floor (re-measure on the lent card): MUFU exp throughput,
# and fp32 FMA on the CUDA cores (the kernels' IEEE fp32 dots).
EXP_PER_S = 4.2e12
FP32_FMA_PER_S = 33.5e12


def workload_name(w) -> str:
    return "B{}_n{}_m{}_d{}".format(*w)


def roofline(batch, n, m, d, regime):
    """Floor of 100 iterations from exp and FMA counts, and the unit that bounds it.

    Every half-iteration takes one exp per cost entry: 2 B n m exps per iteration.
    On chip the cost is built once (B n m d FMAs); streamed, every half-iteration
    rebuilds its tiles (2 B n m d FMAs per iteration).
    """
    exps = 2 * batch * n * m * ITERS["run"]
    fmas = batch * n * m * d * (2 * ITERS["run"] if regime == "streamed" else 1)
    exp_ms, fma_ms = exps / EXP_PER_S * 1e3, fmas / FP32_FMA_PER_S * 1e3
    return dict(exps=exps, fmas=fmas, floor_ms=max(exp_ms, fma_ms),
                bound="exp (MUFU)" if exp_ms >= fma_ms else "fp32 FMA")


def _inputs(batch, n, m, d, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, n, d, generator=gen).to(device)
    y = (torch.randn(batch, m, d, generator=gen) + 0.1).to(device)
    return x, y, fixed_eps(x[:1], y[:1])


def _contenders(x, y, eps, names=CONTENDERS):
    """name -> (forward fn, forward+backward fn, tol-stopped forward fn or None), or a reason."""
    iters = ITERS["run"]
    def guider(backend):
        def forward():
            return gf.sinkhorn(x, y, eps=eps, n_iters=iters, grad="detach", backend=backend).value

        def forward_backward():
            xr = x.detach().requires_grad_()
            gf.sinkhorn(xr, y, eps=eps, n_iters=iters, backend=backend).value.sum().backward()

        def forward_tol():
            return gf.sinkhorn(x, y, eps=eps, n_iters=10 * iters, tol=1e-5, grad="detach",
                               backend=backend).n_iters

        return forward, forward_backward, forward_tol

    def peer(solve):
        def run(backward):
            def fn():
                xr = x.detach().requires_grad_(backward)
                value = solve(xr, y, eps, backward, n_iters=iters)
                if backward:
                    value.sum().backward()
            return fn
        return run(False), run(True), None

    def cuda():
        # The dispatcher's reason when the CUDA C++ kernel cannot run this problem here
        # (more than 32 points, or guider_fast._C not built / the emulation not loaded).
        return _dispatch.unavailable_reason("sinkhorn", "cuda", x.device, x.dtype,
                                            (x.shape[1], y.shape[1], x.shape[2])) or guider("cuda")

    table = {"guider_fast triton": lambda: guider("triton"), "guider_fast cuda": cuda,
             "guider_fast torch": lambda: guider("torch"),
             "POT solve_sample_batch": lambda: peer_missing("ot") or peer(pot_sinkhorn),
             "GeomLoss tensorized": lambda: peer_missing("geomloss") or peer(geomloss_sinkhorn)}
    return {name: table[name]() for name in names}


def _measure(fn):
    """(median ms, peak MB) as the pytest file records them."""
    t = runner.timed(fn, warmup_ms=25, rep_ms=200)
    return t["ms"], t["peak_mb"]


def workloads(args):
    return SMOKE_WORKLOADS if args.smoke else QUICK_WORKLOADS if args.quick else WORKLOADS


def tiny_sections(args):
    """section name -> tiny-cloud workloads (none under --quick)."""
    return SMOKE_TINY_SECTIONS if args.smoke else {} if args.quick else TINY_SECTIONS


def sections_of(args):
    """(name, share of --budget) in run order: the tiny-cloud sections, then one per peer workload."""
    tiny, peers = tiny_sections(args), workloads(args)
    tiny_share = TINY_SHARE if peers else 1.0
    out = [(name, tiny_share / len(tiny)) for name in tiny]
    return out + [(workload_name(w), (1.0 - tiny_share if tiny else 1.0) / len(peers)) for w in peers]


class Worker(runner.Worker):
    def run_workload(self, workload, names=CONTENDERS, modes=MODES, rep_ms=200):
        cfg = workload_name(workload)
        x, y, eps = _inputs(*workload, Env.device)
        reference = {}  # the torch backend's forward value, for the checks

        def checked(fn):
            def body(row):
                out, row["first_s"] = first_call(fn)
                if "value" not in reference:
                    try:
                        reference["value"] = _contenders(x, y, eps, ("guider_fast torch",))["guider_fast torch"][0]()
                    except Exception as exc:
                        reference["value"] = describe(exc)
                if isinstance(reference["value"], torch.Tensor):
                    row["check"] = relative_error(out, reference["value"])
                del out
                row.update(runner.timed(fn, warmup_ms=25, rep_ms=rep_ms))
            return body

        for name, fns in _contenders(x, y, eps, names).items():
            for mode, fn in zip(modes, fns if not isinstance(fns, str) else modes):
                base = dict(config=cfg, mode=mode, workload=list(workload), eps=eps)
                why = self.todo(base, name)
                if why == "done" or fn is None:
                    continue
                if isinstance(fns, str) or why:
                    self.emit(dict(base, contender=name, skipped=fns if isinstance(fns, str) else why))
                    continue
                row = dict(base, contender=name)
                if mode == "forward" and name.startswith("guider_fast"):
                    self.attempt(row, checked(fn))
                else:
                    self.attempt(row, lambda row, fn=fn: row.update(runner.timed(fn, warmup_ms=25, rep_ms=rep_ms)))
                if name == BASE and mode == "forward" and "ms" in row and not Env.smoke:
                    regime = gf.ot.sinkhorn_regime(*workload)
                    floor = roofline(*workload, regime)
                    self.emit(dict(base, contender=name, mode="roofline", regime=regime, **floor,
                                   roofline_fraction=floor["floor_ms"] / row["ms"]))
        del x, y
        cleanup()


def worker_main(args):
    gf.set_checks(False)  # production setting: no value-check sync per call
    worker = Worker(args.worker, args.rows, args.deadline, args.exclude)
    tiny = {**SMOKE_TINY_SECTIONS, **TINY_SECTIONS}
    if args.worker in tiny:
        for workload in tiny[args.worker]:
            # rep 100 ms: these kernels take well under a millisecond to a few ms, so 100 ms
            # still gives dozens of timed runs, and the twelve shapes fit the section's budget.
            worker.run_workload(workload, TINY_CONTENDERS, TINY_MODES, rep_ms=100)
        return
    by_name = {workload_name(w): w for w in SMOKE_WORKLOADS + WORKLOADS}
    worker.run_workload(by_name[args.worker])


def cuda_vs_triton(rows):
    """cuda ms / triton ms per shape and mode where both ran, the verdict against the tiny-cloud
    target (the CUDA kernel beats Triton: ratio < 1), and why the others did not run."""
    timed = {(r["config"], r["mode"], r["contender"]): r for r in rows if "ms" in r}
    lines = ["Target: on tiny clouds (n, m <= 32) the CUDA C++ kernel beats its Triton twin (cuda/triton < 1).", ""]
    pairs = [(r, timed[(r["config"], r["mode"], CUDA_TWIN)]) for r in rows
             if r.get("contender") == CUDA and "ms" in r and (r["config"], r["mode"], CUDA_TWIN) in timed]
    if pairs:
        lines += ["| shape | mode | cuda ms | triton ms | cuda/triton | verdict |", "|---|---|---|---|---|---|"]
        for r, t in pairs:
            ratio = r["ms"] / t["ms"]
            verdict = "n/a (smoke)" if Env.smoke else "PASS (faster)" if ratio < 1 else "FAIL (not faster)"
            lines.append(f"| {r['config']} | {r['mode']} | {r['ms']:.4f} | {t['ms']:.4f} | {ratio:.3f} | {verdict} |")
        ratios = [r["ms"] / t["ms"] for r, t in pairs]
        passed = "no verdict (smoke)" if Env.smoke else f"{sum(x < 1 for x in ratios)}/{len(ratios)} pairs PASS"
        lines += ["", f"- {CUDA} vs {CUDA_TWIN}: {passed}, geometric-mean ratio "
                  f"**{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}** "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f})"]
    else:
        lines.append(f"- no {CUDA} / {CUDA_TWIN} pair was measured")
    missing = {}
    for r in rows:
        if r.get("contender") == CUDA and "ms" not in r:
            why = (r.get("skipped") or r.get("error") or "not timed")[:200]
            missing.setdefault(why, []).append(f"{r['config']} {r['mode']}")
        elif r.get("contender") == CUDA and (r["config"], r["mode"], CUDA_TWIN) not in timed:
            missing.setdefault(f"{CUDA_TWIN} did not run", []).append(f"{r['config']} {r['mode']}")
    for why, where in missing.items():
        lines.append(f"- {CUDA} not compared in {len(where)} case(s) ({why})")
    return lines


def long_row(r, device, roofs):
    row = dict(op=f"sinkhorn fixed eps, {ITERS['run']} iters", contender=r["contender"], shape=r["config"],
               dtype="float32", device=device, median=r["ms"] / 1e3 if "ms" in r else None,
               min=r["min_ms"] / 1e3 if "min_ms" in r else None, mode=r["mode"], timer="device" if Env.device.type == "cuda" else "host",
               group=f"sinkhorn fixed eps, {ITERS['run']} iters | {r['config']} | {r['mode']}",
               baseline=r["contender"] == BASE)
    for key in ("skipped", "error"):
        if r.get(key):
            row[key] = r[key]
    extra = {k: v for k, v in r.items() if k not in ("config", "mode", "contender", "ms", "min_ms",
                                                     "skipped", "error")}
    roof = roofs.get(r["config"]) if r["contender"] == BASE and r["mode"] == "forward" else None
    if roof:
        extra.update({k: roof[k] for k in ("regime", "floor_ms", "bound", "roofline_fraction")})
    row["extra"] = extra
    return row


def environment():
    where = runner.device_name() + (" (CUDA C++ through its emulation build)" if Env.smoke else "")
    return (f"{'GPU' if Env.device.type == 'cuda' else 'Device'}: {where}, torch {torch.__version__}, "
            f"python {platform.python_version()}; {ITERS['run']} iterations, float32; "
            f"ratio = contender ms / {BASE} ms")


def finish(args):
    def done(rows, log):
        import report

        device = runner.device_name()
        roofs = {r["config"]: r for r in rows if r.get("mode") == "roofline"}
        long = runner.stamp([long_row(r, device, roofs) for r in rows if r.get("mode") != "roofline"])
        twins = cuda_vs_triton(rows)
        md = "\n".join([environment(), "", "## CUDA C++ vs Triton", ""] + twins + [
            "", report.render(long, title="Sinkhorn on the GPU", summary=False), "", f"Sections: {log}."])
        print(md)
        times = [r["median"] * 1e3 for r in long if r["contender"] == BASE and r.get("median")]
        median = (f"median {BASE} time over the matrix: {statistics.median(times):.3f} ms" if times
                  else f"{BASE}: nothing timed")
        print(median)
        runner.write_outputs(args, __file__, long, environment(), log, md)
        if args.summary:
            with open(args.summary, "w") as sink:
                sink.write("\n".join(["# Sinkhorn summary", environment(), "", "## CUDA C++ vs Triton", ""]
                                      + twins + ["", median, f"Sections: {log}."]) + "\n")
    return done


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_arguments(parser, default_budget=135.0)
    parser.add_argument("--quick", action="store_true", help="two peer workloads only (no tiny-cloud sections)")
    parser.add_argument("--summary", help="write the CUDA C++ vs Triton section and the median here too")
    args = parser.parse_args()
    runner.setup(args)
    if Env.smoke:
        ITERS["run"] = SMOKE_ITERS
        if args.budget == 135.0:  # the default: a worker starts in ~10 s on 2 shared vCPUs
            args.budget = 300.0
    sections = sections_of(args)
    if args.plan:
        print(f"sections (share of --budget {args.budget:g} s): "
              f"{', '.join(f'{n} {share:.0%}' for n, share in sections)}")
        for name, shapes in tiny_sections(args).items():
            print(f"{name}: workloads (B, n, m, d) {shapes} x {list(TINY_CONTENDERS)} x {list(TINY_MODES)}")
        print(f"peer workloads (B, n, m, d), one worker each: {workloads(args)} x {list(CONTENDERS)} x "
              f"{list(MODES)} ({CUDA}: n, m <= 32 only)")
        return 0
    if Env.smoke and not args.worker:
        runner.smoke_cuda_emulation()
    if not args.worker and not Env.smoke and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here; nothing measured (--smoke runs tiny sizes on CPU, "
              "--plan prints the matrix)", file=sys.stderr)
        return 2
    runner.main(args, __file__, sections, worker_main, finish(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
