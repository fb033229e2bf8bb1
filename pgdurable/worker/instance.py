"""Per-instance state a worker caches: graph, scheduler, results, and checkpoint building.

An :class:`InstanceCtx` is loaded from ``df.nodes`` + ``<engine>.runs`` and is valid
while its ``version`` equals ``runs.state_version``. Every checkpoint turns one
scheduler :class:`Step` into the arguments of ``_apply_v1`` (node writes, successor
tasks, dropped tasks, instance status). The scheduler is mutated in place; a failed
or stale checkpoint makes the caller drop the context and reload it (cheap, and
the database is the only truth).

Results are stored once (docs/security.md, "Amplification"). A leaf's value is written
on its own ``df.nodes`` row, encoded once (:func:`pgdurable.values.check_size`, where the
result cap lives) and embedded in the checkpoint as is. A completed composite stores no
value: ``result`` is NULL and ``status_details`` names where its value is,
``"result_from": "<node id>"`` (THEN, IF, RACE, LOOP: the child whose value it has; a
break: the BREAK) or ``"result_of": [ids]`` (JOIN: its branches, in order). Readers
resolve them (``df._node_result`` in SQL, :meth:`InstanceCtx.from_rows` here); in memory
a composite's value is the same Python object as its source's. Named results are the one
copy (``<engine>.results``, until the instance ends). Sizes are tracked per node so one
instance's stored results stay under ``pg_durable.max_instance_bytes``.

A stored graph the worker cannot run (a config it cannot parse, a sleep or schedule that
cannot be scheduled) raises :class:`BadGraph` at load: deterministic, so the worker fails the
instance at once instead of retrying it.

Over 500 lines: one instance's in-memory state and the checkpoint it builds are one
contract (each result stored once, the caps) and read best together.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import orjson

from pgdurable import cron
from pgdurable.graph import _abc as A
from pgdurable.graph.compile import CompiledGraph, compile_rows
from pgdurable.graph.sched import Scheduler
from pgdurable.subst import substitute
from pgdurable.values import error_text, json_bytes, loads

TYPE_NAMES = {v: k for k, v in A.NODE_TYPE_CODES.items()}
STATUS_NAMES = {
    A.PENDING: "pending",
    A.RUNNING: "running",
    A.COMPLETED: "completed",
    A.FAILED: "failed",
}


#: The longest df.sleep (seconds, ~317 years): due times stay far inside PostgreSQL's interval
#: and timestamp ranges (df.sleep refuses more; a stored graph with more is a BadGraph).
SLEEP_MAX_SECONDS = 10_000_000_000
#: Signal timeouts are df.wait_for_signal's integer argument.
SIGNAL_TIMEOUT_MAX = 2**31 - 1
#: Node details the worker keeps for itself (resolution, accounting); df.instance_nodes hides
#: them.
INTERNAL_DETAILS = ("result_from", "result_of", "result_bytes")
_NULL_BYTES = 4  # len(b"null")
#: The result of a node abandoned with its branch (its details say ``"abandoned": true``).
ABANDONED = "cancelled: abandoned (lost a RACE, a sibling failed, or a break)"
#: Details of an earlier activation that a re-activated node must not keep (null removes a
#: key's meaning: readers test the values).
STALE_DECISIONS = {
    "branch": None,
    "winner": None,
    "decided_seq": None,
    "abandoned": None,
    "error_node": None,
}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class BadGraph(Exception):
    """The stored instance cannot run, whatever the attempt (a deterministic failure)."""


class BadSetting(BadGraph):
    """A pg_durable.* value of the submitting role that cannot be used: the instance fails,
    its error naming the setting, the role and the value."""


_INT_RE = re.compile(r"\s*[-+]?[0-9]{1,18}\s*")


def loop_limits(
    inst: tuple[Any, ...], min_interval_ms: int, max_iterations: int
) -> tuple[float, int]:
    """An instance's loop limits (seconds between iteration starts, iterations): the
    deployment's (``min_interval_ms``/``max_iterations``: the worker's ``settings``),
    tightened by the submitting role's own ``ALTER ROLE … SET pg_durable.loop_min_interval_ms``
    / ``loop_max_iterations`` (the last two columns of ``load_instance``, NULL when the role
    has none): the longer interval and the lower cap. A role, which may ALTER itself, can
    never loosen them (docs/operating.md, "Settings")."""
    role = inst[3]
    raw_min, raw_max = (inst[14], inst[15]) if len(inst) >= 16 else (None, None)
    if raw_min is not None:
        if not _INT_RE.fullmatch(raw_min):
            raise BadSetting(
                f"pg_durable.loop_min_interval_ms of role {role} is {raw_min!r}, "
                "not a whole number of milliseconds"
            )
        min_interval_ms = max(min_interval_ms, int(raw_min))
    if raw_max is not None:
        if not _INT_RE.fullmatch(raw_max) or int(raw_max) < 1:
            raise BadSetting(
                f"pg_durable.loop_max_iterations of role {role} is {raw_max!r}, "
                "not a whole number of at least 1"
            )
        max_iterations = min(max_iterations, int(raw_max))
    return max(0, min_interval_ms) / 1000.0, max_iterations


def dump(state: list[int]) -> bytes:
    return array("q", state).tobytes()


def undump(blob: bytes) -> list[int]:
    a = array("q")
    a.frombytes(blob)
    return a.tolist()


@dataclass
class Checkpoint:
    """The arguments of one ``_apply_v1`` call (minus owner/task fence)."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_tasks: list[dict[str, Any]] = field(default_factory=list)
    named: dict[str, Any] = field(default_factory=dict)
    drop_tasks: list[str] = field(default_factory=list)
    inst_status: str | None = None
    take_budget: int = 0
    """How many immediately runnable successors this worker takes itself (free slots)."""
    take_sql: int = 0
    """How many more runnable SQL successors (df database) it takes on top: they wait in its
    batch queue, not in a slot, and an instance's fan-out then stays on one worker (no
    checkpoint races with another worker, no reloads)."""

    weight: int = 0
    """Bytes of the values this checkpoint carries (leaf results, named results, error
    texts), known before it is encoded: the per-checkpoint cap is checked on it."""
    fragments: dict[int, orjson.Fragment] = field(default_factory=dict)
    """Encoded values of this checkpoint by node (a leaf's, and the composites that copy
    it): a named copy embeds the same bytes instead of encoding the value again."""

    def node(self, node_id: str) -> dict[str, Any]:
        return self.nodes.setdefault(node_id, {"id": node_id, "details": {}})


