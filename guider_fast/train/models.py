"""A reference multi-modal graph recommender for GUIDER: LightGCN propagation plus FREEDOM's
frozen item-item kNN graph built from the modality features.

``GraphRecommender`` holds user and item ID embeddings.  ``forward()`` returns the
propagated tables:

* users and items: the mean over layers 0..L of ``E_{l+1} = A_hat E_l``, where
  ``A_hat = D^-1/2 [[0, R], [R^T, 0]] D^-1/2`` is the normalised bipartite graph of
  the training interactions (LightGCN);
* items additionally get ``S_hat E_item`` for each of ``item_layers`` hops over the
  frozen item-item graph.  ``S_hat`` is the symmetric normalised kNN graph of each
  modality's cosine similarities (top ``knn`` neighbours per item, the graphs of the
  available modalities averaged), as FREEDOM does.

``ShardedGraphRecommender`` is the same model with the users split over processes (each holds
its users' rows; the item table is replicated): ``guider_fast.train.distributed`` trains it.

Both graphs are sparse CSR tensors built once, with their transposes (the bipartite graph is
its own), so that the backward of a propagation never transposes a matrix.  Nothing here is
quadratic in the catalogue except the kNN search.  That search streams item blocks against the
whole catalogue with a running top-k, so it costs O(n_items^2 d) time and
O(block x n_items) memory.  Above ``knn_max_items`` items it is skipped (the
item graph is off) unless asked for explicitly.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

KNN_MAX_ITEMS = 200_000


def _csr(rows, cols, values, size) -> torch.Tensor:
    """A (size, size) CSR matrix from distinct (row, col) entries."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (size, size), check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.coalesce().to_sparse_csr()


def symmetric_normalized(rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 (CSR) of the undirected graph with edges (rows, cols); repeated edges count once."""
    all_rows = torch.cat([rows, cols])
    all_cols = torch.cat([cols, rows])
    keys = torch.unique(all_rows * size + all_cols)
    rows, cols = keys // size, keys % size
    degree = torch.bincount(rows, minlength=size).float()
    inv_sqrt = degree.clamp_min(1).rsqrt()
    return _csr(rows, cols, inv_sqrt[rows] * inv_sqrt[cols], size)


def normalized_bipartite(train: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the (n_users + n_items) square bipartite graph, as a CSR tensor."""
    return symmetric_normalized(train[:, 0].long(), train[:, 1].long() + n_users, n_users + n_items)


def knn_graph(features: torch.Tensor, k: int, *, block: int = 2048) -> torch.Tensor:
    """Symmetric normalised kNN graph (CSR) of cosine similarities; self-loops excluded."""
    n = features.shape[0]
    k = min(k, n - 1)
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    neighbours = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, block):
        sims = unit[start:start + block] @ unit.T
        rows = torch.arange(start, min(start + block, n))
        sims[torch.arange(rows.shape[0]), rows] = float("-inf")
        neighbours[start:start + block] = sims.topk(k, dim=1).indices
    return symmetric_normalized(torch.arange(n).repeat_interleave(k), neighbours.reshape(-1), n)


def item_graph_from_features(modalities: Sequence[Optional[torch.Tensor]], k: int) -> Optional[torch.Tensor]:
    """Average of the per-modality kNN graphs (None when no modality is given or k == 0)."""
    graphs = [knn_graph(m, k) for m in modalities if m is not None]
    if not graphs or k == 0:
        return None
    graph = graphs[0].to_sparse_coo()
    for other in graphs[1:]:
        graph = graph + other.to_sparse_coo()
    graph = (graph * (1.0 / len(graphs))).coalesce()
    return _csr(graph.indices()[0], graph.indices()[1], graph.values(), graph.shape[0])


class _ConstantSparseMM(torch.autograd.Function):
    """``a @ x`` for a constant sparse ``a`` whose transpose ``a_t`` is at hand.

    ``torch.sparse.mm``'s backward transposes a CSR matrix on every call (a sort of its
    entries: about 40 % of a CPU training step at 20k users x 7k items); here the backward is
    ``a_t @ grad`` with ``a_t`` built once.
    """

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t  # a constant buffer, not a saved activation
        return torch.sparse.mm(a, x)

    @staticmethod
    def backward(ctx, grad):
        return None, None, torch.sparse.mm(ctx.a_t, grad)


