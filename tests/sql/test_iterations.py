"""Inferred status and df.explain describe the current iteration of every loop (and a decided
RACE's loser), on both schedulers.

No serve here, and nothing hand-written: the worker's own per-instance state
(pgdurable/worker/instance.py: the scheduler twin under test plus the checkpoint builder)
runs over the instance's real rows, and every checkpoint it builds goes through the engine's
``_apply_v1``, exactly as ``pgdurable serve`` applies it. Only the steps themselves are not
run: each test says how a step ended (its result), which is all the scheduler sees. The
end-to-end twins of these tests, through a real serve, are in
tests/acceptance/test_iterations.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from psycopg import sql

from pgdurable.graph import _abc as A
from pgdurable.queries import q
from pgdurable.values import check_size, truthy
from pgdurable.worker import instance as instance_mod
from pgdurable.worker.instance import Checkpoint, InstanceCtx

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ROW_TRUE = {"rows": [{"b": True}], "row_count": 1, "columns": ["b"]}
ROW_FALSE = {"rows": [{"b": False}], "row_count": 1, "columns": ["b"]}
ROW_ONE = {"rows": [{"n": 1}], "row_count": 1, "columns": ["n"]}
SIGNALLED = {"signal_name": "go", "timed_out": False, "data": {}}


class Driver:
    """The executor's side of one instance, one checkpoint per outcome (see the module doc)."""

    def __init__(self, tx: Any, user: str, expr: str) -> None:
        self.tx, self.user = tx, user
        self.iid = tx.execute(f"select df.start({expr})").fetchone()[0]
        self._engine()
        inst = tx.execute(q("load_instance"), (self.iid,)).fetchone()
        rows = tx.execute(q("load_nodes"), (self.iid,)).fetchall()
        named = tx.execute(q("load_results"), (self.iid,)).fetchall()
        self.ctx = InstanceCtx.from_rows(self.iid, inst, rows, named, 100, 0.0)
        self._tenant()
        cp = Checkpoint(inst_status="running")
        self._apply(self.ctx.sched.start(), cp)

    def _engine(self) -> None:
        self.tx.execute("reset role")

    def _tenant(self) -> None:
        self.tx.execute(sql.SQL("set local role {}").format(sql.Identifier(self.user)))

    def _apply(self, step: A.Step, cp: Checkpoint) -> None:
        self.ctx.build(step, cp, NOW)
        if step.terminal != A.T_RUNNING:
            cp.inst_status = {A.T_COMPLETED: "completed", A.T_FAILED: "failed"}[step.terminal]
        self._engine()
        got = self.tx.execute(
            q("apply"),
            (
                "test-worker",
                self.iid,
                None,
                None,
                self.ctx.version,
                instance_mod.dump(self.ctx.sched.dump_state()),
                cp.inst_status,
                orjson.dumps(list(cp.nodes.values())).decode(),
                orjson.dumps(cp.new_tasks).decode() if cp.new_tasks else None,
                cp.drop_tasks or None,
                orjson.dumps(cp.named).decode() if cp.named else None,
                30,
            ),
        ).fetchone()[0]
        assert got > 0, got
        self.ctx.version = got
        self._tenant()

    def node(self, node_type: str, query_part: str | None = None) -> str:
        """The id of the one node of that type (whose query contains query_part)."""
        rows = self.tx.execute(
            "select id from df.nodes where instance_id = %s and node_type = %s "
            "and (%s::text is null or strpos(query, %s) > 0)",
            (self.iid, node_type, query_part, query_part),
        ).fetchall()
        assert len(rows) == 1, (node_type, query_part, rows)
        return str(rows[0][0])

    def running(self) -> list[str]:
        """The leaves the scheduler wants run now (node ids)."""
        g = self.ctx.graph
        return [
            g.node_ids[i]
            for i, t in enumerate(g.types)
            if t in A.LEAF_TYPES and self.ctx.sched.status(i) == A.RUNNING
        ]

    def done(self, node_id: str, value: Any, ok: bool = True) -> None:
        """What the worker does when a leaf's step ended (Checkpointer.record)."""
        idx = self.ctx.index[node_id]
        assert self.ctx.sched.status(idx) == A.RUNNING, f"{node_id} is not running"
        cp = Checkpoint()
        if ok:
            data = check_size(value, 0, "step result")
            self.ctx.record_leaf(idx, value, data, cp)
        else:
            self.ctx.errors[idx] = (value, None)
            upd = cp.node(node_id)
            upd["status"], upd["result"] = "failed", value
        step = self.ctx.sched.complete(idx, self.ctx.sched.gen(idx), ok, ok and truthy(value))
        self._apply(step, cp)

    def inferred(self) -> dict[str, tuple[str, str, str | None]]:
        """{node id: (physical status, inferred status, inferred from)} as the tenant sees it."""
        return {
            r[0]: (r[1], r[2], r[3])
            for r in self.tx.execute(
                "select node_id, status, inferred_status, inferred_status_from_ancestor_id "
                "from df.instance_nodes(%s)",
                (self.iid,),
            )
        }

    def explain(self) -> str:
        return str(self.tx.execute("select df.explain(%s)", (self.iid,)).fetchone()[0])


