"""guider-fast train: the training loop on small synthetic data, early stopping, checkpoint/resume."""

import json

import pytest
import torch

from guider_fast import cli
from guider_fast.train import TrainConfig, train

SMALL = dict(n_users=240, n_items=160, epochs=3, batch_size=256, dim=16, knn=5, progress=False)


def _quiet(_):
    pass


@pytest.mark.parametrize("loss", ["guider", "bpr"])
def test_trains_and_reports_metrics(loss, tmp_path):
    result = train(TrainConfig(loss=loss, metrics_json=str(tmp_path / "m.json"), **SMALL), log=_quiet)
    for split in ("valid", "test"):
        assert set(result[split]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 20, 50)}
        assert all(0.0 <= v <= 1.0 for v in result[split].values())
    assert result["epochs_run"] == 3 and 1 <= result["best_epoch"] <= 3
    assert json.loads((tmp_path / "m.json").read_text())["test"] == result["test"]
    if loss == "guider":
        detection = result["noise_detection"]
        assert 0.0 <= detection["precision"] <= 1.0 and 0.0 <= detection["recall"] <= 1.0
        assert abs(detection["planted_share"] - 0.2) < 0.02
    else:
        assert "noise_detection" not in result


def test_training_lowers_the_loss_and_beats_random():
    result = train(TrainConfig(loss="bpr", lr=0.02, **{**SMALL, "epochs": 8, "batch_size": 128}), log=_quiet)
    losses = [r["loss"] for r in result["history"]]
    assert losses[-1] < losses[0]
    # Random ranking would give recall@50 ~ 50 / 160 ~ 0.31 on average.
    assert result["test"]["recall@50"] > 0.4


def test_resume_continues_exactly(tmp_path):
    checkpoint = str(tmp_path / "ckpt.pt")
    straight = train(TrainConfig(loss="guider", **{**SMALL, "epochs": 4}), log=_quiet)
    train(TrainConfig(loss="guider", checkpoint=checkpoint, **{**SMALL, "epochs": 2}), log=_quiet)
    messages = []
    resumed = train(TrainConfig(loss="guider", checkpoint=checkpoint, resume=True, **{**SMALL, "epochs": 4}),
                    log=messages.append)
    assert any("resumed" in m for m in messages)
    assert resumed["epochs_run"] == 4
    assert [r["loss"] for r in resumed["history"]] == pytest.approx([r["loss"] for r in straight["history"]],
                                                                     rel=1e-5)
    assert resumed["test"] == pytest.approx(straight["test"], rel=1e-5)


def test_resume_refuses_other_settings(tmp_path):
    checkpoint = str(tmp_path / "ckpt.pt")
    train(TrainConfig(loss="bpr", checkpoint=checkpoint, **{**SMALL, "epochs": 1}), log=_quiet)
    with pytest.raises(ValueError, match="dim"):
        train(TrainConfig(loss="bpr", checkpoint=checkpoint, resume=True, **{**SMALL, "dim": 8}), log=_quiet)


def test_early_stopping_stops():
    config = TrainConfig(loss="bpr", patience=1, lr=1e-9, **{**SMALL, "epochs": 10})
    result = train(config, log=_quiet)  # a frozen model never improves after the first evaluation
    assert result["epochs_run"] == 2


@pytest.mark.parametrize("distill, weight", [("kl", None), ("ot", None), ("kl", 0.1)])
def test_distillation_student_is_evaluated(distill, weight):
    result = train(TrainConfig(loss="bpr", distill=distill, distill_weight=weight, **{**SMALL, "epochs": 2}),
                   log=_quiet)
    assert set(result["student_test"]) == set(result["test"])


def test_config_errors():
    with pytest.raises(ValueError, match="loss"):
        train(TrainConfig(loss="hinge", **SMALL), log=_quiet)
    with pytest.raises(ValueError, match="checkpoint"):
        train(TrainConfig(resume=True, **SMALL), log=_quiet)
    with pytest.raises(ValueError, match="ks"):
        train(TrainConfig(ks=(10,), **SMALL), log=_quiet)


