"""Teacher-to-student distillation losses.

``kl_distill_loss``
    ``KL(softmax(T_b) || softmax(S_b))`` over the full catalogue, per batch user b,
    with ``S_b = student_user[users_b] @ student_item.T`` and
    ``T_b = teacher_user[users_b] @ teacher_item.T``.  Streamed: item blocks of
    ``block_size`` columns (at most 2048 per tile, and chunks of users, so that one
    score tile stays cache-sized) with an online log-sum-exp (flash-attention style rescaling), so the
    (B, n_items) score matrices are never held; memory is O(B * block_size).  The
    backward recomputes the score tiles from the saved log-sum-exps.

``kl_distill_dense``
    The same value through materialised (B, n_items) scores and autograd: a reference
    for tests and small catalogues.

``ot_distill_loss``
    The OT distillation option of the reference (``SamplesLoss("sinkhorn")`` between
    student and teacher score clouds), restricted to the batch's item columns.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V

REDUCTIONS = ("mean", "sum", "none")

# Score tiles hold about this many elements (user chunk x item columns): 2 MiB in
# float32, so a tile and its temporaries stay in cache between the passes.
_TILE_ELEMENTS = 1 << 19
# At most this many item columns per tile: wider tiles leave too few users per chunk
# for the item-gradient product (its inner dimension) to run at full speed.
_TILE_COLS = 2048
# torch's CPU exp() is ~140x slower where its result is subnormal;
# clamping there changes each term by < 2e-38 (float32) / 1e-304 (float64) relative
# to the row maximum, which contributes exp(0) = 1.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -700.0}


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # Half-precision inputs are computed in float32; float64 anywhere means float64.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tiling(batch: int, n_items: int, block: int):
    """(item columns, user rows) of one score tile."""
    cols = max(1, min(block, n_items, _TILE_COLS))
    return cols, max(1, min(batch, _TILE_ELEMENTS // cols))


def _tile(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view at the start of a flat workspace."""
    return buf[: rows * cols].view(rows, cols)


def _kl_stream_forward(u, t, student_item, teacher_item, block, cdtype):
    """Per-row KL, lse(S) and lse(T) for gathered rows u (B, D), t (B, Dt)."""
    batch = u.shape[0]
    n_items = student_item.shape[0]
    dev = u.device
    width, chunk = _tiling(batch, n_items, block)
    block = width
    floor = _EXP_FLOOR[cdtype]
    neg_inf = float("-inf")
    m_s = torch.full((batch,), neg_inf, dtype=cdtype, device=dev)
    m_t = torch.full((batch,), neg_inf, dtype=cdtype, device=dev)
    l_s = torch.zeros(batch, dtype=cdtype, device=dev)
    l_t = torch.zeros(batch, dtype=cdtype, device=dev)
    acc = torch.zeros(batch, dtype=cdtype, device=dev)  # sum_j exp(T_j - m_t) (T_j - S_j)
    s_buf = torch.empty(chunk * width, dtype=cdtype, device=dev)
    t_buf = torch.empty(chunk * width, dtype=cdtype, device=dev)
    d_buf = torch.empty(chunk * width, dtype=cdtype, device=dev)
    for j0 in range(0, n_items, block):
        j1 = min(j0 + block, n_items)
        si = student_item[j0:j1].to(cdtype)
        ti = teacher_item[j0:j1].to(cdtype)
        for b0 in range(0, batch, chunk):
            b1 = min(b0 + chunk, batch)
            rows, cols = b1 - b0, j1 - j0
            s = torch.mm(u[b0:b1], si.t(), out=_tile(s_buf, rows, cols))
            tt = torch.mm(t[b0:b1], ti.t(), out=_tile(t_buf, rows, cols))
            diff = torch.sub(tt, s, out=_tile(d_buf, rows, cols))
            ms_old, mt_old = m_s[b0:b1], m_t[b0:b1]
            ms_new = torch.maximum(ms_old, s.amax(1))
            mt_new = torch.maximum(mt_old, tt.amax(1))
            # Rescale factors of the running sums (exp(-inf) = 0 on the first block).
            a_s = torch.exp(ms_old - ms_new)
            a_t = torch.exp(mt_old - mt_new)
            s.sub_(ms_new.unsqueeze(1)).clamp_min_(floor).exp_()
            tt.sub_(mt_new.unsqueeze(1)).clamp_min_(floor).exp_()
            l_s[b0:b1] = l_s[b0:b1] * a_s + s.sum(1)
            l_t[b0:b1] = l_t[b0:b1] * a_t + tt.sum(1)
            acc[b0:b1] = acc[b0:b1] * a_t + diff.mul_(tt).sum(1)
            m_s[b0:b1] = ms_new
            m_t[b0:b1] = mt_new
    lse_s = m_s + torch.log(l_s)
    lse_t = m_t + torch.log(l_t)
    kl = acc / l_t - lse_t + lse_s
    return kl, lse_s, lse_t