@pytest.fixture
def drive(tx, user, impl, monkeypatch):
    """Driver factory; the worker's instance state uses the scheduler twin under test."""
    monkeypatch.setattr(instance_mod, "Scheduler", impl)
    return lambda expr: Driver(tx, user, expr)


# the workflow: the first iteration takes the else arm, the second the then arm
LOOPSIG = (
    "@> ( df.sql('select 1') ~> df.if(df.sql('select (select count(*) from it) >= 1'), "
    "df.wait_for_signal('go', 60) ~> df.break('{}'), "
    "df.sql('insert into it values (1)')) )"
)


def test_second_iteration_shows_the_arm_it_takes(drive):
    d = drive(LOOPSIG)
    lp, if_ = d.node("LOOP"), d.node("IF")
    one, cond = d.node("SQL", "select 1"), d.node("SQL", "count(*)")
    sig, brk, ins = d.node("SIGNAL"), d.node("BREAK"), d.node("SQL", "insert")
    # iteration 1: the condition is false, the else arm inserts
    d.done(one, ROW_ONE)
    d.done(cond, ROW_FALSE)
    got = d.inferred()
    assert got[ins] == ("running", "running", None)
    assert got[sig][1:] == ("skipped", if_)
    assert got[brk][1:] == ("skipped", if_)
    d.done(ins, {"rows": [], "row_count": 1, "columns": []})
    # iteration 2 began: nothing of iteration 1 is shown as this iteration's outcome
    assert d.running() == [one]
    got = d.inferred()
    assert got[lp][1] == "running"
    assert got[one][1] == "running"
    assert got[if_] == ("completed", "pending", lp)  # superseded: iteration 1's row
    assert got[ins] == ("completed", "pending", lp)
    assert got[sig][1] == "pending"
    assert got[brk][1] == "pending"
    d.done(one, ROW_ONE)
    # the IF is running again and has not decided: neither arm is skipped
    got = d.inferred()
    assert got[if_][1] == "running"
    assert got[sig][1] == "pending"
    assert got[brk][1] == "pending"
    assert got[ins] == ("completed", "pending", lp)
    # the condition is true now: the then arm waits for the signal
    d.done(cond, ROW_TRUE)
    assert d.running() == [sig]
    got = d.inferred()
    assert got[sig] == ("running", "running", None)
    assert got[brk] == ("pending", "pending", None)
    assert got[ins] == ("completed", "skipped", if_)  # this iteration's untaken arm
    assert got[if_][1] == "running"
    assert got[lp][1] == "running"
    text = d.explain()
    # the then arm is a sequence: its label line, then one line per step
    assert "then:\n" in text, text
    assert "⏳ SIGNAL 'go' (timeout 60s)" in text, text
    assert "→ ○ BREAK {}" in text, text
    assert "else: ⊘ SQL: insert into it values (1)" in text, text
    assert "⊘ SIGNAL" not in text
    # the signal arrives, the break ends the loop and the instance
    d.done(sig, SIGNALLED)
    d.done(brk, {})
    got = d.inferred()
    assert got[lp] == ("completed", "completed", None)
    assert got[sig][1:] == ("completed", None)
    assert got[brk][1:] == ("completed", None)
    assert got[ins][1:] == ("skipped", if_)
    assert "running" not in {v[0] for v in got.values()}


