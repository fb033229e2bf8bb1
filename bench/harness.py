"""The benchmark harness: ``python -m bench`` / ``pgdurable bench`` (docs/performance.md).

For each workload it creates a fresh database, installs pgdurable, creates a tenant
role with ``df.grant_usage``, enqueues the workload's instances (serve not running:
enqueue and drain are reported separately), starts ``python -m pgdurable serve`` as a
subprocess, waits for the backlog to drain while sampling worker RSS and CPU, then
probes latency under light load (instances started one at a time into the idle
service). In the same invocation and on the same server it measures the raw floor
(``bench/floor.py``) and prints pgdurable's steps/s as a ratio of it.

Workloads (sizes x ``--scale``):
  W1  10,000 one-step workflows (enqueue: one df.start per transaction, and per-row
      starts ``select df.start(…) from generate_series(1, 1000)``)
  W2  1,000 ten-step sequences
  W3  100 x (fan-out 100 → join → one more step)
  W4  100 x (HTTP fan-out 10 → join) against a local HTTP server on 127.0.0.1

How figures are derived (docs/performance.md):
  drain window   first claim of the backlog (min ``status_details.started_at``) → last
                 ``df.instances.completed_at``
  steps          completed leaves (SQL/HTTP nodes)
  start→first    first leaf's claim clock (its ``status_details.finished_at``, which the
                 worker stamps with the clock of the claim that ran it) - ``created_at``
  step→step      claim clock of leaf k+1 - claim clock of leaf k in a sequence
  commits/step   ``pg_stat_database.xact_commit`` delta over the drain / steps (the
                 harness's own polling transactions subtracted)
  RSS / CPU      psutil on serve's children (workers) and on the postgres processes

Owns: this orchestration and the results table. SQL literals are fine here (bench).
Over 500 lines: the drain, probes, profiles, floor comparison and table share one run's state
(the workloads, the server and serve live in bench/workloads.py and bench/common.py)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from pgdurable import __version__
from pgdurable import schema as schema_mod
from pgdurable.harness import HttpRecorder

from . import floor, peers
from .common import (
    LEAF_TYPES,
    POLL_S,
    TERMINAL,
    Progress,
    Server,
    cpu_delta,
    cpu_seconds,
    interrupt,
    make_tenant,
    process_clock,
    start_serve,
    worker_procs,
)
from .workloads import (
    START_BATCH,
    Workload,
    enqueue_batched,
    enqueue_per_txn,
    graph_of,
    reset_instances,
    workloads,
)

# after the drain, idle backends flush their pending stats within PGSTAT_MIN_INTERVAL (1 s)
STATS_FLUSH_S = 1.2

# the targets of docs/performance.md (steps/s) and the best peer measured, for the ratio columns
TARGETS = {"W1": 5_000, "W2": 6_300, "W3": 8_500}
DESIGN_BEST_PEER = {"W1": 631, "W2": 1_265, "W3": 1_707}
DESIGN_DBOS = {"W1": 162, "W2": 224, "W3": 62}


@dataclass
class Row:
    """One workload's figures (None: not measured)."""

    workload: str
    title: str
    instances: int = 0
    steps: int = 0
    failed: int = 0
    drain_s: float = 0.0
    wf_per_s: float = 0.0
    steps_per_s: float = 0.0
    enqueue_txn_per_s: float | None = None
    enqueue_batch_per_s: float | None = None
    commits_per_step: float | None = None
    worker_rss_mb: float | None = None
    worker_cores: float | None = None
    postgres_cores: float | None = None
    cpu_s: float | None = None
    """CPU seconds of the workers and the server's processes from serve's start to done."""
    first_p50_ms: float | None = None
    first_p99_ms: float | None = None
    step_p50_ms: float | None = None
    step_p99_ms: float | None = None
    load_step_p50_ms: float | None = None
    note: str = ""
    top_statements: list[tuple[str, float, int, float, int]] = field(default_factory=list)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def latencies(
    conn: psycopg.Connection[Any], label: str, sequence: bool
) -> tuple[list[float], list[float]]:
    """(start→first-step, step→step) in ms for the instances labelled ``label``."""
    rows = conn.execute(
        """
        select i.id, extract(epoch from i.created_at),
               array_agg(extract(epoch from (n.status_details->>'finished_at')::timestamptz)
                         order by (n.status_details->>'finished_at')::timestamptz)
        from df.instances i join df.nodes n on n.instance_id = i.id
        where i.label = %s and n.node_type = any (%s) and n.status = 'completed'
        group by i.id, i.created_at
        """,
        (label, list(LEAF_TYPES)),
    ).fetchall()
    first, step = [], []
    for _id, created, claims in rows:
        claims = [float(c) for c in claims if c is not None]
        if not claims:
            continue
        first.append((claims[0] - float(created)) * 1000)
        if sequence:
            step += [(b - a) * 1000 for a, b in itertools.pairwise(claims)]
    return first, step