def _transposed(graph: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if graph is None:
        return None
    coo = graph.to_sparse_coo().coalesce()
    return _csr(coo.indices()[1], coo.indices()[0], coo.values(), coo.shape[0])


class GraphRecommender(nn.Module):
    """LightGCN user/item propagation + FREEDOM's frozen item-item graph (see the module doc)."""

    def __init__(self, n_users: int, n_items: int, train: torch.Tensor, *, dim: int = 64,
                 n_layers: int = 2, item_graph: Optional[torch.Tensor] = None, item_layers: int = 1,
                 seed: int = 0):
        super().__init__()
        for name, value in (("n_users", n_users), ("n_items", n_items), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if n_layers < 0 or item_layers < 0:
            raise ValueError(f"n_layers and item_layers must be >= 0, got {n_layers}, {item_layers}")
        generator = torch.Generator().manual_seed(seed)
        self.n_users, self.n_items, self.n_layers, self.item_layers = n_users, n_items, n_layers, item_layers
        # Xavier-uniform scale, as LightGCN / FREEDOM initialise their ID embeddings.
        bound_u = (6.0 / (n_users + dim)) ** 0.5
        bound_i = (6.0 / (n_items + dim)) ** 0.5
        self.user_emb = nn.Parameter((torch.rand(n_users, dim, generator=generator) * 2 - 1) * bound_u)
        self.item_emb = nn.Parameter((torch.rand(n_items, dim, generator=generator) * 2 - 1) * bound_i)
        # Non-persistent buffers: they follow .to(device) and stay out of checkpoints (rebuilt from data).
        self.register_buffer("adjacency", normalized_bipartite(train, n_users, n_items), persistent=False)
        self.register_buffer("item_graph", item_graph, persistent=False)
        self.register_buffer("item_graph_t", _transposed(item_graph), persistent=False)

    def forward(self):
        ego = torch.cat([self.user_emb, self.item_emb])
        total = ego
        layer = ego
        for _ in range(self.n_layers):
            # A_hat is symmetric entry for entry (symmetric_normalized): its own transpose.
            layer = _ConstantSparseMM.apply(self.adjacency, self.adjacency, layer)
            total = total + layer
        out = total / (self.n_layers + 1)
        users, items = out[:self.n_users], out[self.n_users:]
        if self.item_graph is not None and self.item_layers:
            hop = self.item_emb
            for _ in range(self.item_layers):
                hop = _ConstantSparseMM.apply(self.item_graph, self.item_graph_t, hop)
            items = items + hop
        return users, items


def _xavier_rows(n_users: int, n_items: int, dim: int, users: torch.Tensor, seed: int, chunk: int = 1 << 16):
    """``GraphRecommender``'s initial rows of ``users`` (sorted ids) and its whole item table.

    The single-process model draws ``rand(n_users, dim)`` then ``rand(n_items, dim)`` from one CPU
    generator; drawing the user table in chunks yields the same numbers (the CPU generator is
    consumed serially), so each process keeps only its rows and never holds the whole table.
    """
    generator = torch.Generator().manual_seed(seed)
    bound_u = (6.0 / (n_users + dim)) ** 0.5
    bound_i = (6.0 / (n_items + dim)) ** 0.5
    parts = []
    for start in range(0, n_users, chunk):
        stop = min(start + chunk, n_users)
        block = torch.rand(stop - start, dim, generator=generator)
        lo, hi = torch.searchsorted(users, torch.tensor([start, stop])).tolist()
        if hi > lo:
            parts.append(block[users[lo:hi] - start])
    user_rows = torch.cat(parts) if parts else torch.empty(0, dim)
    return (user_rows * 2 - 1) * bound_u, (torch.rand(n_items, dim, generator=generator) * 2 - 1) * bound_i


def _csr_rect(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.coalesce().to_sparse_csr()


class ShardedGraphRecommender(nn.Module):
    """``GraphRecommender`` with the users split over processes and the items replicated.

    This process holds the ID embeddings of ``users`` (sorted global ids; row j is user
    ``users[j]``) and the whole item table.  With ``R`` the normalised user-item block of
    LightGCN's ``A_hat`` (``R[u, i] = 1 / sqrt(deg_u deg_i)``) and ``R_p`` its rows of this
    process, a propagation layer is

        U_{l+1} = R_p I_l                      (this process's users: local)
        I_{l+1} = sum over processes of R_p^T U_l   (``reduce_items``, an autograd-aware all-reduce)

    so ``forward()`` returns this process's rows of ``GraphRecommender.forward()``'s users and
    all of its items (the FREEDOM item-item hops are replicated).  ``train`` holds this process's
    training rows (global user ids) and ``item_degree`` every item's number of distinct training
    users over all processes.  The initialisation is ``GraphRecommender``'s (same ``seed``),
    row for row.

    The item side of layer l + 1 needs the user side of layer l only, so the partial sums of two
    consecutive layers travel in one all-reduce: ceil(n_layers / 2) all-reduces of
    (2, n_items, dim) per forward, and as many in the backward.  Each one depends on the one
    before, so every process runs the backward all-reduces in the same order whatever its loss.
    """

    def __init__(self, n_users: int, n_items: int, users: torch.Tensor, train: torch.Tensor,
                 item_degree: torch.Tensor, reduce_items: Callable[[torch.Tensor], torch.Tensor], *,
                 dim: int = 64, n_layers: int = 2, item_graph: Optional[torch.Tensor] = None,
                 item_layers: int = 1, seed: int = 0):
        super().__init__()
        for name, value in (("n_users", n_users), ("n_items", n_items), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if n_layers < 0 or item_layers < 0:
            raise ValueError(f"n_layers and item_layers must be >= 0, got {n_layers}, {item_layers}")
        users = users.to("cpu", torch.int64)
        if users.numel() > 1 and not bool((users[1:] > users[:-1]).all()):
            raise ValueError("users must be sorted, distinct global user ids")
        self.n_users, self.n_items, self.n_layers, self.item_layers = n_users, n_items, n_layers, item_layers
        self.reduce_items = reduce_items
        user_rows, item_rows = _xavier_rows(n_users, n_items, dim, users, seed)
        self.user_emb = nn.Parameter(user_rows)
        self.item_emb = nn.Parameter(item_rows)
        self.register_buffer("users", users, persistent=False)
        # GraphRecommender's normalisation: distinct edges, degrees clamped at 1.  A user's
        # edges all live on its process, so its degree is local; an item's is global.
        train = train.to("cpu", torch.int64)
        local = torch.searchsorted(users, train[:, 0].contiguous())
        if train.shape[0] and (users.numel() == 0 or not bool(
                (users[local.clamp(max=users.numel() - 1)] == train[:, 0]).all())):
            raise ValueError("train holds users that this process does not own")
        adjacency = adjacency_t = None
        if n_layers:  # (a matrix-factorisation model, n_layers = 0, propagates nothing)
            keys = torch.unique(local * n_items + train[:, 1])
            rows, cols = keys // n_items, keys % n_items
            user_deg = torch.bincount(rows, minlength=users.numel()).float()
            inv_u = user_deg.clamp_min(1).rsqrt()
            inv_i = item_degree.to("cpu").float().clamp_min(1).rsqrt()
            values = inv_u[rows] * inv_i[cols]
            adjacency = _csr_rect(rows, cols, values, (users.numel(), n_items))
            adjacency_t = _csr_rect(cols, rows, values, (n_items, users.numel()))
        self.register_buffer("adjacency", adjacency, persistent=False)
        self.register_buffer("adjacency_t", adjacency_t, persistent=False)
        self.register_buffer("item_graph", item_graph, persistent=False)
        item_graph_t = None
        if item_graph is not None:  # FREEDOM's graph is symmetric, but the backward need not assume it
            coo = item_graph.to_sparse_coo().coalesce()
            item_graph_t = _csr_rect(coo.indices()[1], coo.indices()[0], coo.values(), tuple(coo.shape))
        self.register_buffer("item_graph_t", item_graph_t, persistent=False)

    def forward(self):
        user, item = self.user_emb, self.item_emb
        total_u, total_i = user, item
        a, a_t = self.adjacency, self.adjacency_t

        def users_from(items):  # R_p I
            return _ConstantSparseMM.apply(a, a_t, items)

        def items_from(users):  # this process's part of R^T U
            return _ConstantSparseMM.apply(a_t, a, users)

        layer = 0
        while layer < self.n_layers:
            # (U_l, I_l) in hand: U_{l+1} = R_p I_l locally, then the item partial sums of
            # layers l+1 (from U_l) and l+2 (from U_{l+1}) in one all-reduce.
            next_user = users_from(item)
            pair = 2 if layer + 2 <= self.n_layers else 1
            partial = [items_from(user)]
            if pair == 2:
                partial.append(items_from(next_user))
            items = self.reduce_items(torch.stack(partial))
            total_u = total_u + next_user
            total_i = total_i + items[0]
            if pair == 2:
                user = users_from(items[0])
                total_u = total_u + user
                total_i = total_i + items[1]
                item = items[1]
            else:
                user, item = next_user, items[0]
            layer += pair
        users = total_u / (self.n_layers + 1)
        items = total_i / (self.n_layers + 1)
        if self.item_graph is not None and self.item_layers:
            hop = self.item_emb
            for _ in range(self.item_layers):
                hop = _ConstantSparseMM.apply(self.item_graph, self.item_graph_t, hop)
            items = items + hop
        return users, items
