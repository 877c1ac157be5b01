"""Interaction data for GUIDER: an MMRec-format loader, a synthetic generator with planted
noise, synthetic modality features for real graphs, and a vectorised negative sampler.

Public API
----------
InteractionData                     the container every model and trainer consumes
load_mmrec(path, *, name=None)      ``<name>.inter`` (+ optional ``text_feat.npy`` / ``image_feat.npy``)
synthetic(n_users=20_000, n_items=7_000, ...)   the embedded default data set (known noisy rows)
with_synthetic_features(data, ...)  text/image features for a real graph that has none
NegativeSampler(train, n_users, n_items, device=None).sample(users, k=1, generator=None)

Everything here is deterministic for a given seed / generator.  Nothing initialises CUDA
unless a CUDA device or tensor is passed in.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from .._validate import ValueChecks, checks_enabled, require_index, require_int, require_rank

__all__ = [
    "InteractionData",
    "NegativeSampler",
    "load_mmrec",
    "synthetic",
    "with_synthetic_features",
]

# Ids at or above this bound are rejected: MMRec files are re-indexed from 0, and a stray huge id
# would otherwise size every embedding table by it.  (Also keeps user * n_items + item in int64.)
MAX_ID = 2**31 - 1

REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
FEATURE_FILES = (("text_feat", "text_feat.npy"), ("image_feat", "image_feat.npy"))


# ---------------------------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------------------------

@dataclass
class InteractionData:
    """A user-item interaction graph split into train / valid / test, with optional features.

    ``train``, ``valid`` and ``test`` are ``(n, 2)`` int64 tensors of ``(user, item)`` rows
    (MMRec ``x_label`` 0, 1 and 2).  ``text_feat`` / ``image_feat`` are ``(n_items, d)`` float32
    or ``None`` when the modality is missing.  ``noisy`` (synthetic data only) is a ``(n_train,)``
    bool tensor marking the planted corrupted training rows, aligned with ``train``.
    ``user_factors`` / ``item_factors`` (synthetic data only) are ``(n_users, f)`` / ``(n_items, f)``
    float32 tables whose inner product is the generator's true score of a clean choice, so
    ranking by them is the data's own ceiling.
    """

    name: str
    n_users: int
    n_items: int
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    text_feat: Optional[torch.Tensor]
    image_feat: Optional[torch.Tensor]
    noisy: Optional[torch.Tensor] = None
    user_factors: Optional[torch.Tensor] = None
    item_factors: Optional[torch.Tensor] = None

    def summary(self) -> str:
        """One line: users, items, split sizes, density, modalities and the planted noise share."""
        n_train, n_valid, n_test = len(self.train), len(self.valid), len(self.test)
        total = n_train + n_valid + n_test
        density = total / max(1, self.n_users * self.n_items)
        mods = []
        for label, feat in (("text", self.text_feat), ("image", self.image_feat)):
            if feat is not None:
                mods.append(f"{label} {feat.shape[1]}-d")
        mod_text = ", ".join(mods) if mods else "none"
        if self.noisy is not None and n_train:
            noise_text = f"{float(self.noisy.float().mean()) * 100:.1f}% of train planted noisy"
        else:
            noise_text = "unknown"
        return (f"{self.name}: {self.n_users:,} users, {self.n_items:,} items, "
                f"{total:,} interactions (train {n_train:,} / valid {n_valid:,} / test {n_test:,}), "
                f"density {density:.3%}, modalities: {mod_text}, noise: {noise_text}")


# ---------------------------------------------------------------------------------------------
# MMRec loader
# ---------------------------------------------------------------------------------------------

def _resolve_inter(path: Union[str, Path], name: Optional[str]) -> Tuple[Path, Path]:
    """Returns (the .inter file, the folder to look for features in)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"load_mmrec: path {str(p)!r} does not exist (expected a folder holding "
                                f"<name>.inter, or the .inter file itself)")
    if p.is_file():
        return p, p.parent
    if name is not None:
        f = p / f"{name}.inter"
        if not f.is_file():
            found = sorted(x.name for x in p.glob("*.inter"))
            raise FileNotFoundError(f"load_mmrec: no file {f.name!r} in {str(p)!r}"
                                    + (f" (found: {', '.join(found)})" if found else " (no .inter file there)"))
        return f, p
    found = sorted(x for x in p.glob("*.inter") if x.is_file())
    if not found:
        raise FileNotFoundError(f"load_mmrec: no .inter file in folder {str(p)!r} (expected <name>.inter, "
                                f"tab-separated with columns userID, itemID, x_label)")
    if len(found) > 1:
        raise ValueError(f"load_mmrec: folder {str(p)!r} holds several .inter files "
                         f"({', '.join(x.name for x in found)}): pass name=... to pick one")
    return found[0], p


