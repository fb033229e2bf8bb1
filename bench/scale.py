"""The scale checks of docs/performance.md, Targets (issue #6): ``python -m bench.scale``.

Three checks, each in a fresh database of the server under test (``--dsn`` or an embedded
PostgreSQL 18 like ``python -m bench``), each against a real ``python -m pgdurable serve``
subprocess (:class:`pgdurable.harness.Serve`, through bench/common.py). Sizes are multiplied
by ``--scale``.

finished   1,000,000 finished instances in the tables cost < 10 % throughput.
           Measures bench/workloads.py's W2 (1,000 ten-step sequences
           ``df.sql('select 1') ~> …``) on the empty database, then runs one real instance
           of each of six shapes to a terminal state (one step, ten steps, named results,
           signal wait, failed, cancelled),
           clones their rows (df.instances, df.nodes and the engine tables that keep terminal
           rows: pgdurable.runs, pgdurable.results) into 1,000,000 new instances with
           ``INSERT … SELECT … generate_series`` (FK triggers off via
           session_replication_role = replica: the clones are consistent by construction),
           VACUUM ANALYZE, and measures the same workload again in the same database,
           alternating with runs in an empty control database on the same server (on a
           shared box other work comes and goes over minutes; the interleaved ratio is the
           robust one, the sequential same-database ratio is shown too).
           The clones' timestamps lie in the last three days, well inside the default
           retention (pg_durable.retention_days = 30), so serve's pruning (worker/maintenance.py:
           PRUNE_INTERVAL/PRUNE_BATCH, ``_prune_v1`` on ``updated_at``) runs as in production
           but deletes nothing; the check verifies the count afterwards.
scaleout   The same ten-step workload with one ``serve`` vs two ``serve`` processes (separate
           supervisors, as on two hosts) on one database. Every step is
           ``insert into public.scale_ledger (instance_id, k) values ('{sys_instance_id}', k)``
           run in the step's own transaction, so the ledger holds exactly one row per executed
           step: the check requires count = distinct (instance, k) = instances x 10.
           The ledger also records which worker ran each row (the worker id its step
           connection registered in ``pgdurable.step_caps``, ``host:<pid>:…``) to show how
           the steps split between the two serves.
memory     10,000 instances ``df.sql('select 1') ~> df.wait_for_signal('go')`` started (serve
           stopped), then serve runs until every instance has executed its first step and is
           parked on its signal (one ``signal`` task each); worker RSS is sampled (psutil on
           serve's children) throughout, and again while all 10,000 are signalled and finish.

How a throughput run is measured (``measure``): serve(s) started and idle first, then all
instances are started in ONE transaction (``select count(df.start(…)) from generate_series``,
1,000 per statement), so every serve sees the whole backlog at the same commit; steps/s =
completed SQL leaves / (first claim → last ``completed_at``), as bench/harness.py defines it. CPU is
psutil's over the drain: serve's workers, the PostgreSQL cluster's processes (the postmaster
of our connection and its children, not every ``postgres`` on the box) and the whole box;
"rest of box" is the box minus those two (other work on a shared machine, the kernel).
"step-slot waiters" is the mean number of backends of the database sleeping in
``_step_slot_v1`` (every one of the engine-wide pg_durable.max_user_connections step slots
busy; ``--max-user-connections`` raises it). Each run starts after a CHECKPOINT. Ratios are
of the best of ``--repeats`` runs per configuration (other work on a shared box only slows a
run down); medians are shown too. scaleout interleaves 1-serve and 2-serve runs.

flood      100,000 starts in one transaction and a burst of 10,000 signals against a running
           serve: drain, probe latency, worker RSS, sessions vs the pools
           (bench/scale_flood.py; only when named).

Owns: these checks and their table. SQL literals are fine here (bench).
Over 500 lines: three checks (finished, scaleout, memory), each with its measurement
and report, sharing one database and serve helper; each check reads top to bottom.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from pgdurable import __version__
from pgdurable import schema as schema_mod

from . import scale_flood as flood
from . import scale_limits as lim
from .common import (
    LEAF_TYPES,
    POLL_S,
    TENANT,
    TERMINAL,
    Progress,
    Server,
    cpu_delta,
    cpu_seconds,
    interrupt,
    make_tenant,
    start_serve,
    worker_procs,
)
from .workloads import START_BATCH, enqueue_batched, graph_of, workloads

ENGINE = "pgdurable"  # schema_mod.install's default engine schema
ONE = "df.sql('select 1')"
# base sizes (x --scale); the throughput workload is workloads()'s W2
FINISHED_N = 1_000_000
MEMORY_N = 10_000
# docs/performance.md, Targets targets
TARGET_FINISHED_RATIO = 0.90
TARGET_SCALEOUT_RATIO = 1.7
TARGET_RSS_MB = 150.0
# instances cloned per INSERT … SELECT statement
CLONE_CHUNK = 100_000
# after the workers are up: let their producers LISTEN and settle before the backlog lands
SETTLE_S = 1.0
# odd multiplier: g -> g * K mod 2^32 is a bijection, so cloned ids are distinct and scattered
# over the id space like df.start's random ones (same btree insert pattern)
ID_MULT = 2654435761
LEDGER = "public.scale_ledger"


def _n(base: int, scale: float, least: int = 1) -> int:
    return max(least, round(base * scale))


def seq10(step: Callable[[int], str]) -> str:
    """Ten steps in a sequence: ``step(1) ~> … ~> step(10)``."""
    return " ~> ".join(step(k) for k in range(1, 11))


def w2(scale: float) -> tuple[int, str]:
    """workloads()'s W2: (instances, DSL expression of ten ``df.sql('select 1')``)."""
    w = next(w for w in workloads(scale, "http://127.0.0.1/unused") if w.name == "W2")
    return max(2, w.instances), w.expr


def ledger_step(k: int) -> str:
    """A DSL step that records its own execution (SQL text inside a DSL string literal)."""
    return (
        "df.sql('insert into " + LEDGER + " (instance_id, k) "
        "values (''{sys_instance_id}'', " + str(k) + ")')"
    )


# -- the PostgreSQL cluster's processes -------------------------------------------------


