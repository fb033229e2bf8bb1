"""The contract every scheduler implementation satisfies.

A scheduler decides, for one workflow instance, what runs next. It is a pure
function of its inputs: no I/O, no clock, no logging, no asyncio. Inputs and
outputs are ints, tuples and lists in a deterministic order, so the pure-Python
twin (``_sched_py``, the executable specification) and the Cython twin
(``native/_sched_c.pyx``) can be compared exactly.

Node indices are positions in :class:`pgdurable.graph.compile.CompiledGraph`
(pre-order, root = 0). Every activation of a node has a *generation* (1 on its
first activation, +1 each time a loop re-activates it); completions carry the
generation they belong to, and a completion for a node that is not active in
that generation is ignored (returns an empty :class:`Step`) — the fence that
makes late or duplicate completions harmless.

Semantics (docs/api.md; the twins must agree on every detail):

- Leaves (SQL, HTTP, HTTP_MULTIPART, BREAK, SLEEP, WAIT_SCHEDULE, SIGNAL) are
  reported in ``Step.ready`` when activated; the executor runs them and calls
  :meth:`SchedulerProto.complete`. An IF whose ``cond`` is :data:`COND_IF_ROWS`
  is also reported in ``ready`` when activated (and a RETRY when it begins to
  wait for its next attempt, below): the executor decides it
  (row_count > 0 of the named result) and completes the IF's *decision* with
  ``complete(if_node, gen, ok, truthy)``; ok=False fails the IF.
- THEN runs left, then right; result = right's. A failed left fails the THEN.
- IF with a condition node runs the condition, then the taken arm (truthy of
  the condition's result → left, else right); result = the arm's.
- JOIN (2 branches, or 3 with ``extra``) activates all branches at once; result
  = array of branch results in branch order; the first failed branch fails the
  JOIN at once and abandons the other branches' active leaves.
- RACE activates both branches; the first branch to finish (ok or failed) wins,
  the other's active leaves are abandoned; result/status = the winner's.
- LOOP runs body; with a condition (do-while) it then runs the condition and
  iterates while truthy, completing with the body's last result when falsy;
  without one it iterates forever (until BREAK). Re-activation resets every node
  of the body (and condition) subtree to pending and reports ``Step.iterations``;
  each node's generation grows by 1 when it is next activated (so a node an
  earlier iteration never reached keeps generation 0 until it first runs).
  Starting iteration ``max_iterations + 1`` fails the loop (:data:`HOW_ITERCAP`).
  A failed body or condition fails the loop.
- RETRY (``df.retry``) runs its child (``left``; ``attempts`` = max_attempts) and
  completes with the child's result (HOW_COPY). ``aux`` holds the current attempt
  (1 on activation). When the child fails and attempts remain, the RETRY does not
  fail: it *waits* (it stays RUNNING, its child FAILED) and is reported in
  ``ready`` with its unchanged generation; the executor schedules the delay and
  then calls ``complete(retry, gen, ok, truthy)``: ok=True begins the next attempt
  (the child subtree is reset to pending exactly as a loop iteration resets its
  body, ``aux`` grows by 1, ``iterations`` reports ``(retry, attempt)``, the
  child is activated again, each node with generation + 1); ok=False gives up
  (the RETRY fails HOW_FAIL, sources = [child]). A completion of a RETRY that is
  not waiting is ignored (empty Step). When the last attempt fails the RETRY
  fails HOW_FAIL like any composite. A BREAK outside any loop is not retried
  (it would fail the same way again). A waiting RETRY abandoned with its branch
  (or on cancel) is listed in ``abandoned`` (it has a task: its delay), a
  running one in ``stopped``.
- BREAK completes and unwinds to the nearest enclosing LOOP (across THEN, IF,
  JOIN, RACE): every active node below that loop is abandoned (leaves reported
  in ``abandoned``; composites between the BREAK and the loop are finished as
  completed with :data:`HOW_BREAK`), and the loop completes with ``HOW_BREAK``
  (result = the BREAK's value). With no enclosing loop the BREAK completes and
  its parent chain fails with :data:`HOW_BREAK_OUTSIDE` (every ancestor,
  sources = [the BREAK]); a BREAK that is the root completes and ``terminal``
  becomes T_FAILED.
- A failure propagates to every enclosing composite up to the root (each
  finished as failed with :data:`HOW_FAIL`, sources = [failing child]); a RACE
  won by a failed branch is finished with HOW_FAIL too.
- Abandoned nodes (RACE losers, other branches of a failed JOIN, what runs
  below a broken loop, everything on cancel) become FAILED without a
  ``finished`` entry; the ones the executor works on (leaves, undecided if_rows
  IFs) are listed in ``abandoned``, every other one (the composites: THEN, IF,
  LOOP, JOIN, RACE) in ``stopped``, so the executor can record each of them as
  ended (no node of an abandoned branch stays running, a loop included). Their
  generation is kept, so their late completions are ignored.
- A successful if_rows decision has no ``finished`` entry: the IF keeps running
  its arm and finishes (HOW_COPY) with it; a failed one finishes it HOW_LEAF.
- The root finishing sets ``terminal`` to COMPLETED or FAILED.
- ``truthy`` of a composite's result is derived: COPY → the source's truthy;
  ARRAY → True (a JOIN result is a non-empty array); BREAK → the BREAK's truthy.

Ordering: one call activates one subtree depth-first in child order
(condition, left, right, extra), so ``started`` and ``ready`` come out in
ascending index order; ``finished`` lists the completed leaf first, then its
ancestors innermost first (a BREAK: the BREAK, the composites up to the loop,
the loop, then the loop's ancestors).

Misuse raises: an index outside the graph → IndexError; completing a composite
other than an if_rows IF or a RETRY → ValueError; ``complete`` before ``start`` or a
second ``start`` → RuntimeError; ``max_iterations < 1`` → ValueError.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

# node type codes (CompiledGraph.types)
(
    SQL,
    THEN,
    IF,
    LOOP,
    JOIN,
    RACE,
    BREAK,
    SLEEP,
    WAIT_SCHEDULE,
    SIGNAL,
    HTTP,
    HTTP_MULTIPART,
    RETRY,
    FOREACH,
) = range(14)
NODE_TYPE_CODES = {
    "SQL": SQL,
    "THEN": THEN,
    "IF": IF,
    "LOOP": LOOP,
    "JOIN": JOIN,
    "RACE": RACE,
    "BREAK": BREAK,
    "SLEEP": SLEEP,
    "WAIT_SCHEDULE": WAIT_SCHEDULE,
    "SIGNAL": SIGNAL,
    "HTTP": HTTP,
    "HTTP_MULTIPART": HTTP_MULTIPART,
    "RETRY": RETRY,
    "FOREACH": FOREACH,
}
# FOREACH (df.foreach) is a leaf to the scheduler: its bodies run as child instances the
# executor starts and waits for (pgdurable/steps/foreach_step.py, docs/foreach.md)
LEAF_TYPES = frozenset({SQL, BREAK, SLEEP, WAIT_SCHEDULE, SIGNAL, HTTP, HTTP_MULTIPART, FOREACH})

NONE = -1
"""No child / no condition."""
COND_IF_ROWS = -2
"""``cond`` of an IF built by df.if_rows: decided by the executor, no condition node."""

# node status codes (status(), dump_state)
PENDING, RUNNING, COMPLETED, FAILED = 0, 1, 2, 3
# terminal codes
T_RUNNING, T_COMPLETED, T_FAILED, T_CANCELLED = 0, 1, 2, 3

# Step.finished "how": where the finished node's result (or error) comes from
HOW_LEAF = 0
"""A leaf completed/failed by :meth:`complete`: its own result (or error)."""
HOW_COPY = 1
"""Result = result of sources[0] (THEN right, IF arm, RACE winner, LOOP last body)."""
HOW_ARRAY = 2
"""Result = JSON array of the sources' results in order (JOIN)."""
HOW_FAIL = 3
"""Failed because child sources[0] failed (its error propagates)."""
HOW_BREAK = 4
"""Completed by the BREAK node sources[0] (result = its value)."""
HOW_ITERCAP = 5
"""LOOP failed: it would exceed max_iterations."""
HOW_BREAK_OUTSIDE = 6
"""Failed: BREAK sources[0] has no enclosing LOOP."""


