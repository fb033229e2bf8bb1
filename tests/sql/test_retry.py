"""df.retry in SQL (docs/retry.md): the graph value it builds, every bad argument at build
time, df.start's validation of a hand-written RETRY, and how df.explain / df.instance_nodes
show one (worker writes simulated as the table owner, as tests/sql/test_inspect.py does)."""

from __future__ import annotations

import json

import pytest
from psycopg import errors

from pgdurable.worker.instance import Checkpoint
from tests.fix_sql import one
from tests.sql.test_dsl import fails, graph
from tests.sql.test_inspect import ids, owner_update, user  # noqa: F401  (fixture)
from tests.sql.test_restart import OWNER, E, become, q, start


def test_retry_wraps_a_leaf_with_its_config(tx):
    g = graph(tx, "select df.retry('select 1')")
    assert g == {
        "node_type": "RETRY",
        "query": json.dumps(
            {"max_attempts": 3, "initial_delay_seconds": 1, "backoff": 2, "max_delay_seconds": 60},
            separators=(",", ":"),
        ),
        "left_node": {"node_type": "SQL", "query": "select 1"},
    }
    g = graph(tx, "select df.retry(df.seq('a', 'b'), 5, 0.5, 1.5, 10)")
    assert json.loads(g["query"]) == {
        "max_attempts": 5,
        "initial_delay_seconds": 0.5,
        "backoff": 1.5,
        "max_delay_seconds": 10,
    }
    assert g["left_node"]["node_type"] == "THEN"
    # named arguments, and composable like any node
    g = graph(tx, "select df.seq(df.retry(step => 'x', max_attempts => 2, backoff => 1), 'y')")
    assert g["left_node"]["node_type"] == "RETRY"
    assert json.loads(g["left_node"]["query"])["backoff"] == 1


def test_a_null_step_is_a_null_graph(tx):
    assert one(tx, "select df.retry(null)") is None


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        ("df.retry('x', 0)", "df.retry: max_attempts must be at least 1, got 0"),
        ("df.retry('x', -3)", "max_attempts must be at least 1, got -3"),
        ("df.retry('x', null)", "df.retry: max_attempts must not be NULL"),
        ("df.retry('x', 3, -1)", "df.retry: initial_delay_seconds must be >= 0, got -1"),
        ("df.retry('x', 3, null)", "df.retry: initial_delay_seconds must not be NULL"),
        ("df.retry('x', 3, 1, 0.5)", "df.retry: backoff must be at least 1, got 0.5"),
        ("df.retry('x', 3, 1, null)", "df.retry: backoff must not be NULL"),
        ("df.retry('x', 3, 1, 2, -0.1)", "df.retry: max_delay_seconds must be >= 0, got -0.1"),
        ("df.retry('x', 3, 1, 2, null)", "df.retry: max_delay_seconds must not be NULL"),
        ("df.retry('x', 3, 'NaN')", "initial_delay_seconds must be a finite number"),
        ("df.retry('x', 3, 1, 'Infinity')", "backoff must be a finite number"),
        ("df.retry('x', 3, 1, 2, 1e11)", "max_delay_seconds must be at most 10000000000"),
        ("df.retry(null, 0)", "max_attempts must be at least 1"),
    ],
)
def test_bad_arguments_name_the_argument(tx, call, needle):
    assert needle in fails(tx, f"select {call}")


def test_step_argument_is_auto_wrapped_and_checked(tx):
    assert "cannot be used as a workflow step" in fails(tx, "select df.retry('OK')")
    assert "Unknown node_type" in fails(tx, """select df.retry('{"node_type":"NOPE"}')""")


