"""A recurring job through a real serve, in real minutes: `* * * * *` fires in each of three
consecutive minutes, a failing run is followed by the next one, a serve restart neither loses
nor repeats a slot, and df.list_schedules() tells the truth about it.

Wall-clock minutes cost CI time, so this runs on the embedded PostgreSQL 18 only; the firing
rules (once per slot, missed slots, overlap, failures) are tested on every server, in seconds,
by tests/sql/test_schedules.py.
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta

import pytest

# slow: waits for real minute boundaries (make test-fast leaves them out)
pytestmark = [pytest.mark.timeout(330), pytest.mark.slow]

# fails in even minutes (division by zero), completes in odd ones
GRAPH = "df.sql('select 1 / (extract(minute from now())::int % 2) as ok')"


def test_every_minute_job_fires_each_minute_across_a_restart(db, serve_factory):
    if db.server.name != "pg18":
        pytest.skip("real minutes: run on one server (tests/sql/test_schedules.py covers all)")
    role = db.create_role("cronjob")
    with db.connect(role) as conn:
        conn.execute(f"select df.schedule('tick', '* * * * *', {GRAPH})")
        serve = serve_factory(db)

        def runs():
            return conn.execute(
                "select id, status, created_at from df.instances where label = 'tick' "
                "order by created_at"
            ).fetchall()

        def wait_runs(n: int, timeout: float) -> list[tuple[str, str, datetime]]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                got = runs()
                if len(got) >= n and all(s in ("completed", "failed") for _, s, _ in got[:n]):
                    return got
                time.sleep(0.5)
            raise AssertionError(f"{len(runs())} runs after {timeout}s: {runs()}\n{serve.log()}")

        # the next slot is shown before it fires
        deadline = time.monotonic() + 10
        while conn.execute("select next_run_at from df.list_schedules()").fetchone()[0] is None:
            assert time.monotonic() < deadline, serve.log()
            time.sleep(0.2)
        now = datetime.now(UTC)
        shown = conn.execute("select next_run_at from df.list_schedules()").fetchone()[0]
        assert shown == (now + timedelta(minutes=1)).replace(second=0, microsecond=0)

        wait_runs(1, 75)
        serve.stop()  # a restart between two slots
        serve = serve_factory(db)
        got = wait_runs(3, 150)
        time.sleep(2)  # a duplicate firing of the last slot would show now
        got = runs()
        minutes = [c.astimezone(UTC).replace(second=0, microsecond=0) for _, _, c in got]
        assert len(set(minutes)) == len(minutes), f"a slot fired twice: {got}"
        assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(minutes)), got
        for (_, status, _), minute in zip(got, minutes, strict=True):
            assert status == ("failed" if minute.minute % 2 == 0 else "completed"), got
        assert any(s == "failed" for _, s, _ in got[:-1]), "no failing run was followed by one"

        row = conn.execute(
            "select runs, failures, last_instance_id, last_status, next_run_at, "
            "enabled from df.list_schedules()"
        ).fetchone()
        runs_n, failures, last_id, last_status, nxt, enabled = row
        assert enabled is True
        assert runs_n == len(got)
        assert failures == sum(s == "failed" for _, s, _ in got)
        assert (last_id, last_status) == (got[-1][0], got[-1][1])
        assert nxt == minutes[-1] + timedelta(minutes=1) or nxt > datetime.now(UTC)
        conn.execute("select df.unschedule('tick')")
