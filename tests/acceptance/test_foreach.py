"""df.foreach end to end through `pgdurable serve` (docs/foreach.md).

Bodies record their effect in ``public.ledger`` (one row per committed run of a body step,
with the row's value and the time): a body's effect must be there exactly once, whatever
fails, is cancelled, restarted or killed. One database and one serve per PostgreSQL server
for the module; the crash test kills that serve's workers.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import fix_db
from tests.acceptance.conftest import Env, module_env
from tests.acceptance.test_http import BASE_ENV
from tests.acceptance.test_restart import admin, restart, start, wait_status
from tests.fix_db import Server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    def make_role(tdb: fix_db.TestDB) -> str:
        role = tdb.create_role("fe")
        with tdb.connect() as conn:
            conn.execute(
                "create table public.ledger (tag text not null, v bigint, "
                "at timestamptz not null default clock_timestamp())"
            )
            conn.execute("create table public.src (tag text not null, v bigint not null)")
            conn.execute(f'grant select, insert, delete on public.ledger, public.src to "{role}"')
        return role

    with module_env(server, tmp_path_factory.mktemp("serve"), BASE_ENV, make_role) as e:
        yield e


def ledger(env: Env, tag: str) -> list[int]:
    """The v of every ledger row of ``tag``, sorted (duplicates kept)."""
    with env.db.connect() as conn:
        rows = conn.execute(
            "select v from public.ledger where tag = %s order by v", (tag,)
        ).fetchall()
    return [int(r[0]) for r in rows]


def source(env: Env, tag: str, n: int) -> None:
    admin(
        env,
        f"insert into public.src select '{tag}', g from generate_series(1, {n}) g",
    )


def result(env: Env, iid: str) -> Any:
    with env.db.connect(env.role) as conn:
        return json.loads(conn.execute("select df.result(%s)", (iid,)).fetchone()[0])


def error(env: Env, iid: str) -> dict[str, Any]:
    with env.db.connect(env.role) as conn:
        return dict(conn.execute("select df.error(%s)", (iid,)).fetchone()[0])


def children(env: Env, iid: str) -> list[tuple[str, str, str]]:
    """(id, status, label) of the instance's FOREACH bodies, by row number."""
    with env.db.connect(env.role) as conn:
        rows = conn.execute(
            "select id, status, label from df.instances where label like %s",
            (f"{iid} foreach % row %",),
        ).fetchall()
    return sorted(
        ((str(a), str(b), str(c)) for a, b, c in rows), key=lambda r: int(r[2].rsplit(" ", 1)[1])
    )


def body(tag: str, extra: str = "") -> str:
    """A body step: the row's v into the ledger, returning it."""
    return (
        f"df.sql('insert into public.ledger (tag, v) values (''{tag}'', $item.v{extra}) "
        "returning v')"
    )


def test_rows_run_their_bodies_in_order(env: Env) -> None:
    source(env, "order", 25)
    iid = start(
        env,
        f"df.foreach('select v from public.src where tag = ''order'' order by v desc', "
        f"{body('order')}, 4)",
    )
    assert wait_status(env, iid) == "completed"
    assert ledger(env, "order") == list(range(1, 26))  # each row's body once
    res = result(env, iid)
    assert res["row_count"] == 25
    # in the rows' order (descending), each body's own result
    assert [r["rows"][0]["v"] for r in res["rows"]] == list(range(25, 0, -1))
    kids = children(env, iid)
    assert len(kids) == 25
    assert all(k[1] == "completed" for k in kids)
    with env.db.connect(env.role) as conn:
        text = conn.execute("select df.explain(%s)", (iid,)).fetchone()[0]
        (det,) = conn.execute(
            "select status_details from df.instance_nodes(%s) where node_type = 'FOREACH'",
            (iid,),
        ).fetchone()
    assert "✓ FOREACH (25/25 rows done, 0 running, max_parallel 4)" in text, text
    assert json.loads(det)["progress"] == "25/25"


def test_zero_rows_completes_at_once(env: Env) -> None:
    iid = start(
        env,
        f"df.foreach('select v from public.src where false', {body('none')}) "
        "~> df.sql('select 1 as after')",
    )
    assert wait_status(env, iid) == "completed"
    with env.db.connect(env.role) as conn:
        (res,) = conn.execute(
            "select result from df.instance_nodes(%s) where node_type = 'FOREACH'", (iid,)
        ).fetchone()
    assert json.loads(res) == {"rows": [], "row_count": 0}
    assert children(env, iid) == []


