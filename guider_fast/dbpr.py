"""Public DBPR loss: BPR weighted per interaction, gathering rows of the embedding tables."""

from __future__ import annotations

from typing import Optional

import torch

from . import _cpu_build, _dispatch, _library, _library_cuda
from . import _validate as V
from .reference import dbpr_step as ref_step
from .reference.dbpr import dbpr_rows

REDUCTIONS = ("mean", "sum", "none")
OPTIMIZERS = ("sgd", "rowwise_adagrad")
DUPLICATE_POLICIES = ("sorted", "atomic")


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dbpr_torch(user_emb, item_emb, users, pos_items, neg_items, weights, grad_layout):
    return dbpr_rows(user_emb, item_emb, users, pos_items, neg_items, weights, grad_layout)


def _cuda_backward(user_emb, item_emb, users, pos_items, neg_items, coef, grad_rows, mode):
    # The CUDA C++ backward has the atomic scatter only (dispatch limits the layouts).
    return _library_cuda.ops().dbpr_backward(user_emb, item_emb, users, pos_items, neg_items, coef,
                                             grad_rows.float())


# kernels -> (forward op, backward op(..., mode))
_KERNEL_OPS = {"triton": (lambda: _library.dbpr_forward, lambda: _library.dbpr_backward),
               "cuda": (lambda: _library_cuda.ops().dbpr_forward, lambda: _cuda_backward)}


class _KernelDBPR(torch.autograd.Function):
    """Fused forward (scores once, keeps only the (B, K+1) score coefficients) and backward
    (atomic scatter, sorted segment sums, or per-occurrence sparse rows), in Triton or CUDA C++."""

    @staticmethod
    def forward(ctx, user_emb, item_emb, users, pos_items, neg_items, weights, grad_layout,
                kernels="triton"):
        forward_op, backward_op = _KERNEL_OPS[kernels]
        rows, coef, log_sig = forward_op()(user_emb, item_emb, users, pos_items, neg_items, weights)
        ctx.save_for_backward(user_emb, item_emb, users, pos_items, neg_items, coef, log_sig, weights)
        ctx.grad_layout = grad_layout
        ctx.backward_op = backward_op
        return rows.to(user_emb.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        user_emb, item_emb, users, pos_items, neg_items, coef, log_sig, weights = ctx.saved_tensors
        grad_user = grad_item = grad_weights = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            mode = {"dense": "atomic", "deterministic": "deterministic",
                    "sparse": "sparse"}[ctx.grad_layout]
            # The coefficients already hold the weights.
            d_user, d_item = ctx.backward_op()(user_emb, item_emb, users, pos_items, neg_items,
                                               coef, grad_rows, mode)
            if mode == "sparse":
                # Indices were range-checked on entry: skip the invariant scan.
                d_user = torch.sparse_coo_tensor(users.unsqueeze(0), d_user.to(user_emb.dtype),
                                                 user_emb.shape, check_invariants=False)
                d_item = torch.sparse_coo_tensor(
                    torch.cat([pos_items, neg_items.reshape(-1)]).unsqueeze(0),
                    d_item.to(item_emb.dtype), item_emb.shape, check_invariants=False)
            grad_user = d_user.to(user_emb.dtype) if ctx.needs_input_grad[0] else None
            grad_item = d_item.to(item_emb.dtype) if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[5]:
            grad_weights = (-grad_rows.float() * log_sig).to(weights.dtype)
        return grad_user, grad_item, None, None, None, grad_weights, None, None


def _dbpr_triton(user_emb, item_emb, users, pos_items, neg_items, weights, grad_layout):
    return _KernelDBPR.apply(user_emb, item_emb, users, pos_items, neg_items, weights, grad_layout)


def _dbpr_cuda(user_emb, item_emb, users, pos_items, neg_items, weights, grad_layout):
    return _KernelDBPR.apply(user_emb, item_emb, users.contiguous(), pos_items.contiguous(),
                             neg_items, weights, grad_layout, "cuda")


def _dbpr_cuda_limits(problem):
    (grad_layout,) = problem
    if grad_layout != "dense":
        return (f"the CUDA DBPR backward is the atomic scatter only (dense gradients, "
                f"deterministic=False); {grad_layout!r} gradients need backend 'triton' or 'torch'")
    return None


_dispatch.register("dbpr", "torch", _dbpr_torch)
_dispatch.register("dbpr", "triton", _dbpr_triton, dtypes=TRITON_DTYPES)
_dispatch.register("dbpr", "cuda", _dbpr_cuda, dtypes=TRITON_DTYPES, limits=_dbpr_cuda_limits)


def _check_dbpr(user_emb, item_emb, users, pos_items, neg_items, weights,
                table_names=("user_emb", "item_emb")):
    user_name, item_name = table_names
    for name, table in ((user_name, user_emb), (item_name, item_emb)):
        V.require_float(name, table)
        V.require_rank(name, table, (2,), "embedding table (rows, D)")
    if item_emb.dtype != user_emb.dtype:
        raise TypeError(f"{item_name} must have the dtype of {user_name} ({user_emb.dtype}), "
                        f"got {item_emb.dtype}")
    if user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"{user_name} and {item_name} must have the same embedding size D, "
                         f"got {user_emb.shape[1]} and {item_emb.shape[1]}")
    for name, idx in (("users", users), ("pos_items", pos_items), ("neg_items", neg_items)):
        V.require_index(name, idx)
    V.require_rank("users", users, (1,), "index vector (B,)")
    batch = users.shape[0]
    if batch == 0:
        raise ValueError("users is empty: DBPR needs at least one (user, positive, negative) triplet")
    V.require_shape("pos_items", pos_items, (batch,), "one positive item per user index")
    V.require_rank("neg_items", neg_items, (1, 2), "index tensor (B,) or (B, K)")
    if neg_items.shape[0] != batch or neg_items.numel() == 0:
        raise ValueError(f"neg_items must have shape ({batch},) or ({batch}, K) with K >= 1, "
                         f"got {tuple(neg_items.shape)}")
    if weights is not None:
        V.require_float("weights", weights)
        V.require_shape("weights", weights, (batch,), "one weight per triplet")
    V.require_same_device([(user_name, user_emb), (item_name, item_emb), ("users", users),
                           ("pos_items", pos_items), ("neg_items", neg_items), ("weights", weights)])
    if V.checks_enabled():
        checks = V.ValueChecks()
        checks.index_range("users", users, user_emb.shape[0])
        checks.index_range("pos_items", pos_items, item_emb.shape[0])
        checks.index_range("neg_items", neg_items, item_emb.shape[0])
        checks.finite("weights", weights)
        checks.raise_if_any()


