"""df.restart and df.instance_runs (70_restart.sql) at the SQL level.

An instance's progress is made by the worker's own code, without a service: :class:`Drive`
turns each leaf outcome a test chooses into the checkpoint a worker would write (the
instance loaded with ``InstanceCtx.from_rows``, the real scheduler, ``InstanceCtx.build``,
``<engine>._apply_v1``). A restart must leave a state that this same code loads and drives to
the end, running exactly the leaves that had not completed.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from pgdurable import cron, schema
from pgdurable.graph import _abc as A
from pgdurable.graph.sched import Scheduler
from pgdurable.values import json_bytes, sql_envelope, truthy
from pgdurable.worker.instance import Checkpoint, InstanceCtx, dump, loop_limits, undump
from tests.migration.released import install_released

E = "pgdurable"
OWNER = "test-driver"
TERMINAL = {A.T_COMPLETED: "completed", A.T_FAILED: "failed", A.T_CANCELLED: "cancelled"}


def q(tag: str) -> str:
    """The DSL for a SQL leaf labelled ``tag`` (its stored query is ``select 'tag'``)."""
    return f"df.sql('select ''{tag}''')"


def one(conn: psycopg.Connection[Any], query: str, params: Any = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def become(conn: psycopg.Connection[Any], role: str | None) -> None:
    if role is None:
        conn.execute("reset role")
    else:
        conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))


def expect(conn, query, exc, match, params=()):
    conn.execute("savepoint expect")
    with pytest.raises(exc, match=match):
        conn.execute(query, params)
    conn.execute("rollback to savepoint expect")


class Drive:
    """The checkpoints a worker would make for one instance, leaf outcomes chosen by the test."""

    def __init__(self, conn: psycopg.Connection[Any], role: str, iid: str) -> None:
        self.conn, self.role, self.iid = conn, role, iid
        self.ran: list[str] = []  # tags of the leaves run, in order

    def ctx(self) -> InstanceCtx:
        c, i = self.conn, (self.iid,)
        inst = c.execute(f"select * from {E}._load_instance_v1(%s)", i).fetchone()
        rows = c.execute(f"select * from {E}._load_nodes_v1(%s)", i).fetchall()
        named = c.execute(f"select * from {E}._load_results_v1(%s)", i).fetchall()
        assert inst is not None
        _, max_it = loop_limits(inst, 0, 100_000)
        return InstanceCtx.from_rows(self.iid, inst, rows, named, max_it, 0.0)

    def node(self, tag: str) -> str:
        return str(
            one(
                self.conn,
                "select id from df.nodes where instance_id = %s and query = %s",
                (self.iid, f"select '{tag}'"),
            )
        )

    def tag(self, node_id: str) -> str:
        query = one(
            self.conn,
            "select query from df.nodes where instance_id = %s and id = %s",
            (self.iid, node_id),
        )
        return str(query).removeprefix("select '").removesuffix("'")

    def tasks(self) -> dict[str, tuple[int, str, Any]]:
        """{tag: (gen, kind, lease_owner)} of the instance's tasks ('start' for a start)."""
        rows = self.conn.execute(
            f"select node_id, gen, kind, lease_owner from {E}.tasks where instance_id = %s",
            (self.iid,),
        ).fetchall()
        return {("start" if k == "start" else self.tag(n)): (g, k, o) for n, g, k, o in rows}

    def run(
        self,
        tag: str,
        ok: bool = True,
        value: Any = None,
        decision: bool | None = None,
        owner: str = OWNER,
    ) -> int:
        """Lease the task of leaf ``tag`` (or 'start') and checkpoint its outcome."""
        become(self.conn, None)
        node = None if tag == "start" else self.node(tag)
        row = self.conn.execute(
            f"update {E}.tasks set lease_owner = %s, lease_expires_at = now() + interval '1 min', "
            "attempts = attempts + 1 where instance_id = %s "
            "and (kind = 'start' and %s::text is null or node_id = %s) "
            "returning node_id, gen, kind",
            (owner, self.iid, node, node),
        ).fetchone()
        assert row is not None, f"no task for {tag!r}: {self.tasks()}"
        node_id, gen, kind = row
        ctx = self.ctx()
        now = one(self.conn, f"select {E}.clock()")
        if kind == "start":
            step = ctx.sched.start()
            cp = Checkpoint(inst_status="running")
        else:
            self.ran.append(tag)
            idx = ctx.index[node_id]
            cp = Checkpoint()
            if ok and decision is not None:
                truth = decision
            elif ok:
                value = sql_envelope(['{"v": 1}']) if value is None else value
                ctx.record_leaf(idx, value, json_bytes(value), cp)
                truth = truthy(value)
            else:
                msg = f"{tag} failed"
                ctx.errors[idx] = (msg, "22012")
                upd = cp.node(node_id)
                upd["status"], upd["result"] = "failed", msg
                upd["details"]["sqlstate"] = "22012"
                truth = False
            step = ctx.sched.complete(idx, gen, ok, truth)
        ctx.build(step, cp, now)
        if step.terminal != A.T_RUNNING:
            cp.inst_status = TERMINAL[step.terminal]
        return self.apply(ctx, node_id, gen, cp, owner)

    def apply(
        self,
        ctx: InstanceCtx,
        node_id: str,
        gen: int,
        cp: Checkpoint,
        owner: str = OWNER,
        version: int | None = None,
    ) -> int:
        nodes = json_bytes(list(cp.nodes.values())).decode()
        named = json_bytes(cp.named).decode() if cp.named else None
        got = one(
            self.conn,
            f"select {E}._apply_v1(%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, "
            "%s::text[], %s::jsonb, 60)",
            (
                owner,
                self.iid,
                node_id,
                gen,
                ctx.version if version is None else version,
                dump(ctx.sched.dump_state()),
                cp.inst_status,
                nodes,
                orjson.dumps(cp.new_tasks).decode() if cp.new_tasks else None,
                cp.drop_tasks or None,
                named,
            ),
        )
        return int(got)

    def status(self) -> str:
        return str(one(self.conn, "select status from df.instances where id = %s", (self.iid,)))

    def restart(self) -> str:
        become(self.conn, self.role)
        got = one(self.conn, "select df.restart(%s)", (self.iid,))
        become(self.conn, None)
        return str(got)

    def state(self) -> Any:
        blob = one(self.conn, f"select state from {E}.runs where instance_id = %s", (self.iid,))
        ctx = self.ctx()
        return ctx, Scheduler.load_state(ctx.graph, 100_000, undump(bytes(blob)))

    def finish(self, outcomes: dict[str, bool] | None = None) -> str:
        """Run every task as it comes (ok unless ``outcomes`` says otherwise) to the end."""
        outcomes = outcomes or {}
        for _ in range(200):
            pending = [t for t, (_g, _k, o) in self.tasks().items() if o is None]
            if not pending:
                break
            tag = sorted(pending)[0]
            self.run(tag, ok=outcomes.get(tag, True))
        return self.status()