def run_workload(
    server: Server, w: Workload, args: argparse.Namespace, workdir: Path, progress: Progress
) -> Row:
    row = Row(w.name, w.title)
    dbname = f"pgdurable_bench_{w.name.lower()}"
    progress(f"[{w.name}] {w.title}: {w.instances:,} instances × {w.steps_per_instance} steps")
    dsn = server.fresh_db(dbname)
    try:
        schema_mod.install(dsn)
        tenant_dsn = make_tenant(server, dsn, w.http)
        graph = graph_of(tenant_dsn, w.expr)
        tick = progress.tick
        label = w.name.lower()
        # -- enqueue (serve not running) -------------------------------------------------
        if w.name == "W1":
            row.enqueue_txn_per_s = enqueue_per_txn(tenant_dsn, graph, w.instances, label, tick)
            reset_instances(dsn)
            row.enqueue_batch_per_s = enqueue_batched(tenant_dsn, graph, w.instances, label, tick)
        else:
            row.enqueue_txn_per_s = enqueue_per_txn(tenant_dsn, graph, w.instances, label, tick)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("vacuum analyze")
            if server.has_pgss:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("create extension if not exists pg_stat_statements")
                    conn.execute("select pg_stat_statements_reset()")
        time.sleep(STATS_FLUSH_S)
        # -- drain -----------------------------------------------------------------------
        commits0 = server.xact_commit(dbname)
        pg_t0 = process_clock()
        pg0 = cpu_seconds(server.postgres_pids(dbname))
        t0 = time.monotonic()
        serve = start_serve(dsn, args.workers, workdir / f"serve-{w.name}.log")
        polls = 0
        try:
            kids = worker_procs(serve)
            w0 = cpu_seconds(kids)
            peak_rss = 0
            profilers = _start_profilers(kids, workdir, w.name) if args.profile else []
            deadline = time.monotonic() + args.timeout
            last_cps, last_move, stalled = -1, time.monotonic(), ""
            with psycopg.connect(dsn, autocommit=True) as conn:
                while True:
                    done, _failed, cps = conn.execute(
                        "select count(*) filter (where status = any (%s)), "
                        "count(*) filter (where status = 'failed'), "
                        "(select coalesce(sum(state_version), 0) from pgdurable.runs) "
                        "from df.instances",
                        (list(TERMINAL),),
                    ).fetchone()  # type: ignore[misc]
                    polls += 1
                    if cps != last_cps:
                        last_cps, last_move = cps, time.monotonic()
                    for k in kids:
                        with contextlib.suppress(psutil.Error):
                            peak_rss = max(peak_rss, k.memory_info().rss)
                    elapsed = time.monotonic() - t0
                    tick(
                        f"  [{w.name}] drained {done:,}/{w.instances:,} instances, "
                        f"{cps:,} checkpoints ({elapsed:.1f} s, "
                        f"peak worker RSS {peak_rss / 2**20:.0f} MB)"
                    )
                    if done >= w.instances:
                        break
                    if time.monotonic() - last_move > args.stall_seconds:
                        stalled = (
                            f"STALLED: {done:,}/{w.instances:,} instances finished, "
                            f"no checkpoint for {args.stall_seconds:.0f} s"
                        )
                        progress(f"  [{w.name}] {stalled}")
                        break
                    if time.monotonic() > deadline or not serve.running():
                        raise RuntimeError(
                            f"{w.name}: {done}/{w.instances} finished before "
                            f"the timeout; serve log:\n{serve.log()}"
                        )
                    time.sleep(POLL_S)
                wall = time.monotonic() - t0
                w1 = cpu_seconds(kids)
                # a process not sampled at the start but older than it (one that came to
                # serve this database meanwhile, or a reused pid): its CPU before is unknown
                pg1 = cpu_seconds(
                    [
                        p
                        for p in server.postgres_pids(dbname)
                        if p.pid in pg0 or _created(p) >= pg_t0 - 0.5
                    ]
                )
                for p in profilers:
                    p.send_signal(signal.SIGINT)
                time.sleep(STATS_FLUSH_S)
                commits1 = server.xact_commit(dbname)
                # -- figures from the database --------------------------------------------
                r = conn.execute(
                    """
                    select count(*), count(*) filter (where status = 'failed'),
                           extract(epoch from max(completed_at))
                    from df.instances where label = %s
                    """,
                    (label,),
                ).fetchone()
                assert r is not None
                row.instances, row.failed = int(r[0]), int(r[1])
                last = float(r[2] or 0)
                r2 = conn.execute(
                    """
                    select count(*) filter (where n.node_type = any (%s)
                                              and n.status = 'completed'),
                           extract(epoch from min((n.status_details->>'started_at')::timestamptz))
                    from df.nodes n join df.instances i on i.id = n.instance_id
                    where i.label = %s
                    """,
                    (list(LEAF_TYPES), label),
                ).fetchone()
                assert r2 is not None
                row.steps = int(r2[0])
                first_claim = float(r2[1] or last)
                row.drain_s = max(last - first_claim, 0.0)
                finished = done if stalled else row.instances
                row.wf_per_s = finished / row.drain_s if row.drain_s else 0.0
                row.steps_per_s = row.steps / row.drain_s if row.drain_s else 0.0
                row.commits_per_step = (commits1 - commits0 - polls) / max(row.steps, 1)
                row.worker_rss_mb = peak_rss / 2**20
                row.worker_cores = cpu_delta(w0, w1) / wall
                row.postgres_cores = cpu_delta(pg0, pg1) / wall
                row.cpu_s = cpu_delta(w0, w1) + cpu_delta(pg0, pg1)
                _first, load_step = latencies(conn, label, w.sequence)
                row.load_step_p50_ms = pct(load_step, 50)
                if server.has_pgss:
                    with contextlib.suppress(psycopg.Error):
                        row.top_statements = [
                            (" ".join(str(q).split())[:110], float(t), int(c), float(pt), int(pc))
                            for q, t, c, pt, pc in conn.execute(
                                "select query, total_exec_time, calls, total_plan_time, plans "
                                "from pg_stat_statements "
                                "where dbid = (select oid from pg_database "
                                "where datname = current_database()) "
                                "order by total_exec_time desc limit 16"
                            ).fetchall()
                        ]
                # -- latency under light load: probes started one at a time ---------------
                if stalled:
                    row.note = stalled
                    raise _Stalled()
                probes = max(1, round(w.probes * min(1.0, args.scale * 10)))
                with psycopg.connect(tenant_dsn, autocommit=True) as tconn:
                    for i in range(probes):
                        tconn.execute("select df.start(%s::text, 'probe')", (graph,))
                        tick(f"  [{w.name}] latency probe {i + 1}/{probes}")
                        time.sleep(args.probe_gap)
                probe_deadline = time.monotonic() + args.stall_seconds
                while True:
                    r3 = conn.execute(
                        "select count(*) from df.instances where label = 'probe' "
                        "and status <> all (%s)",
                        (list(TERMINAL),),
                    ).fetchone()
                    if not r3 or r3[0] == 0:
                        break
                    if time.monotonic() > probe_deadline:
                        row.note = (
                            f"latency probe STALLED: {r3[0]} of {probes} probe "
                            f"instances unfinished after {args.stall_seconds:.0f} s"
                        )
                        progress(f"  [{w.name}] {row.note}")
                        break
                    time.sleep(0.05)
                first, step = latencies(conn, "probe", w.sequence)
                row.first_p50_ms, row.first_p99_ms = pct(first, 50), pct(first, 99)
                row.step_p50_ms, row.step_p99_ms = pct(step, 50), pct(step, 99)
            for p in profilers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=30)
        except _Stalled:
            pass
        finally:
            serve.stop(strict=False)
            serve.cleanup()
        if row.failed:
            row.note = "; ".join(x for x in (row.note, f"{row.failed} instance(s) failed") if x)
        progress(
            f"  [{w.name}] {row.steps_per_s:,.0f} steps/s, {row.wf_per_s:,.0f} workflows/s "
            f"over {row.drain_s:.2f} s"
        )
        return row
    finally:
        if not args.keep:
            server.drop_db(dbname)