def concurrency(env: Env, tag: str) -> int:
    """The most bodies of ``tag`` that were inside their (sleeping) step at once, from the
    ledger's start and end stamps."""
    with env.db.connect() as conn:
        row = conn.execute(
            "select max(c) from (select count(*) over (order by t, d desc) as c, d from ("
            " select at as t, 1 as d from public.ledger where tag = %s"
            " union all select at + interval '300 ms', -1 from public.ledger where tag = %s"
            ") e) x",
            (tag, tag),
        ).fetchone()
    return int(row[0] or 0)


def test_max_parallel_is_respected(env: Env) -> None:
    """12 bodies of 0.3 s each, 3 at a time: never more than 3 inside their step, and at
    least 2 at once (they do run in parallel). The ledger stamps each body's start; every
    body sleeps 0.3 s after it."""
    source(env, "par", 12)
    iid = start(
        env,
        "df.foreach('select v from public.src where tag = ''par''', "
        "df.sql('insert into public.ledger (tag, v) select ''par'', $item.v "
        "from pg_sleep(0.3)'), 3)",
    )
    peak_running = 0
    deadline = time.monotonic() + 60
    with env.db.connect(env.role) as conn:
        while time.monotonic() < deadline:
            (n,) = conn.execute(
                "select count(*) from df.instances where label like %s and status in "
                "('pending', 'running')",
                (f"{iid} foreach % row %",),
            ).fetchone()
            peak_running = max(peak_running, int(n))
            (st,) = conn.execute("select status from df.instances where id = %s", (iid,)).fetchone()
            if st not in ("pending", "running"):
                break
            time.sleep(0.05)
    assert wait_status(env, iid) == "completed"
    assert ledger(env, "par") == list(range(1, 13))
    assert 2 <= peak_running <= 3, peak_running
    # the ledger's stamps are taken after each body's sleep: a body's row at t means it ran
    # during [t - 0.3 s, t]
    with env.db.connect() as conn:
        (peak,) = conn.execute(
            "select max(c) from (select (select count(*) from public.ledger b where b.tag = 'par' "
            "and b.at > a.at - interval '300 ms' and b.at <= a.at) as c "
            "from public.ledger a where a.tag = 'par') x"
        ).fetchone()
    assert int(peak) <= 3, peak


def test_a_failing_row_fails_the_foreach_and_cancels_the_others(env: Env) -> None:
    """Row 3 fails at once; the others sleep long: the FOREACH fails naming row 3, the
    running bodies are cancelled (their sleep interrupted: nothing in the ledger), the rows
    not started never start."""
    source(env, "fail", 8)
    iid = start(
        env,
        "df.foreach('select v from public.src where tag = ''fail'' order by v', "
        "df.sql('insert into public.ledger (tag, v) select ''fail'', $item.v "
        "from pg_sleep(case when $item.v = 3 then 0 else 30 end) where 1 / ($item.v - 3) <> 0 "
        "or $item.v <> 3'), 4)",
    )
    t0 = time.monotonic()
    assert wait_status(env, iid) == "failed"
    assert time.monotonic() - t0 < 20  # the others' 30 s sleeps were not waited for
    err = error(env, iid)
    assert err["node_type"] == "FOREACH"
    assert err["error"].startswith("df.foreach: row 3 of 8 failed: "), err
    assert "division by zero" in err["error"]
    deadline = time.monotonic() + 30
    while True:
        kids = children(env, iid)
        if all(k[1] in ("completed", "failed", "cancelled") for k in kids):
            break
        assert time.monotonic() < deadline, kids
        time.sleep(0.2)
    assert len(kids) == 4  # max_parallel 4: rows 5-8 never started
    assert sorted(k[1] for k in kids) == ["cancelled", "cancelled", "cancelled", "failed"]
    time.sleep(1)
    assert ledger(env, "fail") == []


