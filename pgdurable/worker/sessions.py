"""The worker's database sessions: the service's pool and the step sessions' pool, each step
connection's capability, and the session hygiene around a step.

Two pools, created after fork: the service's (``config.dsn``, the
``pgdurable_service`` role: claims, loads, group commits) and the step sessions'
(``config.step_dsn``, the ``pgdurable_step`` role, which holds nothing). A tenant's
statement runs only on a step connection, inside the tenant's runner; each step connection
gets a random capability when it opens (registered by the service, only its hash stored),
which the worker passes as a bind parameter to the runner and to the token-gated checkpoint,
so nothing left behind in the session can call either (docs/security.md).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import secrets
import weakref
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool

from pgdurable.queries import q
from pgdurable.values import effective_limit

from . import wire

logger = logging.getLogger(__name__)

# Startup options of every service connection: search_path fixed whatever the database's or
# the role's defaults say (a database owner may ALTER DATABASE ... SET search_path).
SERVICE_OPTIONS = "-c search_path=pg_catalog,pg_temp"


class Sessions:
    """The pools (opened by :meth:`open`) and what a step connection carries."""

    def __init__(
        self,
        dsn: str,
        step_dsn: str,
        slots: int,
        engine: str,
        worker_id: str,
        result_max: int,
        *,
        prepare: bool = True,
    ) -> None:
        self.dsn = dsn
        # the service's statements are the engine's own: prepared at first use (parsed and
        # planned once per connection), unless a pooler in between cannot keep them
        self.prepare_threshold: int | None = 0 if prepare else None
        self.step_dsn = step_dsn
        self.slots = slots
        self.engine = engine
        self.worker_id = worker_id
        self.result_max = result_max
        self.pool: AsyncConnectionPool | None = None
        self.step_pool: AsyncConnectionPool | None = None
        # step connection -> its capability token (never sent but as a bind parameter)
        self.caps: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        # the session reset as one simple query (one round trip), comments dropped
        self.reset_body = "\n".join(
            ln for ln in self.q("reset_session").splitlines() if not ln.lstrip().startswith("--")
        )

    def q(self, name: str) -> Any:
        return q(name, self.engine)

    @property
    def service(self) -> AsyncConnectionPool:
        """The service's pool (once :meth:`open` ran)."""
        assert self.pool is not None, "Sessions.open() first"
        return self.pool

    @property
    def steps(self) -> AsyncConnectionPool:
        """The step sessions' pool (once :meth:`open` ran)."""
        assert self.step_pool is not None, "Sessions.open() first"
        return self.step_pool

    async def open(self) -> None:
        self.pool = AsyncConnectionPool(
            self.dsn,
            min_size=2,
            max_size=self.slots + 4,
            open=False,
            kwargs={
                "autocommit": True,
                "prepare_threshold": self.prepare_threshold,
                "application_name": f"pgdurable worker {os.getpid()}",
                # no database or role default (ALTER DATABASE ... SET search_path, which
                # a database's owner may set) reaches the service's statements
                "options": SERVICE_OPTIONS,
            },
            # No check-on-checkout round trip on the hot pool: a broken connection surfaces
            # as OperationalError, the step is released and re-claimed, and the pool
            # replaces the connection.
            name="pgdurable",
        )
        await self.pool.open(wait=True, timeout=60)
        self.step_pool = self.make_step_pool(
            self.step_dsn, self.pool, self.slots + 2, "pgdurable:step"
        )
        await self.step_pool.open(wait=True, timeout=60)

    async def close(self) -> None:
        if self.step_pool is not None:
            await self.step_pool.close(timeout=5)
        if self.pool is not None:
            await self.pool.close(timeout=5)

    def make_step_pool(
        self, dsn: str, service: AsyncConnectionPool, size: int, name: str
    ) -> AsyncConnectionPool:
        """A pool of step sessions; each connection's capability is registered on open."""

        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            # a runner's rows (json) arrive as text, parsed once by sql_envelope (not twice)
            conn.adapters.register_loader("json", TextLoader)
            token = secrets.token_hex(16)
            digest = hashlib.sha256(token.encode()).digest()
            async with service.connection() as sconn:
                await sconn.execute(
                    self.q("cap_grant"), (conn.info.backend_pid, digest, self.worker_id)
                )
            self.caps[conn] = token

        # prepare_threshold None: step connections are reset with DISCARD-like statements
        # after every step (security), which drop server-side prepared statements
        return AsyncConnectionPool(
            dsn,
            min_size=0,
            max_size=size,
            open=False,
            configure=configure,
            kwargs={
                "autocommit": True,
                "prepare_threshold": None,
                "application_name": f"pgdurable step {os.getpid()}",
            },
            name=name,
        )

    def cap(self, conn: psycopg.AsyncConnection[Any]) -> str | None:
        """The capability of a step connection; None for a service connection."""
        return self.caps.get(conn)

    def engine_query(
        self, conn: psycopg.AsyncConnection[Any], name: str, args: tuple[Any, ...]
    ) -> tuple[Any, tuple[Any, ...]]:
        """The named engine query and its arguments for this connection: as is on a service
        connection; its ``step_`` twin behind the capability on a step connection."""
        cap = self.cap(conn)
        if cap is None:
            return self.q(name), args
        return self.q("step_" + name), (cap, *args)

    def runner_call(self, role_oid: int) -> sql.Composed:
        """``select * from <the role's runner>(cap, sql, max bytes)``."""
        return sql.SQL("select * from {}.{}(%s, %s, %s)").format(
            sql.Identifier(f"{self.engine}_exec"), sql.Identifier(f"step_{role_oid}")
        )

    @functools.cached_property
    def step_settings_stmt(self) -> bytes:
        """``step_settings`` with ``$n`` placeholders (sent by :mod:`.wire`)."""
        return wire.dollar(self.q("step_settings").encode())

    @functools.cached_property
    def step_apply_stmt(self) -> bytes:
        """``step_apply_set`` with ``$n`` placeholders (sent by :mod:`.wire`)."""
        return wire.dollar(self.q("step_apply_set").encode())

    def runner_next_call(self) -> bytes:
        """The next step of a batch: its settings and the role's runner in one statement
        (``step_next``), with ``$n`` placeholders (sent by :mod:`.wire`)."""
        return wire.dollar(self.q("step_next").encode())

    def next_runner_call(self, role_oid: int) -> bytes:
        """The next step of a batch through the role's next-step runner, which does all that
        ``step_next`` does in one function (``_runner_next_body_v1``): its parameters are
        ``step_next``'s but the role. With ``$n`` placeholders (sent by :mod:`.wire`)."""
        return (
            sql.SQL(
                "select * from {}.{}($1::pg_catalog.text[], $2::pg_catalog.text[], "
                "$3::pg_catalog.text, $4::pg_catalog.text, $5::pg_catalog.text, "
                "$6::pg_catalog.text, $7::pg_catalog.text, $8::pg_catalog.int8, "
                "$9::pg_catalog.text[])"
            )
            .format(sql.Identifier(f"{self.engine}_exec"), sql.Identifier(f"next_{role_oid}"))
            .as_bytes(None)
        )

    @property
    def runner_cap(self) -> int:
        """The bytes a runner lets a statement return: the result cap, at most what one
        checkpoint carries (≤ 0 = that bound), counted in the database as rows arrive."""
        return effective_limit(self.result_max)

    def reset_sql(self) -> str:
        """The session reset and a fresh random seed (a seed a step set must not make the
        next step's random() predictable), as one simple query."""
        return f"{self.reset_body};\n{_reseed()}"

    @functools.cached_property
    def step_apply_written_stmt(self) -> bytes:
        """``step_apply_set`` wrapped in ``_all_written_v1``, which raises unless every
        checkpoint was written (so that a COMMIT sent after it in the same round trip does not
        run: ``Checkpointer.flush_commit``), with ``$n`` placeholders (sent by :mod:`.wire`)."""
        call = self.q("step_apply_set")
        return wire.dollar(f"select {self.engine}._all_written_v1((\n{call}\n))".encode())

    def commit_reset_commands(self) -> list[wire.Command]:
        """COMMIT and the session reset as pipeline commands, one statement each (the
        reset's statements run in the implicit transaction that follows the COMMIT)."""
        stmts = ["commit", *(s.strip() for s in self.reset_sql().split(";"))]
        return [(s.encode(), ()) for s in stmts if s]

    @property
    def commit_reset(self) -> bytes:
        """COMMIT and the session reset, as one simple query (one round trip)."""
        return f"commit;\n{self.reset_sql()}".encode()

    async def reset(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """After a step: roll back what is left of its transaction, reset the session."""
        if not (conn.broken or conn.closed):
            try:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    await wire.simple(conn, b"rollback")
                await wire.simple(conn, self.reset_sql().encode())
            except psycopg.Error as exc:
                # a session we cannot vouch for is not reused: the pool replaces it
                logger.warning(
                    "closing a step connection whose reset failed: %s",
                    exc,
                    extra={"event": "step.reset_failed"},
                )
                await conn.close()


def _reseed() -> str:
    """A setseed() with a fresh random value: random() after a step a tenant seeded must not
    be predictable to the next step on the connection."""
    return f"select pg_catalog.setseed({random.SystemRandom().uniform(-1.0, 1.0)!r})"
