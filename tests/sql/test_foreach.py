"""df.foreach in SQL (docs/foreach.md): the graph value it builds, every bad argument at build
time, df.start's validation of a hand-written FOREACH, df.explain, and the engine tables'
privacy (a tenant reads and writes no FOREACH rows, its own or another's, and sees another's
progress as nothing)."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import errors

from tests import fix_db
from tests.fix_sql import one
from tests.sql.test_dsl import fails, graph
from tests.sql.test_inspect import user  # noqa: F401  (fixture)

BODY = "df.sql('insert into t values ($item.id)')"


def test_foreach_stores_rows_body_and_max_parallel(tx):
    g = graph(tx, f"select df.foreach('select id from t order by id', {BODY}, 7)")
    assert g["node_type"] == "FOREACH"
    assert "left_node" not in g
    assert "right_node" not in g
    cfg = json.loads(g["query"])
    assert cfg == {
        "rows": "select id from t order by id",
        "body": {"node_type": "SQL", "query": "insert into t values ($item.id)"},
        "max_parallel": 7,
    }
    # the default, named arguments, any graph as the body, composable like any node
    g = graph(
        tx,
        "select df.seq(df.foreach(rows => 'values (1)', "
        "body => df.retry(df.seq('select 1', 'select 2'))), 'select 3')",
    )
    cfg = json.loads(g["left_node"]["query"])
    assert cfg["max_parallel"] == 10
    assert cfg["body"]["node_type"] == "RETRY"
    # a plain SQL text body is a SQL step, as everywhere in the DSL
    cfg = json.loads(
        graph(tx, "select df.foreach('select 1 as x', 'insert into t values ($item.x)')")["query"]
    )
    assert cfg["body"]["node_type"] == "SQL"
    assert cfg["body"]["query"] == "insert into t values ($item.x)"
    # DML with RETURNING gives rows too
    graph(tx, f"select df.foreach('delete from q returning id', {BODY})")


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (f"df.foreach(null, {BODY})", "df.foreach: rows must not be NULL"),
        (f"df.foreach('  ', {BODY})", "df.foreach: rows must be a SQL query, got an empty text"),
        (f"df.foreach(df.sql('select 1'), {BODY})", "rows must be a SQL query, not a graph value"),
        (
            f"df.foreach('insert into t values (1)', {BODY})",
            "rows must be a query that returns rows",
        ),
        (f"df.foreach('vacuum t', {BODY})", "rows must be a query that returns rows"),
        ("df.foreach('select 1', null)", "df.foreach: body must not be NULL"),
        (
            "df.foreach('select 1', '  ')",
            "body is not a valid graph: SQL node needs a non-empty query",
        ),
        (
            """df.foreach('select 1', '{"node_type":"NOPE"}')""",
            "df.foreach: body is not a valid graph: Unknown node_type 'NOPE'",
        ),
        (
            f"df.foreach('select 1', {BODY}, 0)",
            "df.foreach: max_parallel must be from 1 to 1000, got 0",
        ),
        (f"df.foreach('select 1', {BODY}, -5)", "max_parallel must be from 1 to 1000, got -5"),
        (f"df.foreach('select 1', {BODY}, 1001)", "max_parallel must be from 1 to 1000, got 1001"),
        (f"df.foreach('select 1', {BODY}, null)", "df.foreach: max_parallel must not be NULL"),
    ],
)
def test_bad_arguments_name_the_argument(tx, call, needle):
    assert needle in fails(tx, f"select {call}")


def _hand(query):
    return json.dumps({"node_type": "FOREACH", "query": query})


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (_hand('{"rows": "select 1"}'), "FOREACH config needs rows (a query), body (a graph)"),
        (
            _hand(
                json.dumps(
                    {
                        "rows": "select 1",
                        "body": {"node_type": "SQL", "query": "x"},
                        "max_parallel": 5000,
                    }
                )
            ),
            "max_parallel must be from 1 to 1000, got 5000",
        ),
        (
            _hand(
                json.dumps(
                    {
                        "rows": "select 1",
                        "body": {"node_type": "SQL", "query": "x"},
                        "max_parallel": 2.5,
                    }
                )
            ),
            "max_parallel must be from 1 to 1000, got 2.5",
        ),
        (
            _hand(
                json.dumps(
                    {
                        "rows": "update t set a = 1",
                        "body": {"node_type": "SQL", "query": "x"},
                        "max_parallel": 2,
                    }
                )
            ),
            "rows must be a query that returns rows",
        ),
        (
            _hand(
                json.dumps(
                    {
                        "rows": "select 1",
                        "body": {"node_type": "SLEEP", "query": "x"},
                        "max_parallel": 2,
                    }
                )
            ),
            "body is not a valid graph",
        ),
    ],
)
def test_start_validates_a_hand_written_foreach(tx, user, value, needle):  # noqa: F811
    msg = fails(tx, "select df.start(%s)", value)
    assert needle in msg
    assert "(at root)" in msg


def test_start_stores_a_foreach_leaf(tx, user):  # noqa: F811
    iid = one(tx, f"select df.start(df.foreach('select 1 as id', {BODY}, 3) ~> 'select 2')")
    rows = tx.execute(
        "select node_type, query, left_node, right_node from df.nodes where instance_id = %s",
        (iid,),
    ).fetchall()
    (fe,) = [r for r in rows if r[0] == "FOREACH"]
    assert json.loads(fe[1])["max_parallel"] == 3
    assert fe[2] is None
    assert fe[3] is None
    assert one(tx, "select status from df.instances where id = %s", (iid,)) == "pending"


def test_explain_dry_run_shows_the_foreach(tx, user):  # noqa: F811
    text = one(tx, f"select df.explain($q$df.foreach('select id  from   t', {BODY}, 4)$q$)")
    assert "FOREACH (max_parallel 4): select id from t" in text, text


def test_tenants_cannot_read_or_write_foreach_rows(db: fix_db.TestDB) -> None:
    """Items of a's FOREACH (written here as the engine would): neither a nor b may read or
    write the engine's tables, call its functions, or learn b's progress through a's
    inspection helper; a sees its own progress."""
    a = db.create_role("fa")
    b = db.create_role("fb")
    with db.connect(a) as conn:
        iid = conn.execute(f"select df.start(df.foreach('select 1 as id', {BODY}))").fetchone()[0]
        (node,) = conn.execute(
            "select id from df.nodes where instance_id = %s and node_type = 'FOREACH'", (iid,)
        ).fetchone()
    with db.connect() as conn:  # the engine's writes, as a superuser
        conn.execute(
            "insert into pgdurable.foreach_runs (instance_id, node_id, gen, row_count, "
            "max_parallel, body, names, label, submitted_by) values "
            "(%s, %s, 1, 2, 10, '[]', '{}', 'x', %s::regrole)",
            (iid, node, a),
        )
        conn.execute(
            "insert into pgdurable.foreach_items (instance_id, node_id, ord, item, status, "
            "result, submitted_by) values (%s, %s, 1, '{\"id\": 1}', 'completed', '1', "
            "%s::regrole), (%s, %s, 2, '{\"id\": 2}', 'pending', null, %s::regrole)",
            (iid, node, a, iid, node, a),
        )
        conn.execute(
            "update df.nodes set status = 'running' where instance_id = %s and id = %s",
            (iid, node),
        )
    for role in (a, b):
        with db.connect(role) as conn:
            for stmt in (
                "select * from pgdurable.foreach_items",
                "select * from pgdurable.foreach_runs",
                "update pgdurable.foreach_items set status = 'completed'",
                "delete from pgdurable.foreach_items",
                "insert into pgdurable.foreach_items (instance_id, node_id, ord, item, "
                f"submitted_by) values ('{iid}', '{node}', 3, '{{}}', '{a}'::regrole)",
            ):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(stmt)
            for call in (
                f"select * from pgdurable._foreach_tick_v1('w', '{iid}', '{node}', 1)",
                f"select pgdurable._foreach_cancel_v1('{iid}', '{node}', 'x')",
                "select pgdurable._foreach_reap_v1(10)",
                f"select pgdurable._foreach_restarted_v1('{iid}', '{node}', 2)",
                f"select pgdurable._restart_core_v1('{iid}', true)",
                f"select pgdurable._step_foreach_rows_v1('x', 'w', '{iid}', '{node}', 1, '[]')",
            ):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(call)
    with db.connect(b) as conn:
        assert (
            conn.execute("select pgdurable._foreach_progress_v1(%s, %s)", (iid, node)).fetchone()[0]
            is None
        )
        assert conn.execute("select count(*) from df.instance_nodes(%s)", (iid,)).fetchone()[0] == 0
    with db.connect(a) as conn:
        prog = conn.execute(
            "select pgdurable._foreach_progress_v1(%s, %s)", (iid, node)
        ).fetchone()[0]
        assert prog["progress"] == "1/2"
        (det,) = conn.execute(
            "select status_details from df.instance_nodes(%s) where node_type = 'FOREACH'",
            (iid,),
        ).fetchone()
        assert json.loads(det)["progress"] == "1/2"
        text = conn.execute("select df.explain(%s)", (iid,)).fetchone()[0]
        assert "FOREACH (1/2 rows done, 0 running, max_parallel 10)" in text, text
    with db.connect() as conn:  # nothing changed
        assert (
            conn.execute(
                "select count(*) from pgdurable.foreach_items where instance_id = %s", (iid,)
            ).fetchone()[0]
            == 2
        )


def test_a_tenant_cannot_wake_or_cancel_another_tenants_foreach(db: fix_db.TestDB) -> None:
    """The triggers act only on rows whose child is the very instance that changed, of the
    same owner: b ending its own instance labelled like a's child, or failing its own FOREACH
    node, touches nothing of a's."""
    a = db.create_role("ta")
    b = db.create_role("tb")
    with db.connect(a) as conn:
        pid = conn.execute(f"select df.start(df.foreach('select 1 as id', {BODY}))").fetchone()[0]
        (node,) = conn.execute("select id from df.nodes where instance_id = %s", (pid,)).fetchone()
    with db.connect(b) as conn:
        bid = conn.execute(
            "select df.start('select 1', label => %s)", (f"{pid} foreach {node} row 1",)
        ).fetchone()[0]
    with db.connect() as conn:
        conn.execute(
            "insert into pgdurable.foreach_runs (instance_id, node_id, gen, row_count, "
            "max_parallel, body, names, label, submitted_by) values "
            "(%s, %s, 1, 1, 10, '[]', '{}', 'x', %s::regrole)",
            (pid, node, a),
        )
        # a's row 1 runs in a child of a's; b's instance is not it
        conn.execute(
            "insert into pgdurable.foreach_items (instance_id, node_id, ord, item, child_id, "
            "status, submitted_by) values (%s, %s, 1, '{}', %s, 'running', %s::regrole)",
            (pid, node, bid, a),
        )
    with db.connect(b) as conn:
        conn.execute("update df.instances set status = 'completed' where id = %s", (bid,))
    with db.connect() as conn:
        assert (
            conn.execute(
                "select status from pgdurable.foreach_items where instance_id = %s", (pid,)
            ).fetchone()[0]
            == "running"
        )
    with db.connect(b) as conn, pytest.raises(psycopg.Error):
        conn.execute("update df.nodes set status = 'failed' where instance_id = %s", (pid,))
