"""FOREACH (``df.foreach``, docs/foreach.md): a leaf to the scheduler whose bodies run as
child instances. Each run of its task is one idempotent tick (``_foreach_tick_v1``,
pgdurable/sql/schema/38_foreach.sql): the first runs the rows query as the instance's owner
(its step runner, as a SQL step) and stores the rows in that step's transaction; every tick
then starts bodies up to max_parallel, fails the FOREACH on the first failed row (running
bodies cancelled), completes it with the result assembled in SQL, or parks its task until a
body ends. Nothing proportional to the number of rows is held here but the final result."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
from psycopg import sql

from pgdurable.errors import StepError
from pgdurable.values import loads
from pgdurable.worker.checkpoint import Outcome
from pgdurable.worker.failures import pg_message
from pgdurable.worker.flow import Fenced, Requeue
from pgdurable.worker.instance import InstanceCtx, subst
from pgdurable.worker.notifier import Running
from pgdurable.worker.sessions import Sessions
from pgdurable.worker.settings import Settings
from pgdurable.worker.task import Task, step_app_name

from .sql_step import SqlSteps

logger = logging.getLogger(__name__)

# Cancelling the running bodies of a failed FOREACH: a body busy checkpointing is skipped and
# tried again this many times, CANCEL_PAUSE_S apart; what is left the maintenance round's
# reaper cancels (@engine@._foreach_reap_v1).
CANCEL_TRIES = 20
CANCEL_PAUSE_S = 0.1


class ForeachStep:
    """Run one tick of a FOREACH task."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        settings: Settings,
        running: Running,
        sql_steps: SqlSteps,
        worker_id: str,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.running = running
        self.sql_steps = sql_steps
        self.worker_id = worker_id

    async def run(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, idx: int
    ) -> Outcome | None:
        """The FOREACH's outcome (failed, completed), or None: parked until a body ends."""
        for _ in range(3):
            cur = await conn.execute(
                self.sessions.q("foreach_tick"),
                (self.worker_id, task.instance_id, task.node_id, task.gen),
            )
            row = await cur.fetchone()
            state, detail = row if row else ("fenced", None)
            if state == "fenced":
                raise Fenced()
            if state == "rows":
                failure = await self._rows(ctx, task, idx)
                if failure is not None:
                    return failure
                continue  # the rows are stored: start the first bodies
            if state == "failed":
                await self._cancel(conn, task, str(detail))
                return Outcome.failure(StepError(str(detail)))
            if state == "completed":
                return Outcome.success(loads(str(detail)))
            logger.debug("foreach parked at %s", detail, extra={"event": "foreach.parked"})
            return None
        raise Requeue("FOREACH rows were stored but the tick did not see them")

    async def _cancel(self, conn: psycopg.AsyncConnection[Any], task: Task, why: str) -> None:
        """Cancel the bodies still running (each in its own transaction, no lock of the
        parent held: a body that ends meanwhile waits on nothing of ours)."""
        reason = f"another row of its FOREACH failed ({why[:200]})"
        for _ in range(CANCEL_TRIES):
            cur = await conn.execute(
                self.sessions.q("foreach_cancel"), (task.instance_id, task.node_id, reason)
            )
            row = await cur.fetchone()
            if not row or not row[0]:
                return
            await asyncio.sleep(CANCEL_PAUSE_S)

    async def _rows(self, ctx: InstanceCtx, task: Task, idx: int) -> Outcome | None:
        """Run the rows query as the owner, its rows stored in the same transaction (fenced by
        our lease). None when stored; the FOREACH's failure when the query failed."""
        if ctx.database and ctx.database != self.settings.current_db:
            # the rows must commit with the query that read them, and they are kept in the
            # df database: a query in another database cannot share that transaction
            return Outcome.failure(
                StepError(
                    f"df.foreach: a FOREACH cannot run in an instance started with database => "
                    f"{ctx.database!r} (its rows query would run in another database than the "
                    "one its rows are stored in); start the FOREACH in the df database and "
                    "give its body's steps the other database's work",
                    sqlstate="0A000",
                )
            )
        try:
            text = subst(ctx, loads(ctx.configs[idx])["rows"], "sql")
            await self.sql_steps.step_call(ctx.role_oid, ctx.role_name)  # the runner, verified
        except StepError as exc:
            return Outcome.failure(exc)
        engine = self.sessions.engine
        query = sql.SQL(
            "select {}._step_foreach_rows_v1(%s, %s, %s, %s, %s, "
            "(select coalesce(pg_catalog.jsonb_agg(r.j::pg_catalog.jsonb order by r.n), "
            "'[]'::pg_catalog.jsonb) from {}.{}(%s, %s, %s) with ordinality r(j, n)))"
        ).format(
            sql.Identifier(engine),
            sql.Identifier(f"{engine}_exec"),
            sql.Identifier(f"step_{ctx.role_oid}"),
        )
        sem = self.settings.sql_sem
        async with self.sessions.steps.connection() as sconn:
            cap = self.sessions.cap(sconn)
            assert cap is not None, "the rows query runs on a step connection"
            await sem.acquire()
            self.running.pids[task.key] = sconn.info.backend_pid
            try:
                async with sconn.pipeline():
                    await sconn.execute(b"begin")
                    await sconn.execute(
                        self.sessions.q("step_settings"),
                        (cap, ctx.role_oid, step_app_name(task), ctx.role_oid, None),
                    )
                    cur = await sconn.execute(
                        query,
                        (
                            cap,
                            self.worker_id,
                            task.instance_id,
                            task.node_id,
                            task.gen,
                            cap,
                            text,
                            self.sessions.runner_cap,
                        ),
                    )
                row = await cur.fetchone()
                if not row or row[0] is None or row[0] < 0:
                    await self.sessions.reset(sconn)
                    raise Fenced()
                await sconn.execute(self.sessions.commit_reset)
                logger.info("foreach rows stored: %d", row[0], extra={"event": "foreach.rows"})
                return None
            except psycopg.Error as exc:
                await self.sessions.reset(sconn)
                if sconn.broken or sconn.closed or exc.sqlstate is None:
                    raise  # the database went away: released and tried again
                if exc.sqlstate == "57014" and not self.running.was_interrupted(task.key):
                    raise Requeue(f"rows query interrupted: {pg_message(exc)}") from None
                msg = pg_message(exc)
                if not msg.startswith("df.foreach:"):
                    msg = f"df.foreach: the rows query failed: {msg}"
                return Outcome.failure(StepError(msg, sqlstate=exc.sqlstate))
            finally:
                self.running.pids.pop(task.key, None)
                sem.release()
