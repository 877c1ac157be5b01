"""CPU Sinkhorn and SamplesLoss: guider_fast's CPU extension against every peer, in one process,
round-robin, with the measured exp / memory floor of each shape.

    python benchmarks/sinkhorn_cpu.py [--rounds N] [--quick] [--results benchmarks/results/results.jsonl --run NAME]
    python benchmarks/sinkhorn_cpu.py --auto-rule [--results ... --run NAME]   # tiny sizes: cpu vs torch path

Run it at normal priority on one pinned core (``taskset -c 1``; the script sets one thread
for torch, OpenMP and XLA itself).  Contenders, each doing the same work end to end (cost
from the points, ``N_ITERS`` iterations at one eps, value; fwd+bwd: the gradient of
``value.sum()`` w.r.t. the points):

* ``guider_fast`` (backend="cpu", the baseline), ``guider_fast (torch path)`` (backend="torch");
* POT (``ot.batch.solve_sample_batch``), GeomLoss (its tensorized loop), naive torch (alternating
  ``logsumexp``), ``torch.compile`` of the naive iteration (inductor's CPU codegen), all from
  ``baselines.py``;
* OTT-JAX: ``jax.jit(jax.vmap(...))`` of ``ott.solvers.linear.sinkhorn.Sinkhorn`` (Danskin
  gradients), in this process (the ``bench`` extra installs jax and ott-jax);
* SamplesLoss (GeomLoss's debiased, annealed divergence): guider_fast cpu / torch path against
  ``geomloss.SamplesLoss(backend="tensorized")``.

Every round calls each contender once, in turn, so all of them see the same machine and
allocator state (a shared 2-vCPU machine: read the ratios, not the milliseconds).  Before
timing, every peer's value and gradients are checked against guider_fast's (as
``sinkhorn_contenders.check_same_work`` does).

Floor of a shape: the larger of (a) its exponentials, 2 B n m per iteration (one per cost
entry and half-iteration) at the measured throughput of the vectorised exp the extension
uses (ATen's ``Vectorized<float>::exp_u20`` on an L1-resident buffer), and (b) one read of
the cost per iteration at the measured single-core read bandwidth, counted when one
problem's cost does not fit in the core's L2.  fwd+bwd adds the backward's B n m exps and
its two (B, n, m) x (B, m, d) products at the measured sgemm rate.  ``floor_fraction`` =
floor / guider_fast's median.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# One thread everywhere, before torch, numpy or jax start their pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import guider_fast as gf  # noqa: E402
import report  # noqa: E402
from baselines import (N_ITERS, assert_close, compiled_naive_sinkhorn, geomloss_samples_loss,  # noqa: E402
                       geomloss_sinkhorn, naive_torch_sinkhorn, ott_sinkhorn, peer_missing, pot_sinkhorn)
from guider_fast import _cpu_build, bench  # noqa: E402
from sinkhorn_contenders import (SAMPLES_LOSS_BLUR, Workload, check_same_work, make_problem,  # noqa: E402
                                 pin_single_thread)

pin_single_thread()

WORKLOADS = (Workload(512, 32, 32), Workload(128, 128, 128), Workload(1, 2048, 2048))
MODES = ("forward", "forward+backward")
BASELINE = "guider_fast"


def _torch_contender(solve):
    """(x, y, eps, with_grad) -> (value, (grad_x, grad_y) or None) for a torch-autograd peer."""
    def run(x, y, eps, with_grad):
        xs = x.detach().clone().requires_grad_(with_grad)
        ys = y.detach().clone().requires_grad_(with_grad)
        value = solve(xs, ys, eps, with_grad)
        if not with_grad:
            return value.detach(), None
        value.sum().backward()
        return value.detach(), (xs.grad, ys.grad)
    return run


def _guider_fast(backend):
    def solve(x, y, eps, with_grad):
        return gf.sinkhorn(x, y, eps=eps, n_iters=N_ITERS, grad="envelope" if with_grad else "detach",
                           backend=backend).value
    return _torch_contender(solve)


def _pot_halved(x, y, eps, with_grad):
    # POT's cost and reg are 2x ours: its objective (and gradients) are 2x ours.
    return pot_sinkhorn(x, y, eps, with_grad) / 2


FIXED_EPS = {
    BASELINE: (_guider_fast("cpu"), None),
    "guider_fast (torch path)": (_guider_fast("torch"), None),
    "OTT-JAX (jit+vmap)": (ott_sinkhorn, "ott"),
    "POT": (_torch_contender(_pot_halved), "ot"),
    "GeomLoss": (_torch_contender(geomloss_sinkhorn), "geomloss"),
    "naive torch": (_torch_contender(naive_torch_sinkhorn), None),
    "torch.compile (inductor)": (_torch_contender(compiled_naive_sinkhorn), None),
}


def _samples_loss(make):
    def run(x, y, eps, with_grad):
        loss = make()
        xs = x.detach().clone().requires_grad_(with_grad)
        ys = y.detach().clone().requires_grad_(with_grad)
        value = loss(xs, ys)
        if not with_grad:
            return value.detach(), None
        value.sum().backward()
        return value.detach(), (xs.grad, ys.grad)
    return run


SAMPLES_LOSS = {
    BASELINE: (_samples_loss(lambda: gf.SamplesLoss("sinkhorn", p=2, blur=SAMPLES_LOSS_BLUR, backend="cpu")), None),
    "guider_fast (torch path)": (_samples_loss(
        lambda: gf.SamplesLoss("sinkhorn", p=2, blur=SAMPLES_LOSS_BLUR, backend="torch")), None),
    "GeomLoss": (_samples_loss(lambda: geomloss_samples_loss(p=2, blur=SAMPLES_LOSS_BLUR)), "geomloss"),
}

FAMILIES = {"fixed_eps": FIXED_EPS, "samples_loss": SAMPLES_LOSS}
TITLES = {"fixed_eps": f"sinkhorn fixed eps, {N_ITERS} iters", "samples_loss": f"SamplesLoss p=2 blur={SAMPLES_LOSS_BLUR}"}


# ----------------------------------------------------------------------------- floors

_FLOOR_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
using Vec = at::vec::Vectorized<float>;
// sum of exp_u20 over an L1-resident buffer, reps times (four independent chains)
double exp_sum(at::Tensor x, int64_t reps) {
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel(), w = Vec::size();
  Vec s0(0), s1(0), s2(0), s3(0);
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t i = 0; i + 4 * w <= n; i += 4 * w) {
      s0 += Vec::loadu(p + i).exp_u20(); s1 += Vec::loadu(p + i + w).exp_u20();
      s2 += Vec::loadu(p + i + 2 * w).exp_u20(); s3 += Vec::loadu(p + i + 3 * w).exp_u20();
    }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s0 + s1 + s2 + s3);
}
// one streaming read of a large buffer
double read_sum(at::Tensor x) {
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel(), w = Vec::size();
  Vec s0(0), s1(0), s2(0), s3(0);
  for (int64_t i = 0; i + 4 * w <= n; i += 4 * w) {
    s0 += Vec::loadu(p + i); s1 += Vec::loadu(p + i + w);
    s2 += Vec::loadu(p + i + 2 * w); s3 += Vec::loadu(p + i + 3 * w);
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s0 + s1 + s2 + s3);
}
"""