@pytest.fixture
def tenant(tx):
    name = f"rs_{uuid.uuid4().hex[:8]}"
    tx.execute(sql.SQL("create role {} login").format(sql.Identifier(name)))
    tx.execute("select df.grant_usage(%s)", (name,))
    return name


def start(tx, role: str, expr: str) -> Drive:
    become(tx, role)
    iid = one(tx, f"select df.start({expr})")
    become(tx, None)
    d = Drive(tx, role, iid)
    assert d.run("start") > 0
    return d


def test_then_chain_runs_only_what_did_not_complete(tx, tenant):
    d = start(tx, tenant, f"{q('a')} ~> {q('b')} ~> {q('c')}")
    d.run("a")
    d.run("b", ok=False)
    assert d.status() == "failed"
    failed_at = one(tx, "select completed_at from df.instances where id = %s", (d.iid,))
    assert d.restart() == d.iid
    assert d.status() == "running"
    assert one(tx, "select completed_at from df.instances where id = %s", (d.iid,)) is None
    # one task: b, in its second generation; a keeps its result
    assert d.tasks() == {"b": (2, "run", None)}
    ctx, sched = d.state()
    assert sched.terminal == A.T_RUNNING
    assert sched.status(ctx.index[d.node("a")]) == A.COMPLETED
    assert sched.status(ctx.index[d.node("b")]) == A.RUNNING
    assert sched.status(ctx.index[d.node("c")]) == A.PENDING
    rows = dict(
        tx.execute("select query, status from df.nodes where instance_id = %s", (d.iid,)).fetchall()
    )
    assert rows["select 'a'"] == "completed"
    assert rows["select 'b'"] == "running"
    assert d.finish() == "completed"
    assert d.ran == ["a", "b", "b", "c"]
    runs = tx.execute(
        "select run, status, ended_at, error from df.instance_runs(%s)", (d.iid,)
    ).fetchall()
    assert [(r[0], r[1]) for r in runs] == [(1, "failed"), (2, "completed")]
    assert runs[0][2] == failed_at
    assert runs[0][3] == {
        "node_id": d.node("b"),
        "node_type": "SQL",
        "error": "b failed",
        "sqlstate": "22012",
    }
    assert runs[1][3] is None
    # df.instance_executions keeps its shape: b's second run is execution 2
    assert tx.execute(
        "select execution_id, status from df.instance_executions(%s)", (d.iid,)
    ).fetchall() == [(2, "completed"), (1, "completed")]


