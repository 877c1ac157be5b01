"""The training application behind ``guider-fast train``, built on the package's ops.

Modules
-------
data       InteractionData, load_mmrec(path), synthetic(...), with_synthetic_features(data), NegativeSampler
models     GraphRecommender (LightGCN + a frozen item-item kNN graph)
evaluate   full_sort_topk, ranking_metrics (full-catalogue Recall@K / NDCG@K), popularity_metrics
distill    kl_distill_loss (streamed), kl_distill_dense, ot_distill_loss
config     TrainConfig: the settings, each with its command-line help; PRESETS (GUIDER's settings)
trainer    Trainer (the run in named steps), train(config), format_result(result), mgda_weights
distributed  ShardedTrainer: the run on several processes (users sharded, items replicated)
progress   the per-epoch progress display
plot       plot_history(result, path): the training curves (matplotlib, imported only there)
cli        the ``guider-fast train`` options, built from TrainConfig's fields

``from guider_fast.train import TrainConfig, train`` loads the trainer on first use, so
``import guider_fast`` (which takes ``ranking_metrics`` and the distillation losses from
here) does not.
"""

import importlib

_EXPORTS = {"TrainConfig": "config", "Trainer": "trainer", "format_result": "trainer",
            "load_data": "trainer", "mgda_weights": "trainer", "train": "trainer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