def cluster_procs(server: Server) -> list[psutil.Process]:
    """The postmaster of the server under test and its children (backends, walwriter…).

    common.Server.postgres_pids() takes every ``postgres`` process on the box; on a shared
    machine other clusters (embedded ones of other test runs) would be counted too.
    """
    with server.admin() as conn:
        row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    try:
        post = psutil.Process(int(row[0])).parent()
        if post is None:
            return []
        return [post, *post.children()]
    except psutil.Error:
        return server.postgres_pids()


def _box_busy(t0: Any, t1: Any) -> float:
    """Busy CPU seconds of the whole box between two psutil.cpu_times() samples."""
    idle = (t1.idle - t0.idle) + (getattr(t1, "iowait", 0) - getattr(t0, "iowait", 0))
    total = sum(t1) - sum(t0)
    return float(max(total - idle, 0.0))


def _max_rss(kids: list[psutil.Process]) -> dict[int, int]:
    out = {}
    for k in kids:
        with contextlib.suppress(psutil.Error):
            out[k.pid] = k.memory_info().rss
    return out


# -- one throughput run -----------------------------------------------------------------


@dataclass
class Run:
    """One drain of ``instances`` ten-step sequences by ``serves`` serve processes."""

    label: str
    serves: int
    workers: int
    instances: int = 0
    steps: int = 0
    failed: int = 0
    drain_s: float = 0.0
    steps_per_s: float = 0.0
    worker_cores: list[float] = field(default_factory=list)  # per serve
    postgres_cores: float = 0.0
    box_cores: float = 0.0
    peak_rss_mb: float = 0.0
    slot_waiters: float = 0.0  # backends in pg_sleep waiting for a step slot, mean over polls
    pg_ms_per_step: float = 0.0  # PostgreSQL CPU per completed step (less noise-prone than /s)
    worker_ms_per_step: float = 0.0
    worker_pids: list[list[int]] = field(default_factory=list)  # per serve
    note: str = ""


def enqueue_atomic(
    tenant_dsn: str, graph: str, n: int, label: str, before_commit: Callable[[], None]
) -> None:
    """``n`` per-row starts, START_BATCH per statement, all in ONE transaction.

    workloads.enqueue_batched commits every statement (it measures enqueue); here every serve
    must see the whole backlog at one instant, so the drain window is the same for all.
    """
    with psycopg.connect(tenant_dsn) as conn:
        done = 0
        while done < n:
            k = min(START_BATCH, n - done)
            conn.execute(
                "select count(df.start(%s::text, %s)) from generate_series(1, %s)",
                (graph, label, k),
            )
            done += k
        before_commit()
        conn.commit()


def measure(
    server: Server,
    dsn: str,
    tenant_dsn: str,
    graph: str,
    n: int,
    label: str,
    serves_n: int,
    args: argparse.Namespace,
    workdir: Path,
    progress: Progress,
) -> Run:
    run = Run(label, serves_n, args.workers)
    # every run starts without a backlog of dirty pages (a bulk load's writeback would
    # compete with the steps' WAL fsyncs)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("checkpoint")
    env = {"PGDURABLE_SLOTS": str(args.slots)} if args.slots else {}
    serves = [
        start_serve(dsn, args.workers, workdir / f"serve-{label}-{i}.log", env)
        for i in range(serves_n)
    ]
    try:
        kids = [worker_procs(s) for s in serves]
        run.worker_pids = [[k.pid for k in ks] for ks in kids]
        time.sleep(SETTLE_S)
        mark: dict[str, Any] = {}

        def at_commit() -> None:
            mark["w"] = [cpu_seconds(ks) for ks in kids]
            mark["pg"] = cpu_seconds(cluster_procs(server))
            mark["box"] = psutil.cpu_times()
            mark["t"] = time.monotonic()

        enqueue_atomic(tenant_dsn, graph, n, label, at_commit)
        peak = 0
        last, last_move = (-1, -1), time.monotonic()
        deadline = time.monotonic() + args.timeout
        waiters: list[int] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            while True:
                r = conn.execute(
                    """
                    select count(distinct i.id) filter (where i.status = any (%s)),
                           count(*) filter (where n.status = 'completed'),
                           (select count(*) from pg_stat_activity
                            where datname = current_database() and wait_event = 'PgSleep')
                    from df.instances i join df.nodes n on n.instance_id = i.id
                    where i.label = %s
                    """,
                    (list(TERMINAL), label),
                ).fetchone()
                assert r is not None
                done, moved = int(r[0]), int(r[1])
                waiters.append(int(r[2]))
                for ks in kids:
                    peak = max([peak, *_max_rss(ks).values()])
                progress.tick(
                    f"  [{label}] {done:,}/{n:,} instances finished "
                    f"({time.monotonic() - mark['t']:.1f} s)"
                )
                if done >= n:
                    break
                if (done, moved) != last:
                    last, last_move = (done, moved), time.monotonic()
                if time.monotonic() - last_move > args.stall_seconds:
                    run.note = (
                        f"STALLED: {done:,}/{n:,} instances finished, no progress "
                        f"for {args.stall_seconds:.0f} s"
                    )
                    progress(f"  [{label}] {run.note}")
                    break
                dead = [s for s in serves if not s.running()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{label}: {done}/{n} finished; serve log:\n{(dead or serves)[0].log()}"
                    )
                time.sleep(POLL_S)
            wall = time.monotonic() - mark["t"]
            w_cpu = [cpu_delta(w0, cpu_seconds(ks)) for w0, ks in zip(mark["w"], kids, strict=True)]
            pg_cpu = cpu_delta(mark["pg"], cpu_seconds(cluster_procs(server)))
            run.worker_cores = [c / wall for c in w_cpu]
            run.postgres_cores = pg_cpu / wall
            run.box_cores = _box_busy(mark["box"], psutil.cpu_times()) / wall
            run.peak_rss_mb = peak / 2**20
            run.slot_waiters = statistics.mean(waiters) if waiters else 0.0
            r = conn.execute(
                """
                select count(*), count(*) filter (where status = 'failed'),
                       extract(epoch from max(completed_at))
                from df.instances where label = %s
                """,
                (label,),
            ).fetchone()
            assert r is not None
            run.instances, run.failed = int(r[0]), int(r[1])
            last_done = float(r[2] or 0)
            r2 = conn.execute(
                """
                select count(*) filter (where n.node_type = any (%s) and n.status = 'completed'),
                       extract(epoch from min((n.status_details->>'started_at')::timestamptz))
                from df.nodes n join df.instances i on i.id = n.instance_id
                where i.label = %s
                """,
                (list(LEAF_TYPES), label),
            ).fetchone()
            assert r2 is not None
            run.steps = int(r2[0])
            first = float(r2[1] or last_done)
            run.drain_s = max(last_done - first, 0.0)
            run.steps_per_s = run.steps / run.drain_s if run.drain_s else 0.0
            run.pg_ms_per_step = 1000 * pg_cpu / max(run.steps, 1)
            run.worker_ms_per_step = 1000 * sum(w_cpu) / max(run.steps, 1)
    finally:
        for s in serves:
            if s.running() and s.proc is not None:
                s.proc.terminate()  # all of them first: they drain in parallel
        for s in serves:
            s.stop(strict=False)
    if run.failed:
        run.note = "; ".join(x for x in (run.note, f"{run.failed} instance(s) failed") if x)
    progress(
        f"  [{label}] {serves_n} serve(s): {run.steps:,} steps in {run.drain_s:.2f} s = "
        f"{run.steps_per_s:,.0f} steps/s (workers {sum(run.worker_cores):.2f} cores, "
        f"PostgreSQL {run.postgres_cores:.2f}, box {run.box_cores:.2f})"
    )
    return run


