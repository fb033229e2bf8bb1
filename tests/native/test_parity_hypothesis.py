"""Parity of the scheduler twins under Hypothesis (graph shape and driving both drawn).

The fixed-seed corpus in ``test_parity.py`` always runs; this module explores
further and shrinks failures to a small graph and call sequence.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pgdurable.graph import _sched_py  # noqa: E402
from pgdurable.graph.compile import compile_value  # noqa: E402
from tests.native import parity  # noqa: E402

_sched_c = pytest.importorskip(
    "pgdurable.graph._sched_c",
    reason="compiled scheduler twin not built (PGDURABLE_NATIVE=required "
    "python setup.py build_ext --inplace)",
)
IMPLS = [_sched_py.Scheduler, _sched_c.Scheduler]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.randoms(use_true_random=False),
    run=st.randoms(use_true_random=False),
    size=st.integers(1, 120),
    max_iterations=st.integers(1, 6),
)
def test_random_graph_parity(shape, run, size, max_iterations):
    graph = compile_value(parity.random_graph(shape, size))
    parity.drive(IMPLS, graph, run, max_steps=600, max_iterations=max_iterations)
