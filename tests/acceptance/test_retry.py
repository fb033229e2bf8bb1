"""df.retry end to end through `pgdurable serve` (docs/retry.md).

A step that must fail a few times first counts its attempts with a sequence (``nextval`` is
not rolled back with the failed step's transaction) and records its side effect in
``public.hits`` (one row per committed run): a failed SQL step rolled back, so a retried
step's effect is there exactly once. One database and one serve per PostgreSQL server for
the module; the crash test kills that serve and starts it again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from pgdurable.harness import HttpRecorder, Reply, Request
from tests import fix_db
from tests.acceptance.conftest import Env, module_env
from tests.acceptance.test_http import BASE_ENV
from tests.acceptance.test_restart import admin, hits, start, wait_status
from tests.fix_db import Server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    def make_role(tdb: fix_db.TestDB) -> str:
        role = tdb.create_role("rty", http=True)
        with tdb.connect() as conn:
            conn.execute("create table public.hits (tag text not null)")
            conn.execute(f'grant select, insert on public.hits to "{role}"')
        return role

    with module_env(server, tmp_path_factory.mktemp("serve"), BASE_ENV, make_role) as e:
        yield e


def counter(env: Env, name: str) -> str:
    """A sequence the role may advance: how many times a step ran, committed or not."""
    seq = f"public.{name}"
    admin(env, f"create sequence {seq}", f'grant usage on sequence {seq} to "{env.role}"')
    return seq


def flaky(seq: str, tag: str, fail_until: int) -> str:
    """A SQL step that fails (division by zero) on its runs before run ``fail_until``, then
    records ``tag`` in public.hits."""
    return (
        f"df.sql('insert into public.hits select ''{tag}'' where 1 / (case when "
        f"nextval(''{seq}'') < {fail_until} then 0 else 1 end) = 1')"
    )


def ran(env: Env, seq: str) -> int:
    with env.db.connect() as conn:
        row = conn.execute(f"select last_value, is_called from {seq}").fetchone()
    return int(row[0]) if row[1] else 0


def node_details(env: Env, iid: str, node_type: str) -> list[dict[str, object]]:
    with env.db.connect(env.role) as conn:
        rows = conn.execute(
            "select status_details from df.instance_nodes(%s) where node_type = %s",
            (iid, node_type),
        ).fetchall()
    return [json.loads(r[0]) if r[0] else {} for r in rows]


def test_fails_twice_then_succeeds(env: Env) -> None:
    seq = counter(env, "c_ok")
    iid = start(env, f"df.retry({flaky(seq, 'ok:x', 3)}, 5, 0.2, 2)")
    assert wait_status(env, iid) == "completed"
    assert ran(env, seq) == 3  # three attempts ran the statement
    assert hits(env, "ok:") == {"ok:x": 1}  # the two failed ones rolled back
    (d,) = node_details(env, iid, "RETRY")
    assert d["attempt"] == 3
    assert d["max_attempts"] == 5
    assert "division by zero" in str(d["last_error"])
    with env.db.connect(env.role) as conn:
        text = conn.execute("select df.explain(%s)", (iid,)).fetchone()[0]
    assert "✓ RETRY (attempt 3/5, last error: division by zero" in text, text


def test_exhaustion_names_the_step_and_the_attempts(env: Env) -> None:
    seq = counter(env, "c_never")
    iid = start(env, f"df.retry({flaky(seq, 'never:x', 1000)}, 3, 0.1, 1)")
    assert wait_status(env, iid) == "failed"
    assert ran(env, seq) == 3
    assert hits(env, "never:") == {}
    with env.db.connect(env.role) as conn:
        err = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
        step = conn.execute(
            "select id from df.nodes where instance_id = %s and node_type = 'SQL'", (iid,)
        ).fetchone()[0]
    assert err["node_type"] == "RETRY"
    assert err["sqlstate"] == "22012"
    assert err["error"].startswith(f"df.retry gave up after 3 attempts: step {step} (SQL) failed:")
    assert "division by zero" in err["error"]


def test_retry_around_a_subgraph_resets_its_nodes(env: Env) -> None:
    """The whole THEN runs again: its first step (which succeeded) too, its second until it
    succeeds; what follows the RETRY runs once."""
    seq = counter(env, "c_sub")
    iid = start(
        env,
        "df.retry(df.sql('insert into public.hits values (''sub:a'')') ~> "
        f"{flaky(seq, 'sub:b', 2)}, 3, 0.1) ~> df.sql('insert into public.hits values (''sub:c'')')",
    )
    assert wait_status(env, iid) == "completed"
    assert hits(env, "sub:") == {"sub:a": 2, "sub:b": 1, "sub:c": 1}
    gens = sorted(int(str(d["gen"])) for d in node_details(env, iid, "SQL"))
    assert gens == [1, 2, 2]  # the THEN's two steps ran twice, the last step once
    # the RETRY's THEN ran twice, the one after it once
    assert sorted(int(str(d["gen"])) for d in node_details(env, iid, "THEN")) == [1, 2]


def test_a_crash_during_the_delay_loses_nothing(env: Env) -> None:
    """Every process of serve is killed while the RETRY waits (its delay a stored due time);
    a new serve runs the next attempt, and the instance completes."""
    seq = counter(env, "c_crash")
    iid = start(env, f"df.retry({flaky(seq, 'crash:x', 2)}, 3, 4, 1)")
    deadline = time.monotonic() + 30
    while True:
        (d,) = node_details(env, iid, "RETRY")
        if d.get("next_attempt_at"):
            break
        assert time.monotonic() < deadline, "the RETRY never waited"
        time.sleep(0.05)
    env.serve.kill_all()
    with env.db.connect() as conn:
        task = conn.execute(
            "select t.kind, t.due_at > now() from pgdurable.tasks t "
            "join df.nodes n on n.instance_id = t.instance_id and n.id = t.node_id "
            "where t.instance_id = %s and n.node_type = 'RETRY'",
            (iid,),
        ).fetchone()
    assert task == ("timer", True)
    assert ran(env, seq) == 1
    env.serve.start()
    env.serve.wait_workers(2)
    assert wait_status(env, iid) == "completed"
    assert ran(env, seq) == 2
    assert hits(env, "crash:") == {"crash:x": 1}


class Flaky(HttpRecorder):
    """503 for the first two requests (the first with Retry-After: 2), then 200."""

    def answer(self, handler: BaseHTTPRequestHandler, req: Request) -> Reply | None:
        n = len(self.hits("/flaky"))
        if n == 1:
            return Reply(503, b"busy", "text/plain", [("Retry-After", "2")])
        if n == 2:
            return Reply(503, b"busy", "text/plain")
        return Reply(200, b'{"done": true}')


def test_http_keeps_its_idempotency_key_and_honours_retry_after(env: Env) -> None:
    with Flaky() as srv:
        iid = start(env, f"df.retry(df.http('{srv.url}/flaky', 'POST', '{{}}'), 4, 0.1, 1)")
        assert wait_status(env, iid) == "completed"
        reqs = srv.hits("/flaky")
    assert len(reqs) == 3
    keys = {r.idempotency_key for r in reqs}
    assert len(keys) == 1
    (key,) = keys
    with env.db.connect(env.role) as conn:
        step = conn.execute(
            "select id from df.nodes where instance_id = %s and node_type = 'HTTP'", (iid,)
        ).fetchone()[0]
    assert key == f"pgdurable-{iid}-{step}"
    # the first 503 asked for 2 s: the second attempt waited that long, not the 0.1 s delay;
    # the second 503 asked nothing: the third came after the short delay
    assert reqs[1].at - reqs[0].at >= 1.9
    assert reqs[2].at - reqs[1].at < 1.9


class FirstFails(HttpRecorder):
    """503 for the first request, then 200."""

    def answer(self, handler: BaseHTTPRequestHandler, req: Request) -> Reply | None:
        if len(self.hits("/")) == 1:
            return Reply(503, b"busy", "text/plain")
        return Reply(200, b'{"done": true}')


def test_http_key_is_new_per_loop_iteration_and_kept_per_attempt(env: Env) -> None:
    """In a loop, each iteration's request is a new logical call (a new key from the second
    iteration on); a df.retry attempt inside one iteration repeats that iteration's key."""
    seq = counter(env, "c_loop")
    with FirstFails() as srv:
        iid = start(
            env,
            f"df.loop(df.retry(df.http('{srv.url}/it', 'POST', '{{}}'), 3, 0.1), "
            f"df.sql('select nextval(''{seq}'') < 3'))",
        )
        assert wait_status(env, iid) == "completed"
        reqs = srv.hits("/it")
    with env.db.connect(env.role) as conn:
        step = conn.execute(
            "select id from df.nodes where instance_id = %s and node_type = 'HTTP'", (iid,)
        ).fetchone()[0]
    base = f"pgdurable-{iid}-{step}"
    assert [r.idempotency_key for r in reqs] == [base, base, f"{base}-2", f"{base}-3"]


