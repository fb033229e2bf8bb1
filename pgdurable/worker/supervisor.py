"""The ``pgdurable serve`` parent: install the schema, fork workers, keep them alive.

- forks N worker processes (each builds its own pool after fork);
- restarts a worker that dies, with exponential backoff (capped) so a crash loop
  cannot spin;
- SIGTERM/SIGINT: forwards SIGTERM (workers drain: finish or release claimed work),
  waits up to a grace period, SIGKILLs stragglers, exits 0;
- SIGHUP: forwarded, workers reload settings at once (they re-read the deployment-wide
  pg_durable.* settings every maintenance round anyway);
- heartbeats a supervisor row in ``<engine>.workers``;
- a worker whose supervisor dies (kill -9) drains and exits by itself (:func:`_watch_parent`);
- with ``--ui-port``, runs the web dashboard (pgdurable/ui) in one more child, restarted
  and stopped like the workers (:func:`_fork_ui`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid

import psycopg

from pgdurable import __version__, metrics
from pgdurable.config import ServeConfig
from pgdurable.queries import q

logger = logging.getLogger(__name__)

# Restart backoff for a worker that keeps dying: 0.5 s doubling to 30 s, reset after a
# worker has stayed up for a minute.
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 60.0
# How long SIGTERM waits for workers to drain before SIGKILL.
DRAIN_GRACE = 40.0
# How often a worker checks that its supervisor is still its parent.
ORPHAN_POLL = 0.5


def _watch_parent(parent: int) -> None:
    """In a worker: drain and exit once the supervisor that forked it is gone (kill -9).

    Runs as a daemon thread started right after fork, so it knows the real parent even when
    the supervisor dies while the worker is still starting (importing, opening its pool
    against a restarting database, up to a minute): a check made later, against whatever
    ``getppid()`` says by then, would take init for the parent and never fire — such a
    worker ran on unsupervised with its pool open, one more after every supervisor kill,
    until the server ran out of connections. SIGTERM is the worker's drain (bounded by the
    lease); a worker still alive after the supervisor's own drain grace exits hard, as the
    supervisor would have SIGKILLed it.
    """
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL)
    logger.warning(
        "supervisor %d is gone; worker %d stops",
        parent,
        os.getpid(),
        extra={"event": "worker.orphaned"},
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(DRAIN_GRACE)
    logger.error(
        "orphaned worker %d still running after %.0fs; exiting",
        os.getpid(),
        DRAIN_GRACE,
        extra={"event": "worker.orphan_killed"},
    )
    os._exit(1)


def _fork_worker(config: ServeConfig) -> int:
    # imported before the fork, once: every worker then starts with the supervisor's modules
    # (no import of its own after fork, and the same package version as its supervisor even
    # when another was installed on disk meanwhile)
    from .process import run_worker

    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop handles it
            threading.Thread(
                target=_watch_parent, args=(parent,), daemon=True, name="pgdurable-parent-watch"
            ).start()
            run_worker(config)
        except BaseException:
            logger.exception("worker crashed")
            code = 1
        finally:
            os._exit(code)
    return pid


def _fork_ui(config: ServeConfig) -> int:
    """The web dashboard (``--ui-port``) in a child of its own, supervised like a worker:
    restarted when it dies, SIGTERM on drain, gone with the supervisor (uvicorn's own
    SIGTERM handler stops it)."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            threading.Thread(
                target=_watch_parent, args=(parent,), daemon=True, name="pgdurable-parent-watch"
            ).start()
            from pgdurable.ui.app import from_serve, serve_forever

            serve_forever(from_serve(config))
        except BaseException:
            logger.exception("dashboard crashed")
            code = 1
        finally:
            os._exit(code)
    return pid


def supervise(config: ServeConfig) -> int:
    """Run until SIGTERM; returns the exit code."""
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    # one slot per worker, and the last for the dashboard (--ui-port)
    ui_slot = config.workers
    backoff = [BACKOFF_START] * (config.workers + 1)

    def fork(slot: int) -> int:
        return _fork_ui(config) if slot == ui_slot else _fork_worker(config)

    def on_hup(signum: int, frame: object) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    if config.metrics_port is not None:  # before the first fork (multiprocess mode)
        metrics.serve_metrics(
            config.metrics_port, config.dsn, config.engine_schema, addr=config.metrics_host
        )
    for slot in range(config.workers):
        children[_fork_worker(config)] = (slot, time.monotonic())
    if config.ui_port is not None:
        children[_fork_ui(config)] = (ui_slot, time.monotonic())
        logger.info(
            "dashboard on http://%s:%d/",
            config.ui_host,
            config.ui_port,
            extra={"event": "supervisor.ui_started"},
        )
    logger.info(
        "supervisor %d started %d workers",
        os.getpid(),
        config.workers,
        extra={"event": "supervisor.started"},
    )
    sup_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    last_beat = 0.0
    while not stopping:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        if pid and pid in children:
            slot, started = children.pop(pid)
            up = time.monotonic() - started
            if up > BACKOFF_RESET_AFTER:
                backoff[slot] = BACKOFF_START
            logger.warning(
                "worker %d exited (status %d) after %.1fs; restarting in %.1fs",
                pid,
                status,
                up,
                backoff[slot],
                extra={"event": "worker.died"},
            )
            deadline = time.monotonic() + backoff[slot]
            while time.monotonic() < deadline and not stopping:
                time.sleep(0.05)
            backoff[slot] = min(backoff[slot] * 2, BACKOFF_MAX)
            if not stopping:
                children[fork(slot)] = (slot, time.monotonic())
                if slot != ui_slot:
                    metrics.worker_restarted()
            continue
        if time.monotonic() - last_beat > config.maintenance_interval:
            last_beat = time.monotonic()
            try:
                with psycopg.connect(
                    config.dsn,
                    autocommit=True,
                    connect_timeout=3,
                    application_name="pgdurable supervisor",
                ) as conn:
                    conn.execute(
                        q("heartbeat", config.engine_schema),
                        (
                            sup_id,
                            "supervisor",
                            socket.gethostname(),
                            os.getpid(),
                            __version__,
                            sum(1 for s, _ in children.values() if s != ui_slot),
                        ),
                    )
            except psycopg.Error as exc:
                logger.warning("supervisor heartbeat failed: %s", exc)
        time.sleep(0.1)
    logger.info(
        "supervisor draining %d workers", len(children), extra={"event": "supervisor.draining"}
    )
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DRAIN_GRACE
    while children and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    logger.info("supervisor stopped", extra={"event": "supervisor.stopped"})
    return 0
