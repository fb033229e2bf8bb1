"""Batches of SQL steps (pgdurable/worker/batch.py) in-process against a real database: N
queued steps of one role run in few transactions, each statement with its checkpoint; a later
step whose statement fails, or whose result is over the cap, fails on its own (rolled back to
its savepoint: pgdurable/worker/in_place.py) while the steps before it run once and commit;
a batch of one records its statement's failure as the step's outcome."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from pgdurable.worker import wave, wire

from .inproc import ctx_of, one, rows, start, started, worker

pytestmark = pytest.mark.timeout(60)

N = 12


@pytest.fixture
def tenant(db: Any) -> str:
    role = db.create_role("ba")
    with db.connect() as conn:
        conn.execute("create table public.hits (k int primary key)")
        conn.execute("create table public.bad (k int)")
        conn.execute("create sequence public.runs")
        conn.execute(f'grant insert, select on public.hits to "{role}"')
        conn.execute(f'grant select on public.bad to "{role}"')
        conn.execute(f'grant usage, update on sequence public.runs to "{role}"')
    return role


def counted_starts(db: Any, tenant: str, column: Callable[[int], str]) -> list[str]:
    """N instances, k = 0..N-1, each one statement that inserts k into public.hits and counts
    its run (public.runs: nextval is not transactional, so a re-run counts again), with one
    more result column, ``column(k)`` (SQL, quoted for df.sql)."""
    return [
        start(
            db,
            tenant,
            f"df.sql('insert into public.hits values ({k}) returning k, "
            f"pg_catalog.nextval(''public.runs'') as r, {column(k)}')",
        )
        for k in range(N)
    ]


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


class Trips:
    """What :func:`_handle_all` saw: the batches' sizes and, for each round trip that sent
    later steps (pgdurable/worker/wave.py), how many it sent and how many did not run."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.sent: list[int] = []
        self.skipped = 0
        self.calls: set[str] = set()
        """What the later steps were sent to: the role's next-step runner or step_next."""


def _handle_all(db: Any, **options: Any) -> Trips:
    """Claim every queued step at once and run each through the dispatcher (batch, in-place
    failure, Retry when a batch rolled back, alone)."""
    seen = Trips()

    async def go() -> None:
        async with worker(db, slots=N, **options) as w:
            await started(w)
            tasks = await w.producer.claim(N)
            assert len(tasks) == N
            run = w.batch.run_batch

            async def counted(first: Any, me: object) -> None:
                before = len(w.batch.queue)
                await run(first, me)
                seen.sizes.append(1 + before - len(w.batch.queue))

            w.batch.run_batch = counted  # type: ignore[method-assign]
            await asyncio.gather(*(w.dispatch.handle(t) for t in tasks))

    send = wave.run

    async def watched(conn: Any, cmds: Any, ends: list[int]) -> list[wave.Got]:
        got = await send(conn, cmds, ends)
        seen.sent.append(len(ends))
        for q, _ in cmds:
            if isinstance(q, wire.Parse) and b"next" in q.name:
                seen.calls.add("step_next" if b"_step_next_v1" in q.query else "next_runner")
        seen.skipped += sum(isinstance(g, wave.Skipped) for g in got)
        return got

    wave.run = watched  # type: ignore[assignment]
    try:
        asyncio.run(go())
    finally:
        wave.run = send  # type: ignore[assignment]
    return seen


