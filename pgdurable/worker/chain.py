"""Chained SQL steps: the successor of a SQL step run in the same batch transaction, right
after it, instead of being written as a task, committed, handed off and claimed again
(docs/performance.md "Chained steps").

A sequence ``'a' ~> 'b' ~> 'c'`` then commits once per batch, not once per step: ``b``'s
statement runs after ``a``'s checkpoint was computed (staged, not yet written), on the state
it leaves, and ``a``'s checkpoint never writes ``b``'s task. Exactly-once is unchanged: every
statement of the chain commits with its checkpoint, in one transaction, or nothing does (a
failure rolls the whole batch back and its steps run again one per transaction, as for any
batch). The chain stays within the batch's bounds (BATCH_MAX steps, BATCH_WINDOW_S), so its
first step's effects are not held uncommitted longer than a batch holds them anyway.

:func:`chainable` is the cheap test on the graph a batch makes before it computes a step's
checkpoint early (only a step that can have a chained successor is computed before the
batch's statements have all run); :func:`successor` takes the successor out of the staged
checkpoint when it is one SQL step this worker would take itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from pgdurable.errors import StepError
from pgdurable.graph import _abc as A

from . import in_place
from .checkpoint import successor_task
from .checkpoint_set import TERMINAL, CheckpointSet
from .instance import InstanceCtx, subst
from .task import Task

logger = logging.getLogger(__name__)

# A chained step holds its predecessors' commit while it runs: one still running after this
# long is stopped (its statement_timeout, only for this), rolled back to its savepoint and
# handed off as a task of its own, so that the steps before it commit and it shows as running
# (its first 100 ms of work are redone, as a batch's rolled back statements are).
CHAIN_STEP_MAX_MS = 100


@dataclass
class Chained:
    """A successor to run next in the batch: its task (never written), node and text."""

    task: Task
    idx: int
    text: str
    restore: Callable[[], bool]
    """Put its task back into its predecessor's staged checkpoint (written as a task after
    all, leased to this worker); False once that checkpoint was written already."""


def step_timeout(applied_ms: str) -> tuple[str, bool]:
    """The statement_timeout of a chained step (milliseconds) and whether it is the chain's
    bound (CHAIN_STEP_MAX_MS) rather than the step's own, shorter, limit."""
    own = int(applied_ms)
    if own == 0 or own > CHAIN_STEP_MAX_MS:
        return str(CHAIN_STEP_MAX_MS), True
    return applied_ms, False


def chainable(ctx: InstanceCtx, idx: int) -> bool:
    """Whether the step at ``idx`` is followed, in a sequence (``~>``), by a SQL step: the
    left side of a THEN (or the last step of one that is), whose right side begins with a
    SQL leaf. Only the graph: the checkpoint decides (:func:`successor`)."""
    g = ctx.graph
    node = idx
    while True:
        p = g.parent[node]
        if p == A.NONE or g.types[p] != A.THEN:
            return False
        if g.left[p] == node:
            nxt = g.right[p]
            while g.types[nxt] == A.THEN:
                nxt = g.left[nxt]
            return g.types[nxt] == A.SQL
        node = p  # the right side of a THEN ends when the THEN does: look further up


def successor(
    ctx: InstanceCtx, fence: Task, clock: datetime, staged: CheckpointSet
) -> Chained | None:
    """The successor of the step whose checkpoint was just staged (fencing ``fence``), to run
    next in the same transaction: (its task, node index, substituted text), its task taken
    out of the checkpoint (never written). None, changing nothing, unless that checkpoint
    made exactly one new task, a SQL step of this database that this worker takes itself
    (``take``: its budget allowed it), due now, in an instance that goes on."""
    runs = staged.rounds.get(ctx.instance_id)
    if not runs or ctx.dead:
        return None
    run = runs[-1]
    entry = run.entries[-1]
    cp = entry.cp
    if entry.ctx is not ctx or entry.fence is not fence or cp.inst_status in TERMINAL:
        return None
    if len(cp.new_tasks) != 1:
        return None
    t = cp.new_tasks[0]
    if (
        not t.get("take")
        or t["kind"] != "run"
        or t.get("delay")
        or t.get("due_at")
        or t.get("deadline")
        or run.tasks.get(t["node_id"]) is not t
    ):
        return None
    idx = ctx.index.get(t["node_id"])
    if idx is None or ctx.graph.types[idx] != A.SQL or ctx.database:
        return None
    try:
        text = subst(ctx, ctx.configs[idx], "sql")
    except StepError:
        return None  # written as a task: its own run fails it, saying why
    cp.new_tasks.clear()
    del run.tasks[t["node_id"]]

    def restore() -> bool:
        if not any(r is run for r in staged.rounds.get(ctx.instance_id, ())):
            return False  # written already (a stale instance's flush): too late
        cp.new_tasks.append(t)
        run.tasks[t["node_id"]] = t
        return True

    task = successor_task(ctx, t, clock, None, started=datetime.now(UTC), virtual=True)
    return Chained(task, idx, text, restore)


async def unchain(
    conn: psycopg.AsyncConnection[Any], chained: Chained | None, bounded: bool, exc: psycopg.Error
) -> bool:
    """A chained step stopped by the chain's bound (it ran CHAIN_STEP_MAX_MS): roll back to
    its savepoint and put its task back into its predecessor's checkpoint, leased to this
    worker (its hand-off), so that it runs again on its own once the batch commits. False
    when it was not that, or it is too late (the batch then rolls back)."""
    if not (
        bounded
        and chained is not None
        and exc.sqlstate == "57014"
        and "statement timeout" in str(exc)
        and not (conn.broken or conn.closed)
    ):
        return False
    if not await in_place.rollback(conn):
        return False
    if not chained.restore():
        return False
    logger.debug(
        "chained step still running after %d ms: handed off",
        CHAIN_STEP_MAX_MS,
        extra={"event": "batch.unchained"},
    )
    return True
