"""A tenant's temp objects must not redirect df/engine functions (30_control.sql, 40_inspect.sql).

PostgreSQL searches the session's temporary schema FIRST for relations and types whenever it
is not listed in search_path, so ``set search_path = pg_catalog`` still let a tenant's temp
table named ``pg_namespace`` or temp DOMAIN named ``regrole``/``jsonb``/``text``/``timestamptz``
(whose CHECK calls the tenant's code) stand in for the catalog object inside a SECURITY
DEFINER engine helper, i.e. run tenant code with the engine owner's rights. Every function
now pins ``search_path = pg_catalog, pg_temp`` (pg_temp last) and the definers qualify what
they name; these tests create each trap in a real tenant session (a LOGIN role given
df.grant_usage) and check that the trap never ran and the df call behaved normally.

The trap (``trap.hit``) bumps a sequence: nextval is not rolled back, so a trap that ran inside
a statement that failed afterwards is still counted.

Also here: ``pgdurable._enqueue_v1`` validates the stored graph of an instance a tenant wrote
into df.instances/df.nodes itself (tenants hold column INSERT on both, as in pg_durable) and
refuses a cycle, a shared node, an orphan, a missing child, a malformed composite or a graph
past the limits with a clear error, writing nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.fix_sql import one

Conn = psycopg.Connection[Any]


def tenant(db: Any) -> str:
    """A LOGIN role given df.grant_usage that owns schema trap (the trap and its counter)."""
    role = db.create_role("tsh")
    with db.connect() as admin:
        admin.execute(sql.SQL("create schema trap authorization {}").format(sql.Identifier(role)))
    with db.connect(role) as conn:
        conn.execute("create sequence trap.hits")
        # whoever ends up running the trap (the tenant or the engine owner) can count
        conn.execute("grant usage on schema trap to public")
        conn.execute("grant usage, update on sequence trap.hits to public")
        conn.execute("""
            create function trap.hit(what pg_catalog.text) returns boolean
            language plpgsql as $$
            begin
                perform pg_catalog.nextval('trap.hits');
                raise notice 'TRAP SPRUNG: % (running as %)', what, current_user;
                return true;
            end $$""")
        # stand-ins for dblink's functions: what 'new' mode would call if it trusted a
        # pg_extension row pointing at schema trap
        for fn, ret in [
            ("dblink_connect(pg_catalog.text, pg_catalog.text)", "pg_catalog.text"),
            ("dblink_exec(pg_catalog.text, pg_catalog.text)", "pg_catalog.text"),
            ("dblink_disconnect(pg_catalog.text)", "pg_catalog.text"),
        ]:
            conn.execute(f"""
                create function trap.{fn} returns {ret} language plpgsql as $$
                begin perform trap.hit('{fn.split("(")[0]}'); return 'OK'; end $$""")
        conn.execute("""
            create function trap.dblink(pg_catalog.text, pg_catalog.text) returns setof record
            language plpgsql as $$ begin perform trap.hit('dblink'); return; end $$""")
    return role


def hits(conn: Conn) -> int:
    return int(one(conn, "select case when is_called then last_value else 0 end from trap.hits"))


# -- catalog relations shadowed by temp tables/views ---------------------------------------------


def shadow_catalogs(conn: Conn, kind: str) -> None:
    """Temp pg_roles/pg_database/pg_extension/pg_namespace in this session.

    kind 'view': the catalog's rows, filtered through the trap (reading them runs it).
    kind 'table': plain tables holding lies: the tenant cannot log in, no database exists,
    dblink is installed in schema trap (so 'new' mode would call trap.dblink_connect).
    """
    rels = ("pg_roles", "pg_database", "pg_extension", "pg_namespace")
    if kind == "view":
        for rel in rels:
            # OFFSET 0: no qual of the caller's query is pushed below the trap
            conn.execute(
                f"create temp view {rel} as select c.* from pg_catalog.{rel} c "
                f"where trap.hit('{rel}') offset 0"
            )
            # readable by whoever ends up reading it (a definer's owner role included)
            conn.execute(f"grant select on pg_temp.{rel} to public")
        return
    conn.execute(
        "create temp table pg_roles as select * from pg_catalog.pg_roles "
        "where rolname = current_user"
    )
    conn.execute("update pg_temp.pg_roles set rolcanlogin = false, rolsuper = true")
    conn.execute("create temp table pg_database as select * from pg_catalog.pg_database limit 0")
    conn.execute(
        "create temp table pg_extension (oid pg_catalog.oid, extname pg_catalog.name, "
        "extnamespace pg_catalog.oid, extversion pg_catalog.text)"
    )
    conn.execute("create temp table pg_namespace (oid pg_catalog.oid, nspname pg_catalog.name)")
    conn.execute(
        "insert into pg_temp.pg_namespace select n.oid, n.nspname "
        "from pg_catalog.pg_namespace n where n.nspname = 'trap'"
    )
    conn.execute(
        "insert into pg_temp.pg_extension select 1, 'dblink', n.oid, '1.2' "
        "from pg_catalog.pg_namespace n where n.nspname = 'trap'"
    )
    for rel in rels:
        conn.execute(f"grant select on pg_temp.{rel} to public")


@pytest.mark.parametrize("kind", ["view", "table"])
def test_temp_catalog_relations_do_not_reach_start(db, kind):
    role = tenant(db)
    with db.connect(role) as conn:
        shadow_catalogs(conn, kind)
        # the database argument makes df.start look the database up too
        iid = one(conn, "select df.start('select 1', 'shadow', current_database())")
        assert one(conn, "select df.status(%s)", (iid,)) == "pending"
        assert (
            one(
                conn, "select submitted_by::pg_catalog.text from df.instances where id = %s", (iid,)
            )
            == role
        )
        assert hits(conn) == 0, "a temp catalog relation was read by df.start"
        # 'new' mode may fail here for reasons of its own (no dblink in the test database);
        # it must not have read the temp catalogs nor called trap.dblink_*
        with contextlib.suppress(psycopg.Error):
            conn.execute("select df.start('select 1', null, null, transaction_mode => 'new')")
        assert hits(conn) == 0, "a temp catalog relation was read by df.start(..., 'new')"


# -- built-in type names shadowed by temp domains ------------------------------------------------


def shadow_type(conn: Conn, name: str) -> None:
    conn.execute(
        f"create domain pg_temp.{name} as pg_catalog.{name} "
        f"check (trap.hit('{name} ' || value::pg_catalog.text))"
    )


def test_temp_regrole_domain_is_not_used(db):
    role = tenant(db)
    with db.connect(role) as conn:
        shadow_type(conn, "regrole")
        iid = one(
            conn,
            "select df.start(%s)",
            (json.dumps({"node_type": "SIGNAL", "query": json.dumps({"signal_name": "go"})}),),
        )
        assert one(conn, "select df.status(%s)", (iid,)) == "pending"
        assert one(conn, "select df.signal(%s, 'go', '{\"x\": 1}')", (iid,)) == "OK"
        assert (
            one(conn, "select df.cancel(%s, 'stop')", (iid,)) == f"Instance {iid} cancelled: stop"
        )
        assert one(conn, "select df.status(%s)", (iid,)) == "cancelled"
        assert hits(conn) == 0, "the temp regrole domain was used"
    with db.connect() as admin:
        assert (
            one(admin, "select count(*) from pgdurable.signals where instance_id = %s", (iid,)) == 1
        )


@pytest.mark.parametrize("name", ["jsonb", "timestamptz", "text", "varchar"])
def test_temp_builtin_type_domains_are_not_used(db, name):
    role = tenant(db)
    with db.connect(role) as conn:
        shadow_type(conn, name)
        graph = json.dumps(
            {
                "node_type": "THEN",
                "left_node": {"node_type": "SQL", "query": "select 1", "result_name": "a"},
                "right_node": {
                    "node_type": "SIGNAL",
                    "query": json.dumps({"signal_name": "go", "timeout_seconds": 60}),
                },
            }
        )
        conn.execute("select df.setvar('k', 'v')")
        iid = one(conn, "select df.start(%s, 'typed')", (graph,))
        assert one(conn, "select df.status(%s)", (iid,)) == "pending"
        assert one(conn, "select df.signal(%s, 'go', '{\"x\": [1, 2]}')", (iid,)) == "OK"
        # the read side (SECURITY INVOKER, pinned search_path) behaves too
        assert one(conn, "select df.getvar('k')") == "v"
        assert one(conn, "select count(*) from df.instance_nodes(%s)", (iid,)) == 3
        assert one(conn, "select count(*) from df.list_instances(null, 10, 'typed')") == 1
        assert one(conn, "select df.explain(%s)", (iid,)).startswith(f"Instance: {iid}")
        assert one(conn, "select df.result(%s)", (iid,)) is None
        assert one(conn, "select df.cancel(%s)", (iid,)).startswith(f"Instance {iid} cancelled")
        assert one(conn, "select df.status(%s)", (iid,)) == "cancelled"
        assert one(conn, "select df.explain('select 1')").startswith("Dry run")
        assert hits(conn) == 0, f"the temp {name} domain was used"
    with db.connect() as admin:
        assert admin.execute(
            "select r.vars, r.cancel_reason, (select s.data from pgdurable.signals s "
            "where s.instance_id = r.instance_id) from pgdurable.runs r where r.instance_id = %s",
            (iid,),
        ).fetchone() == ({"k": "v"}, "Cancelled by user", {"x": [1, 2]})


# -- stored graphs handed to the engine directly -------------------------------------------------


def sql_leaf(nid: str) -> tuple[str, str, str | None, str | None, str | None]:
    return (nid, "SQL", "select 1", None, None)


def cond(nid: str) -> str:
    return json.dumps({"condition_node": nid})


# (root, rows (id, node_type, query, left_node, right_node), sqlstate, message pattern)
BAD_GRAPHS: dict[
    str, tuple[str, list[tuple[str, str, str | None, str | None, str | None]], str, str]
] = {
    "self_cycle": (
        "a0000001",
        [("a0000001", "THEN", None, "a0000001", "a0000002"), sql_leaf("a0000002")],
        "22023",
        r"node 'a0000001' is reachable twice \(a cycle or a shared node\)",
    ),
    "cycle_through_condition": (
        "a0000001",
        [("a0000001", "LOOP", cond("a0000001"), "a0000002", None), sql_leaf("a0000002")],
        "22023",
        r"node 'a0000001' is reachable twice",
    ),
    "cycle_two_nodes": (
        "a0000001",
        [
            ("a0000001", "THEN", None, "a0000002", "a0000003"),
            ("a0000002", "RACE", None, "a0000001", "a0000003"),
            sql_leaf("a0000003"),
        ],
        "22023",
        r"is reachable twice",
    ),
    "shared_child": (
        "a0000001",
        [
            ("a0000001", "THEN", None, "a0000002", "a0000003"),
            sql_leaf("a0000002"),
            ("a0000003", "RACE", None, "a0000002", "a0000004"),
            sql_leaf("a0000004"),
        ],
        "22023",
        r"node 'a0000002' is reachable twice",
    ),
    "orphan": (
        "a0000001",
        [
            ("a0000001", "THEN", None, "a0000002", "a0000003"),
            sql_leaf("a0000002"),
            sql_leaf("a0000003"),
            sql_leaf("a0000009"),
        ],
        "22023",
        r"node 'a0000009' is not reachable from the root",
    ),
    "missing_child": (
        "a0000001",
        [("a0000001", "LOOP", cond("ffffffff"), "a0000002", None), sql_leaf("a0000002")],
        "22023",
        r"node 'a0000001' \(LOOP\) refers to 'ffffffff' \(condition_node\), "
        r"which is not a node of the instance",
    ),
    "missing_root": (
        "eeeeeeee",
        [sql_leaf("a0000001")],
        "22023",
        r"root node 'eeeeeeee' is not a node of the instance",
    ),
    "join_with_two_extras": (
        "a0000001",
        [
            (
                "a0000001",
                "JOIN",
                json.dumps({"extra_nodes": ["a0000004", "a0000005"]}),
                "a0000002",
                "a0000003",
            ),
            sql_leaf("a0000002"),
            sql_leaf("a0000003"),
            sql_leaf("a0000004"),
            sql_leaf("a0000005"),
        ],
        "22023",
        r"node 'a0000001' \(JOIN\): query must be NULL or ",
    ),
    "if_without_condition": (
        "a0000001",
        [
            ("a0000001", "IF", '{"x": 1}', "a0000002", "a0000003"),
            sql_leaf("a0000002"),
            sql_leaf("a0000003"),
        ],
        "22023",
        r"node 'a0000001' \(IF\): query must be ",
    ),
    "if_query_not_json": (
        "a0000001",
        [
            ("a0000001", "IF", "not json", "a0000002", "a0000003"),
            sql_leaf("a0000002"),
            sql_leaf("a0000003"),
        ],
        "22023",
        r"node 'a0000001' \(IF\): query must be ",
    ),
}


def insert_graph(
    conn: Conn,
    role: str,
    iid: str,
    root: str,
    rows: list[tuple[str, str, str | None, str | None, str | None]],
) -> None:
    """What df.start writes (30_control.sql steps 6 and 7), written by the tenant itself."""
    conn.execute(
        "insert into df.instances (id, label, root_node, submitted_by, database) "
        "values (%s, 'hand-written', %s, %s::pg_catalog.regrole, null)",
        (iid, root, role),
    )
    with conn.cursor() as cur:
        cur.executemany(
            "insert into df.nodes (id, instance_id, node_type, query, result_name, left_node, "
            "right_node, submitted_by, database) values (%s, %s, %s, %s, null, %s, %s, "
            "%s::pg_catalog.regrole, null)",
            [(nid, iid, t, q, left, right, role) for nid, t, q, left, right in rows],
        )


def engine_rows(db: Any, iid: str) -> tuple[int, int]:
    with db.connect() as admin:
        row = admin.execute(
            "select (select count(*) from pgdurable.runs where instance_id = %s),"
            " (select count(*) from pgdurable.tasks where instance_id = %s)",
            (iid, iid),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def expect_rejected(
    db: Any,
    role: str,
    iid: str,
    root: str,
    rows: list[tuple[str, str, str | None, str | None, str | None]] | None,
    sqlstate: str,
    pattern: str,
    fill: str | None = None,
) -> None:
    with db.connect(role, autocommit=False) as conn:
        conn.execute("set local statement_timeout = '20s'")
        if rows is not None:
            insert_graph(conn, role, iid, root, rows)
        else:
            conn.execute(
                "insert into df.instances (id, root_node, submitted_by) "
                "values (%s, %s, %s::pg_catalog.regrole)",
                (iid, root, role),
            )
        if fill is not None:
            conn.execute(fill, {"iid": iid, "role": role})
        conn.execute("savepoint enqueue")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("select pgdurable._enqueue_v1(%s, '{}')", (iid,))
        err = info.value
        assert err.sqlstate == sqlstate, err
        assert f"invalid stored graph for instance {iid}: " in str(err), err
        assert re.search(pattern, str(err)), err
        conn.execute("rollback to savepoint enqueue")
        # most of these rows satisfy every constraint and commit, yet nothing will run them
        # (a missing root or left/right child fails its deferred foreign key here instead)
        with contextlib.suppress(psycopg.errors.ForeignKeyViolation):
            conn.commit()
    assert engine_rows(db, iid) == (0, 0)


@pytest.mark.parametrize("case", sorted(BAD_GRAPHS))
def test_enqueue_rejects_invalid_stored_graphs(db, case):
    role = db.create_role("tsg")
    root, rows, sqlstate, pattern = BAD_GRAPHS[case]
    expect_rejected(db, role, "c0ffee01", root, rows, sqlstate, pattern)


def test_enqueue_rejects_graphs_past_the_limits(db):
    role = db.create_role("tsl")
    # 300 THENs deep (a leaf on the left of each): deeper than df.start allows (nesting
    # depth 256 with the root at depth 0: d0000100 is at 256, d0000101 the first one past)
    chain = [(f"d{i:07x}", "THEN", None, f"e{i:07x}", f"d{i + 1:07x}") for i in range(300)]
    chain += [sql_leaf(f"e{i:07x}") for i in range(300)] + [sql_leaf(f"d{300:07x}")]
    expect_rejected(
        db,
        role,
        "c0ffee02",
        "d0000000",
        chain,
        "54000",
        r"nests deeper than the maximum nesting depth of 256 \(at node 'd0000101'\)",
    )
    # 10,001 nodes (one root and 10,000 orphans: the count is checked first)
    expect_rejected(
        db,
        role,
        "c0ffee03",
        "00000001",
        None,
        "54000",
        r"has 10001 nodes, more than 10000",
        fill="insert into df.nodes (id, instance_id, node_type, query, submitted_by) "
        "select lpad(to_hex(g), 8, '0'), %(iid)s, 'SQL', 'select 1', "
        "%(role)s::pg_catalog.regrole from generate_series(1, 10001) g",
    )


def test_enqueue_accepts_a_valid_hand_written_graph(db):
    role = db.create_role("tsv")
    iid = "c0ffee04"
    rows = [
        ("a0000001", "IF", cond("a0000002"), "a0000003", "a0000004"),
        sql_leaf("a0000002"),
        ("a0000003", "JOIN", json.dumps({"extra_nodes": ["a0000007"]}), "a0000005", "a0000006"),
        ("a0000004", "LOOP", None, "a0000008", None),
        sql_leaf("a0000005"),
        sql_leaf("a0000006"),
        sql_leaf("a0000007"),
        (
            "a0000008",
            "IF",
            json.dumps({"condition_type": "result_has_rows", "result_name": "r"}),
            "a0000009",
            "a000000a",
        ),
        sql_leaf("a0000009"),
        ("a000000a", "BREAK", '{"break_value": null}', None, None),
    ]
    with db.connect(role, autocommit=False) as conn:
        insert_graph(conn, role, iid, "a0000001", rows)
        conn.execute('select pgdurable._enqueue_v1(%s, \'{"v": "1"}\')', (iid,))
        conn.commit()
    with db.connect() as admin:
        assert admin.execute(
            "select kind, node_id, gen from pgdurable.tasks where instance_id = %s", (iid,)
        ).fetchall() == [("start", "a0000001", 0)]
        assert one(admin, "select vars from pgdurable.runs where instance_id = %s", (iid,)) == {
            "v": "1"
        }


def test_start_rejects_a_join_of_more_than_three_branches(db):
    # the stored form the worker compiles holds one extra branch (df.join3); df.start used to
    # store a longer extra_nodes list, which then failed every load of the instance
    role = db.create_role("tsj")
    leaf = {"node_type": "SQL", "query": "select 1"}
    graph = {
        "node_type": "JOIN",
        "left_node": leaf,
        "right_node": leaf,
        "extra_nodes": [leaf, leaf],
    }
    with db.connect(role) as conn:
        with pytest.raises(
            psycopg.errors.InvalidParameterValue,
            match=r"a JOIN has at most three branches: extra_nodes holds at most "
            r"one node \(df.join3\), got 2 \(at root\)",
        ):
            conn.execute("select df.start(%s)", (json.dumps(graph),))
        assert one(conn, "select df.explain(%s)", (json.dumps(graph),)).startswith(
            "Invalid durable function graph: root: a JOIN has at most three branches"
        )
        assert one(conn, "select count(*) from df.instances") == 0
        graph["extra_nodes"] = [leaf]
        assert one(conn, "select df.start(%s)", (json.dumps(graph),)) is not None
