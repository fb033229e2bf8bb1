"""The libpq-level path of a batch's later steps (pgdurable/worker/wire.py), against a real
server: parameters as text (arrays of any text), errors as psycopg's own with the session
usable after them, one pipeline whose ``set local statement_timeout`` holds for the command
after it only, and a connection never left in pipeline mode."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pgdurable.worker import wire

pytestmark = pytest.mark.timeout(60)

HOSTILE = [
    "",
    "plain",
    'a "quoted" word',
    "back\\slash",
    "\\",
    '\\"',
    "comma, and {braces}",
    "NULL",
    " leading and trailing ",
    "über ☃",
    "new\nline",
]


def test_dollar_numbers_placeholders_in_order_and_keeps_literal_percent():
    assert wire.dollar(b"select %s, %s::int, '%%' || %s") == b"select $1, $2::int, '%' || $3"
    assert wire.dollar(b"select 1") == b"select 1"


def test_a_simple_query_runs_its_statements_until_one_fails(db):
    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            await wire.simple(conn, b"create temp table w(x int); insert into w values (1)")
            with pytest.raises(psycopg.errors.DivisionByZero):
                await wire.simple(
                    conn, b"insert into w values (2); select 1/0; insert into w values (3)"
                )
            cur = await conn.execute("select array_agg(x order by x) from w")
            assert await cur.fetchone() == ([1],)  # the failing query's statements rolled back

    asyncio.run(go())


async def _rows(dsn: str, commands: list[wire.Command]) -> list[tuple[str | None]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await wire.rows(conn, commands)


def test_arrays_read_as_text_go_back_as_they_came(db):
    """A batch reads the role's settings (text[]) as text and sends that text back as each
    later step's parameter: any text survives the round trip."""

    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            cur = await conn.execute("select %s::text[], '{}'::text[]", (HOSTILE,))
            assert await cur.fetchone() == (HOSTILE, [])
            got = await wire.results(
                conn, [(b"select $1::pg_catalog.text[], '{}'::pg_catalog.text[]", (None,))]
            )
            assert wire.value(conn, got[0], 0) is None  # NULL stays None
            arr = await wire.results(conn, [(b"select $1::text[]", (None,))])
            assert wire.value(conn, arr[0], 0) is None
            cur = await conn.execute("select %s::text[]::text", (HOSTILE,))
            row = await cur.fetchone()
            assert row is not None
            as_text = row[0]
            back = await wire.rows(
                conn, [(b"select pg_catalog.unnest($1::pg_catalog.text[])", (as_text.encode(),))]
            )
            assert [r[0] for r in back] == HOSTILE

    asyncio.run(go())


def test_rows_are_text_and_null_stays_none(db):
    got = asyncio.run(
        _rows(db.dsn, [(b"select x from (values ($1::text), ($2::text)) v(x)", (b"a", None))])
    )
    assert got == [("a",), (None,)]
    got = asyncio.run(
        _rows(
            db.dsn,
            [
                (
                    b"select x::text from (values ($1::text), (null), ('{}'::json::text)) v(x)",
                    (b"a",),
                )
            ],
        )
    )
    assert got == [("a",), (None,), ("{}",)]


def test_an_error_is_psycopgs_with_its_sqlstate_and_the_session_goes_on(db):
    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            await conn.execute("begin")
            with pytest.raises(psycopg.errors.DivisionByZero) as err:
                await wire.rows(
                    conn,
                    [
                        (b"savepoint s", ()),
                        (b"select 1 / $1::int", (b"0",)),
                        (b"select 'not reached'", ()),
                    ],
                )
            assert err.value.sqlstate == "22012"
            assert "division by zero" in str(err.value)
            # the pipeline was read to its end: the session takes the next statement
            assert conn.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
            await conn.execute("rollback to savepoint s")
            cur = await conn.execute("select 42")
            assert await cur.fetchone() == (42,)
            await conn.execute("rollback")
            # one command alone fails the same way
            with pytest.raises(psycopg.errors.UndefinedTable):
                await wire.rows(conn, [(b"select * from no_such_table_here", ())])
            assert (await (await conn.execute("select 1")).fetchone()) == (1,)

    asyncio.run(go())


def test_a_set_local_timeout_in_the_pipeline_holds_for_the_next_command(db):
    """As sent on its own: PostgreSQL arms statement_timeout afresh for each command of a
    pipeline, with the value in force when the command arrives."""

    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            await conn.execute("begin")
            with pytest.raises(psycopg.errors.QueryCanceled) as err:
                await wire.rows(
                    conn,
                    [
                        (b"savepoint s", ()),
                        (b"set local statement_timeout = 50", ()),
                        (b"select pg_catalog.pg_sleep(0.5)::text", ()),
                    ],
                )
            assert "statement timeout" in str(err.value)
            await conn.execute("rollback to savepoint s")
            # without the limit, the same statement runs its half second
            got = await wire.rows(
                conn, [(b"savepoint s", ()), (b"select pg_catalog.pg_sleep(0.3)::text", ())]
            )
            assert got == [("",)]
            await conn.execute("rollback")

    asyncio.run(go())


def test_a_cancelled_wait_leaves_no_connection_in_pipeline_mode(db):
    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            task = asyncio.create_task(
                wire.rows(conn, [(b"select 1", ()), (b"select pg_catalog.pg_sleep(5)::text", ())])
            )
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises((asyncio.CancelledError, psycopg.Error)):
                await task
            # either out of pipeline mode and usable, or closed (the pool replaces it)
            if not conn.closed:
                assert conn.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
                assert (await (await conn.execute("select 7")).fetchone()) == (7,)

    asyncio.run(go())


def test_the_checkpoint_call_literals_read_back_as_the_values(db):
    """``_apply_v2``'s arguments are sent as literals (pgdurable/worker/checkpoint_set.py):
    text arrays of any text (NULL elements too), integers, bytea of any bytes; both paths
    (libpq level on a step connection, psycopg's untyped text elsewhere) store the values."""
    from pgdurable.worker.checkpoint_set import (
        bytea_array,
        int_array,
        psycopg_args,
        text_array,
    )

    blobs = [b"", b"\x00\x01\xff", bytes(range(256)), b'"\\{},']
    ints = [0, -1, 2**62, -(2**62)]
    cases: list[list[str | None]] = [[*HOSTILE, None], HOSTILE, ["only"], [], [None]]

    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            await conn.execute(
                "create temp table lit (n int, t pg_catalog.text[], v pg_catalog.varchar[], "
                "i pg_catalog.int8[], b pg_catalog.bytea[])"
            )
            for n, items in enumerate(cases):
                args = [text_array(items), int_array(ints), bytea_array(blobs)]
                await wire.results(
                    conn,
                    [
                        (
                            b"insert into lit values ($1, $2, $3, $4, $5)",
                            [b"%d" % n, args[0], *args],
                        )
                    ],
                )
                await conn.execute(
                    "insert into lit values (%s, %s, %s, %s, %s)",
                    (100 + n, *psycopg_args([args[0], args[0], args[1], args[2]])),
                )
            cur = await conn.execute("select n, t, v, i, b from lit order by n")
            got = await cur.fetchall()
        want = [(n, c, c, ints, blobs) for n, c in enumerate(cases)]
        want += [(100 + n, c, c, ints, blobs) for n, c in enumerate(cases)]
        assert got == want

    asyncio.run(go())


def test_an_integer_array_reads_as_a_list():
    assert wire.int_array("{1,-2,3}") == [1, -2, 3]
    assert wire.int_array("{}") == []
    assert wire.int_array(None) is None
