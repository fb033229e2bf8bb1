"""The df API as the catalog has it, against pg_durable 0.2.6's (docs/api.md).

SQL written for pg_durable must call our functions the same way (argument names and defaults,
for named notation) and compare their results the same way (result types: a text column
compared with text[] must not be varchar). The catalog is read on every server and asserted
against the list below: pg_durable 0.2.6's signatures, our documented differences applied to
them, plus our own extra functions. Changing any signature, strictness, volatility, SECURITY
DEFINER or PUBLIC EXECUTE fails here until this list and docs/api.md say so.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.fix_sql import new_user, one

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@dataclass(frozen=True)
class Fn:
    """One df function as pg_proc describes it (argument and result text as PostgreSQL's
    pg_get_function_arguments / pg_get_function_result print them)."""

    name: str
    args: str
    result: str
    strict: bool
    volatility: str = "v"  # i / s / v
    parallel: str = "u"  # s / r / u
    definer: bool = False
    public: bool = True  # PUBLIC holds EXECUTE


S, NS = True, False
T = "text"

# pg_durable 0.2.6 after CREATE EXTENSION: every df function (44, 42 names).
PG_DURABLE = [
    # DSL constructors
    Fn("sql", "query text", T, S),
    Fn("seq", "a text, b text", T, S),
    Fn("as", "fut text, name text", T, S),
    Fn("sleep", "seconds bigint", T, S),
    Fn("wait_for_schedule", "cron_expr text", T, S),
    Fn("loop", "body text, condition text DEFAULT NULL::text", T, NS),
    Fn("break", "value text DEFAULT NULL::text", T, NS),
    Fn("if", "condition text, then_branch text, else_branch text", T, S),
    Fn("if_rows", "result_name text, then_branch text, else_branch text", T, S),
    Fn("join", "a text, b text", T, S),
    Fn("join3", "a text, b text, c text", T, S),
    Fn("race", "a text, b text", T, S),
    Fn(
        "http",
        "url text, method text DEFAULT 'POST'::text, body text DEFAULT NULL::text, "
        "headers jsonb DEFAULT NULL::jsonb, timeout_seconds integer DEFAULT 30",
        T,
        NS,
        public=False,
    ),
    Fn(
        "http_multipart",
        "url text, method text DEFAULT 'POST'::text, "
        "parts jsonb DEFAULT NULL::jsonb, headers jsonb DEFAULT NULL::jsonb, "
        "timeout_seconds integer DEFAULT 30",
        T,
        NS,
        public=False,
    ),
    Fn("wait_for_signal", "name text, timeout_seconds integer DEFAULT NULL::integer", T, NS),
    # control
    Fn(
        "start",
        "fut text, label text DEFAULT NULL::text, database text DEFAULT NULL::text, "
        "transaction_mode text DEFAULT 'caller'::text, "
        "idempotency_key text DEFAULT NULL::text",
        T,
        NS,
    ),
    Fn("cancel", "instance_id text, reason text DEFAULT 'Cancelled by user'::text", T, S),
    Fn("signal", "instance_id text, signal_name text, signal_data text DEFAULT '{}'::text", T, S),
    Fn("await_instance", "instance_id text, timeout_seconds integer DEFAULT 30", T, S),
    Fn("wait_for_completion", "instance_id text, timeout_seconds integer DEFAULT 30", T, S),
    Fn("run", "instance_id text DEFAULT NULL::text", T, NS),
    # inspection
    Fn("status", "instance_id text", T, S),
    Fn("result", "instance_id text", T, S),
    Fn(
        "list_instances",
        "status_filter text DEFAULT NULL::text, limit_count integer DEFAULT 100",
        "TABLE(instance_id text, label text, function_name text, status text, "
        "execution_count bigint, output text)",
        NS,
    ),
    Fn(
        "list_instances",
        "status_filter text, limit_count integer, label_filter text, "
        "after_cursor text DEFAULT NULL::text",
        "TABLE(instance_id text, label text, function_name text, status text, "
        "execution_count bigint, output text, created_at timestamp with time zone, "
        "completed_at timestamp with time zone, next_cursor text)",
        NS,
    ),
    Fn(
        "instance_info",
        "instance_id text",
        "TABLE(instance_id text, label text, function_name text, function_version text, "
        "current_execution_id bigint, status text, output text, idempotency_key text)",
        S,
    ),
    Fn(
        "instance_executions",
        "instance_id text, limit_count integer DEFAULT 5",
        "TABLE(execution_id bigint, status text, event_count bigint, duration_ms bigint, "
        "output text)",
        S,
    ),
    Fn(
        "instance_nodes",
        "instance_id_param text",
        "TABLE(node_id text, node_type text, query text, result_name text, left_node text, "
        "right_node text, status text, result text, status_details text, inferred_status text, "
        "inferred_status_from_ancestor_id text, updated_at timestamp with time zone)",
        S,
    ),
    Fn(
        "instance_nodes",
        "instance_id_param text, _last_n_executions integer",
        "TABLE(execution_id bigint, node_id text, node_type text, query text, result_name text, "
        "left_node text, right_node text, status text, result text, "
        "updated_at timestamp with time zone)",
        S,
    ),
    Fn(
        "metrics",
        "",
        "TABLE(total_instances bigint, running_instances bigint, completed_instances bigint, "
        "failed_instances bigint, total_executions bigint, total_events bigint)",
        S,
        public=False,
    ),
    Fn("explain", "input text", T, S),
    Fn("version", "", T, S),
    Fn("target_database", "", T, S, "i", "s"),
    Fn("duroxide_schema", "", T, NS, "i", "s"),
    # workflow variables
    Fn("setvar", "name text, value text", T, S),
    Fn("getvar", "name text", T, S),
    Fn("unsetvar", "name text", T, S),
    Fn("clearvars", "", T, S),
    # grants
    Fn(
        "grant_usage",
        "p_role text, include_http boolean DEFAULT false, with_grant boolean DEFAULT false",
        "void",
        NS,
        public=False,
    ),
    Fn("revoke_usage", "p_role text", "void", NS, public=False),
    # operator helpers
    Fn("as_op", "fut text, name text", T, NS, "i"),
    Fn("if_then_op", "condition text, then_branch text", T, NS, "i"),
    Fn("if_else_op", "partial_if text, else_branch text", T, NS, "i"),
    Fn("loop_prefix_op", "body text", T, NS, "i"),
]

# Where pgdurable differs on purpose, per function (docs/api.md, "Differences from pg_durable
# 0.2.6", says each of these).
DSL = [
    "sql",
    "seq",
    "as",
    "sleep",
    "wait_for_schedule",
    "loop",
    "break",
    "if",
    "if_rows",
    "join",
    "join3",
    "race",
    "http",
    "http_multipart",
    "wait_for_signal",
]
READERS = [
    "status",
    "result",
    "list_instances",
    "instance_info",
    "instance_executions",
    "instance_nodes",
    "metrics",
    "getvar",
]
DIFFERENCES: dict[str, dict[str, object]] = {
    # pure functions of their arguments: IMMUTABLE PARALLEL SAFE (pg_durable: VOLATILE)
    **{n: {"volatility": "i", "parallel": "s"} for n in DSL},
    **{n: {"parallel": "s"} for n in ("as_op", "if_then_op", "if_else_op", "loop_prefix_op")},
    # the !> operator (made at install by the administrator) depends on it: its argument
    # keeps the name it was created with
    "if_else_op": {"parallel": "s", "args": "partial text, else_branch text"},
    # read-only: STABLE (one snapshot per statement; pg_durable: VOLATILE)
    **{n: {"volatility": "s"} for n in READERS},
    # engine-wide counters over every role's rows, behind the revoked PUBLIC EXECUTE
    "metrics": {"volatility": "s", "definer": True},
    "version": {"volatility": "i"},
}

# pgdurable's own functions (not in pg_durable 0.2.6).
EXTRAS = [
    Fn("error", "instance_id text", "jsonb", S, "s"),  # D10
    Fn("loop_op", "body text", T, S, "i", "s"),  # the @> operator's function
    # per-step retries with backoff (docs/retry.md): a DSL constructor, so IMMUTABLE PARALLEL
    # SAFE; not STRICT (NULL options are errors naming them, a NULL step a NULL graph)
    Fn(
        "retry",
        "step text, max_attempts integer DEFAULT 3, "
        "initial_delay_seconds double precision DEFAULT 1, "
        "backoff double precision DEFAULT 2, max_delay_seconds double precision DEFAULT 60",
        T,
        NS,
        "i",
        "s",
    ),
    # durable FOREACH (docs/foreach.md): a DSL constructor, IMMUTABLE; PARALLEL RESTRICTED
    # (validating its body sets a setting for the call); not STRICT (a NULL argument is an
    # error naming it)
    Fn("foreach", "rows text, body text, max_parallel integer DEFAULT 10", T, NS, "i", "r"),
    # restart from failure (docs/restart.md) and the runs it keeps
    Fn("restart", "instance_id text", T, S),
    Fn(
        "instance_runs",
        "instance_id text",
        "TABLE(run integer, status text, started_at timestamp with time zone, "
        "ended_at timestamp with time zone, error jsonb)",
        S,
        "s",
    ),
    # cron schedules run by serve
    Fn(
        "schedule",
        "name text, cron text, graph text, overlap text DEFAULT 'skip'::text",
        T,
        NS,
        definer=True,
    ),
    Fn("unschedule", "name text", "boolean", NS, definer=True),
    Fn("pause_schedule", "name text", "boolean", NS, definer=True),
    Fn("resume_schedule", "name text", "boolean", NS, definer=True),
    Fn(
        "list_schedules",
        "",
        "TABLE(name text, cron text, enabled boolean, next_run_at timestamp with time zone, "
        "last_run_at timestamp with time zone, last_instance_id text, last_status text, "
        "runs bigint, failures bigint, overlap text, last_error text, owner text)",
        NS,
        "s",
        definer=True,
    ),
]


def expected() -> list[Fn]:
    out = [replace(f, **DIFFERENCES.get(f.name, {})) for f in PG_DURABLE]  # type: ignore[arg-type]
    return sorted(out + EXTRAS, key=lambda f: (f.name, f.args))


def catalog(conn: psycopg.Connection[tuple[object, ...]]) -> list[Fn]:
    rows = conn.execute("""
        select p.proname, pg_catalog.pg_get_function_arguments(p.oid),
               pg_catalog.pg_get_function_result(p.oid), p.proisstrict, p.provolatile::text,
               p.proparallel::text, p.prosecdef,
               pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE')
        from pg_catalog.pg_proc p
        where p.pronamespace = 'df'::pg_catalog.regnamespace and p.proname !~ '^_'
        order by 1, 2""").fetchall()
    return [Fn(*r) for r in rows]  # type: ignore[arg-type]


def test_pg_durable_list_is_complete() -> None:
    """The reference list itself: 44 functions under 42 names, as pg_durable 0.2.6 has."""
    assert len(PG_DURABLE) == 44
    assert len({f.name for f in PG_DURABLE}) == 42
    assert not set(DIFFERENCES) - {f.name for f in PG_DURABLE}
    assert not {f.name for f in EXTRAS} & {f.name for f in PG_DURABLE}


def test_df_functions_match_the_documented_list(tx) -> None:
    got, want = catalog(tx), expected()
    missing = [f for f in want if f not in got]
    unexpected = [f for f in got if f not in want]
    assert not missing, "documented but not in the catalog:\n" + "\n".join(map(repr, missing))
    assert not unexpected, "in the catalog but not documented:\n" + "\n".join(map(repr, unexpected))


def test_internal_helpers_are_underscored_and_invoker(tx) -> None:
    """Only the documented names are API; the rest of df is `_`-prefixed, and runs with the
    caller's rights (no privilege escalation through an undocumented helper)."""
    definers = tx.execute("""
        select p.oid::pg_catalog.regprocedure::text from pg_catalog.pg_proc p
        where p.pronamespace = 'df'::pg_catalog.regnamespace and p.proname ~ '^_'
          and p.prosecdef""").fetchall()
    assert definers == []


