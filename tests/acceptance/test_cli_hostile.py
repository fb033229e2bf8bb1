"""Tenants' text against an operator's terminal and the service log, with a real `serve`.

- the serve log (text format): a step error carrying a newline, CR and terminal escapes is
  logged escaped on its own line: no forged log line, no ESC byte; a URL password is masked;
- the CLI (`python -m pgdurable`, a subprocess as an operator runs it): labels, results,
  queries and errors carrying a newline, ESC[2K, OSC 0 (window title) and OSC 52 (clipboard
  write) are shown escaped by `list`, `top --once`, `explain`, `result`, `error`, one row per
  instance, with no raw control byte on stdout. `--json` stays exact JSON of the raw values.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import psycopg
import pytest

from pgdurable.sanitize import visible

pytestmark = pytest.mark.timeout(180)

ESC = "\x1b"
FAKE = "2026-01-01 00:00:00,000 info pgdurable pid=1: fake"
# the payload: a forged log line and an erase-line, raised by a tenant's step
RAISE = (
    "do $$ begin raise exception E'x\\n2026-01-01 00:00:00,000 info pgdurable pid=1: "
    "fake\\x1b[2K'; end $$"
)
# a label that adds a fake `completed` row, erases the real one, sets the window title and
# writes the clipboard; plus an 8-bit CSI and a bidi override
LABEL = (
    "evil\n00000000  completed  1      2026-01-01 00:00:00  2026-01-01 00:00:00  fake"
    + ESC
    + "[2K"
    + ESC
    + "]0;pwned-title\x07"
    + ESC
    + "]52;c;cm0gLXJmIH4=\x07"
    + "\x9b31m\u202eflipped"
)
# what may never reach a terminal raw (stdout keeps its own line breaks only)
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
ROW = re.compile(r"^[0-9a-f]{8}  ")


def run_cli(dsn: str, *args: str) -> str:
    env = dict(os.environ, PGDURABLE_DSN=dsn)
    res = subprocess.run(
        [sys.executable, "-m", "pgdurable", *args], env=env, capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    out = res.stdout.decode("utf-8")  # strict: the output is valid UTF-8 too
    assert RAW.search(out) is None, (args, out)
    assert ESC.encode() not in res.stdout
    return out


def start(conn: psycopg.Connection, expr: str, label: str | None, *params: object) -> str:
    return conn.execute(f"select df.start({expr}, %s)", (*params, label)).fetchone()[0]


def await_(conn: psycopg.Connection, iid: str) -> str:
    return conn.execute("select df.await_instance(%s, 60)", (iid,)).fetchone()[0]


def test_step_error_cannot_forge_serve_log_lines(db, serve_factory):
    tenant = db.create_role("hostile", http=True)
    serve = serve_factory(db)
    serve.wait_workers(2)
    with db.connect(tenant) as conn:
        bad = start(conn, "%s", None, RAISE)
        # a URL httpx cannot parse, with a password in its userinfo
        url = start(conn, "df.http('http://alice:hunter2@[::1/x')", "url")
        assert await_(conn, bad) == "failed"
        assert await_(conn, url) == "failed"
        err = conn.execute("select df.error(%s)", (bad,)).fetchone()[0]
    assert FAKE in err["error"]  # the tenant's own error, exact
    assert serve.log_path is not None
    deadline = time.monotonic() + 10
    while True:  # the worker logs the failure around its checkpoint: wait for the line
        raw = serve.log_path.read_bytes()
        if b"fake\\u001b[2K" in raw or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    text = raw.decode("utf-8", errors="replace")
    assert "x\\n" + FAKE + "\\u001b[2K" in text, text[-4000:]
    assert not any(line.startswith(FAKE[:23]) for line in text.splitlines()), text[-4000:]
    assert b"\x1b" not in raw
    assert b"\r" not in raw
    assert "@[::1/x" in text, text[-4000:]  # the URL's failure was logged, without its password
    assert "hunter2" not in text, text[-4000:]


def test_cli_shows_tenant_text_escaped(db, serve_factory):
    tenant = db.create_role("hostile")
    serve = serve_factory(db)
    serve.wait_workers(2)
    value = LABEL  # the same payload as a result and an error
    with db.connect(tenant) as conn:
        done = start(
            conn, "df.sql('select ' || quote_literal(%s::text) || ' as x') |=> 'r'", LABEL, value
        )
        failed = start(
            conn, "format('do $b$ begin raise exception %%L; end $b$', %s::text)", LABEL, value
        )
        waiting = start(conn, "df.wait_for_signal(%s)", LABEL, "go" + ESC + "]0;sig\x07\nx")
        assert await_(conn, done) == "completed"
        assert await_(conn, failed) == "failed"
        deadline = time.monotonic() + 30
        while (
            conn.execute("select status from df.instances where id = %s", (waiting,)).fetchone()[0]
            != "running"
        ):
            assert time.monotonic() < deadline, serve.log()
            time.sleep(0.1)
    dsn = db.dsn_as(tenant)
    shown = visible(LABEL)

    # list: a header and one row per instance, the label escaped
    lines = run_cli(dsn, "list").rstrip("\n").split("\n")
    assert len(lines) == 4, lines
    assert all(ROW.match(line) for line in lines[1:]), lines
    assert sum(line.rstrip().endswith(shown) for line in lines[1:]) == 3
    # --json: exact values
    data = json.loads(run_cli(dsn, "list", "--json"))
    assert [i["label"] for i in data["instances"]] == [LABEL] * 3

    # result: the JSON text, still JSON of the same value
    out = run_cli(dsn, "result", done)
    result = json.loads(run_cli(dsn, "result", done, "--json"))["result"]
    assert result["rows"] == [{"x": value}]
    assert json.loads(out) == result

    # error: one line, the message escaped
    out = run_cli(dsn, "error", failed)
    assert len(out.rstrip("\n").split("\n")) == 1
    assert json.loads(out)["error"] == value

    # explain: the tree and the output line, tenants' text escaped; one line per node
    out = run_cli(dsn, "explain", done)
    lines = out.rstrip("\n").split("\n")
    assert lines[:3] == [
        f"Instance: {done}",
        "Status: completed",
        "Output: " + visible(json.dumps(result, ensure_ascii=False)),
    ]
    assert json.loads(lines[2].removeprefix("Output: ")) == result
    assert len(lines) == 5, lines
    assert lines[4].startswith("✓ SQL: select "), lines
    assert "\\u001b]52;c;" in lines[4], lines
    out = run_cli(dsn, "explain", waiting)
    assert "SIGNAL 'go\\u001b]0;sig\\u0007\\nx'" in out
    for fmt in ("mermaid", "dot"):
        run_cli(dsn, "explain", waiting, "--format", fmt)

    assert run_cli(dsn, "status", waiting).strip() == "running"

    # top --once as the admin: one row per failure and per in-flight step
    out = run_cli(db.dsn, "top", "--once", "--width", "400")
    frame = out.rstrip("\n").split("\n")
    fail_at = frame.index("recent failures (1)")
    assert frame[fail_at + 1].startswith(f"  {failed}  ")
    assert frame[fail_at + 2] == "", frame  # one row for the failure, then the next section
    assert frame[fail_at + 3] == "next scheduled runs (0)", frame
    inflight_at = next(i for i, line in enumerate(frame) if line.startswith("in-flight steps"))
    assert frame[inflight_at] == "in-flight steps (1)", frame
    assert frame[inflight_at + 2].startswith(f"  {waiting}  ")
    assert frame[inflight_at + 3] == "", frame
    assert not any(line.startswith("00000000") for line in frame)
    state = json.loads(run_cli(db.dsn, "top", "--json"))
    assert state["failures"][0]["label"] == LABEL