def test_cli_train_on_an_mmrec_folder(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    lines = ["userID\titemID\tx_label"]
    for user in range(60):
        items = torch.randperm(40, generator=gen)[:6].tolist()
        labels = [0, 0, 0, 0, 1, 2]
        lines += [f"{user}\t{item}\t{label}" for item, label in zip(items, labels)]
    (tmp_path / "toy.inter").write_text("\n".join(lines) + "\n")
    metrics = tmp_path / "metrics.json"
    code = cli.main(["train", "--data", str(tmp_path), "--epochs", "2", "--loss", "guider", "--dim", "8",
                     "--knn", "3", "--batch-size", "64", "--no-progress", "--metrics-json", str(metrics)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "generating synthetic text/image features" in out and "test:" in out
    assert json.loads(metrics.read_text())["epochs_run"] == 2


def test_cli_train_reports_bad_data(tmp_path, capsys):
    (tmp_path / "bad.inter").write_text("userID\titemID\tx_label\n0\tx\t0\n")
    assert cli.main(["train", "--data", str(tmp_path / "bad.inter"), "--no-progress"]) == 2
    assert "line 2" in capsys.readouterr().err


def test_align_projections_makes_the_distance_detect_inconsistent_items():
    from guider_fast import GuiderLoss
    from guider_fast.train.data import synthetic

    data = synthetic(n_users=400, n_items=300, text_dim=48, image_dim=40, noise=0.2, seed=3)
    torch.manual_seed(0)
    guider = GuiderLoss(48, 40, embed_dim=16, distance="euclidean")
    inconsistent = torch.zeros(data.n_items, dtype=torch.bool)
    inconsistent[data.train[data.noisy, 1]] = True

    def separation():
        guider.precompute_items(data.text_feat, data.image_feat)
        d = guider.item_calibration.distance
        return d[inconsistent].mean() / d[~inconsistent].mean()

    before = separation()
    fit = guider.align_projections(data.text_feat, data.image_feat)
    with pytest.raises(RuntimeError, match="stale"):  # the cache predates the fit
        guider(torch.randn(data.n_users, 16), torch.randn(data.n_items, 16), data.train[:8, 0],
               data.train[:8, 1], data.train[8:16, 1])
    after = separation()
    assert fit["mse_after"] < fit["mse_before"]
    assert after > 2.0 and after > 1.5 * before


def test_noisy_weight_replaces_the_weight_of_flagged_rows():
    import guider_fast as gf

    gen = torch.Generator().manual_seed(4)
    n_users, n_items, batch = 30, 25, 64
    text, image = torch.randn(n_items, 12, generator=gen), torch.randn(n_items, 10, generator=gen)
    user_emb, item_emb = torch.randn(n_users, 8, generator=gen), torch.randn(n_items, 8, generator=gen)
    users = torch.randint(0, n_users, (batch,), generator=gen)
    pos, neg = torch.randint(0, n_items, (batch,), generator=gen), torch.randint(0, n_items, (batch,), generator=gen)
    torch.manual_seed(0)
    guider = gf.GuiderLoss(12, 10, embed_dim=8, threshold=0.5, noisy_weight=0.0)
    loss = guider(user_emb, item_emb, users, pos, neg, text, image)
    cal = guider.last_calibration
    assert 0 < int(cal.clean.sum()) < batch  # both kinds present
    want = gf.dbpr_loss(user_emb, item_emb, users, pos, neg, torch.where(cal.clean, cal.weights, 0.0))
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="noisy_weight"):
        gf.GuiderLoss(12, 10, noisy_weight=-1.0)


def test_cli_reports_an_unusable_backend_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code = cli.main(["train", "--backend", "triton", "--epochs", "1", "--no-progress", "--n-users", "50",
                     "--n-items", "40"])
    assert code == 2
    assert "backend='triton' cannot run" in capsys.readouterr().err


def test_training_leaves_the_value_check_setting_as_it_was():
    import guider_fast as gf

    for setting in (None, True, False):
        gf.set_checks(setting)
        try:
            before = gf.checks_enabled()
            train(TrainConfig(loss="bpr", **{**SMALL, "epochs": 1}), log=_quiet)
            assert gf.checks_enabled() == before
        finally:
            gf.set_checks(None)


def test_training_on_the_triton_backend_matches_torch():
    """The whole loop through the Triton kernels (interpreted here): same losses as torch."""
    pytest.importorskip("triton")
    tiny = {**SMALL, "n_users": 60, "n_items": 40, "epochs": 1, "batch_size": 128, "knn": 0}
    results = {backend: train(TrainConfig(loss="guider", align=True, backend=backend, **tiny), log=_quiet)
               for backend in ("torch", "triton")}
    assert results["triton"]["history"][0]["loss"] == pytest.approx(results["torch"]["history"][0]["loss"],
                                                                     rel=1e-4)
    assert results["triton"]["noise_detection"] == pytest.approx(results["torch"]["noise_detection"])


def test_mgda_weights_follow_the_reference_rule():
    from guider_fast.train import mgda_weights

    g1 = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    task, distill = mgda_weights(g1, [torch.tensor([1.0, 1.0]), torch.tensor([0.0])])  # g1.g2 = 1 >= 0
    assert task.item() == pytest.approx(0.999) and distill.item() == pytest.approx(1e-3)
    task, distill = mgda_weights(g1, [torch.tensor([-3.0, 0.0]), torch.tensor([0.0])])  # -g1.g2 = 3 < 9
    c = 1 - 3 / 9
    assert task.item() == pytest.approx(max(c, 0.5)) and distill.item() == pytest.approx(1 - c)
    task, distill = mgda_weights(g1, [torch.tensor([-0.5, 0.0]), torch.tensor([0.0])])  # 0.5 >= 0.25
    assert task.item() == pytest.approx(0.5) and distill.item() == pytest.approx(0.999)


def test_old_module_paths_are_the_moved_modules():
    import guider_fast.data
    import guider_fast.distill
    import guider_fast.evaluate
    import guider_fast.models
    import guider_fast.train as package
    from guider_fast.train import data, distill, evaluate, models

    assert (guider_fast.data, guider_fast.models, guider_fast.evaluate, guider_fast.distill) == \
        (data, models, evaluate, distill)
    assert package.train is train and package.TrainConfig is TrainConfig
    with pytest.raises(AttributeError):
        package.no_such_name


def _parse_train(argv):
    import argparse

    from guider_fast.train import cli as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return train_cli.config_from_args(parser.parse_args(argv)), parser


def test_cli_options_come_from_the_config_fields():
    import dataclasses

    config, parser = _parse_train([])
    assert config == TrainConfig()
    from guider_fast.train.cli import LAUNCH_OPTIONS

    options = {a.dest: a for a in parser._actions if a.dest != "help"}
    offered = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]}
    # Besides the fields, only the launch's options (--nproc), which are not settings of the run.
    assert set(options) - set(LAUNCH_OPTIONS) == offered == {f.name for f in dataclasses.fields(TrainConfig)} - {"ks"}
    assert set(LAUNCH_OPTIONS) <= set(options) and not set(LAUNCH_OPTIONS) & offered
    assert all(a.help for a in options.values())
    assert options["n_layers"].option_strings == ["--layers"]
    assert options["progress"].option_strings == ["--no-progress"]
    assert options["loss"].choices == ("guider", "bpr") and options["distill"].choices == ("none", "kl", "ot")
    config, _ = _parse_train(["--layers", "3", "--no-progress", "--n-users", "50", "--distill-weight", "0.5",
                              "--align", "--checkpoint", "c.pt", "--resume", "--lr", "0.01"])
    assert (config.n_layers, config.progress, config.n_users, config.distill_weight) == (3, False, 50, 0.5)
    assert (config.align, config.checkpoint, config.resume, config.lr) == (True, "c.pt", True, 0.01)
    with pytest.raises(SystemExit):
        _parse_train(["--loss", "hinge"])


class _Stream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.mark.parametrize("enabled, tty", [(True, True), (True, False), (False, True)])
def test_progress_bar_on_a_terminal_a_line_per_epoch_otherwise(enabled, tty):
    from guider_fast.train.progress import EpochProgress

    stream = _Stream(tty)
    progress = EpochProgress(enabled, stream)
    assert progress.live == (enabled and tty)
    for epoch in (1, 2):
        progress.start(epoch, 2, 1000)
        progress.update(500, 0.25)
        progress.update(1000, 0.125)
        progress.end(epoch, 2, 4, 0.125, 1.5)
    lines = [f"epoch {e}/2: 4 steps, loss 0.1250, 1.5 s\n" for e in (1, 2)]
    if not enabled:
        assert stream.text == ""
    elif not tty:
        assert stream.text == "".join(lines)
    else:
        # tqdm redraws at most every 0.1 s: the bar's first frame, then the line that replaces it.
        assert stream.text.startswith("\repoch 1/2:   0%|") and "/1.00k" in stream.text
        assert lines[0] in stream.text and stream.text.endswith(lines[1])
