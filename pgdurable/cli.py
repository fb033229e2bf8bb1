"""The ``pgdurable`` command line (click). Every option has a ``PGDURABLE_*`` env var.

Admin tooling: this module may spell SQL for the df functions it wraps (STYLE B1).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import click
import psycopg

from . import DF_API_LEVEL, __version__
from . import schema as schema_mod
from .config import (
    LEASE_SECONDS_DEFAULT,
    SLOTS_DEFAULT,
    WORKERS_DEFAULT,
    ServeConfig,
)
from .embedded import EmbeddedPostgres, default_data_dir

CONTEXT = {"auto_envvar_prefix": "PGDURABLE", "show_default": True}


def _dsn_or_embedded(dsn: str | None, data_dir: str | None = None) -> str:
    if dsn:
        return dsn
    emb = EmbeddedPostgres(default_data_dir() if data_dir is None else
                           __import__("pathlib").Path(data_dir).absolute())
    out = emb.start()
    click.echo(f"embedded PostgreSQL 18 running at {out} (data: {emb.data_dir})", err=True)
    return out


dsn_option = click.option("--dsn", envvar="PGDURABLE_DSN", show_envvar=True,
                          help="PostgreSQL connection string of the df database "
                               "(none: the embedded PostgreSQL 18)")
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")


@click.group(context_settings=CONTEXT)
def main() -> None:
    """pgdurable: durable execution for PostgreSQL (the pg_durable df API)."""


@main.command()
def version() -> None:
    """Print the package version, the df API level and the scheduler implementation."""
    from .graph import sched

    click.echo(f"pgdurable {__version__} (df API {DF_API_LEVEL}; scheduler: {sched.__impl__})")


@main.command()
@dsn_option
@click.option("--operator-schema", show_envvar=True, help="schema for the seven operators "
              "(default: pg_catalog as superuser, else public)")
def install(dsn: str | None, operator_schema: str | None) -> None:
    """Create (or upgrade) the df schema and the engine schema."""
    res = schema_mod.install(_dsn_or_embedded(dsn), operator_schema=operator_schema)
    click.echo(f"pgdurable schema version {res.to_version} "
               f"({'installed' if res.from_version == 0 else 'up to date' if not res.changed else 'upgraded from ' + str(res.from_version)}); "
               f"operators in {res.operator_schema}")


@main.command()
@dsn_option
def upgrade(dsn: str | None) -> None:
    """Apply pending schema migrations."""
    res = schema_mod.install(_dsn_or_embedded(dsn))
    click.echo(f"pgdurable schema version {res.to_version}"
               + (f" (from {res.from_version})" if res.changed else " (nothing to do)"))


@main.command()
@dsn_option
@click.confirmation_option(prompt="drop the df schema and every instance in it?")
def uninstall(dsn: str | None) -> None:
    """Drop df, the engine schema and the operators."""
    schema_mod.uninstall(_dsn_or_embedded(dsn))
    click.echo("pgdurable uninstalled")


@main.command()
@dsn_option
@click.option("--workers", type=int, default=WORKERS_DEFAULT, show_envvar=True,
              help="worker processes")
@click.option("--slots", type=int, default=SLOTS_DEFAULT, show_envvar=True,
              help="concurrent steps per worker")
@click.option("--lease-seconds", type=int, default=LEASE_SECONDS_DEFAULT, show_envvar=True,
              help="lease of a claimed step")
@click.option("--http-policy", type=click.Choice(["deny-all", "public", "allow-list"]),
              default="public", show_envvar=True, help="HTTP egress policy")
@click.option("--http-allow", multiple=True, show_envvar=True,
              help="host pattern admitted under allow-list (repeatable; env: comma separated)")
@click.option("--metrics-port", type=int, default=None, show_envvar=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_envvar=True)
@click.option("--data-dir", show_envvar=True, help="embedded PostgreSQL data directory")
def serve(dsn: str | None, workers: int, slots: int, lease_seconds: int, http_policy: str,
          http_allow: tuple[str, ...], metrics_port: int | None, log_format: str,
          data_dir: str | None) -> None:
    """Run the executor: install/upgrade the schema, fork workers, run workflows."""
    from . import log
    from .worker.supervisor import supervise

    log.setup(log_format)
    allow: list[str] = []
    for item in http_allow:
        allow += [p.strip() for p in item.split(",") if p.strip()]
    config = ServeConfig(
        dsn=_dsn_or_embedded(dsn, data_dir), workers=workers, slots=slots,
        lease_seconds=lease_seconds, http_policy=http_policy, http_allow=tuple(allow),
        metrics_port=metrics_port, log_format=log_format,
    ).validate()
    res = schema_mod.install(config.dsn)
    logging.getLogger("pgdurable").info("schema version %d ready", res.to_version)
    sys.exit(supervise(config))


def _connect(dsn: str | None) -> psycopg.Connection[Any]:
    return psycopg.connect(_dsn_or_embedded(dsn), autocommit=True,
                           application_name="pgdurable cli")


def _scalar(dsn: str | None, query: str, params: tuple[Any, ...]) -> Any:
    with _connect(dsn) as conn:
        row = conn.execute(query.encode(), params).fetchone()
        return row[0] if row else None


@main.command()
@dsn_option
@click.argument("expr")
@click.option("--label", default=None)
def start(dsn: str | None, expr: str, label: str | None) -> None:
    """Start EXPR (a DSL expression, e.g. "df.sql('select 1') ~> 'select 2'"); print the id."""
    with _connect(dsn) as conn:
        row = conn.execute(f"select df.start({expr}, %s)".encode(), (label,)).fetchone()
    click.echo(row[0] if row else "")


for _name in ("status", "result", "error"):
    def _make(name: str) -> None:
        @main.command(name=name, help=f"Print df.{name}(INSTANCE_ID).")
        @dsn_option
        @click.argument("instance_id")
        def _cmd(dsn: str | None, instance_id: str) -> None:
            out = _scalar(dsn, f"select df.{name}(%s)", (instance_id,))
            click.echo("" if out is None else
                       (json.dumps(out) if not isinstance(out, str) else out))
    _make(_name)


@main.command(name="await")
@dsn_option
@click.argument("instance_id")
@click.option("--timeout", type=int, default=30)
def await_(dsn: str | None, instance_id: str, timeout: int) -> None:
    """Wait for the instance to finish; print its status."""
    click.echo(_scalar(dsn, "select df.await_instance(%s, %s)", (instance_id, timeout)))


@main.command()
@dsn_option
@click.argument("instance_id")
@click.argument("name")
@click.argument("data", required=False, default="{}")
def signal(dsn: str | None, instance_id: str, name: str, data: str) -> None:
    """Send a signal to an instance."""
    click.echo(_scalar(dsn, "select df.signal(%s, %s, %s)", (instance_id, name, data)))


@main.command()
@dsn_option
@click.argument("instance_id")
@click.argument("reason", required=False, default="Cancelled by user")
def cancel(dsn: str | None, instance_id: str, reason: str) -> None:
    """Cancel an instance."""
    click.echo(_scalar(dsn, "select df.cancel(%s, %s)", (instance_id, reason)))


@main.command(name="list")
@dsn_option
@click.option("--status", default=None)
@click.option("--label", default=None)
@click.option("--limit", type=int, default=100)
@json_option
def list_(dsn: str | None, status: str | None, label: str | None, limit: int,
          as_json: bool) -> None:
    """List instances, newest first."""
    with _connect(dsn) as conn:
        cur = conn.execute(
            "select instance_id, label, status, created_at, completed_at "
            "from df.list_instances(%s, %s, %s)", (status, limit, label))
        rows = cur.fetchall()
    if as_json:
        click.echo(json.dumps([
            {"instance_id": r[0], "label": r[1], "status": r[2],
             "created_at": r[3].isoformat() if r[3] else None,
             "completed_at": r[4].isoformat() if r[4] else None} for r in rows]))
        return
    click.echo(f"{'id':8}  {'status':9}  {'created_at':25}  label")
    for r in rows:
        click.echo(f"{r[0]:8}  {r[2]:9}  {r[3]!s:25}  {r[1] or ''}")


@main.command()
@dsn_option
@click.argument("target")
def explain(dsn: str | None, target: str) -> None:
    """Print df.explain of an instance id or a DSL expression."""
    click.echo(_scalar(dsn, "select df.explain(%s)", (target,)))


DEMO_WORKFLOW = """
df.sql('insert into demo_orders(amount) select g * 10 from generate_series(1, 5) g
        returning id') |=> 'ins'
~> (df.sql('select count(*) as n from demo_orders') |=> 'cnt'
    & df.sql('select sum(amount) as total from demo_orders') |=> 'sum')
~> df.if(df.sql('select $sum.total > 100'),
         df.sql('select ''big batch'' as verdict, $cnt.n as orders'),
         df.sql('select ''small batch'' as verdict'))
~> df.sleep(1)
~> df.sql('select $sum.total as total, $cnt.n as orders, now() as finished_at')
"""


@main.command()
@dsn_option
@click.option("--data-dir", help="embedded PostgreSQL data directory")
def demo(dsn: str | None, data_dir: str | None) -> None:
    """Run serve and a sample workflow (SQL, a join, a condition, a sleep) to completion."""
    dsn = _dsn_or_embedded(dsn, data_dir)
    schema_mod.install(dsn)
    role = "pgdurable_demo"
    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_roles where rolname = %s", (role,)).fetchone()
        if not exists:
            conn.execute(f"create role {role} login")
        conn.execute("select df.grant_usage(%s)", (role,))
        conn.execute(f"create table if not exists public.demo_orders "
                     f"(id serial primary key, amount int not null)")
        conn.execute(f"grant all on public.demo_orders to {role}")
        conn.execute(f"grant usage on sequence public.demo_orders_id_seq to {role}")
    env = dict(os.environ, PGDURABLE_DSN=dsn, PGDURABLE_WORKERS="2")
    proc = subprocess.Popen([sys.executable, "-m", "pgdurable", "serve"], env=env)
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        info["user"] = role
        with psycopg.connect(psycopg.conninfo.make_conninfo(**info),  # type: ignore[arg-type]
                             autocommit=True) as conn:
            click.echo("workflow:" + DEMO_WORKFLOW)
            iid = conn.execute(f"select df.start({DEMO_WORKFLOW}, 'demo')").fetchone()[0]  # type: ignore[index]
            click.echo(f"started instance {iid}; waiting for it to finish...")
            t0 = time.monotonic()
            status = conn.execute("select df.await_instance(%s, 60)", (iid,)).fetchone()[0]  # type: ignore[index]
            click.echo(f"instance {iid} {status} in {time.monotonic() - t0:.2f}s")
            click.echo("result: " + str(conn.execute("select df.result(%s)", (iid,)).fetchone()[0]))  # type: ignore[index]
            click.echo(conn.execute("select df.explain(%s)", (iid,)).fetchone()[0])  # type: ignore[index]
            if status != "completed":
                click.echo("error: " + str(conn.execute("select df.error(%s)", (iid,)).fetchone()[0]))  # type: ignore[index]
                sys.exit(1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
