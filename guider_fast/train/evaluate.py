"""Full-sort top-K retrieval and ranking metrics (MMRec conventions).

``full_sort_topk`` scores users against the whole catalogue by inner product,
masks excluded (user, item) pairs (typically the training interactions) and keeps a
running top-K per user over tiles of ``user_block`` users x ``item_block`` items: the
(users x items) score matrix is never built.

``ranking_metrics`` computes Recall@K and NDCG@K for several K from one top-max(K)
retrieval; ``popularity_metrics`` is the same for the training-popularity ranking.
``ranking_metric_sums`` / ``metrics_from_sums`` are ``ranking_metrics`` split into per-user
sums and their means, for processes that each evaluate a share of the users.
"""

from __future__ import annotations

import numbers
from typing import Dict, Iterable, Optional, Tuple, Union

import torch

from .. import _validate as V

_NEG_INF = float("-inf")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_pairs(name: str, pairs: torch.Tensor) -> None:
    V.require_index(name, pairs)
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"{name} must be an (n, 2) tensor of (user, item) pairs, got shape {tuple(pairs.shape)}")


def _check_embeddings(user_emb: torch.Tensor, item_emb: torch.Tensor) -> None:
    V.require_float("user_emb", user_emb)
    V.require_float("item_emb", item_emb)
    V.require_rank("user_emb", user_emb, (2,), "embedding table (n_users, D)")
    V.require_rank("item_emb", item_emb, (2,), "embedding table (n_items, D)")
    if item_emb.shape[1] != user_emb.shape[1]:
        raise ValueError(f"item_emb must have the embedding size of user_emb ({user_emb.shape[1]}), "
                         f"got shape {tuple(item_emb.shape)}")
    if item_emb.shape[0] == 0:
        raise ValueError("item_emb is empty: the catalogue needs at least one item")


def _pair_value_checks(checks: V.ValueChecks, name: str, pairs: Optional[torch.Tensor],
                       n_users: int, n_items: int) -> None:
    if pairs is not None and pairs.numel():
        checks.index_range(f"{name}[:, 0] (users)", pairs[:, 0], n_users)
        checks.index_range(f"{name}[:, 1] (items)", pairs[:, 1], n_items)


class _ExcludeCSR:
    """Excluded (user, item) pairs grouped by user: one sort, then searchsorted per query."""

    def __init__(self, exclude: Optional[torch.Tensor], n_items: int, device):
        if exclude is None or exclude.numel() == 0:
            self.users = self.items = None
            return
        ex = exclude.to(device=device, dtype=torch.int64)
        # Sorting on user * n_items + item groups by user (items ascending inside).
        keys, _ = torch.sort(ex[:, 0] * n_items + ex[:, 1])
        self.users = torch.div(keys, n_items, rounding_mode="floor")
        self.items = keys - self.users * n_items

    def block(self, users: torch.Tensor):
        """Excluded pairs of ``users`` as (items ascending, row in ``users``); None if none."""
        if self.users is None:
            return None
        starts = torch.searchsorted(self.users, users)
        counts = torch.searchsorted(self.users, users, right=True) - starts
        total = int(counts.sum())
        if total == 0:
            return None
        rows = torch.repeat_interleave(torch.arange(users.shape[0], device=users.device), counts)
        first = torch.cumsum(counts, 0) - counts
        pos = starts[rows] + (torch.arange(total, device=users.device) - first[rows])
        items = self.items[pos]
        # Order by item so that each item block's pairs are one contiguous slice.
        items, order = torch.sort(items, stable=True)
        return items, rows[order]


