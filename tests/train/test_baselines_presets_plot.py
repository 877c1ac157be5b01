"""What every run reports besides the model: the popularity and generator baselines, the GUIDER
presets the run uses, and the curves (--plot, the history in the metrics JSON)."""

import inspect
import json
import math
import subprocess
import sys

import pytest
import torch

from guider_fast import GuiderLoss, cli
from guider_fast.train import TrainConfig, Trainer, train
from guider_fast.train.config import PRESETS
from guider_fast.train.data import synthetic
from guider_fast.train.evaluate import popularity_metrics

SMALL = dict(n_users=150, n_items=90, epochs=2, batch_size=256, dim=8, knn=0, progress=False)


def _quiet(_):
    pass


def _brute_force(score, eval_pairs, exclude, ks):
    """Recall/NDCG@K by ranking every item for every user in Python (ties: lower id first)."""
    held, seen = {}, {}
    for u, i in eval_pairs.tolist():
        held.setdefault(u, set()).add(i)
    for u, i in exclude.tolist():
        seen.setdefault(u, set()).add(i)
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for u, items in held.items():
        ranked = sorted((i for i in range(score.shape[1]) if i not in seen.get(u, ())),
                        key=lambda i: (-float(score[u, i]), i))
        for k in ks:
            hits = [r for r, i in enumerate(ranked[:k]) if i in items]
            out[f"recall@{k}"] += len(hits) / len(items) / len(held)
            ideal = sum(1 / math.log2(r + 2) for r in range(min(len(items), k)))
            out[f"ndcg@{k}"] += sum(1 / math.log2(r + 2) for r in hits) / ideal / len(held)
    return out


def test_popularity_baseline_equals_a_brute_force_count():
    data = synthetic(n_users=60, n_items=40, seed=5)
    counts = [0] * data.n_items
    for _, item in data.train.tolist():
        counts[item] += 1
    score = torch.tensor(counts, dtype=torch.float64).expand(data.n_users, -1)
    exclude = torch.cat([data.train, data.valid])
    want = _brute_force(score, data.test, exclude, (5, 10, 20))
    got = popularity_metrics(data.train, data.n_users, data.n_items, data.test, exclude, (5, 10, 20))
    assert got == pytest.approx(want, abs=1e-12)
    # The run reports the same numbers for its test split, and the generator's own ranking.
    result = train(TrainConfig(loss="bpr", ks=(5, 10, 20), **{**SMALL, "n_users": 60, "n_items": 40,
                                                             "seed": 5}), log=_quiet)
    assert result["baselines"]["popularity"] == pytest.approx(want, abs=1e-12)
    truth = data.user_factors @ data.item_factors.T
    assert result["baselines"]["generator_ceiling"] == pytest.approx(_brute_force(truth, data.test, exclude,
                                                                                  (5, 10, 20)), abs=1e-12)


def test_generator_factors_give_its_clean_choice_scores():
    data = synthetic(n_users=200, n_items=120, noise=0.2, seed=2)
    truth = data.user_factors @ data.item_factors.T
    inconsistent = torch.zeros(data.n_items, dtype=torch.bool)
    inconsistent[data.train[data.noisy, 1]] = True
    clean = data.train[~data.noisy]
    # Clean rows only ever use consistent items, which the true score ranks above every inconsistent one.
    assert not inconsistent[clean[:, 1]].any()
    assert truth[:, inconsistent].max() < truth[:, ~inconsistent].min()
    # Chosen items score higher than the user's average consistent item.
    chosen = truth[clean[:, 0], clean[:, 1]]
    assert float(chosen.mean()) > float(truth[:, ~inconsistent].mean()) + 1.0


def test_the_result_prints_the_baselines_next_to_the_model(tmp_path, capsys):
    metrics = tmp_path / "m.json"
    code = cli.main(["train", "--loss", "bpr", "--epochs", "1", "--n-users", "150", "--n-items", "90",
                     "--dim", "8", "--knn", "0", "--no-progress", "--metrics-json", str(metrics)])
    out = capsys.readouterr().out
    assert code == 0
    assert "popularity (train counts)" in out and "generator's true scores" in out
    assert set(json.loads(metrics.read_text())["baselines"]) == {"popularity", "generator_ceiling"}


def test_mmrec_data_has_the_popularity_baseline_only(tmp_path):
    lines = ["userID\titemID\tx_label"] + [f"{u}\t{(u * 7 + j) % 30}\t{[0, 0, 0, 1, 2][j]}"
                                            for u in range(40) for j in range(5)]
    (tmp_path / "toy.inter").write_text("\n".join(lines) + "\n")
    result = train(TrainConfig(data=str(tmp_path), loss="bpr", **SMALL), log=_quiet)
    assert set(result["baselines"]) == {"popularity"}


