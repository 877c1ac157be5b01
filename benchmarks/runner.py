"""The one runner of the GPU benchmark scripts (``bench_gpu.py``, ``bench_dbpr_gpu.py``).

* **Crash isolation**: every section runs in its own worker process (the script itself,
  started with ``--worker SECTION``).  A worker that breaks the CUDA context exits 3
  after writing a ``broke_context`` row; the parent restarts the section without the
  contenders that broke it (at most ``RESTARTS`` times).
* **Time budget**: ``--budget`` seconds for all sections together, shared by the
  sections' weights; unused time carries forward to the next section.  A worker stops
  starting measurements once its deadline is near, and the parent kills a worker that
  outlives its deadline by ``GRACE_S``.
* **Partial results**: workers append each row to a JSON-lines scratch file the moment
  it is measured.  On SIGTERM (device_check.sh's ``timeout``) the parent kills the
  worker, and the script still converts and writes every row measured so far.

Rows end in the results layout (``guider_fast.bench``): op, contender, shape, dtype,
device (the card's name), median and min (seconds), commit, date, group, baseline, run.
``finish`` appends them to ``--results`` and renders the tables with the library's one
ratio-table writer.  ``--smoke`` runs a script's tiny sizes on CPU (TRITON_INTERPRET=1),
which is how the runner itself is tested without a GPU.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

RESTARTS = 2
GRACE_S = 15.0


class Env:
    smoke = False
    device = torch.device("cpu")


def add_arguments(parser, default_budget: float) -> None:
    """The runner's options (the --worker ones are internal)."""
    parser.add_argument("--budget", type=float, default=default_budget,
                        help=f"seconds for all sections together (default {default_budget:g})")
    parser.add_argument("--sections", nargs="*", help="only these sections")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, TRITON_INTERPRET=1")
    parser.add_argument("--json", help="the run's rows as one JSON document (env, sections, rows)")
    parser.add_argument("--md", help="the ratio tables (markdown)")
    parser.add_argument("--results", help="append the rows (results layout) to this JSON-lines file")
    parser.add_argument("--run", help="the run's name in --results (default: <script>_<date>_<commit>)")
    parser.add_argument("--plan", action="store_true", help="print the sections and sizes, run nothing")
    parser.add_argument("--worker", help=argparse_suppress())
    parser.add_argument("--rows", help=argparse_suppress())
    parser.add_argument("--deadline", type=float, help=argparse_suppress())
    parser.add_argument("--exclude", action="append", default=[], help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def setup(args) -> None:
    """Before triton is first imported (it reads the switch once): interpreter only in --smoke."""
    Env.smoke = args.smoke
    if Env.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") == "1" and not args.plan:
        print("TRITON_INTERPRET=1 ignored: this benchmark times the compiled kernels", flush=True)
        os.environ["TRITON_INTERPRET"] = "0"
    Env.device = torch.device("cpu" if Env.smoke else "cuda")


def device_name() -> str:
    if Env.device.type == "cuda":
        return torch.cuda.get_device_name()
    return "CPU (smoke: tiny sizes, TRITON_INTERPRET=1)"


# ----------------------------------------------------------------------------- timing


def sync():
    if Env.device.type == "cuda":
        torch.cuda.synchronize()


def cleanup():
    gc.collect()
    if Env.device.type == "cuda":
        torch.cuda.empty_cache()


def first_call(fn):
    """(output, seconds) of one synchronised call (compilation included)."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def timed(fn, warmup_ms: int = 5, rep_ms: int = 30) -> Dict[str, float]:
    """min / p20 / median (``ms``) / p80 in ms, and peak MB above the memory in use before.

    CUDA: ``triton.testing.do_bench`` quantiles (CUDA events, L2 flushed between runs);
    CPU (smoke): three perf_counter calls.
    """
    if Env.device.type != "cuda":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return dict(min_ms=times[0], p20=times[0], ms=times[1], p80=times[2], peak_mb=float("nan"))
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.0, 0.2, 0.5, 0.8])
    return dict(min_ms=q[0], p20=q[1], ms=q[2], p80=q[3],
                peak_mb=(torch.cuda.max_memory_allocated() - base) / 2**20)


def free_bytes():
    if Env.device.type != "cuda":
        return float("inf")
    cleanup()
    return torch.cuda.mem_get_info()[0]


def context_broken(exc) -> bool:
    """A sticky CUDA error (illegal address, launch failure) poisons every later launch."""
    if Env.device.type != "cuda":
        return False
    text = str(exc)
    if "illegal" in text or "unspecified launch failure" in text or "misaligned" in text:
        return True
    try:
        torch.cuda.synchronize()
        torch.empty(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return False
    except Exception:
        return True


def describe(exc) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


# ----------------------------------------------------------------------------- worker


def read_rows(path) -> List[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as src:
        return [json.loads(line) for line in src if line.strip()]


class Worker:
    """One section's measurements: rows go to the scratch file as soon as they exist."""

    KEY = ("config", "mode", "contender")

    def __init__(self, section, rows_path, deadline, exclude):
        self.section, self.rows_path, self.deadline = section, rows_path, deadline
        self.exclude = set(exclude)
        self.done = {tuple(r.get(k) for k in self.KEY) for r in read_rows(rows_path)}

    def left(self):
        return self.deadline - time.time()

    def emit(self, row):
        row["section"] = self.section
        with open(self.rows_path, "a") as sink:
            sink.write(json.dumps(row, default=str) + "\n")
        brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k in self.KEY + ("ms", "check", "first_s", "skipped", "error")}
        print(f"[{self.section} {time.strftime('%H:%M:%S')}] {brief}", flush=True)

    def todo(self, base, name):
        """None to run, else a reason to skip ("done": already emitted, silently skipped)."""
        key = tuple(base.get(k) if k != "contender" else name for k in self.KEY)
        if key in self.done:
            return "done"
        if name in self.exclude:
            return "excluded: broke the CUDA context in an earlier run of this section"
        if self.left() < (0.3 if Env.smoke else 1.5):
            return "section time budget exhausted"
        return None

    def attempt(self, row, body):
        """Run body(row) (fills row); errors go into the row; exit 3 on a broken context."""
        try:
            body(row)
        except Exception as exc:  # a contender that fails is reported, never fatal
            row["error"] = describe(exc)
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            broken = context_broken(exc)
            cleanup()
            if broken:
                row["broke_context"] = True
                self.emit(row)
                sys.exit(3)
        self.emit(row)

    def measure(self, row, fn, check: Optional[Callable] = None):
        """The usual body: a checked first call, then the timing."""
        def body(row):
            out, row["first_s"] = first_call(fn)
            if check is not None:
                row["check"] = check(out)
            del out
            row.update(timed(fn))
        self.attempt(row, body)


