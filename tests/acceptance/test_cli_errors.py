"""The CLI's ordinary failures: one line naming the problem and what to do, exit code 1 (2 for
usage), never a traceback; JSON with --json. Real subprocesses (`python -m pgdurable`), so
the entry point's own error path is what is tested."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg import sql

pytestmark = pytest.mark.timeout(180)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, "-m", "pgdurable", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    return res


def one_line_error(res, code=1):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, res.stderr
    return res.stderr


def test_await_result_and_list_say_how_it_went(db, serve_factory):
    role = db.create_role("ce")
    dsn = db.dsn_as(role)
    serve_factory(db)
    ok = run("start", "'select 1'", "--dsn", dsn).stdout.strip()
    bad = run("start", "'select 1/0'", "--dsn", dsn).stdout.strip()
    res = run("await", ok, "--dsn", dsn)
    assert (res.returncode, res.stdout.strip()) == (0, "completed")
    res = run("await", bad, "--dsn", dsn)
    assert (res.returncode, res.stdout.strip()) == (1, "failed")
    res = run("await", bad, "--dsn", dsn, "--json")
    assert (res.returncode, json.loads(res.stdout)["status"]) == (1, "failed")
    # a failed instance has no result: say so, and where the reason is
    err = one_line_error(run("result", bad, "--dsn", dsn))
    assert f"instance {bad} failed: `pgdurable error {bad}` says why" in err
    res = run("result", bad, "--dsn", dsn, "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout) == {
        "error": f"instance {bad} failed: `pgdurable error {bad}` says why"
    }
    assert json.loads(run("result", ok, "--dsn", dsn, "--json").stdout)["result"]["row_count"] == 1
    # a bogus status is a usage error, as JSON too
    res = run("list", "--status", "bogus", "--dsn", dsn)
    assert res.returncode == 2
    assert "'bogus' is not one of 'pending', 'running'" in res.stderr
    res = run("list", "--status", "bogus", "--dsn", dsn, "--json")
    assert res.returncode == 2
    assert "'bogus' is not one of" in json.loads(res.stdout)["error"]


def test_connection_and_privilege_problems_name_what_to_do(db):
    missing = db.server.dsn(f"nosuch_{uuid.uuid4().hex[:6]}")
    err = one_line_error(run("list", "--dsn", missing))
    assert "cannot connect:" in err
    assert "does not exist" in err
    assert "Hint: check --dsn" in err
    res = run("list", "--dsn", missing, "--json")
    assert res.returncode == 1
    assert set(json.loads(res.stdout)) == {"error", "hint"}
    # a role that was never given the df API
    outsider = db.create_role("ce_out", grant=False)
    err = one_line_error(run("list", "--dsn", db.dsn_as(outsider)))
    assert "permission denied for schema df" in err
    assert "Hint: an administrator must give this role the df API: select df.grant_usage(" in err


def test_serve_and_install_fail_in_one_line(db):
    # a database that does not exist
    missing = db.server.dsn(f"nosuch_{uuid.uuid4().hex[:6]}", user="pgdurable_test_admin")
    err = one_line_error(run("serve", "--dsn", missing))
    assert "does not exist" in err
    # install by a role that may not create what pgdurable needs
    fresh = f"ce_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db.install_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(fresh)))
    try:
        nobody = db.create_role("ce_nobody", grant=False)
        err = one_line_error(run("install", "--dsn", db.server.dsn(fresh, user=nobody)))
        assert "Error: " in err
    finally:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(fresh)))
    # a metrics port that is taken
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = one_line_error(run("serve", "--dsn", db.service_dsn, "--metrics-port", str(port)))
        assert "Address already in use" in err
