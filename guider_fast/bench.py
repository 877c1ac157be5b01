"""``guider-fast bench``: benchmark results as long-format rows, and the one ratio-table writer.

    guider-fast bench --from-json PATH [--out DIR]          # works anywhere (installed wheel too)
    guider-fast bench [--suite DIR] [--select {sinkhorn,ops,dbpr,gpu,all}] [--quick]
                      [-k EXPR] [--out DIR] [--json PATH]    # runs the suite: needs a source checkout

**Results.**  A measurement is one *row* (a dict, one JSON line): ``op``, ``contender``,
``shape``, ``dtype``, ``device`` (the CPU's or the card's name), ``median`` and ``min``
(seconds), ``commit``, ``date``, plus ``group`` (the comparison it belongs to: contenders
of one group ran back to back), ``run`` (which run of the suite), ``baseline`` (the
guider_fast contender the group's ratios divide by) and optional fields (``rounds``,
``timer`` = "host" or "device", ``peak_mb``, ``skipped`` / ``error``, ``extra``).
``rows_from_pytest`` turns a pytest-benchmark JSON into rows; ``read_rows`` /
``write_rows`` read and append JSON-lines files.  The repository keeps every committed
result in one such file, ``benchmarks/results/results.jsonl``.

**Ratio tables.**  ``collect_rows`` groups rows and computes **ratio = contender metric /
guider_fast metric** within a group (above 1, guider_fast is faster or smaller);
``markdown`` renders the groups (summary of best and worst ratio, then one table per
group); ``plot`` draws the ratios (needs matplotlib).  The benchmark scripts of the
repository render their tables with these too.  The baseline of a group is the row
flagged ``baseline``, else the contender named ``guider_fast`` / ``guider_fast triton`` /
``guider_fast sgd``, else the only contender whose name starts with ``guider_fast``;
groups without one are listed without ratios.

**The CLI.**  ``--from-json PATH`` reports a pytest-benchmark JSON or a results JSON-lines
file into ``OUT/bench.md`` (also printed) and ``OUT/bench_ratios.png``.  Without it, the
CLI runs the repository's ``benchmarks/`` suite under pytest-benchmark in a subprocess
and reports its JSON.  The suite is not installed with the package: it is found next to
the package source in a checkout, or given with ``--suite``; where there is none the CLI
says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

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

ROW_FIELDS = ("op", "contender", "shape", "dtype", "device", "median", "min", "commit", "date")
BASELINE_NAMES = ("guider_fast", "guider_fast triton", "guider_fast sgd")
MD_NAME = "bench.md"
PNG_NAME = "bench_ratios.png"
JSON_NAME = "bench.json"


# --------------------------------------------------------------------------- rows


def read_rows(path) -> List[dict]:
    """The rows of a JSON-lines results file (blank lines skipped)."""
    with open(path) as source:
        return [json.loads(line) for line in source if line.strip()]


def write_rows(rows: Iterable[dict], path, append: bool = True) -> int:
    """Append (or write) rows to a JSON-lines file, one compact line each; returns the count."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "a" if append else "w") as sink:
        for row in rows:
            sink.write(json.dumps(row, default=str, separators=(",", ":")) + "\n")
            count += 1
    return count


def load_results(path) -> Tuple[List[dict], Optional[dict]]:
    """(rows, the pytest-benchmark dict or None) from a pytest-benchmark JSON or a JSON-lines file."""
    text = Path(path).read_text()
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None  # several JSON values: JSON lines
    if isinstance(whole, dict) and "benchmarks" in whole:
        return rows_from_pytest(whole, run=Path(path).name), whole
    if isinstance(whole, dict):
        return [whole], None
    if isinstance(whole, list):
        return [r for r in whole if isinstance(r, dict)], None
    return [json.loads(line) for line in text.splitlines() if line.strip()], None


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
            parts.append(_shape_text(value))
    return " | ".join(parts)


