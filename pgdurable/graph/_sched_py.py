"""The pure-Python scheduler: the executable specification of ``_abc``'s semantics.

``native/_sched_c.pyx`` mirrors this module function for function; a behaviour
change lands here first, with a test, then in the twin.

State is four flat int arrays indexed by node (so :meth:`Scheduler.dump_state`
is a concatenation and the twin can hold them in C arrays):

- ``status``: PENDING / RUNNING / COMPLETED / FAILED of the current generation;
- ``gen``: the generation, +1 at every activation (0 = never activated);
- ``aux``: per type — LOOP: current iteration; RETRY: current attempt; IF: arm
  taken (0 undecided, 1 then, 2 else); JOIN: branches completed; RACE: index of
  the winner + 1 (0 undecided); leaves and THEN: 0;
- ``truth``: 1 when the node completed with a truthy result (a LOOP finishing
  on a falsy condition needs its body's truthy from an earlier call).

A RETRY that waits for its next attempt needs no state of its own: it is the one
case of a RUNNING RETRY whose child is FAILED (:meth:`Scheduler._waiting`).

Every walk is iterative (a THEN chain may nest 10,000 deep) and every scan is
bounded by one subtree, which pre-order makes a contiguous index range
``range(i, graph.end[i])``.
"""

from __future__ import annotations

from typing import Any

from pgdurable.graph._abc import (
    BREAK,
    COMPLETED,
    COND_IF_ROWS,
    FAILED,
    HOW_ARRAY,
    HOW_BREAK,
    HOW_BREAK_OUTSIDE,
    HOW_COPY,
    HOW_FAIL,
    HOW_ITERCAP,
    HOW_LEAF,
    IF,
    JOIN,
    LEAF_TYPES,
    LOOP,
    NODE_TYPE_CODES,
    NONE,
    PENDING,
    RACE,
    RETRY,
    RUNNING,
    T_CANCELLED,
    T_COMPLETED,
    T_FAILED,
    T_RUNNING,
    THEN,
    Step,
)

STATE_VERSION = 1
"""First int of :meth:`Scheduler.dump_state`; bumped when the layout changes."""
_HEADER = 4  # version, node count, started, terminal
_MAX_COUNTER = 1 << 62  # gen/aux bound: fits the twin's int64 arrays with room to add 1

_TYPE_NAMES = {code: name for name, code in NODE_TYPE_CODES.items()}


