"""A worker's task (pgdurable/worker/task.py) as the unit tests make one: only its ids and
whether it is a chained step's (virtual) matter to them."""

from __future__ import annotations

import dataclasses

from pgdurable.worker.task import Task


def task(instance_id: str, node_id: str, virtual: bool = False) -> Task:
    t = Task(
        instance_id=instance_id,
        node_id=node_id,
        gen=0,
        kind="node",
        attempts=0,
        role_oid=1,
        database=None,
        deadline=None,
        clock=None,
        version=None,
    )  # type: ignore[arg-type]
    return dataclasses.replace(t, virtual=virtual) if virtual else t
