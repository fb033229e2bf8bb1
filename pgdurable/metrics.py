"""Prometheus metrics of ``pgdurable serve`` (``--metrics-port``); names start ``pgdurable_``.

prometheus-client runs in *multiprocess mode*: before forking, the supervisor calls
:func:`enable`, which points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh temporary directory
and creates the metric objects; every forked worker inherits them and records into its own
memory-mapped file there (prometheus-client notices the new pid). Only the supervisor
serves ``/metrics`` (:func:`serve_metrics`), aggregating every file in the directory, so a
worker that died and was re-forked still counts. Workers never open a port.

When metrics are disabled (no ``--metrics-port``) :func:`enable` is never called, nothing
imports prometheus-client, and every recording function below is a test of one global
against ``None``.

What is recorded, and where (``pgdurable/worker``):

====================================== ===============================================
``pgdurable_tasks_claimed_total``      tasks leased by the producer (claim)
``pgdurable_tasks_handed_off_total``   successors a checkpoint leased straight to its worker
``pgdurable_steps_with_start_total``   first steps run on their instance's start task (no claim)
``pgdurable_claim_batch_size``         histogram of tasks per non-empty claim
``pgdurable_steps_claimed_total``      steps that began to run, by ``node_type``
``pgdurable_steps_completed_total``    steps checkpointed as completed, by ``node_type``
``pgdurable_steps_failed_total``       steps checkpointed as failed, by ``node_type``
``pgdurable_step_duration_seconds``    histogram, start of the step to its checkpoint
``pgdurable_checkpoint_seconds``       histogram of one checkpoint statement (``_apply``)
``pgdurable_sql_batch_size``           histogram of SQL steps per committed batch
``pgdurable_sql_batches_rolled_back_total`` batches rolled back (their steps re-ran alone)
``pgdurable_leases_rescued_total``     expired leases cleared by a worker's maintenance
``pgdurable_worker_restarts_total``    workers re-forked by the supervisor after dying
``pgdurable_queue_depth``              runnable, unleased tasks (read at scrape time)
``pgdurable_tasks_leased``             tasks leased right now (read at scrape time)
====================================== ===============================================
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from .config import ENGINE_SCHEMA_DEFAULT

logger = logging.getLogger(__name__)

# Step durations span milliseconds (SQL) to minutes (HTTP, long statements).
STEP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
# One checkpoint is one round trip plus the writes of one transaction.
CHECKPOINT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# A claim leases at most the free slots (16 by default).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# The one source of truth for whether metrics are on: the metric objects, or None.
_m: _Metrics | None = None
_owned_dir: str | None = None
# Start of the step running in the current asyncio task (each step runs in a task of its
# own, which copies the context, so this is per step).
_step_t0: contextvars.ContextVar[float | None] = contextvars.ContextVar("step_t0", default=None)


class _Metrics:
    """The metric objects (created only in multiprocess mode, see :func:`enable`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.tasks_claimed = Counter("pgdurable_tasks_claimed", "Tasks leased by claims.")
        self.tasks_handed_off = Counter(
            "pgdurable_tasks_handed_off",
            "Successors inserted already leased to the worker that checkpointed them.",
        )
        self.steps_with_start = Counter(
            "pgdurable_steps_with_start",
            "First steps run on their instance's start task, with the start (no claim).",
        )
        self.claim_batch = Histogram(
            "pgdurable_claim_batch_size", "Tasks leased per non-empty claim.", buckets=BATCH_BUCKETS
        )
        self.steps_claimed = Counter(
            "pgdurable_steps_claimed", "Steps that began to run.", ["node_type"]
        )
        self.steps_completed = Counter(
            "pgdurable_steps_completed", "Steps checkpointed as completed.", ["node_type"]
        )
        self.steps_failed = Counter(
            "pgdurable_steps_failed", "Steps checkpointed as failed.", ["node_type"]
        )
        self.step_seconds = Histogram(
            "pgdurable_step_duration_seconds",
            "Seconds from the start of a step to its checkpoint.",
            ["node_type"],
            buckets=STEP_BUCKETS,
        )
        self.checkpoint_seconds = Histogram(
            "pgdurable_checkpoint_seconds",
            "Seconds one checkpoint statement took.",
            buckets=CHECKPOINT_BUCKETS,
        )
        self.sql_batch = Histogram(
            "pgdurable_sql_batch_size",
            "SQL steps committed per batch transaction.",
            buckets=BATCH_BUCKETS,
        )
        self.sql_batch_rollbacks = Counter(
            "pgdurable_sql_batches_rolled_back",
            "SQL step batches rolled back; their steps ran again one per transaction.",
        )
        self.rescued = Counter("pgdurable_leases_rescued", "Expired leases rescued.")
        self.restarts = Counter(
            "pgdurable_worker_restarts", "Worker processes re-forked after dying."
        )


def enabled() -> bool:
    return _m is not None


def enable(directory: str | None = None) -> str:
    """Turn metrics on in this process and the ones it forks later; returns the directory.

    Must run before the first fork. A fresh temporary directory (removed at exit) is used
    unless ``directory`` is given: stale files from an earlier run would be summed in.
    """
    global _m, _owned_dir
    if _m is not None:
        return os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if directory is None:
        directory = _owned_dir = tempfile.mkdtemp(prefix="pgdurable-metrics-")
        atexit.register(_cleanup, os.getpid())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # imported before the variable was set: switch it over
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    _m = _Metrics()
    return directory


def _cleanup(pid: int) -> None:
    # atexit runs in the supervisor only (workers leave through os._exit)
    if _owned_dir and os.getpid() == pid:
        shutil.rmtree(_owned_dir, ignore_errors=True)


# -- what the worker and supervisor call (no-ops when disabled) -------------------------


def claimed(n: int) -> None:
    """The producer leased ``n`` tasks (``n`` may be 0: nothing is recorded then)."""
    if _m is not None and n:
        _m.tasks_claimed.inc(n)
        _m.claim_batch.observe(n)


def batch(n: int, committed: bool) -> None:
    """A batch of ``n`` SQL steps committed, or rolled back (its steps will run alone)."""
    if _m is not None:
        if committed:
            _m.sql_batch.observe(n)
        else:
            _m.sql_batch_rollbacks.inc()


def handed_off(n: int) -> None:
    """A checkpoint handed ``n`` runnable successors straight to this worker (no claim)."""
    if _m is not None and n:
        _m.tasks_handed_off.inc(n)


def step_with_start() -> None:
    """An instance's first step runs on its start task (the fused first step: no claim)."""
    if _m is not None:
        _m.steps_with_start.inc()


def step_started(node_type: str) -> None:
    """A step of ``node_type`` begins to run in the current asyncio task."""
    if _m is not None:
        _step_t0.set(time.monotonic())
        _m.steps_claimed.labels(node_type).inc()


def step_finished(node_type: str, ok: bool, seconds: float | None = None) -> None:
    """A step's outcome was checkpointed; ``seconds`` defaults to the time since
    :func:`step_started` in this task (not observed when unknown)."""
    if _m is None:
        return
    (_m.steps_completed if ok else _m.steps_failed).labels(node_type).inc()
    if seconds is None:
        t0 = _step_t0.get()
        seconds = None if t0 is None else time.monotonic() - t0
    if seconds is not None:
        _m.step_seconds.labels(node_type).observe(seconds)


def checkpoint(seconds: float) -> None:
    """One checkpoint statement took ``seconds``."""
    if _m is not None:
        _m.checkpoint_seconds.observe(seconds)


def rescued(n: int) -> None:
    """Maintenance cleared ``n`` expired leases."""
    if _m is not None and n:
        _m.rescued.inc(n)


def worker_restarted() -> None:
    """The supervisor re-forked a worker that died."""
    if _m is not None:
        _m.restarts.inc()


# -- the /metrics endpoint (supervisor) --------------------------------------------------


class _QueueCollector:
    """Reads the engine's task table at scrape time: one number for all workers, fresh.

    Admin tooling (SQL spelled here, as in the CLI): the engine schema is quoted as
    an identifier. A database error yields no sample rather than a failed scrape.
    """

    def __init__(self, dsn: str, engine_schema: str) -> None:
        self.dsn = dsn
        self.engine_schema = engine_schema

    def collect(self) -> Iterator[Any]:
        import psycopg
        from prometheus_client.core import GaugeMetricFamily
        from psycopg import sql

        query = sql.SQL(
            "select count(*) filter (where lease_owner is null and due_at <= now()),"
            " count(*) filter (where lease_owner is not null) from {}.tasks"
        ).format(sql.Identifier(self.engine_schema))
        try:
            with psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=3, application_name="pgdurable metrics"
            ) as conn:
                row = conn.execute(query).fetchone()
        except psycopg.Error as exc:
            logger.warning(
                "metrics: cannot read the queue depth: %s", exc, extra={"event": "metrics.error"}
            )
            return
        assert row is not None
        yield GaugeMetricFamily(
            "pgdurable_queue_depth", "Runnable tasks no worker has leased yet.", value=row[0]
        )
        yield GaugeMetricFamily("pgdurable_tasks_leased", "Tasks leased right now.", value=row[1])


def registry(dsn: str | None = None, engine_schema: str = ENGINE_SCHEMA_DEFAULT) -> Any:
    """A registry aggregating every process's files (plus the queue gauges with a DSN)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
    if dsn:
        reg.register(_QueueCollector(dsn, engine_schema))
    return reg


def serve_metrics(
    port: int,
    dsn: str | None = None,
    engine_schema: str = ENGINE_SCHEMA_DEFAULT,
    addr: str = "127.0.0.1",
) -> Any:
    """Enable metrics (if not yet) and serve ``/metrics`` on ``port`` from a daemon thread."""
    from prometheus_client import start_http_server

    enable()
    server, _thread = start_http_server(port, addr=addr, registry=registry(dsn, engine_schema))
    logger.info("metrics on http://%s:%d/metrics", addr, port, extra={"event": "metrics.started"})
    return server
