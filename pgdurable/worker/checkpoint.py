"""Checkpoints: one API that writes a step's :class:`Outcome` (its node's result and the
successors the scheduler computes) in one transaction.

- :meth:`Checkpointer.record`: inside a transaction the caller owns (a SQL step's, with its
  statement: exactly-once, docs/decisions.md D4) or in one of its own;
- :meth:`Checkpointer.submit`: through the group commit (:mod:`.completer`), for outcomes that
  need no transaction of their own (HTTP responses, timers, failed statements, …);
- :meth:`Checkpointer.start`: an instance's start (its roots activated), group-committed too;
- :meth:`Checkpointer.apply`: the one write all three end in (``_apply_v1``), or, given a
  :class:`~.checkpoint_set.CheckpointSet`, :meth:`Checkpointer.stage`, written with the
  set's others by :meth:`Checkpointer.flush` (``_apply_v2``: one call for a whole batch of
  SQL steps, or for the group commit's transaction: ``begin`` / ``before_commit`` / ``end``).

Over 500 lines: the staging and the set-based write (``stage``, ``flush``, the group commit's
hooks) re-enter the computation of a step (a stale instance is computed again, step by step,
under its lock) and share its fences; apart, each half would reach into the other's state.
What a set holds and how it folds and encodes is :mod:`.checkpoint_set`.

The completer stays a module of its own: it is a generic group commit (a queue, a flush in
key order, the split of a failed batch) that knows nothing of what a checkpoint holds, and it is
tested as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from pgdurable import metrics
from pgdurable.errors import ResultTooLarge, StepError
from pgdurable.graph import _abc as A
from pgdurable.values import CHECKPOINT_MAX_BYTES, check_size, error_text, json_bytes, truthy

from . import wire
from .cache import InstanceCache
from .checkpoint_set import (
    TERMINAL,
    CheckpointSet,
    Entry,
    Run,
    call_args,
    chunks,
    psycopg_args,
)
from .completer import Completer
from .flow import Busy, Fenced, Stale, acquire
from .instance import TYPE_NAMES, Checkpoint, InstanceCtx, dump
from .sessions import Sessions
from .settings import Settings
from .task import Task

logger = logging.getLogger(__name__)

# SQLSTATE of @engine@._all_written_v1: a call that did not write every checkpoint
_NOT_ALL_WRITTEN = "PDW01"

RESULT_CAP_SETTING = "pgdurable serve --result-max-bytes (PGDURABLE_RESULT_MAX_BYTES)"
INSTANCE_CAP_SETTING = "pg_durable.max_instance_bytes"
# A checkpoint that queues work due within this many seconds wakes its worker's producer then
# (a timer per task; later work is found by the poll)
WAKE_AHEAD_MAX_S = 60.0
# A single step waits this long at most for its instance's lock (held by a batch's or the
# completer's checkpoint) before giving its transaction up (released, retried).
LOCK_WAIT_S = 10.0


@dataclass(frozen=True)
class Outcome:
    """How a step ended: a value (``ok``), a failure (``err``), or a decision (``if_rows``:
    ``ok`` with ``decision`` the branch taken, no value)."""

    ok: bool
    value: Any = None
    err: StepError | None = None
    decision: bool | None = None
    data: bytes | None = None
    """With ``value``: its encoding, checked against the result cap already
    (:meth:`Checkpointer.result_data`)."""

    @classmethod
    def success(cls, value: Any, data: bytes | None = None) -> Outcome:
        return cls(True, value, None, None, data)

    @classmethod
    def failure(cls, err: StepError) -> Outcome:
        return cls(False, None, err)

    @classmethod
    def decided(cls, truth: bool) -> Outcome:
        return cls(True, None, None, truth)


class Checkpointer:
    """Writes checkpoints for one worker process."""

    def __init__(
        self,
        *,
        worker_id: str,
        sessions: Sessions,
        cache: InstanceCache,
        settings: Settings,
        completer: Completer,
        lease_seconds: int,
        result_max_bytes: int,
        budget: Callable[[], tuple[int, int]] = lambda: (0, 0),
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.worker_id = worker_id
        self.sessions = sessions
        self.cache = cache
        self.settings = settings
        self.completer = completer
        self.lease_seconds = lease_seconds
        self.result_max_bytes = result_max_bytes
        # (free slots, SQL steps the batch queue may still take): how many successors a
        # checkpoint leases to this worker at once (its handoff)
        self.budget = budget
        self.wake = wake  # work due soon: wake the producer
        # the group commit's open transactions (by id of their connection): their
        # checkpoints are staged, then written in one call (completer.BatchHooks)
        self.open_sets: dict[int, CheckpointSet] = {}

    # -- the API -----------------------------------------------------------------------

    async def record(
        self,
        conn: psycopg.AsyncConnection[Any],
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        outcome: Outcome,
        *,
        in_tx: bool = False,
        lock_held: bool = False,
        batch: CheckpointSet | None = None,
    ) -> None:
        """Checkpoint one leaf outcome; inside the caller's transaction when ``in_tx``.

        First optimistically, on the cached state (``_apply_v1`` compares the version).
        If another worker checkpointed the instance meanwhile (a sibling JOIN branch),
        retry pessimistically: lock the runs row first, reload under the lock, compute
        and apply — nobody can move the instance on in between, so there is no retry
        loop that contention could exhaust. ``lock_held``: the caller (a batch) holds the
        instance's lock until its COMMIT. ``batch`` (with ``in_tx`` and ``lock_held``): staged
        there, written by :meth:`flush` before the caller commits.
        """
        if lock_held:
            await self._record_locked(conn, ctx, task, idx, outcome, in_tx, batch)
            return
        if in_tx:
            # inside a transaction that holds locks: bounded wait (see BatchRunner)
            await acquire(ctx, LOCK_WAIT_S)
        else:
            await ctx.lock.acquire()
        try:
            await self._record_locked(conn, ctx, task, idx, outcome, in_tx)
        finally:
            ctx.lock.release()

    def result_data(self, value: Any) -> bytes:
        """A step result's encoding; raises :class:`StepError` when it is over the result cap
        (``--result-max-bytes``) or cannot be stored."""
        return check_size(value, self.result_max_bytes, "step result", setting=RESULT_CAP_SETTING)

    async def submit(self, ctx: InstanceCtx, task: Task, idx: int, outcome: Outcome) -> None:
        """Checkpoint through the completer: committed with others, acknowledged after."""

        async def apply(conn: psycopg.AsyncConnection[Any]) -> Callable[[], None] | None:
            current = self.cache.ctxs.get(ctx.instance_id, ctx)
            batch = await self._group_set(conn, ctx, current)
            if batch is None:
                if current.lock.locked() or ctx.lock.locked():
                    raise Busy()
                await self.record(conn, ctx, task, idx, outcome, in_tx=True)
                return None
            # staged: written with the others before the group's COMMIT
            await self._record_locked(conn, ctx, task, idx, outcome, True, batch)
            return lambda: batch.settle(task)

        # rolled back with its batch (another item's error): whatever it changed in memory is
        # gone from the database; a retry on its own reloads the instance
        await self.completer.submit(
            ctx.instance_id, apply, lambda: self.cache.forget(ctx.instance_id, ctx)
        )

    async def start(self, ctx: InstanceCtx, task: Task, problem: str | None) -> None:
        """Start an instance (or fail it with ``problem``: its role cannot run it).

        Through the completer: many instances' starts share one commit (bursts of one-step
        workflows are commit-bound otherwise)."""
        cur_ctx = ctx

        async def apply(aconn: psycopg.AsyncConnection[Any]) -> Callable[[], None] | None:
            batch = await self._group_set(aconn, cur_ctx)
            if batch is None:
                if cur_ctx.lock.locked():
                    raise Busy()
                async with cur_ctx.lock:
                    await write(aconn, None)
                return None
            await write(aconn, batch)  # staged: written before the group's COMMIT
            return lambda: batch.settle(task)

        async def write(aconn: psycopg.AsyncConnection[Any], batch: CheckpointSet | None) -> None:
            nonlocal cur_ctx
            c = cur_ctx
            if c.dead:  # an earlier try rolled back after starting it in memory
                fresh = await self.cache.get(aconn, task.instance_id, fresh=True, lock=c.lock)
                if fresh is None:
                    raise Fenced()
                cur_ctx = c = fresh
            try:
                if problem is None:
                    step = c.sched.start()
                    free, take_sql = self.budget()
                    cp = Checkpoint(inst_status="running", take_budget=free + 1, take_sql=take_sql)
                    c.build(step, cp, task.clock)
                    if step.terminal != A.T_RUNNING:
                        cp.inst_status = terminal_name(step.terminal)
                else:
                    logger.warning(
                        "refusing instance: %s", problem, extra={"event": "instance.refused"}
                    )
                    root = c.graph.node_ids[0]
                    cp = Checkpoint(inst_status="failed")
                    cp.node(root).update(status="failed", result=problem)
                if batch is None:
                    await self.apply(aconn, c, task, cp)
                else:
                    self.stage(batch, c, task, cp, None, None, True)
            except Stale:  # someone else started it (a rescued duplicate start task)
                self.cache.forget(c.instance_id, c)
                raise Fenced() from None
            except BaseException:
                self.cache.forget(c.instance_id, c)
                raise

        await self.completer.submit(
            ctx.instance_id, apply, lambda: self.cache.forget(cur_ctx.instance_id, cur_ctx)
        )

    async def record_start(
        self,
        conn: psycopg.AsyncConnection[Any],
        ctx: InstanceCtx,
        start: Task,
        leaf: Task,
        idx: int,
        outcome: Outcome,
        batch: CheckpointSet | None = None,
    ) -> None:
        """Start an instance and checkpoint its first step in one write, inside the step's
        transaction (a batch's, which holds the instance's lock): the start task's fence,
        the roots activated, the leaf's outcome and its successors, one ``_apply_v1``. A
        one-step workflow is then one transaction and one commit, not two.

        Only for an instance whose start runs exactly ``leaf`` (a SQL step reached from the
        root through sequences, :func:`first_sql_leaf`); anything else raises :class:`Stale`
        and the caller starts the instance the usual way (nothing was written)."""
        try:
            if ctx.dead:
                raise Stale()
            free, take_sql = self.budget()
            cp = Checkpoint(inst_status="running", take_budget=free + 1, take_sql=take_sql)
            step = ctx.sched.start()
            ctx.build(step, cp, start.clock)
            if step.terminal != A.T_RUNNING or len(cp.new_tasks) != 1:
                raise Stale()
            first = cp.new_tasks[0]
            if (
                first["node_id"] != leaf.node_id
                or first["gen"] != leaf.gen
                or first["kind"] != "run"
                or first.get("delay")
            ):
                raise Stale()
            # the leaf runs now, in this transaction: its task is never written
            cp.new_tasks.clear()
            cp.take_budget, cp.take_sql = free + 1, take_sql
        except BaseException:
            self.cache.forget(ctx.instance_id, ctx)
            raise
        await self._compute_and_apply(conn, ctx, leaf, idx, outcome, False, cp, start, batch)

    async def start_running(self, ctx: InstanceCtx, start: Task, leaf: Task) -> None:
        """Commit the start of an instance whose first step (``leaf``, still running in a
        batch: :meth:`record_start` could not wait) runs now: the roots activated, the
        leaf's task leased to us, in a transaction of its own (not the group commit: the
        batch waits for it while it holds locks). The leaf is not handed off: it runs."""
        async with ctx.lock:
            try:
                if ctx.dead:
                    raise Stale()
                cp = Checkpoint(inst_status="running")
                step = ctx.sched.start()
                ctx.build(step, cp, start.clock)
                if (
                    step.terminal != A.T_RUNNING
                    or len(cp.new_tasks) != 1
                    or cp.new_tasks[0]["node_id"] != leaf.node_id
                    or cp.new_tasks[0]["gen"] != leaf.gen
                ):
                    raise Stale()
                cp.new_tasks[0]["take"] = True
                async with self.sessions.service.connection() as conn, conn.transaction():
                    await self.apply(conn, ctx, start, cp)
                start.handoff = []
            except BaseException:
                self.cache.forget(ctx.instance_id, ctx)
                raise

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, cp: Checkpoint
    ) -> None:
        """Write ``cp`` (``_apply_v1``): node updates, named results, successor tasks and the
        scheduler's state, fenced by our lease and the cached version. Successors leased to
        us go to ``task.handoff``."""
        t0 = time.monotonic()
        # what the checkpoint carries is known before it is encoded (a value's size, once):
        # over the bound, nothing large is built, and the step fails instead
        check_checkpoint(cp.weight)
        # results are embedded as the bytes their leaf was encoded to (never re-encoded), and
        # sent as bytes: no text copy of a large checkpoint
        # json_bytes: a named composite's value is Python values, numbers maybe Decimals
        nodes = json_bytes(list(cp.nodes.values()))
        named = json_bytes(cp.named) if cp.named else None
        check_checkpoint(len(nodes) + (len(named) if named else 0))
        cur = await conn.execute(
            *self.sessions.engine_query(
                conn,
                "apply",
                (
                    self.worker_id,
                    ctx.instance_id,
                    task.node_id,
                    task.gen,
                    ctx.version,
                    dump(ctx.sched.dump_state()),
                    cp.inst_status,
                    jsonb_bytes(nodes),
                    orjson.dumps(cp.new_tasks).decode() if cp.new_tasks else None,
                    cp.drop_tasks or None,
                    None if named is None else jsonb_bytes(named),
                    self.lease_seconds,
                ),
            )
        )
        del nodes, named
        row = await cur.fetchone()
        metrics.checkpoint(time.monotonic() - t0)
        got = row[-1] if row else -2
        if got == -1:
            raise Stale()
        if got == -3:
            # the instance's row is locked by someone else (its owner may): try later
            raise Busy()
        if got < 0:
            raise Fenced()
        ctx.version = got
        self._applied(ctx, task, cp, got)

    def _applied(self, ctx: InstanceCtx, task: Task, cp: Checkpoint, got: int) -> None:
        """After ``cp`` was written (state_version ``got``): wake-ups, hand-off, forget a
        finished instance."""
        # work due soon (a loop's next iteration after loop_min_interval_ms, a short sleep):
        # wake the producer when it is due, not at its next poll (up to poll_interval late)
        loop = asyncio.get_running_loop()
        for t in cp.new_tasks:
            delay = t.get("delay") or 0.0
            if 0 < delay <= WAKE_AHEAD_MAX_S:
                loop.call_later(delay + 0.005, self.wake)
        task.handoff = [
            successor_task(ctx, t, task.clock, got) for t in cp.new_tasks if t.get("take")
        ]
        if cp.inst_status in TERMINAL:
            self.cache.forget(ctx.instance_id, ctx)
            logger.info("instance %s", cp.inst_status, extra={"event": "instance.finished"})

    def stage(
        self,
        batch: CheckpointSet,
        ctx: InstanceCtx,
        task: Task,
        cp: Checkpoint,
        redo: tuple[Task, int, Outcome] | None,
        step_type: str | None,
        ok: bool,
    ) -> None:
        """Stage ``cp`` in ``batch`` (what :meth:`apply` would write now): the instance's
        state moves on in memory, its version too; :meth:`flush` writes it."""
        check_checkpoint(cp.weight)
        ctx.version += 1
        batch.stage(ctx, task, cp, Entry(ctx, task, cp, ctx.version, redo, step_type, ok))

    async def flush(self, conn: psycopg.AsyncConnection[Any], batch: CheckpointSet) -> None:
        """Write every checkpoint staged in ``batch``: one ``_apply_v2`` call per round (most
        batches: one). An instance found stale (another worker checkpointed it meanwhile:
        nothing of it was written, its runs row is now locked by us) is computed again on
        a fresh load, its steps in their order, and written by one more call. A fenced or
        busy instance raises :class:`Fenced` / :class:`Busy` (the caller rolls back), or, in
        a partial set (the group commit's), fails its own checkpoints only (``settle``)."""
        stale = await self._write(conn, batch, True)
        if not stale:
            return
        again = CheckpointSet(partial=batch.partial, held=batch.held, errors=batch.errors)
        for iid, entries in sorted(stale.items()):
            if any(e.redo is None for e in entries):
                # a start (with its first step): someone else started the instance
                if not batch.partial:
                    raise Stale()
                self._refuse(batch, entries, Fenced())
                continue
            ctx = entries[0].ctx
            self.cache.forget(iid, ctx)
            try:
                fresh = await self.cache.get(conn, iid, fresh=True, lock=ctx.lock)
                if fresh is None:
                    raise Fenced()
                for e in entries:
                    assert e.redo is not None
                    task, idx, outcome = e.redo
                    await self._compute_and_apply(
                        conn, fresh, task, idx, outcome, True, batch=again
                    )
            except Fenced as exc:
                if not batch.partial:
                    raise
                again.drop(iid)
                self._refuse(batch, entries, exc)
        # we hold every runs row concerned now: stale cannot be, it would be a fence
        await self._write(conn, again, False)

    async def flush_commit(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: CheckpointSet,
        commit: list[wire.Command],
    ) -> bool:
        """Write ``batch`` and run ``commit`` (COMMIT and the session reset) in one round trip,
        when that can be: a step connection, one call for the whole set, and every checkpoint
        written (``_all_written_v1`` raises otherwise, so the COMMIT after it does not run).
        True when done; False when nothing was written (rolled back to the savepoint taken
        before the call): the caller then flushes and commits as usual. A failed COMMIT
        raises its error, as on its own."""
        cap = self.sessions.cap(conn)
        if cap is None or not batch or any(len(r) != 1 for r in batch.rounds.values()):
            return False
        runs = [batch.rounds[iid][0] for iid in sorted(batch.rounds)]
        if len(chunks(runs)) != 1:
            return False
        t0 = time.monotonic()
        args = call_args(self.worker_id, self.lease_seconds, runs)
        got = await wire.pipeline(
            conn,
            [
                (b"savepoint pgdurable_apply", ()),
                (self.sessions.step_apply_written_stmt, [cap.encode(), *args]),
                *commit,
            ],
        )
        if (err := wire.error(conn, got[0])) is not None:  # the savepoint
            raise err
        if (err := wire.error(conn, got[1])) is not None:
            if err.sqlstate != _NOT_ALL_WRITTEN:
                raise err
            await wire.simple(conn, b"rollback to savepoint pgdurable_apply")
            return False
        codes = wire.int_array(wire.value(conn, got[1][-1] if got[1] else None, 0))
        if codes is None or len(codes) != len(runs):
            raise Fenced()
        spent = time.monotonic() - t0
        batch.rounds.clear()
        for run, code in zip(runs, codes, strict=True):
            self._written(run, code, spent)
        for res in got[2:]:
            if (err := wire.error(conn, res)) is not None:
                raise err
        return True

    async def _write(
        self, conn: psycopg.AsyncConnection[Any], batch: CheckpointSet, first: bool
    ) -> dict[str, list[Entry]]:
        """The calls of every round of ``batch``; the stale instances' checkpoints (first
        pass only; later a stale one is fenced)."""
        stale: dict[str, list[Entry]] = {}
        while batch:
            for call in chunks(batch.take_round()):
                t0 = time.monotonic()
                args = call_args(self.worker_id, self.lease_seconds, call)
                cap = self.sessions.cap(conn)
                codes: list[int] | None
                if cap is None:
                    cur = await conn.execute(self.sessions.q("apply_set"), psycopg_args(args))
                    row = await cur.fetchone()
                    codes = row[0] if row else None
                else:
                    # a step connection: at libpq level, as its statements (:mod:`.wire`)
                    res = await wire.results(
                        conn, [(self.sessions.step_apply_stmt, [cap.encode(), *args])]
                    )
                    codes = wire.int_array(wire.value(conn, res[0], 0))
                spent = time.monotonic() - t0
                if codes is None or len(codes) != len(call):
                    raise Fenced()
                for run, got in zip(call, codes, strict=True):
                    if got >= 0:
                        self._written(run, got, spent)
                        continue
                    iid = run.ctx.instance_id
                    # its later rounds were computed on top of this one: they go with it
                    entries = run.entries + [e for r in batch.drop(iid) for e in r.entries]
                    if got == -1 and first:
                        stale[iid] = stale.get(iid, []) + entries
                        continue
                    exc: Exception = Busy() if got == -3 else Fenced()
                    if not batch.partial:
                        raise exc
                    self._refuse(batch, entries, exc)
        return stale

    def _refuse(self, batch: CheckpointSet, entries: list[Entry], exc: Exception) -> None:
        """Checkpoints of a partial set that were not written: each fails with ``exc``; their
        instance's memory moved on without them (reloaded when next needed)."""
        for e in entries:
            batch.errors[id(e.fence)] = exc
            self.cache.forget(e.ctx.instance_id, e.ctx)

    # -- the group commit's deferred writes (completer.BatchHooks) -----------------------

    def begin(self, conn: Any) -> None:
        """A group commit opens its transaction on ``conn``: its checkpoints are staged."""
        self.open_sets[id(conn)] = CheckpointSet(partial=True)

    async def before_commit(self, conn: Any) -> None:
        batch = self.open_sets.get(id(conn))
        if batch:
            await self.flush(conn, batch)

    def end(self, conn: Any) -> None:
        batch = self.open_sets.pop(id(conn), None)
        if batch is not None:
            batch.release()

    async def _group_set(
        self, conn: Any, ctx: InstanceCtx, *others: InstanceCtx
    ) -> CheckpointSet | None:
        """The open group commit's set on ``conn`` (None: not one), once ``ctx``'s lock is
        held for it until its COMMIT; :class:`Busy` when someone else holds it (or one of
        ``others``, the same instance's other copies)."""
        batch = self.open_sets.get(id(conn))
        if batch is None:
            return None
        for c in (ctx, *others):
            if c.lock.locked() and id(c.lock) not in batch.held:
                raise Busy()
        if id(ctx.lock) not in batch.held:
            await acquire(ctx, LOCK_WAIT_S)  # free: at once (as record() takes it)
            batch.held[id(ctx.lock)] = ctx.lock
        return batch

    def _written(self, run: Run, got: int, seconds: float) -> None:
        """A run was written (its instance now at ``got``): each checkpoint's aftermath."""
        assert got == run.entries[-1].version, (got, run.entries[-1].version)
        for e in run.entries:
            metrics.checkpoint(seconds)
            self._applied(e.ctx, e.fence, e.cp, e.version)
            if e.step_type is not None:
                metrics.step_finished(e.step_type, e.ok)

    # -- inside record -----------------------------------------------------------------

    async def _record_locked(
        self,
        conn: psycopg.AsyncConnection[Any],
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        outcome: Outcome,
        in_tx: bool,
        batch: CheckpointSet | None = None,
    ) -> None:
        try:
            if in_tx:
                await self._compute_and_apply(conn, ctx, task, idx, outcome, False, batch=batch)
            else:
                async with conn.transaction():
                    await self._compute_and_apply(conn, ctx, task, idx, outcome, False)
            return
        except Stale:
            pass
        except StepError as exc:
            # the result, or the checkpoint it makes, is over a cap (nothing was written).
            # On a step connection the step's own statement is in this transaction: its
            # caller rolls it back and fails the step. Elsewhere the outcome becomes the
            # failure, on a reloaded state (the cached one moved on in memory).
            if not outcome.ok or self.sessions.cap(conn) is not None:
                raise
            outcome = Outcome.failure(exc)
            logger.info("step result refused: %s", exc, extra={"event": "step.too_large"})
        if batch is not None and batch.has(task.instance_id):
            # what is staged for this instance goes first: the reload below must see it
            await self.flush(conn, batch)
        tx = contextlib.nullcontext() if in_tx else conn.transaction()
        async with tx:
            await conn.execute(*self.sessions.engine_query(conn, "lock_run", (task.instance_id,)))
            fresh = await self.cache.get(conn, task.instance_id, fresh=True, lock=ctx.lock)
            if fresh is None:
                raise Fenced()
            try:
                await self._compute_and_apply(conn, fresh, task, idx, outcome, True, batch=batch)
            except Stale:  # pragma: no cover - impossible while we hold the row lock
                raise Fenced() from None

    async def _compute_and_apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        outcome: Outcome,
        reloaded: bool,
        cp: Checkpoint | None = None,
        fence: Task | None = None,
        batch: CheckpointSet | None = None,
    ) -> None:
        sched = ctx.sched
        if ctx.dead or sched.gen(idx) != task.gen or sched.status(idx) != A.RUNNING:
            # our cached copy may be behind: reload once; _apply_v1 fences for real
            raise Fenced() if reloaded else Stale()
        if cp is None:
            free, take_sql = self.budget()
            cp = Checkpoint(take_budget=free + 1, take_sql=take_sql)  # +1: this step's slot
        upd = cp.node(task.node_id)
        if task.started is not None and task.kind == "run":
            # a step's run starts when a worker picks it up; a wait (sleep, schedule, signal)
            # keeps its activation time, so its duration is the wait
            upd["details"]["started_at"] = task.started.isoformat()
        if outcome.ok:
            if outcome.decision is None:
                # every leaf result (SQL rows, signal data, HTTP bodies, BREAK values,
                # timers) is encoded and capped here, once, before anything changes
                data = outcome.data
                if data is None:
                    data = self.result_data(outcome.value)
                ctx.record_leaf(idx, outcome.value, data, cp)
                truth = truthy(outcome.value)
            else:
                truth = outcome.decision
        else:
            err = outcome.err
            assert err is not None
            msg = error_text(str(err))
            ctx.errors[idx] = (msg, err.sqlstate)
            # an HTTP server's Retry-After (HttpStepError): an enclosing df.retry honours it
            asked = getattr(err, "retry_after", None)
            if asked is None:
                ctx.retry_after.pop(idx, None)
            else:
                ctx.retry_after[idx] = asked
            upd["status"] = "failed"
            upd["result"] = msg
            if err.sqlstate:
                upd["details"]["sqlstate"] = err.sqlstate
            truth = False
            logger.info(
                "step failed (sqlstate %s): %s",
                err.sqlstate or "-",
                err,
                extra={"event": "step.failed", "sqlstate": err.sqlstate},
            )
        max_bytes = self.settings.max_instance_bytes
        try:
            step = sched.complete(idx, task.gen, outcome.ok, truth)
            ctx.build(step, cp, task.clock)
            if outcome.ok and ctx.stored > max_bytes > 0:
                raise ResultTooLarge(
                    f"the results of instance {ctx.instance_id} would hold {ctx.stored} "
                    f"bytes, over the limit of {max_bytes} bytes per instance; "
                    f"raise {INSTANCE_CAP_SETTING} to allow it"
                )
            step_type = TYPE_NAMES[ctx.graph.types[idx]]
            if batch is not None:
                # written by flush(); recomputed from (task, idx, outcome) if found stale
                # (not a chained step: its statement ran in this transaction, after its
                # predecessor's, on state a fresh load does not have: all roll back)
                redo = None if fence is not None or task.virtual else (task, idx, outcome)
                self.stage(batch, ctx, fence or task, cp, redo, step_type, outcome.ok)
                return
            await self.apply(conn, ctx, fence or task, cp)
        except BaseException:
            # the cached state moved on in memory and nothing of it committed: reload
            self.cache.forget(ctx.instance_id, ctx)
            raise
        metrics.step_finished(step_type, outcome.ok)


