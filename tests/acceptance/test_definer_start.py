"""A workflow started by df.start inside a SECURITY DEFINER function runs, through a real
serve, as the function's owner (pg_durable's behaviour); tests/sql/test_definer_start.py
covers the submission itself."""

from __future__ import annotations

import json

import pytest
from psycopg import sql

from tests.fix_sql import one

pytestmark = pytest.mark.timeout(180)


def test_definer_started_workflow_runs_as_the_owner(db, serve_factory):
    owner = db.create_role("own")
    caller = db.create_role("clr", grant=False)
    with db.connect() as su:
        su.execute(
            sql.SQL("grant create, usage on schema public to {}").format(sql.Identifier(owner))
        )
    with db.connect(owner) as conn:
        conn.execute("""
            create function public.kick() returns text language plpgsql security definer
            set search_path = pg_catalog, public as $f$
            begin
                return df.start('select current_user::text as who, session_user::text as s');
            end $f$""")
    with db.connect(caller) as conn:
        iid = one(conn, "select public.kick()")
    serve = serve_factory(db)
    serve.wait_workers(2)
    with db.connect(owner) as conn:
        assert one(conn, "select df.await_instance(%s, 60)", (iid,)) == "completed", serve.log()
        rows = json.loads(one(conn, "select df.result(%s)", (iid,)))["rows"]
    assert rows == [{"who": owner, "s": "pgdurable_step"}]