def _sorted_block_topk(vals: torch.Tensor, ids: torch.Tensor):
    """Order (rows, k) candidates by score descending, ties by item id ascending."""
    ids, perm = torch.sort(ids, dim=1)
    vals = vals.gather(1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, ids.gather(1, perm)


def _block_topk(scores: torch.Tensor, kk: int):
    """Top-kk column ids per row of a score tile, keeping the lowest column ids among
    scores tied at the kk-th value (torch.topk picks arbitrarily among them).

    One extra candidate detects a tie across the boundary for free: it exists iff the
    (kk+1)-th largest score equals the kk-th.  Only such rows (rare with real-valued
    scores; rows whose kk-th score is -inf are all padding anyway) are repaired.
    """
    cols = scores.shape[1]
    if kk >= cols:
        return torch.arange(cols, device=scores.device).expand(scores.shape[0], cols)
    vals, idx = torch.topk(scores, kk + 1, dim=1, sorted=True)
    kth = vals[:, kk - 1]
    bad = (vals[:, kk] == kth) & (kth > _NEG_INF)
    idx = idx[:, :kk]
    if not bool(bad.any()):
        return idx
    idx = idx.clone()
    for r in torch.nonzero(bad).flatten().tolist():
        row, v = scores[r], kth[r]
        above = torch.nonzero(row > v).flatten()
        tied = torch.nonzero(row == v).flatten()[: kk - above.numel()]
        idx[r] = torch.cat([above, tied])
    return idx


def full_sort_topk(user_emb: torch.Tensor, item_emb: torch.Tensor, users: torch.Tensor,
                   exclude: Optional[torch.Tensor], k: int, *, user_block: int = 1024,
                   item_block: int = 65536) -> torch.Tensor:
    """Top-``k`` item ids per user by score ``<user_emb[u], item_emb[i]>`` over all items.

    Returns an int64 tensor (len(users), k), row r for ``users[r]``, best item first.
    Items listed for that user in ``exclude`` (an (n, 2) tensor of (user, item) pairs,
    e.g. the training interactions; None for no masking; duplicates allowed) get score
    -inf and are never returned: where fewer than ``k`` items remain (``k > n_items``,
    or a user with most or all items excluded) the row is padded with ``-1``.

    Ties: equal scores are ordered by lower item id first, also across the k-th place
    (the lowest ids among tied items are kept), so results are deterministic.

    Memory: one (user_block, item_block) score tile (256 MiB at the float32 defaults)
    plus O(len(users) * k) running top-k state; the score tile gets its excluded
    entries set to -inf, its own top-k is taken, and merged into the running top-k.
    Half-precision embeddings are scored in float32; float64 stays float64.
    Errors name the argument (shapes, dtypes, ``k``/block sizes, index ranges and
    NaN/Inf in the embeddings; value checks follow ``guider_fast.set_checks``).
    """
    _check_embeddings(user_emb, item_emb)
    V.require_index("users", users)
    V.require_rank("users", users, (1,), "index tensor (n,)")
    if exclude is not None:
        _check_pairs("exclude", exclude)
    V.require_int("k", k, 1)
    V.require_int("user_block", user_block, 1)
    V.require_int("item_block", item_block, 1)
    V.require_same_device([("user_emb", user_emb), ("item_emb", item_emb), ("users", users),
                           ("exclude", exclude)])
    n_users, n_items = user_emb.shape[0], item_emb.shape[0]
    if V.checks_enabled():
        checks = V.ValueChecks()
        checks.index_range("users", users, n_users)
        _pair_value_checks(checks, "exclude", exclude, n_users, n_items)
        if users.numel() and n_users:
            checks.finite("user_emb", user_emb.index_select(0, users.long().clamp(0, n_users - 1)))
        checks.finite("item_emb", item_emb)
        checks.raise_if_any()
    return _topk(user_emb, item_emb, users.long(), exclude, int(k), int(user_block), int(item_block))


@torch.no_grad()
def _topk(user_emb, item_emb, users, exclude, k, user_block, item_block):
    device = user_emb.device
    n_items = item_emb.shape[0]
    cdtype = _compute_dtype(user_emb, item_emb)
    out = torch.empty(users.shape[0], k, dtype=torch.int64, device=device)
    if users.numel() == 0:
        return out
    csr = _ExcludeCSR(exclude, n_items, device)
    cols_max = min(item_block, n_items)
    rows_max = min(user_block, users.shape[0])
    tile_buf = torch.empty(rows_max * cols_max, dtype=cdtype, device=device)
    items_c = item_emb if item_emb.dtype == cdtype else None
    for b0 in range(0, users.shape[0], user_block):
        b1 = min(b0 + user_block, users.shape[0])
        rows = b1 - b0
        u = user_emb.index_select(0, users[b0:b1]).to(cdtype)
        masked = csr.block(users[b0:b1])
        run_v = torch.full((rows, k), _NEG_INF, dtype=cdtype, device=device)
        run_i = torch.full((rows, k), -1, dtype=torch.int64, device=device)
        for j0 in range(0, n_items, item_block):
            j1 = min(j0 + item_block, n_items)
            cols = j1 - j0
            blk = items_c[j0:j1] if items_c is not None else item_emb[j0:j1].to(cdtype)
            scores = torch.mm(u, blk.t(), out=tile_buf[: rows * cols].view(rows, cols))
            if masked is not None:
                m_items, m_rows = masked
                lo = int(torch.searchsorted(m_items, j0))
                hi = int(torch.searchsorted(m_items, j1))
                if hi > lo:
                    flat = m_rows[lo:hi] * cols + (m_items[lo:hi] - j0)
                    scores.view(-1).index_fill_(0, flat, _NEG_INF)
            kk = min(k, cols)
            idx = _block_topk(scores, kk)
            vals = scores.gather(1, idx)
            vals, ids = _sorted_block_topk(vals, idx + j0)
            # Running ids are all lower than this block's: a stable sort keeps them first
            # among equal scores, so the order stays (score desc, id asc).
            cand_v = torch.cat([run_v, vals], 1)
            cand_i = torch.cat([run_i, ids], 1)
            cand_v, perm = torch.sort(cand_v, dim=1, descending=True, stable=True)
            run_v = cand_v[:, :k]
            run_i = cand_i.gather(1, perm[:, :k])
        run_i.masked_fill_(run_v == _NEG_INF, -1)
        out[b0:b1] = run_i
    return out


def _normalise_ks(ks) -> tuple:
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    try:
        ks = tuple(ks)
    except TypeError:
        raise TypeError(f"ks must be an integer or a sequence of integers, got {type(ks).__name__}") from None
    if not ks:
        raise ValueError("ks must hold at least one cutoff K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"ks must hold integers >= 1, got {k!r} in {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def ranking_metrics(user_emb: torch.Tensor, item_emb: torch.Tensor, eval_pairs: torch.Tensor,
                    exclude_pairs: Optional[torch.Tensor],
                    ks: Union[int, Iterable[int]] = (10, 20, 50), *, user_block: int = 1024,
                    item_block: int = 65536) -> Dict[str, float]:
    """Full-sort Recall@K and NDCG@K (MMRec's definitions), averaged over evaluated users.

    ``eval_pairs`` (n, 2) holds the held-out (user, item) pairs (duplicates count once);
    the evaluated users are exactly those with at least one eval item (others are
    skipped, not counted as zeros).  ``exclude_pairs`` (or None) are masked from the
    ranking (MMRec masks the training interactions); an eval item that is also excluded
    can never be retrieved and counts as a miss.  For each evaluated user u with
    ``n_u`` distinct eval items and hits ``h_r`` (1 if the item at rank r = 1, 2, ... is
    one of u's eval items, else 0):

        Recall@K = sum_{r<=K} h_r / n_u
        NDCG@K   = DCG@K / IDCG@K,  DCG@K = sum_{r<=K} h_r / log2(r + 1),
                   IDCG@K = sum_{r<=min(n_u, K)} 1 / log2(r + 1)   (binary relevance)

    Returns ``{"recall@K": float, "ndcg@K": float}`` for each K in ``ks`` (ascending,
    duplicates dropped), each the mean over evaluated users.  One top-max(ks) retrieval
    (``full_sort_topk`` with ``user_block`` / ``item_block``) serves every K; padded
    slots (users with fewer than K retrievable items) are misses.
    """
    return {name: float(value.mean())
            for name, value in _per_user_metrics(user_emb, item_emb, eval_pairs, exclude_pairs, ks,
                                                 user_block, item_block, allow_empty=False)}


def ranking_metric_sums(user_emb: torch.Tensor, item_emb: torch.Tensor, eval_pairs: torch.Tensor,
                        exclude_pairs: Optional[torch.Tensor],
                        ks: Union[int, Iterable[int]] = (10, 20, 50), *, user_block: int = 1024,
                        item_block: int = 65536) -> Tuple[Tuple[str, ...], torch.Tensor]:
    """``ranking_metrics`` as sums, for evaluating a share of the users per process.

    Returns ``(names, sums)``: the metric names of ``ranking_metrics`` and a float64 tensor
    holding, for each name, the metric summed over the evaluated users, followed by the
    number of evaluated users.  Sums of disjoint user sets add up (one all-reduce), and
    ``metrics_from_sums`` turns the total into ``ranking_metrics``'s means.  Unlike
    ``ranking_metrics``, empty ``eval_pairs`` are allowed (all sums 0): a process may hold
    no evaluated user.
    """
    names, sums = [], []
    for name, value in _per_user_metrics(user_emb, item_emb, eval_pairs, exclude_pairs, ks, user_block,
                                         item_block, allow_empty=True):
        names.append(name)
        sums.append(value.sum())
        count = value.shape[0]
    device = user_emb.device
    sums.append(torch.tensor(float(count), dtype=torch.float64, device=device))
    return tuple(names), torch.stack([s.to(device=device, dtype=torch.float64) for s in sums])


def metrics_from_sums(names: Tuple[str, ...], sums: torch.Tensor) -> Dict[str, float]:
    """The means of ``ranking_metric_sums``'s (possibly all-reduced) sums."""
    count = float(sums[-1])
    if count == 0:
        raise ValueError("no user has an eval item to rank")
    return {name: float(value) / count for name, value in zip(names, sums[:-1].tolist())}


def _per_user_metrics(user_emb, item_emb, eval_pairs, exclude_pairs, ks, user_block, item_block, *,
                      allow_empty):
    """(name, (n_evaluated,) float64 values) for each metric of ``ranking_metrics``."""
    _check_embeddings(user_emb, item_emb)
    _check_pairs("eval_pairs", eval_pairs)
    if exclude_pairs is not None:
        _check_pairs("exclude_pairs", exclude_pairs)
    ks = _normalise_ks(ks)
    V.require_int("user_block", user_block, 1)
    V.require_int("item_block", item_block, 1)
    if eval_pairs.shape[0] == 0 and not allow_empty:
        raise ValueError("eval_pairs is empty: no user has an eval item to rank")
    V.require_same_device([("user_emb", user_emb), ("item_emb", item_emb),
                           ("eval_pairs", eval_pairs), ("exclude_pairs", exclude_pairs)])
    n_users, n_items = user_emb.shape[0], item_emb.shape[0]
    if V.checks_enabled():
        checks = V.ValueChecks()
        _pair_value_checks(checks, "eval_pairs", eval_pairs, n_users, n_items)
        _pair_value_checks(checks, "exclude_pairs", exclude_pairs, n_users, n_items)
        checks.raise_if_any()
    if eval_pairs.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=user_emb.device)
        for k in ks:
            yield f"recall@{k}", empty
            yield f"ndcg@{k}", empty
        return

    ev = eval_pairs.long()
    keys = torch.unique(ev[:, 0] * n_items + ev[:, 1])  # sorted, distinct pairs
    key_users = torch.div(keys, n_items, rounding_mode="floor")
    users, n_eval = torch.unique_consecutive(key_users, return_counts=True)
    kmax = ks[-1]
    top = full_sort_topk(user_emb, item_emb, users, exclude_pairs, kmax,
                         user_block=user_block, item_block=item_block)
    top_keys = users.unsqueeze(1) * n_items + top
    pos = torch.searchsorted(keys, top_keys).clamp_(max=keys.numel() - 1)
    hits = ((keys[pos] == top_keys) & (top >= 0)).double()
    disc = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64, device=top.device))
    ideal = torch.cumsum(disc, 0)
    n_eval = n_eval.double()
    for k in ks:
        h = hits[:, :k]
        recall = h.sum(1) / n_eval
        idcg = ideal[(n_eval.long().clamp(max=k) - 1)]
        ndcg = (h * disc[:k]).sum(1) / idcg
        yield f"recall@{k}", recall
        yield f"ndcg@{k}", ndcg


def popularity_metrics(train_pairs: torch.Tensor, n_users: int, n_items: int, eval_pairs: torch.Tensor,
                       exclude_pairs: Optional[torch.Tensor], ks: Union[int, Iterable[int]] = (10, 20, 50)
                       ) -> Dict[str, float]:
    """``ranking_metrics`` of the popularity ranking: every user gets the items ordered by their
    number of rows in ``train_pairs`` (ties: lower item id first), ``exclude_pairs`` masked as for
    a model.  The baseline a trained model has to beat."""
    _check_pairs("train_pairs", train_pairs)
    V.require_int("n_users", n_users, 1)
    V.require_int("n_items", n_items, 1)
    counts = torch.bincount(train_pairs[:, 1].long(), minlength=n_items).to(torch.float64)
    if counts.shape[0] != n_items:
        raise ValueError(f"train_pairs has item ids >= n_items ({n_items})")
    users = torch.ones(n_users, 1, dtype=torch.float64, device=counts.device)
    return ranking_metrics(users, counts.unsqueeze(1), eval_pairs, exclude_pairs, ks)