def _median_rate(runs: list[Run]) -> float:
    return statistics.median(r.steps_per_s for r in runs) if runs else 0.0


def _best_rate(runs: list[Run]) -> float:
    """The fastest run: other work on a shared box only ever slows a run down."""
    return max((r.steps_per_s for r in runs), default=0.0)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


# -- fresh database per check -----------------------------------------------------------


class Db:
    """A fresh database with pgdurable installed and the bench tenant, dropped on exit."""

    def __init__(self, server: Server, name: str, args: argparse.Namespace) -> None:
        self.server, self.name, self.keep = server, name, args.keep
        self.max_user_connections = args.max_user_connections

    def __enter__(self) -> Db:
        self.dsn = self.server.fresh_db(self.name)
        schema_mod.install(self.dsn)
        if self.max_user_connections:
            with self.admin() as conn:
                conn.execute(
                    sql.SQL("alter database {} set pg_durable.max_user_connections = {}").format(
                        sql.Identifier(self.name), sql.Literal(str(self.max_user_connections))
                    )
                )
        self.tenant_dsn = make_tenant(self.server, self.dsn, False)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            self.server.drop_db(self.name)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)


# -- check 1: finished instances --------------------------------------------------------


@dataclass
class FinishedResult:
    finished: int = 0
    node_rows: int = 0
    templates: dict[str, str] = field(default_factory=dict)  # shape -> status
    load_s: float = 0.0
    vacuum_s: float = 0.0
    table_mb: dict[str, float] = field(default_factory=dict)
    pruned: int = 0
    before: list[Run] = field(default_factory=list)  # same database, before the load
    after: list[Run] = field(default_factory=list)
    control: list[Run] = field(default_factory=list)  # empty database, alternating with after
    rate_before: float = 0.0  # best of the runs
    rate_after: float = 0.0
    ratio: float = 0.0  # best after / best before
    median_before: float = 0.0
    median_after: float = 0.0
    median_ratio: float = 0.0
    rate_control: float = 0.0
    median_control: float = 0.0
    control_ratio: float = 0.0  # best after / best control
    control_median_ratio: float = 0.0
    pg_cpu_ratio: float = 0.0  # PostgreSQL CPU per step, after ÷ control, mean over the pairs
    note: str = ""


# the terminal shapes cloned into the finished population: (name, DSL expression)
TEMPLATES = [
    ("one step", ONE),
    ("ten steps", seq10(lambda k: ONE)),
    (
        "named results",
        "df.sql('select 1 as a') |=> 'a' ~> df.sql('select $a + 1 as b') "
        "|=> 'b' ~> df.sql('select $b * 2')",
    ),
    ("signal wait", ONE + " ~> df.wait_for_signal('go')"),
    ("failed", "df.sql('select 1/0')"),
    ("cancelled", ONE + " ~> df.sleep(3600)"),
]


def _run_templates(
    db: Db, args: argparse.Namespace, workdir: Path, progress: Progress
) -> dict[str, tuple[str, str]]:
    """Run one instance of each template shape to a terminal state: shape -> (id, status)."""
    ids: dict[str, str] = {}
    with psycopg.connect(db.tenant_dsn, autocommit=True) as t:
        for name, expr in TEMPLATES:
            row = t.execute(f"select df.start({expr}, 'history')").fetchone()  # our own text
            assert row is not None
            ids[name] = str(row[0])
        # the signal inbox is durable: send it now, the wait consumes it when it gets there
        t.execute("select df.signal(%s, 'go')", (ids["signal wait"],))
    serve = start_serve(db.dsn, 1, workdir / "serve-templates.log")
    try:
        serve.wait_workers(timeout=60)
        deadline = time.monotonic() + 120
        cancelled = False
        with db.admin() as conn, psycopg.connect(db.tenant_dsn, autocommit=True) as t:
            while True:
                if (
                    not cancelled
                    and conn.execute(
                        f"select 1 from {ENGINE}.tasks where instance_id = %s and kind = 'timer'",
                        (ids["cancelled"],),
                    ).fetchone()
                ):
                    t.execute(
                        "select df.cancel(%s, 'bench: a cancelled shape')", (ids["cancelled"],)
                    )
                    cancelled = True
                st = dict(
                    conn.execute(
                        "select id, status from df.instances where id = any (%s)",
                        (list(ids.values()),),
                    ).fetchall()
                )
                if all(s in TERMINAL for s in st.values()):
                    break
                if time.monotonic() > deadline or not serve.running():
                    raise RuntimeError(f"template instances did not finish: {st}\n{serve.log()}")
                time.sleep(0.1)
    finally:
        serve.stop(strict=False)
    progress("  templates: " + ", ".join(f"{k} {st[v]}" for k, v in ids.items()))
    return {k: (v, st[v]) for k, v in ids.items()}