def test_join_reruns_only_the_failed_branch(tx, tenant):
    d = start(tx, tenant, f"df.join3({q('a')}, {q('b')}, {q('c')}) ~> {q('d')}")
    d.run("a")
    d.run("b", ok=False)  # c is abandoned with it
    assert d.status() == "failed"
    d.restart()
    assert d.tasks() == {"b": (2, "run", None), "c": (2, "run", None)}
    ctx, sched = d.state()
    join = ctx.graph.parent[ctx.index[d.node("a")]]
    assert sched.status(join) == A.RUNNING
    assert d.finish() == "completed"
    assert d.ran == ["a", "b", "b", "c", "d"]
    assert one(
        tx,
        "select df._node_result(%s, root_node) is not null from df.instances where id = %s",
        (d.iid, d.iid),
    )


def test_race_races_again(tx, tenant):
    d = start(tx, tenant, f"df.race({q('a')}, {q('b')} ~> {q('c')})")
    d.run("b")
    d.run("a", ok=False)  # a finishes first: the race fails, branch 2 is abandoned
    assert d.status() == "failed"
    d.restart()
    # b completed: branch 2 goes on at c; a runs again
    assert d.tasks() == {"a": (2, "run", None), "c": (2, "run", None)}
    winner = one(
        tx,
        "select status_details -> 'winner' from df.nodes n join df.instances i "
        "on i.id = n.instance_id and i.root_node = n.id where i.id = %s",
        (d.iid,),
    )
    assert winner is None
    d.run("c")
    assert d.status() == "completed"


def test_if_whose_condition_failed_decides_again(tx, tenant):
    d = start(tx, tenant, f"df.if({q('cond')}, {q('yes')}, {q('no')})")
    d.run("cond", ok=False)
    assert d.status() == "failed"
    d.restart()
    assert d.tasks() == {"cond": (2, "run", None)}
    d.run("cond", value=sql_envelope(['{"v": false}']))
    assert d.tasks() == {"no": (1, "run", None)}
    assert d.finish() == "completed"
    assert d.ran == ["cond", "cond", "no"]


def test_if_arm_failed_keeps_the_decision(tx, tenant):
    d = start(tx, tenant, f"df.if({q('cond')}, {q('yes')}, {q('no')})")
    d.run("cond")
    d.run("yes", ok=False)
    d.restart()
    assert d.tasks() == {"yes": (2, "run", None)}
    tree = dict(
        tx.execute(
            "select n.query, t.inferred_status from df.instance_nodes(%s) t "
            "join df.nodes n on n.id = t.node_id",
            (d.iid,),
        ).fetchall()
    )
    assert tree["select 'no'"] == "skipped"
    assert tree["select 'cond'"] == "completed"
    assert d.finish() == "completed"
    assert d.ran == ["cond", "yes", "yes"]


