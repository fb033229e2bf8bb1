"""End-to-end signals through `pgdurable serve`: the durable inbox (docs/decisions.md D6).

One database and one serve per PostgreSQL server for most tests; the restart test starts
and stops its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import fix_db
from tests.acceptance.conftest import module_env
from tests.acceptance.test_http import BASE_ENV, Env, finish, start
from tests.fix_db import Server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with module_env(
        server, tmp_path_factory.mktemp("serve"), BASE_ENV, lambda tdb: tdb.create_role("sig")
    ) as e:
        yield e


def signal(db: fix_db.TestDB, role: str, iid: str, name: str, data: str | None = None) -> None:
    with db.connect(role) as conn:
        if data is None:
            conn.execute("select df.signal(%s, %s)", (iid, name))
        else:
            conn.execute("select df.signal(%s, %s, %s)", (iid, name, data))


def node_status(db: fix_db.TestDB, iid: str) -> dict[str, tuple[str, Any]]:
    """{query: (status, result)} of the instance's SIGNAL nodes, keyed by signal name+order."""
    with db.connect() as conn:
        rows = conn.execute(
            "select id, query, status, result from df.nodes where "
            "instance_id = %s and node_type = 'SIGNAL' order by id",
            (iid,),
        ).fetchall()
    return {r[0]: (r[2], r[3]) for r in rows}


def wait_running(db: fix_db.TestDB, iid: str, node_type: str, timeout: float = 20) -> None:
    """Until the instance's first NODE_TYPE node is running (the wait is registered)."""
    deadline = time.monotonic() + timeout
    with db.connect() as conn:
        while (
            conn.execute(
                "select count(*) from df.nodes where instance_id = %s and "
                "node_type = %s and status = 'running'",
                (iid, node_type),
            ).fetchone()[0]
            == 0
        ):
            assert time.monotonic() < deadline, f"no running {node_type} node"
            time.sleep(0.05)


def test_signals_sent_before_the_wait_are_kept_fifo_per_name(env: Env) -> None:
    # one transaction: start + three signals before any wait can register
    with env.db.connect(env.role, autocommit=False) as conn:
        iid = conn.execute(
            "select df.start(df.wait_for_signal('a') |=> 'a' ~> "
            "df.wait_for_signal('b') |=> 'b1' ~> df.wait_for_signal('b') |=> 'b2'"
            " ~> df.sql('select ($b1.data)::jsonb as first, $a.signal_name as a'))"
        ).fetchone()[0]
        conn.execute("select df.signal(%s, 'b', '{\"n\": 1}')", (iid,))
        conn.execute("select df.signal(%s, 'b', '{\"n\": 2}')", (iid,))
        conn.execute("select df.signal(%s, 'a', 'null')", (iid,))  # JSON null data is a signal
        conn.commit()
    status, res, err = finish(env.db, env.role, iid, timeout=30)
    assert status == "completed", err
    assert res["rows"] == [{"first": {"n": 1}, "a": "a"}]
    with env.db.connect() as conn:
        # 'b2' names the THEN ending in the second wait: a composite's value is stored once,
        # on the wait's row, and df.instance_nodes shows it on the THEN's
        b2 = conn.execute(
            "select result from df.instance_nodes(%s) where result_name = 'b2'", (iid,)
        ).fetchone()[0]
    assert json.loads(b2) == {"signal_name": "b", "timed_out": False, "data": {"n": 2}}


def test_signal_during_the_wait_with_other_names_queued(env: Env) -> None:
    iid = start(env.db, env.role, "df.wait_for_signal('a') ~> df.wait_for_signal('b')")
    signal(env.db, env.role, iid, "b", '{"early": true}')  # queued for the later wait
    wait_running(env.db, iid, "SIGNAL")
    # (a short pause so the 'a' wait has looked at its inbox and parked before 'a' arrives)
    time.sleep(0.3)
    t0 = time.monotonic()
    signal(env.db, env.role, iid, "a")
    status, res, err = finish(env.db, env.role, iid, timeout=30)
    latency = time.monotonic() - t0
    assert status == "completed", err
    assert res == {"signal_name": "b", "timed_out": False, "data": {"early": True}}
    # a signal of another name in the inbox must not keep the wait from parking (which
    # would delay 'a' until the lease expired)
    assert latency < 2.5, f"signal took {latency:.1f}s to be consumed"


def test_timeout_fires_and_a_late_signal_stays_in_the_inbox(env: Env) -> None:
    t0 = time.monotonic()
    iid = start(env.db, env.role, "df.wait_for_signal('late', 1) ~> df.wait_for_signal('x', 1)")
    status, res, err = finish(env.db, env.role, iid, timeout=30)
    assert status == "completed", err
    assert res == {"signal_name": "x", "timed_out": True, "data": None}
    assert 1.8 < time.monotonic() - t0 < 10
    with env.db.connect(env.role) as conn, pytest.raises(Exception, match="already completed"):
        conn.execute("select df.signal(%s, 'late')", (iid,))


def test_signal_reaches_a_wait_inside_a_race_branch(env: Env) -> None:
    iid = start(
        env.db,
        env.role,
        "df.race(df.wait_for_signal('approve') ~> df.sql('select ''approved'' as r'),"
        " df.wait_for_signal('reject') ~> df.sql('select ''rejected'' as r'))",
    )
    wait_running(env.db, iid, "SIGNAL")
    signal(env.db, env.role, iid, "reject", '{"why": "no"}')
    status, res, err = finish(env.db, env.role, iid, timeout=30)
    assert status == "completed", err
    assert res["rows"] == [{"r": "rejected"}]


def test_signal_reaches_waits_in_join_branches_and_loops(env: Env) -> None:
    with env.db.connect() as conn:
        conn.execute(f"alter database {env.db.name} set pg_durable.loop_min_interval_ms = 0")
    iid = start(
        env.db,
        env.role,
        "df.join(df.wait_for_signal('left'), "
        "df.sql('select 0 as i') |=> 'i' ~> df.loop(df.wait_for_signal('tick') ~> "
        "df.sql('select $i + 1 as i') |=> 'i' ~> "
        "df.if(df.sql('select $i >= 3'), df.break('$i'), 'select 0')))",
    )
    for _ in range(3):
        signal(env.db, env.role, iid, "tick")
    signal(env.db, env.role, iid, "left", '"L"')
    status, res, err = finish(env.db, env.role, iid, timeout=30)
    assert status == "completed", err
    assert res[0] == {"signal_name": "left", "timed_out": False, "data": "L"}
    assert res[1] == 3


def test_wait_survives_a_serve_restart(db: fix_db.TestDB, serve_factory: Any) -> None:
    role = db.create_role("sigr")
    s = serve_factory(db, **BASE_ENV)
    s.wait_workers(2)
    iid = start(
        db, role, "df.wait_for_signal('go') |=> 'g' ~> df.sql('select ($g.data)::jsonb as d')"
    )
    wait_running(db, iid, "SIGNAL")
    assert s.stop() == 0
    # the wait is durable: the signal is sent while no serve runs, then a new one picks it up
    signal(db, role, iid, "go", '{"after": "restart"}')
    s2 = serve_factory(db, **BASE_ENV)
    s2.wait_workers(2)
    status, res, err = finish(db, role, iid, timeout=30)
    assert status == "completed", err
    assert res["rows"] == [{"d": {"after": "restart"}}]
    assert json.dumps(res)
