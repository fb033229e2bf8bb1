"""The operator's CLI against a running `pgdurable serve` (subprocess), and its /metrics.

CLI commands run in-process through click's runner (fast); `top --once` also runs as a
real `python -m pgdurable` subprocess so the entry point itself is covered.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from click.testing import CliRunner

from pgdurable.cli import main

pytestmark = pytest.mark.timeout(180)

ID = re.compile(r"^[0-9a-f]{8}$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(dsn, *args, ok=True):
    res = CliRunner().invoke(main, [*args, "--dsn", dsn], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def cli_json(dsn, *args):
    return json.loads(cli(dsn, *args, "--json").output)


def scrape(port) -> dict[str, float]:
    """Samples of /metrics whose names start with pgdurable_ (labels kept in the key)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith("pgdurable_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@pytest.fixture
def running(db, serve_factory, tenant):
    port = _free_port()
    s = serve_factory(db, PGDURABLE_METRICS_PORT=str(port))
    s.wait_workers(2)
    s.metrics_port = port
    return s


def test_commands_text_and_json(db, running, tenant):
    dsn = db.dsn_as(tenant)
    expr = "df.sql('select 20 as n') |=> 'x' ~> df.sql('select $x.n + 1 as b')"
    iid = cli(dsn, "start", expr, "--label", "cli-ok").output.strip()
    assert ID.match(iid)
    started = cli_json(dsn, "start", "'select 1 as one'", "--label", "cli-ok")
    assert ID.match(started["instance_id"])
    assert started["label"] == "cli-ok"

    assert cli(dsn, "await", iid, "--timeout", "30").output.strip() == "completed"
    assert cli_json(dsn, "await", started["instance_id"]) == {
        "instance_id": started["instance_id"],
        "status": "completed",
    }
    assert cli(dsn, "status", iid).output.strip() == "completed"
    assert cli_json(dsn, "status", iid) == {"instance_id": iid, "status": "completed"}
    assert json.loads(cli(dsn, "result", iid).output)["rows"] == [{"b": 21}]
    res = cli_json(dsn, "result", iid)
    assert res["status"] == "completed"
    assert res["result"]["rows"] == [{"b": 21}]
    assert cli(dsn, "error", iid).output == ""  # not failed: nothing

    bad = cli(dsn, "start", "'select 1/0'", "--label", "cli-bad").output.strip()
    res = cli(dsn, "await", bad, ok=False)  # await's exit code says it failed
    assert (res.exit_code, res.output.strip()) == (1, "failed")
    err = cli_json(dsn, "error", bad)["error"]
    assert err["sqlstate"] == "22012"
    assert "division by zero" in err["error"]
    assert json.loads(cli(dsn, "error", bad).output)["node_type"] == "SQL"

    # signal: the instance waits for 'go', then finishes
    waiting = cli(dsn, "start", "df.wait_for_signal('go') ~> 'select 2 as two'").output.strip()
    assert cli(dsn, "signal", waiting, "go", '{"k": 1}').output.strip() == "OK"
    assert cli_json(dsn, "await", waiting)["status"] == "completed"

    # cancel a sleeping instance
    sleeper = cli(dsn, "start", "df.sleep(600)").output.strip()
    assert cli_json(dsn, "signal", sleeper, "nobody-waits")["result"] == "OK"
    assert (
        cli(dsn, "cancel", sleeper, "no time").output.strip()
        == f"Instance {sleeper} cancelled: no time"
    )
    assert cli_json(dsn, "status", sleeper)["status"] == "cancelled"

    # list: table and JSON, label filter
    table = cli(dsn, "list", "--label", "cli-ok").output.splitlines()
    assert table[0].split() == ["ID", "STATUS", "EXECS", "CREATED", "COMPLETED", "LABEL"]
    assert {line.split()[0] for line in table[1:]} == {iid, started["instance_id"]}
    listed = cli_json(dsn, "list", "--status", "failed")
    assert [r["instance_id"] for r in listed["instances"]] == [bad]
    assert listed["instances"][0]["label"] == "cli-bad"
    assert listed["next_cursor"] is None
    page = cli_json(dsn, "list", "--limit", "1")
    assert len(page["instances"]) == 1
    assert page["next_cursor"]
    assert "(more: --after" in cli(dsn, "list", "--limit", "1").output

    # explain: live instance as text, mermaid, dot and JSON
    text = cli(dsn, "explain", iid).output
    assert text.startswith(f"Instance: {iid}\nStatus: completed")
    assert "✓ SQL: select 20 as n |=> 'x'" in text
    mer = cli(dsn, "explain", iid, "--format", "mermaid").output
    assert mer.startswith(f"%% instance {iid} (completed)\nflowchart TD")
    assert mer.count(":::completed") == 3
    assert "-->|then|" in mer
    assert "classDef completed fill:#b7e4c7" in mer
    dot = cli(dsn, "explain", bad, "--format", "dot").output
    assert dot.startswith("digraph pgdurable {")
    assert 'fillcolor="#f4a6a6"' in dot
    doc = cli_json(dsn, "explain", iid, "--format", "mermaid")
    assert doc["text"] == mer.rstrip("\n")
    assert [n["status"] for n in doc["graph"]["nodes"]] == ["completed"] * 3
    # a skipped arm reads as skipped
    cli(dsn, "start", "df.if(df.sql('select false'), 'select 1', 'select 2')", "--label", "if")
    ifid = cli_json(dsn, "list", "--label", "if")["instances"][0]["instance_id"]
    cli(dsn, "await", ifid)
    assert ":::skipped" in cli(dsn, "explain", ifid, "--format", "mermaid").output

    # errors: one line, exit code 1
    res = cli(dsn, "status", "00000000", ok=False)
    assert res.exit_code == 1
    assert "not found or access denied" in res.output
    res = cli(dsn, "start", "df.sql(", ok=False)
    assert res.exit_code == 1
    assert "Error:" in res.output


def test_explain_dry_run(db, tenant):
    dsn = db.dsn_as(tenant)
    expr = "df.sql('select 1') |=> 'a' ~> (df.sql('select 2') & df.sleep(5))"
    text = cli(dsn, "explain", "df.sql('select 1') |=> 'a' ~> df.sleep(5)").output
    assert text.startswith("Dry run (not started): 3 nodes")
    mer = cli(dsn, "explain", expr, "--format", "mermaid").output.splitlines()
    assert mer[:3] == ["%% dry run (not started)", "flowchart TD", '    n0(["THEN"])']
    assert "    n1[\"SQL: select 1 |=> 'a'\"]" in mer
    assert "    n2 -->|branch 2| n4" in mer
    assert not any(":::" in line for line in mer)  # no statuses in a dry run
    dot = cli(dsn, "explain", "select 42", "--format", "dot").output
    assert '"n0" [label="SQL: select 42"];' in dot
    res = cli(dsn, "explain", "df.loop(df.sql('select 1'))", "--format", "dot", ok=False)
    assert res.exit_code in (0, 1)  # valid or a clean one-line error, never a traceback


def test_top_once_and_metrics(db, running, tenant):
    dsn = db.dsn_as(tenant)
    ids = [
        cli(
            dsn, "start", "df.sql('select 1') ~> (df.sql('select 2') & df.sql('select 3'))"
        ).output.strip()
        for _ in range(5)
    ]
    bad = cli(dsn, "start", "'select 1/0'", "--label", "boom").output.strip()
    for iid in [*ids, bad]:
        cli(dsn, "await", iid, ok=iid != bad)

    # one frame of top, through the real entry point, as the admin (sees the workers)
    env = dict(os.environ, PGDURABLE_DSN=db.dsn)
    out = subprocess.run(
        [sys.executable, "-m", "pgdurable", "top", "--once", "--width", "100"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "instances  pending 0  running 0  completed 5  failed 1  cancelled 0  total 6" in out
    assert re.search(r"workers \([23]\)", out), out
    assert f"  {bad}  boom" in out
    assert "division by zero" in out
    state = cli_json(db.dsn, "top")
    assert state["counts"]["completed"] == 5
    assert state["steps_per_min"] >= 15

    # /metrics: counters move and agree with the database
    port = running.metrics_port
    m = scrape(port)
    # by default the port listens on this host only (--metrics-host)

    listening = {
        c.laddr
        for c in psutil.Process(running.proc.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", port)}, listening
    with db.connect() as conn:
        done_sql = conn.execute(
            "select count(*) from df.nodes where node_type = 'SQL' and status = 'completed'"
        ).fetchone()[0]
    assert done_sql == 15
    assert m['pgdurable_steps_completed_total{node_type="SQL"}'] >= done_sql
    assert m['pgdurable_steps_failed_total{node_type="SQL"}'] >= 1
    assert m['pgdurable_step_duration_seconds_count{node_type="SQL"}'] >= done_sql + 1
    # every step was taken by a claim, handed straight to the worker that checkpointed its
    # predecessor (ARCHITECTURE.md §7, hand-off) or run on its instance's start task (the
    # fused first step), plus one start task per instance
    assert (
        m["pgdurable_tasks_claimed_total"]
        + m["pgdurable_tasks_handed_off_total"]
        + m["pgdurable_steps_with_start_total"]
        >= done_sql + 6
    )
    assert m["pgdurable_steps_with_start_total"] >= 1
    assert m["pgdurable_claim_batch_size_count"] >= 1
    assert m["pgdurable_checkpoint_seconds_count"] >= done_sql
    assert m["pgdurable_queue_depth"] == 0
    assert "pgdurable_leases_rescued_total" in m
    assert m["pgdurable_worker_restarts_total"] == 0

    # a dead worker is re-forked and counted
    running.kill_worker()
    deadline = time.monotonic() + 30
    while scrape(port)["pgdurable_worker_restarts_total"] < 1:
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.2)  # polling the supervisor's restart (backoff 0.5 s)
    more = cli(dsn, "start", "'select 5'").output.strip()
    assert cli(dsn, "await", more).output.strip() == "completed"
    assert scrape(port)['pgdurable_steps_completed_total{node_type="SQL"}'] >= done_sql + 1


def test_explain_text_of_a_two_way_join(db, tenant):
    # regression: df._explain_render read the JSON null of a 2-way JOIN's extra nodes
    text = cli(db.dsn_as(tenant), "explain", "df.sql('select 2') & df.sleep(5)").output
    assert "JOIN (2)" in text
