"""The verifier's workload: the workflow kinds it starts and the scratch database they write to.

Every kind is a DSL expression whose SQL steps each insert one row (instance, step tag) into
``public.verify_ledger``, so the checker can count side effects per step: a chain, joins,
races, sleeps, a loop with break (its body's tags repeat: :data:`LOOP_TOTALS`), signal waits
and HTTP steps to the run's :class:`~pgdurable.harness.HttpRecorder` (path
``/<instance>/<tag>``). Instances are labelled ``verify:<kind>:<n>``.

Four kinds exercise pgdurable's own features (docs/retry.md, docs/restart.md,
docs/foreach.md):

    retry       a df.retry around a SQL step that writes its ledger row, then fails (division
                by zero, rolling its row back) while the instance is younger than
                :data:`RETRY_FAIL_SECONDS`: a few failed attempts, then one that commits
    retry_fail  a df.retry around a step that writes its row and always fails: the RETRY gives
                up after :data:`RETRY_FAIL_ATTEMPTS` attempts and fails the instance
    restart     a step reads ``public.verify_late_<n>``, a table that does not exist when the
                instance starts, so it fails; the run creates the table and calls df.restart
                (:func:`fix_for_restart`)
    foreach     a df.foreach over :data:`FOREACH_ROWS` rows whose body writes its ledger row
                (in the body's child instance, labelled ``verify:foreach:<n> foreach …``, so
                the generic rule checks each body's effect) and returns its row's number

Idempotent starts (``df.start(..., idempotency_key => k)``) are made by the run for any kind.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg import sql

from pgdurable import schema as schema_mod

LEDGER = "verify_ledger"
LABEL_PREFIX = "verify:"
LOOP_TOTALS = {"la": 3, "lb": 2}  # the loop template: 3 body runs of 'la', 2 of 'lb'
LEDGER_RE = re.compile(
    r"insert into verify_ledger (?:values \(|select )'\{sys_instance_id\}', '([^']+)'"
    r"(?:\)| from public\.verify_late_)"
)


def _l(tag: str) -> str:
    """A SQL step with one side effect: a ledger row (instance, tag)."""
    return f"df.sql('insert into {LEDGER} values (''{{sys_instance_id}}'', ''{tag}'')')"  # noqa: S608


def _http(url: str, tag: str) -> str:
    return f"df.http('{url}/{{sys_instance_id}}/{tag}', 'POST', 'verify', null, 10)"


RETRY_MAX_ATTEMPTS = 8  # the retry kind: attempts allowed (it needs about 3-4)
RETRY_FAIL_SECONDS = 1.5  # the retry kind's step fails while its instance is younger than this
RETRY_FAIL_ATTEMPTS = 3  # the retry_fail kind: it gives up after exactly this many attempts
LATE_TABLE = "verify_late_{n}"  # the restart kind's missing table (n: the label's number)
FOREACH_ROWS = 4  # the foreach kind: rows (bodies), max_parallel 2


def _failing(tag: str, cond: str) -> str:
    """A SQL step that writes its ledger row (instance, tag), then divides by zero when
    ``cond`` holds: a failed attempt's row rolls back with it."""
    return (
        f"df.sql('with w as (insert into {LEDGER} values (''{{sys_instance_id}}'', ''{tag}'') "  # noqa: S608
        f"returning 1) select 1 / (case when {cond} then 0 else 1 end) from w')"
    )


_YOUNG = (
    "clock_timestamp() < (select created_at from df.instances where id = "  # noqa: S608
    f"''{{sys_instance_id}}'') + interval ''{RETRY_FAIL_SECONDS} s''"
)


def restart_template(n: int) -> str:
    """The restart kind of label number ``n``: its step ``x2`` reads a table created later."""
    late = LATE_TABLE.format(n=n)
    x2 = (
        f"df.sql('insert into {LEDGER} select ''{{sys_instance_id}}'', ''x2'' "  # noqa: S608
        f"from public.{late}')"
    )
    return f"{_l('x0')} ~> df.join({_l('x1')}, {x2}) ~> {_l('x3')}"


