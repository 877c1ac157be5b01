"""Schemas and fake kernels of the CUDA C++ backend's ops, namespace ``guider_fast_cuda::``.

The implementations come from csrc/binding.cpp (``TORCH_LIBRARY_IMPL`` only):
the CUDA key from ``guider_fast._C``, the CPU key from the emulation build
(see ``guider_fast._cuda_build``).  A namespace of their own, so they never
shadow the Triton custom ops under ``guider_fast::``.  Defining the schemas
needs neither the extension nor CUDA: torch.compile traces through the fakes
whether or not a library is loaded.
"""

from __future__ import annotations

import torch

from . import _library

NAMESPACE = "guider_fast_cuda"
_LIB = torch.library.Library(NAMESPACE, "DEF")

_LIB.define("calibrate_rows(Tensor t, Tensor v, Tensor u_code, Tensor t_code, Tensor v_code, "
            "float threshold, bool euclidean) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define("calibrate_cached(Tensor items, Tensor item_distance, Tensor u_code, Tensor text_sign, "
            "Tensor text_nonzero, Tensor image_sign, Tensor image_nonzero, float threshold) "
            "-> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake(f"{NAMESPACE}::calibrate_rows", lib=_LIB)
def _calibrate_rows_fake(t, v, u_code, t_code, v_code, threshold, euclidean):
    return _library._calibration_fake(t.shape[0], t)


@torch.library.register_fake(f"{NAMESPACE}::calibrate_cached", lib=_LIB)
def _calibrate_cached_fake(items, item_distance, u_code, text_sign, text_nonzero, image_sign,
                           image_nonzero, threshold):
    return _library._calibration_fake(items.shape[0], u_code)


_LIB.define("dbpr_forward(Tensor user_table, Tensor item_table, Tensor users, Tensor pos_items, "
            "Tensor neg_items, Tensor? weights) -> (Tensor, Tensor, Tensor)")
_LIB.define("dbpr_backward(Tensor user_table, Tensor item_table, Tensor users, Tensor pos_items, "
            "Tensor neg_items, Tensor coef, Tensor grad_rows) -> (Tensor, Tensor)")


@torch.library.register_fake(f"{NAMESPACE}::dbpr_forward", lib=_LIB)
def _dbpr_forward_fake(user_table, item_table, users, pos_items, neg_items, weights):
    return _library._dbpr_forward_fake(user_table, item_table, users, pos_items, neg_items, weights)


@torch.library.register_fake(f"{NAMESPACE}::dbpr_backward", lib=_LIB)
def _dbpr_backward_fake(user_table, item_table, users, pos_items, neg_items, coef, grad_rows):
    return _library._dbpr_backward_fake(user_table, item_table, users, pos_items, neg_items, coef,
                                        grad_rows, "atomic")

_LIB.define("dbpr_step(Tensor(a!) user_table, Tensor(b!) item_table, Tensor users, Tensor pos_items, "
            "Tensor neg_items, Tensor? weights, Tensor user_keys, Tensor user_order, Tensor item_keys, "
            "Tensor item_order, Tensor(c!)? user_accumulator, Tensor(d!)? item_accumulator, float lr, "
            "float l2, float scale) -> (Tensor, Tensor)")
_LIB.define("dbpr_atomic_sgd_step(Tensor(a!) user_table, Tensor(b!) item_table, Tensor users, "
            "Tensor pos_items, Tensor neg_items, Tensor? weights, float lr, float l2, float scale) "
            "-> (Tensor, Tensor)")


@torch.library.register_fake(f"{NAMESPACE}::dbpr_step", lib=_LIB)
def _dbpr_step_fake(user_table, item_table, users, pos_items, neg_items, weights, user_keys, user_order,
                    item_keys, item_order, user_accumulator, item_accumulator, lr, l2, scale):
    return _library._dbpr_fused_step_fake(user_table, item_table, users, pos_items, neg_items, weights,
                                          user_accumulator, item_accumulator, lr, l2, scale)


@torch.library.register_fake(f"{NAMESPACE}::dbpr_atomic_sgd_step", lib=_LIB)
def _dbpr_atomic_sgd_step_fake(user_table, item_table, users, pos_items, neg_items, weights, lr, l2, scale):
    return _library._dbpr_atomic_sgd_step_fake(user_table, item_table, users, pos_items, neg_items, weights,
                                               lr, l2, scale)


_LIB.define("sinkhorn_tiny(Tensor x, Tensor y, Tensor a, Tensor b, float eps, int p, int n_iters, "
            "float? tol) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define("sinkhorn_tiny_envelope(Tensor x, Tensor y, Tensor a, Tensor b, Tensor f, Tensor g, float eps, "
            "int p, Tensor scale) -> (Tensor, Tensor)")


@torch.library.register_fake(f"{NAMESPACE}::sinkhorn_tiny", lib=_LIB)
def _sinkhorn_tiny_fake(x, y, a, b, eps, p, n_iters, tol):
    return _library._sinkhorn_onchip_fake(x, y, a, b, eps, p, n_iters, tol)


@torch.library.register_fake(f"{NAMESPACE}::sinkhorn_tiny_envelope", lib=_LIB)
def _sinkhorn_tiny_envelope_fake(x, y, a, b, f, g, eps, p, scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        y, memory_format=torch.contiguous_format)


_LIB.define("samples_loss_onchip(Tensor x, Tensor y, Tensor a, Tensor b, float[] eps_list, int p, bool debias) "
            "-> Tensor")


@torch.library.register_fake(f"{NAMESPACE}::samples_loss_onchip", lib=_LIB)
def _samples_loss_onchip_fake(x, y, a, b, eps_list, p, debias):
    return _library._samples_loss_onchip_fake(x, y, a, b, eps_list, p, debias)


def ops():
    """``torch.ops.guider_fast_cuda`` (implementations present once a build is loaded)."""
    return getattr(torch.ops, NAMESPACE)
