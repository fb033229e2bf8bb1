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
from typing import Any

import psycopg
from psycopg import errors as e
from psycopg import generators, pq
from psycopg.abc import PQGen
from psycopg.waiting import READY_R, WAIT_R, WAIT_RW

Params = Sequence[bytes | None]
Command = tuple[bytes, Params]

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


def text_array(items: Sequence[str]) -> bytes:
    """A ``text[]`` literal of ``items``, every element quoted (any text is safe in it)."""
    quoted = (
        '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items
    )  # PostgreSQL's array syntax: backslash escapes inside double quotes
    return ("{" + ",".join(quoted) + "}").encode()


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


async def rows(
    conn: psycopg.AsyncConnection[Any], commands: Sequence[Command]
) -> list[tuple[str | None]]:
    """Run ``commands`` (each a statement with ``$n`` placeholders and its text parameters)
    on ``conn`` in one round trip; the first column of the last command's rows, as text.
    The first command that fails raises its error (the others after it did not run)."""
    pgconn = conn.pgconn
    async with conn.lock:
        if conn.closed:
            raise e.OperationalError("the connection is closed")
        if len(commands) == 1:
            query, params = commands[0]
            pgconn.send_query_params(query, params)
            got = [await conn.wait(generators.execute(pgconn))]
        else:
            pgconn.enter_pipeline_mode()
            try:
                for query, params in commands:
                    pgconn.send_query_params(query, params)
                pgconn.pipeline_sync()
                got = await conn.wait(_pipeline(pgconn))
            finally:
                _leave_pipeline(conn)
    encoding = conn.info.encoding
    for results in got:
        for res in results:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                raise e.error_from_result(res, encoding=encoding)
    last = got[-1][-1] if got and got[-1] else None
    if last is None or last.status != pq.ExecStatus.TUPLES_OK:
        return []
    return [
        (None if (v := last.get_value(i, 0)) is None else v.decode(encoding),)
        for i in range(last.ntuples)
    ]


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