def _hand(query, **extra):
    node = {"node_type": "RETRY", "query": query, "left_node": {"node_type": "SQL", "query": "x"}}
    node.update(extra)
    return json.dumps(node)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (_hand(None), "RETRY config needs the numbers max_attempts"),
        (_hand('{"max_attempts": 2}'), "RETRY config needs the numbers max_attempts"),
        (
            _hand(
                '{"max_attempts": 0, "initial_delay_seconds": 1, "backoff": 2, '
                '"max_delay_seconds": 5}'
            ),
            "max_attempts must be at least 1",
        ),
        (
            _hand(
                '{"max_attempts": 2.5, "initial_delay_seconds": 1, "backoff": 2, '
                '"max_delay_seconds": 5}'
            ),
            "max_attempts must be a whole number",
        ),
        (
            _hand(
                '{"max_attempts": 2, "initial_delay_seconds": 1, "backoff": 0, '
                '"max_delay_seconds": 5}'
            ),
            "backoff must be at least 1",
        ),
        (
            _hand(
                '{"max_attempts": 2, "initial_delay_seconds": 1, "backoff": 2, '
                '"max_delay_seconds": 5}',
                right_node={"node_type": "SQL", "query": "y"},
            ),
            "RETRY node cannot have a right_node",
        ),
        (json.dumps({"node_type": "RETRY", "query": "{}"}), "RETRY node needs a left_node"),
    ],
)
def test_start_validates_a_hand_written_retry(tx, user, value, needle):  # noqa: F811
    msg = fails(tx, "select df.start(%s)", value)
    assert needle in msg
    assert "(at root)" in msg


def test_start_stores_a_retry_node(tx, user):  # noqa: F811
    iid = one(tx, "select df.start(df.retry(df.seq('select 1', 'select 2'), 4))")
    rows = tx.execute(
        "select node_type, query, left_node is not null, right_node from df.nodes "
        "where instance_id = %s order by id",
        (iid,),
    ).fetchall()
    retry = [r for r in rows if r[0] == "RETRY"]
    assert len(retry) == 1
    assert json.loads(retry[0][1])["max_attempts"] == 4
    assert retry[0][2] is True
    assert retry[0][3] is None
    # the stored graph passes the engine's own check (_enqueue_v1): a task was queued
    assert one(tx, "select status from df.instances where id = %s", (iid,)) == "pending"


def test_explain_dry_run_shows_the_policy(tx, user):  # noqa: F811
    text = one(tx, "select df.explain($q$df.retry(df.seq('select 1', 'select 2'), 5, 0.5)$q$)")
    assert "RETRY (up to 5 attempts, delay 0.5s x2 up to 60s)" in text
    assert "\n  attempt:\n    SQL: select 1\n    → SQL: select 2" in text
    assert "SQL: select 1" in text
    bad = one(tx, "select df.explain(%s)", (_hand('{"max_attempts": 1}'),))
    assert bad.startswith("Invalid durable function graph: root: RETRY config needs")


def test_live_attempt_and_last_error_are_shown(tx, user):  # noqa: F811
    iid = one(tx, "select df.start(df.retry(df.seq('select 1', 'select 2'), 5))")
    r, then, a, b = ids(tx, iid)
    kinds = dict(
        tx.execute("select id, node_type from df.nodes where instance_id = %s", (iid,)).fetchall()
    )
    assert [kinds[x] for x in (r, then, a, b)] == ["RETRY", "THEN", "SQL", "SQL"]
    # attempt 1 failed at b; the RETRY waits for attempt 2
    owner_update(
        tx,
        user,
        iid,
        r,
        status="running",
        status_details={
            "seq": 1,
            "iter_seq": 1,
            "attempt": 1,
            "max_attempts": 5,
            "last_error": 'relation "t" does not exist',
            "last_error_node": b,
            "next_attempt_at": "2030-01-01T00:00:00+00:00",
        },
    )
    owner_update(tx, user, iid, then, status="failed", status_details={"seq": 1})
    owner_update(tx, user, iid, a, status="completed", status_details={"seq": 1})
    owner_update(tx, user, iid, b, status="failed", status_details={"seq": 2})
    text = one(tx, "select df.explain(%s)", (iid,))
    assert (
        "⏳ RETRY (attempt 1/5, next at 2030-01-01T00:00:00+00:00, "
        'last error: relation "t" does not exist)'
    ) in text, text
    nodes = {
        row[0]: row
        for row in tx.execute(
            "select node_id, status_details, inferred_status from df.instance_nodes(%s)",
            (iid,),
        ).fetchall()
    }
    details = json.loads(nodes[r][1])
    assert details["attempt"] == 1
    assert details["max_attempts"] == 5
    assert details["last_error"] == 'relation "t" does not exist'
    # attempt 2 began at seq 3: what attempt 1 left below reads as pending
    owner_update(
        tx,
        user,
        iid,
        r,
        status="running",
        status_details={
            "seq": 1,
            "iter_seq": 3,
            "attempt": 2,
            "max_attempts": 5,
            "last_error": "boom",
            "next_attempt_at": None,
        },
    )
    owner_update(tx, user, iid, then, status="running", status_details={"seq": 3})
    owner_update(tx, user, iid, a, status="running", status_details={"seq": 3})
    inferred = dict(
        tx.execute("select node_id, inferred_status from df.instance_nodes(%s)", (iid,)).fetchall()
    )
    assert inferred[b] == "pending"
    assert inferred[a] == "running"
    text = one(tx, "select df.explain(%s)", (iid,))
    assert "⏳ RETRY (attempt 2/5, last error: boom)" in text, text