def _kl_stream_backward(u, t, student_item, teacher_item, lse_s, lse_t, grad_rows, block, cdtype,
                        need_user, need_item):
    """d(sum_b g_b KL_b)/du (B, D) and /d student_item (n_items, D), tile by tile:
    dKL_b/dS_bj = softmax(S_b)_j - softmax(T_b)_j."""
    batch, dim = u.shape
    n_items = student_item.shape[0]
    dev = u.device
    width, chunk = _tiling(batch, n_items, block)
    block = width
    floor = _EXP_FLOOR[cdtype]
    grad_u = torch.zeros(batch, dim, dtype=cdtype, device=dev) if need_user else None
    grad_item = torch.empty(n_items, dim, dtype=cdtype, device=dev) if need_item else None
    s_buf = torch.empty(chunk * width, dtype=cdtype, device=dev)
    t_buf = torch.empty(chunk * width, dtype=cdtype, device=dev)
    neg_lse_s = lse_s.neg().unsqueeze(1)
    neg_lse_t = lse_t.neg().unsqueeze(1)
    g = grad_rows.unsqueeze(1)
    for j0 in range(0, n_items, block):
        j1 = min(j0 + block, n_items)
        si = student_item[j0:j1].to(cdtype)
        ti = teacher_item[j0:j1].to(cdtype)
        if need_item:
            gi = grad_item[j0:j1]
            gi.zero_()
        for b0 in range(0, batch, chunk):
            b1 = min(b0 + chunk, batch)
            rows, cols = b1 - b0, j1 - j0
            # p_S and p_T from the saved log-sum-exps (addmm folds the shift into the product).
            ps = torch.addmm(neg_lse_s[b0:b1], u[b0:b1], si.t(), out=_tile(s_buf, rows, cols))
            pt = torch.addmm(neg_lse_t[b0:b1], t[b0:b1], ti.t(), out=_tile(t_buf, rows, cols))
            ps.clamp_min_(floor).exp_()
            pt.clamp_min_(floor).exp_()
            grad_s = ps.sub_(pt).mul_(g[b0:b1])  # (rows, cols) = g_b (p_S - p_T)
            if need_user:
                grad_u[b0:b1].addmm_(grad_s, si)
            if need_item:
                gi.addmm_(grad_s.t(), u[b0:b1])
    return grad_u, grad_item


