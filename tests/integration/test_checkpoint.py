"""The checkpoint API (pgdurable/worker/checkpoint.py) in-process against a real database:
one transaction writes a step's result and its successors, or nothing; a stale cache is
reloaded under the instance's lock; a task that is not ours is fenced; failures and
oversized results are recorded as the step's outcome; a group commit is visible once
``submit`` returns."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest

from pgdurable.errors import StepError
from pgdurable.worker.cache import InstanceCache
from pgdurable.worker.checkpoint import Outcome
from pgdurable.worker.flow import Fenced

from .inproc import ctx_of, one, rows, rowset, start, started, worker

pytestmark = pytest.mark.timeout(60)


class Boom(Exception):
    pass


def node_state(db: Any, iid: str, node_id: str) -> tuple[Any, ...]:
    got = rows(
        db, "select status, result from df.nodes where instance_id = %s and id = %s", (iid, node_id)
    )
    return got[0]


def tasks_of(db: Any, iid: str) -> list[tuple[Any, ...]]:
    return rows(
        db,
        "select node_id, kind, lease_owner from pgdurable.tasks where instance_id = %s "
        "order by node_id",
        (iid,),
    )


def test_result_and_successor_commit_together_or_not_at_all(db):
    role = db.create_role("cp")
    iid = start(db, role, "df.sql('select 1 as a') ~> df.sql('select 2 as b')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            [t1] = await w.producer.claim(4)
            ctx = await ctx_of(w, iid)
            idx = ctx.index[t1.node_id]
            second = next(
                n for n in ctx.graph.node_ids if n not in (t1.node_id, ctx.graph.node_ids[0])
            )
            version = ctx.version
            conn: psycopg.AsyncConnection[Any]
            async with w.sessions.service.connection() as conn:

                async def record_then_fail() -> None:
                    async with conn.transaction():
                        await w.checkpointer.record(
                            conn, ctx, t1, idx, Outcome.success(rowset(a=1)), in_tx=True
                        )
                        # inside the transaction: the result, and the successor's task only
                        cur = await conn.execute(
                            "select status from df.nodes where instance_id = %s and id = %s",
                            (iid, t1.node_id),
                        )
                        assert await cur.fetchall() == [("completed",)]
                        cur = await conn.execute(
                            "select node_id from pgdurable.tasks where instance_id = %s",
                            (iid,),
                        )
                        assert await cur.fetchall() == [(second,)]
                        raise Boom

                with pytest.raises(Boom):
                    await record_then_fail()
            assert [t.node_id for t in t1.handoff] == [second]
            # rolled back: neither the result nor the successor's task
            assert node_state(db, iid, t1.node_id) == ("running", None)
            assert [r[0] for r in tasks_of(db, iid)] == [t1.node_id]
            w.cache.forget(iid, ctx)  # its memory moved on; the database did not
            ctx = await ctx_of(w, iid)
            assert ctx.version == version
            async with w.sessions.service.connection() as conn:
                await w.checkpointer.record(conn, ctx, t1, idx, Outcome.success(rowset(a=1)))
            assert node_state(db, iid, t1.node_id) == ("completed", rowset(a=1))
            # the successor, leased to this worker at once (its handoff), and nothing else
            assert tasks_of(db, iid) == [(second, "run", w.worker_id)]
            assert [t.node_id for t in t1.handoff] == [second]
            assert ctx.version > version

    asyncio.run(go())


def test_a_stale_cache_is_reloaded_under_the_lock(db):
    """Both JOIN branches checkpoint, the second on a copy of the instance loaded before the
    first one's checkpoint (as a second worker's cache would hold it; the claim keeps an
    instance's tasks on one worker, so the copy comes from a second cache here): _apply_v1
    says stale, the record reloads under the runs row lock and applies, and the JOIN
    completes with both values."""
    role = db.create_role("cp")
    iid = start(db, role, "df.sql('select 1 as a') & df.sql('select 2 as b')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            ta, tb = await w.producer.claim(4)
            ctx_a = await ctx_of(w, iid)
            other = InstanceCache(w.sessions, w.settings)
            async with w.sessions.service.connection() as conn:
                ctx_b = await other.get(conn, iid)
            assert ctx_b is not None
            assert ctx_b is not ctx_a
            assert ctx_a.version == ctx_b.version
            async with w.sessions.service.connection() as conn:
                await w.checkpointer.record(
                    conn, ctx_a, ta, ctx_a.index[ta.node_id], Outcome.success(rowset(v=ta.node_id))
                )
            assert ctx_b.version < ctx_a.version  # the copy is behind now
            async with w.sessions.service.connection() as conn:
                await w.checkpointer.record(
                    conn, ctx_b, tb, ctx_b.index[tb.node_id], Outcome.success(rowset(v=tb.node_id))
                )
            assert ctx_b.dead  # the stale copy was dropped for the reloaded one

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    result = json.loads(one(db, "select df.result(%s)", (iid,)))
    leaves = rows(
        db, "select id from df.nodes where instance_id = %s and node_type = 'SQL'", (iid,)
    )
    assert sorted(r["rows"][0]["v"] for r in result) == sorted(r[0] for r in leaves)


def test_a_task_that_is_not_ours_is_fenced_and_writes_nothing(db):
    role = db.create_role("cp")
    iid = start(db, role, "df.sql('select 1 as a')")

    async def go() -> None:
        async with worker(db) as a, worker(db) as b:
            await started(a)
            [t] = await a.producer.claim(1)
            ctx = await ctx_of(b, iid)  # b never leased it
            async with b.sessions.service.connection() as conn:
                with pytest.raises(Fenced):
                    await b.checkpointer.record(
                        conn, ctx, t, ctx.index[t.node_id], Outcome.success(rowset(a=1))
                    )
            assert node_state(db, iid, t.node_id) == ("running", None)
            assert tasks_of(db, iid) == [(t.node_id, "run", a.worker_id)]

    asyncio.run(go())


def test_a_failure_is_recorded_with_its_sqlstate_and_fails_the_instance(db):
    role = db.create_role("cp")
    iid = start(db, role, "df.sql('select 1 as a') ~> df.sql('select 2')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            [t] = await w.producer.claim(4)
            ctx = await ctx_of(w, iid)
            async with w.sessions.service.connection() as conn:
                err = StepError("it broke", sqlstate="P0001")
                await w.checkpointer.record(
                    conn, ctx, t, ctx.index[t.node_id], Outcome.failure(err)
                )
            assert t.handoff == []

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "failed"
    error = one(db, "select df.error(%s)", (iid,))
    assert (error["error"], error["sqlstate"], error["node_type"]) == ("it broke", "P0001", "SQL")
    assert one(db, "select count(*) from pgdurable.tasks where instance_id = %s", (iid,)) == 0


def test_a_result_over_the_cap_becomes_the_step_failure(db):
    role = db.create_role("cp")
    iid = start(db, role, "df.sql('select 1 as a')")

    async def go() -> None:
        async with worker(db, result_max_bytes=1000) as w:
            await started(w)
            [t] = await w.producer.claim(4)
            ctx = await ctx_of(w, iid)
            async with w.sessions.service.connection() as conn:
                await w.checkpointer.record(
                    conn, ctx, t, ctx.index[t.node_id], Outcome.success(rowset(a="x" * 5000))
                )

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "failed"
    assert "1000" in one(db, "select df.error(%s)", (iid,))["error"]


def test_submit_returns_once_the_group_commit_is_visible(db):
    role = db.create_role("cp")
    iids = [start(db, role, "df.sql('select 1 as a') ~> df.sql('select 2')") for _ in range(5)]

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            tasks = await w.producer.claim(10)
            assert sorted(t.instance_id for t in tasks) == sorted(iids)
            batches = w.completer.batches
            ctxs = [await ctx_of(w, t.instance_id) for t in tasks]
            await asyncio.gather(
                *(
                    w.checkpointer.submit(c, t, c.index[t.node_id], Outcome.success(rowset(a=1)))
                    for c, t in zip(ctxs, tasks, strict=True)
                )
            )
            # acknowledged after commit: another session sees every one, with its successor
            done = rows(
                db,
                "select count(*) from df.nodes n where instance_id = any(%s) and "
                "status = 'completed' and result = %s::jsonb",
                (iids, '{"rows": [{"a": 1}], "row_count": 1, "columns": ["a"]}'),
            )
            assert done == [(5,)]
            assert rows(
                db,
                "select count(*) from pgdurable.tasks where instance_id = any(%s)",
                (iids,),
            ) == [(5,)]
            assert w.completer.batches - batches < 5  # they shared commits

    asyncio.run(go())
