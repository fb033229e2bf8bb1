"""What the dashboard reads and does, as SQL on one connection of the dashboard's role.

Everything goes through the ``df`` API as the DSN's role: the ``df.*`` functions
(``df.list_instances``, ``df.instance_nodes``, ``df.result``, ``df.error``, ``df.cancel``,
``df.signal``, ``df.start``) and, for the system page's aggregates, the ``df.instances`` /
``df.nodes`` tables and the ``df.workers`` view that ``df.grant_usage`` gives SELECT on.
Row-level security therefore decides every row the dashboard sees or acts on: another
role's instance is "not found", here as in ``psql``. Nothing here connects as anyone else.

Admin tooling: this module spells the SQL of the df calls it wraps (not in queries.sql). The one
statement built from text is :func:`start`'s evaluation of a DSL expression, which runs as
the viewer's role in a READ ONLY transaction with a statement timeout (see there).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

__all__ = ["PAGE_SIZE", "RESULT_SHOWN_BYTES", "Run", "RunPage"]

#: Runs per page of the list (df.list_instances' limit_count).
PAGE_SIZE = 50
#: A result larger than this is shown cut (with a download link), not pretty-printed whole.
RESULT_SHOWN_BYTES = 64 * 1024
#: Time the evaluation of a "new run" expression may take.
START_EVAL_TIMEOUT_MS = 5000
TERMINAL = frozenset({"completed", "failed", "cancelled"})

Conn = psycopg.AsyncConnection[Any]


@dataclass
class Run:
    """One instance as the list and the run page show it."""

    id: str
    label: str | None
    status: str
    created_at: datetime | None = None
    completed_at: datetime | None = None
    executions: int = 0
    root_node: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def duration_ms(self) -> float | None:
        if self.created_at and self.completed_at:
            return (self.completed_at - self.created_at).total_seconds() * 1000
        return None


@dataclass
class RunPage:
    runs: list[Run]
    next_cursor: str | None


@dataclass
class Value:
    """A JSON value to show: pretty text (or the first bytes of a large one) and its size."""

    text: str
    size: int
    cut: bool

    @classmethod
    def of(cls, row: tuple[Any, ...] | None) -> Value | None:
        if row is None or row[0] is None:
            return None
        return cls(text=str(row[1]), size=int(row[0]), cut=int(row[0]) > RESULT_SHOWN_BYTES)


@dataclass
class NodeDetail:
    """The selected node: its row of df.instance_nodes, parsed details, its result."""

    row: dict[str, Any]
    details: dict[str, Any]
    result: Value | None
    error: str | None = None
    sqlstate: str | None = None


@dataclass
class SystemView:
    workers: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    per_minute: list[dict[str, int]] = field(default_factory=list)
    slowest: list[dict[str, Any]] = field(default_factory=list)


@asynccontextmanager
async def snapshot(conn: Conn) -> AsyncIterator[None]:
    """One page's reads in one read-only REPEATABLE READ transaction: the run, its nodes
    and its result as of one moment."""
    async with conn.transaction():
        await conn.execute("set transaction isolation level repeatable read, read only")
        yield


async def whoami(conn: Conn) -> str:
    row = await (await conn.execute("select current_user::text")).fetchone()
    return str(row[0]) if row else ""


async def list_runs(
    conn: Conn, status: str | None, label: str | None, after: str | None, limit: int = PAGE_SIZE
) -> RunPage:
    cur = await conn.execute(
        "select instance_id, label, status, execution_count, created_at, completed_at,"
        " next_cursor from df.list_instances(%s, %s, %s, %s)",
        (status, limit, label, after),
    )
    rows = await cur.fetchall()
    runs = [
        Run(
            id=r[0],
            label=r[1],
            status=r[2],
            executions=int(r[3] or 0),
            created_at=r[4],
            completed_at=r[5],
        )
        for r in rows
    ]
    return RunPage(runs, rows[0][6] if rows else None)


async def get_run(conn: Conn, iid: str) -> Run | None:
    # the instance's own row, under RLS (df.status/df.instance_info lack its times)
    cur = await conn.execute(
        "select i.id::text, i.label, i.status, i.created_at, i.completed_at, i.root_node::text"
        " from df.instances i where i.id = %s",
        (iid,),
    )
    r = await cur.fetchone()
    if r is None:
        return None
    return Run(id=r[0], label=r[1], status=r[2], created_at=r[3], completed_at=r[4], root_node=r[5])


def _details(text: str | None) -> dict[str, Any]:
    try:
        out = json.loads(text or "{}")
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


_NODES = """
select x.node_id, x.node_type, x.query, x.result_name, x.left_node, x.right_node, x.status,
       x.inferred_status, x.inferred_status_from_ancestor_id, x.status_details, x.updated_at