def test_restart_of_an_exhausted_retry_starts_its_attempts_afresh(env: Env) -> None:
    """df.restart of an instance whose df.retry gave up: the step before it is not run again,
    the RETRY counts attempts from 1 again and its step runs until it succeeds."""
    seq = counter(env, "c_rst")
    iid = start(
        env,
        "df.sql('insert into public.hits values (''rs:a'')') ~> "
        f"df.retry({flaky(seq, 'rs:b', 4)}, 2, 0.1)",
    )
    assert wait_status(env, iid) == "failed"
    assert ran(env, seq) == 2
    with env.db.connect(env.role) as conn:
        assert conn.execute("select df.restart(%s)", (iid,)).fetchone()[0] == iid
        (d,) = [
            json.loads(r[0])
            for r in conn.execute(
                "select status_details from df.instance_nodes(%s) where node_type = 'RETRY'",
                (iid,),
            ).fetchall()
        ]
    assert d["attempt"] == 1
    assert wait_status(env, iid) == "completed"
    assert ran(env, seq) == 4  # attempts 1 and 2 of the second run
    assert hits(env, "rs:") == {"rs:a": 1, "rs:b": 1}
    (d,) = node_details(env, iid, "RETRY")
    assert d["attempt"] == 2


def test_cancel_while_waiting_then_restart(env: Env) -> None:
    """df.cancel while a RETRY waits drops its timer and ends every node; df.restart runs the
    step again at once (attempt 1 of a new run)."""
    seq = counter(env, "c_cxl")
    iid = start(env, f"df.retry({flaky(seq, 'cx:x', 2)}, 3, 600)")
    deadline = time.monotonic() + 30
    while not node_details(env, iid, "RETRY")[0].get("next_attempt_at"):
        assert time.monotonic() < deadline, "the RETRY never waited"
        time.sleep(0.05)
    with env.db.connect(env.role) as conn:
        conn.execute("select df.cancel(%s, 'enough')", (iid,))
    assert wait_status(env, iid) == "cancelled"
    with env.db.connect() as conn:
        left = conn.execute(
            "select count(*) from pgdurable.tasks where instance_id = %s", (iid,)
        ).fetchone()[0]
        running = conn.execute(
            "select count(*) from df.nodes where instance_id = %s and status = 'running'", (iid,)
        ).fetchone()[0]
    assert (left, running) == (0, 0)
    with env.db.connect(env.role) as conn:
        conn.execute("select df.restart(%s)", (iid,))
    assert wait_status(env, iid) == "completed"
    assert ran(env, seq) == 2
    assert hits(env, "cx:") == {"cx:x": 1}


