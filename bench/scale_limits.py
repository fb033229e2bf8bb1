"""The long-graph and long-loop scale checks of ``python -m bench.scale`` (``--checks
graph,loop``), docs/reliability.md "Limits".

graph   The largest graph df.start takes, 10,000 nodes (x ``--scale``, odd): a balanced
        ``df.join`` tree of SQL leaves. Measures df.start, the run to completion and the
        workers' peak RSS (psutil, sampled throughout); one node more is refused by df.start
        naming the limit (checked at full scale only).
loop    A loop of 100,000 iterations (x ``--scale``) carrying a named result: each iteration
        runs ``select $c + 1 as c`` (``|=> 'c'``) and the loop's condition ``select $c < N``.
        pg_durable.loop_min_interval_ms = 0 and loop_max_iterations = N + 1 for the database.
        Worker RSS is sampled throughout: the largest value in the second tenth (after the
        warm-up) and the last tenth of the run (growth would be a leak), and the peak.

Each in a fresh database (bench/scale.py's :class:`Db`) with one ``serve`` of
``--workers`` workers. Owns: these two checks and their table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from .common import Progress, Server, start_serve, worker_procs

GRAPH_NODES = 10_000
LOOP_N = 100_000
RSS_BOUND_MB = 150.0


class Sampler:
    """(time, largest worker RSS) every 100 ms while running."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        self.procs = procs
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            best = 0
            for p in self.procs:
                with contextlib.suppress(psutil.Error):
                    best = max(best, p.memory_info().rss)
            self.samples.append((time.monotonic(), best))
            time.sleep(0.1)

    def part(self, lo: float, hi: float) -> float:
        """Largest RSS (MB) within [lo, hi) of the run's samples (fractions)."""
        n = len(self.samples)
        chunk = self.samples[int(lo * n) : max(int(hi * n), int(lo * n) + 1)]
        return max((r for _, r in chunk), default=0) / 2**20

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def join_tree(n: int) -> str:
    """A balanced df.join tree of ``n`` SQL leaves ``select i as i`` (2n - 1 nodes)."""
    leaves = [f"df.sql('select {i} as i')" for i in range(n)]
    while len(leaves) > 1:
        paired = [f"df.join({a}, {b})" for a, b in zip(leaves[::2], leaves[1::2], strict=False)]
        if len(leaves) % 2:
            paired.append(leaves[-1])
        leaves = paired
    return leaves[0]


def await_(conn: psycopg.Connection[Any], iid: str, timeout: float) -> tuple[str, Any, Any]:
    t_end = time.monotonic() + timeout
    status = "running"
    while time.monotonic() < t_end:
        status = conn.execute("select df.status(%s)", (iid,)).fetchone()[0]  # type: ignore[index]
        if status in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    result = conn.execute("select df.result(%s)", (iid,)).fetchone()[0]  # type: ignore[index]
    error = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]  # type: ignore[index]
    return status, result, error


@dataclass
class GraphResult:
    nodes: int = 0
    status: str = ""
    start_s: float = 0.0
    run_s: float = 0.0
    peak_rss_mb: float = 0.0
    refused: str = ""  # df.start's error for one node more
    note: str = ""


@dataclass
class LoopResult:
    iterations: int = 0
    status: str = ""
    run_s: float = 0.0
    per_s: float = 0.0
    rss_first_mb: float = 0.0
    rss_last_mb: float = 0.0
    peak_rss_mb: float = 0.0
    node_rows: int = 0
    samples: list[float] = field(default_factory=list)  # RSS (MB) at each tenth
    note: str = ""