def test_retry_node_type_is_known_to_the_table(tx, user):  # noqa: F811
    # the CHECK constraints accept RETRY rows (df.start wrote one above) and refuse a RETRY
    # without a query
    iid = one(tx, "select df.start(df.retry('select 1'))")
    rid = one(tx, "select id from df.nodes where instance_id = %s and node_type = 'RETRY'", (iid,))
    tx.execute("reset role")  # the worker's (the owner's) write
    with pytest.raises(errors.CheckViolation), tx.transaction():
        tx.execute(
            "update df.nodes set query = null where instance_id = %s and id = %s", (iid, rid)
        )


# ---------------------------------------------------------------- df.restart of a RETRY
# Driven with the checkpoints a worker makes (tests/sql/test_restart.py's Drive).


def _fire_retry(d) -> None:
    """The RETRY's timer fires: lease its task, complete its wait, checkpoint."""
    become(d.conn, None)
    row = d.conn.execute(
        f"update {E}.tasks t set lease_owner = %s, lease_expires_at = now() + interval '1 min' "
        "from df.nodes n where t.instance_id = %s and n.instance_id = t.instance_id "
        "and n.id = t.node_id and n.node_type = 'RETRY' returning t.node_id, t.gen, t.kind",
        (OWNER, d.iid),
    ).fetchone()
    assert row is not None, "no RETRY task"
    node_id, gen, kind = row
    assert kind == "timer"
    ctx = d.ctx()
    step = ctx.sched.complete(ctx.index[node_id], gen, True, True)
    cp = Checkpoint()
    ctx.build(step, cp, one(d.conn, f"select {E}.clock()"))
    d.apply(ctx, node_id, gen, cp)


def test_restart_resumes_an_exhausted_retry_with_fresh_attempts(tx):
    role = f"rt_{one(tx, 'select substr(md5(random()::text), 1, 8)')}"
    tx.execute(f'create role "{role}" login')
    tx.execute("select df.grant_usage(%s)", (role,))
    d = start(tx, role, f"df.retry({q('a')} ~> {q('b')}, 2, 0, 1)")
    rid = one(tx, "select root_node from df.instances where id = %s", (d.iid,))
    d.run("a")
    d.run("b", ok=False)
    assert d.status() == "running"
    ((_gen, kind, _owner),) = d.tasks().values()
    assert kind == "timer"  # the RETRY waits
    _fire_retry(d)
    assert d.tasks() == {"a": (2, "run", None)}
    d.run("a")
    d.run("b", ok=False)
    assert d.status() == "failed"
    err = one(tx, "select df.error(%s)", (d.iid,))
    assert err["node_id"] == rid
    assert err["error"].startswith("df.retry gave up after 2 attempts: step ")
    assert err["sqlstate"] == "22012"
    d.restart()
    # the THEN goes on where it failed (a completed in attempt 2), at attempt 1 again
    assert d.tasks() == {"b": (3, "run", None)}
    ctx, sched = d.state()
    assert sched.iteration(ctx.index[rid]) == 1
    details = one(
        tx, "select status_details from df.nodes where instance_id = %s and id = %s", (d.iid, rid)
    )
    assert details["attempt"] == 1
    d.run("b", ok=False)  # attempt 1 of the new run fails: it waits (2 allowed)
    _fire_retry(d)
    assert d.finish() == "completed"
    assert d.ran == ["a", "b", "a", "b", "b", "a", "b"]