# Vars snapshots are frozen per instance but usually the same for many instances of one role
# (docs/api.md "Substitution"): identical snapshots share one dict instead of one copy per
# cached instance (a 1 MiB snapshot times 2,048 cached instances would be 2 GiB). Bounded,
# least recently used first out; never mutated (substitution only reads it).
_VARS_SHARED: OrderedDict[bytes, dict[str, Any]] = OrderedDict()
_VARS_SHARED_MAX = 256


def shared_vars(raw: Any) -> dict[str, Any]:
    """The one shared dict equal to this vars snapshot."""
    if not raw:
        return {}
    key = hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)).digest()
    got = _VARS_SHARED.get(key)
    if got is None:
        got = dict(raw)
        _VARS_SHARED[key] = got
        if len(_VARS_SHARED) > _VARS_SHARED_MAX:
            _VARS_SHARED.popitem(last=False)
    else:
        _VARS_SHARED.move_to_end(key)
    return got


class RoleInfo(NamedTuple):
    """The submitting role as ``load_instance`` reads it, checked before the instance starts."""

    name: str
    superuser: bool
    can_login: bool
    superuser_instances: bool
    """pg_durable.enable_superuser_instances is on."""


@dataclass
class InstanceCtx:
    """A worker's cached view of one instance."""

    instance_id: str
    label: str | None
    status: str
    role_oid: int
    role_name: str
    database: str | None
    graph: CompiledGraph
    index: dict[str, int]
    sched: Any
    version: int
    vars: dict[str, str]
    configs: list[Any]
    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    named: dict[str, Any] = field(default_factory=dict)
    loop_started: dict[int, float] = field(default_factory=dict)
    origins: dict[int, int] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loop_min_interval: float = 1.0
    max_iterations: int = 0
    """pg_durable.loop_max_iterations as it applies to this instance (loop_limits)."""
    limits_epoch: int = 0
    """The worker's settings epoch its loop limits were computed in (a newer one: reload)."""
    dead: bool = False
    """Its in-memory state may hold changes that were rolled back: whoever still holds this
    object must reload (a version number alone cannot tell: another transaction may have
    committed the same number meanwhile)."""
    role_info: RoleInfo | None = None
    """The submitting role as loaded, or None when the role no longer exists."""
    retry_after: dict[int, float] = field(default_factory=dict)
    """Seconds a failed leaf's server asked for before it is tried again (an HTTP 429's or 5xx's
    Retry-After), set where the failure is checkpointed: an enclosing df.retry waits at least
    that long. The checkpoint that records the failure is the one that schedules the wait, so
    memory is enough."""
    sizes: dict[int, int] = field(default_factory=dict)
    """Encoded size of each completed node's value (a composite's derived from its sources)."""
    leaf_bytes: dict[int, int] = field(default_factory=dict)
    """Bytes of the values stored on leaf rows (what df.nodes holds)."""
    named_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes of each named result (what <engine>.results holds)."""
    stored: int = 0
    """sum(leaf_bytes) + sum(named_bytes): the results this instance holds in storage."""

    @classmethod
    def from_rows(
        cls,
        instance_id: str,
        inst: tuple[Any, ...],
        rows: list[tuple[Any, ...]],
        named: list[tuple[str, Any]],
        max_iterations: int,
        loop_min_interval: float,
    ) -> InstanceCtx:
        (label, status, role_oid, role_name, database, root, vars_, state, version, _cancel) = inst[
            :10
        ]
        node_rows = [
            {
                "id": r[0],
                "node_type": r[1],
                "query": r[2],
                "result_name": r[3],
                "left_node": r[4],
                "right_node": r[5],
            }
            for r in rows
        ]
        try:
            graph = compile_rows(node_rows, root)
        except (ValueError, RecursionError) as exc:
            raise BadGraph(str(exc)) from None
        index = {nid: i for i, nid in enumerate(graph.node_ids)}
        if state:
            sched = Scheduler.load_state(graph, max_iterations, undump(bytes(state)))
        else:
            sched = Scheduler(graph, max_iterations)
        by_id = {r[0]: r for r in rows}
        configs: list[Any] = []
        for nid in graph.node_ids:
            configs.append(by_id[nid][2])
        check_configs(graph, configs)
        ctx = cls(
            instance_id,
            label,
            status,
            role_oid,
            role_name,
            database,
            graph,
            index,
            sched,
            version,
            shared_vars(vars_),
            configs,
            loop_min_interval=loop_min_interval,
            max_iterations=max_iterations,
            role_info=RoleInfo(*inst[10:14]) if len(inst) >= 14 and inst[10] is not None else None,
        )
        # composites completed with a reference: resolved from their sources, deepest first
        # (a source is a descendant: a larger pre-order index)
        refs: dict[int, tuple[Any, Any]] = {}
        for r in rows:
            i = index[r[0]]
            details = r[8] or {}
            if r[6] == "completed":
                if graph.types[i] in A.LEAF_TYPES:
                    ctx.results[i] = r[7]
                    size = details.get("result_bytes")
                    if not isinstance(size, int):
                        size = len(json_bytes(r[7]))
                    ctx.sizes[i] = ctx.leaf_bytes[i] = size
                elif isinstance(details.get("result_from"), str) or isinstance(
                    details.get("result_of"), list
                ):
                    refs[i] = (details.get("result_from"), details.get("result_of"))
                else:  # a copy written before results were stored once
                    ctx.results[i] = r[7]
                    ctx.sizes[i] = len(json_bytes(r[7]))
            began = details.get("iter_begins_at")
            if r[1] == "LOOP" and began is not None:
                ctx.loop_started[i] = float(began)
        for i in sorted(refs, reverse=True):
            src, srcs = refs[i]
            if isinstance(src, str):
                j = index.get(src, A.NONE)
                ctx.results[i] = ctx.results.get(j)
                ctx.sizes[i] = ctx.sizes.get(j, _NULL_BYTES)
            else:
                js = [index.get(s, A.NONE) if isinstance(s, str) else A.NONE for s in srcs]
                ctx.results[i] = [ctx.results.get(j) for j in js]
                ctx.sizes[i] = _array_size([ctx.sizes.get(j, _NULL_BYTES) for j in js])
        ctx.named = dict(named)
        ctx.named_bytes = {name: len(json_bytes(v)) for name, v in ctx.named.items()}
        ctx.stored = sum(ctx.leaf_bytes.values()) + sum(ctx.named_bytes.values())
        for r in rows:
            if r[6] == "failed":
                err = r[7] if isinstance(r[7], str) else orjson.dumps(r[7]).decode()
                ctx.errors[index[r[0]]] = (err, (r[8] or {}).get("sqlstate"))
        return ctx

    # -- results ---------------------------------------------------------------------

    def record_leaf(self, node: int, value: Any, data: bytes, cp: Checkpoint) -> None:
        """A leaf completed with ``value``, encoded as ``data`` (by values.check_size, where
        the cap lives): its row gets the bytes as they are, once."""
        frag = orjson.Fragment(data)
        cp.fragments[node] = frag
        upd = cp.node(self.graph.node_ids[node])
        upd["status"] = "completed"
        upd["result"] = frag
        upd["details"]["result_bytes"] = len(data)
        cp.weight += len(data)
        self._set_leaf_bytes(node, len(data))
        self.record_result(node, value, len(data), cp)

    def record_result(self, node: int, value: Any, size: int, cp: Checkpoint | None = None) -> None:
        self.results[node] = value
        self.sizes[node] = size
        name = self.graph.result_names[node]
        if name:
            self.named.pop(name, None)
            self.named[name] = value
            self.stored += size - self.named_bytes.get(name, 0)
            self.named_bytes[name] = size
            if cp is not None:
                frag = cp.fragments.get(node)
                cp.named[name] = value if frag is None else frag
                cp.weight += size

    def _set_leaf_bytes(self, node: int, size: int | None) -> None:
        """A leaf's row now holds ``size`` bytes of value (None: none, e.g. running, failed)."""
        self.stored -= self.leaf_bytes.pop(node, 0)
        if size is not None:
            self.leaf_bytes[node] = size
            self.stored += size

    # -- checkpoint building ---------------------------------------------------------

    def build(self, step: A.Step, cp: Checkpoint, now: datetime) -> None:
        """Translate a scheduler step into checkpoint writes (and update the caches)."""
        seq = self.version + 1
        # timings shown by df.explain / instance_nodes are wall-clock (this host); due times
        # below use `now`, the database clock of the claim (tests shift it)
        ts = datetime.now(UTC).isoformat()
        g = self.graph
        for node, status, how, srcs in step.finished:
            nid = g.node_ids[node]
            upd = cp.node(nid)
            upd["details"]["finished_at"] = ts
            upd["details"]["finished_seq"] = seq
            if status == A.COMPLETED:
                if how == A.HOW_LEAF:
                    # recorded by the caller (record_leaf) before the scheduler ran
                    continue
                # a composite: a reference to where its value is stored, never a copy
                if how in (A.HOW_COPY, A.HOW_BREAK):
                    src = srcs[0]
                    value = self.results.get(src)
                    size = self.sizes.get(src, _NULL_BYTES)
                    upd["details"]["result_from"] = g.node_ids[src]
                    upd["details"]["result_of"] = None
                    if src in cp.fragments:
                        cp.fragments[node] = cp.fragments[src]
                else:  # HOW_ARRAY (JOIN)
                    value = [self.results.get(s) for s in srcs]
                    size = _array_size([self.sizes.get(s, _NULL_BYTES) for s in srcs])
                    upd["details"]["result_from"] = None
                    upd["details"]["result_of"] = [g.node_ids[s] for s in srcs]
                upd["status"] = "completed"
                upd["result"] = None
                self.record_result(node, value, size, cp)
                self._record_decision(node, srcs, upd)
            else:
                msg, sqlstate = self._failure_text(node, how, srcs)
                msg = error_text(msg)
                self.errors[node] = (msg, sqlstate)
                self._set_leaf_bytes(node, None)
                # where the failure started: df.error reports that node (ARCHITECTURE §4)
                origin = self.origins.get(srcs[0], srcs[0]) if how == A.HOW_FAIL and srcs else node
                if g.types[node] == A.RETRY and how == A.HOW_FAIL:
                    origin = node  # its error names the failed step and the attempts
                self.origins[node] = origin
                upd["details"]["error_node"] = g.node_ids[origin]
                upd["status"] = "failed"
                upd["result"] = msg
                cp.weight += len(msg)
                if sqlstate:
                    upd["details"]["sqlstate"] = sqlstate
                self._record_decision(node, srcs, upd)
        # abandoned with their branch (a RACE's loser, the other branches of a failed JOIN,
        # what ran below a break): every one ends failed, the composites (``stopped``: a LOOP
        # on a RACE's losing side, …) as well as the leaves, so no row of it stays running
        # (docs/decisions.md D17); only the executor's own work (``abandoned``) has a task
        for node, has_task in [(n, True) for n, _ in step.abandoned] + [
            (n, False) for n, _ in step.stopped
        ]:
            nid = g.node_ids[node]
            self._set_leaf_bytes(node, None)
            if has_task:
                cp.drop_tasks.append(nid)
            upd = cp.node(nid)
            upd["status"] = "failed"
            upd["result"] = ABANDONED
            upd["details"]["finished_at"] = ts
            upd["details"]["finished_seq"] = seq
            upd["details"]["abandoned"] = True
        ready = {n for n, _ in step.ready}
        # Iteration floor (docs/decisions.md D14): iteration k+1 begins no earlier than
        # loop_min_interval after iteration k *began* (its first step's due time, not the
        # checkpoint that scheduled it). Unknown start (another worker ran it) → full floor.
        # Times are the database clock (the claim's clock()), stored on the LOOP node as
        # iter_begins_at, so every worker of every host measures the same floor.
        t = now.timestamp()
        iter_loops: dict[int, float] = {}
        for loop, k in step.iterations:
            if g.types[loop] == A.RETRY:
                # the next attempt of a df.retry (its delay was its timer): no loop floor
                rd = cp.node(g.node_ids[loop])["details"]
                rd.update({"attempt": k, "iter_seq": seq, "next_attempt_at": None})
                continue
            began = self.loop_started.get(loop)
            wait = (
                self.loop_min_interval
                if began is None
                else max(0.0, self.loop_min_interval - (t - began))
            )
            iter_loops[loop] = wait
            self.loop_started[loop] = t + wait
            cp.node(g.node_ids[loop])["details"]["iter_begins_at"] = t + wait
        for loop, k in step.iterations:
            if g.types[loop] == A.RETRY:
                continue
            upd = cp.node(g.node_ids[loop])
            upd["details"]["iteration"] = k
            upd["details"]["iter_seq"] = seq
        for node, gen in step.started:
            nid = g.node_ids[node]
            upd = cp.node(nid)
            upd["status"] = "running"
            upd.pop("result", None)
            self._set_leaf_bytes(node, None)  # a running node's row holds no value
            upd["details"].update(
                {
                    "gen": gen,
                    "seq": seq,
                    "execution_id": f"{self.instance_id}::{gen}",
                    "queued_at": ts,
                    "started_at": ts,
                    "finished_at": None,
                    "duration_ms": None,
                    "sqlstate": None,
                }
            )
            if gen > 1:
                # re-activated by a loop: what the row says about an earlier activation
                # (an IF's arm, a RACE's winner, being abandoned) does not describe this one
                upd["details"].update(STALE_DECISIONS)
            p = g.parent[node]
            if p != A.NONE and g.types[p] == A.IF and node != g.cond[p]:
                # an IF took this arm now: readers (df.instance_nodes, df.explain) show the
                # other arm skipped while this one runs, not only once the IF has finished
                pd = cp.node(g.node_ids[p])["details"]
                pd["branch"] = "then" if node == g.left[p] else "else"
                pd["decided_seq"] = seq
            if g.types[node] == A.RETRY:
                upd["details"].update(
                    {
                        "attempt": 1,
                        "max_attempts": g.attempts[node],
                        "iter_seq": seq,
                        "last_error": None,
                        "last_error_node": None,
                        "next_attempt_at": None,
                    }
                )
            if g.types[node] == A.LOOP and node not in iter_loops:
                upd["details"]["iteration"] = 1
                upd["details"]["iter_seq"] = seq
                upd["details"]["iter_begins_at"] = t
                self.loop_started[node] = t
            if node in ready:
                task = self._task_for(node, gen, now, iter_loops)
                if task["kind"] == "run" and task["delay"] == 0:
                    if cp.take_sql > 0 and g.types[node] == A.SQL and not self.database:
                        task["take"] = True
                        cp.take_sql -= 1
                    elif cp.take_budget > 0:
                        task["take"] = True
                        cp.take_budget -= 1
                cp.new_tasks.append(task)
        for node, gen in step.ready:
            if g.types[node] == A.RETRY:
                self._retry_wait(node, gen, now, cp)
        if step.terminal == A.T_COMPLETED:
            cp.inst_status = "completed"
        elif step.terminal == A.T_FAILED:
            cp.inst_status = "failed"
        elif step.terminal == A.T_CANCELLED:
            cp.inst_status = "cancelled"

    def _retry_wait(self, node: int, gen: int, now: datetime, cp: Checkpoint) -> None:
        """A df.retry's attempt failed and another is allowed: a timer task for its delay
        (stored: a crash while it waits loses nothing), and its row says why it waits."""
        g = self.graph
        child = g.left[node]
        origin = self.origins.get(child, child)
        attempt = self.sched.iteration(node)
        delay = retry_delay(loads(self.configs[node]), attempt)
        asked = self.retry_after.get(origin)
        if asked is not None:
            delay = max(delay, asked)  # the server's Retry-After: at least that long
        due = now + timedelta(seconds=delay)
        cp.new_tasks.append(
            {
                "node_id": g.node_ids[node],
                "gen": gen,
                "kind": "timer",
                "due_at": due.isoformat(),
                "delay": delay,
            }
        )
        msg = self.errors.get(child, ("failed", None))[0]
        cp.node(g.node_ids[node])["details"].update(
            {
                "attempt": attempt,
                "max_attempts": g.attempts[node],
                "last_error": msg,
                "last_error_node": g.node_ids[origin],
                "next_attempt_at": due.isoformat(),
            }
        )
        cp.weight += len(msg)

    def _record_decision(self, node: int, srcs: list[int], upd: dict[str, Any]) -> None:
        """A finished IF's arm / RACE's winner, from the source of its result: the child on
        the way to it (a break's source is the BREAK, deeper down; an IF whose condition
        failed or broke took no arm)."""
        g = self.graph
        t = g.types[node]
        if t not in (A.IF, A.RACE) or not srcs:
            return
        child = srcs[0]
        while child != A.NONE and g.parent[child] != node:
            child = g.parent[child]
        if child == A.NONE:
            return
        if t == A.RACE:
            upd["details"]["winner"] = g.node_ids[child]
        elif child in (g.left[node], g.right[node]):
            upd["details"]["branch"] = "then" if child == g.left[node] else "else"

    def _in_subtree(self, node: int, root: int) -> bool:
        p = node
        while p != A.NONE:
            if p == root:
                return True
            p = self.graph.parent[p]
        return False

    def _task_for(
        self, node: int, gen: int, now: datetime, iter_loops: dict[int, float]
    ) -> dict[str, Any]:
        t = self.graph.types[node]
        nid = self.graph.node_ids[node]
        task: dict[str, Any] = {"node_id": nid, "gen": gen, "kind": "run"}
        delay = 0.0
        # Iteration floor (docs/decisions.md D14): the first steps of a new iteration wait until
        # loop_min_interval has passed since the previous iteration began.
        for loop, wait in iter_loops.items():
            if self._in_subtree(node, loop):
                delay = max(delay, wait)
        if t == A.SLEEP:
            task["kind"] = "timer"
            delay += int(self.configs[node] or 0)
        elif t == A.WAIT_SCHEDULE:
            task["kind"] = "timer"
            expr = loads(self.configs[node])["cron_expr"]
            base = now + timedelta(seconds=delay)
            task["due_at"] = cron.next_tick(expr, base).isoformat()
            delay = 0.0
        elif t == A.SIGNAL:
            task["kind"] = "signal"
            timeout = loads(self.configs[node]).get("timeout_seconds")
            if timeout is not None:
                task["deadline"] = (now + timedelta(seconds=delay + float(timeout))).isoformat()
        task["delay"] = max(delay, 0.0)
        return task

    def _failure_text(self, node: int, how: int, srcs: list[int]) -> tuple[str, str | None]:
        g = self.graph
        if how == A.HOW_FAIL and srcs:
            child_msg, sqlstate = self.errors.get(srcs[0], ("failed", None))
            if g.types[node] == A.RETRY:
                origin = self.origins.get(srcs[0], srcs[0])
                attempts = self.sched.iteration(node)
                return (
                    f"df.retry gave up after {attempts} attempt{'s' if attempts != 1 else ''}: "
                    f"step {g.node_ids[origin]} ({TYPE_NAMES[g.types[origin]]}) failed: "
                    f"{child_msg}",
                    sqlstate,
                )
            if g.types[node] == A.JOIN:
                branches = [g.left[node], g.right[node]]
                if g.extra[node] != A.NONE:
                    branches.append(g.extra[node])
                pos = branches.index(srcs[0]) + 1 if srcs[0] in branches else 0
                return f"JOIN branch {pos} failed: {child_msg}", sqlstate
            return child_msg, sqlstate
        if how == A.HOW_ITERCAP:
            return (
                f"loop {g.node_ids[node]} exceeded pg_durable.loop_max_iterations "
                f"({self.sched_max_iterations()})",
                None,
            )
        if how == A.HOW_BREAK_OUTSIDE:
            return "df.break() was reached outside of any loop", None
        if how == A.HOW_LEAF:
            return self.errors.get(node, ("failed", None))
        return "failed", None

    def sched_max_iterations(self) -> int:
        """The iteration cap this instance's scheduler was loaded with (the schedulers do not
        expose it)."""
        return self.max_iterations