def dbpr_loss(user_emb: torch.Tensor, item_emb: torch.Tensor, users: torch.Tensor,
              pos_items: torch.Tensor, neg_items: torch.Tensor,
              weights: Optional[torch.Tensor] = None, *, reduction: str = "mean",
              backend: str = "auto", deterministic: Optional[bool] = None,
              sparse_grad: bool = False) -> torch.Tensor:
    """DBPR: ``-(1/B) sum_b w_b * mean_k logsigmoid(<u_b, p_b> - <u_b, n_bk>)``.

    Parameters
    ----------
    user_emb : (n_users, D) table; item_emb : (n_items, D) table (float16/bfloat16
        tables are read in float32 and receive gradients in their own dtype).
    users, pos_items : (B,) integer indices; neg_items : (B,) or (B, K) (mean over K).
    weights : (B,) per-triplet weights (GUIDER's calibration weights) or None (= 1).
    reduction : "mean" (default, divides by B), "sum", or "none" (per-triplet (B,)).

    backend : "auto" | "torch" | "triton" | "cuda" (see ``guider_fast._dispatch``; the CUDA
        C++ kernels give dense gradients only: ``deterministic=False``, no ``sparse_grad``).
    deterministic : how duplicate rows' gradients are summed.  None (default)
        follows ``torch.are_deterministic_algorithms_enabled()``.  True: sorted
        segment sums, bit-identical from run to run.  False: the fastest way,
        which on a GPU is atomic adds in a varying order.  On CPU, both are
        deterministic.
    sparse_grad : if True, the table gradients are uncoalesced sparse COO tensors
        with one row per occurrence, as ``nn.Embedding(sparse=True)`` gives: use
        them with ``torch.optim.SparseAdam`` / ``SGD``, and no dense
        (rows, D) gradient is ever allocated.

    Gradients reach ``user_emb`` and ``item_emb`` (duplicate indices accumulate)
    and ``weights`` if it requires grad.  The torch backend keeps the gathered
    (B, K+2, D) rows for backward, like autograd does.  The Triton backend keeps
    only the (B, K+1) score coefficients and reads the rows again.

    Value checks cover the indices (range) and ``weights`` (finite); the tables
    are not scanned for NaN/Inf, which would read every row each step: a
    non-finite gathered row shows up as a non-finite loss.
    """
    V.require_choice("reduction", reduction, REDUCTIONS)
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be None, True or False, got {deterministic!r}")
    if not isinstance(sparse_grad, bool):
        raise TypeError(f"sparse_grad must be True or False, got {sparse_grad!r}")
    _check_dbpr(user_emb, item_emb, users, pos_items, neg_items, weights)
    return _dbpr_unchecked(user_emb, item_emb, users, pos_items, neg_items, weights,
                           reduction, backend, deterministic, sparse_grad)


