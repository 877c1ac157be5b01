"""Multi-process training (guider_fast.train.distributed): users sharded, items replicated.

Processes are spawned with torch.multiprocessing and meet through a file rendezvous in a tmp
folder (gloo on CPU, no ports), except the torchrun launch itself.  Each spawned job writes
its results to the folder; the assertions run here, against single-process computations.
"""

import dataclasses
import itertools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guider_fast import GuiderLoss, cli
from guider_fast.train import TrainConfig, Trainer
from guider_fast.train import data as gdata
from guider_fast.train import distributed as D
from guider_fast.train.evaluate import metrics_from_sums, ranking_metric_sums, ranking_metrics
from guider_fast.train.models import GraphRecommender, ShardedGraphRecommender, item_graph_from_features
from guider_fast.train.trainer import SHARDED_FORMAT

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# Small explicit sizes (the synthetic generator's defaults belong to another issue).
DATA = dict(n_users=150, n_items=90, seed=0)
RUN = dict(n_users=150, n_items=90, dim=8, knn=4, progress=False)
_counter = itertools.count()


def _quiet(_):
    pass


def _data():
    return gdata.synthetic(text_dim=24, image_dim=20, **DATA)


def dataclass_replace(config, **changes):
    return dataclasses.replace(config, **changes)


def _batch_size(data):
    """A batch size giving an epoch of at least 12 steps, whatever the generator's row count."""
    return max(8, data.train.shape[0] // 12)


# ------------------------------------------------------------------------------ spawning

def _worker(rank, world, folder, job, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        result = globals()[job](rank, world, folder, *args)
        torch.save(result, os.path.join(folder, f"result.{rank}.pt"))
        dist.barrier()  # every process past its last collective before any disconnects
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, job, world, *args):
    folder = tmp_path / f"{job}-{next(_counter)}"
    folder.mkdir()
    # A fresh interpreter per process would import torch, torch._dynamo (which Adam loads) and
    # guider_fast anew: seconds per process on a 2-core machine.  A fork server imports them once
    # and forks each process from that clean, single-threaded state.
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch._dynamo", "guider_fast.train.distributed", __name__])
    mp.start_processes(_worker, args=(world, str(folder), job, args), nprocs=world, join=True,
                       start_method="forkserver")
    return [torch.load(folder / f"result.{rank}.pt", weights_only=False) for rank in range(world)]


def _gather_users(results, key):
    """The whole user table from each process's (users, rows)."""
    users = torch.cat([r["users"] for r in results])
    rows = torch.cat([r[key] for r in results])
    out = torch.empty_like(rows)
    out[users] = rows
    return out


# ------------------------------------------------------- one spawn: forward, calibration, evaluation

def _battery(rank, world, folder):
    data = _data()
    comm = D.Comm()
    plan = D.ShardPlan(data.train, data.n_users, 2, world, rank)
    degree = torch.bincount(torch.unique(data.train[:, 0] * data.n_items + data.train[:, 1]) % data.n_items,
                            minlength=data.n_items)
    graph = item_graph_from_features((data.text_feat, data.image_feat), 4)
    mine = data.train[plan.owns(data.train[:, 0])]
    model = ShardedGraphRecommender(data.n_users, data.n_items, plan.users, mine, degree, comm.reduce_items,
                                    dim=8, n_layers=3, item_graph=graph, seed=5)
    users_out, items_out = model()
    gen = torch.Generator().manual_seed(1)
    w_users, w_items = torch.randn(data.n_users, 8, generator=gen), torch.randn(data.n_items, 8, generator=gen)
    # The item term is replicated: each process takes its share, so the shares sum to the whole loss.
    ((users_out * w_users[plan.users]).sum() + (items_out * w_items).sum() / world).backward()
    comm.all_reduce_(model.item_emb.grad, "item_grads")
    out = {"users": plan.users, "users_out": users_out.detach(), "items_out": items_out.detach(),
           "user_grad": model.user_emb.grad, "item_grad": model.item_emb.grad,
           "init_users": model.user_emb.detach() + 0}

    # Calibration: this process's half of one batch (rank 0 the items of low distance).
    guider, (users, pos, neg), tables = _calibration_problem(data)
    half = users.shape[0] // 2
    part = slice(0, half) if rank == 0 else slice(half, None)
    args = (*tables, users[part], pos[part], neg[part])
    out["global_loss"] = guider(*args, reduction="sum", reduce_max=comm.reduce_max)
    out["global_clean"] = guider.last_calibration.clean
    out["global_weights"] = guider.last_calibration.weights
    out["local_loss"] = guider(*args, reduction="sum")
    out["local_clean"] = guider.last_calibration.clean

    # Evaluation through the sharded trainer, on tables set from one full random model.
    trainer = D.ShardedTrainer(TrainConfig(loss="bpr", virtual_shards=2, **RUN), data, log=_quiet)
    full_users, full_items = _eval_tables(data)
    trainer.model.load_state_dict({"user_emb": full_users[trainer.plan.users], "item_emb": full_items})
    out["valid"] = trainer.evaluate(trainer.model, "valid")
    out["test"] = trainer.evaluate(trainer.model, "test")
    out["baselines"] = trainer.baselines()
    return out


def _calibration_problem(data):
    torch.manual_seed(0)
    guider = GuiderLoss(data.text_feat.shape[1], data.image_feat.shape[1], embed_dim=8, threshold=0.4,
                        distance="euclidean", noisy_weight=0.25)
    guider.precompute_items(data.text_feat, data.image_feat)
    gen = torch.Generator().manual_seed(2)
    batch = 80
    users = torch.randint(0, data.n_users, (batch,), generator=gen)
    pos = torch.randint(0, data.n_items, (batch,), generator=gen)
    neg = torch.randint(0, data.n_items, (batch,), generator=gen)
    # Sorted by distance: the two halves have disjoint ranges, so per-half normalisation differs.
    order = torch.argsort(guider.item_calibration.distance[pos])
    tables = (torch.randn(data.n_users, 8, generator=gen), torch.randn(data.n_items, 8, generator=gen))
    return guider, (users[order], pos[order], neg[order]), tables


def _eval_tables(data):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(data.n_users, 8, generator=gen), torch.randn(data.n_items, 8, generator=gen)


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("battery"), "_battery", 2)


