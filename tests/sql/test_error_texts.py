"""Every error text users and scripts match on (pg_durable's texts, kept as substrings), each
provoked through the path that raises it in use: a DSL call, df.start, df.explain, a control
or monitoring function, as an ordinary tenant unless the text is about the caller's identity.

The texts raised while a workflow runs (a step's own SQL error, HTTP policy refusals,
connection slots, helpers called from a step) are provoked through a real serve in
tests/acceptance/test_error_texts.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from tests.fix_sql import become, mkrole


def raised(conn: Any, query: str, params: tuple[Any, ...] = ()) -> psycopg.Error:
    """The error the statement raises (in a savepoint: the transaction goes on)."""
    conn.execute("savepoint e")
    try:
        conn.execute(query, params)
    except psycopg.Error as exc:
        conn.execute("rollback to savepoint e")
        return exc
    raise AssertionError(f"no error from {query} {params}")


def node(node_type: str, **kw: Any) -> dict[str, Any]:
    return {"node_type": node_type, **kw}


def sqln(q: str) -> dict[str, Any]:
    return node("SQL", query=q)


def nest(levels: int) -> dict[str, Any]:
    g = sqln("select 1")
    for _ in range(levels - 1):
        g = node("LOOP", left_node=g)
    return g


# (text, statement, parameters): graph validation, through df.start and the DSL
GRAPH_TEXTS = [
    # an IF without any condition
    (
        "condition_node",
        "select df.start(%s)",
        (json.dumps(node("IF", left_node=sqln("a"), right_node=sqln("b"))),),
    ),
    (
        "condition_node in IF must be a first-class Durofut field",
        "select df.start(%s)",
        (
            json.dumps(
                node(
                    "IF",
                    query=json.dumps({"condition_node": "abcd1234"}),
                    left_node=sqln("a"),
                    right_node=sqln("b"),
                )
            ),
        ),
    ),
    (
        "condition_node in IF must be a first-class Durofut field",
        "select df.start(%s)",
        (
            json.dumps(
                node("IF", condition_node="select 1", left_node=sqln("a"), right_node=sqln("b"))
            ),
        ),
    ),
    (
        "extra_nodes entries must be Durofut JSON objects",
        "select df.start(%s)",
        (json.dumps(node("JOIN", left_node=sqln("a"), right_node=sqln("b"), extra_nodes=["x"])),),
    ),
    # the case: a condition_node AND a query that is not JSON
    (
        "query in IF must be valid JSON config",
        "select df.start(%s)",
        (
            json.dumps(
                node(
                    "IF",
                    condition_node=sqln("select true"),
                    query="{not json",
                    left_node=sqln("a"),
                    right_node=sqln("b"),
                )
            ),
        ),
    ),
    (
        "query in IF must be valid JSON config",
        "select df.start(%s)",
        (json.dumps(node("IF", query="not json", left_node=sqln("a"), right_node=sqln("b"))),),
    ),
    (
        "query in IF must be valid JSON config",
        "select df.start(%s)",
        (
            json.dumps(
                node(
                    "IF",
                    condition_node=sqln("select true"),
                    query="[1, 2]",
                    left_node=sqln("a"),
                    right_node=sqln("b"),
                )
            ),
        ),
    ),
    ("Unknown node_type 'X'", "select df.start(%s)", ('{"node_type": "X"}',)),
    ("Unknown node_type 'X'", "select df.seq(%s, 'select 1')", ('{"node_type": "X"}',)),
    (
        "Unknown node_type 'NOPE'",
        "select df.start(%s)",
        (json.dumps(node("THEN", left_node=sqln("a"), right_node=node("NOPE"))),),
    ),
    ("maximum nesting depth of 256", "select df.start(%s)", (json.dumps(nest(258)),)),
    ("not a valid identifier", "select df.as('select 1', '1bad')", ()),
    ("not a valid identifier", "select df.if_rows('bad name', 'select 1', 'select 2')", ()),
    (
        "not a valid identifier",
        "select df.start(%s)",
        (json.dumps(node("SQL", query="select 1", result_name="1bad")),),
    ),
    ("cannot be used as a workflow step", "select df.start(df.setvar('x', '1'))", ()),
    ("cannot be used as a workflow step", "select df.seq('select 1', df.clearvars())", ()),
    ("unsupported URL scheme", "select df.http('ftp://example.com/x', 'GET')", ()),
]


@pytest.mark.parametrize(
    ("text", "query", "params"),
    GRAPH_TEXTS,
    ids=[f"{i}-{t[0][:30]}" for i, t in enumerate(GRAPH_TEXTS)],
)
def test_graph_and_dsl_texts(
    tx: Any, user: str, text: str, query: str, params: tuple[Any, ...]
) -> None:
    http_user = mkrole_as_admin(tx, user, http=True) if "df.http" in query else None
    if http_user:
        become(tx, http_user)
    err = raised(tx, query, params)
    assert text in str(err), str(err)
    # graph errors are the caller's mistakes: 22023 (or 54000 for a limit), never internal
    assert err.sqlstate in ("22023", "54000"), (err.sqlstate, str(err))


def mkrole_as_admin(tx: Any, back_to: str, **kw: Any) -> str:
    tx.execute("reset role")
    role = mkrole(tx, **kw)
    become(tx, back_to)
    return role


def test_a_graph_at_the_maximum_nesting_depth_is_accepted(tx: Any, user: str) -> None:
    # nesting depth 256 (the root at depth 0) is 257 node levels; one level more is refused
    iid = tx.execute("select df.start(%s)", (json.dumps(nest(257)),)).fetchone()[0]
    assert (
        tx.execute("select count(*) from df.nodes where instance_id = %s", (iid,)).fetchone()[0]
        == 257
    )
    text = tx.execute("select df.explain(%s)", (json.dumps(nest(257)),)).fetchone()[0]
    assert text.startswith("Dry run (not started): 257 nodes"), text[:80]
    err = raised(tx, "select df.start(%s)", (json.dumps(nest(258)),))
    assert "exceeds the maximum nesting depth of 256" in str(err)
    assert err.sqlstate == "54000"


def test_a_stored_graph_past_the_maximum_nesting_depth_is_refused(tx: Any, user: str) -> None:
    # rows written directly (tenants hold INSERT on df.instances/df.nodes, as in pg_durable)
    # are validated when they are handed to the engine, with the same limit
    def write(levels: int) -> str:
        iid = uuid.uuid4().hex[:8]
        ids = [f"{iid[:4]}{k:04x}" for k in range(levels)]
        tx.execute(
            "insert into df.instances (id, root_node, submitted_by) "
            "values (%s, %s, current_user::regrole)",
            (iid, ids[0]),
        )
        for k, nid in enumerate(ids):
            last = k == levels - 1
            tx.execute(
                "insert into df.nodes (id, instance_id, node_type, query, left_node, "
                "submitted_by) values (%s, %s, %s, %s, %s, current_user::regrole)",
                (
                    nid,
                    iid,
                    "SQL" if last else "LOOP",
                    "select 1" if last else None,
                    None if last else ids[k + 1],
                ),
            )
        return iid

    tx.execute("select pgdurable._enqueue_v1(%s, '{}')", (write(257),))
    err = raised(tx, "select pgdurable._enqueue_v1(%s, '{}')", (write(258),))
    assert "maximum nesting depth of 256" in str(err), str(err)
    assert err.sqlstate == "54000"


def test_explain_of_an_invalid_graph_returns_the_text(tx: Any, user: str) -> None:
    for value in (
        '{"node_type": "X"}',
        json.dumps(nest(258)),
        json.dumps(
            node(
                "IF",
                condition_node=sqln("select 1"),
                query="{bad",
                left_node=sqln("a"),
                right_node=sqln("b"),
            )
        ),
    ):
        text = tx.execute("select df.explain(%s)", (value,)).fetchone()[0]
        assert text.startswith("Invalid durable function graph: root:"), text[:120]
    assert "query in IF must be valid JSON config" in text


def test_cannot_be_called_inside_a_workflow(tx: Any, user: str) -> None:
    # what the worker sets on every step session (the end-to-end twin runs a real step)
    tx.execute("set local df.in_workflow = 'true'")
    for query in (
        "select df.setvar('a', 'b')",
        "select df.unsetvar('a')",
        "select df.clearvars()",
        "select df.await_instance('abcdef12', 1)",
        "select df.start('select 1', transaction_mode => 'new')",
    ):
        err = raised(tx, query)
        assert "cannot be called inside a workflow" in str(err), (query, str(err))


def test_identity_and_database_texts(tx: Any) -> None:
    # the test connection is a superuser: refused unless the setting allows it
    err = raised(tx, "select df.start('select 1')")
    assert "enable_superuser_instances" in str(err)
    nologin = mkrole(tx, login=False)
    ok = mkrole(tx)
    become(tx, nologin)
    err = raised(tx, "select df.start('select 1')")
    assert "LOGIN" in str(err), str(err)
    become(tx, ok)
    err = raised(tx, "select df.start('select 1', database => 'no_such_db_et')")
    assert "does not exist" in str(err)
    assert "no_such_db_et" in str(err)
    err = raised(tx, "select df.start('select 1', transaction_mode => 'later')")
    assert "invalid transaction_mode" in str(err)


def test_not_found_or_access_denied(tx: Any, user: str) -> None:
    for query in (
        "select df.signal('0123abcd', 'go')",
        "select df.cancel('0123abcd')",
        "select df.explain('0123abcd')",
    ):
        err = raised(tx, query)
        assert "not found or access denied" in str(err), (query, str(err))
    # another role's instance is not found either
    iid = tx.execute("select df.start('select 1')").fetchone()[0]
    tx.execute("reset role")
    other = mkrole(tx)
    become(tx, other)
    for query in ("select df.signal(%s, 'go')", "select df.cancel(%s)"):
        err = raised(tx, query, (iid,))
        assert "not found or access denied" in str(err), (query, str(err))


def test_list_instances_max_limit(tx: Any, user: str) -> None:
    err = raised(tx, "select * from df.list_instances(null, 1001)")
    assert "list_instances_max_limit (1000)" in str(err)
    tx.execute("set local pg_durable.list_instances_max_limit = 7")
    err = raised(tx, "select * from df.list_instances(null, 8, null)")
    assert "list_instances_max_limit (7)" in str(err)


def test_launch_slot_texts(db: Any) -> None:
    # transaction_mode 'new' takes a launch slot before it opens any session
    with db.connect() as admin:
        try:  # 'new' mode opens its session through dblink
            admin.execute("create extension if not exists dblink")
        except psycopg.Error as exc:
            pytest.skip(f"dblink is not available on this server: {exc}")
    role = db.create_role("et")
    with db.connect(autocommit=False) as holder, db.connect(role) as conn:
        holder.execute("select 1 from pgdurable.locks where name = 'launch:0' for update")
        conn.execute("set pg_durable.max_new_transaction_starts = 1")
        conn.execute("set pg_durable.new_transaction_start_timeout = 1")
        with pytest.raises(psycopg.Error) as exc:
            conn.execute("select df.start('select 1', transaction_mode => 'new')")
        holder.rollback()
    assert "max_new_transaction_starts=1" in str(exc.value), str(exc.value)
    assert "Timed out after 1s waiting for a launch slot" in str(exc.value)


def test_explain_texts(tx: Any, user: str) -> None:
    text = tx.execute(
        "select df.explain($$df.sql('select 1') ~> df.sleep(30) ~> "
        "df.race(df.wait_for_signal('a'), 'select 2') ~> "
        "df.if(df.sql('select true'), 'select 3', 'select 4')$$)"
    ).fetchone()[0]
    for part in ("SQL: select 1", "SLEEP 30s", "RACE", "branch 1:", "branch 2:"):
        assert part in text, (part, text)
    assert text.count("→") == 3, text  # one per THEN edge
    assert text.count("IF") == 1, text
    # the marks, from a live instance's inferred statuses
    iid = tx.execute(
        "select df.start(df.if(df.sql('select true'), 'select 3', 'select 4') ~> 'select 5')"
    ).fetchone()[0]
    tx.execute("reset role")
    rows = dict(
        tx.execute("select query, id from df.nodes where instance_id = %s", (iid,)).fetchall()
    )
    tx.execute(
        "update df.nodes set status = 'completed' where instance_id = %s and id = %s",
        (iid, rows["select true"]),
    )
    tx.execute(
        "update df.nodes set status = 'failed', result = '\"boom\"' "
        "where instance_id = %s and id = %s",
        (iid, rows["select 3"]),
    )
    tx.execute(
        "update df.nodes set status = 'running', status_details = '{\"branch\": \"then\"}' "
        "where instance_id = %s and node_type = 'IF'",
        (iid,),
    )
    become(tx, user)
    live = tx.execute("select df.explain(%s)", (iid,)).fetchone()[0]
    for mark in (
        "✓ SQL: select true",
        "✗ SQL: select 3",
        "⏳ IF",
        "⊘ SQL: select 4",
        "○ SQL: select 5",
    ):
        assert mark in live, (mark, live)
