"""Long results and long graphs through a real `pgdurable serve` (issue #17, part 5).

- ``--result-max-bytes``: what is measured, at the limit minus one byte, at it and one byte
  over. A SQL step's result is measured twice, with the same limit: the step's runner counts
  each row as PostgreSQL renders it (``octet_length(to_json(row)::text)``, summed while the
  rows arrive, pgdurable/sql/schema/50_engine.sql) and the worker then measures the result it
  stores, the compact JSON of ``{"rows": […], "row_count": n, "columns": […]}``
  (values.check_size, in worker/checkpoint.py). For rows of plain values the stored form is
  the larger one, so it decides the boundary; rows that PostgreSQL renders with whitespace
  (json/jsonb columns: ``{"a": 1}``) can be refused by the runner although they would be
  stored in fewer bytes than the limit (shown below). Over either, the step fails once with
  an error naming the limit and the option that raises it.
- A graph holds at most 10,000 nodes: df.start takes a 10,000-node graph (a JOIN tree) and
  refuses 10,001 naming the limit. CI runs a 2,000-step graph to completion with workers'
  RSS bounded; bench/scale.py (``graph``) runs the 10,000-node one.
  (2,000 steps under two workers crawl: see docs/reliability.md, Limits.)
- A loop carrying a named result through 1,500 iterations: worker RSS does not grow from the
  first quarter of the run to the last, and pg_durable.loop_max_iterations stops a loop with
  an error naming it. bench/scale.py (``loop``) runs 100,000 iterations.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from typing import Any

import psutil
import pytest
from psycopg import sql

from tests.acceptance.conftest import Serve
from tests.acceptance.test_amplification import await_

pytestmark = pytest.mark.timeout(300)

LIMIT = 64 * 1024
RSS_BOUND = 150 * 1024 * 1024


class RssSeries:
    """(time, largest worker RSS) every 50 ms while sampling."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        best = 0
        for pid in self.serve.workers():
            with contextlib.suppress(psutil.NoSuchProcess):
                best = max(best, psutil.Process(pid).memory_info().rss)
        return best

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.rss()))
            time.sleep(0.05)

    @property
    def peak(self) -> int:
        return max((r for _, r in self.samples), default=0)

    def quarter(self, which: int) -> int:
        """The largest RSS in quarter ``which`` (0..3) of the samples."""
        n = len(self.samples)
        part = self.samples[which * n // 4 : (which + 1) * n // 4]
        return max(r for _, r in part)

    def __enter__(self) -> RssSeries:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start(db: Any, role: str, expr: str) -> str:
    with db.connect(role) as conn:
        return str(conn.execute(f"select df.start({expr})").fetchone()[0])


# -- 1. --result-max-bytes ----------------------------------------------------------------------


def stored_size(rows: list[dict[str, Any]]) -> int:
    """Bytes of the stored SQL result (docs/api.md, "Node results"), compact JSON."""
    columns = list(rows[0]) if rows else []
    env = {"rows": rows, "row_count": len(rows), "columns": columns}
    return len(json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode())


@pytest.fixture
def capped(db: Any, serve_factory: Any, tenant: str) -> Serve:
    s = serve_factory(db, PGDURABLE_RESULT_MAX_BYTES=str(LIMIT))
    s.wait_workers(2)
    iid = start(db, tenant, "'select 1'")
    assert await_(db, tenant, iid, 60)[0] == "completed"
    return s


def runs_of(db: Any, seq: str) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                sql.SQL("select case when is_called then last_value else 0 end from {}").format(
                    sql.Identifier("public", seq)
                )
            ).fetchone()[0]
        )


