"""Set-based checkpoints (pgdurable/worker/checkpoint_set.py, ``_apply_v2``) in-process against
a real database: the checkpoints of several instances, and several of one instance, staged in
one :class:`CheckpointSet` are written by one flush, nothing before it; a stale instance is
computed again under the runs lock and written with the rest; a fenced one raises and its
transaction writes nothing; what folds into one element and what goes to the next round."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest

from pgdurable.worker import wire
from pgdurable.worker.cache import InstanceCache
from pgdurable.worker.checkpoint import Outcome
from pgdurable.worker.checkpoint_set import CheckpointSet, Run
from pgdurable.worker.flow import Fenced
from pgdurable.worker.instance import Checkpoint

from .inproc import ctx_of, one, rows, rowset, start, started, worker

pytestmark = pytest.mark.timeout(60)

JOIN3 = "df.sql('select 1 as a') & df.sql('select 2 as b') & df.sql('select 3 as c')"


def values(result: Any) -> list[str]:
    """The "v" of every leaf row in a (nested) JOIN's result."""
    if isinstance(result, list):
        return [v for r in result for v in values(r)]
    return [row["v"] for row in result["rows"]]


def version_of(db: Any, iid: str) -> int:
    return int(one(db, "select state_version from pgdurable.runs where instance_id = %s", (iid,)))


def test_a_set_writes_many_instances_and_many_steps_of_one_at_its_flush(db):
    role = db.create_role("cs")
    join = start(db, role, JOIN3)
    single = start(db, role, "df.sql('select 4 as d') ~> df.sql('select 5 as e')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            tasks = await w.producer.claim(8)
            assert sorted(t.instance_id for t in tasks) == sorted([join] * 3 + [single])
            ctxs = {iid: await ctx_of(w, iid) for iid in (join, single)}
            before = {iid: version_of(db, iid) for iid in ctxs}
            batch = CheckpointSet()
            conn: psycopg.AsyncConnection[Any]
            async with w.sessions.service.connection() as conn, conn.transaction():
                for t in tasks:
                    ctx = ctxs[t.instance_id]
                    await w.checkpointer.record(
                        conn,
                        ctx,
                        t,
                        ctx.index[t.node_id],
                        Outcome.success(rowset(v=t.node_id)),
                        in_tx=True,
                        lock_held=True,
                        batch=batch,
                    )
                # staged only: the memory moved on, the database not yet
                assert ctxs[join].version == before[join] + 3
                cur = await conn.execute(
                    "select count(*) from df.nodes where instance_id = any(%s) "
                    "and status = 'completed'",
                    ([join, single],),
                )
                assert await cur.fetchone() == (0,)
                assert len(batch.rounds[join]) == 1  # three branches fold into one element
                await w.checkpointer.flush(conn, batch)
                assert not batch
            # the successor of the sequence's first step, leased to us (its handoff)
            [first] = [t for t in tasks if t.instance_id == single]
            assert len(first.handoff) == 1
            assert ctxs[single].version == before[single] + 1

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (join,)) == "completed"
    result = json.loads(one(db, "select df.result(%s)", (join,)))
    leaves = rows(
        db, "select id from df.nodes where instance_id = %s and node_type = 'SQL'", (join,)
    )
    assert sorted(values(result)) == sorted(r[0] for r in leaves)
    done = rows(
        db,
        "select status, status_details ? 'duration_ms' from df.nodes "
        "where instance_id = %s and node_type = 'SQL'",
        (join,),
    )
    assert done == [("completed", True)] * 3
    assert one(db, "select status from df.instances where id = %s", (single,)) == "running"


