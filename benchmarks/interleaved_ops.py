"""Cross-check of bench_ops_cpu.py's large-batch groups with the contenders timed round-robin.

    python benchmarks/interleaved_ops.py [--rounds N] [--results benchmarks/results/results.jsonl --run NAME]

pytest-benchmark times one contender after the other.  At B = 65,536 (and for
GuiderLoss's 32 MiB image-feature gather) each call allocates tens of MB of
fresh temporaries, and whether glibc serves them from its heap or maps new,
page-faulting memory depends on what ran before; single rounds then vary by
2-3x and a contender's median depends on its slot in the run.  Here every
round calls each contender once, in turn, in one process, so all of them see
the same allocator and machine state.  Same inputs, runners and checks as
bench_ops_cpu.py; one thread.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import guider_fast  # noqa: E402
import report  # noqa: E402
from guider_fast import bench  # noqa: E402
from sinkhorn_contenders import pin_single_thread  # noqa: E402

pin_single_thread()

import bench_ops_cpu as ops  # noqa: E402


def cases():
    """(title, {contender: runner}) for each large-batch group of bench_ops_cpu.py."""
    dbpr = ops.checked_once(ops.checked_dbpr_batch_for)
    for negatives in ops.DBPR_NEGATIVES:
        batch = dbpr(negatives)
        runners = {name: ops.dbpr_runner(fn, batch) for name, fn in ops.DBPR_CONTENDERS.items()}
        runners["guider_fast (checks off)"] = ops.without_value_checks(runners["guider_fast (checks off)"])
        yield f"dbpr_loss fwd+bwd, B={ops.DBPR_BATCH}, K={negatives}", runners

    calibration = ops.checked_once(ops.checked_calibration_inputs_for)
    batch = max(ops.CALIBRATION_BATCHES)
    inputs = calibration(batch)
    runners = {name: (lambda fn=fn: fn(*inputs)) for name, fn in ops.CALIBRATION_CONTENDERS.items()}
    runners["guider_fast (checks off)"] = ops.without_value_checks(runners["guider_fast (checks off)"])
    yield f"calibrate, B={batch}", runners

    problem = ops.checked_guider_problem()
    # The per-batch and frozen runners share one GuiderLoss whose item cache
    # selects the mode, so each mode gets its own instance here.
    for mode in ops.GUIDER_MODES:
        own = (copy.deepcopy(problem[0]),) + problem[1:]
        runners = {name: ops.guider_runner(own, name, mode) for name in ops.GUIDER_CONTENDERS}
        runners["guider_fast (checks off)"] = ops.without_value_checks(runners["guider_fast (checks off)"])
        yield f"GuiderLoss fwd+bwd, {mode}, B={ops.GUIDER_BATCH}", runners


def interleaved_rows(title, times, commit, date, device):
    """One row per contender of a round-robin group (every round's time kept in extra)."""
    op, _, shape = title.partition(", ")
    rows = []
    for name, values in times.items():
        median, least = bench.median_min(values)
        rows.append(dict(op=op + " (interleaved)", contender=name, shape=shape, dtype="float32", device=device,
                         median=median, min=least, commit=commit, date=date, group=title,
                         rounds=len(values), baseline=name == "guider_fast",
                         extra={"times_s": values, "guider_fast_version": guider_fast.__version__}))
    return rows


def interleave(runners, rounds):
    for run in runners.values():
        run()  # warm-up
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds per group (K=5: a third)")
    parser.add_argument("--results", metavar="PATH",
                        help="append the rows (every round's time kept) to this results JSON-lines file")
    parser.add_argument("--run", default="interleaved_ops_cpu", help="the run's name in --results")
    args = parser.parse_args(argv)

    rows = []
    facts = dict(report.git_facts(), date=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))
    for title, runners in cases():
        rounds = max(5, args.rounds // 3) if "K=5" in title else args.rounds
        rows += interleaved_rows(title, interleave(runners, rounds), facts["commit"], facts["date"],
                                 report.cpu_name())
        print(f"done: {title}", file=sys.stderr)
    print(report.render(rows, title="interleaved op groups", summary=False))
    if args.results:
        for row in rows:
            row["run"] = args.run
        bench.write_rows(rows, args.results)


if __name__ == "__main__":
    main()