def test_a_decision_left_by_an_earlier_iteration_is_not_applied(drive, tx):
    # Rows as a worker before this fix left them (instances in flight across an upgrade):
    # a re-activated IF whose row still says "branch": "else" from iteration 1. Readers must
    # see that the decision is older than the activation and ignore it.
    d = drive(LOOPSIG)
    if_, sig = d.node("IF"), d.node("SIGNAL")
    one, cond = d.node("SQL", "select 1"), d.node("SQL", "count(*)")
    d.done(one, ROW_ONE)
    d.done(cond, ROW_FALSE)
    d.done(d.node("SQL", "insert"), {"rows": [], "row_count": 1, "columns": []})
    d.done(one, ROW_ONE)
    d.done(cond, ROW_TRUE)
    tx.execute("reset role")
    decided, seq = tx.execute(
        "select (status_details ->> 'decided_seq')::int, (status_details ->> 'seq')::int "
        "from df.nodes where instance_id = %s and id = %s",
        (d.iid, if_),
    ).fetchone()
    assert decided >= seq  # the worker stamps the decision of this activation
    tx.execute(
        "update df.nodes set status_details = status_details - 'decided_seq' "
        "|| jsonb_build_object('branch', 'else', 'finished_seq', %s::int - 2) "
        "where instance_id = %s and id = %s",
        (seq, d.iid, if_),
    )
    d._tenant()
    assert d.inferred()[sig][1:] == ("running", None)
    text = d.explain()
    assert "⏳ SIGNAL 'go'" in text, text
    assert "⊘ SIGNAL" not in text, text


def test_race_in_a_loop_shows_the_current_iterations_winner(drive):
    d = drive(
        "df.loop(df.race(df.sql('select ''a1''') ~> df.wait_for_signal('a'), "
        "df.sql('select ''b1''') ~> df.wait_for_signal('b')), df.sql('select ''again'''))"
    )
    lp, race = d.node("LOOP"), d.node("RACE")
    a1, b1 = d.node("SQL", "a1"), d.node("SQL", "b1")
    sa, sb = d.node("SIGNAL", '"a"'), d.node("SIGNAL", '"b"')
    again = d.node("SQL", "again")
    then_a, then_b = (
        d.tx.execute(
            "select id from df.nodes where instance_id = %s and "
            "node_type = 'THEN' and left_node = %s",
            (d.iid, x),
        ).fetchone()[0]
        for x in (a1, b1)
    )
    d.done(a1, ROW_ONE)
    d.done(b1, ROW_ONE)
    d.done(sa, SIGNALLED)  # branch 1 wins iteration 1
    got = d.inferred()
    # the loser ended: no node of it stays running (D17), and it reads as skipped
    assert got[sb] == ("failed", "skipped", race)
    assert got[then_b] == ("failed", "skipped", race)
    assert got[b1] == ("completed", "completed", None)
    d.done(again, ROW_TRUE)
    # iteration 2: both branches run again; iteration 1's winner decides nothing now
    got = d.inferred()
    assert got[race][1] == "running"
    assert got[b1][1:] == ("running", None)
    assert got[a1][1:] == ("running", None)
    assert got[sb][1] == "pending"
    assert got[sa][1] == "pending"
    assert got[then_b][1:] == ("running", None)
    d.done(b1, ROW_ONE)
    d.done(a1, ROW_ONE)
    got = d.inferred()
    assert got[sa] == ("running", "running", None)
    assert got[sb] == ("running", "running", None)
    d.done(sb, SIGNALLED)  # now branch 2 wins
    got = d.inferred()
    assert got[sa] == ("failed", "skipped", race)
    assert got[then_a] == ("failed", "skipped", race)
    assert got[a1] == ("completed", "completed", None)
    assert got[sb][1:] == ("completed", None)
    text = d.explain()
    assert "✓ SQL: select 'a1'" in text, text
    assert "→ ⊘ SIGNAL 'a'" in text, text
    assert "→ ✓ SIGNAL 'b'" in text, text
    d.done(again, ROW_FALSE)
    got = d.inferred()
    assert got[lp][:2] == ("completed", "completed")
    assert "running" not in {v[0] for v in got.values()}


