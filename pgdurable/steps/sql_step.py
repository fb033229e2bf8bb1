"""Run a SQL step on its own (one statement, one transaction with its checkpoint) and turn a
statement's failure into the step's outcome; verify a role's step runner before its first
statement. Batches of SQL steps are :mod:`pgdurable.worker.batch`; steps of a
``database =>`` instance, :mod:`pgdurable.steps.remote`."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import psycopg
from psycopg import sql

from pgdurable import _testing
from pgdurable.errors import StepError
from pgdurable.values import json_text, sql_envelope
from pgdurable.worker import wire
from pgdurable.worker.cache import InstanceCache
from pgdurable.worker.checkpoint import Checkpointer, Outcome
from pgdurable.worker.failures import pg_message
from pgdurable.worker.flow import Fenced, Requeue, StepFailed
from pgdurable.worker.instance import InstanceCtx
from pgdurable.worker.notifier import Running
from pgdurable.worker.sessions import Sessions
from pgdurable.worker.settings import Settings
from pgdurable.worker.task import Task, step_app_name

logger = logging.getLogger(__name__)

# Statements that PostgreSQL refuses inside transaction blocks and functions: a step cannot
# run them (it runs inside its runner, in a transaction with its checkpoint); say so.
AUTOCOMMIT_RE = re.compile(
    r"\s*(vacuum|create\s+(unique\s+)?index\s+concurrently|drop\s+index\s+concurrently"
    r"|reindex\s.*\bconcurrently|create\s+database|drop\s+database|alter\s+system)\b",
    re.IGNORECASE | re.DOTALL,
)


class SqlSteps:
    """SQL steps in the worker's own database, one at a time."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        settings: Settings,
        running: Running,
        checkpointer: Checkpointer,
        cache: InstanceCache,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.running = running
        self.checkpointer = checkpointer
        self.cache = cache
        self.runners: dict[int, sql.Composed] = {}  # role -> its verified runner's call
        self.first_calls: dict[int, bytes] = {}  # the same, with $n placeholders (wire)
        self.next_stmt = sessions.runner_next_call()  # step_next (any verified role's runner)
        # role -> its verified next-step runner's call (None: it has none; step_next then)
        self.next_calls: dict[int, bytes | None] = {}

    async def step_call(self, role_oid: int, role_name: str) -> sql.Composed:
        """``select * from <the role's runner>(cap, sql, max bytes)``, once the runner is
        verified to be the engine's own (df.grant_usage makes it; the service cannot)."""
        call = self.runners.get(role_oid)
        if call is None:
            async with self.sessions.service.connection() as conn:
                cur = await conn.execute(self.sessions.q("runner_ok"), (role_oid,))
                row = await cur.fetchone()
                if not (row and row[0]):
                    raise StepError(runner_missing(role_name), sqlstate="42501")
                cur = await conn.execute(self.sessions.q("runner_next_ok"), (role_oid,))
                nxt = await cur.fetchone()
            call = self.sessions.runner_call(role_oid)
            self.first_calls[role_oid] = wire.dollar(call.as_bytes(None))
            self.next_calls[role_oid] = (
                self.sessions.next_runner_call(role_oid) if nxt and nxt[0] else None
            )
            self.runners[role_oid] = call
        return call

    def first_call(self, role_oid: int) -> bytes:
        """The role's verified runner's call (after :meth:`step_call`), sent by :mod:`wire`."""
        return self.first_calls[role_oid]

    def next_call(self, role_oid: int) -> tuple[bytes, bool]:
        """A batch's later step's call and whether it is the role's next-step runner (its
        parameters are then ``step_next``'s but the role); else ``step_next``, which calls
        the role's runner. Both verified by :meth:`step_call`."""
        assert role_oid in self.runners, "step_call first: it verifies the runner"
        direct = self.next_calls.get(role_oid)
        return (self.next_stmt, False) if direct is None else (direct, True)

    async def run(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, idx: int, text: str
    ) -> None:
        """One SQL step in a transaction of its own on a step connection; its failure is
        checkpointed here."""
        key = task.key
        pid = conn.info.backend_pid
        cap = self.sessions.cap(conn)
        assert cap is not None, "a SQL step runs on a step connection"
        t0 = time.monotonic()
        stage = "statement"
        held = False
        sem = self.settings.sql_sem  # released to the one acquired (load may replace it)
        try:
            try:
                call = await self.step_call(ctx.role_oid, ctx.role_name)
            except StepError as exc:
                raise StepFailed(exc) from None
            await sem.acquire()
            held = True
            self.running.pids[key] = pid
            try:
                # one round trip: BEGIN, settings (the role's, then the engine's) +
                # capability + slot + step identity and the statement, pipelined
                async with conn.pipeline():
                    await conn.execute(b"begin")
                    await conn.execute(
                        self.sessions.q("step_settings"),
                        (cap, ctx.role_oid, step_app_name(task), ctx.role_oid, None),
                    )
                    cur = await conn.execute(call, (cap, text, self.sessions.runner_cap))
                rows = await cur.fetchall()
            finally:
                self.running.pids.pop(key, None)
            try:
                value = envelope(rows)
                del rows, cur
                # exactly-once: the checkpoint commits with the statement
                # (docs/decisions.md D4); a result over a cap fails the step (its statement
                # rolled back), in the checkpoint
                stage = "checkpoint"
                if not _testing.BROKEN_CHECKPOINT:
                    await self.checkpointer.record(
                        conn, ctx, task, idx, Outcome.success(value), in_tx=True
                    )
            except StepError as exc:
                raise StepFailed(exc) from None
            # one round trip (simple query protocol): COMMIT and the session reset
            stage = "commit"
            await conn.execute(self.sessions.commit_reset)
            sem.release()
            held = False
            if _testing.BROKEN_CHECKPOINT:  # the deliberately broken build (pgdurable._testing)
                await asyncio.sleep(_testing.BROKEN_WINDOW_SECONDS)
                await self.checkpointer.record(conn, ctx, task, idx, Outcome.success(value))
        except StepFailed as failed:
            await self.sessions.reset(conn)
            await self.statement_failed(conn, ctx, task, idx, text, failed.err)
        except psycopg.Error as exc:
            await self.sessions.reset(conn)
            if conn.broken or conn.closed or stage == "checkpoint" or exc.sqlstate is None:
                # the database went away, or our own checkpoint failed (not the user's
                # statement): release and retry, bounded by the attempts cap (dispatch)
                raise
            if stage == "commit":
                # code the statement left for COMMIT (a deferred trigger that escaped the
                # runner) failed it: the transaction, checkpoint included, rolled back
                self.cache.forget(task.instance_id, ctx)
            await self.statement_failed(conn, ctx, task, idx, text, exc)
        except BaseException as exc:
            # fenced, stale or cancelled: nothing of the step's transaction may commit
            if _testing.IGNORE_FENCE and isinstance(exc, Fenced):  # planted bug: _testing.py
                await _testing.commit_anyway(conn)
            await self.sessions.reset(conn)
            raise
        finally:
            if held:
                sem.release()
        logger.debug("sql step took %.1f ms", (time.monotonic() - t0) * 1000)

    async def statement_failed(
        self,
        conn: psycopg.AsyncConnection[Any],
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        text: str,
        exc: psycopg.Error | StepError,
    ) -> None:
        """A step's statement failed and its transaction rolled back: its outcome."""
        err = self.failure(task, text, exc)
        await self.checkpointer.record(conn, ctx, task, idx, Outcome.failure(err))

    def failure(self, task: Task, text: str, exc: psycopg.Error | StepError) -> StepError:
        """What a step's failed statement (or refused result) makes its outcome; raises
        :class:`Requeue` for a statement cancelled by another session (run it again)."""
        if isinstance(exc, StepError):  # e.g. an oversized result
            return exc
        ours = self.running.was_interrupted(task.key)
        if exc.sqlstate == "57014" and not ours and "user request" in str(exc):
            # cancelled, but not by us (a statement_timeout says so): another session of the
            # step role signalled it (docs/security.md, known gaps); run the step again
            raise Requeue(f"step interrupted by another session: {pg_message(exc)}")
        if exc.sqlstate == "25001" and AUTOCOMMIT_RE.match(text):
            # VACUUM, CREATE INDEX CONCURRENTLY, … refuse transaction blocks and functions;
            # a step runs inside its runner, in one transaction with its checkpoint
            return StepError(
                f"{pg_message(exc)}: a workflow step runs inside a transaction (its "
                "checkpoint commits with it), so statements that refuse one (VACUUM, "
                "CREATE INDEX CONCURRENTLY, REINDEX CONCURRENTLY, CREATE/DROP DATABASE, ALTER "
                "SYSTEM) cannot be steps; schedule them with cron or pg_cron, or use the "
                "transactional form (ANALYZE, CREATE INDEX)",
                sqlstate=exc.sqlstate,
            )
        # the step's statement failed (whatever its SQLSTATE class: 40, 53, 55, 57… are the
        # user's errors too): interrupted steps are fenced at checkpoint
        return StepError(pg_message(exc), sqlstate=exc.sqlstate)


def envelope(rows: list[Any]) -> dict[str, Any]:
    """The SQL result envelope of a runner's rows (json values, text or already parsed)."""
    return sql_envelope([r[0] if isinstance(r[0], str) else json_text(r[0]) for r in rows])


def runner_missing(role: str) -> str:
    """The error of a role whose step runner is missing or not the engine's own."""
    return (
        f"the step runner of role {role!r} is missing or is not the one pgdurable made "
        f"(it runs the role's steps as that role); an administrator must run "
        f"select df.grant_usage({role!r})"
    )