def test_if_rows_undecided_is_decided_again(tx, tenant):
    d = start(tx, tenant, f"df.as({q('rows')}, 'r') ~> df.if_rows('r', {q('yes')}, {q('no')})")
    d.run("rows")
    if_id = one(tx, "select id from df.nodes where instance_id = %s and node_type = 'IF'", (d.iid,))
    # the decision fails (as the worker fails a missing result): the IF itself is the leaf
    ctx = d.ctx()
    tx.execute(
        f"update {E}.tasks set lease_owner = %s where instance_id = %s and node_id = %s",
        (OWNER, d.iid, if_id),
    )
    idx = ctx.index[if_id]
    cp = Checkpoint()
    ctx.errors[idx] = ("if_rows: no rows", None)
    step = ctx.sched.complete(idx, 1, False, False)
    ctx.build(step, cp, one(tx, f"select {E}.clock()"))
    cp.inst_status = TERMINAL[step.terminal]
    assert d.apply(ctx, if_id, 1, cp) > 0
    d.restart()
    tasks = tx.execute(
        f"select node_id, gen from {E}.tasks where instance_id = %s", (d.iid,)
    ).fetchall()
    assert tasks == [(if_id, 2)]
    # the named result it decides on is there again for the decision
    assert (
        one(tx, f"select count(*) from {E}.results where instance_id = %s and name = 'r'", (d.iid,))
        == 1
    )


def test_loop_resumes_its_iteration_then_goes_on(tx, tenant):
    d = start(tx, tenant, f"df.loop({q('a')} ~> {q('b')}, {q('more')})")
    d.run("a")
    d.run("b")
    d.run("more", value=sql_envelope(['{"v": true}']))  # iteration 2
    d.run("a")
    d.run("b", ok=False)
    assert d.status() == "failed"
    d.restart()
    assert d.tasks() == {"b": (3, "run", None)}
    ctx, sched = d.state()
    loop = ctx.index[one(tx, "select root_node from df.instances where id = %s", (d.iid,))]
    assert sched.iteration(loop) == 2
    d.run("b")
    d.run("more", value=sql_envelope(['{"v": false}']))
    assert d.status() == "completed"
    assert d.ran == ["a", "b", "more", "a", "b", "b", "more"]


def test_loop_stopped_by_its_iteration_cap(tx, tenant):
    tx.execute(
        sql.SQL("alter role {} set pg_durable.loop_max_iterations = '2'").format(
            sql.Identifier(tenant)
        )
    )
    d = start(tx, tenant, f"df.loop({q('a')})")
    d.run("a")
    d.run("a")  # iteration 3 would exceed 2: the loop fails
    assert d.status() == "failed"
    become(tx, tenant)
    expect(
        tx,
        "select df.restart(%s)",
        psycopg.errors.ObjectNotInPrerequisiteState,
        r"loop_max_iterations \(2\), and iteration 3",
        (d.iid,),
    )
    become(tx, None)
    tx.execute(
        sql.SQL("alter role {} set pg_durable.loop_max_iterations = '3'").format(
            sql.Identifier(tenant)
        )
    )
    d.restart()
    assert d.tasks() == {"a": (3, "run", None)}
    assert (
        one(
            tx,
            "select status_details ->> 'iteration' from df.nodes n join df.instances i "
            "on i.id = n.instance_id and i.root_node = n.id where i.id = %s",
            (d.iid,),
        )
        == "3"
    )
    d.run("a")
    assert d.status() == "failed"  # the cap again, after the iteration it allowed
    assert d.ran == ["a", "a", "a"]