# pg_durable 0.2.6's tables: (column, type, default) in order; NOT NULL is ours where noted.
TABLES = {
    "df.instances": [
        ("id", "character varying(8)", None),
        ("label", "text", None),
        ("root_node", "character varying(8)", None),
        ("status", "text", "'pending'::text"),
        ("submitted_by", "regrole", None),
        ("database", "text", None),
        ("created_at", "timestamp with time zone", "now()"),
        ("updated_at", "timestamp with time zone", "now()"),
        ("completed_at", "timestamp with time zone", None),
        ("idempotency_key", "text", None),
    ],
    "df.nodes": [
        ("id", "character varying(8)", None),
        ("instance_id", "character varying(8)", None),
        ("node_type", "text", None),
        ("query", "text", None),
        ("result_name", "text", None),
        ("left_node", "character varying(8)", None),
        ("right_node", "character varying(8)", None),
        ("status", "text", "'pending'::text"),
        ("result", "jsonb", None),
        ("error", "text", None),
        ("submitted_by", "regrole", None),
        ("database", "text", None),
        ("created_at", "timestamp with time zone", "now()"),
        ("updated_at", "timestamp with time zone", "now()"),
        ("status_details", "jsonb", None),
    ],
    "df.vars": [
        ("name", "text", None),
        ("value", "text", None),
        ("owner", "regrole", "(quote_ident((CURRENT_USER)::text))::regrole"),
    ],
    "df._worker_epoch": [
        ("epoch_id", "uuid", None),
        ("started_at", "timestamp with time zone", "now()"),
        ("last_seen_at", "timestamp with time zone", "now()"),
    ],
}
# NOT NULL columns: pg_durable's, plus ours (docs/api.md: a status or timestamp is never NULL)
NOT_NULL = {
    "df.instances": {"id", "root_node", "submitted_by", "status", "created_at", "updated_at"},
    "df.nodes": {
        "id",
        "instance_id",
        "node_type",
        "submitted_by",
        "status",
        "created_at",
        "updated_at",
    },
    "df.vars": {"name", "owner"},
    "df._worker_epoch": {"epoch_id", "started_at", "last_seen_at"},
}


