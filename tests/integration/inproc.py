"""The worker's parts in-process, against a test database (no ``serve`` subprocess): a
:class:`~pgdurable.worker.process.Worker` built and opened as a worker process does
(:meth:`Worker.open`), whose parts the component tests call one by one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
from psycopg.types.json import set_json_loads

from pgdurable.config import ServeConfig
from pgdurable.values import loads
from pgdurable.worker.instance import InstanceCtx
from pgdurable.worker.process import Worker
from pgdurable.worker.task import Task


@contextlib.asynccontextmanager
async def worker(db: Any, **options: Any) -> AsyncIterator[Worker]:
    """An opened worker of the test database ``db`` (closed after)."""
    config = ServeConfig(
        dsn=db.service_dsn,
        step_dsn=db.dsn_as("pgdurable_step"),
        **{"slots": 4, "poll_interval": 0.1, "http_policy": "deny-all", **options},
    )
    # as run_worker does (every number exact); psycopg's default again after
    set_json_loads(loads)
    w = Worker(config.validate())
    try:
        await w.open()
        yield w
    finally:
        await w.close()
        set_json_loads(json.loads)


def start(db: Any, role: str, expr: str) -> str:
    """df.start(expr) as ``role``, committed; the instance id."""
    with db.connect(role) as conn:
        row = conn.execute(f"select df.start({expr})").fetchone()
    assert row is not None
    return str(row[0])


def one(db: Any, query: str, args: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row of ``query`` as the database's administrator."""
    with db.connect() as conn:
        row = conn.execute(query, args).fetchone()
    return None if row is None else row[0]


def rows(db: Any, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(query, args).fetchall()


async def started(w: Worker, *, take: bool = False) -> list[Task]:
    """Claim and run every ready start task (their successors left unleased unless
    ``take``); the start tasks."""
    budget = w.checkpointer.budget
    if not take:
        w.checkpointer.budget = lambda: (-1, 0)  # no successor leased at once
    try:
        tasks = [t for t in await w.producer.claim(64) if t.kind == "start"]
        for t in tasks:
            await w.dispatch.start_instance(t)
    finally:
        w.checkpointer.budget = budget
    return tasks


async def ctx_of(w: Worker, instance_id: str, **kw: Any) -> InstanceCtx:
    conn: psycopg.AsyncConnection[Any]
    async with w.sessions.service.connection() as conn:
        ctx = await w.cache.get(conn, instance_id, **kw)
    assert ctx is not None
    return ctx


def rowset(**cols: Any) -> dict[str, Any]:
    """A SQL step's result envelope of one row."""
    return {"rows": [cols], "row_count": 1, "columns": list(cols)}


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (polling the event loop) until ``condition()`` holds, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
        await asyncio.sleep(0.02)
