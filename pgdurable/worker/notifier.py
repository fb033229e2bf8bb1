"""Wake-ups and interrupts: LISTEN on ``pgdurable_work`` (wake the producer) and on
``pgdurable_cancel`` / ``pgdurable_abandon`` (cancel the running statements of cancelled
instances and abandoned branches); :class:`Running` is which backend runs which step."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import args_row

from .sessions import SERVICE_OPTIONS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StillOurs:
    """A ``still_ours`` row: is this running step still ours, its instance live?"""

    instance_id: str
    node_id: str
    ours: bool


class Running:
    """The backend pid of each step statement running in this process, and the steps this
    worker interrupted itself (RACE losers, cancelled instances): only their
    "canceling statement due to user request" is the step's outcome."""

    def __init__(self) -> None:
        self.pids: dict[tuple[str, str], int] = {}
        self.interrupted: set[tuple[str, str]] = set()

    def was_interrupted(self, key: tuple[str, str]) -> bool:
        """Did we interrupt this step (once: the mark is consumed)?"""
        ours = key in self.interrupted
        self.interrupted.discard(key)
        return ours


class Notifier:
    """The LISTEN connection (reconnecting) and the interrupts it triggers."""

    def __init__(
        self,
        *,
        dsn: str,
        q: Callable[[str], Any],
        pool: Callable[[], Any],
        worker_id: str,
        running: Running,
        forget: Callable[[str], None],
        wake: asyncio.Event,
        stopping: asyncio.Event,
    ) -> None:
        self.dsn = dsn
        self.q = q
        self.pool = pool
        self.worker_id = worker_id
        self.running = running
        self.forget = forget  # drop an instance's cached state
        self.wake = wake
        self.stopping = stopping

    async def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn,
                    autocommit=True,
                    options=SERVICE_OPTIONS,
                    application_name=f"pgdurable listener {os.getpid()}",
                )
                async with conn:
                    await conn.execute(self.q("listen"))
                    self.wake.set()  # anything missed while we were away
                    async for note in conn.notifies():
                        # payloads carry nothing (any role may LISTEN): ask what changed
                        if note.channel == "pgdurable_work":
                            self.wake.set()
                        elif note.channel in ("pgdurable_cancel", "pgdurable_abandon"):
                            await self.interrupt()
            except psycopg.Error as exc:
                logger.warning(
                    "listener lost its connection: %s", exc, extra={"event": "listener.error"}
                )
                await asyncio.sleep(0.5)

    async def interrupt(self) -> None:
        """Interrupt our running steps that the database says are no longer ours (their
        instance cancelled or finished, their branch abandoned)."""
        running = dict(self.running.pids)
        if not running:
            return
        keys = list(running)
        try:
            conn: psycopg.AsyncConnection[Any]
            async with self.pool().connection() as conn:
                cur = conn.cursor(row_factory=args_row(StillOurs))
                await cur.execute(
                    self.q("still_ours"),
                    (self.worker_id, [k[0] for k in keys], [k[1] for k in keys]),
                )
                gone = [(r.instance_id, r.node_id) for r in await cur.fetchall() if not r.ours]
                for inst, nid in gone:
                    pid = running.get((inst, nid))
                    if pid is None or self.running.pids.get((inst, nid)) != pid:
                        continue  # finished meanwhile
                    self.forget(inst)
                    self.running.interrupted.add((inst, nid))
                    await conn.execute(self.q("cancel_backend"), (pid,))
                    logger.info(
                        "interrupted step %s of %s", nid, inst, extra={"event": "step.interrupted"}
                    )
        except psycopg.Error as exc:
            logger.warning(
                "could not check running steps: %s", exc, extra={"event": "listener.error"}
            )
