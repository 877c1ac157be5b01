"""``GuiderLoss``: GUIDER's per-batch loss (calibration + DBPR) as an ``nn.Module``."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from . import _dispatch
from . import _validate as V
from .calibration import (DISTANCES, Calibration, ItemCalibration, _calibrate_items_unchecked,
                          batch_bounds, calibrate, precompute_item_calibration, with_batch_bounds)
from .dbpr import REDUCTIONS, _check_dbpr, _dbpr_unchecked


class GuiderLoss(nn.Module):
    """GUIDER's loss for one batch of (user, positive, negative) triplets.

    Owns the reference's layers: ``text_proj`` (text_dim -> feat_embed_dim),
    ``image_proj`` (image_dim -> feat_embed_dim) and the hash layers
    ``user_hash`` (embed_dim -> hash_bits), ``text_hash`` and ``image_hash``
    (feat_embed_dim -> hash_bits).  ``forward`` gathers rows itself from the
    full tables, calibrates the positives (AMSC: ``guider_fast.calibrate``) and returns
    the DBPR loss weighted by the calibration (``guider_fast.dbpr_loss``).  The calibration of
    the last call is kept in ``last_calibration``.

    Frozen-item mode: the calibration weights carry no gradient, so in the
    reference these five layers never learn and every item's projected
    features, text/image distance and hash codes are constants.
    ``precompute_items(text_feat, image_feat)`` computes them once for the whole
    catalogue; later calls need no features (pass None) and skip the two large
    projections per batch.  It applies while the layers stay frozen, which is
    the case whenever this loss is their only consumer.  If anything updates
    them (another loss, an optimizer step on them, ``load_state_dict``), the
    cache is stale: ``forward`` detects the parameter change and raises, and
    ``precompute_items`` must be called again (or ``clear_item_cache()``).

    noisy_weight : the DBPR weight of interactions the calibration flags as noisy.
        The reference uses 1 (the default here), while clean rows get their
        hash-code similarity (about 0.5 with untrained hash layers).  So the
        better the flags, the more the flagged rows outweigh the clean ones:
        ``benchmarks/results/train_cpu.md`` measures this on planted noise.
        ``noisy_weight=0`` drops the flagged rows instead.  ``last_calibration``
        keeps the reference weights.
    """

    def __init__(self, text_dim: int, image_dim: int, embed_dim: int = 64,
                 feat_embed_dim: int = 64, hash_bits: int = 64, threshold: float = 0.7,
                 distance: str = "geomloss", backend: str = "auto", noisy_weight: float = 1.0):
        super().__init__()
        for name, value in (("text_dim", text_dim), ("image_dim", image_dim), ("embed_dim", embed_dim),
                            ("feat_embed_dim", feat_embed_dim), ("hash_bits", hash_bits)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.text_proj = nn.Linear(text_dim, feat_embed_dim)
        self.image_proj = nn.Linear(image_dim, feat_embed_dim)
        self.user_hash = nn.Linear(embed_dim, hash_bits)
        self.text_hash = nn.Linear(feat_embed_dim, hash_bits)
        self.image_hash = nn.Linear(feat_embed_dim, hash_bits)
        V.require_real("threshold", threshold)
        V.require_choice("distance", distance, DISTANCES)
        _dispatch.requested_backend(backend)
        self.threshold = float(threshold)
        V.require_real("noisy_weight", noisy_weight)
        if noisy_weight < 0:
            raise ValueError(f"noisy_weight must be >= 0, got {noisy_weight}")
        self.noisy_weight = float(noisy_weight)
        self.distance = distance
        self.backend = backend
        self.last_calibration: Optional[Calibration] = None
        self._item_cache = None
        self._cache_versions = None

    def _item_layers(self):
        return (self.text_proj, self.image_proj, self.text_hash, self.image_hash)

    def _cache_key(self):
        # In-place updates bump _version; rebinding .data or .to() changes the
        # storage; the distance choice changes every cached value.
        return (self.distance,) + tuple((p._version, p.data_ptr(), p.device)
                                        for layer in self._item_layers() for p in layer.parameters())

    def _check_features(self, text_feat, image_feat):
        V.require_float("text_feat", text_feat)
        V.require_float("image_feat", image_feat)
        V.require_rank("text_feat", text_feat, (2,), "(n_items, text_dim) table")
        V.require_rank("image_feat", image_feat, (2,), "(n_items, image_dim) table")
        V.require_shape("text_feat", text_feat, (text_feat.shape[0], self.text_proj.in_features),
                        "text_dim columns")
        V.require_shape("image_feat", image_feat, (text_feat.shape[0], self.image_proj.in_features),
                        "as many rows as text_feat, image_dim columns")

    def _project(self, text_rows, image_rows):
        # Features may be stored in another dtype (e.g. half): cast the gathered rows only.
        t = self.text_proj(text_rows.to(self.text_proj.weight.dtype))
        v = self.image_proj(image_rows.to(self.image_proj.weight.dtype))
        # NaN/Inf in a feature row survives the projection: checking the small
        # projected rows names the culprit without reading 4096-d rows again.
        if V.checks_enabled() and t.device.type == "cpu":
            checks = V.ValueChecks()
            checks.finite("text_feat (rows projected by text_proj)", t)
            checks.finite("image_feat (rows projected by image_proj)", v)
            checks.raise_if_any()
        return t, v, self.text_hash(t), self.image_hash(v)

    @torch.no_grad()
    def precompute_items(self, text_feat: torch.Tensor, image_feat: torch.Tensor,
                         chunk_size: int = 65536) -> None:
        """Cache every item's distance and packed ternary hash codes (frozen-item mode).

        The cache is a ``guider_fast.ItemCalibration`` (``item_calibration``).
        """
        self._check_features(text_feat, image_feat)
        parts = []
        for start in range(0, text_feat.shape[0], chunk_size):
            t, v, t_code, v_code = self._project(text_feat[start:start + chunk_size],
                                                 image_feat[start:start + chunk_size])
            parts.append(precompute_item_calibration(t, v, t_code, v_code, distance=self.distance,
                                                     chunk_size=chunk_size))
        self._item_cache = ItemCalibration(
            *(torch.cat([getattr(part, name) for part in parts])
              for name in ("distance", "text_sign", "text_nonzero", "image_sign", "image_nonzero")),
            parts[0].bits)
        self._cache_versions = self._cache_key()

    @property
    def item_calibration(self) -> Optional[ItemCalibration]:
        return self._item_cache

    @torch.no_grad()
    def align_projections(self, text_feat: torch.Tensor, image_feat: torch.Tensor, *,
                          ridge: float = 1e-3, trim: float = 0.25, chunk_size: int = 65536) -> Dict[str, float]:
        """Fit ``image_proj`` so that ``image_proj(v_i) ~ text_proj(t_i)`` over the catalogue.

        This goes beyond the reference.  There, both projections keep their random
        initialisation (the calibration weights carry no gradient), so the text/image
        distance compares two unrelated random maps, and clean and noisy
        interactions look alike.  Aligning the image projection onto the text
        projection's space makes the distance measure modality disagreement.

        The fit is trimmed ridge least squares.  After a first fit, the ``trim``
        share of items with the largest residuals (the likely inconsistent ones) is
        dropped and the fit is redone.  Normal equations are accumulated over
        ``chunk_size`` items, so memory stays at O(image_dim^2).  Returns the mean
        squared residual before and after alignment.  Any item cache becomes stale:
        call ``precompute_items`` afterwards.
        """
        self._check_features(text_feat, image_feat)
        V.require_positive("ridge", ridge)
        if not 0 <= trim < 1:
            raise ValueError(f"trim must be in [0, 1), got {trim!r}")
        dtype = torch.float64
        weight = self.image_proj.weight
        n_items = text_feat.shape[0]

        def chunks():
            for start in range(0, n_items, chunk_size):
                t = text_feat[start:start + chunk_size].to(weight)
                v = image_feat[start:start + chunk_size].to(weight)
                target = self.text_proj(t).to(dtype)
                design = torch.cat([v.to(dtype), torch.ones(v.shape[0], 1, dtype=dtype, device=v.device)], 1)
                yield start, design, target

        def residuals(solution):
            out = torch.empty(n_items, dtype=dtype, device=weight.device)
            for start, design, target in chunks():
                out[start:start + design.shape[0]] = (design @ solution - target).pow(2).sum(1)
            return out

        def fit(keep):
            gram = torch.zeros(image_feat.shape[1] + 1, image_feat.shape[1] + 1, dtype=dtype,
                               device=weight.device)
            cross = torch.zeros(image_feat.shape[1] + 1, target_dim, dtype=dtype, device=weight.device)
            for start, design, target in chunks():
                mask = keep[start:start + design.shape[0]].unsqueeze(1).to(dtype)
                gram += (design * mask).T @ design
                cross += (design * mask).T @ target
            scale = gram.diagonal().mean()
            gram.diagonal().add_(ridge * scale)
            return torch.linalg.solve(gram, cross)

        target_dim = weight.shape[0]
        current = torch.cat([weight.T, self.image_proj.bias.unsqueeze(0)]).to(dtype)
        before = residuals(current)
        solution = fit(torch.ones(n_items, dtype=torch.bool, device=weight.device))
        if trim > 0:
            first = residuals(solution)
            kept = max(1, int(round((1 - trim) * n_items)))
            keep = first <= first.kthvalue(kept).values
            solution = fit(keep)
        weight.copy_(solution[:-1].T.to(weight.dtype))
        self.image_proj.bias.copy_(solution[-1].to(weight.dtype))
        after = residuals(solution)
        return {"mse_before": float(before.mean()) / target_dim, "mse_after": float(after.mean()) / target_dim}

    def clear_item_cache(self) -> None:
        self._item_cache = None
        self._cache_versions = None

    @property
    def items_precomputed(self) -> bool:
        return self._item_cache is not None

    def forward(self, user_emb: torch.Tensor, item_emb: torch.Tensor, users: torch.Tensor,
                pos_items: torch.Tensor, neg_items: torch.Tensor,
                text_feat: Optional[torch.Tensor] = None,
                image_feat: Optional[torch.Tensor] = None, *, reduction: str = "mean",
                reduce_max: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """The DBPR loss of the batch weighted by its calibration.

        reduction : "mean" (default), "sum" or "none", as ``dbpr_loss``.
        reduce_max : for a batch split over processes, each calling with its part: a function
            returning the elementwise maximum of a tensor over the processes (an all-reduce
            with ``ReduceOp.MAX``).  The calibration's min-max normalisation then uses the
            whole batch's min and max (one 2-element reduction), so every part is flagged and
            weighted as in the whole batch; normalising each part by itself would flag other
            rows.  None (default): the batch is all here.
        """
        _check_dbpr(user_emb, item_emb, users, pos_items, neg_items, None)
        V.require_choice("reduction", reduction, REDUCTIONS)
        # A split batch calibrates its part with every row clean (the normalised distance lies
        # in [0, 1), so threshold 2 keeps every row: the weights are the clean-row weights),
        # then applies the whole batch's bounds.
        threshold = self.threshold if reduce_max is None else 2.0
        with torch.no_grad():
            user_rows = user_emb.detach().index_select(0, users.long())
            u_code = self.user_hash(user_rows.to(self.user_hash.weight.dtype))
            if self._item_cache is not None:
                if self._cache_key() != self._cache_versions:
                    raise RuntimeError(
                        "GuiderLoss item cache is stale: text_proj/image_proj/text_hash/image_hash "
                        "(or distance) changed, or the module moved, since precompute_items(); "
                        "call precompute_items() again")
                cache = self._item_cache
                if pos_items.device != cache.distance.device:
                    raise ValueError(f"pos_items is on {pos_items.device} but the item cache is on "
                                     f"{cache.distance.device}")
                if cache.n_items != item_emb.shape[0]:
                    raise ValueError(f"the item cache holds {cache.n_items} items but item_emb has "
                                     f"{item_emb.shape[0]} rows")
                # pos_items were range-checked with the DBPR inputs above.
                calibration = _calibrate_items_unchecked(cache, u_code, pos_items, threshold, self.backend)
            else:
                if text_feat is None or image_feat is None:
                    raise ValueError("text_feat and image_feat are required unless precompute_items() "
                                     "was called")
                self._check_features(text_feat, image_feat)
                if text_feat.shape[0] != item_emb.shape[0]:
                    raise ValueError(f"text_feat has {text_feat.shape[0]} rows but item_emb has "
                                     f"{item_emb.shape[0]}: features are indexed by item id")
                pos = pos_items.long()
                t, v, t_code, v_code = self._project(text_feat.index_select(0, pos),
                                                     image_feat.index_select(0, pos))
                calibration = calibrate(t, v, u_code, t_code, v_code, threshold=threshold,
                                        distance=self.distance, backend=self.backend)
            if reduce_max is not None:
                lo, hi = batch_bounds(calibration.distance, reduce_max)
                calibration = with_batch_bounds(calibration, lo, hi, self.threshold)
        self.last_calibration = calibration
        weights = calibration.weights
        if self.noisy_weight != 1.0:
            weights = torch.where(calibration.clean, weights, torch.full_like(weights, self.noisy_weight))
        return _dbpr_unchecked(user_emb, item_emb, users, pos_items, neg_items, weights,
                               reduction, self.backend)
