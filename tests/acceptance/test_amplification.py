"""Hostile values through a real `pgdurable serve` (issue 20, items 3-5).

- A step result is stored once: one ~9 MB result under 25 nested THENs and a JOIN completes,
  df.result returns it, the instance's stored bytes stay about the value's size and the
  workers' memory stays bounded (composites used to store a copy each: 26 copies, a worker
  at 768 MB; at 40 levels PostgreSQL's jsonb limit, retried forever).
- One checkpoint carries at most 64 MiB and one instance at most pg_durable.max_instance_bytes:
  past either, the step fails cleanly, once.
- Signal data is capped like a step result: df.signal refuses 40 MiB at once; data that a
  session let through (raising the setting) never enters the worker's memory.
- Graphs that spin: what the worker cannot run is refused by df.start; a graph written into
  df.nodes by hand fails its instance at once when loaded, while other tenants' workflows run,
  without flooding the log.

Workers' RSS is sampled (psutil) every 20 ms while each test runs; the bound is 150 MB per
worker process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql

from tests.acceptance.conftest import Serve

pytestmark = pytest.mark.timeout(300)

RSS_BOUND = 150 * 1024 * 1024
# ~8.96 MB of hex digits from md5 of random input: incompressible enough that TOAST stores it
# at about its size (a repeat('x', n) would compress to nothing and prove nothing)
BIG_SQL = (
    "select string_agg(md5(g::text || random()::text), '') as big from generate_series(1, 280000) g"
)


class RssSampler:
    """The largest RSS any of serve's worker processes reached while sampling."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.peak = 0
        self.baseline = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        best = 0
        for pid in self.serve.workers():
            with contextlib.suppress(psutil.NoSuchProcess):
                best = max(best, psutil.Process(pid).memory_info().rss)
        return best

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.baseline = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


@pytest.fixture
def running(db: Any, serve_factory: Any, tenant: str) -> Serve:
    s = serve_factory(db)
    s.wait_workers(2)
    # the workers are up and have loaded their settings once this completes
    with db.connect(tenant) as conn:
        iid = conn.execute("select df.start('select 1')").fetchone()[0]
        assert conn.execute("select df.await_instance(%s, 60)", (iid,)).fetchone()[0] == "completed"
    return s


def await_(db: Any, role: str, iid: str, timeout: int = 120) -> tuple[str, str | None, Any]:
    with db.connect(role) as conn:
        status = conn.execute("select df.await_instance(%s, %s)", (iid, timeout)).fetchone()[0]
        result = conn.execute("select df.result(%s)", (iid,)).fetchone()[0]
        error = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
    return status, result, error


def stored_bytes(db: Any, iid: str) -> int:
    """What the instance's results occupy: df.nodes.result and the engine's named results."""
    with db.connect() as conn:
        return int(
            conn.execute(
                "select coalesce((select sum(pg_column_size(n.result)) from df.nodes n"
                "                 where n.instance_id = %s), 0)"
                "     + coalesce((select sum(pg_column_size(r.value)) from pgdurable.results r"
                "                 where r.instance_id = %s), 0)",
                (iid, iid),
            ).fetchone()[0]
        )


def chain(depth: int, inner: str) -> str:
    """`inner` as the last step of `depth` nested THENs (each with a small first step)."""
    expr = inner
    for i in range(depth):
        expr = f"df.seq('select {i} as level', {expr})"
    return expr


# -- 3. results are stored once ---------------------------------------------------------------


