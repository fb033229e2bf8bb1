"""Handle one claimed task: start its instance or run its node (by node kind, each in its own
module), and when the handling fails for a reason that is not the step's own, release the task
(retried), or fail the step or instance now (poison, deterministic failures)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg

from pgdurable import _testing, metrics
from pgdurable.errors import StepError
from pgdurable.graph import _abc as A
from pgdurable.log import instance_var, node_type_var, node_var
from pgdurable.steps.foreach_step import ForeachStep
from pgdurable.steps.http_run import HttpSteps
from pgdurable.steps.remote import RemoteSql
from pgdurable.steps.signal_step import SignalStep
from pgdurable.steps.sql_step import SqlSteps
from pgdurable.values import break_value, error_text, loads

from .batch import BatchRunner
from .cache import InstanceCache
from .checkpoint import Checkpointer, Outcome, first_sql_leaf
from .failures import DATA, INTERNAL, MAX_ATTEMPTS, RETRY, failure_kind, failure_reason, where
from .flow import Fenced, Requeue, Retry
from .instance import TYPE_NAMES, BadGraph, BadSetting, InstanceCtx, subst
from .producer import Slots
from .sessions import Sessions
from .settings import Settings
from .task import Task

logger = logging.getLogger(__name__)


class Dispatch:
    """What happens to a task between its claim and its checkpoint."""

    def __init__(
        self,
        *,
        worker_id: str,
        sessions: Sessions,
        settings: Settings,
        cache: InstanceCache,
        checkpointer: Checkpointer,
        slots: Slots,
        sql: SqlSteps,
        batch: BatchRunner,
        remote: RemoteSql,
        signal: SignalStep,
        http: HttpSteps,
        foreach: ForeachStep,
        wake: asyncio.Event,
        stopping: asyncio.Event,
    ) -> None:
        self.worker_id = worker_id
        self.sessions = sessions
        self.settings = settings
        self.cache = cache
        self.checkpointer = checkpointer
        self.slots = slots
        self.sql = sql
        self.batch = batch
        self.remote = remote
        self.signal = signal
        self.http = http
        self.foreach = foreach
        self.wake = wake
        self.stopping = stopping

    async def handle(self, task: Task) -> None:
        """Run one task to its checkpoint; never raises but CancelledError."""
        instance_var.set(task.instance_id)
        node_var.set(task.node_id)
        task.started = datetime.now(UTC)
        try:
            if task.kind == "start":
                await self.start_instance(task)
            else:
                try:
                    await self.run_node(task)
                except Retry:
                    # the batch this step ran in rolled back (another step of it failed):
                    # run it again in a transaction of its own, which decides its outcome
                    task.handoff = []
                    task.alone = True
                    await self.run_node(task)
            # every checkpoint of this step has committed: the successors it took run once
            # this step has left `inflight` (a start task shares its key with a root leaf)
            task.handoff_ready = True
            metrics.handed_off(len(task.handoff))
        except Requeue as exc:
            logger.warning("%s; it runs again", exc, extra={"event": "step.requeued"})
            self.cache.forget(task.instance_id)
            if task.attempts >= MAX_ATTEMPTS:
                with contextlib.suppress(Exception):
                    await self.poison(task, exc)
                    return
            await self.release(task)
        except Fenced:
            logger.info(
                "step fenced (lease lost, abandoned or instance finished)",
                extra={"event": "step.fenced"},
            )
            self.cache.forget(task.instance_id)
            # if the task is somehow still ours, give it back rather than sit on it
            await self.release(task)
        except BadGraph as exc:
            # the stored graph cannot run (a config df.start would have refused): the same
            # on every attempt, so the instance fails now, once, without a traceback
            self.cache.forget(task.instance_id)
            # (or its role's settings cannot be used: BadSetting names which)
            reason = (
                str(exc)
                if isinstance(exc, BadSetting)
                else f"the instance's stored graph cannot run: {exc}"
            )
            logger.warning("failing instance: %s", reason, extra={"event": "instance.bad_graph"})
            if not await self.fail_instance(task, reason):
                await self.release(task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._not_its_own(task, exc)

    async def _not_its_own(self, task: Task, exc: Exception) -> None:
        """Not the step's own failure: the database went away or refused our checkpoint
        for a while (the task is given back and runs again, a bounded number of times),
        or the same input fails the same way every time (the step fails now)."""
        self.cache.forget(task.instance_id)
        kind = failure_kind(exc, stopping=self.stopping.is_set())
        final = kind != RETRY
        what = f"{type(exc).__name__}: {exc}"
        if kind == INTERNAL:
            # a bug of ours: its traceback is logged here, once, and the step fails
            logger.error(
                "internal error in pgdurable while %s (%s); failing it, not retrying it",
                where(task),
                what,
                exc_info=exc,
                extra={"event": "step.internal_error"},
            )
        elif kind == DATA:
            logger.warning(
                "step cannot go on (%s); failing it",
                what,
                extra={"event": "step.deterministic_error"},
            )
        elif task.attempts >= MAX_ATTEMPTS:
            logger.error(
                "step abandoned after %d attempts (%s)",
                task.attempts,
                what,
                exc_info=exc,
                extra={"event": "step.abandoned"},
            )
        elif isinstance(exc, psycopg.Error) and exc.sqlstate is None:
            logger.warning(
                "database unavailable during step: %s", exc, extra={"event": "step.infra_error"}
            )
        else:
            logger.warning(
                "step runs again (attempt %d of %d failed: %s)",
                task.attempts,
                MAX_ATTEMPTS,
                what,
                extra={"event": "step.retry"},
            )
        if final or task.attempts >= MAX_ATTEMPTS:
            with contextlib.suppress(Exception):
                await self.poison(task, exc, kind=kind)
                return
        await self.release(task)

    async def fail_instance(self, task: Task, reason: str) -> bool:
        """Fail the task's instance with ``reason`` (on its node), if the task is still ours."""
        try:
            async with self.sessions.service.connection() as conn:
                cur = await conn.execute(
                    self.sessions.q("fail_instance"),
                    (self.worker_id, task.instance_id, task.node_id, error_text(reason)),
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:
            logger.warning(
                "could not fail the instance: %s", exc, extra={"event": "instance.fail_error"}
            )
            return False
        return bool(row and row[0])

    async def poison(self, task: Task, exc: BaseException, *, kind: str = RETRY) -> None:
        """Fail a step that could not be handled in MAX_ATTEMPTS claims (a start task too:
        an instance whose graph cannot even load fails instead of being retried forever),
        or at once when its failure is deterministic (``kind`` DATA or INTERNAL)."""
        reason = failure_reason(task, exc, kind)
        sqlstate = "XX000" if kind == INTERNAL else getattr(exc, "sqlstate", None)
        if task.kind != "start":
            try:
                async with self.sessions.service.connection() as conn:
                    ctx = await self.cache.get(conn, task.instance_id, fresh=True)
                if ctx is not None and task.node_id in ctx.index:
                    err = StepError(reason, sqlstate=sqlstate)
                    await self.checkpointer.submit(
                        ctx, task, ctx.index[task.node_id], Outcome.failure(err)
                    )
                    return
            except Exception:
                logger.warning(
                    "cannot load instance to fail its step; failing the instance",
                    extra={"event": "step.poison"},
                )
        if not await self.fail_instance(task, reason):
            raise Fenced()  # not ours any more, or its row is busy: released, tried later

    async def release(self, task: Task) -> None:
        """Give the task back to the queue (retried until the database takes it)."""
        for _ in range(50):
            try:
                async with self.sessions.service.connection(timeout=5) as conn:
                    await conn.execute(
                        self.sessions.q("release"),
                        (self.worker_id, task.instance_id, task.node_id),
                    )
                return
            except Exception:
                await asyncio.sleep(0.5)

    async def start_instance(self, task: Task) -> None:
        """Check the submitting role, then start the instance (or fail it, saying why)."""
        async with self.sessions.service.connection() as conn:
            ctx = await self.cache.get(conn, task.instance_id, fresh=True, start=True)
            if ctx is None:
                return
            role = ctx.role_info  # loaded with the instance, just now (fresh)
            # the role's step slots (max_connections_per_role) exist before its first step
            if self.settings.role_cap > 0 and ctx.role_oid not in self.settings.slotted_roles:
                await conn.execute(self.sessions.q("slots_ensure"), (ctx.role_oid,))
                self.settings.slotted_roles.add(ctx.role_oid)
            problem = None
            if role is None:
                problem = f"the submitting role (oid {ctx.role_oid}) no longer exists"
            elif role.superuser and not role.superuser_instances:
                problem = (
                    f"role {role.name!r} is a superuser; superuser instances are refused "
                    "unless pg_durable.enable_superuser_instances is on"
                )
            elif not role.can_login:
                problem = f"role {role.name!r} lacks the LOGIN attribute"
        if problem is None and await self._start_with_first_step(ctx, task):
            metrics.step_with_start()
            logger.info("instance started", extra={"event": "instance.started"})
            return
        if ctx.dead or self.cache.peek(task.instance_id) is not ctx:
            # a first step that could not run with the start: it changed nothing committed,
            # but the copy in memory may have moved on; start from a fresh one
            async with self.sessions.service.connection() as conn:
                ctx = await self.cache.get(conn, task.instance_id, fresh=True)
            if ctx is None:
                return
        await self.checkpointer.start(ctx, task, problem)
        logger.info("instance started", extra={"event": "instance.started"})

    async def _start_with_first_step(self, ctx: InstanceCtx, task: Task) -> bool:
        """Run an instance's first step with its start, one transaction (a one-step
        workflow commits once): when the start runs a single SQL step of this database.
        False when it cannot, or when its batch rolled back before the start committed
        (nothing committed): the caller starts it the usual way. A step still running after
        FIRST_STEP_VISIBLE_S has its start committed meanwhile (BatchRunner); ``task`` then
        names the step (kind ``run``), run again alone if its batch rolls back."""
        if (
            task.attempts > 1
            or _testing.BROKEN_CHECKPOINT
            or (ctx.database and ctx.database != self.settings.current_db)
        ):
            return False
        free, take_sql = self.checkpointer.budget()
        if free + 1 <= 0 and take_sql <= 0:
            return False  # the start would not take its step either (this worker is full)
        idx = first_sql_leaf(ctx)
        if idx is None:
            return False
        try:
            text = subst(ctx, ctx.configs[idx], "sql")
        except StepError:
            return False  # the usual way fails the step, saying why
        leaf = Task(
            ctx.instance_id,
            ctx.graph.node_ids[idx],
            ctx.sched.gen(idx) + 1,  # the generation the start activates it with
            "run",
            1,
            ctx.role_oid,
            ctx.database,
            None,
            task.clock,
            None,
            started=task.started,
        )
        node_type_var.set("SQL")
        metrics.step_started("SQL")
        try:
            await self.batch.submit(ctx, leaf, idx, text, start=task)
        except Retry:
            if task.kind == "start":
                return False
            # the instance started while the step ran, then its batch rolled back: the
            # step runs again alone, as any step of a rolled back batch
            task.handoff = []
            task.alone = True
            await self.run_node(task)
        return True

    async def run_node(self, task: Task) -> None:
        """Run the task's node by its kind, then checkpoint its outcome."""
        if await self._batch_from_cache(task):
            return
        async with contextlib.AsyncExitStack() as held:
            conn = await held.enter_async_context(self.sessions.service.connection())
            ctx = await self.cache.get(conn, task.instance_id, version=task.version)
            if ctx is None:
                return
            idx = ctx.index.get(task.node_id)
            if idx is None:
                raise Fenced()
            ntype = ctx.graph.types[idx]
            node_type_var.set(TYPE_NAMES[ntype])
            metrics.step_started(TYPE_NAMES[ntype])
            if ntype == A.SQL:
                text = await self._prepare_sql(conn, ctx, task, idx)
                if text is None:
                    return
                # the connection goes back to the pool; a batch runner takes the step
                await held.aclose()
                await self.batch.submit(ctx, task, idx, text)
                return
            if ntype in (A.HTTP, A.HTTP_MULTIPART):
                outcome = None  # runs below, after the connection went back to the pool
            else:
                try:
                    outcome = await self._run_here(conn, ctx, task, idx, ntype)
                except StepError as exc:
                    outcome = Outcome.failure(exc)
                if outcome is None:
                    return  # recorded already (a signal taken) or parked
        if outcome is None:
            outcome = await self._run_http(ctx, task, idx, ntype)
        await self.checkpointer.submit(ctx, task, idx, outcome)

    async def _run_here(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, idx: int, ntype: int
    ) -> Outcome | None:
        """The outcome of a node that needs no step session (None: handled already)."""
        if ntype == A.BREAK:
            raw = loads(ctx.configs[idx]).get("break_value")
            if raw is not None:
                raw = subst(ctx, raw, "raw")
            return Outcome.success(break_value(raw))
        if ntype == A.IF:
            name = loads(ctx.configs[idx])["result_name"]
            res = ctx.named.get(name)
            count = res.get("row_count") if isinstance(res, dict) else None
            if isinstance(count, bool) or not isinstance(count, int | Decimal):
                # missing, or a value shaped like rows (a break value) that is not
                raise StepError(
                    f"if_rows: result {name!r} is missing or has no rows "
                    "(it must name an earlier SQL step)"
                )
            return Outcome.decided(count > 0)
        if ntype == A.SLEEP:
            return Outcome.success({"slept": True, "seconds": int(ctx.configs[idx] or 0)})
        if ntype == A.WAIT_SCHEDULE:
            return Outcome.success({"scheduled": True})
        if ntype == A.SIGNAL:
            return await self.signal.run(conn, ctx, task, idx)
        if ntype == A.RETRY:
            # a df.retry's delay is over (its timer task): the next attempt begins
            return Outcome.decided(True)
        if ntype == A.FOREACH:
            # a df.foreach tick: start bodies, or its outcome (None: parked)
            return await self.foreach.run(conn, ctx, task, idx)
        # composites never become tasks
        raise StepError(f"node type {TYPE_NAMES[ntype]} cannot run as a step")

    async def _run_http(self, ctx: InstanceCtx, task: Task, idx: int, ntype: int) -> Outcome:
        """An HTTP request holds no database connection while it waits on the network, so
        fan-out is bounded by slots, not by the pool."""
        try:
            self.slots.http_waiting += 1
            self.wake.set()  # a slot just became free
            try:
                value = await self.http.run(ctx, task, idx, ntype == A.HTTP_MULTIPART)
            finally:
                self.slots.http_waiting -= 1
        except StepError as exc:
            return Outcome.failure(exc)
        return Outcome.success(value)

    async def _batch_from_cache(self, task: Task) -> bool:
        """The fast path of a SQL step whose instance is cached: straight to a batch runner,
        without taking a connection (a successor handed to us, a JOIN's branches)."""
        ctx = self.cache.peek(task.instance_id)
        if (
            ctx is None
            or task.alone
            or _testing.BROKEN_CHECKPOINT
            or not self.cache.usable(ctx, task.version)
            or (ctx.database and ctx.database != self.settings.current_db)
        ):
            return False
        idx = ctx.index.get(task.node_id)
        if idx is None or ctx.graph.types[idx] != A.SQL:
            return False
        try:
            text = subst(ctx, ctx.configs[idx], "sql")
        except StepError:
            return False  # the slow path checkpoints the failure
        self.cache.touch(task.instance_id)
        node_type_var.set("SQL")
        metrics.step_started("SQL")
        await self.batch.submit(ctx, task, idx, text)
        return True

    async def _prepare_sql(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, idx: int
    ) -> str | None:
        """Substitute a SQL step; run it here unless it can join a batch (its text then)."""
        try:
            text = subst(ctx, ctx.configs[idx], "sql")
        except StepError as exc:
            await self.checkpointer.record(conn, ctx, task, idx, Outcome.failure(exc))
            return None
        if ctx.database and ctx.database != self.settings.current_db:
            await self.remote.run(conn, ctx, task, idx, text)
            return None
        if task.alone or _testing.BROKEN_CHECKPOINT:
            async with self.sessions.steps.connection() as sconn:
                await self.sql.run(sconn, ctx, task, idx, text)
            return None
        return text
