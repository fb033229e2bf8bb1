"""The worker's control-flow exceptions, in one place: how a step's handling is cut short.

None of them is a step's outcome (a step's own failure is a
:class:`~pgdurable.errors.StepError` carried in an :class:`~pgdurable.worker.checkpoint.Outcome`);
each says what the worker does instead of checkpointing:

- :class:`Fenced`: the task is no longer ours: roll back everything the step did.
- :class:`Stale`: our cached instance is behind the database: reload it and try again.
- :class:`Busy`: the instance is busy in this process (the completer retries later).
- :class:`LockBusy`: an instance's asyncio lock stayed taken while we held database locks.
- :class:`Requeue`: someone else cancelled the statement: run the step again.
- :class:`Retry`: the batch a SQL step ran in rolled back: run it again on its own.
- :class:`StepFailed`: a step's failure found while its transaction is open (rolled back,
  then checkpointed as the step's outcome).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgdurable.errors import StepError

    from .instance import InstanceCtx


class Fenced(Exception):
    """The task is no longer ours: roll back everything the step did."""


class Stale(Exception):
    """The cached instance is behind the database (``_apply_v1`` said so): reload it."""


class Busy(Exception):
    """Raised by a completer item's apply when its instance is busy in this process: retried
    later.

    The flusher holds a transaction with runs-row locks of earlier items; waiting on an
    asyncio lock held by a step that itself waits on one of those row locks would deadlock
    across the two lock kinds, invisible to PostgreSQL's detector. So it never waits.
    """


class LockBusy(Exception):
    """An instance's lock stayed taken while our transaction held locks: give it up."""


class Requeue(Exception):
    """Not the step's outcome (its statement was cancelled by someone else): run it again."""


class Retry(Exception):
    """The batch a SQL step ran in rolled back: run the step again on its own."""


class StepFailed(Exception):
    """A step's own failure found inside its open transaction (roll back, then record it)."""

    def __init__(self, err: StepError) -> None:
        super().__init__(str(err))
        self.err = err


async def acquire(ctx: InstanceCtx, seconds: float) -> None:
    """Take an instance's lock, or raise :class:`LockBusy` after ``seconds``.

    ``asyncio.timeout``, not ``wait_for``: a free lock (nearly always) is then taken at once,
    in this task; ``wait_for`` wrapped every acquire in a task of its own and took several
    turns of the event loop for it (docs/performance.md, "Session 12")."""
    try:
        async with asyncio.timeout(seconds):
            await ctx.lock.acquire()
    except TimeoutError:
        raise LockBusy(f"instance {ctx.instance_id} stayed busy") from None
