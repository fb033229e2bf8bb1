"""The group commit (pgdurable/worker/completer.py) against a real database: outcomes share
transactions and each submitter returns once its own is committed; one outcome's error fails
that outcome alone (its neighbours commit on a retry one by one); a fenced outcome is dropped
alone; a busy one is applied again after the commit."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgdurable.worker.completer import Completer
from pgdurable.worker.flow import Busy, Fenced

from .inproc import rows

pytestmark = pytest.mark.timeout(60)

Conn = psycopg.AsyncConnection[Any]


@pytest.fixture
def table(db: Any) -> str:
    with db.connect() as conn:
        conn.execute("create table public.outcomes (k int primary key, tx bigint)")
    return "public.outcomes"


def insert(k: int) -> Any:
    async def apply(conn: Conn) -> None:
        await conn.execute(
            "insert into public.outcomes values (%s, pg_catalog.txid_current())", (k,)
        )

    return apply


async def with_completer(db: Any, body: Any) -> Any:
    async with AsyncConnectionPool(db.dsn, min_size=1, max_size=2, open=False) as pool:
        await pool.open(wait=True)
        completer = Completer(pool, Fenced)
        completer.start()
        try:
            return await body(completer)
        finally:
            await completer.stop()


def test_outcomes_share_commits_and_are_acknowledged_after_theirs(db, table):
    seen: list[int] = []

    async def body(c: Completer) -> None:
        async def one(k: int) -> None:
            await c.submit(f"{k:04d}", insert(k))
            # acknowledged after commit: another session sees it now
            async with await psycopg.AsyncConnection.connect(db.dsn) as other:
                cur = await other.execute("select count(*) from public.outcomes where k = %s", (k,))
                seen.append((await cur.fetchone())[0])

        await asyncio.gather(*(one(k) for k in range(40)))
        assert c.items == 40
        assert c.batches < 40

    asyncio.run(with_completer(db, body))
    assert seen == [1] * 40
    [(count, txs)] = rows(db, "select count(*), count(distinct tx) from public.outcomes")
    assert count == 40
    assert txs < 40


def test_one_outcome_error_fails_it_alone(db, table):
    rolled_back: list[int] = []

    async def body(c: Completer) -> list[Any]:
        async def boom(conn: Conn) -> None:
            await conn.execute("select 1/0")

        async def submit(k: int) -> None:
            await c.submit(f"{k:04d}", boom if k == 5 else insert(k), lambda: rolled_back.append(k))

        return await asyncio.gather(*(submit(k) for k in range(10)), return_exceptions=True)

    results = asyncio.run(with_completer(db, body))
    assert isinstance(results[5], psycopg.errors.DivisionByZero)
    assert [r for i, r in enumerate(results) if i != 5] == [None] * 9
    assert rows(db, "select k from public.outcomes order by k") == [
        (k,) for k in range(10) if k != 5
    ]
    assert 5 in rolled_back  # told its in-memory state is not the database's


def test_a_fenced_outcome_is_dropped_alone_and_a_busy_one_retried(db, table):
    tries: list[int] = []

    async def body(c: Completer) -> list[Any]:
        async def fenced(conn: Conn) -> None:
            raise Fenced()

        async def busy_once(conn: Conn) -> None:
            tries.append(1)
            if len(tries) == 1:
                raise Busy()
            await insert(99)(conn)

        return await asyncio.gather(
            c.submit("0001", insert(1)),
            c.submit("0002", fenced),
            c.submit("0003", busy_once),
            c.submit("0004", insert(4)),
            return_exceptions=True,
        )

    results = asyncio.run(with_completer(db, body))
    assert results[0] is None
    assert isinstance(results[1], Fenced)
    assert results[2:] == [None, None]
    assert len(tries) == 2
    assert rows(db, "select k from public.outcomes order by k") == [(1,), (4,), (99,)]
