"""Which queued SQL step a batch takes next (pgdurable/worker/batch.py, ``BatchRunner.pick``)
and when a step's checkpoint is computed early (``_stage_now``): a batch takes its instances'
locks in ascending order, so a step from any instance may join while no lock is held, and
only instances from the highest held one up once one is; a checkpoint is computed early only
at or below every instance left for the end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from pgdurable.worker.batch import BatchRunner


def runner(*queued: tuple[str, int]) -> BatchRunner:
    b = BatchRunner.__new__(BatchRunner)  # pick and _stage_now read the queue only
    b.queue = [
        SimpleNamespace(task=SimpleNamespace(instance_id=iid), ctx=SimpleNamespace(role_oid=role))
        for iid, role in queued
    ]  # type: ignore[misc]
    return b


def ids(items: list[Any]) -> list[str]:
    return [it.task.instance_id for it in items]


def test_with_no_lock_held_the_lowest_instance_of_the_role_from_anywhere():
    b = runner(("c", 1), ("a", 2), ("b", 1), ("d", 1))
    got = b.pick(None, 1)
    assert got is not None
    assert got.task.instance_id == "b"  # "a" is another role's
    assert ids(b.queue) == ["c", "a", "d"]


def test_once_a_lock_is_held_only_that_instance_or_higher():
    b = runner(("a", 1), ("c", 1), ("b", 1))
    got = b.pick("b", 1)
    assert got is not None
    assert got.task.instance_id == "b"
    got = b.pick("b", 1)
    assert got is not None
    assert got.task.instance_id == "c"
    assert b.pick("b", 1) is None  # "a" is below the held lock: the next batch takes it
    assert ids(b.queue) == ["a"]


def test_a_batchs_first_step_may_be_of_any_role():
    b = runner(("b", 1), ("a", 2))
    got = b.pick(None, None)
    assert got is not None
    assert got.task.instance_id == "a"


def test_an_early_checkpoint_only_at_or_below_the_instances_left_for_the_end(monkeypatch):
    import pgdurable.worker.batch as batch_mod

    monkeypatch.setattr(batch_mod, "chainable", lambda ctx, idx: True)
    b = runner()

    def item(iid: str) -> Any:
        ctx = SimpleNamespace(instance_id=iid, lock=asyncio.Lock())
        return SimpleNamespace(ctx=ctx, phase="", idx=0)

    assert b._stage_now(item("c"), {}, set())
    assert b._stage_now(item("b"), {}, {"c", "d"})
    assert not b._stage_now(item("d"), {}, {"c"})  # its lock before c's at the end: no
    assert not b._stage_now(item("c"), {}, {"c"})  # after a step of its own left for the end
