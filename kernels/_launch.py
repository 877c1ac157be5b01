"""Launch helpers shared by the Triton kernel modules."""

import contextlib

import torch
import triton


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def block_size(size: int, floor: int = 16) -> int:
    """The power-of-two tile extent (tl.arange needs one) covering ``size``."""
    return max(floor, triton.next_power_of_2(size))
