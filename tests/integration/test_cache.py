"""The instance cache (pgdurable/worker/cache.py) in-process against a real database: a hit
is the same object; a copy older than the version a task carries, one loaded under other loop
limits, or one forgotten, is reloaded from the database; least recently used copies go first."""

from __future__ import annotations

import asyncio

import pytest

from pgdurable.graph import _abc as A
from pgdurable.worker.cache import InstanceCache
from pgdurable.worker.checkpoint import Outcome

from .inproc import ctx_of, rowset, start, started, worker

pytestmark = pytest.mark.timeout(60)


def test_a_hit_is_the_cached_object_and_forget_reloads(db):
    role = db.create_role("ca")
    iid = start(db, role, "df.sql('select 1 as a')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            first = await ctx_of(w, iid)
            assert await ctx_of(w, iid) is first
            w.cache.forget(iid)
            assert first.dead  # whoever still holds it must reload
            again = await ctx_of(w, iid)
            assert again is not first
            assert not again.dead
            assert again.version == first.version

    asyncio.run(go())


def test_a_stale_instance_is_reloaded_with_what_another_worker_wrote(db):
    """Worker b checkpoints the first step; worker a's copy is older than the version its
    next task carries, so a reloads and sees b's result (which the next step substitutes)."""
    role = db.create_role("ca")
    iid = start(db, role, "df.sql('select 20 as n') |=> 'first' ~> df.sql('select $first.n')")

    async def go() -> None:
        async with worker(db) as a, worker(db) as b:
            await started(a)
            old = await ctx_of(a, iid)  # cached by a
            [t1] = await b.producer.claim(4)
            ctx_b = await ctx_of(b, iid)
            async with b.sessions.service.connection() as conn:
                await b.checkpointer.record(
                    conn, ctx_b, t1, ctx_b.index[t1.node_id], Outcome.success(rowset(n=20))
                )
            assert "first" not in old.named
            # without the version a task carries, the copy is served as is
            assert await ctx_of(a, iid) is old
            fresh = await ctx_of(a, iid, version=ctx_b.version)
            assert fresh is not old
            assert fresh.version == ctx_b.version
            assert fresh.named["first"] == rowset(n=20)
            second = fresh.index[t1.handoff[0].node_id]
            assert fresh.sched.status(second) == A.RUNNING

    asyncio.run(go())


def test_changed_loop_limits_reload_every_instance(db):
    role = db.create_role("ca")
    iid = start(db, role, "df.sql('select 1 as a')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            first = await ctx_of(w, iid)
            with db.connect() as conn:
                conn.execute(f'alter role "{role}" set pg_durable.loop_max_iterations = 7')
            async with w.sessions.service.connection() as conn:
                await w.settings.load(conn)  # as every maintenance round does
            again = await ctx_of(w, iid)
            assert again is not first
            assert again.max_iterations == 7

    asyncio.run(go())


def test_least_recently_used_instances_are_dropped_first(db):
    role = db.create_role("ca")
    iids = [start(db, role, "df.sql('select 1 as a')") for _ in range(3)]

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            cache = InstanceCache(w.sessions, w.settings, size=2)
            async with w.sessions.service.connection() as conn:
                a = await cache.get(conn, iids[0])
                await cache.get(conn, iids[1])
                assert await cache.get(conn, iids[0]) is a  # used again: now the newest
                await cache.get(conn, iids[2])
                assert list(cache.ctxs) == [iids[0], iids[2]]
                assert await cache.get(conn, "ffffffff") is None  # no such instance

    asyncio.run(go())
