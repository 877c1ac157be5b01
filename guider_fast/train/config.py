"""``TrainConfig``: every setting of a training run, each with the help text of its
``guider-fast train`` option (the command line is built from these fields)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .._dispatch import BACKENDS

LOSSES = ("guider", "bpr")
# GUIDER's calibration settings by preset; a field left at None takes its preset's value.
PRESETS = {
    # GUIDER as published (and ``GuiderLoss``'s defaults): random projections, flagged rows
    # weighted 1, clean below a normalised distance of 0.7.
    "reference": {"align": False, "noisy_weight": 1.0, "threshold": 0.7, "adaptive_threshold": False},
    # The recipe that denoises: aligned projections, flagged rows dropped, and the threshold
    # set by a two-cluster split of the training rows' distances (guider_fast.train.threshold;
    # chosen on validation, benchmarks/results/train_cpu.md part 5): a fixed threshold on the
    # min-max normalised distance flags most rows of data without noise.
    "denoise": {"align": True, "noisy_weight": 0.0, "threshold": None, "adaptive_threshold": True},
}
DEFAULT_PRESET = "denoise"
DISTILL = ("none", "kl", "ot")
BACKEND_CHOICES = ("auto",) + BACKENDS
SELECT_METRIC = "recall@20"
# The settings a checkpoint must share with the run that resumes from it (compared after the
# preset is applied).
RESUME_KEYS = ("data", "data_seed", "dim", "n_layers", "knn", "loss", "seed", "batch_size", "n_users", "n_items",
               "noise", "distill", "threshold", "adaptive_threshold", "align", "noisy_weight")
_PRESET_HELP = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items() if v is not None)
                         for name, values in PRESETS.items())


def option(default, help: str, *, flag: Optional[str] = None, choices: Optional[tuple] = None,
           cli: bool = True):
    """A ``TrainConfig`` field and its command-line option: ``flag`` (default ``--field-name``;
    a boolean that defaults to True takes a ``--no-...`` flag), ``choices``, or ``cli=False``
    for a setting the command line does not offer."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli": cli})


