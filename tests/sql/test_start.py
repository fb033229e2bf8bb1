"""df.start: validation order, flattening, what it writes, transaction modes (30_control.sql)."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.fix_sql import become, mkrole, one


def node(t, **kw):
    return {"node_type": t, **kw}


def sqln(q, **kw):
    return node("SQL", query=q, **kw)


def test_plain_sql_writes_instance_nodes_run_and_task(tx, user):
    iid = one(tx, "select df.start('select 1', 'lbl')")
    assert len(iid) == 8
    assert all(c in "0123456789abcdef" for c in iid)
    inst = tx.execute(
        "select label, status, submitted_by::text, database, root_node "
        "from df.instances where id = %s",
        (iid,),
    ).fetchone()
    assert inst[:4] == ("lbl", "pending", user, None)
    rows = tx.execute(
        "select id, node_type, query, status from df.nodes where instance_id = %s", (iid,)
    ).fetchall()
    assert rows == [(inst[4], "SQL", "select 1", "pending")]
    tx.execute("reset role")
    task = tx.execute(
        "select node_id, gen, kind, submitted_by::text from pgdurable.tasks where instance_id = %s",
        (iid,),
    ).fetchall()
    assert task == [(inst[4], 0, "start", user)]
    assert one(tx, "select vars from pgdurable.runs where instance_id = %s", (iid,)) == {}


def test_graph_is_flattened_in_preorder(tx, user):
    g = node(
        "THEN",
        left_node=sqln("select 1", result_name="a"),
        right_node=node(
            "IF",
            condition_node=sqln("select true"),
            left_node=node("LOOP", left_node=sqln("b"), condition_node=sqln("c")),
            right_node=node(
                "JOIN", left_node=sqln("x"), right_node=sqln("y"), extra_nodes=[sqln("z")]
            ),
        ),
    )
    iid = one(tx, "select df.start(%s)", (json.dumps(g),))
    rows = {
        r[0]: r[1:]
        for r in tx.execute(
            "select id, node_type, query, result_name, left_node, right_node from df.nodes "
            "where instance_id = %s",
            (iid,),
        )
    }
    ids = sorted(rows)  # ids are handed out in sorted order along the pre-order
    types = [rows[i][0] for i in ids]
    assert types == ["THEN", "SQL", "IF", "SQL", "LOOP", "SQL", "SQL", "JOIN", "SQL", "SQL", "SQL"]
    root = one(tx, "select root_node from df.instances where id = %s", (iid,))
    assert root == ids[0]
    assert rows[ids[0]][3:] == (ids[1], ids[2])
    assert rows[ids[1]][2] == "a"
    assert json.loads(rows[ids[2]][1]) == {"condition_node": ids[3]}
    assert rows[ids[2]][3:] == (ids[4], ids[7])
    # child order condition_node, left_node, right_node, extra_nodes
    assert json.loads(rows[ids[4]][1]) == {"condition_node": ids[5]}
    assert rows[ids[4]][3:] == (ids[6], None)
    assert json.loads(rows[ids[7]][1]) == {"extra_nodes": [ids[10]]}
    assert [rows[ids[i]][1] for i in (3, 5, 6, 8, 9, 10)] == [
        "select true",
        "c",
        "b",
        "x",
        "y",
        "z",
    ]


def test_dsl_values_start(tx, user):
    iid = one(tx, "select df.start(df.seq(df.sql('select 1'), df.sleep(5)), 'dsl')")
    assert one(tx, "select count(*) from df.nodes where instance_id = %s", (iid,)) == 3


def test_vars_snapshot_frozen(tx, user):
    tx.execute("select df.setvar('k', 'v1')")
    iid = one(tx, "select df.start('select {k}')")
    tx.execute("select df.setvar('k', 'v2')")
    tx.execute("reset role")
    assert one(tx, "select vars from pgdurable.runs where instance_id = %s", (iid,)) == {"k": "v1"}


def counts(conn):
    return conn.execute(
        "select (select count(*) from df.instances), (select count(*) from df.nodes),"
        " (select count(*) from pgdurable.runs),"
        " (select count(*) from pgdurable.tasks)"
    ).fetchone()


def nest(depth):
    g = sqln("select 1")
    for _ in range(depth - 1):
        g = node("LOOP", left_node=g)
    return json.dumps(g)


BAD = [
    (json.dumps(node("FOO")), "Unknown node_type 'FOO'"),
    (
        json.dumps(node("THEN", left_node=sqln("a"), right_node=node("NOPE"))),
        "Unknown node_type 'NOPE'",
    ),
    (
        json.dumps(
            node(
                "IF",
                query=json.dumps({"condition_node": "abcd1234"}),
                left_node=sqln("a"),
                right_node=sqln("b"),
            )
        ),
        "condition_node in IF must be a first-class Durofut field",
    ),
    (
        json.dumps(
            node("IF", condition_node="select 1", left_node=sqln("a"), right_node=sqln("b"))
        ),
        "condition_node in IF must be a first-class Durofut field",
    ),
    (
        json.dumps(node("IF", query="not json", left_node=sqln("a"), right_node=sqln("b"))),
        "query in IF must be valid JSON config",
    ),
    (json.dumps(node("IF", left_node=sqln("a"), right_node=sqln("b"))), "condition_node"),
    (
        json.dumps(node("JOIN", left_node=sqln("a"), right_node=sqln("b"), extra_nodes=["x"])),
        "extra_nodes entries must be Durofut JSON objects",
    ),
    (json.dumps(sqln("a", result_name="1bad")), "not a valid identifier"),
    (json.dumps(node("THEN", left_node=sqln("a"))), "needs a right_node"),
    (json.dumps(node("SLEEP", query="soon")), "SLEEP"),
    (nest(258), "maximum nesting depth of 256"),
]


@pytest.mark.parametrize(("graph", "message"), BAD)
def test_invalid_graphs_raise_and_write_nothing(tx, user, graph, message):
    tx.execute("reset role")
    before = counts(tx)
    become(tx, user)
    tx.execute("savepoint s")
    with pytest.raises(psycopg.Error) as exc:
        tx.execute("select df.start(%s)", (graph,))
    assert message in str(exc.value)
    tx.execute("rollback to savepoint s")
    tx.execute("reset role")
    assert counts(tx) == before


def test_depth_256_is_allowed(tx, user):
    # nesting depth 256: the root at depth 0 and its deepest node 256 levels below it
    iid = one(tx, "select df.start(%s)", (nest(257),))
    assert one(tx, "select count(*) from df.nodes where instance_id = %s", (iid,)) == 257


def test_node_limit(tx, user):
    # a JOIN tree with 10,001 nodes: 5,000 JOINs over 5,001 leaves, built wide (depth ~14)
    leaves = [sqln(f"select {i}") for i in range(5001)]
    level = leaves
    while len(level) > 1:
        nxt = [
            node("JOIN", left_node=level[i], right_node=level[i + 1])
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="more than 10000 nodes"):
        tx.execute("select df.start(%s)", (json.dumps(level[0]),))


def expect(conn, query, exc, match, params=()):
    """Run query inside a savepoint; it must raise exc matching match; roll the savepoint back."""
    conn.execute("savepoint expect")
    with pytest.raises(exc, match=match):
        conn.execute(query, params)
    conn.execute("rollback to savepoint expect")


def test_control_errors_in_order(tx):
    nologin = mkrole(tx, "nl", login=False)
    ok = mkrole(tx)
    # invalid mode first, whatever else is wrong (here: a superuser caller)
    expect(
        tx,
        "select df.start('select 1', transaction_mode => 'later')",
        psycopg.errors.InvalidParameterValue,
        "invalid transaction_mode",
    )
    # the database check comes before the identity checks
    expect(
        tx,
        "select df.start('select 1', database => 'no_such_db_x')",
        psycopg.errors.InvalidCatalogName,
        'database "no_such_db_x" does not exist',
    )
    # the test connection is a superuser
    expect(
        tx,
        "select df.start('select 1')",
        psycopg.errors.InsufficientPrivilege,
        "enable_superuser_instances",
    )
    tx.execute("set local pg_durable.enable_superuser_instances = on")
    assert one(tx, "select df.start('select 1')")
    become(tx, nologin)
    expect(tx, "select df.start('select 1')", psycopg.errors.InsufficientPrivilege, "LOGIN")
    become(tx, ok)
    assert one(tx, "select df.start('select 1', transaction_mode => 'CALLER')")


def test_existing_database_is_accepted(tx, user):
    iid = one(tx, "select df.start('select 1', database => 'postgres')")
    assert one(tx, "select database from df.instances where id = %s", (iid,)) == "postgres"
    assert one(tx, "select database from df.nodes where instance_id = %s", (iid,)) == "postgres"


def test_not_ready_refuses(tx):
    role = mkrole(tx)
    tx.execute("update pgdurable._worker_ready set schema_version = 0")
    become(tx, role)
    with pytest.raises(
        psycopg.errors.ObjectNotInPrerequisiteState,
        match="pg_durable background worker not yet initialized — try again in a moment",
    ):
        tx.execute("select df.start('select 1')")


def test_helper_output_is_not_a_step(tx, user):
    with pytest.raises(psycopg.Error, match="cannot be used as a workflow step"):
        tx.execute("select df.start(df.setvar('x', '1'))")


def test_new_mode_refused_inside_workflow(tx, user):
    tx.execute("set local df.in_workflow = 'true'")
    with pytest.raises(
        psycopg.errors.FeatureNotSupported, match="cannot be called inside a workflow"
    ):
        tx.execute("select df.start('select 1', transaction_mode => 'new')")
    tx.rollback()
    # caller mode is allowed from a step
    role = mkrole(tx)
    become(tx, role)
    tx.execute("set local df.in_workflow = 'true'")
    assert one(tx, "select df.start('select 1')")


def test_notify_and_rollback_leaves_nothing(db):
    role = db.create_role("st")
    with db.connect() as admin, db.connect(role, autocommit=False) as conn:
        admin.execute("listen pgdurable_work")
        iid = one(conn, "select df.start('select 1')")
        conn.rollback()
        assert admin.execute("select count(*) from df.instances").fetchone()[0] == 0
        assert counts(admin) == (0, 0, 0, 0)
        iid = one(conn, "select df.start('select 2')")
        conn.commit()
        assert counts(admin) == (1, 1, 1, 1)
        admin.execute("select 1")
        got = [n.payload for n in admin.notifies(timeout=2, stop_after=1)]
        # one wake-up, at commit; no payload (any role may LISTEN: a channel names nothing)
        assert got == [""]
        assert iid


def test_new_mode_without_dblink(db):
    role = db.create_role("st")
    with (
        db.connect(role) as conn,
        pytest.raises(
            psycopg.errors.ObjectNotInPrerequisiteState,
            match=r"transaction_mode 'new' needs the dblink extension, .* must run in that "
            r"database: CREATE EXTENSION dblink SCHEMA pgdurable_dblink;",
        ),
    ):
        conn.execute("select df.start('select 1', transaction_mode => 'new')")
    with db.connect() as admin:
        assert counts(admin) == (0, 0, 0, 0)


def _dblink(db):
    with db.connect() as admin:
        try:
            admin.execute("create extension dblink")
        except psycopg.Error as exc:
            pytest.skip(f"dblink is not available on this server: {exc}")


def _launcher_needs_password(db) -> bool:
    """Does this server ask the launcher role for its password? (The embedded PostgreSQL does,
    as managed PostgreSQL does; the local trust-everyone test cluster does not, and dblink
    then refuses a non-superuser's connection: 'new' mode fails saying so.)"""
    with db.connect() as admin:
        launcher = one(admin, "select rolname::text from pgdurable.launcher")
    try:
        with psycopg.connect(db.server.dsn(db.name, user=launcher), connect_timeout=5):
            return False
    except psycopg.OperationalError:
        return True


def test_new_mode_survives_caller_rollback(db):
    _dblink(db)
    role = db.create_role("st")
    if not _launcher_needs_password(db):
        with (
            db.connect(role) as conn,
            pytest.raises(
                psycopg.errors.InvalidAuthorizationSpecification, match="without a password"
            ) as exc,
        ):
            conn.execute("select df.start('select 1', 'new-lbl', null, 'New')")
        assert "scram-sha-256" in (exc.value.diag.message_hint or "")
        with db.connect() as admin:
            assert counts(admin) == (0, 0, 0, 0)
        return
    with db.connect(role, autocommit=False) as conn:
        conn.execute("select df.setvar('k', 'committed')")
        conn.commit()
        conn.execute("select df.setvar('k', 'uncommitted')")
        iid = one(conn, "select df.start('select 1', 'new-lbl', null, 'New')")
        conn.rollback()
        # the launch slot was released with the launch, not held until the caller's commit
        conn.execute("set pg_durable.max_new_transaction_starts = 1")
        conn.execute("set pg_durable.new_transaction_start_timeout = 1")
        second = one(conn, "select df.start('select 2', transaction_mode => 'new')")
        conn.rollback()
    with db.connect() as admin:
        row = admin.execute(
            "select label, status, submitted_by::text from df.instances where id = %s", (iid,)
        ).fetchone()
        assert row == ("new-lbl", "pending", role)
        assert one(admin, "select vars from pgdurable.runs where instance_id = %s", (iid,)) == {
            "k": "committed"
        }
        assert (
            one(admin, "select submitted_by::text from df.instances where id = %s", (second,))
            == role
        )


def test_new_mode_validation_errors_surface(db):
    _dblink(db)
    role = db.create_role("st")
    with db.connect(role) as conn, pytest.raises(psycopg.Error, match="Unknown node_type 'X'"):
        conn.execute("""select df.start('{"node_type":"X"}', transaction_mode => 'new')""")
    with db.connect() as admin:
        assert counts(admin) == (0, 0, 0, 0)


def test_new_mode_slot_timeout(db):
    _dblink(db)
    role = db.create_role("st")
    with db.connect(autocommit=False) as holder, db.connect(role) as conn:
        # the launch slots are engine rows no tenant can lock; here the superuser holds one
        holder.execute("select 1 from pgdurable.locks where name = 'launch:0' for update")
        conn.execute("set pg_durable.max_new_transaction_starts = 1")
        conn.execute("set pg_durable.new_transaction_start_timeout = 1")
        with pytest.raises(psycopg.errors.LockNotAvailable) as exc:
            conn.execute("select df.start('select 1', transaction_mode => 'new')")
        assert "Timed out after 1s waiting for a launch slot" in str(exc.value)
        assert "max_new_transaction_starts=1" in str(exc.value)
        # a second slot is free
        conn.execute("set pg_durable.max_new_transaction_starts = 2")
        if _launcher_needs_password(db):
            assert one(conn, "select df.start('select 1', transaction_mode => 'new')")
        else:
            with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
                conn.execute("select df.start('select 1', transaction_mode => 'new')")
        holder.rollback()
    with db.connect(role) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        # a tenant cannot take (or hold) a launch slot
        conn.execute("select 1 from pgdurable.locks for update")


def test_new_mode_keeps_the_idempotency_key(db):
    """transaction_mode 'new' hands the key to the launch session: the second start with it,
    in either mode, answers the first instance."""
    _dblink(db)
    if not _launcher_needs_password(db):
        pytest.skip(
            "this server lets the launcher in without a password: 'new' cannot run "
            "(test_new_mode_survives_caller_rollback pins that error)"
        )
    role = db.create_role("sk")
    with db.connect(role, autocommit=False) as conn:
        first = one(
            conn, "select df.start('select 1', transaction_mode => 'new', idempotency_key => 'nk')"
        )
        conn.rollback()  # the launch committed on its own
        assert (
            one(
                conn,
                "select df.start('select 1', transaction_mode => 'new', idempotency_key => 'nk')",
            )
            == first
        )
        assert one(conn, "select df.start('select 1', idempotency_key => 'nk')") == first
        conn.commit()
        assert one(conn, "select count(*) from df.instances") == 1
        assert one(conn, "select idempotency_key from df.instance_info(%s)", (first,)) == "nk"
