"""Chained SQL steps (pgdurable/worker/chain.py, ``BatchRunner.run_batch``) in-process against a
real database: a sequence runs in one batch transaction; a chained step that fails rolls back
to its savepoint and its failure is recorded in place (its predecessors' effects commit once,
no statement runs twice); what a chained step sets for its session ends before the next; a
chained step whose result, or the checkpoint it makes, is refused fails alone; an instance
with a step still running elsewhere is not chained."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from .inproc import one, rows, start, worker

pytestmark = pytest.mark.timeout(60)


def table(db: Any, role: str) -> None:
    """public.hits (text) and the sequence public.runs, writable by ``role``."""
    with db.connect() as conn:
        conn.execute("create table if not exists public.hits (v text)")
        conn.execute("create sequence if not exists public.runs")
        conn.execute(f'grant all on public.hits, public.runs to "{role}"')


async def run_all(w: Any) -> None:
    """Claim and handle tasks until none is left (hand-offs included)."""
    for _ in range(20):
        tasks = await w.producer.claim(8)
        if not tasks:
            return
        for t in tasks:
            await w.dispatch.handle(t)
            for h in t.handoff:
                await w.dispatch.handle(h)


def test_a_failing_chained_step_fails_alone_and_nothing_runs_twice(db):
    role = db.create_role("ch")
    table(db, role)
    iid = start(
        db,
        role,
        "'insert into public.hits select ''a'' || nextval(''public.runs'')' ~> "
        "'insert into public.hits values (''b'')' ~> "
        "'with x as (insert into public.hits values (''c'') returning 1) "
        "select nextval(''public.runs'') / 0 from x'",
    )

    async def go() -> None:
        async with worker(db) as w:
            await run_all(w)

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "failed"
    # a and b committed once; c's insert rolled back with its failure; each statement ran once
    assert sorted(v for (v,) in rows(db, "select v from public.hits")) == ["a1", "b"]
    assert one(db, "select last_value from public.runs") == 2  # a once, c once
    err = one(db, "select df.error(%s)", (iid,))
    assert err["sqlstate"] == "22012"
    got = {
        q: s
        for q, s in rows(
            db, "select query, status from df.nodes where instance_id = %s and query <> ''", (iid,)
        )
    }
    assert sorted(got.values()) == ["completed", "completed", "failed"]
    assert rows(db, "select * from pgdurable.tasks where instance_id = %s", (iid,)) == []


def test_a_chained_step_starts_with_a_clean_session(db):
    """What one step sets for its session (search_path, a GUC) ends before the next step,
    chained or not."""
    role = db.create_role("ch")
    iid = start(
        db,
        role,
        "'select set_config(''search_path'', ''pg_temp'', false), "
        "set_config(''work_mem'', ''7MB'', false)' ~> "
        "'select current_setting(''search_path'') as sp, current_setting(''work_mem'') as wm'",
    )

    async def go() -> None:
        async with worker(db) as w:
            await run_all(w)

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    [row] = json.loads(one(db, "select df.result(%s)", (iid,)))["rows"]
    assert row["wm"] != "7MB"
    assert row["sp"] != "pg_temp"


def test_a_chained_result_over_the_cap_fails_that_step_only(db):
    role = db.create_role("ch")
    table(db, role)
    iid = start(
        db,
        role,
        "'insert into public.hits values (''first'')' ~> 'select repeat(''x'', 5000) as big'",
    )

    async def go() -> None:
        async with worker(db, result_max_bytes=1000) as w:
            await run_all(w)

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "failed"
    assert rows(db, "select v from public.hits") == [("first",)]
    assert "over the limit" in one(db, "select df.error(%s)", (iid,))["error"]


def test_a_chained_step_over_the_instances_cap_fails_alone(db):
    """A later step whose checkpoint, computed right after its statement (a step followed by
    another is), would put its instance over pg_durable.max_instance_bytes fails alone: its
    statement rolls back to its savepoint (pgdurable/worker/in_place.py, ``refused``) and
    the step before it commits once."""
    from psycopg import sql

    role = db.create_role("ch")
    table(db, role)
    with db.connect() as conn:
        conn.execute(
            sql.SQL("alter database {} set pg_durable.max_instance_bytes = 3000").format(
                sql.Identifier(db.name)
            )
        )
    iid = start(
        db,
        role,
        "'insert into public.hits select ''a'' || nextval(''public.runs'')' ~> "
        "'with x as (insert into public.hits values (''b'') returning 1) "
        "select repeat(''x'', 5000) as big, nextval(''public.runs'') as n from x' ~> "
        "'insert into public.hits values (''c'')'",
    )

    async def go() -> None:
        async with worker(db) as w:
            await run_all(w)

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "failed"
    # a committed once; b's insert rolled back with its refusal; c never ran
    assert rows(db, "select v from public.hits") == [("a1",)]
    assert one(db, "select last_value from public.runs") == 2  # a once, b once
    err = one(db, "select df.error(%s)", (iid,))["error"]
    assert "over the limit of 3000 bytes per instance" in err, err


def test_the_roles_own_settings_hold_for_every_step_of_a_batch(db):
    """A batch reads the role's settings once (step_settings) and applies them again before
    each further step (step_next), after the RESET ALL that ends what a step set."""
    role = db.create_role("ch")
    with db.connect() as conn:
        conn.execute(f"alter role \"{role}\" set work_mem = '3MB'")
        conn.execute(f"alter role \"{role}\" set lock_timeout = '4s'")
    iid = start(
        db,
        role,
        "'select set_config(''work_mem'', ''9MB'', false) as a' ~> "
        "'select current_setting(''work_mem'') as wm, current_setting(''lock_timeout'') as lt, "
        "current_setting(''df.in_workflow'') as wf' |=> 'two' ~> "
        "'select set_config(''lock_timeout'', ''1s'', false) as b' ~> "
        "'select current_setting(''lock_timeout'') as lt'",
    )

    async def go() -> None:
        async with worker(db) as w:
            await run_all(w)

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    assert json.loads(one(db, "select df.result(%s)", (iid,)))["rows"] == [{"lt": "4s"}]
    [two] = [
        r
        for (r,) in rows(
            db,
            "select result from df.nodes where instance_id = %s and query like %s",
            (iid, "%wm%"),
        )
    ]
    assert two["rows"] == [{"wm": "3MB", "lt": "4s", "wf": "true"}]


def test_a_long_chained_step_lets_the_steps_before_it_commit(db):
    """A chained step still running after CHAIN_STEP_MAX_MS is stopped, rolled back to its
    savepoint and handed off: the step before it commits (and shows completed) while it runs
    again on its own, shown running; its first, stopped run left nothing."""
    role = db.create_role("ch")
    table(db, role)
    iid = start(
        db,
        role,
        "'insert into public.hits values (''first'')' ~> "
        "'insert into public.hits select ''slow'' || nextval(''public.runs'') "
        "from pg_sleep(0.6)'",
    )
    seen: list[tuple[Any, ...]] = []

    async def watch() -> None:
        while True:
            await asyncio.sleep(0.05)
            got = rows(
                db,
                "select (select array_agg(v order by v) from public.hits), "
                "(select array_agg(status order by query) from df.nodes "
                "where instance_id = %s and node_type = 'SQL')",
                (iid,),
            )
            seen.append(got[0])

    async def go() -> None:
        async with worker(db) as w:
            spy = asyncio.create_task(watch())
            try:
                await run_all(w)
            finally:
                spy.cancel()

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    # one row of each: the slow step's first run (stopped after 100 ms) rolled back
    got = sorted(v for (v,) in rows(db, "select v from public.hits"))
    assert len(got) == 2
    assert got[0] == "first"
    assert got[1].startswith("slow")
    # while the slow step ran on its own, the first had committed and it showed running
    # (node statuses by query text: the slow step's sorts first)
    assert (["first"], ["running", "completed"]) in seen, sorted(set(map(str, seen)))


@pytest.mark.parametrize(
    "graph",
    [
        # the slow step is a batch's later step (two branches, one batch)
        "df.sql('select 1 as a') & df.sql('select pg_sleep(2) as b')",
        # the slow step is chained (stopped at the chain's bound, then run on its own)
        "'select 1 as a' ~> 'select 2 as b' ~> 'select pg_sleep(2) as c'",
    ],
)
def test_the_roles_statement_timeout_holds_for_every_step_of_a_batch(db, graph, monkeypatch):
    """The limit is armed when a statement begins: a batch's later step (one statement that
    applies the settings and runs the step) must find it set by the statement before."""
    monkeypatch.setattr("pgdurable.worker.batch.BATCH_RUNNERS", 1)  # the branches: one batch
    role = db.create_role("ch")
    with db.connect() as conn:
        conn.execute(f"alter role \"{role}\" set statement_timeout = '300ms'")
    iid = start(db, role, graph)

    async def go() -> None:
        async with worker(db) as w:
            t0 = time.monotonic()
            await run_all(w)
            assert time.monotonic() - t0 < 1.8

    asyncio.run(go())
    assert one(db, "select status from df.instances where id = %s", (iid,)) == "failed"
    assert one(db, "select df.error(%s)", (iid,))["sqlstate"] == "57014"