def _grad_layout(deterministic: Optional[bool], sparse_grad: bool) -> str:
    if sparse_grad:
        return "sparse"
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return "deterministic" if deterministic else "dense"


def _dbpr_unchecked(user_emb, item_emb, users, pos_items, neg_items, weights, reduction, backend,
                    deterministic=None, sparse_grad=False):
    layout = _grad_layout(deterministic, sparse_grad)
    _, impl = _dispatch.resolve("dbpr", backend, user_emb.device, user_emb.dtype, problem=(layout,))
    negatives = neg_items.unsqueeze(1) if neg_items.dim() == 1 else neg_items
    rows = impl(user_emb, item_emb, users.long(), pos_items.long(), negatives.long(), weights, layout)
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


class RowwiseAdagradState:
    """Row-wise Adagrad accumulators for ``dbpr_step`` (one float32 sum per table row).

    Create once per pair of tables and pass to every step; ``dbpr_step`` updates it
    in place, for the rows of each batch only.
    """

    def __init__(self, user_table: torch.Tensor, item_table: torch.Tensor):
        self.user = torch.zeros(user_table.shape[0], dtype=torch.float32, device=user_table.device)
        self.item = torch.zeros(item_table.shape[0], dtype=torch.float32, device=item_table.device)


def _dbpr_step_torch(user_table, item_table, users, pos_items, neg_items, weights, lr, optimizer,
                     state, l2, reduction, duplicates):
    # Both duplicate policies give the exact step here (gradients from the pre-step rows).
    user_acc = item_acc = None
    if state is not None:
        user_acc, item_acc = state.user, state.item
    return ref_step.dbpr_step(user_table, item_table, users, pos_items, neg_items, weights, lr,
                              optimizer, user_acc, item_acc, l2, reduction)


def _dbpr_step_triton(user_table, item_table, users, pos_items, neg_items, weights, lr, optimizer,
                      state, l2, reduction, duplicates):
    user_acc = item_acc = None
    if optimizer == "rowwise_adagrad":
        user_acc, item_acc = state.user, state.item
    scale = _step_scale(users, reduction)
    if duplicates == "atomic":
        rows, margins = _library.dbpr_atomic_sgd_step(user_table, item_table, users, pos_items,
                                                      neg_items, weights, lr, l2, scale)
        return rows.sum() * scale, margins
    rows, margins = _library.dbpr_fused_step(user_table, item_table, users, pos_items, neg_items,
                                             weights, user_acc, item_acc, lr, l2, scale)
    return rows.sum() * scale, margins


def _step_scale(users, reduction):
    return 1.0 / users.shape[0] if reduction == "mean" else 1.0


def _dbpr_step_cuda(user_table, item_table, users, pos_items, neg_items, weights, lr, optimizer,
                    state, l2, reduction, duplicates):
    ops = _library_cuda.ops()
    scale = _step_scale(users, reduction)
    users, pos_items = users.contiguous(), pos_items.contiguous()
    if duplicates == "atomic":
        rows, margins = ops.dbpr_atomic_sgd_step(user_table, item_table, users, pos_items, neg_items,
                                                 weights, lr, l2, scale)
        return rows.sum() * scale, margins
    # The sorted runs as the torch step sorts them (one stable sort, users then items).
    (user_keys, user_order), (item_keys, item_order) = ref_step._sort_rows(
        users, torch.cat([pos_items, neg_items.reshape(-1)]), user_table.shape[0])
    accumulators = (state.user, state.item) if optimizer == "rowwise_adagrad" else (None, None)
    rows, margins = ops.dbpr_step(user_table, item_table, users, pos_items, neg_items, weights,
                                  user_keys.long(), user_order, item_keys.long(), item_order,
                                  *accumulators, lr, l2, scale)
    return rows.sum() * scale, margins


