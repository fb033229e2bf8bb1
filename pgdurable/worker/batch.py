"""Batches of SQL steps (docs/decisions.md D13: "a batch of steps sharing one connection takes
one slot"): queued SQL steps of one role run in one transaction on one step connection, each
with its checkpoint, then one COMMIT.

A runner keeps its transaction open for more queued SQL steps of the same role while it is
younger than BATCH_WINDOW_S and smaller than BATCH_MAX: one slot, one BEGIN/COMMIT, one
session reset and one WAL flush per batch. Under light load a batch holds one step, and the
steps of a sequence it chains (:mod:`.chain`) after it. After its first step, its next steps
go together, one round trip for all of them (:mod:`.wave`), and its checkpoints with its
COMMIT (``Checkpointer.flush_commit``).

Over 500 lines: one transaction's life (each statement, the checkpoints computed early or at
the end, a chained step's failure or hand-off, what a rollback means for each step) is one
function whose parts share its state; what chaining decides lives in :mod:`.chain`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from pgdurable import _testing, metrics
from pgdurable.errors import StepError
from pgdurable.log import instance_var, node_var
from pgdurable.steps.sql_step import SqlSteps, envelope

from . import in_place, wave, wire
from .cache import InstanceCache
from .chain import Chained, chainable, successor, unchain
from .checkpoint import Checkpointer, Outcome
from .checkpoint_set import CheckpointSet
from .failures import pg_message
from .flow import Fenced, Requeue, Retry, acquire
from .instance import InstanceCtx
from .notifier import Running
from .sessions import Sessions
from .settings import Settings
from .task import Task

logger = logging.getLogger(__name__)

# (Each step's runner opens a subtransaction, and a chained step a savepoint too: a batch of
# steps that all write assigns at most 63 subtransaction ids, within the 64 PostgreSQL keeps
# per backend before other sessions' snapshots get dearer. Not more than 32.)
BATCH_MAX = 32
# Steps sent in one round trip (a wave: one pipeline of their savepoints and statements), the
# successors of the last wave's steps and more queued steps: a round trip costs more CPU, on
# both sides, than a short step's statement (docs/performance.md "Session 10").
WAVE_MAX = 16
BATCH_WINDOW_S = 0.05
# Runners started at once per worker; more (up to the step slots) only for steps that waited
# this long in the queue (the runners are busy with slow statements). One runner makes batches
# large (W1 a fifth cheaper: docs/performance.md "Session 8"); a later step's failure stays
# its own (:mod:`.in_place`), so a large batch re-runs nobody's statement for it.
BATCH_RUNNERS = 1
BATCH_SPAWN_DELAY_S = 0.1
BATCH_LOCK_WAIT_S = 0.5
# Runnable SQL successors a checkpoint hands to its own worker's queue beyond the free slots
# (bounded by what is queued already): a fan-out stays on the worker that has its instance.
SQL_TAKE_MAX = 1024
# A first step run with its instance's start (Item.start) is not visible as running until it
# commits: one still running after this long gets its instance's start committed on its own
# (df.status and df.nodes then show it running) and checkpoints as an ordinary step.
FIRST_STEP_VISIBLE_S = 0.05


@dataclass(eq=False)  # `item in queue` by identity, not field by field
class Item:
    """A SQL step waiting for a batch runner."""

    ctx: InstanceCtx
    task: Task
    idx: int
    text: str
    fut: asyncio.Future[None]
    start: Task | None = None
    """The instance's start task when this step is its first, run before the instance has
    started: its checkpoint starts the instance too (:meth:`Checkpointer.record_start`)."""
    phase: str = ""
    """With ``start``: ``pending`` (to checkpoint with the start), ``fused`` (its statement
    ran: its batch checkpoints it so), ``committing`` / ``started`` (its statement still ran
    FIRST_STEP_VISIBLE_S after it began, so the start committed on its own: ``start`` now
    names this step, an ordinary step of its instance)."""
    visible: asyncio.Task[None] | None = None
    head: Item | None = None
    """A chained step (:mod:`.chain`): the submitted step whose dispatcher takes its
    successors (handoff) once the batch commits."""
    staged: bool = False
    """Its checkpoint is computed (staged in the batch's set)."""
    chained: Chained | None = None
    """A chained step: how to hand it off as a task after all (:mod:`.chain`)."""
    bounded: bool = False
    """A chained step run under the chain's statement_timeout (CHAIN_STEP_MAX_MS)."""

    @property
    def slot_task(self) -> Task:
        """The task whose lease this step holds (its instance's start task, until then)."""
        return self.start or self.task


class BatchRunner:
    """The SQL step queue of one worker process and the runners that drain it."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        settings: Settings,
        running: Running,
        checkpointer: Checkpointer,
        cache: InstanceCache,
        sql: SqlSteps,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.running = running
        self.checkpointer = checkpointer
        self.cache = cache
        self.sql = sql
        self.queue: list[Item] = []
        self.runners: set[asyncio.Task[None]] = set()
        self.running_count = 0
        self.busy: dict[object, float] = {}  # runner -> when its statement started
        self.spawn_check_armed = False

    def take_sql(self) -> int:
        """SQL successors a checkpoint may still hand to this worker's batch queue."""
        return max(0, SQL_TAKE_MAX - len(self.queue))

    async def submit(
        self,
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        text: str,
        start: Task | None = None,
    ) -> None:
        """Queue a SQL step for a batch runner; returns once its checkpoint committed
        (raises :class:`Retry` when its batch rolled back: run it again alone). ``start``:
        the step is its unstarted instance's first, checkpointed with the start; any
        failure of it raises :class:`Retry` (the instance then starts the usual way)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = Item(ctx, task, idx, text, fut, start, "pending" if start else "")
        self.queue.append(item)
        if self.running_count < BATCH_RUNNERS:
            self._spawn_runner()
        elif self.running_count < self.settings.sql_limit and not self.spawn_check_armed:
            # runners busy with slow statements must not hold queued steps back: one timer
            # for the whole queue (not one per step) adds a runner when they all are stuck
            self.spawn_check_armed = True
            asyncio.get_running_loop().call_later(BATCH_SPAWN_DELAY_S, self._spawn_check)
        await fut

    def _start_visible(self, item: Item) -> None:
        """A first step still running FIRST_STEP_VISIBLE_S after its statement began: commit
        its instance's start on its own, so that the instance shows as running meanwhile.
        (Not while it waits in the queue: it is not running then, and a backlog of first
        steps would each commit a start of its own.)"""
        if item.phase != "pending" or item.fut.done():
            return
        item.phase = "committing"
        item.visible = asyncio.create_task(self._commit_start(item), name="visible start")

    async def _commit_start(self, item: Item) -> None:
        start = item.start
        assert start is not None
        old = start.key
        try:
            await self.checkpointer.start_running(item.ctx, start, item.task)
        except Exception as exc:  # nothing committed: its batch rolls back, it starts again
            item.phase = "failed"
            logger.info(
                "could not start an instance while its first step ran: %s",
                exc,
                extra={"event": "batch.start_failed"},
            )
            return
        # the instance runs: its first step is an ordinary step of it, holding its own lease
        pid = self.running.pids.pop(old, None)
        start.node_id, start.gen, start.kind = item.task.node_id, item.task.gen, "run"
        if pid is not None:
            self.running.pids[start.key] = pid
        item.phase = "started"

    def _spawn_runner(self) -> None:
        self.running_count += 1  # counted down by the runner itself, synchronously
        runner = asyncio.create_task(self._runner(), name="sql batch runner")
        self.runners.add(runner)
        runner.add_done_callback(self.runners.discard)

    def _spawn_check(self) -> None:
        """Another runner while steps are queued, if every runner is stuck on a statement."""
        self.spawn_check_armed = False
        if not self.queue or self.running_count >= self.settings.sql_limit:
            return
        now = time.monotonic()
        stuck = [t for t in self.busy.values() if now - t >= BATCH_SPAWN_DELAY_S]
        if len(stuck) >= self.running_count:
            self._spawn_runner()
        if self.running_count < self.settings.sql_limit:  # steps still queued: look again
            self.spawn_check_armed = True
            asyncio.get_running_loop().call_later(BATCH_SPAWN_DELAY_S, self._spawn_check)

    def pick(self, after: str | None, role: int | None) -> Item | None:
        """The next queued step for a batch: the lowest instance id first (of ``role``, when
        given; from ``after`` up, when given).

        A batch holds one role (one runner, one step identity, one session). It takes its
        instances' locks in ascending order where it can, as the completer does: while it
        holds none, a step of any instance may join (the end takes the locks of the steps
        left for it in ascending order); once it holds one (a checkpoint computed early, for a
        chain), only steps of that instance or higher ones join. A step left for the end below
        a lock taken early (its own lock was busy then, or it ends a chain) is waited for at
        most BATCH_LOCK_WAIT_S, as any: the batch then rolls back and its steps run alone.
        """
        best = -1
        for i, it in enumerate(self.queue):
            inst = it.task.instance_id
            if role is not None and it.ctx.role_oid != role:
                continue
            if after is not None and inst < after:
                continue
            if best < 0 or inst < self.queue[best].task.instance_id:
                best = i
                if inst == after:
                    break
        return self.queue.pop(best) if best >= 0 else None

    async def _runner(self) -> None:
        me = object()
        try:
            while True:
                first = self.pick(None, None)
                if first is None:
                    return
                async with self.settings.sql_sem:
                    try:
                        await self.run_batch(first, me)
                    except Exception:  # a bug of ours: never leave queued steps unattended
                        logger.exception("batch runner error", extra={"event": "batch.error"})
                        if not first.fut.done():
                            first.fut.set_exception(Retry())
        finally:
            self.running_count -= 1
            self.busy.pop(me, None)

    async def run_batch(self, first: Item, me: object) -> None:
        """Run queued SQL steps of one role in one transaction, each with its checkpoint.

        The statements run one after another (``RESET ALL`` and the per-step settings
        between them); each step's checkpoint is computed (staged: :mod:`.checkpoint_set`)
        either right after its statement, when the step may have a chained successor
        (:mod:`.chain`: that successor then runs next, in this transaction), or once all the
        statements ran; then every staged checkpoint is written by one call, in ascending
        instance order, and one COMMIT follows: runs rows are locked only for that short last
        phase, as for a single step, not while later statements run. Exactly-once as for a
        single step: each statement commits with its checkpoint. A later step's failed
        statement or refused result is its own outcome (:mod:`.in_place`: rolled back to its
        savepoint), and so is the first step's when it ran alone. Any other failure (a fenced
        checkpoint, a busy instance, an interrupted statement, the connection, a checkpoint
        refused at the end) rolls the whole batch back; the steps that were submitted then
        run again one per transaction (:class:`Retry`), which decides each one's outcome (a
        chained step is not run again: its predecessor's run writes it as a task). A
        checkpoint waits at most
        BATCH_LOCK_WAIT_S for its instance's asyncio lock: the batch holds database locks, so
        an unbounded wait could close a cycle PostgreSQL cannot see.
        """
        ran: list[tuple[Item, Outcome]] = []
        held: dict[int, asyncio.Lock] = {}
        late: set[str] = set()  # instances with a step whose checkpoint waits for the end
        floor: str | None = None  # the highest instance whose lock the batch took early
        staged = CheckpointSet()
        item: Item | None = first
        role = first.ctx.role_oid
        t0 = None  # the window opens once the first step ran (not while waiting for a slot)
        applied: wave.Applied = (b"", b"", None, "")  # what the first step applied
        saved = False  # a later step's savepoint is open (:mod:`.in_place`)
        steps: list[Item] = [first]  # the steps of the next round trip (:mod:`.wave`)
        unsettled: list[Item] = [first]  # sent or to send, not yet in ``ran``
        closing = False  # a chained step was handed off: no more steps join
        try:
            call = await self.sql.step_call(role, first.ctx.role_name)
            first_call = self.sql.first_call(role)
            stmts = wave.Statements(*self.sql.next_call(role))
            async with self.sessions.steps.connection() as conn:
                cap = self.sessions.cap(conn)
                assert cap is not None
                cap_b, runner_cap = cap.encode(), b"%d" % self.sessions.runner_cap
                role_b = b"%d" % role
                refused: StepError | None = None
                try:
                    while steps:
                        # one round trip for all of them (:mod:`.wave`)
                        for it in steps:
                            self.running.pids[it.slot_task.key] = conn.info.backend_pid
                            if it.phase == "pending":
                                asyncio.get_running_loop().call_later(
                                    FIRST_STEP_VISIBLE_S, self._start_visible, it
                                )
                        self.busy[me] = time.monotonic()
                        try:
                            if not ran and item is first:
                                # once per batch, its first step alone (:func:`wave.first`)
                                instance_var.set(first.task.instance_id)
                                node_var.set(first.task.node_id)
                                applied, rows = await wave.first(
                                    conn,
                                    self.sessions.step_settings_stmt,
                                    first_call,
                                    first.task,
                                    first.text,
                                    role_b,
                                    cap_b,
                                    runner_cap,
                                )
                                per: list[tuple[Item, wave.Got]] = [(first, rows)]
                            else:
                                cmds, ends, bounded = wave.commands(
                                    [(it.task, it.text) for it in steps],
                                    saved,
                                    applied,
                                    stmts,
                                    role_b,
                                    cap_b,
                                    runner_cap,
                                )
                                saved = True
                                for it, bound in zip(steps, bounded, strict=True):
                                    it.bounded = bound
                                per = list(
                                    zip(steps, await wave.run(conn, cmds, ends), strict=True)
                                )
                                if any(isinstance(r, psycopg.Error) for _, r in per):
                                    stmts.fresh()  # a step may have taken them away
                        finally:
                            for it in steps:
                                self.running.pids.pop(it.slot_task.key, None)
                            self.busy.pop(me, None)
                        steps = []
                        # each step's outcome, in the order its statement ran
                        ran_at = [
                            i for i, (_, r) in enumerate(per) if not isinstance(r, wave.Skipped)
                        ]
                        for pos, (item, res) in enumerate(per):
                            if isinstance(res, wave.Skipped):
                                steps.append(item)  # not run (one before it failed): sent again
                                continue
                            instance_var.set(item.task.instance_id)
                            node_var.set(item.task.node_id)
                            later_ran = bool(ran_at) and pos != ran_at[-1]
                            try:
                                if isinstance(res, psycopg.Error):
                                    raise res
                                value = envelope(res)
                                # capped now: a later step's refused result is its own failure
                                outcome = Outcome.success(
                                    value, self.checkpointer.result_data(value)
                                )
                            except (psycopg.Error, StepError) as exc:
                                if later_ran:
                                    # refused here, after steps behind it in its round trip ran:
                                    # its savepoint is not the newest (the batch rolls back)
                                    raise
                                if isinstance(exc, psycopg.Error) and await unchain(
                                    conn, item.chained, item.bounded, exc
                                ):
                                    unsettled.remove(item)
                                    closing = True  # a task of its own now: no more steps join
                                    continue
                                if not ran:
                                    raise  # the first step: the batch ends, recording it
                                own = await in_place.failure(
                                    conn, self.sql, item.slot_task, item.text, exc
                                )
                                if own is None:
                                    raise
                                outcome = own  # its failure, staged as any outcome
                            ran.append((item, outcome))
                            unsettled.remove(item)
                            done = item
                            if done.phase == "pending":
                                done.phase = "fused"  # checkpointed with its start from now on
                            if t0 is None:
                                t0 = time.monotonic()
                            room = (
                                not closing
                                and len(ran) + len(unsettled) < BATCH_MAX
                                and time.monotonic() - t0 < BATCH_WINDOW_S
                            )
                            if not done.staged and self._stage_now(done, held, late):
                                floor = max(floor or "", done.task.instance_id)
                                try:
                                    await self._stage(conn, done, outcome, staged, held)
                                except StepError as exc:
                                    if (
                                        done is not first
                                        and done.phase != "fused"
                                        and not later_ran
                                        and await in_place.refused(
                                            conn,
                                            self.checkpointer,
                                            done.ctx,
                                            done.slot_task,
                                            done.idx,
                                            exc,
                                            staged,
                                        )
                                    ):
                                        pass  # its checkpoint was refused: that is its failure
                                    elif len(ran) != 1 or first.phase == "fused":
                                        raise
                                    else:
                                        refused = exc  # handled below, as a late checkpoint
                                        item = None
                                        break
                                if room and done.staged and outcome.ok:
                                    nxt = self._chained(done, staged)
                                    if nxt is not None:
                                        steps.append(nxt)
                                        unsettled.append(nxt)
                            else:
                                late.add(done.task.instance_id)
                        item = None
                        if refused is not None:
                            break
                        # more queued steps join the next round trip, the lowest instances
                        # first, while the batch has room
                        while (
                            not closing
                            and t0 is not None
                            and len(steps) < WAVE_MAX
                            and len(ran) + len(unsettled) < BATCH_MAX
                            and time.monotonic() - t0 < BATCH_WINDOW_S
                        ):
                            more = self.pick(floor, role)
                            if more is None:
                                break
                            steps.append(more)
                            unsettled.append(more)
                except BaseException as exc:
                    for lock in held.values():
                        lock.release()
                    held.clear()
                    if _testing.IGNORE_FENCE and isinstance(exc, Fenced):  # a planted bug
                        await _testing.commit_anyway(conn)  # (a chain's early checkpoint)
                    await self.sessions.reset(conn)
                    if first.visible is not None:
                        await asyncio.wait([first.visible])
                    if item is first and first.phase == "pending":
                        _interrupted(first, exc, self.running)
                    if not (
                        item is first
                        and first.phase in ("", "started")
                        and isinstance(exc, psycopg.Error | StepError)
                        and not (conn.broken or conn.closed)
                    ):
                        raise
                    # the batch held this step alone: its statement's failure is its
                    # outcome, checkpointed as for a step run on its own (not run again)
                    await self.sql.statement_failed(
                        conn, first.ctx, first.slot_task, first.idx, first.text, exc
                    )
                    first.fut.set_result(None)
                    return
                try:
                    if refused is not None:
                        raise refused
                    # the other checkpoints, in ascending instances (one instance's in the
                    # order its statements ran), each instance's lock held from its first
                    # checkpoint to the COMMIT: its runs row stays locked that long, and nobody
                    # in this process may then compute on state that another open transaction
                    # will change
                    for it, outcome in sorted(ran, key=_instance_of):
                        if not it.staged:
                            await self._stage(conn, it, outcome, staged, held)
                    # every checkpoint of the batch in one call (docs/performance.md), and
                    # the COMMIT in the same round trip when every checkpoint is written
                    instance_var.set(None)
                    node_var.set(None)
                    try:
                        if not await self.checkpointer.flush_commit(
                            conn, staged, self.sessions.commit_reset_commands()
                        ):
                            await self.checkpointer.flush(conn, staged)
                            await wire.simple(conn, self.sessions.commit_reset)
                    except psycopg.OperationalError:
                        if _testing.BLIND_COMMIT_RETRY:  # a planted bug: pgdurable/_testing.py
                            await _testing.blind_rerun(
                                self.sessions, call, role, [i.text for i, _ in ran]
                            )
                        raise
                except StepError as exc:
                    await self.sessions.reset(conn)
                    if len(ran) != 1 or first.phase == "fused" or conn.broken or conn.closed:
                        raise
                    refused = exc  # handled below, once the instance's lock is released
                except BaseException as exc:
                    if _testing.IGNORE_FENCE and isinstance(exc, Fenced):  # a planted bug
                        await _testing.commit_anyway(conn)  # pgdurable/_testing.py
                    await self.sessions.reset(conn)
                    raise
                finally:
                    for lock in held.values():
                        lock.release()
                if refused is not None:
                    # a batch of one whose result (or the checkpoint it makes) is over a cap:
                    # its statement rolled back with it, and that is its outcome (not run again)
                    await self.sql.statement_failed(
                        conn, first.ctx, first.slot_task, first.idx, first.text, refused
                    )
                    first.fut.set_result(None)
                    return
        except BaseException as exc:
            failed = [it for it, _ in ran] + unsettled
            metrics.batch(len(failed), False)
            starting = [it.visible for it in failed if it.visible is not None]
            if starting:  # whether a start committed decides how its step runs again
                await asyncio.wait(starting)
            for it in failed:
                self.cache.forget(it.task.instance_id, it.ctx)  # rolled back: reload
                if it.fut.done() or it.task.virtual:
                    continue  # (a chained step: nobody waits for it; its head runs again)
                if isinstance(exc, asyncio.CancelledError):
                    it.fut.cancel()
                elif isinstance(exc, Fenced) and len(failed) == 1:
                    it.fut.set_exception(Fenced())
                elif isinstance(exc, Requeue) and len(failed) == 1:
                    it.fut.set_exception(exc)  # interrupted by another session: logged, backs off
                else:
                    it.fut.set_exception(Retry())
            if len(failed) > 1:
                logger.info(
                    "batch of %d SQL steps rolled back (%s: %s); running them alone",
                    len(failed),
                    type(exc).__name__,
                    exc,
                    extra={"event": "batch.retry"},
                )
            if not isinstance(exc, Exception):
                raise
        else:
            metrics.batch(len(ran), True)
            for it, _ in ran:
                if it.head is not None:
                    # a chained step's successors run once its head's dispatcher resumes
                    it.head.slot_task.handoff.extend(it.task.handoff)
                    it.task.handoff = []
            for it, _ in ran:
                if not it.fut.done():
                    it.fut.set_result(None)
        finally:
            instance_var.set(None)
            node_var.set(None)

    def _stage_now(self, it: Item, held: dict[int, asyncio.Lock], late: set[str]) -> bool:
        """Whether to compute this step's checkpoint right after its statement (it may have a
        chained successor), rather than once the batch's statements all ran: never after a
        step of its instance left for the end (its checkpoints stay in statement order), nor
        while another transaction of this process holds its instance."""
        ctx = it.ctx
        return (
            ctx.instance_id not in late
            and it.phase in ("", "fused", "started")
            and (id(ctx.lock) in held or not ctx.lock.locked())
            and not _testing.BROKEN_CHECKPOINT
            and chainable(ctx, it.idx)
        )

    async def _stage(
        self,
        conn: psycopg.AsyncConnection[Any],
        it: Item,
        outcome: Outcome,
        staged: CheckpointSet,
        held: dict[int, asyncio.Lock],
    ) -> None:
        """Compute one step's checkpoint into ``staged`` (written by the batch's flush), its
        instance's lock then held to the COMMIT."""
        instance_var.set(it.task.instance_id)
        node_var.set(it.task.node_id)
        if it.phase == "committing":
            assert it.visible is not None
            await it.visible  # its start commits on its own: then ordinary
        if it.phase == "failed":
            raise Retry()
        it.staged = True
        if id(it.ctx.lock) not in held:
            await acquire(it.ctx, BATCH_LOCK_WAIT_S)
            held[id(it.ctx.lock)] = it.ctx.lock
        if it.phase == "fused":
            assert it.start is not None
            await self.checkpointer.record_start(
                conn, it.ctx, it.start, it.task, it.idx, outcome, staged
            )
            return
        await self.checkpointer.record(
            conn,
            it.ctx,
            it.slot_task,
            it.idx,
            outcome,
            in_tx=True,
            lock_held=True,
            batch=staged,
        )

    def _chained(self, done: Item, staged: CheckpointSet) -> Item | None:
        """The successor of ``done`` to run next in this batch (:mod:`.chain`), if any."""
        got = successor(done.ctx, done.slot_task, done.task.clock, staged)
        if got is None:
            return None
        metrics.step_started("SQL")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        return Item(done.ctx, got.task, got.idx, got.text, fut, head=done.head or done, chained=got)


def _instance_of(ran: tuple[Item, Outcome]) -> str:
    return ran[0].task.instance_id


def _interrupted(item: Item, exc: BaseException, running: Running) -> None:
    """A first step cancelled by another session before its start committed: it runs again
    with its start (as :meth:`SqlSteps.statement_failed` says of other steps)."""
    if (
        isinstance(exc, psycopg.Error)
        and exc.sqlstate == "57014"
        and "user request" in str(exc)
        and not running.was_interrupted(item.slot_task.key)
    ):
        logger.warning(
            "step interrupted by another session: %s; it runs again",
            pg_message(exc),
            extra={"event": "step.requeued"},
        )
