"""flow.acquire: an instance's lock within a deadline (pgdurable/worker/flow.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pgdurable.worker.flow import LockBusy, acquire


def ctx() -> SimpleNamespace:
    return SimpleNamespace(instance_id="abcd1234", lock=asyncio.Lock())


def test_a_free_lock_is_taken_at_once_without_a_turn_of_the_loop():
    async def go() -> list[str]:
        c, order = ctx(), []
        asyncio.get_running_loop().call_soon(order.append, "loop turned")
        await acquire(c, 5)  # type: ignore[arg-type]
        assert c.lock.locked()
        return list(order)  # what ran before the lock was ours

    # wait_for took the lock in a task of its own, after at least one turn of the loop
    assert asyncio.run(go()) == []


def test_a_held_lock_raises_lock_busy_after_the_deadline_and_is_not_taken():
    async def go() -> None:
        c = ctx()
        await c.lock.acquire()
        with pytest.raises(LockBusy, match="instance abcd1234 stayed busy"):
            await acquire(c, 0.05)  # type: ignore[arg-type]
        c.lock.release()
        assert not c.lock.locked()  # the timed-out acquire left nothing behind

    asyncio.run(go())


def test_a_lock_released_before_the_deadline_is_taken():
    async def go() -> None:
        c = ctx()
        await c.lock.acquire()
        asyncio.get_running_loop().call_later(0.02, c.lock.release)
        await acquire(c, 5)  # type: ignore[arg-type]
        assert c.lock.locked()

    asyncio.run(go())
