"""The raw floor: what this PostgreSQL does with no scheduler at all (docs/performance.md, Targets).

A Python loop claims rows of a scratch queue table with ``FOR UPDATE SKIP LOCKED``,
marks them done and inserts a history row per claimed row, then commits: the
database work a durable step cannot avoid, minus everything pgdurable adds. Run
with 1 row per commit (a step that commits alone) and 64 rows per commit (group
commit + batched claims), with one or several clients, on the same server and in
the same invocation as the workloads, so pgdurable's figures are ratios to it.

Owns: the scratch schema (``bench_floor`` in the database it is given) and the
loop. Used by ``bench/harness.py`` and ``bench/test_claim_commit.py``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psycopg

SCHEMA = "bench_floor"

# The scratch queue mirrors pgdurable.tasks where it matters for the cost: a partial
# index on unleased rows in due order, a lease owner/expiry, an attempts counter.
DDL = f"""
drop schema if exists {SCHEMA} cascade;
create schema {SCHEMA};
create table {SCHEMA}.tasks (
    id               bigint generated always as identity primary key,
    due_at           timestamptz not null default now(),
    lease_owner      text,
    lease_expires_at timestamptz,
    attempts         integer not null default 0,
    status           text not null default 'ready'
);
create index tasks_ready_idx on {SCHEMA}.tasks (due_at) where status = 'ready';
create table {SCHEMA}.history (
    id          bigint generated always as identity primary key,
    task_id     bigint not null,
    finished_at timestamptz not null default now(),
    result      jsonb
);
"""

# claim + update in one statement: lock ready rows skipping locked ones, lease them
CLAIM = f"""
with picked as (
    select id from {SCHEMA}.tasks
    where status = 'ready' and due_at <= now()
    order by due_at
    limit %s
    for update skip locked
)
update {SCHEMA}.tasks t
set status = 'done', lease_owner = %s, lease_expires_at = now() + interval '30 seconds',
    attempts = t.attempts + 1
from picked where t.id = picked.id
returning t.id
"""
INSERT = f"""
insert into {SCHEMA}.history (task_id, result)
select id, '{{"ok": true}}'::jsonb from unnest(%s::bigint[]) as u(id)
"""


@dataclass(frozen=True)
class FloorResult:
    """One floor variant: rows per commit x clients → rows/s."""

    batch: int
    clients: int
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def label(self) -> str:
        return (
            f"floor {self.batch} row{'s' if self.batch > 1 else ''}/commit, "
            f"{self.clients} client{'s' if self.clients > 1 else ''}"
        )


def setup(dsn: str, rows: int) -> None:
    """(Re)create the scratch schema with ``rows`` ready rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute(
            f"insert into {SCHEMA}.tasks (due_at) "
            f"select now() - interval '1 hour' from generate_series(1, %s)",
            (rows,),
        )
        conn.execute(f"vacuum analyze {SCHEMA}.tasks")


def drop(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"drop schema if exists {SCHEMA} cascade")


def claim_commit(conn: psycopg.Connection[object], batch: int, owner: str = "floor") -> int:
    """One transaction: claim + update ``batch`` rows, insert their history; commit."""
    with conn.transaction():
        ids = [r[0] for r in conn.execute(CLAIM, (batch, owner)).fetchall()]
        if ids:
            conn.execute(INSERT, (ids,))
    return len(ids)


def run(dsn: str, batch: int, clients: int, seconds: float, rows: int | None = None) -> FloorResult:
    """Run ``clients`` loops for ``seconds`` (or until the queue is empty); rows/s overall."""
    # enough rows that the queue does not run dry first (generous: the batched floor on
    # this kind of box is ~20-40 k rows/s)
    rows = rows or int(seconds * (45_000 if batch > 1 else 6_000)) + 1000
    setup(dsn, rows)
    conns = [psycopg.connect(dsn) for _ in range(clients)]
    done = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def loop(i: int) -> None:
        conn = conns[i]
        conn.execute("select 1")
        conn.commit()
        start.wait()
        n = 0
        while time.monotonic() < stop_at[0]:
            got = claim_commit(conn, batch, f"floor-{i}")
            if not got:
                break
            n += got
        done[i] = n

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    for c in conns:
        c.close()
    drop(dsn)
    return FloorResult(batch=batch, clients=clients, rows=sum(done), seconds=elapsed)


# (rows per commit, clients): the figures docs/performance.md, Targets quotes, on the same server
VARIANTS = [(1, 1), (1, 4), (64, 1), (64, 4)]


def measure(dsn: str, seconds: float, progress: object = None) -> list[FloorResult]:
    out = []
    for batch, clients in VARIANTS:
        if callable(progress):
            progress(f"floor: {batch} row(s)/commit, {clients} client(s), {seconds:.1f} s")
        out.append(run(dsn, batch, clients, seconds))
    return out