def _best(fn, rounds=7):
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def l2_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        return int(text.rstrip("K")) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 1 << 20


def measure_floors() -> dict:
    """Machine rates on this core: exp_u20 (G/s), torch.exp (G/s), read (GB/s), sgemm (GFLOP/s)."""
    from torch.utils import cpp_extension

    isa = _cpu_build.build_isa()
    directory = _cpu_build.default_build_root() / f"bench-floor-{isa}"
    directory.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load_inline("guider_fast_bench_floor", cpp_sources=[_FLOOR_SOURCE],
                                       functions=["exp_sum", "read_sum"],
                                       extra_cflags=_cpu_build.compile_flags(isa), build_directory=str(directory))
    resident = -torch.rand(4096) * 20
    reps = 2000
    exp_rate = reps * resident.numel() / _best(lambda: module.exp_sum(resident, reps))
    out = torch.empty_like(resident)
    torch_exp_rate = 200 * resident.numel() / _best(lambda: [torch.exp(resident, out=out) for _ in range(200)])
    big = torch.randn(1 << 25)  # 128 MiB: far beyond every cache level
    read_rate = big.numel() * 4 / _best(lambda: module.read_sum(big), 5)
    u, v = torch.randn(16, 512, 64), torch.randn(16, 64, 512)
    sgemm = 2 * 16 * 512 * 512 * 64 / _best(lambda: torch.bmm(u, v))
    return {"exp_u20_Gps": exp_rate / 1e9, "torch_exp_Gps": torch_exp_rate / 1e9, "read_GBps": read_rate / 1e9,
            "sgemm_GFLOPs": sgemm / 1e9, "l2_bytes": l2_bytes()}


