"""Failure classification: when a step's handling fails for a reason that is not the step's
own outcome, is it worth another attempt (RETRY) or does it fail now (DATA, INTERNAL), and
what error is stored for it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg

from pgdurable.errors import StepError

from .flow import Busy, LockBusy

if TYPE_CHECKING:
    from .task import Task

# A step whose handling keeps failing for reasons that are not the step's own (our
# checkpoint, the database going away) is retried; after this many claims it is failed
# with the last error instead of looping forever ("poison" step).
MAX_ATTEMPTS = 10
# SQLSTATE classes of an error in the worker's own statements (a checkpoint) that the same
# input raises every time: data exceptions (an interval or timestamp out of range, …) and
# program limits. Retrying cannot help; the step fails at once.
DETERMINISTIC_SQLSTATE_CLASSES = ("22", "54")
# What a failure that is not the step's own outcome calls for (see failure_kind): another
# attempt, or failing the step now (PostgreSQL refused our data; a bug of ours).
RETRY, DATA, INTERNAL = "retry", "data", "internal"


def failure_kind(exc: BaseException, *, stopping: bool = False) -> str:
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
    if isinstance(exc, LockBusy | Busy | TimeoutError | OSError | MemoryError):
        return RETRY
    return INTERNAL


def deterministic(exc: BaseException) -> bool:
    """Would the same step fail the same way again? (see :func:`failure_kind`)"""
    return failure_kind(exc) != RETRY


def where(task: Task) -> str:
    """What the worker was doing with ``task``, for an error text."""
    return (
        f"starting the instance (node {task.node_id!r})"
        if task.kind == "start"
        else f"running node {task.node_id!r}"
    )


def failure_reason(task: Task, exc: BaseException, kind: str) -> str:
    """The error stored for a step that failed for a reason not its own."""
    if kind == INTERNAL:
        return (
            f"internal error in pgdurable while {where(task)}: {type(exc).__name__}: {exc} "
            "(a bug in pgdurable, not in the step: it would fail the same way again, so "
            "it was not retried; the worker's log has the traceback)"
        )
    if kind == DATA:
        return f"step failed: {exc} (the same input fails the same way: not retried)"
    return f"step abandoned after {task.attempts} attempts; last error: {exc}"


def pg_message(exc: psycopg.Error) -> str:
    """The primary message of a PostgreSQL error (what a step's failure stores); the step
    runner's result cap says how to raise it, as the worker's own check does."""
    diag = exc.diag
    msg = diag.message_primary or str(exc).strip()
    if exc.sqlstate == "54000" and "--result-max-bytes" in (diag.message_hint or ""):
        msg += "; raise pgdurable serve --result-max-bytes (PGDURABLE_RESULT_MAX_BYTES) to allow it"
    return msg
