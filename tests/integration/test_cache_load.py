"""The instance cache's load (pgdurable/worker/cache.py) in-process against a real database:
one engine statement (``load``: ``_load_v2``; ``step_load``, behind the capability, on a step
connection), and the same context from a service and from a step connection, equal to the one
built from the three reads older workers make."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from pgdurable.queries import q
from pgdurable.worker.checkpoint import Outcome
from pgdurable.worker.instance import InstanceCtx, loop_limits

from .inproc import ctx_of, rowset, start, started, worker

pytestmark = pytest.mark.timeout(60)


def view(ctx: InstanceCtx) -> tuple[Any, ...]:
    """What a load decides of a context."""
    return (
        ctx.instance_id,
        ctx.label,
        ctx.status,
        ctx.role_oid,
        ctx.role_name,
        ctx.database,
        ctx.graph.node_ids,
        ctx.configs,
        ctx.version,
        ctx.results,
        ctx.sizes,
        ctx.named,
        ctx.stored,
        ctx.errors,
        ctx.leaf_bytes,
        ctx.named_bytes,
        ctx.loop_started,
        ctx.vars,
        ctx.role_info,
        ctx.max_iterations,
        ctx.loop_min_interval,
        list(ctx.sched.dump_state()),
    )


def count_engine_queries(w: Any) -> list[str]:
    """The names of the engine queries the worker's sessions make from now on (a list that
    grows as they do)."""
    asked: list[str] = []
    engine_query = w.sessions.engine_query

    def counting(conn: Any, name: str, args: tuple[Any, ...]) -> Any:
        asked.append(name)
        return engine_query(conn, name, args)

    w.sessions.engine_query = counting
    return asked


def test_one_statement_loads_the_same_context_on_service_and_step_connections(db):
    role = db.create_role("cl")
    iid = start(db, role, "df.sql('select 20 as n, 2.5 as x') |=> 'first' ~> df.sql('select 1')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            ctx = await ctx_of(w, iid)
            [t1] = await w.producer.claim(4)
            async with w.sessions.service.connection() as conn:
                await w.checkpointer.record(
                    conn, ctx, t1, ctx.index[t1.node_id], Outcome.success(rowset(n=20))
                )
            asked = count_engine_queries(w)
            service = await ctx_of(w, iid, fresh=True)
            assert asked == ["load"]
            async with w.sessions.steps.connection() as sconn:
                step = await w.cache.get(sconn, iid, fresh=True)
                assert step is not None
                # the step role itself may not make the service's reads
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await sconn.execute(q("load"), (iid,))
            assert asked == ["load", "load"]
            assert view(step) == view(service)
            assert service.named["first"] == rowset(n=20)
            # as built from the three reads
            async with w.sessions.service.connection() as conn:
                inst = await (await conn.execute(q("load_instance"), (iid,))).fetchone()
                rows = await (await conn.execute(q("load_nodes"), (iid,))).fetchall()
                named = await (await conn.execute(q("load_results"), (iid,))).fetchall()
            assert inst is not None
            min_interval, max_iterations = loop_limits(
                inst, w.settings.loop_min_interval_ms, w.settings.max_iterations
            )
            three = InstanceCtx.from_rows(iid, inst, rows, named, max_iterations, min_interval)
            assert view(three) == view(service)

    asyncio.run(go())


def test_no_such_instance_loads_nothing(db):
    async def go() -> None:
        async with worker(db) as w:
            async with w.sessions.service.connection() as conn:
                assert await w.cache.get(conn, "nope0000") is None
            async with w.sessions.steps.connection() as sconn:
                assert await w.cache.get(sconn, "nope0000") is None
            assert w.cache.peek("nope0000") is None

    asyncio.run(go())


def test_a_claims_starts_are_loaded_in_one_statement_and_equal_one_load_each(db):
    """The producer loads the instances of a claim's start tasks in one statement
    (``load_many``); each start's first look takes its own (no load of its own), equal to
    what a load of it alone gives; a preloaded copy is not used past PRELOAD_TTL_S, nor by a
    look that is not a start's."""
    from pgdurable.worker import cache as cache_mod

    role = db.create_role("pl")
    iids = [
        start(db, role, "df.sql('select 20 as n') |=> 'first' ~> df.sql('select $first.n')"),
        start(db, role, "'select 1' ~> 'select 2' ~> 'select 3'"),
        start(db, role, "df.sql('select ''x'' as t') |=> 'a'"),
    ]

    async def go() -> None:
        async with worker(db) as w:
            asked = count_engine_queries(w)
            claimed = await w.producer.claim(8)
            assert sorted(t.instance_id for t in claimed) == sorted(iids)
            assert all(t.kind == "start" for t in claimed)
            assert set(w.cache.preloaded) == set(iids)
            async with w.sessions.service.connection() as conn:
                for iid in iids:
                    pre = await w.cache.get(conn, iid, fresh=True, start=True)
                    assert pre is not None
                    assert asked == []
                    alone = await w.cache.get(conn, iid, fresh=True)
                    assert alone is not None
                    assert asked == ["load"]
                    assert view(pre) == view(alone)
                    asked.clear()
                # expired: loaded again
                await w.cache.preload(conn, iids[:2])
                w.cache.preloaded[iids[0]] = (
                    w.cache.preloaded[iids[0]][0] - cache_mod.PRELOAD_TTL_S - 1,
                    w.cache.preloaded[iids[0]][1],
                )
                assert await w.cache.get(conn, iids[0], fresh=True, start=True) is not None
                assert asked == ["load"]
                # a look that is not a start's never takes it
                assert await w.cache.get(conn, iids[1], fresh=True) is not None
                assert asked == ["load", "load"]
                assert iids[1] in w.cache.preloaded
                # an instance that is gone is gone in the preload too
                await w.cache.preload(conn, ["nosuch00"])
                assert await w.cache.get(conn, "nosuch00", fresh=True, start=True) is None
                assert asked == ["load", "load"]

    asyncio.run(go())