def test_presets_map_to_the_documented_settings():
    assert PRESETS == {"reference": {"align": False, "noisy_weight": 1.0, "threshold": 0.7,
                                     "adaptive_threshold": False},
                       "denoise": {"align": True, "noisy_weight": 0.0, "threshold": None,
                                   "adaptive_threshold": True}}
    # The reference preset is GuiderLoss's own defaults, which stay GUIDER as published.
    defaults = inspect.signature(GuiderLoss).parameters
    assert (defaults["threshold"].default, defaults["noisy_weight"].default) == (0.7, 1.0)
    assert TrainConfig().preset == "denoise"
    for name, values in PRESETS.items():
        resolved = TrainConfig(preset=name).resolved()
        assert {k: getattr(resolved, k) for k in values} == values
    # Explicit settings override the preset, one by one.
    resolved = TrainConfig(preset="reference", threshold=0.5).resolved()
    assert (resolved.threshold, resolved.align, resolved.noisy_weight) == (0.5, False, 1.0)
    resolved = TrainConfig(preset="denoise", align=False, noisy_weight=0.25).resolved()
    assert (resolved.adaptive_threshold, resolved.align, resolved.noisy_weight) == (True, False, 0.25)
    # A fixed threshold turns the adaptive one off; asking for both, or for neither, is an error.
    resolved = TrainConfig(preset="denoise", threshold=0.3).resolved()
    assert (resolved.threshold, resolved.adaptive_threshold) == (0.3, False)
    resolved = TrainConfig(preset="reference", adaptive_threshold=True).resolved()
    assert (resolved.threshold, resolved.adaptive_threshold, resolved.align) == (None, True, False)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(threshold=0.3, adaptive_threshold=True).resolved()
    with pytest.raises(ValueError, match="--no-adaptive-threshold needs a fixed threshold"):
        TrainConfig(adaptive_threshold=False).resolved()
    with pytest.raises(ValueError, match="preset"):
        TrainConfig(preset="fast").resolved()


def test_cli_presets_and_their_overrides():
    from test_train import _parse_train

    assert _parse_train([])[0].resolved().align is True
    config, _ = _parse_train(["--preset", "reference"])
    assert (config.resolved().align, config.resolved().threshold) == (False, 0.7)
    assert _parse_train(["--preset", "reference", "--align"])[0].resolved().align is True
    assert _parse_train(["--no-align"])[0].resolved().align is False
    assert _parse_train(["--noisy-weight", "0.5"])[0].resolved().noisy_weight == 0.5


@pytest.mark.parametrize("preset", ["reference", "denoise"])
def test_the_trainer_uses_the_preset(preset):
    trainer = Trainer(TrainConfig(preset=preset, **SMALL), log=_quiet)
    want = PRESETS[preset]
    threshold = trainer.threshold_split.threshold if want["adaptive_threshold"] else want["threshold"]
    assert (trainer.guider.threshold, trainer.guider.noisy_weight, trainer.config.align) == \
        (threshold, want["noisy_weight"], want["align"])
    assert hasattr(trainer, "threshold_split") == want["adaptive_threshold"]


def test_history_carries_the_flags_per_epoch(tmp_path):
    metrics = tmp_path / "m.json"
    result = train(TrainConfig(metrics_json=str(metrics), **{**SMALL, "epochs": 3}), log=_quiet)
    history = json.loads(metrics.read_text())["history"]
    assert history == result["history"] and len(history) == 3
    for record in history:
        assert set(record["flags"]) == {"flagged_share", "precision", "recall", "f1"}
        assert set(record["valid"]) >= {"recall@20", "ndcg@20"}
    last = history[-1]["flags"]
    assert {k: result["noise_detection"][k] for k in last} == last


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    messages = []
    train(TrainConfig(plot=str(path), **SMALL), log=messages.append)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"training curves written to {path}" in messages
    train(TrainConfig(loss="bpr", plot=str(tmp_path / "bpr.png"), **SMALL), log=_quiet)  # no flag panel
    assert (tmp_path / "bpr.png").stat().st_size > 0


def test_the_run_works_without_matplotlib_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    path = tmp_path / "curves.png"
    messages = []
    result = train(TrainConfig(plot=str(path), **SMALL), log=messages.append)
    assert result["epochs_run"] == 2 and not path.exists()
    said = [m for m in messages if "matplotlib" in m]
    assert len(said) == 1 and "not installed" in said[0] and "guider_fast[plot]" in said[0]


def test_importing_the_trainer_loads_no_matplotlib():
    code = ("import sys, guider_fast, guider_fast.train.trainer, guider_fast.train.cli; "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_seed_keeps_the_data_while_the_seed_changes():
    small = dict(SMALL, epochs=1)
    a = Trainer(TrainConfig(seed=1, data_seed=0, **small), log=_quiet)
    b = Trainer(TrainConfig(seed=2, data_seed=0, **small), log=_quiet)
    c = Trainer(TrainConfig(seed=0, **small), log=_quiet)
    assert torch.equal(a.data.train, b.data.train) and torch.equal(a.data.train, c.data.train)
    assert not torch.equal(a.model.user_emb, b.model.user_emb)
    with pytest.raises(ValueError, match="data_seed must be a non-negative integer"):
        TrainConfig(data_seed=-1).validate()
