"""The ``impl`` fixture: every loaded scheduler implementation.

Parametrised over the pure-Python twin (id ``py``) and, when it imports, the
compiled twin (id ``cython``). ``PGDURABLE_IMPL=python`` restricts it to Python;
``PGDURABLE_IMPL=cython`` requires the compiled one (the import error fails the run).
"""

from __future__ import annotations

import os

import pytest

from pgdurable.graph import _sched_py
from pgdurable.graph._abc import SchedulerProto

IMPLS: dict[str, type[SchedulerProto]] = {}
"""Loaded implementations by fixture id."""
CYTHON_ERROR: str | None = None
"""Why the compiled twin did not import (None when it did)."""

_choice = os.environ.get("PGDURABLE_IMPL", "").strip().lower()
if _choice != "cython":
    IMPLS["py"] = _sched_py.Scheduler
if _choice != "python":
    try:
        from pgdurable.graph import _sched_c
    except ImportError as exc:
        if _choice == "cython":
            raise
        CYTHON_ERROR = str(exc)
    else:
        IMPLS["cython"] = _sched_c.Scheduler


@pytest.fixture(params=list(IMPLS), ids=list(IMPLS))
def impl(request: pytest.FixtureRequest) -> type[SchedulerProto]:
    """A scheduler class: once per loaded implementation."""
    return IMPLS[request.param]