def _columns(conn: psycopg.Connection[Any], table: str) -> list[tuple[str, str]]:
    schema, name = table.split(".")
    return [
        (str(c), str(t))
        for c, t in conn.execute(
            """
        select column_name, data_type from information_schema.columns
        where table_schema = %s and table_name = %s
          and is_generated = 'NEVER' and is_identity = 'NO'
        order by ordinal_position
        """,
            (schema, name),
        ).fetchall()
    ]


def _clone_sql(conn: psycopg.Connection[Any], table: str, id_col: str) -> sql.Composed:
    """INSERT … SELECT cloning ``table``'s rows of template instances for a range of g.

    Every column is copied except the instance id (the clone's) and timestamps, which are
    shifted back by the clone's random age. Built from the catalog so a new column is cloned
    too.
    """
    cols = _columns(conn, table)
    exprs: list[sql.Composable] = []
    for c, t in cols:
        if c == id_col:
            exprs.append(sql.SQL("m.id"))
        elif t.startswith("timestamp"):
            exprs.append(sql.SQL("s.{} - m.age").format(sql.Identifier(c)))
        else:
            exprs.append(sql.SQL("s.{}").format(sql.Identifier(c)))
    schema, name = table.split(".")
    return sql.SQL(
        "insert into {tbl} ({cols}) select {exprs} from scale_clone_map m "
        "join {tbl} s on s.{idc} = m.tmpl where m.g between %s and %s"
    ).format(
        tbl=sql.Identifier(schema, name),
        cols=sql.SQL(", ").join(sql.Identifier(c) for c, _ in cols),
        exprs=sql.SQL(", ").join(exprs),
        idc=sql.Identifier(id_col),
    )


# engine/contract tables that keep rows of a terminal instance, and their instance id column
# (pgdurable.tasks rows are deleted by the checkpoint that ends them; signals are consumed)
CLONED = [
    ("df.instances", "id"),
    ("df.nodes", "instance_id"),
    (f"{ENGINE}.runs", "instance_id"),
    (f"{ENGINE}.results", "instance_id"),
]


def load_finished(db: Db, n: int, template_ids: list[str], progress: Progress) -> float:
    """Clone the template instances into ``n`` finished instances; returns seconds."""
    t0 = time.monotonic()
    with db.admin() as conn:
        conn.execute("drop table if exists scale_clone_map")
        conn.execute(
            "create unlogged table scale_clone_map (g integer primary key, "
            "id varchar(8) not null, tmpl varchar(8) not null, age interval not null)"
        )
        # ids: g * ID_MULT mod 2^32 (distinct), minus any that a live instance already has
        conn.execute(
            """
            insert into scale_clone_map
            select g, lpad(to_hex((g::bigint * %s) %% 4294967296), 8, '0'),
                   (%s::varchar[])[1 + g %% %s],
                   make_interval(secs => random() * 3 * 86400)
            from generate_series(1, %s) g
            """,
            (ID_MULT, template_ids, len(template_ids), n),
        )
        conn.execute("delete from scale_clone_map m using df.instances i where i.id = m.id")
        conn.execute("analyze scale_clone_map")
        stmts = [_clone_sql(conn, table, idc) for table, idc in CLONED]
        # the clones are consistent by construction (every node of a template, its runs row):
        # skip the deferred FK triggers, which would dominate the load
        conn.execute("set session_replication_role = replica")
        for lo in range(1, n + 1, CLONE_CHUNK):
            hi = min(n, lo + CLONE_CHUNK - 1)
            with conn.transaction():
                for stmt in stmts:
                    conn.execute(stmt, (lo, hi))
            progress.tick(
                f"  cloned {hi:,}/{n:,} finished instances ({time.monotonic() - t0:.0f} s)"
            )
        conn.execute("reset session_replication_role")
        conn.execute("drop table scale_clone_map")
    return time.monotonic() - t0


def check_finished(
    server: Server, args: argparse.Namespace, workdir: Path, progress: Progress
) -> FinishedResult:
    res = FinishedResult()
    n_fin = _n(FINISHED_N, args.scale)
    n_wl, expr = w2(args.scale)
    progress(
        f"[finished] {n_wl:,} ten-step sequences on an empty database, then with "
        f"{n_fin:,} finished instances"
    )
    with (
        Db(server, "pgdurable_scale_finished", args) as db,
        Db(server, "pgdurable_scale_control", args) as ctl,
    ):
        graph = graph_of(db.tenant_dsn, expr)
        ctl_graph = graph_of(ctl.tenant_dsn, expr)
        for i in range(args.repeats):
            res.before.append(
                measure(
                    server,
                    db.dsn,
                    db.tenant_dsn,
                    graph,
                    n_wl,
                    f"empty-{i + 1}",
                    1,
                    args,
                    workdir,
                    progress,
                )
            )
        tmpl = _run_templates(db, args, workdir, progress)
        res.templates = {k: st for k, (_id, st) in tmpl.items()}
        res.load_s = load_finished(db, n_fin, [i for i, _st in tmpl.values()], progress)
        t0 = time.monotonic()
        with db.admin() as conn:
            conn.execute("vacuum analyze")
            res.vacuum_s = time.monotonic() - t0
            r = conn.execute("select count(*) from df.instances where label = 'history'").fetchone()
            assert r is not None
            res.finished = int(r[0])
            r = conn.execute(
                "select count(*) from df.nodes n join df.instances i "
                "on i.id = n.instance_id where i.label = 'history'"
            ).fetchone()
            assert r is not None
            res.node_rows = int(r[0])
            for table, _idc in CLONED:
                r = conn.execute("select pg_total_relation_size(%s::regclass)", (table,)).fetchone()
                res.table_mb[table] = int(r[0]) / 2**20 if r else 0.0
        progress(
            f"  loaded {res.finished:,} finished instances ({res.node_rows:,} nodes) in "
            f"{res.load_s:.0f} s, vacuum analyze {res.vacuum_s:.0f} s"
        )
        # interleaved with an empty control database on the same server, so other work on
        # the box (which comes and goes over minutes) hits both alike
        for i in range(args.repeats):
            res.control.append(
                measure(
                    server,
                    ctl.dsn,
                    ctl.tenant_dsn,
                    ctl_graph,
                    n_wl,
                    f"control-{i + 1}",
                    1,
                    args,
                    workdir,
                    progress,
                )
            )
            res.after.append(
                measure(
                    server,
                    db.dsn,
                    db.tenant_dsn,
                    graph,
                    n_wl,
                    f"full-{i + 1}",
                    1,
                    args,
                    workdir,
                    progress,
                )
            )
        with db.admin() as conn:
            r = conn.execute("select count(*) from df.instances where label = 'history'").fetchone()
            assert r is not None
            res.pruned = res.finished - int(r[0])
    res.rate_before, res.rate_after = _best_rate(res.before), _best_rate(res.after)
    res.ratio = _ratio(res.rate_after, res.rate_before)
    res.median_before, res.median_after = _median_rate(res.before), _median_rate(res.after)
    res.median_ratio = _ratio(res.median_after, res.median_before)
    res.rate_control, res.median_control = _best_rate(res.control), _median_rate(res.control)
    res.control_ratio = _ratio(res.rate_after, res.rate_control)
    res.control_median_ratio = _ratio(res.median_after, res.median_control)
    pairs = [
        _ratio(a.pg_ms_per_step, c.pg_ms_per_step)
        for c, a in zip(res.control, res.after, strict=True)
        if c.pg_ms_per_step
    ]
    res.pg_cpu_ratio = statistics.mean(pairs) if pairs else 0.0
    notes = [f"{r.label}: {r.note}" for r in res.before + res.control + res.after if r.note]
    if res.pruned:
        notes.append(f"{res.pruned:,} finished instances were pruned during the measurement")
    res.note = "; ".join(notes)
    return res


