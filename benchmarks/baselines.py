"""The one module of naive and peer baselines: every suite and script of benchmarks/ imports
its contenders' non-guider_fast code from here.

* **DBPR** (weighted BPR): ``naive_dbpr_loss``, what one writes by hand (gather, dot,
  logsigmoid, autograd; ``sparse=True`` gathers through ``F.embedding(sparse=True)``, i.e.
  ``nn.Embedding(sparse=True)``); ``hand_derived_grads`` / ``hand_derived_fwd_bwd`` /
  ``hand_derived_step``, the same loss with hand-derived gradients and no autograd, built
  from the package's reference (``guider_fast.reference.dbpr``), the code torch.compile
  contenders compile.
* **Calibration** (AMSC): ``reference_calibrate``, GUIDER's reference pipeline with a
  GeomLoss ``SamplesLoss("sinkhorn", p=1, blur=0.1)`` distance on one-point clouds, then
  min-max normalisation, threshold and sign-code weights (the package reference's
  ``minmax_normalize`` / ``sign_similarity`` / ``calibration_weights``);
  ``reference_guider_step``, GUIDER's per-batch loss the plain way.
* **Sinkhorn** at one fixed eps, ``N_ITERS`` iterations, cost ``|x - y|^2 / 2``:
  ``naive_torch_sinkhorn`` (alternating logsumexp), ``pot_solve`` / ``pot_sinkhorn`` (POT's
  batched log-domain solver; its cost and reg are twice ours) and ``geomloss_sinkhorn``
  (GeomLoss's tensorized loop); ``geomloss_samples_loss`` for the debiased divergence;
  ``compiled_naive_sinkhorn`` (the naive iteration through torch.compile / inductor) and
  ``ott_sinkhorn`` (OTT-JAX, jit + vmap, Danskin gradients; the ``bench`` extra).
  They run on the device of their inputs.

POT and GeomLoss are imported when first used: a missing peer costs only its contender
(``peer_missing`` says why).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from guider_fast.reference import calibration as ref_calibration
from guider_fast.reference import dbpr as ref_dbpr

N_ITERS = 100
# Fixed-eps workloads: eps = 5% of the median entry of the cost matrix: small enough
# that the plan is far from the independent coupling, large enough that 100 iterations
# get guider_fast's marginals to ~1e-6, so all contenders agree on the value (to 1e-4,
# asserted by the suites) and the comparison is of speed alone.
EPS_FRACTION_OF_MEDIAN_COST = 0.05
CALIBRATION_THRESHOLD = 0.7


def assert_close(name, actual, expected, rtol=1e-5):
    """max |actual - expected| <= rtol * max |expected| (in float64)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rtol * max(scale, 1e-30), \
        f"{name}: max abs difference {error:.3g} > {rtol} * {scale:.3g}"


def relative_error(got, want) -> float:
    """max |got - want| / max |want| (inf where got is not finite)."""
    got, want = got.detach().double(), want.detach().double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return (got - want).abs().max().item() / (want.abs().max().item() or 1.0)


def peer_missing(module: str) -> Optional[str]:
    """None where the peer library imports, else the reason (for a skipped row)."""
    try:
        __import__(module)
    except ImportError as exc:
        return f"{module} is not importable: {exc}"
    return None


# --------------------------------------------------------------------------- DBPR


def naive_dbpr_loss(user_emb, item_emb, users, pos_items, neg_items, weights, sparse=False):
    """GUIDER's weighted BPR written the plain way: gather, dot, logsigmoid, autograd.

    neg_items is (B,) (one negative, GUIDER's case) or (B, K) (mean over the K terms).
    ``sparse``: gathers through ``F.embedding(..., sparse=True)``, so the tables get sparse
    gradients, as with ``nn.Embedding(sparse=True)``.
    """
    if sparse:
        u = F.embedding(users, user_emb, sparse=True)
        p = F.embedding(pos_items, item_emb, sparse=True)
        n = F.embedding(neg_items, item_emb, sparse=True)
    else:
        u, p, n = user_emb[users], item_emb[pos_items], item_emb[neg_items]
    pos_score = (u * p).sum(-1)
    if neg_items.dim() == 1:
        return -(weights * F.logsigmoid(pos_score - (u * n).sum(-1))).mean()
    neg_score = (u.unsqueeze(1) * n).sum(-1)
    return -(weights * F.logsigmoid(pos_score.unsqueeze(1) - neg_score).mean(1)).mean()


