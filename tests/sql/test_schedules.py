"""Recurring jobs (60_schedules.sql) and the worker's firing of them (pgdurable/worker/
schedules.py), against a real database, in-process: the jobs' API as tenants, the firing as
pgdurable_service (what serve logs in as). No serve runs here, so a started instance stays
pending: that is what the overlap rules look at.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pgdurable.worker import schedules
from tests.fix_sql import one

GRAPH = "df.sql('select 1')"


def jobs(conn):
    cur = conn.execute("select * from df.list_schedules()")
    names = [d.name for d in cur.description]
    return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def tick(db) -> int:
    async def go() -> int:
        async with await psycopg.AsyncConnection.connect(db.service_dsn, autocommit=True) as c:
            return await schedules.tick(c, "pgdurable")

    return asyncio.run(go())


def due_now(db, role, name, ago=timedelta(seconds=1)):
    """Move a job's slot into the past, as time passing (or downtime) would."""
    with db.connect() as admin:
        admin.execute(
            "update pgdurable.schedules set next_run_at = now() - %s "
            "where role = %s::regrole and name = %s",
            (ago, role, name),
        )


def instances(conn, label):
    return conn.execute(
        "select id, status from df.instances where label = %s order by created_at", (label,)
    ).fetchall()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("", "* * * * *", GRAPH), "a schedule needs a name"),
        (("x" * 201, "* * * * *", GRAPH), "schedule name is too long"),
        (("j", "0 3 31 2 *", GRAPH), r"invalid cron expression '0 3 31 2 \*': it never fires"),
        (("j", "61 * * * *", GRAPH), "invalid cron expression"),
        (("j", "* * * * *", GRAPH, "sometimes"), "invalid overlap 'sometimes'"),
        (("j", "* * * * *", "df.if('x')"), "function df.if"),
        (("j", None, GRAPH), "cron must not be NULL"),
    ],
)
def test_schedule_rejects_bad_input(db, args, match):
    role = db.create_role("sj")
    name, cron, graph, *rest = args
    with db.connect(role) as conn:
        with pytest.raises(psycopg.Error, match=match):
            conn.execute(
                f"select df.schedule(%s, %s, {graph}{', %s' if rest else ''})", (name, cron, *rest)
            )
        assert jobs(conn) == {}


def test_superuser_jobs_are_refused_like_superuser_starts(db):
    with (
        db.connect() as admin,
        pytest.raises(  # the cluster's superuser
            psycopg.Error, match="cannot submit durable functions"
        ),
    ):
        admin.execute(f"select df.schedule('nightly', '0 3 * * *', {GRAPH})")


def test_create_replace_pause_resume_unschedule_and_privacy(db):
    alice, bob = db.create_role("sa"), db.create_role("sb")
    with db.connect(alice) as a, db.connect(bob) as b:
        assert one(a, f"select df.schedule('nightly', '0 3 * * *', {GRAPH})") == "nightly"
        row = jobs(a)["nightly"]
        assert (
            row["cron"],
            row["enabled"],
            row["overlap"],
            row["runs"],
            row["failures"],
            row["owner"],
        ) == ("0 3 * * *", True, "skip", 0, 0, alice)
        # the worker computes the next slot: 03:00 UTC after now
        tick(db)
        nxt = jobs(a)["nightly"]["next_run_at"]
        now = datetime.now(UTC)
        assert now < nxt <= now + timedelta(days=1)
        assert (nxt.astimezone(UTC).hour, nxt.minute, nxt.second) == (3, 0, 0)
        # replace: new cron and overlap, slot recomputed
        one(a, f"select df.schedule('nightly', '30 * * * *', {GRAPH}, 'allow')")
        row = jobs(a)["nightly"]
        assert (row["cron"], row["overlap"], row["next_run_at"]) == ("30 * * * *", "allow", None)
        tick(db)
        assert jobs(a)["nightly"]["next_run_at"].minute == 30
        # another role neither sees nor touches it; it may use the same name for its own
        assert jobs(b) == {}
        assert one(b, "select df.unschedule('nightly')") is False
        assert one(b, "select df.pause_schedule('nightly')") is False
        one(b, f"select df.schedule('nightly', '0 4 * * *', {GRAPH})")
        assert jobs(a)["nightly"]["cron"] == "30 * * * *"
        assert jobs(b)["nightly"]["cron"] == "0 4 * * *"
        # pause: no slot, no firing; resume: a slot from now
        assert one(a, "select df.pause_schedule('nightly')") is True
        assert (jobs(a)["nightly"]["enabled"], jobs(a)["nightly"]["next_run_at"]) == (False, None)
        tick(db)
        assert jobs(a)["nightly"]["next_run_at"] is None
        assert one(a, "select df.resume_schedule('nightly')") is True
        tick(db)
        assert jobs(a)["nightly"]["next_run_at"] is not None
        assert one(a, "select df.unschedule('nightly')") is True
        assert one(a, "select df.unschedule('nightly')") is False
        assert jobs(a) == {}
        assert list(jobs(b)) == ["nightly"]
        # the tables stay the engine's: a tenant cannot read or write them directly
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            b.execute("select * from pgdurable.schedules")