def fix_for_restart(conn: psycopg.Connection[Any], n: int, tenant: str) -> None:
    """Create the restart kind's missing table for label number ``n`` (one row), readable by
    the tenant: the fix made before df.restart (idempotent)."""
    late = sql.Identifier(LATE_TABLE.format(n=n))
    with conn.transaction():
        conn.execute(sql.SQL("create table if not exists public.{} (x int)").format(late))
        conn.execute(sql.SQL("lock table public.{}").format(late))
        if not conn.execute(sql.SQL("select 1 from public.{}").format(late)).fetchone():
            conn.execute(sql.SQL("insert into public.{} values (1)").format(late))
        conn.execute(
            sql.SQL("grant select on public.{} to {}").format(late, sql.Identifier(tenant))
        )


_LOOP_A = (
    f"df.sql('insert into {LEDGER} select ''{{sys_instance_id}}'', ''la'' returning "  # noqa: S608
    f"(select count(*) + 1 from {LEDGER} where instance = ''{{sys_instance_id}}'' "
    f"and step = ''la'')') |=> 'n'"
)


def templates(url: str) -> dict[str, str]:
    """Workflow kinds → DSL expression. Every non-loop ledger tag occurs once per instance."""
    return {
        "chain": " ~> ".join(_l(f"c{k}") for k in range(6)),
        "join": f"df.join({_l('j0')} ~> {_l('j1')}, {_l('j2')} ~> {_l('j3')}) ~> {_l('j4')}",
        "race": (
            f"df.race({_l('r0')} ~> {_l('r1')}, df.sleep(600)) ~> "
            f"df.join3({_l('r2')}, df.race({_l('r3')}, df.sleep(600)), "
            f"df.sleep(1) ~> {_l('r4')}) ~> {_l('r5')}"
        ),
        "sleep": f"{_l('s0')} ~> df.sleep(1) ~> {_l('s1')} ~> df.sleep(2) ~> {_l('s2')}",
        "loop": (
            f"{_l('l0')} ~> df.loop({_LOOP_A} ~> df.if(df.sql('select $n >= 3'), "
            f"df.break('done'), {_l('lb')})) ~> {_l('l1')}"
        ),
        "signal": (
            f"{_l('g0')} ~> df.wait_for_signal('go') ~> {_l('g1')} ~> "
            f"df.wait_for_signal('go2') ~> {_l('g2')}"
        ),
        "http": (
            f"{_l('h0')} ~> {_http(url, 'h1')} ~> {_l('h1')} ~> "
            f"df.join({_http(url, 'h2')}, {_l('h2')}) ~> {_l('h3')}"
        ),
        "retry": (
            f"{_l('y0')} ~> df.retry({_failing('y1', _YOUNG)}, max_attempts => "
            f"{RETRY_MAX_ATTEMPTS}, initial_delay_seconds => 0.5, backoff => 1) ~> {_l('y2')}"
        ),
        "retry_fail": (
            f"{_l('z0')} ~> df.retry({_failing('z1', 'true')}, max_attempts => "
            f"{RETRY_FAIL_ATTEMPTS}, initial_delay_seconds => 0.3, backoff => 1) ~> {_l('z2')}"
        ),
        "restart": restart_template(0),  # the run starts restart_template(n) for label n
        "foreach": (
            f"{_l('f0')} ~> df.foreach('select g from generate_series(1, {FOREACH_ROWS}) g', "  # noqa: S608
            f"{_l('fb')} ~> df.sql('select $item.g as g'), max_parallel => 2) ~> {_l('f1')}"
        ),
    }


KIND_WEIGHTS = {
    "chain": 2,
    "join": 1.5,
    "race": 1,
    "sleep": 1,
    "loop": 1,
    "signal": 1.5,
    "http": 1.5,
    # pgdurable's own features: a smaller share, so the SQL-step traffic the planted-bug tests
    # need (tests/acceptance/test_verify.py) stays about what it was
    "retry": 0.7,
    "retry_fail": 0.4,
    "restart": 0.7,
    "foreach": 0.5,
}


def setup_database(admin_dsn: str, tenant: str) -> None:
    """Install df (idempotent), the ledger table and the tenant role's grants."""
    schema_mod.install(admin_dsn)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if not conn.execute("select 1 from pg_roles where rolname = %s", (tenant,)).fetchone():
            conn.execute(sql.SQL("create role {} login").format(sql.Identifier(tenant)))
        conn.execute(
            f"create table if not exists public.{LEDGER} (instance text not null, "
            "step text not null, at timestamptz not null default clock_timestamp())"
        )
        conn.execute(
            sql.SQL("grant all on public.{} to {}").format(
                sql.Identifier(LEDGER), sql.Identifier(tenant)
            )
        )
        conn.execute("select df.grant_usage(%s, include_http => true)", (tenant,))