def hand_derived_grads(user_table, item_table, users, pos_items, neg_items, weights):
    """DBPR loss (mean reduction) and per-occurrence row gradients, without autograd.

    neg_items is (B, K).  Returns (loss, dL/du (B, D), dL/dp (B, D), dL/dn (B, K, D)),
    from the reference's gather-and-score forward and hand-derived backward.
    """
    batch, k = neg_items.shape
    u, p, n, margin = ref_dbpr.gather_and_score(user_table, item_table, users, pos_items, neg_items)
    loss = -(weights * F.logsigmoid(margin).mean(1)).mean()
    s, s_total = ref_dbpr.scaled_sigmoid(margin, weights / batch)
    d_user = ref_dbpr.user_row_gradients(p, n, s, s_total)
    return loss, d_user, -s_total * u, s.unsqueeze(2) * u.unsqueeze(1)


def hand_derived_fwd_bwd(user_table, item_table, users, pos_items, neg_items, weights):
    """(loss, dense grad of the user table, dense grad of the item table)."""
    loss, d_u, d_p, d_n = hand_derived_grads(user_table, item_table, users, pos_items, neg_items, weights)
    grad_user = torch.zeros_like(user_table).index_add_(0, users, d_u)
    grad_item = torch.zeros_like(item_table).index_add_(0, pos_items, d_p).index_add_(
        0, neg_items.reshape(-1), d_n.reshape(-1, user_table.shape[1]))
    return loss, grad_user, grad_item


def hand_derived_step(user_table, item_table, users, pos_items, neg_items, weights, lr):
    """One SGD step in place; ``index_add_`` adds duplicates one occurrence at a time
    (SGD is linear: equal to dense grad + SGD up to rounding).  ``lr`` may be a tensor
    (no recompile under torch.compile for another value)."""
    loss, d_u, d_p, d_n = hand_derived_grads(user_table, item_table, users, pos_items, neg_items, weights)
    user_table.index_add_(0, users, d_u * -lr)
    item_table.index_add_(0, pos_items, d_p * -lr)
    item_table.index_add_(0, neg_items.reshape(-1), (d_n * -lr).reshape(-1, user_table.shape[1]))
    return loss


def compile_hand_derived(fn, dynamic: bool, backend: str = "inductor"):
    """torch.compile of a hand-derived function, with room for one graph per shape."""
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 256))
    return torch.compile(fn, dynamic=dynamic, backend=backend)


# -------------------------------------------------------------------- calibration

_GEOMLOSS_DISTANCE = {}


def geomloss_distance():
    """GUIDER's distance, built once (as GUIDER builds it once in the model's constructor)."""
    if "loss" not in _GEOMLOSS_DISTANCE:
        import geomloss

        _GEOMLOSS_DISTANCE["loss"] = geomloss.SamplesLoss("sinkhorn", p=1, blur=0.1)  # GUIDER's
    return _GEOMLOSS_DISTANCE["loss"]


def reference_calibrate(t, v, u_code, t_code, v_code, threshold=CALIBRATION_THRESHOLD):
    """GUIDER's reference AMSC pipeline; returns (weights, clean, distance)."""
    # One-point clouds per interaction; the image side is shifted by 1e-8 as in GUIDER.
    distance = geomloss_distance()(t[:, None, :], v[:, None, :] + 1e-8)
    clean = ref_calibration.minmax_normalize(distance) < threshold
    weights = ref_calibration.calibration_weights(clean, ref_calibration.sign_similarity(u_code, t_code),
                                                  ref_calibration.sign_similarity(u_code, v_code))
    return weights, clean, distance


def reference_guider_step(layers, user_emb, item_emb, users, pos_items, neg_items, text_feat, image_feat):
    """GUIDER's per-batch loss written the plain way, with the layers of a GuiderLoss.

    Index the positives' features, project them (text_proj / image_proj), hash
    users and items, calibrate with GeomLoss on one-point clouds as
    ``reference_calibrate`` does, then the weighted BPR with autograd.  The
    calibration weights carry no gradient in GUIDER, so they are computed
    under ``no_grad`` (no graph is recorded through the projections).
    """
    with torch.no_grad():
        t = layers.text_proj(text_feat[pos_items])
        v = layers.image_proj(image_feat[pos_items])
        weights, _, _ = reference_calibrate(t, v, layers.user_hash(user_emb[users]),
                                            layers.text_hash(t), layers.image_hash(v),
                                            threshold=layers.threshold)
    return naive_dbpr_loss(user_emb, item_emb, users, pos_items, neg_items, weights)


# ----------------------------------------------------------------------- Sinkhorn


