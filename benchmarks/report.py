"""The results of benchmarks/: one long-format JSON-lines file and the tables rendered from it.

    python benchmarks/report.py add RUN.json --run NAME        # a pytest-benchmark JSON -> rows
    python benchmarks/report.py add-train METRICS.json... --run NAME   # guider-fast train --metrics-json
    python benchmarks/report.py render [--run NAME ...]        # results/tables/<run>.md
    python benchmarks/report.py runs                           # the runs in the file, with row counts

Every row is one measurement: op, contender, shape, dtype, device, median and min
(seconds), commit, date, plus group (the comparison: contenders of one group ran back
to back), run, baseline and optional fields (``guider_fast.bench`` describes the
format). The file is ``benchmarks/results/results.jsonl`` unless ``--results`` says
otherwise; ``add`` appends a run (a run's name must be new) and renders its table.
The scripts that are not pytest suites (``bench_gpu.py``, ``bench_dbpr_gpu.py``,
``peak_memory.py``, ``interleaved_ops.py``) append their rows themselves
(``--results``). Tables: one per group, **ratio = contender / guider_fast** (the
library's one ratio-table writer, as ``guider-fast bench`` prints it).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from guider_fast import bench

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS = RESULTS_DIR / "results.jsonl"
TABLES = RESULTS_DIR / "tables"


def git_facts(cwd: Path = HERE) -> Dict[str, Optional[str]]:
    """commit (short, "+dirty" when guider_fast/ or kernels/ have changes) and commit date."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    commit = os.environ.get("GUIDER_FAST_COMMIT") or git("rev-parse", "--short=7", "HEAD") or None
    if commit and not os.environ.get("GUIDER_FAST_COMMIT") and git("status", "--porcelain", "--", "../guider_fast", "../kernels"):
        commit += "+dirty"
    return dict(commit=commit)


