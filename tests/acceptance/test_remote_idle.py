"""`database =>` workflows leave no session behind in the other database: a worker closes its
pools there after a short idle time (pgdurable/steps/remote.py REMOTE_IDLE_S), so DROP
DATABASE of it succeeds soon after its workflows are done, while serve keeps running. The
step's backend there carries the step's application_name, as a local step's does."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from psycopg import sql

from pgdurable import schema
from tests.fix_sql import one

pytestmark = pytest.mark.timeout(180)

# idle close (2 s, checked every 0.5 s) plus margin; PostgreSQL's DROP DATABASE itself waits
# up to 5 s for other sessions to leave, so one attempt may take that long
DROP_WITHIN_S = 12.0


def test_drop_database_after_remote_workflows(db, serve_factory):
    tenant = db.create_role("rmt")
    other = f"o_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(db.server.install_dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(other)))
    try:
        schema.install(db.server.install_dsn(other))
        with psycopg.connect(db.server.install_dsn(other), autocommit=True) as oc:
            oc.execute("select df.grant_usage(%s)", (tenant,))
        serve = serve_factory(db)
        serve.wait_workers(2)
        # several steps at once (a JOIN): more than one connection in the other database
        expr = (
            "df.sql('select pg_sleep(1.5), 1 as a') & df.sql('select pg_sleep(1.5), 2 as b')"
            " & df.sql('select current_database() as d')"
        )
        with db.connect(tenant) as conn:
            iid = one(conn, f"select df.start({expr}, null, %s)", (other,))
        with db.connect() as su:
            deadline = time.monotonic() + 30
            names: list[str] = []
            while not names:
                names = [
                    r[0]
                    for r in su.execute(
                        "select application_name from pg_stat_activity where datname = %s "
                        "and application_name like %s and wait_event = 'PgSleep'",
                        (other, f"pgdurable:{iid}:%"),
                    )
                ]
                assert time.monotonic() < deadline, serve.log()
                time.sleep(0.05)
        with db.connect(tenant) as conn:
            assert one(conn, "select df.await_instance(%s, 60)", (iid,)) == "completed", serve.log()
        with db.connect() as su:
            # the worker's sessions are still there right after the workflow
            assert (
                one(
                    su,
                    "select count(*) from pg_stat_activity where datname = %s "
                    "and usename in ('pgdurable_service', 'pgdurable_step')",
                    (other,),
                )
                > 0
            )
        # as the database's owner, without FORCE, while serve keeps running
        t0 = time.monotonic()
        last: Exception | None = None
        with psycopg.connect(db.server.install_dsn("postgres"), autocommit=True) as conn:
            while time.monotonic() - t0 < DROP_WITHIN_S:
                try:
                    conn.execute(sql.SQL("drop database {}").format(sql.Identifier(other)))
                    last = None
                    break
                except psycopg.errors.ObjectInUse as exc:
                    last = exc
                    time.sleep(0.2)
        assert last is None, f"{last}\n{serve.log()}"
        assert time.monotonic() - t0 < DROP_WITHIN_S
        assert serve.proc is not None
        assert serve.proc.poll() is None
        # and a workflow there later (the database made again) opens new sessions
        with psycopg.connect(db.server.install_dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(other)))
        schema.install(db.server.install_dsn(other))
        with psycopg.connect(db.server.install_dsn(other), autocommit=True) as oc:
            oc.execute("select df.grant_usage(%s)", (tenant,))
        with db.connect(tenant) as conn:
            iid = one(conn, "select df.start('select 5 as v', null, %s)", (other,))
            assert one(conn, "select df.await_instance(%s, 60)", (iid,)) == "completed", serve.log()
    finally:
        with db.connect() as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(other))
            )
