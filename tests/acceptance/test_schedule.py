"""End-to-end df.wait_for_schedule through `pgdurable serve` with a controlled clock.

The engine clock is ``pgdurable.clock()`` = now() + ``pg_durable.clock_offset``. The test sets
the offset (ALTER DATABASE, before serve starts: sessions read it at connect) so that the
clock sits a few seconds before a minute boundary M; cron ticks at M then arrive within
seconds instead of up to a minute.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests import fix_db
from tests.acceptance.test_http import BASE_ENV, finish, start
from tests.acceptance.test_signals import wait_running

pytestmark = pytest.mark.timeout(120)

LEAD = 7.0  # seconds between setting the clock and the boundary: covers serve's start-up


def _clock(db: fix_db.TestDB) -> datetime:
    with db.connect() as conn:
        # cron is UTC (D7): compute the expected tick in UTC whatever the session TimeZone
        return conn.execute("select pgdurable.clock()").fetchone()[0].astimezone(UTC)


def _next_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0) + timedelta(minutes=1)


def test_cron_fires_at_the_boundary_standard_weekdays_durable_across_restart(
    db: fix_db.TestDB, serve_factory: Any
) -> None:
    with db.connect() as conn:
        now = conn.execute("select now()").fetchone()[0]
        boundary = _next_minute(now + timedelta(seconds=LEAD))
        offset = (boundary - timedelta(seconds=LEAD) - now).total_seconds()
        assert 0 <= offset < 61
        # non-negative: tasks enqueued at now() must stay due on the shifted clock
        conn.execute(
            f"alter database {db.name} set pg_durable.clock_offset = '{offset:.3f} seconds'"
        )
    role = db.create_role("cron")
    s = serve_factory(db, **BASE_ENV)
    s.wait_workers(2)
    clock = _clock(db)
    m = _next_minute(clock)
    assert (m - clock).total_seconds() < 60
    dow = m.isoweekday() % 7  # standard cron: 0 = Sunday … 6 = Saturday
    probe = "df.sql('select pgdurable.clock() as t')"
    ids = {
        "every": start(db, role, f"df.wait_for_schedule('* * * * *') ~> {probe}"),
        "dow": start(db, role, f"df.wait_for_schedule('{m.minute} {m.hour} * * {dow}') ~> {probe}"),
        "other_day": start(
            db, role, f"df.wait_for_schedule('{m.minute} {m.hour} * * {(dow + 1) % 7}') ~> {probe}"
        ),
        "named": start(db, role, f"df.wait_for_schedule('* * * * {m.strftime('%a').upper()}')"),
    }
    for iid in ids.values():
        wait_running(db, iid, "WAIT_SCHEDULE")
    with db.connect() as conn:
        due = dict(
            conn.execute(
                "select instance_id, due_at from pgdurable.tasks where "
                "instance_id = any(%s) and kind = 'timer'",
                (list(ids.values()),),
            ).fetchall()
        )
    assert due[ids["every"]] == m
    assert due[ids["dow"]] == m
    assert due[ids["named"]] == m
    assert due[ids["other_day"]] >= m + timedelta(days=1)  # not today: 0-6 = Sun-Sat
    # durable timers: a fresh serve (the old one stopped) fires them
    assert s.stop() == 0
    s2 = serve_factory(db, **BASE_ENV)
    s2.wait_workers(2)
    t0 = time.monotonic()
    for key in ("every", "dow", "named"):
        status, res, err = finish(db, role, ids[key], timeout=30)
        assert status == "completed", (key, err)
        if key == "named":
            assert res == {"scheduled": True}
            continue
        fired = datetime.fromisoformat(res["rows"][0]["t"])
        assert m <= fired < m + timedelta(seconds=10), (key, fired, m)
    assert time.monotonic() - t0 < 20
    with db.connect(role) as conn:
        assert conn.execute("select df.status(%s)", (ids["other_day"],)).fetchone()[0] == "running"
        conn.execute("select df.cancel(%s)", (ids["other_day"],))
    with db.connect() as conn:
        node = conn.execute(
            "select result from df.nodes where instance_id = %s and node_type = 'WAIT_SCHEDULE'",
            (ids["every"],),
        ).fetchone()[0]
    assert node == {"scheduled": True}