# The CUDA atomic step keeps rows in registers (guider_fast_cuda.h's kDbprAtomicMaxDim).
CUDA_ATOMIC_MAX_DIM = 256


def _dbpr_step_cuda_limits(problem):
    duplicates, dim, l2 = problem
    if duplicates == "atomic" and dim > CUDA_ATOMIC_MAX_DIM:
        return (f"the CUDA atomic step keeps its rows in registers: D <= {CUDA_ATOMIC_MAX_DIM}, "
                f"got D = {dim} (use duplicates='sorted', or backend 'triton' or 'torch')")
    if duplicates == "atomic" and l2 != 0:
        # A negative's L2 decay re-reads its row after other warps of the block may have
        # added to it, so within a block it would not equal the exact step.
        return ("the CUDA atomic step takes l2=0 only (use duplicates='sorted', or backend "
                "'triton' or 'torch')")
    return None


def _dbpr_step_cpu(user_table, item_table, users, pos_items, neg_items, weights, lr, optimizer,
                   state, l2, reduction, duplicates):
    """CPU C++ backend (csrc/cpu/dbpr_step_cpu.cpp): the exact step for either duplicate policy,
    in one sweep over the batch (no sort, every row gathered once; see that file)."""
    if user_table.stride(1) != 1 or item_table.stride(1) != 1:
        # The kernel addresses rows as contiguous runs of D values (a transposed view of a
        # table is not); the torch step takes any layout.
        return _dbpr_step_torch(user_table, item_table, users, pos_items, neg_items, weights, lr,
                                optimizer, state, l2, reduction, duplicates)
    accumulators = (state.user, state.item) if optimizer == "rowwise_adagrad" else (None, None)
    return _cpu_build.ops().dbpr_step(user_table, item_table, users.contiguous(), pos_items.contiguous(),
                                      neg_items.contiguous(), weights, *accumulators, lr, l2,
                                      _step_scale(users, reduction), optimizer)


# float64 tables run the torch step (float64 math there; speed is not their point).
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_dispatch.register("dbpr_step", "torch", _dbpr_step_torch)
_dispatch.register("dbpr_step", "triton", _dbpr_step_triton, dtypes=TRITON_DTYPES)
_dispatch.register("dbpr_step", "cuda", _dbpr_step_cuda, dtypes=TRITON_DTYPES,
                   limits=_dbpr_step_cuda_limits)
# auto on CPU takes it whenever the extension is loaded: measured faster than the torch step
# at every benchmarked shape (benchmarks/results/dbpr_cpu.md), from B = 2,048 on.
_dispatch.register("dbpr_step", "cpu", _dbpr_step_cpu, dtypes=CPU_DTYPES)