NESTED = (
    "df.loop(( @> ( df.sql('select ''a''') ~> "
    "df.if(df.sql('select ''c'''), df.break(), df.sql('select ''e''')) ) ) "
    "~> df.sql('select ''t'''), df.sql('select ''outer'''))"
)


def test_nested_loops_show_the_inner_loops_current_iteration(drive):
    d = drive(NESTED)
    outer = d.tx.execute("select root_node from df.instances where id = %s", (d.iid,)).fetchone()[0]
    inner = d.tx.execute(
        "select id from df.nodes where instance_id = %s and node_type = 'LOOP' and id <> %s",
        (d.iid, outer),
    ).fetchone()[0]
    a, c, e = d.node("SQL", "'a'"), d.node("SQL", "'c'"), d.node("SQL", "'e'")
    t, oc, brk, if_ = d.node("SQL", "'t'"), d.node("SQL", "outer"), d.node("BREAK"), d.node("IF")
    # outer iteration 1: inner iteration 1 takes else, inner iteration 2 breaks
    d.done(a, ROW_ONE)
    d.done(c, ROW_FALSE)
    d.done(e, ROW_ONE)
    d.done(a, ROW_ONE)
    d.done(c, ROW_TRUE)
    got = d.inferred()
    assert got[e] == ("completed", "skipped", if_)  # inner iteration 2 took then
    d.done(brk, {})
    d.done(t, ROW_ONE)
    d.done(oc, ROW_TRUE)
    # outer iteration 2, inner loop again at its first iteration: everything the inner loop
    # did in outer iteration 1 is history
    got = d.inferred()
    assert got[inner][1] == "running"
    assert got[a][1:] == ("running", None)
    for node in (c, if_, brk, e, t, oc):
        assert got[node][1] == "pending", (node, got[node])
    d.done(a, ROW_ONE)
    d.done(c, ROW_FALSE)
    got = d.inferred()
    assert got[e][1:] == ("running", None)
    assert got[brk] == ("completed", "skipped", if_)  # outer iteration 1's break: not now
    text = d.explain()
    assert "then: ⊘ BREAK" in text, text
    assert "else: ⏳ SQL: select 'e'" in text, text


def test_finished_race_marks_its_loser_and_ends_a_losing_loop(drive):
    d = drive(
        "df.race(df.sql('select ''w'''), @> (df.sql('select ''x''') ~> df.wait_for_signal('s')))"
    )
    race, lp = d.node("RACE"), d.node("LOOP")
    w, x, sig = d.node("SQL", "'w'"), d.node("SQL", "'x'"), d.node("SIGNAL")
    body = d.tx.execute(
        "select left_node from df.nodes where instance_id = %s and id = %s", (d.iid, lp)
    ).fetchone()[0]
    d.done(x, ROW_ONE)
    d.done(w, ROW_ONE)
    got = d.inferred()
    # every node of the loser is terminal (no row stays running, the LOOP included) and is
    # shown skipped; what the loser finished before it lost stays completed
    assert got[lp] == ("failed", "skipped", race)
    assert got[body] == ("failed", "skipped", race)
    assert got[sig] == ("failed", "skipped", race)
    assert got[x] == ("completed", "completed", None)
    assert got[race][:2] == ("completed", "completed")
    assert (
        d.tx.execute("select status from df.instances where id = %s", (d.iid,)).fetchone()[0]
        == "completed"
    )
    text = d.explain()
    assert "branch 1: ✓ SQL: select 'w'" in text, text
    assert "branch 2: ⊘ LOOP (infinite)" in text, text
    assert "⊘ SIGNAL 's'" in text, text
    assert "✓ SQL: select 'x'" in text, text
    results = dict(
        d.tx.execute(
            "select id, result #>> '{}' from df.nodes where instance_id = %s", (d.iid,)
        ).fetchall()
    )
    assert results[lp].startswith("cancelled: ")
    assert results[sig].startswith("cancelled: ")


