"""Differential driver for the scheduler twins: random graphs, random outcomes, lockstep.

Shared by ``test_parity.py`` (fixed-seed corpus) and ``test_parity_hypothesis.py``.
"""

from __future__ import annotations

import random
from typing import Any

from pgdurable.graph._abc import NONE, T_RUNNING
from pgdurable.graph.compile import CompiledGraph
from tests.graphs import G, brk, if_, if_rows, join, loop, race, retry, sleep, sql, then

_LEAVES = [
    lambda: sql(),
    lambda: sleep(),
    lambda: {"node_type": "WAIT_SCHEDULE", "query": '{"cron_expr": "* * * * *"}'},
    lambda: {"node_type": "SIGNAL", "query": '{"signal_name": "s", "timeout_seconds": null}'},
    lambda: {"node_type": "HTTP", "query": '{"url": "http://127.0.0.1/"}'},
    lambda: {"node_type": "HTTP_MULTIPART", "query": '{"url": "http://127.0.0.1/"}'},
    # df.foreach: a leaf to the scheduler (its bodies are child instances)
    lambda: {
        "node_type": "FOREACH",
        "query": '{"rows": "select 1", "body": {"node_type": "SQL", "query": "select 1"}, '
        '"max_parallel": 2}',
    },
]
_MAX_DEPTH = 60  # recursion in random_graph; sizes come from width, not depth


def random_graph(rnd: random.Random, size: int) -> G:
    """A random valid graph value of about ``size`` (≥ 1) nodes using every node type."""
    return _gen(rnd, max(1, size), 0, False)


def _leaf(rnd: random.Random, in_loop: bool) -> G:
    # BREAK mostly inside loops, now and then outside (the instance must fail)
    if rnd.random() < (0.25 if in_loop else 0.02):
        return brk()
    return rnd.choice(_LEAVES)()


def _split(rnd: random.Random, budget: int, parts: int) -> list[int]:
    cuts = sorted(rnd.randint(0, budget - parts) for _ in range(parts - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, budget - parts], strict=True)]
    return [s + 1 for s in sizes]


def _gen(rnd: random.Random, budget: int, depth: int, in_loop: bool) -> G:
    if budget <= 2 or depth >= _MAX_DEPTH:
        return _leaf(rnd, in_loop)
    b = budget - 1
    kind = rnd.choice(
        ["THEN", "THEN", "IF", "IFROWS", "LOOP", "LOOPC", "JOIN", "JOIN3", "RACE", "RETRY"]
    )
    if kind in ("JOIN3", "IF", "LOOPC") and b < 3:
        kind = "THEN"
    d = depth + 1
    if kind == "THEN":
        x, y = _split(rnd, b, 2)
        return then(_gen(rnd, x, d, in_loop), _gen(rnd, y, d, in_loop))
    if kind == "IF":
        c, x, y = _split(rnd, b, 3)
        return if_(_gen(rnd, c, d, in_loop), _gen(rnd, x, d, in_loop), _gen(rnd, y, d, in_loop))
    if kind == "IFROWS":
        x, y = _split(rnd, b, 2)
        return if_rows(_gen(rnd, x, d, in_loop), _gen(rnd, y, d, in_loop))
    if kind == "LOOP":
        return loop(_gen(rnd, b, d, True))
    if kind == "RETRY":
        return retry(_gen(rnd, b, d, in_loop), rnd.choice([1, 2, 3, 5]))
    if kind == "LOOPC":
        x, c = _split(rnd, b, 2)
        return loop(_gen(rnd, x, d, True), _gen(rnd, c, d, True))
    if kind == "JOIN3":
        x, y, z = _split(rnd, b, 3)
        return join(_gen(rnd, x, d, in_loop), _gen(rnd, y, d, in_loop), _gen(rnd, z, d, in_loop))
    x, y = _split(rnd, b, 2)
    maker = join if kind == "JOIN" else race
    return maker(_gen(rnd, x, d, in_loop), _gen(rnd, y, d, in_loop))


# -- fixed shapes ------------------------------------------------------------------------


