"""Group commit of step outcomes: many checkpoints, one transaction.

Outcomes that do not need their own transaction — HTTP responses, fired timers and
schedules, BREAK values, if_rows decisions, failed SQL steps (their statement already
rolled back), steps run in another database — are queued here. One flusher per worker
process takes up to :data:`FLUSH_MAX` of them, applies each checkpoint inside one
transaction on one pooled connection, commits once, and only then acknowledges each
submitter (ack after commit). A checkpoint that is fenced is dropped alone (it wrote
nothing). Any other error rolls the batch back; unless the connection itself failed, each of
its outcomes is then applied again in a transaction of its own, so one instance's error (a
value PostgreSQL refuses, say) fails that one outcome and never its neighbours'. What is
left failed goes back to its submitter, who releases its task so it runs again (these
outcomes are at-least-once by nature), or fails it when the error is deterministic.

An item's ``apply`` may defer its write to the end of the batch: given :class:`BatchHooks`,
the flusher calls ``begin`` on the batch's connection, then each ``apply``, which may return a
``settle`` callable; then ``before_commit`` (the checkpointer writes every deferred checkpoint
in one call there), then each ``settle``, which raises the fenced or busy outcome of its own
item as ``apply`` would have; ``end`` after the COMMIT or the rollback.

SQL steps in the df database are not queued: exactly-once needs their statement and their
checkpoint in the same transaction (docs/decisions.md D4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .flow import Busy

logger = logging.getLogger(__name__)

# Outcomes per transaction. 64 matches the batched-commit floor in docs/performance.md (64 rows
# per commit reach ~20-40 k rows/s on this class of machine) while keeping a batch's locks short.
FLUSH_MAX = 64
# After the first outcome arrives, wait this long for more before flushing: long enough to
# gather a fan-out's siblings, short against the ~1 ms a step costs anyway.
FLUSH_WINDOW = 0.002
# Backpressure: submitters wait when this many outcomes are queued.
BACKLOG_MAX = 1024
# The final flush on shutdown gives up after this long.
STOP_TIMEOUT = 10.0


class BatchHooks(Protocol):
    """What a batch's transaction tells the party whose items defer their writes."""

    def begin(self, conn: Any) -> None: ...

    async def before_commit(self, conn: Any) -> None: ...

    def end(self, conn: Any) -> None: ...


@dataclass
class _Item:
    key: str
    """The instance id: a batch applies in key order, so concurrent flushers of several
    processes lock runs rows in one global order and cannot deadlock each other."""
    apply: Callable[[Any], Awaitable[Callable[[], None] | None]]
    """Applies the checkpoint on the given connection (inside the batch's transaction), or
    stages it and returns the ``settle`` that says how its deferred write went."""
    rollback: Callable[[], None] | None = None
    """Called when a transaction this item applied in rolled back (its in-memory state is
    no longer the database's)."""
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Completer:
    """One per worker process; :meth:`submit` returns once the outcome is committed."""

    def __init__(
        self, pool: Any, fenced: type[BaseException], hooks: BatchHooks | None = None
    ) -> None:
        self.pool = pool
        self.fenced = fenced
        self.hooks = hooks
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(BACKLOG_MAX)
        self.task: asyncio.Task[None] | None = None
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name="completer")
            logger.debug("completer started")

    async def stop(self) -> None:
        """Flush what is queued (final flush on shutdown), then stop."""
        if self.task is None:
            return
        # bounded: with the database gone the queue may never drain, and a worker that cannot
        # exit keeps its connections (the submitters' tasks are released by lease expiry)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT
        while not self.queue.empty() and loop.time() < deadline:  # noqa: ASYNC110 - bounded
            await asyncio.sleep(0.01)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None
        logger.debug("completer stopped after %d batches / %d outcomes", self.batches, self.items)

    async def submit(
        self,
        key: str,
        apply: Callable[[Any], Awaitable[Callable[[], None] | None]],
        rollback: Callable[[], None] | None = None,
    ) -> None:
        item = _Item(key, apply, rollback)
        await self.queue.put(item)
        # shield: a submitter being cancelled must not cancel a batch in flight
        await asyncio.shield(item.done)

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = asyncio.get_running_loop().time() + FLUSH_WINDOW
            while len(batch) < FLUSH_MAX:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0 and self.queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(timeout, 0)))
                except TimeoutError:
                    break
            # the flush itself is shielded so shutdown cannot cut a commit in half
            await asyncio.shield(self._flush(batch))

    async def _flush(self, batch: list[_Item]) -> None:
        fenced: list[tuple[_Item, BaseException]] = []
        busy: list[_Item] = []
        batch.sort(key=lambda i: i.key)
        hooks = self.hooks
        try:
            async with self.pool.connection() as conn:
                if hooks is not None:
                    hooks.begin(conn)
                try:
                    async with conn.transaction():
                        settles: list[tuple[_Item, Callable[[], None]]] = []
                        for item in batch:
                            # no savepoint per item: a fenced or busy apply writes nothing,
                            # and any other error fails the whole batch anyway (2 round trips
                            # per item saved)
                            try:
                                settle = await item.apply(conn)
                            except self.fenced as exc:
                                fenced.append((item, exc))
                            except Busy:
                                busy.append(item)
                            else:
                                if settle is not None:
                                    settles.append((item, settle))
                        if hooks is not None:
                            await hooks.before_commit(conn)
                        for item, settle in settles:
                            try:
                                settle()
                            except self.fenced as exc:
                                fenced.append((item, exc))
                            except Busy:
                                busy.append(item)
                finally:
                    if hooks is not None:
                        hooks.end(conn)
        except BaseException as exc:
            for item in batch:
                if item.rollback is not None:
                    item.rollback()
            if len(batch) > 1 and isinstance(exc, Exception) and not _connection_error(exc):
                # whose error was it? each on its own: the others commit
                logger.info(
                    "batch of %d outcomes rolled back (%s: %s); applying them one by one",
                    len(batch),
                    type(exc).__name__,
                    exc,
                    extra={"event": "completer.split"},
                )
                for item in batch:
                    if not item.done.done():
                        await self._flush([item])
                return
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.batches += 1
        self.items += len(batch) - len(busy)
        for item in busy:
            # after the commit: its instance is free again soon
            try:
                self.queue.put_nowait(item)
            except asyncio.QueueFull:
                asyncio.create_task(self.queue.put(item))  # noqa: RUF006 - the queue owns it
        if busy and len(busy) == len(batch):
            await asyncio.sleep(0.001)  # only busy items: let their holders finish first
        bad = {id(i) for i, _ in fenced} | {id(i) for i in busy}
        for item, fence in fenced:
            item.done.set_exception(fence)
        for item in batch:
            if id(item) not in bad and not item.done.done():
                item.done.set_result(None)


def _connection_error(exc: BaseException) -> bool:
    """The connection (or the server) failed, not one item: retrying items alone won't help."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.Error):
        return exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P"))
    return False