def test_waits_are_made_again(tx, tenant):
    """Sleep, schedule and signal waits cancelled while waiting: the restart re-makes their
    tasks as the worker makes them (due times from the engine clock; the schedule's next
    tick as pgdurable/cron.py computes it; the signal's timeout)."""
    tx.execute("set local pg_durable.fake_now = '2026-03-04 05:06:30+00'")
    d = start(
        tx,
        tenant,
        "df.join3(df.sleep(90), df.wait_for_schedule('*/20 9-17 * * MON-FRI'),"
        " df.wait_for_signal('go', 45))",
    )
    before = {k: v[1] for k, v in d.tasks().items()}
    become(tx, tenant)
    tx.execute("select df.cancel(%s)", (d.iid,))
    become(tx, None)
    tx.execute("set local pg_durable.fake_now = '2026-03-06 17:50:00+00'")  # a Friday
    d.restart()
    rows = tx.execute(
        f"select n.node_type, t.kind, t.due_at, t.deadline, t.gen from {E}.tasks t "
        "join df.nodes n on n.instance_id = t.instance_id and n.id = t.node_id "
        "where t.instance_id = %s",
        (d.iid,),
    ).fetchall()
    now = datetime(2026, 3, 6, 17, 50, tzinfo=UTC)
    got = {r[0]: r[1:] for r in rows}
    assert got["SLEEP"] == ("timer", now + timedelta(seconds=90), None, 2)
    tick = cron.next_tick("*/20 9-17 * * MON-FRI", now)
    assert tick == datetime(2026, 3, 9, 9, 0, tzinfo=UTC)
    assert got["WAIT_SCHEDULE"] == ("timer", tick, None, 2)
    assert got["SIGNAL"] == ("signal", now, now + timedelta(seconds=45), 2)
    assert sorted(before.values()) == ["signal", "timer", "timer"]


@pytest.mark.parametrize(
    "expr",
    [
        "* * * * *",
        "*/15 * * * *",
        "0 3 * * *",
        "30 2 1 * *",
        "0 0 29 2 *",
        "5 4 * * SUN",
        "0 12 1,15 * 1-5",
        "10-50/20 */6 * JAN-MAR,DEC *",
        "@hourly",
        "@weekly",
        "@yearly",
        "0 0 31 * *",
        "59 23 * * 7",
        "0 9 13 * FRI",
    ],
)
def test_cron_next_tick_matches_the_worker(tx, expr):
    for after in ("2026-02-27 23:59:30+00", "2028-02-28 12:00:00+00", "2026-12-31 23:59:00+00"):
        got = one(tx, f"select {E}._cron_next_v1(%s, %s::timestamptz)", (expr, after))
        want = cron.next_tick(expr, datetime.fromisoformat(after.replace("+00", "+00:00")))
        assert got == want, (expr, after)


def test_refusals_and_access(tx, tenant):
    other = f"rs_{uuid.uuid4().hex[:8]}"
    tx.execute(sql.SQL("create role {} login").format(sql.Identifier(other)))
    tx.execute("select df.grant_usage(%s)", (other,))
    d = start(tx, tenant, f"{q('a')} ~> {q('b')}")
    become(tx, tenant)
    expect(
        tx,
        "select df.restart(%s)",
        psycopg.errors.ObjectNotInPrerequisiteState,
        "Instance .* is running; only a failed or cancelled instance can be restarted",
        (d.iid,),
    )
    expect(
        tx,
        "select df.restart('deadbeef')",
        psycopg.errors.NoDataFound,
        "Instance not found or access denied: deadbeef",
    )
    assert one(tx, "select df.restart(null)") is None
    become(tx, None)
    d.run("a")
    d.run("b", ok=False)
    # another role: the same error as for an instance that does not exist, through the df
    # function and through the engine helper (which every granted role may call)
    become(tx, other)
    for query in (
        "select df.restart(%s)",
        f"select {E}._restart_v1(%s)",
        "select * from df.instance_runs(%s)",
        f"select * from {E}._run_history_v1(%s)",
    ):
        expect(tx, query, psycopg.errors.NoDataFound, "not found or access denied", (d.iid,))
    become(tx, None)
    assert d.status() == "failed"
    d.restart()
    d.finish()
    become(tx, tenant)
    expect(
        tx,
        "select df.restart(%s)",
        psycopg.errors.ObjectNotInPrerequisiteState,
        "is completed",
        (d.iid,),
    )
    become(tx, None)


