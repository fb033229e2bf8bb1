"""The producer: claims runnable tasks (``≤ free slots``, one ``FOR UPDATE SKIP LOCKED``
statement), woken by NOTIFY ``pgdurable_work`` and by a jittered poll, and launches each as an
asyncio task; :class:`Slots` is what runs in this process and how many slots are free."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
from psycopg.rows import args_row

from pgdurable import metrics

from .task import Task

logger = logging.getLogger(__name__)

# HTTP requests in flight per worker beyond its slots (they wait on the network only; the
# shared httpx client's connection limits bound the sockets).
HTTP_INFLIGHT_MAX = 256
# The starts of one claim loaded in one statement before any is launched (the others load their
# own as they start): a whole claim at the default slots (8 left half of W1's starts to load
# one statement each: docs/performance.md "Session 9"), few enough that a claim of large
# instances does not hold its first start back behind the loads of many others.
PRELOAD_STARTS = 32


class Slots:
    """The steps in flight in this process, by (instance, node); steps waiting on an HTTP
    response hold no connection and no CPU, so they give their slot back while they wait
    (bounded by HTTP_INFLIGHT_MAX in total)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.http_waiting = 0

    def claimable(self) -> int:
        """How many tasks a claim may lease now."""
        busy = len(self.inflight) - self.http_waiting
        return min(self.slots - busy, self.slots + HTTP_INFLIGHT_MAX - len(self.inflight))

    def free(self) -> int:
        """Free slots (for the successors a checkpoint leases to us at once)."""
        return max(0, self.slots - (len(self.inflight) - self.http_waiting))


class Producer:
    """Claim, launch, and hand a finished step's leased successors on."""

    def __init__(
        self,
        *,
        pool: Callable[[], Any],
        claim_sql: Any,
        worker_id: str,
        lease_seconds: int,
        poll_interval: float,
        slots: Slots,
        wake: asyncio.Event,
        stopping: asyncio.Event,
        handle: Callable[[Task], Coroutine[Any, Any, None]],
        release: Callable[[Task], Coroutine[Any, Any, None]],
        preload: Callable[[Any, list[str]], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.pool = pool  # the service's pool (opened after this is built)
        self.claim_sql = claim_sql
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.slots = slots
        self.wake = wake
        self.stopping = stopping
        self.handle = handle
        self.release = release
        self.preload = preload  # load the instances of a claim's starts in one statement

    async def claim(self, free: int) -> list[Task]:
        """Lease up to ``free`` runnable tasks (one statement)."""
        conn: psycopg.AsyncConnection[Any]
        async with self.pool().connection() as conn:
            cur = conn.cursor(row_factory=args_row(Task))
            await cur.execute(self.claim_sql, (self.worker_id, free, self.lease_seconds))
            claimed: list[Task] = await cur.fetchall()
            starts = [t.instance_id for t in claimed if t.kind == "start"][:PRELOAD_STARTS]
            if self.preload is not None and len(starts) > 1:
                # one statement for them all, not one per start as each dispatch would
                try:
                    await self.preload(conn, starts)
                except psycopg.Error as exc:  # each start loads its own then
                    logger.info("preload failed: %s", exc, extra={"event": "claim.preload"})
        metrics.claimed(len(claimed))
        return claimed

    async def run(self) -> None:
        """Claim and launch until the worker stops."""
        while not self.stopping.is_set():
            free = self.slots.claimable()
            claimed: list[Task] = []
            if free > 0:
                try:
                    claimed = await self.claim(free)
                except psycopg.Error as exc:
                    logger.warning("claim failed: %s", exc, extra={"event": "claim.error"})
                    await asyncio.sleep(0.5)
                    continue
            for task in claimed:
                self.launch(task)
            if claimed and len(claimed) == free:
                continue  # there may be more: claim again right away
            self.wake.clear()
            # jittered poll: NOTIFY is the fast path, this is the safety net
            timeout = self.poll_interval * (1 + random.random() * 0.1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    def launch(self, task: Task) -> None:
        key = task.key
        if key in self.slots.inflight:
            # defensive: never sit on a lease we cannot run now — give it back to the queue
            asyncio.ensure_future(self.release(task))  # noqa: RUF006
            return
        t: asyncio.Task[None] = asyncio.create_task(self.handle(task), name=f"step {key}")
        self.slots.inflight[key] = t
        t.add_done_callback(functools.partial(self._on_done, key, task))

    def _on_done(self, key: tuple[str, str], task: Task, _t: asyncio.Task[None]) -> None:
        self.slots.inflight.pop(key, None)
        if task.handoff_ready and not self.stopping.is_set():
            for nxt in task.handoff:
                self.launch(nxt)
        # launched: drop them, or every step of a handoff chain (a long loop) would stay
        # reachable from the first, which `run` may hold as its last claimed task
        task.handoff = []
        self.wake.set()
