"""``guider-fast bench``: run the benchmark suite, then write a ratio table and a ratio plot.

    guider-fast bench [--suite DIR] [--select {sinkhorn,ops,dbpr,gpu,all}] [--quick]
                      [-k EXPR] [--out DIR] [--json PATH] [--from-json PATH]

The suite is the repository's ``benchmarks/`` folder (it is not installed with the
package: found next to the package source in an editable install, or given with
``--suite``).  It runs under pytest-benchmark in a subprocess; the resulting JSON is
reported as

* ``OUT/bench.md`` (also printed): a summary of the best and worst ratio per group,
  then one table per pytest-benchmark group (contender, median ms, ratio);
* ``OUT/bench_ratios.png``: one bar per non-guider_fast contender per group, log
  scale, a line at 1 (needs matplotlib; skipped with a message without it).

**ratio = contender median / guider_fast median** within a group, as in
``benchmarks/RESULTS.md``: above 1, guider_fast is faster.  The guider_fast contender
of a group is the benchmark flagged ``extra_info["baseline"]`` (the CPU suites flag
it), else the contender named ``guider_fast`` / ``guider_fast triton`` /
``guider_fast sgd``, else the only contender whose name starts with ``guider_fast``;
groups without one are listed without ratios.  For GPU benchmarks that record the
device time (``extra_info["device_ms"]``) that time is used instead of the host-timed
median.

``--from-json PATH`` skips the run and reports an existing pytest-benchmark JSON
(e.g. ``benchmarks/results_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# --select name -> the pytest files of that part of the suite.
SUITES: Dict[str, Sequence[str]] = {
    "sinkhorn": ("bench_sinkhorn_cpu.py",),
    "ops": ("bench_ops_cpu.py",),
    "dbpr": ("bench_dbpr_cpu.py",),
    "gpu": ("bench_sinkhorn.py",),  # skips itself without CUDA + triton
}
SELECT_CHOICES = tuple(SUITES) + ("all",)

# --quick: a few representative groups, ~1-2 min on a 2-vCPU machine (one -k expression
# per selected suite, joined with "or"):
QUICK_K: Dict[str, str] = {
    # fixed-eps and SamplesLoss forward at (B, n, m) = (512, 32, 32): 2 groups, 6 contenders.
    "sinkhorn": "(test_sinkhorn and B512_n32_m32_d64 and not backward)",
    # dbpr_loss fwd+bwd at K = 1 and calibrate at B = 2,048: 2 groups, 6 contenders.
    "ops": "(test_dbpr_forward_backward and 1]) or (test_calibrate and 2048])",
    # one training-step shape (all 7 contenders, torch.compile included).
    "dbpr": "(test_dbpr_step and uniform_20000x7000_D64_B2048_K1)",
    # one of bench_gpu.QUICK_WORKLOADS, plain forward only: 4 contenders.
    "gpu": "(test_sinkhorn_gpu and B1024_n64_m64_d64 and forward and not backward and not tol)",
}

BASELINE_NAMES = ("guider_fast", "guider_fast triton", "guider_fast sgd")
MD_NAME = "bench.md"
PNG_NAME = "bench_ratios.png"
JSON_NAME = "bench.json"


# --------------------------------------------------------------------------- model


@dataclass
class Entry:
    contender: str
    seconds: float  # the time the ratio is computed from (median, or device time)
    rounds: Optional[int] = None
    ratio: Optional[float] = None  # seconds / baseline seconds; None without a baseline
    baseline: bool = False

    @property
    def is_guider_fast(self) -> bool:
        return self.contender.startswith("guider_fast")


@dataclass
class Group:
    name: str
    entries: List[Entry] = field(default_factory=list)
    device_time: bool = False  # True: seconds come from extra_info["device_ms"]

    @property
    def baseline(self) -> Optional[Entry]:
        return next((e for e in self.entries if e.baseline), None)

    def competitors(self) -> List[Entry]:
        """Entries compared in the summary and the plot: the non-guider_fast contenders
        (all non-baseline entries where a group has only guider_fast variants)."""
        others = [e for e in self.entries if not e.baseline and e.ratio is not None]
        outside = [e for e in others if not e.is_guider_fast]
        return outside or others


def _contender(bench: dict) -> str:
    info = bench.get("extra_info") or {}
    if info.get("contender"):
        return str(info["contender"])
    param = bench.get("param")
    return str(param) if param else str(bench.get("name", "?"))


def _group_name(bench: dict) -> str:
    if bench.get("group"):
        return str(bench["group"])
    # No pytest-benchmark group (the GPU file): test function + workload + mode.
    info = bench.get("extra_info") or {}
    parts = [str(bench.get("name", "?")).split("[", 1)[0]]
    for key in ("family", "workload", "mode"):
        value = info.get(key)
        if value is not None and value != "":
            parts.append("x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    return " | ".join(parts)


def _pick_baseline(benches: List[dict]) -> Optional[int]:
    flagged = [i for i, b in enumerate(benches) if (b.get("extra_info") or {}).get("baseline") is True]
    if flagged:
        return flagged[0]
    names = [_contender(b) for b in benches]
    for wanted in BASELINE_NAMES:
        if wanted in names:
            return names.index(wanted)
    gf = [i for i, n in enumerate(names) if n.startswith("guider_fast")]
    return gf[0] if len(gf) == 1 else None


def collect(results: dict) -> List[Group]:
    """pytest-benchmark JSON (as loaded) -> groups in file order, entries sorted by time."""
    by_name: Dict[str, List[dict]] = {}
    for bench in results.get("benchmarks", []):
        by_name.setdefault(_group_name(bench), []).append(bench)
    groups = []
    for name, benches in by_name.items():
        device = all(isinstance((b.get("extra_info") or {}).get("device_ms"), (int, float))
                     for b in benches)
        base_index = _pick_baseline(benches)
        entries = []
        for i, bench in enumerate(benches):
            stats = bench.get("stats") or {}
            seconds = bench["extra_info"]["device_ms"] / 1e3 if device else stats.get("median")
            if seconds is None:
                continue
            entries.append(Entry(_contender(bench), float(seconds), stats.get("rounds"),
                                 baseline=i == base_index))
        base = next((e for e in entries if e.baseline), None)
        if base is not None and base.seconds > 0:
            for entry in entries:
                entry.ratio = entry.seconds / base.seconds
        entries.sort(key=lambda e: e.seconds)
        groups.append(Group(name, entries, device))
    return groups


# ------------------------------------------------------------------------ markdown


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 1000 else f"{ms:.1f}"


def _ratio(ratio: Optional[float]) -> str:
    if ratio is None or not math.isfinite(ratio):
        return "-"
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _source_line(results: dict, source: str) -> str:
    cpu = (results.get("machine_info") or {}).get("cpu", {}).get("brand_raw")
    commit = results.get("commit_info") or {}
    bits = [f"Source: `{source}`"]
    if results.get("datetime"):
        bits.append(f"run {str(results['datetime'])[:19]} UTC")
    if commit.get("id"):
        bits.append(f"commit `{str(commit['id'])[:7]}`" + (" (dirty tree)" if commit.get("dirty") else ""))
    if cpu:
        bits.append(f"CPU: {cpu}")
    return "; ".join(bits) + "."


def markdown(groups: List[Group], results: Optional[dict] = None, source: str = "") -> str:
    out = ["# guider_fast benchmarks", ""]
    if results is not None:
        out += [_source_line(results, source), ""]
    out += ["**ratio = contender median / guider_fast median** within a group (> 1: guider_fast "
            "is faster; < 1: it is slower). Contenders of a group ran back to back in one process; "
            "on a shared machine read the ratios rather than the absolute times.", ""]
    if any(g.device_time for g in groups):
        out += ["GPU groups use the device time recorded by the benchmark (`extra_info.device_ms`) "
                "instead of the host-timed median.", ""]

    out += ["## Summary", "",
            "Best and worst ratio over the non-guider_fast contenders of each group "
            f"(G = the bar group in `{PNG_NAME}`).", "",
            "| G | group | guider_fast contender | its median ms | best ratio | worst ratio |",
            "|---|---|---|---:|---|---|"]
    for i, group in enumerate(groups, 1):
        base = group.baseline
        rivals = group.competitors()
        if base is None or base.ratio is None:
            out.append(f"| G{i} | {_cell(group.name)} | (none) | - | - | - |")
            continue
        if rivals:
            best = max(rivals, key=lambda e: e.ratio)
            worst = min(rivals, key=lambda e: e.ratio)
            best_s = f"{_ratio(best.ratio)} ({_cell(best.contender)})"
            worst_s = f"{_ratio(worst.ratio)} ({_cell(worst.contender)})"
        else:
            best_s = worst_s = "-"
        out.append(f"| G{i} | {_cell(group.name)} | {_cell(base.contender)} | {_ms(base.seconds)} | "
                   f"{best_s} | {worst_s} |")
    out.append("")

    out += ["## Groups", ""]
    for i, group in enumerate(groups, 1):
        base = group.baseline
        time_label = "device ms" if group.device_time else "median ms"
        out += [f"### G{i}: {group.name}", ""]
        if base is None:
            out += ["No guider_fast contender in this group: no ratios.", ""]
        out += [f"| contender | {time_label} | rounds | ratio vs guider_fast |", "|---|---:|---:|---:|"]
        for entry in group.entries:
            name = _cell(entry.contender) + (" (baseline)" if entry.baseline else "")
            rounds = "" if entry.rounds is None else str(entry.rounds)
            out.append(f"| {name} | {_ms(entry.seconds)} | {rounds} | {_ratio(entry.ratio)} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------- plot


def plot(groups: List[Group], path: Path) -> bool:
    """Bar chart of the ratios; False (and nothing written) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False

    shown = [(i, g, g.competitors()) for i, g in enumerate(groups, 1)]
    shown = [(i, g, rivals) for i, g, rivals in shown if rivals]
    contenders: List[str] = []
    for _, _, rivals in shown:
        for entry in rivals:
            if entry.contender not in contenders:
                contenders.append(entry.contender)
    n_bars = sum(len(r) for _, _, r in shown)
    fig = Figure(figsize=(min(40.0, max(6.0, 0.28 * n_bars + 0.5 * len(shown) + 2)), 5.0),
                 layout="constrained")
    ax = fig.add_subplot()
    cmap = _colormap(len(contenders))
    x = 0.0
    ticks, labels, plotted = [], [], set()
    for index, _, rivals in shown:
        start = x
        for entry in sorted(rivals, key=lambda e: contenders.index(e.contender)):
            k = contenders.index(entry.contender)
            label = entry.contender if k not in plotted else None
            plotted.add(k)
            # Bars grow from the line at 1: up where guider_fast is faster, down where slower.
            ax.bar(x, entry.ratio - 1.0, bottom=1.0, width=0.9, color=cmap(k), label=label)
            x += 1.0
        ticks.append((start + x - 1.0) / 2)
        labels.append(f"G{index}")
        x += 0.8  # gap between groups
    ax.axhline(1.0, color="black", linewidth=1.0)
    ax.set_yscale("log")
    ratios = [e.ratio for _, _, rivals in shown for e in rivals] or [1.0]
    ax.set_ylim(min(min(ratios), 1.0) / 1.4, max(max(ratios), 1.0) * 1.4)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.set_xlim(-1.0, max(x - 0.3, 1.0))
    ax.set_ylabel("contender median / guider_fast median (log)")
    ax.set_title("Ratio vs guider_fast per benchmark group (> 1: guider_fast is faster; "
                 f"G = group in {MD_NAME})", fontsize=10)
    if contenders:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no group with a guider_fast contender and a rival",
                transform=ax.transAxes, ha="center")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
    return True


