"""Scheduler step cost, Python vs Cython twin, per graph shape and size.

Each benchmark runs one whole instance (start, then every leaf completed in
order) on a graph compiled once; ``group`` puts the two twins side by side.
Run with ``pytest bench -m benchmark -p no:cacheprovider --no-embedded``.
"""

from __future__ import annotations

import pytest

from pgdurable.graph.compile import CompiledGraph, compile_value
from pgdurable.graph.sched import T_COMPLETED
from tests.graphs import loop, sql, then
from tests.native.parity import then_chain, wide_join

pytestmark = pytest.mark.benchmark


def run_fifo(impl, graph: CompiledGraph, truthy_until: int = 0) -> int:
    """Run to the end completing ready leaves in FIFO order; returns the call count.

    Leaves complete truthy while fewer than ``truthy_until`` calls were made (drives a
    do-while loop), falsy afterwards.
    """
    s = impl(graph, 100_000)
    step = s.start()
    queue = list(step.ready)
    calls = 0
    while queue:
        node, gen = queue.pop()
        calls += 1
        step = s.complete(node, gen, True, calls < truthy_until)
        queue.extend(step.ready)
    assert s.terminal == T_COMPLETED
    return calls


THEN_10K = compile_value(then_chain(5_000))  # 9,999 nodes
JOIN_1000 = compile_value(wide_join(1_000))  # 1,999 nodes
LOOP_BODY = compile_value(loop(then(sql(), sql()), sql()))


@pytest.mark.benchmark(group="then-chain-10k")
def test_then_chain_10k(benchmark, impl):
    assert benchmark(run_fifo, impl, THEN_10K) == 5_000


@pytest.mark.benchmark(group="join-fanout-1000")
def test_join_fanout_1000(benchmark, impl):
    assert benchmark(run_fifo, impl, JOIN_1000) == 1_000


@pytest.mark.benchmark(group="loop-1000-iterations")
def test_loop_1000_iterations(benchmark, impl):
    # 3 leaves per iteration; the condition turns falsy at the 1000th iteration
    assert benchmark(run_fifo, impl, LOOP_BODY, 3 * 1000) == 3 * 1000


@pytest.mark.benchmark(group="dump-load-10k")
def test_dump_load_10k(benchmark, impl):
    s = impl(THEN_10K, 100)
    s.start()
    state = s.dump_state()
    benchmark(lambda: impl.load_state(THEN_10K, 100, state).dump_state())