def test_result_max_bytes_boundary(db, capped, tenant):
    # one row {"r": <run>, "v": "xxx…"}: r counts the statement's runs (one digit)
    def rows(k: int) -> list[dict[str, Any]]:
        return [{"r": 1, "v": "x" * k}]

    base = stored_size(rows(0))
    cases = {}
    with db.connect() as conn:
        for name, size in (("under", LIMIT - 1), ("at", LIMIT), ("over", LIMIT + 1)):
            k = size - base
            assert stored_size(rows(k)) == size
            conn.execute(sql.SQL("create sequence {}").format(sql.Identifier("public", name)))
            conn.execute(
                sql.SQL("grant usage, update on sequence {} to {}").format(
                    sql.Identifier("public", name), sql.Identifier(tenant)
                )
            )
            q = f"select nextval('public.{name}') as r, repeat('x', {k}) as v"
            cases[name] = (k, start(db, tenant, f"df.sql({sql.quote(q)})"))
    for name in ("under", "at"):
        k, iid = cases[name]
        status, result, err = await_(db, tenant, iid)
        assert status == "completed", (name, err)
        assert len(result.replace(" ", "")) == stored_size(rows(k)), name
        value = json.loads(result)
        assert value["rows"] == rows(k), name
        assert runs_of(db, name) == 1
    k, iid = cases["over"]
    status, _result, err = await_(db, tenant, iid)
    assert status == "failed"
    assert err["node_type"] == "SQL"
    assert err["error"] == (
        f"step result is {LIMIT + 1} bytes, over the limit of {LIMIT} bytes; raise "
        "pgdurable serve --result-max-bytes (PGDURABLE_RESULT_MAX_BYTES) to allow it"
    ), err
    # failed once, not retried (twice if it shared a batch, which then runs one by one)
    assert 1 <= runs_of(db, "over") <= 2
    time.sleep(1)
    assert 1 <= runs_of(db, "over") <= 2
    with db.connect() as conn:
        left = conn.execute(
            "select count(*) from pgdurable.tasks where instance_id = %s", (iid,)
        ).fetchone()[0]
    assert left == 0


def test_rows_past_the_limit_stop_in_the_runner(db, capped, tenant):
    # 4 rows of 20,000 bytes: the runner stops at the fourth row, before the worker holds them
    q = "select g, repeat('y', 20000) as v from generate_series(1, 4) g"
    iid = start(db, tenant, f"df.sql({sql.quote(q)})")
    status, _result, err = await_(db, tenant, iid)
    assert status == "failed"
    assert err["sqlstate"] == "54000", err
    assert f"step result is over the limit of {LIMIT} bytes" in err["error"], err
    assert "--result-max-bytes" in err["error"], err
    assert "internal error" not in capped.log()


def test_rows_rendered_with_whitespace_count_as_rendered(db, capped, tenant):
    # a jsonb column: PostgreSQL renders it {"1": 1, "2": 2, …}, stored compact {"1":1,…}.
    # The runner counts the rendering, so this result is refused although its stored form
    # would be under the limit: the one place the two measures disagree (documented).
    n = 5200
    compact = stored_size([{"j": {str(g): g for g in range(1, n + 1)}}])
    rendered = len(json.dumps({str(g): g for g in range(1, n + 1)}).encode()) + len('{"j":}')
    assert compact < LIMIT < rendered, (compact, rendered)
    q = f"select jsonb_object_agg(g::text, g) as j from generate_series(1, {n}) g"
    iid = start(db, tenant, f"df.sql({sql.quote(q)})")
    status, _result, err = await_(db, tenant, iid)
    assert status == "failed"
    assert f"step result is over the limit of {LIMIT} bytes" in err["error"], err


# -- 2. a graph of up to 10,000 nodes -----------------------------------------------------------


def join_tree(leaves: list[str]) -> str:
    """A balanced df.join tree of ``leaves`` (2n - 1 nodes, depth log2 n)."""
    while len(leaves) > 1:
        paired = [f"df.join({a}, {b})" for a, b in zip(leaves[::2], leaves[1::2], strict=False)]
        if len(leaves) % 2:
            paired.append(leaves[-1])
        leaves = paired
    return leaves[0]


def leaves(n: int, offset: int = 0) -> list[str]:
    return [f"df.sql('select {offset + i} as i')" for i in range(n)]