from df.instance_nodes(%s) x
"""


async def nodes(conn: Conn, iid: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The rows of df.instance_nodes (tree order) without results, and each node's details."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_NODES, (iid,))
        rows = await cur.fetchall()
    return rows, {str(r["node_id"]): _details(r["status_details"]) for r in rows}


# pretty JSON for a value up to RESULT_SHOWN_BYTES, the first bytes of a larger one
_SHOW = """
select octet_length(v), case when octet_length(v) <= %(max)s then jsonb_pretty(v::jsonb)
                             else left(v, %(max)s) end
from ({source}) s(v)
"""


async def node_detail(conn: Conn, iid: str, nid: str) -> NodeDetail | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_NODES + " where x.node_id = %s", (iid, nid))
        row = await cur.fetchone()
    if row is None:
        return None
    cur2 = await conn.execute(
        _SHOW.format(
            source="select x.result from df.instance_nodes(%(iid)s) x where x.node_id = %(nid)s"
        ),
        {"max": RESULT_SHOWN_BYTES, "iid": iid, "nid": nid},
    )
    value = Value.of(await cur2.fetchone())
    det = _details(row["status_details"])
    out = NodeDetail(row=row, details=det, result=value)
    if row["status"] == "failed" and value is not None:
        # a failed node's result is its error text as a JSON string
        try:
            err = json.loads(value.text) if not value.cut else value.text
        except ValueError:
            err = value.text
        out.error = err if isinstance(err, str) else json.dumps(err)
        out.sqlstate = det.get("sqlstate") if isinstance(det.get("sqlstate"), str) else None
        out.result = None
    return out


async def node_result_text(conn: Conn, iid: str, nid: str) -> str | None:
    cur = await conn.execute(
        "select x.result from df.instance_nodes(%s) x where x.node_id = %s", (iid, nid)
    )
    row = await cur.fetchone()
    return None if row is None else row[0]


async def run_result(conn: Conn, iid: str) -> Value | None:
    cur = await conn.execute(
        _SHOW.format(source="select df.result(%(iid)s)"), {"max": RESULT_SHOWN_BYTES, "iid": iid}
    )
    return Value.of(await cur.fetchone())


async def run_result_text(conn: Conn, iid: str) -> str | None:
    row = await (await conn.execute("select df.result(%s)", (iid,))).fetchone()
    return None if row is None else row[0]


async def run_error(conn: Conn, iid: str) -> dict[str, Any] | None:
    row = await (await conn.execute("select df.error(%s)::text", (iid,))).fetchone()
    if row is None or row[0] is None:
        return None
    out = json.loads(row[0])
    return out if isinstance(out, dict) else None


async def restart_available(conn: Conn) -> bool:
    """Whether this database's df API has ``df.restart(text)`` (a later schema may)."""
    row = await (
        await conn.execute("select to_regprocedure('df.restart(text)') is not null")
    ).fetchone()
    return bool(row and row[0])


async def runs(conn: Conn, iid: str) -> list[dict[str, Any]]:
    """Every run of the instance, oldest first (df.instance_runs: one per restart, then the
    current one); [] where the df API has no df.instance_runs (a schema before version 5)."""
    row = await (
        await conn.execute("select to_regprocedure('df.instance_runs(text)') is not null")
    ).fetchone()
    if not (row and row[0]):
        return []
    cur = await conn.execute(
        "select run, status, started_at, ended_at, error::text from df.instance_runs(%s)", (iid,)
    )
    out = []
    for run, status, started, ended, error in await cur.fetchall():
        err = json.loads(error) if error is not None else None
        out.append(
            {
                "run": run,
                "status": status,
                "started_at": started,
                "ended_at": ended,
                "error": err if isinstance(err, dict) else None,
            }
        )
    return out


