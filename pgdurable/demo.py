"""``pgdurable demo``: a sample workflow end to end, and the README tour's set-up.

The demo installs the schema, creates the tour's role (not a superuser, given
``df.grant_usage``) and the tables the README's five-minute tour uses, runs ``pgdurable
serve`` just long enough to run one sample workflow (SQL steps, a join, a condition, a
sleep), and prints what to do next: ``make serve`` for a service that keeps running, the
DSN of the tour's role, and the dashboard's URL (on the embedded server it starts ``pgdurable
ui`` for the tour's role in the background). Running it again is harmless: what exists is
kept, the tour's tables are refilled only when empty.

Admin tooling: this module spells the SQL of the set-up it makes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import quote

import psycopg
from psycopg import sql

from . import schema as schema_mod

__all__ = ["DEMO_WORKFLOW", "TOUR_ROLE", "prepare", "run", "tour_dsn"]

#: The role the README's tour runs as: LOGIN, not a superuser, df.grant_usage given.
TOUR_ROLE = "pgdurable_demo"

DEMO_WORKFLOW = """
df.sql('insert into demo_orders(amount) select g * 10 from generate_series(1, 5) g
        returning id') |=> 'ins'
~> ((df.sql('select count(*) as n from demo_orders') |=> 'cnt')
    & (df.sql('select sum(amount) as total from demo_orders') |=> 'sum'))
~> df.if(df.sql('select $sum.total > 100'),
         df.sql('select ''big batch'' as verdict, $cnt.n as orders'),
         df.sql('select ''small batch'' as verdict'))
~> df.sleep(1)
~> df.sql('select $sum.total as total, $cnt.n as orders, now() as finished_at')
"""

# The tour's tables (README, "A five-minute tour"): 250 new orders (the first example
# queues 100 of them), a queue of 250 rows (the loop example drains it 100 at a time) and
# the procedure the nightly example calls. Made by the administrator, used by the role.
_TABLES = """
create table if not exists public.demo_orders (id serial primary key, amount int not null);
create table if not exists public.orders (
    id         bigint generated always as identity primary key,
    status     text not null default 'new',
    created_at timestamptz not null default now());
insert into public.orders (status)
    select 'new' from generate_series(1, 250) where not exists (select 1 from public.orders);
create table if not exists public.queue (
    id      bigint generated always as identity primary key,
    payload text not null);
insert into public.queue (payload)
    select 'job ' || g from generate_series(1, 250) g
    where not exists (select 1 from public.queue);
create or replace procedure public.nightly() language sql
    as $$ delete from public.orders
          where status = 'done' and created_at < now() - interval '90 days' $$;
"""
_GRANTS = """
grant select, insert, update, delete on public.demo_orders, public.orders, public.queue to {role};
grant usage on sequence public.demo_orders_id_seq to {role};
grant execute on procedure public.nightly() to {role};
"""


def tour_dsn(dsn: str, role: str = TOUR_ROLE) -> str:
    """``dsn`` with the tour's role as its user (no password: trust or your .pgpass), as a
    ``postgresql://`` URL when it names a host (what the README shows), else as given."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["user"] = role
    info.pop("password", None)
    host, port, db = info.get("host"), info.get("port"), info.get("dbname") or role
    if host and not str(host).startswith("/") and set(info) <= {"user", "host", "port", "dbname"}:
        where = f"{host}:{port}" if port else str(host)
        return f"postgresql://{quote(role, safe='')}@{where}/{quote(str(db), safe='')}"
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def prepare(dsn: str, role: str = TOUR_ROLE) -> str:
    """Install the schema, make the tour's role and tables; return the role's DSN.

    ``dsn`` is an administrator (a superuser, or a managed cloud's admin with CREATEROLE).
    """
    schema_mod.install(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not conn.execute(
            "select 1 from pg_catalog.pg_roles where rolname = %s", (role,)
        ).fetchone():
            conn.execute(sql.SQL("create role {} login").format(sql.Identifier(role)))
        conn.execute("select df.grant_usage(%s)", (role,))
        with conn.transaction():
            conn.execute(_TABLES)
            conn.execute(sql.SQL(_GRANTS).format(role=sql.Identifier(role)))
    return tour_dsn(dsn, role)


def run(
    dsn: str, *, role: str = TOUR_ROLE, embedded: bool = False, echo: Callable[[str], None] = print
) -> bool:
    """Prepare, run serve and the sample workflow to its end; True when it completed."""
    role_dsn = prepare(dsn, role)
    env = dict(os.environ, PGDURABLE_DSN=dsn, PGDURABLE_WORKERS="2")
    proc = subprocess.Popen([sys.executable, "-m", "pgdurable", "serve"], env=env)
    try:
        with psycopg.connect(role_dsn, autocommit=True) as conn:
            echo("workflow:" + DEMO_WORKFLOW)
            iid = _one(conn, f"select df.start({DEMO_WORKFLOW}, 'demo')")
            echo(f"started instance {iid} as {role}; waiting for it to finish...")
            t0 = time.monotonic()
            status = _one(conn, "select df.await_instance(%s, 60)", iid)
            echo(f"instance {iid} {status} in {time.monotonic() - t0:.2f}s")
            echo(f"result: {_one(conn, 'select df.result(%s)::text', iid)}")
            echo(str(_one(conn, "select df.explain(%s)", iid)))
            if status != "completed":
                echo(f"error: {_one(conn, 'select df.error(%s)::text', iid)}")
                return False
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    serve_cmd = "make serve" if embedded else f"make serve DSN='{dsn}'"
    echo("")
    echo(
        "The demo's service has stopped"
        + (
            "; the embedded PostgreSQL keeps running (make embedded-stop stops it)."
            if embedded
            else "."
        )
    )
    echo("Next, the README's five-minute tour:")
    echo(f"  1. in another terminal, start the service:  {serve_cmd}")
    echo("  2. connect as the tour's role (not a superuser; df.grant_usage given):")
    echo(f"       psql '{role_dsn}'")
    echo("     its tables: orders (250 new), queue (250 rows), procedure nightly()")
    echo(f"  3. the CLI:  PGDURABLE_DSN='{role_dsn}' .venv/bin/pgdurable list")
    echo(f"  4. the dashboard, as {role}:  {_dashboard(role_dsn, embedded)}")
    return True


def _dashboard(role_dsn: str, embedded: bool) -> str:
    """On the embedded server: start ``pgdurable ui`` for the tour's role in the background
    (it stays up while the server runs; ``make embedded-stop`` stops both) and return its
    URL. Elsewhere: how to start it."""
    if not embedded:
        return f"make ui DSN='{role_dsn}'  (then open http://127.0.0.1:8080/)"
    from .embedded import default_data_dir
    from .ui.launch import start_detached

    try:
        url = start_detached(role_dsn, default_data_dir().parent)
    except (RuntimeError, OSError) as exc:
        return f"did not start ({str(exc).splitlines()[0]}); try `make ui`"
    return f"{url}  (running in the background; make embedded-stop stops it too)"


def _one(conn: psycopg.Connection[tuple[object, ...]], query: str, *args: object) -> object:
    row = conn.execute(query.encode(), args or None).fetchone()
    assert row is not None
    return row[0]