def test_a_9mb_result_under_25_thens_and_a_join_is_stored_once(db, running, tenant):
    big = f"df.sql({sql.quote(BIG_SQL)})"
    expr = f"df.join({chain(25, big)}, df.sql('select 1 as small'))"
    with RssSampler(running) as rss:
        with db.connect(tenant) as conn:
            iid = conn.execute(f"select df.start({expr})").fetchone()[0]
        status, result, err = await_(db, tenant, iid)
    assert status == "completed", err
    value = json.loads(result)
    leaf = value[0]
    assert value[1]["rows"] == [{"small": 1}]
    assert len(leaf["rows"][0]["big"]) == 32 * 280000
    with db.connect() as conn:
        # the value stored on the leaf's row, byte for byte what df.result returns in place
        stored = conn.execute(
            "select n.result::text from df.nodes n where n.instance_id = %s and n.query = %s",
            (iid, BIG_SQL),
        ).fetchone()[0]
        # every composite holds a reference, not a copy
        composites = conn.execute(
            "select count(*) filter (where result is null), count(*) from df.nodes "
            "where instance_id = %s and node_type in ('THEN', 'JOIN')",
            (iid,),
        ).fetchone()
    assert json.loads(stored) == leaf
    assert composites == (26, 26)
    size = len(stored.encode())
    total = stored_bytes(db, iid)
    print(
        f"\nvalue {size} bytes; stored {total} bytes ({total / size:.2f}x); worker RSS "
        f"baseline {rss.baseline / 2**20:.1f} MiB, peak {rss.peak / 2**20:.1f} MiB"
    )
    assert size * 0.9 < total < size * 1.1 + 100_000, (size, total)
    assert rss.peak < RSS_BOUND, f"a worker reached {rss.peak / 2**20:.1f} MiB"
    # every reader shows what composites used to store: the value, resolved at read time
    with db.connect(tenant) as conn:
        rows = dict(
            conn.execute("select node_id, result from df.instance_nodes(%s)", (iid,)).fetchall()
        )
        root, first_then = conn.execute(
            "select i.root_node, n.left_node from df.instances i join df.nodes n "
            "on n.instance_id = i.id and n.id = i.root_node where i.id = %s",
            (iid,),
        ).fetchone()
        assert json.loads(rows[root]) == value
        assert json.loads(rows[first_then]) == leaf
        out = conn.execute("select df.explain(%s)", (iid,)).fetchone()[0]
        assert (
            hashlib.sha256(json.dumps(value).encode()).digest()
            == hashlib.sha256(
                json.dumps(json.loads(re.search(r"^Output: (.*)$", out, re.M).group(1))).encode()
            ).digest()
        )
        listed = conn.execute(
            "select output from df.list_instances() where instance_id = %s", (iid,)
        ).fetchone()[0]
        assert json.loads(listed) == value


def test_a_checkpoint_over_64_mib_fails_its_step_once(db, running, tenant):
    # named JOINs around one 9 MB step: each name stores the value once more (named results
    # are copies), and they all complete in the big step's checkpoint: 9 copies > 64 MiB
    with db.connect() as conn:
        conn.execute("create sequence public.amp_runs")
        conn.execute(f'grant usage, update on sequence public.amp_runs to "{tenant}"')
    counted = BIG_SQL.replace(" as big ", " as big, nextval('public.amp_runs') as run ")
    expr = f"df.sql({sql.quote(counted)}) |=> 'a'"
    for i in range(8):
        expr = f"df.as(df.join({expr}, df.sql('select {i}')), 'j{i}')"
    with RssSampler(running) as rss:
        with db.connect(tenant) as conn:
            iid = conn.execute(f"select df.start({expr})").fetchone()[0]
        status, _result, err = await_(db, tenant, iid)
    assert status == "failed"
    assert "over the limit of 67108864 bytes per checkpoint" in err["error"], err
    assert err["node_type"] == "SQL"
    assert rss.peak < RSS_BOUND, f"a worker reached {rss.peak / 2**20:.1f} MiB"
    with db.connect() as conn:
        # failed at once, not retried: the statement ran once (twice if it shared a batch,
        # which then runs its steps one by one), rolled back with its checkpoint
        runs = conn.execute(
            "select case when is_called then last_value else 0 end from public.amp_runs"
        ).fetchone()[0]
        assert (
            conn.execute(
                "select count(*) from pgdurable.tasks where instance_id = %s", (iid,)
            ).fetchone()[0]
            == 0
        )
    assert 1 <= runs <= 2, runs
    assert "internal error" not in running.log()
    assert stored_bytes(db, iid) < 1_000_000


def test_an_instance_holds_at_most_max_instance_bytes(db, serve_factory, tenant):
    with db.connect() as conn:
        conn.execute(
            sql.SQL("alter database {} set pg_durable.max_instance_bytes = 2000000").format(
                sql.Identifier(db.name)
            )
        )
    s = serve_factory(db)
    s.wait_workers(2)
    step = (
        "select string_agg(md5(g::text || random()::text), '') as v "
        "from generate_series(1, 25000) g"
    )  # 800 kB
    expr = " ~> ".join([f"df.sql({sql.quote(step)})"] * 3)
    with db.connect(tenant) as conn:
        iid = conn.execute(f"select df.start({expr})").fetchone()[0]
    status, _result, err = await_(db, tenant, iid)
    assert status == "failed"
    assert re.search(
        r"would hold \d+ bytes, over the limit of 2000000 bytes per instance; "
        r"raise pg_durable.max_instance_bytes",
        err["error"],
    ), err
    with db.connect() as conn:
        done = conn.execute(
            "select count(*) from df.nodes where instance_id = %s and "
            "node_type = 'SQL' and status = 'completed'",
            (iid,),
        ).fetchone()[0]
    assert done == 2


