"""A step connection's per-step statements sent at libpq level: no cursor, no adaptation, and
a chained step's savepoint in the same round trip as its statement (docs/performance.md,
"Session 8").

psycopg's cursor path (query conversion, dumpers, the prepare manager, loaders) was most of
a worker's CPU per step once a step became one statement. A batch's later steps send the same
statement with text parameters and read one text column back, so they take this path: the
statement's text is converted to ``$n`` placeholders once, the parameters are sent as text,
and the rows come back as the text PostgreSQL sent. Several commands go as one libpq pipeline
(one send, one wait): PostgreSQL arms statement_timeout afresh for each command of it, so a
``set local statement_timeout`` before a statement holds for that statement, as it does when
sent on its own. Errors are psycopg's own exceptions (SQLSTATE, diagnostics), raised once the
whole pipeline has been read, so the session stays usable (a rollback to the savepoint).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import errors as e
from psycopg import generators, pq
from psycopg.abc import PQGen
from psycopg.waiting import READY_R, WAIT_R, WAIT_RW

Params = Sequence[bytes | None]


class Parse(NamedTuple):
    """A pipeline command that prepares ``query`` (``$n`` placeholders) as the statement
    ``name`` on the session (its params are ignored): a step session's statements live
    for one batch (:class:`~pgdurable.worker.wave.Statements` says why that is safe)."""

    name: bytes
    query: bytes


class Prepared(NamedTuple):
    """A pipeline command that runs the statement ``name`` prepared by a :class:`Parse`."""

    name: bytes


Command = tuple[bytes | Parse | Prepared, Params]

_PLACEHOLDER = re.compile(rb"%%|%s")


def dollar(query: bytes) -> bytes:
    """``%s`` placeholders as ``$1, $2, …`` (``%%`` as ``%``), for a statement of ours."""
    n = 0

    def sub(m: re.Match[bytes]) -> bytes:
        nonlocal n
        if m.group(0) == b"%%":
            return b"%"
        n += 1
        return b"$%d" % n

    return _PLACEHOLDER.sub(sub, query)


def param(value: Any) -> bytes | None:
    """A parameter as text: None as NULL, str and int as themselves."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _pipeline(pgconn: pq.abc.PGconn) -> PQGen[list[list[pq.abc.PGresult]]]:
    """Send what the pipeline holds and read every command's results up to its sync."""
    while pgconn.flush():
        ready = yield WAIT_RW
        if ready & READY_R:
            pgconn.consume_input()
    results: list[list[pq.abc.PGresult]] = []
    res: list[pq.abc.PGresult] = []
    while True:
        while pgconn.is_busy():
            yield WAIT_R
            pgconn.consume_input()
        r = pgconn.get_result()
        if r is None:
            results.append(res)
            res = []
        elif r.status == pq.ExecStatus.PIPELINE_SYNC:
            return results
        else:
            res.append(r)


async def results(
    conn: psycopg.AsyncConnection[Any], commands: Sequence[Command]
) -> list[pq.abc.PGresult | None]:
    """Run ``commands`` (each a statement with ``$n`` placeholders and its text parameters)
    on ``conn`` in one round trip; each command's (last) result. The first command that
    fails raises its error (the others after it did not run)."""
    got = await pipeline(conn, commands)
    raise_first_error(conn, got)
    return [r[-1] if r else None for r in got]


async def pipeline(
    conn: psycopg.AsyncConnection[Any], commands: Sequence[Command]
) -> list[list[pq.abc.PGresult]]:
    """Run ``commands`` in one round trip and return every command's results, failed ones
    included (:func:`error`): after a command fails, PostgreSQL skips the rest up to the
    sync, and each of those reads as ``PIPELINE_ABORTED`` (:func:`skipped`). Raises only
    when the connection fails."""
    pgconn = conn.pgconn
    async with conn.lock:
        if conn.closed:
            raise e.OperationalError("the connection is closed")
        query, params = commands[0]
        if len(commands) == 1 and isinstance(query, bytes):
            pgconn.send_query_params(query, params)
            got = [await conn.wait(generators.execute(pgconn))]
        else:
            pgconn.enter_pipeline_mode()
            try:
                for query, params in commands:
                    if isinstance(query, bytes):
                        pgconn.send_query_params(query, params)
                    elif isinstance(query, Prepared):
                        pgconn.send_query_prepared(query.name, params)
                    else:
                        pgconn.send_prepare(query.name, query.query)
                pgconn.pipeline_sync()
                got = await conn.wait(_pipeline(pgconn))
            finally:
                _leave_pipeline(conn)
    return got


def error(
    conn: psycopg.AsyncConnection[Any], got: Sequence[pq.abc.PGresult]
) -> psycopg.Error | None:
    """A command's error, as psycopg raises it (None: it did not fail)."""
    for res in got:
        if res.status == pq.ExecStatus.FATAL_ERROR:
            return e.error_from_result(res, encoding=conn.info.encoding)
    return None


def skipped(got: Sequence[pq.abc.PGresult]) -> bool:
    """Whether a command of a pipeline did not run: an earlier one failed."""
    return any(res.status == pq.ExecStatus.PIPELINE_ABORTED for res in got)


async def rows(
    conn: psycopg.AsyncConnection[Any], commands: Sequence[Command]
) -> list[tuple[str | None]]:
    """:func:`results`, then the first column of the last command's rows, as text."""
    return column(conn, (await results(conn, commands))[-1])


def column(
    conn: psycopg.AsyncConnection[Any], res: pq.abc.PGresult | None
) -> list[tuple[str | None]]:
    """The first column of a result's rows, as text (NULL as None)."""
    if res is None or res.status != pq.ExecStatus.TUPLES_OK:
        return []
    encoding = conn.info.encoding
    return [
        (None if (v := res.get_value(i, 0)) is None else v.decode(encoding),)
        for i in range(res.ntuples)
    ]


def value(conn: psycopg.AsyncConnection[Any], res: pq.abc.PGresult | None, col: int) -> str | None:
    """One value of a result's first row, as text (None: NULL, or no row)."""
    if res is None or res.ntuples == 0:
        return None
    v = res.get_value(0, col)
    return None if v is None else v.decode(conn.info.encoding)


def int_array(text: str | None) -> list[int] | None:
    """An integer array's text (``{1,-2}``) as a list (None: NULL)."""
    if text is None:
        return None
    inner = text[1:-1]
    return [int(x) for x in inner.split(",")] if inner else []


async def simple(conn: psycopg.AsyncConnection[Any], query: bytes) -> None:
    """One simple query (its statements run in turn, up to the first that fails, which
    raises its error): COMMIT and the session reset, a rollback to a savepoint."""
    pgconn = conn.pgconn
    async with conn.lock:
        if conn.closed:
            raise e.OperationalError("the connection is closed")
        pgconn.send_query(query)
        got = await conn.wait(generators.execute(pgconn))
    raise_first_error(conn, [got])


def raise_first_error(
    conn: psycopg.AsyncConnection[Any], got: Sequence[Sequence[pq.abc.PGresult]]
) -> None:
    """Raise the error of the first of these commands that failed (each command's results)."""
    for res_list in got:
        if (err := error(conn, res_list)) is not None:
            raise err


def _leave_pipeline(conn: psycopg.AsyncConnection[Any]) -> None:
    """Out of pipeline mode; a connection stuck in it (interrupted mid-read) is closed, so
    that the pool replaces it rather than hand it out."""
    pgconn = conn.pgconn
    if pgconn.pipeline_status == pq.PipelineStatus.OFF:
        return
    try:
        pgconn.exit_pipeline_mode()
    except psycopg.Error:
        pgconn.finish()