def wide_join(leaves: int) -> G:
    """A balanced JOIN tree over ``leaves`` SQL leaves (iterative: no recursion limit)."""
    level: list[G] = [sql() for _ in range(leaves)]
    while len(level) > 1:
        nxt = [join(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def then_chain(leaves: int) -> G:
    g = sql()
    for _ in range(leaves - 1):
        g = then(g, sql())
    return g


def race_fanout(leaves: int) -> G:
    level: list[G] = [then(sql(), sleep()) for _ in range(leaves)]
    while len(level) > 1:
        nxt = [race(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def nested_loop_if(depth: int) -> G:
    g: G = then(sql(), if_(sql(), brk(), sql()))
    for i in range(depth):
        inner = loop(g, sql()) if i % 2 else loop(g)
        g = if_(sql(), then(inner, sql()), if_rows(sql(), then(sql(), brk())))
    return loop(g)


# -- lockstep driver ---------------------------------------------------------------------


class Mismatch(AssertionError):
    pass


class Lockstep:
    """Two schedulers over one graph, every call made on both and compared."""

    def __init__(self, impls: list[type[Any]], graph: CompiledGraph, max_iterations: int):
        self.impls = impls
        self.graph = graph
        self.max_iterations = max_iterations
        self.scheds = [impl(graph, max_iterations) for impl in impls]
        self.log: list[str] = []

    def call(self, what: str, *args: Any) -> Any:
        """Call ``what`` on both; results (or exception type and text) must be equal."""
        outs: list[tuple[Any, ...]] = []
        for s in self.scheds:
            try:
                outs.append(("ok", getattr(s, what)(*args)))
            except Exception as exc:
                outs.append(("raised", type(exc), str(exc)))
        self.log.append(f"{what}{args}")
        if outs[0] != outs[1]:
            raise Mismatch(
                f"{what}{args} differs after {len(self.log)} calls:\n"
                f"  {self.impls[0].__module__}: {outs[0]}\n"
                f"  {self.impls[1].__module__}: {outs[1]}"
            )
        states = [s.dump_state() for s in self.scheds]
        if states[0] != states[1]:
            raise Mismatch(f"dump_state differs after {what}{args}")
        if outs[0][0] == "raised":
            return None
        return outs[0][1]

    def reload(self) -> None:
        state = self.scheds[0].dump_state()
        self.scheds = [
            impl.load_state(self.graph, self.max_iterations, list(state)) for impl in self.impls
        ]


def drive(
    impls: list[type[Any]],
    graph: CompiledGraph,
    rnd: random.Random,
    max_steps: int = 2000,
    max_iterations: int = 4,
) -> Lockstep:
    """Run one instance on both twins with random orders, outcomes and misuse."""
    ls = Lockstep(impls, graph, max_iterations)
    n = len(graph)
    p_fail = rnd.choice([0.0, 0.01, 0.05, 0.2])
    active: dict[int, int] = {}  # node -> gen of leaves the "executor" is running
    history: list[tuple[int, int]] = []  # every (node, gen) ever ready, for stale replays

    def apply(step: Any) -> None:
        if step is None:
            return
        for node, gen in step.ready:
            active[node] = gen
            history.append((node, gen))
        for node, _ in step.abandoned:
            active.pop(node, None)
        for node, *_ in step.finished:
            active.pop(node, None)

    if rnd.random() < 0.05:
        ls.call("complete", 0, 1, True, True)  # before start: RuntimeError on both
    apply(ls.call("start"))
    for _ in range(max_steps):
        if ls.scheds[0].terminal != T_RUNNING or not active:
            break
        r = rnd.random()
        if r < 0.01:
            apply(ls.call("cancel"))
            continue
        if r < 0.05 and history:
            node, gen = rnd.choice(history)  # stale, duplicate or wrong-generation replay
            apply(ls.call("complete", node, gen + rnd.choice([-1, 0, 0, 1]), True, True))
            continue
        if r < 0.06:
            bad = rnd.choice([-1, n, n + 7, rnd.randrange(n)])  # out of range or a composite
            ls.call("complete", bad, 1, True, True)
            ls.call("status", bad)
            ls.call("iteration", bad)
            continue
        if r < 0.10:
            ls.reload()
        node = rnd.choice(sorted(active))
        gen = active.pop(node)  # done with it: the step may activate it again (a new gen)
        apply(ls.call("complete", node, gen, rnd.random() >= p_fail, rnd.random() < 0.5))
    ls.call("cancel")
    ls.call("start")  # always an error by now
    for node in range(0, n, max(1, n // 50)):
        ls.call("status", node)
        ls.call("gen", node)
        if graph.types[node] in (3, 12):  # LOOP, RETRY
            ls.call("iteration", node)
    assert all(p == NONE or p < i for i, p in enumerate(graph.parent))
    return ls
