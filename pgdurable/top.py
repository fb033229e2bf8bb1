"""``pgdurable top``: a live terminal view of a df database, refreshed from SQL.

Split so it can be tested without a terminal: :func:`fetch` reads one :class:`TopState`
from the database (admin tooling: SQL is spelled here, not in queries.sql), :func:`render` turns a
state into text (pure), :func:`run` loops (or prints one frame with ``--once``).

Everything is read through the ``df`` API tables/views, so a non-admin role sees its own
instances (RLS) and the workers. Throughput counts nodes/instances whose ``updated_at``
falls in the last minute.

Labels, queries and errors are tenants' text: :func:`render` shows every value through
:func:`pgdurable.sanitize.visible` (one line each, escape sequences shown, not sent), so a
tenant cannot add rows to the frame or drive the operator's terminal.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from .sanitize import visible

STATUSES = ("pending", "running", "completed", "failed", "cancelled")
# Rows shown per section: a terminal of ~40 lines fits all of them.
INFLIGHT_ROWS = 10
FAILURE_ROWS = 5
WORKER_ROWS = 12
SCHEDULE_ROWS = 5
# Refresh period of the live view (seconds).
INTERVAL_DEFAULT = 2.0
# A worker whose heartbeat is older than this is shown as stale.
STALE_AFTER = 30.0


@dataclass
class TopState:
    """One snapshot of the database as ``top`` shows it (JSON-able through :func:`asdict`)."""

    taken_at: str
    database: str
    counts: dict[str, int] = field(default_factory=dict)
    steps_per_min: int = 0
    failed_steps_per_min: int = 0
    finished_per_min: int = 0
    inflight: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    schedules: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_COUNTS = "select status, count(*) from df.instances group by status"
_RATES = """
select count(*) filter (where n.status = 'completed'),
       count(*) filter (where n.status = 'failed'),
       (select count(*) from df.instances i
        where i.status in ('completed', 'failed', 'cancelled')
          and i.updated_at > now() - interval '1 minute')
