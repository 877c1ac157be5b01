"""Markdown tables for RESULTS.md from a pytest-benchmark JSON file (+ optional peak-memory JSON).

    python benchmarks/report.py benchmarks/results_cpu.json [benchmarks/peak_memory_cpu.json]

One table per benchmark group: median and min time of each contender, the
ratio ``contender median / guider_fast median`` (> 1: guider_fast is faster)
and, where measured by peak_memory.py, the peak RSS increase.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def load_memory(path):
    if path is None:
        return {}
    with open(path) as source:
        rows = json.load(source)
    return {(r["family"], r["workload"], r["mode"], r["contender"]): r["peak_increase_mb"] for r in rows}


def group_tables(results, memory) -> str:
    groups = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench["group"]].append(bench)

    out = []
    for group, benches in groups.items():
        baseline = next(b for b in benches if b["extra_info"].get("baseline"))
        baseline_median = baseline["stats"]["median"]
        has_memory = any(_memory_key(b) in memory for b in benches)
        header = "| contender | median ms | min ms | rounds | ratio vs guider_fast |"
        rule = "|---|---:|---:|---:|---:|"
        if has_memory:
            header += " peak RSS increase MB |"
            rule += "---:|"
        out += [f"**{group}**", "", header, rule]
        for bench in sorted(benches, key=lambda b: b["stats"]["median"]):
            stats = bench["stats"]
            line = (f"| {bench['extra_info']['contender']} | {stats['median'] * 1e3:.2f} | "
                    f"{stats['min'] * 1e3:.2f} | {stats['rounds']} | "
                    f"{stats['median'] / baseline_median:.2f} |")
            if has_memory:
                mb = memory.get(_memory_key(bench))
                line += f" {mb:.1f} |" if mb is not None else " |"
            out.append(line)
        out.append("")
    return "\n".join(out)


def _memory_key(bench):
    info = bench["extra_info"]
    return (info.get("family"), info.get("workload"), info.get("mode"), info.get("contender"))


def main(argv):
    if not 1 <= len(argv) <= 2:
        sys.exit(__doc__)
    with open(argv[0]) as source:
        results = json.load(source)
    print(group_tables(results, load_memory(argv[1] if len(argv) == 2 else None)))


if __name__ == "__main__":
    main(sys.argv[1:])