# ----------------------------------------------------------------------------- parent


class Stop(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Stop()


def run_sections(script: str, sections: Sequence[Tuple[str, float]], args, rows_path: str) -> List[dict]:
    """Each selected section in a worker process of ``script``; returns the log of attempts.

    SIGTERM stops the run between or during sections (the worker is killed, its rows so
    far are kept).
    """
    start = time.time()
    carry = 0.0
    log = []
    for section, share in sections:
        if args.sections and section not in args.sections:
            continue
        deadline = min(time.time() + share * args.budget + carry, start + args.budget)
        exclude: List[str] = []
        for attempt in range(RESTARTS + 1):
            left = deadline - time.time()
            if left < 1:
                break
            cmd = [sys.executable, os.path.abspath(script), "--worker", section, "--rows", rows_path,
                   "--deadline", str(deadline)] + (["--smoke"] if Env.smoke else [])
            for name in exclude:
                cmd += ["--exclude", name]
            proc = subprocess.Popen(cmd)
            try:
                rc = proc.wait(timeout=left + GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "killed at the section budget"
            except Stop:
                proc.kill()
                proc.wait()
                log.append(dict(section=section, attempt=attempt, rc="stopped by SIGTERM"))
                raise Stopped(log)
            log.append(dict(section=section, attempt=attempt, rc=rc))
            if rc != 3:
                break
            exclude = sorted({r["contender"] for r in read_rows(rows_path)
                              if r.get("section") == section and r.get("broke_context")})
        carry = max(0.0, deadline - time.time())
    return log


class Stopped(Exception):
    def __init__(self, log):
        super().__init__("stopped by SIGTERM")
        self.log = log


def run_facts() -> Dict[str, Optional[str]]:
    """commit (short, "+dirty" when guider_fast/ or kernels/ changed) and the UTC date of now."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = os.environ.get("GUIDER_FAST_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=root, capture_output=True,
                                    text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "guider_fast", "kernels"], cwd=root,
                                   capture_output=True, text=True, check=True).stdout.strip()
            commit += "+dirty" if dirty else ""
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return dict(commit=commit or None, date=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))


def main(args, script: str, sections: Sequence[Tuple[str, float]], worker_main: Callable,
         finish: Callable[[List[dict], List], None]) -> None:
    """A script's entry point: ``worker_main(args)`` in a worker, else the sections, then
    ``finish(rows, log)`` with whatever was measured (SIGTERM included)."""
    if args.worker:
        worker_main(args)
        return
    import tempfile

    scratch = os.path.join(tempfile.gettempdir(), os.path.basename(script))
    rows_path = (args.json or f"{scratch}.{os.getpid()}") + ".rows.jsonl"
    if os.path.exists(rows_path):
        os.remove(rows_path)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        log = run_sections(script, sections, args, rows_path)
    except Stopped as stop:
        log = stop.log
    except Stop:
        log = [dict(rc="stopped by SIGTERM")]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish writes the rows: do not stop it halfway
    finish(read_rows(rows_path), log)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_outputs(args, script: str, rows: List[dict], env: str, log, md: str,
                  extra: Optional[dict] = None) -> None:
    """--json (env, sections, rows), --md and --results (the rows, appended under --run)."""
    if args.json:
        with open(args.json, "w") as sink:
            json.dump(dict(env=env, sections=log, rows=rows, **(extra or {})), sink, indent=1, default=str)
    if args.md:
        with open(args.md, "w") as sink:
            sink.write(md + "\n")
    if args.results:
        from guider_fast import bench

        facts = run_facts()
        name = args.run or "_".join(filter(None, (os.path.splitext(os.path.basename(script))[0],
                                                   facts["date"][:10], facts["commit"])))
        for row in rows:
            row["run"] = name
        count = bench.write_rows(rows, args.results)
        print(f"appended {count} rows of run {name!r} to {args.results}", flush=True)


def stamp(rows: List[dict]) -> List[dict]:
    """Fill commit/date of rows that have none (the parent's facts at the end of the run)."""
    facts = run_facts()
    for row in rows:
        row.setdefault("commit", facts["commit"])
        row.setdefault("date", facts["date"])
    return rows


def smoke_cuda_emulation():
    """--smoke: the cuda contenders run through the CUDA C++ emulation build on CPU tensors.

    Built here, once, before the sections start (about a minute cold, seconds warm), so that
    no worker spends its budget on it; the workers inherit GUIDER_FAST_CUDA_SIM=1 and load it
    at their first cuda dispatch.  A failed build is printed, and the cuda contenders are then
    skipped with the dispatcher's reason (instead of every worker retrying the build).
    """
    from guider_fast import _cuda_build

    os.environ["GUIDER_FAST_CUDA_SIM"] = "1"
    try:
        print(f"smoke: CUDA C++ emulation build {_cuda_build.build_emulation()}", flush=True)
    except Exception as exc:
        print(f"smoke: the CUDA C++ emulation build failed, cuda contenders will be skipped: {describe(exc)}",
              flush=True)
        os.environ["GUIDER_FAST_CUDA_SIM"] = "0"