def _fail(file: Path, line: int, column: Optional[str], what: str):
    col = f", column {column!r}" if column is not None else ""
    raise ValueError(f"{file}: line {line}{col}: {what}")


# "7" or "7.0" (the fast float path accepts integral floats such as "7.0"; keep both paths alike)
def _fail_field_count(file: Path, line: int, names: List[str], got: int):
    if got < len(names):
        _fail(file, line, names[got], f"missing field: expected {len(names)} tab-separated fields "
                                      f"(header: {', '.join(names)}), got {got}")
    _fail(file, line, None, f"expected {len(names)} tab-separated fields (header: {', '.join(names)}), "
                            f"got {got}")


_INT_TOKEN = re.compile(rb"\s*[+]?([0-9]+)(\.0*)?\s*")
_NEG_TOKEN = re.compile(rb"\s*-[0-9]+(\.[0-9]*)?\s*")


def _check_token(file: Path, line: int, column: str, tok: bytes) -> int:
    """Parses one required field on the slow path, raising the loader's error when it is bad."""
    match = _INT_TOKEN.fullmatch(tok)
    if match:
        value = int(match.group(1))
    elif _NEG_TOKEN.fullmatch(tok):
        what = "label" if column == "x_label" else "id"
        _fail(file, line, column, f"negative {what} {tok.decode(errors='replace').strip()!r}")
    else:
        kind = "x_label" if column == "x_label" else "id"
        _fail(file, line, column, f"expected a non-negative integer {kind}, got "
                                  f"{tok.decode(errors='replace').strip()!r}")
    _check_value(file, line, column, value, tok)
    return value


def _check_value(file: Path, line: int, column: str, value, tok) -> None:
    shown = tok.decode(errors="replace").strip() if isinstance(tok, bytes) else str(tok)
    if column == "x_label":
        if value not in (0, 1, 2):
            _fail(file, line, column, f"x_label must be 0 (train), 1 (valid) or 2 (test), got {shown!r}")
    elif value < 0:
        _fail(file, line, column, f"negative id {shown!r}")
    elif value > MAX_ID:
        _fail(file, line, column, f"id {shown!r} is too large (ids must be re-indexed from 0 and be "
                                  f"<= {MAX_ID})")


def _slow_parse(file: Path, body: bytes, first_line: int, names: List[str], cols: List[int]) -> np.ndarray:
    """Line-by-line pass: returns (n, 3) int64 [user, item, label] or raises at the first bad field."""
    out = []
    ncol = len(names)
    for offset, raw in enumerate(body.split(b"\n")):
        line_no = first_line + offset
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        fields = line.split(b"\t")
        if len(fields) != ncol:
            _fail_field_count(file, line_no, names, len(fields))
        out.append([_check_token(file, line_no, REQUIRED_COLUMNS[j], fields[c]) for j, c in enumerate(cols)])
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def _line_token(body: bytes, starts: np.ndarray, ends: np.ndarray, row_line: np.ndarray, row: int,
                col: int) -> bytes:
    li = row_line[row]
    fields = body[starts[li]:ends[li]].rstrip(b"\r").split(b"\t")
    return fields[col] if col < len(fields) else b""


