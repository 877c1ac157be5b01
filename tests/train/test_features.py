"""guider_fast.train.features / ``guider-fast text-features``: MMRec text_feat.npy from an item-text file.

The parsing, ordering, error and CLI tests use a stand-in encoder and always run; the tests with
the real sentence-embedding model skip unless its package (``guider_fast[text]``) is installed."""

import importlib.util
import sys

import numpy as np
import pytest

from guider_fast import cli
from guider_fast.train import features
from guider_fast.train.data import load_mmrec

HAVE_MODEL = importlib.util.find_spec(features.MODEL_PACKAGE) is not None
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="the text model package is not installed: "
                                                        "pip install 'guider_fast[text]' to run this test")

ITEMS = ("itemID\ttitle\tdescription\n"
         "2\tOrganic cotton baby bib\tSoft, three-pack, machine washable\n"
         "0\tStroller rain cover\tFits most strollers\n"
         "1\tBaby bottle warmer\t\n"
         "3\tCotton muslin bibs for babies\tPack of three soft bibs\n")


class FakeModel:
    """Sentence-transformers' ``encode`` contract: one unit row per text (its length and a hash)."""

    def __init__(self):
        self.calls = []

    def encode(self, texts, batch_size, convert_to_numpy, normalize_embeddings, show_progress_bar):
        self.calls.append(list(texts))
        rows = np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], dtype=np.float64)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _write(tmp_path, text, name="items.tsv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_texts_come_in_item_order_with_the_fields_joined(tmp_path):
    texts = features.read_item_texts(_write(tmp_path, ITEMS))
    assert texts == ["Stroller rain cover. Fits most strollers", "Baby bottle warmer",
                     "Organic cotton baby bib. Soft, three-pack, machine washable",
                     "Cotton muslin bibs for babies. Pack of three soft bibs"]
    assert features.read_item_texts(_write(tmp_path, ITEMS), columns=["title"])[1] == "Baby bottle warmer"


@pytest.mark.parametrize("text, fragment", [
    ("item\ttitle\n0\ta\n", "line 1: header has no column 'itemID'"),
    ("itemID title\n0 a\n", "fields must be separated by tabs"),
    ("itemID\n0\n", "no text column"),
    ("itemID\ttitle\n0\ta\nx\tb\n", "line 3, column 'itemID': expected a non-negative integer id, got 'x'"),
    ("itemID\ttitle\n0\ta\n0\tb\n", "line 3, column 'itemID': item 0 appears twice"),
    ("itemID\ttitle\n0\ta\tb\n", "line 2: expected 2 tab-separated fields"),
    ("itemID\ttitle\n0\ta\n3\tb\n", "2 of 4 items have no row (ids 1, 2)"),
    ("itemID\ttitle\n", "no item rows"),
])
def test_malformed_files_name_the_line_and_column(tmp_path, text, fragment):
    with pytest.raises(ValueError, match="items.tsv") as info:
        features.read_item_texts(_write(tmp_path, text))
    assert fragment in str(info.value)


def test_n_items_must_cover_the_ids(tmp_path):
    path = _write(tmp_path, ITEMS)
    with pytest.raises(ValueError, match="item id 3 is >= n_items = 3"):
        features.read_item_texts(path, n_items=3)
    with pytest.raises(ValueError, match="1 of 5 items have no row \\(ids 4\\)"):
        features.read_item_texts(path, n_items=5)
    with pytest.raises(ValueError, match="no column 'brand'"):
        features.read_item_texts(path, columns=["brand"])


def test_written_features_load_as_the_dataset_s_text_modality(tmp_path):
    _write(tmp_path, "userID\titemID\tx_label\n" + "".join(f"{u}\t{i}\t{s}\n" for u in range(3) for i, s in
                                                            zip(range(4), (0, 0, 1, 2))), "toy.inter")
    model = FakeModel()
    path, shape = features.write_text_features(_write(tmp_path, ITEMS), tmp_path, model=model)
    assert path == tmp_path / "text_feat.npy" and shape == (4, 3)
    assert len(model.calls) == 1 and model.calls[0][0].startswith("Stroller")
    data = load_mmrec(tmp_path)
    assert data.text_feat.shape == (4, 3) and data.image_feat is None
    with pytest.raises(ValueError, match="already exists: pass --overwrite"):
        features.write_text_features(tmp_path / "items.tsv", tmp_path, model=model)
    features.write_text_features(tmp_path / "items.tsv", tmp_path, model=model, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.tsv", "text_feat.npy", "toy.inter"]


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    items = _write(tmp_path, ITEMS)
    assert cli.main(["text-features", str(items), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output folder" in err and "does not exist" in err
    assert cli.main(["text-features", str(tmp_path / "nope.tsv"), str(tmp_path)]) == 2
    assert "nope.tsv: no such file" in capsys.readouterr().err
    # Without the model package: the install line, no traceback.
    monkeypatch.setitem(sys.modules, features.MODEL_PACKAGE, None)
    assert cli.main(["text-features", str(items), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'guider_fast[text]'" in err
    assert not (tmp_path / "text_feat.npy").exists()


@needs_model
def test_the_packaged_model_embeds_a_small_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = _write(tmp_path, ITEMS)
    assert cli.main(["text-features", str(items), str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    feat = np.load(tmp_path / "text_feat.npy")
    assert feat.shape == (4, 384) and feat.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feat, axis=1), 1.0, atol=1e-5)
    sims = feat @ feat.T
    # The two bib listings are each other's nearest neighbour.
    assert int(np.argsort(-sims[2])[1]) == 3 and int(np.argsort(-sims[3])[1]) == 2