# -- 4. signal data is capped like a step result ----------------------------------------------


def test_signal_data_is_capped_at_df_signal_and_in_the_worker(db, running, tenant):
    big = json.dumps({"blob": "x" * (40 * 2**20)})
    with db.connect(tenant) as conn:
        iid = conn.execute(
            "select df.start(df.wait_for_signal('go') |=> 'go' ~> df.sql('select $go.data as d'))"
        ).fetchone()[0]
    with RssSampler(running) as rss:
        with db.connect(tenant) as conn:
            t0 = time.monotonic()
            with pytest.raises(psycopg.errors.ProgramLimitExceeded) as info:
                conn.execute("select df.signal(%s, 'go', %s)", (iid, big))
            assert time.monotonic() - t0 < 10
            assert re.search(
                r"df.signal: data is \d+ bytes, over the limit of 10485760 bytes", str(info.value)
            ), info.value
            assert "max_signal_bytes" in (info.value.diag.message_hint or "")
            # a session may lower the cap but not raise it past one checkpoint's bound
            conn.execute("set pg_durable.max_signal_bytes = 1000")
            with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="limit of 1000 "):
                conn.execute("select df.signal(%s, 'go', %s)", (iid, json.dumps("y" * 2000)))
            conn.execute("set pg_durable.max_signal_bytes = 1000000000")
            with pytest.raises(
                psycopg.errors.ProgramLimitExceeded, match="limit of 67108864 bytes"
            ):
                conn.execute(
                    "select df.signal(%s, 'go', %s)", (iid, json.dumps("z" * (65 * 2**20)))
                )
            # under that bound a session's raised setting lets 40 MiB in: the worker's own cap
            # (serve's --result-max-bytes) keeps it out of its memory and fails the wait
            conn.execute("select df.signal(%s, 'go', %s)", (iid, big))
        status, _result, err = await_(db, tenant, iid)
    assert status == "failed"
    assert err["node_type"] == "SIGNAL"
    assert re.search(
        r"signal data is \d+ bytes, over the limit of 10485760 bytes; raise "
        r"pgdurable serve --result-max-bytes",
        err["error"],
    ), err
    print(f"\nworker RSS baseline {rss.baseline / 2**20:.1f} MiB, peak {rss.peak / 2**20:.1f} MiB")
    assert rss.peak < RSS_BOUND, f"a worker reached {rss.peak / 2**20:.1f} MiB"
    # an ordinary signal still goes through
    with db.connect(tenant) as conn:
        iid = conn.execute(
            "select df.start(df.wait_for_signal('go') |=> 'go' ~> "
            "df.sql('select ($go.data)::jsonb as d'))"
        ).fetchone()[0]
        conn.execute("select df.signal(%s, 'go', '{\"n\": 1}')", (iid,))
    status, result, err = await_(db, tenant, iid)
    assert status == "completed", err
    assert json.loads(result)["rows"] == [{"d": {"n": 1}}]


# -- 5. graphs that spin ------------------------------------------------------------------------

# an if_rows config nested 2,000 deep (Python's json cannot even parse it)
DEEP_IF = (
    '{"condition_type": "result_has_rows", "result_name": "r", "pad": '
    + "[" * 2000
    + "]" * 2000
    + "}"
)


def graph_value(node: dict[str, Any]) -> str:
    return json.dumps(node)


SPINNERS = {
    "sleep": (
        {"node_type": "SLEEP", "query": "10000000000000"},
        r"df.sleep: seconds must be at most 10000000000",
    ),
    "deep_if_rows": (
        {
            "node_type": "IF",
            "query": DEEP_IF,
            "left_node": {"node_type": "SQL", "query": "select 1"},
            "right_node": {"node_type": "SQL", "query": "select 2"},
        },
        r"the config of an IF node nests deeper than 64 levels",
    ),
    "never_fires": (
        {"node_type": "WAIT_SCHEDULE", "query": '{"cron_expr": "0 3 31 2 *"}'},
        r"invalid cron expression '0 3 31 2 \*': it never fires",
    ),
}


