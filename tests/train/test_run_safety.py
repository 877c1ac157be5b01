"""guider-fast train never loses a user's state and answers a user's mistake in one line:
an existing checkpoint is refused without --resume/--overwrite, output folders are checked
before training, a foreign or mismatched checkpoint is named, and Ctrl-C says how to resume."""

import shlex

import pytest
import torch

from guider_fast import cli
from guider_fast.train import TrainConfig, Trainer, train

SMALL = dict(n_users=120, n_items=80, epochs=2, batch_size=256, dim=8, knn=0, progress=False)
ARGS = ["--n-users", "120", "--n-items", "80", "--batch-size", "256", "--dim", "8", "--knn", "0",
        "--no-progress"]


def _quiet(_):
    pass


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_existing_checkpoint_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt.pt"
    train(TrainConfig(loss="bpr", checkpoint=str(checkpoint), **SMALL), log=_quiet)
    before = checkpoint.read_bytes()
    messages = []
    with pytest.raises(ValueError, match="already exists.*--resume.*--overwrite"):
        train(TrainConfig(loss="bpr", checkpoint=str(checkpoint), **{**SMALL, "seed": 1}), log=messages.append)
    assert messages == []  # refused before loading anything
    assert checkpoint.read_bytes() == before
    code = cli.main(["train", "--loss", "bpr", "--epochs", "1", "--checkpoint", str(checkpoint)] + ARGS)
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "--resume" in line and "--overwrite" in line and str(checkpoint) in line
    assert checkpoint.read_bytes() == before
    # An explicit overwrite replaces it.
    train(TrainConfig(loss="bpr", checkpoint=str(checkpoint), overwrite=True, **{**SMALL, "seed": 1}), log=_quiet)
    assert torch.load(checkpoint, weights_only=True)["config"]["seed"] == 1
    with pytest.raises(ValueError, match="one of them"):
        train(TrainConfig(loss="bpr", checkpoint=str(checkpoint), overwrite=True, resume=True, **SMALL),
              log=_quiet)


@pytest.mark.parametrize("flag", ["--checkpoint", "--metrics-json", "--plot"])
def test_an_output_path_in_a_missing_folder_fails_before_training(tmp_path, capsys, flag):
    path = tmp_path / "no" / "such" / "file.out"
    messages = []
    field = flag[2:].replace("-", "_")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(TrainConfig(loss="bpr", **{field: str(path)}, **SMALL), log=messages.append)
    assert messages == []
    assert cli.main(["train", "--epochs", "1", flag, str(path)] + ARGS) == 2
    assert "does not exist" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None])
def test_resuming_from_a_file_that_is_not_a_checkpoint_says_so(tmp_path, capsys, content):
    path = tmp_path / "other.pt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)  # a torch file, but not a training state
    else:
        path.write_bytes(content)
    code = cli.main(["train", "--loss", "bpr", "--epochs", "1", "--checkpoint", str(path), "--resume"] + ARGS)
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "is not a guider-fast checkpoint" in line


def _toy_mmrec(folder, seed):
    gen = torch.Generator().manual_seed(seed)
    lines = ["userID\titemID\tx_label"]
    for user in range(40):
        items = torch.randperm(30, generator=gen)[:6].tolist()
        lines += [f"{user}\t{item}\t{label}" for item, label in zip(items, [0, 0, 0, 0, 1, 2])]
    (folder / "toy.inter").write_text("\n".join(lines) + "\n")


def test_resuming_on_other_data_or_settings_says_so_in_one_line(tmp_path, capsys):
    _toy_mmrec(tmp_path, seed=0)
    checkpoint = str(tmp_path / "ckpt.pt")
    base = ["train", "--data", str(tmp_path), "--loss", "bpr", "--dim", "8", "--knn", "0", "--batch-size", "64",
            "--no-progress", "--checkpoint", checkpoint]
    assert cli.main(base + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--epochs", "2", "--resume", "--dim", "16"]) == 2
    assert "other settings" in _one_line(capsys.readouterr().err)
    _toy_mmrec(tmp_path, seed=1)  # same path, sizes and settings; other interactions
    assert cli.main(base + ["--epochs", "2", "--resume"]) == 2
    assert "other interactions" in _one_line(capsys.readouterr().err)


def _interrupt_at_epoch(monkeypatch, at):
    real = Trainer.train_epoch

    def train_epoch(self):
        if self.state.epoch + 1 == at:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path, capsys, monkeypatch):
    checkpoint = str(tmp_path / "ckpt.pt")
    argv = ["train", "--loss", "guider", "--epochs", "3", "--checkpoint", checkpoint, "--threshold", "0.4"] + ARGS
    _interrupt_at_epoch(monkeypatch, at=3)
    assert cli.main(argv) == 130
    line = _one_line(capsys.readouterr().err)
    assert f"last checkpoint {checkpoint} (epoch 2)" in line
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:2] == ["guider-fast", "train"] and "--resume" in command and "--threshold" in command
    monkeypatch.undo()
    assert cli.main(command[1:]) == 0  # the printed command resumes the run and finishes it
    out = capsys.readouterr().out
    assert "resumed from" in out and "best epoch" in out


def test_ctrl_c_without_a_checkpoint_says_none_was_written(capsys, monkeypatch):
    _interrupt_at_epoch(monkeypatch, at=1)
    assert cli.main(["train", "--loss", "bpr", "--epochs", "2"] + ARGS) == 130
    assert "no checkpoint was written" in _one_line(capsys.readouterr().err)