def test_df_tables_match(tx) -> None:
    for table, cols in TABLES.items():
        rows = tx.execute(
            """
            select a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod),
                   pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attnotnull
            from pg_catalog.pg_attribute a
            left join pg_catalog.pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
            where a.attrelid = %s::pg_catalog.regclass and a.attnum > 0 and not a.attisdropped
            order by a.attnum""",
            (table,),
        ).fetchall()
        assert [r[:3] for r in rows] == cols, table
        assert {r[0] for r in rows if r[3]} == NOT_NULL[table], table


def test_api_doc_lists_every_function_and_difference() -> None:
    """docs/api.md names every df function, and its differences section every function that
    differs from pg_durable 0.2.6 or is ours alone."""
    doc = API_DOC.read_text()
    head, sep, diffs = doc.partition("## Differences from pg_durable 0.2.6")
    assert sep, "docs/api.md has no 'Differences from pg_durable 0.2.6' section"
    for f in expected():
        assert re.search(rf"df\.{re.escape(f.name)}\(", head), (
            f"docs/api.md does not list df.{f.name}"
        )
    for name in set(DIFFERENCES) | {f.name for f in EXTRAS}:
        assert re.search(rf"df\.{re.escape(name)}\b", diffs), (
            f"docs/api.md's differences section does not mention df.{name}"
        )