class RateLimited(HttpRecorder):
    """429 with Retry-After: 2 for the first request, then 200."""

    def answer(self, handler: BaseHTTPRequestHandler, req: Request) -> Reply | None:
        if len(self.hits("/")) == 1:
            return Reply(429, b"slow down", "text/plain", [("Retry-After", "2")])
        return Reply(200, b'{"done": true}')


def test_429_inside_a_retry_waits_for_retry_after(env: Env) -> None:
    """Inside a df.retry a 429 is a failure repeated after its Retry-After; outside one it
    stays the step's result (ok false), as every 4xx."""
    with RateLimited() as srv:
        iid = start(env, f"df.retry(df.http('{srv.url}/rl', 'GET'), 3, 0.1, 1)")
        assert wait_status(env, iid) == "completed"
        reqs = srv.hits("/rl")
        assert len(reqs) == 2
        assert reqs[1].at - reqs[0].at >= 1.9
        srv.clear()
        plain = start(env, f"df.http('{srv.url}/plain', 'GET')")
        assert wait_status(env, plain) == "completed"
    with env.db.connect(env.role) as conn:
        out = conn.execute("select df.result(%s)", (plain,)).fetchone()[0]
    out = out if isinstance(out, dict) else json.loads(out)
    assert out["status"] == 429
    assert out["ok"] is False