def test_a_late_outcome_of_the_old_run_is_fenced(tx, tenant):
    """Restart while a worker still holds a lease (its instance was cancelled under it): the
    old worker's checkpoint cannot land, whatever version it tries."""
    d = start(tx, tenant, f"{q('a')} ~> {q('b')}")
    d.run("a")
    tx.execute(f"update {E}.tasks set lease_owner = 'old-worker' where instance_id = %s", (d.iid,))
    old = d.ctx()  # what the old worker holds
    become(tx, tenant)
    tx.execute("select df.cancel(%s)", (d.iid,))
    become(tx, None)
    d.restart()
    assert d.tasks() == {"b": (2, "run", None)}
    idx = old.index[d.node("b")]
    cp = Checkpoint()
    value = sql_envelope(['{"v": 1}'])
    old.record_leaf(idx, value, json_bytes(value), cp)
    old.build(old.sched.complete(idx, 1, True, True), cp, one(tx, f"select {E}.clock()"))
    assert d.apply(old, d.node("b"), 1, cp, owner="old-worker") == -1  # stale: reload
    fresh = d.ctx()
    assert fresh.sched.complete(idx, 1, True, True).finished == []  # its generation is gone
    assert d.apply(fresh, d.node("b"), 1, Checkpoint(), owner="old-worker") == -2  # fenced
    assert d.finish() == "completed"


def test_cancelled_before_any_worker_starts_again(tx, tenant):
    become(tx, tenant)
    iid = one(tx, f"select df.start({q('a')})")
    tx.execute("select df.cancel(%s, 'too early')", (iid,))
    become(tx, None)
    d = Drive(tx, tenant, iid)
    d.restart()
    assert d.tasks() == {"start": (0, "start", None)}
    assert one(tx, f"select state from {E}.runs where instance_id = %s", (iid,)) is None
    d.run("start")
    assert d.finish() == "completed"
    runs = tx.execute(
        "select run, status, error ->> 'error' from df.instance_runs(%s)", (iid,)
    ).fetchall()
    assert runs == [(1, "cancelled", "cancelled: too early"), (2, "completed", None)]


def test_results_and_signals_are_kept_for_a_restart_and_pruned_with_it(tx, tenant):
    d = start(tx, tenant, f"df.as({q('a')}, 'a') ~> df.wait_for_signal('go') ~> {q('b')}")
    d.run("a")
    become(tx, tenant)
    tx.execute("select df.signal(%s, 'other', '1')", (d.iid,))
    become(tx, None)
    sig = one(
        tx, "select id from df.nodes where instance_id = %s and node_type = 'SIGNAL'", (d.iid,)
    )
    tx.execute(f"update {E}.tasks set lease_owner = %s where node_id = %s", (OWNER, sig))
    ctx = d.ctx()
    cp = Checkpoint()
    ctx.errors[ctx.index[sig]] = ("signal data too large", "54000")
    step = ctx.sched.complete(ctx.index[sig], 1, False, False)
    ctx.build(step, cp, one(tx, f"select {E}.clock()"))
    cp.inst_status = "failed"
    assert d.apply(ctx, sig, 1, cp) > 0
    count = (
        f"select (select count(*) from {E}.results r where r.instance_id = %s), "
        f"(select count(*) from {E}.signals s where s.instance_id = %s)"
    )
    assert tx.execute(count, (d.iid, d.iid)).fetchone() == (1, 1)
    d.restart()
    assert tx.execute(count, (d.iid, d.iid)).fetchone() == (1, 1)
    assert tx.execute(
        f"select node_id, gen, kind from {E}.tasks where instance_id = %s", (d.iid,)
    ).fetchall() == [(sig, 2, "signal")]
    # pruned with the instance: results, signals and the run history
    tx.execute(
        "update df.instances set status = 'failed', updated_at = now() - interval '90 days' "
        "where id = %s",
        (d.iid,),
    )
    tx.execute("set local pg_durable.retention_days = '30'")
    assert one(tx, f"select {E}._prune_v1(1000)") >= 1
    assert tx.execute(count, (d.iid, d.iid)).fetchone() == (0, 0)
    assert one(tx, f"select count(*) from {E}.run_history where instance_id = %s", (d.iid,)) == 0


def test_concurrent_restarts_one_wins(db):
    role = db.create_role("rsc")
    with db.connect(role) as conn:
        iid = one(conn, f"select df.start({q('a')})")
        conn.execute("select df.cancel(%s)", (iid,))
    first = db.connect(role, autocommit=False)
    second = db.connect(role, autocommit=True)
    try:
        assert one(first, "select df.restart(%s)", (iid,)) == iid  # holds the locks
        errors: list[BaseException] = []

        def other() -> None:
            try:
                second.execute("select df.restart(%s)", (iid,))
            except psycopg.Error as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # waits for the first
        first.commit()
        t.join(10)
        assert len(errors) == 1
        assert "is running" in str(errors[0])
        with db.connect() as conn:
            assert (
                one(conn, f"select count(*) from {E}.run_history where instance_id = %s", (iid,))
                == 1
            )
            assert one(conn, f"select count(*) from {E}.tasks where instance_id = %s", (iid,)) == 1
    finally:
        first.close()
        second.close()


