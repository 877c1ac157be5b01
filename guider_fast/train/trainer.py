"""The GUIDER training loop behind ``guider-fast train``: data, graph model, loss, evaluation, resume.

``train(TrainConfig(...))`` trains a ``GraphRecommender`` on one dataset with
either GUIDER's loss (``GuiderLoss``: calibration + DBPR, frozen-item mode) or
plain BPR.  GUIDER's calibration settings come from a preset (``config.PRESETS``;
explicit ``threshold`` / ``align`` / ``noisy_weight`` override it): ``"reference"``
is GUIDER as published (random projections, flagged rows weighted 1, threshold
0.7); ``"denoise"``, the default, is the recipe that denoises planted noise
(``benchmarks/results/train_cpu.md``): ``align=True`` fits the image projection
onto the text projection, so that the calibration's distance measures modality
disagreement (``GuiderLoss.align_projections``), ``noisy_weight=0`` drops the
flagged interactions, ``threshold=0.3``.  Every result carries the baselines of
its test split: the training-popularity ranking and, on synthetic data, the
generator's own ranking (the ceiling).  It can also distil the trained teacher into a matrix-factorisation
student (``distill="kl"``: full-catalogue KL, streamed).  The model is selected
on validation Recall@20, with early stopping after ``patience`` evaluations
without improvement.  The loop checkpoints after every epoch; ``resume=True``
continues an interrupted run from its checkpoint, best model included.

Under ``torch.distributed`` (torchrun, or ``guider-fast train --nproc N``), ``train`` runs a
``distributed.ShardedTrainer`` in every process instead: users sharded, items replicated.

``Trainer`` is that run in named steps: building it loads the data, builds the
model, the loss and the student, and restores a checkpoint; ``run()`` trains
epoch by epoch (``train_epoch``, ``end_epoch``, ``save_checkpoint``) and returns
``finish()``'s result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import _dispatch
from .. import _validate as V
from ..dbpr import dbpr_loss
from ..losses import GuiderLoss
from . import data as gdata
from .config import RESUME_KEYS, SELECT_METRIC, TrainConfig
from .distill import kl_distill_loss, ot_distill_loss
from .evaluate import popularity_metrics, ranking_metrics
from .threshold import NO_FLAGS, split_threshold
from .models import KNN_MAX_ITEMS, GraphRecommender, item_graph_from_features
from .progress import EpochProgress


def load_data(config: TrainConfig, log: Callable[[str], None]) -> gdata.InteractionData:
    if config.data == "synthetic":
        data = gdata.synthetic(n_users=config.n_users, n_items=config.n_items, noise=config.noise,
                               seed=config.seed_of_data)
    else:
        data = gdata.load_mmrec(config.data)
        if config.loss == "guider" and data.text_feat is None and data.image_feat is None:
            # Say plainly that these are not content features: a user must not read the run as
            # a multi-modal result on real text and images.
            log("no modality features in the dataset (no text_feat.npy / image_feat.npy): generating "
                "synthetic text/image features from the interaction graph, NOT item content "
                "(guider_fast.train.data.with_synthetic_features); real text features: "
                "guider-fast text-features ITEMS.tsv DATASET_DIR")
            data = gdata.with_synthetic_features(data, seed=config.seed_of_data)
    if config.loss == "guider" and (data.text_feat is None or data.image_feat is None):
        present = "text" if data.text_feat is not None else "image"
        raise ValueError(f"loss='guider' calibrates text against image features, but the dataset has "
                         f"only {present} features: use loss='bpr'")
    return data


def mgda_weights(g_task, g_distill):
    """The reference's two-task min-norm (MGDA) weights (task, distillation), as 0-d tensors.

    With g1, g2 the student-loss and distillation gradients over all student
    parameters: ``c = 0.999`` if ``g1.g2 >= 0``; ``c = 0.001`` if
    ``-g1.g2 >= |g2|^2``; else ``c = 1 + g1.g2 / |g2|^2``.  The weights are
    ``max(c, 0.5)`` and ``max(1 - c, 1e-4)``.  Computed on the device, with no
    host sync.
    """
    dot = sum((a.double() * b.double()).sum() for a, b in zip(g_task, g_distill))
    norm2 = sum(b.double().pow(2).sum() for b in g_distill)
    return mgda_weights_from_dots(dot, norm2)


def mgda_weights_from_dots(dot: torch.Tensor, norm2: torch.Tensor):
    """``mgda_weights`` from ``g1.g2`` and ``|g2|^2`` (float64 0-d tensors): a process holding part
    of the parameters sums its parts of both over the processes first."""
    c = torch.where(dot >= 0, torch.full_like(dot, 0.999),
                    torch.where(-dot >= norm2, torch.full_like(dot, 0.001),
                                1 + dot / norm2.clamp_min(torch.finfo(torch.float64).tiny)))
    return c.clamp_min(0.5).float(), (1 - c).clamp_min(1e-4).float()


@dataclass
class _State:
    """What a checkpoint restores besides the weights, optimisers and generator."""
    epoch: int = 0
    best_metric: float = -1.0
    best_epoch: int = 0
    bad_evals: int = 0
    history: List[Dict] = field(default_factory=list)
    noise_counts: Dict[str, int] = field(default_factory=dict)
    epoch_seconds: List[float] = field(default_factory=list)


def _snapshot(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _evaluate(model, pairs, exclude, ks):
    model.eval()
    with torch.no_grad():
        user_out, item_out = model()
        return ranking_metrics(user_out, item_out, pairs, exclude, ks=ks)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# What every checkpoint holds (``Trainer.save_checkpoint``).
_CHECKPOINT_KEYS = {"config", "model", "optimizer", "best_model", "generator", "state"}
# The "format" of a multi-process run's manifest (``guider_fast.train.distributed``).
SHARDED_FORMAT = "guider-fast sharded checkpoint"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_output_paths(config: TrainConfig) -> None:
    """Fail before training (not after the first epoch) on an output path that cannot be
    written, and refuse to replace an existing checkpoint unless asked to."""
    outputs = [("--checkpoint", config.checkpoint), ("--metrics-json", config.metrics_json),
               ("--plot", config.plot)]
    for flag, path in outputs:
        if not path:
            continue
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a folder: give a file path")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {path}: folder {folder} does not exist (create it or choose "
                                    f"another path)")
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{flag} {path}: folder {folder} is not writable")
    checkpoint = config.checkpoint
    if checkpoint and os.path.exists(checkpoint) and not (config.resume or config.overwrite):
        raise ValueError(f"checkpoint {checkpoint} already exists: pass --resume to continue it, --overwrite "
                         f"to replace it, or choose a new --checkpoint path")


def data_fingerprint(data: gdata.InteractionData) -> str:
    """A digest of the interaction graph (sizes and every split's rows): a checkpoint only resumes
    on the data it was trained on."""
    digest = hashlib.sha256(f"{data.n_users},{data.n_items}".encode())
    for split in (data.train, data.valid, data.test):
        digest.update(str(tuple(split.shape)).encode())
        digest.update(split.to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def flag_stats(counts: Dict[str, int], known: bool) -> Dict[str, float]:
    """The calibration's flags over ``counts["seen"]`` rows: the flagged share and, when the
    planted truth is ``known``, precision, recall and F1 against it."""
    out = {"flagged_share": counts["flagged"] / max(counts["seen"], 1)}
    if known:
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        out.update(precision=precision, recall=recall,
                   f1=2 * precision * recall / max(precision + recall, 1e-12))
    return out


class Trainer:
    """One training run: ``Trainer(config, data, log).run()`` is ``train(config, data, log)``."""

    def __init__(self, config: TrainConfig, data: Optional[gdata.InteractionData] = None,
                 log: Callable[[str], None] = print):
        config.validate()
        if config.virtual_shards is not None:
            raise ValueError(f"virtual_shards={config.virtual_shards} sets the shards of a multi-process run: "
                             f"run with guider-fast train --nproc N (or torchrun), or leave it out")
        config = config.resolved()  # the preset's calibration settings where none are given
        check_output_paths(config)
        self.config, self.log = config, log
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no CUDA device")
        # An unusable backend fails here, with its reason, not at the first step.
        _dispatch.resolve("dbpr", config.backend, self.device)
        torch.manual_seed(config.seed)
        self._load_data(data)
        self.model, self.optimizer = self._build_model()
        self.guider = self._build_loss()
        self.student, self.student_opt = self._build_student()
        self.sampler = gdata.NegativeSampler(self.train_pairs, self.data.n_users, self.data.n_items,
                                             device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.noisy = self.data.noisy.to(self.device) if self.data.noisy is not None else None
        self.state = _State()
        self.best_model = _snapshot(self.model)
        self.best_student: Optional[Dict[str, torch.Tensor]] = None
        self.fingerprint = data_fingerprint(self.data)
        self.saved_epoch = 0  # the epoch the checkpoint file holds (0: none written or resumed)
        if config.resume:
            self._resume()
        self.progress = EpochProgress(config.progress)
        self.steps = math.ceil(self.train_pairs.shape[0] / config.batch_size)
        self._checked_a_step = False

    # -- setup ------------------------------------------------------------------------------------

    def _load_data(self, data: Optional[gdata.InteractionData]) -> None:
        self.data = load_data(self.config, self.log) if data is None else data
        self.log(self.data.summary())
        device = self.device
        self.train_pairs = self.data.train.to(device)
        # Evaluation pairs and the pairs each split's ranking excludes (the earlier splits).
        self.splits: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {
            "valid": (self.data.valid.to(device), self.train_pairs),
            "test": (self.data.test.to(device), torch.cat([self.data.train, self.data.valid]).to(device)),
        }

    def _build_model(self) -> Tuple[GraphRecommender, torch.optim.Optimizer]:
        config, data = self.config, self.data
        model = GraphRecommender(data.n_users, data.n_items, data.train, dim=config.dim,
                                 n_layers=config.n_layers, item_graph=self._build_item_graph(),
                                 seed=config.seed).to(self.device)
        return model, torch.optim.Adam(model.parameters(), lr=config.lr)

    def _build_item_graph(self) -> Optional[torch.Tensor]:
        """FREEDOM's frozen item-item kNN graph, or None (off, or the catalogue is too large)."""
        config, data = self.config, self.data
        if config.knn and data.n_items <= KNN_MAX_ITEMS:
            return item_graph_from_features((data.text_feat, data.image_feat), config.knn)
        if config.knn:
            self.log(f"item-item kNN graph skipped: {data.n_items:,} items > {KNN_MAX_ITEMS:,} (exact kNN is "
                     f"quadratic in the catalogue); pass knn=0 to silence this")
        return None

    def _build_loss(self) -> Optional[GuiderLoss]:
        """GUIDER's loss with every item calibrated once, or None for plain BPR."""
        config, data = self.config, self.data
        if config.loss != "guider":
            return None
        fixed = not config.adaptive_threshold
        guider = GuiderLoss(data.text_feat.shape[1], data.image_feat.shape[1], embed_dim=config.dim,
                            threshold=config.threshold if fixed else NO_FLAGS, backend=config.backend,
                            noisy_weight=config.noisy_weight).to(self.device)
        # The calibration weights carry no gradient: the projections and hash layers stay
        # at their initialisation (as in the reference), so every item is calibrated once.
        guider.requires_grad_(False)
        rule = f"threshold {config.threshold:g}" if fixed else "adaptive threshold"
        self.log(f"GUIDER preset {config.preset!r}: align {config.align}, noisy_weight {config.noisy_weight:g}, "
                 f"{rule}")
        text, image = data.text_feat.to(self.device), data.image_feat.to(self.device)
        if config.align:
            fit = guider.align_projections(text, image)
            self.log(f"aligned image_proj onto text_proj: residual {fit['mse_before']:.4g} -> "
                     f"{fit['mse_after']:.4g}")
        guider.precompute_items(text, image)
        if not fixed:
            # Every item is calibrated once, so the training rows' distances are known now;
            # every process of a sharded run sees all of them and gets the same threshold.
            rows = guider.item_calibration.distance[data.train[:, 1].to(guider.item_calibration.distance.device,
                                                                        torch.long)]
            self.threshold_split = split_threshold(rows, config.batch_size, config.seed)
            guider.threshold = self.threshold_split.threshold
            self.log(self.threshold_split.describe())
        return guider

    def _build_student(self) -> Tuple[Optional[GraphRecommender], Optional[torch.optim.Optimizer]]:
        """The matrix-factorisation student of the distillation, or (None, None)."""
        config, data = self.config, self.data
        if config.distill == "none":
            return None, None
        student = GraphRecommender(data.n_users, data.n_items, data.train, dim=config.dim, n_layers=0,
                                   seed=config.seed + 1).to(self.device)
        return student, torch.optim.Adam(student.parameters(), lr=config.lr)

    def _resume(self) -> None:
        config = self.config
        if not os.path.exists(config.checkpoint):
            self.log(f"no checkpoint at {config.checkpoint}: starting afresh")
            return
        path = config.checkpoint
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # not a torch file, truncated, or foreign objects
            raise ValueError(f"{path} is not a guider-fast checkpoint (cannot read it: {_first_line(error)}); "
                             f"pass another --checkpoint path, or --overwrite to replace it") from None
        if isinstance(saved, dict) and saved.get("format") == SHARDED_FORMAT:
            world = saved.get("world_size")
            raise ValueError(f"checkpoint {path} was written by a multi-process run ({world} processes): resume "
                             f"it with guider-fast train --nproc N (or torchrun), or start afresh (--overwrite)")
        if not isinstance(saved, dict) or not _CHECKPOINT_KEYS <= set(saved) \
                or not isinstance(saved["config"], dict):
            raise ValueError(f"{path} is not a guider-fast checkpoint (it lacks the training state); pass "
                             f"another --checkpoint path, or --overwrite to replace it")
        mismatched = [k for k in RESUME_KEYS if saved["config"].get(k) != getattr(config, k)]
        if mismatched:
            settings = ", ".join(f"{k}={saved['config'].get(k)!r}" for k in mismatched)
            raise ValueError(f"checkpoint {path} was written with other settings "
                             f"({settings}); resume with the same ones or start afresh")
        if saved.get("data_fingerprint", self.fingerprint) != self.fingerprint:
            raise ValueError(f"checkpoint {path} was trained on other interactions than {config.data!r} "
                             f"holds now; resume on the same data or start afresh (--overwrite)")
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.best_model = saved["best_model"]
            if self.student is not None:
                self.student.load_state_dict(saved["student"])
                self.student_opt.load_state_dict(saved["student_optimizer"])
                self.best_student = saved.get("best_student")
            self.generator.set_state(saved["generator"])
            self.state = _State(**saved["state"])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"checkpoint {path} does not fit this run ({_first_line(error)}); start afresh "
                             f"with --overwrite or another --checkpoint path") from None
        self.saved_epoch = self.state.epoch
        self.log(f"resumed from {config.checkpoint} after epoch {self.state.epoch} "
                 f"(best {SELECT_METRIC} {self.state.best_metric:.4f} at epoch {self.state.best_epoch})")

    # -- training ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Epochs left and patience not exhausted."""
        return self.state.epoch < self.config.epochs and self.state.bad_evals < self.config.patience

    def run(self) -> Dict:
        if self.running:
            self.log("loss: the epoch's mean training loss; recall@20, ndcg@20: on the validation split; "
                     "best: the epoch of the best validation recall@20 (the model kept); s/epoch: training "
                     "seconds")
            self.log(f"{'epoch':>5} {'loss':>8} " + " ".join(f"{m:>9}" for m in ("recall@20", "ndcg@20"))
                     + f" {'best':>5} {'s/epoch':>8}")
        while self.running:
            self.end_epoch(*self.train_epoch())
            if self.config.checkpoint:
                self.save_checkpoint()
        return self.finish()

    def train_epoch(self) -> Tuple[float, float, torch.Tensor]:
        """One pass over the training rows in a fresh random order: (mean loss, seconds, and the
        calibration flag counts tp, fp, fn, flagged against the planted truth)."""
        config, device = self.config, self.device
        epoch = self.state.epoch + 1
        self.model.train()
        start = time.perf_counter()
        order = torch.randperm(self.train_pairs.shape[0], generator=self.generator, device=device)
        # Device-side sums, read once per display update and epoch (no sync per step).
        total_loss = torch.zeros((), device=device)
        counts = torch.zeros(4, dtype=torch.long, device=device)
        display_every = max(1, self.steps // 50)
        self.progress.start(epoch, config.epochs, order.shape[0])
        for step in range(self.steps):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            # The run's first step checks values (indices, weights); the rest skip the checks'
            # device sync: every later batch is built the same way.
            with V.checks_off() if self._checked_a_step else contextlib.nullcontext():
                total_loss = total_loss + self.step(index, counts)
            self._checked_a_step = True
            if self.progress.live and (step + 1) % display_every == 0:
                done = step * config.batch_size + index.shape[0]
                self.progress.update(done, float(total_loss) / (step + 1))
        mean_loss = float(total_loss) / self.steps
        seconds = time.perf_counter() - start
        self.progress.end(epoch, config.epochs, self.steps, mean_loss, seconds)
        return mean_loss, seconds, counts

    def step(self, index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One optimisation step of the model (and of the student) on the training rows ``index``;
        adds the batch's flag counts to ``counts`` and returns the (detached) loss."""
        users, pos = self.train_pairs[index, 0], self.train_pairs[index, 1]
        neg = self.sampler.sample(users, generator=self.generator)
        model = self.model
        user_out, item_out = model()
        if self.guider is not None:
            loss = self.guider(user_out, item_out, users, pos, neg)
            flagged = ~self.guider.last_calibration.clean
            if self.noisy is not None:
                truth = self.noisy[index]
                counts += torch.stack([(flagged & truth).sum(), (flagged & ~truth).sum(),
                                       (~flagged & truth).sum(), flagged.sum()])
            else:
                counts[3] += flagged.sum()
        else:
            loss = dbpr_loss(user_out, item_out, users, pos, neg, backend=self.config.backend)
        reg = (model.user_emb[users].pow(2).sum() + model.item_emb[pos].pow(2).sum()
               + model.item_emb[neg].pow(2).sum()) / (2 * users.shape[0])
        self.optimizer.zero_grad(set_to_none=True)
        (loss + self.config.reg_weight * reg).backward()
        self.optimizer.step()
        if self.student is not None:
            self.student_step(users, pos, neg)
        return loss.detach()

    def student_step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> None:
        """The student's BPR loss plus its distillation from the model (the teacher, a constant)."""
        config, student = self.config, self.student
        with torch.no_grad():
            teacher_user, teacher_item = self.model()
        s_user, s_item = student()
        s_loss = dbpr_loss(s_user, s_item, users, pos, neg, backend=config.backend)
        if config.distill == "kl":
            distill = kl_distill_loss(s_user, s_item, teacher_user, teacher_item, users)
        else:
            # Sinkhorn between the batch users' student and teacher score rows over the
            # batch's positive items (B points in R^B per side).
            distill = ot_distill_loss(s_user, s_item, teacher_user, teacher_item, users, pos)
        self.student_opt.zero_grad(set_to_none=True)
        if config.distill_weight is None:
            params = [p for p in student.parameters() if p.requires_grad]
            g_task = torch.autograd.grad(s_loss, params, retain_graph=True)
            g_distill = torch.autograd.grad(distill, params)
            w_task, w_distill = mgda_weights(g_task, g_distill)
            for param, a, b in zip(params, g_task, g_distill):
                param.grad = w_task * a + w_distill * b
        else:
            (s_loss + config.distill_weight * distill).backward()
        self.student_opt.step()

    def evaluate(self, model: torch.nn.Module, split: str) -> Dict[str, float]:
        pairs, exclude = self.splits[split]
        return _evaluate(model, pairs, exclude, self.config.ks)

    def end_epoch(self, mean_loss: float, seconds: float, counts: torch.Tensor) -> None:
        """Record the epoch; when an evaluation is due, keep the model if validation improved."""
        state, config = self.state, self.config
        epoch = state.epoch = state.epoch + 1
        state.epoch_seconds.append(seconds)
        record = {"epoch": epoch, "loss": mean_loss, "seconds": seconds}
        if self.guider is not None:
            tp, fp, fn, flagged = counts.tolist()
            epoch_counts = {"tp": tp, "fp": fp, "fn": fn, "flagged": flagged, "seen": self.train_pairs.shape[0]}
            record["flags"] = flag_stats(epoch_counts, known=self.noisy is not None)
            if self.noisy is not None:
                # The last epoch's calibration flags against the planted truth.
                state.noise_counts = epoch_counts
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            metrics = record["valid"] = self.evaluate(self.model, "valid")
            if metrics[SELECT_METRIC] > state.best_metric:
                state.best_metric, state.best_epoch, state.bad_evals = metrics[SELECT_METRIC], epoch, 0
                self.best_model = _snapshot(self.model)
                if self.student is not None:
                    self.best_student = _snapshot(self.student)
            else:
                state.bad_evals += 1
            self.log(f"{epoch:>5} {mean_loss:>8.4f} {metrics['recall@20']:>9.4f} {metrics['ndcg@20']:>9.4f} "
                     f"{state.best_epoch:>5} {seconds:>8.1f}")
        state.history.append(record)

    def save_checkpoint(self) -> None:
        student, student_opt = self.student, self.student_opt
        _atomic_save({
            "config": dataclasses.asdict(self.config), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "best_model": self.best_model,
            "student": student.state_dict() if student is not None else None,
            "student_optimizer": student_opt.state_dict() if student_opt is not None else None,
            "best_student": self.best_student, "generator": self.generator.get_state(),
            "state": dataclasses.asdict(self.state), "data_fingerprint": self.fingerprint,
        }, self.config.checkpoint)
        self.saved_epoch = self.state.epoch

    # -- result -----------------------------------------------------------------------------------

    def finish(self) -> Dict:
        """Restore the best model and report it: validation (as selected), test, noise detection,
        the student's test metrics; also written to ``config.metrics_json`` when set."""
        config, state = self.config, self.state
        if state.bad_evals >= config.patience:
            self.log(f"early stop: no {SELECT_METRIC} improvement in {config.patience} evaluations")
        self.model.load_state_dict(self.best_model)
        best_valid = next((r["valid"] for r in state.history
                           if r["epoch"] == state.best_epoch and "valid" in r), None)
        result = {
            "config": dataclasses.asdict(config),
            "data": self.data.summary(),
            "epochs_run": state.epoch,
            "best_epoch": state.best_epoch,
            # The best epoch's validation metrics (the selection criterion), not re-evaluated.
            "valid": best_valid if best_valid is not None else self.evaluate(self.model, "valid"),
            "test": self.evaluate(self.model, "test"),
            "seconds_per_epoch": (sum(state.epoch_seconds) / len(state.epoch_seconds)
                                  if state.epoch_seconds else None),
            "peak_memory_mb": self._peak_memory_mb(),
            "history": state.history,
            **self._run_info(),
        }
        result["baselines"] = self.baselines()
        if self.guider is not None:
            split = getattr(self, "threshold_split", None)
            result["calibration"] = {"threshold": self.guider.threshold, "adaptive": split is not None,
                                     **(dataclasses.asdict(split) if split is not None else {})}
        if state.noise_counts:
            result["noise_detection"] = {**flag_stats(state.noise_counts, known=True),
                                         "planted_share": float(self.data.noisy.float().mean())}
        if self.student is not None:
            if self.best_student is not None:
                self.student.load_state_dict(self.best_student)
            result["student_test"] = self.evaluate(self.student, "test")
        if config.metrics_json and self.writes_outputs:
            with open(config.metrics_json, "w") as handle:
                json.dump(result, handle, indent=2)
        if config.plot and self.writes_outputs:
            from .plot import plot_history

            self.log(plot_history(result, config.plot))
        return result

    # The hooks a multi-process run (``distributed.ShardedTrainer``) replaces.
    writes_outputs = True  # this process writes --metrics-json and --plot

    def _peak_memory_mb(self) -> float:
        return _peak_memory_mb(self.device)

    def _run_info(self) -> Dict:
        """Entries of the result beyond the metrics (none for one process)."""
        return {}

    def baselines(self) -> Dict[str, Dict[str, float]]:
        """The test split's metrics of the training-popularity ranking and, when the data knows
        its generator's true scores (synthetic data), of that ranking: the ceiling."""
        data, ks = self.data, self.config.ks
        pairs, exclude = self.splits["test"]
        out = {"popularity": popularity_metrics(self.train_pairs, data.n_users, data.n_items, pairs, exclude,
                                                ks)}
        if data.user_factors is not None and data.item_factors is not None:
            out["generator_ceiling"] = ranking_metrics(data.user_factors.to(self.device),
                                                       data.item_factors.to(self.device), pairs, exclude, ks)
        return out


def make_trainer(config: TrainConfig, data: Optional[gdata.InteractionData] = None,
                 log: Callable[[str], None] = print) -> Trainer:
    """The run's trainer: a ``Trainer`` in one process, a ``distributed.ShardedTrainer`` (users
    sharded over the processes) where ``torch.distributed`` is initialised (e.g. under torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from .distributed import ShardedTrainer

        return ShardedTrainer(config, data, log)
    return Trainer(config, data, log)


def train(config: TrainConfig, data: Optional[gdata.InteractionData] = None,
          log: Callable[[str], None] = print) -> Dict:
    """Train, select on validation Recall@20, and return the metrics (also written to
    ``config.metrics_json`` when set).  In every process of a ``torch.distributed`` group, the
    processes train one model together (``guider_fast.train.distributed``)."""
    return make_trainer(config, data, log).run()


_BASELINE_NAMES = {"popularity": "popularity (train counts)",
                   "generator_ceiling": "generator's true scores"}


def format_result(result: Dict) -> str:
    """Human-readable summary of ``train``'s result."""
    lines = [f"best epoch {result['best_epoch']} of {result['epochs_run']}"]
    for split in ("valid", "test"):
        metrics = result[split]
        lines.append(f"{split:>5}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    baselines = result.get("baselines") or {}
    if baselines:
        model = result["test"]
        lines.append(f"test split, model vs baselines: {'recall@20':>9} {'ndcg@20':>9}")
        rows = [("model", model)] + [(_BASELINE_NAMES.get(k, k), v) for k, v in baselines.items()]
        for name, metrics in rows:
            ratio = ""
            if name != "model" and metrics["recall@20"] > 0:
                ratio = f"  (model at {model['recall@20'] / metrics['recall@20']:.2f}x)"
            lines.append(f"  {name:<28} {metrics['recall@20']:>9.4f} {metrics['ndcg@20']:>9.4f}{ratio}")
    if "student_test" in result:
        lines.append("student test: " + "  ".join(f"{k} {v:.4f}" for k, v in result["student_test"].items()))
    if "noise_detection" in result:
        nd = result["noise_detection"]
        lines.append(f"noisy flags vs planted truth (last epoch): precision {nd['precision']:.3f}, "
                     f"recall {nd['recall']:.3f}, flagged {nd['flagged_share']:.1%} "
                     f"(planted {nd['planted_share']:.1%})")
    if result.get("seconds_per_epoch") is not None:
        lines.append(f"{result['seconds_per_epoch']:.2f} s per epoch, peak memory {result['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)
