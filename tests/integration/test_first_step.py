"""A first SQL step run with its instance's start (pgdurable/worker/dispatch.py,
``Dispatch._start_with_first_step``; ``Checkpointer.record_start``) in-process against a real
database: a one-step workflow is one checkpoint; a chain's first step hands its successor on;
a long first step shows as running before it ends; a failing one is recorded after a start of
its own; a worker with no slot to spare starts the instance only."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from .inproc import one, rows, start, started, until, worker

pytestmark = pytest.mark.timeout(60)


def version_of(db: Any, iid: str) -> int:
    return int(one(db, "select state_version from pgdurable.runs where instance_id = %s", (iid,)))


def nodes_of(db: Any, iid: str) -> dict[str, tuple[Any, Any]]:
    got = rows(db, "select query, status, result from df.nodes where instance_id = %s", (iid,))
    return {q: (s, r) for q, s, r in got if q}


async def start_claimed(w: Any) -> list[Any]:
    tasks = await w.producer.claim(8)
    assert tasks
    assert all(t.kind == "start" for t in tasks)
    for t in tasks:
        await w.dispatch.handle(t)
    return tasks


@pytest.fixture
def unhurried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first step is not made visible on its own after 50 ms (FIRST_STEP_VISIBLE_S, tested
    below): on a loaded machine a quick statement may take that long, and these tests count
    checkpoints."""
    monkeypatch.setattr("pgdurable.worker.batch.FIRST_STEP_VISIBLE_S", 10.0)


@pytest.mark.usefixtures("unhurried")
def test_a_one_step_workflow_is_one_checkpoint(db):
    role = db.create_role("fs")
    iid = start(db, role, "df.sql('select 7 as a')")

    async def go() -> None:
        async with worker(db) as w:
            await start_claimed(w)

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    assert json.loads(one(db, "select df.result(%s)", (iid,)))["rows"] == [{"a": 7}]
    # the start and the step: one _apply_v1, one new state version (two before)
    assert version_of(db, iid) == 1
    assert rows(db, "select * from pgdurable.tasks where instance_id = %s", (iid,)) == []


@pytest.mark.usefixtures("unhurried")
def test_a_chain_runs_in_one_transaction(db):
    """A sequence of SQL steps runs in its first step's batch (pgdurable/worker/chain.py):
    one transaction, nothing handed off, no task written for the later steps."""
    role = db.create_role("fs")
    iid = start(db, role, "'select 1 as a' ~> 'select 2 as b' |=> 'b' ~> 'select $b.b + 1 as c'")

    async def go() -> None:
        async with worker(db) as w:
            [t] = await start_claimed(w)
            assert t.handoff_ready
            assert t.handoff == []

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    assert json.loads(one(db, "select df.result(%s)", (iid,)))["rows"] == [{"c": 3}]
    # the start with the first step, then two chained steps: three checkpoints, one write
    assert version_of(db, iid) == 3
    got = nodes_of(db, iid)
    assert {s for s, _ in got.values()} == {"completed"}
    assert rows(db, "select * from pgdurable.tasks where instance_id = %s", (iid,)) == []
    [(chained,)] = rows(
        db,
        "select status_details from df.nodes where instance_id = %s and query = %s",
        (iid, "select $b.b + 1 as c"),
    )
    assert chained["duration_ms"] is not None
    assert chained["finished_at"] is not None


@pytest.mark.usefixtures("unhurried")
def test_a_chain_cut_by_the_batch_bounds_hands_its_next_step_on(db, monkeypatch):
    monkeypatch.setattr("pgdurable.worker.batch.BATCH_MAX", 1)
    role = db.create_role("fs")
    iid = start(db, role, "'select 1 as a' ~> 'select 2 as b'")

    async def go() -> None:
        async with worker(db) as w:
            [t] = await start_claimed(w)
            assert t.handoff_ready
            assert [h.kind for h in t.handoff] == ["run"]
            assert version_of(db, iid) == 1
            got = nodes_of(db, iid)
            assert got["select 1 as a"][0] == "completed"
            assert got["select 2 as b"][0] == "running"
            # the second step is leased to this worker, which runs it as a hand-off
            for h in t.handoff:
                await w.dispatch.handle(h)

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    assert json.loads(one(db, "select df.result(%s)", (iid,)))["rows"] == [{"b": 2}]


def test_a_long_first_step_shows_running_before_it_ends(db):
    role = db.create_role("fs")
    iid = start(db, role, "df.sql('select 3 as a from pg_sleep(1)')")
    seen: list[tuple[Any, ...]] = []

    async def go() -> None:
        async with worker(db) as w:
            [t] = await w.producer.claim(8)
            run = asyncio.create_task(w.dispatch.handle(t))

            def visible() -> bool:
                seen[:] = rows(
                    db,
                    "select i.status, n.status from df.instances i "
                    "join df.nodes n on n.instance_id = i.id and n.query like 'select 3%%' "
                    "where i.id = %s",
                    (iid,),
                )
                return seen == [("running", "running")]

            await until(visible, 0.8)
            assert not run.done()
            await run

    asyncio.run(go())
    assert seen == [("running", "running")]
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    # its start committed on its own, then the step: two checkpoints
    assert version_of(db, iid) == 2


def test_a_failing_first_step_fails_its_started_instance(db):
    role = db.create_role("fs")
    iid = start(db, role, "df.sql('select 1/0')")

    async def go() -> None:
        async with worker(db) as w:
            [t] = await start_claimed(w)
            # rolled back with its statement: the instance started the usual way, and its
            # step (handed on, leased to us) runs again, as any step, which records why
            assert one(db, "select status from df.instances where id = %s", (iid,)) == "running"
            assert [h.kind for h in t.handoff] == ["run"]
            for h in t.handoff:
                await w.dispatch.handle(h)

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "failed"
    assert "division by zero" in one(db, "select df.error(%s)", (iid,))["error"]


def test_a_worker_without_a_free_slot_only_starts_the_instance(db):
    role = db.create_role("fs")
    iid = start(db, role, "df.sql('select 1 as a')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)  # no successor taken: the step is not run with the start

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "running"
    assert rows(
        db, "select kind, lease_owner from pgdurable.tasks where instance_id = %s", (iid,)
    ) == [("run", None)]