class Step(NamedTuple):
    """What one scheduler call decided (all lists in event order unless noted)."""

    ready: list[tuple[int, int]]
    """(node, gen) activated leaves (and if_rows IF decisions, waiting RETRYs) to execute,
    ascending node."""
    abandoned: list[tuple[int, int]]
    """(node, gen) active leaves to stop: RACE losers, branches of a failed JOIN, break, cancel."""
    started: list[tuple[int, int]]
    """(node, gen) every node (leaf or composite) activated, in activation order."""
    finished: list[tuple[int, int, int, list[int]]]
    """(node, status COMPLETED|FAILED, how HOW_*, sources), innermost first."""
    iterations: list[tuple[int, int]]
    """(loop node, iteration number ≥ 2) loops that began a new iteration, and
    (RETRY node, attempt number ≥ 2) RETRYs that began a new attempt."""
    terminal: int
    """T_RUNNING, T_COMPLETED, T_FAILED or T_CANCELLED after this call."""
    stopped: list[tuple[int, int]]
    """(node, gen) active composites abandoned with their branch (they have no task of their
    own), ascending node; the executor records them failed like the ``abandoned`` leaves."""


class SchedulerProto(Protocol):
    """One instance's scheduler (see the module docstring for the semantics)."""

    def __init__(self, graph: object, max_iterations: int) -> None: ...

    def start(self) -> Step:
        """Activate the root. Calling it twice is an error (RuntimeError)."""
        ...

    def complete(self, node: int, gen: int, ok: bool, truthy: bool) -> Step:
        """Report that active leaf ``node`` (an if_rows IF decision, a RETRY's wait) finished."""
        ...

    def cancel(self) -> Step:
        """Abandon every active leaf; terminal becomes T_CANCELLED (no-op once terminal)."""
        ...

    def status(self, node: int) -> int:
        """PENDING, RUNNING, COMPLETED or FAILED for the node's current generation."""
        ...

    def gen(self, node: int) -> int:
        """The node's current generation (0 before its first activation)."""
        ...

    def iteration(self, loop: int) -> int:
        """The LOOP's current iteration, or the RETRY's current attempt (0 before activation)."""
        ...

    @property
    def terminal(self) -> int: ...

    def dump_state(self) -> list[int]:
        """The whole mutable state as ints; ``load_state`` restores an equal scheduler."""
        ...

    @classmethod
    def load_state(cls, graph: object, max_iterations: int, state: list[int]) -> SchedulerProto:
        """Rebuild from :meth:`dump_state` output; ValueError names what is malformed."""
        ...