# ---------------------------------------------------------------- behaviour the types give


def test_results_compare_with_text_and_bigint(tx) -> None:
    """The issue's query: text[] = array_agg(instance_id); execution ids are bigints."""
    new_user(tx, "api")
    a = one(tx, "select df.start(fut => df.sql('select 1'), label => 'cmp')")
    b = one(tx, "select df.start(df.sql('select 2'), 'cmp')")
    assert one(tx, "select pg_typeof(df.start('select 3'))::text") == "text"
    assert (
        one(
            tx,
            "select array_agg(instance_id order by instance_id) = %s::text[] "
            "from df.list_instances(null, 10, 'cmp')",
            (sorted([a, b]),),
        )
        is True
    )
    assert one(tx, "select instance_id = %s::text from df.instance_info(%s)", (a, a)) is True
    assert (
        one(
            tx,
            "select count(*) from df.list_instances() where instance_id = any(%s::text[])",
            ([a, b],),
        )
        == 2
    )
    assert (
        one(tx, "select pg_typeof(execution_count)::text from df.list_instances() limit 1")
        == "bigint"
    )
    # a worker's stamp on the root: execution 1, compared and cast as a bigint
    (root,) = [r[0] for r in tx.execute("select id from df.nodes where instance_id = %s", (a,))]
    role = one(tx, "select current_user")
    tx.execute("reset role")
    tx.execute(
        "update df.nodes set status = 'running', status_details = %s "
        "where instance_id = %s and id = %s",
        (json.dumps({"gen": 1, "execution_id": f"{a}::1"}), a, root),
    )
    tx.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
    assert one(tx, "select execution_id::bigint = 1 from df.instance_executions(%s)", (a,)) is True
    assert (
        one(tx, "select current_execution_id = 1::bigint from df.instance_info(%s)", (a,)) is True
    )
    assert (
        one(tx, "select execution_id from df.instance_nodes(%s, 0) where node_id = %s", (a, root))
        == 1
    )
    assert (
        one(
            tx,
            "select node_id = %s::text from df.instance_nodes(instance_id_param => %s)",
            (root, a),
        )
        is True
    )