class _Stalled(Exception):
    """The drain made no progress for --stall-seconds: report what finished, move on."""


def _start_profilers(
    kids: list[psutil.Process], workdir: Path, name: str
) -> list[subprocess.Popen[bytes]]:
    """py-spy on each worker for the drain (``--profile``); raw collapsed stacks."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return []
    out = []
    for k in kids:
        path = workdir / f"pyspy-{name}-{k.pid}.txt"
        out.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(k.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--nonblocking",
                    "--output",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return out


def summarize_profiles(workdir: Path, name: str) -> list[tuple[str, float]]:
    """Share of worker samples by component (own frames, leaf-most pgdurable/library)."""
    buckets: dict[str, int] = {}
    total = 0
    for path in workdir.glob(f"pyspy-{name}-*.txt"):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            leaf = frames[-1] if frames else ""
            bucket = _bucket(leaf, frames)
            buckets[bucket] = buckets.get(bucket, 0) + n
    if not total:
        return []
    return sorted(((b, c / total) for b, c in buckets.items()), key=lambda x: -x[1])


def _bucket(leaf: str, frames: list[str]) -> str:
    if "graph/sched" in leaf or "_sched_" in leaf or "graph/_" in leaf:
        return "scheduler (pgdurable/graph)"
    for key, label in (
        ("psycopg_pool", "psycopg_pool"),
        ("psycopg", "psycopg (driver)"),
        ("uvloop", "event loop"),
        ("asyncio", "event loop"),
        ("orjson", "orjson"),
        ("logging", "logging"),
        ("httpx", "httpx/httpcore"),
        ("httpcore", "httpx/httpcore"),
        ("pgdurable/", "pgdurable (other)"),
    ):
        if key in leaf:
            return label
    if "select" in leaf or "epoll" in leaf or "poll" in leaf:
        return "idle/waiting"
    return "other: " + leaf.split(" (")[0][:40]


# -- the table ------------------------------------------------------------------------


def _created(p: psutil.Process) -> float:
    """When ``p`` started, on :func:`process_clock`'s clock (0 when it is gone)."""
    try:
        return float(p.create_time())
    except psutil.Error:
        return 0.0


