"""Multi-process training step on CPU (gloo): step time and bytes moved per step, W = 1 and 2.

Run from the repository root (~1-2 min on 2 vCPUs):

    python benchmarks/bench_distributed.py --json dist.json --md dist.md
    python benchmarks/bench_distributed.py --n-users 200000 --n-items 2000 --steps 5   # graph-heavy
    python benchmarks/bench_distributed.py --device cuda --worlds 1 --no-single ...    # one GPU (NCCL)

Each configuration trains the same model, ``virtual_shards=2`` (so W = 1 and W = 2 compute the
same steps), on the default synthetic data's sizes (20k users x 7k items, dim 64, 2 LightGCN
layers, kNN 10, GUIDER's default preset, batch 2048) unless told otherwise:

* ``single``: the single-process ``Trainer`` (no torch.distributed), ``--threads`` threads;
* ``W=1``: one process of a gloo group (``ShardedTrainer``), ``--threads`` threads;
* ``W=2``: two processes, ``max(1, --threads / 2)`` threads each.

Processes are forked from a fork server and meet through a file rendezvous (no ports).  Each
configuration takes ``--warmup`` untimed steps, then ``--repeats`` timed blocks of
``--steps`` steps between two barriers; the step time is the median block's per step, and the
CPU time per step is this process's own (``time.process_time``: the work it did, whatever the
machine's other load).  Bytes are
the payload each process hands to the collectives per step (``distributed.CommStats``: item
partial sums forward and backward, item gradients, the calibration bounds); a ring all-reduce
sends about ``2 (W - 1) / W`` times the payload per process.  ``comm s/step`` is wall time
inside the host-side collectives (gloo), backward all-reduces excluded (they run inside
autograd; their bytes are counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guider_fast.train import TrainConfig, Trainer
from guider_fast.train import distributed as D


def _config(args) -> TrainConfig:
    return TrainConfig(n_users=args.n_users, n_items=args.n_items, dim=args.dim, n_layers=args.layers,
                       knn=args.knn, batch_size=args.batch_size, loss=args.loss, epochs=1, progress=False,
                       device=args.device)


def _time_steps(run_steps, barrier, args):
    """Median per-step seconds of ``args.repeats`` blocks of ``args.steps`` steps (after warm-up)."""
    blocks, cpu = [], []
    for _ in range(args.repeats):
        barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        run_steps(args.steps)
        cpu.append((time.process_time() - start_cpu) / args.steps)
        barrier()
        blocks.append((time.perf_counter() - start) / args.steps)
    return statistics.median(blocks), blocks, statistics.median(cpu)


def _single(args):
    torch.set_num_threads(args.threads)
    trainer = Trainer(_config(args), log=lambda _: None)
    order = torch.randperm(trainer.train_pairs.shape[0], generator=trainer.generator)
    counts = torch.zeros(4, dtype=torch.long)
    position = [0]

    def run_steps(n):
        for _ in range(n):
            step = position[0] % trainer.steps
            position[0] += 1
            trainer.step(order[step * trainer.config.batch_size:(step + 1) * trainer.config.batch_size], counts)

    run_steps(args.warmup)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    median, blocks, cpu = _time_steps(run_steps, sync, args)
    return {"config": "single", "world_size": 1, "threads_per_process": args.threads, "step_s": median,
            "blocks_s": blocks, "cpu_s_per_step": cpu, "payload_bytes_per_step": {}, "comm_s_per_step": 0.0}


def _worker(rank, world, folder, args):
    torch.set_num_threads(max(1, args.threads // world))
    backend = "gloo"
    if args.device == "cuda":  # one GPU per process, NCCL (not run yet: no GPU was lent when written)
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        config = dataclasses.replace(_config(args), virtual_shards=2)  # the same model at W = 1 and 2
        trainer = D.ShardedTrainer(config, log=lambda _: None)
        order = trainer.epoch_permutations()
        counts = torch.zeros(4, dtype=torch.long)
        position = [0]

        def run_steps(n):
            for _ in range(n):
                step = position[0] % trainer.steps
                position[0] += 1
                trainer.step(trainer.batch(step, order), counts)

        trainer.comm.stats.reset()
        run_steps(args.warmup)
        trainer.comm.stats.reset()
        def barrier():
            if args.device == "cuda":
                torch.cuda.synchronize()
            trainer.comm.barrier()

        median, blocks, cpu = _time_steps(run_steps, barrier, args)
        stats = trainer.comm.stats
        steps = args.steps * args.repeats
        payload = {k: v / steps for k, v in stats.bytes.items()}
        comm_s = sum(v for k, v in stats.seconds.items()) / steps
        out = {"config": f"W={world}", "world_size": world, "threads_per_process": max(1, args.threads // world),
               "step_s": median, "blocks_s": blocks, "cpu_s_per_step": cpu, "payload_bytes_per_step": payload,
               "comm_s_per_step": comm_s,
               "users_here": len(trainer.plan.users)}
        torch.save(out, os.path.join(folder, f"result.{rank}.pt"))
        dist.barrier()  # every process past its last collective before any disconnects
    finally:
        dist.destroy_process_group()


def _distributed(world, args):
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(world, folder, args), nprocs=world, join=True, start_method="forkserver")
        results = [torch.load(os.path.join(folder, f"result.{r}.pt"), weights_only=False) for r in range(world)]
    out = results[0]
    out["step_s_per_process"] = [r["step_s"] for r in results]
    return out


def _markdown(rows, args) -> str:
    lines = [f"{args.n_users:,} users x {args.n_items:,} items, dim {args.dim}, {args.layers} layers, kNN {args.knn}, "
             f"loss {args.loss}, batch {args.batch_size}, {args.device}; {args.threads} thread(s) in all per "
             f"configuration",
             "",
             "| config | threads/process | step (ms) | CPU time/step/process (ms) | payload/step/process (MB) "
             "| sent/step/process, ring (MB) | host-side comm (ms/step) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        payload = sum(row["payload_bytes_per_step"].values())
        world = row["world_size"]
        ring = payload * 2 * (world - 1) / world
        lines.append(f"| {row['config']} | {row['threads_per_process']} | {row['step_s'] * 1e3:.1f} "
                     f"| {row['cpu_s_per_step'] * 1e3:.1f} | {payload / 1e6:.2f} "
                     f"| {ring / 1e6:.2f} | {row['comm_s_per_step'] * 1e3:.1f} |")
    for row in rows:
        if row["payload_bytes_per_step"]:
            parts = ", ".join(f"{k} {v / 1e6:.3f} MB" if v >= 1e3 else f"{k} {v:.0f} B"
                              for k, v in sorted(row["payload_bytes_per_step"].items()))
            lines.append("")
            lines.append(f"{row['config']} payload per step and process: {parts}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-users", type=int, default=20_000)
    parser.add_argument("--n-items", type=int, default=7_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--knn", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--loss", default="guider", choices=("guider", "bpr"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: one GPU per process and NCCL (W=2 needs two GPUs; --worlds 1 on one)")
    parser.add_argument("--worlds", default="1,2", help="the numbers of processes to run, comma-separated")
    parser.add_argument("--no-single", action="store_true", help="leave out the single-process Trainer")
    # 1 by default: on the shared 2-vCPU machine, 2 intra-op threads made single steps up to 20x slower
    # (threads waiting on cores that neighbours hold), which measures the neighbours, not the code.
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per configuration, split over its processes (at least 1 each)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args(argv)
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "torch._dynamo",
                                                                      "guider_fast.train.distributed"])
    rows = [] if args.no_single else [_single(args)]
    rows += [_distributed(int(world), args) for world in args.worlds.split(",")]
    meta = {"torch": torch.__version__, "cpus": os.cpu_count(), "argv": sys.argv[1:], "loadavg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    text = _markdown(rows, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