def test_a_break_ends_the_composites_of_other_branches(drive):
    # a break leaves the loop while another JOIN branch's THEN still runs: it ends failed
    d = drive(
        "@> df.join(df.sql('select ''a''') ~> df.break(), "
        "df.sql('select ''x''') ~> df.sql('select ''y'''))"
    )
    tx_ = d.tx.execute(
        "select id from df.nodes where instance_id = %s and node_type = 'THEN' and left_node = %s",
        (d.iid, d.node("SQL", "'x'")),
    ).fetchone()[0]
    d.done(d.node("SQL", "'a'"), ROW_ONE)
    d.done(d.node("BREAK"), {})
    got = d.inferred()
    assert got[tx_][0] == "failed"
    assert "running" not in {v[0] for v in got.values()}
    assert (
        d.tx.execute("select status from df.instances where id = %s", (d.iid,)).fetchone()[0]
        == "completed"
    )


def test_a_failed_join_branch_ends_the_other_branchs_composites(drive):
    # the other branch's THEN ends too, and df.error still names the step that failed, not
    # the abandoned ones
    d2 = drive(
        "df.join(df.sql('select ''bad'''), df.sql('select ''p''') ~> df.sql('select ''q'''))"
    )
    bad = d2.node("SQL", "bad")
    d2.done(bad, "division by zero", ok=False)
    got = d2.inferred()
    assert "running" not in {v[0] for v in got.values()}
    err = d2.tx.execute("select df.error(%s)", (d2.iid,)).fetchone()[0]
    assert err["node_id"] == bad, err
    assert err["error"] == "division by zero", err


def test_explain_and_instance_nodes_agree(drive):
    d = drive(LOOPSIG)
    d.done(d.node("SQL", "select 1"), ROW_ONE)
    d.done(d.node("SQL", "count(*)"), ROW_FALSE)
    d.done(d.node("SQL", "insert"), {"rows": [], "row_count": 1, "columns": []})
    d.done(d.node("SQL", "select 1"), ROW_ONE)
    d.done(d.node("SQL", "count(*)"), ROW_TRUE)
    marks = {"completed": "✓", "failed": "✗", "running": "⏳", "pending": "○", "skipped": "⊘"}
    labels = {"SIGNAL": "SIGNAL 'go'", "BREAK": "BREAK {}", "IF": "IF", "LOOP": "LOOP"}
    text = d.explain()
    for nid, (_, inferred, _) in d.inferred().items():
        ntype = d.tx.execute(
            "select node_type, query from df.nodes where instance_id = %s and id = %s", (d.iid, nid)
        ).fetchone()
        label = labels.get(ntype[0]) or (f"SQL: {ntype[1]}" if ntype[0] == "SQL" else None)
        if label:
            assert f"{marks[inferred]} {label}" in text, (nid, inferred, text)


def test_a_break_records_the_arm_and_the_winner_it_came_through(drive):
    # the IF and the RACE finish by the break (their source is the BREAK, deeper down): the
    # arm and the winner are the children the break came through
    d = drive(
        "@> df.race(df.if(df.sql('select ''c'''), df.sql('select ''a''') ~> df.break(), "
        "df.sql('select ''e''')), df.wait_for_signal('never'))"
    )
    race, if_ = d.node("RACE"), d.node("IF")
    e, sig = d.node("SQL", "'e'"), d.node("SIGNAL")
    d.done(d.node("SQL", "'c'"), ROW_TRUE)
    d.done(d.node("SQL", "'a'"), ROW_ONE)
    d.done(d.node("BREAK"), {})
    details = dict(
        d.tx.execute(
            "select id, status_details from df.nodes where instance_id = %s and id in (%s, %s)",
            (d.iid, race, if_),
        ).fetchall()
    )
    assert details[if_]["branch"] == "then"
    assert details[race]["winner"] == if_
    got = d.inferred()
    assert got[e] == ("pending", "skipped", if_)
    assert got[sig] == ("failed", "skipped", race)