class Scheduler:
    """One instance's scheduler over a :class:`~pgdurable.graph.compile.CompiledGraph`."""

    def __init__(self, graph: Any, max_iterations: int) -> None:
        n = len(graph.types)
        if n == 0:
            raise ValueError("graph has no nodes")
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        self._graph = graph
        self._n = n
        self._max_iterations = max_iterations
        self._types: tuple[int, ...] = graph.types
        self._left: tuple[int, ...] = graph.left
        self._right: tuple[int, ...] = graph.right
        self._cond: tuple[int, ...] = graph.cond
        self._extra: tuple[int, ...] = graph.extra
        self._parent: tuple[int, ...] = graph.parent
        self._end: tuple[int, ...] = graph.end
        self._attempts: tuple[int, ...] = graph.attempts
        self._status = [PENDING] * n
        self._gen = [0] * n
        self._aux = [0] * n
        self._truth = [0] * n
        self._started = False
        self._terminal = T_RUNNING
        self._reset_out()

    # -- output buffers of the call in progress ------------------------------------

    def _reset_out(self) -> None:
        self._ready: list[tuple[int, int]] = []
        self._abandoned: list[tuple[int, int]] = []
        self._stopped: list[tuple[int, int]] = []
        self._started_out: list[tuple[int, int]] = []
        self._finished: list[tuple[int, int, int, list[int]]] = []
        self._iterations: list[tuple[int, int]] = []

    def _step(self) -> Step:
        """Package the buffers as a Step (ready/abandoned/stopped ascending) and clear them."""
        self._ready.sort()
        self._abandoned.sort()
        self._stopped.sort()
        step = Step(
            self._ready,
            self._abandoned,
            self._started_out,
            self._finished,
            self._iterations,
            self._terminal,
            self._stopped,
        )
        self._reset_out()
        return step

    # -- public API (SchedulerProto) -----------------------------------------------

    def start(self) -> Step:
        """Activate the root; its leaves are the first ``ready``."""
        if self._started:
            raise RuntimeError("scheduler already started")
        self._started = True
        self._activate(0)
        return self._step()

    def complete(self, node: int, gen: int, ok: bool, truthy: bool) -> Step:
        """Apply one leaf outcome (an if_rows IF decision, the end of a RETRY's wait); stale
        ones return an empty Step."""
        self._check_node(node)
        t = self._types[node]
        if_rows = t == IF and self._cond[node] == COND_IF_ROWS
        if t not in LEAF_TYPES and not if_rows and t != RETRY:
            raise ValueError(
                f"node {node} is a {_TYPE_NAMES[t]}: only leaves, if_rows IF "
                "decisions and RETRY waits are completed by the executor"
            )
        if not self._started:
            raise RuntimeError("scheduler not started")
        # the generation fence: only the active generation of a running node counts,
        # and an if_rows IF only until it has been decided (aux != 0 afterwards)
        if (
            self._terminal != T_RUNNING
            or self._status[node] != RUNNING
            or gen != self._gen[node]
            or (if_rows and self._aux[node] != 0)
            or (t == RETRY and not self._waiting(node))
        ):
            return self._step()
        if t == RETRY:
            if ok:
                self._next_attempt(node)
            else:  # the executor gave up: the child's failure is the RETRY's
                self._finish(node, FAILED, HOW_FAIL, [self._left[node]])
                self._propagate(node)
            return self._step()
        if if_rows:
            if ok:
                self._take_arm(node, bool(truthy))
            else:
                self._finish(node, FAILED, HOW_LEAF, [])
                self._propagate(node)
            return self._step()
        if ok:
            self._status[node] = COMPLETED
            self._truth[node] = 1 if truthy else 0
            self._finished.append((node, COMPLETED, HOW_LEAF, []))
            if t == BREAK:
                self._break(node)
            else:
                self._propagate(node)
        else:
            self._finish(node, FAILED, HOW_LEAF, [])
            self._propagate(node)
        return self._step()

    def cancel(self) -> Step:
        """Abandon every active leaf and end as T_CANCELLED (no-op once terminal)."""
        if self._terminal != T_RUNNING:
            return self._step()
        self._started = True  # a cancelled scheduler can never start
        self._abandon_range(0, self._n)
        self._terminal = T_CANCELLED
        return self._step()

    def status(self, node: int) -> int:
        self._check_node(node)
        return self._status[node]

    def gen(self, node: int) -> int:
        self._check_node(node)
        return self._gen[node]

    def iteration(self, loop: int) -> int:
        self._check_node(loop)
        if self._types[loop] not in (LOOP, RETRY):
            raise ValueError(
                f"node {loop} is a {_TYPE_NAMES[self._types[loop]]}, not a LOOP or RETRY"
            )
        return self._aux[loop]

    @property
    def terminal(self) -> int:
        return self._terminal

    def dump_state(self) -> list[int]:
        """``[version, n, started, terminal] + status + gen + aux + truth``."""
        return [
            STATE_VERSION,
            self._n,
            int(self._started),
            self._terminal,
            *self._status,
            *self._gen,
            *self._aux,
            *self._truth,
        ]

    @classmethod
    def load_state(cls, graph: Any, max_iterations: int, state: list[int]) -> Scheduler:
        """Rebuild from :meth:`dump_state`; ValueError names the malformed part."""
        self = cls(graph, max_iterations)
        n = self._n
        _check_state(state, n)
        self._started = bool(state[2])
        self._terminal = state[3]
        base = _HEADER
        self._status = list(state[base : base + n])
        self._gen = list(state[base + n : base + 2 * n])
        self._aux = list(state[base + 2 * n : base + 3 * n])
        self._truth = list(state[base + 3 * n : base + 4 * n])
        return self

    # -- internals -----------------------------------------------------------------

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self._n:
            raise IndexError(f"node {node} out of range for a graph of {self._n} nodes")

    def _finish(self, node: int, status: int, how: int, sources: list[int]) -> None:
        """Record a node's end (truth is set by the caller when it completes)."""
        self._status[node] = status
        self._finished.append((node, status, how, sources))

    def _activate(self, node: int) -> None:
        """Activate ``node`` and, depth-first in child order, what it starts with."""
        types, status, gen, aux = self._types, self._status, self._gen, self._aux
        stack = [node]
        while stack:
            n = stack.pop()
            status[n] = RUNNING
            gen[n] += 1
            self._started_out.append((n, gen[n]))
            t = types[n]
            if t in LEAF_TYPES:
                self._ready.append((n, gen[n]))
            elif t == THEN:
                stack.append(self._left[n])
            elif t == IF:
                aux[n] = 0  # undecided
                c = self._cond[n]
                if c == COND_IF_ROWS:
                    self._ready.append((n, gen[n]))  # the executor decides it
                else:
                    stack.append(c)
            elif t in (LOOP, RETRY):
                aux[n] = 1  # first iteration / attempt
                stack.append(self._left[n])
            else:  # JOIN, RACE: every branch at once; pushed reversed so left pops first
                aux[n] = 0
                if self._extra[n] != NONE:
                    stack.append(self._extra[n])
                stack.append(self._right[n])
                stack.append(self._left[n])

    def _take_arm(self, node: int, truthy: bool) -> None:
        """An IF is decided: run the then-arm (truthy) or the else-arm."""
        self._aux[node] = 1 if truthy else 2
        self._activate(self._left[node] if truthy else self._right[node])

    def _abandon_range(self, lo: int, hi: int) -> None:
        """Stop every running node in ``range(lo, hi)``.

        Running nodes become FAILED without a ``finished`` entry; the ones the
        executor is working on (leaves, undecided if_rows IFs) are reported in
        ``abandoned`` so it can stop them, the other composites in ``stopped`` so
        it can record them ended. Their generation is kept, so their late
        completions are fenced off.
        """
        status, types = self._status, self._types
        for i in range(lo, hi):
            if status[i] == RUNNING:
                status[i] = FAILED
                t = types[i]
                if (
                    t in LEAF_TYPES
                    or (t == IF and self._cond[i] == COND_IF_ROWS and self._aux[i] == 0)
                    or (t == RETRY and status[self._left[i]] == FAILED)  # waiting: a task
                ):
                    self._abandoned.append((i, self._gen[i]))
                else:
                    self._stopped.append((i, self._gen[i]))

    def _abandon_siblings(self, node: int, child: int) -> None:
        """Abandon the running branches of JOIN/RACE ``node`` other than ``child``."""
        for b in (self._left[node], self._right[node], self._extra[node]):
            if b != NONE and b != child:
                self._abandon_range(b, self._end[b])

    def _iterate(self, loop: int) -> bool:
        """Begin the loop's next iteration; False (loop failed) past max_iterations."""
        k = self._aux[loop] + 1
        if k > self._max_iterations:
            self._finish(loop, FAILED, HOW_ITERCAP, [])
            return False
        self._aux[loop] = k
        self._iterations.append((loop, k))
        # reset the body and condition subtree: pending, no per-node progress; the
        # generation stays and grows by one when each node is next activated
        for i in range(loop + 1, self._end[loop]):
            self._status[i] = PENDING
            self._aux[i] = 0
            self._truth[i] = 0
        self._activate(self._left[loop])
        return True

    def _waiting(self, retry: int) -> bool:
        """A RUNNING RETRY waits for its next attempt exactly when its child has failed."""
        return self._status[retry] == RUNNING and self._status[self._left[retry]] == FAILED

    def _next_attempt(self, retry: int) -> None:
        """A waiting RETRY's delay is over: reset its child subtree and run it again."""
        k = self._aux[retry] + 1
        self._aux[retry] = k
        self._iterations.append((retry, k))
        for i in range(retry + 1, self._end[retry]):
            self._status[i] = PENDING
            self._aux[i] = 0
            self._truth[i] = 0
        self._activate(self._left[retry])

    def _propagate(self, child: int) -> None:
        """``child`` just finished: let each ancestor react until one keeps running."""
        self._propagate_from(child, HOW_FAIL, NONE)

    def _propagate_from(self, child: int, fail_how: int, fail_src: int) -> None:
        """Walk up from finished ``child``.

        A failed child fails its parent with ``fail_how``; the source is the child
        itself, or ``fail_src`` when set (a BREAK outside any loop names itself at
        every level).
        """
        status, types, aux = self._status, self._types, self._aux
        while True:
            p = self._parent[child]
            if p == NONE:
                self._terminal = T_COMPLETED if status[child] == COMPLETED else T_FAILED
                return
            t = types[p]
            failed = status[child] == FAILED or fail_src != NONE
            if t == RACE:
                aux[p] = child + 1  # first to finish wins, ok or failed
                self._abandon_siblings(p, child)
            if t == RETRY and failed and fail_src == NONE and aux[p] < self._attempts[p]:
                self._ready.append((p, self._gen[p]))  # waits: the executor times the delay
                return
            if failed:
                if t == JOIN:
                    self._abandon_siblings(p, child)
                self._finish(p, FAILED, fail_how, [child if fail_src == NONE else fail_src])
                child = p
                continue
            if t == THEN:
                if child == self._left[p]:
                    self._activate(self._right[p])
                    return
                self._complete_copy(p, child)
            elif t == IF:
                if child == self._cond[p]:
                    self._take_arm(p, self._truth[child] == 1)
                    return
                self._complete_copy(p, child)
            elif t == LOOP:
                body = self._left[p]
                if child == body and self._cond[p] != NONE:
                    self._activate(self._cond[p])  # do-while: test after the body
                    return
                if child == body or self._truth[child]:
                    if self._iterate(p):
                        return
                    # fell through: the loop failed (iteration cap)
                else:
                    self._complete_copy(p, body)  # falsy condition: body's last result
            elif t == RETRY:
                self._complete_copy(p, child)
            elif t == JOIN:
                aux[p] += 1
                if aux[p] < (2 if self._extra[p] == NONE else 3):
                    return
                srcs = [self._left[p], self._right[p]]
                if self._extra[p] != NONE:
                    srcs.append(self._extra[p])
                self._finish(p, COMPLETED, HOW_ARRAY, srcs)
                self._truth[p] = 1  # a non-empty array
            else:  # RACE, won (the loser was abandoned above)
                self._complete_copy(p, child)
            child = p

    def _complete_copy(self, node: int, src: int) -> None:
        self._finish(node, COMPLETED, HOW_COPY, [src])
        self._truth[node] = self._truth[src]

    def _break(self, brk: int) -> None:
        """BREAK ``brk`` completed: unwind to the nearest enclosing LOOP."""
        loop = self._parent[brk]
        while loop != NONE and self._types[loop] != LOOP:
            loop = self._parent[loop]
        if loop == NONE:
            # no loop to break: the BREAK stays completed, every ancestor fails
            if self._parent[brk] == NONE:
                self._terminal = T_FAILED  # a root BREAK: no chain, the instance fails
            else:
                self._propagate_from(brk, HOW_BREAK_OUTSIDE, brk)
            return
        # composites between the BREAK and the loop complete with the break value
        child, p = brk, self._parent[brk]
        while p != loop:
            if self._types[p] == RACE:
                self._aux[p] = child + 1  # the branch that broke out won
            self._finish(p, COMPLETED, HOW_BREAK, [brk])
            self._truth[p] = self._truth[brk]
            child, p = p, self._parent[p]
        # whatever else still runs under the loop (other JOIN/RACE branches) stops
        self._abandon_range(loop + 1, self._end[loop])
        self._finish(loop, COMPLETED, HOW_BREAK, [brk])
        self._truth[loop] = self._truth[brk]
        self._propagate(loop)