def test_named_arguments_as_pg_durable_names_them(tx) -> None:
    new_user(tx, "api")
    iid = one(
        tx,
        "select df.start(fut => df.wait_for_signal(name => 'go', "
        "timeout_seconds => 60), transaction_mode => 'caller')",
    )
    assert (
        one(
            tx,
            "select df.signal(instance_id => %s, signal_name => 'go', "
            'signal_data => \'{"by": "api"}\')',
            (iid,),
        )
        == "OK"
    )
    assert one(tx, "select df.run(instance_id => %s)", (iid,)) is not None
    assert (
        one(
            tx,
            "select count(*) from df.instance_nodes(instance_id_param => %s, "
            "_last_n_executions => 1)",
            (iid,),
        )
        == 1
    )
    assert (
        one(
            tx,
            "select count(*) from df.instance_executions(instance_id => %s, limit_count => 1)",
            (iid,),
        )
        == 0
    )
    assert one(tx, "select df.explain(input => %s)", (iid,)).startswith("Instance")
    assert (
        one(
            tx,
            "select df.if_rows(result_name => 'r', then_branch => 'select 1', "
            "else_branch => 'select 2')",
        )
        is not None
    )
    assert one(tx, "select df.loop(body => 'select 1', condition => 'select false')") is not None
    assert one(tx, "select df.loop_prefix_op(body => 'select 1')") == one(
        tx, "select df.loop('select 1')"
    )
    assert (
        one(tx, "select df.if_then_op(condition => 'select true', then_branch => 'select 1')")
        is not None
    )


def test_strict_functions_ignore_a_null_argument(tx) -> None:
    """STRICT as in pg_durable: an explicit NULL returns NULL and does nothing."""
    new_user(tx, "api")
    iid = one(tx, "select df.start(df.wait_for_signal('go'))")
    assert one(tx, "select df.cancel(%s, null)", (iid,)) is None
    assert one(tx, "select df.signal(%s, 'go', null)", (iid,)) is None
    assert one(tx, "select df.status(%s)", (iid,)) == "pending"
    tx.execute("savepoint s")
    with pytest.raises(psycopg.errors.NoDataFound, match="not found or access denied"):
        tx.execute("select df.cancel('00000000')")
    tx.execute("rollback to savepoint s")
    for q in [
        "select df.status(null)",
        "select df.result(null)",
        "select df.await_instance(null)",
        "select df.getvar(null)",
        "select df.setvar('a', null)",
        "select df.explain(null)",
    ]:
        assert one(tx, q) is None, q
    assert tx.execute("select * from df.instance_info(null)").fetchall() == []
    assert tx.execute("select * from df.instance_executions(%s, null)", (iid,)).fetchall() == []
    assert one(tx, "select count(*) from df.vars") == 0


def test_instance_executions_are_generations(tx) -> None:
    """Execution k holds the nodes whose latest activation is their k-th (a loop's body runs once
    per execution): ids are bigints, newest first, limit_count rows at most (1..10,000)."""
    role = new_user(tx, "api")
    iid = one(tx, "select df.start(df.loop(df.seq('select 1', 'select 2')))")
    nodes = [
        r[0] for r in tx.execute("select node_id from df.instance_nodes(%s)", (iid,)).fetchall()
    ]
    loop, then_, s1, s2 = nodes
    tx.execute("reset role")
    stamps = {
        loop: (1, "running"),
        then_: (3, "running"),
        s1: (3, "completed"),
        s2: (2, "completed"),
    }
    for nid, (gen, status) in stamps.items():
        tx.execute(
            "update df.nodes set status = %s, status_details = %s, "
            "result = case when %s = 'completed' then '1'::jsonb end "
            "where instance_id = %s and id = %s",
            (status, json.dumps({"gen": gen, "execution_id": f"{iid}::{gen}"}), status, iid, nid),
        )
    tx.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
    ex = tx.execute(
        "select execution_id, status, event_count from df.instance_executions(%s)", (iid,)
    ).fetchall()
    assert ex == [(3, "running", 2), (2, "completed", 1), (1, "running", 1)]
    assert [
        r[0] for r in tx.execute("select execution_id from df.instance_executions(%s, 2)", (iid,))
    ] == [3, 2]
    assert one(tx, "select current_execution_id from df.instance_info(%s)", (iid,)) == 3
    legacy = dict(
        tx.execute("select node_id, execution_id from df.instance_nodes(%s, 5)", (iid,)).fetchall()
    )
    assert legacy == {loop: 1, then_: 3, s1: 3, s2: 2}
    tx.execute("savepoint s")
    with pytest.raises(
        psycopg.errors.InvalidParameterValue, match="limit_count must be at least 1"
    ):
        tx.execute("select * from df.instance_executions(%s, 0)", (iid,))
    tx.execute("rollback to savepoint s")


