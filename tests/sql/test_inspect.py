"""Inspection and admin functions (40_inspect.sql): listing, nodes + inferred status, explain,
info/executions, metrics, vars, misc. Worker writes are simulated as the table owner
(ARCHITECTURE.md §4)."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql

from tests.fix_sql import become, mkrole, one


def expect(conn, query, exc, match, params=()):
    conn.execute("savepoint expect")
    with pytest.raises(exc, match=match):
        conn.execute(query, params)
    conn.execute("rollback to savepoint expect")


def sqln(q, **kw):
    return {"node_type": "SQL", "query": q, **kw}


@pytest.fixture
def user(tx):
    role = mkrole(tx, "in", http=True)
    become(tx, role)
    return role


def owner_update(tx, user, iid, node_id, **cols):
    """Write a node row as the worker would (as the table owner)."""
    tx.execute("reset role")
    sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in cols)
    tx.execute(
        sql.SQL("update df.nodes set {} where instance_id = %s and id = %s").format(sets),
        [json.dumps(v) if k in ("result", "status_details") else v for k, v in cols.items()]
        + [iid, node_id],
    )
    become(tx, user)


def set_instance(tx, user, iid, status):
    tx.execute("reset role")
    tx.execute("update df.instances set status = %s where id = %s", (status, iid))
    become(tx, user)


def ids(tx, iid):
    return [
        r[0]
        for r in tx.execute("select id from df.nodes where instance_id = %s order by id", (iid,))
    ]


def inferred(tx, iid):
    return {
        r[0]: (r[1], r[2])
        for r in tx.execute(
            "select node_id, inferred_status, inferred_status_from_ancestor_id "
            "from df.instance_nodes(%s)",
            (iid,),
        )
    }


# ---------------------------------------------------------------- list_instances


def test_list_instances_basic_and_paged(tx, user):
    started = [
        one(tx, "select df.start(%s, %s)", (f"select {i}", "even" if i % 2 == 0 else "odd"))
        for i in range(5)
    ]
    tx.execute("reset role")
    # distinct created_at so the order is defined (all rows of one transaction share now())
    for n, iid in enumerate(started):
        tx.execute(
            "update df.instances set created_at = now() - make_interval(secs => %s) where id = %s",
            (100 - n, iid),
        )
    become(tx, user)
    rows = tx.execute("select * from df.list_instances()").fetchall()
    assert [r[0] for r in rows] == started[::-1]  # newest first
    assert len(rows[0]) == 6
    assert rows[0][1:] == ("even", "pgdurable", "pending", 0, None)
    assert len(tx.execute("select * from df.list_instances('running')").fetchall()) == 0
    # paged, 2 per page
    seen, cursor = [], None
    while True:
        page = tx.execute(
            "select * from df.list_instances(null, 2, null, %s)", (cursor,)
        ).fetchall()
        assert len(page[0]) == 9
        assert len({r[8] for r in page}) == 1  # same cursor on every row
        seen += [r[0] for r in page]
        cursor = page[0][8]
        if cursor is None:
            break
        assert all(c in "0123456789abcdef" for c in cursor)
    assert seen == started[::-1]
    odd = tx.execute("select instance_id from df.list_instances(null, 10, 'odd')").fetchall()
    assert [r[0] for r in odd] == [started[3], started[1]]
    expect(
        tx,
        "select * from df.list_instances(null, 2, null, 'zz')",
        psycopg.errors.InvalidParameterValue,
        "invalid list_instances cursor",
    )
    expect(
        tx,
        "select * from df.list_instances(null, 2, null, 'abcd')",
        psycopg.errors.InvalidParameterValue,
        "invalid list_instances cursor",
    )


def test_list_instances_page_cap(tx, user):
    expect(
        tx,
        "select * from df.list_instances(null, 1001)",
        psycopg.errors.ProgramLimitExceeded,
        r"list_instances_max_limit \(1000\)",
    )
    tx.execute("set local pg_durable.list_instances_max_limit = 5")
    expect(
        tx,
        "select * from df.list_instances(null, 6, null)",
        psycopg.errors.ProgramLimitExceeded,
        r"list_instances_max_limit \(5\)",
    )
    assert tx.execute("select * from df.list_instances(null, 5)").fetchall() == []
    expect(
        tx,
        "select * from df.list_instances(null, 0)",
        psycopg.errors.InvalidParameterValue,
        "at least 1",
    )


# ---------------------------------------------------------------- instance_nodes / inferred

IF_GRAPH = json.dumps(
    {
        "node_type": "IF",
        "condition_node": sqln("select true"),
        "left_node": sqln("select 'then'"),
        "right_node": {
            "node_type": "THEN",
            "left_node": sqln("select 'e1'"),
            "right_node": sqln("select 'e2'"),
        },
    }
)


def test_instance_nodes_columns_and_if_inference(tx, user):
    iid = one(tx, "select df.start(%s)", (IF_GRAPH,))
    cols = [d.name for d in tx.execute("select * from df.instance_nodes(%s)", (iid,)).description]
    assert cols == [
        "node_id",
        "node_type",
        "query",
        "result_name",
        "left_node",
        "right_node",
        "status",
        "result",
        "status_details",
        "inferred_status",
        "inferred_status_from_ancestor_id",
        "updated_at",
    ]
    root, cond, then_, els, e1, e2 = ids(tx, iid)
    assert set(inferred(tx, iid).values()) == {("pending", None)}
    owner_update(
        tx, user, iid, cond, status="completed", result={"rows": [{"b": True}], "row_count": 1}
    )
    owner_update(tx, user, iid, root, status="running", status_details={"branch": "then", "gen": 1})
    owner_update(tx, user, iid, then_, status="running")
    got = inferred(tx, iid)
    assert got[root] == ("running", None)
    assert got[cond] == ("completed", None)
    assert got[then_] == ("running", None)
    assert got[els] == ("skipped", root)
    assert got[e1] == ("skipped", root)
    assert got[e2] == ("skipped", root)
    # pg_durable's compat overload: every node (its second argument is ignored), with the
    # execution its state is from first (1 for a node that has not run)
    legacy = tx.execute("select * from df.instance_nodes(%s, 2)", (iid,)).fetchall()
    assert [r[1] for r in legacy] == [
        r[0] for r in tx.execute("select node_id from df.instance_nodes(%s)", (iid,)).fetchall()
    ]
    assert len(legacy) == 6
    assert {len(r) for r in legacy} == {10}
    assert {r[0] for r in legacy} == {1}
    # the instance finishes: leftover pending nodes are skipped from the root
    owner_update(tx, user, iid, then_, status="completed")
    owner_update(tx, user, iid, root, status="completed")
    set_instance(tx, user, iid, "completed")
    assert inferred(tx, iid)[els] == ("skipped", root)


def test_inferred_then_failure_race_and_superseded(tx, user):
    g = {
        "node_type": "THEN",
        "left_node": sqln("select 1/0"),
        "right_node": {
            "node_type": "RACE",
            "left_node": sqln("a"),
            "right_node": {"node_type": "SLEEP", "query": "30"},
        },
    }
    iid = one(tx, "select df.start(%s)", (json.dumps(g),))
    root, div, race, a, _slp = ids(tx, iid)
    owner_update(tx, user, iid, div, status="failed", result="division by zero")
    got = inferred(tx, iid)
    assert got[race] == ("skipped", root)
    assert got[a] == ("skipped", root)

    # RACE decided
    iid2 = one(tx, "select df.start(%s)", (json.dumps(g["right_node"]),))
    race2, a2, slp2 = ids(tx, iid2)
    owner_update(tx, user, iid2, a2, status="completed")
    owner_update(tx, user, iid2, race2, status="running", status_details={"winner": a2})
    got = inferred(tx, iid2)
    assert got[slp2] == ("skipped", race2)
    assert got[a2] == ("completed", None)

    # LOOP: a body node stamped before the current iteration began reads as pending
    loop = {
        "node_type": "LOOP",
        "left_node": {"node_type": "THEN", "left_node": sqln("x"), "right_node": sqln("y")},
    }
    iid3 = one(tx, "select df.start(%s)", (json.dumps(loop),))
    lp, _body, x, y = ids(tx, iid3)
    owner_update(
        tx,
        user,
        iid3,
        lp,
        status="running",
        status_details={"iteration": 2, "seq": 3, "iter_seq": 7},
    )
    owner_update(tx, user, iid3, x, status="completed", status_details={"seq": 8})
    owner_update(tx, user, iid3, y, status="completed", status_details={"seq": 5})
    got = inferred(tx, iid3)
    assert got[x] == ("completed", None)
    assert got[y] == ("pending", lp)
    assert (
        tx.execute(
            "select execution_count from df.list_instances() where instance_id = %s", (iid3,)
        ).fetchone()[0]
        == 2
    )


# ---------------------------------------------------------------- explain


def test_explain_live_marks(tx, user):
    iid = one(tx, "select df.start(%s)", (IF_GRAPH,))
    root, cond, _then, _els, e1, _e2 = ids(tx, iid)
    owner_update(tx, user, iid, cond, status="completed")
    owner_update(tx, user, iid, root, status="running", status_details={"branch": "else"})
    owner_update(tx, user, iid, e1, status="failed", result="boom")
    text = one(tx, "select df.explain(%s)", (iid,))
    lines = text.splitlines()
    assert lines[:3] == [f"Instance: {iid}", "Status: pending", "Output: (none)"]
    body = "\n".join(lines[3:])
    assert "⏳ IF" in body
    assert "condition: ✓ SQL: select true" in body
    assert "then: ⊘ SQL: select 'then'" in body
    assert "✗ SQL: select 'e1'" in body
    assert "→ ⊘ SQL: select 'e2'" in body
    assert body.count("IF") == 1
    assert body.count("→") == 1
    tx.execute("reset role")
    other = mkrole(tx, "in", http=True)
    become(tx, other)
    expect(
        tx,
        "select df.explain(%s)",
        psycopg.errors.NoDataFound,
        "not found or access denied",
        (iid,),
    )


def test_explain_dry_run_formats(tx, user):
    g = one(
        tx,
        """select df.seq(df.seq(df.as(df.sql('select 1'), 'a'), df.sleep(30)),
                   df.seq(df.race(df.wait_for_signal('go'), df.wait_for_schedule('0 * * * *')),
                          df.seq(df.join3('x', 'y', df.http('https://example.com/h', 'GET')),
                                 df.loop(df.if_rows('a', 'select 2', df.break()), 'select false'))))""",
    )
    text = one(tx, "select df.explain(%s)", (g,))
    assert text.startswith("Dry run")
    for frag in [
        "SQL: select 1 |=> 'a'",
        "→ SLEEP 30s",
        "→ RACE",
        "branch 1: SIGNAL 'go'",
        "branch 2: WAIT '0 * * * *'",
        "JOIN (3)",
        "branch 3: HTTP GET https://example.com/h",
        "LOOP (while)",
        "body: IF",
        "while: SQL: select false",
        "else: BREAK",
    ]:
        assert frag in text, (frag, text)
    assert text.count("→") == 4
    assert "LOOP (infinite)" in one(
        tx, "select df.explain(%s)", (json.dumps({"node_type": "LOOP", "left_node": sqln("x")}),)
    )
    # DSL text is evaluated
    dsl = one(tx, "select df.explain($q$df.seq('select 1', 'select 2') |=> 'both'$q$)")
    assert "THEN |=> 'both'" in dsl
    assert "→ SQL: select 2" in dsl
    assert one(tx, "select df.explain('select 42')").endswith("SQL: select 42")
    bad = one(tx, """select df.explain('{"node_type":"NOPE"}')""")
    assert bad.startswith("Invalid durable function graph: root:")
    assert "Unknown node_type 'NOPE'" in bad


# ---------------------------------------------------------------- info / executions / metrics


def test_instance_info_and_executions(tx, user):
    iid = one(tx, "select df.start('select 1')")
    (root,) = ids(tx, iid)
    info = tx.execute("select * from df.instance_info(%s)", (iid,)).fetchone()
    assert info[0] == iid
    assert info[2] == "pgdurable"
    assert info[5] == "pending"
    assert tx.execute("select * from df.instance_executions(%s)", (iid,)).fetchall() == []
    owner_update(
        tx,
        user,
        iid,
        root,
        status="completed",
        result={"rows": [], "row_count": 0},
        status_details={
            "execution_id": f"{iid}::1",
            "gen": 1,
            "started_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:00:01.5Z",
        },
    )
    ex = tx.execute("select * from df.instance_executions(%s)", (iid,)).fetchall()
    assert ex == [(1, "completed", 1, 1500, '{"rows": [], "row_count": 0}')]
    assert one(tx, "select current_execution_id from df.instance_info(%s)", (iid,)) == 1


def test_metrics_admin_only(tx):
    plain = mkrole(tx, "in", http=True)
    admin = mkrole(tx, "in", http=True, with_grant=True)
    become(tx, plain)
    expect(
        tx, "select * from df.metrics()", psycopg.errors.InsufficientPrivilege, "permission denied"
    )
    become(tx, admin)
    row = tx.execute("select * from df.metrics()").fetchone()
    assert len(row) == 6
    assert all(isinstance(v, int) for v in row)


# ---------------------------------------------------------------- vars / misc


def test_vars(tx, user):
    assert one(tx, "select df.setvar('a', '1')") == "OK"
    assert one(tx, "select df.setvar('a', '2')") == "OK"
    assert one(tx, "select df.getvar('a')") == "2"
    assert one(tx, "select df.unsetvar('a')") == "OK"
    assert one(tx, "select df.getvar('a')") is None
    tx.execute("select df.setvar('b', '1')")
    assert one(tx, "select df.clearvars()") == "OK"
    assert one(tx, "select count(*) from df.vars") == 0
    tx.execute("set local df.in_workflow = 'true'")
    for q in ["select df.setvar('a', '1')", "select df.unsetvar('a')", "select df.clearvars()"]:
        expect(tx, q, psycopg.errors.FeatureNotSupported, "cannot be called inside a workflow")


def test_misc(tx, user):
    assert one(tx, "select df.version()").endswith("(df API 0.2.6)")
    assert one(tx, "select df.duroxide_schema()") == "pgdurable"
    assert one(tx, "select df.target_database()") == one(tx, "select current_database()")
    tx.execute("select df.run()")
    tx.execute("select df.run('abcdef01')")
    cols = [d.name for d in tx.execute("select * from df.workers").description]
    assert cols == ["host", "pid", "kind", "version", "started_at", "last_seen_at", "in_flight"]