def _colormap(n: int):
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"]


# ------------------------------------------------------------------------ commands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``guider-fast bench``'s options to ``parser`` (an argparse subparser)."""
    parser.add_argument("--suite", metavar="DIR", type=Path, default=None,
                        help="the benchmarks/ folder (default: the one next to the guider_fast "
                             "source, in a source checkout)")
    parser.add_argument("--select", action="append", choices=SELECT_CHOICES, default=None,
                        help="part of the suite to run (repeatable; default: all). sinkhorn: "
                             "bench_sinkhorn_cpu.py, ops: bench_ops_cpu.py, dbpr: bench_dbpr_cpu.py, "
                             "gpu: bench_sinkhorn.py (skips itself without CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help="run a few representative groups only (~1-2 min on 2 vCPUs)")
    parser.add_argument("-k", dest="keyword", metavar="EXPR", default=None,
                        help="pytest -k expression selecting the benchmarks (overrides --quick's)")
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("bench_results"),
                        help=f"where {MD_NAME} and {PNG_NAME} go (default: ./bench_results)")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None,
                        help=f"where pytest-benchmark writes its JSON (default: OUT/{JSON_NAME})")
    parser.add_argument("--from-json", metavar="PATH", type=Path, default=None,
                        help="report an existing pytest-benchmark JSON instead of running the suite")