def floor_seconds(workload: Workload, mode: str, rates: dict) -> dict:
    b, n, m, d = workload.batch, workload.n, workload.m, workload.dim
    entries = b * n * m
    exp_s = 2 * entries * N_ITERS / (rates["exp_u20_Gps"] * 1e9)
    memory_s = (entries * 4 * N_ITERS / (rates["read_GBps"] * 1e9)) if n * m * 4 > rates["l2_bytes"] else 0.0
    floor = max(exp_s, memory_s)
    if mode == "forward+backward":
        floor += entries / (rates["exp_u20_Gps"] * 1e9) + 2 * 2 * entries * d / (rates["sgemm_GFLOPs"] * 1e9)
    return {"floor_s": floor, "exp_floor_s": exp_s, "memory_floor_s": memory_s}


# ----------------------------------------------------------------------------- checks


def check_peers(family, problem, contenders):
    """Values and gradients of every peer against guider_fast's (POT, GeomLoss, naive: as the
    pytest suite checks them; OTT-JAX and torch.compile the same way here)."""
    check_same_work(family, problem)
    x, y, eps = problem.x, problem.y, problem.eps
    base_value, base_grads = contenders[BASELINE](x, y, eps, True)
    for name in ("OTT-JAX (jit+vmap)", "torch.compile (inductor)", "guider_fast (torch path)"):
        if name not in contenders:
            continue
        value, grads = contenders[name](x, y, eps, True)
        assert_close(f"{name} value", value, base_value, 1e-4)
        for got, want, which in zip(grads, base_grads, "xy"):
            assert_close(f"{name} grad {which}", got, want, 1e-2)


# ----------------------------------------------------------------------------- timing


def interleave(runners, rounds):
    for run in runners.values():
        run()  # warm-up: JIT compiles, first-call allocations
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


AUTO_RULE_SIZES = ((1, 1, 3), (1, 4, 3), (4, 8, 4), (1, 16, 8), (64, 16, 16), (8, 64, 16))


