"""`df.start(..., transaction_mode => 'new')` after a plain `pgdurable install`.

'new' mode commits the start in a session of its own: a dblink connection logged in as the
install's launcher role. `pgdurable install` creates dblink (in `pgdurable_dblink`, a schema
of the engine's owner that no other role may use) when the installing role may, and says so
clearly, with the statement an administrator must run, when it may not. On stock
PostgreSQL only a superuser may create dblink: the test installer (`pgdurable_test_admin`,
CREATEROLE CREATEDB, as a managed cloud's admin) cannot, a superuser can (as the cloud's
admin role can). dblink also needs the server to ask the launcher role for its password:
the embedded PostgreSQL 18 does (as managed PostgreSQL does), the local PostgreSQL 15 trusts
every role, and there install and df.start say what to change in pg_hba.conf.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psycopg
import pytest

from pgdurable import schema
from tests.fix_sql import one

from .conftest import ROOT

pytestmark = pytest.mark.timeout(180)

STATEMENT = "CREATE EXTENSION dblink SCHEMA pgdurable_dblink;"


def cli_install(dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgdurable", "install", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def launcher_asks_password(db) -> bool:
    """Does the server ask the launcher role for its password? (dblink needs it.)"""
    with db.connect() as admin:
        launcher = one(admin, "select rolname::text from pgdurable.launcher")
    try:
        with psycopg.connect(db.server.dsn(db.name, user=launcher), connect_timeout=5):
            return False
    except psycopg.OperationalError:
        return True


def test_installer_that_cannot_create_dblink_says_what_to_run(db, caplog):
    """(a) The non-superuser installer cannot create dblink: install succeeds, says so (log,
    CLI) with the exact statement, and 'new' mode fails naming it; caller mode works."""
    caplog.set_level("WARNING", logger="pgdurable.schema")
    res = schema.install(db.install_dsn)
    assert res.dblink_schema is None
    assert res.new_mode_problem is not None
    assert STATEMENT in res.new_mode_problem
    assert 'permission denied to create extension "dblink"' in res.new_mode_problem
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(STATEMENT in m and "transaction_mode 'new'" in m for m in warned), warned
    # the schema is there, the owner's, and no one else may use it
    with db.connect() as admin:
        owner, acl = admin.execute(
            "select nspowner::regrole::text, coalesce(nspacl::text, '') from pg_namespace "
            "where nspname = 'pgdurable_dblink'"
        ).fetchone()
        assert owner == "pgdurable_owner"
        assert [e.split("=")[0] for e in acl.strip("{}").split(",")] == ["pgdurable_owner"], acl

    out = cli_install(db.install_dsn)
    assert out.returncode == 0, out.stderr
    assert "pgdurable schema version" in out.stdout
    assert "WARNING: transaction_mode 'new' needs the dblink extension" in out.stderr
    assert STATEMENT in out.stderr
    assert "'new' ready" not in out.stdout

    role = db.create_role("nm")
    with db.connect(role) as conn:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as exc:
            conn.execute("select df.start('select 1', transaction_mode => 'new')")
        assert STATEMENT in str(exc.value)
        assert f'database "{db.name}"' in str(exc.value)
        assert one(conn, "select df.start('select 1')")  # caller mode is unaffected


@pytest.mark.parametrize("how", ["install-as-superuser", "precreated-by-superuser"])
def test_new_mode_works_end_to_end(db, serve_factory, how):
    """(b) dblink made by install run where it may (a superuser), or created beforehand by a
    superuser (as a cloud's admin would): 'new' mode starts an instance that survives the
    caller's rollback and runs through a real serve."""
    if how == "install-as-superuser":
        res = schema.install(db.dsn)
        out = cli_install(db.dsn)
    else:
        with db.connect() as su:
            su.execute("create extension dblink schema pgdurable_dblink")
        res = schema.install(db.install_dsn)
        out = cli_install(db.install_dsn)
    assert out.returncode == 0, out.stderr
    assert res.dblink_schema == "pgdurable_dblink"
    with db.connect() as admin:
        assert (
            one(
                admin,
                "select extnamespace::regnamespace::text from pg_extension "
                "where extname = 'dblink'",
            )
            == "pgdurable_dblink"
        )
    role = db.create_role("nm")
    # dblink's functions are the engine owner's alone: a tenant cannot reach them
    with (
        db.connect(role) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgdurable_dblink"),
    ):
        conn.execute("select pgdurable_dblink.dblink_connect('x', 'dbname=postgres')")

    if not launcher_asks_password(db):
        # a server that trusts every role (the local PostgreSQL 15): install said so, and so
        # does df.start, with what to change
        assert res.new_mode_problem is not None
        assert "without a password" in res.new_mode_problem
        assert "pg_hba.conf" in res.new_mode_problem
        assert "without a password" in out.stderr
        with (
            db.connect(role) as conn,
            pytest.raises(
                psycopg.errors.InvalidAuthorizationSpecification, match="without a password"
            ),
        ):
            conn.execute("select df.start('select 1', transaction_mode => 'new')")
        return
    assert res.new_mode_problem is None
    assert "transaction_mode 'new' ready (dblink in schema pgdurable_dblink)" in out.stdout
    assert "WARNING" not in out.stderr
    with db.connect(role, autocommit=False) as conn:
        iid = one(
            conn,
            "select df.start('select 41 + 1 as answer', 'nm-label', transaction_mode => 'new')",
        )
        conn.rollback()  # the instance was committed by its own session
    serve = serve_factory(db)
    serve.wait_workers(2)
    with db.connect(role) as conn:
        status = one(conn, "select df.await_instance(%s, 60)", (iid,))
        assert status == "completed", serve.log()
        assert json.loads(one(conn, "select df.result(%s)", (iid,)))["rows"] == [{"answer": 42}]
        assert (
            one(conn, "select submitted_by::text from df.instances where id = %s", (iid,)) == role
        )


def test_new_mode_refuses_dblink_functions_that_are_not_the_extensions(db):
    """'new' mode calls dblink's functions as the engine's owner: a function of that name
    that is not the extension's (here detached by a superuser) is refused, not called."""
    with db.connect() as su:
        su.execute("create schema elsewhere")
        su.execute("create extension dblink schema elsewhere")
    role = db.create_role("nm")
    # a schema the engine's owner may not use: said, with the grant to run
    with (
        db.connect(role) as conn,
        pytest.raises(
            psycopg.errors.ObjectNotInPrerequisiteState,
            match=r'in schema "elsewhere", on which pgdurable_owner has no USAGE; an '
            r"administrator must run: GRANT USAGE ON SCHEMA elsewhere TO pgdurable_owner",
        ),
    ):
        conn.execute("select df.start('select 1', transaction_mode => 'new')")
    with db.connect() as su:
        su.execute("grant usage on schema elsewhere to pgdurable_owner")
        su.execute("alter extension dblink drop function elsewhere.dblink_exec(text, text)")
    with (
        db.connect(role) as conn,
        pytest.raises(
            psycopg.errors.ObjectNotInPrerequisiteState,
            match=r"elsewhere\.dblink_exec\(pg_catalog\.text,pg_catalog\.text\) is not a "
            r"function of the dblink extension",
        ),
    ):
        conn.execute("select df.start('select 1', transaction_mode => 'new')")


def test_serve_start_says_when_new_mode_is_unavailable(db, serve_factory):
    """serve (as pgdurable_service, which cannot create dblink) logs the same warning."""
    serve = serve_factory(db)
    serve.wait_workers(2)
    deadline = time.monotonic() + 30
    while STATEMENT not in serve.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "transaction_mode 'new' needs the dblink extension" in serve.log()
    assert STATEMENT in serve.log()