def test_body_wrapped_in_retry_retries_inside_itself(env: Env) -> None:
    """Each body is two steps in a df.retry: the first records a try, the second fails while
    its row has fewer than two tries. The RETRY runs the body again inside the child; the
    FOREACH completes, each row's effect once."""
    source(env, "rty", 5)
    first = "df.sql('insert into public.ledger (tag, v) values (''rty-try'', $item.v)')"
    flaky = (
        "df.sql('insert into public.ledger (tag, v) select ''rty'', $item.v "
        "where 1 / (case when "
        "(select count(*) from public.ledger l where l.tag = ''rty-try'' and l.v = $item.v) "
        "< 2 then 0 else 1 end) = 1')"
    )
    iid = start(
        env,
        "df.foreach('select v from public.src where tag = ''rty''', "
        f"df.retry({first} ~> {flaky}, 3, 0.1, 1), 2)",
    )
    assert wait_status(env, iid) == "completed"
    assert ledger(env, "rty") == [1, 2, 3, 4, 5]
    assert ledger(env, "rty-try") == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # each body ran twice (its first attempt failed at its second step), inside its child:
    # one child per row, each with its RETRY on attempt 2
    kids = children(env, iid)
    assert len(kids) == 5
    with env.db.connect(env.role) as conn:
        for kid, _, _ in kids:
            (att,) = conn.execute(
                "select status_details::jsonb ->> 'attempt' from df.instance_nodes(%s) "
                "where node_type = 'RETRY'",
                (kid,),
            ).fetchone()
            assert att == "2", (kid, att)