# ---------------------------------------------------------------- upgrade keeps delegations


@pytest.mark.parametrize("start", ["v1 + migrations", "as released"])
def test_upgrade_to_4_keeps_explicit_grants_on_remade_functions(server, start) -> None:
    """3-4.sql drops and re-makes functions whose result type or argument names changed; a
    role given EXECUTE on them explicitly (df.grant_usage(with_grant => true) delegates
    grant_usage/revoke_usage) still holds it, grant option included, after the upgrade.

    Two starts at version 3. "as released": version 3 as its package installed it, read from
    git history (tests/migration/released.py; skipped, saying so, in a shallow clone): the
    old result types (without the drop, CREATE OR REPLACE fails) and a df.grant_usage that
    runs. "v1 + migrations" (always here): 2-3.sql makes the current definitions, which name
    columns only 3-4.sql adds, so version 3 reached that way has the tables of 3 but cannot run
    df.grant_usage; the delegation is given by the GRANT it would make."""
    from pgdurable import schema
    from tests.migration import released

    name = f"m_{uuid.uuid4().hex[:10]}"
    admin, tenant = f"dl_{uuid.uuid4().hex[:8]}", f"dt_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        for role in (admin, tenant):
            conn.execute(sql.SQL("create role {} login").format(sql.Identifier(role)))
    dsn = server.dsn(name)
    try:
        if start == "v1 + migrations":
            released.install_at(dsn, 3)
        elif not released.install_released(dsn, 3):
            pytest.skip(
                "no git history for released schema version 3 here (a shallow clone or an "
                "unpacked sdist): `git fetch --unshallow` runs this test"
            )
        with psycopg.connect(dsn) as conn:
            assert schema.installed_version(conn) == 3
            was = one(
                conn,
                "select pg_get_function_result('df.grant_usage(text,boolean,boolean)'"
                "::regprocedure)",
            )
            assert was == ("text" if start == "as released" else "void")
        with psycopg.connect(dsn, autocommit=True) as conn:
            if start == "as released":
                conn.execute("select df.grant_usage(%s, false, true)", (admin,))
            else:
                conn.execute("set role pgdurable_owner")
                conn.execute(
                    sql.SQL(
                        "grant execute on function df.grant_usage(text,boolean,boolean), "
                        "df.revoke_usage(text), df.metrics() to {} with grant option"
                    ).format(sql.Identifier(admin))
                )
        assert schema.install(dsn).to_version == schema.SCHEMA_VERSION
        with psycopg.connect(dsn, autocommit=True) as conn:
            for fn in (
                "df.grant_usage(text,boolean,boolean)",
                "df.revoke_usage(text)",
                "df.metrics()",
            ):
                assert (
                    one(
                        conn,
                        "select has_function_privilege(%s, %s, 'EXECUTE WITH GRANT OPTION')",
                        (admin, fn),
                    )
                    is True
                ), fn
            assert (
                one(
                    conn,
                    "select pg_get_function_result('df.grant_usage(text,boolean,boolean)'"
                    "::regprocedure)",
                )
                == "void"
            )
            if start != "as released":
                return  # the rest of the delegation was df.grant_usage's (see above)
            # and the delegation works: the admin hands usage on
            conn.execute(sql.SQL("set role {}").format(sql.Identifier(admin)))
            conn.execute("select df.grant_usage(p_role => %s)", (tenant,))
            conn.execute("reset role")
            assert one(conn, "select has_schema_privilege(%s, 'df', 'usage')", (tenant,)) is True
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))
            for role in (tenant, admin):
                conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))
