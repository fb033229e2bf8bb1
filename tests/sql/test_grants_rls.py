"""Privileges and row-level security: grant_usage/revoke_usage, PUBLIC grants, isolation between
roles, and the engine helpers refusing other roles' instances (90_grants.sql, 40_inspect.sql)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from tests.fix_sql import one


def counts(conn):
    return conn.execute(
        "select (select count(*) from df.instances), (select count(*) from df.nodes),"
        " (select count(*) from df.vars), (select count(*) from pgdurable.signals)"
    ).fetchone()


def test_second_role_sees_and_touches_nothing(db):
    a = db.create_role("ra")
    b = db.create_role("rb")
    with db.connect(a) as ca, db.connect(b) as cb, db.connect() as admin:
        iid = one(ca, "select df.start('select 1', 'mine')")
        ca.execute("select df.setvar('secret', 's3')")
        assert one(cb, "select count(*) from df.instances") == 0
        assert one(cb, "select count(*) from df.nodes") == 0
        assert one(cb, "select count(*) from df.vars") == 0
        assert cb.execute("select * from df.list_instances()").fetchall() == []
        assert cb.execute("select * from df.list_instances(null, 10, 'mine')").fetchall() == []
        assert cb.execute("select * from df.instance_nodes(%s)", (iid,)).fetchall() == []
        assert cb.execute("select * from df.instance_info(%s)", (iid,)).fetchall() == []
        assert one(cb, "select df.status(%s)", (iid,)) is None
        assert one(cb, "select df.result(%s)", (iid,)) is None
        assert one(cb, "select df.error(%s)", (iid,)) is None
        assert one(cb, "select df.getvar('secret')") is None
        before = counts(admin)
        for q in [
            "select df.signal(%s, 'go')",
            "select df.cancel(%s)",
            "select df.await_instance(%s, 1)",
            "select df.explain(%s)",
        ]:
            with pytest.raises(psycopg.errors.NoDataFound, match="not found or access denied"):
                cb.execute(q, (iid,))
        # the SECURITY DEFINER helpers re-check ownership when called directly
        for q in [
            "select pgdurable._signal_v1(%s, 'go', '{}')",
            "select pgdurable._cancel_v1(%s, 'x')",
            'select pgdurable._enqueue_v1(%s, \'{"secret": "injected"}\')',
        ]:
            with pytest.raises(psycopg.errors.NoDataFound, match="not found or access denied"):
                cb.execute(q, (iid,))
        # b cannot forge rows of a (RLS WITH CHECK) nor flip its status
        with pytest.raises(psycopg.Error):
            cb.execute(
                "insert into df.instances (id, root_node, submitted_by) values "
                "('0000aaaa', '0000bbbb', %s::regrole)",
                (a,),
            )
        cb.execute("update df.instances set status = 'completed' where id = %s", (iid,))
        assert counts(admin) == before
        assert one(admin, "select status from df.instances where id = %s", (iid,)) == "pending"
        assert one(admin, "select vars from pgdurable.runs where instance_id = %s", (iid,)) == {}
        # a's own view is intact
        assert one(ca, "select df.getvar('secret')") == "s3"
        assert one(ca, "select df.status(%s)", (iid,)) == "pending"


def test_role_without_grant_is_denied_everything(db):
    owner = db.create_role("ro")
    nobody = db.create_role("rn", grant=False)
    with db.connect(owner) as co, db.connect(nobody) as cn, db.connect() as admin:
        iid = one(co, "select df.start('select 1')")
        before = counts(admin)
        for q, params in [
            ("select df.start('select 1')", ()),
            ("select df.status(%s)", (iid,)),
            ("select df.signal(%s, 'go')", (iid,)),
            ("select df.cancel(%s)", (iid,)),
            ("select * from df.list_instances()", ()),
            ("select df.setvar('a', 'b')", ()),
            ("select df.explain('select 1')", ()),
            ("select count(*) from df.instances", ()),
            ("select pgdurable._cancel_v1(%s, 'x')", (iid,)),
            ("select count(*) from pgdurable.tasks", ()),
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                cn.execute(q, params)
        assert counts(admin) == before


def test_public_privileges(db):
    with db.connect() as admin:

        def fn(name):
            return one(admin, "select has_function_privilege('public', %s, 'execute')", (name,))

        assert fn("df.start(text,text,text,text,text)")
        assert fn("df.status(text)")
        assert fn("df.sql(text)")
        for name in [
            "df.metrics()",
            "df.grant_usage(text,boolean,boolean)",
            "df.revoke_usage(text)",
            "df.http(text,text,text,jsonb,integer)",
            "df.http_multipart(text,text,jsonb,jsonb,integer)",
            "pgdurable._enqueue_v1(varchar,jsonb)",
            "pgdurable._cancel_v1(varchar,text)",
        ]:
            assert not fn(name), name
        assert not one(admin, "select has_schema_privilege('public', 'df', 'usage')")
        assert not one(admin, "select has_schema_privilege('public', 'pgdurable', 'usage')")
        assert not one(admin, "select has_table_privilege('public', 'df.instances', 'select')")
        assert not one(admin, "select has_table_privilege('public', 'pgdurable.tasks', 'select')")


def test_grant_usage_exact_grants_and_revoke(db):
    r = db.create_role("rg", http=True)
    plain = db.create_role("rp")
    with db.connect() as admin:

        def has(kind, obj, priv, role=r):
            return one(admin, f"select has_{kind}_privilege(%s, %s, %s)", (role, obj, priv))

        assert has("schema", "df", "usage")
        assert has("table", "df.instances", "select")
        assert has("table", "df.nodes", "select")
        assert not has("table", "df.instances", "delete")
        assert not has("table", "df.nodes", "update")
        assert one(
            admin, "select has_column_privilege(%s, 'df.instances', 'status', 'update')", (r,)
        )
        assert not one(
            admin, "select has_column_privilege(%s, 'df.instances', 'submitted_by', 'update')", (r,)
        )
        assert not one(
            admin, "select has_column_privilege(%s, 'df.instances', 'status', 'insert')", (r,)
        )
        assert one(admin, "select has_column_privilege(%s, 'df.nodes', 'query', 'insert')", (r,))
        assert not one(
            admin, "select has_column_privilege(%s, 'df.nodes', 'result', 'insert')", (r,)
        )
        # df.vars: SELECT only (pg_durable grants DML too, which lets any tenant LOCK the
        # shared table ACCESS EXCLUSIVE and stall every df.start); df.setvar writes it
        assert has("table", "df.vars", "select")
        for p in ["insert", "update", "delete", "truncate"]:
            assert not has("table", "df.vars", p)
        # the step runner, made as the role, verified by the engine
        assert one(admin, "select pgdurable._runner_ok_v1(%s::regrole::oid)", (r,))
        assert has("table", "df.workers", "select")
        assert has("function", "df.http(text,text,text,jsonb,integer)", "execute")
        assert not has("function", "df.http(text,text,text,jsonb,integer)", "execute", plain)
        assert not has("function", "df.metrics()", "execute")
        # with_grant: grant option + the admin helpers + metrics
        admin.execute("select df.grant_usage(%s, false, true)", (plain,))
        assert has("function", "df.metrics()", "execute", plain)
        assert has("table", "df.instances", "select with grant option", plain)
        # revoke mirrors it
        admin.execute("select df.revoke_usage(%s)", (r,))
        assert not has("schema", "df", "usage")
        assert not has("table", "df.instances", "select")
        assert not one(
            admin, "select has_column_privilege(%s, 'df.instances', 'status', 'update')", (r,)
        )
        assert not has("function", "df.http(text,text,text,jsonb,integer)", "execute")
        assert not has("function", "pgdurable._enqueue_v1(varchar,jsonb)", "execute")
    with db.connect(r) as cr, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cr.execute("select df.start('select 1')")


def test_delegated_admin_can_grant(db):
    boss = db.create_role("rb")
    worker = db.create_role("rw", grant=False)
    with db.connect() as admin:
        admin.execute("select df.grant_usage(%s, false, true)", (boss,))
    with db.connect(boss) as cb:
        notices: list[str] = []
        cb.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        cb.execute("select df.grant_usage(%s)", (worker,))
        # boss cannot act as worker: the grants are made, the runner is not, and it says so
        assert any("step runner" in n and "was not made" in n for n in notices), notices
        assert not one(cb, "select pgdurable._runner_ok_v1(%s::regrole::oid)", (worker,))
    with db.connect(worker) as cw:
        iid = one(cw, "select df.start('select 1')")
        assert one(cw, "select df.status(%s)", (iid,)) == "pending"


def test_runners_of_schema_version_3_stay_valid_and_nothing_else_does(db):
    """A runner made before the runner body reported rows_affected (schema 3) keeps working
    until df.grant_usage re-makes it; any other body, or a SET clause, is refused."""
    r = db.create_role("rv")
    with db.connect() as admin:
        fn = f"pgdurable_exec.step_{one(admin, 'select %s::regrole::oid', (r,))}"
        assert one(admin, "select pgdurable._runner_ok_v1(%s::regrole::oid)", (r,))

        def remake(body_sql):
            body = one(admin, body_sql)
            admin.execute("begin")
            # as df.grant_usage makes it: the role, given CREATE on the schema for the moment
            admin.execute(
                sql.SQL("grant create on schema pgdurable_exec to {}").format(sql.Identifier(r))
            )
            admin.execute(sql.SQL("set local role {}").format(sql.Identifier(r)))
            admin.execute(
                sql.SQL(
                    "create or replace function {}(p_cap pg_catalog.text, p_sql "
                    "pg_catalog.text, p_max_bytes pg_catalog.int8) returns setof "
                    "pg_catalog.json language plpgsql volatile security definer as {}"
                ).format(sql.SQL(fn), sql.Literal(body))
            )
            admin.execute("reset role")
            admin.execute(
                sql.SQL("revoke create on schema pgdurable_exec from {}").format(sql.Identifier(r))
            )
            admin.execute("commit")
            return one(admin, "select pgdurable._runner_ok_v1(%s::regrole::oid)", (r,))

        assert remake("select pgdurable._runner_body_schema3_v1()")
        assert not remake(
            "select replace(pgdurable._runner_body_v1(), 'set constraints all immediate;', '')"
        )
        assert remake("select pgdurable._runner_body_v1()")
