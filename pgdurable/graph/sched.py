"""Choose the scheduler implementation (psycopg's loader pattern).

``PGDURABLE_IMPL``:

- empty / unset: the compiled twin ``_sched_c`` when it imports, else the
  pure-Python ``_sched_py`` (non-CPython interpreters always get Python);
- ``cython``: the compiled twin, or an ImportError naming why it is unavailable
  (never a silent fallback: CI must not test Python twice and call it Cython);
- ``python``: the pure-Python twin.

Exports :data:`Scheduler` (typed against the Protocol, so mypy checks both
twins) and :data:`__impl__` (``"cython"`` or ``"python"``).
"""

from __future__ import annotations

import os
import platform

# T_*: the terminal status codes a caller compares Scheduler.terminal with
from pgdurable.graph._abc import T_CANCELLED, T_COMPLETED, T_FAILED, SchedulerProto

Scheduler: type[SchedulerProto]
__impl__: str

_impl = os.environ.get("PGDURABLE_IMPL", "").strip().lower()

if _impl == "python":
    from pgdurable.graph import _sched_py

    Scheduler = _sched_py.Scheduler
    __impl__ = "python"
elif _impl == "cython":
    try:
        from pgdurable.graph import _sched_c
    except ImportError as exc:
        raise ImportError(
            f"PGDURABLE_IMPL=cython but the compiled scheduler is unavailable: {exc} "
            "(build it with `PGDURABLE_NATIVE=required python setup.py build_ext --inplace`)"
        ) from exc
    Scheduler = _sched_c.Scheduler
    __impl__ = "cython"
elif _impl == "":
    try:
        if platform.python_implementation() != "CPython":
            raise ImportError("not CPython")
        from pgdurable.graph import _sched_c
    except ImportError:
        from pgdurable.graph import _sched_py

        Scheduler = _sched_py.Scheduler
        __impl__ = "python"
    else:
        Scheduler = _sched_c.Scheduler
        __impl__ = "cython"
else:
    raise ImportError(f"PGDURABLE_IMPL={_impl!r} is not one of '', 'cython', 'python'")

__all__ = ["T_CANCELLED", "T_COMPLETED", "T_FAILED", "Scheduler", "__impl__"]
