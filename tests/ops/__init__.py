"""Op tests: one file per op family, each test run for every backend and device it can.

* ``backends.py``: ``BACKENDS`` (the one list to extend with a new backend) and
  ``DEVICES``; ``conftest.py`` turns them into the ``backend`` and ``device``
  parameters, and ``require`` skips with the dispatcher's own reason
  (``guider_fast._dispatch.unavailable_reason``) where a backend cannot run.
* ``problems.py``: one builder of random inputs per op family, and the
  independent float64 oracles the backends are compared with.
* ``tolerances.py``: one table keyed by (backend, dtype) per family, each value
  with its reason.

A package (this file) so that ``ops.conftest`` never shadows ``tests/conftest.py``
in ``sys.modules`` for ``from conftest import ...``.
"""