def _parse_inter(file: Path) -> np.ndarray:
    """(n, 3) int64 array of [userID, itemID, x_label] in file order; raises ValueError on bad input."""
    data = file.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        _fail(file, 1, None, "empty file: expected a tab-separated header with columns "
                             + ", ".join(REQUIRED_COLUMNS))
    nl = data.find(b"\n")
    header, body = (data, b"") if nl < 0 else (data[:nl], data[nl + 1:])
    names = [h.strip().decode(errors="replace") for h in header.rstrip(b"\r").split(b"\t")]
    for col in REQUIRED_COLUMNS:
        if col not in names:
            hint = (" (fields must be separated by tabs)"
                    if col.encode() in header and len(names) < len(REQUIRED_COLUMNS) else "")
            _fail(file, 1, col, f"header has no column {col!r}{hint}: header columns are {names}, expected "
                                f"tab-separated {', '.join(REQUIRED_COLUMNS)} (any order)")
        if names.count(col) > 1:
            _fail(file, 1, col, f"header names column {col!r} twice")
    ncol = len(names)
    cols = [names.index(c) for c in REQUIRED_COLUMNS]
    first_line = 2  # 1-based file line of the body's first line

    # ---- line structure (vectorised): line starts/ends, blank lines, tabs per line -------------
    buf = np.frombuffer(body, dtype=np.uint8)
    nl_pos = np.flatnonzero(buf == 10)
    ends = np.append(nl_pos, len(buf)) if (len(buf) and buf[-1] != 10) else nl_pos
    if len(buf) == 0:
        ends = np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1)) if len(ends) else np.zeros(0, dtype=np.int64)
    # whitespace-only lines are skipped (blank lines between or after rows are harmless)
    ws = np.zeros(256, dtype=bool)
    ws[[9, 10, 11, 12, 13, 32]] = True
    nonws_prefix = np.concatenate(([0], np.cumsum(~ws[buf], dtype=np.int64)))
    blank = (nonws_prefix[ends] - nonws_prefix[starts]) == 0
    tab_prefix = np.concatenate(([0], np.cumsum(buf == 9, dtype=np.int64)))
    tabs = tab_prefix[ends] - tab_prefix[starts]
    bad_count = ~blank & (tabs != ncol - 1)
    if bad_count.any():
        li = int(np.flatnonzero(bad_count)[0])
        _fail_field_count(file, first_line + li, names, int(tabs[li]) + 1)
    row_line = np.flatnonzero(~blank)  # body line index of each data row
    n_rows = len(row_line)
    if n_rows == 0:
        _fail(file, 2, "x_label", "no data rows after the header (no training rows, x_label == 0)")

    # ---- fast parse: the whole body at once ------------------------------------------------------
    table = None
    for dtype in (np.int64, np.float64):
        try:
            flat = np.fromstring(body, dtype=dtype, sep=" ")
        except ValueError:
            continue
        if flat.size == n_rows * ncol:
            table = flat.reshape(n_rows, ncol)[:, cols]
        break
    if table is None:
        # some field is not a number (or is empty): the slow pass names it (extra, ignored columns
        # may hold anything; it then returns the parsed required columns).
        return _slow_parse(file, body, first_line, names, cols)

    # ---- value checks (vectorised; the first offending row is located exactly) -----------------
    for j, col in enumerate(REQUIRED_COLUMNS):
        v = table[:, j]
        if v.dtype == np.float64:
            bad = ~np.isfinite(v) | (v != np.floor(v))
            if bad.any():
                r = int(np.flatnonzero(bad)[0])
                tok = _line_token(body, starts, ends, row_line, r, cols[j])
                kind = "x_label" if col == "x_label" else "id"
                _fail(file, first_line + int(row_line[r]), col,
                      f"expected a non-negative integer {kind}, got {tok.decode(errors='replace').strip()!r}")
        if col == "x_label":
            bad = (v < 0) | (v > 2)
        else:
            bad = (v < 0) | (v > MAX_ID)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            tok = _line_token(body, starts, ends, row_line, r, cols[j])
            _check_value(file, first_line + int(row_line[r]), col, int(min(max(v[r], -1), MAX_ID + 1)), tok)
            _fail(file, first_line + int(row_line[r]), col, "bad value")  # unreachable
    return table.astype(np.int64, copy=False)


