"""df.signal, df.cancel, df.status, df.result, df.error, df.await_instance (30_control.sql).

Worker writes are simulated by updating df.nodes / df.instances as the table owner, per
ARCHITECTURE.md §4.
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from tests.fix_sql import become, one


def expect(conn, query, exc, match, params=()):
    conn.execute("savepoint expect")
    with pytest.raises(exc, match=match):
        conn.execute(query, params)
    conn.execute("rollback to savepoint expect")


THEN_SIG = json.dumps(
    {
        "node_type": "THEN",
        "left_node": {"node_type": "SQL", "query": "select 1 / 0"},
        "right_node": {
            "node_type": "SIGNAL",
            "query": json.dumps({"signal_name": "go", "timeout_seconds": None}),
        },
    }
)


def nodes(conn, iid):
    """node ids in pre-order (ids are sorted along the pre-order)."""
    return [
        r[0]
        for r in conn.execute("select id from df.nodes where instance_id = %s order by id", (iid,))
    ]


def test_status_and_result(tx, user):
    iid = one(tx, "select df.start('select 42 as x')")
    assert one(tx, "select df.status(%s)", (iid,)) == "pending"
    assert one(tx, "select df.status('nothere1')") is None
    assert one(tx, "select df.result(%s)", (iid,)) is None
    tx.execute("reset role")
    tx.execute(
        "update df.nodes set status = 'completed', "
        """result = '{"rows":[{"x":42}],"row_count":1}' where instance_id = %s""",
        (iid,),
    )
    assert one(tx, "select df.result(%s)", (iid,)) is None  # instance not completed yet
    tx.execute(
        "update df.instances set status = 'completed', completed_at = now() where id = %s", (iid,)
    )
    become(tx, user)
    assert json.loads(one(tx, "select df.result(%s)", (iid,))) == {
        "rows": [{"x": 42}],
        "row_count": 1,
    }
    assert one(tx, "select df.error(%s)", (iid,)) is None


def test_error_picks_the_failed_leaf(tx, user):
    iid = one(tx, "select df.start(%s)", (THEN_SIG,))
    root, div, _sig = nodes(tx, iid)
    assert one(tx, "select df.error(%s)", (iid,)) is None
    tx.execute("reset role")
    tx.execute(
        """update df.nodes set status = 'failed', result = '"division by zero"',
                  status_details = '{"sqlstate": "22012", "gen": 1}'
                  where instance_id = %s and id = %s""",
        (iid, div),
    )
    tx.execute(
        """update df.nodes set status = 'failed', result = '"division by zero"'
                  where instance_id = %s and id = %s""",
        (iid, root),
    )
    tx.execute("update df.instances set status = 'failed' where id = %s", (iid,))
    become(tx, user)
    assert one(tx, "select df.result(%s)", (iid,)) is None
    assert one(tx, "select df.error(%s)", (iid,)) == {
        "node_id": div,
        "node_type": "SQL",
        "error": "division by zero",
        "sqlstate": "22012",
    }


def test_signal(tx, user):
    iid = one(tx, "select df.start(%s)", (THEN_SIG,))
    _root, _div, sig = nodes(tx, iid)
    tx.execute("reset role")
    # simulate a parked SIGNAL wait
    tx.execute(
        "insert into pgdurable.tasks (instance_id, node_id, gen, kind, due_at, submitted_by) "
        "values (%s, %s, 1, 'signal', 'infinity', %s)",
        (iid, sig, user),
    )
    become(tx, user)
    assert one(tx, "select df.signal(%s, 'go', '{\"a\": 1}')", (iid,)) == "OK"
    assert one(tx, "select df.signal(%s, 'go', 'plain text')", (iid,)) == "OK"
    assert one(tx, "select df.signal(%s, 'go')", (iid,)) == "OK"
    tx.execute("reset role")
    got = tx.execute(
        "select name, data from pgdurable.signals where instance_id = %s order by id", (iid,)
    ).fetchall()
    assert got == [("go", {"a": 1}), ("go", "plain text"), ("go", {})]
    assert one(
        tx,
        "select due_at <= now() from pgdurable.tasks where instance_id = %s and node_id = %s",
        (iid, sig),
    )
    become(tx, user)
    expect(
        tx,
        "select df.signal(%s, '', '{}')",
        psycopg.errors.InvalidParameterValue,
        "non-empty",
        (iid,),
    )
    expect(tx, "select df.signal('', 'go')", psycopg.errors.InvalidParameterValue, "non-empty")
    expect(
        tx,
        "select df.signal('abcdef01', 'go')",
        psycopg.errors.NoDataFound,
        "Instance not found or access denied",
    )


def test_signal_on_terminal_instance_errors(tx, user):
    iid = one(tx, "select df.start('select 1')")
    tx.execute("select df.cancel(%s)", (iid,))
    expect(
        tx,
        "select df.signal(%s, 'go')",
        psycopg.errors.ObjectNotInPrerequisiteState,
        "already cancelled",
        (iid,),
    )


def test_cancel(tx, user):
    iid = one(tx, "select df.start(%s)", (THEN_SIG,))
    _root, div, sig = nodes(tx, iid)
    tx.execute("reset role")
    tx.execute(
        "update df.nodes set status = 'running' where instance_id = %s and id in (%s, %s)",
        (iid, _root, div),
    )
    tx.execute("update df.instances set status = 'running' where id = %s", (iid,))
    become(tx, user)
    assert one(tx, "select df.cancel(%s, 'enough')", (iid,)) == f"Instance {iid} cancelled: enough"
    assert one(tx, "select df.status(%s)", (iid,)) == "cancelled"
    rows = dict(
        tx.execute("select id, status from df.nodes where instance_id = %s", (iid,)).fetchall()
    )
    assert rows == {_root: "failed", div: "failed", sig: "pending"}
    assert (
        one(
            tx,
            "select result #>> '{}' from df.nodes where instance_id = %s and id = %s",
            (iid, div),
        )
        == "cancelled: enough"
    )
    # terminal states are sticky
    assert one(tx, "select df.cancel(%s)", (iid,)) == f"Instance {iid} is already cancelled"
    tx.execute("reset role")
    assert one(tx, "select count(*) from pgdurable.tasks where instance_id = %s", (iid,)) == 0
    assert (
        one(tx, "select cancel_reason from pgdurable.runs where instance_id = %s", (iid,))
        == "enough"
    )
    become(tx, user)
    assert one(tx, "select df.error(%s)", (iid,)) is None
    expect(
        tx,
        "select df.cancel('abcdef01')",
        psycopg.errors.NoDataFound,
        "Instance not found or access denied",
    )


def test_cancel_default_reason_and_completed_instance(tx, user):
    a = one(tx, "select df.start('select 1')")
    assert one(tx, "select df.cancel(%s)", (a,)) == f"Instance {a} cancelled: Cancelled by user"
    b = one(tx, "select df.start('select 1')")
    tx.execute("reset role")
    tx.execute("update df.instances set status = 'completed' where id = %s", (b,))
    become(tx, user)
    assert one(tx, "select df.cancel(%s)", (b,)) == f"Instance {b} is already completed"
    assert one(tx, "select df.status(%s)", (b,)) == "completed"


def test_await(tx, user):
    iid = one(tx, "select df.start('select 1')")
    expect(
        tx,
        "select df.await_instance(%s, 0)",
        psycopg.errors.InvalidParameterValue,
        "timeout_seconds must be positive",
        (iid,),
    )
    expect(tx, "select df.await_instance('abcdef01', 1)", psycopg.errors.NoDataFound, "not found")
    t0 = time.monotonic()
    expect(
        tx,
        "select df.await_instance(%s, 1)",
        psycopg.errors.QueryCanceled,
        "Timed out after 1s",
        (iid,),
    )
    assert 0.9 < time.monotonic() - t0 < 5
    tx.execute("set local df.in_workflow = 'true'")
    expect(
        tx,
        "select df.await_instance(%s)",
        psycopg.errors.FeatureNotSupported,
        "cannot be called inside a workflow",
        (iid,),
    )
    tx.execute("set local df.in_workflow = ''")
    tx.execute("select df.cancel(%s)", (iid,))
    assert one(tx, "select df.await_instance(%s)", (iid,)) == "cancelled"


def test_wait_for_completion_warns(tx, user):
    iid = one(tx, "select df.start('select 1')")
    tx.execute("select df.cancel(%s)", (iid,))
    notices = []
    tx.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
    assert one(tx, "select df.wait_for_completion(%s, 5)", (iid,)) == "cancelled"
    assert any(sev == "WARNING" and "deprecated" in msg for sev, msg in notices)


def test_await_sees_commits_of_other_sessions(db):
    role = db.create_role("ct")
    with db.connect(role) as conn, db.connect() as admin:
        iid = one(conn, "select df.start('select 1')")
        admin.execute("select pg_sleep(0)")

        import threading

        def finish():
            time.sleep(0.3)  # let df.await_instance start polling first
            admin.execute("update df.instances set status = 'completed' where id = %s", (iid,))

        t = threading.Thread(target=finish)
        t.start()
        assert one(conn, "select df.await_instance(%s, 10)", (iid,)) == "completed"
        t.join()


def test_signal_and_cancel_are_transactional(db):
    role = db.create_role("ct")
    with db.connect(role, autocommit=False) as conn, db.connect() as admin:
        iid = one(conn, "select df.start('select 1')")
        conn.commit()
        conn.execute("select df.signal(%s, 'go')", (iid,))
        conn.execute("select df.cancel(%s)", (iid,))
        conn.rollback()
        assert one(admin, "select count(*) from pgdurable.signals") == 0
        assert one(admin, "select status from df.instances where id = %s", (iid,)) == "pending"
        admin.execute("listen pgdurable_cancel")
        conn.execute("select df.cancel(%s)", (iid,))
        conn.commit()
        assert one(admin, "select status from df.instances where id = %s", (iid,)) == "cancelled"
        # delivered at commit, and empty: any role may LISTEN, a channel names no instance
        assert [n.payload for n in admin.notifies(timeout=2, stop_after=1)] == [""]
