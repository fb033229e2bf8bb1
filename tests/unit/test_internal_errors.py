"""Unit tests of how the worker tells failures a retry may fix from deterministic ones
(pgdurable.worker.failures.failure_kind) and the error it stores for the latter."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import psycopg
import psycopg.errors as pe
import psycopg_pool
import pytest

from pgdurable.errors import ResultTooLarge
from pgdurable.worker.failures import DATA, INTERNAL, MAX_ATTEMPTS, RETRY
from pgdurable.worker.failures import failure_kind as _failure_kind
from pgdurable.worker.failures import failure_reason as _failure_reason
from pgdurable.worker.flow import Busy
from pgdurable.worker.flow import LockBusy as _LockBusy
from pgdurable.worker.task import Task


def _pg(cls: type[psycopg.Error], sqlstate: str | None) -> psycopg.Error:
    """An instance of a psycopg error class as the server would raise it (its SQLSTATE)."""
    sub = type(cls.__name__, (cls,), {"sqlstate": sqlstate})
    return sub("from the server")


@pytest.mark.parametrize(
    "exc",
    [
        _pg(psycopg.OperationalError, None),  # connection lost
        _pg(pe.ConnectionFailure, "08006"),
        _pg(pe.SerializationFailure, "40001"),
        _pg(pe.DeadlockDetected, "40P01"),
        _pg(pe.LockNotAvailable, "55P03"),
        _pg(pe.QueryCanceled, "57014"),
        _pg(pe.AdminShutdown, "57P01"),
        _pg(pe.TooManyConnections, "53300"),
        _pg(pe.InsufficientPrivilege, "42501"),  # an operator may fix a revoked grant
        psycopg.InterfaceError("the connection is closed"),
        psycopg_pool.PoolTimeout("couldn't get a connection after 30 sec"),
        _LockBusy("instance x stayed busy"),
        Busy(),
        TimeoutError(),
        ConnectionResetError("reset by peer"),
        MemoryError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert _failure_kind(exc) == RETRY


@pytest.mark.parametrize(
    "exc",
    [
        _pg(pe.IntervalFieldOverflow, "22015"),
        _pg(pe.NumericValueOutOfRange, "22003"),
        _pg(pe.ProgramLimitExceeded, "54000"),
        ResultTooLarge("the checkpoint of this step would carry 70000000 bytes"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_data_refused_by_postgresql_is_final(exc: BaseException) -> None:
    assert _failure_kind(exc) == DATA


@pytest.mark.parametrize(
    "exc",
    [
        TypeError("Integer exceeds 64-bit range"),
        TypeError("'>' not supported between instances of 'str' and 'int'"),
        ValueError("x"),
        KeyError("result_name"),
        AttributeError("'list' object has no attribute 'get'"),
        IndexError("list index out of range"),
        AssertionError(),
        OverflowError("date value out of range"),
        RecursionError(),
        ZeroDivisionError(),
        RuntimeError("x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_our_own_exceptions_are_internal_and_final(exc: BaseException) -> None:
    assert _failure_kind(exc) == INTERNAL


def test_everything_is_retried_while_shutting_down() -> None:
    # a draining worker's failures may be caused by the shutdown itself
    assert _failure_kind(TypeError("x"), stopping=True) == RETRY
    assert _failure_kind(_pg(pe.NumericValueOutOfRange, "22003"), stopping=True) == RETRY


def test_cancellation_is_not_a_failure_kind() -> None:
    # _handle re-raises CancelledError before classifying; it is a BaseException, not ours
    assert not isinstance(asyncio.CancelledError(), Exception)


def _task(kind: str = "run", attempts: int = 1) -> Task:
    now = datetime.now(UTC)
    return Task("abcd1234", "load_rows", 0, kind, attempts, 10, None, None, now, 1)


def test_internal_reason_names_the_node_and_says_internal() -> None:
    msg = _failure_reason(_task(), TypeError("Integer exceeds 64-bit range"), INTERNAL)
    assert msg.startswith(
        "internal error in pgdurable while running node 'load_rows': "
        "TypeError: Integer exceeds 64-bit range"
    )
    assert "not retried" in msg
    start = _failure_reason(_task("start"), KeyError("x"), INTERNAL)
    assert start.startswith(
        "internal error in pgdurable while starting the instance (node 'load_rows'): KeyError: 'x'"
    )


def test_other_reasons() -> None:
    data = _failure_reason(_task(), _pg(pe.IntervalFieldOverflow, "22015"), DATA)
    assert data.startswith("step failed: from the server")
    assert "not retried" in data
    gone = _failure_reason(_task(attempts=MAX_ATTEMPTS), _pg(pe.AdminShutdown, "57P01"), RETRY)
    assert gone == (f"step abandoned after {MAX_ATTEMPTS} attempts; last error: from the server")