def test_cancel_of_the_parent_cancels_its_bodies(env: Env) -> None:
    source(env, "cxl", 6)
    iid = start(
        env,
        "df.foreach('select v from public.src where tag = ''cxl''', "
        "df.sql('select pg_sleep(60)') ~> "
        "df.sql('insert into public.ledger (tag, v) values (''cxl'', $item.v)'), 3)",
    )
    deadline = time.monotonic() + 30
    while len([k for k in children(env, iid) if k[1] == "running"]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with env.db.connect(env.role) as conn:
        conn.execute("select df.cancel(%s, 'enough')", (iid,))
    deadline = time.monotonic() + 20
    while True:
        kids = children(env, iid)
        if all(k[1] == "cancelled" for k in kids):
            break
        assert time.monotonic() < deadline, kids
        time.sleep(0.1)
    assert len(kids) == 3
    time.sleep(1)
    assert len(children(env, iid)) == 3  # nothing new started
    assert ledger(env, "cxl") == []


def test_restart_after_a_failed_row(env: Env) -> None:
    """Row 4's body fails (its table is missing) after its first step; the others complete.
    Made to pass, df.restart of the parent: the completed rows are not run again (the ledger
    has each once), row 4's body goes on from its failed step (its first step once), and the
    rows query is not run again (the source changed meanwhile). (Row 4's failing step waits
    half a second first: a failed FOREACH cancels the bodies still running, and the others
    must have ended by then for the ledger below to hold; a body's steps may commit together,
    docs/decisions.md D18, so its first step is not committed before its last otherwise.)"""
    source(env, "rs", 6)
    admin(
        env,
        "create sequence public.fe_rows",
        f'grant usage on sequence public.fe_rows to "{env.role}"',
    )
    iid = start(
        env,
        "df.foreach('select v, nextval(''public.fe_rows'') as q from public.src "
        "where tag = ''rs'' order by v', "
        "df.sql('insert into public.ledger (tag, v) values (''rs-a'', $item.v)') ~> "
        "df.sql('insert into public.ledger (tag, v) select ''rs-b'', $item.v "
        "from (select 1) x where $item.v <> 4 or to_regclass(''public.fe_late'') is not null') ~> "
        "df.sql('select 1 / (case when $item.v = 4 and to_regclass(''public.fe_late'') is null "
        "then 0 else 1 end) as ok from pg_sleep(case when $item.v = 4 then 0.5 else 0 end)'), 6)",
    )
    assert wait_status(env, iid) == "failed"
    assert error(env, iid)["error"].startswith("df.foreach: row 4 of 6 failed")
    assert ledger(env, "rs-a") == [1, 2, 3, 4, 5, 6]
    failed_child = [k for k in children(env, iid) if k[1] == "failed"]
    assert len(failed_child) == 1
    assert failed_child[0][2].endswith(" row 4")
    admin(env, "create table public.fe_late ()", "insert into public.src values ('rs', 7)")
    assert restart(env, iid) == iid
    assert wait_status(env, iid) == "completed"
    assert ledger(env, "rs-a") == [1, 2, 3, 4, 5, 6]  # nothing ran twice
    # row 4's second step completed (inserting nothing, the table was missing) before its
    # third failed: the restart resumes at the third
    assert ledger(env, "rs-b") == [1, 2, 3, 5, 6]
    res = result(env, iid)
    assert res["row_count"] == 6  # the stored rows, not the query again
    kids = children(env, iid)
    assert [k[0] for k in kids if k[2].endswith(" row 4")] == [failed_child[0][0]]  # restarted
    with env.db.connect() as conn:
        (q,) = conn.execute("select last_value from public.fe_rows").fetchone()
    assert int(q) == 6  # the rows query ran once


def test_kill_9_mid_foreach_runs_nothing_twice(env: Env) -> None:
    """Workers are SIGKILLed while bodies run (and every serve process once, then a new
    serve): the FOREACH completes with every row's body effect once, and its rows query (an
    INSERT … RETURNING, so its own effect is visible) committed once."""
    source(env, "crash", 150)
    iid = start(
        env,
        "df.foreach('with r as (insert into public.ledger (tag, v) select ''crash-rows'', v "
        "from public.src where tag = ''crash'' returning v) select v from r order by v', "
        "df.sql('insert into public.ledger (tag, v) select ''crash'', $item.v "
        "from pg_sleep(0.02)') ~> "
        "df.sql('insert into public.ledger (tag, v) values (''crash2'', $item.v) returning v'), "
        "15)",
    )
    killed_mid_run = 0
    for i in range(4):
        time.sleep(0.6)
        with env.db.connect() as conn:
            (done,) = conn.execute(
                "select count(*) from public.ledger where tag = 'crash2'"
            ).fetchone()
        killed_mid_run += 0 < int(done) < 150
        if i == 2:
            env.serve.kill_all()
            env.serve.start()
        else:
            env.serve.kill_worker()
        env.serve.wait_workers(2)
    assert killed_mid_run >= 2, "the kills came before or after the FOREACH ran"
    assert wait_status(env, iid, 120) == "completed"
    assert ledger(env, "crash-rows") == list(range(1, 151))
    assert ledger(env, "crash") == list(range(1, 151))
    assert ledger(env, "crash2") == list(range(1, 151))
    res = result(env, iid)
    assert res["row_count"] == 150
    assert [r["rows"][0]["v"] for r in res["rows"]] == list(range(1, 151))
    assert len(children(env, iid)) == 150  # no row got a second body


def test_ten_thousand_rows_fifty_at_a_time(env: Env) -> None:
    """10,000 rows, max_parallel 50, a trivial body; the worker's memory stays bounded (its
    RSS is reported), df.explain shows progress as k/10000 while it runs. ~25 s on the
    project machine (not marked slow: under a minute)."""
    import psutil

    source(env, "big", 10000)
    t0 = time.monotonic()
    iid = start(
        env,
        "df.foreach('select v from public.src where tag = ''big''', "
        "df.sql('insert into public.ledger (tag, v) values (''big'', $item.v)'), 50)",
    )
    seen_progress = ""
    peak_rss = 0
    deadline = time.monotonic() + 900
    with env.db.connect(env.role) as conn:
        while time.monotonic() < deadline:
            (st,) = conn.execute("select status from df.instances where id = %s", (iid,)).fetchone()
            if st not in ("pending", "running"):
                break
            text = conn.execute("select df.explain(%s)", (iid,)).fetchone()[0]
            if "/10000 rows done" in text and not seen_progress:
                seen_progress = text
            for pid in env.serve.workers():
                with contextlib.suppress(psutil.NoSuchProcess):
                    peak_rss = max(peak_rss, psutil.Process(pid).memory_info().rss)
            time.sleep(1)
    took = time.monotonic() - t0
    assert wait_status(env, iid, 10) == "completed"
    print(
        f"\n10,000 rows, max_parallel 50: {took:.1f} s; worker peak RSS {peak_rss / 2**20:.1f} MiB"
    )
    assert "FOREACH (" in seen_progress, seen_progress
    assert "/10000 rows done" in seen_progress, seen_progress
    with env.db.connect() as conn:
        (n, d) = conn.execute(
            "select count(*), count(distinct v) from public.ledger where tag = 'big'"
        ).fetchone()
    assert (n, d) == (10000, 10000)
    assert result(env, iid)["row_count"] == 10000
    assert peak_rss < 400 * 2**20


def test_an_abandoned_foreach_cancels_its_bodies(env: Env) -> None:
    """A FOREACH racing a 1 s sleep loses: its running bodies are cancelled (their 60 s
    sleep interrupted), no more start, nothing reaches the ledger."""
    source(env, "race", 5)
    iid = start(
        env,
        "df.race(df.foreach('select v from public.src where tag = ''race''', "
        "df.sql('select pg_sleep(60)') ~> "
        "df.sql('insert into public.ledger (tag, v) values (''race'', $item.v)'), 2), "
        "df.sleep(1))",
    )
    assert wait_status(env, iid) == "completed"
    deadline = time.monotonic() + 20
    while True:
        kids = children(env, iid)
        if kids and all(k[1] == "cancelled" for k in kids):
            break
        assert time.monotonic() < deadline, kids
        time.sleep(0.1)
    assert len(kids) == 2
    time.sleep(1)
    assert len(children(env, iid)) == 2
    assert ledger(env, "race") == []


def test_foreach_in_a_loop_runs_fresh_each_iteration(env: Env) -> None:
    """Each iteration of the loop runs the rows query again (a new activation): the second
    sees the row the first iteration's body added, and the loop breaks after two."""
    source(env, "loop", 2)
    iid = start(
        env,
        "@> (df.foreach('select v from public.src where tag = ''loop'' order by v', "
        "df.sql('insert into public.ledger (tag, v) values (''loop'', $item.v)')) "
        "~> df.sql('insert into public.src select ''loop'', max(v) + 1 from public.src "
        "where tag = ''loop''') "
        "~> df.sql('select count(*) as n from public.ledger where tag = ''loop''') |=> 'c' "
        "~> df.if(df.sql('select $c.n >= 5'), df.break(), 'select 1'))",
    )
    assert wait_status(env, iid) == "completed"
    # iteration 1: rows 1, 2; iteration 2: rows 1, 2, 3
    assert ledger(env, "loop") == [1, 1, 2, 2, 3]
    assert len(children(env, iid)) == 5


def test_body_sees_item_and_the_named_results_it_refers_to(env: Env) -> None:
    """$item, $item.col and a name of the parent the body refers to reach every body; a
    large named result the body does not refer to is not copied into the children."""
    iid = start(
        env,
        "df.sql('select 100 as base') |=> 'cfg' "
        "~> df.sql('select repeat(''x'', 100000) as big') |=> 'big' "
        "~> df.foreach('select v, ''r'' || v as name from generate_series(1, 3) v', "
        "df.sql('insert into public.ledger (tag, v) select $item.name, $item.v + $cfg.base "
        "returning $item'))",
    )
    assert wait_status(env, iid) == "completed"
    assert ledger(env, "r1") == [101]
    assert ledger(env, "r3") == [103]
    # what each child is given: $item and the names its body refers to, not 'big'
    with env.db.connect() as conn:
        (names,) = conn.execute(
            "select names from pgdurable.foreach_runs where instance_id = %s", (iid,)
        ).fetchone()
    assert names == ["cfg"]


def test_a_rows_query_that_fails_or_gives_no_rows_fails_the_foreach(env: Env) -> None:
    """A rows query that fails, or a statement that returns no result set, fails the
    FOREACH saying so; no body starts, and the statement's effect rolled back."""
    iid = start(env, f"df.foreach('select v from public.no_such_table', {body('nq')})")
    assert wait_status(env, iid) == "failed"
    err = error(env, iid)
    assert err["node_type"] == "FOREACH"
    assert err["error"].startswith("df.foreach: the rows query failed: "), err
    assert "no_such_table" in err["error"]
    assert err["sqlstate"] == "42P01"
    iid = start(
        env,
        "df.foreach('with a as (select 1 as v) insert into public.ledger (tag, v) "
        f"select ''nrows'', v from a', {body('nr')})",
    )
    assert wait_status(env, iid) == "failed"
    err = error(env, iid)
    assert "df.foreach: the rows query returned no result rows" in err["error"], err
    assert children(env, iid) == []
    assert ledger(env, "nrows") == []  # the statement rolled back with the refusal


def test_a_foreach_in_another_database_is_refused(env: Env) -> None:
    with env.db.connect(env.role) as conn:
        iid = conn.execute(
            f"select df.start(df.foreach('select 1 as v', {body('db')}), database => 'postgres')"
        ).fetchone()[0]
    assert wait_status(env, iid) == "failed"
    err = error(env, iid)
    assert err["error"].startswith(
        "df.foreach: a FOREACH cannot run in an instance started with database => 'postgres'"
    ), err
    assert children(env, iid) == []
