"""A claimed task and the other rows the worker reads, as named types (not positional
tuples): :class:`Task` (a ``claim`` row, built by psycopg's ``args_row``), and the step's
identity on its session (:func:`step_app_name`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class Task:
    """One leased task: a ``claim`` row (its columns in this order), then what this process
    learns while it runs the step."""

    instance_id: str
    node_id: str
    gen: int
    kind: str
    """``start`` (start the instance) or ``run`` (run the node)."""
    attempts: int
    role_oid: int
    database: str | None
    deadline: datetime | None
    clock: datetime
    version: int | None
    started: datetime | None = None
    """When this process began running the step (wall clock; df.explain timings)."""
    handoff: list[Task] = field(default_factory=list)
    handoff_ready: bool = False
    """Successors this step's checkpoint inserted already leased to us (run after commit)."""
    alone: bool = False
    """Run this SQL step in a transaction of its own (a batch it was in rolled back)."""
    virtual: bool = False
    """A SQL step run in the batch of the step before it (:mod:`.chain`): its task row was
    never written, so its checkpoint fences nothing of its own (its predecessor's does)."""

    @property
    def key(self) -> tuple[str, str]:
        """(instance, node): what the worker tracks a running step by."""
        return (self.instance_id, self.node_id)


def step_app_name(task: Task) -> str:
    """The ``application_name`` of a step's transaction, ``pgdurable:<instance>:<node>``: what
    a DBA finds a step's backend by in pg_stat_activity (docs/operating.md). Both ids are
    8 hex digits when df.start wrote them; rows written by hand may hold anything, so only
    ASCII letters, digits, ``_`` and ``-`` pass (others become ``?``) and each part is cut to
    24 characters: within NAMEDATALEN (63 bytes), nothing a terminal would interpret."""

    def clean(text: str) -> str:
        return _APP_NAME_UNSAFE.sub("?", text[:24])

    return f"pgdurable:{clean(task.instance_id)}:{clean(task.node_id)}"


_APP_NAME_UNSAFE = re.compile(r"[^0-9A-Za-z_-]")
