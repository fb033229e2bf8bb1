"""The peer drivers (bench/peers.py) end to end at a tiny scale, so ``--peers`` cannot rot.

For each installed peer (the ``bench`` extra: dbos, procrastinate; a peer that is not
installed is skipped) it runs W1 with 20 workflows and W3 with one fan-out instance on an
embedded PostgreSQL 18, through the same driver subprocess the harness uses, then counts
the executed leaf steps itself in the peer's own tables and compares them with what the
workload must execute. Figures at this scale mean nothing; the code path is the point.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import psycopg
import pytest

from bench import peers
from bench.common import Server
from bench.workloads import workloads

pytestmark = pytest.mark.benchmark

# what each peer's own tables say was executed (leaf steps, finished instances)
EXECUTED = {
    "dbos": (
        "select count(*) from dbos.operation_outputs "
        "where function_name = 'select1' and error is null and output is not null",
        "select count(*) from dbos.workflow_status where name = %(top)s and status = 'SUCCESS'",
    ),
    "procrastinate": (
        "select count(*) from procrastinate_jobs "
        "where task_name = any (%(leaves)s) and status = 'succeeded'",
        "select count(*) from procrastinate_jobs "
        "where task_name = %(last)s and status = 'succeeded'",
    ),
}
SIZES = {"W1": 20, "W3": 1}  # instances


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Server]:
    s = Server(None, profile=False)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("workload", sorted(SIZES))
@pytest.mark.parametrize("peer", sorted(peers.KNOWN))
@pytest.mark.timeout(90)
def test_peer_tiny(pg_server: Server, peer: str, workload: str) -> None:
    if importlib.util.find_spec(peers.KNOWN[peer]) is None:
        pytest.skip(f"{peer} is not installed (pip install -e '.[bench]')")
    instances = SIZES[workload]
    steps_each = next(w.steps_per_instance for w in workloads(1.0, "") if w.name == workload)
    dbname = f"pgdurable_peer_smoke_{peer}_{workload.lower()}"
    dsn = pg_server.fresh_db(dbname)
    try:
        res = peers.measure(peer, workload, dsn, instances, timeout=30, stall=20)
        assert "error" not in res, res
        params = {
            "top": f"bench_{workload.lower()}",
            "leaves": list(peers.Procrastinate.leaves[workload]),
            "last": {"W1": "bench_step", "W3": "bench_final"}[workload],
        }
        steps_sql, done_sql = EXECUTED[peer]
        with psycopg.connect(dsn) as conn:
            steps = conn.execute(steps_sql, params).fetchone()[0]  # type: ignore[index]
            done = conn.execute(done_sql, params).fetchone()[0]  # type: ignore[index]
        assert done == instances, res
        assert steps == instances * steps_each, res
        assert res["steps"] == steps, res
        assert res["drain_s"] > 0, res
        row = peers.peer_row(peer, "test", workload, instances, steps_each, res)
        assert row.steps_per_s > 0, row
    finally:
        pg_server.drop_db(dbname)