def dbpr_step(user_table: torch.Tensor, item_table: torch.Tensor, users: torch.Tensor,
              pos_items: torch.Tensor, neg_items: torch.Tensor,
              weights: Optional[torch.Tensor] = None, *, lr: float, optimizer: str = "sgd",
              state: Optional[RowwiseAdagradState] = None, l2: float = 0.0,
              reduction: str = "mean", return_scores: bool = False, duplicates: str = "sorted",
              backend: str = "auto"):
    """One fused DBPR training step on the embedding tables, in place.

    Forward, backward and the optimizer update in one call that reads and writes
    only the rows of the batch (no dense gradient tables: the point for catalogues
    of millions of items).  Same loss as ``dbpr_loss`` (``reduction`` "mean" or
    "sum"), plus ``(l2/2)(|u|^2 + |p|^2 + sum_k |n_k|^2)`` per triplet.

    optimizer : "sgd" (``row -= lr * grad``) or "rowwise_adagrad" (FBGEMM-style:
        ``acc_r += mean(grad_r^2)``, ``row -= lr * grad_r / (sqrt(acc_r) + 1e-10)``),
        which needs ``state=RowwiseAdagradState(user_table, item_table)``.

    duplicates : the policy for rows that occur several times in the batch.
        "sorted" (default): the gradients of every occurrence of a row are
        summed, then applied once, as dense autograd followed by the optimizer
        would: every gradient comes from the rows as they were before the step.  The
        summation order is fixed, so steps are bit-identical from run to run, on
        CPU and GPU.  The Triton backend sorts the batch's user and item indices
        (a stable ``torch.sort``) and sums each run of equal rows in sorted
        order, without atomics.
        "atomic": SGD on float32 tables only; one Triton launch, with no sort.
        Each block of triplets reads its rows and atomically adds
        ``-lr * grad``.  This is Hogwild, like ``implicit``'s BPR: the update
        order varies, and a block may read rows that other blocks of the same
        batch have already updated.  It moves the fewest bytes.  The torch and
        cpu backends compute the exact step for either policy.

    Tables may be float32, float64 (torch backend) or bfloat16/float16 storage
    (float32 math, rounded once on write-back).  On CPU the torch backend keeps
    its gathered-row buffers between steps (per thread, about (K+2) B D 4 bytes,
    which avoids page faults on every step).
    ``guider_fast.reference.dbpr_step.release_workspace()`` frees them.  ``weights`` act as constants.
    Returns the loss (and the (B, K) score margins when ``return_scores``),
    computed before the update.

    backend : "auto" | "torch" | "triton" | "cuda" | "cpu".  "cuda": the CUDA C++
        kernels, both policies ("atomic" there needs D <= 256).  "cpu": the CPU C++
        extension (``guider_fast._cpu_build``; csrc/cpu/dbpr_step_cpu.cpp) on
        float32/float16/bfloat16 CPU tables: the exact step for either policy, in one
        sweep over the batch with no sort, each triplet's rows gathered once, and each
        row updated right after its last occurrence in the batch has contributed (so
        every gradient is still computed from the pre-step rows); sums in triplet
        order, deterministic.  It keeps per-thread buffers between steps: an int32
        row -> slot map per table (4 bytes per table row) and the partial sums of the
        rows that repeat in a batch.  Tables whose rows are not contiguous
        (``stride(1) != 1``) run the torch step.  Random rows of large tables miss the
        TLB on 4 KiB pages: tables on transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``
        for torch's allocator) measured 15-25 % faster at 1M items.
        **auto on CPU**: "cpu" whenever the extension is loaded (installed, or
        ``GUIDER_FAST_CPU_JIT=1``) and the tables are float32/float16/bfloat16, at
        every size (it was measured faster than the torch step at every benchmarked
        shape, B = 2,048 to 1,048,576: benchmarks/results/dbpr_cpu.md); else "torch".
        ``GUIDER_FAST_BACKEND=torch`` forces the torch step.
    """
    V.require_choice("optimizer", optimizer, OPTIMIZERS)
    V.require_choice("reduction", reduction, ("mean", "sum"))
    V.require_choice("duplicates", duplicates, DUPLICATE_POLICIES)
    if duplicates == "atomic":
        if optimizer != "sgd":
            raise ValueError("duplicates='atomic' applies per-occurrence updates, which only SGD "
                             "allows; rowwise_adagrad needs each row's summed gradient: use "
                             "duplicates='sorted'")
        if user_table.dtype != torch.float32:
            raise TypeError(f"duplicates='atomic' adds into the tables with float32 atomics: "
                            f"user_table must be float32, got {user_table.dtype} (use "
                            f"duplicates='sorted')")
    V.require_positive("lr", lr)
    V.require_real("l2", l2)
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    _check_dbpr(user_table, item_table, users, pos_items, neg_items, weights,
                table_names=("user_table", "item_table"))
    if optimizer == "rowwise_adagrad":
        if not isinstance(state, RowwiseAdagradState):
            raise ValueError("optimizer='rowwise_adagrad' needs state=RowwiseAdagradState(user_table, "
                             "item_table), created once and passed to every step")
        if state.user.shape != (user_table.shape[0],) or state.item.shape != (item_table.shape[0],):
            raise ValueError(f"state holds {state.user.shape[0]} user and {state.item.shape[0]} item rows, "
                             f"but the tables have {user_table.shape[0]} and {item_table.shape[0]}")
        V.require_same_device([("user_table", user_table), ("state.user", state.user),
                               ("state.item", state.item)])
    elif state is not None:
        raise ValueError("state is only used by optimizer='rowwise_adagrad'")
    _, impl = _dispatch.resolve("dbpr_step", backend, user_table.device, user_table.dtype,
                                problem=(duplicates, user_table.shape[1], float(l2)))
    negatives = neg_items.unsqueeze(1) if neg_items.dim() == 1 else neg_items
    with torch.no_grad():  # an in-place update of the tables, never part of a graph
        loss, margins = impl(user_table, item_table, users.long(), pos_items.long(),
                             negatives.long(), weights, float(lr), optimizer, state, float(l2),
                             reduction, duplicates)
    return (loss, margins) if return_scores else loss