# -- check 2: scale-out -----------------------------------------------------------------


@dataclass
class ScaleoutResult:
    instances: int = 0
    one: list[Run] = field(default_factory=list)
    two: list[Run] = field(default_factory=list)
    rate_one: float = 0.0  # best of the runs
    rate_two: float = 0.0
    ratio: float = 0.0  # best 2-serve / best 1-serve
    median_one: float = 0.0
    median_two: float = 0.0
    median_ratio: float = 0.0
    expected_rows: int = 0
    ledger_rows: int = 0
    distinct_rows: int = 0
    duplicates: int = 0
    missing: int = 0
    steps_by_serve: list[int] = field(default_factory=list)  # 2-serve runs, summed
    note: str = ""


def check_scaleout(
    server: Server, args: argparse.Namespace, workdir: Path, progress: Progress
) -> ScaleoutResult:
    res = ScaleoutResult()
    n, _expr = w2(args.scale)
    res.instances = n
    progress(
        f"[scaleout] {n:,} ten-step ledger sequences: 1 serve vs 2 serves "
        f"({args.workers} worker(s) each)"
    )
    with Db(server, "pgdurable_scale_scaleout", args) as db:
        with db.admin() as conn:
            # the worker that ran a step: its step connection's registration (a step's
            # application_name names the instance and node, not the worker)
            conn.execute(
                "create function public.scale_worker() returns text language sql "
                "stable security definer set search_path = pg_catalog, pg_temp as "
                "$$ select c.worker_id from pgdurable.step_caps c "
                "where c.pid = pg_backend_pid() $$"
            )
            conn.execute(
                f"create table {LEDGER} (instance_id text not null, k int not null, "
                "app text default public.scale_worker(), "
                "at timestamptz default clock_timestamp())"
            )
            conn.execute(
                sql.SQL("grant insert on {} to {}").format(sql.SQL(LEDGER), sql.Identifier(TENANT))
            )
            conn.execute(
                sql.SQL("grant execute on function public.scale_worker() to {}").format(
                    sql.Identifier(TENANT)
                )
            )
        graph = graph_of(db.tenant_dsn, seq10(ledger_step))
        for i in range(args.repeats):
            res.one.append(
                measure(
                    server,
                    db.dsn,
                    db.tenant_dsn,
                    graph,
                    n,
                    f"one-{i + 1}",
                    1,
                    args,
                    workdir,
                    progress,
                )
            )
            res.two.append(
                measure(
                    server,
                    db.dsn,
                    db.tenant_dsn,
                    graph,
                    n,
                    f"two-{i + 1}",
                    2,
                    args,
                    workdir,
                    progress,
                )
            )
        with db.admin() as conn:
            r = conn.execute(
                f"""
                select count(*), count(distinct (l.instance_id, l.k))
                from {LEDGER} l join df.instances i on i.id = l.instance_id
                where i.label ~ '^(one|two)-'
                """
            ).fetchone()
            assert r is not None
            res.ledger_rows, res.distinct_rows = int(r[0]), int(r[1])
            res.expected_rows = 10 * sum(x.instances for x in res.one + res.two)
            res.duplicates = res.ledger_rows - res.distinct_rows
            res.missing = res.expected_rows - res.distinct_rows
            stray = conn.execute(
                f"select count(*) from {LEDGER} l where not exists "
                "(select 1 from df.instances i where i.id = l.instance_id)"
            ).fetchone()
            by_app = dict(
                conn.execute(
                    f"""
                select l.app, count(*) from {LEDGER} l
                join df.instances i on i.id = l.instance_id
                where i.label ~ '^two-' group by l.app
                """
                ).fetchall()
            )
        res.steps_by_serve = [0, 0]
        for run in res.two:
            for si, pids in enumerate(run.worker_pids):
                # steps run on the worker's step connections (worker id host:<pid>:<hex>)
                mine = {str(p) for p in pids}
                res.steps_by_serve[si] += sum(
                    int(n)
                    for app, n in by_app.items()
                    if app and app.split(":")[1:2] and app.split(":")[1] in mine
                )
    res.rate_one, res.rate_two = _best_rate(res.one), _best_rate(res.two)
    res.ratio = _ratio(res.rate_two, res.rate_one)
    res.median_one, res.median_two = _median_rate(res.one), _median_rate(res.two)
    res.median_ratio = _ratio(res.median_two, res.median_one)
    notes = [f"{r.label}: {r.note}" for r in res.one + res.two if r.note]
    if stray and stray[0]:
        notes.append(f"{stray[0]} ledger rows of no instance")
    res.note = "; ".join(notes)
    return res