def cpu_name() -> str:
    """The CPU's model name (as pytest-benchmark's brand_raw reports it), for rows' device."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "CPU"


def _info_cell(key, scale=1.0, spec=".2f"):
    def cell(entry):
        value = entry.row.get(key, (entry.row.get("extra") or {}).get(key))
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return ""
        return format(value * scale, spec)
    return cell


# Extra table columns shown where any row of a run carries the field.
OPTIONAL_COLUMNS = [
    ("triplets_per_s", ("M trip/s", _info_cell("triplets_per_s", 1e-6))),
    ("effective_GBps", ("GB/s", _info_cell("effective_GBps"))),
    ("floor_fraction", ("floor %", _info_cell("floor_fraction", 100.0, ".1f"))),
    ("gbps", ("GB/s", _info_cell("gbps", 1.0, ".0f"))),
    ("copy_fraction", ("% copy", _info_cell("copy_fraction", 100.0, ".0f"))),
    ("roofline_fraction", ("% roofline", _info_cell("roofline_fraction", 100.0, ".0f"))),
    ("check", ("check", _info_cell("check", 1.0, ".1e"))),
    ("first_s", ("first s", _info_cell("first_s"))),
    ("peak_mb", ("peak MB", _info_cell("peak_mb", 1.0, ".1f"))),
]


def columns_for(rows: Sequence[dict], skip: Sequence[str] = ()) -> List[bench.Column]:
    present = {k for r in rows for k in list(r) + list((r.get("extra") or {}))}
    seen, out = set(), []
    for key, column in OPTIONAL_COLUMNS:
        if key in present and key not in skip and column[0] not in seen:
            seen.add(column[0])
            out.append(column)
    return out


def render(rows: Sequence[dict], title: str, source: str = "", summary: bool = True) -> str:
    """Timing groups (median, or device time) then peak-memory groups, in one document."""
    parts = []
    timed = bench.collect_rows(rows)
    if timed:
        timed_rows = [r for r in rows if isinstance(r.get("median"), (int, float))
                      or r.get("skipped") or r.get("error")]
        parts.append(bench.markdown(timed, rows=timed_rows, source=source, title=title, summary=summary,
                                    columns=columns_for(timed_rows)))
    memory_rows = [r for r in rows if r.get("median") is None and isinstance(r.get("peak_mb"), (int, float))]
    if memory_rows:
        memory = bench.collect_rows(memory_rows, metric=bench.PEAK_MB)
        parts.append(bench.markdown(memory, rows=memory_rows, source=source, summary=summary,
                                    title=f"{title}: peak memory" if timed else title,
                                    columns=columns_for(memory_rows, skip=("peak_mb",))))
    return "\n\n".join(parts)


def runs_of(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for row in rows:
        out.setdefault(str(row.get("run")), []).append(row)
    return out


def render_runs(results: Path, names: Optional[Sequence[str]], out_dir: Path) -> List[Path]:
    by_run = runs_of(bench.read_rows(results))
    written = []
    for name in names or list(by_run):
        if name not in by_run:
            raise SystemExit(f"report.py: no run {name!r} in {results} (see `report.py runs`)")
        text = render(by_run[name], title=f"guider_fast benchmarks: {name}",
                      source=f"{_relative(results)}, run {name}")
        if not text:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.md"
        path.write_text(text + "\n")
        written.append(path)
    return written


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def add_rows(rows: List[dict], results: Path, run: str) -> int:
    existing = bench.read_rows(results) if results.exists() else []
    if any(r.get("run") == run for r in existing):
        raise SystemExit(f"report.py: run {run!r} is already in {results}; pick another --run")
    for row in rows:
        row["run"] = run
    return bench.write_rows(rows, results)


# ----------------------------------------------------------------------- training


def _epoch_times(record: dict) -> List[float]:
    return [h["seconds"] for h in record.get("history") or [] if isinstance(h.get("seconds"), (int, float))]


def train_rows(name: str, record: dict, commit: Optional[str], date: Optional[str],
               device: str) -> dict:
    """One ``guider-fast train --metrics-json`` record -> a row: median/min = seconds per epoch
    over its history; the whole record (config, metrics, history) is kept in ``extra``."""
    config = record.get("config") or {}
    median, least = bench.median_min(_epoch_times(record))
    shape = (f"{config.get('n_users', '?')} users x {config.get('n_items', '?')} items, "
             f"D={config.get('dim', '?')}, B={config.get('batch_size', '?')}")
    return dict(op="guider-fast train (seconds per epoch)", contender=name, shape=shape,
                dtype="float32", device=device, median=median, min=least, commit=commit, date=date,
                group=f"guider-fast train | {config.get('data', '?')} | {shape}",
                rounds=len(_epoch_times(record)) or None, extra=record)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"the rows file (default {_relative(RESULTS)})")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="append a pytest-benchmark JSON's rows; render its table")
    add.add_argument("json", type=Path)
    add.add_argument("--run", required=True, help="a new run name, e.g. cpu_2026-12-01")
    train = sub.add_parser("add-train", help="append guider-fast train --metrics-json records")
    train.add_argument("json", type=Path, nargs="+")
    train.add_argument("--run", required=True)
    train.add_argument("--device", default=None, help="the machine, in words (default: the CPU's name)")
    ren = sub.add_parser("render", help="write results/tables/<run>.md for the runs (default: all)")
    ren.add_argument("--run", action="append")
    ren.add_argument("--out", type=Path, default=TABLES)
    sub.add_parser("runs", help="list the runs in the file")
    args = parser.parse_args(argv)

    if args.command == "runs":
        for name, rows in runs_of(bench.read_rows(args.results)).items():
            facts = sorted({f"{r.get('commit')} {str(r.get('date'))[:10]}" for r in rows})
            print(f"{name}: {len(rows)} rows ({'; '.join(facts)})")
        return 0
    if args.command == "render":
        for path in render_runs(args.results, args.run, args.out):
            print(f"wrote {_relative(path)}")
        return 0
    if args.command == "add":
        rows, results = bench.load_results(args.json)
        if results is None:
            raise SystemExit(f"report.py: {args.json} is not a pytest-benchmark JSON")
    else:
        import json
        import time

        facts = git_facts()
        date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        rows = [train_rows(path.stem, json.loads(path.read_text()), facts["commit"], date,
                           args.device or cpu_name())
                for path in args.json]
    count = add_rows(rows, args.results, args.run)
    print(f"appended {count} rows of run {args.run!r} to {_relative(args.results)}")
    if Path(args.results).resolve() == RESULTS:  # the repository's file: its tables too
        for path in render_runs(args.results, [args.run], TABLES):
            print(f"wrote {_relative(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
