"""One-statement instance loads (50_engine.sql: ``@engine@._load_v2`` and its step-session twin
``_step_load_v2``; pgdurable/worker/cache.py).

``_load_v2`` must return exactly what the three reads before it return (``_load_instance_v1``,
``_load_nodes_v1``, ``_load_results_v1``, which older workers still call during a rolling
upgrade), as :func:`pgdurable.worker.cache.split_load` puts its rows back together, decoded as
the worker decodes them (``values.loads``: exact numbers): for an instance with nodes in every
state, named results, a state and vars, under the role and database settings the instance
row carries (the superuser gate's database default, the role's loop limits, this database's
first). The twin answers only a session holding a step capability, and only the step role
may call it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import set_json_loads

from pgdurable.queries import q
from pgdurable.values import loads
from pgdurable.worker.cache import split_load
from tests.fix_sql import become, mkrole, one

Conn = psycopg.Connection[Any]
E = "pgdurable"
CAP_MSG = "missing or wrong step capability"

# values a node's result or a named result may hold: fractions and integers beyond 64 bits
# (Decimals once loaded), text that needs escaping, nesting, JSON null and scalars
VALUES = [
    '{"rows": [{"n": 1, "x": 2.50, "s": "a \\"quoted\\" \\\\ back\\nslash é ☃"}], '
    '"columns": ["n", "x", "s"], "row_count": 1}',
    '{"rows": [{"big": 123456789012345678901234567890, "e": 1e400, "neg": -0.0}], '
    '"columns": ["big", "e", "neg"], "row_count": 1}',
    '{"deep": [[[{"a": [1, 2, {"b": null}]}]]], "t": true, "f": false}',
    "null",
    '"just text"',
    "42",
]


def loaded_v1(conn: Conn, iid: str) -> tuple[Any, list[Any], list[Any]] | None:
    inst = conn.execute(q("load_instance"), (iid,)).fetchone()
    if inst is None:
        return None
    nodes = conn.execute(q("load_nodes"), (iid,)).fetchall()
    named = conn.execute(q("load_results"), (iid,)).fetchall()
    return tuple(inst), sorted(map(tuple, nodes)), list(map(tuple, named))


def loaded_v2(conn: Conn, iid: str, query: str = "load", args: tuple[Any, ...] = ()) -> Any:
    got = conn.execute(q(query), (*args, iid)).fetchall()
    if not got:
        return None
    inst, nodes, named = split_load(got)
    return tuple(inst), sorted(map(tuple, nodes)), list(map(tuple, named))


def alter(conn: Conn, what: sql.Composable, setting: str, value: str | None) -> None:
    """ALTER <what> SET setting = value (RESET for None)."""
    if value is None:
        conn.execute(sql.SQL("alter {} reset {}").format(what, sql.Identifier(setting)))
    else:
        conn.execute(
            sql.SQL("alter {} set {} = {}").format(
                what, sql.Identifier(setting), sql.Literal(value)
            )
        )


def role_all(role: str) -> sql.Composable:
    return sql.SQL("role {}").format(sql.Identifier(role))


def role_here(conn: Conn, role: str) -> sql.Composable:
    return sql.SQL("role {} in database {}").format(
        sql.Identifier(role), sql.Identifier(conn.info.dbname)
    )


def this_db(conn: Conn) -> sql.Composable:
    return sql.SQL("database {}").format(sql.Identifier(conn.info.dbname))


def rich_instance(tx: Conn, role: str) -> str:
    """An instance of ``role`` with nodes in every state, named results (stored out of name
    order), a state, vars and a cancel reason; written directly, as the admin."""
    become(tx, role)
    iid = str(
        one(
            tx,
            "select df.start((df.sql('select 1 as a') |=> 'a') ~> (df.sql('select 2') |=> 'b')"
            " ~> df.sql('select 3') ~> (df.sql('select 4') |=> 'd') ~> df.sql('select 5'))",
        )
    )
    tx.execute("reset role")
    leaves = [
        str(r[0])
        for r in tx.execute(
            "select id from df.nodes where instance_id = %s and node_type = 'SQL' order by query",
            (iid,),
        ).fetchall()
    ]
    assert len(leaves) == 5
    done = [
        (leaves[0], "completed", VALUES[0], '{"result_bytes": 80}'),
        (leaves[1], "completed", VALUES[1], '{"result_bytes": 90, "iter_begins_at": 1.25}'),
        (leaves[2], "failed", '"division by zero"', '{"sqlstate": "22012"}'),
        (leaves[3], "running", None, '{"x": 2.5}'),
    ]
    for nid, status, result, details in done:
        tx.execute(
            "update df.nodes set status = %s, result = %s::jsonb, status_details = %s::jsonb"
            " where instance_id = %s and id = %s",
            (status, result, details, iid, nid),
        )
    # seq decides their order (d, b, a), not the insert's or the names'
    for name, value, seq in [("d", VALUES[2], 5), ("a", VALUES[0], 9), ("b", VALUES[3], 7)]:
        tx.execute(
            f"insert into {E}.results (instance_id, name, value, seq) values (%s, %s, %s, %s)",
            (iid, name, value, seq),
        )
    tx.execute(
        f"update {E}.runs set state = '\\x0102030400000000'::bytea, state_version = 7,"
        " vars = %s::jsonb, cancel_reason = 'why not' where instance_id = %s",
        ('{"v": 1.5, "w": "x"}', iid),
    )
    return iid


@pytest.fixture
def exact(tx: Conn) -> Conn:
    """``tx`` decoding JSON as the worker does (every number exact)."""
    set_json_loads(loads, tx)
    return tx


def test_load_v2_returns_what_the_three_v1_reads_return(exact: Conn) -> None:
    tx = exact
    role = mkrole(tx)
    other = mkrole(tx)
    iid = rich_instance(tx, role)
    become(tx, role)
    w1 = str(one(tx, "select df.start('select 1')"))  # as W1 starts them: one node, no results
    tx.execute("reset role")

    def same(*, superuser_ok: bool, loop_min: str | None, loop_max: str | None) -> None:
        for i in (iid, w1):
            v1, v2 = loaded_v1(tx, i), loaded_v2(tx, i)
            assert v1 is not None
            assert v2 == v1
            assert v2[0][13:16] == (superuser_ok, loop_min, loop_max)
        assert loaded_v2(tx, iid)[2] == [
            ("d", loads(VALUES[2])),
            ("b", None),
            ("a", loads(VALUES[0])),
        ]

    # nothing set anywhere
    tx.execute("set local pg_durable.enable_superuser_instances = 'off'")
    same(superuser_ok=False, loop_min=None, loop_max=None)
    # another role's and another database's values are not this role's
    alter(tx, role_all(other), "pg_durable.loop_max_iterations", "3")
    alter(
        tx,
        sql.SQL("role {} in database postgres").format(sql.Identifier(role)),
        "pg_durable.loop_max_iterations",
        "4",
    )
    alter(tx, sql.SQL("database postgres"), "pg_durable.enable_superuser_instances", "on")
    same(superuser_ok=False, loop_min=None, loop_max=None)
    # the role's own values, this database's before its global one; the database's default
    alter(tx, role_all(role), "pg_durable.loop_max_iterations", "7")
    alter(tx, role_all(role), "pg_durable.loop_min_interval_ms", "250")
    same(superuser_ok=False, loop_min="250", loop_max="7")
    alter(tx, role_here(tx, role), "pg_durable.loop_max_iterations", "5")
    alter(tx, this_db(tx), "pg_durable.enable_superuser_instances", "on")
    same(superuser_ok=True, loop_min="250", loop_max="5")
    # the database's default wins over the session's; an empty one gives way to it
    tx.execute("set local pg_durable.enable_superuser_instances = 'true'")
    alter(tx, this_db(tx), "pg_durable.enable_superuser_instances", "off")
    same(superuser_ok=False, loop_min="250", loop_max="5")
    alter(tx, this_db(tx), "pg_durable.enable_superuser_instances", "")
    same(superuser_ok=True, loop_min="250", loop_max="5")
    # a role's empty or malformed value is passed on as it is (the worker judges it)
    alter(tx, role_here(tx, role), "pg_durable.loop_min_interval_ms", "")
    alter(tx, role_here(tx, role), "pg_durable.loop_max_iterations", "lots")
    same(superuser_ok=True, loop_min="", loop_max="lots")
    alter(tx, role_here(tx, role), "pg_durable.loop_max_iterations", None)
    alter(tx, role_here(tx, role), "pg_durable.loop_min_interval_ms", None)
    same(superuser_ok=True, loop_min="250", loop_max="7")


def test_load_v2_of_no_instance_returns_no_row(tx: Conn) -> None:
    assert tx.execute(q("load"), ("nope0000",)).fetchall() == []
    assert loaded_v1(tx, "nope0000") is None


def test_load_v2_of_an_instance_without_results_is_its_row_and_its_nodes(tx: Conn) -> None:
    become(tx, mkrole(tx))
    iid = one(tx, "select df.start('select 1')")
    tx.execute("reset role")
    got = tx.execute(q("load"), (iid,)).fetchall()
    assert [r[0] for r in got] == [0, 1]
    inst, nodes, named = split_load(got)
    assert (len(inst), len(nodes), len(nodes[0]), named) == (16, 1, 9, [])


def cap_for(tx: Conn) -> str:
    """A step capability registered for this backend (as a worker registers one)."""
    token = "f" * 32
    digest = hashlib.sha256(token.encode()).digest()
    tx.execute(f"select {E}._cap_grant_v1(pg_catalog.pg_backend_pid(), %s, 'w')", (digest,))
    return token


def test_step_twin_answers_only_a_session_with_its_capability(exact: Conn) -> None:
    tx = exact
    role = mkrole(tx)
    iid = rich_instance(tx, role)
    want = loaded_v2(tx, iid)
    token = cap_for(tx)
    tx.execute("set local role pgdurable_step")
    for cap in ("guess", None, "f" * 31):
        tx.execute("savepoint refused")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=CAP_MSG):
            tx.execute(q("step_load"), (cap, iid))
        tx.execute("rollback to savepoint refused")
    assert loaded_v2(tx, iid, "step_load", (token,)) == want
    # the load itself is the service's: the step role may not call it, capability or not
    tx.execute("savepoint direct")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        tx.execute(q("load"), (iid,))
    tx.execute("rollback to savepoint direct")
    tx.execute("reset role")


def test_only_the_step_role_may_call_the_twin_and_nobody_else_the_load(tx: Conn) -> None:
    tenant = mkrole(tx)
    load, twin = f"{E}._load_v2(varchar)", f"{E}._step_load_v2(text, varchar)"

    def may(role: str, fn: str) -> bool:
        return bool(one(tx, "select has_function_privilege(%s, %s, 'execute')", (role, fn)))

    assert may("pgdurable_step", twin)
    assert not may("pgdurable_step", load)
    assert not may(tenant, twin)
    assert not may(tenant, load)
    assert may("pgdurable_service", load)
    public = one(
        tx,
        "select count(*) from pg_proc p cross join lateral aclexplode(p.proacl) a"
        " where p.oid = any(array[%s::regprocedure, %s::regprocedure]::oid[])"
        " and a.grantee = 0",
        (load, twin),
    )
    assert public == 0
    # the twin runs as its owner, behind the capability; the load as its caller
    assert one(tx, "select prosecdef from pg_proc where oid = %s::regprocedure", (twin,))
    assert not one(tx, "select prosecdef from pg_proc where oid = %s::regprocedure", (load,))
