"""Recurring jobs: fire the ``df.schedule`` jobs that are due (schema part 60_schedules.sql).

One call of :func:`tick` per maintenance round of every worker. It reads the enabled jobs that
are due or have no next slot yet; for each it computes the next cron slot after now (UTC,
:mod:`pgdurable.cron`) and either records it (a new, resumed or replaced job) or hands it to
``_schedule_fire_v1``, which locks the job's row (SKIP LOCKED), checks the job is still due,
starts the instance and moves the slot, in one transaction: a slot fires once, whatever the
number of workers and serves.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from pgdurable import cron

__all__ = ["tick"]

logger = logging.getLogger(__name__)


async def tick(conn: psycopg.AsyncConnection[Any], engine: str) -> int:
    """Fire the due jobs; return how many instances were started. ``conn`` is the service's
    connection in autocommit mode: each job is its own transaction."""
    eng = sql.Identifier(engine)
    cur = await conn.execute(
        sql.SQL(
            "select s.role, s.name, s.cron, s.next_run_at, now() from {}.schedules s "
            "where s.enabled and (s.next_run_at is null or s.next_run_at <= now()) "
            "order by s.next_run_at nulls first limit 100"
        ).format(eng)
    )
    rows = await cur.fetchall()
    started = 0
    for role, name, expr, due, now in rows:
        try:
            nxt = cron.next_tick(expr, now)
        except ValueError as exc:  # df.schedule validated it; a cron library change could not
            logger.warning(
                "schedule %r of role %s: %s", name, role, exc, extra={"event": "schedule.invalid"}
            )
            await conn.execute(
                sql.SQL(
                    "update {}.schedules set enabled = false, last_error = %s "
                    "where role = %s and name = %s"
                ).format(eng),
                (f"paused: {exc}", role, name),
            )
            continue
        if due is None:
            await conn.execute(
                sql.SQL(
                    "update {}.schedules set next_run_at = %s "
                    "where role = %s and name = %s and next_run_at is null and enabled"
                ).format(eng),
                (nxt, role, name),
            )
            continue
        cur = await conn.execute(
            sql.SQL("select {}._schedule_fire_v1(%s, %s, %s)").format(eng), (role, name, nxt)
        )
        got = await cur.fetchone()
        if got and got[0]:
            started += 1
            logger.info(
                "schedule %r fired: instance %s (slot %s, next %s)",
                name,
                got[0],
                _iso(due),
                _iso(nxt),
                extra={"event": "schedule.fired"},
            )
    return started


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")
