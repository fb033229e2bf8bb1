"""The maintenance round, every ``maintenance_interval``: extend this worker's leases, rescue
expired ones, heartbeat, re-read the deployment's settings, fire due schedules and, once a
minute, prune finished instances past retention.

A worker whose supervisor died is noticed once, by the supervisor's parent-watch thread
(:func:`pgdurable.worker.supervisor._watch_parent`, started right after fork), which SIGTERMs
the worker: its drain is the same as any shutdown's. There is no second check here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from pgdurable import __version__, metrics

from . import schedules
from .producer import Slots
from .settings import Settings

logger = logging.getLogger(__name__)

# Retention: every minute (spread over workers by a random start), at most this many finished
# instances are deleted per batch so pruning never holds long locks.
PRUNE_INTERVAL = 60.0
PRUNE_BATCH = 500


class Maintenance:
    """One maintenance loop per worker process."""

    def __init__(
        self,
        *,
        pool: Callable[[], Any],
        q: Callable[[str], Any],
        engine: str,
        worker_id: str,
        lease_seconds: int,
        interval: float,
        slots: Slots,
        settings: Settings,
        wake: asyncio.Event,
        stopping: asyncio.Event,
    ) -> None:
        self.pool = pool
        self.q = q
        self.engine = engine
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.interval = interval
        self.slots = slots
        self.settings = settings
        self.wake = wake
        self.stopping = stopping

    async def reload_settings(self) -> None:
        """Read the settings and make the step slot rows they call for (start, SIGHUP)."""
        async with self.pool().connection() as conn:
            await self.settings.load(conn)
            await conn.execute(self.q("slots_ensure"), (None,))

    async def run(self) -> None:
        epoch = uuid.uuid4()
        next_prune = time.monotonic() + random.random() * PRUNE_INTERVAL
        while not self.stopping.is_set():
            try:
                async with self.pool().connection() as conn:
                    next_prune = await self.round(conn, epoch, next_prune)
            except psycopg.Error as exc:
                logger.warning("maintenance failed: %s", exc, extra={"event": "maintenance.error"})
            await asyncio.sleep(self.interval)

    async def round(
        self, conn: psycopg.AsyncConnection[Any], epoch: uuid.UUID, next_prune: float
    ) -> float:
        """One round on ``conn``; returns when the next prune is due."""
        keys = list(self.slots.inflight)
        await conn.execute(
            self.q("extend"),
            (self.worker_id, self.lease_seconds, [k[0] for k in keys], [k[1] for k in keys]),
        )
        cur = await conn.execute(self.q("rescue"), (1000,))
        row = await cur.fetchone()
        if row and row[0]:
            metrics.rescued(row[0])
            logger.info("rescued %d expired leases", row[0], extra={"event": "lease.rescued"})
            self.wake.set()
        await conn.execute(
            self.q("heartbeat"),
            (
                self.worker_id,
                "worker",
                socket.gethostname(),
                os.getpid(),
                __version__,
                len(self.slots.inflight),
            ),
        )
        await conn.execute(self.q("epoch"), (epoch,))
        # the deployment-wide settings, fresh: a change applies within a round
        await self.settings.load(conn)
        await conn.execute(self.q("slots_ensure"), (None,))
        if await schedules.tick(conn, self.engine):
            self.wake.set()
        # df.foreach bodies whose FOREACH stopped while they were busy (38_foreach.sql)
        cur = await conn.execute(self.q("foreach_reap"), (100,))
        row = await cur.fetchone()
        if row and row[0]:
            logger.info(
                "cancelled %d bodies of stopped FOREACHs",
                row[0],
                extra={"event": "foreach.reaped"},
            )
        if time.monotonic() >= next_prune:
            next_prune = time.monotonic() + PRUNE_INTERVAL
            cur = await conn.execute(self.q("prune"), (PRUNE_BATCH,))
            row = await cur.fetchone()
            if row and row[0]:
                logger.info(
                    "pruned %d finished instances past retention",
                    row[0],
                    extra={"event": "retention.pruned"},
                )
        return next_prune
