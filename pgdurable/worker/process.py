"""One worker process: claim, run, checkpoint, with leases and wake-ups.

Parts (one asyncio task each, all in this process's uvloop loop):

- producer: claims ``≤ free slots`` tasks with ``FOR UPDATE SKIP LOCKED`` (one
  statement), woken by NOTIFY ``pgdurable_work`` and by a jittered poll;
- executor: one task per claimed step; SQL steps run as the submitting role inside
  its step runner *in the same transaction as their checkpoint* (exactly-once,
  docs/decisions.md D4); other outcomes are checkpointed in a transaction of their own;
- listener: NOTIFY ``pgdurable_cancel`` / ``pgdurable_abandon`` interrupt running
  statements of cancelled instances and abandoned branches;
- maintenance: extends our leases, rescues expired ones, heartbeats.

Two pools, created here after fork (STYLE B9): the service's (``config.dsn``, the
``pgdurable_service`` role: claims, loads, group commits) and the step sessions'
(``config.step_dsn``, the ``pgdurable_step`` role, which holds nothing). A tenant's
statement runs only on a step connection, inside the tenant's runner; each step
connection gets a random capability when it opens (registered by the service, only its
hash stored), which the worker passes as a bind parameter to the runner and to the
token-gated checkpoint, so nothing left behind in the session can call either
(docs/security.md).

Over 500 lines, knowingly: the Worker class is still lifecycle, producer, listener,
maintenance, cache, dispatch, SQL batches and checkpoints in one room. Splitting it by
responsibility (one module per step kind, one Outcome value) is issue #13.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import random
import re
import secrets
import signal
import socket
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb, set_json_loads
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool

from pgdurable import __version__, _testing, metrics
from pgdurable.config import ServeConfig
from pgdurable.errors import ResultTooLarge, StepError
from pgdurable.graph import _abc as A
from pgdurable.log import instance_var, node_type_var, node_var
from pgdurable.queries import q
from pgdurable.subst import substitute
from pgdurable.values import (
    CHECKPOINT_MAX_BYTES,
    INSTANCE_MAX_BYTES_DEFAULT,
    break_value,
    check_size,
    effective_limit,
    error_text,
    json_bytes,
    json_text,
    loads,
    sql_envelope,
    too_large,
    truthy,
)

from . import schedules
from .completer import Busy, Completer
from .instance import TYPE_NAMES, BadGraph, BadSetting, Checkpoint, InstanceCtx, dump, loop_limits

logger = logging.getLogger(__name__)

# How many instance contexts a worker keeps (graph + scheduler + results). A miss costs
# one reload of the instance's rows.
CTX_CACHE_SIZE = 2048
# Retention: every minute (spread over workers by a random start), at most this many finished
# instances are deleted per batch so pruning never holds long locks.
PRUNE_INTERVAL = 60.0
# A step whose handling keeps failing for reasons that are not the step's own (our
# checkpoint, the database going away) is retried; after this many claims it is failed
# with the last error instead of looping forever ("poison" step).
MAX_ATTEMPTS = 10
# HTTP requests in flight per worker beyond its slots (they wait on the network only; the
# shared httpx client's connection limits bound the sockets).
HTTP_INFLIGHT_MAX = 256
# Statements that PostgreSQL refuses inside transaction blocks and functions: a step cannot
# run them (it runs inside its runner, in a transaction with its checkpoint); say so.
AUTOCOMMIT_RE = re.compile(
    r"\s*(vacuum|create\s+(unique\s+)?index\s+concurrently|drop\s+index\s+concurrently"
    r"|reindex\s.*\bconcurrently|create\s+database|drop\s+database|alter\s+system)\b",
    re.IGNORECASE | re.DOTALL,
)
# Startup options of every service connection: search_path fixed whatever the database's or
# the role's defaults say (a database owner may ALTER DATABASE ... SET search_path).
SERVICE_OPTIONS = "-c search_path=pg_catalog,pg_temp"
RESULT_CAP_SETTING = "pgdurable serve --result-max-bytes (PGDURABLE_RESULT_MAX_BYTES)"
INSTANCE_CAP_SETTING = "pg_durable.max_instance_bytes"
# SQLSTATE classes of an error in the worker's own statements (a checkpoint) that the same
# input raises every time: data exceptions (an interval or timestamp out of range, …) and
# program limits. Retrying cannot help; the step fails at once.
DETERMINISTIC_SQLSTATE_CLASSES = ("22", "54")
# What a failure that is not the step's own outcome calls for (see _failure_kind): another
# attempt, or failing the step now (PostgreSQL refused our data; a bug of ours).
RETRY, DATA, INTERNAL = "retry", "data", "internal"
PRUNE_BATCH = 500
# A checkpoint that queues work due within this many seconds wakes its worker's producer then
# (a timer per task; later work is found by the poll)
WAKE_AHEAD_MAX_S = 60.0
# SQL step batching (docs/decisions.md D13: "a batch of steps sharing one connection takes one
# slot"): a runner keeps its transaction open for more queued SQL steps of the same role while it is
# younger than this window and smaller than this size; one slot, one BEGIN/COMMIT, one
# session reset and one WAL flush per batch. Under light load a batch holds one step.
BATCH_MAX = 32
BATCH_WINDOW_S = 0.05
# Runners started at once per worker; more (up to the step slots) only for steps that waited
# this long in the queue (the runners are busy with slow statements).
BATCH_RUNNERS = 2
BATCH_SPAWN_DELAY_S = 0.1
BATCH_LOCK_WAIT_S = 0.5
# Runnable SQL successors a checkpoint hands to its own worker's queue beyond the free slots
# (bounded by what is queued already): a fan-out stays on the worker that has its instance.
SQL_TAKE_MAX = 1024
# A single step waits this long at most for its instance's lock (held by a batch's or the
# completer's checkpoint) before giving its transaction up (released, retried).
LOCK_WAIT_S = 10.0
# Pools of another database (`database =>` steps) are closed once idle this long: a worker
# keeping sessions there would make DROP DATABASE of it fail ("being accessed by other
# users"; PostgreSQL waits 5 s for them to go). Checked every REMOTE_IDLE_S / 4.
REMOTE_IDLE_S = 2.0


class Fenced(Exception):
    """The task is no longer ours: roll back everything the step did."""


@dataclass
class Task:
    instance_id: str
    node_id: str
    gen: int
    kind: str
    attempts: int
    role_oid: int
    database: str | None
    deadline: datetime | None
    clock: datetime
    version: int | None
    started: datetime | None = None
    """When this process began running the step (wall clock; df.explain timings)."""
    handoff: list[Task] = field(default_factory=list)
    handoff_ready: bool = False
    """Successors this step's checkpoint inserted already leased to us (run after commit)."""
    alone: bool = False
    """Run this SQL step in a transaction of its own (a batch it was in rolled back)."""


@dataclass(eq=False)  # `item in queue` by identity, not field by field
class _Item:
    """A SQL step waiting for a batch runner (see :meth:`Worker._run_batch`)."""

    ctx: InstanceCtx
    task: Task
    idx: int
    text: str
    fut: asyncio.Future[None]


