"""The default preset's adaptive calibration threshold: a two-cluster split of the training rows'
modality distances, chosen once before training.

The trainer calibrates every item once (frozen projections), so an interaction's distance is its
item's, and the training rows' distances are known before the first step.  Planted or real
modality noise shows as a second cluster of large distances; consistent data shows one cluster,
which GUIDER's fixed threshold on the batch's min-max normalised distance would still cut (the
normalisation stretches any spread to [0, 1]): on Amazon Baby with generated (consistent)
features a fixed 0.3 flags 73 % of the rows.  The rule:

1. Histogram the training rows' distances (256 bins over their range) and take Otsu's split
   (the cut that maximises the between-cluster variance).  Its *separation* ``eta`` (the share
   of the variance between the two clusters) is 2/pi ~ 0.64 for one normal cluster and 0.75 for
   a uniform one, and tends to 1 for two well-separated clusters.
2. Below ``MIN_SEPARATION`` (0.85) the distances are one cluster: nothing is flagged.
3. Otherwise the cut is the emptiest bin (5-bin moving average) between the two clusters' means,
   the middle one of a run of equally empty bins: the gap between the clusters rather than
   Otsu's cut, which lands inside a wide noisy cluster.
4. The cut, in distance units, becomes the threshold on the batch's normalised distance that
   ``GuiderLoss`` applies: ``(cut - lo) / (hi - lo)`` with ``lo`` / ``hi`` the mean minimum and
   maximum of 16 random training batches of the run's batch size (seeded by the run's seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MIN_SEPARATION = 0.85
BINS = 256
SMOOTH_BINS = 5
BOUND_BATCHES = 16
NO_FLAGS = 2.0  # above any normalised distance (they lie in [0, 1)): every row is clean


@dataclass(frozen=True)
class SplitThreshold:
    threshold: float            # on the batch's normalised distance (NO_FLAGS: nothing flagged)
    separation: float           # Otsu's between-cluster share of the variance, in [0, 1]
    cut: Optional[float]        # the cut in distance units, None when there is one cluster
    expected_flagged: float     # share of the training rows above the cut

    def describe(self) -> str:
        if self.cut is None:
            return (f"threshold off: the training rows' distances form one cluster (separation "
                    f"{self.separation:.3f} < {MIN_SEPARATION}), nothing is flagged")
        return (f"threshold {self.threshold:.4g} (two-cluster split of the training rows' distances: "
                f"separation {self.separation:.3f}, {100 * self.expected_flagged:.1f}% of them above the cut)")


def two_cluster_cut(distances: torch.Tensor):
    """``(cut, separation)`` of 1-d ``distances`` (steps 1-3 above); ``cut`` is None for one cluster."""
    x = distances.detach().reshape(-1).to("cpu", torch.float64)
    x = x[torch.isfinite(x)]
    if x.numel() < 2:
        return None, 0.0
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return None, 0.0
    scaled = (x - lo) / (hi - lo)
    p = torch.histc(scaled, BINS, 0.0, 1.0)
    p = p / p.sum()
    centres = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS
    w0 = p.cumsum(0)
    m0 = (p * centres).cumsum(0)
    mean = float(m0[-1])
    variance = float((p * (centres - mean) ** 2).sum())
    between = (mean * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp(min=1e-300)
    between[(w0 <= 0) | (w0 >= 1)] = 0.0
    k = int(between[:-1].argmax())
    separation = float(between[k]) / variance if variance > 0 else 0.0
    if separation < MIN_SEPARATION:
        return None, separation
    mu0, mu1 = float(m0[k] / w0[k]), float((mean - m0[k]) / (1 - w0[k]))
    first, last = int(mu0 * BINS), min(int(mu1 * BINS), BINS - 1)
    smooth = torch.nn.functional.avg_pool1d(p.view(1, 1, -1), SMOOTH_BINS, 1, SMOOTH_BINS // 2,
                                            count_include_pad=False).view(-1)
    segment = smooth[first:last + 1]
    emptiest = torch.nonzero(segment <= segment.min() * (1 + 1e-9) + 1e-15).view(-1)
    j = first + int(emptiest[len(emptiest) // 2])
    return lo + (j + 0.5) / BINS * (hi - lo), separation


def split_threshold(row_distances: torch.Tensor, batch_size: int, seed: int) -> SplitThreshold:
    """The adaptive threshold of the rows whose distances are ``row_distances`` (one per training
    row), for batches of ``batch_size`` rows (step 4 above)."""
    cut, separation = two_cluster_cut(row_distances)
    if cut is None:
        return SplitThreshold(NO_FLAGS, separation, None, 0.0)
    d = row_distances.detach().reshape(-1).to("cpu", torch.float64)
    gen = torch.Generator().manual_seed(seed)
    size = min(batch_size, d.numel())
    batches = d[torch.randint(0, d.numel(), (BOUND_BATCHES, size), generator=gen)]
    lo, hi = float(batches.min(dim=1).values.mean()), float(batches.max(dim=1).values.mean())
    threshold = (cut - lo) / (hi - lo) if hi > lo else NO_FLAGS
    return SplitThreshold(threshold, separation, cut, float((d > cut).double().mean()))
