"""A round trip of a batch's later steps (pgdurable/worker/wave.py): the statements the
worker prepared in the step session, parsed once in front of the first round trip; each
step's savepoint, never nested; a chained step's bound; ``step_next`` told which prepared
statements to check for."""

from __future__ import annotations

from pgdurable.worker import wire
from pgdurable.worker.task import Task
from pgdurable.worker.wave import Statements, commands

from . import tasks

APPLIED = (b"{}", b"{}", b"public", "5000")


def task(node_id: str, virtual: bool = False) -> Task:
    return tasks.task("3fa2b1c4", node_id, virtual)


def build(stmts: Statements, saved: bool, *steps: Task) -> tuple[list[wire.Command], list[int]]:
    cmds, ends, _bounded = commands(
        [(t, f"select {i}") for i, t in enumerate(steps)], saved, APPLIED, stmts, b"1", b"c", b"9"
    )
    return cmds, ends


def test_the_statements_are_parsed_once_in_front_of_the_first_round_trip():
    stmts = Statements(b"select * from next($1)")
    cmds, ends = build(stmts, False, task("a"), task("b"))
    kinds = [type(q).__name__ for q, _ in cmds]
    assert kinds[:4] == ["Parse"] * 4
    assert [q for q, _ in cmds[:4]] == [
        wire.Parse(stmts.release.name, b"release savepoint pgdurable_step"),
        wire.Parse(stmts.savepoint.name, b"savepoint pgdurable_step"),
        wire.Parse(
            stmts.bound.name, b"select pg_catalog.set_config('statement_timeout', $1, true)"
        ),
        wire.Parse(stmts.next.name, b"select * from next($1)"),
    ]
    # the first later step opens its savepoint; the next releases it first: never nested
    assert [q for q, _ in cmds[4:]] == [
        stmts.savepoint,
        stmts.next,
        stmts.release,
        stmts.savepoint,
        stmts.next,
    ]
    assert ends == [6, 9]
    # the next round trip reuses them
    again, ends = build(stmts, True, task("c"))
    assert [q for q, _ in again] == [stmts.release, stmts.savepoint, stmts.next]
    assert ends == [3]


def test_step_next_is_told_the_names_to_check_and_a_chained_step_gets_its_bound():
    stmts = Statements(b"select * from next($1)")
    stmts.parses()
    cmds, _ = build(stmts, True, task("a", virtual=True))
    assert [q for q, _ in cmds] == [stmts.release, stmts.savepoint, stmts.bound, stmts.next]
    assert cmds[2][1] == (b"100",)  # the chain's bound (CHAIN_STEP_MAX_MS) under 5000 ms
    params = cmds[3][1]
    assert params[-1] == b"{%s,%s,%s,%s}" % (
        stmts.release.name,
        stmts.savepoint.name,
        stmts.bound.name,
        stmts.next.name,
    )
    assert params[-3:-1] == (b"select 0", b"9")


def test_a_fresh_set_has_new_names_and_is_parsed_again():
    stmts = Statements(b"q")
    old = stmts.names
    assert stmts.parses()
    assert not stmts.parses()
    stmts.fresh()
    assert stmts.names != old
    assert stmts.release.name.startswith(b"pgdurable_")
    assert len(stmts.release.name) > 30
    assert len(stmts.parses()) == 4


def test_the_next_step_runner_gets_step_nexts_parameters_but_the_role():
    via_step_next, direct = Statements(b"n"), Statements(b"n", direct=True)
    for s in (via_step_next, direct):
        s.parses()
    (_, _, old), _ = build(via_step_next, True, task("a"))
    (_, _, new), _ = build(direct, True, task("a"))
    assert old[1][5] == b"1"  # step_next: the role, before the capability
    assert new[1] == old[1][:5] + old[1][6:-1] + (direct.names,)
    assert len(new[1]) == 9
