"""One builder of random inputs per op family, and the float64 oracles the backends meet.

Every builder draws fresh random values (never zeros or ones), takes odd and
non-power-of-two sizes, and plants the hard cases of its family: ragged batches
(zero weights on padding) for the point clouds, duplicate rows (a popular item,
an item that is both positive and negative, zero triplet weights) for the
triplets, exact-zero (ternary) hash bits and duplicate items for calibration.

The oracles are written independently of ``guider_fast.reference`` from the
documented formulas, in float64, on the inputs as the op sees them (half inputs
already rounded), so every backend, the torch reference included, is compared
with something it does not share code with.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import ragged_lengths, random_weights

# ----------------------------------------------------------------- point clouds


def weight_dtype(dtype):
    """Weights in the compute dtype: half point clouds are solved in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def clouds(gen, batch, n, m, d, dtype=torch.float32, device="cpu", ragged=True):
    """x (B, n, d), y (B, m, d) in ``dtype``; a (B, n), b (B, m) random weights summing to 1.

    ``ragged``: every problem but the first has zero weights on a random tail
    (padding), so a batch holds clouds of several sizes.
    """
    x = torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, m, d, generator=gen, dtype=torch.float64) * 1.2 + 0.3
    lengths_a = ragged_lengths(batch, n, gen) if ragged else [n] * batch
    lengths_b = ragged_lengths(batch, m, gen) if ragged else [m] * batch
    a = random_weights(batch, n, lengths_a, gen, weight_dtype(dtype))
    b = random_weights(batch, m, lengths_b, gen, weight_dtype(dtype))
    return (x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype), a.to(device),
            b.to(device))


def cost(x, y, p):
    """The documented ground cost from differences: |x - y|^2 / 2 (p=2) or |x - y| (p=1)."""
    dist = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.pow(2) / 2 if p == 2 else dist


def _log(w):
    return torch.where(w > 0, w.clamp_min(1e-300).log(), torch.full_like(w, float("-inf")))


class SinkhornOracle:
    """Plain log-domain Sinkhorn in float64 (f from g, then g from f, from g = 0).

    Fields: f, g, value = <a, f> + <b, g>, marginal_error (the L1 row-marginal
    violation of the plan built on the final f, g), plan, and the envelope
    gradients of value w.r.t. x and y (the plan held fixed), on CPU.
    """

    def __init__(self, x, y, a, b, eps, p, n_iters):
        x, y, a, b = (t.detach().cpu().double() for t in (x, y, a, b))
        c = cost(x, y, p)
        log_a, log_b = _log(a), _log(b)
        f, g = torch.zeros_like(a), torch.zeros_like(b)

        def update_f(g):
            return -eps * torch.logsumexp(log_b.unsqueeze(1) + (g.unsqueeze(1) - c) / eps, 2)

        for _ in range(n_iters):
            f = update_f(g)
            g = -eps * torch.logsumexp(log_a.unsqueeze(2) + (f.unsqueeze(2) - c) / eps, 1)
        self.f, self.g = f, g
        self.value = (a * f).sum(-1) + (b * g).sum(-1)
        self.plan = torch.exp(log_a.unsqueeze(2) + log_b.unsqueeze(1)
                              + (f.unsqueeze(2) + g.unsqueeze(1) - c) / eps)
        self.marginal_error = (self.plan.sum(2) - a).abs().sum(-1)
        assert torch.allclose((a * (torch.exp((f - update_f(g)) / eps) - 1)).abs().sum(-1),
                              self.marginal_error, rtol=1e-9, atol=1e-13)
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        self.grad_x, self.grad_y = torch.autograd.grad((self.plan * cost(xr, yr, p)).sum(), (xr, yr))


