"""Training on several processes: users sharded, items replicated, on ``torch.distributed``.

Every step of ``GraphRecommender`` propagates the whole interaction graph, so its cost follows
the graph, not the batch: replicating the model (DDP) and splitting the batch divides nothing.
Here each process owns a share of the users instead.

* **Layout.**  User ``u`` falls into virtual shard ``u % V`` and shard ``v`` lives on process
  ``v % W`` (``V = config.virtual_shards``, default ``W`` processes).  A process holds its users'
  embedding rows, their optimizer state and their training rows; the item table is replicated.
  ``ShardedGraphRecommender`` propagates: the user side of a layer is local (``R_p I``), the item
  side is a partial sum ``R_p^T U_p`` summed over the processes by an autograd-aware all-reduce
  (``torch.distributed.nn.functional.all_reduce``: its backward all-reduces the gradient).
  After the backward, the item gradients are all-reduced; user gradients are complete where
  their rows live.  The FREEDOM item-item hop is replicated.
* **Batches.**  ``--batch-size`` is global.  Each virtual shard has its own random stream
  (shard 0 continues the single-process stream ``seed``): it permutes its training rows every
  epoch, and step ``s`` takes its rows ``[ceil(s B N_v / N), ceil((s+1) B N_v / N))`` (``N_v`` of
  the ``N`` training rows are the shard's) and draws their negatives (uniform over each user's
  non-positives, which live in the shard).  So a run depends on ``V``, not on ``W``: ``W = 1``
  and ``W = 2`` with the same ``V`` train the same model (to float rounding), and ``V = 1``
  batches exactly as one process does.
* **GUIDER's batch statistics are global.**  The calibration's min-max normalisation takes the
  min and max over the whole batch (``GuiderLoss(..., reduce_max=...)``: 8 bytes a step); each
  process's own min and max would flag other rows and train another model.  MGDA's dot
  products (``--distill kl`` with the default weight) are all-reduced likewise.
* **Evaluation** is sharded by user against the replicated items (the same blocked top-k);
  the metric sums and the user count travel in one float64 all-reduce, so every process takes
  the same model-selection and early-stopping decisions.
* **Checkpoints.**  ``--checkpoint PATH`` names a manifest.  Every process writes its shard
  (``PATH.<run>-e<epoch>.shard<r>of<W>``) atomically, then a barrier, then process 0 writes the
  replicated part (``PATH.<run>-e<epoch>.items``) and the manifest last, then a barrier, then the
  files of the previous manifest (and of any save killed before its manifest) are removed.  A crash therefore leaves either the previous
  manifest with its files or the new one with its files, never a manifest that points at
  partial shards.  Resuming with the same number of processes continues exactly; another
  number reshards by user id (the virtual shards and their random streams move whole), as long
  as there are at least as many virtual shards as processes.  The path must be on a filesystem
  that every process sees.
* **Launch.**  ``torchrun --nproc-per-node N -m guider_fast.cli train ...`` (multi-node with
  torchrun's rendezvous flags), or ``guider-fast train --nproc N`` on one machine.  Only
  process 0 logs, shows progress and writes ``--metrics-json`` / ``--plot``.

Not sharded: every process loads the whole dataset (the graph and the features), and
``--distill ot`` (a Sinkhorn problem over the whole batch's score rows) is refused.  The MF
student of ``--distill kl`` is sharded the same way (its user rows on their process).

Importing this module initialises nothing; ``ShardedTrainer`` needs an initialised process
group (``torch.distributed.init_process_group``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import re
import secrets
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _dispatch
from .. import _validate as V
from ..calibration import batch_bounds
from ..dbpr import dbpr_loss
from . import data as gdata
from .config import RESUME_KEYS, TrainConfig
from .distill import kl_distill_loss
from .evaluate import metrics_from_sums, ranking_metric_sums
from .models import ShardedGraphRecommender
from .progress import EpochProgress
from .trainer import (_CHECKPOINT_KEYS, SHARDED_FORMAT, Trainer, _atomic_save, _first_line, _snapshot, _State,
                      check_output_paths, data_fingerprint, mgda_weights_from_dots)

MANIFEST_VERSION = 1
_USER_KEY = "user_emb"  # the one sharded entry of a model's state dict
OT_REFUSED = ("--distill ot solves one Sinkhorn problem over the whole batch's score rows, which couples "
              "users of every process: use --distill kl with several processes")


def _silent(_message: str) -> None:
    pass


# -------------------------------------------------------------------------------- collectives

class CommStats:
    """Calls, payload bytes and (host-side) seconds of each kind of collective, for benchmarks.

    The payload is the tensor each process hands to the collective; a ring all-reduce sends
    and receives about ``2 (W - 1) / W`` times it per process.  Seconds are wall time around the
    call: on CPU (gloo) the collective itself, on GPU (NCCL) only the launch.
    """

    def __init__(self):
        self.calls: Dict[str, int] = {}
        self.bytes: Dict[str, int] = {}
        self.seconds: Dict[str, float] = {}

    def add(self, kind: str, tensor: torch.Tensor, seconds: float = 0.0) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()


class Comm:
    """This process's place in the group and the ``torch.distributed`` collectives the trainer
    uses, each counted in ``stats``.  Nothing here communicates by other means."""

    def __init__(self, group=None):
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: start the processes with torchrun or "
                               "guider-fast train --nproc N (or call torch.distributed.init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.stats = CommStats()

    def all_reduce_(self, tensor: torch.Tensor, kind: str, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (``op`` "sum" or "max"), not recorded by autograd."""
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        start = time.perf_counter()
        torch.distributed.all_reduce(tensor, op=ops[op], group=self.group)
        self.stats.add(kind, tensor, time.perf_counter() - start)
        return tensor

    def reduce_items(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over processes of ``partial`` (the item-side partial sums of LightGCN layers),
        differentiable: the backward all-reduces the gradient, which is the gradient of the sum
        of every process's loss."""
        from torch.distributed.nn.functional import all_reduce

        start = time.perf_counter()
        with warnings.catch_warnings():
            # torch points at _functional_collectives instead, whose all_reduce has no backward.
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")
            out = all_reduce(partial, group=self.group if self.group is not None
                             else torch.distributed.group.WORLD)
        self.stats.add("item_partials", partial, time.perf_counter() - start)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.stats.add("item_partials_backward", grad)

    def reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over processes (``GuiderLoss``'s ``reduce_max``)."""
        return self.all_reduce_(tensor.clone(), "calibration_bounds", op="max")

    def broadcast_(self, tensor: torch.Tensor, kind: str, src: int = 0) -> torch.Tensor:
        start = time.perf_counter()
        torch.distributed.broadcast(tensor, src, group=self.group)
        self.stats.add(kind, tensor, time.perf_counter() - start)
        return tensor

    def barrier(self) -> None:
        torch.distributed.barrier(group=self.group)

    def gather_objects(self, obj) -> List:
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out


# ---------------------------------------------------------------------------------- the plan

def shard_seed(seed: int, shard: int) -> int:
    """Virtual shard ``shard``'s random seed: shard 0 takes ``seed`` (so one shard is the
    single-process stream), the others a digest of (seed, shard)."""
    if shard == 0:
        return seed
    digest = hashlib.sha256(f"guider-fast shard {seed} {shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_shards(virtual_shards: int, world_size: int) -> None:
    if virtual_shards < world_size:
        raise ValueError(f"--virtual-shards {virtual_shards} is fewer than the {world_size} processes: every "
                         f"process needs at least one virtual shard (pass --virtual-shards >= {world_size})")


class ShardPlan:
    """Who owns what: user ``u`` is in virtual shard ``u % V``, shard ``v`` on process ``v % W``.

    Built identically on every process from the training rows (global user ids).
    ``shard_sizes[v]`` is shard v's number of training rows (every shard, for the batch
    boundaries), ``rows[v]`` the positions of an owned shard's rows in ``train``, ``users`` this
    process's users (sorted; local row j is user ``users[j]``).
    """

    def __init__(self, train: torch.Tensor, n_users: int, virtual_shards: int, world_size: int, rank: int):
        check_shards(virtual_shards, world_size)
        if virtual_shards > n_users:
            raise ValueError(f"--virtual-shards {virtual_shards} is more than the {n_users} users")
        self.n_users, self.virtual_shards, self.world_size, self.rank = n_users, virtual_shards, world_size, rank
        self.shards = list(range(rank, virtual_shards, world_size))
        shard_of_row = train[:, 0].to("cpu", torch.int64) % virtual_shards
        self.shard_sizes = torch.bincount(shard_of_row, minlength=virtual_shards).tolist()
        self.n_train = sum(self.shard_sizes)
        self.rows = {v: torch.nonzero(shard_of_row == v).squeeze(1) for v in self.shards}
        self.users = torch.sort(torch.cat([torch.arange(v, n_users, virtual_shards) for v in self.shards])).values

    def owns(self, users: torch.Tensor) -> torch.Tensor:
        return (users % self.virtual_shards) % self.world_size == self.rank

    def local(self, users: torch.Tensor) -> torch.Tensor:
        """Local row ids of (owned) global user ids."""
        return torch.searchsorted(self.users.to(users.device), users.contiguous())

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.n_train / batch_size)

    def start(self, shard: int, step: int, batch_size: int) -> int:
        """Shard ``shard``'s first row (in its epoch order) of step ``step``."""
        size = self.shard_sizes[shard]
        return min(-(-(step * batch_size * size) // self.n_train), size)

    def global_batch(self, step: int, batch_size: int) -> int:
        return sum(self.start(v, step + 1, batch_size) - self.start(v, step, batch_size)
                   for v in range(self.virtual_shards))

    def rows_done(self, step: int, batch_size: int) -> int:
        return sum(self.start(v, step, batch_size) for v in range(self.virtual_shards))


class Batch(NamedTuple):
    users: torch.Tensor  # local user ids
    pos: torch.Tensor
    neg: torch.Tensor
    rows: torch.Tensor  # positions in the training rows (for the planted-noise truth)
    size: int  # the global batch size (every process's rows together)


# ------------------------------------------------------------------------ checkpoint manifest

def read_manifest(path: str) -> Dict:
    """The manifest of a multi-process checkpoint at ``path``, or a one-line ``ValueError``."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, truncated, or foreign objects
        raise ValueError(f"{path} is not a guider-fast checkpoint (cannot read it: {_first_line(error)}); "
                         f"pass another --checkpoint path, or --overwrite to replace it") from None
    if isinstance(saved, dict) and _CHECKPOINT_KEYS <= set(saved):
        raise ValueError(f"checkpoint {path} was written by a single-process run: resume it in one process "
                         f"(without --nproc or torchrun), or start afresh (--overwrite)")
    if not isinstance(saved, dict) or saved.get("format") != SHARDED_FORMAT:
        raise ValueError(f"{path} is not a guider-fast checkpoint (it lacks the training state); pass "
                         f"another --checkpoint path, or --overwrite to replace it")
    if saved.get("version") != MANIFEST_VERSION:
        raise ValueError(f"checkpoint {path} has manifest version {saved.get('version')!r}; this guider_fast "
                         f"reads version {MANIFEST_VERSION}")
    return saved


def check_resume(manifest: Dict, config: TrainConfig, fingerprint: str, world_size: int, path: str) -> None:
    """Refuse, in one line, to resume ``manifest`` with other settings, data or too many processes."""
    saved = manifest["config"]
    mismatched = [k for k in RESUME_KEYS if saved.get(k) != getattr(config, k)]
    if manifest["virtual_shards"] != config.virtual_shards:
        mismatched.append("virtual_shards")
    if mismatched:
        values = {**saved, "virtual_shards": manifest["virtual_shards"]}
        settings = ", ".join(f"{k}={values.get(k)!r}" for k in mismatched)
        raise ValueError(f"checkpoint {path} was written with other settings ({settings}); resume with the "
                         f"same ones or start afresh")
    if manifest["data_fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint {path} was trained on other interactions than {config.data!r} holds now; "
                         f"resume on the same data or start afresh (--overwrite)")
    if manifest["virtual_shards"] < world_size:
        raise ValueError(f"checkpoint {path} has {manifest['virtual_shards']} virtual shards, so it resumes on at "
                         f"most {manifest['virtual_shards']} processes, not {world_size}")


def manifest_files(manifest: Dict, path: str) -> List[str]:
    """The shard and replicated files a manifest points at (beside the manifest)."""
    folder = os.path.dirname(os.path.abspath(path))
    return [os.path.join(folder, name) for name in list(manifest["shards"]) + [manifest["replicated"]]]


def _write_manifest(manifest: Dict, path: str) -> None:
    # A separate function so that tests can stop a run exactly between the shards and the manifest.
    _atomic_save(manifest, path)


def _split_optimizer(state: Dict, n_rows: int, prefix: str):
    """An Adam state dict split into the user parameter's (index 0) row tensors and scalars, and
    the rest (the item parameters and the param groups), which every process holds alike."""
    rows, scalars = {}, {}
    for key, value in state["state"].get(0, {}).items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == n_rows:
            rows[f"{prefix}.{key}"] = value
        else:
            scalars[f"{prefix}.{key}"] = value
    rest = {"state": {k: v for k, v in state["state"].items() if k != 0}, "param_groups": state["param_groups"]}
    return rows, scalars, rest


def _join_optimizer(rest: Dict, rows: Dict, scalars: Dict, prefix: str) -> Dict:
    user = {k.split(".", 1)[1]: v for part in (rows, scalars) for k, v in part.items()
            if k.startswith(prefix + ".")}
    state = dict(rest["state"])
    if user:
        state[0] = user
    return {"state": state, "param_groups": rest["param_groups"]}


# ------------------------------------------------------------------------------ the trainer

class ShardedTrainer(Trainer):
    """``Trainer`` on every process of a ``torch.distributed`` group, users sharded (see the
    module doc).  ``ShardedTrainer(config, data, log).run()`` in each process trains one model;
    the result (and ``log``, the progress display and the output files) is process 0's, and
    every process returns the same metrics."""

    def __init__(self, config: TrainConfig, data: Optional[gdata.InteractionData] = None,
                 log: Callable[[str], None] = print, comm: Optional[Comm] = None):
        self.comm = comm if comm is not None else Comm()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        # Everything up to the agreement is local to this process, so a mistake found by one
        # process cannot leave the others waiting in a collective: all of them stop with it.
        error = None
        try:
            self._setup(config, data, log if self.rank == 0 else _silent)
        except Exception as exc:  # noqa: BLE001 - re-raised on every process by _agree
            error = exc
        self._agree(error)
        if self.guider is not None:
            self._replicate_item_calibration()
        self.steps = self.plan.steps(self.config.batch_size)
        self._checked_a_step = False

    # -- setup ------------------------------------------------------------------------------------

    def _setup(self, config: TrainConfig, data, log) -> None:
        config.validate()
        if config.distill == "ot":
            raise ValueError(OT_REFUSED)
        config = config.resolved()
        manifest = None
        if config.resume and config.checkpoint and os.path.exists(config.checkpoint):
            manifest = read_manifest(config.checkpoint)
            if config.virtual_shards is None:
                config = dataclasses.replace(config, virtual_shards=manifest["virtual_shards"])
                if config.virtual_shards < self.world_size:
                    raise ValueError(f"checkpoint {config.checkpoint} has {config.virtual_shards} virtual shards, "
                                     f"so it resumes on at most {config.virtual_shards} processes, not "
                                     f"{self.world_size}")
        if config.virtual_shards is None:
            config = dataclasses.replace(config, virtual_shards=self.world_size)
        check_shards(config.virtual_shards, self.world_size)
        # Process 0 alone writes --metrics-json and --plot; every process writes its shard.
        check_output_paths(config if self.rank == 0 else dataclasses.replace(config, metrics_json=None, plot=None))
        self.config, self.log = config, log
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device='cuda' but torch sees no CUDA device")
            self.device = torch.device("cuda", torch.cuda.current_device())  # set per process at launch
        _dispatch.resolve("dbpr", config.backend, self.device)
        torch.manual_seed(config.seed)
        self._load_data(data)
        self.fingerprint = data_fingerprint(self.data)
        self.plan = ShardPlan(self.data.train, self.data.n_users, config.virtual_shards, self.world_size, self.rank)
        self._shard_data()
        self.model, self.optimizer = self._build_model()
        self.guider = self._build_loss()
        self.student, self.student_opt = self._build_student()
        self.sampler = gdata.NegativeSampler(self.local_train, len(self.plan.users), self.data.n_items,
                                             device=self.device)
        self.generators = {v: torch.Generator(device=self.device).manual_seed(shard_seed(config.seed, v))
                           for v in self.plan.shards}
        self.noisy = self.data.noisy.to(self.device) if self.data.noisy is not None else None
        self.state = _State()
        self.best_model = _snapshot(self.model)
        self.best_student: Optional[Dict[str, torch.Tensor]] = None
        self.saved_epoch = 0
        # The files of the manifest now at --checkpoint: removed once a newer manifest lands.
        self._live_files: List[str] = []
        if manifest is not None:
            check_resume(manifest, config, self.fingerprint, self.world_size, config.checkpoint)
            self._restore(manifest)
        elif config.resume:
            self.log(f"no checkpoint at {config.checkpoint}: starting afresh")
        elif config.checkpoint and os.path.exists(config.checkpoint):  # --overwrite
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self._live_files = manifest_files(read_manifest(config.checkpoint), config.checkpoint)
        self.progress = EpochProgress(config.progress and self.rank == 0)

    def _agree(self, error: Optional[BaseException]) -> None:
        """One all-gather: every process's setup error (if any), data fingerprint and settings, and
        process 0's run token and display mode.  Raises the same error on every process."""
        mine = None
        if error is None:
            mine = {"fingerprint": self.fingerprint, "config": dataclasses.asdict(self.config),
                    "token": secrets.token_hex(4), "live": self.progress.live}
        else:
            mine = {"error": (type(error).__name__, str(error))}
        gathered = self.comm.gather_objects(mine)
        failed = [(rank, g["error"]) for rank, g in enumerate(gathered) if "error" in g]
        if error is not None:
            raise error
        if failed:
            rank, (name, message) = failed[0]
            kind = {cls.__name__: cls for cls in (ValueError, TypeError, FileNotFoundError, PermissionError,
                                                  OSError)}.get(name, RuntimeError)
            raise kind(f"{message} (process {rank})")
        if any(g["fingerprint"] != self.fingerprint for g in gathered):
            raise ValueError("the processes loaded different interaction data: every process must read the same "
                             "--data")
        differ = sorted(k for g in gathered for k, v in g["config"].items() if v != getattr(self.config, k))
        if differ:
            raise ValueError(f"the processes were started with different settings ({', '.join(differ)}): "
                             f"start every process with the same command line")
        self.token = gathered[0]["token"]
        self._display = gathered[0]["live"]

    def _shard_data(self) -> None:
        """This process's training rows (local user ids), evaluation splits and per-shard rows."""
        data, plan, device = self.data, self.plan, self.device

        def local(pairs):
            pairs = pairs.to("cpu", torch.int64)
            mine = pairs[plan.owns(pairs[:, 0])].clone()
            mine[:, 0] = plan.local(mine[:, 0])
            return mine

        self.local_train = local(data.train).to(device)
        self.local_splits = {
            "valid": (local(data.valid).to(device), self.local_train),
            "test": (local(data.test).to(device), local(torch.cat([data.train, data.valid])).to(device)),
        }
        train = data.train.to("cpu", torch.int64)
        self.shard_rows = {}
        for v, rows in plan.rows.items():
            self.shard_rows[v] = (rows.to(device), plan.local(train[rows, 0]).to(device), train[rows, 1].to(device))

    def _item_degree(self) -> torch.Tensor:
        # Every process holds the whole graph, so the global degrees need no all-reduce.
        train = self.data.train.to("cpu", torch.int64)
        keys = torch.unique(train[:, 0] * self.data.n_items + train[:, 1])
        return torch.bincount(keys % self.data.n_items, minlength=self.data.n_items)

    def _build_model(self):
        config, data = self.config, self.data
        mine = self.data.train[self.plan.owns(self.data.train[:, 0].long())]
        model = ShardedGraphRecommender(data.n_users, data.n_items, self.plan.users, mine, self._item_degree(),
                                        self.comm.reduce_items, dim=config.dim, n_layers=config.n_layers,
                                        item_graph=self._build_item_graph(), seed=config.seed).to(self.device)
        return model, torch.optim.Adam(model.parameters(), lr=config.lr)

    def _build_student(self):
        config, data = self.config, self.data
        if config.distill == "none":
            return None, None
        mine = self.data.train[self.plan.owns(self.data.train[:, 0].long())]
        student = ShardedGraphRecommender(data.n_users, data.n_items, self.plan.users, mine, self._item_degree(),
                                          self.comm.reduce_items, dim=config.dim, n_layers=0,
                                          seed=config.seed + 1).to(self.device)
        return student, torch.optim.Adam(student.parameters(), lr=config.lr)

    def _replicate_item_calibration(self) -> None:
        """Process 0's item calibration cache on every process: the fit and the projections run
        on each device, and GPU reductions need not agree bit for bit across devices."""
        cache = self.guider.item_calibration
        for name in ("distance", "text_sign", "text_nonzero", "image_sign", "image_nonzero"):
            self.comm.broadcast_(getattr(cache, name), "setup")

    # -- training ---------------------------------------------------------------------------------

    def epoch_permutations(self) -> Dict[int, torch.Tensor]:
        """Each owned virtual shard's row order for an epoch, from its own stream."""
        return {v: torch.randperm(self.plan.shard_sizes[v], generator=self.generators[v], device=self.device)
                for v in self.plan.shards}

    def batch(self, step: int, order: Dict[int, torch.Tensor]) -> Batch:
        """This process's rows of step ``step`` (its shards' slices, in shard order) and their negatives."""
        size = self.config.batch_size
        users, pos, neg, rows = [], [], [], []
        for v in self.plan.shards:
            index = order[v][self.plan.start(v, step, size):self.plan.start(v, step + 1, size)]
            shard_rows, shard_users, shard_items = self.shard_rows[v]
            users.append(shard_users[index])
            pos.append(shard_items[index])
            neg.append(self.sampler.sample(users[-1], generator=self.generators[v]))
            rows.append(shard_rows[index])
        return Batch(torch.cat(users), torch.cat(pos), torch.cat(neg), torch.cat(rows),
                     self.plan.global_batch(step, size))

    def train_epoch(self) -> Tuple[float, float, torch.Tensor]:
        config, device = self.config, self.device
        epoch = self.state.epoch + 1
        self.model.train()
        start = time.perf_counter()
        order = self.epoch_permutations()
        total_loss = torch.zeros((), device=device)
        counts = torch.zeros(4, dtype=torch.long, device=device)
        display_every = max(1, self.steps // 50)
        self.progress.start(epoch, config.epochs, self.plan.n_train)
        for step in range(self.steps):
            batch = self.batch(step, order)
            with V.checks_off() if self._checked_a_step else contextlib.nullcontext():
                total_loss = total_loss + self.step(batch, counts)
            self._checked_a_step = True
            # Process 0's display decides, so every process takes part in the same all-reduces.
            if self._display and (step + 1) % display_every == 0:
                running = self.comm.all_reduce_(total_loss.detach().clone().view(1), "progress")
                self.progress.update(self.plan.rows_done(step + 1, config.batch_size), float(running) / (step + 1))
        # The epoch's loss and flag counts over every process: one all-reduce.
        totals = self.comm.all_reduce_(torch.cat([total_loss.double().view(1), counts.double()]), "epoch_totals")
        mean_loss = float(totals[0]) / self.steps
        seconds = time.perf_counter() - start
        self.progress.end(epoch, config.epochs, self.steps, mean_loss, seconds)
        return mean_loss, seconds, totals[1:].round().long()

    def step(self, batch: Batch, counts: torch.Tensor) -> torch.Tensor:
        """One optimisation step on this process's part of a global batch; returns this
        process's share of the batch loss (the loss is the sum of the shares)."""
        users, pos, neg = batch.users, batch.pos, batch.neg
        model, empty = self.model, batch.users.numel() == 0
        user_out, item_out = model()
        loss = torch.zeros((), device=self.device)
        if self.guider is not None:
            if empty:  # every process takes part in the batch's min/max
                batch_bounds(torch.zeros(0, device=self.device), self.comm.reduce_max)
            else:
                loss = self.guider(user_out, item_out, users, pos, neg, reduction="sum",
                                   reduce_max=self.comm.reduce_max) / batch.size
                flagged = ~self.guider.last_calibration.clean
                if self.noisy is not None:
                    truth = self.noisy[batch.rows]
                    counts += torch.stack([(flagged & truth).sum(), (flagged & ~truth).sum(),
                                           (~flagged & truth).sum(), flagged.sum()])
                else:
                    counts[3] += flagged.sum()
        elif not empty:
            loss = dbpr_loss(user_out, item_out, users, pos, neg, reduction="sum",
                             backend=self.config.backend) / batch.size
        reg = (model.user_emb[users].pow(2).sum() + model.item_emb[pos].pow(2).sum()
               + model.item_emb[neg].pow(2).sum()) / (2 * batch.size)
        total = loss + self.config.reg_weight * reg
        if empty:
            # The backward must reach every all-reduce of the forward, as on the other processes.
            total = total + 0.0 * (user_out.sum() + item_out.sum())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self._reduce_item_grads(model)
        self.optimizer.step()
        if self.student is not None:
            self.student_step(batch)
        return loss.detach()

    def _reduce_item_grads(self, model: ShardedGraphRecommender) -> None:
        grad = model.item_emb.grad
        if grad is None:
            grad = model.item_emb.grad = torch.zeros_like(model.item_emb)
        self.comm.all_reduce_(grad, "item_grads")

    def student_step(self, batch: Batch) -> None:
        config, student = self.config, self.student
        users, pos, neg, size = batch.users, batch.pos, batch.neg, batch.size
        with torch.no_grad():
            teacher_user, teacher_item = self.model()
        s_user, s_item = student()
        if users.numel():
            s_loss = dbpr_loss(s_user, s_item, users, pos, neg, reduction="sum", backend=config.backend) / size
            distill = kl_distill_loss(s_user, s_item, teacher_user, teacher_item, users, reduction="sum") / size
        else:  # nothing here this step: zero shares, with gradients of the parameters' shapes
            s_loss = distill = 0.0 * (s_user.sum() + s_item.sum())
        self.student_opt.zero_grad(set_to_none=True)
        if config.distill_weight is None:
            params = [student.user_emb, student.item_emb]
            g_task = torch.autograd.grad(s_loss, params, retain_graph=True)
            g_distill = torch.autograd.grad(distill, params)
            # Item gradients are per-process shares: sum both in one all-reduce.  User rows are
            # whole where they live, so only their dot products are summed.
            items = self.comm.all_reduce_(torch.stack([g_task[1], g_distill[1]]), "student_item_grads")
            user_dots = torch.stack([(g_task[0].double() * g_distill[0].double()).sum(),
                                     g_distill[0].double().pow(2).sum()])
            self.comm.all_reduce_(user_dots, "mgda_dots")
            dot = user_dots[0] + (items[0].double() * items[1].double()).sum()
            norm2 = user_dots[1] + items[1].double().pow(2).sum()
            w_task, w_distill = mgda_weights_from_dots(dot, norm2)
            student.user_emb.grad = w_task * g_task[0] + w_distill * g_distill[0]
            student.item_emb.grad = w_task * items[0] + w_distill * items[1]
        else:
            (s_loss + config.distill_weight * distill).backward()
            self._reduce_item_grads(student)
        self.student_opt.step()

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, model: torch.nn.Module, split: str) -> Dict[str, float]:
        pairs, exclude = self.local_splits[split]
        model.eval()
        with torch.no_grad():
            user_out, item_out = model()
            names, sums = ranking_metric_sums(user_out, item_out, pairs, exclude, self.config.ks)
        # One float64 all-reduce; every process gets the same means, hence the same decisions.
        return metrics_from_sums(names, self.comm.all_reduce_(sums, "metric_sums"))

    def baselines(self) -> Dict[str, Dict[str, float]]:
        data, ks, device = self.data, self.config.ks, self.device
        pairs, exclude = self.local_splits["test"]
        counts = torch.bincount(data.train[:, 1].long(), minlength=data.n_items).to(device, torch.float64)
        tables = {"popularity": (torch.ones(len(self.plan.users), 1, dtype=torch.float64, device=device),
                                 counts.unsqueeze(1))}
        if data.user_factors is not None and data.item_factors is not None:
            tables["generator_ceiling"] = (data.user_factors[self.plan.users].to(device),
                                           data.item_factors.to(device))
        out = {}
        for name, (users, items) in tables.items():
            names, sums = ranking_metric_sums(users, items, pairs, exclude, ks)
            out[name] = metrics_from_sums(names, self.comm.all_reduce_(sums, "metric_sums"))
        return out

    @property
    def writes_outputs(self) -> bool:
        return self.rank == 0

    def _peak_memory_mb(self) -> float:
        peak = torch.tensor([super()._peak_memory_mb()], dtype=torch.float64, device=self.device)
        return float(self.comm.all_reduce_(peak, "result", op="max"))  # the largest process's

    def _run_info(self) -> Dict:
        return {"distributed": {"world_size": self.world_size, "virtual_shards": self.config.virtual_shards,
                                "backend": self.comm.backend}}

    # -- checkpoints ------------------------------------------------------------------------------

    def _user_part(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """(row tensors, scalars) of this process's users: tables, optimizer state."""
        n = len(self.plan.users)
        rows = {"model": self.model.user_emb.detach(), "best_model": self.best_model[_USER_KEY]}
        opt_rows, scalars, _ = _split_optimizer(self.optimizer.state_dict(), n, "optimizer")
        rows.update(opt_rows)
        if self.student is not None:
            rows["student"] = self.student.user_emb.detach()
            if self.best_student is not None:
                rows["best_student"] = self.best_student[_USER_KEY]
            s_rows, s_scalars, _ = _split_optimizer(self.student_opt.state_dict(), n, "student_optimizer")
            rows.update(s_rows)
            scalars.update(s_scalars)
        return rows, scalars

    def _replicated_part(self) -> Dict:
        def items(table):
            return {k: v for k, v in table.items() if k != _USER_KEY} if table is not None else None

        n = len(self.plan.users)
        out = {"model": items(self.model.state_dict()), "best_model": items(self.best_model),
               "optimizer": _split_optimizer(self.optimizer.state_dict(), n, "optimizer")[2],
               "state": dataclasses.asdict(self.state)}
        if self.student is not None:
            out.update(student=items(self.student.state_dict()), best_student=items(self.best_student),
                       student_optimizer=_split_optimizer(self.student_opt.state_dict(), n, "student_optimizer")[2])
        return out

    def save_checkpoint(self) -> None:
        config, comm, epoch = self.config, self.comm, self.state.epoch
        path = config.checkpoint
        folder, stem = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        tag = f"{stem}.{self.token}-e{epoch}"
        shard_names = [f"{tag}.shard{r}of{self.world_size}" for r in range(self.world_size)]
        replicated_name = f"{tag}.items"
        rows, scalars = self._user_part()
        _atomic_save({"token": self.token, "epoch": epoch, "rank": self.rank, "world_size": self.world_size,
                      "users": self.plan.users, "rows": rows, "scalars": scalars,
                      "generators": {v: g.get_state() for v, g in self.generators.items()}},
                     os.path.join(folder, shard_names[self.rank]))
        comm.barrier()  # every shard is on disk before a manifest may point at it
        manifest = {"format": SHARDED_FORMAT, "version": MANIFEST_VERSION, "config": dataclasses.asdict(config),
                    "world_size": self.world_size, "virtual_shards": config.virtual_shards, "epoch": epoch,
                    "token": self.token, "data_fingerprint": self.fingerprint, "shards": shard_names,
                    "replicated": replicated_name}
        if self.rank == 0:
            _atomic_save({"token": self.token, "epoch": epoch, **self._replicated_part()},
                         os.path.join(folder, replicated_name))
            _write_manifest(manifest, path)  # last
        comm.barrier()  # the new manifest is in place before the previous files go
        new_files = manifest_files(manifest, path)
        if self.rank == 0:
            # The previous manifest's files, and those of a save that was killed before its
            # manifest (no manifest points at them).
            ours = re.compile(re.escape(stem) + r"\.[0-9a-f]{8}-e\d+\.(shard\d+of\d+|items)$")
            orphans = {os.path.join(folder, name) for name in os.listdir(folder) if ours.match(name)}
            for stale in (set(self._live_files) | orphans) - set(new_files):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
        self._live_files = new_files
        self.saved_epoch = epoch

    def _restore(self, manifest: Dict) -> None:
        """Load this process's users (by user id, from whichever shard files hold them), the
        replicated part and the owned shards' random streams."""
        config, plan = self.config, self.plan
        path = config.checkpoint
        files = manifest_files(manifest, path)
        for file in files:
            if not os.path.exists(file):
                raise ValueError(f"checkpoint {path} lists {file}, which is missing (every process must see the "
                                 f"checkpoint's folder); start afresh with --overwrite")
        token, epoch, old_world = manifest["token"], manifest["epoch"], manifest["world_size"]

        def load(file, what):
            try:
                saved = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as error:
                raise ValueError(f"checkpoint {path}: cannot read its {what} {file} ({_first_line(error)})") from None
            if not isinstance(saved, dict) or saved.get("token") != token or saved.get("epoch") != epoch:
                raise ValueError(f"checkpoint {path}: {file} belongs to another save than the manifest "
                                 f"(epoch {epoch}); start afresh with --overwrite")
            return saved

        try:
            replicated = load(files[-1], "replicated part")
            n = len(plan.users)
            rows: Dict[str, torch.Tensor] = {}
            scalars: Dict = {}
            generators: Dict[int, torch.Tensor] = {}
            covered = torch.zeros(n, dtype=torch.bool)
            for old_rank in sorted({v % old_world for v in plan.shards}):
                shard = load(files[old_rank], "shard")
                held = shard["users"]
                at = torch.searchsorted(held, plan.users).clamp_(max=max(held.numel() - 1, 0))
                hit = held[at] == plan.users if held.numel() else torch.zeros(n, dtype=torch.bool)
                for name, table in shard["rows"].items():
                    out = rows.setdefault(name, torch.empty((n,) + tuple(table.shape[1:]), dtype=table.dtype))
                    out[hit] = table[at[hit]]
                scalars.update(shard["scalars"])
                for v in plan.shards:
                    if v % old_world == old_rank:
                        generators[v] = shard["generators"][v]
                covered |= hit
            if not bool(covered.all()):
                raise ValueError(f"checkpoint {path}: its shards lack some of this process's users")

            def model_state(part, table):
                return {_USER_KEY: rows[table], **replicated[part]}

            self.model.load_state_dict(model_state("model", "model"))
            self.optimizer.load_state_dict(_join_optimizer(replicated["optimizer"], rows, scalars, "optimizer"))
            self.best_model = model_state("best_model", "best_model")
            if self.student is not None:
                self.student.load_state_dict(model_state("student", "student"))
                self.student_opt.load_state_dict(_join_optimizer(replicated["student_optimizer"], rows, scalars,
                                                                 "student_optimizer"))
                if replicated.get("best_student") is not None:
                    self.best_student = model_state("best_student", "best_student")
            for v, state in generators.items():
                self.generators[v].set_state(state)
            self.state = _State(**replicated["state"])
        except (RuntimeError, KeyError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(f"checkpoint {path} does not fit this run ({_first_line(error)}); start afresh "
                             f"with --overwrite or another --checkpoint path") from None
        self._live_files = files
        self.saved_epoch = self.state.epoch
        moved = "" if old_world == self.world_size else f", resharded from {old_world} processes"
        self.log(f"resumed from {path} after epoch {self.state.epoch}{moved} "
                 f"(best recall@20 {self.state.best_metric:.4f} at epoch {self.state.best_epoch})")


# ----------------------------------------------------------------------------------- launch

def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group to join (torchrun sets these)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: str) -> None:
    """Join the process group that torchrun describes in the environment: NCCL on GPUs (this
    process on GPU ``LOCAL_RANK``), gloo on CPU."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no CUDA device")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend, init_method="env://")


def check_launch(config: TrainConfig, nproc: int) -> None:
    """The one-line refusals of ``guider-fast train --nproc N``, before any process starts."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    if launched_by_torchrun():
        raise ValueError("--nproc starts torchrun itself: under torchrun, leave it out (torchrun's "
                         "--nproc-per-node sets the processes)")
    config.validate()
    if config.distill == "ot":
        raise ValueError(OT_REFUSED)
    if config.virtual_shards is not None:
        check_shards(config.virtual_shards, nproc)
    if config.device.startswith("cuda"):
        available = torch.cuda.device_count()
        if available < nproc:
            raise ValueError(f"--nproc {nproc} with --device cuda needs {nproc} GPUs; torch sees {available}")
    check_output_paths(config.resolved())


def launch(nproc: int, train_argv: Sequence[str]) -> int:
    """Run ``guider-fast train <train_argv>`` on ``nproc`` processes of this machine with torchrun's
    launcher (``torch.distributed.run --standalone``); returns the run's exit code.

    Workers print their own errors (process 0 for a user's mistake), so the launcher's own
    failure report is silenced and replaced by one line for failures that are not a user's
    mistake (exit 2) or an interruption (130).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set 1 thread per process, with a warning; share this machine's cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "guider_fast.cli",
                                         *train_argv])
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = failure.exitcode
        if code not in (2, 130):
            print(f"guider-fast train: process {rank} failed (exit code {code}); its error is above",
                  file=sys.stderr)
        return code if code > 0 else 1
    except (KeyboardInterrupt, SignalException):  # Ctrl-C: the workers print where they stopped
        return 130
    finally:
        quiet.setLevel(level)
    return 0