@dataclass
class TrainConfig:
    data: str = option("synthetic",
                       "'synthetic' (planted noisy interactions) or an MMRec dataset: a folder "
                       "with <name>.inter (+ text_feat.npy / image_feat.npy) or the .inter file")
    # Defaults chosen on validation Recall@20 (benchmarks/results/train_cpu.md, part 5): every step
    # propagates the whole graph, so a step costs about the same at any batch size, and batch 8192
    # at lr 4e-3 reaches 98% of batch 2048 / lr 1e-3's best validation (synthetic, seed 0) in a
    # third of the time; with patience 10 Amazon Baby's BPR run ends at its long run's model.
    epochs: int = option(200, "training epochs (fewer when early stopping ends the run)")
    batch_size: int = option(8192, "training triplets per step")
    dim: int = option(64, "embedding size")
    n_layers: int = option(2, "LightGCN propagation layers", flag="--layers")
    knn: int = option(10, "neighbours of the item-item graph (0: off)")
    lr: float = option(4e-3, "Adam learning rate")
    reg_weight: float = option(1e-4, "L2 weight on the batch's ID embeddings")
    loss: str = option("guider", "GUIDER (calibration + DBPR) or plain BPR", choices=LOSSES)
    preset: str = option(DEFAULT_PRESET, "GUIDER's calibration settings (--threshold, --align, "
                                         f"--noisy-weight given explicitly override them): {_PRESET_HELP}",
                         choices=tuple(PRESETS))
    threshold: Optional[float] = option(None, "fixed calibration clean threshold on the batch's normalised "
                                              "distance (turns --adaptive-threshold off unless it is given; "
                                              "default: the preset's)")
    adaptive_threshold: Optional[bool] = option(None, "set the threshold before training by a two-cluster "
                                                      "split of the training rows' modality distances; "
                                                      "nothing is flagged when they form one cluster "
                                                      "(default: the preset's)")
    align: Optional[bool] = option(None, "fit the image projection onto the text one, so the calibration "
                                         "measures modality disagreement (the reference keeps both random; "
                                         "default: the preset's)")
    noisy_weight: Optional[float] = option(None, "DBPR weight of interactions flagged noisy (the reference: "
                                                 "1; 0 drops them; default: the preset's)")
    backend: str = option("auto", "backend of the ops (auto: the first available of cuda, triton, torch)",
                          choices=BACKEND_CHOICES)
    distill: str = option("none",
                          "also train a matrix-factorisation student distilled from the model: "
                          "full-catalogue KL (streamed) or Sinkhorn OT between the batch's score rows "
                          "(a B x B problem of dimension B per step: ~40x the epoch time on one CPU thread "
                          "at B = 2048)", choices=DISTILL)
    distill_weight: Optional[float] = option(None, "a fixed weight of the distillation term (default: the "
                                                   "reference's MGDA two-task rule)")
    eval_every: int = option(1, "evaluate on the validation split every this many epochs (and after the "
                                "last)")
    patience: int = option(10, f"stop after this many evaluations without a better validation {SELECT_METRIC}")
    ks: Tuple[int, ...] = option((10, 20, 50), "the K of Recall@K and NDCG@K (must include 20)", cli=False)
    seed: int = option(0, "seed of the initialisation and the batch order, and of the data unless --data-seed "
                          "is given")
    data_seed: Optional[int] = option(None, "seed of the synthetic data or of the generated features of an "
                                            "MMRec dataset, so that runs of several --seed values share one "
                                            "data set (default: --seed)")
    device: str = option("cpu", "cpu or cuda")
    checkpoint: Optional[str] = option(None, "save the training state here after every epoch (an existing "
                                             "file is refused unless --resume or --overwrite is given)")
    resume: bool = option(False, "continue from --checkpoint (best model included)")
    overwrite: bool = option(False, "replace an existing --checkpoint instead of refusing to start")
    metrics_json: Optional[str] = option(None, "write the final metrics (and the history) here")
    plot: Optional[str] = option(None, "draw the training curves into this PNG (needs matplotlib: "
                                       "pip install 'guider_fast[plot]')")
    n_users: int = option(20_000, "synthetic data: users")
    n_items: int = option(7_000, "synthetic data: items")
    noise: float = option(0.2, "synthetic data: share of corrupted interactions")
    progress: bool = option(True, "no progress bar", flag="--no-progress")
    virtual_shards: Optional[int] = option(None, "multi-process runs: users fall into this many shards, each "
                                                 "with its own random stream, so the model depends on this "
                                                 "number and not on the number of processes (default: the "
                                                 "number of processes; on --resume, the checkpoint's)")

    @property
    def seed_of_data(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def resolved(self) -> "TrainConfig":
        """A copy with every calibration setting left at None taken from the preset."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        values = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        if self.threshold is not None:
            if self.adaptive_threshold:
                raise ValueError("threshold and adaptive_threshold both set the threshold: pass --threshold X "
                                 "or --adaptive-threshold, not both")
            values["adaptive_threshold"] = False  # an explicit --threshold is the threshold
        out = dataclasses.replace(self, **values)
        if out.adaptive_threshold:
            out = dataclasses.replace(out, threshold=None)  # set by the split, before training
        if not out.adaptive_threshold and out.threshold is None:
            raise ValueError(f"--no-adaptive-threshold needs a fixed threshold: add --threshold X (preset "
                             f"{self.preset!r} sets none)")
        return out

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
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
        if self.resume and self.overwrite:
            raise ValueError("resume continues the checkpoint and overwrite replaces it: pass one of them")
        if self.noisy_weight is not None and not (self.noisy_weight >= 0 and math.isfinite(self.noisy_weight)):
            raise ValueError(f"noisy_weight must be a number >= 0, got {self.noisy_weight!r}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        weight = self.distill_weight
        if weight is not None and not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"distill_weight must be None (MGDA) or a number >= 0, got {weight!r}")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        shards = self.virtual_shards
        if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
            raise ValueError(f"virtual_shards must be None or a positive integer, got {shards!r}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise must be in [0, 1), got {self.noise!r}")
        if SELECT_METRIC.split("@")[1] not in {str(k) for k in self.ks}:
            raise ValueError(f"ks must include 20 (model selection uses {SELECT_METRIC}), got {self.ks}")
