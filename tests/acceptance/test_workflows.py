"""End-to-end: `pgdurable serve` runs workflows of every node type to the specified shape."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def tenant(db):
    role = db.create_role("tenant")
    with db.connect() as conn:
        conn.execute(
            "create table public.ledger (instance text, k int, at timestamptz "
            "default clock_timestamp())"
        )
        conn.execute(f'grant all on public.ledger to "{role}"')
        conn.execute(f'grant create, usage on schema public to "{role}"')
    return role


@pytest.fixture
def running(db, serve_factory, tenant):
    s = serve_factory(db)
    s.wait_workers(2)
    return s


def run(db, role, expr, timeout=60, label=None):
    """Start EXPR as ROLE, await it, return (status, result, error)."""
    with db.connect(role) as conn:
        iid = conn.execute(f"select df.start({expr}, %s)", (label,)).fetchone()[0]
        status = conn.execute("select df.await_instance(%s, %s)", (iid, timeout)).fetchone()[0]
        result = conn.execute("select df.result(%s)", (iid,)).fetchone()[0]
        error = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
    return iid, status, (json.loads(result) if result else None), error


def test_single_sql_step(db, running, tenant):
    _, status, result, _ = run(db, tenant, "'select 1 as a, ''x'' as b'")
    assert status == "completed"
    assert result["rows"] == [{"a": 1, "b": "x"}]
    assert result["row_count"] == 1


def test_sequence_named_results_and_substitution(db, running, tenant):
    expr = (
        "df.sql('select 20 as n') |=> 'first' ~> "
        "df.sql('select $first.n * 2 as doubled, $first as whole')"
    )
    _, status, result, err = run(db, tenant, expr)
    assert status == "completed", err
    assert result["rows"] == [{"doubled": 40, "whole": 20}]


def test_join_returns_array_in_branch_order(db, running, tenant):
    expr = "df.sql('select 1 as a') & df.sql('select 2 as b')"
    _, status, result, err = run(db, tenant, expr)
    assert status == "completed", err
    assert [r["rows"] for r in result] == [[{"a": 1}], [{"b": 2}]]


def test_join3_and_named_results_after_join(db, running, tenant):
    expr = (
        "df.join3(df.sql('select 1 as v') |=> 'x', df.sql('select 2 as v') |=> 'y',"
        " df.sql('select 3 as v') |=> 'z') ~> df.sql('select $x + $y + $z as total')"
    )
    _, status, result, err = run(db, tenant, expr)
    assert status == "completed", err
    assert result["rows"] == [{"total": 6}]


@pytest.mark.parametrize(
    ("cond", "expected"), [("select true", "yes"), ("select 0", "no"), ("select 'no'::text", "no")]
)
def test_if_takes_the_right_arm(db, running, tenant, cond, expected):
    expr = f"df.if(df.sql('{cond.replace(chr(39), chr(39) * 2)}'), 'select ''yes'' as r', 'select ''no'' as r')"
    _, status, result, err = run(db, tenant, expr)
    assert status == "completed", err
    assert result["rows"] == [{"r": expected}]


def test_if_operators(db, running, tenant):
    expr = "'select 1' ?> 'select ''then'' as r' !> 'select ''else'' as r'"
    _, status, result, err = run(db, tenant, expr)
    assert status == "completed", err
    assert result["rows"] == [{"r": "then"}]


def test_if_rows(db, running, tenant):
    expr = (
        "df.sql('select 1 where false') |=> 'e' ~> "
        "df.if_rows('e', 'select ''some'' as r', 'select ''none'' as r')"
    )
    _, status, result, err = run(db, tenant, expr)
    assert status == "completed", err
    assert result["rows"] == [{"r": "none"}]


def test_race_first_finisher_wins(db, running, tenant):
    expr = "df.race(df.sql('select pg_sleep(30)'), df.sql('select ''fast'' as w'))"
    t0 = time.monotonic()
    iid, status, result, err = run(db, tenant, expr)
    assert status == "completed", err
    assert result["rows"] == [{"w": "fast"}]
    assert time.monotonic() - t0 < 20, "the loser's sleep was not interrupted"
    with db.connect() as conn:
        statuses = dict(
            conn.execute(
                "select query, status from df.nodes where instance_id = %s and node_type = 'SQL'",
                (iid,),
            ).fetchall()
        )
        active = conn.execute(
            "select count(*) from pg_stat_activity where query like "
            "'%%pg_sleep(30)%%' and pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert statuses["select pg_sleep(30)"] == "failed"
    assert active == 0


def test_sleep_result_and_timeout_race(db, running, tenant):
    _, status, result, err = run(db, tenant, "df.sleep(1)")
    assert status == "completed", err
    assert result == {"slept": True, "seconds": 1}
    _, status, result, err = run(db, tenant, "df.sql('select pg_sleep(20)') | df.sleep(1)")
    assert status == "completed", err
    assert result == {"slept": True, "seconds": 1}


def test_loop_with_break_carries_results(db, running, tenant):
    with db.connect() as conn:
        conn.execute("alter database " + db.name + " set pg_durable.loop_min_interval_ms = 0")
    # names not yet produced are left as-is (docs/api.md "Substitution"), so seed `i` before the loop
    expr = (
        "df.sql('select 0 as i') |=> 'i' ~> "
        "df.loop(df.sql('select $i + 1 as i') |=> 'i' ~> "
        "df.if(df.sql('select $i >= 5'), df.break('{\"done\": $i}'), 'select 0'))"
    )
    _, status, result, err = run(db, tenant, expr)
    assert status == "completed", err
    assert result == {"done": 5}


def test_do_while_loop(db, running, tenant):
    with db.connect() as conn:
        conn.execute("alter database " + db.name + " set pg_durable.loop_min_interval_ms = 0")
    expr = (
        "df.loop(df.sql('insert into ledger(instance, k) values (''w'', 1) returning k'),"
        " df.sql('select count(*) < 3 from ledger where instance = ''w'''))"
    )
    _, status, _result, err = run(db, tenant, expr)
    assert status == "completed", err
    with db.connect() as conn:
        assert conn.execute("select count(*) from ledger where instance = 'w'").fetchone()[0] == 3


def test_loop_iteration_floor(db, running, tenant):
    expr = (
        "df.loop(df.sql('insert into ledger(instance, k) values (''f'', 1)'),"
        " df.sql('select count(*) < 3 from ledger where instance = ''f'''))"
    )
    _, status, _, err = run(db, tenant, expr)
    assert status == "completed", err
    with db.connect() as conn:
        span = conn.execute(
            "select extract(epoch from max(at) - min(at)) from ledger where instance = 'f'"
        ).fetchone()[0]
    assert float(span) >= 1.9, "iterations ran faster than the 1 s floor"


def test_failure_fails_instance_with_error(db, running, tenant):
    iid, status, result, err = run(db, tenant, "'select 1' ~> 'select 1/0' ~> 'select 2'")
    assert status == "failed"
    assert result is None
    assert "division by zero" in err["error"]
    assert err["sqlstate"] == "22012"
    with db.connect() as conn:
        last = conn.execute(
            "select status from df.nodes where instance_id = %s and query = 'select 2'", (iid,)
        ).fetchone()[0]
    assert last == "pending"


def test_join_failure_names_branch(db, running, tenant):
    _, status, _, err = run(db, tenant, "df.sql('select 1') & df.sql('select 1/0')")
    assert status == "failed"
    assert "division by zero" in err["error"]


def test_break_outside_loop_fails(db, running, tenant):
    _, status, _, _err = run(db, tenant, "'select 1' ~> df.break()")
    assert status == "failed"


def test_signal_sent_before_wait_is_kept(db, running, tenant):
    with db.connect(tenant) as conn:
        iid = conn.execute("select df.start(df.sleep(2) ~> df.wait_for_signal('go'))").fetchone()[0]
        conn.execute("select df.signal(%s, 'go', '{\"k\": 1}')", (iid,))
        assert conn.execute("select df.await_instance(%s, 30)", (iid,)).fetchone()[0] == "completed"
        res = json.loads(conn.execute("select df.result(%s)", (iid,)).fetchone()[0])
    assert res == {"signal_name": "go", "timed_out": False, "data": {"k": 1}}


def test_signal_timeout(db, running, tenant):
    _, status, result, err = run(db, tenant, "df.wait_for_signal('never', 1)")
    assert status == "completed", err
    assert result == {"signal_name": "never", "timed_out": True, "data": None}


def test_cancel_interrupts_running_sql(db, running, tenant):
    with db.connect(tenant) as conn:
        iid = conn.execute("select df.start('select pg_sleep(60)' ~> 'select 1')").fetchone()[0]
        deadline = time.monotonic() + 20
        while (
            conn.execute(
                "select status from df.nodes where instance_id = %s and query = "
                "'select pg_sleep(60)'",
                (iid,),
            ).fetchone()[0]
            != "running"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        conn.execute("select df.cancel(%s, 'enough')", (iid,))
        assert conn.execute("select df.status(%s)", (iid,)).fetchone()[0] == "cancelled"
    deadline = time.monotonic() + 10
    with db.connect() as conn:
        while conn.execute(
            "select count(*) from pg_stat_activity where query like "
            "'%%pg_sleep(60)%%' and pid <> pg_backend_pid()"
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "cancelled step still running"
            time.sleep(0.1)
        rows = conn.execute(
            "select status from df.nodes where instance_id = %s and query = 'select 1'", (iid,)
        ).fetchall()
    assert rows == [("pending",)]
    # what the cancel stopped reads as skipped (⊘), not as failed (✗)
    with db.connect(tenant) as conn:
        inferred = dict(
            conn.execute(
                "select coalesce(query, node_type), inferred_status from df.instance_nodes(%s)",
                (iid,),
            ).fetchall()
        )
        text = conn.execute("select df.explain(%s)", (iid,)).fetchone()[0]
    assert inferred == {
        "THEN": "skipped",
        "select pg_sleep(60)": "skipped",
        "select 1": "skipped",
    }, inferred
    assert "✗" not in text, text
    assert "⊘ SQL: select pg_sleep(60)" in text, text


def test_superuser_submitted_instance_is_refused_at_load(db, running):
    # a forged instance whose submitted_by is a superuser, inserted by the table owner
    with db.connect() as conn:
        conn.execute("set pg_durable.enable_superuser_instances = on")
        iid = conn.execute("select df.start('select 1')").fetchone()[0]
        status = conn.execute("select df.await_instance(%s, 30)", (iid,)).fetchone()[0]
    assert status == "failed"
    with db.connect() as conn:
        res = conn.execute(
            "select result from df.nodes n join df.instances i on "
            "i.root_node = n.id and i.id = n.instance_id where i.id = %s",
            (iid,),
        ).fetchone()[0]
    assert "superuser" in res


def test_steps_in_another_database(db, running, tenant):
    """database => runs steps there (at-least-once), the control plane stays here. The other
    database needs pgdurable installed and the role granted there (its runner); without
    them the step fails saying what to do."""
    import psycopg

    from pgdurable import schema

    other = f"{db.name}_other"
    with psycopg.connect(db.server.install_dsn("postgres"), autocommit=True) as conn:
        conn.execute(f'create database "{other}"')
    try:
        odsn = db.server.dsn(other)
        with psycopg.connect(odsn, autocommit=True) as oc:
            oc.execute("create table t (v int)")
            oc.execute(f'grant all on t to "{tenant}"')
        expr = (
            "'insert into t values (7) returning v' ~> "
            "'select current_database() as db, sum(v) as s, current_user::text as u from t'"
        )
        with db.connect(tenant) as conn:
            iid = conn.execute(f"select df.start({expr}, null, %s)", (other,)).fetchone()[0]
            status = conn.execute("select df.await_instance(%s, 60)", (iid,)).fetchone()[0]
            err = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
        assert status == "failed"
        assert "has no pgdurable: install it there" in err["error"], err
        # installed by the administrator, the role granted there
        schema.install(db.server.install_dsn(other))
        with psycopg.connect(db.server.install_dsn(other), autocommit=True) as oc:
            oc.execute("select df.grant_usage(%s)", (tenant,))
        with db.connect(tenant) as conn:
            iid = conn.execute(f"select df.start({expr}, null, %s)", (other,)).fetchone()[0]
            status = conn.execute("select df.await_instance(%s, 60)", (iid,)).fetchone()[0]
            result = json.loads(conn.execute("select df.result(%s)", (iid,)).fetchone()[0])
        assert status == "completed"
        assert result["rows"] == [{"db": other, "s": 7, "u": tenant}]
    finally:
        with db.connect() as conn:
            conn.execute(f'drop database if exists "{other}" with (force)')


def test_loop_iteration_cap_fails_the_loop(db, running, tenant):
    with db.connect() as conn:
        conn.execute(f'alter database "{db.name}" set pg_durable.loop_max_iterations = 3')
        conn.execute(f'alter database "{db.name}" set pg_durable.loop_min_interval_ms = 0')
    running.stop()
    s = running.__class__(db, {}, log_path=running.log_path).start()  # re-read settings
    try:
        s.wait_workers(2)
        _, status, _, err = run(db, tenant, "@> df.sql('select 1')")
        assert status == "failed"
        assert "loop_max_iterations" in err["error"]
    finally:
        s.cleanup()


def test_sigterm_drains_and_exits_zero(db, serve_factory, tenant):
    s = serve_factory(db)
    s.wait_workers(2)
    with db.connect(tenant) as conn:
        iid = conn.execute("select df.start('select pg_sleep(1)' ~> 'select 2 as x')").fetchone()[0]
        deadline = time.monotonic() + 20
        while (
            conn.execute(
                "select count(*) from df.nodes where instance_id = %s and "
                "status = 'running' and node_type = 'SQL'",
                (iid,),
            ).fetchone()[0]
            == 0
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert s.stop() == 0, s.log()
    assert "worker stopped" in s.log()
    # whatever was not finished is picked up by the next service
    s2 = serve_factory(db)
    s2.wait_workers(2)
    with db.connect(tenant) as conn:
        assert conn.execute("select df.await_instance(%s, 30)", (iid,)).fetchone()[0] == "completed"


def test_per_role_connection_cap(db, serve_factory, tenant):
    """pg_durable.max_connections_per_role: a role's parallel SQL steps queue behind its slots."""
    with db.connect() as conn:
        conn.execute(f'alter database "{db.name}" set pg_durable.max_connections_per_role = 1')
        conn.execute(f'alter database "{db.name}" set pg_durable.execution_acquire_timeout = 1')
    s = serve_factory(db)
    s.wait_workers(2)
    # two 2 s steps in parallel: with one slot the second waits, past the 1 s acquire timeout
    _, status, _, err = run(
        db, tenant, "df.sql('select pg_sleep(2)') & df.sql('select pg_sleep(2)')"
    )
    assert status == "failed"
    assert "connection limit reached" in err["error"]
    assert "max_connections_per_role=1" in err["error"]


