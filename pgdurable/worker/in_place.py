"""A batch's later step that fails, recorded in place: its statement rolled back to the
savepoint taken just before it, its failure staged as its outcome, and the steps before it in
the batch keep their effects and checkpoints (docs/performance.md "Session 9").

Every step of a batch after its first runs after ``savepoint pgdurable_step`` (sent in the
same pipeline as its statement, with the release of the previous step's savepoint, so that
they never nest: :mod:`.wave`). When its statement fails, or its result is over
``--result-max-bytes`` (checked where it is made, by ``step_next``, and again by the
worker), or the checkpoint computed right after it is over the instance's cap, the batch
rolls back to that savepoint and stages the failure, as a step run on its own records it:
the steps before it are not run again, and their non-transactional effects (``nextval``,
``dblink``) happen once. The worker can do so only while that savepoint is the newest, i.e.
when no step behind it in its round trip ran (a failed statement makes PostgreSQL skip
them); a result or checkpoint it refuses itself after some did rolls the whole batch back.
The batch's first step has no savepoint: its failure ends the batch, which records it
(:meth:`SqlSteps.statement_failed`). A failure the step's neighbours may have caused
(:func:`own`: a deadlock, a lock wait given up, a serialization failure; the batch's
transaction holds their locks and their reads) is not recorded so: the whole batch rolls
back and each of its steps runs again alone, which decides.

Subtransaction ids: a savepoint and the runner's own block each take one when the step
writes, so a batch of BATCH_MAX steps assigns at most 2 * BATCH_MAX - 1 of them.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgdurable.errors import StepError
from pgdurable.steps.sql_step import SqlSteps

from . import wire
from .checkpoint import Checkpointer, Outcome
from .checkpoint_set import CheckpointSet
from .flow import Requeue
from .instance import InstanceCtx
from .task import Task

ROLLBACK = b"rollback to savepoint pgdurable_step"


async def rollback(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Roll the transaction back to the savepoint before the current step; False when the
    session cannot (the batch then rolls back as a whole)."""
    if conn.broken or conn.closed:
        return False
    try:
        await wire.simple(conn, ROLLBACK)
    except psycopg.Error:
        return False
    return True


# Failures a step's neighbours in the batch may have caused: the batch's transaction holds
# their locks and their reads and writes (a deadlock with another session, a lock wait given
# up, a serialization failure); alone, the step could have succeeded.
_NOT_ITS_OWN = ("40001", "40P01", "55P03")


def own(exc: psycopg.Error | StepError) -> bool:
    """Whether a later step's failure is its own to record in place: not a lost connection
    (no SQLSTATE), nor one its neighbours may have caused (the batch then rolls back whole
    and each of its steps runs again alone, which decides)."""
    if isinstance(exc, StepError):
        return True
    state = exc.sqlstate
    return (
        state is not None
        and not state.startswith(("08", "57P"))  # the connection, the server going away
        and state not in _NOT_ITS_OWN
    )


async def failure(
    conn: psycopg.AsyncConnection[Any],
    sql: SqlSteps,
    task: Task,
    text: str,
    exc: psycopg.Error | StepError,
) -> Outcome | None:
    """The outcome of a later step whose statement failed or whose result was refused, its
    statement rolled back to its savepoint. None when the session cannot go on or the
    failure is not the step's own (:func:`own`; cancelled by another session): the whole
    batch then rolls back and its steps run again one by one."""
    if conn.broken or conn.closed or not own(exc):
        return None
    try:
        err = sql.failure(task, text, exc)
    except Requeue:
        return None
    if not await rollback(conn):
        return None
    return Outcome.failure(err)


async def refused(
    conn: psycopg.AsyncConnection[Any],
    checkpointer: Checkpointer,
    ctx: InstanceCtx,
    task: Task,
    idx: int,
    exc: StepError,
    staged: CheckpointSet,
) -> bool:
    """A later step's checkpoint, computed right after its statement, was refused (over the
    instance's cap): roll its statement back to its savepoint and stage its failure (the
    caller holds its instance's lock). False when the session cannot: the batch rolls back."""
    if not await rollback(conn):
        return False
    await checkpointer.record(
        conn, ctx, task, idx, Outcome.failure(exc), in_tx=True, lock_held=True, batch=staged
    )
    return True
