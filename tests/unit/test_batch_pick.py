"""Which queued SQL step a batch takes next (pgdurable/worker/batch.py, ``BatchRunner.pick``)
for a batch: a step from any instance may join while the batch holds no instance's lock, and
only steps of the highest held one or higher once it holds one."""

from __future__ import annotations

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
