"""A DBA tells from pg_stat_activity alone which step a backend runs, and can cancel it.

Each step's transaction sets application_name to `pgdurable:<instance id>:<node id>`
(docs/operating.md, "Which step is this backend running?"). A step cancelled by someone
else (pg_cancel_backend by a DBA) is not the step's outcome: its transaction rolled back
and the step runs again after a back-off, like any transient failure (up to 10 attempts).
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from psycopg import sql

from tests.fix_sql import one

pytestmark = pytest.mark.timeout(180)

# what docs/operating.md tells a DBA to paste
DBA_QUERY = """
select pid, datname, usename, application_name,
       split_part(application_name, ':', 2) as instance_id,
       split_part(application_name, ':', 3) as node_id,
       state, wait_event_type, wait_event, now() - xact_start as in_transaction_for
from pg_stat_activity
where application_name like 'pgdurable:%'
order by xact_start
"""


def find_step(dba, iid: str, node: str, timeout: float = 30) -> dict:
    """The row of DBA_QUERY for this instance and node, once its statement is sleeping."""
    deadline = time.monotonic() + timeout
    while True:
        cur = dba.execute(DBA_QUERY)
        cols = [c.name for c in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        hit = [
            r
            for r in rows
            if r["instance_id"] == iid and r["node_id"] == node and r["wait_event"] == "PgSleep"
        ]
        if hit:
            return hit[0]
        assert time.monotonic() < deadline, f"no backend for {iid}:{node} in {rows}"
        time.sleep(0.05)


@pytest.fixture
def tenant(db):
    role = db.create_role("app")
    with db.connect() as su:
        su.execute("create sequence public.tries")
        su.execute(
            sql.SQL("grant usage, select, update on sequence public.tries to {}").format(
                sql.Identifier(role)
            )
        )
    return role


def test_dba_finds_and_cancels_a_step_which_then_runs_again(db, serve_factory, tenant):
    serve = serve_factory(db)
    serve.wait_workers(2)
    # first attempt sleeps a minute; a second one (nextval is not rolled back) returns at once
    step = (
        "select 'done' as r from pg_sleep(case when nextval('public.tries') = 1 then 60 else 0 end)"
    )
    with db.connect(tenant) as conn:
        iid = one(conn, "select df.start(%s, 'slow one')", (step,))
        node = one(conn, "select root_node from df.instances where id = %s", (iid,))
    with db.connect() as su:  # a DBA with pg_read_all_stats sees the state too
        hit = find_step(su, iid, node)
    assert hit["application_name"] == f"pgdurable:{iid}:{node}"
    assert hit["datname"] == db.name
    assert hit["usename"] == "pgdurable_step"
    assert hit["state"] == "active"
    # the installing administrator (not a superuser; pg_signal_backend, as a managed cloud's
    # admin has) sees the pid and the name, and cancels the statement
    with psycopg.connect(db.install_dsn, autocommit=True) as dba:
        assert (
            one(
                dba,
                "select pid from pg_stat_activity where application_name = %s",
                (f"pgdurable:{iid}:{node}",),
            )
            == hit["pid"]
        )
        assert one(dba, "select pg_cancel_backend(%s)", (hit["pid"],)) is True
    with db.connect(tenant) as conn:
        assert one(conn, "select df.await_instance(%s, 60)", (iid,)) == "completed", serve.log()
        assert json.loads(one(conn, "select df.result(%s)", (iid,)))["rows"] == [{"r": "done"}]
    with db.connect() as su:
        # cancelled once, then run again: two attempts at the statement
        assert one(su, "select last_value from public.tries") == 2
        # the name was the step transaction's only: none is left behind
        assert (
            one(
                su,
                "select count(*) from pg_stat_activity where application_name like %s",
                (f"pgdurable:{iid}:%",),
            )
            == 0
        )
        names = [
            r[0]
            for r in su.execute(
                "select application_name from pg_stat_activity where usename = 'pgdurable_step' "
                "and datname = current_database()"
            )
        ]
        assert names
        assert all(n.startswith("pgdurable step ") for n in names), names
    assert "step interrupted by another session" in serve.log()


def test_each_step_of_a_sequence_shows_its_own_node(db, serve_factory, tenant):
    serve = serve_factory(db)
    serve.wait_workers(2)
    with db.connect(tenant) as conn:
        iid = one(
            conn,
            "select df.start(df.sql('select pg_sleep(1.5)') |=> 'a' ~> "
            "df.sql('select pg_sleep(1.5)') |=> 'b')",
        )
        first, second = [
            r[0]
            for r in conn.execute(
                "select id from df.nodes where instance_id = %s and node_type = 'SQL' "
                "order by result_name",
                (iid,),
            )
        ]
    with db.connect() as su:
        a = find_step(su, iid, first)
        b = find_step(su, iid, second)
        assert a["application_name"] != b["application_name"]
    with db.connect(tenant) as conn:
        assert one(conn, "select df.await_instance(%s, 60)", (iid,)) == "completed", serve.log()


def test_steps_batched_in_one_transaction_each_show_their_own_node(db, serve_factory, tenant):
    """A JOIN's branches of one role queue together: a batch runs them one after another in
    one transaction, and each statement runs under its own node's name."""
    serve = serve_factory(db, PGDURABLE_WORKERS="1", PGDURABLE_SLOTS="1")
    serve.wait_workers(1)
    with db.connect(tenant) as conn:
        iid = one(
            conn,
            "select df.start(df.join3(df.sql('select pg_sleep(1)'), "
            "df.sql('select pg_sleep(1)'), df.sql('select pg_sleep(1)')))",
        )
        nodes = {
            r[0]
            for r in conn.execute(
                "select id from df.nodes where instance_id = %s and node_type = 'SQL'", (iid,)
            )
        }
    seen: dict[str, tuple[int, object]] = {}
    with db.connect() as su:
        deadline = time.monotonic() + 30
        while set(seen) != nodes:
            for pid, xact, name in su.execute(
                "select pid, xact_start, application_name from pg_stat_activity "
                "where application_name like %s and wait_event = 'PgSleep'",
                (f"pgdurable:{iid}:%",),
            ):
                seen[name.split(":")[2]] = (pid, xact)
            assert time.monotonic() < deadline, (seen, serve.log())
            time.sleep(0.02)
    # one slot: the three ran in one session, at least two of them batched in one transaction
    # (each with its own name)
    assert len({pid for pid, _ in seen.values()}) == 1, seen
    assert len({xact for _, xact in seen.values()}) < 3, seen
    with db.connect(tenant) as conn:
        assert one(conn, "select df.await_instance(%s, 60)", (iid,)) == "completed", serve.log()
