"""The benchmark workloads W1-W4 (sizes x ``--scale``) and how their instances are enqueued.

pgdurable's harness (bench/harness.py), the peers (bench/peers.py, which size W1-W3 exactly
like pgdurable's) and the scale checks (bench/scale.py, which reuse W2) all take them from here;
it imports nothing of pgdurable's, so the peers' driver processes stay free of it.

  W1  10,000 one-step workflows
  W2  1,000 ten-step sequences
  W3  100 x (fan-out 100 -> join -> one more step)
  W4  100 x (HTTP fan-out 10 -> join) against a local HTTP server on 127.0.0.1

Enqueue: one df.start per transaction (:func:`enqueue_per_txn`), or per-row starts,
:data:`START_BATCH` per statement (:func:`enqueue_batched`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

# per-row starts per statement: how SQL users start per-row work (docs/performance.md, Targets)
START_BATCH = 1000


def join_tree(leaves: list[str]) -> str:
    """A balanced tree of df.join over DSL expressions (keeps the graph shallow)."""
    while len(leaves) > 1:
        nxt = [f"df.join({leaves[i]}, {leaves[i + 1]})" for i in range(0, len(leaves) - 1, 2)]
        if len(leaves) % 2:
            nxt.append(leaves[-1])
        leaves = nxt
    return leaves[0]


@dataclass
class Workload:
    name: str
    title: str
    instances: int
    steps_per_instance: int
    expr: str  # DSL expression (SQL) of one instance
    http: bool = False
    sequence: bool = False  # leaves run one after another: step→step latency is meaningful
    probes: int = 10


def workloads(scale: float, http_url: str) -> list[Workload]:
    def n(base: int) -> int:
        return max(1, round(base * scale))

    one = "df.sql('select 1')"
    seq10 = " ~> ".join([one] * 10)
    fan = join_tree([one] * 100) + " ~> " + one
    http = join_tree([f"df.http('{http_url}', 'GET')"] * 10)
    return [
        Workload("W1", "10,000 one-step workflows", n(10_000), 1, one, probes=50),
        Workload("W2", "1,000 ten-step sequences", n(1_000), 10, seq10, sequence=True, probes=20),
        Workload("W3", "100 × (fan-out 100 → join)", n(100), 101, fan, probes=5),
        Workload("W4", "100 × (HTTP fan-out 10 → join)", n(100), 10, http, http=True, probes=10),
    ]


def graph_of(tenant_dsn: str, expr: str) -> str:
    """The graph text of the DSL expression ``expr``, built as the tenant."""
    with psycopg.connect(tenant_dsn, autocommit=True) as conn:
        row = conn.execute(f"select {expr}").fetchone()  # our own expression
    assert row is not None
    return str(row[0])


def enqueue_per_txn(
    tenant_dsn: str, graph: str, n: int, label: str, tick: Callable[[str], None]
) -> float:
    """``n`` df.start calls, one transaction each (autocommit); returns starts/s."""
    with psycopg.connect(tenant_dsn, autocommit=True) as conn:
        conn.execute("select 1")
        t0 = time.monotonic()
        for i in range(n):
            conn.execute("select df.start(%s::text, %s)", (graph, label))
            if i % 500 == 0:
                tick(f"  enqueue 1/txn {i:,}/{n:,}")
        return n / (time.monotonic() - t0)


def enqueue_batched(
    tenant_dsn: str, graph: str, n: int, label: str, tick: Callable[[str], None]
) -> float:
    """``n`` df.start calls as per-row starts, START_BATCH per statement; starts/s."""
    with psycopg.connect(tenant_dsn, autocommit=True) as conn:
        conn.execute("select 1")
        t0 = time.monotonic()
        done = 0
        while done < n:
            k = min(START_BATCH, n - done)
            conn.execute(
                "select count(df.start(%s::text, %s)) from generate_series(1, %s)",
                (graph, label, k),
            )
            done += k
            tick(f"  enqueue {START_BATCH}/stmt {done:,}/{n:,}")
        return n / (time.monotonic() - t0)


def reset_instances(dsn: str) -> None:
    """Forget every instance (between W1's two enqueue measurements)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "truncate df.nodes, df.instances, pgdurable.tasks, pgdurable.runs, "
            "pgdurable.results, pgdurable.signals, pgdurable.foreach_runs, "
            "pgdurable.foreach_items"
        )
        conn.execute("vacuum analyze df.nodes, df.instances, pgdurable.tasks, pgdurable.runs")