def test_maintenance_statements_fail_clearly(db, running, tenant):
    """VACUUM / CREATE INDEX CONCURRENTLY refuse transactions, and a step runs in one (with
    its checkpoint) in a session that cannot become the tenant outside its runner: the step
    fails saying so, the instance's earlier steps stay committed, nothing runs as anyone
    else. (Before least privilege these ran in autocommit under SET ROLE of the tenant, in a
    session that could SET ROLE to any tenant: docs/security.md.)"""
    with db.connect() as conn:
        conn.execute(f'alter table public.ledger owner to "{tenant}"')
    for stmt in ("vacuum analyze ledger", "create index concurrently ledger_k on ledger (k)"):
        expr = f"'insert into ledger(instance, k) values (''v'', 1)' ~> '{stmt}'"
        _, status, _, err = run(db, tenant, expr)
        assert status == "failed", err
        assert err["sqlstate"] == "25001", err
        assert "cannot be steps" in err["error"], err
        assert "ANALYZE" in err["error"], err
    with db.connect() as conn:
        assert (
            conn.execute("select count(*) from pg_indexes where indexname = 'ledger_k'").fetchone()[
                0
            ]
            == 0
        )
        assert conn.execute("select count(*) from ledger where instance = 'v'").fetchone()[0] == 2
    # the transactional forms work
    _, status, _, err = run(
        db, tenant, "'analyze ledger' ~> 'create index ledger_k2 on ledger (k)'"
    )
    assert status == "completed", err


