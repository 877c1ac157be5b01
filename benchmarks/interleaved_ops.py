"""Cross-check of bench_ops_cpu.py's large-batch groups with the contenders timed round-robin.

    python benchmarks/interleaved_ops.py [--rounds N] [--json out.json]

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
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import guider_fast  # noqa: E402
from sinkhorn_contenders import pin_single_thread  # noqa: E402

pin_single_thread()

import bench_ops_cpu as ops  # noqa: E402


def cases():
    """(title, {contender: runner}) for each large-batch group of bench_ops_cpu.py."""
    dbpr = ops.checked_dbpr_batches()
    for negatives in ops.DBPR_NEGATIVES:
        batch = dbpr(negatives)
        runners = {name: ops.dbpr_runner(fn, batch) for name, fn in ops.DBPR_CONTENDERS.items()}
        runners["guider_fast (checks off)"] = ops.without_value_checks(runners["guider_fast (checks off)"])
        yield f"dbpr_loss fwd+bwd, B={ops.DBPR_BATCH}, K={negatives}", runners

    calibration = ops.checked_calibration_inputs()
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
    parser.add_argument("--json", metavar="PATH", help="also write every round's time as JSON")
    args = parser.parse_args(argv)

    rows, raw = [], {}
    for title, runners in cases():
        rounds = max(5, args.rounds // 3) if "K=5" in title else args.rounds
        times = interleave(runners, rounds)
        raw[title] = times
        base = statistics.median(times["guider_fast"])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append(f"| {title} | {name} | {median * 1e3:.2f} | {min(values) * 1e3:.2f} | "
                        f"{rounds} | {median / base:.2f} |")
        print(f"done: {title}", file=sys.stderr)
    print("| group | contender | median ms | min ms | rounds | ratio vs guider_fast |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"guider_fast_version": guider_fast.__version__, "times_s": raw}, out, indent=1)


if __name__ == "__main__":
    main()
