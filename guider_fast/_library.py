"""torch.library registrations of the kernels, with fake (meta) implementations.

Registered ops are opaque to torch.compile's tracer but their fake kernels give
it output shapes and dtypes, so a compiled model that calls them traces without
a graph break inside the op.  The real kernels are imported on first call only
(importing guider_fast must not import triton).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


@torch.library.custom_op("guider_fast::sinkhorn_onchip", mutates_args=())
def sinkhorn_onchip(x: Tensor, y: Tensor, a: Tensor, b: Tensor, eps: float, p: int,
                    n_iters: int, tol: Optional[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused Triton Sinkhorn solve: (f, g, marginal_error, iterations) of each problem."""
    from .kernels import sinkhorn as kernels

    return kernels.solve_onchip(x, y, a, b, eps, p, n_iters, tol)


@sinkhorn_onchip.register_fake
def _sinkhorn_onchip_fake(x, y, a, b, eps, p, n_iters, tol):
    batch, n, _ = x.shape
    m = y.shape[1]
    return (x.new_empty(batch, n, dtype=torch.float32), x.new_empty(batch, m, dtype=torch.float32),
            x.new_empty(batch, dtype=torch.float32), x.new_empty(batch, dtype=torch.int32))