async def _stale_pair(w: Any, join: str, other: str) -> list[tuple[Any, Any]]:
    """Claim the steps of ``join`` (a two-branch JOIN) and ``other``, and checkpoint one
    branch behind the worker's back (a second cache, as another worker would): the pairs
    (instance, task) left to stage, the JOIN's now stale."""
    tasks = await w.producer.claim(8)
    ta, tb = [t for t in tasks if t.instance_id == join]
    [tc] = [t for t in tasks if t.instance_id == other]
    ctx = await ctx_of(w, join)
    ctx_c = await ctx_of(w, other)
    elsewhere = InstanceCache(w.sessions, w.settings)
    conn: psycopg.AsyncConnection[Any]
    async with w.sessions.service.connection() as conn:
        copy = await elsewhere.get(conn, join)
        assert copy is not None
        assert copy is not ctx
        await w.checkpointer.record(
            conn, copy, ta, copy.index[ta.node_id], Outcome.success(rowset(v=ta.node_id))
        )
    return [(ctx, tb), (ctx_c, tc)]


def test_a_stale_instance_in_a_set_is_computed_again_and_written_with_the_rest(db):
    """One branch of a JOIN checkpointed behind the set's back (a second cache, as another
    worker): the set's checkpoint of the other branch is stale, is computed again under the
    runs lock the call took, and the JOIN completes with both values; the other instance in
    the set is written by the same flush."""
    role = db.create_role("cs")
    join = start(db, role, "df.sql('select 1 as a') & df.sql('select 2 as b')")
    other = start(db, role, "df.sql('select 3 as c')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            pairs = await _stale_pair(w, join, other)
            ctx = pairs[0][0]
            batch = CheckpointSet()
            conn: psycopg.AsyncConnection[Any]
            async with w.sessions.service.connection() as conn, conn.transaction():
                await _stage_all(w, conn, pairs, batch)
                await w.checkpointer.flush(conn, batch)
            assert ctx.dead  # the stale copy was dropped for a reloaded one

    asyncio.run(go())
    for iid in (join, other):
        assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    result = json.loads(one(db, "select df.result(%s)", (join,)))
    leaves = rows(
        db, "select id from df.nodes where instance_id = %s and node_type = 'SQL'", (join,)
    )
    assert sorted(values(result)) == sorted(r[0] for r in leaves)


def test_a_fenced_checkpoint_in_a_set_raises_and_its_transaction_writes_nothing(db):
    role = db.create_role("cs")
    mine = start(db, role, "df.sql('select 1 as a')")
    theirs = start(db, role, "df.sql('select 2 as b')")

    async def go() -> None:
        async with worker(db) as a, worker(db) as b:
            await started(a)
            tasks = await a.producer.claim(8)
            batch = CheckpointSet()

            async def write() -> None:
                async with b.sessions.service.connection() as conn, conn.transaction():
                    for t in tasks:
                        ctx = await ctx_of(b, t.instance_id)  # b never leased them
                        await b.checkpointer.record(
                            conn,
                            ctx,
                            t,
                            ctx.index[t.node_id],
                            Outcome.success(rowset(a=1)),
                            in_tx=True,
                            lock_held=True,
                            batch=batch,
                        )
                    await b.checkpointer.flush(conn, batch)

            with pytest.raises(Fenced):
                await write()
            for iid in (mine, theirs):
                assert one(db, "select status from df.instances where id = %s", (iid,)) == (
                    "running"
                )
                assert rows(
                    db, "select lease_owner from pgdurable.tasks where instance_id = %s", (iid,)
                ) == [(a.worker_id,)]

    asyncio.run(go())


def test_what_folds_into_one_element_and_what_waits_for_the_next_round(db):
    role = db.create_role("cs")
    iid = start(db, role, JOIN3)

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            t1, t2, t3 = await w.producer.claim(8)
            ctx = await ctx_of(w, iid)

            def cp(nodes: dict[str, dict[str, Any]], **kw: Any) -> Checkpoint:
                c = Checkpoint(**kw)
                for nid, upd in nodes.items():
                    c.node(nid).update(upd)
                return c

            run = Run(ctx, ctx.version)
            # details fold into details; a later status folds unless the earlier update
            # finished the node (its duration_ms); details after a status do not fold
            assert run.folds(t1, cp({t1.node_id: {"status": "completed"}}))
            run.nodes["x"] = {"id": "x", "details": {"a": 1}}
            assert run.folds(t2, cp({"x": {"details": {"b": 2}}}))
            assert run.folds(t2, cp({"x": {"status": "completed", "details": {}}}))
            run.nodes["y"] = {"id": "y", "status": "running", "details": {}}
            assert not run.folds(t2, cp({"y": {"details": {"b": 2}}}))
            assert run.folds(t2, cp({"y": {"status": "completed", "details": {}}}))
            run.nodes["y"]["status"] = "completed"
            assert not run.folds(t2, cp({"y": {"status": "running", "details": {}}}))
            run.nodes["y"]["status"] = "failed"
            assert not run.folds(t2, cp({"y": {"status": "completed", "details": {}}}))
            del run.nodes["y"]
            # a successor inserted by the run, then dropped or inserted again: not folded
            run.tasks["z"] = {"node_id": "z"}
            assert not run.folds(t2, cp({}, drop_tasks=["z"]))
            assert not run.folds(t2, cp({}, new_tasks=[{"node_id": "z"}]))
            assert run.folds(t3, cp({}, new_tasks=[{"node_id": "w"}]))
            # after a terminal status nothing folds
            run.status = "completed"
            assert not run.folds(t3, cp({}))

            # staged: a conflicting checkpoint starts a second round, written after the first
            batch = CheckpointSet()
            w.checkpointer.stage(batch, ctx, t1, cp({}), None, None, True)
            w.checkpointer.stage(
                batch, ctx, t2, cp({t1.node_id: {"status": "completed"}}), None, None, True
            )
            w.checkpointer.stage(
                batch, ctx, t3, cp({t1.node_id: {"status": "completed"}}), None, None, True
            )
            assert [len(r.entries) for r in batch.rounds[iid]] == [2, 1]
            first = batch.take_round()
            assert [r.expected for r in first] == [ctx.version - 3]
            assert [r.expected for r in batch.rounds[iid]] == [ctx.version - 1]

    asyncio.run(go())


def test_a_node_activated_then_finished_folds_to_what_two_writes_leave(db):
    """A node updated twice by one instance's checkpoints in one set (a chained step:
    activated running, then completed) folds into one update; the row it leaves is the row
    two writes in order leave: status, result, details, duration_ms."""
    role = db.create_role("cs")
    folded = start(db, role, JOIN3)
    ordered = start(db, role, JOIN3)

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            tasks = await w.producer.claim(8)
            by = {iid: [t for t in tasks if t.instance_id == iid] for iid in (folded, ordered)}

            def updates(ctx: Any) -> tuple[str, Checkpoint, Checkpoint]:
                # the JOIN itself (a node no fence task of these checkpoints names)
                node = ctx.graph.node_ids[0]
                first, second = Checkpoint(), Checkpoint()
                first.node(node).update(
                    status="running",
                    details={
                        "started_at": "2026-12-06T00:00:00+00:00",
                        "finished_at": None,
                        "duration_ms": None,
                        "gen": 2,
                    },
                )
                second.node(node).update(
                    status="completed",
                    result={"rows": [{"v": 1}], "row_count": 1},
                    details={
                        "started_at": "2026-12-06T00:00:01.5+00:00",
                        "finished_at": "2026-12-06T00:00:02.25+00:00",
                    },
                )
                return node, first, second

            conn: psycopg.AsyncConnection[Any]
            ctx = await ctx_of(w, folded)
            node, first, second = updates(ctx)
            batch = CheckpointSet()
            async with w.sessions.service.connection() as conn, conn.transaction():
                w.checkpointer.stage(batch, ctx, by[folded][0], first, None, None, True)
                w.checkpointer.stage(batch, ctx, by[folded][1], second, None, None, True)
                assert [len(r.entries) for r in batch.rounds[folded]] == [2]  # one update
                await w.checkpointer.flush(conn, batch)
            nodes = {folded: node}
            ctx = await ctx_of(w, ordered)
            nodes[ordered], first, second = updates(ctx)
            for t, c in ((by[ordered][0], first), (by[ordered][1], second)):
                batch = CheckpointSet()
                async with w.sessions.service.connection() as conn, conn.transaction():
                    w.checkpointer.stage(batch, ctx, t, c, None, None, True)
                    await w.checkpointer.flush(conn, batch)

            def row(iid: str) -> tuple[Any, ...]:
                [got] = rows(
                    db,
                    # (the instance's own: its id, its start's time)
                    "select status, result, status_details - 'execution_id' - 'queued_at' "
                    "from df.nodes where instance_id = %s and id = %s",
                    (iid, nodes[iid]),
                )
                return got

            assert row(folded) == row(ordered)
            status, result, details = row(folded)
            assert (status, result["row_count"]) == ("completed", 1)
            assert details["duration_ms"] == 750
            assert details["gen"] == 2

    asyncio.run(go())


def test_a_lease_extended_after_the_checkpoint_was_staged_is_still_ours(db):
    """The heartbeat extends the leases of running steps at any time (a new row version of
    each task): a set flushed after it finds its fences still ours."""
    role = db.create_role("cs")
    iid = start(db, role, JOIN3)

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            tasks = await w.producer.claim(8)
            ctx = await ctx_of(w, iid)
            batch = CheckpointSet()
            conn: psycopg.AsyncConnection[Any]
            async with w.sessions.service.connection() as conn, conn.transaction():
                for t in tasks:
                    await w.checkpointer.record(
                        conn,
                        ctx,
                        t,
                        ctx.index[t.node_id],
                        Outcome.success(rowset(v=t.node_id)),
                        in_tx=True,
                        lock_held=True,
                        batch=batch,
                    )
                async with w.sessions.service.connection() as other:
                    await other.execute(
                        "select pgdurable._extend_v1(%s, 300, %s, %s)",
                        (w.worker_id, [t.instance_id for t in tasks], [t.node_id for t in tasks]),
                    )
                await w.checkpointer.flush(conn, batch)

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"


def test_the_group_commit_writes_its_checkpoints_as_a_set_and_fences_one_alone(db):
    """Outcomes of several instances, and two branches of one JOIN, submitted together: one
    group commit writes them with one call; an outcome whose task is no longer ours (rescued
    and taken by another worker) fails alone and its neighbours commit."""
    role = db.create_role("cs")
    join = start(db, role, "df.sql('select 1 as a') & df.sql('select 2 as b')")
    plain = [start(db, role, "df.sql('select 3 as c') ~> df.sql('select 4')") for _ in range(3)]

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            tasks = await w.producer.claim(10)
            lost = next(t for t in tasks if t.instance_id == plain[0])
            # its lease went to someone else meanwhile
            with psycopg.connect(db.service_dsn, autocommit=True) as c:
                c.execute(
                    "update pgdurable.tasks set lease_owner = 'someone else' "
                    "where instance_id = %s and node_id = %s",
                    (lost.instance_id, lost.node_id),
                )
            ctxs = {t.instance_id: await ctx_of(w, t.instance_id) for t in tasks}
            batches = w.completer.batches
            got = await asyncio.gather(
                *(
                    w.checkpointer.submit(
                        ctxs[t.instance_id],
                        t,
                        ctxs[t.instance_id].index[t.node_id],
                        Outcome.success(rowset(v=t.node_id)),
                    )
                    for t in tasks
                ),
                return_exceptions=True,
            )
            outcome = {t.node_id: g for t, g in zip(tasks, got, strict=True)}
            assert isinstance(outcome[lost.node_id], Fenced)
            assert all(g is None for n, g in outcome.items() if n != lost.node_id), outcome
            assert w.completer.batches - batches <= 2  # shared commits

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (join,)) == "completed"
    assert rows(
        db,
        "select count(*) from df.nodes where instance_id = any(%s) and status = 'completed' "
        "and node_type = 'SQL'",
        (plain[1:],),
    ) == [(2,)]
    assert rows(
        db,
        "select status, lease_owner from df.nodes n join pgdurable.tasks t "
        "on t.instance_id = n.instance_id and t.node_id = n.id where n.instance_id = %s",
        (plain[0],),
    ) == [("running", "someone else")]


