"""Peak resident-memory cost of each Sinkhorn contender, one fresh process per measurement.

    python benchmarks/peak_memory.py                      # markdown tables on stdout
    python benchmarks/peak_memory.py --results benchmarks/results/results.jsonl --run NAME
    python benchmarks/peak_memory.py --mode forward+backward --family fixed_eps

Each (family, workload, mode, contender) runs in its own subprocess, so no
contender inherits another's heap.  The child builds the inputs, warms the
contender up on a tiny problem (lazy library initialisation is not the
contender's working memory), records the peak resident size, runs the real
problem once and reports the increase of the peak: the extra memory the
solve needed on top of its inputs.

The peak is the process's resident-size high-water mark, read as ``VmHWM``
from /proc/self/status, after resetting it to the current resident size
(``echo 5 > /proc/self/clear_refs``) just before the run; importing torch,
POT and GeomLoss leaves the mark tens of MB above the resident size, which
would otherwise hide any smaller working set.  ``resource.getrusage``'s
ru_maxrss is only the fallback where /proc is unavailable: besides ignoring
the reset, it is floored by the parent's peak RSS, which the kernel carries
across the fork+exec of the child into ``signal->maxrss``.  The child also
allocates no large temporary before the baseline (the fixed-eps value of eps,
which needs a full cost matrix, is computed by the parent and passed on the
command line).

glibc's malloc would otherwise keep freed blocks in its arena (its mmap
threshold grows with every large free), and a contender reusing memory freed
by input creation would show no increase at all.  The children therefore run
with fixed ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``: every
block above 128 KiB is its own mapping, returned to the OS when freed, so the
resident size follows the live tensors.  (This is for measuring only; the
timings run with the default allocator.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Fixed glibc malloc thresholds for the children (see the module docstring).
CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _peak_rss_mb() -> float:
    """The resident-size high-water mark of this process, in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # reported in kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _reset_peak_rss() -> bool:
    """Lower the high-water mark to the current resident size; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def child(family: str, workload_name: str, mode: str, contender: str, eps: float) -> dict:
    import sinkhorn_contenders as sc

    sc.pin_single_thread()
    tiny = sc.make_problem(family, sc.Workload(2, 4, 4))
    sc.make_runner(family, contender, tiny, mode)()

    problem = sc.make_problem(family, sc.WORKLOADS_BY_NAME[workload_name], eps=eps)
    run = sc.make_runner(family, contender, problem, mode)
    peak_was_reset = _reset_peak_rss()
    baseline_mb = _peak_rss_mb()
    run()
    peak_mb = _peak_rss_mb()
    return {"family": family, "workload": workload_name, "mode": mode, "contender": contender,
            "baseline_rss_mb": round(baseline_mb, 1), "peak_increase_mb": round(peak_mb - baseline_mb, 1),
            "peak_was_reset": peak_was_reset}


def measure_in_subprocess(family, workload_name, mode, contender, eps) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", family, workload_name, mode,
               contender, repr(eps)]
    env = dict(os.environ, **CHILD_MALLOC_ENV)
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_all(families, modes) -> list:
    import sinkhorn_contenders as sc

    rows = []
    for family in families:
        for workload in sc.WORKLOADS:
            eps = sc.make_problem(family, workload).eps
            for mode in modes:
                for contender in sc.FAMILIES[family]:
                    rows.append(measure_in_subprocess(family, workload.name, mode, contender, eps))
                    print(f"measured {family} {workload.name} {mode} {contender}: "
                          f"{rows[-1]['peak_increase_mb']} MB", file=sys.stderr)
    return rows


def memory_rows(measured, commit=None, date=None, device=None) -> list:
    """peak_memory measurements -> rows of the results layout (metric ``peak_mb``, no time)."""
    rows = []
    for r in measured:
        rows.append(dict(op=f"peak RSS increase: {r['family']}", contender=r["contender"], shape=r["workload"],
                         dtype="float32", device=device, median=None, min=None, commit=commit, date=date,
                         group=f"peak RSS increase | {r['family']} | {r['workload']} | {r['mode']}",
                         mode=r["mode"], peak_mb=r["peak_increase_mb"], baseline=r["contender"] == "guider_fast",
                         extra={k: r[k] for k in ("baseline_rss_mb", "peak_was_reset") if k in r}))
    return rows


def markdown_table(measured) -> str:
    """One table per (family, workload, mode): peak RSS increase, ratio to guider_fast."""
    import report

    return report.render(memory_rows(measured), title="Peak RSS increase per contender", summary=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=5, metavar=("FAMILY", "WORKLOAD", "MODE", "CONTENDER", "EPS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=("fixed_eps", "samples_loss"), action="append",
                        help="restrict to a family (repeatable; default: both)")
    parser.add_argument("--mode", choices=("forward", "forward+backward"), action="append",
                        help="restrict to a mode (repeatable; default: both)")
    parser.add_argument("--results", metavar="PATH", help="append the rows to this results JSON-lines file")
    parser.add_argument("--run", default="peak_memory_cpu", help="the run's name in --results")
    args = parser.parse_args(argv)

    if args.child:
        family, workload_name, mode, contender, eps = args.child
        eps = None if eps == "None" else float(eps)
        print(json.dumps(child(family, workload_name, mode, contender, eps)))
        return
    rows = measure_all(args.family or ["fixed_eps", "samples_loss"],
                       args.mode or ["forward", "forward+backward"])
    if args.results:
        import time

        import report
        from guider_fast import bench

        out = memory_rows(rows, report.git_facts()["commit"], time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                          report.cpu_name())
        for row in out:
            row["run"] = args.run
        bench.write_rows(out, args.results)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