# -- check 3: memory --------------------------------------------------------------------


@dataclass
class MemoryResult:
    instances: int = 0
    workers: int = 0
    parked: int = 0
    park_s: float = 0.0
    rss_parked_mb: list[float] = field(default_factory=list)  # per worker, all parked
    uss_parked_mb: list[float] = field(default_factory=list)  # unique set size, same moment
    peak_rss_load_mb: float = 0.0  # max over workers while loading/parking
    peak_rss_resume_mb: float = 0.0  # max over workers while all are signalled and finish
    completed: int = 0
    resume_s: float = 0.0
    note: str = ""

    @property
    def max_rss_mb(self) -> float:
        return max([self.peak_rss_load_mb, self.peak_rss_resume_mb, *self.rss_parked_mb])


def check_memory(
    server: Server, args: argparse.Namespace, workdir: Path, progress: Progress
) -> MemoryResult:
    res = MemoryResult()
    n = _n(MEMORY_N, args.scale, 2)
    res.instances, res.workers = n, args.memory_workers
    progress(f"[memory] {n:,} instances parked on a signal, {res.workers} worker(s)")
    with Db(server, "pgdurable_scale_memory", args) as db:
        graph = graph_of(db.tenant_dsn, ONE + " ~> df.wait_for_signal('go')")
        enqueue_batched(db.tenant_dsn, graph, n, "mem", progress.tick)
        with db.admin() as conn:
            conn.execute("vacuum analyze")
        env = {"PGDURABLE_SLOTS": str(args.slots)} if args.slots else {}
        serve = start_serve(db.dsn, res.workers, workdir / "serve-memory.log", env)
        try:
            kids = worker_procs(serve)
            t0 = time.monotonic()
            peak = 0
            last, last_move = -1, time.monotonic()
            with db.admin() as conn:
                # phase 1: every instance runs its SQL step and parks on its signal
                while True:
                    r = conn.execute(
                        f"select count(*) filter (where kind = 'signal'), count(*) "
                        f"from {ENGINE}.tasks"
                    ).fetchone()
                    assert r is not None
                    parked, left = int(r[0]), int(r[1])
                    peak = max([peak, *_max_rss(kids).values()])
                    progress.tick(
                        f"  [memory] {parked:,}/{n:,} parked "
                        f"(peak worker RSS {peak / 2**20:.0f} MB)"
                    )
                    if parked >= n and left == parked:
                        break
                    if parked != last:
                        last, last_move = parked, time.monotonic()
                    if time.monotonic() - last_move > args.stall_seconds:
                        res.note = f"STALLED at {parked:,}/{n:,} parked"
                        break
                    if not serve.running() or time.monotonic() - t0 > args.timeout:
                        raise RuntimeError(f"memory: {parked}/{n} parked\n{serve.log()}")
                    time.sleep(POLL_S)
                res.parked = parked
                res.park_s = time.monotonic() - t0
                res.peak_rss_load_mb = peak / 2**20
                # steady state with everything parked: a few samples over ~2 s
                per: dict[int, int] = {}
                for _ in range(8):
                    for pid, rss in _max_rss(kids).items():
                        per[pid] = max(per.get(pid, 0), rss)
                    time.sleep(POLL_S)
                res.rss_parked_mb = [v / 2**20 for v in per.values()]
                for k in kids:
                    with contextlib.suppress(psutil.Error):
                        res.uss_parked_mb.append(k.memory_full_info().uss / 2**20)
                progress(
                    f"  [memory] {parked:,} parked in {res.park_s:.1f} s; worker RSS "
                    + ", ".join(f"{v:.0f} MB" for v in res.rss_parked_mb)
                )
                # phase 2: signal them all (1,000 per statement) and let them finish
                t1 = time.monotonic()
                peak = 0
                with psycopg.connect(db.tenant_dsn, autocommit=True) as t:
                    ids = [
                        x
                        for (x,) in t.execute(
                            "select id from df.instances where label = 'mem' order by id"
                        )
                    ]
                    for lo in range(0, len(ids), START_BATCH):
                        t.execute(
                            "select count(df.signal(x, 'go')) from unnest(%s::text[]) x",
                            (ids[lo : lo + START_BATCH],),
                        )
                        peak = max([peak, *_max_rss(kids).values()])
                last, last_move = -1, time.monotonic()
                while True:
                    r = conn.execute(
                        "select count(*) from df.instances "
                        "where label = 'mem' and status = any (%s)",
                        (list(TERMINAL),),
                    ).fetchone()
                    assert r is not None
                    done = int(r[0])
                    peak = max([peak, *_max_rss(kids).values()])
                    progress.tick(
                        f"  [memory] signalled: {done:,}/{n:,} finished "
                        f"(peak worker RSS {peak / 2**20:.0f} MB)"
                    )
                    if done >= n:
                        break
                    if done != last:
                        last, last_move = done, time.monotonic()
                    if time.monotonic() - last_move > args.stall_seconds:
                        res.note = "; ".join(
                            x
                            for x in (
                                res.note,
                                f"STALLED at {done:,}/{n:,} finished after the signals",
                            )
                            if x
                        )
                        break
                    if not serve.running() or time.monotonic() - t1 > args.timeout:
                        raise RuntimeError(f"memory: {done}/{n} finished\n{serve.log()}")
                    time.sleep(POLL_S)
                res.completed = done
                res.resume_s = time.monotonic() - t1
                res.peak_rss_resume_mb = peak / 2**20
                r = conn.execute(
                    "select count(*) from df.instances where label = 'mem' "
                    "and status <> 'completed'"
                ).fetchone()
                if r and r[0]:
                    res.note = "; ".join(
                        x for x in (res.note, f"{r[0]} instance(s) did not complete") if x
                    )
        finally:
            serve.stop(strict=False)
    return res