#: A df.retry delay is spread down by up to this fraction (jitter), so retries of many
#: instances that failed together do not all come back at once.
RETRY_JITTER = 0.2


def retry_delay(cfg: dict[str, Any], attempt: int, rnd: float | None = None) -> float:
    """Seconds before attempt ``attempt + 1`` of a df.retry whose attempt ``attempt`` failed:
    initial_delay_seconds * backoff^(attempt - 1), at most max_delay_seconds, then shortened
    by up to :data:`RETRY_JITTER` (``rnd`` in [0, 1): the random draw, for tests)."""
    initial = float(cfg["initial_delay_seconds"])
    backoff = float(cfg["backoff"])
    cap = float(cfg["max_delay_seconds"])
    if initial <= 0 or cap <= 0:
        base = 0.0
    elif backoff > 1 and (attempt - 1) * math.log(backoff) >= math.log(cap / initial):
        base = cap  # without computing a power that may overflow
    else:
        base = min(cap, initial * backoff ** (attempt - 1))
    r = random.random() if rnd is None else rnd
    return base * (1.0 - RETRY_JITTER * r)


def _array_size(sizes: list[int]) -> int:
    """Bytes of the compact JSON array of values encoded in ``sizes`` bytes each."""
    return 2 + sum(sizes) + max(0, len(sizes) - 1)