def test_a_due_job_fires_once_per_slot_as_its_role(db):
    role = db.create_role("sf")
    with db.connect(role) as conn:
        one(conn, f"select df.schedule('every-minute', '* * * * *', {GRAPH}, 'allow')")
        tick(db)
        assert instances(conn, "every-minute") == []  # not due yet
        # hours of downtime: the missed slots fire once, not once each
        due_now(db, role, "every-minute", ago=timedelta(hours=3))
        assert tick(db) == 1, jobs(conn)
        assert tick(db) == 0
        got = instances(conn, "every-minute")
        assert len(got) == 1
        with db.connect() as admin:
            assert (
                one(
                    admin, "select submitted_by::text from df.instances where id = %s", (got[0][0],)
                )
                == role
            )
        row = jobs(conn)["every-minute"]
        assert (row["runs"], row["last_instance_id"], row["last_status"]) == (
            1,
            got[0][0],
            "pending",
        )
        assert row["next_run_at"] > datetime.now(UTC)
        assert row["next_run_at"] - datetime.now(UTC) <= timedelta(seconds=61)


def test_overlap_rules(db):
    role = db.create_role("so")
    with db.connect(role) as conn:
        for name, overlap in (("skip", "skip"), ("queue", "queue"), ("allow", "allow")):
            one(conn, f"select df.schedule(%s, '* * * * *', {GRAPH}, %s)", (name, overlap))
        tick(db)
        for name in ("skip", "queue", "allow"):
            due_now(db, role, name)
        assert tick(db) == 3
        # each has one pending run (no serve here); the next slot comes
        for name in ("skip", "queue", "allow"):
            due_now(db, role, name)
        assert tick(db) == 1  # allow only
        rows = jobs(conn)
        assert [len(instances(conn, n)) for n in ("skip", "queue", "allow")] == [1, 1, 2]
        assert rows["skip"]["next_run_at"] > datetime.now(UTC)  # skipped to the next slot
        assert rows["queue"]["next_run_at"] < datetime.now(UTC)  # still due
        # the queued job's previous run ends: it fires at the next round, once
        with db.connect() as admin:
            admin.execute(
                "update df.instances set status = 'completed', completed_at = now() "
                "where label = 'queue'"
            )
        assert tick(db) == 1
        assert len(instances(conn, "queue")) == 2
        assert tick(db) == 0


def test_a_failed_start_or_run_is_counted_and_the_job_goes_on(db):
    role = db.create_role("sx")
    with db.connect(role) as conn:
        one(conn, f"select df.schedule('flaky', '* * * * *', {GRAPH}, 'allow')")
        tick(db)
        with db.connect() as admin:  # the role loses LOGIN: its runs cannot start
            admin.execute(f'alter role "{role}" nologin')
        due_now(db, role, "flaky")
        assert tick(db) == 0
        row = jobs(conn)["flaky"]
        assert (row["failures"], row["runs"], row["enabled"]) == (1, 0, True)
        assert "could not start" in row["last_error"]
        assert "LOGIN" in row["last_error"]
        with db.connect() as admin:
            admin.execute(f'alter role "{role}" login')
        due_now(db, role, "flaky")
        assert tick(db) == 1
        row = jobs(conn)["flaky"]
        assert (row["failures"], row["runs"], row["last_error"]) == (1, 1, None)
        # its run fails: counted at once in the listing, once in the counter
        with db.connect() as admin:
            admin.execute(
                "update df.instances set status = 'failed', completed_at = now() where id = %s",
                (row["last_instance_id"],),
            )
        assert jobs(conn)["flaky"]["failures"] == 2
        due_now(db, role, "flaky")
        assert tick(db) == 1
        row = jobs(conn)["flaky"]
        assert (row["failures"], row["runs"], row["last_status"]) == (2, 2, "pending")


def test_a_job_of_a_role_without_usage_pauses(db):
    role = db.create_role("su")
    with db.connect(role) as conn:
        one(conn, f"select df.schedule('j', '* * * * *', {GRAPH})")
    tick(db)
    with psycopg.connect(db.install_dsn, autocommit=True) as admin:
        admin.execute("select df.revoke_usage(%s)", (role,))
    due_now(db, role, "j")
    assert tick(db) == 0
    with db.connect() as admin:
        enabled, err = admin.execute(
            "select enabled, last_error from pgdurable.schedules where role = %s::regrole", (role,)
        ).fetchone()
    assert enabled is False
    assert "no longer has usage" in err


def test_cli_and_top(db):
    from click.testing import CliRunner

    from pgdurable import top
    from pgdurable.cli import main

    role = db.create_role("sc")
    dsn = db.dsn_as(role)

    def cli(*args, code=0):
        res = CliRunner().invoke(main, [*args, "--dsn", dsn])
        assert res.exit_code == code, res.output
        return res.output

    assert "scheduled nightly (0 3 * * *, overlap queue)" in cli(
        "schedule", "nightly", "0 3 * * *", "df.sql('call nightly()')", "--overlap", "queue"
    )
    out = cli("schedule", "never", "0 3 31 2 *", "'select 1'", code=1)
    assert "it never fires" in out
    tick(db)
    table = cli("schedules")
    assert table.splitlines()[0].split()[:3] == ["NAME", "CRON", "STATE"]
    assert "nightly" in table
    assert "03:00:00" in table
    listed = json.loads(cli("schedules", "--json"))["schedules"]
    assert [(j["name"], j["overlap"], j["enabled"]) for j in listed] == [("nightly", "queue", True)]
    assert "paused nightly" in cli("pause-schedule", "nightly")
    assert "paused" in cli("schedules")
    assert "resumed nightly" in cli("resume-schedule", "nightly")
    assert "unscheduled nightly" in cli("unschedule", "nightly")
    assert "no recurring job named 'nightly'" in cli("unschedule", "nightly", code=1)
    # top shows the next runs
    with db.connect(role) as conn:
        conn.execute("select df.schedule('hourly', '0 * * * *', df.sql('select 1'))")
        tick(db)
        state = top.fetch(conn)
    assert [j["name"] for j in state.schedules] == ["hourly"]
    assert "next scheduled runs (1)" in top.render(state)
