"""guider_fast.train.data: MMRec loader (round trip, errors naming file/line/column), synthetic generator
(determinism, planted noise, held-out splits, modality disagreement, scale) and NegativeSampler."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from guider_fast.train.data import (InteractionData, NegativeSampler, load_mmrec, synthetic,
                                    with_synthetic_features)

# Real MMRec datasets, when a folder of them is named (as the benchmarks read them).
BABY = Path(os.environ.get("GUIDER_DATA", "/nonexistent")) / "amazon_baby"

ROWS = [  # (user, item, x_label)
    (0, 3, 0), (0, 1, 0), (1, 2, 0), (2, 0, 0), (2, 4, 1), (1, 4, 2), (0, 0, 1), (3, 2, 0), (3, 1, 2),
]


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def _inter_text(rows=ROWS, header="userID\titemID\tx_label"):
    return header + "\n" + "".join(f"{u}\t{i}\t{x}\n" for u, i, x in rows)


def _pairs(t: torch.Tensor):
    return [tuple(r) for r in t.tolist()]


# ------------------------------------------------------------------------------------------------
# Loader
# ------------------------------------------------------------------------------------------------

def test_load_round_trip_without_features(tmp_path):
    _write(tmp_path / "toy.inter", _inter_text())
    d = load_mmrec(tmp_path)
    assert isinstance(d, InteractionData)
    assert d.name == "toy"
    assert (d.n_users, d.n_items) == (4, 5)
    for split, label in ((d.train, 0), (d.valid, 1), (d.test, 2)):
        assert split.dtype == torch.int64 and split.shape[1] == 2
        assert _pairs(split) == [(u, i) for u, i, x in ROWS if x == label]  # file order kept
    assert d.text_feat is None and d.image_feat is None and d.noisy is None
    line = d.summary()
    assert "4 users" in line and "5 items" in line and "\n" not in line


def test_load_features_column_order_and_extra_columns(tmp_path):
    # MMRec's own layout: userID itemID rating timestamp x_label, here permuted, with float ratings.
    header = "x_label\trating\titemID\ttimestamp\tuserID"
    body = "".join(f"{x}\t{4.5}\t{i}\t{1300000000 + k}\t{u}\n" for k, (u, i, x) in enumerate(ROWS))
    _write(tmp_path / "baby.inter", header + "\n" + body)
    text = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    np.save(tmp_path / "text_feat.npy", text)
    d = load_mmrec(tmp_path / "baby.inter")
    assert _pairs(d.train) == [(u, i) for u, i, x in ROWS if x == 0]
    assert torch.equal(d.text_feat, torch.from_numpy(text))
    assert d.image_feat is None  # missing modality
    image = np.random.default_rng(1).standard_normal((5, 3))  # float64 on disk -> float32
    np.save(tmp_path / "image_feat.npy", image)
    d = load_mmrec(tmp_path, name="baby")
    assert d.image_feat.dtype == torch.float32 and d.image_feat.shape == (5, 3)
    assert "text 7-d" in d.summary() and "image 3-d" in d.summary()


def test_load_crlf_blank_lines_and_bom(tmp_path):
    text = "\ufeff" + _inter_text().replace("\n", "\r\n") + "\r\n\r\n"
    _write(tmp_path / "x.inter", text)
    d = load_mmrec(tmp_path)
    assert _pairs(d.train) == [(u, i) for u, i, x in ROWS if x == 0]


def test_slow_path_accepts_non_numeric_extra_column(tmp_path):
    header = "userID\titemID\tx_label\treview"
    body = "".join(f"{u}\t{i}\t{x}\tgreat product\n" for u, i, x in ROWS)
    _write(tmp_path / "r.inter", header + "\n" + body)
    d = load_mmrec(tmp_path)
    assert _pairs(d.test) == [(u, i) for u, i, x in ROWS if x == 2]
    # integral floats are ids on both paths (fast: numeric extra column; slow: text extra column)
    _write(tmp_path / "r.inter", header + "\n" + "0\t1.0\t0\tx\n1\t2\t2.0\ty\n")
    d = load_mmrec(tmp_path)
    assert _pairs(d.train) == [(0, 1)] and _pairs(d.test) == [(1, 2)]


BAD_CASES = [
    # (file text, line, column or None, message fragment)
    ("userID\titemID\n0\t1\n", 1, "x_label", "no column"),
    ("userID itemID x_label\n0 1 0\n", 1, "userID", "tabs"),
    ("userID\titemID\tx_label\n0\t1\t0\n1\t2\n", 3, "x_label", "expected 3"),
    ("x_label\titemID\tuserID\n0\t1\t0\n1\n", 3, "itemID", "got 1"),
    ("userID\titemID\tx_label\tnote\n0\t1\t0\tok\n1\t2\t0\n", 3, "note", "got 3"),
    ("userID\titemID\tx_label\n0\t1\t0\n1\t2\t0\t9\n", 3, None, "got 4"),
    ("userID\titemID\tx_label\n0\t1\t0\n0\tabc\t0\n", 3, "itemID", "'abc'"),
    ("userID\titemID\tx_label\n0\t1\t0\n0\t1.5\t0\n", 3, "itemID", "'1.5'"),
    ("userID\titemID\tx_label\n0\t1\t0\n\n0\t\t0\n", 4, "itemID", "integer"),
    ("userID\titemID\tx_label\n0\t1\t0\n-3\t1\t0\n", 3, "userID", "negative"),
    ("userID\titemID\tx_label\n0\t1\t0\n2\t1\t3\n", 3, "x_label", "0 (train), 1 (valid) or 2 (test)"),
    ("userID\titemID\tx_label\n0\t1\t0\n2\t1\t-1\n", 3, "x_label", "got '-1'"),
    ("userID\titemID\tx_label\tnote\n0\t1\t0\tok\n-2\t1\t0\tbad\n", 3, "userID", "negative id '-2'"),
    ("userID\titemID\tx_label\tnote\n0\t1\t0\tok\n2\tx1\t0\tbad\n", 3, "itemID", "'x1'"),
    ("userID\titemID\tx_label\tnote\n0\t1\t0\tok\n2\t1\t7\tbad\n", 3, "x_label", "got '7'"),
    ("userID\titemID\tx_label\n0\t99999999999999999999999\t0\n", 2, "itemID", "too large"),
    ("userID\titemID\tx_label\n0\t1\t1\n1\t1\t2\n", None, "x_label", "no training rows"),
    ("userID\titemID\tx_label\n", 2, "x_label", "no data rows"),
    ("", 1, None, "empty file"),
    ("userID\titemID\tx_label\tx_label\n0\t1\t0\t0\n", 1, "x_label", "twice"),
]


@pytest.mark.parametrize("text,line,column,fragment", BAD_CASES)
def test_load_errors_name_file_line_column(tmp_path, text, line, column, fragment):
    f = _write(tmp_path / "bad.inter", text)
    with pytest.raises(ValueError) as info:
        load_mmrec(tmp_path)
    msg = str(info.value)
    assert str(f) in msg
    if line is not None:
        assert f"line {line}" in msg, msg
    if column is not None:
        assert f"column '{column}'" in msg, msg
    assert fragment in msg, msg


def test_bad_value_deep_in_a_big_file_is_located(tmp_path):
    rows = [(u % 1000, u % 777, 0) for u in range(50_000)]
    rows[31_415] = (5, 7, 9)
    _write(tmp_path / "big.inter", _inter_text(rows))
    with pytest.raises(ValueError, match=r"line 31417, column 'x_label'.*'9'"):
        load_mmrec(tmp_path)


@pytest.mark.parametrize("case", ["rows", "ndim", "nan", "garbage"])
def test_feature_errors_name_the_file(tmp_path, case):
    _write(tmp_path / "toy.inter", _inter_text())
    f = tmp_path / "image_feat.npy"
    if case == "rows":
        np.save(f, np.zeros((4, 3), np.float32))
        pattern = "4 rows.*n_items = 5"
    elif case == "ndim":
        np.save(f, np.zeros(5, np.float32))
        pattern = "2-D"
    elif case == "nan":
        a = np.zeros((5, 3), np.float32)
        a[3, 1] = np.nan
        np.save(f, a)
        pattern = "NaN or Inf.*row 3"
    else:
        f.write_bytes(b"not an npy file")
        pattern = "cannot read"
    with pytest.raises(ValueError, match=pattern) as info:
        load_mmrec(tmp_path)
    assert str(f) in str(info.value)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mmrec(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no .inter file"):
        load_mmrec(tmp_path)
    _write(tmp_path / "a.inter", _inter_text())
    with pytest.raises(FileNotFoundError, match="'b.inter'.*a.inter"):
        load_mmrec(tmp_path, name="b")
    _write(tmp_path / "c.inter", _inter_text())
    with pytest.raises(ValueError, match="several .inter files.*name="):
        load_mmrec(tmp_path)
    assert load_mmrec(tmp_path, name="c").name == "c"


def test_load_300k_lines(tmp_path):
    rng = np.random.default_rng(0)
    n = 300_000
    table = np.stack([rng.integers(0, 40_000, n), rng.integers(0, 20_000, n), rng.integers(0, 3, n)], 1)
    (tmp_path / "s.inter").write_text("userID\titemID\tx_label\n"
                                      + "\n".join("\t".join(map(str, r)) for r in table.tolist()) + "\n")
    d = load_mmrec(tmp_path)
    assert len(d.train) + len(d.valid) + len(d.test) == n
    got = torch.cat([d.train, d.valid, d.test]).numpy()
    want = np.concatenate([table[table[:, 2] == split, :2] for split in range(3)])
    np.testing.assert_array_equal(np.sort(got.view("i8,i8"), axis=0), np.sort(want.astype(np.int64).view("i8,i8"), axis=0))


@pytest.mark.skipif(not BABY.is_dir(), reason="set GUIDER_DATA to a folder holding amazon_baby/ to test the real data")
def test_real_amazon_baby():
    f = BABY / "baby.inter"
    lines = f.read_text().splitlines()
    header = lines[0].split("\t")
    rows = np.array([[int(x) for x in ln.split("\t")] for ln in lines[1:] if ln.strip()])
    cols = [header.index(c) for c in ("userID", "itemID", "x_label")]
    users, items, labels = rows[:, cols[0]], rows[:, cols[1]], rows[:, cols[2]]
    d = load_mmrec(BABY)
    assert d.n_users == users.max() + 1 == len(np.unique(users))
    assert d.n_items == items.max() + 1 == len(np.unique(items))
    assert (d.n_users, d.n_items) == (19445, 7050)
    assert [len(d.train), len(d.valid), len(d.test)] == [int((labels == s).sum()) for s in range(3)]
    assert len(d.train) + len(d.valid) + len(d.test) == 160_792
    assert np.array_equal(d.train.numpy(), rows[labels == 0][:, cols[:2]])
    assert d.text_feat is None and d.image_feat is None

    f2 = with_synthetic_features(d, text_dim=16, image_dim=24, seed=3)
    assert f2.text_feat.shape == (7050, 16) and f2.image_feat.shape == (7050, 24)
    assert f2.train is d.train and d.text_feat is None  # a copy; the input is untouched
    f3 = with_synthetic_features(d, text_dim=16, image_dim=24, seed=3)
    assert torch.equal(f2.text_feat, f3.text_feat) and torch.equal(f2.image_feat, f3.image_feat)


# ------------------------------------------------------------------------------------------------
# Synthetic generator
# ------------------------------------------------------------------------------------------------

SMALL = dict(n_users=1500, n_items=1200, text_dim=24, image_dim=32, dim=8)
FIELDS = ("train", "valid", "test", "text_feat", "image_feat", "noisy")


def test_synthetic_determinism():
    a, b, c = synthetic(**SMALL, seed=5), synthetic(**SMALL, seed=5), synthetic(**SMALL, seed=6)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.text_feat, c.text_feat)
    assert a.train.shape != c.train.shape or not torch.equal(a.train, c.train)


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.2, 0.35])
def test_synthetic_structure_and_noise_share(noise):
    d = synthetic(**SMALL, noise=noise, seed=1)
    assert (d.n_users, d.n_items) == (1500, 1200)
    for t in (d.train, d.valid, d.test):
        assert t.dtype == torch.int64 and t.dim() == 2 and t.shape[1] == 2
        assert t[:, 0].min() >= 0 and t[:, 0].max() < d.n_users
        assert t[:, 1].min() >= 0 and t[:, 1].max() < d.n_items
    assert d.text_feat.shape == (1200, 24) and d.image_feat.shape == (1200, 32)
    assert d.text_feat.dtype == d.image_feat.dtype == torch.float32
    assert d.noisy.dtype == torch.bool and d.noisy.shape == (len(d.train),)
    assert abs(d.noisy.float().mean().item() - noise) < 0.01
    total = len(d.train) + len(d.valid) + len(d.test)
    assert abs(total / d.n_users - 8) < 0.5                      # interactions_per_user on average
    assert abs(len(d.valid) / total - 0.1) < 0.02 and abs(len(d.test) / total - 0.1) < 0.02
    assert torch.equal(d.train[:, 0].unique(), torch.arange(d.n_users))  # every user has a train row
    keys = {name: (t[:, 0] * d.n_items + t[:, 1]) for name, t in (("tr", d.train), ("va", d.valid),
                                                                    ("te", d.test))}
    all_keys = torch.cat(list(keys.values()))
    assert len(all_keys.unique()) == len(all_keys)  # no pair twice: nothing held out is in train
    noisy_items = d.train[d.noisy, 1].unique()
    clean_items = torch.cat([d.train[~d.noisy, 1], d.valid[:, 1], d.test[:, 1]]).unique()
    assert not torch.isin(noisy_items, clean_items).any()  # corrupted rows use inconsistent items only


def _disagreement(d: InteractionData) -> torch.Tensor:
    """Per-item residual of the best affine text -> image map (fitted on all items)."""
    x = torch.cat([d.text_feat, torch.ones(d.n_items, 1)], 1).double()
    y = d.image_feat.double()
    w = torch.linalg.lstsq(x, y).solution
    return (y - x @ w).norm(dim=1)


def test_synthetic_corrupted_items_disagree_across_modalities():
    d = synthetic(**SMALL, noise=0.2, seed=2)
    res = _disagreement(d)[d.train[:, 1]]
    noisy, clean = res[d.noisy], res[~d.noisy]
    assert noisy.mean() > 2 * clean.mean()
    auc = (noisy[:, None] > clean[None, :]).double().mean()
    assert auc > 0.95
    # real-graph features carry no planted disagreement
    f = with_synthetic_features(d, text_dim=24, image_dim=32, dim=8)
    res_f = _disagreement(f)[d.train[:, 1]]
    assert res_f[d.noisy].mean() < 1.5 * res_f[~d.noisy].mean()


def test_synthetic_argument_errors():
    with pytest.raises(ValueError, match="noise"):
        synthetic(**SMALL, noise=1.0)
    with pytest.raises(ValueError, match="valid_share"):
        synthetic(**SMALL, valid_share=-0.1)
    with pytest.raises(ValueError, match="valid_share \\+ test_share"):
        synthetic(**SMALL, valid_share=0.5, test_share=0.5)
    with pytest.raises(ValueError, match="n_items"):
        synthetic(n_users=10, n_items=0)


def test_synthetic_tiny_catalogue():
    d = synthetic(n_users=50, n_items=12, interactions_per_user=8, text_dim=4, image_dim=4, dim=4, seed=0)
    keys = torch.cat([d.train, d.valid, d.test])
    keys = keys[:, 0] * d.n_items + keys[:, 1]
    assert len(keys.unique()) == len(keys)
    assert abs(d.noisy.float().mean().item() - 0.2) < 0.05


def test_synthetic_million_items():
    # A small candidate pool: this checks the catalogue's scale; the cost of the default pool is
    # n_users x pool draws (about 15 s of one core here), the same code at any catalogue size.
    d = synthetic(n_users=100_000, n_items=1_000_000, text_dim=16, image_dim=16, pool=128, seed=0)
    assert d.n_items == 1_000_000 and d.text_feat.shape == (1_000_000, 16)
    assert abs(d.noisy.float().mean().item() - 0.2) < 0.01


# ------------------------------------------------------------------------------------------------
# Negative sampling
# ------------------------------------------------------------------------------------------------

def _dense_case(gen, n_users=7, n_items=11, density=0.6):
    mask = torch.rand(n_users, n_items, generator=gen) < density
    mask[0] = False
    mask[0, 3] = True             # a user with one positive
    mask[1] = True
    mask[1, 5] = False            # a user whose only negative is item 5
    mask[2] = False               # a user with no positives
    train = mask.nonzero()
    return train[torch.randperm(len(train), generator=gen)], mask


def test_negative_sampler_never_returns_a_positive_and_covers_the_rest(gen):
    train, mask = _dense_case(gen)
    train = torch.cat([train, train[:5]])  # duplicate rows are harmless
    s = NegativeSampler(train, 7, 11)
    users = torch.arange(7).repeat_interleave(3000)
    neg = s.sample(users, generator=gen)
    assert neg.shape == users.shape and neg.dtype == torch.int64
    assert not mask[users, neg].any()
    assert not s.contains(users, neg).any() and s.contains(train[:, 0], train[:, 1]).all()
    assert (neg[users == 1] == 5).all()
    for u in range(7):
        counts = torch.bincount(neg[users == u], minlength=11)
        allowed = ~mask[u]
        assert (counts[allowed] > 0).all() and (counts[~allowed] == 0).all()
        expected = 3000 / allowed.sum().item()
        assert ((counts[allowed] - expected).abs() < 6 * expected ** 0.5 + 1).all()  # roughly uniform


def test_negative_sampler_exhaustive_small_dense(gen):
    # every user, every possible positive set size: the drawn item is never a positive
    n_items = 6
    subsets = torch.tensor([[(m >> j) & 1 for j in range(n_items)] for m in range(2 ** n_items - 1)],
                           dtype=torch.bool)  # all subsets except "all items"
    s = NegativeSampler(subsets.nonzero(), len(subsets), n_items)
    users = torch.arange(len(subsets)).repeat(200)
    neg = s.sample(users, 3, generator=gen)
    assert neg.shape == (len(users), 3)
    assert not subsets[users[:, None], neg].any()
    seen = torch.zeros_like(subsets)
    seen[users[:, None].expand_as(neg), neg] = True
    assert torch.equal(seen, ~subsets)  # every non-positive item is reachable


def test_negative_sampler_shapes_determinism_and_scale(gen):
    d = synthetic(**SMALL, seed=0)
    s = NegativeSampler(d.train, d.n_users, d.n_items)
    users = torch.randint(0, d.n_users, (4096,), generator=gen)
    one = s.sample(users)
    five = s.sample(users, 5)
    assert one.shape == (4096,) and five.shape == (4096, 5)
    assert not s.contains(users[:, None], five).any()
    a = s.sample(users, 5, generator=torch.Generator().manual_seed(1))
    b = s.sample(users, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert s.sample(users[:0], 4).shape == (0, 4)


def test_negative_sampler_errors(gen):
    train = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0]])
    s = NegativeSampler(train, 3, 3)
    with pytest.raises(ValueError, match="user 0 has interacted with every item"):
        s.sample(torch.tensor([1, 2, 0]))
    assert s.sample(torch.tensor([1, 2, 1])).shape == (3,)
    with pytest.raises(IndexError, match="users"):
        s.sample(torch.tensor([3]))
    with pytest.raises(ValueError, match="k must be"):
        s.sample(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="users must be 1-D"):
        s.sample(torch.tensor([[1]]))
    with pytest.raises(TypeError, match="users"):
        s.sample(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="train must"):
        NegativeSampler(torch.zeros(4, 3, dtype=torch.int64), 3, 3)
    with pytest.raises(IndexError, match="item ids"):
        NegativeSampler(torch.tensor([[0, 3]]), 3, 3)
    with pytest.raises(IndexError, match="user ids"):
        NegativeSampler(torch.tensor([[-1, 0]]), 3, 3)