def find_suite(suite: Optional[Path]) -> Optional[Path]:
    if suite is None:
        import guider_fast

        suite = Path(guider_fast.__file__).resolve().parents[1] / "benchmarks"
    suite = Path(suite).expanduser().resolve()
    if suite.is_dir() and any(suite.glob("bench_*.py")):
        return suite
    return None


def _selected(select: Optional[List[str]]) -> List[str]:
    names = select or ["all"]
    if "all" in names:
        return list(SUITES)
    return list(dict.fromkeys(names))


def pytest_command(suite: Path, parts: List[str], json_path: Path, quick: bool,
                   keyword: Optional[str]) -> List[str]:
    files = [str(Path(suite.name) / f) for part in parts for f in SUITES[part]]
    cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-only",
           "--benchmark-columns=min,median,mean,rounds", f"--benchmark-json={json_path}"]
    if keyword is None and quick:
        keyword = " or ".join(QUICK_K[p] for p in parts)
    if keyword:
        cmd += ["-k", keyword]
    return cmd


def report(json_path: Path, out_dir: Path, stdout=None, stderr=None) -> int:
    """Write OUT/bench.md (+ the PNG) from a pytest-benchmark JSON; print the markdown."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        with open(json_path) as source:
            results = json.load(source)
    except (OSError, ValueError) as error:
        print(f"guider-fast bench: cannot read {json_path}: {error}", file=stderr)
        return 2
    groups = collect(results)
    if not groups:
        print(f"guider-fast bench: no benchmark results in {json_path} "
              "(were they all skipped? the GPU benchmarks need CUDA and triton)", file=stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(groups, results, str(json_path))
    md_path = out_dir / MD_NAME
    md_path.write_text(text + "\n")
    print(text, file=stdout)
    print(f"wrote {md_path}", file=stdout)
    png_path = out_dir / PNG_NAME
    if plot(groups, png_path):
        print(f"wrote {png_path}", file=stdout)
    else:
        print(f"skipped {PNG_NAME}: matplotlib is not installed (pip install matplotlib)", file=stdout)
    return 0


def run(args: argparse.Namespace) -> int:
    """``guider-fast bench``; returns the exit status."""
    out_dir = Path(args.out).expanduser().resolve()
    if args.from_json is not None:
        if args.quick or args.select or args.keyword:
            print("guider-fast bench: --from-json reports the given file; --select/--quick/-k ignored",
                  file=sys.stderr)
        return report(Path(args.from_json).expanduser(), out_dir)

    suite = find_suite(args.suite)
    if suite is None:
        where = args.suite if args.suite is not None else "next to the guider_fast source"
        print(f"guider-fast bench: benchmark suite not found ({where}): no bench_*.py there. "
              "The benchmarks/ folder ships with the source repository, not with the installed "
              "package: pass --suite path/to/benchmarks, or --from-json RESULTS.json to report "
              "existing results.", file=sys.stderr)
        return 2
    parts = _selected(args.select)
    missing = [f for p in parts for f in SUITES[p] if not (suite / f).is_file()]
    if missing:
        print(f"guider-fast bench: {', '.join(missing)} not found in {suite}", file=sys.stderr)
        return 2
    json_path = (Path(args.json).expanduser() if args.json is not None else out_dir / JSON_NAME).resolve()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if json_path.exists():
        json_path.unlink()  # never report a stale file from an earlier run

    cmd = pytest_command(suite, parts, json_path, args.quick, args.keyword)
    print("running: " + " ".join(cmd) + f"  (in {suite.parent})", flush=True)
    start = time.monotonic()
    status = subprocess.call(cmd, cwd=suite.parent, env=dict(os.environ))
    print(f"pytest exited with {status} after {time.monotonic() - start:.0f} s", flush=True)
    if not json_path.is_file():
        print(f"guider-fast bench: pytest wrote no {json_path}", file=sys.stderr)
        return status or 1
    reported = report(json_path, out_dir)
    return status if status != 0 else reported