from df.nodes n
where n.updated_at > now() - interval '1 minute'
  and n.node_type not in ('THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'RETRY')
"""
_INFLIGHT = """
select n.instance_id, n.id, n.node_type, coalesce(i.label, ''),
       extract(epoch from now() - coalesce((n.status_details ->> 'started_at')::timestamptz,
                                           n.updated_at))::float8,
       coalesce(n.query, '')
from df.nodes n join df.instances i on i.id = n.instance_id
where n.status = 'running' and i.status = 'running'
  and n.node_type not in ('THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'RETRY')
order by 5 desc
limit %s
"""
_WORKERS = """
select host, pid, version, in_flight, extract(epoch from now() - last_seen_at)::float8,
       extract(epoch from now() - started_at)::float8
from df.workers order by host, pid limit %s
"""
_FAILURES = """
select i.id, coalesce(i.label, ''), i.updated_at, df.error(i.id)
from df.instances i where i.status = 'failed'
order by i.updated_at desc limit %s
"""

_SCHEDULES = """
select name, cron, next_run_at, last_status, owner from df.list_schedules()
where enabled order by next_run_at nulls last, name limit %s
"""


def fetch(conn: psycopg.Connection[Any]) -> TopState:
    """Read one snapshot (six short queries)."""
    state = TopState(
        taken_at=datetime.now().astimezone().isoformat(timespec="seconds"),
        database=conn.info.dbname,
    )
    counts = dict.fromkeys(STATUSES, 0)
    for status, n in conn.execute(_COUNTS).fetchall():
        counts[status] = n
    state.counts = counts
    row = conn.execute(_RATES).fetchone()
    if row:
        state.steps_per_min, state.failed_steps_per_min, state.finished_per_min = row
    state.inflight = [
        {
            "instance_id": r[0],
            "node_id": r[1],
            "node_type": r[2],
            "label": r[3],
            "seconds": round(r[4] or 0.0, 1),
            "query": r[5],
        }
        for r in conn.execute(_INFLIGHT, (INFLIGHT_ROWS,)).fetchall()
    ]
    state.workers = [
        {
            "host": r[0],
            "pid": r[1],
            "version": r[2],
            "in_flight": r[3],
            "seen_seconds_ago": round(r[4], 1),
            "up_seconds": round(r[5], 1),
        }
        for r in conn.execute(_WORKERS, (WORKER_ROWS,)).fetchall()
    ]
    failures = []
    for r in conn.execute(_FAILURES, (FAILURE_ROWS,)).fetchall():
        err = r[3] if isinstance(r[3], dict) else {}
        failures.append(
            {
                "instance_id": r[0],
                "label": r[1],
                "at": r[2].isoformat(timespec="seconds") if r[2] else None,
                "node_type": err.get("node_type"),
                "error": err.get("error"),
            }
        )
    state.failures = failures
    state.schedules = [
        {
            "name": r[0],
            "cron": r[1],
            "next_run_at": r[2].isoformat(timespec="seconds") if r[2] else None,
            "last_status": r[3],
            "owner": r[4],
        }
        for r in conn.execute(_SCHEDULES, (SCHEDULE_ROWS,)).fetchall()
    ]
    return state


def _cut(text: str, width: int) -> str:
    text = visible(" ".join(str(text).split()))
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _dur(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def render(state: TopState, width: int = 100) -> str:
    """The frame for ``state``, at most ``width`` columns wide (pure)."""
    width = max(width, 60)
    out: list[str] = []
    head = f"pgdurable top — {state.database} — {state.taken_at}"
    out.append(_cut(head, width))
    out.append("")
    total = sum(state.counts.values())
    out.append(
        "instances  "
        + "  ".join(f"{s} {state.counts.get(s, 0)}" for s in STATUSES)
        + f"  total {total}"
    )
    out.append(
        f"last 1 min  steps completed {state.steps_per_min}  steps failed "
        f"{state.failed_steps_per_min}  instances finished {state.finished_per_min}"
    )
    out.append("")
    out.append(f"in-flight steps ({len(state.inflight)})")
    if state.inflight:
        out.append(f"  {'instance':8}  {'node':8}  {'type':13}  {'running':>8}  what")
        rest = width - 2 - 8 - 2 - 8 - 2 - 13 - 2 - 8 - 2
        for s in state.inflight:
            what = s["query"] if s["node_type"] == "SQL" else s["label"] or s["query"]
            out.append(
                f"  {visible(s['instance_id']):8}  {visible(s['node_id']):8}  "
                f"{visible(s['node_type']):13}  "
                f"{_dur(s['seconds']):>8}  {_cut(what, rest)}"
            )
    else:
        out.append("  (none)")
    out.append("")
    out.append(f"workers ({len(state.workers)})")
    if state.workers:
        out.append(f"  {'host':20}  {'pid':>7}  {'in-flight':>9}  {'up':>8}  {'seen':>8}  version")
        for w in state.workers:
            seen = _dur(w["seen_seconds_ago"]) + " ago"
            if w["seen_seconds_ago"] > STALE_AFTER:
                seen += " (stale)"
            out.append(
                f"  {_cut(w['host'], 20):20}  {w['pid']:>7}  {w['in_flight']:>9}  "
                f"{_dur(w['up_seconds']):>8}  {seen:>8}  {visible(w['version'])}"
            )
    else:
        out.append("  (none: is `pgdurable serve` running?)")
    out.append("")
    out.append(f"recent failures ({len(state.failures)})")
    if state.failures:
        rest = width - 2 - 8 - 2 - 14 - 2
        for f in state.failures:
            label = _cut(f["label"] or "-", 14)
            err = f"{f['node_type'] or '?'}: {f['error'] or '?'}"
            out.append(f"  {visible(f['instance_id']):8}  {label:14}  {_cut(err, rest)}")
    else:
        out.append("  (none)")
    out.append("")
    out.append(f"next scheduled runs ({len(state.schedules)})")
    for j in state.schedules:
        when = (j["next_run_at"] or "computing…").replace("T", " ")
        out.append(
            f"  {when[:19]:19}  {_cut(j['name'], 24):24}  {_cut(j['cron'], 16):16}  "
            f"last {visible(j['last_status'] or '-')}"
        )
    if not state.schedules:
        out.append("  (none: df.schedule makes recurring jobs)")
    # every value above is visible already; this pass keeps the frame one line per row even
    # for a value a future edit forgets to wrap
    return "\n".join(_cut(line, width) if len(line) > width else visible(line) for line in out)


def run(
    connect: Any,
    *,
    once: bool = False,
    interval: float = INTERVAL_DEFAULT,
    width: int | None = None,
    echo: Any = print,
) -> None:
    """Print one frame (``once``) or redraw every ``interval`` seconds until Ctrl-C.

    ``connect()`` returns a connection (kept open between frames, reopened after errors).
    """
    import shutil

    conn = None
    try:
        while True:
            cols = width or shutil.get_terminal_size((100, 40)).columns
            try:
                if conn is None or conn.closed:
                    conn = connect()
                frame = render(fetch(conn), cols)
            except psycopg.OperationalError as exc:
                if once:
                    raise
                conn = None
                frame = f"pgdurable top: database unavailable ({visible(exc)}); retrying"
            if once:
                echo(frame)
                return
            echo("\x1b[H\x1b[2J" + frame)
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if conn is not None:
            conn.close()