class _KLDistill(torch.autograd.Function):
    """Per-user KL rows (B,); gradients to the student tables only (teacher is constant)."""

    @staticmethod
    def forward(ctx, student_user, student_item, teacher_user, teacher_item, users, block_size):
        cdtype = _compute_dtype(student_user, student_item, teacher_user, teacher_item)
        u = student_user.index_select(0, users).to(cdtype)
        t = teacher_user.detach().index_select(0, users).to(cdtype)
        kl, lse_s, lse_t = _kl_stream_forward(u, t, student_item.detach(), teacher_item.detach(),
                                              block_size, cdtype)
        ctx.save_for_backward(u, t, student_item, teacher_item, lse_s, lse_t, users)
        ctx.meta = (student_user.shape, student_user.dtype, block_size, cdtype)
        return kl.to(student_user.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        u, t, student_item, teacher_item, lse_s, lse_t, users = ctx.saved_tensors
        user_shape, user_dtype, block, cdtype = ctx.meta
        need_user, need_item = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_user = grad_item = None
        if need_user or need_item:
            grad_u, grad_i = _kl_stream_backward(u, t, student_item, teacher_item, lse_s, lse_t,
                                                 grad_rows.to(cdtype), block, cdtype,
                                                 need_user, need_item)
            if need_user:
                # Duplicate users accumulate.
                grad_user = torch.zeros(user_shape, dtype=cdtype, device=u.device)
                grad_user = grad_user.index_add_(0, users, grad_u).to(user_dtype)
            if need_item:
                grad_item = grad_i.to(student_item.dtype)
        # The teacher is a constant: no gradient to teacher_user / teacher_item.
        return grad_user, grad_item, None, None, None, None


def _check_tables(student_user, student_item, teacher_user, teacher_item, users):
    named = (("student_user", student_user), ("student_item", student_item),
             ("teacher_user", teacher_user), ("teacher_item", teacher_item))
    for name, t in named:
        V.require_float(name, t)
        V.require_rank(name, t, (2,), "embedding table (rows, D)")
    V.require_index("users", users)
    V.require_rank("users", users, (1,), "index tensor (B,)")
    if student_item.shape[1] != student_user.shape[1]:
        raise ValueError(f"student_item must have the embedding size of student_user "
                         f"({student_user.shape[1]}), got shape {tuple(student_item.shape)}")
    if teacher_item.shape[1] != teacher_user.shape[1]:
        raise ValueError(f"teacher_item must have the embedding size of teacher_user "
                         f"({teacher_user.shape[1]}), got shape {tuple(teacher_item.shape)}")
    if teacher_item.shape[0] != student_item.shape[0]:
        raise ValueError(f"teacher_item must have one row per item of student_item "
                         f"({student_item.shape[0]} items), got shape {tuple(teacher_item.shape)}")
    if student_item.shape[0] == 0:
        raise ValueError("student_item is empty: the catalogue needs at least one item")
    if users.numel() == 0:
        raise ValueError("users is empty: the batch needs at least one user")
    V.require_same_device(list(named) + [("users", users)])


def _value_checks(student_user, student_item, teacher_user, teacher_item, users):
    if not V.checks_enabled():
        return
    n_users = min(student_user.shape[0], teacher_user.shape[0])
    checks = V.ValueChecks()
    checks.index_range("users", users, n_users)
    if n_users > 0:
        # Only the rows the batch uses (clamped so a bad index cannot fault before the
        # range check reports it); item tables are read whole.
        safe = users.clamp(0, n_users - 1)
        checks.finite("student_user", student_user.index_select(0, safe))
        checks.finite("teacher_user", teacher_user.index_select(0, safe))
    checks.finite("student_item", student_item)
    checks.finite("teacher_item", teacher_item)
    checks.raise_if_any()


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def kl_distill_loss(student_user: torch.Tensor, student_item: torch.Tensor,
                    teacher_user: torch.Tensor, teacher_item: torch.Tensor, users: torch.Tensor,
                    *, block_size: int = 16384, reduction: str = "mean") -> torch.Tensor:
    """Full-catalogue KL distillation, streamed over item blocks.

    For each batch user ``b = users[i]``:

        S_b = student_user[b] @ student_item.T,   T_b = teacher_user[b] @ teacher_item.T
        KL_b = KL(softmax(T_b) || softmax(S_b))
             = sum_j pT_bj (T_bj - S_bj) - logsumexp(T_b) + logsumexp(S_b)

    reduced by ``reduction``: ``"mean"`` (default, the reference's batch mean), ``"sum"``
    or ``"none"`` (the (B,) per-user values).  Duplicate entries of ``users`` are
    separate batch rows (their gradients accumulate into the same table row).

    Nothing of size (B, n_items) is built: the forward streams item blocks of
    ``block_size`` columns with an online log-sum-exp, the backward recomputes the
    score tiles from the saved log-sum-exps and uses ``dKL_b/dS_bj = pS_bj - pT_bj``;
    memory is O(B * block_size).  In practice less: a score tile has at most
    min(block_size, 2048) item columns and about 2^19 elements (a user chunk), so it
    stays in cache across its passes; only the (B,) running statistics, the gathered
    (B, D) rows and, in the backward, the (n_items, D) item gradient are larger.

    Gradients flow to ``student_user`` (gathered rows scattered back with
    ``index_add_``) and ``student_item``.  **The teacher is a constant**: its
    tensors are used detached, and even if ``teacher_user`` / ``teacher_item``
    require grad no gradient is propagated to them (their ``.grad`` stays None).

    Dtypes: float32 and float64 are computed in their own precision (float64 if any
    input is float64); float16 / bfloat16 inputs are computed in float32.  The result
    has ``student_user``'s dtype; gradients have each table's dtype.  The teacher may
    use another embedding size than the student; both must have the same number of
    items, and ``users`` indexes both user tables.

    Errors name the argument: shapes and dtypes (``TypeError`` / ``ValueError``), an
    empty batch, ``block_size < 1``, ``users`` out of range (``IndexError``) and
    NaN / Inf in the used user rows or the item tables (``ValueError``); the value
    checks read tensor contents (one host sync on a GPU) and follow
    ``guider_fast.set_checks``.
    """
    _check_tables(student_user, student_item, teacher_user, teacher_item, users)
    V.require_int("block_size", block_size, 1)
    V.require_choice("reduction", reduction, REDUCTIONS)
    _value_checks(student_user, student_item, teacher_user, teacher_item, users)
    rows = _KLDistill.apply(student_user, student_item, teacher_user, teacher_item,
                            users.long(), int(block_size))
    return _reduce(rows, reduction)


def kl_distill_dense(student_user: torch.Tensor, student_item: torch.Tensor,
                     teacher_user: torch.Tensor, teacher_item: torch.Tensor, users: torch.Tensor,
                     *, reduction: str = "mean") -> torch.Tensor:
    """Reference for ``kl_distill_loss``: materialises the (B, n_items) score matrices and
    differentiates through autograd (teacher detached).  For tests and small catalogues."""
    _check_tables(student_user, student_item, teacher_user, teacher_item, users)
    V.require_choice("reduction", reduction, REDUCTIONS)
    cdtype = _compute_dtype(student_user, student_item, teacher_user, teacher_item)
    users = users.long()
    s = student_user[users].to(cdtype) @ student_item.to(cdtype).t()
    with torch.no_grad():
        t = teacher_user[users].to(cdtype) @ teacher_item.to(cdtype).t()
        log_pt = torch.log_softmax(t, dim=1)
    rows = (log_pt.exp() * (log_pt - torch.log_softmax(s, dim=1))).sum(1)
    return _reduce(rows.to(student_user.dtype), reduction)


def ot_distill_loss(student_user: torch.Tensor, student_item: torch.Tensor,
                    teacher_user: torch.Tensor, teacher_item: torch.Tensor, users: torch.Tensor,
                    items: Optional[torch.Tensor] = None, *, blur: float = 0.05,
                    p: int = 2) -> torch.Tensor:
    """OT distillation: ``SamplesLoss("sinkhorn", p=p, blur=blur)`` between score clouds.

    Formulation (the reference's OT option, ``SamplesLoss(...)(S[None], T[None])``,
    restricted to the batch's item columns): the point clouds are the batch users'
    score rows over ``items``,

        X_b = student_user[users_b] @ student_item[items].T   (B points, dimension M)
        Y_b = teacher_user[users_b] @ teacher_item[items].T   (B points, dimension M)

    and the loss is the debiased Sinkhorn divergence between the uniform clouds X and Y
    (one OT problem, a B x B cost).  Both clouds live in item-score space, so student
    and teacher may have different embedding sizes.  ``items=None`` uses the whole
    catalogue (M = n_items: exactly the reference form; the (B, n_items) score rows
    are then materialised).  Typical ``items``: the batch's positive (and negative)
    items.  The teacher is a constant (detached); gradients flow to the student
    tables through autograd.  Returns a scalar in the student's dtype (half inputs
    are computed in float32).
    """
    from ..ot import SamplesLoss

    _check_tables(student_user, student_item, teacher_user, teacher_item, users)
    n_items = student_item.shape[0]
    checks = V.ValueChecks() if V.checks_enabled() else None
    if items is not None:
        V.require_index("items", items)
        V.require_rank("items", items, (1,), "index tensor (M,)")
        if items.numel() == 0:
            raise ValueError("items is empty: the score clouds need at least one item column")
        V.require_same_device([("student_item", student_item), ("items", items)])
        items = items.long()
        if checks is not None:
            checks.index_range("items", items, n_items)
    if checks is not None:
        checks.index_range("users", users, min(student_user.shape[0], teacher_user.shape[0]))
        checks.raise_if_any()
    cdtype = _compute_dtype(student_user, student_item, teacher_user, teacher_item)
    users = users.long()
    s_item = student_item if items is None else student_item.index_select(0, items)
    t_item = teacher_item if items is None else teacher_item.index_select(0, items)
    x = student_user.index_select(0, users).to(cdtype) @ s_item.to(cdtype).t()
    with torch.no_grad():
        y = teacher_user.index_select(0, users).to(cdtype) @ t_item.to(cdtype).t()
    if x.shape[1] != y.shape[1]:  # cannot happen with shared item indices; kept as a guard
        raise ValueError(f"student and teacher score clouds differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    value = SamplesLoss("sinkhorn", p=p, blur=blur)(x, y)
    return value.to(student_user.dtype)
