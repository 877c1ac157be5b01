"""Tests of csrc/: the CUDA emulation, the kernels run through it, sanitizer builds, the ptxas gate.

A package (this file), like tests/ops, so that this directory's conftest.py never
shadows tests/conftest.py in ``sys.modules``.
"""
