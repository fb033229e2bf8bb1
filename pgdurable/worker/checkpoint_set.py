"""Set-based checkpoints: the checkpoints a transaction makes, of any number of instances,
written by one ``_apply_v2`` call instead of one ``_apply_v1`` call per step
(docs/performance.md "The checkpoint").

A :class:`CheckpointSet` collects what :meth:`Checkpointer.apply` would have written, step by
step, while the caller holds each instance's lock (a batch of SQL steps holds them until its
COMMIT). The checkpoints of one instance merge into one element of the call (a :class:`Run`:
its first expected version, the last scheduler state, every task it consumes, the node
updates folded in order), unless two of them touch the same node or task in a way a fold
would change (a node updated with a status twice, a successor inserted then dropped): the
later one then goes into the next *round*, one more call in the same transaction once the
first has written. Each instance's in-memory state moves on as each checkpoint is staged
(its ``version`` too), as it did when every checkpoint was written at once; the caller writes
the set before it commits (:meth:`Checkpointer.flush`), which then hands off the successors.

This module knows how to fold and encode; what a code returned by the call means for the
step (stale: recompute; fenced; busy) is :mod:`.checkpoint`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from pgdurable.values import CHECKPOINT_MAX_BYTES, json_bytes

from .instance import Checkpoint, InstanceCtx, dump
from .task import Task

TERMINAL = ("completed", "failed", "cancelled")
# A call carries at most this many bytes of values (the rest goes in another call of the same
# round): each checkpoint is within CHECKPOINT_MAX_BYTES on its own, a set need not be.
CALL_MAX_BYTES = CHECKPOINT_MAX_BYTES


@dataclass(eq=False)
class Entry:
    """One staged checkpoint: what it wrote, and how to compute it again."""

    ctx: InstanceCtx
    fence: Task
    """The task it consumes; its successors leased to us go to ``fence.handoff``."""
    cp: Checkpoint
    version: int
    """The instance's state_version once this checkpoint is written."""
    redo: tuple[Task, int, Any] | None
    """(task, node index, outcome): computed again on a fresh state if the instance turns out
    stale; None when it cannot be (an instance's start with its first step)."""
    step_type: str | None = None
    """The node type whose step finished (metrics), None for a start."""
    ok: bool = True


@dataclass(eq=False)
class Run:
    """The staged checkpoints of one instance that one call writes together."""

    ctx: InstanceCtx
    expected: int
    entries: list[Entry] = field(default_factory=list)
    status: str | None = None
    state: bytes = b""
    fences: list[tuple[str, int]] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    named: dict[str, dict[str, Any]] = field(default_factory=dict)
    weight: int = 0

    def folds(self, fence: Task, cp: Checkpoint) -> bool:
        """Whether ``cp`` (the next checkpoint of this instance) folds into this run with the
        same effect as writing it after the run's: nothing it touches was touched before in
        a way whose order matters."""
        if self.status in TERMINAL:
            return False
        for nid, upd in cp.nodes.items():
            old = self.nodes.get(nid)
            if old is not None and not _folds_node(old, upd):
                return False
        drops = set(self.drops)
        if fence.node_id in self.tasks or fence.node_id in drops:
            return False
        for t in cp.new_tasks:
            if t["node_id"] in self.tasks or t["node_id"] in drops:
                return False
        return all(d not in self.tasks for d in cp.drop_tasks)

    def add(self, entry: Entry) -> None:
        cp = entry.cp
        iid = entry.ctx.instance_id
        self.entries.append(entry)
        self.state = dump(entry.ctx.sched.dump_state())
        if cp.inst_status is not None:
            self.status = cp.inst_status
        if not entry.fence.virtual:  # a chained step's task was never written
            self.fences.append((entry.fence.node_id, entry.fence.gen))
        self.drops.extend(cp.drop_tasks)
        for nid, upd in cp.nodes.items():
            old = self.nodes.get(nid)
            if old is None:
                upd["i"] = iid
                self.nodes[nid] = upd
            else:  # folds (_folds_node): the later status and result win, details merge
                if "status" in upd:
                    old["status"] = upd["status"]
                    old.pop("result", None)
                    if "result" in upd:
                        old["result"] = upd["result"]
                old["details"].update(upd["details"])
        for t in cp.new_tasks:
            t["i"] = iid
            self.tasks[t["node_id"]] = t
        for name, value in cp.named.items():
            self.named[name] = {"i": iid, "key": name, "value": value, "seq": entry.version}
        self.weight += cp.weight


def _folds_node(old: dict[str, Any], upd: dict[str, Any]) -> bool:
    """Whether node update ``upd`` merged into ``old`` (the same node's earlier update in the
    run) writes what applying both in order would (``_apply_v2``'s node update): details
    merge in order either way; a status sets the result (NULL unless completed or failed)
    from its own update alone, and a completed or failed one adds duration_ms from the
    details. So the later update may carry a status unless the earlier one finished the
    node (its duration_ms would be lost), e.g. a step activated (running) and completed in
    one batch; an earlier status followed by details alone does not fold."""
    if "status" in upd:
        return old.get("status") not in ("completed", "failed")
    return "status" not in old


