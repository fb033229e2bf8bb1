"""The producer (pgdurable/worker/producer.py) in-process against a real database: it claims
only tasks that are due and unleased, never more than its free slots, and claims again as
slots free up; a finished step's leased successors are launched after it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pgdurable.worker.task import Task

from .inproc import one, rows, start, started, until, worker

pytestmark = pytest.mark.timeout(60)


def test_only_due_unleased_tasks_are_claimed(db):
    role = db.create_role("pr")
    later = start(db, role, "df.sleep(3600)")
    now = start(db, role, "df.sql('select 1')")

    async def go() -> None:
        async with worker(db) as w, worker(db) as other:
            for x in (w, other):
                x.checkpointer.budget = lambda: (-1, 0)  # successors are not leased at once
            # the two start tasks are due; the other worker takes one of them first
            [first] = await other.producer.claim(1)
            claimed = await w.producer.claim(10)
            assert [t.instance_id for t in claimed] == [
                i for i in (later, now) if i != first.instance_id
            ]
            await other.dispatch.start_instance(first)
            for t in claimed:
                await w.dispatch.start_instance(t)
            # the sleep is due in an hour: never claimed; the SQL step is
            got = (await w.producer.claim(10)) + (await other.producer.claim(10))
            assert [(t.instance_id, t.kind) for t in got] == [(now, "run")]
            assert got[0].attempts == 1
            assert await w.producer.claim(10) == []  # leased now

    asyncio.run(go())
    assert one(
        db, "select lease_owner is null from pgdurable.tasks where instance_id = %s", (later,)
    )


def test_the_producer_never_runs_more_steps_than_its_slots(db):
    role = db.create_role("pr")
    iids = [start(db, role, "df.sql('select 1')") for _ in range(5)]

    async def go() -> None:
        async with worker(db, slots=2) as w:
            gate = asyncio.Event()
            handled: list[Task] = []

            async def handle(task: Task) -> None:
                handled.append(task)
                await gate.wait()
                await w.dispatch.release(task)

            w.producer.handle = handle
            run = asyncio.create_task(w.producer.run())
            try:
                await until(lambda: len(handled) >= 2)
                await asyncio.sleep(0.5)  # several polls: still no third claim
                assert len(handled) == 2
                assert len(w.slots.inflight) == 2
                leased = rows(
                    db,
                    "select count(*) from pgdurable.tasks where lease_owner = %s",
                    (w.worker_id,),
                )
                assert leased == [(2,)]
                gate.set()  # the two finish: the rest are claimed, two at a time
                await until(lambda: len({t.instance_id for t in handled}) == 5)
                assert {t.instance_id for t in handled} == set(iids)
            finally:
                w.stopping.set()
                w.wake.set()
                await asyncio.wait_for(run, 5)

    asyncio.run(go())


def test_leased_successors_run_after_their_step(db, monkeypatch):
    """A step's checkpoint leases its successor to this worker (the handoff); the producer
    launches it once the step has left its slot, without claiming it. (Batches of one: a
    larger batch runs the successor itself, chained, pgdurable/worker/chain.py.)"""
    monkeypatch.setattr("pgdurable.worker.batch.BATCH_MAX", 1)
    role = db.create_role("pr")
    iid = start(db, role, "df.sql('select 1 as a') ~> df.sql('select 2 as b')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            order: list[str] = []
            real = w.dispatch.handle

            async def handle(task: Task) -> None:
                order.append(task.node_id)
                await real(task)

            w.producer.handle = handle
            [t1] = await w.producer.claim(4)
            w.producer.launch(t1)
            await until(lambda: len(order) >= 2 and not w.slots.inflight)
            assert order[0] == t1.node_id
            assert len(order) == 2
            assert await w.producer.claim(4) == []  # the successor was never claimable

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    result: Any = one(db, "select df.result(%s)", (iid,))
    assert '"b": 2' in result
