"""Per-instance state a worker caches: graph, scheduler, results, and checkpoint building.

An :class:`InstanceCtx` is loaded from ``df.nodes`` + ``<engine>.runs`` and is valid
while its ``version`` equals ``runs.state_version``. Every checkpoint turns one
scheduler :class:`Step` into the arguments of ``_apply_v1`` (node writes, successor
tasks, dropped tasks, instance status). The scheduler is mutated in place; a failed
or stale checkpoint makes the caller drop the context and reload it (cheap, and
the database is the only truth).
"""

from __future__ import annotations

import asyncio
import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from pgdurable import cron
from pgdurable.graph import _abc as A
from pgdurable.graph.compile import CompiledGraph, compile_rows
from pgdurable.graph.sched import Scheduler

TYPE_NAMES = {v: k for k, v in A.NODE_TYPE_CODES.items()}
STATUS_NAMES = {A.PENDING: "pending", A.RUNNING: "running", A.COMPLETED: "completed",
                A.FAILED: "failed"}


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

    def node(self, node_id: str) -> dict[str, Any]:
        return self.nodes.setdefault(node_id, {"id": node_id, "details": {}})



# Vars snapshots are frozen per instance but usually the same for many instances of one role
# (SPEC §3.3): identical snapshots share one dict instead of one copy per cached instance
# (a 1 MiB snapshot times 2,048 cached instances would be 2 GiB). Bounded, least recently
# used first out; never mutated (substitution only reads it).
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
    dead: bool = False
    """Its in-memory state may hold changes that were rolled back: whoever still holds this
    object must reload (a version number alone cannot tell: another transaction may have
    committed the same number meanwhile)."""
    role_info: tuple[Any, ...] | None = None
    """The submitting role as loaded (rolname, rolsuper, rolcanlogin, superuser instances
    enabled), or None when the role no longer exists."""

    @classmethod
    def from_rows(cls, instance_id: str, inst: tuple[Any, ...], rows: list[tuple[Any, ...]],
                  named: list[tuple[str, Any]], max_iterations: int,
                  loop_min_interval: float) -> InstanceCtx:
        (label, status, role_oid, role_name, database, root, vars_, state, version,
         _cancel) = inst[:10]
        node_rows = [
            {"id": r[0], "node_type": r[1], "query": r[2], "result_name": r[3],
             "left_node": r[4], "right_node": r[5]}
            for r in rows
        ]
        graph = compile_rows(node_rows, root)
        index = {nid: i for i, nid in enumerate(graph.node_ids)}
        if state:
            sched = Scheduler.load_state(graph, max_iterations, undump(bytes(state)))
        else:
            sched = Scheduler(graph, max_iterations)
        by_id = {r[0]: r for r in rows}
        configs: list[Any] = []
        for nid in graph.node_ids:
            configs.append(by_id[nid][2])
        ctx = cls(instance_id, label, status, role_oid, role_name, database, graph, index,
                  sched, version, shared_vars(vars_), configs,
                  loop_min_interval=loop_min_interval,
                  role_info=tuple(inst[10:14]) if len(inst) >= 14 and inst[10] is not None
                  else None)
        for r in rows:
            if r[6] == "completed":
                ctx.results[index[r[0]]] = r[7]
            began = (r[8] or {}).get("iter_begins_at")
            if r[1] == "LOOP" and began is not None:
                ctx.loop_started[index[r[0]]] = float(began)
        ctx.named = dict(named)
        for r in rows:
            if r[6] == "failed":
                err = r[7] if isinstance(r[7], str) else orjson.dumps(r[7]).decode()
                ctx.errors[index[r[0]]] = (err, (r[8] or {}).get("sqlstate"))
        return ctx

    # -- results ---------------------------------------------------------------------

    def record_result(self, node: int, value: Any, cp: Checkpoint | None = None) -> None:
        self.results[node] = value
        name = self.graph.result_names[node]
        if name:
            self.named.pop(name, None)
            self.named[name] = value
            if cp is not None:
                cp.named[name] = value

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
                    value = self.results.get(node)
                elif how in (A.HOW_COPY, A.HOW_BREAK):
                    value = self.results.get(srcs[0])
                elif how == A.HOW_ARRAY:
                    value = [self.results.get(s) for s in srcs]
                else:  # pragma: no cover - a completed node has one of the above
                    value = None
                self.record_result(node, value, cp)
                upd["status"] = "completed"
                upd["result"] = value
                if g.types[node] == A.IF and srcs:
                    upd["details"]["branch"] = "then" if srcs[0] == g.left[node] else "else"
                if g.types[node] == A.RACE and srcs:
                    upd["details"]["winner"] = g.node_ids[srcs[0]]
            else:
                msg, sqlstate = self._failure_text(node, how, srcs)
                self.errors[node] = (msg, sqlstate)
                # where the failure started: df.error reports that node (ARCHITECTURE §4)
                origin = self.origins.get(srcs[0], srcs[0]) if how == A.HOW_FAIL and srcs \
                    else node
                self.origins[node] = origin
                upd["details"]["error_node"] = g.node_ids[origin]
                upd["status"] = "failed"
                upd["result"] = msg
                if sqlstate:
                    upd["details"]["sqlstate"] = sqlstate
                if g.types[node] == A.RACE and srcs:
                    upd["details"]["winner"] = g.node_ids[srcs[0]]
        for node, gen in step.abandoned:
            nid = g.node_ids[node]
            cp.drop_tasks.append(nid)
            upd = cp.node(nid)
            upd["status"] = "failed"
            upd["result"] = "cancelled: abandoned (lost a RACE, a sibling failed, or a break)"
            upd["details"]["finished_at"] = ts
            upd["details"]["abandoned"] = True
        ready = {n for n, _ in step.ready}
        # Iteration floor (SPEC §3.5, D14): iteration k+1 begins no earlier than
        # loop_min_interval after iteration k *began* (its first step's due time, not the
        # checkpoint that scheduled it). Unknown start (another worker ran it) → full floor.
        # Times are the database clock (the claim's clock()), stored on the LOOP node as
        # iter_begins_at, so every worker of every host measures the same floor.
        t = now.timestamp()
        iter_loops: dict[int, float] = {}
        for loop, _k in step.iterations:
            began = self.loop_started.get(loop)
            wait = self.loop_min_interval if began is None else \
                max(0.0, self.loop_min_interval - (t - began))
            iter_loops[loop] = wait
            self.loop_started[loop] = t + wait
            cp.node(g.node_ids[loop])["details"]["iter_begins_at"] = t + wait
        for loop, k in step.iterations:
            upd = cp.node(g.node_ids[loop])
            upd["details"]["iteration"] = k
            upd["details"]["iter_seq"] = seq
        for node, gen in step.started:
            nid = g.node_ids[node]
            upd = cp.node(nid)
            upd["status"] = "running"
            upd.pop("result", None)
            upd["details"].update({
                "gen": gen, "seq": seq, "execution_id": f"{self.instance_id}::{gen}",
                "queued_at": ts, "started_at": ts, "finished_at": None, "duration_ms": None,
                "sqlstate": None,
            })
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
        if step.terminal == A.T_COMPLETED:
            cp.inst_status = "completed"
        elif step.terminal == A.T_FAILED:
            cp.inst_status = "failed"
        elif step.terminal == A.T_CANCELLED:
            cp.inst_status = "cancelled"

    def _in_subtree(self, node: int, root: int) -> bool:
        p = node
        while p != A.NONE:
            if p == root:
                return True
            p = self.graph.parent[p]
        return False

    def _task_for(self, node: int, gen: int, now: datetime,
                  iter_loops: dict[int, float]) -> dict[str, Any]:
        t = self.graph.types[node]
        nid = self.graph.node_ids[node]
        task: dict[str, Any] = {"node_id": nid, "gen": gen, "kind": "run"}
        delay = 0.0
        # Iteration floor (SPEC §3.5, D14): the first steps of a new iteration wait until
        # loop_min_interval has passed since the previous iteration began.
        for loop, wait in iter_loops.items():
            if self._in_subtree(node, loop):
                delay = max(delay, wait)
        if t == A.SLEEP:
            task["kind"] = "timer"
            delay += float(self.configs[node] or 0)
        elif t == A.WAIT_SCHEDULE:
            task["kind"] = "timer"
            expr = orjson.loads(self.configs[node])["cron_expr"]
            base = now + timedelta(seconds=delay)
            task["due_at"] = cron.next_tick(expr, base).isoformat()
            delay = 0.0
        elif t == A.SIGNAL:
            task["kind"] = "signal"
            timeout = orjson.loads(self.configs[node]).get("timeout_seconds")
            if timeout is not None:
                task["deadline"] = (now + timedelta(seconds=delay + float(timeout))).isoformat()
        task["delay"] = max(delay, 0.0)
        return task

    def _failure_text(self, node: int, how: int, srcs: list[int]) -> tuple[str, str | None]:
        g = self.graph
        if how == A.HOW_FAIL and srcs:
            child_msg, sqlstate = self.errors.get(srcs[0], ("failed", None))
            if g.types[node] == A.JOIN:
                branches = [g.left[node], g.right[node]]
                if g.extra[node] != A.NONE:
                    branches.append(g.extra[node])
                pos = branches.index(srcs[0]) + 1 if srcs[0] in branches else 0
                return f"JOIN branch {pos} failed: {child_msg}", sqlstate
            return child_msg, sqlstate
        if how == A.HOW_ITERCAP:
            return (f"loop {g.node_ids[node]} exceeded pg_durable.loop_max_iterations "
                    f"({self.sched_max_iterations()})", None)
        if how == A.HOW_BREAK_OUTSIDE:
            return "df.break() was reached outside of any loop", None
        if how == A.HOW_LEAF:
            return self.errors.get(node, ("failed", None))
        return "failed", None

    def sched_max_iterations(self) -> int:
        return int(getattr(self.sched, "max_iterations", 0))
