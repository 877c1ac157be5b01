"""GUIDER training loop behind ``guider-fast train``: data, graph model, loss, evaluation, resume.

``train(TrainConfig(...))`` trains a ``GraphRecommender`` on one dataset with
either GUIDER's loss (``GuiderLoss``: calibration + DBPR, frozen-item mode) or
plain BPR.  The defaults are GUIDER as published.  Options beyond the reference:
``align=True`` fits the image projection onto the text projection, so that the
calibration's distance measures modality disagreement (the reference leaves
both projections random; ``GuiderLoss.align_projections``); ``noisy_weight=0``
drops the flagged interactions instead of weighting them 1.  On planted noise,
``align=True, noisy_weight=0, threshold=0.3`` is the recipe that denoises
(``benchmarks/results_train_cpu.md``).  It can also distil the trained teacher into a matrix-factorisation
student (``distill="kl"``: full-catalogue KL, streamed).  The model is selected
on validation Recall@20, with early stopping after ``patience`` evaluations
without improvement.  The loop checkpoints after every epoch; ``resume=True``
continues an interrupted run from its checkpoint, best model included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _dispatch
from . import _validate as V
from . import data as gdata
from .dbpr import dbpr_loss
from .distill import kl_distill_loss, ot_distill_loss
from .evaluate import ranking_metrics
from .losses import GuiderLoss
from .models import KNN_MAX_ITEMS, GraphRecommender, item_graph_from_features

LOSSES = ("guider", "bpr")
DISTILL = ("none", "kl", "ot")
SELECT_METRIC = "recall@20"


@dataclass
class TrainConfig:
    data: str = "synthetic"          # "synthetic" or a path to an MMRec dataset
    epochs: int = 30
    batch_size: int = 2048
    dim: int = 64
    n_layers: int = 2
    knn: int = 10                    # item-item kNN graph (0: off)
    lr: float = 1e-3
    reg_weight: float = 1e-4         # L2 on the batch's ID embeddings
    loss: str = "guider"
    threshold: float = 0.7
    align: bool = False              # fit image_proj onto text_proj (beyond the reference)
    noisy_weight: float = 1.0        # DBPR weight of flagged rows (the reference: 1; 0 drops them)
    backend: str = "auto"
    distill: str = "none"
    distill_weight: Optional[float] = None   # None: the reference's MGDA two-task weighting
    eval_every: int = 1
    patience: int = 5
    ks: Tuple[int, ...] = (10, 20, 50)
    seed: int = 0
    device: str = "cpu"
    checkpoint: Optional[str] = None
    resume: bool = False
    metrics_json: Optional[str] = None
    # synthetic data
    n_users: int = 20_000
    n_items: int = 7_000
    noise: float = 0.2
    progress: bool = True

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.distill not in DISTILL:
            raise ValueError(f"distill must be one of {DISTILL}, got {self.distill!r}")
        for name in ("epochs", "batch_size", "dim", "eval_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path (--checkpoint PATH)")
        weight = self.distill_weight
        if weight is not None and not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"distill_weight must be None (MGDA) or a number >= 0, got {weight!r}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise must be in [0, 1), got {self.noise!r}")
        if SELECT_METRIC.split("@")[1] not in {str(k) for k in self.ks}:
            raise ValueError(f"ks must include 20 (model selection uses {SELECT_METRIC}), got {self.ks}")


def load_data(config: TrainConfig, log: Callable[[str], None]) -> gdata.InteractionData:
    if config.data == "synthetic":
        data = gdata.synthetic(n_users=config.n_users, n_items=config.n_items, noise=config.noise,
                               seed=config.seed)
    else:
        data = gdata.load_mmrec(config.data)
        if config.loss == "guider" and data.text_feat is None and data.image_feat is None:
            log("no modality features in the dataset: generating synthetic text/image features "
                "from the interaction graph (guider_fast.data.with_synthetic_features)")
            data = gdata.with_synthetic_features(data, seed=config.seed)
    if config.loss == "guider" and (data.text_feat is None or data.image_feat is None):
        present = "text" if data.text_feat is not None else "image"
        raise ValueError(f"loss='guider' calibrates text against image features, but the dataset has "
                         f"only {present} features: use loss='bpr'")
    return data


class _Progress:
    """A one-line progress display on stderr (a line per epoch when not a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, epoch, epochs, step, steps, loss, rate):
        if self.tty:
            width = 24
            done = int(width * step / max(steps, 1))
            sys.stderr.write(f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (width - done)}] "
                             f"{step}/{steps} loss {loss:.4f} {rate / 1e3:.1f}k triplets/s")
            sys.stderr.flush()

    def end_epoch(self, epoch, epochs, steps, loss, seconds):
        if self.enabled:
            line = f"epoch {epoch}/{epochs}: {steps} steps, loss {loss:.4f}, {seconds:.1f} s"
            sys.stderr.write(("\r" + line + " " * 20 + "\n") if self.tty else line + "\n")
            sys.stderr.flush()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