@dataclass(eq=False)
class CheckpointSet:
    """The checkpoints one transaction stages; written by :meth:`Checkpointer.flush`."""

    rounds: dict[str, list[Run]] = field(default_factory=dict)
    """Instance id -> its runs, one per round, in order."""
    partial: bool = False
    """The group commit's: an instance that is fenced or busy fails its own checkpoints
    (:meth:`settle` raises), the others commit. Otherwise (a batch of SQL steps) it fails the
    whole transaction."""
    held: dict[int, asyncio.Lock] = field(default_factory=dict)
    """The instances' locks the transaction holds until it ends (by ``id``)."""
    errors: dict[int, BaseException] = field(default_factory=dict)
    """Partial: the outcome of a checkpoint that was not written, by ``id`` of its fence."""

    def __bool__(self) -> bool:
        return bool(self.rounds)

    def has(self, instance_id: str) -> bool:
        return instance_id in self.rounds

    def stage(self, ctx: InstanceCtx, fence: Task, cp: Checkpoint, entry: Entry) -> None:
        """Add a computed checkpoint (its instance's ``version`` already moved on)."""
        runs = self.rounds.setdefault(ctx.instance_id, [])
        if not runs or runs[-1].ctx is not ctx or not runs[-1].folds(fence, cp):
            runs.append(Run(ctx, entry.version - 1))
        runs[-1].add(entry)

    def entries(self, instance_id: str) -> list[Entry]:
        return [e for run in self.rounds.get(instance_id, ()) for e in run.entries]

    def take_round(self) -> list[Run]:
        """The first run of every instance (removed from the set), in instance order."""
        out = []
        for iid in sorted(self.rounds):
            runs = self.rounds[iid]
            out.append(runs.pop(0))
            if not runs:
                del self.rounds[iid]
        return out

    def settle(self, fence: Task) -> None:
        """Raise what kept the checkpoint of ``fence`` from being written (partial)."""
        exc = self.errors.get(id(fence))
        if exc is not None:
            raise exc

    def release(self) -> None:
        """The transaction ended: let go of the instances' locks."""
        for lock in self.held.values():
            lock.release()
        self.held.clear()

    def drop(self, instance_id: str) -> list[Run]:
        """Remove an instance's later runs (it must be computed again)."""
        return self.rounds.pop(instance_id, [])


def chunks(runs: list[Run]) -> list[list[Run]]:
    """A round split into calls of at most CALL_MAX_BYTES of values each (in order)."""
    out: list[list[Run]] = [[]]
    size = 0
    for run in runs:
        if out[-1] and size + run.weight > CALL_MAX_BYTES:
            out.append([])
            size = 0
        out[-1].append(run)
        size += run.weight
    return out


def call_args(owner: str, lease_seconds: int, runs: list[Run]) -> list[bytes | None]:
    """``_apply_v2``'s arguments (after the capability) for these runs (distinct instances),
    each as the text PostgreSQL reads (arrays as array literals, ``bytea`` in hex, ``jsonb``
    as JSON): sent as they are at libpq level on a step connection, and through
    :func:`psycopg_args` elsewhere."""
    fence_ids: list[str] = []
    fence_nodes: list[str] = []
    fence_gens: list[int] = []
    drop_ids: list[str] = []
    drop_nodes: list[str] = []
    nodes: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    named: list[dict[str, Any]] = []
    for run in runs:
        iid = run.ctx.instance_id
        for node, gen in run.fences:
            fence_ids.append(iid)
            fence_nodes.append(node)
            fence_gens.append(gen)
        for d in run.drops:
            drop_ids.append(iid)
            drop_nodes.append(d)
        nodes.extend(run.nodes.values())
        tasks.extend(run.tasks.values())
        named.extend(run.named.values())
    return [
        owner.encode(),
        b"%d" % lease_seconds,
        text_array([r.ctx.instance_id for r in runs]),
        int_array([r.expected for r in runs]),
        int_array([len(r.entries) for r in runs]),
        text_array([r.status for r in runs]),
        bytea_array([r.state for r in runs]),
        text_array(fence_ids),
        text_array(fence_nodes),
        int_array(fence_gens),
        text_array(drop_ids),
        text_array(drop_nodes),
        json_bytes(nodes) if nodes else None,
        orjson.dumps(tasks) if tasks else None,
        json_bytes(named) if named else None,
    ]


JSONB_ARGS = (12, 13, 14)
"""The positions of :func:`call_args`'s ``jsonb`` arguments."""


def psycopg_args(args: list[bytes | None]) -> tuple[Any, ...]:
    """:func:`call_args`'s arguments for psycopg (a service connection): text as ``str``
    (sent untyped, read by the statement's casts), the ``jsonb`` ones as JSON."""
    from .checkpoint import jsonb_bytes  # checkpoint imports this module: a late import

    return tuple(
        None if a is None else jsonb_bytes(a) if i in JSONB_ARGS else a.decode()
        for i, a in enumerate(args)
    )


def text_array(items: Sequence[str | None]) -> bytes:
    """A ``text[]`` / ``varchar[]`` literal: every element quoted (NULL for None)."""
    if not items:
        return b"{}"
    if None in items:
        return b"{%s}" % b",".join(b"NULL" if x is None else _quoted(x) for x in items)
    strs = cast(Sequence[str], items)
    raw = "".join(strs)
    if '"' in raw or "\\" in raw:
        return b"{%s}" % b",".join(_quoted(x) for x in strs)
    return ('{"' + '","'.join(strs) + '"}').encode()


def _quoted(x: str) -> bytes:
    return ('"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"').encode()


def int_array(items: list[int]) -> bytes:
    """An integer array literal."""
    return ("{" + ",".join(map(str, items)) + "}").encode()


def bytea_array(items: list[bytes]) -> bytes:
    """A ``bytea[]`` literal, each element in hex."""
    return b"{%s}" % b",".join(b'"\\\\x%s"' % x.hex().encode() for x in items)
