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

Both graphs are sparse CSR tensors built once; nothing here is quadratic in the
catalogue except the kNN search.  That search streams item blocks against the
whole catalogue with a running top-k, so it costs O(n_items^2 d) time and
O(block x n_items) memory.  Above ``knn_max_items`` items it is skipped (the
item graph is off) unless asked for explicitly.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

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

    def forward(self):
        ego = torch.cat([self.user_emb, self.item_emb])
        total = ego
        layer = ego
        for _ in range(self.n_layers):
            layer = torch.sparse.mm(self.adjacency, layer)
            total = total + layer
        out = total / (self.n_layers + 1)
        users, items = out[:self.n_users], out[self.n_users:]
        if self.item_graph is not None and self.item_layers:
            hop = self.item_emb
            for _ in range(self.item_layers):
                hop = torch.sparse.mm(self.item_graph, hop)
            items = items + hop
        return users, items