def test_a_race_won_in_a_set_drops_the_losers_task(db):
    role = db.create_role("cs")
    # a step after the race: the instance goes on, so only the drop deletes the loser's task
    iid = start(
        db, role, "df.race(df.sql('select 1 as a'), df.sql('select 2 as b')) ~> df.sql('select 3')"
    )

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            win, lose = await w.producer.claim(8)
            ctx = await ctx_of(w, iid)
            batch = CheckpointSet()
            conn: psycopg.AsyncConnection[Any]
            async with w.sessions.service.connection() as conn, conn.transaction():
                await w.checkpointer.record(
                    conn,
                    ctx,
                    win,
                    ctx.index[win.node_id],
                    Outcome.success(rowset(v=win.node_id)),
                    in_tx=True,
                    lock_held=True,
                    batch=batch,
                )
                assert batch.rounds[iid][0].drops == [lose.node_id]
                await w.checkpointer.flush(conn, batch)
            left = rows(db, "select node_id from pgdurable.tasks where instance_id = %s", (iid,))
            assert [n for (n,) in left] == [t.node_id for t in win.handoff]
            assert lose.node_id not in [n for (n,) in left]

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "running"


async def _stage_all(w: Any, conn: Any, pairs: list[tuple[Any, Any]], batch: CheckpointSet) -> None:
    for c, t in pairs:
        await w.checkpointer.record(
            conn,
            c,
            t,
            c.index[t.node_id],
            Outcome.success(rowset(v=t.node_id)),
            in_tx=True,
            lock_held=True,
            batch=batch,
        )


