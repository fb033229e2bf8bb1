"""Crash tests crash: kill -9 workers, the supervisor, restart PostgreSQL,
pause a worker past its lease, run two services — then every SQL step in the df
database must have run exactly once and no instance may be left unfinished."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

# slow: real kill -9s and PostgreSQL restarts (make test-fast leaves them out)
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

STEPS = 120
INSTANCES = 4


@pytest.fixture
def tenant(db):
    role = db.create_role("crash")
    with db.connect() as conn:
        conn.execute("create table public.ledger (instance text, k int)")
        conn.execute(f'grant all on public.ledger to "{role}"')
    return role


def chain(tag: str, steps: int = STEPS) -> str:
    """A THEN chain of `steps` SQL steps, each inserting one ledger row."""
    parts = [
        f"df.sql('insert into ledger values (''{tag}'' || ''{{sys_instance_id}}'', {k})')"
        for k in range(steps)
    ]
    return " ~> ".join(parts)


def start_many(db, role, n=INSTANCES, tag="c"):
    with db.connect(role) as conn:
        return [conn.execute(f"select df.start({chain(tag)})").fetchone()[0] for _ in range(n)]


def progress(db) -> int:
    with db.connect() as conn:
        return conn.execute("select count(*) from ledger").fetchone()[0]


def wait_progress(db, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while progress(db) < at_least:
        assert time.monotonic() < deadline, f"no progress past {progress(db)} rows"
        time.sleep(0.02)


def assert_exactly_once(db, ids, tag="c", timeout=180):
    deadline = time.monotonic() + timeout
    with db.connect() as conn:
        while True:
            statuses = dict(
                conn.execute(
                    "select id, status from df.instances where id = any(%s)", (ids,)
                ).fetchall()
            )
            if all(s in ("completed", "failed", "cancelled") for s in statuses.values()):
                break
            assert time.monotonic() < deadline, f"instances not finished: {statuses}"
            time.sleep(0.2)
        assert set(statuses.values()) == {"completed"}, statuses
        dup = conn.execute(
            "select instance, k, count(*) from ledger group by 1, 2 having count(*) <> 1"
        ).fetchall()
        assert dup == [], f"steps ran more than once: {dup[:10]}"
        for iid in ids:
            n = conn.execute(
                "select count(*) from ledger where instance = %s", (tag + iid,)
            ).fetchone()[0]
            assert n == STEPS, f"instance {iid} applied {n} of {STEPS} steps"
        stuck = conn.execute(
            "select count(*) from df.nodes where instance_id = any(%s) and "
            "status in ('pending', 'running')",
            (ids,),
        ).fetchone()[0]
        assert stuck == 0
        tasks = conn.execute(
            "select count(*) from pgdurable.tasks where instance_id = any(%s)", (ids,)
        ).fetchone()[0]
        assert tasks == 0


def test_kill_worker_mid_workflow(db, serve_factory, tenant):
    s = serve_factory(db)
    s.wait_workers(2)
    ids = start_many(db, tenant)
    total = STEPS * INSTANCES
    for frac in (0.15, 0.4, 0.7):
        wait_progress(db, int(total * frac))
        s.kill_worker()
    assert_exactly_once(db, ids)
    assert "restarting" in s.log()


def test_kill_supervisor_and_workers_then_restart(db, serve_factory, tenant):
    s = serve_factory(db)
    s.wait_workers(2)
    ids = start_many(db, tenant)
    wait_progress(db, STEPS)
    s.kill_all()
    s2 = serve_factory(db)
    s2.wait_workers(2)
    assert_exactly_once(db, ids)


def test_postgres_restart_mid_workflow(db, serve_factory, tenant):
    if db.server.embedded is None:
        pytest.skip("only the embedded server can be restarted by the tests")
    s = serve_factory(db)
    s.wait_workers(2)
    ids = start_many(db, tenant)
    wait_progress(db, STEPS)
    db.server.restart("immediate")
    assert_exactly_once(db, ids)
    assert s.proc.poll() is None, "serve died with the database restart"


def test_two_services_share_work(db, serve_factory, tenant):
    a = serve_factory(db)
    b = serve_factory(db)
    a.wait_workers(2)
    b.wait_workers(2)
    ids = start_many(db, tenant, n=6)
    assert_exactly_once(db, ids)
    with db.connect() as conn:
        hosts = conn.execute(
            "select count(distinct pid) from pgdurable.workers where kind = 'worker'"
        ).fetchone()[0]
    assert hosts >= 3


def test_paused_worker_cannot_write_stale_outcome(db, serve_factory, tenant):
    s = serve_factory(db, PGDURABLE_WORKERS="1", PGDURABLE_LEASE_SECONDS="2")
    s.wait_workers(1)
    helper = serve_factory(db, PGDURABLE_WORKERS="1", PGDURABLE_LEASE_SECONDS="2")
    helper.wait_workers(1)
    ids = start_many(db, tenant, n=2)
    wait_progress(db, 40)
    victim = random.choice(s.workers() + helper.workers())
    os.kill(victim, signal.SIGSTOP)
    try:
        time.sleep(6)  # past the 2 s lease: the other service rescues and re-runs its steps
    finally:
        os.kill(victim, signal.SIGCONT)
    assert_exactly_once(db, ids)
