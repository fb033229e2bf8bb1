"""The verifier's workload: the workflow kinds it starts and the scratch database they write to.

Every kind is a DSL expression whose SQL steps each insert one row (instance, step tag) into
``public.verify_ledger``, so the checker can count side effects per step: a chain, joins,
races, sleeps, a loop with break (its body's tags repeat: :data:`LOOP_TOTALS`), signal waits
and HTTP steps to the run's :class:`~pgdurable.harness.HttpRecorder` (path
``/<instance>/<tag>``). Instances are labelled ``verify:<kind>:<n>``.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from pgdurable import schema as schema_mod

LEDGER = "verify_ledger"
LABEL_PREFIX = "verify:"
LOOP_TOTALS = {"la": 3, "lb": 2}  # the loop template: 3 body runs of 'la', 2 of 'lb'
LEDGER_RE = re.compile(r"insert into verify_ledger values \('\{sys_instance_id\}', '([^']+)'\)")


def _l(tag: str) -> str:
    """A SQL step with one side effect: a ledger row (instance, tag)."""
    return f"df.sql('insert into {LEDGER} values (''{{sys_instance_id}}'', ''{tag}'')')"  # noqa: S608


def _http(url: str, tag: str) -> str:
    return f"df.http('{url}/{{sys_instance_id}}/{tag}', 'POST', 'verify', null, 10)"


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
    }


KIND_WEIGHTS = {
    "chain": 2,
    "join": 1.5,
    "race": 1,
    "sleep": 1,
    "loop": 1,
    "signal": 1.5,
    "http": 1.5,
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