def test_a_step_connection_writes_and_commits_a_set_in_one_round_trip(db):
    """flush_commit: on a step connection, the checkpoint call and the COMMIT (with the session
    reset) go in one pipeline when every checkpoint is written: the set is empty, the rows
    are committed, and the session is reset (what the transaction set is gone)."""
    role = db.create_role("cs")
    iids = [start(db, role, f"df.sql('select {k} as v')") for k in range(3)]

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            tasks = await w.producer.claim(8)
            pairs = [(await ctx_of(w, t.instance_id), t) for t in tasks]
            batch = CheckpointSet()
            async with w.sessions.steps.connection() as conn:
                await wire.simple(conn, b"begin; set application_name = 'dirty'")
                await _stage_all(w, conn, pairs, batch)
                assert await w.checkpointer.flush_commit(
                    conn, batch, w.sessions.commit_reset_commands()
                )
                assert not batch
                # committed and reset: outside any transaction, the session's own default back
                res = await wire.results(
                    conn, [(b"select current_setting('application_name')", ())]
                )
                assert wire.value(conn, res[0], 0) != "dirty"
                assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE

    asyncio.run(go())
    for iid in iids:
        assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"


def test_a_set_not_all_written_rolls_back_to_its_savepoint_and_takes_the_usual_path(db):
    """A stale instance in the set (checkpointed behind its back, as by another worker):
    _all_written_v1 raises, so the COMMIT sent with the call does not run; flush_commit rolls
    back to the savepoint before the call and says so, and the usual flush and COMMIT then
    write both instances, the stale one computed again."""
    role = db.create_role("cs")
    join = start(db, role, "df.sql('select 1 as a') & df.sql('select 2 as b')")
    other = start(db, role, "df.sql('select 3 as c')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            pairs = await _stale_pair(w, join, other)
            ctx = pairs[0][0]
            batch = CheckpointSet()
            async with w.sessions.steps.connection() as conn:
                await wire.simple(conn, b"begin")
                await _stage_all(w, conn, pairs, batch)
                assert not await w.checkpointer.flush_commit(
                    conn, batch, w.sessions.commit_reset_commands()
                )
                # nothing written, still in the transaction, the set untouched
                assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS
                assert batch.has(join)
                assert batch.has(other)
                assert one(db, "select status from df.instances where id = %s", (other,)) == (
                    "running"
                )
                await w.checkpointer.flush(conn, batch)
                await wire.simple(conn, w.sessions.commit_reset)
            assert ctx.dead  # the stale copy was dropped for a reloaded one

    asyncio.run(go())
    for iid in (join, other):
        assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