# -- the table ----------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def render(
    server: Server,
    args: argparse.Namespace,
    fin: FinishedResult | None,
    so: ScaleoutResult | None,
    mem: MemoryResult | None,
) -> str:
    out = [
        f"pgdurable {__version__} · PostgreSQL {server.version} "
        f"(synchronous_commit={server.sync_commit}, fsync={server.fsync}, "
        f"shared_buffers={server.shared_buffers}) · {os.cpu_count()} cores · "
        f"Python {platform.python_version()} · workers/serve={args.workers} · "
        f"slots={args.slots or 'default'} · "
        f"pg_durable.max_user_connections={args.max_user_connections or 'default (10)'} · "
        f"repeats={args.repeats} · "
        f"scale={args.scale:g}",
        "",
    ]
    out.append("| check | figure | value | target | verdict |")
    out.append("|---|---|---:|---:|---|")
    if fin:
        out.append(
            f"| finished | steps/s, empty database (best / median) "
            f"| {fin.rate_before:,.0f} / {fin.median_before:,.0f} | | |"
        )
        out.append(
            f"| finished | steps/s with {fin.finished:,} finished instances "
            f"({fin.node_rows:,} nodes) (best / median) "
            f"| {fin.rate_after:,.0f} / {fin.median_after:,.0f} | | |"
        )
        out.append(
            f"| finished | ratio, same database after ÷ before (best / median) "
            f"| {fin.ratio:.2f} / {fin.median_ratio:.2f} | ≥ {TARGET_FINISHED_RATIO:.2f} "
            f"| {_verdict(fin.ratio >= TARGET_FINISHED_RATIO)} |"
        )
        out.append(
            f"| finished | steps/s, empty control database alternating with the "
            f"runs above (best / median) "
            f"| {fin.rate_control:,.0f} / {fin.median_control:,.0f} | | |"
        )
        out.append(
            f"| finished | ratio, after ÷ interleaved control (best / median) "
            f"| {fin.control_ratio:.2f} / {fin.control_median_ratio:.2f} "
            f"| ≥ {TARGET_FINISHED_RATIO:.2f} "
            f"| {_verdict(fin.control_ratio >= TARGET_FINISHED_RATIO)} |"
        )
        out.append(
            f"| finished | PostgreSQL CPU per step, after ÷ interleaved control "
            f"(mean of the pairs) | {fin.pg_cpu_ratio:.2f} | | |"
        )
        out.append(
            f"| finished | finished instances pruned during the runs | {fin.pruned:,} "
            f"| 0 | {_verdict(fin.pruned == 0)} |"
        )
    if so:
        out.append(
            f"| scaleout | steps/s, 1 serve (best / median) "
            f"| {so.rate_one:,.0f} / {so.median_one:,.0f} | | |"
        )
        out.append(
            f"| scaleout | steps/s, 2 serves (best / median) "
            f"| {so.rate_two:,.0f} / {so.median_two:,.0f} | | |"
        )
        out.append(
            f"| scaleout | ratio (best / median) | {so.ratio:.2f}× / {so.median_ratio:.2f}× "
            f"| ≥ {TARGET_SCALEOUT_RATIO:.1f}× "
            f"| {_verdict(so.ratio >= TARGET_SCALEOUT_RATIO)} |"
        )
        out.append(
            f"| scaleout | ledger rows / expected steps | {so.ledger_rows:,} / "
            f"{so.expected_rows:,} | equal "
            f"| {_verdict(so.ledger_rows == so.expected_rows)} |"
        )
        out.append(
            f"| scaleout | steps run twice / never | {so.duplicates:,} / {so.missing:,} "
            f"| 0 / 0 | {_verdict(so.duplicates == 0 and so.missing == 0)} |"
        )
        out.append(
            f"| scaleout | steps by serve A / B (2-serve runs) | "
            f"{so.steps_by_serve[0]:,} / {so.steps_by_serve[1]:,} | both > 0 "
            f"| {_verdict(min(so.steps_by_serve) > 0)} |"
        )
    if mem:
        out.append(
            f"| memory | instances parked (in flight) | {mem.parked:,} / "
            f"{mem.instances:,} | all | {_verdict(mem.parked >= mem.instances)} |"
        )
        out.append(
            f"| memory | worker RSS with all parked, MB ({mem.workers} worker(s)) | "
            + " / ".join(f"{v:.0f}" for v in mem.rss_parked_mb)
            + f" | < {TARGET_RSS_MB:.0f} "
            f"| {_verdict(max(mem.rss_parked_mb, default=0) < TARGET_RSS_MB)} |"
        )
        out.append(
            "| memory | worker USS (unique, not shared with the supervisor) with all "
            "parked, MB | " + " / ".join(f"{v:.0f}" for v in mem.uss_parked_mb) + " | | |"
        )
        out.append(
            f"| memory | peak worker RSS while loading / while all finish, MB "
            f"| {mem.peak_rss_load_mb:.0f} / {mem.peak_rss_resume_mb:.0f} "
            f"| < {TARGET_RSS_MB:.0f} | {_verdict(mem.max_rss_mb < TARGET_RSS_MB)} |"
        )
        out.append(
            f"| memory | completed after the signals | {mem.completed:,} / "
            f"{mem.instances:,} | all | {_verdict(mem.completed >= mem.instances)} |"
        )
    out.append("")
    runs = (
        fin.before + [r for pair in zip(fin.control, fin.after, strict=True) for r in pair]
        if fin
        else []
    ) + ([r for pair in zip(so.one, so.two, strict=True) for r in pair] if so else [])
    if runs:
        out.append(
            "| run | serves | instances | steps | drain s | steps/s "
            "| worker cores (per serve) | PostgreSQL cores | box busy cores "
            "| rest of box (other work) | step-slot waiters "
            "| CPU ms/step worker / PostgreSQL |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            out.append(
                f"| {r.label} | {r.serves} | {r.instances:,} | {r.steps:,} "
                f"| {r.drain_s:.2f} | {r.steps_per_s:,.0f} "
                f"| {' + '.join(f'{c:.2f}' for c in r.worker_cores)} "
                f"| {r.postgres_cores:.2f} | {r.box_cores:.2f} "
                f"| {max(r.box_cores - sum(r.worker_cores) - r.postgres_cores, 0):.2f} "
                f"| {r.slot_waiters:.1f} "
                f"| {r.worker_ms_per_step:.2f} / {r.pg_ms_per_step:.2f} |"
            )
        out.append("")
        out.append(
            "cores = CPU seconds / drain wall time; rest of box = box busy − workers − "
            "PostgreSQL (other work, kernel); step-slot waiters = backends sleeping in "
            "_step_slot_v1 for one of the pg_durable.max_user_connections slots "
            "(mean); CPU ms/step = CPU seconds over the drain / completed steps"
        )
        out.append("")
    if fin:
        shapes = ", ".join(f"{k} ({v})" for k, v in fin.templates.items())
        out.append(
            f"finished: templates {shapes} cloned in {fin.load_s:.0f} s, "
            f"VACUUM ANALYZE {fin.vacuum_s:.0f} s; sizes "
            + ", ".join(f"{t} {mb:,.0f} MB" for t, mb in fin.table_mb.items())
        )
    if mem:
        out.append(
            f"memory: {mem.parked:,} parked in {mem.park_s:.1f} s; all signalled and "
            f"finished in {mem.resume_s:.1f} s"
        )
    notes = [
        f"{c}: {x.note}"
        for c, x in (("finished", fin), ("scaleout", so), ("memory", mem))
        if x is not None and x.note
    ]
    if notes:
        out.append("notes: " + "; ".join(notes))
    return "\n".join(out)