def test_upgrade_from_4_gives_granted_tenants_restart(server):
    """migrations/4-5.sql: a role granted under schema 4 (as its package installed it) can
    restart and read its runs after the upgrade, with nothing granted again."""
    name = f"m_{uuid.uuid4().hex[:10]}"
    role = f"rsu_{uuid.uuid4().hex[:8]}"
    admin = f"rsa_{uuid.uuid4().hex[:8]}"  # a delegated admin: granted with_grant
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        for r in (role, admin):
            conn.execute(sql.SQL("create role {} login").format(sql.Identifier(r)))
    dsn = server.dsn(name)
    try:
        if not install_released(dsn, 4):
            pytest.skip("schema version 4 as released needs git history: git fetch --unshallow")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select df.grant_usage(%s)", (role,))
            conn.execute("select df.grant_usage(%s, false, true)", (admin,))
            assert one(conn, "select to_regprocedure('df.restart(text)')") is None
        assert schema.install(dsn).to_version == schema.SCHEMA_VERSION
        with psycopg.connect(dsn, autocommit=True) as conn:
            for fn in (f"{E}._restart_v1(varchar)", f"{E}._run_history_v1(varchar)"):
                privs = [
                    one(conn, "select has_function_privilege(%s, %s, %s)", (r, fn, p))
                    for r, p in (
                        (role, "execute"),
                        (role, "execute with grant option"),
                        (admin, "execute with grant option"),
                    )
                ]
                assert privs == [True, False, True], fn
        with psycopg.connect(server.dsn(name, user=role), autocommit=True) as conn:
            iid = one(conn, f"select df.start({q('a')})")
            conn.execute("select df.cancel(%s)", (iid,))
            assert one(conn, "select df.restart(%s)", (iid,)) == iid
            assert [
                r[1] for r in conn.execute("select * from df.instance_runs(%s)", (iid,)).fetchall()
            ] == ["cancelled", "running"]
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )
            for r in (role, admin):
                conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(r)))


def test_instance_runs_json(tx, tenant):
    d = start(tx, tenant, q("a"))
    got = tx.execute(
        "select run, status, ended_at, error from df.instance_runs(%s)", (d.iid,)
    ).fetchall()
    assert got == [(1, "running", None, None)]
    assert json.loads(json.dumps(got[0][3])) is None


def test_swept_tasks_of_an_instance_its_owner_marked_failed(tx, tenant):
    """The owner set its instance's status to failed mid-run (tenants hold UPDATE (status)),
    and the rescuer swept the instance's tasks: the restart makes them again."""
    d = start(tx, tenant, f"{q('a')} ~> {q('b')} ~> {q('c')}")
    d.run("a")
    become(tx, tenant)
    tx.execute("update df.instances set status = 'failed' where id = %s", (d.iid,))
    become(tx, None)
    tx.execute(f"select {E}._rescue_v1(1000)")
    assert d.tasks() == {}
    d.restart()
    assert d.tasks() == {"b": (2, "run", None)}
    assert d.finish() == "completed"
    assert d.ran == ["a", "b", "c"]


def test_state_blob_in_both_byte_orders(tx):
    """The scheduler state as the worker writes it (array('q'), the machine's byte order):
    read and written back in the order it came in."""
    import struct

    ints = [1, 3, 1, 0, 2, 1, 0, 7, 1, 2**62 - 1, 0, 5, 1, 0, 1, 0]
    little = dump(ints)
    big = struct.pack(f">{len(ints)}q", *ints)
    assert little == struct.pack(f"<{len(ints)}q", *ints)
    for blob in (little, big):
        assert one(tx, f"select {E}._state_ints_v1(%s)", (blob,)) == ints
        assert bytes(one(tx, f"select {E}._state_bytes_v1(%s, %s)", (ints, blob))) == blob
