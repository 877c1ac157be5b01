"""Triton kernels of guider_fast, installed as ``guider_fast.kernels``.

Kernels and their launchers live here, one module per op family; autograd,
validation and dispatch live in ``guider_fast``.  This package must stay
importable without triton: each kernel module imports triton itself and is
only imported by the dispatcher once the "triton" backend is usable.
"""

# Largest n or m (after padding to a power of two) that the on-chip Sinkhorn
# kernel keeps in one program; the dispatcher routes larger clouds elsewhere.
SINKHORN_ONCHIP_MAX_POINTS = 256
# Widest points the Triton envelope backward takes (a (block, d) accumulator per program).
ENVELOPE_MAX_FEATURES = 256