def _check_state(state: Any, n: int) -> None:
    """Validate a dump_state list for a graph of ``n`` nodes (shared layout with the twin)."""
    if not isinstance(state, list):
        raise ValueError(f"state must be a list of ints, not {type(state).__name__}")
    expected = _HEADER + 4 * n
    if len(state) != expected:
        raise ValueError(f"state has {len(state)} ints, expected {expected} for {n} nodes")
    for i, v in enumerate(state):
        if type(v) is not int:
            raise ValueError(f"state[{i}] is not an int: {v!r}")
    if state[0] != STATE_VERSION:
        raise ValueError(f"state version {state[0]} is not {STATE_VERSION}")
    if state[1] != n:
        raise ValueError(f"state is for {state[1]} nodes, the graph has {n}")
    if state[2] not in (0, 1):
        raise ValueError(f"state started flag {state[2]} is not 0 or 1")
    if not T_RUNNING <= state[3] <= T_CANCELLED:
        raise ValueError(f"state terminal {state[3]} is not a terminal code")
    for part, lo, hi in (
        ("status", PENDING, FAILED),
        ("gen", 0, _MAX_COUNTER - 1),
        ("aux", 0, _MAX_COUNTER - 1),
        ("truth", 0, 1),
    ):
        base = _HEADER + ("status", "gen", "aux", "truth").index(part) * n
        for i in range(n):
            v = state[base + i]
            if not lo <= v <= hi:
                raise ValueError(f"state {part}[{i}] = {v} is out of range")
