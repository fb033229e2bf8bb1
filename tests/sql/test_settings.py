"""Where the pg_durable.* settings are read, and a role's own settings in its steps (00_tables.sql:
@engine@.setting_db, _role_setting_v1, _role_settings_v1; docs/operating.md, "Settings").

- Deployment-wide values (setting_db) are the database's own default read from the catalog on
  every call, so ALTER DATABASE … SET applies without anyone reconnecting, and a session's SET
  loses to it; the engine's step slots, retention and the worker's limits read them.
- A step applies the submitting role's settings (ALTER ROLE … IN DATABASE … SET before ALTER
  ROLE … SET before ALTER DATABASE … SET before ALTER ROLE ALL … SET), never the pinned names,
  and the engine's limits only ever get tighter by the role's values.

The step queries run here as the step role, in a transaction rolled back afterwards; what the
worker does with them is tests/acceptance/test_settings.py.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgdurable.queries import q
from pgdurable.worker.instance import BadSetting, loop_limits
from tests.fix_sql import mkrole, one

Conn = psycopg.Connection[Any]


def alter_db(conn: Conn, setting: str, value: str | None) -> None:
    """ALTER DATABASE <this one> SET setting = value (RESET for None)."""
    name = sql.Identifier(conn.info.dbname)
    if value is None:
        conn.execute(sql.SQL("alter database {} reset {}").format(name, sql.SQL(setting)))
    else:
        conn.execute(
            sql.SQL("alter database {} set {} = {}").format(
                name, sql.SQL(setting), sql.Literal(value)
            )
        )


def alter_role(conn: Conn, role: str, setting: str, value: str, here: bool = False) -> None:
    """ALTER ROLE role [IN DATABASE <this one>] SET setting = value."""
    where = (
        sql.SQL(" in database {}").format(sql.Identifier(conn.info.dbname)) if here else sql.SQL("")
    )
    conn.execute(
        sql.SQL("alter role {}{} set {} = {}").format(
            sql.Identifier(role), where, sql.SQL(setting), sql.Literal(value)
        )
    )


def expect(conn: Conn, query: Any, params: Any, match: str) -> psycopg.Error:
    conn.execute("savepoint expect")
    with pytest.raises(psycopg.Error, match=match) as info:
        conn.execute(query, params)
    conn.execute("rollback to savepoint expect")
    return info.value


# stand-ins for a role's runner, as @engine@_exec.step_<oid> (step_next calls the runner of
# the role it is given): oids no role has, made in the test's transaction (rolled back)
ECHO_RUNNER, LAX_RUNNER = 4000000001, 4000000002


def stand_in_runner(conn: Conn, oid: int, body: str) -> None:
    """A function where step_next looks for the runner of role ``oid``."""
    conn.execute(
        f"create or replace function pgdurable_exec.step_{oid}(p_cap text, p_sql text, p_max bigint) "
        f"returns setof json language sql as $$ {body} $$"
    )
    conn.execute(
        f"grant execute on function pgdurable_exec.step_{oid}(text, text, bigint) to pgdurable_step"
    )


def step_next(conn: Conn, role: str, step_timeout: str | None = None) -> str:
    """The per-step settings of a batch's next step, as the step role runs them: resolved
    once (as step_settings does, for the batch's first step), then reset and applied again
    by step_next (its runner a stand-in that returns one row of its arguments and the
    search_path it ran under, which it returns: step_next's caller gets its own back)."""
    stand_in_runner(
        conn,
        ECHO_RUNNER,
        "select pg_catalog.json_build_array(p_cap, p_sql, p_max, "
        "pg_catalog.current_setting('search_path'))",
    )
    conn.execute("set local role pgdurable_step")
    row = conn.execute(
        "select coalesce(r.search_path, current_setting('search_path')), r.statement_timeout, "
        "r.names, r.vals from pgdurable._role_settings_v2(%s::regrole::oid, %s) r",
        (role, step_timeout),
    ).fetchone()
    assert row is not None
    path, timeout, names, vals = row
    conn.execute("set local work_mem = '65kB'")  # step_next's RESET ALL ends this
    got = conn.execute(
        q("step_next"),
        (
            names,
            vals,
            path,
            timeout,
            "pgdurable:00000000:00000001",
            ECHO_RUNNER,
            "cap",
            "select 1",
            1000,
            None,
        ),
    ).fetchall()
    assert len(got) == 1
    assert got[0][0][:3] == ["cap", "select 1", 1000]
    conn.execute("reset role")
    return str(got[0][0][3])


def show(conn: Conn, name: str) -> str | None:
    return one(conn, "select current_setting(%s, true)", (name,))


# -- deployment-wide values ---------------------------------------------------------------


def test_setting_db_reads_the_database_default_fresh(db: Any) -> None:
    """A session connected before ALTER DATABASE … SET sees the new value through setting_db
    at once (its own current_setting keeps what it connected with), and RESET too."""
    with db.connect() as early, db.connect() as admin:
        assert one(early, "select pgdurable.setting_db('retention_days', '30')") == "30"
        alter_db(admin, "pg_durable.retention_days", "7")
        assert one(early, "select pgdurable.setting_db('retention_days', '30')") == "7"
        assert one(early, "select pgdurable.setting('retention_days', '30')") == "30"
        alter_db(admin, "pg_durable.retention_days", "9")
        assert one(early, "select pgdurable.setting_db('retention_days', '30')") == "9"
        alter_db(admin, "pg_durable.retention_days", None)
        assert one(early, "select pgdurable.setting_db('retention_days', '30')") == "30"


def test_setting_db_precedence(tx: Conn) -> None:
    """The database's default, else the server's value (a session sees postgresql.conf /
    ALTER SYSTEM through current_setting; SET stands in for it here), else the default; the
    name is case-insensitive and a value may hold '='."""
    get = "select pgdurable.setting_db('max_instance_bytes', 'dflt')"
    assert one(tx, get) == "dflt"
    tx.execute("set local pg_durable.max_instance_bytes = '123'")
    assert one(tx, get) == "123"
    alter_db(tx, "pg_durable.max_instance_bytes", "456")
    assert one(tx, get) == "456"  # the database's own value wins over the session's
    alter_db(tx, "pg_durable.max_instance_bytes", None)
    assert one(tx, get) == "123"
    tx.execute("set local pg_durable.max_instance_bytes = ''")  # empty: not set
    assert one(tx, get) == "dflt"
    alter_db(tx, '"PG_DURABLE.Retention_Days"', "a=b")
    assert one(tx, "select pgdurable.setting_db('retention_DAYS', 'x')") == "a=b"
    alter_db(tx, "pg_durable.retention_days", None)
    # another role's ALTER ROLE … SET is not the deployment's
    role = mkrole(tx)
    alter_role(tx, role, "pg_durable.retention_days", "1", here=True)
    assert one(tx, "select pgdurable.setting_db('retention_days', '30')") == "30"


def test_step_slots_follow_the_database_default_not_the_session(tx: Conn) -> None:
    """_slots_ensure_v1 / _step_slot_v1 read max_user_connections deployment-wide: the
    database's value, whatever the session SET."""
    tx.execute("set local pg_durable.max_user_connections = '40'")
    alter_db(tx, "pg_durable.max_user_connections", "13")
    tx.execute("select pgdurable._slots_ensure_v1(null)")
    assert one(tx, "select max(slot) from pgdurable.step_slots") == 12
    alter_db(tx, "pg_durable.max_user_connections", "lots")
    err = expect(
        tx,
        "select pgdurable._slots_ensure_v1(null)",
        (),
        r"pg_durable\.max_user_connections is 'lots', not an integer",
    )
    assert err.sqlstate == "22023"
    alter_db(tx, "pg_durable.max_user_connections", "13")
    alter_db(tx, "pg_durable.execution_acquire_timeout", "soon")
    expect(
        tx,
        "select pgdurable._step_slot_v1(0)",
        (),
        r"pg_durable\.execution_acquire_timeout is 'soon', not an integer",
    )


def test_retention_reads_the_database_default(tx: Conn) -> None:
    role = mkrole(tx)
    tx.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
    iid = one(tx, "select df.start('select 1')")
    tx.execute("reset role")
    tx.execute(
        "update df.instances set status = 'completed', "
        "updated_at = now() - interval '10 days' where id = %s",
        (iid,),
    )
    tx.execute("set local pg_durable.retention_days = '1'")  # a session's SET: not read
    alter_db(tx, "pg_durable.retention_days", "30")
    tx.execute("select pgdurable._prune_v1(1000)")
    assert one(tx, "select count(*) from df.instances where id = %s", (iid,)) == 1
    alter_db(tx, "pg_durable.retention_days", "5")
    tx.execute("select pgdurable._prune_v1(1000)")
    assert one(tx, "select count(*) from df.instances where id = %s", (iid,)) == 0
    alter_db(tx, "pg_durable.retention_days", "a month")
    expect(
        tx,
        "select pgdurable._prune_v1(1)",
        (),
        r"pg_durable\.retention_days is 'a month', not an integer",
    )


def test_superuser_gate_reads_the_database_default(tx: Conn) -> None:
    role = mkrole(tx)
    tx.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
    iid = one(tx, "select df.start('select 1')")
    tx.execute("reset role")
    tx.execute("set local pg_durable.enable_superuser_instances = 'off'")
    assert tx.execute(q("load_instance"), (iid,)).fetchone()[13] is False
    alter_db(tx, "pg_durable.enable_superuser_instances", "on")
    assert tx.execute(q("load_instance"), (iid,)).fetchone()[13] is True


# -- a role's own settings in its steps ---------------------------------------------------


def test_a_steps_settings_are_its_roles_most_specific_first(tx: Conn) -> None:
    role = mkrole(tx)
    alter_role(tx, role, "work_mem", "7MB", here=True)
    alter_role(tx, role, "work_mem", "6MB")
    alter_db(tx, "work_mem", "5MB")
    tx.execute("alter role all set work_mem = '4MB'")
    alter_role(tx, role, "maintenance_work_mem", "66MB")
    alter_db(tx, "maintenance_work_mem", "55MB")
    tx.execute("alter role all set maintenance_work_mem = '44MB'")
    alter_db(tx, "lock_timeout", "5s")
    tx.execute("alter role all set lock_timeout = '4s'")
    tx.execute("alter role all set cpu_tuple_cost = 0.0123")
    tx.execute(
        sql.SQL("alter role {} in database {} set search_path = app, public").format(
            sql.Identifier(role), sql.Identifier(tx.info.dbname)
        )
    )
    alter_role(tx, role, "search_path", "other")
    other = mkrole(tx)
    alter_role(tx, other, "work_mem", "3MB")
    seen_path = step_next(tx, role)
    assert show(tx, "work_mem") == "7MB"
    assert show(tx, "maintenance_work_mem") == "66MB"
    assert show(tx, "lock_timeout") == "5s"
    assert show(tx, "cpu_tuple_cost") == "0.0123"
    assert seen_path == "app, public"
    assert show(tx, "df.in_workflow") == "true"
    assert show(tx, "application_name") == "pgdurable:00000000:00000001"
    # the settings are the step's transaction's: a later step of another role starts over
    step_next(tx, other)
    assert show(tx, "work_mem") == "3MB"


def test_pinned_names_never_reach_a_step(tx: Conn) -> None:
    role = mkrole(tx)
    pinned = {
        "role": "pgdurable_step",
        "session_authorization": role,
        "application_name": "mine",
        "client_encoding": "LATIN1",
        "default_transaction_read_only": "on",
        "default_transaction_isolation": "serializable",
        "transaction_read_only": "on",
        "idle_in_transaction_session_timeout": "1ms",
        "df.in_workflow": "false",
        "pgdurable.whatever": "x",
        "pg_durable.fake_now": "2001-01-01",
        "pg_durable.max_user_connections": "1000",
    }
    for name, value in pinned.items():
        alter_role(tx, role, name, value)
    alter_role(tx, role, "work_mem", "9MB")  # an ordinary one, applied
    before = {name: show(tx, name) for name in pinned}
    step_next(tx, role)
    after = {name: show(tx, name) for name in pinned}
    assert after.pop("df.in_workflow") == "true"
    assert after.pop("application_name") == "pgdurable:00000000:00000001"
    before.pop("df.in_workflow"), before.pop("application_name")
    assert after == before
    assert show(tx, "work_mem") == "9MB"
    assert one(tx, "select pgdurable.setting_db('max_user_connections', '10')") == "10"
    assert one(tx, "select pgdurable._setting_pinned_v1('Statement_Timeout')") is True
    assert one(tx, "select pgdurable._setting_pinned_v1('work_mem')") is False


def test_settings_the_step_role_may_not_set_are_skipped(tx: Conn) -> None:
    """A superuser-only parameter a superuser set for the role (log_statement) is skipped,
    as PostgreSQL skips one it cannot apply at login: the step runs with the rest."""
    role = mkrole(tx)
    alter_role(tx, role, "log_statement", "all")
    alter_role(tx, role, "work_mem", "8MB")
    was = show(tx, "log_statement")
    step_next(tx, role)
    assert show(tx, "log_statement") == was
    assert show(tx, "work_mem") == "8MB"


@pytest.mark.parametrize(
    ("deployment", "role_step", "role_statement", "want"),
    [
        (None, None, None, "0"),
        ("2s", None, None, "2000"),
        ("2s", "0", None, "2000"),  # a role cannot lift the deployment's limit
        ("2s", "5s", None, "2000"),  # nor lengthen it
        ("2s", "500ms", None, "500"),  # it may shorten it
        ("2s", None, "0", "2000"),  # its statement_timeout = 0 lifts nothing either
        ("2s", None, "1500", "1500"),  # a shorter statement_timeout of its own applies
        ("2s", None, "1min", "2000"),
        (None, "3min", None, "180000"),  # no deployment limit: the role's own
        (None, None, "1.5s", "1500"),
        ("90000", "2min", "100s", "90000"),
    ],
)
def test_step_statement_timeout_only_tightens(
    tx: Conn, deployment: str | None, role_step: str | None, role_statement: str | None, want: str
) -> None:
    role = mkrole(tx)
    if deployment is not None:
        alter_db(tx, "pg_durable.step_statement_timeout", deployment)
    if role_step is not None:
        alter_role(tx, role, "pg_durable.step_statement_timeout", role_step)
    if role_statement is not None:
        alter_role(tx, role, "statement_timeout", role_statement)
    got = one(
        tx,
        "select statement_timeout from pgdurable._role_settings_v1(%s::regrole::oid, null)",
        (role,),
    )
    assert got == want
    step_next(tx, role)
    assert one(tx, "select setting from pg_settings where name = 'statement_timeout'") == want


def test_step_next_leaves_the_limit_armed_for_the_next_step(tx: Conn) -> None:
    """statement_timeout is armed when a statement begins, so step_next (the settings and the
    step in one statement) cannot arm it for its own step: it sets it again after the step,
    for the next statement, whatever the step set meanwhile. Here a "runner" that sets
    statement_timeout to 0 and sleeps: the step after it is still cut at the role's limit."""
    stand_in_runner(
        tx,
        LAX_RUNNER,
        "select pg_catalog.to_json(pg_catalog.set_config('statement_timeout', '0', false)) "
        "union all select pg_catalog.to_json(p_sql) from pg_catalog.pg_sleep(p_sql::float8)",
    )
    tx.execute("set local role pgdurable_step")
    args = ([], [], "public", "200", "pgdurable:00000000:00000001", LAX_RUNNER, "cap")
    tx.execute("set local statement_timeout = '200ms'")  # as step_settings leaves it
    tx.execute(q("step_next"), (*args, "0.01", 1000, None))  # a quick step that sets the limit to 0
    tx.execute("savepoint slow")
    with pytest.raises(psycopg.errors.QueryCanceled):
        tx.execute(q("step_next"), (*args, "1.5", 1000, None))  # the next step: still cut at 200 ms
    tx.execute("rollback to savepoint slow")
    tx.execute("reset role")


def test_a_database_statement_timeout_applies_to_steps(tx: Conn) -> None:
    """ALTER DATABASE … SET statement_timeout reaches a step as it reaches a session of the
    role (the role's own value is more specific)."""
    role, other = mkrole(tx), mkrole(tx)
    alter_db(tx, "statement_timeout", "40s")
    alter_role(tx, role, "statement_timeout", "20s")
    assert (
        one(
            tx,
            "select statement_timeout from pgdurable._role_settings_v1(%s::regrole::oid, null)",
            (role,),
        )
        == "20000"
    )
    assert (
        one(
            tx,
            "select statement_timeout from pgdurable._role_settings_v1(%s::regrole::oid, null)",
            (other,),
        )
        == "40000"
    )


def test_remote_steps_take_the_deployments_limit_given(tx: Conn) -> None:
    """A `database =>` step: the worker passes its own deployment's step_statement_timeout;
    the target database's default does not replace it (its owner may be a tenant)."""
    role = mkrole(tx)
    alter_db(tx, "pg_durable.step_statement_timeout", "0")
    assert (
        one(
            tx,
            "select statement_timeout from pgdurable._role_settings_v1(%s::regrole::oid, '3s')",
            (role,),
        )
        == "3000"
    )


def test_unusable_timeouts_fail_naming_the_setting(tx: Conn) -> None:
    role = mkrole(tx)
    alter_role(tx, role, "pg_durable.step_statement_timeout", "soon")
    err = expect(
        tx,
        "select * from pgdurable._role_settings_v1(%s::regrole::oid, null)",
        (role,),
        rf"pg_durable\.step_statement_timeout of role {role} is 'soon', "
        "not a duration",
    )
    assert err.sqlstate == "22023"
    other = mkrole(tx)
    alter_db(tx, "pg_durable.step_statement_timeout", "-5")
    expect(
        tx,
        "select * from pgdurable._role_settings_v1(%s::regrole::oid, null)",
        (other,),
        r"pg_durable\.step_statement_timeout is '-5', not a duration",
    )
    # PostgreSQL's own forms parse as it parses them (010 is octal to it)
    assert one(tx, "select pgdurable._timeout_ms_v1('010', 'x')") == 8
    assert one(tx, "select pgdurable._timeout_ms_v1(' 5 min ', 'x')") == 300000
    assert one(tx, "select pgdurable._timeout_ms_v1('250', 'x')") == 250
    assert one(tx, "select pgdurable._timeout_ms_v1('', 'x')") is None


# -- the loop settings of an instance's role ----------------------------------------------


def test_loop_settings_of_the_role_only_tighten(tx: Conn) -> None:
    role = mkrole(tx)
    tx.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
    iid = one(tx, "select df.start('select 1')")
    tx.execute("reset role")

    def limits(min_ms: int = 1000, max_it: int = 100) -> tuple[float, int]:
        return loop_limits(tx.execute(q("load_instance"), (iid,)).fetchone(), min_ms, max_it)

    assert limits() == (1.0, 100)
    alter_role(tx, role, "pg_durable.loop_max_iterations", "7")
    alter_role(tx, role, "pg_durable.loop_max_iterations", "5", here=True)  # more specific
    alter_role(tx, role, "pg_durable.loop_min_interval_ms", "2500")
    assert limits() == (2.5, 5)
    assert limits(min_ms=4000, max_it=3) == (4.0, 3)  # a looser role value loses
    alter_role(tx, role, "pg_durable.loop_min_interval_ms", "0")
    alter_role(tx, role, "pg_durable.loop_max_iterations", "1000000", here=True)
    assert limits() == (1.0, 100)
    alter_role(tx, role, "pg_durable.loop_max_iterations", "0", here=True)
    with pytest.raises(
        BadSetting,
        match=rf"pg_durable\.loop_max_iterations of role {role} "
        "is '0', not a whole number of at least 1",
    ):
        limits()
    alter_role(tx, role, "pg_durable.loop_max_iterations", "5", here=True)
    alter_role(tx, role, "pg_durable.loop_min_interval_ms", "1s")
    with pytest.raises(
        BadSetting,
        match=r"pg_durable\.loop_min_interval_ms of role .* is "
        "'1s', not a whole number of milliseconds",
    ):
        limits()
