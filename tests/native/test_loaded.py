"""The compiled twin really loaded when the run asks for it (yarl ``test_quoting_c_loaded``).

Without this, a CI job meant to test Cython could silently test Python twice.
"""

from __future__ import annotations

import os

import pytest

from pgdurable.graph import sched

WANT_CYTHON = (
    os.environ.get("PGDURABLE_IMPL", "").strip().lower() == "cython"
    or os.environ.get("PGDURABLE_NATIVE", "").strip().lower() == "required"
)


@pytest.mark.skipif(
    not WANT_CYTHON, reason="neither PGDURABLE_IMPL=cython nor PGDURABLE_NATIVE=required is set"
)
def test_cython_loaded():
    assert sched.__impl__ == "cython"
    from pgdurable.graph import _sched_c

    assert sched.Scheduler is _sched_c.Scheduler


def test_python_when_asked():
    if os.environ.get("PGDURABLE_IMPL", "").strip().lower() != "python":
        pytest.skip("PGDURABLE_IMPL is not python")
    assert sched.__impl__ == "python"