def successor_task(
    ctx: InstanceCtx, t: dict[str, Any], clock: datetime, version: int | None, **more: Any
) -> Task:
    """The task of a successor a checkpoint made (``t``, one of its new tasks) as this worker
    runs it: handed off (``version``: the state it was made in), or chained (:mod:`.chain`,
    ``more``: its start and ``virtual``). Its clock is its predecessor's claim's."""
    return Task(
        ctx.instance_id,
        t["node_id"],
        t["gen"],
        "run",
        1,
        ctx.role_oid,
        ctx.database,
        None,
        clock,
        version,
        **more,
    )


def first_sql_leaf(ctx: InstanceCtx) -> int | None:
    """The SQL step an unstarted instance's start would run alone (the root, or the first
    step of sequences down from it), else None (a JOIN, an IF, a loop… starts otherwise)."""
    g = ctx.graph
    node = 0
    while g.types[node] == A.THEN:
        node = g.left[node]
    if g.types[node] != A.SQL or ctx.sched.status(0) != A.PENDING:
        return None
    return node


def check_checkpoint(size: int) -> None:
    """Refuse a checkpoint over CHECKPOINT_MAX_BYTES (the step fails, nothing is written)."""
    if size > CHECKPOINT_MAX_BYTES:
        raise ResultTooLarge(
            f"the checkpoint of this step would carry {size} bytes, over the "
            f"limit of {CHECKPOINT_MAX_BYTES} bytes per checkpoint (a named "
            "composite stores its value once more: name fewer large ones)"
        )


def jsonb_bytes(data: bytes) -> Jsonb:
    """A jsonb parameter sent as the JSON bytes given (psycopg's text dumper passes them)."""
    return Jsonb(data, dumps=_identity)


def _identity(data: Any) -> Any:
    return data


def terminal_name(code: int) -> str:
    """The instance status of a scheduler terminal code."""
    return {A.T_COMPLETED: "completed", A.T_FAILED: "failed", A.T_CANCELLED: "cancelled"}.get(
        code, "running"
    )