def test_sharded_forward_and_gradients_equal_the_single_process_model(battery):
    data = _data()
    graph = item_graph_from_features((data.text_feat, data.image_feat), 4)
    model = GraphRecommender(data.n_users, data.n_items, data.train, dim=8, n_layers=3, item_graph=graph, seed=5)
    users_out, items_out = model()
    gen = torch.Generator().manual_seed(1)
    w_users, w_items = torch.randn(data.n_users, 8, generator=gen), torch.randn(data.n_items, 8, generator=gen)
    ((users_out * w_users).sum() + (items_out * w_items).sum()).backward()
    assert sorted(torch.cat([r["users"] for r in battery]).tolist()) == list(range(data.n_users))
    # The same initialisation, row for row, though each process drew only its rows.
    assert torch.equal(_gather_users(battery, "init_users"), model.user_emb.detach())
    torch.testing.assert_close(_gather_users(battery, "users_out"), users_out.detach(), rtol=1e-6, atol=1e-7)
    for r in battery:  # the replicated items agree bit for bit across processes
        assert torch.equal(r["items_out"], battery[0]["items_out"])
        assert torch.equal(r["item_grad"], battery[0]["item_grad"])
    torch.testing.assert_close(battery[0]["items_out"], items_out.detach(), rtol=1e-6, atol=1e-7)
    # Gradients through the autograd all-reduces of three layers equal the single-process ones.
    torch.testing.assert_close(_gather_users(battery, "user_grad"), model.user_emb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(battery[0]["item_grad"], model.item_emb.grad, rtol=1e-5, atol=1e-6)


def test_global_calibration_equals_the_whole_batch_and_per_process_does_not(battery):
    data = _data()
    guider, (users, pos, neg), tables = _calibration_problem(data)
    whole = guider(*tables, users, pos, neg, reduction="sum")
    calibration = guider.last_calibration
    assert 0 < int(calibration.clean.sum()) < users.shape[0]  # both kinds in the batch
    clean = torch.cat([r["global_clean"] for r in battery])
    assert torch.equal(clean, calibration.clean)
    assert torch.equal(torch.cat([r["global_weights"] for r in battery]), calibration.weights)
    torch.testing.assert_close(sum(r["global_loss"] for r in battery), whole, rtol=1e-6, atol=0)
    # The negative control: each half normalised by its own min/max flags other rows and
    # gives another loss.
    local_clean = torch.cat([r["local_clean"] for r in battery])
    assert int((local_clean != calibration.clean).sum()) >= 5
    assert abs(float(sum(r["local_loss"] for r in battery) - whole)) > 1e-3 * abs(float(whole))


def test_sharded_evaluation_equals_single_process_metrics(battery):
    data = _data()
    trainer = Trainer(TrainConfig(loss="bpr", **RUN), data, log=_quiet)
    full_users, full_items = _eval_tables(data)
    trainer.model.load_state_dict({"user_emb": full_users, "item_emb": full_items})
    for split in ("valid", "test"):
        want = trainer.evaluate(trainer.model, split)
        for r in battery:  # every process holds the same (all-reduced) metrics
            assert r[split].keys() == want.keys()
            assert r[split] == pytest.approx(want, rel=1e-12, abs=1e-15)
    want = trainer.baselines()
    assert battery[0]["baselines"].keys() == want.keys() == {"popularity", "generator_ceiling"}
    for name in want:
        assert battery[1]["baselines"][name] == pytest.approx(want[name], rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------ 10 steps: W=2 equals W=1

def _ten_steps(rank, world, folder, shards, loss, distill):
    data = _data()
    # The reference preset: its flags depend on the batch's distance range (the default preset
    # separates the planted noise so cleanly that any normalisation flags the same rows).
    config = TrainConfig(loss=loss, preset="reference", distill=distill, virtual_shards=shards,
                         batch_size=_batch_size(data), epochs=1, **RUN)
    trainer = D.ShardedTrainer(config, data, log=_quiet)
    order = trainer.epoch_permutations()
    counts = torch.zeros(4, dtype=torch.long)
    losses = []
    for step in range(10):
        batch = trainer.batch(step, order)
        losses.append(float(trainer.comm.all_reduce_(trainer.step(batch, counts).clone(), "test")))
    out = {"users": trainer.plan.users, "losses": losses, "user_emb": trainer.model.user_emb.detach(),
           "item_emb": trainer.model.item_emb.detach(), "counts": trainer.comm.all_reduce_(counts, "test")}
    if trainer.student is not None:
        out["student_users"] = trainer.student.user_emb.detach()
        out["student_items"] = trainer.student.item_emb.detach()
    return out


@pytest.mark.parametrize("loss, distill", [("guider", "kl"), ("bpr", "none")])
def test_ten_steps_on_two_processes_equal_one_process_with_the_same_virtual_shards(tmp_path, loss, distill):
    one = _spawn(tmp_path, "_ten_steps", 1, 2, loss, distill)
    two = _spawn(tmp_path, "_ten_steps", 2, 2, loss, distill)
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-6, abs=1e-7)
    assert two[0]["losses"] == two[1]["losses"]
    assert len(set(one[0]["losses"])) == 10  # ten distinct batches
    assert torch.equal(two[0]["counts"], one[0]["counts"])
    # Adam moves every entry by about lr = 1e-3 a step: 1e-6 is far below one step's change.
    torch.testing.assert_close(_gather_users(two, "user_emb"), one[0]["user_emb"], rtol=0, atol=1e-6)
    torch.testing.assert_close(two[0]["item_emb"], one[0]["item_emb"], rtol=0, atol=1e-6)
    assert torch.equal(two[0]["item_emb"], two[1]["item_emb"])
    if distill != "none":  # the MGDA dot products summed over the processes
        torch.testing.assert_close(_gather_users(two, "student_users"), one[0]["student_users"], rtol=0, atol=1e-6)
        torch.testing.assert_close(two[0]["student_items"], one[0]["student_items"], rtol=0, atol=1e-6)
    # And the processes train something: the tables moved.
    init = GraphRecommender(150, 90, _data().train, dim=8, seed=0).user_emb.detach()
    assert float((one[0]["user_emb"] - init).abs().max()) > 1e-3


def _one_shard_and_one_process(rank, world, folder):
    data = _data()
    config = TrainConfig(loss="guider", batch_size=_batch_size(data), epochs=1, **RUN)
    sharded = D.ShardedTrainer(dataclass_replace(config, virtual_shards=1), data, log=_quiet)
    single = Trainer(config, data, log=_quiet)  # the single-process trainer, as without torch.distributed
    order_sharded = sharded.epoch_permutations()
    order_single = torch.randperm(single.train_pairs.shape[0], generator=single.generator)
    counts = torch.zeros(4, dtype=torch.long)
    out = {"sharded": [], "single": []}
    for step in range(10):
        out["sharded"].append(float(sharded.step(sharded.batch(step, order_sharded), counts)))
        index = order_single[step * config.batch_size:(step + 1) * config.batch_size]
        out["single"].append(float(single.step(index, counts)))
    out["tables"] = (sharded.model.user_emb.detach(), single.model.user_emb.detach(),
                     sharded.model.item_emb.detach(), single.model.item_emb.detach())
    return out


def test_one_virtual_shard_trains_the_single_process_model(tmp_path):
    """V = 1 batches, samples and initialises exactly as one process without torch.distributed."""
    (out,) = _spawn(tmp_path, "_one_shard_and_one_process", 1)
    assert out["sharded"] == pytest.approx(out["single"], rel=1e-6)
    users_a, users_b, items_a, items_b = out["tables"]
    torch.testing.assert_close(users_a, users_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(items_a, items_b, rtol=0, atol=1e-6)


# ------------------------------------------------------------ checkpoint, kill, resume

def _run(rank, world, folder, changes, crash_at_manifest_of=None):
    if crash_at_manifest_of is not None:
        real = D._write_manifest

        def write_manifest(manifest, path):
            if manifest["epoch"] == crash_at_manifest_of:
                os._exit(3)  # killed after every shard of this epoch is written, before its manifest
            real(manifest, path)

        D._write_manifest = write_manifest
    data = _data()
    config = TrainConfig(loss="guider", batch_size=_batch_size(data) * 2, epochs=3, patience=10, **RUN, **changes)
    trainer = D.ShardedTrainer(config, data, log=_quiet)
    result = trainer.run()
    return {"result": result, "users": trainer.plan.users, "user_emb": trainer.model.user_emb.detach(),
            "item_emb": trainer.model.item_emb.detach()}


def test_a_killed_run_resumes_exactly_and_on_another_number_of_processes(tmp_path):
    straight = _spawn(tmp_path, "_run", 2, {})
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    checkpoint = str(ckpt_dir / "run.pt")
    with pytest.raises(Exception, match="exit code 3|exited with exit code 3"):
        _spawn(tmp_path, "_run", 2, {"checkpoint": checkpoint}, 3)
    # The epoch-3 shards are on disk, but the manifest still names epoch 2 and its files.
    manifest = D.read_manifest(checkpoint)
    assert manifest["epoch"] == 2 and manifest["world_size"] == 2
    assert all(os.path.exists(f) for f in D.manifest_files(manifest, checkpoint))
    assert any("-e3.shard" in name for name in os.listdir(ckpt_dir))
    copy_dir = tmp_path / "copy"
    shutil.copytree(ckpt_dir, copy_dir)

    resumed = _spawn(tmp_path, "_run", 2, {"checkpoint": checkpoint, "resume": True})
    want, got = straight[0]["result"], resumed[0]["result"]
    assert [r["loss"] for r in got["history"]] == [r["loss"] for r in want["history"]]
    assert got["test"] == want["test"] and got["valid"] == want["valid"]
    assert torch.equal(_gather_users(resumed, "user_emb"), _gather_users(straight, "user_emb"))
    assert torch.equal(resumed[0]["item_emb"], straight[0]["item_emb"])
    # The resumed run's own save replaced the old files: one manifest's worth is left.
    final = D.read_manifest(checkpoint)
    assert final["epoch"] == 3
    assert sorted(os.listdir(ckpt_dir)) == sorted(["run.pt"] + [os.path.basename(f) for f in
                                                                D.manifest_files(final, checkpoint)])

    # One process resumes the two-process checkpoint: its users gathered by id, its two
    # virtual shards' streams with them.
    resharded = _spawn(tmp_path, "_run", 1, {"checkpoint": str(copy_dir / "run.pt"), "resume": True})
    got = resharded[0]["result"]
    assert got["distributed"] == {"world_size": 1, "virtual_shards": 2, "backend": "gloo"}
    assert [r["loss"] for r in got["history"]] == pytest.approx([r["loss"] for r in want["history"]], rel=1e-6)
    torch.testing.assert_close(resharded[0]["user_emb"], _gather_users(straight, "user_emb"), rtol=0, atol=1e-6)
    torch.testing.assert_close(resharded[0]["item_emb"], straight[0]["item_emb"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------- the command line

ARGS = ["--n-users", "150", "--n-items", "90", "--dim", "8", "--knn", "0", "--batch-size", "128", "--no-progress"]


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _torchrun():
    beside = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [beside] if os.path.exists(beside) else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_trains_with_one_set_of_outputs_and_nproc_resumes_it(tmp_path):
    metrics, checkpoint = tmp_path / "metrics.json", tmp_path / "run.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["train", "--loss", "guider", "--checkpoint", str(checkpoint), "--metrics-json", str(metrics)] + ARGS
    done = subprocess.run(_torchrun() + ["--standalone", "--nproc-per-node", "2", "-m", "guider_fast.cli"] + common
                          + ["--epochs", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("best epoch 1 of 1") == 1  # process 0 alone prints
    assert done.stdout.count("synthetic") == 1  # and logs
    result = json.loads(metrics.read_text())
    assert result["distributed"] == {"world_size": 2, "virtual_shards": 2, "backend": "gloo"}
    assert result["epochs_run"] == 1
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if ".shard" in n and n.endswith("of2")] and len(names) == 5, names  # 2 shards + items

    # guider-fast train --nproc 2: torchrun underneath, resuming the checkpoint.
    done = subprocess.run([sys.executable, "-m", "guider_fast.cli"] + common
                          + ["--nproc", "2", "--resume", "--epochs", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("resumed from") == 1 and done.stdout.count("best epoch") == 1
    assert json.loads(metrics.read_text())["epochs_run"] == 2


@pytest.mark.parametrize("argv, words", [
    (["--nproc", "2", "--distill", "ot"], "--distill kl"),
    (["--nproc", "2", "--virtual-shards", "1"], "--virtual-shards"),
    (["--nproc", "0"], "positive integer"),
    (["--virtual-shards", "2"], "--nproc"),
])
def test_launch_mistakes_are_one_line(capsys, argv, words):
    assert cli.main(["train", "--epochs", "1"] + argv + ARGS) == 2
    assert words in _one_line(capsys.readouterr().err)


def test_a_single_process_does_not_resume_a_sharded_checkpoint(tmp_path, capsys):
    path = tmp_path / "run.pt"
    torch.save({"format": SHARDED_FORMAT, "version": D.MANIFEST_VERSION, "world_size": 2}, path)
    assert cli.main(["train", "--epochs", "1", "--checkpoint", str(path), "--resume"] + ARGS) == 2
    line = _one_line(capsys.readouterr().err)
    assert "multi-process run (2 processes)" in line and "--nproc" in line


def test_resume_refusals_name_the_reason(tmp_path):
    single = tmp_path / "single.pt"
    Trainer(TrainConfig(loss="bpr", epochs=1, checkpoint=str(single), **RUN), _data(), log=_quiet).run()
    with pytest.raises(ValueError, match="single-process run.*without --nproc"):
        D.read_manifest(str(single))
    config = TrainConfig(loss="bpr", virtual_shards=2, **RUN).resolved()
    manifest = {"config": {k: getattr(config, k) for k in D.RESUME_KEYS}, "virtual_shards": 2,
                "data_fingerprint": "f"}
    D.check_resume(manifest, config, "f", 2, "c.pt")  # fits
    with pytest.raises(ValueError, match="at most 2 processes, not 3"):
        D.check_resume(manifest, dataclass_replace(config, virtual_shards=2), "f", 3, "c.pt")
    with pytest.raises(ValueError, match="virtual_shards=2"):
        D.check_resume(manifest, dataclass_replace(config, virtual_shards=4), "f", 2, "c.pt")
    with pytest.raises(ValueError, match="other interactions"):
        D.check_resume(manifest, config, "g", 2, "c.pt")


# ------------------------------------------------------------ pieces, in one process

def test_metric_sums_of_user_halves_add_up_to_ranking_metrics():
    gen = torch.Generator().manual_seed(0)
    users, items = torch.randn(40, 6, generator=gen), torch.randn(30, 6, generator=gen)
    pairs = torch.stack([torch.randint(0, 40, (120,), generator=gen), torch.randint(0, 30, (120,), generator=gen)], 1)
    exclude = torch.stack([torch.randint(0, 40, (60,), generator=gen), torch.randint(0, 30, (60,), generator=gen)], 1)
    want = ranking_metrics(users, items, pairs, exclude, ks=(5, 20))
    total = None
    for half in (pairs[:, 0] < 17, pairs[:, 0] >= 17):
        names, sums = ranking_metric_sums(users, items, pairs[half], exclude, ks=(5, 20))
        total = sums if total is None else total + sums
    assert metrics_from_sums(names, total) == pytest.approx(want, rel=1e-12)
    names, empty = ranking_metric_sums(users, items, pairs[:0], exclude, ks=(5, 20))
    assert empty.tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="no user"):
        metrics_from_sums(names, empty)


def test_guider_loss_with_an_identity_reduction_is_the_whole_batch():
    """reduce_max over one process changes nothing, with the item cache and with features."""
    data = _data()
    guider, (users, pos, neg), tables = _calibration_problem(data)
    for features in ((), (data.text_feat, data.image_feat)):
        if features:
            guider.clear_item_cache()
        plain = guider(*tables, users, pos, neg, *features)
        flags = guider.last_calibration
        split = guider(*tables, users, pos, neg, *features, reduce_max=lambda t: t)
        assert torch.equal(split, plain)
        assert torch.equal(guider.last_calibration.clean, flags.clean)
        assert torch.equal(guider.last_calibration.normalized, flags.normalized)


def test_the_plan_covers_every_row_once_and_one_shard_is_the_single_process_order():
    data = _data()
    n = data.train.shape[0]
    plans = [D.ShardPlan(data.train, data.n_users, 3, 2, rank) for rank in range(2)]
    assert plans[0].shards == [0, 2] and plans[1].shards == [1]
    seen = []
    batch = 50
    for step in range(plans[0].steps(batch)):
        size = sum(p.start(v, step + 1, batch) - p.start(v, step, batch) for p in plans for v in p.shards)
        assert size == plans[0].global_batch(step, batch)
        assert size <= batch + 3 and (size >= batch - 3 or step == plans[0].steps(batch) - 1)
        for p in plans:
            for v in p.shards:
                seen += p.rows[v][p.start(v, step, batch):p.start(v, step + 1, batch)].tolist()
    assert sorted(seen) == list(range(n))
    one = D.ShardPlan(data.train, data.n_users, 1, 1, 0)
    assert [one.start(0, s, batch) for s in range(4)] == [min(s * batch, n) for s in range(4)]
    assert torch.equal(one.users, torch.arange(data.n_users))
    assert D.shard_seed(7, 0) == 7 and D.shard_seed(7, 1) != D.shard_seed(7, 2)
    with pytest.raises(ValueError, match="at least one virtual shard"):
        D.ShardPlan(data.train, data.n_users, 1, 2, 0)


def test_importing_guider_fast_initialises_nothing():
    code = ("import sys, guider_fast, guider_fast.train.distributed, guider_fast.train.cli; import torch;"
            "assert not torch.distributed.is_initialized(); assert not torch.cuda.is_initialized(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_ctrl_c_on_several_processes_names_the_same_number_again(tmp_path):
    from guider_fast.train.cli import _interrupted

    class Stopped:
        class state:
            epoch = 2
        saved_epoch = 2

    checkpoint = tmp_path / "run.pt"
    checkpoint.write_bytes(b"")
    line = _interrupted(TrainConfig(checkpoint=str(checkpoint), epochs=5), Stopped(), world_size=2)
    assert "continue with: guider-fast train --nproc 2 " in line and "--resume" in line
    assert "--nproc" not in _interrupted(TrainConfig(checkpoint=str(checkpoint)), Stopped())