@pytest.mark.parametrize("where", ["last", "middle"])
def test_a_later_failing_statement_fails_alone_and_its_batch_commits(db, tenant, where):
    iids = counted_starts(
        db,
        tenant,
        lambda k: f"1 / (1 - (select count(*)::int from public.bad where bad.k = {k})) as one",
    )
    # a batch visits instances in ascending order: the step of the highest instance id is
    # the last of its batch, after others ran in the same transaction; one in the middle is
    # sent in one round trip with steps behind it, which then do not run (PostgreSQL skips
    # the rest of a pipeline after an error) and are sent again
    order = sorted(iids)
    bad = iids.index(order[-1] if where == "last" else order[N // 2])
    with db.connect() as conn:
        conn.execute("insert into public.bad values (%s)", (bad,))

    seen = _handle_all(db)
    assert max(seen.sizes) > 1, seen.sizes  # the failing step shared a batch with others
    assert max(seen.sent) > 1, seen.sent  # and later steps shared round trips
    if where == "middle":
        assert seen.skipped > 0  # steps behind the failing one did not run with it
    # exactly once: the failing statement ran once and rolled back to its savepoint; the
    # others ran once (nextval is not transactional: a re-run would count again)
    assert rows(db, "select count(*), count(distinct k) from public.hits") == [(N - 1, N - 1)]
    assert one(db, "select last_value from public.runs") == N
    for k, iid in enumerate(iids):
        status = one(db, "select status from df.instances where id = %s", (iid,))
        assert status == ("failed" if k == bad else "completed"), k
    error = one(db, "select df.error(%s)", (iids[bad],))
    assert error["sqlstate"] == "22012"
    assert "division by zero" in error["error"]


def test_a_later_result_over_the_cap_fails_alone_and_its_batch_commits(db, tenant):
    # one instance's result is over --result-max-bytes once stored (the envelope: rows,
    # row_count, columns) although its row is not (the runner counts rows: it lets it by)
    iids = counted_starts(
        db, tenant, lambda k: f"pg_catalog.repeat(''x'', {975 if k == N // 2 else 1}) as v"
    )
    seen = _handle_all(db, result_max_bytes=1000)
    assert max(seen.sizes) > 1, seen.sizes
    assert max(seen.sent) > 1, seen.sent
    assert one(db, "select last_value from public.runs") == N  # nobody ran twice
    assert rows(db, "select count(*) from public.hits") == [(N - 1,)]
    for k, iid in enumerate(iids):
        status = one(db, "select status from df.instances where id = %s", (iid,))
        assert status == ("failed" if k == N // 2 else "completed"), k
    error = one(db, "select df.error(%s)", (iids[N // 2],))
    # the size step_next counted is the stored one (r, its nextval, has one digit or two),
    # and the message is the one the worker's own check gives a first step
    # (tests/acceptance/test_limits.py: either may refuse it)
    env = {
        "rows": [{"k": N // 2, "r": 0, "v": "x" * 975}],
        "row_count": 1,
        "columns": ["k", "r", "v"],
    }
    size = len(json.dumps(env, separators=(",", ":")).encode())
    assert error["error"] in {
        f"step result is {n} bytes, over the limit of 1000 bytes; raise "
        "pgdurable serve --result-max-bytes (PGDURABLE_RESULT_MAX_BYTES) to allow it"
        for n in (size, size + 1)
    }, (size, error)


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


def test_a_result_refused_after_later_steps_ran_rolls_the_batch_back(db, tenant):
    # a result the worker itself cannot store (a json value holding \u0000, which jsonb
    # refuses: PostgreSQL's json type lets it by) is refused once its round trip is back,
    # after the steps behind it ran: its own savepoint is gone, so the whole batch rolls back
    # and every step runs again alone (docs/performance.md "Session 10": the one case where
    # a step of a round trip runs twice), and each outcome is still its own
    iids = counted_starts(
        db,
        tenant,
        lambda k: (
            f"(case when exists (select from public.bad where bad.k = {k}) "
            "then ''\"\\u0000\"'' else ''1'' end)::json as v"
        ),
    )
    bad = iids.index(sorted(iids)[N // 2])
    with db.connect() as conn:
        conn.execute("insert into public.bad values (%s)", (bad,))

    seen = _handle_all(db)
    assert max(seen.sent) > 1, seen.sent
    assert rows(db, "select count(*), count(distinct k) from public.hits") == [(N - 1, N - 1)]
    for k, iid in enumerate(iids):
        status = one(db, "select status from df.instances where id = %s", (iid,))
        assert status == ("failed" if k == bad else "completed"), k
    error = one(db, "select df.error(%s)", (iids[bad],))
    assert "NUL character" in error["error"], error
    # steps that had run behind it ran again alone: nextval counted them twice
    assert one(db, "select last_value from public.runs") > N


@pytest.mark.parametrize("path", ["next_runner", "step_next"])
@pytest.mark.parametrize("how", ["replace", "drop"])
def test_a_step_cannot_take_the_workers_prepared_statements(db, tenant, how, path):
    # a batch's later steps run statements the worker prepared in the step session
    # (pgdurable/worker/wave.py, Statements). A step's statement may DEALLOCATE and PREPARE
    # there: this one takes every statement the worker prepared and ("replace") puts its own
    # under the same name and parameter types, which would run as the step session, outside
    # its runner, with the worker's parameters (the capability among them). step_next fails
    # that step right after its statement, PostgreSQL skips the rest of its round trip, and
    # the batch goes on with statements of new names: none of the tenant's ever runs. The
    # role's next-step runner checks it as step_next does (a role without one: step_next)
    if path == "step_next":
        drop_next_runner(db, tenant)
    with db.connect() as conn:
        conn.execute("create table public.marks (name text, args text)")
        conn.execute("grant insert on public.marks to public")
        conn.execute(
            "create function public.mark(p_name text, p_args text) returns int "
            "language sql as $$ insert into public.marks values (p_name, p_args) returning 1 $$"
        )
        conn.execute(
            f"""
            create function public.hijack() returns int language plpgsql as $f$
            declare s record; n int := 0;
            begin
                for s in select p.name, p.parameter_types from pg_catalog.pg_prepared_statements p
                         where not p.from_sql loop
                    execute pg_catalog.format('deallocate %I', s.name);
                    if {"true" if how == "replace" else "false"} then
                        execute pg_catalog.format(
                            'prepare %I%s as select public.mark(%L, %s)', s.name,
                            case when pg_catalog.cardinality(s.parameter_types) > 0 then
                                '(' || pg_catalog.array_to_string(s.parameter_types::text[], ',')
                                || ')' else '' end,
                            s.name,
                            case when pg_catalog.cardinality(s.parameter_types) > 0 then
                                (select pg_catalog.string_agg(pg_catalog.format('$%s::text', g),
                                        ' || '','' || ')
                                 from pg_catalog.generate_series(1,
                                      pg_catalog.cardinality(s.parameter_types)) g)
                                else 'null' end);
                    end if;
                    n := n + 1;
                end loop;
                return n;
            end $f$"""
        )
    iids = counted_starts(
        db, tenant, lambda k: f"(select public.hijack() from public.bad where bad.k = {k}) as h"
    )
    bad = iids.index(sorted(iids)[N // 2])  # in the middle: a later step of a round trip
    with db.connect() as conn:
        conn.execute("insert into public.bad values (%s)", (bad,))

    seen = _handle_all(db)
    assert seen.calls == {path}
    assert rows(db, "select name, args from public.marks") == []
    assert max(seen.sent) > 1, seen.sent
    assert seen.skipped > 0  # the steps behind it in its round trip did not run with it
    for k, iid in enumerate(iids):
        status = one(db, "select status from df.instances where id = %s", (iid,))
        assert status == ("failed" if k == bad else "completed"), k
    error = one(db, "select df.error(%s)", (iids[bad],))
    assert error["sqlstate"] == "0A000", error
    assert "may not deallocate the statements the worker prepared" in error["error"], error
    # every statement ran once; the failing one's insert rolled back to its savepoint
    assert one(db, "select last_value from public.runs") == N
    assert rows(db, "select count(*) from public.hits") == [(N - 1,)]


NEXT_ARGS = "text[], text[], text, text, text, text, text, int8, text[]"


def role_oid(db: Any, role: str) -> int:
    return int(one(db, "select oid from pg_catalog.pg_roles where rolname = %s", (role,)))


def drop_next_runner(db: Any, tenant: str) -> None:
    """Drop the role's next-step runner, as a role granted before it existed has none."""
    oid = role_oid(db, tenant)
    with db.connect() as conn:
        conn.execute(f"drop function pgdurable_exec.next_{oid}({NEXT_ARGS})")


def test_later_steps_use_the_next_step_runner_only_when_it_is_the_engines(db, tenant):
    # a role's later steps go to its next-step runner (one call: docs/performance.md,
    # "Session 12") when df.grant_usage made it; one whose body is not the engine's (here an
    # administrator replaced it; the owner stays the role) is never called: the later steps
    # run through step_next and the role's runner, and df.grant_usage makes it again
    oid = role_oid(db, tenant)
    with db.connect() as conn:
        conn.execute("create table public.marks (name text, args text)")
        conn.execute("grant insert on public.marks to public")
        conn.execute(
            f"""create or replace function pgdurable_exec.next_{oid}(
                    p_names text[], p_vals text[], p_path text, p_timeout text, p_app text,
                    p_cap text, p_sql text, p_max_bytes int8, p_stmts text[])
                returns setof pg_catalog.json language plpgsql volatile security definer as $$
                begin
                    insert into public.marks values ('next', p_sql);
                    return next pg_catalog.to_json(1);
                end $$"""
        )
        assert conn.execute(f"select pgdurable._runner_next_ok_v1({oid})").fetchone() == (False,)
    iids = counted_starts(db, tenant, lambda k: "1 as one")
    seen = _handle_all(db)
    assert seen.calls == {"step_next"}
    assert max(seen.sent) > 1, seen.sent
    assert rows(db, "select count(*) from public.marks") == [(0,)]
    for iid in iids:
        assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
    assert one(db, "select last_value from public.runs") == N

    with db.connect() as conn:
        conn.execute("select df.grant_usage(%s)", (tenant,))
        assert conn.execute(f"select pgdurable._runner_next_ok_v1({oid})").fetchone() == (True,)
    with db.connect() as conn:
        conn.execute("truncate public.hits")
    counted_starts(db, tenant, lambda k: "2 as two")
    seen = _handle_all(db)
    assert seen.calls == {"next_runner"}
    assert rows(db, "select count(*) from public.marks") == [(0,)]
    assert rows(db, "select count(*) from public.hits") == [(N,)]
