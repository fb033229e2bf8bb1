"""Security and multi-tenancy, end to end against a running ``pgdurable serve`` (docs/security.md).

Three kinds of role take part: two tenants A and B (``df.grant_usage``), one role without the
grant, and the service's own login role (the test cluster's superuser). What is proved:

- a step runs as its submitting role and cannot leave it: RESET ROLE, SET ROLE, SET SESSION
  AUTHORIZATION, set_config('role'/'session_authorization'), a tenant's own SECURITY
  DEFINER / SET-clause functions all fail with PostgreSQL's error; privileged reads and
  writes get ``permission denied``; the engine tables, the worker protocol functions and the
  step runner itself are out of reach;
- tenants are isolated end to end (status, result, nodes, explain, list, signal, cancel,
  await, vars) and a role without the grant gets ``permission denied`` and writes nothing;
- the executor re-checks identities when it first loads an instance: a forged superuser
  submission, a dropped role and a role without LOGIN fail before any step runs;
- limits fail with their documented errors and lose nothing else.

Each test starts one ``serve`` and runs many instances concurrently through it.
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from psycopg import sql

from tests.fix_sql import one

pytestmark = pytest.mark.timeout(240)

ROLE_MSG = 'cannot set parameter "role" within security-definer function'
AUTH_MSG = 'cannot set parameter "session_authorization" within security-definer function'


# -- helpers ---------------------------------------------------------------------------------------


def start(conn, step_sql: str) -> str:
    """df.start of one SQL step (passed as a parameter: no quoting games)."""
    return one(conn, "select df.start(%s)", (step_sql,))


def outcome(conn, iid: str, timeout: int = 60) -> tuple[str, object, dict | None]:
    """(status, result, error) once the instance is terminal."""
    status = one(conn, "select df.await_instance(%s, %s)", (iid, timeout))
    result = one(conn, "select df.result(%s)", (iid,))
    error = one(conn, "select df.error(%s)", (iid,))
    return status, (json.loads(result) if result else None), error


def service_role(db) -> str:
    with db.connect() as conn:
        return one(conn, "select current_user::text")


def runner_name(db, role: str) -> str:
    with db.connect() as conn:
        return one(conn, "select 'pgdurable_exec.step_' || %s::regrole::oid", (role,))


def ident(name: str) -> str:
    return sql.Identifier(name).as_string(None)


@pytest.fixture
def tenants(db):
    """Tenants A and B (granted), each with a private table and a schema of its own."""
    a = db.create_role("ta")
    b = db.create_role("tb")
    with db.connect() as conn:
        conn.execute("create table public.service_secret (v text)")
        conn.execute("insert into public.service_secret values ('only the service reads this')")
        for r in (a, b):
            conn.execute(
                sql.SQL("create schema {} authorization {}").format(
                    sql.Identifier(r), sql.Identifier(r)
                )
            )
        conn.execute("create table public.marker (who text, what text)")
        conn.execute(
            sql.SQL("grant insert, select on public.marker to {}, {}").format(
                sql.Identifier(a), sql.Identifier(b)
            )
        )
    with db.connect(b) as cb:
        cb.execute(f"create table {ident(b)}.b_private (v text)")
        cb.execute(f"insert into {ident(b)}.b_private values ('b data')")
        cb.execute("select df.setvar('b_secret', 'b var value')")
    with db.connect(a) as ca:
        ca.execute("select df.setvar('a_var', 'a var value')")
    return a, b


# -- 1. a step cannot leave its role ---------------------------------------------------------------


def test_step_runs_as_tenant_and_cannot_change_identity(db, serve_factory, tenants):
    a, b = tenants
    svc = service_role(db)
    s = serve_factory(db)
    s.wait_workers(2)
    with db.connect(a) as ca:
        # who am I inside a step (this also creates A's runner)
        iid = start(
            ca,
            "select current_user::text as cu, "
            "current_setting('role') as role_setting, "
            "current_setting('df.in_workflow') as in_wf, "
            "(select count(*) from df.instances) as visible_instances, "
            "(select count(*) from df.vars) as visible_vars, "
            "(select string_agg(name, ',') from df.vars) as var_names, "
            "df.getvar('b_secret') as b_secret",
        )
        status, result, err = outcome(ca, iid)
        assert status == "completed", err
        row = result["rows"][0]
        assert row["cu"] == a
        assert row["role_setting"] == "none"
        assert row["in_wf"] == "true"
        # RLS applies to the step as A: its own instance only, its own vars only
        assert row["visible_instances"] == 1
        assert row["var_names"] == "a_var"
        assert row["b_secret"] is None

        # tenant A's own escalation helpers, created from A's own session
        ca.execute(f"""
            create function {ident(a)}.esc_invoker() returns text language plpgsql as $$
            begin execute 'set role {svc}'; return current_user; end $$""")
        ca.execute(f"""
            create function {ident(a)}.esc_definer() returns text language plpgsql
            security definer as $$
            begin execute 'reset role'; execute 'set session authorization {svc}';
                  return current_user; end $$""")
        with pytest.raises(psycopg.Error) as exc:
            # a SET clause naming a role A is not a member of is refused at CREATE already
            ca.execute(
                f"create function {ident(a)}.esc_setclause() returns text "
                f"language sql set role = {ident(svc)} as 'select current_user::text'"
            )
        assert exc.value.sqlstate == "42501"
        runner = runner_name(db, a)

        attempts: dict[str, tuple[str, str | None]] = {
            # step text -> (expected sqlstate, expected message substring)
            "reset role": ("42501", ROLE_MSG),
            f"set role {ident(b)}": ("42501", ROLE_MSG),
            f"set role {ident(svc)}": ("42501", ROLE_MSG),
            "set role none": ("42501", ROLE_MSG),
            f"set session authorization {ident(svc)}": ("42501", AUTH_MSG),
            "reset session authorization": ("42501", AUTH_MSG),
            f"select set_config('role', '{svc}', false)": ("42501", ROLE_MSG),
            f"select set_config('role', '{b}', true)": ("42501", ROLE_MSG),
            f"select set_config('session_authorization', '{svc}', false)": ("42501", AUTH_MSG),
            f"select {ident(a)}.esc_invoker()": ("42501", ROLE_MSG),
            f"select {ident(a)}.esc_definer()": ("42501", ROLE_MSG),
            # privileges stay A's
            "select * from public.service_secret": ("42501", "permission denied"),
            f"select * from {ident(b)}.b_private": ("42501", "permission denied"),
            f"alter role {ident(a)} superuser": ("42501", None),
            f"grant {ident(svc)} to {ident(a)}": ("42501", None),
            "select pg_read_file('PG_VERSION')": ("42501", "permission denied"),
            "copy (select 1) to program 'true'": ("42501", None),
            # the engine: tables, worker protocol, the step runner
            "select count(*) from pgdurable.runs": ("42501", "permission denied"),
            "select count(*) from pgdurable.tasks": ("42501", "permission denied"),
            "delete from pgdurable.tasks": ("42501", "permission denied"),
            "select * from pgdurable._claim_v1('x', 100, 30)": ("42501", "permission denied"),
            (
                "select pgdurable._apply_v1('x', 'i', 'n', 0, 0, null, 'completed', null, null, "
                "null, null, 5)"
            ): ("42501", "permission denied"),
            (
                "select pgdurable._apply_v2('x', 5, '{i}', '{0}', '{1}', '{completed}', "
                "'{null}', '{}', '{}', '{}', '{}', '{}', null, null, null)"
            ): ("42501", "permission denied"),
            "select pgdurable._rescue_v1(1000)": ("42501", "permission denied"),
            "select pgdurable._step_begin_v1('guess', 1)": ("42501", "permission denied"),
            f"alter function {runner}(text, text, bigint) security invoker": (
                "42501",
                "permission denied",
            ),
            f"select {runner}('guess', 'select 1', 100)": ("42501", "permission denied"),
            f"update df.instances set submitted_by = '{b}'::regrole": (
                "42501",
                "permission denied",
            ),
            # tenants hold only SELECT on df.vars (df.setvar writes through the engine)
            f"insert into df.vars (name, value, owner) values ('x', 'y', '{b}'::regrole)": (
                "42501",
                "permission denied",
            ),
            "lock table df.vars in access exclusive mode": ("42501", "permission denied"),
            "select df.setvar('x', 'y')": ("0A000", "cannot be called inside a workflow"),
        }
        ids = {start(ca, step): step for step in attempts}
        failures = []
        for iid, step in ids.items():
            status, _, err = outcome(ca, iid)
            want_state, want_msg = attempts[step]
            if (
                status != "failed"
                or err is None
                or err["sqlstate"] != want_state
                or (want_msg and want_msg not in err["error"])
            ):
                failures.append((step, status, err))
        assert failures == [], "\n".join(map(repr, failures))

        # the step that tried set_config('role') left no trace on later steps of the pool:
        # many later steps all still run as A with role 'none'
        later = [
            start(
                ca,
                "select current_user::text as cu, current_setting('role') as r, "
                "session_user = current_user as same",
            )
            for _ in range(12)
        ]
        for iid in later:
            status, result, err = outcome(ca, iid)
            assert status == "completed", err
            assert result["rows"] == [{"cu": a, "r": "none", "same": False}]

    with db.connect() as admin:
        assert one(admin, "select rolsuper from pg_roles where rolname = %s", (a,)) is False
        assert one(admin, "select pg_has_role(%s, %s, 'member')", (a, svc)) is False
        assert one(admin, "select count(*) from public.service_secret") == 1
        assert one(admin, f"select count(*) from {ident(b)}.b_private") == 1
        assert (
            one(admin, "select prosecdef from pg_proc where oid = %s::regproc", (runner,)) is True
        )
        # no stray tasks were deleted or leased by anyone else
        assert (
            one(
                admin,
                "select count(*) from df.instances where status not in ('completed', 'failed')",
            )
            == 0
        )


# -- 2. a step's session state does not outlive the step -------------------------------------------


# Regression guard: pooled step connections leaked session state (search_path, temp objects)
# into the service's queries and other tenants' steps; fixed by DISCARD ALL after every step,
# a pg_catalog search_path pin after the statement and pg_catalog-qualified worker queries.
def test_step_session_state_does_not_leak_to_service_or_other_tenants(db, serve_factory, tenants):
    a, b = tenants
    svc = service_role(db)
    with db.connect(a) as ca:
        # trojans in A's schema, reachable by everyone once A's schema is on a search_path
        ca.execute(f"grant usage on schema {ident(a)} to public")
        for fn, body in [
            ("set_config(text, text, boolean)", "return pg_catalog.set_config($1, $2, $3);"),
            ("lower(text)", "return pg_catalog.lower($1);"),
        ]:
            ca.execute(f"""
                create function {ident(a)}.{fn} returns text language plpgsql as $$
                begin
                    insert into public.marker values (current_user, 'trojan {fn.split("(")[0]}');
                    {body}
                end $$""")
    with db.connect(b) as cb:
        cb.execute(f"create table {ident(b)}.notes (v text)")
    # one worker with one slot: its few pooled connections are reused step after step
    s = serve_factory(db, PGDURABLE_WORKERS="1", PGDURABLE_SLOTS="1")
    s.wait_workers(1)
    taint = (
        "do $$ begin "
        f"perform pg_catalog.set_config('search_path', '{a}, pg_catalog', false); "
        "perform pg_catalog.set_config('app.leak', 'left by A', false); "
        "create temp table if not exists notes (v text); "
        "grant all on pg_temp.notes to public; end $$"
    )
    with db.connect(a) as ca:
        for iid in [start(ca, taint) for _ in range(6)]:  # more than the pool's connections
            outcome(ca, iid)
    probe = (
        "with ins as (insert into notes values ('b secret') returning 1) "
        "select current_setting('search_path') as sp, "
        "current_setting('app.leak', true) as leak, lower('X') as l, "
        "(select count(*) from ins) as n"
    )
    with db.connect(b) as cb:
        probes = [outcome(cb, iid) for iid in [start(cb, probe) for _ in range(6)]]
        b_rows = one(cb, f"select count(*) from {ident(b)}.notes")
    with db.connect() as admin:
        trojans = admin.execute(
            "select who, what from public.marker where what like 'trojan%%'"
        ).fetchall()
    assert not [t for t in trojans if t[0] == svc], f"trojan ran as the service role: {trojans}"
    assert trojans == [], f"A's trojan ran as another role: {trojans}"
    for status, result, err in probes:
        assert status == "completed", err
        # the value must not survive; after DISCARD ALL PostgreSQL keeps a once-set custom
        # GUC defined for the session with its default '' (no value leaks, only the name)
        assert result["rows"][0]["leak"] in (None, "")
        assert a not in result["rows"][0]["sp"]
    assert b_rows == 6, "B's rows went into A's temp table"


# -- 3. the engine's SECURITY DEFINER helpers, called from a step ----------------------------------


# Regression guard: engine helpers identified a step's caller as the service's session_user;
# fixed by @engine@.step_sessions (the worker records the step's role per transaction).
def test_step_cannot_use_engine_helpers_on_other_tenants(db, serve_factory, tenants):
    a, b = tenants
    svc = service_role(db)
    with db.connect() as admin:
        # the worst case for _new_start_v1: 'new' mode is usable (dblink installed)
        admin.execute("create extension if not exists dblink")
    s = serve_factory(db)
    s.wait_workers(2)
    with db.connect(b) as cb:
        b_wait = [
            one(
                cb,
                "select df.start(df.wait_for_signal('go', 120) ~> "
                "df.sql('select ''b done'' as r'))",
            )
            for _ in range(2)
        ]
    with db.connect(a) as ca:
        steps = {
            f"select pgdurable._signal_v1('{b_wait[0]}', 'go', '\"forged by A\"')": "not found or access denied",
            f"select pgdurable._cancel_v1('{b_wait[1]}', 'cancelled by A')": "not found or access denied",
            f"select pgdurable._new_start_v1('{svc}', 'select 1', null, null)": "must be called directly by the submitting role",
        }
        got = {step: outcome(ca, start(ca, step), timeout=30) for step in steps}
    time.sleep(1)
    with db.connect(b) as cb:
        b_status = [one(cb, "select df.status(%s)", (i,)) for i in b_wait]
    problems = [
        (step, st, err)
        for step, (st, _, err) in got.items()
        if st != "failed" or steps[step] not in (err or {}).get("error", "")
    ]
    assert (problems, b_status) == ([], ["running", "running"])


# -- 4. tenants are isolated end to end ------------------------------------------------------------


def test_tenants_isolated_and_ungranted_role_denied(db, serve_factory, tenants):
    a, b = tenants
    c = db.create_role("tc", grant=False)
    s = serve_factory(db)
    s.wait_workers(2)
    with db.connect(b) as cb:
        b_done = one(cb, "select df.start('select ''b result'' as r', 'b-label')")
        assert outcome(cb, b_done)[0] == "completed"
        b_wait = one(
            cb,
            "select df.start(df.wait_for_signal('go', 120) ~> "
            "df.sql('select ''b done'' as r'), 'b-label')",
        )
    with db.connect(a) as ca:
        # from A's own session
        for iid in (b_done, b_wait):
            assert one(ca, "select df.status(%s)", (iid,)) is None
            assert one(ca, "select df.result(%s)", (iid,)) is None
            assert one(ca, "select df.error(%s)", (iid,)) is None
            assert ca.execute("select * from df.instance_nodes(%s)", (iid,)).fetchall() == []
            assert ca.execute("select * from df.instance_info(%s)", (iid,)).fetchall() == []
            assert ca.execute("select * from df.instance_executions(%s)", (iid,)).fetchall() == []
            for q in (
                "select df.signal(%s, 'go', '\"from A\"')",
                "select df.cancel(%s)",
                "select df.await_instance(%s, 1)",
                "select df.explain(%s)",
            ):
                with pytest.raises(psycopg.errors.NoDataFound, match="not found or access denied"):
                    ca.execute(q, (iid,))
        assert ca.execute("select * from df.list_instances()").fetchall() == []
        assert ca.execute("select * from df.list_instances(null, 100, 'b-label')").fetchall() == []
        assert one(ca, "select df.getvar('b_secret')") is None
        assert one(ca, "select count(*) from df.vars") == 1
        assert one(ca, "select count(*) from df.nodes") == 0
        # and from inside A's steps (RLS applies to the step's role)
        steps = {
            f"select df.cancel('{b_wait}')": "not found or access denied",
            f"select df.signal('{b_wait}', 'go', 'from A')": "not found or access denied",
            f"select df.explain('{b_wait}')": "not found or access denied",
            f"select df.await_instance('{b_wait}', 1)": "cannot be called inside a workflow",
            f"update df.instances set status = 'completed' where id = '{b_wait}' returning id": None,
        }
        got = {step: outcome(ca, start(ca, step)) for step in steps}
        for step, want in steps.items():
            status, result, err = got[step]
            if want is None:  # RLS: the UPDATE sees no row of B
                assert status == "completed", err
                assert result["row_count"] == 0
            else:
                assert status == "failed", (step, status, err)
                assert want in err["error"], (step, err)
        peek = start(
            ca,
            f"select (select count(*) from df.instances where id = '{b_wait}') as i, "
            f"(select count(*) from df.nodes where instance_id = '{b_wait}') as n, "
            "(select count(*) from df.vars where name = 'b_secret') as v, "
            f"df.status('{b_wait}') as st",
        )
        status, result, err = outcome(ca, peek)
        assert status == "completed", err
        assert result["rows"] == [{"i": 0, "n": 0, "v": 0, "st": None}]
    # a role without df.grant_usage: permission denied everywhere, nothing written
    with db.connect() as admin:
        before = admin.execute(
            "select (select count(*) from df.instances), "
            "(select count(*) from df.nodes), (select count(*) from df.vars), "
            "(select count(*) from pgdurable.tasks)"
        ).fetchone()
    with db.connect(c) as cc:
        for q in [
            "select df.start('select 1')",
            "select df.start('select 1', null, null, 'new')",
            f"select df.status('{b_wait}')",
            f"select df.signal('{b_wait}', 'go')",
            f"select df.cancel('{b_wait}')",
            f"select df.await_instance('{b_wait}', 1)",
            "select * from df.list_instances()",
            "select df.setvar('k', 'v')",
            "select df.getvar('b_secret')",
            "select count(*) from df.instances",
            "select count(*) from df.vars",
            f"select pgdurable._cancel_v1('{b_wait}', 'x')",
            f"select pgdurable._signal_v1('{b_wait}', 'go', '{{}}')",
            "select count(*) from pgdurable.runs",
            f"insert into df.instances (id, root_node, submitted_by) values "
            f"('0000aaaa', '0000bbbb', '{c}'::regrole)",
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                cc.execute(q)
    with db.connect() as admin:
        after = admin.execute(
            "select (select count(*) from df.instances), "
            "(select count(*) from df.nodes), (select count(*) from df.vars), "
            "(select count(*) from pgdurable.tasks)"
        ).fetchone()
    assert after == before
    # B's instance was untouched by all of it and B can still drive it
    with db.connect(b) as cb:
        assert one(cb, "select df.status(%s)", (b_wait,)) == "running"
        cb.execute("select df.signal(%s, 'go', '\"from B\"')", (b_wait,))
        status, result, err = outcome(cb, b_wait)
        assert status == "completed", err
        assert result["rows"] == [{"r": "b done"}]
        sig = one(
            cb,
            "select n.result from df.nodes n where n.instance_id = %s and n.node_type = 'SIGNAL'",
            (b_wait,),
        )
        assert sig["data"] == "from B"
        assert one(cb, "select df.getvar('b_secret')") == "b var value"


# -- 5. identities are re-checked when the executor loads an instance ------------------------------


def test_identity_rechecked_at_load_before_any_step(db, serve_factory, tenants):
    a, _ = tenants
    su = db.create_role("tsu", grant=False, superuser=True)
    gone = db.create_role("tgone")
    nolog = db.create_role("tnolog")
    insert = "insert into public.marker values (current_user, '{}')"
    with db.connect() as admin:
        for r in (gone, nolog):
            admin.execute(sql.SQL("grant insert on public.marker to {}").format(sql.Identifier(r)))
    # no serve yet: the instances queue as pending
    with db.connect(a) as ca:
        control = start(ca, insert.format("control"))
    with db.connect(gone) as cg:
        dropped = start(cg, insert.format("dropped role ran"))
    with db.connect(nolog) as cn:
        nologin = start(cn, insert.format("nologin role ran"))
    with db.connect(autocommit=False) as admin:
        # a forged instance: the table owner (RLS does not apply) writes rows claiming a
        # superuser submitted them, then hands them to the engine
        forged = "f0f0f0f0"
        admin.execute(
            "insert into df.instances (id, root_node, submitted_by) "
            "values (%s, 'a0a0a0a0', %s::regrole)",
            (forged, su),
        )
        admin.execute(
            "insert into df.nodes (id, instance_id, node_type, query, submitted_by) "
            "values ('a0a0a0a0', %s, 'SQL', %s, %s::regrole)",
            (forged, insert.format("forged superuser ran"), su),
        )
        admin.execute("select pgdurable._enqueue_v1(%s, '{}')", (forged,))
        admin.commit()
    with db.connect() as admin:
        admin.execute(sql.SQL("revoke all on public.marker from {}").format(sql.Identifier(gone)))
        admin.execute("select df.revoke_usage(%s)", (gone,))
        admin.execute(sql.SQL("drop role {}").format(sql.Identifier(gone)))
        admin.execute(sql.SQL("alter role {} nologin").format(sql.Identifier(nolog)))
    s = serve_factory(db)
    s.wait_workers(2)
    with db.connect() as admin:  # the superuser sees every row (RLS is not forced)
        got = {}
        for name, iid in [
            ("control", control),
            ("dropped", dropped),
            ("nologin", nologin),
            ("forged", forged),
        ]:
            status = one(admin, "select df.await_instance(%s, 60)", (iid,))
            err = one(admin, "select df.error(%s)", (iid,))
            got[name] = (status, err and err["error"])
        marker = admin.execute("select who, what from public.marker").fetchall()
        runners = one(
            admin,
            "select count(*) from pg_proc where pronamespace = "
            "'pgdurable_exec'::regnamespace and proname = any(%s)",
            ([f"step_{one(admin, 'select %s::regrole::oid', (r,))}" for r in (su,)],),
        )
    assert got["control"] == ("completed", None)
    assert got["dropped"][0] == "failed", got
    assert "no longer exists" in got["dropped"][1]
    assert got["nologin"][0] == "failed", got
    assert "LOGIN" in got["nologin"][1]
    assert got["forged"][0] == "failed", got
    assert "superuser" in got["forged"][1]
    assert "enable_superuser_instances" in got["forged"][1]
    assert marker == [(a, "control")], "a refused instance ran a step"
    # df.grant_usage makes no runner for a superuser (its steps would run as one)
    assert runners == 0, "a step runner was created for a superuser"


# -- 6. limits fail with their documented errors and lose nothing else -----------------------------


def test_limits_fail_cleanly(db, serve_factory, tenants):
    a, _ = tenants
    s = serve_factory(db)
    s.wait_workers(2)
    after = "insert into public.marker values (current_user, '{}')"
    with db.connect(a) as ca:
        ids = {
            # 11 MiB result: over the 10 MiB step-result cap
            "big": one(
                ca,
                "select df.start(df.sql(%s) ~> df.sql(%s))",
                ("select repeat('x', 11 * 1024 * 1024) as big", after.format("after big")),
            ),
            # $n.* expands at most 10,000 rows
            "star": one(
                ca,
                "select df.start(df.sql(%s) |=> 'rows' ~> df.sql(%s) ~> df.sql(%s))",
                (
                    "select g from generate_series(1, 10001) g",
                    "select count(*) as n from $rows.*",
                    after.format("after star"),
                ),
            ),
            "star_ok": one(
                ca,
                "select df.start(df.sql(%s) |=> 'rows' ~> df.sql(%s))",
                (
                    "select g from generate_series(1, 10000) g",
                    "select count(*) as n, sum(g) as s from $rows.*",
                ),
            ),
            "control": start(ca, after.format("control")),
        }
        got = {k: outcome(ca, iid) for k, iid in ids.items()}
        # page size above pg_durable.list_instances_max_limit (default 1000)
        with pytest.raises(psycopg.Error, match=r"list_instances_max_limit \(1000\)"):
            ca.execute("select * from df.list_instances(null, 1001, null, null)")
        with pytest.raises(psycopg.Error, match=r"list_instances_max_limit \(1000\)"):
            ca.execute("select * from df.list_instances(null, 1001)")
        listed = ca.execute(
            "select instance_id from df.list_instances(null, 1000, null, null)"
        ).fetchall()
    status, _, err = got["big"]
    assert status == "failed"
    assert "over the limit of 10485760 bytes" in err["error"], err
    status, _, err = got["star"]
    assert status == "failed"
    assert "10001 rows, more than the 10000" in err["error"], err
    status, result, err = got["star_ok"]
    assert status == "completed", err
    assert result["rows"] == [{"n": 10000, "s": 50005000}]
    assert got["control"][0] == "completed"
    assert sorted(r[0] for r in listed) == sorted(ids.values())
    with db.connect() as admin:
        marker = admin.execute("select what from public.marker").fetchall()
        big_node = one(
            admin,
            "select status from df.nodes where instance_id = %s and query like 'select repeat%%'",
            (ids["big"],),
        )
    assert marker == [("control",)], "a step after a failed limit ran"
    assert big_node == "failed"


# Regression guard: SQLSTATE classes psycopg maps to OperationalError (40, 53-58) were
# retried forever; now a statement's error fails the step whatever its class.
def test_step_error_of_class_55_fails_the_step(db, serve_factory, tenants):
    a, _ = tenants
    s = serve_factory(db)
    s.wait_workers(2)
    with db.connect(a) as ca:
        iid = start(
            ca, "do $$ begin raise exception 'tenant says no' using errcode = '55000'; end $$"
        )
        status = one(ca, "select df.await_instance(%s, 6)", (iid,))
        err = one(ca, "select df.error(%s)", (iid,))
    assert status == "failed"
    assert "tenant says no" in err["error"]