def _load_feature(file: Path, n_items: int) -> torch.Tensor:
    try:
        arr = np.load(file, allow_pickle=False)
    except Exception as exc:  # corrupt / not an .npy file
        raise ValueError(f"{file}: cannot read as a .npy array ({exc})") from exc
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        shape = getattr(arr, "shape", None)
        raise ValueError(f"{file}: features must be a 2-D array (n_items, dim), got shape {shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{file}: features must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] != n_items:
        raise ValueError(f"{file}: has {arr.shape[0]} rows but the interactions have n_items = {n_items} "
                         f"(max itemID + 1): one feature row per item is required")
    feat = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if feat.numel():
        lo, hi = torch.aminmax(feat)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            row = int(torch.nonzero(~torch.isfinite(feat).all(1))[0, 0])
            raise ValueError(f"{file}: features contain NaN or Inf (first at row {row})")
    return feat


def load_mmrec(path: Union[str, Path], *, name: Optional[str] = None) -> InteractionData:
    """Loads an MMRec-format data set.

    ``path`` is a folder holding exactly one ``*.inter`` file (or ``<name>.inter`` when ``name``
    is given) plus optional ``text_feat.npy`` / ``image_feat.npy``, or the ``.inter`` file itself
    (features are then looked for next to it).  The ``.inter`` file is tab-separated with a
    header naming at least ``userID``, ``itemID`` and ``x_label`` (any order; other columns such
    as ``rating`` or ``timestamp`` are ignored).  ``x_label`` is 0 (train), 1 (valid), 2 (test).

    ``n_users = max userID + 1`` and ``n_items = max itemID + 1`` over all splits.  A missing
    modality file gives ``None``.  Malformed input raises ``ValueError`` naming the file, the
    1-based line number and the column; feature files must be 2-D, finite, with ``n_items`` rows.
    Rows keep their file order within each split.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    file, folder = _resolve_inter(path, name)
    table = _parse_inter(file)
    labels = table[:, 2]
    if not (labels == 0).any():
        raise ValueError(f"{file}: column 'x_label': no training rows (x_label == 0) among its "
                         f"{len(table)} data rows")
    n_users = int(table[:, 0].max()) + 1
    n_items = int(table[:, 1].max()) + 1
    splits = [torch.from_numpy(np.ascontiguousarray(table[labels == s, :2])) for s in (0, 1, 2)]
    feats = {}
    for key, fname in FEATURE_FILES:
        f = folder / fname
        feats[key] = _load_feature(f, n_items) if f.is_file() else None
    ds_name = name if name is not None else file.stem
    return InteractionData(name=ds_name, n_users=n_users, n_items=n_items, train=splits[0], valid=splits[1],
                           test=splits[2], text_feat=feats["text_feat"], image_feat=feats["image_feat"])


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------

# Constants of the generative model (documented in ``synthetic``'s docstring).
_POP_SIGMA = 1.0          # item log-popularity ~ N(0, _POP_SIGMA^2)
_TEMPERATURE = 0.35       # softmax temperature of the clean choice among candidates
_NOISY_POOL = 16          # candidates per corrupted interaction (a disliked one is drawn)
_FEATURE_NOISE = 0.25     # std of the per-coordinate feature noise (signal std ~ 1)
_MIN_DEGREE = 5           # 5-core-like minimum interactions per user (capped by interactions_per_user)
_CHUNK_FLOATS = 1 << 24   # working-set bound of the chunked candidate scoring (64 MiB of fp32)
_NEVER_CHOSEN = -1e6      # true-score bias of inconsistent items (no clean choice uses them)


def _check_share(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if value < 0 or value >= 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _gumbel(shape, gen: torch.Generator) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise, float32."""
    u = torch.rand(shape, generator=gen).clamp_(min=1e-20)
    return u.log_().neg_().log_().neg_()


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` through ``index_select`` (2-3x faster than advanced indexing on CPU)."""
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])


def _features(z: torch.Tensor, out_dim: int, gen: torch.Generator) -> torch.Tensor:
    """``z @ A + _FEATURE_NOISE * eps`` with a fresh A ~ N(0, 1) (dim x out_dim), eps ~ N(0, 1)."""
    a = torch.randn(z.shape[1], out_dim, generator=gen)
    out = torch.randn(z.shape[0], out_dim, generator=gen)
    out.mul_(_FEATURE_NOISE)
    out.addmm_(z, a)
    return out


def synthetic(n_users: int = 20_000, n_items: int = 7_000, *, interactions_per_user: int = 8, dim: int = 8,
              text_dim: int = 384, image_dim: int = 512, noise: float = 0.2, valid_share: float = 0.1,
              test_share: float = 0.1, pool: int = 1024, seed: int = 0) -> InteractionData:
    """The embedded default data set: a latent-factor graph with a known share of corrupted rows.

    Generative model (all draws from one ``torch.Generator`` seeded with ``seed``, on CPU):

    1. Factors.  Item factors ``z_i ~ N(0, I/dim)`` and user factors ``z_u ~ N(0, I)`` in
       ``R^dim``, so the affinity ``a_ui = <z_u, z_i>`` is ~N(0, 1).  Item popularity
       ``p_i = exp(g_i)``, ``g_i ~ N(0, 1)`` (a mild long tail).  The default rank ``dim = 8``
       is low on purpose: a user has ~6 training rows, from which a rank-32 taste cannot be
       told apart, while a rank-8 one leaves users with shared favourites, i.e. the
       co-occurrence structure that collaborative filtering learns from.
    2. Inconsistent items.  ``round(noise * n_items)`` items (at least 1 when ``noise > 0``), chosen
       uniformly, form the *inconsistent* set; the rest are *consistent*.  Clean interactions only
       ever use consistent items; corrupted ones only inconsistent items.
    3. Degrees.  User ``u`` gets ``d_u = m - 1 + G_u`` rows, ``G_u ~ Geometric(1 / (k - m + 1))``
       on {1, 2, ...}, with ``k = interactions_per_user`` and ``m = min(5, k)`` (mean ``k``; a
       5-core-like minimum), capped at ``max(32, 4k)`` and at the number of consistent items.
    4. Clean choices.  Each user draws a pool of ``C = max(pool, 4 * cap)`` candidates uniformly
       from the consistent items, drops repeats, and takes ``d_u`` of them without replacement
       with probabilities proportional to ``p_i * exp(a_ui / 0.35)`` (Gumbel top-k on
       ``a_ui / 0.35 + g_i + Gumbel``).  So clean items are liked (high affinity) and
       popularity-biased.  The pool is what makes the choices depend on taste: with a small one
       (the former 128 of ~5,600 consistent items) which items a user could see dominates, the
       chosen items are close to random and no ranking learnt from them beats popularity;
       ``pool = 1024`` picks each user's rows from about the top 1% of a fifth of the catalogue.
       With the defaults this gives, on the validation split, a popularity Recall@20 of 0.041-0.045
       and an item-item co-occurrence Recall@20 (user rows times the train item-item count
       matrix) of 0.096-0.098 (seeds 0, 1), near Amazon Baby's 0.048 and 0.082 (same density).
       The pool is uniform, so the true score below remains the best possible ranking.  Never ``users x items``: memory is ``O(chunk * C * dim)``, users
       in chunks.
    5. Split.  Each row independently goes to test with probability ``test_share``, to valid with
       ``valid_share``, else train; each user's row with the largest split draw is forced into
       train, so every user has a training row.  Valid/test rows are clean held-out liked items,
       and no (user, item) pair appears twice in the data.
    6. Corruption.  Exactly ``round(noise * n_train)`` training rows, chosen uniformly, are
       replaced: the user instead gets one of 16 uniformly drawn inconsistent candidates, picked
       with probability proportional to ``p_i * exp(-a_ui / 0.35)`` (a disliked item, with the same
       popularity bias as clean ones; a pair repeated among corrupted rows is redrawn, and a row
       whose redraws keep colliding, only possible with a tiny inconsistent set, is dropped).
       ``noisy`` marks these rows.
    7. Features.  ``text_feat = z_i A_t + 0.25 eps`` and ``image_feat = z_{pi(i)} A_v + 0.25 eps``
       with fixed random projections ``A_t ~ N(0,1)^{dim x text_dim}``, ``A_v ~ N(0,1)^{dim x
       image_dim}`` and i.i.d. ``eps ~ N(0, 1)``.  ``pi(i) = i`` for consistent items; for an
       inconsistent item ``pi(i)`` is a uniformly drawn consistent item (its picture shows another
       product), so text and image views disagree exactly on the items of corrupted rows: a
       text-to-image map fitted on all items leaves a much larger residual on them.

    Rows of each split are sorted by (user, item); ``noisy`` is aligned with ``train``.
    ``user_factors = [z_u / 0.35, 1]`` and ``item_factors = [z_i, g_i]`` (``g_i`` replaced by
    ``-1e6`` for inconsistent items, which no clean choice uses), so their inner product is the
    clean-choice score ``a_ui / 0.35 + log p_i`` (the true ranking, without the Gumbel draw).  The same
    ``seed`` and arguments give bit-identical tensors; 10^6 items x 10^5 users (16-d features)
    takes about 15 s of one core, most of it scoring the ``n_users x pool`` candidates (2 s with
    ``pool=128``); the ``n_items x (text_dim + image_dim)`` feature noise adds to that.
    """
    require_int("n_users", n_users, 1)
    require_int("n_items", n_items, 2)
    require_int("interactions_per_user", interactions_per_user, 1)
    require_int("dim", dim, 1)
    require_int("text_dim", text_dim, 1)
    require_int("image_dim", image_dim, 1)
    require_int("pool", pool, 1)
    require_int("seed", seed, 0)
    noise = _check_share("noise", noise)
    valid_share = _check_share("valid_share", valid_share)
    test_share = _check_share("test_share", test_share)
    if valid_share + test_share >= 1:
        raise ValueError(f"valid_share + test_share must be < 1, got {valid_share} + {test_share}")

    gen = torch.Generator().manual_seed(seed)
    # 1. factors and popularity
    z_item = torch.randn(n_items, dim, generator=gen).div_(math.sqrt(dim))
    z_user = torch.randn(n_users, dim, generator=gen)
    log_pop = torch.randn(n_items, generator=gen).mul_(_POP_SIGMA)
    # 2. inconsistent items
    n_bad = 0 if noise == 0 else min(n_items - 1, max(1, round(noise * n_items)))
    perm = torch.randperm(n_items, generator=gen)
    bad_items = perm[:n_bad].sort().values
    good_items = perm[n_bad:].sort().values
    n_good = len(good_items)
    # 3. degrees
    k = interactions_per_user
    m = min(_MIN_DEGREE, k)
    cap = min(max(32, 4 * k), n_good)
    pool = max(pool, 4 * cap)  # room for the largest degree (d_u of C candidates)
    mean_extra = k - m + 1
    if mean_extra > 1:
        deg = torch.empty(n_users, dtype=torch.float64).geometric_(1.0 / mean_extra, generator=gen)
        deg = (deg.long() + (m - 1)).clamp_(1, cap)
    else:
        deg = torch.full((n_users,), min(m, cap), dtype=torch.int64)
    # 4. clean choices, chunked over users
    chunk = max(1, _CHUNK_FLOATS // (pool * dim))
    users_out, items_out = [], []
    for s in range(0, n_users, chunk):
        e = min(n_users, s + chunk)
        cand = good_items[torch.randint(0, n_good, (e - s, pool), generator=gen)]
        cand = cand.sort(dim=1).values
        dup = torch.zeros_like(cand, dtype=torch.bool)
        dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
        score = torch.bmm(_rows(z_item, cand), z_user[s:e].unsqueeze(2)).squeeze(2)
        score.div_(_TEMPERATURE).add_(_rows(log_pop, cand)).add_(_gumbel(score.shape, gen))
        score.masked_fill_(dup, -math.inf)
        top_score, top_pos = score.topk(cap, dim=1)
        keep = (torch.arange(cap).unsqueeze(0) < deg[s:e].unsqueeze(1)) & torch.isfinite(top_score)
        rows, cols = keep.nonzero(as_tuple=True)
        users_out.append(rows + s)
        items_out.append(cand.gather(1, top_pos)[rows, cols])
    users = torch.cat(users_out)
    items = torch.cat(items_out)
    # 5. split
    n_rows = len(users)
    r = torch.rand(n_rows, generator=gen, dtype=torch.float64)
    split = torch.zeros(n_rows, dtype=torch.int64)
    split[r < valid_share + test_share] = 1
    split[r < test_share] = 2
    # force each user's row with the largest draw (the one most likely in train already) into train
    order = torch.argsort(users * 2.0 + (1.0 - r), stable=True)  # per user, descending draws first
    first = torch.ones(n_rows, dtype=torch.bool)
    su = users[order]
    first[1:] = su[1:] != su[:-1]
    split[order[first]] = 0
    train_idx = (split == 0).nonzero().squeeze(1)
    train = torch.stack([users[train_idx], items[train_idx]], 1)
    valid = torch.stack([users[split == 1], items[split == 1]], 1)
    test = torch.stack([users[split == 2], items[split == 2]], 1)
    # 6. corruption of exactly round(noise * n_train) training rows
    n_train = len(train)
    n_noisy = round(noise * n_train) if n_bad else 0
    noisy = torch.zeros(n_train, dtype=torch.bool)
    keep_row = torch.ones(n_train, dtype=torch.bool)
    if n_noisy:
        rows = torch.randperm(n_train, generator=gen)[:n_noisy].sort().values
        noisy[rows] = True
        todo = rows
        for _attempt in range(20):
            cand = bad_items[torch.randint(0, n_bad, (len(todo), _NOISY_POOL), generator=gen)]
            score = torch.bmm(_rows(z_item, cand), _rows(z_user, train[todo, 0]).unsqueeze(2)).squeeze(2)
            score.div_(-_TEMPERATURE).add_(_rows(log_pop, cand)).add_(_gumbel(score.shape, gen))
            train[todo, 1] = cand.gather(1, score.argmax(1, keepdim=True)).squeeze(1)
            # repeated (user, item) pairs among corrupted rows: redraw the later copies
            key = train[rows, 0] * n_items + train[rows, 1]
            skey, sidx = key.sort(stable=True)
            rep = torch.zeros(len(rows), dtype=torch.bool)
            rep[sidx[1:]] = skey[1:] == skey[:-1]
            todo = rows[rep]
            if not len(todo):
                break
        keep_row[todo] = False
    train, noisy = train[keep_row], noisy[keep_row]
    # sort each split by (user, item)
    def _sorted(t: torch.Tensor, *extra: torch.Tensor):
        idx = torch.argsort(t[:, 0] * n_items + t[:, 1])
        return (t[idx].contiguous(),) + tuple(x[idx] for x in extra)
    train, noisy = _sorted(train, noisy)
    (valid,) = _sorted(valid)
    (test,) = _sorted(test)
    # 7. features
    z_image = z_item
    if n_bad:
        z_image = z_item.clone()
        decoy = good_items[torch.randint(0, n_good, (n_bad,), generator=gen)]
        z_image[bad_items] = z_item[decoy]
    text_feat = _features(z_item, text_dim, gen)
    image_feat = _features(z_image, image_dim, gen)
    # The true clean-choice score as an inner product (no draws: the data above is unchanged).
    user_factors = torch.cat([z_user / _TEMPERATURE, torch.ones(n_users, 1)], 1)
    item_bias = log_pop.clone()
    item_bias[bad_items] = _NEVER_CHOSEN
    item_factors = torch.cat([z_item, item_bias.unsqueeze(1)], 1)
    return InteractionData(name=f"synthetic(seed={seed})", n_users=n_users, n_items=n_items, train=train,
                           valid=valid, test=test, text_feat=text_feat, image_feat=image_feat, noisy=noisy,
                           user_factors=user_factors, item_factors=item_factors)


def with_synthetic_features(data: InteractionData, *, text_dim: int = 384, image_dim: int = 512, dim: int = 32,
                            seed: int = 0) -> InteractionData:
    """Returns a copy of ``data`` with generated ``text_feat`` / ``image_feat`` (for real graphs).

    Item factors are a random projection of the item's normalised two-hop co-occurrence over the
    *training* rows only (no leakage of valid/test): with ``X`` the ``n_items x n_users`` 0/1
    incidence, ``D_i``, ``D_u`` its degree matrices and ``G ~ N(0, 1)^{n_items x dim}``,
    ``Z = D_i^-1/2 X D_u^-1 X^T D_i^-1/2 G + 0.3 G``, rows scaled to unit norm (so items that share
    users get similar factors; items without training rows keep their random ``G`` row).  Then
    ``text_feat = Z A_t + 0.25 eps`` and ``image_feat = Z A_v + 0.25 eps`` exactly as in
    ``synthetic`` (consistent views; nothing is corrupted).  Cost: two sparse passes over the
    training rows plus the feature matmuls.  Deterministic per ``seed``.
    """
    if not isinstance(data, InteractionData):
        raise TypeError(f"data must be an InteractionData, got {type(data).__name__}")
    require_int("text_dim", text_dim, 1)
    require_int("image_dim", image_dim, 1)
    require_int("dim", dim, 1)
    require_int("seed", seed, 0)
    gen = torch.Generator().manual_seed(seed)
    train = data.train.to("cpu", torch.int64)
    keys = torch.unique(train[:, 0] * data.n_items + train[:, 1])
    u, i = keys // data.n_items, keys % data.n_items
    deg_i = torch.bincount(i, minlength=data.n_items).double().clamp_(min=1)
    deg_u = torch.bincount(u, minlength=data.n_users).double().clamp_(min=1)
    g = torch.randn(data.n_items, dim, generator=gen, dtype=torch.float64)
    gi = g * deg_i.rsqrt().unsqueeze(1)
    user_sum = torch.zeros(data.n_users, dim, dtype=torch.float64).index_add_(0, u, gi[i])
    user_sum.mul_((1.0 / deg_u).unsqueeze(1))
    z = torch.zeros(data.n_items, dim, dtype=torch.float64).index_add_(0, i, user_sum[u])
    z.mul_(deg_i.rsqrt().unsqueeze(1))
    z.add_(g, alpha=0.3)
    z = (z / z.norm(dim=1, keepdim=True).clamp_(min=1e-12)).float()
    text_feat = _features(z, text_dim, gen)
    image_feat = _features(z, image_dim, gen)
    return dataclasses.replace(data, text_feat=text_feat, image_feat=image_feat)


# ---------------------------------------------------------------------------------------------
# Negative sampling
# ---------------------------------------------------------------------------------------------

class NegativeSampler:
    """Uniform negative items per user, never one of the user's training positives.

    Built once from the training rows: the sorted unique keys ``user * n_items + item`` and, per
    key, ``q = user * n_items + (item - rank of the item among the user's positives)``.  A draw
    for user ``u`` picks ``r`` uniformly in ``[0, n_items - deg_u)`` and returns the ``r``-th item
    that is not a positive of ``u``: ``r + #{positives j of u : q_j <= u * n_items + r}``, one
    ``torch.searchsorted`` per draw.  This is exactly the distribution of rejection sampling
    (uniform over the non-positives) with no rejection rounds, no host sync and a cost that does
    not grow with a user's density.  Everything runs on the users' device (state is copied to
    a device once, on first use there).
    """

    def __init__(self, train: torch.Tensor, n_users: int, n_items: int, device=None):
        require_index("train", train)
        require_rank("train", train, (2,), "(n_train, 2) tensor of (user, item) rows")
        if train.shape[1] != 2:
            raise ValueError(f"train must have shape (n_train, 2) of (user, item) rows, got {tuple(train.shape)}")
        require_int("n_users", n_users, 1)
        require_int("n_items", n_items, 1)
        if n_users * n_items >= 2**62:
            raise ValueError(f"n_users * n_items must be < 2**62, got {n_users} * {n_items}")
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        t = train.to(device=torch.device(device) if device is not None else train.device, dtype=torch.int64)
        self.device = t.device  # resolved ("cuda" -> "cuda:0")
        if t.numel():
            lo_u, hi_u = torch.aminmax(t[:, 0])
            lo_i, hi_i = torch.aminmax(t[:, 1])
            if int(lo_u) < 0 or int(hi_u) >= n_users:
                raise IndexError(f"train has user ids outside [0, {n_users}) (column 0)")
            if int(lo_i) < 0 or int(hi_i) >= n_items:
                raise IndexError(f"train has item ids outside [0, {n_items}) (column 1)")
        keys = torch.unique(t[:, 0] * self.n_items + t[:, 1])            # sorted
        key_user = torch.div(keys, self.n_items, rounding_mode="floor")
        deg = torch.bincount(key_user, minlength=self.n_users)
        offsets = torch.zeros(self.n_users + 1, dtype=torch.int64, device=self.device)
        offsets[1:] = deg.cumsum(0)
        rank = torch.arange(len(keys), device=self.device) - offsets[key_user]
        self._state = {self.device: (keys, keys - rank, deg)}
        full = (deg == self.n_items).nonzero().squeeze(1)
        self._full_users = full.cpu()
        self.n_train = len(keys)

    def _on(self, device: torch.device):
        if device not in self._state:
            keys, q, deg = self._state[self.device]
            self._state[device] = (keys.to(device), q.to(device), deg.to(device))
        return self._state[device]

    def positives_count(self, users: torch.Tensor) -> torch.Tensor:
        """Number of distinct training positives of each user."""
        return self._on(users.device)[2][users]

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Bool tensor (broadcast shape): is (user, item) a training positive?"""
        keys = self._on(users.device)[0]
        key = users.to(torch.int64) * self.n_items + items.to(torch.int64)
        if not len(keys):
            return torch.zeros(key.shape, dtype=torch.bool, device=key.device)
        pos = torch.searchsorted(keys, key).clamp_(max=len(keys) - 1)
        return keys[pos] == key

    def sample(self, users: torch.Tensor, k: int = 1, *,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B,) int64 negatives if ``k == 1`` else (B, k): uniform over each user's non-positives.

        ``users`` is a 1-D integer tensor; the result lives on its device.  ``generator``, if
        given, must be on that device.  Raises ``ValueError`` naming a user who has interacted
        with every item.
        """
        require_index("users", users)
        require_rank("users", users, (1,), "tensor of user ids")
        require_int("k", k, 1)
        device = users.device
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if torch.device(generator.device).type != device.type:
                raise ValueError(f"generator is on {generator.device} but users is on {device}: "
                                 f"pass a generator of the users' device")
        users = users.to(torch.int64)
        if checks_enabled():
            vc = ValueChecks()
            vc.index_range("users", users, self.n_users)
            vc.raise_if_any()
        _keys, q, deg = self._on(device)
        if len(self._full_users):
            full = self._full_users.to(device)
            hit = torch.isin(users, full)
            if bool(hit.any()):
                user = int(users[hit][0])
                raise ValueError(f"user {user} has interacted with every item ({self.n_items}) in train: "
                                 f"no negative item exists for it")
        base = users * self.n_items
        m = (self.n_items - deg[users]).unsqueeze(1)                      # (B, 1) non-positive count
        r = torch.randint(0, 2**62, (len(users), k), generator=generator, device=device)
        r = torch.remainder(r, m.clamp(min=1))
        target = base.unsqueeze(1) + r
        if len(q):
            start = torch.searchsorted(q, base).unsqueeze(1)
            count = torch.searchsorted(q, target.reshape(-1), right=True).reshape(target.shape) - start
            out = r + count
        else:
            out = r
        return out.squeeze(1) if k == 1 else out
