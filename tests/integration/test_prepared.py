"""Server-side prepared statements (pgdurable/worker/sessions.py): the service's connections
prepare the engine's statements (``prepare``, on by default; ``--no-prepare`` behind a pooler
that cannot keep them); a step session never holds one after its step (they run tenants'
code, and the session reset drops whatever a step prepared)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from .inproc import one, start, worker

pytestmark = pytest.mark.timeout(60)


async def prepared(pool: Any) -> list[str]:
    """The statements prepared on every connection the pool holds (all held at once)."""
    out: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(max(1, pool.get_stats()["pool_size"])):
            conn = await stack.enter_async_context(pool.connection())
            cur = await conn.execute(
                "select statement from pg_catalog.pg_prepared_statements "
                "where statement not like '%%pg_prepared_statements%%'"  # (this one)
            )
            out += [r[0] for r in await cur.fetchall()]
    return out


async def run_all(w: Any) -> None:
    for _ in range(10):
        tasks = await w.producer.claim(8)
        if not tasks:
            return
        for t in tasks:
            await w.dispatch.handle(t)


@pytest.mark.parametrize("prepare", [True, False])
def test_the_service_prepares_its_statements_and_step_sessions_never_keep_any(db, prepare):
    role = db.create_role("pp")
    iids = [
        start(db, role, "'prepare mine as select 1' ~> 'select 2 as b'"),
        start(db, role, "'select 3 as c'"),
    ]

    async def go() -> None:
        async with worker(db, prepare=prepare) as w:
            await run_all(w)
            service = await prepared(w.sessions.service)
            assert any("_claim_v2" in s for s in service) is prepare
            assert await prepared(w.sessions.steps) == []

    asyncio.run(go())
    for iid in iids:
        assert one(db, "select status from df.instances where id = %s", (iid,)) == "completed"
