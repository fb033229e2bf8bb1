"""Through a real ``pgdurable serve``: the pg_durable.* settings take effect as documented
(docs/operating.md, "Settings"), and a role's own settings apply inside its steps.

- deployment-wide (ALTER DATABASE … SET): applies while serve runs, within a maintenance round
  for what the worker reads (loop limits), at the next step for what a step reads
  (step_statement_timeout, the step slots); ALTER DATABASE … RESET too;
- a role's ALTER ROLE … SET: applies to that role's steps only, and may only tighten the
  engine's limits (step_statement_timeout, loop_min_interval_ms, loop_max_iterations);
- a role's ordinary settings (search_path, statement_timeout, work_mem, …) apply inside its
  steps, the pinned names never do.

SQL-level checks of the same functions are in tests/sql/test_settings.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgdurable import schema
from tests import fix_db
from tests.acceptance.conftest import Serve

pytestmark = pytest.mark.timeout(240)


def alter_db(db: fix_db.TestDB, setting: str, value: str | None, name: str | None = None) -> None:
    """ALTER DATABASE (this test's, or NAME) SET setting = value, RESET for None."""
    target = sql.Identifier(name or db.name)
    with db.connect() as conn:
        if value is None:
            conn.execute(sql.SQL("alter database {} reset {}").format(target, sql.SQL(setting)))
        else:
            conn.execute(
                sql.SQL("alter database {} set {} = {}").format(
                    target, sql.SQL(setting), sql.Literal(value)
                )
            )


def alter_role(
    db: fix_db.TestDB,
    role: str,
    setting: str,
    value: str,
    *,
    by: str | None = None,
    here: bool = False,
) -> None:
    """ALTER ROLE role [IN DATABASE this one] SET setting = value, as BY (the superuser by
    default; the role itself for what a tenant can do on its own)."""
    where = sql.SQL(" in database {}").format(sql.Identifier(db.name)) if here else sql.SQL("")
    with db.connect(by) as conn:
        conn.execute(
            sql.SQL("alter role {}{} set {} = {}").format(
                sql.Identifier(role), where, sql.SQL(setting), sql.Literal(value)
            )
        )


def start(db: fix_db.TestDB, role: str, expr: str, database: str | None = None) -> str:
    with db.connect(role) as conn:
        conn.execute("set default_transaction_read_only = off")  # the role's may be on
        return str(conn.execute(f"select df.start({expr}, null, %s)", (database,)).fetchone()[0])


def finish(
    db: fix_db.TestDB, role: str, iid: str, timeout: int = 60
) -> tuple[str, Any, Any, float]:
    """(status, result, error, seconds from start to completion in the database's clock)."""
    with db.connect(role) as conn:
        conn.execute("set statement_timeout = 0")  # the role's own may be set: not here
        status = conn.execute("select df.await_instance(%s, %s)", (iid, timeout)).fetchone()[0]
        result = conn.execute("select df.result(%s)", (iid,)).fetchone()[0]
        error = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
        took = conn.execute(
            "select extract(epoch from completed_at - created_at) from df.instances where id = %s",
            (iid,),
        ).fetchone()[0]
    return status, (json.loads(result) if result else None), error, float(took or 0)


def run(
    db: fix_db.TestDB, role: str, expr: str, database: str | None = None
) -> tuple[str, Any, Any, float]:
    return finish(db, role, start(db, role, expr, database))


def timed_out(status: str, err: Any) -> bool:
    return status == "failed" and err["sqlstate"] == "57014" and "statement timeout" in err["error"]


def wait_logged(s: Serve, text: str, timeout: float = 30) -> None:
    """Until each of serve's two workers logged TEXT (what it does when it sees a change)."""
    assert s.log_path is not None
    deadline = time.monotonic() + timeout
    while s.log_path.read_text(errors="replace").count(text) < 2:
        assert time.monotonic() < deadline, f"the workers never logged {text!r}:\n{s.log()}"
        time.sleep(0.1)


def serve(db: fix_db.TestDB, serve_factory: Any) -> Serve:
    """serve, once both workers have read the settings (a change after is one they see)."""
    s: Serve = serve_factory(db)
    s.wait_workers(2)
    wait_logged(s, "worker started")
    return s


@pytest.fixture
def running(db: fix_db.TestDB, serve_factory: Any) -> Serve:
    return serve(db, serve_factory)


# -- step_statement_timeout ---------------------------------------------------------------


def test_database_step_timeout_applies_while_serve_runs(db: fix_db.TestDB, running: Serve) -> None:
    role = db.create_role("st")
    status, _, err, _ = run(db, role, "'select pg_sleep(1.5)'")
    assert status == "completed", err
    alter_db(db, "pg_durable.step_statement_timeout", "1s")
    status, _, err, took = run(db, role, "'select pg_sleep(30)'")
    assert timed_out(status, err), (status, err)
    assert took < 10, took


def test_database_reset_applies_to_sessions_opened_with_the_value(
    db: fix_db.TestDB, serve_factory: Any
) -> None:
    """Every session of this serve connected while the database said 1 s: after RESET the
    workers reopen them, so the old value is gone from them too."""
    alter_db(db, "pg_durable.step_statement_timeout", "1s")
    s = serve(db, serve_factory)
    role = db.create_role("st")
    status, _, err, _ = run(db, role, "'select pg_sleep(3)'")
    assert timed_out(status, err), (status, err)
    alter_db(db, "pg_durable.step_statement_timeout", None)
    wait_logged(s, "pg_durable.step_statement_timeout were reset")
    status, _, err, _ = run(db, role, "'select pg_sleep(1.5)'")
    assert status == "completed", err


def test_role_step_timeout_applies_to_its_steps_only(db: fix_db.TestDB, running: Serve) -> None:
    limited, other = db.create_role("lim"), db.create_role("free")
    alter_role(db, limited, "pg_durable.step_statement_timeout", "1s")
    a = start(db, limited, "'select pg_sleep(3)'")
    b = start(db, other, "'select pg_sleep(2)'")
    status, _, err, _ = finish(db, limited, a)
    assert timed_out(status, err), (status, err)
    status, _, err, _ = finish(db, other, b)
    assert status == "completed", err


def test_a_role_cannot_loosen_the_step_timeout(db: fix_db.TestDB, running: Serve) -> None:
    """With the database's 1 s, a role that may set its own pg_durable.step_statement_timeout
    (GRANT SET ON PARAMETER) sets 0, and its statement_timeout to 0 / an hour: still 1 s."""
    role = db.create_role("loose")
    alter_db(db, "pg_durable.step_statement_timeout", "1s")
    with db.connect() as su:
        su.execute(
            sql.SQL("grant set on parameter pg_durable.step_statement_timeout to {}").format(
                sql.Identifier(role)
            )
        )
    try:
        alter_role(db, role, "pg_durable.step_statement_timeout", "0", by=role)
        alter_role(db, role, "statement_timeout", "0", by=role)
        alter_role(db, role, "statement_timeout", "1h", by=role, here=True)
        status, _, err, took = run(db, role, "'select pg_sleep(5)'")
        assert timed_out(status, err), (status, err)
        assert took < 4.5, took
    finally:
        with db.connect() as su:
            su.execute(sql.SQL("alter role {} reset all").format(sql.Identifier(role)))
            su.execute(
                sql.SQL("revoke set on parameter pg_durable.step_statement_timeout from {}").format(
                    sql.Identifier(role)
                )
            )


# -- a role's own settings ----------------------------------------------------------------


def test_a_roles_statement_timeout_and_settings_apply(db: fix_db.TestDB, running: Serve) -> None:
    role, other = db.create_role("own"), db.create_role("plain")
    alter_role(db, role, "statement_timeout", "1s", by=role)
    alter_role(db, role, "work_mem", "7MB", by=role)
    alter_db(db, "work_mem", "5MB")  # while serve runs: its step sessions are older
    status, result, err, _ = run(db, role, "'select current_setting(''work_mem'') as w'")
    assert status == "completed", err
    assert result["rows"] == [{"w": "7MB"}]
    status, result, err, _ = run(db, other, "'select current_setting(''work_mem'') as w'")
    assert status == "completed", err
    assert result["rows"] == [{"w": "5MB"}]
    status, _, err, _ = run(db, role, "'select pg_sleep(3)'")
    assert timed_out(status, err), (status, err)
    status, _, err, _ = run(db, other, "'select pg_sleep(1.5)'")
    assert status == "completed", err


def test_a_roles_search_path_in_this_database(db: fix_db.TestDB, running: Serve) -> None:
    role, other = db.create_role("app"), db.create_role("noapp")
    with db.connect() as su:
        su.execute("create schema app")
        su.execute("create table app.things (x int)")
        su.execute("insert into app.things values (1), (2)")
        for r in (role, other):
            su.execute(sql.SQL("grant usage on schema app to {}").format(sql.Identifier(r)))
            su.execute(sql.SQL("grant select on app.things to {}").format(sql.Identifier(r)))
        su.execute(
            sql.SQL("alter role {} in database {} set search_path = app, public").format(
                sql.Identifier(role), sql.Identifier(db.name)
            )
        )
    # two steps: the second may follow the first in one transaction (step_next)
    expr = (
        "'select 1 as one' ~> "
        "'select count(*) as n, current_setting(''search_path'') as sp from things'"
    )
    status, result, err, _ = run(db, role, expr)
    assert status == "completed", err
    assert result["rows"] == [{"n": 2, "sp": "app, public"}]
    status, _, err, _ = run(db, other, expr)
    assert status == "failed"
    assert 'relation "things" does not exist' in err["error"], err


def test_pinned_settings_do_not_reach_a_step(db: fix_db.TestDB, running: Serve) -> None:
    role = db.create_role("pin")
    with db.connect() as su:
        su.execute("create table public.t (x int)")
        su.execute(sql.SQL("grant insert on public.t to {}").format(sql.Identifier(role)))
    # what the role may set for itself
    for name, value in [
        ("application_name", "mine"),
        ("idle_in_transaction_session_timeout", "1ms"),
        ("role", role),
        ("session_authorization", role),
        ("work_mem", "9MB"),
        ("default_transaction_read_only", "on"),
    ]:
        alter_role(db, role, name, value, by=role)
    # what only a superuser can set for it: engine-internal names and a superuser-only one
    for name, value in [
        ("df.in_workflow", "false"),
        ("pg_durable.fake_now", "2001-01-01 00:00:00+00"),
        ("log_statement", "all"),
    ]:
        alter_role(db, role, name, value)
    status, result, err, _ = run(
        db,
        role,
        (
            "'insert into public.t values (1) returning "
            "current_setting(''df.in_workflow'') as wf, "
            "current_setting(''application_name'') as app, "
            "current_setting(''transaction_read_only'') as ro, "
            "coalesce(current_setting(''pg_durable.fake_now'', true), '''') as fake, "
            "current_user::text as cu, current_setting(''work_mem'') as wm' ~> df.sleep(1)"
        ),
    )
    assert status == "completed", err
    with db.connect() as conn:
        iid = conn.execute(
            "select id from df.instances order by created_at desc limit 1"
        ).fetchone()[0]
        row = conn.execute(
            "select result from df.nodes where instance_id = %s and node_type = 'SQL'", (iid,)
        ).fetchone()[0]["rows"][0]
    assert row["wf"] == "true"
    assert row["app"].startswith("pgdurable:"), row
    assert (row["ro"], row["fake"], row["cu"], row["wm"]) == ("off", "", role, "9MB")
    assert result == {"slept": True, "seconds": 1}


# -- loops --------------------------------------------------------------------------------


def _five_iterations(db: fix_db.TestDB, role: str, tag: str) -> tuple[str, Any, float]:
    expr = (
        f"df.loop(df.sql('insert into public.ledger values (''{tag}'')'), "
        f"df.sql('select count(*) < 5 from public.ledger where tag = ''{tag}'''))"
    )
    status, _, err, took = run(db, role, expr)
    return status, err, took


def test_database_loop_interval_applies_while_serve_runs(db: fix_db.TestDB, running: Serve) -> None:
    role = db.create_role("loop")
    with db.connect() as su:
        su.execute("create table public.ledger (tag text)")
        su.execute(
            sql.SQL("grant select, insert on public.ledger to {}").format(sql.Identifier(role))
        )
    alter_db(db, "pg_durable.loop_min_interval_ms", "100")
    wait_logged(running, "pg_durable.loop_min_interval_ms = 100")
    status, err, took = _five_iterations(db, role, "fast")
    assert status == "completed", err
    assert took < 1.5, took
    alter_db(db, "pg_durable.loop_min_interval_ms", "1000")
    wait_logged(running, "pg_durable.loop_min_interval_ms = 1000")
    status, err, took = _five_iterations(db, role, "slow")
    assert status == "completed", err
    assert took >= 4, took


def test_role_loop_settings_only_tighten(db: fix_db.TestDB, serve_factory: Any) -> None:
    alter_db(db, "pg_durable.loop_min_interval_ms", "0")
    alter_db(db, "pg_durable.loop_max_iterations", "5")
    low, high, slow = db.create_role("low"), db.create_role("high"), db.create_role("slow")
    alter_role(db, low, "pg_durable.loop_max_iterations", "3")
    alter_role(db, high, "pg_durable.loop_max_iterations", "50", here=True)
    alter_role(db, slow, "pg_durable.loop_min_interval_ms", "1000")
    serve(db, serve_factory)
    forever = "df.loop(df.sql('select 1'))"
    a, b = start(db, low, forever), start(db, high, forever)
    status, _, err, _ = finish(db, low, a)
    assert status == "failed"
    assert "exceeded pg_durable.loop_max_iterations (3)" in err["error"], err
    status, _, err, _ = finish(db, high, b)
    assert status == "failed"
    assert "exceeded pg_durable.loop_max_iterations (5)" in err["error"], err
    # the role's longer interval: 5 iterations, 4 waits of 1 s (the database says 0)
    status, _, err, took = run(db, slow, forever)
    assert status == "failed", err
    assert took >= 4, took
    # a role's value that is no number fails its instance, saying which
    alter_role(db, low, "pg_durable.loop_max_iterations", "few")
    status, _, err, _ = run(db, low, forever)
    assert status == "failed"
    assert f"pg_durable.loop_max_iterations of role {low} is 'few'" in err["error"], err


# -- step slots ---------------------------------------------------------------------------


def test_max_user_connections_applies_while_serve_runs(db: fix_db.TestDB, running: Serve) -> None:
    role = db.create_role("cap")
    alter_db(db, "pg_durable.execution_acquire_timeout", "1")
    with db.connect() as conn:  # the service makes the slot rows when it starts
        deadline = time.monotonic() + 30
        while conn.execute("select count(*) from pgdurable.step_slots").fetchone()[0] < 10:
            assert time.monotonic() < deadline, "no step slot rows"
            time.sleep(0.1)
    # slot 0 stays busy (as a long step of another serve would hold it)
    with db.connect(autocommit=False) as holder:
        holder.execute("select 1 from pgdurable.step_slots where slot = 0 for update")
        status, _, err, _ = run(db, role, "'select 1'")
        assert status == "completed", err  # 9 more slots
        alter_db(db, "pg_durable.max_user_connections", "1")
        status, _, err, _ = run(db, role, "'select 1'")
        assert status == "failed"
        assert "max_user_connections=1" in err["error"], err
        alter_db(db, "pg_durable.max_user_connections", "3")
        status, _, err, _ = run(db, role, "'select 1'")
        assert status == "completed", err
        holder.rollback()


# -- `database =>` steps ------------------------------------------------------------------


def test_steps_in_another_database_take_the_roles_settings_there(
    db: fix_db.TestDB, serve_factory: Any
) -> None:
    """The role's settings for the target database apply there; the engine's
    step_statement_timeout is this deployment's, whatever the target database says."""
    other = f"{db.name}_o"
    with psycopg.connect(db.server.install_dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(other)))
    try:
        schema.install(db.server.install_dsn(other))
        role = db.create_role("far")
        with psycopg.connect(db.server.install_dsn(other), autocommit=True) as oc:
            oc.execute("select df.grant_usage(%s)", (role,))
        with psycopg.connect(db.server.dsn(other), autocommit=True) as oc:
            oc.execute("create schema app")
            oc.execute("create table app.things (x int)")
            oc.execute(sql.SQL("grant usage on schema app to {}").format(sql.Identifier(role)))
            oc.execute(sql.SQL("grant select on app.things to {}").format(sql.Identifier(role)))
            oc.execute(
                sql.SQL("alter role {} in database {} set search_path = app, public").format(
                    sql.Identifier(role), sql.Identifier(other)
                )
            )
        alter_db(db, "pg_durable.step_statement_timeout", "1s")
        alter_db(db, "pg_durable.step_statement_timeout", "1h", name=other)
        serve(db, serve_factory)
        status, result, err, _ = run(
            db,
            role,
            (
                "'select count(*) as n, current_setting(''search_path'') as sp, "
                "current_database()::text as db from things'"
            ),
            database=other,
        )
        assert status == "completed", err
        assert result["rows"] == [{"n": 0, "sp": "app, public", "db": other}]
        status, _, err, _ = run(db, role, "'select pg_sleep(3)'", database=other)
        assert timed_out(status, err), (status, err)
    finally:
        with db.connect() as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(other))
            )
