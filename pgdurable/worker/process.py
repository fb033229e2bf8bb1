"""One worker process's lifecycle: build its parts, run them until SIGTERM, drain, shut down.

The parts (one asyncio task each where they loop, all in this process's uvloop loop), each
given its collaborators explicitly:

- :mod:`.producer`: claims ``≤ free slots`` tasks, launches each (:class:`.dispatch.Dispatch`);
- :mod:`.notifier`: LISTEN for wake-ups, interrupts of cancelled or abandoned steps;
- :mod:`.maintenance`: leases, rescue, heartbeat, settings, schedules, retention;
- :mod:`.dispatch`: one task, from its claim to its checkpoint, by node kind
  (:mod:`pgdurable.steps.sql_step`, :mod:`.batch`, :mod:`pgdurable.steps.remote`,
  :mod:`pgdurable.steps.signal_step`, :mod:`pgdurable.steps.http_run`);
- :mod:`.checkpoint` (with :mod:`.completer`, the group commit): every outcome's write;
- :mod:`.cache`, :mod:`.settings`, :mod:`.sessions`: the state they share.

ARCHITECTURE.md, "The step journey", follows one step through them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid

from psycopg.types.json import set_json_loads

from pgdurable.config import ServeConfig
from pgdurable.steps.foreach_step import ForeachStep
from pgdurable.steps.http_run import HttpSteps
from pgdurable.steps.remote import RemoteSql
from pgdurable.steps.signal_step import SignalStep
from pgdurable.steps.sql_step import SqlSteps
from pgdurable.values import loads

from .batch import BatchRunner
from .cache import InstanceCache
from .checkpoint import Checkpointer
from .completer import Completer
from .dispatch import Dispatch
from .flow import Fenced
from .maintenance import Maintenance
from .notifier import Notifier, Running
from .producer import Producer, Slots
from .sessions import Sessions
from .settings import Settings

logger = logging.getLogger(__name__)


class Worker:
    """A worker process's parts; :meth:`run` until SIGTERM, then drain."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        engine = config.engine_schema
        self.sessions = sessions = Sessions(
            config.dsn,
            config.step_dsn,
            config.slots,
            engine,
            self.worker_id,
            config.result_max_bytes,
            prepare=config.prepare,
        )
        self.settings = settings = Settings(
            engine, config.slots, lambda: (sessions.pool, sessions.step_pool)
        )
        self.cache = cache = InstanceCache(sessions, settings)
        self.running = running = Running()
        self.slots = slots = Slots(config.slots)
        self.completer = Completer(None, Fenced)  # its pool: the service's, once open
        self.checkpointer = checkpointer = Checkpointer(
            worker_id=self.worker_id,
            sessions=sessions,
            cache=cache,
            settings=settings,
            completer=self.completer,
            lease_seconds=config.lease_seconds,
            result_max_bytes=config.result_max_bytes,
            budget=lambda: (slots.free(), self.batch.take_sql()),
            wake=self.wake.set,
        )
        self.completer.hooks = self.checkpointer  # its checkpoints written set-based
        self.sql = SqlSteps(
            sessions=sessions,
            settings=settings,
            running=running,
            checkpointer=checkpointer,
            cache=cache,
        )
        self.batch = BatchRunner(
            sessions=sessions,
            settings=settings,
            running=running,
            checkpointer=checkpointer,
            cache=cache,
            sql=self.sql,
        )
        self.remote = RemoteSql(
            sessions=sessions, settings=settings, running=running, checkpointer=checkpointer
        )
        self.http = HttpSteps(
            pool=lambda: sessions.service,
            q=sessions.q,
            policy=config.http_policy,
            allow=list(config.http_allow),
        )
        self.dispatch = Dispatch(
            worker_id=self.worker_id,
            sessions=sessions,
            settings=settings,
            cache=cache,
            checkpointer=checkpointer,
            slots=slots,
            sql=self.sql,
            batch=self.batch,
            remote=self.remote,
            signal=SignalStep(
                q=sessions.q,
                worker_id=self.worker_id,
                result_max_bytes=config.result_max_bytes,
                checkpointer=checkpointer,
            ),
            http=self.http,
            foreach=ForeachStep(
                sessions=sessions,
                settings=settings,
                running=running,
                sql_steps=self.sql,
                worker_id=self.worker_id,
            ),
            wake=self.wake,
            stopping=self.stopping,
        )
        self.producer = Producer(
            pool=lambda: sessions.service,
            claim_sql=sessions.q("claim"),
            worker_id=self.worker_id,
            lease_seconds=config.lease_seconds,
            poll_interval=config.poll_interval,
            slots=slots,
            wake=self.wake,
            stopping=self.stopping,
            handle=self.dispatch.handle,
            release=self.dispatch.release,
            preload=self.cache.preload,
        )
        self.notifier = Notifier(
            dsn=config.dsn,
            q=sessions.q,
            pool=lambda: sessions.service,
            worker_id=self.worker_id,
            running=running,
            forget=cache.forget,
            wake=self.wake,
            stopping=self.stopping,
        )
        self.maintenance = Maintenance(
            pool=lambda: sessions.service,
            q=sessions.q,
            engine=engine,
            worker_id=self.worker_id,
            lease_seconds=config.lease_seconds,
            interval=config.maintenance_interval,
            slots=slots,
            settings=settings,
            wake=self.wake,
            stopping=self.stopping,
        )

    async def open(self) -> None:
        """Open the pools, read the settings, start the group commit, build the HTTP client:
        the parts are ready (:meth:`run` does this first; in-process tests call it alone)."""
        await self.sessions.open()
        await self.maintenance.reload_settings()
        self.completer.pool = self.sessions.service
        self.completer.start()
        self.http.open()

    async def close(self) -> None:
        """Flush the group commit, then close the client and the pools (after the drain)."""
        await self.completer.stop()  # final flush before the pool closes
        with contextlib.suppress(Exception):
            async with self.sessions.service.connection() as conn:
                await conn.execute(self.sessions.q("release"), (self.worker_id, None, None))
        await self.http.close()
        await self.remote.close()
        await self.sessions.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        # SIGHUP (forwarded by the supervisor): re-read the pg_durable.* settings
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(self.maintenance.reload_settings())
        )
        await self.open()
        logger.info(
            "worker started (id %s, %d slots, scheduler %s)",
            self.worker_id,
            self.config.slots,
            _impl(),
            extra={"event": "worker.started"},
        )
        tasks = [
            asyncio.create_task(self.producer.run(), name="producer"),
            asyncio.create_task(self.notifier.run(), name="listener"),
            asyncio.create_task(self.maintenance.run(), name="maintenance"),
        ]
        await self.stopping.wait()
        logger.info(
            "worker draining %d steps",
            len(self.slots.inflight),
            extra={"event": "worker.draining"},
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
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        # drain: let running steps finish (they checkpoint), bounded by the lease
        if self.slots.inflight:
            await asyncio.wait(
                list(self.slots.inflight.values()), timeout=self.config.lease_seconds
            )
        await self.close()


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
