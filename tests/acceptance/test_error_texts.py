"""The error texts users match on that a running workflow produces, through a real
``pgdurable serve``: a step's own SQL error, helpers called from a step, HTTP refusals under
each policy, and the deployment-wide step connection cap. (The texts df.start, the DSL and
the control functions raise are in tests/sql/test_error_texts.py.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import fix_db
from tests.acceptance.conftest import module_env
from tests.acceptance.test_http import (
    BASE_ENV,
    Env,
    finish,
    run,
    serve_env,
    start,
)
from tests.fix_db import Server

pytestmark = pytest.mark.timeout(180)
# an address nothing listens on: the texts below are all raised before any request is sent
NOWHERE = "http://127.0.0.1:9/nothing"


@pytest.fixture(scope="module")
def env(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One database and one serve (HTTP allow-list: 127.0.0.1, localhost) for the module."""
    with module_env(
        server,
        tmp_path_factory.mktemp("serve"),
        BASE_ENV,
        lambda tdb: tdb.create_role("txt", http=True),
    ) as e:
        yield e


def failed_with(
    env_db: fix_db.TestDB, role: str, expr: str, params: tuple[Any, ...] = ()
) -> dict[str, Any]:
    """Run EXPR as ROLE; it must fail: df.error, plus the failing node's stored result."""
    iid, status, _, err = run(env_db, role, expr, params)
    assert status == "failed", (status, err)
    with env_db.connect(role) as conn:
        stored = conn.execute(
            "select result #>> '{}' from df.nodes where instance_id = %s and id = %s",
            (iid, err["node_id"]),
        ).fetchone()[0]
    assert stored == err["error"]  # the failed node's result holds the same text
    return dict(err)


def test_a_steps_sql_error_surfaces_verbatim(env: Env) -> None:
    err = failed_with(env.db, env.role, "df.sql('select 1') ~> df.sql('select 1/0')")
    assert "division by zero" in err["error"]
    assert err["sqlstate"] == "22012"


@pytest.mark.parametrize(
    "call",
    [
        "df.setvar(''a'', ''b'')",
        "df.unsetvar(''a'')",
        "df.clearvars()",
        "df.await_instance(''0123abcd'', 1)",
    ],
)
def test_helpers_cannot_be_called_inside_a_workflow(env: Env, call: str) -> None:
    err = failed_with(env.db, env.role, f"df.sql('select {call}')")
    assert "cannot be called inside a workflow" in err["error"], err


def test_http_without_execute_privilege(env: Env) -> None:
    # a role never given df.http submits an HTTP graph as a JSON literal: refused at run time
    nohttp = env.db.create_role("nohttp")
    with env.db.connect() as conn:
        graph = conn.execute("select df.http(%s, 'GET')", (NOWHERE,)).fetchone()[0]
    err = failed_with(env.db, nohttp, "%s", (graph,))
    assert "does not have EXECUTE privilege" in err["error"], err


def test_multipart_data_needs_a_whole_value_reference(env: Env) -> None:
    parts = [{"name": "f", "data_b64": "aGk= $r.b64"}]
    err = failed_with(
        env.db,
        env.role,
        "df.sql('select ''aGk='' as b64') |=> 'r' ~> df.http_multipart(%s, 'POST', %s::jsonb)",
        (NOWHERE, json.dumps(parts)),
    )
    assert "whole-value reference" in err["error"], err


def test_allow_list_refusal(env: Env) -> None:
    err = failed_with(env.db, env.role, "df.http('https://example.com/x', 'GET')")
    assert "not in the allowed" in err["error"], err


def _policy(db: fix_db.TestDB, serve_factory: Any, policy: str, url: str) -> dict[str, Any]:
    role = db.create_role("pol", http=True)
    s = serve_factory(db, **{**BASE_ENV, **serve_env(http_policy=policy, http_allow="")})
    s.wait_workers(2)
    iid = start(db, role, "df.http(%s, 'GET')", (url,))
    status, _, err = finish(db, role, iid)
    assert status == "failed", (status, err)
    return dict(err)


def test_public_policy_refuses_a_bare_ip(db: fix_db.TestDB, serve_factory: Any) -> None:
    err = _policy(db, serve_factory, "public", "http://10.1.2.3/x")
    assert "bare IP" in err["error"], err


def test_deny_all_policy(db: fix_db.TestDB, serve_factory: Any) -> None:
    err = _policy(db, serve_factory, "deny-all", NOWHERE)
    assert "df.http() is disabled" in err["error"], err
    assert "outbound HTTP requests are disabled" in err["error"], err


def test_connection_limit_reached(db: fix_db.TestDB, serve_factory: Any) -> None:
    role = db.create_role("cap")
    with db.connect() as conn:
        conn.execute(f'alter database "{db.name}" set pg_durable.max_user_connections = 1')
        conn.execute(f'alter database "{db.name}" set pg_durable.execution_acquire_timeout = 1')
    s = serve_factory(db)
    s.wait_workers(2)
    with db.connect() as conn:  # the service makes the slot rows when it starts
        deadline = time.monotonic() + 30
        while conn.execute("select count(*) from pgdurable.step_slots").fetchone()[0] < 1:
            assert time.monotonic() < deadline, "no step slot rows"
            time.sleep(0.1)
    # the deployment's one step slot stays busy (held here, as a long step of another serve
    # would hold it): the step waits for it past the 1 s acquire timeout
    with db.connect(autocommit=False) as holder:
        holder.execute("select 1 from pgdurable.step_slots where slot = 0 for update")
        err = failed_with(db, role, "df.sql('select 1')")
        holder.rollback()
    assert "connection limit reached" in err["error"], err
    assert "max_user_connections=1" in err["error"], err