def _shape_text(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def run_facts(results: dict) -> Dict[str, Optional[str]]:
    """commit (short id, "+dirty" for a dirty tree), date (UTC, ISO), device and host of a
    pytest-benchmark run."""
    commit_info = results.get("commit_info") or {}
    commit = str(commit_info["id"])[:7] if commit_info.get("id") else None
    if commit and commit_info.get("dirty"):
        commit += "+dirty"
    machine = results.get("machine_info") or {}
    device = (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or None
    stamp = results.get("datetime")
    cpu = machine.get("cpu") or {}
    host = ", ".join(str(v) for v in (device, cpu.get("count") and f"{cpu['count']} CPUs",
                                      cpu.get("hz_advertised_friendly"), machine.get("system"),
                                      machine.get("release"),
                                      machine.get("python_version") and f"Python {machine['python_version']}")
                     if v)
    return dict(commit=commit, date=str(stamp)[:19] if stamp else None, device=device, host=host or None)


_USED_INFO = ("contender", "family", "workload", "mode", "baseline", "device", "device_ms", "dtype",
              "peak_mb")


def rows_from_pytest(results: dict, run: Optional[str] = None) -> List[dict]:
    """pytest-benchmark JSON (as loaded) -> rows; every statistic and extra_info is kept."""
    facts = run_facts(results)
    rows = []
    for bench in results.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        stats = dict(bench.get("stats") or {})
        device_ms = info.get("device_ms")
        device_time = isinstance(device_ms, (int, float))
        row = dict(op=str(info.get("family") or str(bench.get("name", "?")).split("[", 1)[0]),
                   contender=_contender(bench), shape=_shape_text(info.get("workload", "")),
                   dtype=str(info.get("dtype", "float32")),
                   device=str(info.get("device") or facts["device"] or "?"),
                   median=device_ms / 1e3 if device_time else stats.get("median"),
                   min=None if device_time else stats.get("min"),
                   commit=facts["commit"], date=facts["date"], group=_group_name(bench), run=run,
                   timer="device" if device_time else "host")
        if facts["host"]:
            row["host"] = facts["host"]
        if info.get("mode"):
            row["mode"] = str(info["mode"])
        if "baseline" in info:
            row["baseline"] = bool(info["baseline"])
        if info.get("peak_mb") is not None:
            row["peak_mb"] = info["peak_mb"]
        if stats.get("rounds") is not None:
            row["rounds"] = stats["rounds"]
        if device_time:
            row["host_median"] = stats.get("median")
        stats_kept = {k: v for k, v in stats.items() if k not in ("median", "min", "rounds", "data")}
        if stats.get("data"):
            stats_kept["times_s"] = stats["data"]
        extra = {k: v for k, v in info.items() if k not in _USED_INFO}
        if bench.get("name"):
            extra["test"] = bench["name"]
        row["extra"] = dict(extra, stats=stats_kept) if stats_kept else extra
        rows.append(row)
    return rows


def median_min(times: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    return (statistics.median(times), min(times)) if times else (None, None)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Metric:
    """What a table compares: a row field, its column label and how a value is printed."""

    field: str = "median"
    label: str = "median ms"
    text: Optional[Callable[[float], str]] = None  # None: seconds printed as ms
    noun: str = "median"

    def format(self, value: float) -> str:
        return self.text(value) if self.text else _ms(value)


TIME = Metric()
DEVICE_TIME = Metric("median", "device ms", noun="device time")
PEAK_MB = Metric("peak_mb", "peak MB", lambda v: f"{v:.1f}", noun="peak memory")


@dataclass
class Entry:
    contender: str
    seconds: Optional[float]  # the compared value (median, device time, peak MB); None: not measured
    rounds: Optional[int] = None
    ratio: Optional[float] = None  # value / baseline value; None without a baseline
    baseline: bool = False
    row: dict = field(default_factory=dict)

    @property
    def is_guider_fast(self) -> bool:
        return self.contender.startswith("guider_fast")

    @property
    def min(self) -> Optional[float]:
        return self.row.get("min")

    @property
    def why_not(self) -> str:
        if self.row.get("error"):
            return f"FAILED: {self.row['error']}"
        return f"skipped: {self.row.get('skipped') or 'not measured'}"


@dataclass
class Group:
    name: str
    entries: List[Entry] = field(default_factory=list)
    device_time: bool = False  # True: values are device times (row timer "device")
    metric: Metric = TIME

    @property
    def baseline(self) -> Optional[Entry]:
        return next((e for e in self.entries if e.baseline), None)

    def competitors(self) -> List[Entry]:
        """Entries compared in the summary and the plot: the non-guider_fast contenders
        (all non-baseline entries where a group has only guider_fast variants)."""
        others = [e for e in self.entries if not e.baseline and e.ratio is not None]
        outside = [e for e in others if not e.is_guider_fast]
        return outside or others


def _pick_baseline(rows: List[dict], values: List[Optional[float]]) -> Optional[int]:
    flagged = [i for i, r in enumerate(rows) if r.get("baseline") is True and values[i] is not None]
    if flagged:
        return flagged[0]
    names = [str(r.get("contender", "?")) if values[i] is not None else None for i, r in enumerate(rows)]
    for wanted in BASELINE_NAMES:
        if wanted in names:
            return names.index(wanted)
    gf = [i for i, n in enumerate(names) if n and n.startswith("guider_fast")]
    return gf[0] if len(gf) == 1 else None


def row_group(row: dict) -> str:
    if row.get("group"):
        return str(row["group"])
    parts = [str(row.get(k)) for k in ("op", "shape", "mode", "dtype") if row.get(k)]
    return " | ".join(parts) or "?"


def collect_rows(rows: Iterable[dict], metric: Metric = TIME, by_run: Optional[bool] = None) -> List[Group]:
    """Rows -> groups in first-seen order, entries sorted by value (unmeasured ones last).

    Rows of different runs never share a group; with ``by_run`` (default: when the rows
    come from more than one run) the run is prefixed to the group name.
    """
    rows = [r for r in rows if isinstance(r.get(metric.field), (int, float))
            or r.get("skipped") or r.get("error")]
    if by_run is None:
        by_run = len({r.get("run") for r in rows}) > 1
    by_key: Dict[Tuple, List[dict]] = {}
    for row in rows:
        by_key.setdefault((row.get("run"), row_group(row)), []).append(row)
    groups = []
    for (run, name), members in by_key.items():
        values = [r[metric.field] if isinstance(r.get(metric.field), (int, float)) else None
                  for r in members]
        base_index = _pick_baseline(members, values)
        entries = [Entry(str(r.get("contender", "?")), None if v is None else float(v), r.get("rounds"),
                         baseline=i == base_index, row=r) for i, (r, v) in enumerate(zip(members, values))]
        base = entries[base_index] if base_index is not None else None
        if base is not None and base.seconds:
            for entry in entries:
                if entry.seconds is not None:
                    entry.ratio = entry.seconds / base.seconds
        entries.sort(key=lambda e: (e.seconds is None, e.seconds or 0.0))
        device = metric is TIME and all(r.get("timer") == "device" for r in members)
        title = f"{run}: {name}" if by_run and run else name
        groups.append(Group(title, entries, device, DEVICE_TIME if device else metric))
    return groups


def collect(results: dict) -> List[Group]:
    """pytest-benchmark JSON (as loaded) -> groups in file order, entries sorted by time."""
    return collect_rows(rows_from_pytest(results))


# ------------------------------------------------------------------------ markdown


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 1000 else f"{ms:.1f}"


def _ratio(ratio: Optional[float]) -> str:
    if ratio is None or not math.isfinite(ratio):
        return "-"
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# An extra column: (header, entry -> cell text).
Column = Tuple[str, Callable[[Entry], str]]


def group_table(group: Group, columns: Sequence[Column] = ()) -> List[str]:
    """One group's table: contender, value, [min ms], [rounds], extra columns, ratio (last)."""
    metric = group.metric
    has_min = metric.field == "median" and any(e.min is not None for e in group.entries)
    has_rounds = any(e.rounds is not None for e in group.entries)
    heads = ["contender", metric.label] + (["min ms"] if has_min else []) + \
        (["rounds"] if has_rounds else []) + [h for h, _ in columns] + ["ratio vs guider_fast"]
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for entry in group.entries:
        name = _cell(entry.contender) + (" (baseline)" if entry.baseline else "")
        if entry.seconds is None:
            cells = [_cell(entry.why_not[:200])] + [""] * (len(heads) - 2)
        else:
            cells = [metric.format(entry.seconds)]
            if has_min:
                cells.append("" if entry.min is None else _ms(entry.min))
            if has_rounds:
                cells.append("" if entry.rounds is None else str(entry.rounds))
            cells += [_cell(fn(entry)) for _, fn in columns]
            cells.append(_ratio(entry.ratio))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _source_line(rows: List[dict], source: str) -> str:
    bits = [f"Source: `{source}`"] if source else []
    for key, label in (("date", "run"), ("commit", "commit"), ("device", "device")):
        values = sorted({str(r[key]) for r in rows if r.get(key)})
        if values:
            shown = ", ".join(f"`{v}`" if key == "commit" else v for v in values[:4])
            bits.append(f"{label} {shown}" + (f" (+{len(values) - 4} more)" if len(values) > 4 else ""))
    return "; ".join(bits) + "." if bits else ""


def markdown(groups: List[Group], results: Optional[dict] = None, source: str = "",
             rows: Optional[List[dict]] = None, columns: Sequence[Column] = (),
             title: str = "guider_fast benchmarks", summary: bool = True) -> str:
    """The ratio document: a source line, a summary (best/worst ratio per group), one table per group."""
    out = [f"# {title}", ""]
    if rows is None and results is not None:
        rows = rows_from_pytest(results)
    line = _source_line(rows or [], source)
    if line:
        out += [line, ""]
    label = groups[0].metric.noun if groups else "median"
    out += [f"**ratio = contender {label} / guider_fast {label}** within a group (> 1: guider_fast "
            "is better; < 1: it is worse). Contenders of a group ran back to back in one process; "
            "on a shared machine read the ratios rather than the absolute values.", ""]
    if any(g.device_time for g in groups):
        out += ["GPU groups use the device time recorded by the benchmark "
                "instead of the host-timed median.", ""]
    if summary:
        out += ["## Summary", "",
                "Best and worst ratio over the non-guider_fast contenders of each group "
                f"(G = the bar group in `{PNG_NAME}`).", "",
                f"| G | group | guider_fast contender | its {groups[0].metric.label if groups else 'value'} "
                "| best ratio | worst ratio |",
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
            out.append(f"| G{i} | {_cell(group.name)} | {_cell(base.contender)} | "
                       f"{group.metric.format(base.seconds)} | {best_s} | {worst_s} |")
        out.append("")
    out += ["## Groups", ""]
    for i, group in enumerate(groups, 1):
        out += [f"### G{i}: {group.name}", ""]
        if group.baseline is None:
            out += ["No guider_fast contender in this group: no ratios.", ""]
        out += group_table(group, columns) + [""]
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
            # Bars grow from the line at 1: up where guider_fast is better, down where worse.
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
    ax.set_ylabel("contender / guider_fast (log)")
    ax.set_title("Ratio vs guider_fast per benchmark group (> 1: guider_fast is better; "
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
                        help="the repository's benchmarks/ folder (default: the one next to the "
                             "guider_fast source, in a source checkout)")
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
                        help="report an existing pytest-benchmark JSON or results JSON-lines file "
                             "instead of running the suite (needs no checkout)")


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
    """Write OUT/bench.md (+ the PNG) from a pytest-benchmark JSON or rows file; print the markdown."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        rows, results = load_results(json_path)
    except (OSError, ValueError) as error:
        print(f"guider-fast bench: cannot read {json_path}: {error}", file=stderr)
        return 2
    groups = collect_rows(rows)
    if not groups:
        print(f"guider-fast bench: no benchmark results in {json_path} "
              "(were they all skipped? the GPU benchmarks need CUDA and triton)", file=stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(groups, rows=rows, source=str(json_path))
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
        print(f"guider-fast bench: benchmark suite not found ({where}); running it needs the source "
              "repository's benchmarks/ folder (--suite DIR), while --from-json PATH works anywhere.",
              file=sys.stderr)
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
