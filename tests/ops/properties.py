"""hypothesis's ``given`` and ``strategies``, or stand-ins that skip the property tests.

The GPU machine has torch and triton only: without hypothesis the property
tests are skipped with the reason instead of breaking the collection of their
modules.  The examples are fixed by the "ci" profile of tests/conftest.py.
"""

import functools

import pytest

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - exercised where hypothesis is missing
    class _Strategies:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _Strategies()

    def given(*_, **__):
        def decorate(fn):
            @functools.wraps(fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
            @pytest.mark.skip(reason="hypothesis is not installed (pip install 'guider_fast[dev]')")
            def skipped():
                pass
            return skipped
        return decorate

__all__ = ["given", "st"]
