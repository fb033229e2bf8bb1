"""One round trip for a batch's next steps (a wave): each step's savepoint, a chained step's
bound and its statement, all in one libpq pipeline, and what each step got back
(docs/performance.md, "Session 10").

A round trip costs both sides more CPU than a short step's statement (on the local
PostgreSQL 15, ~180 µs alone against ~45 µs per step when eight steps share one), so a batch
sends the successors of the steps it just ran and more queued steps together. The steps run
one after another, as before, each after ``savepoint pgdurable_step`` (the previous one's
released first: they never nest, :mod:`.in_place`). When one fails, PostgreSQL skips the
rest of the pipeline: those steps did not run, and the batch sends them again in its next
round trip. So a step's failed statement is rolled back to its own savepoint, as when it
was sent alone; what the worker refuses itself after the fact (a result it cannot store)
can no longer be undone alone once steps behind it ran, which is why ``step_next`` checks a
result's size where it is made.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import psycopg

from . import wire
from .chain import step_timeout
from .task import Task, step_app_name


class Skipped:
    """A step that did not run: one before it in its round trip failed."""


SKIPPED = Skipped()

Got = list[tuple[str | None]] | psycopg.Error | Skipped
"""What a step got: its rows (first column, as text), its error, or :data:`SKIPPED`."""


Applied = tuple[bytes, bytes, bytes | None, str]
"""The settings a batch's first step applied, as ``step_next``'s text parameters: the role's
setting names and values, search_path, statement_timeout (ms)."""


class Statements:
    """The statements of a batch's next round trips, prepared on its step session: a later
    step's savepoint, the release of the one before it, a chained step's bound and
    ``step_next``, each parsed and analysed once per batch rather than once per step
    (~35 µs of the backend's CPU per step on the local PostgreSQL 15).

    A tenant's statement runs in this session (inside its runner) and may ``PREPARE`` and
    ``DEALLOCATE`` there: one that put a statement of its own in the place of the worker's
    would have it run outside its runner, with the step session's parameters (its
    capability among them). So the names are random and new for each set, parsed only after
    the batch's first step ran (its statement cannot know them), and every ``step_next``
    checks, right after the tenant's statement, that all of them are still there as the
    worker prepared them (by the protocol: a SQL ``PREPARE``, all a tenant can issue, shows
    as ``from_sql``). One taken away fails that step, and PostgreSQL skips the rest of its
    round trip, so nothing put in its place runs; after any failed step the batch parses a
    new set (:meth:`fresh`). The session reset after the batch (``DEALLOCATE ALL``) drops
    them."""

    def __init__(self, next_call: bytes, direct: bool = False) -> None:
        self.next_call = next_call
        self.direct = direct
        """``next_call`` is the role's next-step runner (``step_next``'s parameters but the
        role), not ``step_next``."""
        self.fresh()

    def fresh(self) -> None:
        """A new set, with new names, parsed in front of the next round trip."""
        tag = secrets.token_hex(12).encode()
        self.release = wire.Prepared(b"pgdurable_%s_release" % tag)
        self.savepoint = wire.Prepared(b"pgdurable_%s_savepoint" % tag)
        self.bound = wire.Prepared(b"pgdurable_%s_bound" % tag)
        self.next = wire.Prepared(b"pgdurable_%s_next" % tag)
        self.parsed = False
        self.names = b"{%s}" % b",".join(
            s.name for s in (self.release, self.savepoint, self.bound, self.next)
        )

    def parses(self) -> list[wire.Command]:
        """The commands that prepare the set (none once they went out)."""
        if self.parsed:
            return []
        self.parsed = True
        return [
            (wire.Parse(self.release.name, b"release savepoint pgdurable_step"), ()),
            (wire.Parse(self.savepoint.name, b"savepoint pgdurable_step"), ()),
            # a chained step's bound, armed as its statement begins (as SET LOCAL)
            (
                wire.Parse(
                    self.bound.name,
                    b"select pg_catalog.set_config('statement_timeout', $1, true)",
                ),
                (),
            ),
            (wire.Parse(self.next.name, self.next_call), ()),
        ]


def commands(
    steps: Sequence[tuple[Task, str]],
    saved: bool,
    applied: Applied,
    stmts: Statements,
    role: bytes,
    cap: bytes,
    runner_cap: bytes,
) -> tuple[list[wire.Command], list[int], list[bool]]:
    """The pipeline of ``steps`` (task, statement), behind the parses of ``stmts`` when they
    have not gone out yet: each step after its savepoint (the last one's released first,
    when ``saved``) and, a chained step (a virtual task), the chain's bound; then
    ``step_next`` with the settings the batch's first step ``applied``. Returns the
    commands, where each step's commands end, and whether each ran under the chain's bound
    rather than its own shorter limit."""
    names, vals, path, timeout = applied
    t = timeout.encode()
    cmds = stmts.parses()
    ends: list[int] = []
    bounded: list[bool] = []
    for task, text in steps:
        if saved:
            cmds.append((stmts.release, ()))
        cmds.append((stmts.savepoint, ()))
        saved = True
        bound = False
        if task.virtual:
            # a chained step runs under the chain's bound (armed as its statement begins)
            limit, bound = step_timeout(timeout)
            cmds.append((stmts.bound, (limit.encode(),)))
        bounded.append(bound)
        # RESET ALL (what the last statement set ends here), the settings again and the
        # statement: one statement (the role's next-step runner, or step_next calling its
        # runner), which arms the limit again for the next one, and checks that the
        # statements of ``stmts`` are still the worker's
        app = step_app_name(task).encode()
        params = (
            (names, vals, path, t, app, cap)
            if stmts.direct
            else (names, vals, path, t, app, role, cap)
        )
        cmds.append((stmts.next, (*params, text.encode(), runner_cap, stmts.names)))
        ends.append(len(cmds))
    return cmds, ends, bounded


async def run(
    conn: psycopg.AsyncConnection[Any], cmds: list[wire.Command], ends: list[int]
) -> list[Got]:
    """Send the pipeline; each step's rows, error or :data:`SKIPPED`, in order. A failed
    parse at its head (see :class:`Statements`) raises: the batch rolls back."""
    got = await wire.pipeline(conn, cmds)
    out: list[Got] = []
    start = sum(isinstance(q, wire.Parse) for q, _ in cmds)
    wire.raise_first_error(conn, got[:start])
    for end in ends:
        part = [r for c in got[start:end] for r in c]
        start = end
        if wire.skipped(part):
            out.append(SKIPPED)
        elif (err := wire.error(conn, part)) is not None:
            out.append(err)
        else:
            last = got[end - 1]
            out.append(wire.column(conn, last[-1] if last else None))
    return out


async def first(
    conn: psycopg.AsyncConnection[Any],
    settings: bytes,
    call: bytes,
    task: Task,
    text: str,
    role: bytes,
    cap: bytes,
    runner_cap: bytes,
) -> tuple[Applied, list[tuple[str | None]]]:
    """A batch's first step, alone, in one round trip: BEGIN, the step settings (one slot,
    the identity: ``step_settings``) and the role's runner (``call``). Returns what the next
    steps apply again, and its rows; its failure raises."""
    got = await wire.results(
        conn,
        [
            (b"begin", ()),
            (settings, (cap, role, step_app_name(task).encode(), role, None)),
            (call, (cap, text.encode(), runner_cap)),
        ],
    )
    applied = (
        (wire.value(conn, got[1], 5) or "{}").encode(),
        (wire.value(conn, got[1], 6) or "{}").encode(),
        wire.param(wire.value(conn, got[1], 0)),
        wire.value(conn, got[1], 7) or "0",
    )
    return applied, wire.column(conn, got[2])
