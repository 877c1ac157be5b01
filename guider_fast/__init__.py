"""guider_fast: fast ops and losses for GUIDER (denoising multi-modal recommenders).

Public API
----------
sinkhorn(x, y, a=None, b=None, *, eps, p=2, n_iters=100, tol=None, grad="envelope", backend="auto")
SamplesLoss(loss="sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True, backend="auto")
dbpr_loss(user_emb, item_emb, users, pos_items, neg_items, weights=None, *, reduction="mean", backend="auto",
          deterministic=None, sparse_grad=False)
dbpr_step(user_table, item_table, users, pos_items, neg_items, weights=None, *, lr, optimizer="sgd", state=None,
          l2=0.0, reduction="mean", return_scores=False, backend="auto")
calibrate(t, v, u_code, t_code, v_code, *, threshold=0.7, distance="geomloss", backend="auto")
precompute_item_calibration(t, v, t_code, v_code, *, distance="geomloss") -> ItemCalibration
calibrate_items(cache, u_code, items, *, threshold=0.7, backend="auto")
GuiderLoss(text_dim, image_dim, embed_dim=64, feat_embed_dim=64, hash_bits=64, threshold=0.7)
kl_distill_loss(student_user, student_item, teacher_user, teacher_item, users, *, block_size=16384)
ot_distill_loss(student_user, student_item, teacher_user, teacher_item, users, items=None, *, blur=0.05, p=2)
ranking_metrics(user_emb, item_emb, eval_pairs, exclude_pairs, ks=(10, 20, 50)); full_sort_topk(...)
guider_fast.data: load_mmrec(path), synthetic(...), with_synthetic_features(data), NegativeSampler
guider_fast.train: TrainConfig, train(config) (the engine of ``guider-fast train``)

Importing this package never initialises CUDA and does not need triton.
"""

from ._validate import checks_enabled, set_checks
from ._version import __version__
from .calibration import (Calibration, ItemCalibration, calibrate, calibrate_items,
                          precompute_item_calibration)
from .dbpr import RowwiseAdagradState, dbpr_loss, dbpr_step
from .losses import GuiderLoss
from .ot import SamplesLoss, SinkhornResult, sinkhorn
from .train.distill import kl_distill_dense, kl_distill_loss, ot_distill_loss
from .train.evaluate import full_sort_topk, ranking_metrics

__all__ = [
    "Calibration",
    "GuiderLoss",
    "ItemCalibration",
    "RowwiseAdagradState",
    "SamplesLoss",
    "SinkhornResult",
    "__version__",
    "calibrate",
    "calibrate_items",
    "checks_enabled",
    "dbpr_loss",
    "dbpr_step",
    "full_sort_topk",
    "kl_distill_dense",
    "kl_distill_loss",
    "ot_distill_loss",
    "precompute_item_calibration",
    "ranking_metrics",
    "set_checks",
    "sinkhorn",
]
