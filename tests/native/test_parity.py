"""Parity of the scheduler twins on a fixed-seed corpus (always runs when the twin is built).

Random valid graphs (every node type, nesting, loops with BREAK, 1 to 10,000 nodes)
and fixed shapes (wide JOIN, deep THEN chain, RACE fan-out, nested LOOP/IF) are
driven by random completion/failure orders, with stale replays, cancels, reloads
through dump_state/load_state and misuse calls; both twins are stepped in lockstep
and every Step, every dump_state and every exception must be identical.
"""

from __future__ import annotations

import random

import pytest

from pgdurable.graph import _sched_py
from pgdurable.graph.compile import compile_value
from tests.native import parity

_sched_c = pytest.importorskip(
    "pgdurable.graph._sched_c",
    reason="compiled scheduler twin not built (PGDURABLE_NATIVE=required "
    "python setup.py build_ext --inplace)",
)
IMPLS = [_sched_py.Scheduler, _sched_c.Scheduler]

# (seed, size): many small graphs, some medium, a few at the df.start limit
CORPUS = (
    [(s, 1 + s % 40) for s in range(150)]
    + [(1000 + s, 200 + 97 * s) for s in range(20)]
    + [(5000 + s, 10_000) for s in range(3)]
)


@pytest.mark.parametrize(("seed", "size"), CORPUS, ids=[f"s{s}-n{n}" for s, n in CORPUS])
def test_random_graphs(seed, size):
    rnd = random.Random(seed)
    graph = compile_value(parity.random_graph(rnd, size))
    assert 1 <= len(graph) <= 10_000
    for run in range(3 if size < 1000 else 1):
        parity.drive(IMPLS, graph, random.Random(seed * 7919 + run))


SHAPES = {
    "wide_join_1000": lambda: parity.wide_join(1000),
    "then_chain_5000": lambda: parity.then_chain(5000),
    "race_fanout_512": lambda: parity.race_fanout(512),
    "nested_loop_if_12": lambda: parity.nested_loop_if(12),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("seed", range(3))
def test_fixed_shapes(shape, seed):
    graph = compile_value(SHAPES[shape]())
    parity.drive(IMPLS, graph, random.Random(seed), max_steps=12_000)


def test_corpus_covers_every_node_type():
    seen: set[int] = set()
    for seed, size in CORPUS[:170]:
        seen.update(compile_value(parity.random_graph(random.Random(seed), size)).types)
    assert seen == set(range(14))  # FOREACH (13) included


@pytest.mark.parametrize("bad", [[1], "x", [1, 1, 0, 0, 0, 0, 0, 1 << 70]])
def test_load_state_errors_match(bad):
    graph = compile_value({"node_type": "SQL", "query": "1"})
    errs = []
    for impl in IMPLS:
        with pytest.raises(ValueError) as info:
            impl.load_state(graph, 5, bad)
        errs.append(str(info.value))
    assert errs[0] == errs[1]