class Worker:
    """A worker process's services; :meth:`run` until SIGTERM, then drain."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine = config.engine_schema
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.pool: AsyncConnectionPool | None = None
        self.step_pool: AsyncConnectionPool | None = None
        # step connection -> its capability token (never sent but as a bind parameter)
        self.caps: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self.ctxs: OrderedDict[str, InstanceCtx] = OrderedDict()
        self.inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.running_pids: dict[tuple[str, str], int] = {}
        # steps this worker interrupted itself (RACE losers, cancelled instances): only their
        # "canceling statement due to user request" is the step's outcome
        self.interrupted: set[tuple[str, str]] = set()
        self.role_cap = 0  # pg_durable.max_connections_per_role
        self.slotted_roles: set[int] = set()  # roles whose per-role slot rows we made
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.runners: dict[int, sql.Composed] = {}
        self.remote_runners: set[tuple[str, int]] = set()
        self.remote_pools: dict[str, AsyncConnectionPool] = {}
        self.remote_step_pools: dict[str, AsyncConnectionPool] = {}
        self.remote_used: dict[str, float] = {}  # database -> when last used (monotonic)
        self.remote_reaper: asyncio.Task[None] | None = None
        self.completer: Completer | None = None
        self.http_waiting = 0
        # the deployment-wide pg_durable.* settings (_load_settings, every maintenance round)
        self.max_iterations = 100_000
        self.loop_min_interval_ms = 1000
        self.max_instance_bytes = INSTANCE_MAX_BYTES_DEFAULT
        self.max_user_connections = 10
        self.step_timeout = "0"  # step_statement_timeout, for `database =>` steps
        self.db_setting_names: set[str] | None = None  # pg_durable.* this database sets
        self.limits_key: tuple[Any, ...] | None = None
        self.limits_epoch = 0  # bumped when the loop limits may have changed
        self.bad_settings: dict[str, str] = {}  # setting -> the unusable value last logged
        self.settings_seen: dict[str, str] | None = None  # as last read (to log changes)
        self.current_db = ""
        self.http_client: Any = None
        self.http_policy: Any = None
        self.sql_sem = asyncio.Semaphore(1)
        self.sql_limit = 1
        self.sql_queue: list[_Item] = []
        self.batch_runners: set[asyncio.Task[None]] = set()
        self.batch_running = 0
        self.runner_busy: dict[object, float] = {}
        self.spawn_check_armed = False
        # COMMIT and the session reset as one simple query (one round trip)
        body = "\n".join(
            ln for ln in self.q("reset_session").splitlines() if not ln.lstrip().startswith("--")
        )
        self.reset_body = body

    def reset_sql(self) -> str:
        """The session reset and a fresh random seed (a seed a step set must not make the
        next step's random() predictable), as one simple query."""
        return f"{self.reset_body};\n{_reseed()}"

    @property
    def commit_reset(self) -> bytes:
        """COMMIT and the session reset, as one simple query (one round trip)."""
        return f"commit;\n{self.reset_sql()}".encode()

    def q(self, name: str) -> Any:
        return q(name, self.engine)

    @property
    def _runner_cap(self) -> int:
        """The bytes a runner lets a statement return: the result cap, at most what one
        checkpoint carries (≤ 0 = that bound), counted in the database as rows arrive."""
        return effective_limit(self.config.result_max_bytes)

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        # SIGHUP (forwarded by the supervisor): re-read the pg_durable.* settings
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._load_settings()))
        self.pool = AsyncConnectionPool(
            self.config.dsn,
            min_size=2,
            max_size=self.config.slots + 4,
            open=False,
            kwargs={
                "autocommit": True,
                "prepare_threshold": None,
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
        self.step_pool = self._make_step_pool(
            self.config.step_dsn, self.pool, self.config.slots + 2, "pgdurable:step"
        )
        await self.step_pool.open(wait=True, timeout=60)
        await self._load_settings()
        self.completer = Completer(self.pool, Fenced)
        self.completer.start()
        try:
            from pgdurable.steps.http_step import HttpPolicy, make_client

            self.http_policy = HttpPolicy.from_strings(
                self.config.http_policy, list(self.config.http_allow)
            )
            self.http_client = make_client(self.http_policy)
        except ImportError:  # pragma: no cover - http step not built
            self.http_client = None
        logger.info(
            "worker started (id %s, %d slots, scheduler %s)",
            self.worker_id,
            self.config.slots,
            _impl(),
            extra={"event": "worker.started"},
        )
        tasks = [
            asyncio.create_task(self._producer(), name="producer"),
            asyncio.create_task(self._listener(), name="listener"),
            asyncio.create_task(self._maintenance(), name="maintenance"),
        ]
        await self.stopping.wait()
        logger.info(
            "worker draining %d steps", len(self.inflight), extra={"event": "worker.draining"}
        )
        try:
            # bounded: a worker that cannot finish draining (database gone) must still exit
            # and free its connections; unfinished steps come back by lease expiry
            await asyncio.wait_for(self._shutdown(tasks), self.config.lease_seconds + 20)
        except TimeoutError:
            logger.warning(
                "drain did not finish in time; exiting anyway",
                extra={"event": "worker.drain_timeout"},
            )
        logger.info("worker stopped", extra={"event": "worker.stopped"})

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        assert self.pool is not None
        assert self.completer is not None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        # drain: let running steps finish (they checkpoint), bounded by the lease
        if self.inflight:
            await asyncio.wait(list(self.inflight.values()), timeout=self.config.lease_seconds)
        await self.completer.stop()  # final flush before the pool closes
        with contextlib.suppress(Exception):
            async with self.pool.connection() as conn:
                await conn.execute(self.q("release"), (self.worker_id, None, None))
        if self.http_client is not None:
            await self.http_client.aclose()
        for rpool in [*self.remote_step_pools.values(), *self.remote_pools.values()]:
            await rpool.close()
        if self.step_pool is not None:
            await self.step_pool.close(timeout=5)
        await self.pool.close(timeout=5)

    def _make_step_pool(
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

    def _cap(self, conn: psycopg.AsyncConnection[Any]) -> str | None:
        """The capability of a step connection; None for a service connection."""
        return self.caps.get(conn)

    def _engine_query(
        self, conn: psycopg.AsyncConnection[Any], name: str, args: tuple[Any, ...]
    ) -> tuple[Any, tuple[Any, ...]]:
        """The named engine query and its arguments for this connection: as is on a service
        connection; its ``step_`` twin behind the capability on a step connection."""
        cap = self._cap(conn)
        if cap is None:
            return self.q(name), args
        return self.q("step_" + name), (cap, *args)

    def _runner_call(self, role_oid: int) -> sql.Composed:
        """``select * from <the role's runner>(cap, sql, max bytes)``."""
        return sql.SQL("select * from {}.{}(%s, %s, %s)").format(
            sql.Identifier(f"{self.engine}_exec"), sql.Identifier(f"step_{role_oid}")
        )

    async def _load_settings(self, conn: psycopg.AsyncConnection[Any] | None = None) -> None:
        """Read the deployment-wide pg_durable.* settings (@engine@.setting_db: ALTER DATABASE
        … SET read fresh, else ALTER SYSTEM / postgresql.conf): at start, every maintenance
        round (so a change applies within seconds) and on SIGHUP. One query; what did not
        change is left alone."""
        if conn is None:
            assert self.pool is not None
            async with self.pool.connection() as c:
                await self._load_settings(c)
                await c.execute(self.q("slots_ensure"), (None,))
            return
        row = await (await conn.execute(self.q("settings"))).fetchone()
        assert row is not None
        self.current_db = row[2]
        seen = dict(
            zip(
                (
                    "loop_min_interval_ms",
                    "loop_max_iterations",
                    "max_user_connections",
                    "max_instance_bytes",
                    "max_connections_per_role",
                    "step_statement_timeout",
                ),
                (*row[0:2], *row[3:7]),
                strict=True,
            )
        )
        if self.settings_seen is not None:
            changed = [
                f"pg_durable.{k} = {v}" for k, v in seen.items() if self.settings_seen.get(k) != v
            ]
            if changed:
                logger.info(
                    "deployment settings changed: %s",
                    "; ".join(changed),
                    extra={"event": "settings.changed"},
                )
        self.settings_seen = seen
        loop_min = self._int_setting("loop_min_interval_ms", row[0], 0, self.loop_min_interval_ms)
        max_iter = self._int_setting("loop_max_iterations", row[1], 1, self.max_iterations)
        # never open more step transactions than the deployment has step slots: the rest
        # would only wait for a slot inside PostgreSQL, holding a connection
        self.max_user_connections = self._int_setting(
            "max_user_connections", row[3], None, self.max_user_connections
        )
        limit = max(1, min(self.config.slots, self.max_user_connections))
        if limit != self.sql_limit:
            # steps holding the old semaphore release it (each keeps the object it acquired);
            # the slot rows in the database stay the real cap meanwhile
            self.sql_limit = limit
            self.sql_sem = asyncio.Semaphore(limit)
        self.max_instance_bytes = self._int_setting(
            "max_instance_bytes", row[4], None, self.max_instance_bytes
        )
        role_cap = self._int_setting("max_connections_per_role", row[5], None, self.role_cap)
        if role_cap != self.role_cap:
            # per-role step slots exist only where a per-role cap is set: made again for it
            self.role_cap = role_cap
            self.slotted_roles.clear()
        self.step_timeout = row[6]
        names = set(row[7] or ())
        if self.db_setting_names is not None and self.db_setting_names - names:
            # ALTER DATABASE … RESET: sessions opened before still hold the value they
            # connected with, which setting_db would fall back to; open fresh ones
            logger.info(
                "database settings %s were reset; reopening the service's sessions",
                ", ".join(sorted(self.db_setting_names - names)),
                extra={"event": "settings.reset"},
            )
            for pool in (self.pool, self.step_pool):
                drain = getattr(pool, "drain", None)
                if drain is not None:
                    await drain()
        self.db_setting_names = names
        key = (loop_min, max_iter, row[8])
        if key != self.limits_key:
            # loop limits (the deployment's or a role's) changed: the instances held in
            # memory reload before their next step (_ctx)
            if self.limits_key is not None:
                self.limits_epoch += 1
            self.limits_key = key
        self.loop_min_interval_ms, self.max_iterations = loop_min, max_iter

    def _int_setting(self, name: str, raw: str, minimum: int | None, current: int) -> int:
        """A deployment-wide integer setting, or (logging why, once per value) the value in
        use when it is not a whole number (at least ``minimum``)."""
        try:
            value = int(raw.strip())
            if minimum is None or value >= minimum:
                self.bad_settings.pop(name, None)
                return value
        except ValueError:
            pass
        if self.bad_settings.get(name) != raw:
            self.bad_settings[name] = raw
            need = "a whole number" + (f" of at least {minimum}" if minimum is not None else "")
            logger.error(
                "pg_durable.%s is %r, not %s: keeping %d; fix it with ALTER DATABASE "
                "… SET pg_durable.%s or RESET it",
                name,
                raw,
                need,
                current,
                name,
                extra={"event": "settings.invalid"},
            )
        return current

    # -- producer --------------------------------------------------------------------

    async def _producer(self) -> None:
        assert self.pool is not None
        while not self.stopping.is_set():
            # steps waiting on an HTTP response hold no connection and no CPU: they give
            # their slot back while they wait, bounded by HTTP_INFLIGHT_MAX in total
            busy = len(self.inflight) - self.http_waiting
            free = min(
                self.config.slots - busy, self.config.slots + HTTP_INFLIGHT_MAX - len(self.inflight)
            )
            claimed: list[Task] = []
            if free > 0:
                try:
                    async with self.pool.connection() as conn:
                        cur = await conn.execute(
                            self.q("claim"), (self.worker_id, free, self.config.lease_seconds)
                        )
                        claimed = [Task(*row) for row in await cur.fetchall()]
                    metrics.claimed(len(claimed))
                except psycopg.Error as exc:
                    logger.warning("claim failed: %s", exc, extra={"event": "claim.error"})
                    await asyncio.sleep(0.5)
                    continue
            for task in claimed:
                self._launch(task)
            if claimed and len(claimed) == free:
                continue  # there may be more: claim again right away
            self.wake.clear()
            # jittered poll (STYLE B7): NOTIFY is the fast path, this is the safety net
            timeout = self.config.poll_interval * (1 + random.random() * 0.1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    def _launch(self, task: Task) -> None:
        key = (task.instance_id, task.node_id)
        if key in self.inflight:
            # defensive: never sit on a lease we cannot run now — give it back to the queue
            asyncio.ensure_future(self._release(task))  # noqa: RUF006
            return
        t = asyncio.create_task(self._handle(task), name=f"step {key}")
        self.inflight[key] = t
        t.add_done_callback(functools.partial(self._on_done, key, task))

    def _take_sql(self) -> int:
        """SQL successors a checkpoint may still hand to this worker's batch queue."""
        return max(0, SQL_TAKE_MAX - len(self.sql_queue))

    def _free_slots(self) -> int:
        return max(0, self.config.slots - (len(self.inflight) - self.http_waiting))

    def _on_done(self, key: tuple[str, str], task: Task, _t: asyncio.Task[None]) -> None:
        self._done(key, task)

    def _done(self, key: tuple[str, str], task: Task | None = None) -> None:
        self.inflight.pop(key, None)
        if task is not None and task.handoff_ready and not self.stopping.is_set():
            for nxt in task.handoff:
                self._launch(nxt)
        self.wake.set()

    # -- listener --------------------------------------------------------------------

    async def _listener(self) -> None:
        while not self.stopping.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.config.dsn,
                    autocommit=True,
                    options=SERVICE_OPTIONS,
                    application_name=f"pgdurable listener {os.getpid()}",
                )
                async with conn:
                    await conn.execute(self.q("listen"))
                    self.wake.set()  # anything missed while we were away
                    async for note in conn.notifies():
                        # payloads carry nothing (any role may LISTEN): ask what changed
                        if note.channel == "pgdurable_work":
                            self.wake.set()
                        elif note.channel in ("pgdurable_cancel", "pgdurable_abandon"):
                            await self._interrupt()
            except psycopg.Error as exc:
                logger.warning(
                    "listener lost its connection: %s", exc, extra={"event": "listener.error"}
                )
                await asyncio.sleep(0.5)

    async def _interrupt(self) -> None:
        """Interrupt our running steps that the database says are no longer ours (their
        instance cancelled or finished, their branch abandoned)."""
        assert self.pool is not None
        running = dict(self.running_pids)
        if not running:
            return
        keys = list(running)
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    self.q("still_ours"),
                    (self.worker_id, [k[0] for k in keys], [k[1] for k in keys]),
                )
                gone = [(r[0], r[1]) for r in await cur.fetchall() if not r[2]]
                for inst, nid in gone:
                    pid = running.get((inst, nid))
                    if pid is None or self.running_pids.get((inst, nid)) != pid:
                        continue  # finished meanwhile
                    self._forget(inst)
                    self.interrupted.add((inst, nid))
                    await conn.execute(self.q("cancel_backend"), (pid,))
                    logger.info(
                        "interrupted step %s of %s", nid, inst, extra={"event": "step.interrupted"}
                    )
        except psycopg.Error as exc:
            logger.warning(
                "could not check running steps: %s", exc, extra={"event": "listener.error"}
            )

    # -- maintenance -----------------------------------------------------------------

    async def _maintenance(self) -> None:
        assert self.pool is not None
        epoch = uuid.uuid4()
        host = socket.gethostname()
        parent = os.getppid()
        next_prune = time.monotonic() + random.random() * PRUNE_INTERVAL
        while not self.stopping.is_set():
            if os.getppid() != parent:
                # the supervisor died (kill -9): drain and exit rather than run unsupervised
                logger.warning(
                    "supervisor %d is gone; draining", parent, extra={"event": "worker.orphaned"}
                )
                self.stopping.set()
                break
            try:
                async with self.pool.connection() as conn:
                    keys = list(self.inflight)
                    await conn.execute(
                        self.q("extend"),
                        (
                            self.worker_id,
                            self.config.lease_seconds,
                            [k[0] for k in keys],
                            [k[1] for k in keys],
                        ),
                    )
                    cur = await conn.execute(self.q("rescue"), (1000,))
                    row = await cur.fetchone()
                    if row and row[0]:
                        metrics.rescued(row[0])
                        logger.info(
                            "rescued %d expired leases", row[0], extra={"event": "lease.rescued"}
                        )
                        self.wake.set()
                    await conn.execute(
                        self.q("heartbeat"),
                        (
                            self.worker_id,
                            "worker",
                            host,
                            os.getpid(),
                            __version__,
                            len(self.inflight),
                        ),
                    )
                    await conn.execute(self.q("epoch"), (epoch,))
                    # the deployment-wide settings, fresh: a change applies within a round
                    await self._load_settings(conn)
                    await conn.execute(self.q("slots_ensure"), (None,))
                    if await schedules.tick(conn, self.engine):
                        self.wake.set()
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + PRUNE_INTERVAL
                        cur = await conn.execute(self.q("prune"), (PRUNE_BATCH,))
                        row = await cur.fetchone()
                        if row and row[0]:
                            logger.info(
                                "pruned %d finished instances past retention",
                                row[0],
                                extra={"event": "retention.pruned"},
                            )
            except psycopg.Error as exc:
                logger.warning("maintenance failed: %s", exc, extra={"event": "maintenance.error"})
            await asyncio.sleep(self.config.maintenance_interval)

    # -- instance contexts -----------------------------------------------------------

    def _forget(self, instance_id: str, ctx: InstanceCtx | None = None) -> None:
        """Drop an instance's cached state, and mark it (and ``ctx``) dead for every holder."""
        cached = self.ctxs.pop(instance_id, None)
        if cached is not None:
            cached.dead = True
        if ctx is not None:
            ctx.dead = True

    async def _ctx(
        self,
        conn: psycopg.AsyncConnection[Any],
        instance_id: str,
        fresh: bool = False,
        version: int | None = None,
        lock: asyncio.Lock | None = None,
    ) -> InstanceCtx | None:
        ctx = None if fresh else self.ctxs.get(instance_id)
        if ctx is not None and version is not None and ctx.version < version:
            ctx = None  # another worker checkpointed this instance since we cached it
        if ctx is not None and ctx.limits_epoch != self.limits_epoch:
            ctx = None  # loop settings changed since it was loaded: its limits are stale
        if ctx is not None:
            self.ctxs.move_to_end(instance_id)
            return ctx
        # one round trip for the three reads (behind the capability on a step connection)
        async with conn.pipeline():
            c_inst = await conn.execute(*self._engine_query(conn, "load_instance", (instance_id,)))
            c_nodes = await conn.execute(*self._engine_query(conn, "load_nodes", (instance_id,)))
            c_named = await conn.execute(*self._engine_query(conn, "load_results", (instance_id,)))
        inst = await c_inst.fetchone()
        if inst is None:
            return None
        rows = await c_nodes.fetchall()
        named = await c_named.fetchall()
        old = self.ctxs.get(instance_id)
        epoch = self.limits_epoch
        min_interval, max_iterations = loop_limits(
            inst, self.loop_min_interval_ms, self.max_iterations
        )
        ctx = InstanceCtx.from_rows(instance_id, inst, rows, named, max_iterations, min_interval)
        ctx.limits_epoch = epoch
        logger.debug(
            "loaded instance (version %d)", ctx.version, extra={"event": "instance.loaded"}
        )
        if lock is not None:  # the caller holds it: the reloaded state is under it too
            ctx.lock = lock
        elif old is not None:
            ctx.lock = old.lock
        self.ctxs[instance_id] = ctx
        while len(self.ctxs) > CTX_CACHE_SIZE:
            self.ctxs.popitem(last=False)
        return ctx

    # -- one step --------------------------------------------------------------------

    async def _handle(self, task: Task) -> None:
        instance_var.set(task.instance_id)
        node_var.set(task.node_id)
        task.started = datetime.now(UTC)
        assert self.pool is not None
        try:
            if task.kind == "start":
                await self._start_instance(task)
            else:
                try:
                    await self._run_node(task)
                except _Retry:
                    # the batch this step ran in rolled back (another step of it failed):
                    # run it again in a transaction of its own, which decides its outcome
                    task.handoff = []
                    task.alone = True
                    await self._run_node(task)
            # every checkpoint of this step has committed: the successors it took run once
            # this step has left `inflight` (a start task shares its key with a root leaf)
            task.handoff_ready = True
            metrics.handed_off(len(task.handoff))
        except _Requeue as exc:
            logger.warning("%s; it runs again", exc, extra={"event": "step.requeued"})
            self._forget(task.instance_id)
            if task.attempts >= MAX_ATTEMPTS:
                with contextlib.suppress(Exception):
                    await self._poison(task, exc)
                    return
            await self._release(task)
        except Fenced:
            logger.info(
                "step fenced (lease lost, abandoned or instance finished)",
                extra={"event": "step.fenced"},
            )
            self._forget(task.instance_id)
            # if the task is somehow still ours, give it back rather than sit on it
            await self._release(task)
        except BadGraph as exc:
            # the stored graph cannot run (a config df.start would have refused): the same
            # on every attempt, so the instance fails now, once, without a traceback
            self._forget(task.instance_id)
            # (or its role's settings cannot be used: BadSetting names which)
            reason = (
                str(exc)
                if isinstance(exc, BadSetting)
                else f"the instance's stored graph cannot run: {exc}"
            )
            logger.warning("failing instance: %s", reason, extra={"event": "instance.bad_graph"})
            if not await self._fail_instance(task, reason):
                await self._release(task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # not the step's own failure: the database went away or refused our checkpoint
            # for a while (the task is given back and runs again, a bounded number of times),
            # or the same input fails the same way every time (the step fails now)
            self._forget(task.instance_id)
            kind = _failure_kind(exc, stopping=self.stopping.is_set())
            final = kind != RETRY
            what = f"{type(exc).__name__}: {exc}"
            if kind == INTERNAL:
                # a bug of ours: its traceback is logged here, once, and the step fails
                logger.error(
                    "internal error in pgdurable while %s (%s); failing it, not retrying it",
                    _where(task),
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
                    await self._poison(task, exc, kind=kind)
                    return
            await self._release(task)

    async def _fail_instance(self, task: Task, reason: str) -> bool:
        """Fail the task's instance with ``reason`` (on its node), if the task is still ours."""
        assert self.pool is not None
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    self.q("fail_instance"),
                    (self.worker_id, task.instance_id, task.node_id, error_text(reason)),
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:
            logger.warning(
                "could not fail the instance: %s", exc, extra={"event": "instance.fail_error"}
            )
            return False
        return bool(row and row[0])

    async def _poison(self, task: Task, exc: BaseException, *, kind: str = RETRY) -> None:
        """Fail a step that could not be handled in MAX_ATTEMPTS claims (a start task too:
        an instance whose graph cannot even load fails instead of being retried forever),
        or at once when its failure is deterministic (``kind`` DATA or INTERNAL)."""
        assert self.pool is not None
        reason = _failure_reason(task, exc, kind)
        sqlstate = "XX000" if kind == INTERNAL else getattr(exc, "sqlstate", None)
        if task.kind != "start":
            try:
                async with self.pool.connection() as conn:
                    ctx = await self._ctx(conn, task.instance_id, fresh=True)
                if ctx is not None and task.node_id in ctx.index:
                    err = StepError(reason, sqlstate=sqlstate)
                    await self._group_complete(ctx, task, ctx.index[task.node_id], False, None, err)
                    return
            except Exception:
                logger.warning(
                    "cannot load instance to fail its step; failing the instance",
                    extra={"event": "step.poison"},
                )
        if not await self._fail_instance(task, reason):
            raise Fenced()  # not ours any more, or its row is busy: released, tried later

    async def _release(self, task: Task) -> None:
        assert self.pool is not None
        for _ in range(50):
            try:
                async with self.pool.connection(timeout=5) as conn:
                    await conn.execute(
                        self.q("release"), (self.worker_id, task.instance_id, task.node_id)
                    )
                return
            except Exception:
                await asyncio.sleep(0.5)

    async def _start_instance(self, task: Task) -> None:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            ctx = await self._ctx(conn, task.instance_id, fresh=True)
            if ctx is None:
                return
            role = ctx.role_info  # loaded with the instance, just now (fresh)
            # the role's step slots (max_connections_per_role) exist before its first step
            if self.role_cap > 0 and ctx.role_oid not in self.slotted_roles:
                await conn.execute(self.q("slots_ensure"), (ctx.role_oid,))
                self.slotted_roles.add(ctx.role_oid)
            problem = None
            if role is None:
                problem = f"the submitting role (oid {ctx.role_oid}) no longer exists"
            elif role[1] and not role[3]:
                problem = (
                    f"role {role[0]!r} is a superuser; superuser instances are refused "
                    "unless pg_durable.enable_superuser_instances is on"
                )
            elif not role[2]:
                problem = f"role {role[0]!r} lacks the LOGIN attribute"

        # The start checkpoint goes through the completer: many instances' starts share one
        # commit (W1-style bursts of one-step workflows are commit-bound otherwise).
        cur_ctx = ctx

        async def apply(aconn: psycopg.AsyncConnection[Any]) -> None:
            nonlocal cur_ctx
            c = cur_ctx
            if c.lock.locked():
                raise Busy()
            async with c.lock:
                if c.dead:  # an earlier try rolled back after starting it in memory
                    fresh = await self._ctx(aconn, task.instance_id, fresh=True, lock=c.lock)
                    if fresh is None:
                        raise Fenced()
                    cur_ctx = c = fresh
                try:
                    if problem is None:
                        step = c.sched.start()
                        cp = Checkpoint(
                            inst_status="running",
                            take_budget=self._free_slots() + 1,
                            take_sql=self._take_sql(),
                        )
                        c.build(step, cp, task.clock)
                        if step.terminal != A.T_RUNNING:
                            cp.inst_status = _terminal_name(step.terminal)
                    else:
                        logger.warning(
                            "refusing instance: %s", problem, extra={"event": "instance.refused"}
                        )
                        root = c.graph.node_ids[0]
                        cp = Checkpoint(inst_status="failed")
                        cp.node(root).update(status="failed", result=problem)
                    await self._apply(aconn, c, task, cp)
                except _Stale:  # someone else started it (a rescued duplicate start task)
                    self._forget(c.instance_id, c)
                    raise Fenced() from None
                except BaseException:
                    self._forget(c.instance_id, c)
                    raise

        assert self.completer is not None
        await self.completer.submit(
            ctx.instance_id, apply, lambda: self._forget(cur_ctx.instance_id, cur_ctx)
        )
        logger.info("instance started", extra={"event": "instance.started"})

    async def _apply(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, cp: Checkpoint
    ) -> None:
        t0 = time.monotonic()
        # what the checkpoint carries is known before it is encoded (a value's size, once):
        # over the bound, nothing large is built, and the step fails instead
        _check_checkpoint(cp.weight)
        # results are embedded as the bytes their leaf was encoded to (never re-encoded), and
        # sent as bytes: no text copy of a large checkpoint
        # json_bytes: a named composite's value is Python values, numbers maybe Decimals
        nodes = json_bytes(list(cp.nodes.values()))
        named = json_bytes(cp.named) if cp.named else None
        _check_checkpoint(len(nodes) + (len(named) if named else 0))
        cur = await conn.execute(
            *self._engine_query(
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
                    _jsonb_bytes(nodes),
                    orjson.dumps(cp.new_tasks).decode() if cp.new_tasks else None,
                    cp.drop_tasks or None,
                    None if named is None else _jsonb_bytes(named),
                    self.config.lease_seconds,
                ),
            )
        )
        del nodes, named
        row = await cur.fetchone()
        metrics.checkpoint(time.monotonic() - t0)
        got = row[-1] if row else -2
        if got == -1:
            raise _Stale()
        if got == -3:
            # the instance's row is locked by someone else (its owner may): try later
            raise Busy()
        if got < 0:
            raise Fenced()
        ctx.version = got
        # work due soon (a loop's next iteration after loop_min_interval_ms, a short sleep):
        # wake the producer when it is due, not at its next poll (up to poll_interval late)
        loop = asyncio.get_running_loop()
        for t in cp.new_tasks:
            delay = t.get("delay") or 0.0
            if 0 < delay <= WAKE_AHEAD_MAX_S:
                loop.call_later(delay + 0.005, self.wake.set)
        task.handoff = [
            Task(
                ctx.instance_id,
                t["node_id"],
                t["gen"],
                "run",
                1,
                ctx.role_oid,
                ctx.database,
                None,
                task.clock,
                got,
            )
            for t in cp.new_tasks
            if t.get("take")
        ]
        if cp.inst_status in ("completed", "failed", "cancelled"):
            self._forget(ctx.instance_id, ctx)
            logger.info("instance %s", cp.inst_status, extra={"event": "instance.finished"})

    async def _run_node(self, task: Task) -> None:
        assert self.pool is not None
        if await self._batch_from_cache(task):
            return
        async with contextlib.AsyncExitStack() as held:
            conn = await held.enter_async_context(self.pool.connection())
            ctx = await self._ctx(conn, task.instance_id, version=task.version)
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
                await self._submit_batch(ctx, task, idx, text)
                return
            ok, value, err = True, None, None
            http = False
            decision: bool | None = None
            try:
                if ntype == A.BREAK:
                    cfg = loads(ctx.configs[idx])
                    raw = cfg.get("break_value")
                    if raw is not None:
                        raw = self._subst(ctx, raw, "raw")
                    value = break_value(raw)
                elif ntype == A.IF:
                    cfg = loads(ctx.configs[idx])
                    name = cfg["result_name"]
                    res = ctx.named.get(name)
                    count = res.get("row_count") if isinstance(res, dict) else None
                    if isinstance(count, bool) or not isinstance(count, int | Decimal):
                        # missing, or a value shaped like rows (a break value) that is not
                        raise StepError(
                            f"if_rows: result {name!r} is missing or has no rows "
                            "(it must name an earlier SQL step)"
                        )
                    value = None
                    decision = count > 0
                elif ntype == A.SLEEP:
                    value = {"slept": True, "seconds": int(ctx.configs[idx] or 0)}
                elif ntype == A.WAIT_SCHEDULE:
                    value = {"scheduled": True}
                elif ntype == A.SIGNAL:
                    # durable inbox (docs/decisions.md D6): consume the oldest signal of this
                    # name; none → time out if the durable timer fired, else park until
                    # df.signal wakes us
                    cfg = loads(ctx.configs[idx])
                    name = cfg["signal_name"]
                    while True:
                        # the signal is consumed in the checkpoint's transaction: a crash in
                        # between rolls the consumption back, so no signal is ever lost
                        async with conn.transaction():
                            cur = await conn.execute(
                                self.q("take_signal_row"),
                                (
                                    ctx.instance_id,
                                    name,
                                    effective_limit(self.config.result_max_bytes),
                                ),
                            )
                            row = await cur.fetchone()  # a row even when data is JSON null
                            if row is not None:
                                # data over the cap stayed in the database (row[0] NULL): the
                                # wait fails; the signal is consumed with its failure
                                ok, err = True, None
                                value = None
                                try:
                                    if row[0] is None and row[1] is not None:
                                        raise too_large(
                                            "signal data",
                                            row[1],
                                            self.config.result_max_bytes,
                                            RESULT_CAP_SETTING,
                                        )
                                    try:
                                        data = None if row[0] is None else loads(row[0])
                                    except ValueError as exc:
                                        raise StepError(
                                            f"signal data cannot be read: {exc}"
                                        ) from None
                                    value = {"signal_name": name, "timed_out": False, "data": data}
                                except StepError as exc:
                                    ok, err = False, exc
                                await self._complete(
                                    conn, ctx, task, idx, ok, value, err, in_tx=True
                                )
                                return
                        if task.deadline is not None and task.deadline <= task.clock:
                            value = {"signal_name": name, "timed_out": True, "data": None}
                            break
                        # runs row first (as df.signal): a signal committed after our look is
                        # then either visible to the park or wakes the parked task
                        async with conn.transaction():
                            await conn.execute(self.q("lock_run"), (ctx.instance_id,))
                            cur = await conn.execute(
                                self.q("park_signal"),
                                (
                                    self.worker_id,
                                    ctx.instance_id,
                                    task.node_id,
                                    name,
                                    ctx.instance_id,
                                    name,
                                ),
                            )
                            parked, pending = (await cur.fetchone()) or (False, False)
                        if parked or not pending:
                            return  # parked, or the task is no longer ours
                elif ntype in (A.HTTP, A.HTTP_MULTIPART):
                    http = True  # runs below, after the connection went back to the pool
                else:  # pragma: no cover - composites never become tasks
                    raise StepError(f"node type {TYPE_NAMES[ntype]} cannot run as a step")
            except StepError as exc:
                ok, err = False, exc
                decision = None
        if http:
            # An HTTP request holds no database connection while it waits on the network,
            # so fan-out is bounded by slots, not by the pool.
            try:
                self.http_waiting += 1
                self.wake.set()  # a slot just became free
                try:
                    value = await self._run_http(ctx, task, idx, ntype)
                finally:
                    self.http_waiting -= 1
            except StepError as exc:
                ok, err = False, exc
        await self._group_complete(ctx, task, idx, ok, value, err, decision)

    async def _group_complete(
        self,
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        ok: bool,
        value: Any,
        err: StepError | None,
        decision: bool | None = None,
    ) -> None:
        """Checkpoint through the completer: committed with others, acknowledged after."""
        assert self.completer is not None

        async def apply(conn: psycopg.AsyncConnection[Any]) -> None:
            current = self.ctxs.get(ctx.instance_id, ctx)
            if current.lock.locked() or ctx.lock.locked():
                raise Busy()
            await self._complete(
                conn, ctx, task, idx, ok, value, err, in_tx=True, decision=decision
            )

        # rolled back with its batch (another item's error): whatever it changed in memory is
        # gone from the database; a retry on its own reloads the instance
        await self.completer.submit(
            ctx.instance_id, apply, lambda: self._forget(ctx.instance_id, ctx)
        )

    async def _run_http(self, ctx: InstanceCtx, task: Task, idx: int, ntype: int) -> Any:
        from pgdurable.steps.http_step import run_http
        from pgdurable.subst import substitute_whole_value

        if self.http_client is None:
            raise StepError("HTTP steps are not available in this build")
        multipart = ntype == A.HTTP_MULTIPART
        # privilege re-check at run time (SPEC §3.8 gate 0): the graph may have been built
        # without calling df.http (a JSON literal) or the grant revoked since df.start
        fn = (
            "df.http_multipart(text,text,jsonb,jsonb,integer)"
            if multipart
            else "df.http(text,text,text,jsonb,integer)"
        )
        assert self.pool is not None
        async with self.pool.connection() as conn:
            cur = await conn.execute(self.q("http_privilege"), (ctx.role_oid, ctx.role_oid, fn))
            row = await cur.fetchone()
        if not row or not row[0]:
            raise StepError(
                f"role {ctx.role_name!r} does not have EXECUTE privilege on {fn}; "
                f"grant it with df.grant_usage({ctx.role_name!r}, "
                "include_http => true)"
            )
        cfg = loads(ctx.configs[idx])  # exact: a JSON body's numbers are sent as written
        if isinstance(cfg.get("url"), str):
            cfg["url"] = self._subst(ctx, cfg["url"], "raw")
        if not multipart and isinstance(cfg.get("body"), str):
            cfg["body"] = self._subst(ctx, cfg["body"], "raw")
        if isinstance(cfg.get("headers"), dict):
            cfg["headers"] = {
                k: self._subst(ctx, v, "raw") if isinstance(v, str) else v
                for k, v in cfg["headers"].items()
            }
        if multipart and isinstance(cfg.get("parts"), list):
            parts = []
            for part in cfg["parts"]:
                if isinstance(part, dict):
                    part = dict(part)
                    for field in ("name", "filename"):
                        if isinstance(part.get(field), str):
                            part[field] = self._subst(ctx, part[field], "raw")
                    if isinstance(part.get("data_b64"), str):
                        part["data_b64"] = substitute_whole_value(
                            part["data_b64"],
                            results=ctx.named,
                            vars=ctx.vars,
                            instance_id=ctx.instance_id,
                            label=ctx.label,
                        )
                parts.append(part)
            cfg["parts"] = parts
        # stable per (instance, node), attempt-independent (docs/decisions.md D4)
        key = f"pgdurable-{ctx.instance_id}-{task.node_id}"
        return await run_http(
            self.http_client, self.http_policy, "HTTP_MULTIPART" if multipart else "HTTP", cfg, key
        )

    def _subst(self, ctx: InstanceCtx, text: str, mode: str) -> str:
        return substitute(
            text,
            mode=mode,  # type: ignore[arg-type]
            results=ctx.named,
            vars=ctx.vars,
            instance_id=ctx.instance_id,
            label=ctx.label,
        )

    async def _step_call(self, role_oid: int, role_name: str) -> sql.Composed:
        """``select * from <the role's runner>(cap, sql, max bytes)``, once the runner is
        verified to be the engine's own (df.grant_usage makes it; the service cannot)."""
        call = self.runners.get(role_oid)
        if call is None:
            assert self.pool is not None
            async with self.pool.connection() as conn:
                cur = await conn.execute(self.q("runner_ok"), (role_oid,))
                row = await cur.fetchone()
            if not (row and row[0]):
                raise StepError(_runner_missing(role_name), sqlstate="42501")
            call = self._runner_call(role_oid)
            self.runners[role_oid] = call
        return call

    async def _batch_from_cache(self, task: Task) -> bool:
        """The fast path of a SQL step whose instance is cached: straight to a batch runner,
        without taking a connection (a successor handed to us, a JOIN's branches)."""
        ctx = self.ctxs.get(task.instance_id)
        if (
            ctx is None
            or task.alone
            or _testing.BROKEN_CHECKPOINT
            or ctx.limits_epoch != self.limits_epoch
            or (task.version is not None and ctx.version < task.version)
            or (ctx.database and ctx.database != self.current_db)
        ):
            return False
        idx = ctx.index.get(task.node_id)
        if idx is None or ctx.graph.types[idx] != A.SQL:
            return False
        try:
            text = self._subst(ctx, ctx.configs[idx], "sql")
        except StepError:
            return False  # the slow path checkpoints the failure
        self.ctxs.move_to_end(task.instance_id)
        node_type_var.set("SQL")
        metrics.step_started("SQL")
        await self._submit_batch(ctx, task, idx, text)
        return True

    async def _prepare_sql(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, idx: int
    ) -> str | None:
        """Substitute a SQL step; run it here unless it can join a batch (its text then)."""
        try:
            text = self._subst(ctx, ctx.configs[idx], "sql")
        except StepError as exc:
            await self._complete(conn, ctx, task, idx, False, None, exc)
            return None
        if ctx.database and ctx.database != self.current_db:
            await self._run_sql_elsewhere(conn, ctx, task, idx, text)
            return None
        if task.alone or _testing.BROKEN_CHECKPOINT:
            assert self.step_pool is not None
            async with self.step_pool.connection() as sconn:
                await self._run_sql(sconn, ctx, task, idx, text)
            return None
        return text

    async def _run_sql(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, idx: int, text: str
    ) -> None:
        """One SQL step in a transaction of its own on a step connection; its failure is
        checkpointed here."""
        key = (task.instance_id, task.node_id)
        pid = conn.info.backend_pid
        cap = self._cap(conn)
        assert cap is not None, "a SQL step runs on a step connection"
        t0 = time.monotonic()
        stage = "statement"
        held = False
        sem = self.sql_sem  # released to the one acquired (_load_settings may replace it)
        try:
            try:
                call = await self._step_call(ctx.role_oid, ctx.role_name)
            except StepError as exc:
                raise _StepFailed(exc) from None
            await sem.acquire()
            held = True
            self.running_pids[key] = pid
            try:
                # one round trip: BEGIN, settings (the role's, then the engine's) +
                # capability + slot + step identity and the statement, pipelined
                async with conn.pipeline():
                    await conn.execute(b"begin")
                    await conn.execute(
                        self.q("step_settings"),
                        (cap, ctx.role_oid, step_app_name(task), ctx.role_oid, None),
                    )
                    cur = await conn.execute(call, (cap, text, self._runner_cap))
                rows = await cur.fetchall()
            finally:
                self.running_pids.pop(key, None)
            try:
                value = _envelope(rows)
                del rows, cur
                # exactly-once: the checkpoint commits with the statement
                # (docs/decisions.md D4); a result over a cap fails the step (its statement
                # rolled back), in _complete_once
                stage = "checkpoint"
                if not _testing.BROKEN_CHECKPOINT:
                    await self._complete(conn, ctx, task, idx, True, value, None, in_tx=True)
            except StepError as exc:
                raise _StepFailed(exc) from None
            # one round trip (simple query protocol): COMMIT and the session reset
            stage = "commit"
            await conn.execute(self.commit_reset)
            sem.release()
            held = False
            if _testing.BROKEN_CHECKPOINT:  # the deliberately broken build (pgdurable._testing)
                await asyncio.sleep(_testing.BROKEN_WINDOW_SECONDS)
                await self._complete(conn, ctx, task, idx, True, value, None)
        except _StepFailed as failed:
            await self._reset(conn)
            await self._statement_failed(conn, ctx, task, idx, text, failed.err)
        except psycopg.Error as exc:
            await self._reset(conn)
            if conn.broken or conn.closed or stage == "checkpoint" or exc.sqlstate is None:
                # the database went away, or our own checkpoint failed (not the user's
                # statement): release and retry, bounded by the attempts cap in _handle
                raise
            if stage == "commit":
                # code the statement left for COMMIT (a deferred trigger that escaped the
                # runner) failed it: the transaction, checkpoint included, rolled back
                self._forget(task.instance_id, ctx)
            await self._statement_failed(conn, ctx, task, idx, text, exc)
        except BaseException:
            # fenced, stale or cancelled: nothing of the step's transaction may commit
            await self._reset(conn)
            raise
        finally:
            if held:
                sem.release()
        logger.debug("sql step took %.1f ms", (time.monotonic() - t0) * 1000)

    async def _statement_failed(
        self,
        conn: psycopg.AsyncConnection[Any],
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        text: str,
        exc: psycopg.Error | StepError,
    ) -> None:
        """A step's statement failed and its transaction rolled back: its outcome."""
        if isinstance(exc, StepError):  # e.g. an oversized result
            await self._complete(conn, ctx, task, idx, False, None, exc)
            return
        key = (task.instance_id, task.node_id)
        ours = key in self.interrupted
        self.interrupted.discard(key)
        if exc.sqlstate == "57014" and not ours and "user request" in str(exc):
            # cancelled, but not by us (a statement_timeout says so): another session of the
            # step role signalled it (docs/security.md, known gaps); run the step again
            raise _Requeue(f"step interrupted by another session: {_pg_message(exc)}")
        if exc.sqlstate == "25001" and AUTOCOMMIT_RE.match(text):
            # VACUUM, CREATE INDEX CONCURRENTLY, … refuse transaction blocks and functions;
            # a step runs inside its runner, in one transaction with its checkpoint
            await self._complete(
                conn,
                ctx,
                task,
                idx,
                False,
                None,
                StepError(
                    f"{_pg_message(exc)}: a workflow step runs inside a transaction (its "
                    "checkpoint commits with it), so statements that refuse one (VACUUM, "
                    "CREATE INDEX CONCURRENTLY, REINDEX CONCURRENTLY, CREATE/DROP DATABASE, ALTER "
                    "SYSTEM) cannot be steps; schedule them with cron or pg_cron, or use the "
                    "transactional form (ANALYZE, CREATE INDEX)",
                    sqlstate=exc.sqlstate,
                ),
            )
            return
        # the step's statement failed (whatever its SQLSTATE class: 40, 53, 55, 57… are the
        # user's errors too): interrupted steps are fenced at checkpoint
        await self._complete(
            conn, ctx, task, idx, False, None, StepError(_pg_message(exc), sqlstate=exc.sqlstate)
        )

    # -- SQL step batches ----------------------------------------------------------------

    async def _submit_batch(self, ctx: InstanceCtx, task: Task, idx: int, text: str) -> None:
        """Queue a SQL step for a batch runner; returns once its checkpoint committed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sql_queue.append(_Item(ctx, task, idx, text, fut))
        if self.batch_running < BATCH_RUNNERS:
            self._spawn_runner()
        elif self.batch_running < self.sql_limit and not self.spawn_check_armed:
            # runners busy with slow statements must not hold queued steps back: one timer
            # for the whole queue (not one per step) adds a runner when they all are stuck
            self.spawn_check_armed = True
            asyncio.get_running_loop().call_later(BATCH_SPAWN_DELAY_S, self._spawn_check)
        await fut

    def _spawn_runner(self) -> None:
        self.batch_running += 1  # counted down by the runner itself, synchronously
        runner = asyncio.create_task(self._batch_runner(), name="sql batch runner")
        self.batch_runners.add(runner)
        runner.add_done_callback(self.batch_runners.discard)

    def _spawn_check(self) -> None:
        """Another runner while steps are queued, if every runner is stuck on a statement."""
        self.spawn_check_armed = False
        if not self.sql_queue or self.batch_running >= self.sql_limit:
            return
        now = time.monotonic()
        stuck = [t for t in self.runner_busy.values() if now - t >= BATCH_SPAWN_DELAY_S]
        if len(stuck) >= self.batch_running:
            self._spawn_runner()
        if self.batch_running < self.sql_limit:  # steps still queued: look again later
            self.spawn_check_armed = True
            asyncio.get_running_loop().call_later(BATCH_SPAWN_DELAY_S, self._spawn_check)

    def _pick(self, after: str | None, role: int | None) -> _Item | None:
        """The next queued step for a batch: the lowest instance id first.

        A batch holds one role (one runner, one step identity, one session) and visits
        instances in ascending order, as the completer does: transactions that take runs
        rows in one order cannot deadlock on them.
        """
        best = -1
        for i, it in enumerate(self.sql_queue):
            inst = it.task.instance_id
            if after is not None and (it.ctx.role_oid != role or inst < after):
                continue
            if best < 0 or inst < self.sql_queue[best].task.instance_id:
                best = i
                if inst == after:
                    break
        return self.sql_queue.pop(best) if best >= 0 else None

    async def _batch_runner(self) -> None:
        me = object()
        try:
            while True:
                first = self._pick(None, None)
                if first is None:
                    return
                async with self.sql_sem:
                    try:
                        await self._run_batch(first, me)
                    except Exception:  # a bug of ours: never leave queued steps unattended
                        logger.exception("batch runner error", extra={"event": "batch.error"})
                        if not first.fut.done():
                            first.fut.set_exception(_Retry())
        finally:
            self.batch_running -= 1
            self.runner_busy.pop(me, None)

    async def _run_batch(self, first: _Item, me: object) -> None:
        """Run queued SQL steps of one role in one transaction, each with its checkpoint.

        First the statements, one after another (``RESET ALL`` and the per-step settings
        between them), then every step's checkpoint in ascending instance order, then one
        COMMIT: runs rows are locked only for that short last phase, as for a single step,
        not while later statements run. Exactly-once as for a single step: each statement
        commits with its checkpoint. Any failure (a later statement's error, an oversized
        result, a fenced checkpoint, a busy instance, the connection) rolls the whole batch
        back; the steps that ran then run again one per transaction (``_Retry``), which
        decides each one's outcome. A batch of one handles its statement's failure in place.
        A checkpoint waits at most BATCH_LOCK_WAIT_S for its instance's asyncio lock: the
        batch holds database locks, so an unbounded wait could close a cycle PostgreSQL cannot
        see.
        """
        assert self.pool is not None
        ran: list[tuple[_Item, Any]] = []
        held: dict[int, asyncio.Lock] = {}
        item: _Item | None = first
        role = first.ctx.role_oid
        t0 = None  # the window opens once the first step ran (not while waiting for a slot)
        try:
            call = await self._step_call(role, first.ctx.role_name)
            assert self.step_pool is not None
            async with self.step_pool.connection() as conn:
                cap = self._cap(conn)
                assert cap is not None
                try:
                    while item is not None:
                        instance_var.set(item.task.instance_id)
                        node_var.set(item.task.node_id)
                        key = (item.task.instance_id, item.task.node_id)
                        self.running_pids[key] = conn.info.backend_pid
                        self.runner_busy[me] = time.monotonic()
                        try:
                            async with conn.pipeline():
                                if not ran:
                                    # once per batch: BEGIN, settings, one slot, the identity
                                    await conn.execute(b"begin")
                                    await conn.execute(
                                        self.q("step_settings"),
                                        (cap, role, step_app_name(item.task), role, None),
                                    )
                                else:
                                    # GUCs the last statement set (search_path, …) end here
                                    await conn.execute(b"reset all")
                                    await conn.execute(
                                        self.q("step_next"), (step_app_name(item.task), role, None)
                                    )
                                cur = await conn.execute(call, (cap, item.text, self._runner_cap))
                            rows = await cur.fetchall()
                        finally:
                            self.running_pids.pop(key, None)
                            self.runner_busy.pop(me, None)
                        value = _envelope(rows)  # capped at its checkpoint (_complete_once)
                        del rows, cur
                        ran.append((item, value))
                        item = None
                        if t0 is None:
                            t0 = time.monotonic()
                        if len(ran) < BATCH_MAX and time.monotonic() - t0 < BATCH_WINDOW_S:
                            item = self._pick(ran[-1][0].task.instance_id, role)
                except BaseException as exc:
                    await self._reset(conn)
                    if not (
                        item is first
                        and isinstance(exc, psycopg.Error | StepError)
                        and not (conn.broken or conn.closed)
                    ):
                        raise
                    # the batch held this step alone: its statement's failure is its
                    # outcome, checkpointed as for a step run on its own (not run again)
                    await self._statement_failed(
                        conn, first.ctx, first.task, first.idx, first.text, exc
                    )
                    first.fut.set_result(None)
                    return
                refused: StepError | None = None
                try:
                    # the checkpoints, in the order the statements ran (ascending instances),
                    # each instance's lock held from its first checkpoint to the COMMIT: its
                    # runs row stays locked that long, and nobody in this process may then
                    # compute on state that another open transaction is about to change
                    for it, value in ran:
                        instance_var.set(it.task.instance_id)
                        node_var.set(it.task.node_id)
                        if id(it.ctx.lock) not in held:
                            await _acquire(it.ctx, BATCH_LOCK_WAIT_S)
                            held[id(it.ctx.lock)] = it.ctx.lock
                        await self._complete(
                            conn,
                            it.ctx,
                            it.task,
                            it.idx,
                            True,
                            value,
                            None,
                            in_tx=True,
                            lock_held=True,
                        )
                    await conn.execute(self.commit_reset)
                except StepError as exc:
                    await self._reset(conn)
                    if len(ran) != 1 or (conn.broken or conn.closed):
                        raise
                    refused = exc  # handled below, once the instance's lock is released
                except BaseException:
                    await self._reset(conn)
                    raise
                finally:
                    for lock in held.values():
                        lock.release()
                if refused is not None:
                    # a batch of one whose result (or the checkpoint it makes) is over a cap:
                    # its statement rolled back with it, and that is its outcome (not run again)
                    await self._statement_failed(
                        conn, first.ctx, first.task, first.idx, first.text, refused
                    )
                    first.fut.set_result(None)
                    return
        except BaseException as exc:
            failed = [it for it, _ in ran] + ([item] if item is not None else [])
            metrics.batch(len(failed), False)
            for it in failed:
                self._forget(it.task.instance_id, it.ctx)  # rolled back: reload
                if it.fut.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    it.fut.cancel()
                elif isinstance(exc, Fenced) and len(failed) == 1:
                    it.fut.set_exception(Fenced())
                elif isinstance(exc, _Requeue) and len(failed) == 1:
                    it.fut.set_exception(exc)  # interrupted by another session: logged, backs off
                else:
                    it.fut.set_exception(_Retry())
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
                if not it.fut.done():
                    it.fut.set_result(None)
        finally:
            instance_var.set(None)
            node_var.set(None)

    async def _reset(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """After a step: roll back what is left of its transaction, reset the session."""
        if not (conn.broken or conn.closed):
            try:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    await conn.execute(b"rollback")
                await conn.execute(self.reset_sql().encode())
            except psycopg.Error as exc:
                # a session we cannot vouch for is not reused: the pool replaces it
                logger.warning(
                    "closing a step connection whose reset failed: %s",
                    exc,
                    extra={"event": "step.reset_failed"},
                )
                await conn.close()

    async def _remote_pools(self, dbname: str) -> tuple[AsyncConnectionPool, AsyncConnectionPool]:
        """The service's and the step sessions' pools for another database.

        Both are closed together once every connection of both has been idle for
        REMOTE_IDLE_S (and forgotten with the runners verified there), so DROP DATABASE of a
        database whose workflows are done does not find this worker's sessions in it. A
        reaper task does it: psycopg_pool's own max_idle closes one connection per max_idle
        period, which leaves a pool of n connections open n times as long.
        """
        self.remote_used[dbname] = time.monotonic()
        pool = self.remote_pools.get(dbname)
        if pool is None:
            pool = AsyncConnectionPool(
                _with_db(self.config.dsn, dbname),
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
            self.remote_pools[dbname] = pool
        spool = self.remote_step_pools.get(dbname)
        if spool is None:
            spool = self._make_step_pool(
                _with_db(self.config.step_dsn, dbname),
                pool,
                self.config.slots,
                f"pgdurable:step:{dbname}",
            )
            await spool.open(wait=False)
            self.remote_step_pools[dbname] = spool

        async def reap() -> None:
            while self.remote_used:
                await asyncio.sleep(REMOTE_IDLE_S / 4)
                now = time.monotonic()
                for db, used in list(self.remote_used.items()):
                    pools = [
                        p
                        for p in (self.remote_pools.get(db), self.remote_step_pools.get(db))
                        if p is not None
                    ]
                    stats = [p.get_stats() for p in pools]
                    if any(
                        st.get("pool_size", 0) != st.get("pool_available", 0)
                        or st.get("requests_waiting", 0)
                        for st in stats
                    ):
                        self.remote_used[db] = now  # a connection is out: in use
                        continue
                    if now - used < REMOTE_IDLE_S:
                        continue
                    # forgotten first (synchronously): a step from now on opens new pools
                    del self.remote_used[db]
                    self.remote_pools.pop(db, None)
                    self.remote_step_pools.pop(db, None)
                    self.remote_runners -= {k for k in self.remote_runners if k[0] == db}
                    for p in pools:
                        with contextlib.suppress(Exception):
                            await p.close(timeout=5)
                    logger.debug("closed the idle pools of database %s", db)

        if self.remote_reaper is None or self.remote_reaper.done():
            self.remote_reaper = asyncio.create_task(reap(), name="remote pool reaper")
        return pool, spool

    async def _run_sql_elsewhere(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, idx: int, text: str
    ) -> None:
        """A step of a `database =>` instance: at-least-once (docs/decisions.md D4).

        The statement commits in the other database, then the checkpoint commits here; a
        crash between the two re-runs the statement. That database has pgdurable installed
        too (its engine idle) and the role granted there (df.grant_usage makes its runner);
        the worker verifies the runner there as here, and runs the statement on a step
        connection with a capability registered in that database.
        """
        assert ctx.database is not None
        key = (task.instance_id, task.node_id)
        try:
            pool, spool = await self._remote_pools(ctx.database)
            if (ctx.database, ctx.role_oid) not in self.remote_runners:
                async with pool.connection() as sconn:
                    cur = await sconn.execute(self.q("remote_engine_present"))
                    ok = await cur.fetchone()
                    if ok and ok[0] and not ok[1]:
                        raise StepError(
                            f"pgdurable in database {ctx.database!r} is older than this serve "
                            f"(it cannot apply a role's settings to its steps): upgrade it "
                            f"(pgdurable install --dsn .../{ctx.database})",
                            sqlstate="55000",
                        )
                    if ok and ok[0]:
                        cur = await sconn.execute(self.q("runner_ok"), (ctx.role_oid,))
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
                        _runner_missing(ctx.role_name) + f" in database {ctx.database!r}",
                        sqlstate="42501",
                    )
                self.remote_runners.add((ctx.database, ctx.role_oid))
            call = self._runner_call(ctx.role_oid)
            async with spool.connection() as rconn:
                cap = self._cap(rconn)
                try:
                    async with rconn.transaction():
                        # the role's settings there; the engine's step_statement_timeout
                        # is this deployment's, not the target database's
                        await rconn.execute(
                            self.q("remote_step_settings"),
                            (cap, step_app_name(task), ctx.role_oid, self.step_timeout),
                        )
                        self.running_pids[key] = rconn.info.backend_pid
                        try:
                            cur = await rconn.execute(call, (cap, text, self._runner_cap))
                            rows = await cur.fetchall()
                        finally:
                            self.running_pids.pop(key, None)
                finally:
                    await self._reset(rconn)
        except StepError as exc:
            await self._complete(conn, ctx, task, idx, False, None, exc)
            return
        except psycopg.Error as exc:
            if exc.sqlstate is None or exc.sqlstate.startswith("08"):
                raise  # the connection itself failed: release and retry
            await self._complete(
                conn,
                ctx,
                task,
                idx,
                False,
                None,
                StepError(_pg_message(exc), sqlstate=exc.sqlstate),
            )
            return
        try:
            value = _envelope(rows)
        except StepError as exc:
            await self._group_complete(ctx, task, idx, False, None, exc)
            return
        await self._group_complete(ctx, task, idx, True, value, None)

    async def _complete(
        self,
        conn: psycopg.AsyncConnection[Any],
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        ok: bool,
        value: Any,
        err: StepError | None,
        *,
        in_tx: bool = False,
        decision: bool | None = None,
        lock_held: bool = False,
    ) -> None:
        """Checkpoint one leaf outcome; inside the step's transaction when ``in_tx``.

        First optimistically, on the cached state (``_apply_v1`` compares the version).
        If another worker checkpointed the instance meanwhile (a sibling JOIN branch),
        retry pessimistically: lock the runs row first, reload under the lock, compute
        and apply — nobody can move the instance on in between, so there is no retry
        loop that contention could exhaust.
        """
        if lock_held:  # a batch holds the instance's lock until its COMMIT
            await self._complete_locked(conn, ctx, task, idx, ok, value, err, in_tx, decision)
            return
        if in_tx:
            # inside a transaction that holds locks: bounded wait (see _run_batch)
            await _acquire(ctx, LOCK_WAIT_S)
        else:
            await ctx.lock.acquire()
        try:
            await self._complete_locked(conn, ctx, task, idx, ok, value, err, in_tx, decision)
        finally:
            ctx.lock.release()

    async def _complete_locked(
        self,
        conn: psycopg.AsyncConnection[Any],
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        ok: bool,
        value: Any,
        err: StepError | None,
        in_tx: bool,
        decision: bool | None,
    ) -> None:
        try:
            if in_tx:
                await self._complete_once(conn, ctx, task, idx, ok, value, err, decision, False)
            else:
                async with conn.transaction():
                    await self._complete_once(conn, ctx, task, idx, ok, value, err, decision, False)
            return
        except _Stale:
            pass
        except StepError as exc:
            # the result, or the checkpoint it makes, is over a cap (nothing was written).
            # On a step connection the step's own statement is in this transaction: its
            # caller rolls it back and fails the step. Elsewhere the outcome becomes the
            # failure, on a reloaded state (the cached one moved on in memory).
            if not ok or self._cap(conn) is not None:
                raise
            ok, value, err, decision = False, None, exc, None
            logger.info("step result refused: %s", exc, extra={"event": "step.too_large"})
        tx = contextlib.nullcontext() if in_tx else conn.transaction()
        async with tx:
            await conn.execute(*self._engine_query(conn, "lock_run", (task.instance_id,)))
            fresh = await self._ctx(conn, task.instance_id, fresh=True, lock=ctx.lock)
            if fresh is None:
                raise Fenced()
            try:
                await self._complete_once(conn, fresh, task, idx, ok, value, err, decision, True)
            except _Stale:  # pragma: no cover - impossible while we hold the row lock
                raise Fenced() from None

    async def _complete_once(
        self,
        conn: psycopg.AsyncConnection[Any],
        ctx: InstanceCtx,
        task: Task,
        idx: int,
        ok: bool,
        value: Any,
        err: StepError | None,
        decision: bool | None,
        reloaded: bool,
    ) -> None:
        sched = ctx.sched
        if ctx.dead or sched.gen(idx) != task.gen or sched.status(idx) != A.RUNNING:
            # our cached copy may be behind: reload once; _apply_v1 fences for real
            raise Fenced() if reloaded else _Stale()
        # +1: this step's slot frees
        cp = Checkpoint(take_budget=self._free_slots() + 1, take_sql=self._take_sql())
        upd = cp.node(task.node_id)
        if task.started is not None and task.kind == "run":
            # a step's run starts when a worker picks it up; a wait (sleep, schedule, signal)
            # keeps its activation time, so its duration is the wait
            upd["details"]["started_at"] = task.started.isoformat()
        if ok:
            if decision is None:
                # every leaf result (SQL rows, signal data, HTTP bodies, BREAK values,
                # timers) is encoded and capped here, once, before anything changes
                data = check_size(
                    value, self.config.result_max_bytes, "step result", setting=RESULT_CAP_SETTING
                )
                ctx.record_leaf(idx, value, data, cp)
                truth = truthy(value)
            else:
                truth = decision
        else:
            assert err is not None
            msg = error_text(str(err))
            ctx.errors[idx] = (msg, err.sqlstate)
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
        try:
            step = sched.complete(idx, task.gen, ok, truth)
            ctx.build(step, cp, task.clock)
            if ok and ctx.stored > self.max_instance_bytes > 0:
                raise ResultTooLarge(
                    f"the results of instance {ctx.instance_id} would hold {ctx.stored} "
                    f"bytes, over the limit of {self.max_instance_bytes} bytes per instance; "
                    f"raise {INSTANCE_CAP_SETTING} to allow it"
                )
            await self._apply(conn, ctx, task, cp)
        except BaseException:
            # the cached state moved on in memory and nothing of it committed: reload
            self._forget(ctx.instance_id, ctx)
            raise
        metrics.step_finished(TYPE_NAMES[ctx.graph.types[idx]], ok)


class _Stale(Exception):
    pass


class _LockBusy(Exception):
    """An instance's lock stayed taken while our transaction held locks: give it up."""


async def _acquire(ctx: InstanceCtx, seconds: float) -> None:
    """Take an instance's lock, or raise _LockBusy after ``seconds``."""
    try:
        await asyncio.wait_for(ctx.lock.acquire(), seconds)
    except TimeoutError:
        raise _LockBusy(f"instance {ctx.instance_id} stayed busy") from None


class _Requeue(Exception):
    """Not the step's outcome (its statement was cancelled by someone else): run it again."""


class _Retry(Exception):
    """The batch a SQL step ran in rolled back: run the step again on its own."""


class _StepFailed(Exception):
    def __init__(self, err: StepError) -> None:
        super().__init__(str(err))
        self.err = err


def _envelope(rows: list[Any]) -> dict[str, Any]:
    """The SQL result envelope of a runner's rows (json values, text or already parsed)."""
    return sql_envelope([r[0] if isinstance(r[0], str) else json_text(r[0]) for r in rows])


def _check_checkpoint(size: int) -> None:
    if size > CHECKPOINT_MAX_BYTES:
        raise ResultTooLarge(
            f"the checkpoint of this step would carry {size} bytes, over the "
            f"limit of {CHECKPOINT_MAX_BYTES} bytes per checkpoint (a named "
            "composite stores its value once more: name fewer large ones)"
        )


def _jsonb_bytes(data: bytes) -> Jsonb:
    """A jsonb parameter sent as the JSON bytes given (psycopg's text dumper passes them)."""
    return Jsonb(data, dumps=_identity)


def _identity(data: Any) -> Any:
    return data


def _failure_kind(exc: BaseException, *, stopping: bool = False) -> str:
    """How a step's handling failed, when the failure is not the step's own outcome.

    RETRY: it may pass on another attempt — the connection or the server went away
    (OperationalError: connection lost, admin shutdown 57P01, query_canceled 57014 when we
    shut down), a conflict (serialization failure 40001, deadlock 40P01, lock timeout 55P03),
    any other error PostgreSQL raised for our statements (bounded by MAX_ATTEMPTS: an
    operator may fix a revoked privilege), an instance busy in this process, a network or
    memory error, or anything while the worker is shutting down. A worker that died is
    retried the same way, by lease expiry.
    DATA: PostgreSQL refused our statement for the data it carries (data exception 22,
    program limit 54), or a StepError reached this far (a value over a cap): the same input
    fails the same way.
    INTERNAL: an exception of pgdurable's own code (TypeError, KeyError, ValueError, …
    while processing a result or a stored state): a bug of ours, deterministic, not retried.
    """
    if stopping:
        return RETRY
    if isinstance(exc, StepError):
        return DATA
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        return DATA if state[:2] in DETERMINISTIC_SQLSTATE_CLASSES else RETRY
    if isinstance(exc, _LockBusy | Busy | TimeoutError | OSError | MemoryError):
        return RETRY
    return INTERNAL


def _deterministic(exc: BaseException) -> bool:
    """Would the same step fail the same way again? (see :func:`_failure_kind`)"""
    return _failure_kind(exc) != RETRY


def _where(task: Task) -> str:
    return (
        f"starting the instance (node {task.node_id!r})"
        if task.kind == "start"
        else f"running node {task.node_id!r}"
    )


def _failure_reason(task: Task, exc: BaseException, kind: str) -> str:
    """The error stored for a step that failed for a reason not its own."""
    if kind == INTERNAL:
        return (
            f"internal error in pgdurable while {_where(task)}: {type(exc).__name__}: {exc} "
            "(a bug in pgdurable, not in the step: it would fail the same way again, so "
            "it was not retried; the worker's log has the traceback)"
        )
    if kind == DATA:
        return f"step failed: {exc} (the same input fails the same way: not retried)"
    return f"step abandoned after {task.attempts} attempts; last error: {exc}"


def step_app_name(task: Task) -> str:
    """The ``application_name`` of a step's transaction, ``pgdurable:<instance>:<node>``: what
    a DBA finds a step's backend by in pg_stat_activity (docs/operating.md). Both ids are
    8 hex digits when df.start wrote them; rows written by hand may hold anything, so only
    ASCII letters, digits, ``_`` and ``-`` pass (others become ``?``) and each part is cut to
    24 characters: within NAMEDATALEN (63 bytes), nothing a terminal would interpret."""

    def clean(text: str) -> str:
        return _APP_NAME_UNSAFE.sub("?", text[:24])

    return f"pgdurable:{clean(task.instance_id)}:{clean(task.node_id)}"


_APP_NAME_UNSAFE = re.compile(r"[^0-9A-Za-z_-]")


def _with_db(dsn: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def _reseed() -> str:
    """A setseed() with a fresh random value: random() after a step a tenant seeded must not
    be predictable to the next step on the connection."""
    return f"select pg_catalog.setseed({random.SystemRandom().uniform(-1.0, 1.0)!r})"


def _runner_missing(role: str) -> str:
    return (
        f"the step runner of role {role!r} is missing or is not the one pgdurable made "
        f"(it runs the role's steps as that role); an administrator must run "
        f"select df.grant_usage({role!r})"
    )


def _pg_message(exc: psycopg.Error) -> str:
    diag = exc.diag
    return diag.message_primary or str(exc).strip()


def _terminal_name(code: int) -> str:
    return {A.T_COMPLETED: "completed", A.T_FAILED: "failed", A.T_CANCELLED: "cancelled"}.get(
        code, "running"
    )


def _impl() -> str:
    from pgdurable.graph import sched

    return sched.__impl__


def run_worker(config: ServeConfig) -> None:
    """Child-process entry point: uvloop, pool opened after fork, run until SIGTERM."""
    import uvloop

    # JSON from the database is parsed like every result (values.loads: every number exact,
    # with its scale); a value nested deeper than Python holds fails as a ValueError, not a
    # RecursionError
    set_json_loads(loads)
    uvloop.run(Worker(config).run())