def auto_rule_rows(facts, device, rounds=7):
    """The evidence for auto's rule on CPU (the cpu backend at every float32 size): cpu against
    the torch path on tiny problems, where fixed costs dominate, 1 and 100 iterations, fwd+bwd."""
    gf.set_checks(False)  # the production setting; the checks cost both backends the same
    rows = []
    try:
        for batch, n, d in AUTO_RULE_SIZES:
            x = torch.randn(batch, n, d, generator=torch.Generator().manual_seed(0)).requires_grad_()
            y = torch.randn(batch, n + 1, d, generator=torch.Generator().manual_seed(1))
            cases = {f"sinkhorn fwd+bwd, {it} iters": (lambda be, it=it: gf.sinkhorn(
                x, y, eps=0.5, n_iters=it, backend=be).value.sum().backward()) for it in (1, 100)}
            cases["SamplesLoss fwd+bwd"] = lambda be: gf.SamplesLoss(backend=be)(x, y).sum().backward()
            for title, call in cases.items():
                runners = {name: (lambda be=be: [call(be) for _ in range(10)])
                           for name, be in ((BASELINE, "cpu"), ("guider_fast (torch path)", "torch"))}
                times = interleave(runners, rounds)
                group = f"auto rule: {title} | B={batch}, n={n}, m={n + 1}, d={d} (10 calls)"
                for name, values in times.items():
                    median, least = bench.median_min(values)
                    rows.append(dict(op="auto rule (interleaved)", contender=name, shape=f"({batch}, {n}, {n + 1}, {d})",
                                     dtype="float32", device=device, median=median, min=least,
                                     commit=facts["commit"], date=facts["date"], group=group, rounds=len(values),
                                     baseline=name == BASELINE, extra={"times_s": values}))
    finally:
        gf.set_checks(None)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per group (B=1, n=2048: rounds - 2)")
    parser.add_argument("--quick", action="store_true", help="the two smaller shapes, 3 rounds")
    parser.add_argument("--results", metavar="PATH", help="append the rows to this results JSON-lines file")
    parser.add_argument("--run", default="sinkhorn_cpu", help="the run's name in --results")
    parser.add_argument("--auto-rule", action="store_true",
                        help="only the tiny problems behind backend='auto''s CPU rule (cpu vs the torch path)")
    args = parser.parse_args(argv)
    _cpu_build.load(build=True)  # the installed build, else (asked for here) a JIT build

    available = {}
    for family, table in FAMILIES.items():
        available[family] = {}
        for name, (fn, module) in table.items():
            why = peer_missing(module) if module else None
            if why:
                print(f"skipping {name}: {why}", file=sys.stderr)
            else:
                available[family][name] = fn
    facts = dict(report.git_facts(), date=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))
    device = report.cpu_name()
    if args.auto_rule:
        rows = auto_rule_rows(facts, device)
        print(report.render(rows, title="backend='auto' on CPU: the cpu backend against the torch path", summary=False))
        if args.results:
            for row in rows:
                row["run"] = args.run
            bench.write_rows(rows, args.results)
        return
    rates = measure_floors()
    print("machine rates (one core):", {k: round(v, 2) for k, v in rates.items()}, file=sys.stderr)

    rows = []
    workloads = WORKLOADS[:2] if args.quick else WORKLOADS
    for workload in workloads:
        for family, contenders in available.items():
            problem = make_problem(family, workload)
            check_peers(family, problem, contenders)
            for mode in MODES:
                with_grad = mode == "forward+backward"
                runners = {name: (lambda fn=fn: fn(problem.x, problem.y, problem.eps, with_grad))
                           for name, fn in contenders.items()}
                rounds = 3 if args.quick else (max(3, args.rounds - 2) if workload.n >= 1024 else args.rounds)
                times = interleave(runners, rounds)
                group = f"{TITLES[family]} | {workload.label} | {mode} (interleaved)"
                floor = floor_seconds(workload, mode, rates) if family == "fixed_eps" else None
                for name, values in times.items():
                    median, least = bench.median_min(values)
                    extra = {"times_s": values, "guider_fast_version": gf.__version__, "family": family,
                             "mode": mode, "workload": workload.name, "machine_rates": rates}
                    if floor is not None and name == BASELINE:
                        extra.update(floor, floor_fraction=floor["floor_s"] / median)
                    rows.append(dict(op=f"{TITLES[family]} (interleaved)", contender=name, shape=workload.label,
                                     dtype="float32", device=device, median=median, min=least,
                                     commit=facts["commit"], date=facts["date"], group=group,
                                     rounds=len(values), baseline=name == BASELINE, extra=extra))
                print(f"done: {group}", file=sys.stderr)
    print(report.render(rows, title="CPU Sinkhorn, every peer interleaved", summary=False))
    if args.results:
        for row in rows:
            row["run"] = args.run
        bench.write_rows(rows, args.results)


if __name__ == "__main__":
    main()
