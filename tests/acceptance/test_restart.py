"""df.restart end to end through `pgdurable serve` (docs/restart.md).

Every workflow here counts its side effects in ``public.hits`` (one row per step that ran and
committed): a restart must run the failed, cancelled and never-run steps once and the
completed ones not at all. One database and one serve per PostgreSQL server for the module.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from tests import fix_db
from tests.acceptance.conftest import Env, module_env
from tests.acceptance.test_http import BASE_ENV
from tests.fix_db import Server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    def make_role(tdb: fix_db.TestDB) -> str:
        role = tdb.create_role("rst")
        with tdb.connect() as conn:
            conn.execute("create table public.hits (tag text not null)")
            conn.execute(f'grant select, insert on public.hits to "{role}"')
        return role

    with module_env(server, tmp_path_factory.mktemp("serve"), BASE_ENV, make_role) as e:
        yield e


def start(env: Env, expr: str) -> str:
    with env.db.connect(env.role) as conn:
        return str(conn.execute(f"select df.start({expr})").fetchone()[0])


def wait_status(env: Env, iid: str, timeout: int = 60) -> str:
    with env.db.connect(env.role) as conn:
        return str(conn.execute("select df.await_instance(%s, %s)", (iid, timeout)).fetchone()[0])


def restart(env: Env, iid: str) -> str:
    with env.db.connect(env.role) as conn:
        return str(conn.execute("select df.restart(%s)", (iid,)).fetchone()[0])


def hits(env: Env, prefix: str) -> dict[str, int]:
    with env.db.connect() as conn:
        rows = conn.execute(
            "select tag, count(*) from public.hits where tag like %s group by tag", (prefix + "%",)
        ).fetchall()
    return {str(t): int(n) for t, n in rows}


def runs(env: Env, iid: str) -> list[tuple[Any, ...]]:
    with env.db.connect(env.role) as conn:
        return conn.execute(
            "select run, status, started_at <= coalesce(ended_at, now()), error "
            "from df.instance_runs(%s)",
            (iid,),
        ).fetchall()


def admin(env: Env, *statements: str) -> None:
    with env.db.connect() as conn:
        for st in statements:
            conn.execute(st)


def hit(tag: str) -> str:
    return f"df.sql('insert into public.hits values (''{tag}'')')"


def wait_running(env: Env, iid: str, node_query_like: str, timeout: float = 30) -> str:
    """Until the node whose query matches is running; returns its id."""
    deadline = time.monotonic() + timeout
    with env.db.connect() as conn:
        while True:
            row = conn.execute(
                "select id from df.nodes where instance_id = %s and query like %s "
                "and status = 'running'",
                (iid, node_query_like),
            ).fetchone()
            if row:
                return str(row[0])
            assert time.monotonic() < deadline, f"node {node_query_like!r} never ran"
            time.sleep(0.05)


def test_missing_table_then_restart(env: Env) -> None:
    """A step fails because its table is missing; the table is made; df.restart runs the rest
    of the workflow, the completed step is not run again and its named result is still
    there for the steps after the failed one."""
    iid = start(
        env,
        "df.as(df.sql('insert into public.hits values (''m:a'') returning 42 as v'), 'a')"
        " ~> df.sql('insert into public.late_m select 1')"
        " ~> df.sql('insert into public.hits select ''m:c'' || $a.v')",
    )
    assert wait_status(env, iid) == "failed"
    assert hits(env, "m:") == {"m:a": 1}
    with env.db.connect(env.role) as conn:
        err = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
    assert err["sqlstate"] == "42P01"
    assert "late_m" in err["error"]

    admin(
        env, "create table public.late_m (x int)", f'grant insert on public.late_m to "{env.role}"'
    )
    assert restart(env, iid) == iid
    assert wait_status(env, iid) == "completed"
    assert hits(env, "m:") == {"m:a": 1, "m:c42": 1}
    with env.db.connect() as conn:
        assert conn.execute("select count(*) from public.late_m").fetchone()[0] == 1
    got = runs(env, iid)
    assert [(r[0], r[1], r[2]) for r in got] == [(1, "failed", True), (2, "completed", True)]
    assert got[0][3]["sqlstate"] == "42P01"
    assert "late_m" in got[0][3]["error"]
    assert got[1][3] is None
    # a completed instance is refused, naming its status
    with (
        env.db.connect(env.role) as conn,
        pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="is completed"),
    ):
        conn.execute("select df.restart(%s)", (iid,))


def test_restart_a_cancelled_signal_wait(env: Env) -> None:
    """Cancelled while it waited for a signal: the restart waits again (a signal sent before
    the restart is refused; one sent after it is consumed) and the step before the wait does
    not run again."""
    iid = start(env, f"{hit('s:a')} ~> df.wait_for_signal('go') ~> {hit('s:b')}")
    wait_running(env, iid, '%"signal_name"%')
    with env.db.connect(env.role) as conn:
        conn.execute("select df.cancel(%s, 'operator said stop')", (iid,))
    assert wait_status(env, iid) == "cancelled"
    assert restart(env, iid) == iid
    wait_running(env, iid, '%"signal_name"%')
    with env.db.connect(env.role) as conn:
        conn.execute("select df.signal(%s, 'go', '{\"n\": 1}')", (iid,))
    assert wait_status(env, iid) == "completed"
    assert hits(env, "s:") == {"s:a": 1, "s:b": 1}
    got = runs(env, iid)
    assert [(r[0], r[1]) for r in got] == [(1, "cancelled"), (2, "completed")]
    assert got[0][3]["error"] == "cancelled: operator said stop"


def test_restart_after_a_crash_failed_step(env: Env) -> None:
    """The worker running a step is killed, and the step is given up as the engine gives up a
    step whose attempts crashed (@engine@._fail_instance_v1, the worker's poison path): the
    step's uncommitted work is gone, the restart runs it once more, the step before it not."""
    flag = "public.crash_ok"
    admin(env, f"create table {flag} (x int)", f'grant select on {flag} to "{env.role}"')
    iid = start(
        env,
        f"{hit('c:a')} ~> df.sql('insert into public.hits select ''c:b'' from (select "
        f"pg_sleep(case when exists (select from {flag}) then 0 else 30 end)) s')"
        f" ~> {hit('c:c')}",
    )
    node = wait_running(env, iid, "%c:b%")
    with env.db.connect() as conn:
        owner = None
        deadline = time.monotonic() + 20
        while owner is None:
            row = conn.execute(
                "select lease_owner from pgdurable.tasks where instance_id = %s and node_id = %s",
                (iid, node),
            ).fetchone()
            owner = row[0] if row else None
            assert time.monotonic() < deadline, "the step was never leased"
            time.sleep(0.05)
    for pid in env.serve.workers():
        os.kill(pid, signal.SIGKILL)  # the step's transaction dies with its connection
    with psycopg.connect(env.db.service_dsn, autocommit=True) as conn:
        gave_up = conn.execute(
            "select pgdurable._fail_instance_v1(%s, %s, %s, %s)",
            (owner, iid, node, "step abandoned after 10 attempts; last error: server closed"),
        ).fetchone()[0]
    assert gave_up is True
    assert wait_status(env, iid) == "failed"
    assert hits(env, "c:") == {"c:a": 1}
    admin(env, f"insert into {flag} values (1)")
    env.serve.wait_workers(2)
    assert restart(env, iid) == iid
    assert wait_status(env, iid) == "completed"
    assert hits(env, "c:") == {"c:a": 1, "c:b": 1, "c:c": 1}
    got = runs(env, iid)
    assert got[0][1] == "failed"
    assert "abandoned after 10 attempts" in got[0][3]["error"]


def test_restart_inside_a_loop_with_a_join(env: Env) -> None:
    """A loop iteration fails in one JOIN branch: the restart resumes that iteration (the
    completed branch is not run again), then the loop runs its remaining iterations. (The
    failing branch waits first: a failed JOIN abandons a branch that has not completed yet,
    and which of two quick branches ends first is not the engine's to promise.)"""
    iid = start(
        env,
        "df.loop(df.join("
        f"{hit('l:x')}, df.sql('select pg_sleep(0.3)') ~> "
        "df.sql('insert into public.late_l values (1)')),"
        " df.sql('select (select count(*) from public.hits where tag = ''l:x'') < 3'))",
    )
    assert wait_status(env, iid) == "failed"
    assert hits(env, "l:") == {"l:x": 1}
    admin(
        env, "create table public.late_l (x int)", f'grant insert on public.late_l to "{env.role}"'
    )
    assert restart(env, iid) == iid
    assert wait_status(env, iid) == "completed"
    # iteration 1 resumed (x not again), iterations 2 and 3 ran whole
    assert hits(env, "l:") == {"l:x": 3}
    with env.db.connect() as conn:
        assert conn.execute("select count(*) from public.late_l").fetchone()[0] == 3


def test_restart_refusals_and_access(env: Env) -> None:
    """Another role gets the not-found error; a running instance is refused naming its status;
    restarting twice: the second is refused while the first run goes on."""
    other = env.db.create_role("rst_other")
    # the failing step takes a second: the instance is still running when restarted twice
    iid = start(env, f"{hit('r:a')} ~> df.sql('select 1 / (0 * random())::int from pg_sleep(1)')")
    with (
        env.db.connect(other) as conn,
        pytest.raises(psycopg.errors.NoDataFound, match="not found or access denied"),
    ):
        conn.execute("select df.restart(%s)", (iid,))
    with (
        env.db.connect(env.role) as conn,
        pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match=r"is (running|pending)"),
    ):
        conn.execute("select df.restart(%s)", (iid,))
    assert wait_status(env, iid) == "failed"
    assert restart(env, iid) == iid
    with (
        env.db.connect(env.role) as conn,
        pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="is running"),
    ):
        conn.execute("select df.restart(%s)", (iid,))
    assert wait_status(env, iid) == "failed"  # it fails the same way again
    assert hits(env, "r:") == {"r:a": 1}
    assert [(r[0], r[1]) for r in runs(env, iid)] == [(1, "failed"), (2, "failed")]