_RESUME_KEYS = ("data", "dim", "n_layers", "knn", "loss", "seed", "batch_size", "n_users", "n_items",
                "noise", "distill", "threshold", "align", "noisy_weight")


@dataclass
class _State:
    epoch: int = 0
    best_metric: float = -1.0
    best_epoch: int = 0
    bad_evals: int = 0
    history: List[Dict] = field(default_factory=list)
    noise_counts: Dict[str, int] = field(default_factory=dict)
    epoch_seconds: List[float] = field(default_factory=list)


def train(config: TrainConfig, data: Optional[gdata.InteractionData] = None,
          log: Callable[[str], None] = print) -> Dict:
    """Train, select on validation Recall@20, and return the metrics (also written to
    ``config.metrics_json`` when set)."""
    config.validate()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device")
    # An unusable backend fails here, with its reason, not at the first step.
    _dispatch.resolve("dbpr", config.backend, device)
    torch.manual_seed(config.seed)
    if data is None:
        data = load_data(config, log)
    log(data.summary())

    train_pairs = data.train.to(device)
    valid_pairs, test_pairs = data.valid.to(device), data.test.to(device)
    exclude_valid = train_pairs
    exclude_test = torch.cat([data.train, data.valid]).to(device)
    item_graph = None
    if config.knn and data.n_items <= KNN_MAX_ITEMS:
        item_graph = item_graph_from_features((data.text_feat, data.image_feat), config.knn)
    elif config.knn:
        log(f"item-item kNN graph skipped: {data.n_items:,} items > {KNN_MAX_ITEMS:,} (exact kNN is "
            f"quadratic in the catalogue); pass knn=0 to silence this")
    model = GraphRecommender(data.n_users, data.n_items, data.train, dim=config.dim,
                             n_layers=config.n_layers, item_graph=item_graph, seed=config.seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    guider = None
    if config.loss == "guider":
        guider = GuiderLoss(data.text_feat.shape[1], data.image_feat.shape[1], embed_dim=config.dim,
                            threshold=config.threshold, backend=config.backend,
                            noisy_weight=config.noisy_weight).to(device)
        # The calibration weights carry no gradient: the projections and hash layers stay
        # at their initialisation (as in the reference), so every item is calibrated once.
        guider.requires_grad_(False)
        if config.align:
            fit = guider.align_projections(data.text_feat.to(device), data.image_feat.to(device))
            log(f"aligned image_proj onto text_proj: residual {fit['mse_before']:.4g} -> {fit['mse_after']:.4g}")
        guider.precompute_items(data.text_feat.to(device), data.image_feat.to(device))
    student = student_opt = None
    if config.distill != "none":
        student = GraphRecommender(data.n_users, data.n_items, data.train, dim=config.dim, n_layers=0,
                                   seed=config.seed + 1).to(device)
        student_opt = torch.optim.Adam(student.parameters(), lr=config.lr)
    sampler = gdata.NegativeSampler(train_pairs, data.n_users, data.n_items, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    noisy = data.noisy.to(device) if data.noisy is not None else None

    state = _State()
    best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best_student = None
    if config.resume and config.checkpoint and os.path.exists(config.checkpoint):
        saved = torch.load(config.checkpoint, map_location="cpu", weights_only=False)
        mismatched = [k for k in _RESUME_KEYS if saved["config"].get(k) != getattr(config, k)]
        if mismatched:
            settings = ", ".join(f"{k}={saved['config'].get(k)!r}" for k in mismatched)
            raise ValueError(f"checkpoint {config.checkpoint} was written with other settings "
                             f"({settings}); resume with the same ones or start afresh")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        best_model = saved["best_model"]
        if student is not None:
            student.load_state_dict(saved["student"])
            student_opt.load_state_dict(saved["student_optimizer"])
            best_student = saved.get("best_student")
        generator.set_state(saved["generator"])
        state = _State(**saved["state"])
        log(f"resumed from {config.checkpoint} after epoch {state.epoch} "
            f"(best {SELECT_METRIC} {state.best_metric:.4f} at epoch {state.best_epoch})")
    elif config.resume:
        log(f"no checkpoint at {config.checkpoint}: starting afresh")

    progress = _Progress(config.progress)
    n_train = train_pairs.shape[0]
    steps = math.ceil(n_train / config.batch_size)
    header = f"{'epoch':>5} {'loss':>8} " + " ".join(f"{m:>9}" for m in ("recall@20", "ndcg@20")) + \
        f" {'best':>5} {'s/epoch':>8}"
    if state.epoch < config.epochs and state.bad_evals < config.patience:
        log(header)
    first_epoch = state.epoch + 1
    while state.epoch < config.epochs and state.bad_evals < config.patience:
        epoch = state.epoch + 1
        model.train()
        start = time.perf_counter()
        order = torch.randperm(n_train, generator=generator, device=device)
        # Device-side sums, read once per display update and epoch (no sync per step).
        total_loss = torch.zeros((), device=device)
        counts = torch.zeros(4, dtype=torch.long, device=device)  # tp, fp, fn, flagged
        display_every = max(1, steps // 50)
        for step in range(steps):
            # The first step of a run checks values (indices, weights); the rest skip the
            # checks' device sync: the trainer builds every later batch the same way.
            with contextlib.nullcontext() if step == 0 and epoch == first_epoch else V.checks_off():
                total_loss = _train_step(step, order, config, train_pairs, sampler, generator, model,
                                         optimizer, guider, noisy, counts, student, student_opt,
                                         total_loss)
            if progress.tty and (step + 1) % display_every == 0:
                elapsed = time.perf_counter() - start
                progress.update(epoch, config.epochs, step + 1, steps, float(total_loss) / (step + 1),
                                (step + 1) * config.batch_size / max(elapsed, 1e-9))
        mean_loss = float(total_loss) / steps
        seconds = time.perf_counter() - start
        progress.end_epoch(epoch, config.epochs, steps, mean_loss, seconds)
        state.epoch = epoch
        state.epoch_seconds.append(seconds)
        if guider is not None and noisy is not None:
            # The last epoch's calibration flags against the planted truth.
            tp, fp, fn, flagged = counts.tolist()
            state.noise_counts = {"tp": tp, "fp": fp, "fn": fn, "flagged": flagged, "seen": n_train}
        record = {"epoch": epoch, "loss": mean_loss, "seconds": seconds}
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            metrics = _evaluate(model, valid_pairs, exclude_valid, config.ks)
            record["valid"] = metrics
            if metrics[SELECT_METRIC] > state.best_metric:
                state.best_metric, state.best_epoch, state.bad_evals = metrics[SELECT_METRIC], epoch, 0
                best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if student is not None:
                    best_student = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                state.bad_evals += 1
            log(f"{epoch:>5} {record['loss']:>8.4f} {metrics['recall@20']:>9.4f} {metrics['ndcg@20']:>9.4f} "
                f"{state.best_epoch:>5} {seconds:>8.1f}")
        state.history.append(record)
        if config.checkpoint:
            _atomic_save({
                "config": dataclasses.asdict(config), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "best_model": best_model,
                "student": student.state_dict() if student is not None else None,
                "student_optimizer": student_opt.state_dict() if student_opt is not None else None,
                "best_student": best_student, "generator": generator.get_state(),
                "state": dataclasses.asdict(state),
            }, config.checkpoint)
    if state.bad_evals >= config.patience:
        log(f"early stop: no {SELECT_METRIC} improvement in {config.patience} evaluations")

    model.load_state_dict(best_model)
    best_valid = next((r["valid"] for r in state.history
                       if r["epoch"] == state.best_epoch and "valid" in r), None)
    result = {
        "config": dataclasses.asdict(config),
        "data": data.summary(),
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        # The best epoch's validation metrics (the selection criterion), not re-evaluated.
        "valid": best_valid if best_valid is not None else _evaluate(model, valid_pairs,
                                                                      exclude_valid, config.ks),
        "test": _evaluate(model, test_pairs, exclude_test, config.ks),
        "seconds_per_epoch": (sum(state.epoch_seconds) / len(state.epoch_seconds)
                              if state.epoch_seconds else None),
        "peak_memory_mb": _peak_memory_mb(device),
        "history": state.history,
    }
    if state.noise_counts:
        c = state.noise_counts
        precision = c["tp"] / max(c["tp"] + c["fp"], 1)
        recall = c["tp"] / max(c["tp"] + c["fn"], 1)
        result["noise_detection"] = {
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "flagged_share": c["flagged"] / max(c["seen"], 1),
            "planted_share": float(data.noisy.float().mean()),
        }
    if student is not None:
        if best_student is not None:
            student.load_state_dict(best_student)
        result["student_test"] = _evaluate(student, test_pairs, exclude_test, config.ks)
    if config.metrics_json:
        with open(config.metrics_json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


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
    c = torch.where(dot >= 0, torch.full_like(dot, 0.999),
                    torch.where(-dot >= norm2, torch.full_like(dot, 0.001),
                                1 + dot / norm2.clamp_min(torch.finfo(torch.float64).tiny)))
    return c.clamp_min(0.5).float(), (1 - c).clamp_min(1e-4).float()


def _train_step(step, order, config, train_pairs, sampler, generator, model, optimizer, guider, noisy,
                counts, student, student_opt, total_loss):
    """One optimisation step of the model (and of the student); returns the running loss sum."""
    index = order[step * config.batch_size:(step + 1) * config.batch_size]
    users, pos = train_pairs[index, 0], train_pairs[index, 1]
    neg = sampler.sample(users, generator=generator)
    user_out, item_out = model()
    if guider is not None:
        loss = guider(user_out, item_out, users, pos, neg)
        if noisy is not None:
            flagged = ~guider.last_calibration.clean
            truth = noisy[index]
            counts += torch.stack([(flagged & truth).sum(), (flagged & ~truth).sum(),
                                   (~flagged & truth).sum(), flagged.sum()])
    else:
        loss = dbpr_loss(user_out, item_out, users, pos, neg, backend=config.backend)
    reg = (model.user_emb[users].pow(2).sum() + model.item_emb[pos].pow(2).sum()
           + model.item_emb[neg].pow(2).sum()) / (2 * users.shape[0])
    optimizer.zero_grad(set_to_none=True)
    (loss + config.reg_weight * reg).backward()
    optimizer.step()
    if student is not None:
        with torch.no_grad():
            teacher_user, teacher_item = model()
        s_user, s_item = student()
        s_loss = dbpr_loss(s_user, s_item, users, pos, neg, backend=config.backend)
        if config.distill == "kl":
            distill = kl_distill_loss(s_user, s_item, teacher_user, teacher_item, users)
        else:
            # Sinkhorn between the batch users' student and teacher score rows over the
            # batch's positive items (B points in R^B per side).
            distill = ot_distill_loss(s_user, s_item, teacher_user, teacher_item, users, pos)
        student_opt.zero_grad(set_to_none=True)
        if config.distill_weight is None:
            params = [p for p in student.parameters() if p.requires_grad]
            g_task = torch.autograd.grad(s_loss, params, retain_graph=True)
            g_distill = torch.autograd.grad(distill, params)
            w_task, w_distill = mgda_weights(g_task, g_distill)
            for param, a, b in zip(params, g_task, g_distill):
                param.grad = w_task * a + w_distill * b
        else:
            (s_loss + config.distill_weight * distill).backward()
        student_opt.step()
    return total_loss + loss.detach()


def _evaluate(model, pairs, exclude, ks):
    model.eval()
    with torch.no_grad():
        user_out, item_out = model()
        return ranking_metrics(user_out, item_out, pairs, exclude, ks=ks)


def format_result(result: Dict) -> str:
    """Human-readable summary of ``train``'s result."""
    lines = [f"best epoch {result['best_epoch']} of {result['epochs_run']}"]
    for split in ("valid", "test"):
        metrics = result[split]
        lines.append(f"{split:>5}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
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