# -- actions: each one df call, in its own (autocommit) transaction ----------------------


async def cancel(conn: Conn, iid: str, reason: str) -> str:
    row = await (await conn.execute("select df.cancel(%s, %s)", (iid, reason))).fetchone()
    return str(row[0]) if row else ""


async def signal(conn: Conn, iid: str, name: str, data: str) -> str:
    row = await (await conn.execute("select df.signal(%s, %s, %s)", (iid, name, data))).fetchone()
    return str(row[0]) if row else ""


async def restart(conn: Conn, iid: str) -> str:
    row = await (await conn.execute("select df.restart(%s)::text", (iid,))).fetchone()
    return str(row[0]) if row else ""


async def start(conn: Conn, expr: str, label: str | None) -> str:
    """Start the DSL expression ``expr`` (SQL, as ``pgdurable start`` takes it) as the
    viewer's role; returns the instance id.

    The expression is evaluated first on its own, to its graph value, in a READ ONLY
    transaction with a statement timeout: the DSL constructors only build JSON, so a valid
    expression needs nothing more, and text that is not an expression cannot write, lock
    or run long. It is one statement (a bind parameter keeps the extended protocol, which
    refuses a second one). Then ``df.start`` gets the value as a parameter."""
    async with conn.transaction():
        await conn.execute("set transaction read only")
        await conn.execute(
            "select set_config('statement_timeout', %s, true)", (str(START_EVAL_TIMEOUT_MS),)
        )
        cur = await conn.execute(
            ("select (\n" + expr + "\n)::pg_catalog.text where %s").encode(), (True,)
        )
        row = await cur.fetchone()
    if row is None or row[0] is None:
        raise ValueError("the expression is NULL: nothing to start")
    got = await (await conn.execute("select df.start(%s, %s)", (row[0], label))).fetchone()
    if got is None or got[0] is None:
        raise ValueError("df.start returned nothing")
    return str(got[0])


# -- the system page ---------------------------------------------------------------------

_WORKERS = """
select host, pid, kind, version, in_flight, started_at, last_seen_at,
       extract(epoch from now() - last_seen_at)::float8 as seen_ago
from df.workers order by kind desc, host, pid
"""
_COUNTS = "select status, count(*) from df.instances group by status"
_PER_MINUTE = """
select (extract(epoch from date_trunc('minute', now()) - date_trunc('minute', completed_at))
        / 60)::int as ago, status, count(*)
from df.instances
where completed_at > date_trunc('minute', now()) - interval '59 minutes'
  and status in ('completed', 'failed', 'cancelled')
group by 1, 2
"""
_SLOWEST = """
select n.instance_id::text as instance_id, n.id::text as node_id, n.node_type, n.query,
       i.label, n.status, (n.status_details ->> 'duration_ms')::float8 as duration_ms,
       n.updated_at
from df.nodes n join df.instances i on i.id = n.instance_id
where n.node_type not in ('THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'RETRY')
  and n.status in ('completed', 'failed')
  and jsonb_typeof(n.status_details -> 'duration_ms') = 'number'
  and n.updated_at > now() - interval '24 hours'
order by 7 desc
limit %s
"""


async def system(conn: Conn, slowest: int = 10) -> SystemView:
    out = SystemView()
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_WORKERS)
        out.workers = await cur.fetchall()
        await cur.execute(_SLOWEST, (slowest,))
        out.slowest = await cur.fetchall()
    out.counts = {str(s): int(n) for s, n in await (await conn.execute(_COUNTS)).fetchall()}
    per: list[dict[str, int]] = [{} for _ in range(60)]
    for ago, status, n in await (await conn.execute(_PER_MINUTE)).fetchall():
        if 0 <= ago < 60:
            per[ago][str(status)] = int(n)
    out.per_minute = per
    return out


def utc(value: datetime | None) -> str:
    """A timestamp as the pages show it: UTC, to the second."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""