def half_squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``|x_i - y_j|^2 / 2`` for batched clouds (the naive contender's cost)."""
    x_sq = x.pow(2).sum(-1).unsqueeze(2)
    y_sq = y.pow(2).sum(-1).unsqueeze(1)
    return (x_sq + y_sq - 2 * torch.bmm(x, y.transpose(1, 2))) / 2


def uniform_weights(batch: int, size: int, device=None) -> torch.Tensor:
    return torch.full((batch, size), 1.0 / size, dtype=torch.float32, device=device)


def fixed_eps(x: torch.Tensor, y: torch.Tensor, fraction: float = EPS_FRACTION_OF_MEDIAN_COST) -> float:
    """``fraction`` x the median entry of the (B, n, m) cost ``|x - y|^2 / 2``."""
    with torch.no_grad():
        return fraction * float(half_squared_distances(x, y).median())


def naive_torch_sinkhorn(x, y, eps, with_grad, n_iters=N_ITERS):
    """What one writes by hand: alternating logsumexp updates on a dense cost matrix."""
    batch, n, m = x.shape[0], x.shape[1], y.shape[1]
    a, b = uniform_weights(batch, n, x.device), uniform_weights(batch, m, x.device)
    log_a, log_b = a.log(), b.log()
    with torch.no_grad():
        cost = half_squared_distances(x, y)
        f = torch.zeros_like(a)
        g = torch.zeros_like(b)
        for _ in range(n_iters):
            f = -eps * torch.logsumexp(log_b.unsqueeze(1) + (g.unsqueeze(1) - cost) / eps, dim=2)
            g = -eps * torch.logsumexp(log_a.unsqueeze(2) + (f.unsqueeze(2) - cost) / eps, dim=1)
    if with_grad:
        # Envelope-theorem gradient in plain torch (GeomLoss's trick): one more
        # differentiable update of each potential from the converged other one,
        # the cost seeing x in the f-update and y in the g-update only, so that
        # the gradient is sum_j P_ij (x_i - y_j) and not twice that.
        cost_x = half_squared_distances(x, y.detach())
        cost_y = half_squared_distances(x.detach(), y)
        f_last = -eps * torch.logsumexp(log_b.unsqueeze(1) + (g.unsqueeze(1) - cost_x) / eps, dim=2)
        g_last = -eps * torch.logsumexp(log_a.unsqueeze(2) + (f.unsqueeze(2) - cost_y) / eps, dim=1)
        f, g = f_last, g_last
    return (a * f).sum(-1) + (b * g).sum(-1)


def pot_solve(x, y, eps, with_grad, n_iters=N_ITERS):
    """POT's batched log-domain Sinkhorn on the same problem (its cost and reg are 2x ours).

    tol=0.0 never stops early (POT tests ``err < tol``), so POT runs all iterations.
    """
    import ot

    return ot.batch.solve_sample_batch(
        x, y, reg=2 * eps, metric="sqeuclidean", max_iter=n_iters, tol=0.0,
        method="log_sinkhorn", grad="envelope" if with_grad else "detach")


def pot_sinkhorn(x, y, eps, with_grad, n_iters=N_ITERS):
    # POT's `value` adds reg * sum(T log T) to <T, M>; with T detached
    # (grad="envelope") its gradient is that of <T, M> = 2 x ours.
    return pot_solve(x, y, eps, with_grad, n_iters).value


def geomloss_fixed_eps_potentials(x, y, eps, n_iters=N_ITERS):
    """GeomLoss's tensorized Sinkhorn loop at one eps for n_iters iterations, cost included.

    As ``geomloss.sinkhorn_tensorized`` does, each cost matrix carries gradient
    to its first argument only, and the loop's last extrapolation step (run with
    grad enabled) is what carries the gradients.
    """
    from geomloss._legacy.sinkhorn_divergence import log_weights, sinkhorn_loop
    from geomloss._legacy.sinkhorn_samples import cost_routines, softmin_tensorized

    batch, n, m = x.shape[0], x.shape[1], y.shape[1]
    a, b = uniform_weights(batch, n, x.device), uniform_weights(batch, m, x.device)
    cost = cost_routines[2]
    _, _, g_ab, f_ba = sinkhorn_loop(
        softmin_tensorized, log_weights(a), log_weights(b), None, None,
        cost(x, y.detach()), cost(y, x.detach()), [eps] * n_iters, None, debias=False)
    return a, b, f_ba, g_ab


def geomloss_sinkhorn(x, y, eps, with_grad, n_iters=N_ITERS):
    # sinkhorn_loop switches grad mode on globally before its last step; inputs
    # without requires_grad keep the forward-only mode graph-free anyway.
    a, b, f, g = geomloss_fixed_eps_potentials(x, y, eps, n_iters)
    return (a * f).sum(-1) + (b * g).sum(-1)


def geomloss_samples_loss(p=2, blur=0.05):
    import geomloss

    return geomloss.SamplesLoss("sinkhorn", p=p, blur=blur, backend="tensorized")


_COMPILED_STEP = {}


def _naive_iteration(cost, f, g, log_a, log_b, eps: float):
    f = -eps * torch.logsumexp(log_b.unsqueeze(1) + (g.unsqueeze(1) - cost) / eps, dim=2)
    g = -eps * torch.logsumexp(log_a.unsqueeze(2) + (f.unsqueeze(2) - cost) / eps, dim=1)
    return f, g


def compiled_naive_sinkhorn(x, y, eps, with_grad, n_iters=N_ITERS):
    """``naive_torch_sinkhorn`` with its iteration compiled by torch.compile (inductor's CPU C++
    codegen, one graph per shape): inductor fuses each logsumexp into a max pass and an exp-sum
    pass over the cost (nothing (B, n, m) is written), but keeps the two half-iterations apart."""
    if "step" not in _COMPILED_STEP:
        _COMPILED_STEP["step"] = compile_hand_derived(_naive_iteration, dynamic=False)
    step = _COMPILED_STEP["step"]
    batch, n, m = x.shape[0], x.shape[1], y.shape[1]
    a, b = uniform_weights(batch, n, x.device), uniform_weights(batch, m, x.device)
    log_a, log_b = a.log(), b.log()
    with torch.no_grad():
        cost = half_squared_distances(x, y)
        f, g = torch.zeros_like(a), torch.zeros_like(b)
        for _ in range(n_iters):
            f, g = step(cost, f, g, log_a, log_b, eps)
    if with_grad:  # the same envelope tail as naive_torch_sinkhorn, eager
        cost_x = half_squared_distances(x, y.detach())
        cost_y = half_squared_distances(x.detach(), y)
        f_last = -eps * torch.logsumexp(log_b.unsqueeze(1) + (g.unsqueeze(1) - cost_x) / eps, dim=2)
        g_last = -eps * torch.logsumexp(log_a.unsqueeze(2) + (f.unsqueeze(2) - cost_y) / eps, dim=1)
        f, g = f_last, g_last
    return (a * f).sum(-1) + (b * g).sum(-1)


_OTT_SOLVERS = {}


def ott_solver(with_grad: bool, n_iters: int = N_ITERS):
    """OTT-JAX's Sinkhorn on the same problem, ``jax.jit(jax.vmap(...))`` over the batch.

    Its PointCloud cost |x - y|^2 is twice ours, so it solves ours at epsilon = 2 eps and
    returns twice our value (and gradients); exactly ``n_iters`` iterations (min = max,
    threshold -1); gradients by Danskin's theorem (``use_danskin``: the potentials are
    constants), i.e. the envelope gradient, no backprop through the loop.
    Returns ``solve(x, y, epsilon) -> value (B,)`` or ``-> (value, (grad_x, grad_y))``, on
    jax arrays; epsilon is traced, so a new eps does not recompile.
    """
    key = (with_grad, n_iters)
    if key not in _OTT_SOLVERS:
        import jax
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn

        solver = sinkhorn.Sinkhorn(threshold=-1.0, min_iterations=n_iters, max_iterations=n_iters,
                                   inner_iterations=1, lse_mode=True, use_danskin=True)

        def value(x, y, epsilon):
            geom = pointcloud.PointCloud(x, y, epsilon=epsilon)
            return solver(linear_problem.LinearProblem(geom)).reg_ot_cost

        one = jax.value_and_grad(value, argnums=(0, 1)) if with_grad else value
        _OTT_SOLVERS[key] = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))
    return _OTT_SOLVERS[key]


def ott_sinkhorn(x, y, eps, with_grad, n_iters=N_ITERS):
    """OTT-JAX on torch inputs: (value (B,), grads or None) as torch tensors in our units."""
    import jax.numpy as jnp
    import numpy as np

    solve = ott_solver(with_grad, n_iters)
    xj, yj = jnp.asarray(x.detach().numpy()), jnp.asarray(y.detach().numpy())
    out = solve(xj, yj, 2.0 * eps)
    if with_grad:
        value, (grad_x, grad_y) = out
        grads = tuple(torch.from_numpy(np.array(t)) / 2 for t in (grad_x, grad_y))  # a writable copy
        return torch.from_numpy(np.array(value)) / 2, grads
    return torch.from_numpy(np.array(out)) / 2, None