def _cpu_per_step(r: Row) -> float | None:
    """CPU per step in ms, worker + PostgreSQL: their CPU seconds from serve's start to done
    over the steps. (Until session 9 it was (worker cores + PG cores) * 1,000 / steps/s, the
    cores averaged from serve's start and steps/s over the first step to the last: that
    counted the CPU of the drain's window only in the ratio of the two windows, short of the
    whole by serve's start-up, a quarter of a 3-second run.)"""
    if r.cpu_s is None or not r.steps:
        return None
    return r.cpu_s * 1000 / r.steps


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(
    rows: list[Row],
    floors: list[floor.FloorResult],
    peer_rows: list[peers.PeerRow],
    server: Server,
    args: argparse.Namespace,
) -> str:
    best64 = max((f.rows_per_s for f in floors if f.batch > 1), default=0.0)
    best1 = max((f.rows_per_s for f in floors if f.batch == 1), default=0.0)
    out = []
    out.append(
        f"pgdurable {__version__} · PostgreSQL {server.version} "
        f"(synchronous_commit={server.sync_commit}, fsync={server.fsync}, "
        f"shared_buffers={server.shared_buffers}) · {os.cpu_count()} cores · "
        f"Python {platform.python_version()} · serve workers={args.workers} · "
        f"scale={args.scale:g}"
    )
    out.append("")
    out.append("| measurement | rows/s |")
    out.append("|---|---:|")
    for f in floors:
        out.append(f"| {f.label} | {f.rows_per_s:,.0f} |")
    out.append("")
    hdr = (
        "| workload | instances | steps | workflows/s | steps/s | ÷ floor 64/commit "
        "| ÷ floor 1/commit | ÷ DESIGN target | start→1st p50/p99 ms | step→step p50/p99 ms "
        "| commits/step | worker RSS MB | worker / PG cores | CPU/step ms |"
    )
    out.append(hdr)
    out.append("|---|" + "---:|" * 13)
    for r in rows:
        target = TARGETS.get(r.workload)
        out.append(
            f"| {r.workload} {r.title} | {r.instances:,} | {r.steps:,} | {r.wf_per_s:,.0f} "
            f"| {r.steps_per_s:,.0f} "
            f"| {_f(r.steps_per_s / best64 if best64 else None, '{:.1%}')} "
            f"| {_f(r.steps_per_s / best1 if best1 else None, '{:.2f}×')} "
            f"| {_f(r.steps_per_s / target if target else None, '{:.1%}')} "
            f"| {_f(r.first_p50_ms, '{:.1f}')} / {_f(r.first_p99_ms, '{:.1f}')} "
            f"| {_f(r.step_p50_ms, '{:.1f}')} / {_f(r.step_p99_ms, '{:.1f}')} "
            f"| {_f(r.commits_per_step, '{:.2f}')} | {_f(r.worker_rss_mb)} "
            f"| {_f(r.worker_cores, '{:.2f}')} / {_f(r.postgres_cores, '{:.2f}')} "
            f"| {_f(_cpu_per_step(r), '{:.3f}')} |"
        )
    out.append("")
    enq = [r for r in rows if r.enqueue_txn_per_s]
    if enq:
        out.append(
            "| enqueue | df.start per transaction (starts/s) "
            f"| per-row starts, {START_BATCH:,} per statement (starts/s) |"
        )
        out.append("|---|---:|---:|")
        for r in enq:
            out.append(
                f"| {r.workload} | {_f(r.enqueue_txn_per_s)} | {_f(r.enqueue_batch_per_s)} |"
            )
        out.append("")
    if peer_rows:
        out.append("| peer | workload | steps/s | pgdurable ÷ peer | note |")
        out.append("|---|---|---:|---:|---|")
        ours = {r.workload: r.steps_per_s for r in rows}
        for p in peer_rows:
            mine = ours.get(p.workload, 0.0)  # 0: pgdurable did not measure it: '-', not 0x
            ratio = mine / p.steps_per_s if p.steps_per_s and mine else None
            out.append(
                f"| {p.peer} | {p.workload} | {_f(p.steps_per_s or None)} "
                f"| {_f(ratio, '{:.2f}×')} | {p.note} |"
            )
        out.append("")
    notes = [f"{r.workload}: {r.note}" for r in rows if r.note]
    if notes:
        out.append("notes: " + "; ".join(notes))
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dsn",
        help="an existing PostgreSQL (superuser); default: an embedded "
        "PostgreSQL 18 in a temporary directory",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply every workload size")
    p.add_argument("--workers", type=int, default=2, help="serve worker processes")
    p.add_argument("--workloads", default="W1,W2,W3,W4", help="comma separated subset")
    p.add_argument(
        "--floor-seconds",
        type=float,
        default=None,
        help="seconds per floor variant (default 3 × scale, 0.3–3)",
    )
    p.add_argument(
        "--peers",
        default="",
        help="comma separated: dbos,procrastinate (installed with the 'bench' extra)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the workers and pg_stat_statements (embedded PG only)",
    )
    p.add_argument(
        "--probe-gap",
        type=float,
        default=0.02,
        help="seconds between latency probe starts (light load)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="per workload drain timeout")
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=60,
        help="give up on a workload after this long without a checkpoint",
    )
    p.add_argument("--json", dest="json_path", help="also write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(args.quiet)
    # SIGTERM (CI timeouts, kill) unwinds like ^C so serve and the embedded server stop
    signal.signal(signal.SIGTERM, interrupt)
    server = Server(args.dsn, args.profile)
    workdir = Path(tempfile.mkdtemp(prefix="pgdurable-bench-run-"))
    progress(
        f"PostgreSQL {server.version} at "
        f"{psycopg.conninfo.conninfo_to_dict(server.admin_dsn).get('port')}; "
        f"logs in {workdir}"
    )
    try:
        wanted = {w.strip().upper() for w in args.workloads.split(",") if w.strip()}
        secs = args.floor_seconds or min(3.0, max(0.3, 3.0 * args.scale))
        scratch = "pgdurable_bench_floor"
        floor_dsn = server.fresh_db(scratch)
        try:
            floors = floor.measure(floor_dsn, secs, progress)
        finally:
            server.drop_db(scratch)
        with HttpRecorder(record=False) as http:
            rows = [
                run_workload(server, w, args, workdir, progress)
                for w in workloads(args.scale, http.url + "/ok")
                if w.name in wanted
            ]
        peer_rows: list[peers.PeerRow] = []
        for name in [p.strip() for p in args.peers.split(",") if p.strip()]:
            peer_rows += peers.run(name, server, args, progress)
        table = render(rows, floors, peer_rows, server, args)
        print(table)
        if args.profile:
            for r in rows:
                shares = summarize_profiles(workdir, r.workload)
                if shares:
                    print(
                        f"\n{r.workload} worker samples (py-spy): "
                        + ", ".join(f"{b} {s:.0%}" for b, s in shares[:8])
                    )
                if r.top_statements:
                    print(
                        f"{r.workload} top statements by total time (pg_stat_statements; "
                        "execution, then planning):"
                    )
                    for q, t, c, pt, pc in r.top_statements:
                        print(f"  {t:8,.0f} ms {c:7,} calls | {pt:6,.0f} ms {pc:7,} plans  {q}")
        if args.json_path:
            Path(args.json_path).write_text(
                json.dumps(
                    {
                        "server": {
                            "version": server.version,
                            "synchronous_commit": server.sync_commit,
                            "fsync": server.fsync,
                        },
                        "scale": args.scale,
                        "workers": args.workers,
                        "workloads": [asdict(r) for r in rows],
                        "floor": [asdict(f) | {"rows_per_s": f.rows_per_s} for f in floors],
                        "peers": [asdict(p) for p in peer_rows],
                    },
                    indent=2,
                    default=str,
                )
            )
        bad = [r for r in rows if r.failed or r.instances == 0]
        return 1 if bad else 0
    finally:
        server.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
