"""Chained SQL steps (pgdurable/worker/chain.py, ``BatchRunner.run_batch``) in-process against a
real database: a sequence runs in one batch transaction; a chained step that fails rolls back
to its savepoint and its failure is recorded in place (its predecessors' effects commit once,
no statement runs twice); what a chained step sets for its session ends before the next; a
chained step whose result is refused fails alone; an instance with a step still running
elsewhere is not chained."""

from __future__ import annotations

import asyncio
import json
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
