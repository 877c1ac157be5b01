"""GPU side-by-side of batched Sinkhorn: guider_fast triton vs torch vs POT vs GeomLoss.

    python benchmarks/bench_gpu.py --json OUT.json --md OUT.md [--quick]

Same work for everyone: float32 clouds, cost |x-y|^2/2 (POT: |x-y|^2 with reg = 2 eps),
one eps (0.05 x the median cost of the first problem), 100 fixed iterations, uniform
weights.  Times are medians of ``triton.testing.do_bench`` (CUDA events); peak memory is
``torch.cuda.max_memory_allocated`` above the inputs.  A peer that is missing, runs out
of memory or fails is skipped with its reason in the table.  Run by device_check.sh.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

import guider_fast as gf

WORKLOADS = [(4096, 32, 32, 64), (1024, 64, 64, 64), (256, 256, 256, 64),
             (1, 4096, 4096, 64), (1, 2048, 2048, 7050)]
QUICK_WORKLOADS = [(1024, 64, 64, 64), (1, 4096, 4096, 64)]
N_ITERS = 100
# H100 SXM rates used for the floor (PERF_NOTES; re-measure on the lent card):
# MUFU exp throughput, and fp32 FMA on the CUDA cores (the kernels' IEEE fp32 dots).
EXP_PER_S = 4.2e12
FP32_FMA_PER_S = 33.5e12


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
    cost = torch.cdist(x[:1], y[:1]).pow(2).div(2)
    eps = 0.05 * float(cost.median())
    return x, y, eps


MODES = ("forward", "forward+backward", "forward tol=1e-5")


def _contenders(x, y, eps):
    """name -> (forward fn, forward+backward fn, tol-stopped forward fn or None)."""
    out = {}

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

    out["guider_fast triton"] = guider("triton")
    out["guider_fast torch"] = guider("torch")
    try:
        import ot

        def pot(grad):
            def run():
                xr = x.detach().requires_grad_(grad == "envelope")
                res = ot.batch.solve_sample_batch(xr, y, reg=2 * eps, metric="sqeuclidean",
                                                  max_iter=N_ITERS, tol=0.0, method="log_sinkhorn",
                                                  grad=grad)
                if grad == "envelope":
                    res.value.sum().backward()
            return run

        out["POT solve_sample_batch"] = (pot("detach"), pot("envelope"), None)
    except ImportError as exc:
        out["POT solve_sample_batch"] = f"not importable: {exc}"
    try:
        from geomloss._legacy.sinkhorn_divergence import log_weights, sinkhorn_loop
        from geomloss._legacy.sinkhorn_samples import cost_routines, softmin_tensorized

        def geomloss(backward):
            def run():
                xr = x.detach().requires_grad_(backward)
                a = torch.full(x.shape[:2], 1 / x.shape[1], device=x.device)
                b = torch.full(y.shape[:2], 1 / y.shape[1], device=y.device)
                cost = cost_routines[2]
                _, _, g_ab, f_ba = sinkhorn_loop(softmin_tensorized, log_weights(a), log_weights(b),
                                                 None, None, cost(xr, y.detach()), cost(y, xr.detach()),
                                                 [eps] * N_ITERS, None, debias=False)
                value = (a * f_ba).sum(1) + (b * g_ab).sum(1)
                if backward:
                    value.sum().backward()
            return run

        out["GeomLoss tensorized"] = (geomloss(False), geomloss(True), None)
    except ImportError as exc:
        out["GeomLoss tensorized"] = f"not importable: {exc}"
    return out


def _measure(fn):
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return ms, peak_mb


def run(workloads):
    device = torch.device("cuda")
    gf.set_checks(False)  # production setting: no value-check sync per call
    rows = []
    for batch, n, m, d in workloads:
        x, y, eps = _inputs(batch, n, m, d, device)
        for name, fns in _contenders(x, y, eps).items():
            if isinstance(fns, str):
                rows.append(dict(workload=(batch, n, m, d), contender=name, mode="-", skipped=fns))
                continue
            for mode, fn in zip(MODES, fns):
                if fn is None:
                    continue
                try:
                    ms, peak = _measure(fn)
                    row = dict(workload=(batch, n, m, d), contender=name, mode=mode, ms=ms, peak_mb=peak)
                    if name == "guider_fast triton" and mode == "forward":
                        regime = gf.ot.sinkhorn_regime(batch, n, m, d)
                        floor = roofline(batch, n, m, d, regime)
                        row.update(regime=regime, floor_ms=floor["floor_ms"], bound=floor["bound"],
                                   roofline_fraction=floor["floor_ms"] / ms)
                    rows.append(row)
                except Exception as exc:  # a peer that fails is reported, not fatal
                    torch.cuda.empty_cache()
                    rows.append(dict(workload=(batch, n, m, d), contender=name, mode=mode,
                                     skipped=f"{type(exc).__name__}: {str(exc)[:120]}"))
                print(rows[-1], flush=True)
        del x, y
        torch.cuda.empty_cache()
    return rows


def markdown(rows):
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"python {platform.python_version()}; {N_ITERS} iterations, float32; "
             "ratio = contender ms / guider_fast triton ms", "",
             "| workload (B, n, m, d) | mode | contender | ms | ratio | peak MB |",
             "|---|---|---|---:|---:|---:|"]
    base = {(tuple(r["workload"]), r["mode"]): r["ms"] for r in rows
            if r["contender"] == "guider_fast triton" and "ms" in r}
    for r in rows:
        key = (tuple(r["workload"]), r["mode"])
        if "ms" in r:
            ratio = r["ms"] / base[key] if key in base else float("nan")
            note = (f" ({r['regime']}; floor {r['floor_ms']:.3f} ms, {r['bound']}-bound, "
                    f"{100 * r['roofline_fraction']:.0f}% of roofline)" if "regime" in r else "")
            lines.append(f"| {r['workload']} | {r['mode']} | {r['contender']}{note} | {r['ms']:.3f} | "
                         f"{ratio:.2f} | {r['peak_mb']:.1f} |")
        else:
            lines.append(f"| {r['workload']} | {r['mode']} | {r['contender']} | skipped: {r['skipped']} | | |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    parser.add_argument("--md")
    parser.add_argument("--quick", action="store_true", help="two workloads only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    rows = run(QUICK_WORKLOADS if args.quick else WORKLOADS)
    table = markdown(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as sink:
            json.dump(rows, sink, indent=1, default=str)
    if args.md:
        with open(args.md, "w") as sink:
            sink.write(table + "\n")
    times = [r["ms"] for r in rows if r.get("contender") == "guider_fast triton" and "ms" in r]
    if times:
        print(f"median guider_fast triton time over the matrix: {statistics.median(times):.3f} ms")


if __name__ == "__main__":
    main()