def problems(
    fin: FinishedResult | None, so: ScaleoutResult | None, mem: MemoryResult | None
) -> list[str]:
    """Outcomes that are wrong, not slow (timing targets do not fail the run)."""
    bad = []
    for r in (fin.before + fin.control + fin.after if fin else []) + (
        so.one + so.two if so else []
    ):
        if r.failed or r.note or r.instances == 0 or r.steps != 10 * r.instances:
            bad.append(f"{r.label}: {r.instances} instances, {r.steps} steps, {r.note}")
    if fin and fin.pruned:
        bad.append(f"finished: {fin.pruned} pruned")
    if so and (so.duplicates or so.missing or so.ledger_rows != so.expected_rows):
        bad.append(
            f"scaleout: ledger {so.ledger_rows} rows, {so.distinct_rows} distinct, "
            f"expected {so.expected_rows}"
        )
    if mem and (mem.note or mem.parked < mem.instances or mem.completed < mem.instances):
        bad.append(f"memory: {mem.parked} parked, {mem.completed} completed; {mem.note}")
    return bad


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2].split("Owns:")[0],
    )
    p.add_argument(
        "--dsn",
        help="an existing PostgreSQL (superuser); default: an embedded "
        "PostgreSQL 18 in a temporary directory",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every size (1: 1,000,000 finished, 1,000 sequences per run, 10,000 parked)",
    )
    p.add_argument(
        "--checks",
        default="finished,scaleout,memory",
        help="comma separated subset of finished,scaleout,memory; graph,loop "
        "(bench/scale_limits.py) and flood (bench/scale_flood.py) only when named",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes per serve in finished/scaleout (default 1: on a "
        "2-core box each serve stands for one host and leaves PostgreSQL a core)",
    )
    p.add_argument(
        "--memory-workers",
        type=int,
        default=1,
        help="worker processes in the memory check (default 1: that worker holds "
        "every in-flight instance)",
    )
    p.add_argument(
        "--flood-workers",
        type=int,
        default=2,
        help="worker processes in the flood check (default 2: serve's default on a 2-core box)",
    )
    p.add_argument("--slots", type=int, default=0, help="serve --slots (default: serve's)")
    p.add_argument(
        "--max-user-connections",
        type=int,
        default=0,
        help="ALTER DATABASE … SET pg_durable.max_user_connections (the engine-wide "
        "cap on concurrently executing SQL steps; default: the engine's, 10)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="throughput runs per configuration; ratios of the best runs (other "
        "work on a shared box only slows runs down), medians shown too",
    )
    p.add_argument("--timeout", type=float, default=1800, help="per drain timeout, seconds")
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=60,
        help="give up on a drain after this long without progress",
    )
    p.add_argument("--json", dest="json_path", help="also write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the databases and serve logs")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = {c.strip().lower() for c in args.checks.split(",") if c.strip()}
    unknown = wanted - {"finished", "scaleout", "memory", "graph", "loop", "flood"}
    if unknown:
        print(f"unknown check(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    progress = Progress(args.quiet)
    signal.signal(signal.SIGTERM, interrupt)
    server = Server(args.dsn, False)
    workdir = Path(tempfile.mkdtemp(prefix="pgdurable-scale-"))
    progress(
        f"PostgreSQL {server.version} at "
        f"{psycopg.conninfo.conninfo_to_dict(server.admin_dsn).get('port')}; "
        f"logs in {workdir}"
    )
    try:
        fin = check_finished(server, args, workdir, progress) if "finished" in wanted else None
        so = check_scaleout(server, args, workdir, progress) if "scaleout" in wanted else None
        mem = check_memory(server, args, workdir, progress) if "memory" in wanted else None
        gr = lim.check_graph(server, args, workdir, progress, Db) if "graph" in wanted else None
        lp = lim.check_loop(server, args, workdir, progress, Db) if "loop" in wanted else None
        fl = flood.check_flood(server, args, workdir, progress, Db) if "flood" in wanted else None
        if fin or so or mem:
            print(render(server, args, fin, so, mem))
        if gr or lp:
            print(lim.render(gr, lp))
        if fl:
            print(flood.render(fl))
        bad = problems(fin, so, mem) + lim.problems(gr, lp) + flood.problems(fl)
        if args.json_path:
            Path(args.json_path).write_text(
                json.dumps(
                    {
                        "server": {
                            "version": server.version,
                            "synchronous_commit": server.sync_commit,
                            "fsync": server.fsync,
                            "shared_buffers": server.shared_buffers,
                        },
                        "scale": args.scale,
                        "workers": args.workers,
                        "repeats": args.repeats,
                        "finished": asdict(fin) if fin else None,
                        "scaleout": asdict(so) if so else None,
                        "memory": asdict(mem) | {"max_rss_mb": mem.max_rss_mb} if mem else None,
                        "graph": asdict(gr) if gr else None,
                        "loop": asdict(lp) if lp else None,
                        "flood": asdict(fl) | {"max_rss_mb": fl.max_rss_mb} if fl else None,
                        "problems": bad,
                    },
                    indent=2,
                    default=str,
                )
            )
        for b in bad:
            print(f"PROBLEM: {b}", file=sys.stderr)
        return 1 if bad else 0
    finally:
        server.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