def graph_of(nodes: int) -> str:
    """A graph of exactly ``nodes`` nodes: join trees, under a df.join3 when even."""
    if nodes % 2:
        return join_tree(leaves((nodes + 1) // 2))
    # join3(a, b, c) = 1 + |a| + |b| + |c|; each tree odd
    rest = nodes - 1
    a = rest // 3 if (rest // 3) % 2 else rest // 3 - 1
    b = a
    c = rest - a - b
    parts = [join_tree(leaves((m + 1) // 2, k * 100000)) for k, m in enumerate((a, b, c))]
    return f"df.join3({', '.join(parts)})"


def node_count(db: Any, iid: str) -> int:
    with db.connect() as conn:
        return int(
            conn.execute("select count(*) from df.nodes where instance_id = %s", (iid,)).fetchone()[
                0
            ]
        )


def test_df_start_takes_10000_nodes_and_refuses_10001(db, tenant):
    with db.connect(tenant) as conn:
        t0 = time.monotonic()
        iid = conn.execute(f"select df.start({graph_of(10000)})").fetchone()[0]
        took = time.monotonic() - t0
        conn.execute("select df.cancel(%s)", (iid,))
        with pytest.raises(Exception, match="durable function graph has more than 10000 nodes"):
            conn.execute(f"select df.start({graph_of(10001)})")
    print(f"\ndf.start of 10,000 nodes: {took:.2f} s")
    assert node_count(db, iid) == 10000


def test_a_1000_step_graph_completes_with_bounded_workers(db, serve_factory, tenant):
    s = serve_factory(db)
    s.wait_workers(2)
    n = 1000
    expr = join_tree(leaves(n))
    with RssSeries(s) as rss:
        t0 = time.monotonic()
        iid = start(db, tenant, expr)
        t_start = time.monotonic() - t0
        status, result, err = await_(db, tenant, iid)
        t_run = time.monotonic() - t0 - t_start
    assert status == "completed", err
    assert node_count(db, iid) == 2 * n - 1
    found = [int(x) for x in re.findall(r'"i": ?(\d+)', result)]
    assert found == list(range(n))
    print(
        f"\n{n} steps ({2 * n - 1} nodes): df.start {t_start:.2f} s, run {t_run:.2f} s; "
        f"worker RSS peak {rss.peak / 2**20:.1f} MiB"
    )
    assert rss.peak < RSS_BOUND, f"a worker reached {rss.peak / 2**20:.1f} MiB"


# -- 3. a long loop carrying a result -----------------------------------------------------------


def counting_loop(n: int) -> str:
    """``n`` iterations, each reading the previous one's ``$c`` and naming its own ``c``
    (two steps: the body and the loop's condition); completes with ``c`` = n."""
    return (
        "df.seq(df.as(df.sql('select 0 as c'), 'c'), "
        "df.loop(df.as(df.sql('select $c + 1 as c'), 'c'), "
        f"df.sql('select $c < {n}')))"
    )


def test_a_1500_iteration_loop_does_not_grow_the_worker(db, serve_factory, tenant):
    with db.connect() as conn:
        conn.execute(
            sql.SQL("alter database {} set pg_durable.loop_min_interval_ms = 0").format(
                sql.Identifier(db.name)
            )
        )
    s = serve_factory(db)
    s.wait_workers(2)
    n = 1500
    with RssSeries(s) as rss:
        t0 = time.monotonic()
        iid = start(db, tenant, counting_loop(n))
        status, result, err = await_(db, tenant, iid, timeout=200)
        took = time.monotonic() - t0
    assert status == "completed", err
    assert json.loads(result)["rows"] == [{"c": n}]
    first, last = rss.quarter(0), rss.quarter(3)
    print(
        f"\n{n} iterations in {took:.1f} s ({n / took:.0f}/s); worker RSS first quarter "
        f"{first / 2**20:.1f} MiB, last {last / 2**20:.1f} MiB, peak {rss.peak / 2**20:.1f} MiB"
    )
    assert last - first < 512 * 1024, (first, last)
    assert rss.peak < RSS_BOUND
    with db.connect() as conn:
        # the instance's stored rows do not grow with the iterations either
        rows = conn.execute(
            "select count(*) from df.nodes where instance_id = %s", (iid,)
        ).fetchone()[0]
    assert rows < 20, rows


def test_loop_max_iterations_stops_a_loop_naming_it(db, serve_factory, tenant):
    with db.connect() as conn:
        for setting, value in (("loop_min_interval_ms", "0"), ("loop_max_iterations", "50")):
            conn.execute(
                sql.SQL("alter database {} set {} = {}").format(
                    sql.Identifier(db.name), sql.SQL(f"pg_durable.{setting}"), sql.Literal(value)
                )
            )
    s = serve_factory(db)
    s.wait_workers(2)
    iid = start(db, tenant, counting_loop(1000))
    status, _result, err = await_(db, tenant, iid)
    assert status == "failed"
    assert err["node_type"] == "LOOP", err
    assert "exceeded pg_durable.loop_max_iterations (50)" in err["error"], err
