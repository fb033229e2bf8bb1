"""The engine's claim and apply SQL functions vs the raw single-row commit floor.

On an embedded PostgreSQL 18 started for this module (default durability settings:
fsync and synchronous_commit on, like the harness), pytest-benchmark measures
- ``floor``: one SKIP LOCKED claim + update + history insert, one commit (bench/floor.py);
- ``claim``: ``_claim_v1`` leasing one task, one commit;
- ``claim+apply``: the engine's cycle for one step outside any step SQL — claim the
  task, then ``_apply_v1`` completing the node and re-enqueueing it — two commits.
``group`` puts them side by side. ``make test`` runs them once with ``--benchmark-disable``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from bench import floor
from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres
from pgdurable.harness import dsn_with

pytestmark = pytest.mark.benchmark

ROLE = "bench_claim_tenant"
ENGINE = "pgdurable"


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    tmp = Path(tempfile.mkdtemp(prefix="pgdurable-bench-claim-"))
    pg = EmbeddedPostgres(tmp / "data")
    admin = pg.start()
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("create database claim_bench")
            conn.execute(f"create role {ROLE} login")
        out = dsn_with(admin, dbname="claim_bench")
        schema.install(out)
        with psycopg.connect(out, autocommit=True) as conn:
            conn.execute("select df.grant_usage(%s)", (ROLE,))
        yield out
    finally:
        pg.destroy()


class Cycle:
    """One instance whose single SQL leaf is claimed and checkpointed over and over."""

    def __init__(self, dsn: str) -> None:
        with psycopg.connect(dsn_with(dsn, user=ROLE), autocommit=True) as tenant:
            row = tenant.execute("select df.start(df.sql('select 1'))").fetchone()
        assert row is not None
        self.instance = str(row[0])
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute(f"truncate {ENGINE}.tasks")
        root = self.conn.execute(
            "select root_node from df.instances where id = %s", (self.instance,)
        ).fetchone()
        assert root is not None
        self.node = str(root[0])
        self.gen = 1
        self.version = 0
        self._enqueue(self.gen)

    def _enqueue(self, gen: int) -> None:
        self.conn.execute(
            f"insert into {ENGINE}.tasks (instance_id, node_id, gen, kind, submitted_by) "
            f"select %s, %s, %s, 'run', submitted_by from df.instances where id = %s",
            (self.instance, self.node, gen, self.instance),
        )

    def claim(self) -> list[Any]:
        return self.conn.execute(f"select * from {ENGINE}._claim_v1('bench', 1, 30)").fetchall()

    def release(self) -> None:
        self.conn.execute(f"select {ENGINE}._release_v1('bench', null, null)")

    def claim_apply(self) -> int:
        rows = self.claim()
        assert rows, "no runnable task"
        nodes = orjson.dumps(
            [
                {
                    "id": self.node,
                    "status": "completed",
                    "result": 1,
                    "details": {"finished_at": "2026-01-01T00:00:00+00:00"},
                }
            ]
        )
        new = orjson.dumps([{"node_id": self.node, "gen": self.gen + 1, "kind": "run"}])
        row = self.conn.execute(
            f"select {ENGINE}._apply_v1('bench', %s, %s, %s, %s, %s, null, %s::jsonb, "
            f"%s::jsonb, null, null, 30)",
            (
                self.instance,
                self.node,
                self.gen,
                self.version,
                b"state",
                nodes.decode(),
                new.decode(),
            ),
        ).fetchone()
        assert row is not None
        assert row[0] == self.version + 1, row
        self.version = int(row[0])
        self.gen += 1
        return self.version

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def cycle(dsn: str) -> Iterator[Cycle]:
    c = Cycle(dsn)
    yield c
    c.close()


@pytest.mark.benchmark(group="claim-commit")
def test_floor_single_row(benchmark: Any, dsn: str) -> None:
    floor.setup(dsn, 20_000)
    with psycopg.connect(dsn) as conn:
        assert benchmark(floor.claim_commit, conn, 1) == 1
    floor.drop(dsn)


@pytest.mark.benchmark(group="claim-commit")
def test_claim_v1(benchmark: Any, cycle: Cycle) -> None:
    def claim_and_give_back() -> int:
        n = len(cycle.claim())
        cycle.release()  # not timed separately: one more commit; keeps the task claimable
        return n

    assert benchmark(claim_and_give_back) == 1


@pytest.mark.benchmark(group="claim-commit")
def test_claim_and_apply_v1(benchmark: Any, cycle: Cycle) -> None:
    assert benchmark(cycle.claim_apply) >= 1