def centred(f, w):
    """Potentials are defined up to a constant per problem: centre them on the support of w."""
    f, w = f.double().cpu(), w.double().cpu()
    mask = w > 0
    mean = (f * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    return torch.where(mask, f - mean, torch.zeros_like(f))


# --------------------------------------------------------------------- triplets


def triplets(gen, n_users=11, n_items=7, dim=13, batch=37, k=1, dtype=torch.float32, device="cpu",
             weights=True, weights_dtype=None):
    """Tables (n_users, dim), (n_items, dim) in ``dtype`` and a batch of B triplets.

    Few rows for many triplets, so rows repeat; on top, the first and last
    triplets share their user and positive, and the second triplet's negatives
    are the first one's positive (one row gets positive and negative
    contributions).  ``weights``: random per-triplet weights with about one in
    five exactly zero (a flagged row that ``noisy_weight=0`` drops), or None.
    ``k=None``: neg_items of shape (B,), else (B, k).
    """
    user = (torch.randn(n_users, dim, generator=gen, dtype=torch.float64) * 0.4).to(dtype)
    item = (torch.randn(n_items, dim, generator=gen, dtype=torch.float64) * 0.4).to(dtype)
    users = torch.randint(0, n_users, (batch,), generator=gen)
    pos = torch.randint(0, n_items, (batch,), generator=gen)
    neg = torch.randint(0, n_items, (batch,) if k is None else (batch, k), generator=gen)
    if batch >= 2:
        users[-1], pos[-1] = users[0], pos[0]
        neg[1] = pos[0]
    w = None
    if weights:
        w = torch.rand(batch, generator=gen, dtype=torch.float64) + 0.1
        w[torch.rand(batch, generator=gen) < 0.2] = 0.0
        w[0] = 0.5 + torch.rand((), generator=gen, dtype=torch.float64)  # at least one non-zero
        w = w.to(device=device, dtype=weights_dtype or dtype)
    on = (lambda t: t.to(device))
    return on(user), on(item), on(users), on(pos), on(neg), w


def dbpr_formula(user_emb, item_emb, users, pos, neg, weights, reduction="mean", l2=0.0):
    """The DBPR formula with plain indexing, in float64 on CPU (differentiable w.r.t. its inputs).

    ``l2``: plus (l2/2)(|u|^2 + |p|^2 + sum_k |n_k|^2) per triplet (``dbpr_step``'s loss).
    """
    users, pos, neg = users.cpu(), pos.cpu(), neg.cpu()
    negatives = neg if neg.dim() == 2 else neg[:, None]
    u, p, n = user_emb[users], item_emb[pos], item_emb[negatives]
    margin = (u * p).sum(-1, keepdim=True) - (u[:, None, :] * n).sum(-1)
    terms = F.logsigmoid(margin).mean(1)
    if weights is not None:
        terms = weights * terms
    rows = -terms + 0.5 * l2 * (u.pow(2).sum(-1) + p.pow(2).sum(-1) + n.pow(2).sum((-1, -2)))
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def dbpr_oracle(user, item, users, pos, neg, weights, reduction="mean", l2=0.0):
    """(loss, grad_user, grad_item, grad_weights or None) of the formula, float64 on CPU."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (user, item)]
    w = None if weights is None else weights.detach().cpu().double().requires_grad_()
    out = dbpr_formula(*leaves, users, pos, neg, w, reduction, l2)
    grads = torch.autograd.grad(out.sum(), leaves + ([w] if w is not None else []))
    return (out.detach(), *grads) + ((None,) if w is None else ())


def step_oracle(user, item, users, pos, neg, weights, lr, optimizer, l2, reduction, state=None):
    """One exact step by dense float64 autograd from the tables as stored now.

    Returns (user, item, loss, margins, user_acc, item_acc, grad_rms): the
    tables after the step rounded to their storage dtype (as the op writes them
    back), the loss and (B, K) margins before the update, the row-wise Adagrad
    accumulators after it (float32, their storage dtype; None for SGD) and the
    per-row RMS of the exact gradients (user, item), which conditions Adagrad's
    normalised step.
    SGD: row -= lr * grad; row-wise Adagrad: acc += mean(grad^2),
    row -= lr * grad / (sqrt(acc) + 1e-10), from ``state``'s accumulators.
    """
    u, i = user.detach().cpu().double(), item.detach().cpu().double()
    negatives = (neg if neg.dim() == 2 else neg[:, None]).cpu()
    rows = u[users.cpu()]
    margins = (rows * i[pos.cpu()]).sum(-1, keepdim=True) - (rows[:, None] * i[negatives]).sum(-1)
    loss, grad_u, grad_i = dbpr_oracle(u, i, users, pos, neg, weights, reduction, l2)[:3]
    grad_rms = (grad_u.pow(2).mean(1).sqrt(), grad_i.pow(2).mean(1).sqrt())
    if optimizer == "sgd":
        return ((u - lr * grad_u).to(user.dtype), (i - lr * grad_i).to(item.dtype), loss, margins,
                None, None, grad_rms)
    out = []
    for table, grad, acc in ((u, grad_u, state.user), (i, grad_i, state.item)):
        acc = (acc.detach().cpu().double() + grad.pow(2).mean(1)).float()
        out.append(((table - lr * grad / (acc.double().sqrt().unsqueeze(1) + 1e-10)).to(user.dtype), acc))
    (new_u, acc_u), (new_i, acc_i) = out
    return new_u, new_i, loss, margins, acc_u, acc_i, grad_rms


# ------------------------------------------------------------------ calibration


def ternary_codes(gen, batch, bits, zeros=0.1):
    """Real-valued hash outputs with about ``zeros`` of exact zeros (sign(0) = 0)."""
    code = torch.randn(batch, bits, generator=gen)
    code[torch.rand(batch, bits, generator=gen) < zeros] = 0.0
    return code


def calibration_rows(gen, batch, dim, bits, dtype=torch.float32, code_dtype=None, device="cpu",
                     points=None):
    """t, v (B, d) projected features (or (B, n, d), (B, m, d) clouds with ``points=(n, m)``)
    and u_code, t_code, v_code (B, bits) with exact-zero bits.

    v is t plus noise of a random size per row, so a batch holds both clean
    (close) and noisy (far) rows.
    """
    shape_t = (batch, dim) if points is None else (batch, points[0], dim)
    shape_v = (batch, dim) if points is None else (batch, points[1], dim)
    t = torch.randn(*shape_t, generator=gen) * 2.0
    noise = torch.rand(batch, *([1] * (len(shape_v) - 1)), generator=gen)
    v = (t if points is None else t.mean(1, keepdim=True)) + noise * torch.randn(*shape_v, generator=gen)
    codes = [ternary_codes(gen, batch, bits) for _ in range(3)]
    code_dtype = code_dtype or dtype
    return (t.to(device, dtype), v.to(device, dtype), *(c.to(device, code_dtype) for c in codes))


def geomloss_one_point(t, v):
    """GUIDER's distance SamplesLoss("sinkhorn", p=1, blur=0.1)(t[:, None], v[:, None] + 1e-8)
    for one-point clouds, exactly: C(t, v') - C(t, t), with C = sqrt(max(|.|^2, 1e-8))."""
    v = v + 1e-8
    floor = torch.tensor(1e-8, dtype=t.dtype)
    return (t - v).pow(2).sum(-1).clamp_min(floor).sqrt() - floor.sqrt()


def calibration_oracle(t, v, u_code, t_code, v_code, threshold=0.7, distance="geomloss"):
    """AMSC (the GUIDER formulas) in float64 on CPU: (weights, clean, distance, normalized)."""
    t, v, u_code, t_code, v_code = (x.detach().cpu().double() for x in (t, v, u_code, t_code, v_code))
    d = geomloss_one_point(t, v) if distance == "geomloss" else (t - v).norm(dim=-1)
    normalized = (d - d.min()) / (d.max() - d.min() + 1e-7)
    clean = normalized < threshold
    bits = u_code.shape[1]
    s_t = (torch.sign(u_code) * torch.sign(t_code)).sum(1) / bits
    s_v = (torch.sign(u_code) * torch.sign(v_code)).sum(1) / bits
    w = torch.clamp(((s_t + 1) / 2 + (s_v + 1) / 2) / 2, 0, 1)
    return torch.where(clean, w, torch.ones_like(w)), clean, d, normalized


def reference_guider_weights(t, v, u_code, t_code, v_code, threshold=0.7):
    """GUIDER's AMSC as the public code does it: geomloss on one-point clouds, then the formula."""
    geomloss = pytest.importorskip("geomloss")  # not installed on the GPU machine
    d = geomloss.SamplesLoss("sinkhorn", p=1, blur=0.1)(t[:, None, :], v[:, None, :] + 1e-8)
    normalized = (d - d.min()) / (d.max() - d.min() + 1e-7)
    clean = normalized < threshold
    h_u, h_t, h_v = torch.sign(u_code), torch.sign(t_code), torch.sign(v_code)
    bits = u_code.shape[1]
    s_t = (h_u * h_t).sum(1) / bits
    s_v = (h_u * h_v).sum(1) / bits
    w = torch.clamp(((s_t + 1) / 2 + (s_v + 1) / 2) / 2, 0, 1)
    return torch.where(clean, w, torch.ones_like(w)), clean, d, normalized