def test_every_terminal_instance_has_a_completion_time(db, running, tenant):
    """completed, failed and cancelled instances each say when they ended (list_instances)."""
    ok, status, _, _ = run(db, tenant, "'select 1'")
    assert status == "completed"
    bad, status, _, _ = run(db, tenant, "'select 1/0'")
    assert status == "failed"
    with db.connect(tenant) as conn:
        waiting = conn.execute("select df.start(df.wait_for_signal('never', 600))").fetchone()[0]
        conn.execute("select df.cancel(%s, 'not needed')", (waiting,))
        got = dict(
            conn.execute(
                "select instance_id, completed_at >= created_at from df.list_instances(null, 10, null)"
            ).fetchall()
        )
    assert got == {ok: True, bad: True, waiting: True}


def test_statements_without_rows_report_rows_affected(db, running, tenant):
    with db.connect() as conn:
        conn.execute(
            "insert into public.ledger (instance, k) select 'aff', g from generate_series(1, 7) g"
        )
    expr = (
        "df.sql('update ledger set k = k + 1 where instance = ''aff''') |=> 'u' "
        "~> df.sql('delete from ledger where instance = ''aff'' and k > 5') |=> 'd' "
        "~> df.sql('create temp table t_aff (x int)') |=> 'ddl'"
    )
    iid, status, result, err = run(db, tenant, expr)
    assert status == "completed", err
    with db.connect(tenant) as conn:
        got = dict(
            conn.execute(
                "select result_name, result from df.instance_nodes(%s) "
                "where result_name is not null",
                (iid,),
            ).fetchall()
        )
    assert json.loads(got["u"]) == {"rows": [], "row_count": 0, "columns": [], "rows_affected": 7}
    assert json.loads(got["d"])["rows_affected"] == 3
    assert json.loads(got["ddl"])["rows_affected"] == 0
    # if_rows still judges row_count (pg_durable's rule): a DML's is 0
    _, status, result, err = run(
        db,
        tenant,
        "df.sql('update ledger set k = k where false') |=> 'z'"
        " ~> df.if_rows('z', 'select 1 as r', 'select 2 as r')",
    )
    assert result["rows"] == [{"r": 2}], err


def test_a_missing_column_names_the_result_and_its_columns(db, running, tenant):
    _, status, _, err = run(
        db, tenant, "df.sql('select 1 as a, 2 as b') |=> 'x' ~> 'select $x.c + 1'"
    )
    assert status == "failed"
    assert "$x.c: result 'x' has no column 'c' (its columns: a, b)" in err["error"], err
