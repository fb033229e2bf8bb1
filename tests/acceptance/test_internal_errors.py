"""End-to-end: a failure of pgdurable's own code fails its step at once (not retried ten
times), with an error that names the node and says it is internal, and one traceback; inputs
that used to reach such failures now fail (or pass) as the step's own outcome."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def running(db, serve_factory, tenant):
    s = serve_factory(db)
    s.wait_workers(2)
    return s


def _await(db, role, iid, timeout=60):
    with db.connect(role) as conn:
        status = conn.execute("select df.await_instance(%s, %s)", (iid, timeout)).fetchone()[0]
        err = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
        result = conn.execute("select df.result(%s)", (iid,)).fetchone()[0]
    return status, err, result


def test_internal_error_fails_the_step_at_once_with_one_traceback(db, running, tenant):
    # The real trigger: a stored state pgdurable cannot read (a LOOP's iteration start that
    # is not a number, as only a bug or a hand edit of df.nodes leaves it). Reading it raises
    # a TypeError in the worker's own code, the same on every attempt.
    with db.connect(autocommit=False) as conn:
        conn.execute(f'set role "{tenant}"')
        iid = conn.execute("select df.start(df.loop(df.sql('select 1')))").fetchone()[0]
        conn.execute("reset role")
        loop = conn.execute(
            "update df.nodes set status_details = coalesce(status_details, '{}') || "
            '\'{"iter_begins_at": {"not": "a number"}}\' where instance_id = %s '
            "and node_type = 'LOOP' returning id",
            (iid,),
        ).fetchone()[0]
        conn.commit()
    t0 = time.monotonic()
    status, err, _ = _await(db, tenant, iid)
    elapsed = time.monotonic() - t0
    assert status == "failed", err
    # at once: not ten claims (each a lease or a release apart)
    assert elapsed < 10, elapsed
    assert err["error"].startswith(
        f"internal error in pgdurable while starting the instance (node {err['node_id']!r}): "
        "TypeError: float() argument must be"
    ), err
    assert "not retried" in err["error"]
    assert loop  # the corrupted node exists
    log = running.log()
    assert log.count("Traceback (most recent call last)") == 1, log
    assert log.count("internal error in pgdurable while starting the instance") == 1, log
    with db.connect() as conn:
        # nothing left to claim: the instance is finished, not waiting for another attempt
        assert (
            conn.execute(
                "select count(*) from pgdurable.tasks where instance_id = %s", (iid,)
            ).fetchone()[0]
            == 0
        )


def test_rows_shaped_values_no_longer_crash_the_worker(db, running, tenant):
    # found by item 2 of issue 12: a break value shaped like rows, its columns not names,
    # crashed the checkpoint (truthy) and substitution with a TypeError, retried ten times
    with db.connect() as conn:
        conn.execute(f"alter database {db.name} set pg_durable.loop_min_interval_ms = 0")
    shaped = '{"rows": [{"a": 1}], "columns": [[1]], "row_count": "many"}'
    expr = f"df.loop(df.break('{shaped}')) |=> 'r' ~> df.sql('select $r.a as a, $r as first')"
    with db.connect(tenant) as conn:
        iid = conn.execute(f"select df.start({expr})").fetchone()[0]
    status, err, result = _await(db, tenant, iid)
    assert status == "completed", err
    assert '"rows": [{"a": 1, "first": 1}]' in result
    # $r.* needs column names: the step fails as its own outcome, naming the reference
    expr = f"df.loop(df.break('{shaped}')) |=> 'r' ~> df.sql('select * from $r.*')"
    with db.connect(tenant) as conn:
        iid = conn.execute(f"select df.start({expr})").fetchone()[0]
    status, err, _ = _await(db, tenant, iid)
    assert status == "failed"
    assert "$r.*: result 'r' has a malformed columns list" in err["error"], err
    # if_rows on it: a row_count that is not a number is not a SQL step's rows
    expr = f"df.loop(df.break('{shaped}')) |=> 'r' ~> df.if_rows('r', 'select 1', 'select 2')"
    with db.connect(tenant) as conn:
        iid = conn.execute(f"select df.start({expr})").fetchone()[0]
    t0 = time.monotonic()
    status, err, _ = _await(db, tenant, iid)
    assert status == "failed"
    assert time.monotonic() - t0 < 10
    assert "if_rows: result 'r' is missing or has no rows" in err["error"], err
    assert "internal error" not in running.log()
