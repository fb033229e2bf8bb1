"""Batches of SQL steps (pgdurable/worker/batch.py) in-process against a real database: N
queued steps of one role run in few transactions, each statement with its checkpoint; a
statement that fails rolls its batch back and every step then runs on its own, exactly once;
a batch of one records its statement's failure as the step's outcome."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from .inproc import ctx_of, one, rows, start, started, worker

pytestmark = pytest.mark.timeout(60)

N = 12


@pytest.fixture
def tenant(db: Any) -> str:
    role = db.create_role("ba")
    with db.connect() as conn:
        conn.execute("create table public.hits (k int primary key)")
        conn.execute("create table public.bad (k int)")
        conn.execute(f'grant insert, select on public.hits to "{role}"')
        conn.execute(f'grant select on public.bad to "{role}"')
    return role


def test_n_statements_run_in_few_transactions_each_checkpointed(db, tenant):
    iids = [
        start(
            db,
            tenant,
            f"df.sql('insert into public.hits values ({k}) "
            "returning k, pg_catalog.txid_current() as tx')",
        )
        for k in range(N)
    ]

    async def go() -> None:
        async with worker(db, slots=N) as w:
            await started(w)
            tasks = await w.producer.claim(N)
            assert len(tasks) == N
            ctxs = [await ctx_of(w, t.instance_id) for t in tasks]
            await asyncio.gather(
                *(
                    w.batch.submit(c, t, c.index[t.node_id], c.configs[c.index[t.node_id]])
                    for c, t in zip(ctxs, tasks, strict=True)
                )
            )

    asyncio.run(go())
    # every statement ran once, and committed with its checkpoint
    assert rows(db, "select count(*), count(distinct k) from public.hits") == [(N, N)]
    txs = set()
    for k, iid in enumerate(iids):
        assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
        [row] = json.loads(one(db, "select df.result(%s)", (iid,)))["rows"]
        assert row["k"] == k
        txs.add(row["tx"])
    # batched: the steps shared transactions (a runner's), not one each
    assert len(txs) < N


def test_a_failing_statement_rolls_its_batch_back_and_each_step_runs_alone(db, tenant):
    iids = [
        start(
            db,
            tenant,
            f"df.sql('insert into public.hits values ({k}) returning k, "
            f"1 / (1 - (select count(*)::int from public.bad where bad.k = {k})) as one')",
        )
        for k in range(N)
    ]
    # the step of the highest instance id fails: a batch visits instances in ascending
    # order, so it is the last of its batch, after others ran in the same transaction
    bad = iids.index(max(iids))
    with db.connect() as conn:
        conn.execute("insert into public.bad values (%s)", (bad,))

    async def go() -> None:
        async with worker(db, slots=N) as w:
            await started(w)
            tasks = await w.producer.claim(N)
            # the whole path of a step: batch, Retry when its batch rolled back, alone
            await asyncio.gather(*(w.dispatch.handle(t) for t in tasks))

    asyncio.run(go())
    # exactly once, whatever batch a step was rolled back with
    assert rows(db, "select count(*), count(distinct k) from public.hits") == [(N - 1, N - 1)]
    for k, iid in enumerate(iids):
        status = one(db, "select status from df.instances where id = %s", (iid,))
        assert status == ("failed" if k == bad else "completed"), k
    error = one(db, "select df.error(%s)", (iids[bad],))
    assert error["sqlstate"] == "22012"
    assert "division by zero" in error["error"]


def test_a_batch_of_one_records_its_statement_failure(db, tenant):
    iid = start(db, tenant, "df.sql('insert into public.hits values (1), (1)')")

    async def go() -> None:
        async with worker(db) as w:
            await started(w)
            [t] = await w.producer.claim(4)
            ctx = await ctx_of(w, iid)
            idx = ctx.index[t.node_id]
            await w.batch.submit(ctx, t, idx, ctx.configs[idx])  # no exception: recorded

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "failed"
    assert one(db, "select df.error(%s)", (iid,))["sqlstate"] == "23505"
    assert one(db, "select count(*) from public.hits") == 0
