"""README's five-minute tour, executed statement by statement after `pgdurable demo`.

The statements come from README.md itself (the first ``sql`` block under "A five-minute
tour"), so the tour cannot drift from what is tested. The set-up is the demo's: `pgdurable
demo` (a subprocess, as `make demo` runs it) makes the tour's role and tables; then a real
`serve` runs the steps and the role types the tour. A person types slower than a test: before
reading an instance's result (df.result / df.error / df.explain) the test waits for the
instance to finish, as the tour's reader would have.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.timeout(240)

README = Path(__file__).resolve().parents[2] / "README.md"
ID = re.compile(r"^[0-9a-f]{8}$")


def tour_statements() -> list[tuple[str, str]]:
    """(statement, the comment after it) of the tour's SQL block, in order."""
    text = README.read_text()
    section = text[text.index("## A five-minute tour") :]
    block = section[section.index("```sql\n") + 7 :]
    block = block[: block.index("```")]
    out: list[tuple[str, str]] = []
    current: list[str] = []
    for line in block.splitlines():
        code, _, comment = line.partition("--")
        if not current and not code.strip():
            continue  # a comment-only line between statements
        current.append(code)
        if code.rstrip().endswith(";"):
            out.append(("\n".join(current).strip(), comment.strip()))
            current = []
    assert not current, f"unterminated statement in the tour: {current}"
    return out


def test_the_tour_reads_as_statements():
    stmts = [s for s, _ in tour_statements()]
    assert len(stmts) >= 10
    assert all(re.match(r"select (df\.|.* from df\.)", s, re.S) for s in stmts), stmts


def test_tour_runs_as_written(db, serve_factory):
    role = f"tour_{uuid.uuid4().hex[:8]}"
    db.roles.append(role)
    demo = subprocess.run(
        [sys.executable, "-m", "pgdurable", "demo", "--dsn", db.install_dsn, "--role", role],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "completed" in demo.stdout
    role_dsn = db.dsn_as(role)
    # the demo tells the newcomer how to go on: the service, and the role's DSN
    assert "make serve" in demo.stdout
    assert f"user={role}" in demo.stdout or f"{role}@" in demo.stdout, demo.stdout
    with db.connect() as admin:
        assert admin.execute(
            "select rolsuper from pg_roles where rolname = %s", (role,)
        ).fetchone() == (False,)

    serve_factory(db)
    started: list[str] = []
    with psycopg.connect(role_dsn, autocommit=True) as conn:

        def one(query: str, *args: object) -> object:
            row = conn.execute(query.encode(), args or None).fetchone()
            assert row is not None
            return row[0]

        def finish(iid: str) -> str:
            return str(one("select df.await_instance(%s, 60)", iid))

        for stmt, comment in tour_statements():
            if "'3fa9c2d1'" in stmt:
                iid = started[0]
                if not stmt.startswith("select df.status"):
                    assert finish(iid) == "completed", one("select df.error(%s)::text", iid)
                stmt = stmt.replace("'3fa9c2d1'", f"'{iid}'")
            if "'<id>'" in stmt:
                stmt = stmt.replace("'<id>'", f"'{started[-1]}'")
            got = one(stmt)
            if isinstance(got, str) and got[:1] in "{[":
                got = json.loads(got)  # df.result returns JSON as text, as pg_durable's does
            fn = re.search(r"(df\.\w+)", stmt).group(1)  # type: ignore[union-attr]
            if fn == "df.start":
                assert isinstance(got, str), (stmt, got)
                assert ID.match(got), (stmt, got)
                started.append(got)
            elif fn == "df.status":
                allowed = {w.strip() for w in comment.removeprefix(">").split("|")}
                assert got in allowed, (got, allowed)
            elif fn == "df.result":
                claim = json.loads(re.sub(r"\[\.\.\.\]", "null", comment.removeprefix(">")))
                assert isinstance(got, dict), got
                assert got["row_count"] == claim["row_count"], got
                assert len(got["rows"]) == claim["row_count"]
                assert list(got) == list(claim) or set(got) >= set(claim), (got.keys(), claim)
            elif fn == "df.error":
                assert got is None, got  # "if failed": this one completed
            elif fn == "df.await_instance":
                assert got == "completed"
            elif fn == "df.explain":
                assert "✓" in str(got), got
                assert "✗" not in str(got), got
            elif fn == "df.schedule":
                assert got == "nightly"
            elif fn == "df.list_schedules":
                # the next slot is the workers' to compute: a serve does within seconds
                deadline = time.monotonic() + 15
                while conn.execute(stmt.rstrip(";").encode()).fetchone()[1] is None:
                    assert time.monotonic() < deadline, "no worker computed the next run"
                    time.sleep(0.2)
                name, nxt, last = conn.execute(stmt.rstrip(";").encode()).fetchone()
                assert (name, last) == ("nightly", None)
                assert (nxt.astimezone(UTC).hour, nxt.minute) == (3, 0)
                assert nxt - datetime.now(UTC) <= timedelta(days=1)

        assert len(started) == 5, started
        _first, approval, drain, race, keyed = started
        # the approval wait consumed the signal and the update ran
        assert finish(approval) == "completed", one("select df.error(%s)::text", approval)
        assert one("select count(*) from orders where status = 'approved'") == 100
        assert one("select count(*) from orders where status = 'queued'") == 0
        # the loop drained the queue, 100 rows at a time, and broke with its value
        assert finish(drain) == "completed", one("select df.error(%s)::text", drain)
        assert json.loads(str(one("select df.result(%s)", drain))) == {"drained": True}
        assert one("select count(*) from queue") == 0
        # the race: the select beat the 10 s sleep
        assert finish(race) == "completed"
        assert json.loads(str(one("select df.result(%s)", race)))["rows"] == [{"?column?": 1}]
        one("select df.unschedule('nightly')")
        # the keyed start: the same statement again starts nothing and answers the same id
        again = next(st for st, _ in tour_statements() if "idempotency_key" in st)
        assert one(again) == keyed
        assert finish(keyed) == "completed"