def test_cli_restart(env: Env) -> None:
    """`pgdurable restart ID`: what it began and what the previous run ended with; a refusal
    is one line with a hint (exit code 1), or a JSON error object with --json."""
    from click.testing import CliRunner

    from pgdurable.cli import main

    dsn = env.db.dsn_as(env.role)
    iid = start(env, f"{hit('k:a')} ~> df.sql('insert into public.late_k select 1')")
    assert wait_status(env, iid) == "failed"
    admin(
        env, "create table public.late_k (x int)", f'grant insert on public.late_k to "{env.role}"'
    )
    res = CliRunner().invoke(main, ["restart", iid, "--dsn", dsn, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["instance_id"] == iid
    assert out["run"] == 2
    assert out["status"] == "running"
    assert out["previous"]["status"] == "failed"
    assert out["previous"]["error"]["sqlstate"] == "42P01"
    assert wait_status(env, iid) == "completed"
    assert hits(env, "k:") == {"k:a": 1}
    res = CliRunner().invoke(main, ["restart", iid, "--dsn", dsn])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines[0] == (
        f"Error: Instance {iid} is completed; only a failed or cancelled instance can be restarted"
    )
    assert lines[1].startswith("Hint: it ran to the end")
    res = CliRunner().invoke(main, ["restart", "deadbeef", "--dsn", dsn, "--json"])
    assert res.exit_code == 1
    assert json.loads(res.output) == {"error": "Instance not found or access denied: deadbeef"}
    # text mode of a successful restart names the previous run's error
    iid = start(env, f"{hit('k:b')} ~> df.sql('select 1/0')")
    assert wait_status(env, iid) == "failed"
    res = CliRunner().invoke(main, ["restart", iid, "--dsn", dsn])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"Instance {iid} restarted: run 2 is running; run 1 failed: ")
    assert "division by zero" in res.output


def test_restart_steps_in_another_database(env: Env) -> None:
    """A `database =>` workflow whose second step fails there on a missing table: made there,
    the restart runs that step in the other database; the first is not run again."""
    from pgdurable import schema

    other = f"{env.db.name}_other"
    with psycopg.connect(env.db.server.install_dsn("postgres"), autocommit=True) as conn:
        conn.execute(f'create database "{other}"')
    try:
        schema.install(env.db.server.install_dsn(other))
        with psycopg.connect(env.db.server.install_dsn(other), autocommit=True) as oc:
            oc.execute("select df.grant_usage(%s)", (env.role,))
        with psycopg.connect(env.db.server.dsn(other), autocommit=True) as oc:
            oc.execute("create table public.t (v int)")
            oc.execute(f'grant all on public.t to "{env.role}"')
        expr = "'insert into public.t values (7)' ~> 'insert into public.late_o values (1)'"
        with env.db.connect(env.role) as conn:
            iid = str(conn.execute(f"select df.start({expr}, null, %s)", (other,)).fetchone()[0])
        assert wait_status(env, iid) == "failed"
        with psycopg.connect(env.db.server.dsn(other), autocommit=True) as oc:
            oc.execute("create table public.late_o (x int)")
            oc.execute(f'grant all on public.late_o to "{env.role}"')
        assert restart(env, iid) == iid
        assert wait_status(env, iid) == "completed"
        with psycopg.connect(env.db.server.dsn(other), autocommit=True) as oc:
            assert oc.execute("select count(*) from public.t").fetchone() == (1,)
            assert oc.execute("select count(*) from public.late_o").fetchone() == (1,)
    finally:
        with psycopg.connect(env.db.server.admin_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{other}" with (force)')


def test_restart_a_failed_http_step(env: Env) -> None:
    """An HTTP step fails on a 500; once the service answers, the restart sends the request
    again (the request before it is not)."""
    seen: list[str] = []
    healthy = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(self.path)
            ok = healthy.is_set() or self.path == "/first"
            self.send_response(200 if ok else 500)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"ok": true}' if ok else b'{"error": "down"}')

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        role = env.db.create_role("rst_http", http=True)
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        with env.db.connect(role) as conn:
            iid = str(
                conn.execute(
                    "select df.start(df.http(%s) ~> df.http(%s))",
                    (f"{base}/first", f"{base}/second"),
                ).fetchone()[0]
            )
            assert (
                conn.execute("select df.await_instance(%s, 60)", (iid,)).fetchone()[0] == "failed"
            )
            err = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
            assert "500" in err["error"]
            healthy.set()
            assert conn.execute("select df.restart(%s)", (iid,)).fetchone()[0] == iid
            assert conn.execute("select df.await_instance(%s, 60)", (iid,)).fetchone()[0] == (
                "completed"
            )
        assert seen == ["/first", "/second", "/second"]
    finally:
        srv.shutdown()
        srv.server_close()