def _config(graph: CompiledGraph, i: int, text: Any) -> dict[str, Any]:
    where = f"node {graph.node_ids[i]!r} ({TYPE_NAMES[graph.types[i]]})"
    if not isinstance(text, str):
        raise BadGraph(f"{where}: its config is missing")
    try:
        cfg = loads(text)
    except ValueError as exc:
        raise BadGraph(f"{where}: its config is not JSON the worker can read ({exc})") from None
    if not isinstance(cfg, dict):
        raise BadGraph(f"{where}: its config is not a JSON object")
    return cfg


def check_configs(graph: CompiledGraph, configs: list[Any]) -> None:
    """Raise BadGraph when a node's stored config is one the worker cannot run.

    The same rules as df.start's (30_control.sql, df._graph_flatten, through the DSL
    builders): a graph df.start accepts always passes; one written into df.nodes by hand
    that would fail when its node runs fails here, once, when the instance is loaded.
    """
    for i, t in enumerate(graph.types):
        text = configs[i]
        where = f"node {graph.node_ids[i]!r} ({TYPE_NAMES[t]})"
        if t == A.SLEEP:
            raw = text.strip() if isinstance(text, str) else ""
            if not raw.isascii() or not raw.isdigit() or int(raw) > SLEEP_MAX_SECONDS:
                raise BadGraph(
                    f"{where}: a sleep is a whole number of seconds from 0 to "
                    f"{SLEEP_MAX_SECONDS}, got {str(text)[:40]!r}"
                )
        elif t == A.WAIT_SCHEDULE:
            expr = _config(graph, i, text).get("cron_expr")
            if not isinstance(expr, str):
                raise BadGraph(f"{where}: its config has no cron_expr string")
            try:
                cron.validate(expr)
            except ValueError as exc:
                raise BadGraph(f"{where}: {exc}") from None
        elif t == A.SIGNAL:
            cfg = _config(graph, i, text)
            name, timeout = cfg.get("signal_name"), cfg.get("timeout_seconds")
            if not isinstance(name, str) or not name:
                raise BadGraph(f"{where}: its config has no signal_name")
            if timeout is not None and (
                type(timeout) is not int or not 0 < timeout <= SIGNAL_TIMEOUT_MAX
            ):
                raise BadGraph(
                    f"{where}: timeout_seconds must be a whole number of seconds "
                    f"from 1 to {SIGNAL_TIMEOUT_MAX}, got {timeout!r}"
                )
        elif t == A.BREAK:
            value = _config(graph, i, text).get("break_value")
            if value is not None and not isinstance(value, str):
                raise BadGraph(f"{where}: break_value must be text or null")
        elif t in (A.HTTP, A.HTTP_MULTIPART):
            _config(graph, i, text)
        elif t == A.RETRY:
            cfg = _config(graph, i, text)
            for key, low in (
                ("initial_delay_seconds", 0),
                ("backoff", 1),
                ("max_delay_seconds", 0),
            ):
                v = cfg.get(key)
                if (
                    isinstance(v, bool)
                    or not isinstance(v, int | float | Decimal)  # loads: JSON decimals
                    or not math.isfinite(v)
                    or not low <= v <= SLEEP_MAX_SECONDS
                ):
                    raise BadGraph(
                        f"{where}: {key} must be a number from {low} to {SLEEP_MAX_SECONDS}, "
                        f"got {v!r}"
                    )
        elif t == A.IF and graph.cond[i] == A.COND_IF_ROWS:
            name = _config(graph, i, text).get("result_name")
            if not isinstance(name, str) or not _IDENT.fullmatch(name):
                raise BadGraph(f"{where}: result_name must be an identifier")


def subst(ctx: InstanceCtx, text: str, mode: str) -> str:
    """``text`` with the instance's references (results, vars, id, label) substituted, as
    ``mode`` quotes them (``sql`` or ``raw``)."""
    return substitute(
        text,
        mode=mode,  # type: ignore[arg-type]
        results=ctx.named,
        vars=ctx.vars,
        instance_id=ctx.instance_id,
        label=ctx.label,
    )
