"""pgdurable/worker/instance.py and completer.py: results stored once, sizes, bad graphs.

The checkpoints an InstanceCtx builds carry each leaf's value once (composites carry a
reference), a reload resolves the references to the same values, the bytes an instance holds
are tracked across loops and failures, a stored graph the worker cannot run is a BadGraph at
load, and one failing outcome in a group commit never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from pgdurable.graph import _abc as A
from pgdurable.graph.compile import CompiledGraph, compile_value
from pgdurable.values import check_size, truthy
from pgdurable.worker.completer import Completer
from pgdurable.worker.instance import (
    TYPE_NAMES,
    BadGraph,
    Checkpoint,
    InstanceCtx,
    dump,
)
from tests.graphs import brk, join, loop, sql, then

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LEAF_QUERY = {A.SQL: "select 1", A.BREAK: '{"break_value": null}', A.SLEEP: "1"}


def rows_of(g: CompiledGraph, queries: dict[int, str] | None = None) -> list[list[Any]]:
    """df.nodes rows (id, node_type, query, result_name, left, right, status, result,
    status_details) of a compiled graph, all pending."""
    out = []
    for i, t in enumerate(g.types):
        q: str | None = (queries or {}).get(i, LEAF_QUERY.get(t))
        if t in (A.IF, A.LOOP) and g.cond[i] >= 0:
            q = json.dumps({"condition_node": g.node_ids[g.cond[i]]})
        elif t == A.JOIN and g.extra[i] >= 0:
            q = json.dumps({"extra_nodes": [g.node_ids[g.extra[i]]]})
        elif t not in A.LEAF_TYPES and (queries or {}).get(i) is None:
            q = None
        out.append(
            [
                g.node_ids[i],
                TYPE_NAMES[t],
                q,
                g.result_names[i],
                g.node_ids[g.left[i]] if g.left[i] >= 0 else None,
                g.node_ids[g.right[i]] if g.right[i] >= 0 else None,
                "pending",
                None,
                None,
            ]
        )
    return out


class Db:
    """The rows as _apply_v1 leaves them (the parts of it these tests need)."""

    def __init__(self, rows: list[list[Any]]) -> None:
        self.rows = {r[0]: r for r in rows}
        self.named: dict[str, Any] = {}
        self.state: bytes | None = None

    def apply(self, cp: Checkpoint, ctx: InstanceCtx) -> bytes:
        nodes = orjson.dumps(list(cp.nodes.values()))
        named = orjson.dumps(cp.named)
        for u in orjson.loads(nodes):
            r = self.rows[u["id"]]
            if u.get("status") is not None:
                r[6] = u["status"]
                r[7] = u.get("result") if u["status"] in ("completed", "failed") else None
            r[8] = {**(r[8] or {}), **u["details"]}
        self.named.update(orjson.loads(named))
        self.state = dump(ctx.sched.dump_state())
        return nodes + named

    def load(self, root: str) -> InstanceCtx:
        inst = ("l", "running", 1, "r", None, root, {}, self.state, 1, None)
        return InstanceCtx.from_rows(
            "i", inst, [tuple(r) for r in self.rows.values()], list(self.named.items()), 100, 0.0
        )


def complete(ctx: InstanceCtx, idx: int, value: Any) -> Checkpoint:
    """What Checkpointer.record does for a leaf that succeeded."""
    cp = Checkpoint()
    data = check_size(value, 0, "step result")
    ctx.record_leaf(idx, value, data, cp)
    step = ctx.sched.complete(idx, ctx.sched.gen(idx), True, truthy(value))
    ctx.build(step, cp, NOW)
    return cp


def start(g: CompiledGraph, queries: dict[int, str] | None = None) -> tuple[InstanceCtx, Db]:
    db = Db(rows_of(g, queries))
    ctx = db.load(g.node_ids[0])
    cp = Checkpoint()
    ctx.build(ctx.sched.start(), cp, NOW)
    db.apply(cp, ctx)
    return ctx, db


def test_a_value_under_25_thens_and_a_join_is_carried_once():
    inner: Any = sql()
    for _ in range(25):
        inner = then(sql(), inner)
    g = compile_value(join(inner, sql()))
    ctx, db = start(g)
    big = {"rows": [{"v": "MARK" + "x" * 100_000}], "row_count": 1, "columns": ["v"]}
    small = {"rows": [], "row_count": 0, "columns": []}
    # pre-order: the JOIN, then (THEN, its first step) x 25, the big step, the small branch
    i_big, i_small = len(g.types) - 2, len(g.types) - 1
    assert (g.parent[i_big], g.parent[i_small]) == (len(g.types) - 4, 0)
    db.apply(complete(ctx, i_small, small), ctx)
    # the THENs' first steps, in turn
    while ctx.sched.status(i_big) != A.RUNNING:
        ready = [
            i for i, t in enumerate(g.types) if t == A.SQL and ctx.sched.status(i) == A.RUNNING
        ]
        db.apply(
            complete(ctx, ready[0], {"rows": [{"n": 1}], "row_count": 1, "columns": ["n"]}), ctx
        )
    cp = complete(ctx, i_big, big)
    assert ctx.sched.terminal == A.T_COMPLETED
    sent = db.apply(cp, ctx)
    assert sent.count(b"MARK") == 1  # 26 composites finished in this checkpoint, one copy
    assert cp.weight == len(check_size(big, 0, "r"))
    done = [u for u in cp.nodes.values() if u.get("status") == "completed"]
    assert len(done) == 27
    for u in done:
        if u["id"] != g.node_ids[i_big]:
            assert u["result"] is None
            assert u["details"]["result_from"] or u["details"]["result_of"]
    root = cp.nodes[g.node_ids[0]]["details"]
    assert root["result_of"] == [g.node_ids[1], g.node_ids[i_small]]
    # in memory a composite's value is its source's object, not a copy
    assert ctx.results[0][0] is ctx.results[i_big]
    # a reload resolves the references to the same values and sizes
    again = db.load(g.node_ids[0])
    assert again.results[0] == [big, small]
    assert again.results[1] == big
    assert again.sizes == ctx.sizes
    assert again.stored == ctx.stored == sum(again.leaf_bytes.values())


def test_named_composites_are_the_one_copy_and_are_counted():
    g = compile_value(join(then(sql(), sql("big")), sql(), name="j"))
    ctx, db = start(g)
    value = {"rows": [{"v": "MARK" + "y" * 1000}], "row_count": 1, "columns": ["v"]}
    first = next(i for i, t in enumerate(g.types) if t == A.SQL and ctx.sched.status(i) == 1)
    db.apply(complete(ctx, first, {"rows": [], "row_count": 0, "columns": []}), ctx)
    other = [
        i
        for i, t in enumerate(g.types)
        if t == A.SQL and ctx.sched.status(i) == 1 and g.result_names[i] != "big"
    ]
    db.apply(complete(ctx, other[0], {"rows": [], "row_count": 0, "columns": []}), ctx)
    i_big = g.result_names.index("big")
    cp = complete(ctx, i_big, value)
    sent = db.apply(cp, ctx)
    # the leaf row, the name 'big' (embedded, not re-encoded) and the name 'j' (the JOIN)
    assert sent.count(b"MARK") == 3
    encoded = len(check_size(value, 0, "r"))
    j_size = len(orjson.dumps(ctx.named["j"]))
    assert ctx.named_bytes == {"big": encoded, "j": j_size}
    assert cp.weight == 2 * encoded + j_size
    assert ctx.stored == sum(ctx.leaf_bytes.values()) + encoded + j_size
    assert db.load(g.node_ids[0]).stored == ctx.stored


def test_loop_results_replace_each_other_in_the_accounting():
    # do-while: the body's value, then the condition's, each iteration overwriting the last
    g = compile_value(loop(sql("s"), sql("c")))
    ctx, db = start(g)
    i_s, i_c = g.result_names.index("s"), g.result_names.index("c")
    yes = {"rows": [{"c": True}], "row_count": 1, "columns": ["c"]}
    no = {"rows": [{"c": False}], "row_count": 1, "columns": ["c"]}
    for k in range(1, 4):
        value = {"rows": [{"v": "z" * (100 * k)}], "row_count": 1, "columns": ["v"]}
        db.apply(complete(ctx, i_s, value), ctx)
        v_size = len(check_size(value, 0, "r"))
        assert ctx.leaf_bytes[i_s] == ctx.named_bytes["s"] == v_size
        cp = complete(ctx, i_c, yes if k < 3 else no)
        db.apply(cp, ctx)
        if k < 3:  # the next iteration began: the body's row is running, holding nothing
            assert i_s not in ctx.leaf_bytes
            assert ctx.stored == len(check_size(yes, 0, "r")) * 2 + v_size
    assert ctx.sched.terminal == A.T_COMPLETED
    assert cp.nodes[g.node_ids[0]]["details"]["result_from"] == g.node_ids[i_s]
    again = db.load(g.node_ids[0])
    assert again.results[0] == value
    assert again.stored == ctx.stored == 2 * v_size + 2 * len(check_size(no, 0, "r"))


def test_a_break_is_referred_to_by_every_composite_it_ends():
    g = compile_value(then(loop(then(sql(), brk())), sql()))
    ctx, db = start(g)
    i_brk = g.types.index(A.BREAK)
    db.apply(complete(ctx, i_brk - 1, {"rows": [], "row_count": 0, "columns": []}), ctx)
    cp = complete(ctx, i_brk, {"done": "MARK"})
    sent = db.apply(cp, ctx)
    assert sent.count(b"MARK") == 1
    # the body THEN and the LOOP completed with the break value: references to the BREAK
    for pos in (1, 2):
        assert cp.nodes[g.node_ids[pos]]["details"]["result_from"] == g.node_ids[i_brk]
    assert db.load(g.node_ids[0]).results[1] == {"done": "MARK"}


def test_a_failure_clears_a_leafs_bytes_and_cuts_long_messages():
    g = compile_value(then(sql("a"), sql("b")))
    ctx, db = start(g)
    i_a = g.result_names.index("a")
    db.apply(
        complete(ctx, i_a, {"rows": [{"x": "q" * 500}], "row_count": 1, "columns": ["x"]}), ctx
    )
    before = ctx.stored
    i_b = g.result_names.index("b")
    cp = Checkpoint()
    ctx.errors[i_b] = ("e" * 100_000, None)
    step = ctx.sched.complete(i_b, ctx.sched.gen(i_b), False, False)
    ctx.build(step, cp, NOW)
    root = cp.nodes[g.node_ids[0]]
    assert root["status"] == "failed"
    assert len(root["result"].encode()) < 17_000
    assert root["result"].endswith("bytes)")
    assert ctx.stored == before


def bad(g: CompiledGraph, queries: dict[int, str]) -> str:
    db = Db(rows_of(g, queries))
    with pytest.raises(BadGraph) as info:
        db.load(g.node_ids[0])
    return str(info.value)


@pytest.mark.parametrize(
    ("node_type", "query", "message"),
    [
        (A.SLEEP, "10000000000000", "a sleep is a whole number of seconds from 0 to 10000000000"),
        (A.SLEEP, "1.5", "a sleep is a whole number"),
        (A.SLEEP, "٣", "a sleep is a whole number"),
        (A.WAIT_SCHEDULE, '{"cron_expr": "0 3 31 2 *"}', "bad day-of-month field '31'"),
        (A.WAIT_SCHEDULE, '{"cron_expr": 5}', "no cron_expr string"),
        (A.SIGNAL, '{"signal_name": ""}', "no signal_name"),
        (A.SIGNAL, '{"signal_name": "x", "timeout_seconds": 1e300}', "timeout_seconds must be"),
        (A.SIGNAL, '{"signal_name": "x", "timeout_seconds": 0}', "timeout_seconds must be"),
        (A.BREAK, '{"break_value": 5}', "break_value must be text or null"),
        (A.BREAK, "[" * 2000 + "]" * 2000, "is not JSON the worker can read"),
        (
            A.SIGNAL,
            '{"signal_name": "x", "p": ' + "[" * 2000 + "]" * 2000 + "}",
            "is not JSON the worker can read",
        ),
        (A.SQL, None, None),
    ],
)
def test_configs_the_worker_cannot_run_are_a_bad_graph(node_type, query, message):
    name = TYPE_NAMES[node_type]
    g = compile_value({"node_type": name, "query": "x"})
    if message is None:
        Db(rows_of(g, {0: "select 1"})).load("n0")
        return
    assert message in bad(g, {0: query})


def test_an_if_rows_config_nested_2000_deep_is_a_bad_graph():
    g = compile_value(
        {
            "node_type": "IF",
            "query": '{"condition_type": "result_has_rows", "result_name": "r"}',
            "left_node": sql(),
            "right_node": sql(),
        }
    )
    deep = (
        '{"condition_type": "result_has_rows", "result_name": "r", "p": '
        + "[" * 2000
        + "]" * 2000
        + "}"
    )
    assert "nests too deeply" in bad(g, {0: deep})


# -- the completer: one item's error never fails its neighbours ----------------------------------


class FakeConn:
    def transaction(self) -> Any:
        return contextlib.nullcontext()

    async def __aenter__(self) -> FakeConn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class FakePool:
    def connection(self) -> Any:
        @contextlib.asynccontextmanager
        async def conn() -> Any:
            yield FakeConn()

        return conn()


class Fenced(Exception):
    pass


def test_a_failing_outcome_is_split_from_its_batch():
    async def main() -> tuple[list[str], list[str], list[str]]:
        completer = Completer(FakePool(), Fenced)
        completer.start()
        applied: list[str] = []
        rolled: list[str] = []

        def item(key: str, fail: bool) -> Any:
            async def apply(conn: Any) -> None:
                if fail:
                    raise ValueError(f"{key} cannot be stored")
                applied.append(key)

            return completer.submit(key, apply, lambda: rolled.append(key))

        results = await asyncio.gather(
            *(item(f"k{i}", i == 3) for i in range(8)), return_exceptions=True
        )
        await completer.stop()
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        return applied, rolled, errors

    applied, rolled, errors = asyncio.run(main())
    assert errors == ["k3 cannot be stored"]
    assert sorted(set(applied)) == [f"k{i}" for i in range(8) if i != 3]
    assert "k3" in rolled


def test_deterministic_errors_are_told_from_transient_ones():
    import psycopg

    from pgdurable.worker.failures import deterministic as _deterministic

    class Data(psycopg.errors.DataError):
        sqlstate = "22008"

    class Gone(psycopg.OperationalError):
        sqlstate = None

    class Deadlock(psycopg.errors.DeadlockDetected):
        sqlstate = "40P01"

    assert _deterministic(Data("interval out of range"))
    assert _deterministic(ValueError("never matches"))
    assert _deterministic(OverflowError("date value out of range"))
    assert not _deterministic(Gone("server closed the connection"))
    assert not _deterministic(Deadlock("deadlock detected"))
    # a Python exception of pgdurable's own code is a bug: the same every time, not retried
    assert _deterministic(KeyError("x"))
