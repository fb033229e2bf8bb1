"""SQL steps of a ``database =>`` instance: at-least-once (docs/decisions.md D4).

The statement commits in the other database, then the checkpoint commits here; a crash between
the two re-runs the statement. That database has pgdurable installed too (its engine idle) and
the role granted there (df.grant_usage makes its runner); the worker verifies the runner there
as here, and runs the statement on a step connection with a capability registered in that
database. The pools of another database are closed once idle (:data:`REMOTE_IDLE_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgdurable.errors import StepError
from pgdurable.worker.checkpoint import Checkpointer, Outcome
from pgdurable.worker.failures import pg_message
from pgdurable.worker.instance import InstanceCtx
from pgdurable.worker.notifier import Running
from pgdurable.worker.sessions import SERVICE_OPTIONS, Sessions
from pgdurable.worker.settings import Settings
from pgdurable.worker.task import Task, step_app_name

from .sql_step import envelope, runner_missing

logger = logging.getLogger(__name__)

# Pools of another database (`database =>` steps) are closed once idle this long: a worker
# keeping sessions there would make DROP DATABASE of it fail ("being accessed by other
# users"; PostgreSQL waits 5 s for them to go). Checked every REMOTE_IDLE_S / 4.
REMOTE_IDLE_S = 2.0


class RemoteSql:
    """Steps in other databases, with a service pool and a step pool per database."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        settings: Settings,
        running: Running,
        checkpointer: Checkpointer,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.running = running
        self.checkpointer = checkpointer
        self.runners: set[tuple[str, int]] = set()  # (database, role) verified there
        self.pools: dict[str, AsyncConnectionPool] = {}
        self.step_pools: dict[str, AsyncConnectionPool] = {}
        self.used: dict[str, float] = {}  # database -> when last used (monotonic)
        self.reaper: asyncio.Task[None] | None = None

    async def close(self) -> None:
        for rpool in [*self.step_pools.values(), *self.pools.values()]:
            await rpool.close()

    async def pools_for(self, dbname: str) -> tuple[AsyncConnectionPool, AsyncConnectionPool]:
        """The service's and the step sessions' pools for another database.

        Both are closed together once every connection of both has been idle for
        REMOTE_IDLE_S (and forgotten with the runners verified there), so DROP DATABASE of a
        database whose workflows are done does not find this worker's sessions in it. A
        reaper task does it: psycopg_pool's own max_idle closes one connection per max_idle
        period, which leaves a pool of n connections open n times as long.
        """
        self.used[dbname] = time.monotonic()
        pool = self.pools.get(dbname)
        if pool is None:
            pool = AsyncConnectionPool(
                with_db(self.sessions.dsn, dbname),
                min_size=0,
                max_size=2,
                open=False,
                max_idle=REMOTE_IDLE_S,
                kwargs={
                    "autocommit": True,
                    "prepare_threshold": None,
                    "application_name": f"pgdurable worker {os.getpid()}",
                    "options": SERVICE_OPTIONS,
                },
                check=AsyncConnectionPool.check_connection,
                name=f"pgdurable:{dbname}",
            )
            await pool.open(wait=False)
            self.pools[dbname] = pool
        spool = self.step_pools.get(dbname)
        if spool is None:
            spool = self.sessions.make_step_pool(
                with_db(self.sessions.step_dsn, dbname),
                pool,
                self.sessions.slots,
                f"pgdurable:step:{dbname}",
            )
            await spool.open(wait=False)
            self.step_pools[dbname] = spool
        if self.reaper is None or self.reaper.done():
            self.reaper = asyncio.create_task(self._reap(), name="remote pool reaper")
        return pool, spool

    async def _reap(self) -> None:
        while self.used:
            await asyncio.sleep(REMOTE_IDLE_S / 4)
            now = time.monotonic()
            for db, used in list(self.used.items()):
                pools = [p for p in (self.pools.get(db), self.step_pools.get(db)) if p is not None]
                stats = [p.get_stats() for p in pools]
                if any(
                    st.get("pool_size", 0) != st.get("pool_available", 0)
                    or st.get("requests_waiting", 0)
                    for st in stats
                ):
                    self.used[db] = now  # a connection is out: in use
                    continue
                if now - used < REMOTE_IDLE_S:
                    continue
                # forgotten first (synchronously): a step from now on opens new pools
                del self.used[db]
                self.pools.pop(db, None)
                self.step_pools.pop(db, None)
                self.runners -= {k for k in self.runners if k[0] == db}
                for p in pools:
                    with contextlib.suppress(Exception):
                        await p.close(timeout=5)
                logger.debug("closed the idle pools of database %s", db)

    async def run(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, idx: int, text: str
    ) -> None:
        """Run the step's statement in ``ctx.database`` and checkpoint its outcome here
        (``conn``: a service connection of the worker's own database, for a failure found
        before the statement ran)."""
        assert ctx.database is not None
        key = task.key
        q = self.sessions.q
        try:
            pool, spool = await self.pools_for(ctx.database)
            if (ctx.database, ctx.role_oid) not in self.runners:
                async with pool.connection() as sconn:
                    cur = await sconn.execute(q("remote_engine_present"))
                    ok = await cur.fetchone()
                    if ok and ok[0] and not ok[1]:
                        raise StepError(
                            f"pgdurable in database {ctx.database!r} is older than this serve "
                            f"(it cannot apply a role's settings to its steps): upgrade it "
                            f"(pgdurable install --dsn .../{ctx.database})",
                            sqlstate="55000",
                        )
                    if ok and ok[0]:
                        cur = await sconn.execute(q("runner_ok"), (ctx.role_oid,))
                        ok = await cur.fetchone()
                    else:
                        ok = (None,)
                if not ok or ok[0] is None:
                    raise StepError(
                        f"database {ctx.database!r} has no pgdurable: install it there "
                        f"(pgdurable install --dsn .../{ctx.database}) and run "
                        f"select df.grant_usage({ctx.role_name!r}) in it",
                        sqlstate="55000",
                    )
                if not ok[0]:
                    raise StepError(
                        runner_missing(ctx.role_name) + f" in database {ctx.database!r}",
                        sqlstate="42501",
                    )
                self.runners.add((ctx.database, ctx.role_oid))
            call = self.sessions.runner_call(ctx.role_oid)
            async with spool.connection() as rconn:
                cap = self.sessions.cap(rconn)
                try:
                    async with rconn.transaction():
                        # the role's settings there; the engine's step_statement_timeout
                        # is this deployment's, not the target database's
                        await rconn.execute(
                            q("remote_step_settings"),
                            (cap, step_app_name(task), ctx.role_oid, self.settings.step_timeout),
                        )
                        self.running.pids[key] = rconn.info.backend_pid
                        try:
                            cur = await rconn.execute(call, (cap, text, self.sessions.runner_cap))
                            rows = await cur.fetchall()
                        finally:
                            self.running.pids.pop(key, None)
                finally:
                    await self.sessions.reset(rconn)
        except StepError as exc:
            await self.checkpointer.record(conn, ctx, task, idx, Outcome.failure(exc))
            return
        except psycopg.Error as exc:
            if exc.sqlstate is None or exc.sqlstate.startswith("08"):
                raise  # the connection itself failed: release and retry
            err = StepError(pg_message(exc), sqlstate=exc.sqlstate)
            await self.checkpointer.record(conn, ctx, task, idx, Outcome.failure(err))
            return
        try:
            value = envelope(rows)
        except StepError as exc:
            await self.checkpointer.submit(ctx, task, idx, Outcome.failure(exc))
            return
        await self.checkpointer.submit(ctx, task, idx, Outcome.success(value))


def with_db(dsn: str, dbname: str) -> str:
    """``dsn`` with its database replaced by ``dbname``."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]