def check_graph(
    server: Server, args: argparse.Namespace, workdir: Path, progress: Progress, db_cls: Any
) -> GraphResult:
    res = GraphResult()
    leaves = max(2, int((GRAPH_NODES * args.scale + 1) // 2))
    res.nodes = 2 * leaves - 1
    progress(f"[graph] a {res.nodes:,}-node JOIN tree, {args.workers} worker(s)")
    with db_cls(server, "pgdurable_scale_graph", args) as db:
        serve = start_serve(db.dsn, args.workers, workdir / "serve-graph.log")
        try:
            procs = worker_procs(serve)
            with (
                psycopg.connect(db.tenant_dsn, autocommit=True) as conn,
                Sampler(procs) as rss,
            ):
                expr = join_tree(leaves)
                t0 = time.monotonic()
                iid = conn.execute(f"select df.start({expr})").fetchone()[0]  # type: ignore[index]
                res.start_s = time.monotonic() - t0
                res.status, result, err = await_(conn, iid, args.timeout)
                res.run_s = time.monotonic() - t0 - res.start_s
                if res.status != "completed":
                    res.note = f"{res.status}: {err}"
                elif [int(x) for x in re.findall(r'"i": ?(\d+)', result)] != list(range(leaves)):
                    res.note = "wrong result"
                if res.nodes >= GRAPH_NODES - 1:
                    too_many = f"df.join({expr}, df.join('select 1', 'select 2'))"
                    try:
                        conn.execute(f"select df.start({too_many})")
                    except psycopg.Error as exc:
                        res.refused = exc.diag.message_primary or str(exc)
            res.peak_rss_mb = rss.part(0, 1)
        finally:
            serve.cleanup()
    return res


def check_loop(
    server: Server, args: argparse.Namespace, workdir: Path, progress: Progress, db_cls: Any
) -> LoopResult:
    res = LoopResult()
    n = max(10, int(LOOP_N * args.scale))
    res.iterations = n
    progress(f"[loop] {n:,} iterations carrying $c, {args.workers} worker(s)")
    with db_cls(server, "pgdurable_scale_loop", args) as db:
        with db.admin() as conn:
            for name, value in (("loop_min_interval_ms", "0"), ("loop_max_iterations", n + 1)):
                conn.execute(
                    sql.SQL("alter database {} set {} = {}").format(
                        sql.Identifier(db.name),
                        sql.SQL(f"pg_durable.{name}"),
                        sql.Literal(str(value)),
                    )
                )
        serve = start_serve(db.dsn, args.workers, workdir / "serve-loop.log")
        try:
            procs = worker_procs(serve)
            expr = (
                "df.seq(df.as(df.sql('select 0 as c'), 'c'), "
                "df.loop(df.as(df.sql('select $c + 1 as c'), 'c'), "
                f"df.sql('select $c < {n}')))"
            )
            with (
                psycopg.connect(db.tenant_dsn, autocommit=True) as conn,
                Sampler(procs) as rss,
            ):
                t0 = time.monotonic()
                iid = conn.execute(f"select df.start({expr})").fetchone()[0]  # type: ignore[index]
                res.status, result, err = await_(conn, iid, args.timeout)
                res.run_s = time.monotonic() - t0
            res.per_s = n / res.run_s
            if res.status != "completed":
                res.note = f"{res.status}: {err}"
            elif json.loads(result)["rows"] != [{"c": n}]:
                res.note = f"wrong result {result[:200]}"
            # the second tenth: the first holds the warm-up (pools, caches, the first plans),
            # 10 MB in a 500-iteration run, which is not growth across iterations
            res.rss_first_mb = rss.part(0.1, 0.2)
            res.rss_last_mb = rss.part(0.9, 1)
            res.peak_rss_mb = rss.part(0, 1)
            res.samples = [round(rss.part(k / 10, (k + 1) / 10), 1) for k in range(10)]
            with db.admin() as conn:
                res.node_rows = int(
                    conn.execute(
                        "select count(*) from df.nodes where instance_id = %s", (iid,)
                    ).fetchone()[0]  # type: ignore[index]
                )
        finally:
            serve.cleanup()
    return res


def render(graph: GraphResult | None, loop: LoopResult | None) -> str:
    lines = []
    if graph:
        lines += [
            f"graph  {graph.nodes:,} nodes: {graph.status}; df.start {graph.start_s:.2f} s, "
            f"run {graph.run_s:.1f} s; peak worker RSS {graph.peak_rss_mb:.0f} MB "
            f"(bound {RSS_BOUND_MB:.0f})",
        ]
        if graph.refused:
            lines.append(f"       one node more: {graph.refused}")
        if graph.note:
            lines.append(f"       NOTE: {graph.note}")
    if loop:
        lines += [
            f"loop   {loop.iterations:,} iterations: {loop.status} in {loop.run_s:.0f} s "
            f"({loop.per_s:.0f}/s); worker RSS second tenth {loop.rss_first_mb:.1f} MB, "
            f"last tenth {loop.rss_last_mb:.1f} MB, peak {loop.peak_rss_mb:.1f} MB; "
            f"{loop.node_rows} node rows",
            f"       RSS by tenth (MB): {loop.samples}",
        ]
        if loop.note:
            lines.append(f"       NOTE: {loop.note}")
    return "\n".join(lines)


def problems(graph: GraphResult | None, loop: LoopResult | None) -> list[str]:
    bad = []
    if graph:
        if graph.status != "completed" or graph.note:
            bad.append(f"graph: {graph.status} {graph.note}")
        if graph.peak_rss_mb > RSS_BOUND_MB:
            bad.append(f"graph: worker RSS {graph.peak_rss_mb:.0f} MB")
    if loop:
        if loop.status != "completed" or loop.note:
            bad.append(f"loop: {loop.status} {loop.note}")
        if loop.rss_last_mb - loop.rss_first_mb > 8:
            bad.append(f"loop: worker RSS grew {loop.rss_first_mb:.1f} -> {loop.rss_last_mb:.1f}")
    return bad
