"""GPU side-by-side of batched Sinkhorn: guider_fast triton vs torch vs POT vs GeomLoss.

    python benchmarks/bench_gpu.py --results OUT.jsonl --md OUT.md [--json OUT.json]
                                   [--budget SECONDS] [--quick] [--smoke] [--plan]

Same work for everyone: float32 clouds, cost |x-y|^2/2 (POT: |x-y|^2 with reg = 2 eps),
one eps (0.05 x the median cost of the first problem), 100 fixed iterations, uniform
weights; the peers are ``baselines.pot_sinkhorn`` and ``baselines.geomloss_sinkhorn``.
Times are medians of ``triton.testing.do_bench`` (CUDA events); peak memory is
``torch.cuda.max_memory_allocated`` above the inputs.  A peer that is missing, runs out
of memory or fails is reported with its reason.  Runs under the one runner
(``runner.py``): one worker process per workload, a time budget, and the rows measured
so far kept when the script is killed.  Run by device_check.sh.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch

import guider_fast as gf
import runner
from baselines import N_ITERS, fixed_eps, geomloss_sinkhorn, peer_missing, pot_sinkhorn
from runner import Env, cleanup

WORKLOADS = [(4096, 32, 32, 64), (1024, 64, 64, 64), (256, 256, 256, 64),
             (1, 4096, 4096, 64), (1, 2048, 2048, 7050)]
QUICK_WORKLOADS = [(1024, 64, 64, 64), (1, 4096, 4096, 64)]
SMOKE_WORKLOADS = [(8, 8, 8, 4), (2, 16, 16, 4)]
MODES = ("forward", "forward+backward", "forward tol=1e-5")
CONTENDERS = ("guider_fast triton", "guider_fast torch", "POT solve_sample_batch", "GeomLoss tensorized")
BASE = "guider_fast triton"
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
    exps = 2 * batch * n * m * N_ITERS
    fmas = batch * n * m * d * (2 * N_ITERS if regime == "streamed" else 1)
    exp_ms, fma_ms = exps / EXP_PER_S * 1e3, fmas / FP32_FMA_PER_S * 1e3
    return dict(exps=exps, fmas=fmas, floor_ms=max(exp_ms, fma_ms),
                bound="exp (MUFU)" if exp_ms >= fma_ms else "fp32 FMA")


def _inputs(batch, n, m, d, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, n, d, generator=gen).to(device)
    y = (torch.randn(batch, m, d, generator=gen) + 0.1).to(device)
    return x, y, fixed_eps(x[:1], y[:1])


def _contenders(x, y, eps):
    """name -> (forward fn, forward+backward fn, tol-stopped forward fn or None), or a reason."""
    def guider(backend):
        def forward():
            return gf.sinkhorn(x, y, eps=eps, n_iters=N_ITERS, grad="detach", backend=backend).value

        def forward_backward():
            xr = x.detach().requires_grad_()
            gf.sinkhorn(xr, y, eps=eps, n_iters=N_ITERS, backend=backend).value.sum().backward()

        def forward_tol():
            return gf.sinkhorn(x, y, eps=eps, n_iters=10 * N_ITERS, tol=1e-5, grad="detach",
                               backend=backend).n_iters

        return forward, forward_backward, forward_tol

    def peer(solve):
        def run(backward):
            def fn():
                xr = x.detach().requires_grad_(backward)
                value = solve(xr, y, eps, backward)
                if backward:
                    value.sum().backward()
            return fn
        return run(False), run(True), None

    return {"guider_fast triton": guider("triton"), "guider_fast torch": guider("torch"),
            "POT solve_sample_batch": peer_missing("ot") or peer(pot_sinkhorn),
            "GeomLoss tensorized": peer_missing("geomloss") or peer(geomloss_sinkhorn)}


def _measure(fn):
    """(median ms, peak MB) as the pytest file records them."""
    t = runner.timed(fn, warmup_ms=25, rep_ms=200)
    return t["ms"], t["peak_mb"]


def workloads(args):
    return SMOKE_WORKLOADS if args.smoke else QUICK_WORKLOADS if args.quick else WORKLOADS


class Worker(runner.Worker):
    def run_workload(self, workload):
        cfg = workload_name(workload)
        x, y, eps = _inputs(*workload, Env.device)
        for name, fns in _contenders(x, y, eps).items():
            for mode, fn in zip(MODES, fns if not isinstance(fns, str) else MODES):
                base = dict(config=cfg, mode=mode, workload=list(workload), eps=eps)
                why = self.todo(base, name)
                if why == "done" or fn is None:
                    continue
                if isinstance(fns, str) or why:
                    self.emit(dict(base, contender=name, skipped=fns if isinstance(fns, str) else why))
                    continue
                row = dict(base, contender=name)
                self.attempt(row, lambda row, fn=fn: row.update(runner.timed(fn, warmup_ms=25, rep_ms=200)))
                if name == BASE and mode == "forward" and "ms" in row and not Env.smoke:
                    regime = gf.ot.sinkhorn_regime(*workload)
                    floor = roofline(*workload, regime)
                    self.emit(dict(base, contender=name, mode="roofline", regime=regime, **floor,
                                   roofline_fraction=floor["floor_ms"] / row["ms"]))
        del x, y
        cleanup()


def worker_main(args):
    gf.set_checks(False)  # production setting: no value-check sync per call
    by_name = {workload_name(w): w for w in SMOKE_WORKLOADS + WORKLOADS}
    Worker(args.worker, args.rows, args.deadline, args.exclude).run_workload(by_name[args.worker])


def long_row(r, device, roofs):
    row = dict(op="sinkhorn fixed eps, 100 iters", contender=r["contender"], shape=r["config"],
               dtype="float32", device=device, median=r["ms"] / 1e3 if "ms" in r else None,
               min=r["min_ms"] / 1e3 if "min_ms" in r else None, mode=r["mode"], timer="device" if Env.device.type == "cuda" else "host",
               group=f"sinkhorn fixed eps, {N_ITERS} iters | {r['config']} | {r['mode']}",
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
    where = runner.device_name()
    return (f"{'GPU' if Env.device.type == 'cuda' else 'Device'}: {where}, torch {torch.__version__}, "
            f"python {platform.python_version()}; {N_ITERS} iterations, float32; "
            f"ratio = contender ms / {BASE} ms")


def finish(args):
    def done(rows, log):
        import report

        device = runner.device_name()
        roofs = {r["config"]: r for r in rows if r.get("mode") == "roofline"}
        long = runner.stamp([long_row(r, device, roofs) for r in rows if r.get("mode") != "roofline"])
        md = "\n".join([environment(), "", report.render(long, title="Sinkhorn on the GPU", summary=False),
                        "", f"Sections: {log}."])
        print(md)
        times = [r["median"] * 1e3 for r in long if r["contender"] == BASE and r.get("median")]
        if times:
            print(f"median {BASE} time over the matrix: {statistics.median(times):.3f} ms")
        runner.write_outputs(args, __file__, long, environment(), log, md)
    return done


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_arguments(parser, default_budget=135.0)
    parser.add_argument("--quick", action="store_true", help="two workloads only")
    args = parser.parse_args()
    runner.setup(args)
    chosen = workloads(args)
    sections = [(workload_name(w), 1.0 / len(chosen)) for w in chosen]
    if args.plan:
        print(f"workloads (B, n, m, d), one worker each, {args.budget:g} s shared: {chosen}")
        print(f"contenders: {list(CONTENDERS)}; modes: {list(MODES)}")
        return 0
    if not args.worker and not Env.smoke and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here; nothing measured (--smoke runs tiny sizes on CPU, "
              "--plan prints the matrix)", file=sys.stderr)
        return 2
    runner.main(args, __file__, sections, worker_main, finish(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