def insert_graph(conn: psycopg.Connection[Any], role: str, iid: str, node: dict[str, Any]) -> None:
    """What df.start writes, written by the tenant itself, past df.start's checks; then the
    engine's own (structural) validation and the start task (tests/sql/test_temp_shadowing.py)."""
    rows: list[tuple[str, str, str | None, str | None, str | None]] = []

    def add(n: dict[str, Any]) -> str:
        nid = f"{len(rows) + 1:08x}"
        rows.append((nid, n["node_type"], n.get("query"), None, None))
        pos = len(rows) - 1
        left = add(n["left_node"]) if "left_node" in n else None
        right = add(n["right_node"]) if "right_node" in n else None
        rows[pos] = (nid, n["node_type"], n.get("query"), left, right)
        return nid

    root = add(node)
    conn.execute(
        "insert into df.instances (id, label, root_node, submitted_by, database) "
        "values (%s, 'hand-written', %s, %s::pg_catalog.regrole, null)",
        (iid, root, role),
    )
    with conn.cursor() as cur:
        cur.executemany(
            "insert into df.nodes (id, instance_id, node_type, query, result_name, left_node, "
            "right_node, submitted_by, database) values (%s, %s, %s, %s, null, %s, %s, "
            "%s::pg_catalog.regrole, null)",
            [(nid, iid, t, q, left, right, role) for nid, t, q, left, right in rows],
        )
    conn.execute("select pgdurable._enqueue_v1(%s, '{}')", (iid,))


def test_graphs_that_spin_are_refused_by_df_start(db, tenant):
    with db.connect(tenant) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="at most 10000000000"):
            conn.execute("select df.start(df.sleep(10000000000000))")
        for name, (node, message) in SPINNERS.items():
            with pytest.raises(psycopg.Error, match=message) as info:
                conn.execute("select df.start(%s)", (graph_value(node),))
            assert info.value.sqlstate in ("22023", "54000"), (name, info.value)
            # the dry run says the same
            out = conn.execute("select df.explain(%s)", (graph_value(node),)).fetchone()[0]
            assert out.startswith("Invalid durable function graph: root:"), (name, out)


def test_graphs_that_slip_past_fail_at_once_while_others_run(db, serve_factory, tenant):
    other = db.create_role("amp_other")
    s = serve_factory(db)
    s.wait_workers(2)
    with db.connect(other) as conn:  # serve is up and ready
        iid = conn.execute("select df.start('select 1')").fetchone()[0]
        assert conn.execute("select df.await_instance(%s, 60)", (iid,)).fetchone()[0] == "completed"
    lines_before = len(s.log_path.read_text(errors="replace").splitlines())
    bad = {}
    t0 = time.monotonic()
    with db.connect(tenant, autocommit=False) as conn:
        for k, (name, (node, _)) in enumerate(SPINNERS.items()):
            iid = f"badbad{k:02x}"
            insert_graph(conn, tenant, iid, node)
            bad[name] = iid
        conn.commit()
    # another tenant's one-step workflows, meanwhile
    with db.connect(other) as conn:
        good = [conn.execute("select df.start('select 1')").fetchone()[0] for _ in range(20)]
    for name, iid in bad.items():
        status, _result, err = await_(db, tenant, iid, timeout=30)
        assert status == "failed", (name, status)
        assert "the instance's stored graph cannot run" in err["error"], (name, err)
    bad_done = time.monotonic() - t0
    for iid in good:
        assert await_(db, other, iid, timeout=30)[0] == "completed"
    assert bad_done < 10, f"the bad instances took {bad_done:.1f}s to fail"
    with db.connect() as conn:
        attempts = conn.execute(
            "select count(*) from pgdurable.tasks where instance_id = any(%s)",
            (list(bad.values()),),
        ).fetchone()[0]
    assert attempts == 0
    time.sleep(2)  # anything still spinning would keep logging
    log = s.log_path.read_text(errors="replace").splitlines()[lines_before:]
    about_bad = [line for line in log if any(i in line for i in bad.values())]
    print(
        f"\n{len(log)} log lines for {len(bad)} bad and {len(good)} good instances, "
        f"{len(about_bad)} about the bad ones"
    )
    # one warning each (it names the node and what is wrong), no traceback, no retries
    assert len(about_bad) <= 2 * len(bad), "\n".join(about_bad)
    assert len(log) <= 2 * len(bad) + 3 * len(good) + 10, "\n".join(log[-60:])
    assert not any("Traceback" in line for line in log), "\n".join(log[-60:])


def test_a_value_jsonb_cannot_hold_fails_its_step_at_once(db, running, tenant):
    # a BREAK whose value holds \u0000: no checkpoint can store it (PostgreSQL refuses it in
    # jsonb), so the step fails, once, with a reason, instead of being retried
    with db.connect(tenant) as conn:
        iid = conn.execute("select df.start(@> df.break(%s))", ('"a\\u0000b"',)).fetchone()[0]
    status, _result, err = await_(db, tenant, iid, timeout=30)
    assert status == "failed"
    assert "NUL character" in err["error"], err
    assert "internal error" not in running.log()
