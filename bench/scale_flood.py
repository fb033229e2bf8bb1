"""The flood check of ``python -m bench.scale`` (``--checks flood``), docs/reliability.md
"Floods": a burst of starts and a burst of signals against a running ``serve``.

starts   100,000 one-step instances (x ``--scale``) started in ONE transaction while serve
         runs idle: ``select count(df.start(graph, 'flood')) from generate_series(1, 1000)``,
         100 statements, one COMMIT. Each step inserts ``(instance id)`` into
         ``public.flood_ledger``, so the ledger shows every step ran exactly once.
         Measured: the transaction's time, the drain (COMMIT -> the last instance finished)
         and its steps/s.
signals  10,000 instances (x ``--scale``) ``df.wait_for_signal('go') ~> <ledger insert>``,
         started (one transaction) and left to park (one ``signal`` task each); then
         10,000 ``df.signal`` in ONE statement (``select count(df.signal(id, 'go')) from
         unnest(ids)``: one transaction, so the whole burst lands at one COMMIT). Measured:
         the statement's time, the drain; every signal delivered exactly once (one ledger
         row per instance, no signal left in the inbox).

Throughout both drains:
- probes: a one-step workflow ``df.sql('select 1')`` started every 100 ms (its own
  transaction), its latency ``completed_at - created_at`` (server clock): p50 / p99 / max
  per phase, from the burst's COMMIT until the drain ends (every probe is waited for);
- workers' RSS (psutil, every 100 ms): the peak of each worker;
- connections the service holds (``pg_stat_activity`` of the database by role, every
  250 ms): the peak of ``pgdurable_service`` and of ``pgdurable_step`` sessions, against
  what the configured pools allow: per worker ``slots + 4`` service connections plus its
  LISTEN connection, ``slots + 2`` step connections, and the supervisor's heartbeat.

One ``serve`` of ``--flood-workers`` workers (default 2, serve's default on a 2-core box),
in a fresh database (bench/scale.py's :class:`Db`). Owns: this check and its table.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from pgdurable.config import SLOTS_DEFAULT

from .common import POLL_S, TERMINAL, Progress, Server, start_serve, worker_procs
from .workloads import START_BATCH, graph_of

STARTS_N = 100_000
SIGNALS_N = 10_000
PROBE_EVERY_S = 0.1
RSS_BOUND_MB = 150.0
PROBE_P99_BOUND_S = 1.0
LEDGER = "public.flood_ledger"
ROLES = ("pgdurable_service", "pgdurable_step")


@dataclass
class Phase:
    """One burst and its drain."""

    name: str
    instances: int = 0
    burst_s: float = 0.0  # the one transaction of starts / of signals
    drain_s: float = 0.0  # its COMMIT -> the last instance finished
    steps_per_s: float = 0.0
    completed: int = 0
    ledger_rows: int = 0
    ledger_distinct: int = 0
    probes: int = 0
    probes_completed: int = 0
    probe_p50_s: float = 0.0
    probe_p99_s: float = 0.0
    probe_max_s: float = 0.0
    note: str = ""


@dataclass
class FloodResult:
    workers: int = 0
    slots: int = 0
    starts: Phase = field(default_factory=lambda: Phase("starts"))
    signals: Phase = field(default_factory=lambda: Phase("signals"))
    park_s: float = 0.0  # the signal waiters' first step -> all parked
    signals_left: int = 0  # rows left in the signal inbox after the signal drain
    peak_rss_mb: list[float] = field(default_factory=list)  # per worker
    peak_conns: dict[str, int] = field(default_factory=dict)  # role -> most sessions seen
    pool_bound: dict[str, int] = field(default_factory=dict)  # role -> what the pools allow
    note: str = ""

    @property
    def max_rss_mb(self) -> float:
        return max(self.peak_rss_mb, default=0.0)


class Watch:
    """Every 100 ms: each worker's RSS; every 250 ms: the service's sessions by role."""

    def __init__(self, procs: list[psutil.Process], admin_dsn: str) -> None:
        self.procs = procs
        self.admin_dsn = admin_dsn
        self.rss: dict[int, int] = {}
        self.conns: dict[str, int] = dict.fromkeys(ROLES, 0)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="flood-watch")

    def _run(self) -> None:
        try:
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                tick = 0
                while not self._stop.is_set():
                    for p in self.procs:
                        with contextlib.suppress(psutil.Error):
                            self.rss[p.pid] = max(self.rss.get(p.pid, 0), p.memory_info().rss)
                    if tick % 3 == 0:
                        for role, n in conn.execute(
                            "select usename::text, count(*) from pg_stat_activity "
                            "where datname = current_database() and usename = any(%s) "
                            "group by 1",
                            (list(ROLES),),
                        ):
                            self.conns[role] = max(self.conns[role], int(n))
                    tick += 1
                    time.sleep(0.1)
        except BaseException as exc:  # reported by the check
            self.errors.append(exc)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Prober:
    """A one-step workflow started every :data:`PROBE_EVERY_S` while :attr:`phase` is set;
    the ids by phase."""

    def __init__(self, tenant_dsn: str) -> None:
        self.tenant_dsn = tenant_dsn
        self.phase: str | None = None
        self.ids: dict[str, list[str]] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="flood-probe")

    def _run(self) -> None:
        try:
            with psycopg.connect(self.tenant_dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    phase = self.phase
                    if phase is not None:
                        row = conn.execute(
                            "select df.start(df.sql('select 1'), %s)", ("probe-" + phase,)
                        ).fetchone()
                        assert row is not None
                        self.ids.setdefault(phase, []).append(row[0])
                    self._stop.wait(PROBE_EVERY_S)
        except BaseException as exc:  # reported by the check
            self.errors.append(exc)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def _probe_figures(conn: psycopg.Connection[Any], phase: Phase, ids: list[str]) -> None:
    """Latency of each probe: completed_at - created_at; an unfinished one counts its age."""
    rows = conn.execute(
        "select status, extract(epoch from coalesce(completed_at, clock_timestamp()) "
        "- created_at)::float8 from df.instances where id = any(%s)",
        (ids,),
    ).fetchall()
    lat = [float(r[1]) for r in rows]
    phase.probes = len(ids)
    phase.probes_completed = sum(1 for r in rows if r[0] == "completed")
    phase.probe_p50_s = statistics.median(lat) if lat else 0.0
    phase.probe_p99_s = _quantile(lat, 0.99)
    phase.probe_max_s = max(lat, default=0.0)


def _start_all(tenant_dsn: str, graph: str, n: int, label: str) -> float:
    """``n`` starts of ``graph``, :data:`START_BATCH` per statement, in ONE transaction; the
    transaction's seconds."""
    t0 = time.monotonic()
    with psycopg.connect(tenant_dsn) as conn:
        done = 0
        while done < n:
            k = min(START_BATCH, n - done)
            conn.execute(
                "select count(df.start(%s::text, %s)) from generate_series(1, %s)",
                (graph, label, k),
            )
            done += k
        conn.commit()
    return time.monotonic() - t0


def _drain(
    conn: psycopg.Connection[Any],
    label: str,
    n: int,
    t0: float,
    args: argparse.Namespace,
    serve: Any,
    progress: Progress,
    what: str,
) -> tuple[int, str]:
    """Wait until the ``n`` instances labelled ``label`` are terminal; (how many, a note)."""
    last, last_move = -1, time.monotonic()
    while True:
        row = conn.execute(
            "select count(*) from df.instances where label = %s and status = any(%s)",
            (label, list(TERMINAL)),
        ).fetchone()
        done = int(row[0]) if row else 0
        progress.tick(f"  [flood] {what}: {done:,}/{n:,} finished ({time.monotonic() - t0:.0f} s)")
        if done >= n:
            return done, ""
        if done != last:
            last, last_move = done, time.monotonic()
        if time.monotonic() - last_move > args.stall_seconds:
            return done, f"STALLED at {done:,}/{n:,} {what}"
        if not serve.running() or time.monotonic() - t0 > args.timeout:
            raise RuntimeError(f"flood {what}: {done}/{n} finished\n{serve.log()}")
        time.sleep(POLL_S)


def _ledger(conn: psycopg.Connection[Any], phase: Phase, label: str) -> None:
    row = conn.execute(
        f"select count(*), count(distinct l.instance) from {LEDGER} l "
        "join df.instances i on i.id = l.instance where i.label = %s",
        (label,),
    ).fetchone()
    assert row is not None
    phase.ledger_rows, phase.ledger_distinct = int(row[0]), int(row[1])
    row = conn.execute(
        "select count(*) from df.instances where label = %s and status = 'completed'", (label,)
    ).fetchone()
    phase.completed = int(row[0]) if row else 0


def check_flood(
    server: Server, args: argparse.Namespace, workdir: Path, progress: Progress, db_cls: Any
) -> FloodResult:
    res = FloodResult()
    res.workers = args.flood_workers
    res.slots = args.slots or SLOTS_DEFAULT
    n_starts = max(10, round(STARTS_N * args.scale))
    n_signals = max(10, round(SIGNALS_N * args.scale))
    res.pool_bound = {
        # per worker: its pool and its LISTEN session; one supervisor heartbeat
        "pgdurable_service": res.workers * (res.slots + 4 + 1) + 1,
        "pgdurable_step": res.workers * (res.slots + 2),
    }
    progress(
        f"[flood] {n_starts:,} starts in one transaction, then {n_signals:,} signals in one; "
        f"{res.workers} worker(s), {res.slots} slots"
    )
    with db_cls(server, "pgdurable_scale_flood", args) as db:
        with db.admin() as conn:
            conn.execute(f"create table {LEDGER} (instance text not null)")
            conn.execute(f"grant insert on {LEDGER} to public")
        step = f"df.sql('insert into {LEDGER} values (''{{sys_instance_id}}'')')"
        flood_graph = graph_of(db.tenant_dsn, step)
        wait_graph = graph_of(db.tenant_dsn, f"df.wait_for_signal('go') ~> {step}")
        env = {"PGDURABLE_SLOTS": str(args.slots)} if args.slots else {}
        serve = start_serve(db.dsn, res.workers, workdir / "serve-flood.log", env)
        try:
            procs = worker_procs(serve)
            time.sleep(1.0)  # the workers LISTEN before the burst lands
            with (
                Watch(procs, db.dsn) as watch,
                Prober(db.tenant_dsn) as prober,
                db.admin() as conn,
            ):
                # -- 1. the flood of starts
                ph = res.starts
                ph.instances = n_starts
                ph.burst_s = _start_all(db.tenant_dsn, flood_graph, n_starts, "flood")
                t1 = time.monotonic()
                prober.phase = "starts"  # from the COMMIT on: probes during the drain
                done, ph.note = _drain(conn, "flood", n_starts, t1, args, serve, progress, "starts")
                ph.drain_s = time.monotonic() - t1
                prober.phase = None
                _drain(
                    conn,
                    "probe-starts",
                    len(prober.ids.get("starts", [])),
                    time.monotonic(),
                    args,
                    serve,
                    progress,
                    "probes",
                )
                ph.steps_per_s = done / ph.drain_s if ph.drain_s else 0.0
                progress(
                    f"  [flood] {n_starts:,} started in {ph.burst_s:.1f} s, drained in "
                    f"{ph.drain_s:.1f} s ({ph.steps_per_s:,.0f} steps/s)"
                )
                # -- 2. the burst of signals: waiters started and parked first
                ph = res.signals
                ph.instances = n_signals
                _start_all(db.tenant_dsn, wait_graph, n_signals, "waiter")
                tp = time.monotonic()
                while True:
                    row = conn.execute(
                        "select count(*) from pgdurable.tasks t join df.instances i "
                        "on i.id = t.instance_id where i.label = 'waiter' and t.kind = 'signal'"
                    ).fetchone()
                    parked = int(row[0]) if row else 0
                    progress.tick(f"  [flood] {parked:,}/{n_signals:,} waiters parked")
                    if parked >= n_signals:
                        break
                    if time.monotonic() - tp > args.timeout:
                        raise RuntimeError(f"flood: {parked}/{n_signals} parked\n{serve.log()}")
                    time.sleep(POLL_S)
                res.park_s = time.monotonic() - tp
                ids = [
                    r[0] for r in conn.execute("select id from df.instances where label = 'waiter'")
                ]
                with psycopg.connect(db.tenant_dsn, autocommit=True) as t:
                    t0 = time.monotonic()
                    t.execute("select count(df.signal(x, 'go')) from unnest(%s::text[]) x", (ids,))
                    ph.burst_s = time.monotonic() - t0
                t1 = time.monotonic()
                prober.phase = "signals"
                done, ph.note = _drain(
                    conn, "waiter", n_signals, t1, args, serve, progress, "signalled"
                )
                ph.drain_s = time.monotonic() - t1
                prober.phase = None
                ph.steps_per_s = done / ph.drain_s if ph.drain_s else 0.0
                progress(
                    f"  [flood] {n_signals:,} signals in {ph.burst_s:.1f} s, drained in "
                    f"{ph.drain_s:.1f} s"
                )
                # the last probes finish
                _drain(
                    conn,
                    "probe-signals",
                    len(prober.ids.get("signals", [])),
                    time.monotonic(),
                    args,
                    serve,
                    progress,
                    "probes",
                )
            for e in watch.errors + prober.errors:
                res.note = "; ".join(x for x in (res.note, f"{type(e).__name__}: {e}") if x)
            res.peak_rss_mb = [v / 2**20 for v in watch.rss.values()]
            res.peak_conns = dict(watch.conns)
            with db.admin() as conn:
                _ledger(conn, res.starts, "flood")
                _ledger(conn, res.signals, "waiter")
                for name, phase in (("starts", res.starts), ("signals", res.signals)):
                    _probe_figures(conn, phase, prober.ids.get(name, []))
                row = conn.execute("select count(*) from pgdurable.signals").fetchone()
                res.signals_left = int(row[0]) if row else 0
        finally:
            serve.stop(strict=False)
    return res


def _v(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def render(res: FloodResult) -> str:
    s, g = res.starts, res.signals
    out = [
        f"flood: one serve, {res.workers} worker(s), {res.slots} slots each",
        "",
        "| phase | figure | value | bound | verdict |",
        "|---|---|---:|---:|---|",
        f"| starts | {s.instances:,} df.start in one transaction, s | {s.burst_s:.1f} | | |",
        f"| starts | drain (COMMIT -> last finished), s | {s.drain_s:.1f} | | |",
        f"| starts | steps/s over the drain | {s.steps_per_s:,.0f} | | |",
        f"| starts | completed / ledger rows / distinct | {s.completed:,} / {s.ledger_rows:,} / "
        f"{s.ledger_distinct:,} | all, once "
        f"| {_v(s.completed == s.ledger_rows == s.ledger_distinct == s.instances)} |",
        f"| signals | {g.instances:,} waiters parked, s | {res.park_s:.1f} | | |",
        f"| signals | {g.instances:,} df.signal in one statement (one transaction), s "
        f"| {g.burst_s:.1f} | | |",
        f"| signals | drain (COMMIT -> last finished), s | {g.drain_s:.1f} | | |",
        f"| signals | completed / ledger rows / distinct | {g.completed:,} / {g.ledger_rows:,} "
        f"/ {g.ledger_distinct:,} | all, once "
        f"| {_v(g.completed == g.ledger_rows == g.ledger_distinct == g.instances)} |",
        f"| signals | signals left in the inbox | {res.signals_left:,} | 0 "
        f"| {_v(res.signals_left == 0)} |",
    ]
    for ph in (s, g):
        out.append(
            f"| {ph.name} | probe latency p50 / p99 / max, s ({ph.probes_completed}/{ph.probes} "
            f"probes) | {ph.probe_p50_s:.2f} / {ph.probe_p99_s:.2f} / {ph.probe_max_s:.2f} "
            f"| p99 < {PROBE_P99_BOUND_S:g} | {_v(ph.probe_p99_s < PROBE_P99_BOUND_S)} |"
        )
    out.append(
        "| both | peak worker RSS, MB | "
        + " / ".join(f"{v:.0f}" for v in res.peak_rss_mb)
        + f" | < {RSS_BOUND_MB:.0f} | {_v(res.max_rss_mb < RSS_BOUND_MB)} |"
    )
    for role in ROLES:
        got, bound = res.peak_conns.get(role, 0), res.pool_bound.get(role, 0)
        out.append(f"| both | peak {role} sessions | {got} | ≤ {bound} | {_v(0 < got <= bound)} |")
    notes = [f"{p.name}: {p.note}" for p in (s, g) if p.note] + ([res.note] if res.note else [])
    if notes:
        out.append("")
        out.append("notes: " + "; ".join(notes))
    return "\n".join(out)


def problems(res: FloodResult | None) -> list[str]:
    """Wrong outcomes: a lost or repeated step or signal, a stall, sessions past the pools.
    The latency and RSS bounds are reported in the table (their verdicts), not failed here:
    a shared box slows a run down."""
    if res is None:
        return []
    bad = []
    for ph in (res.starts, res.signals):
        if ph.note or not (ph.completed == ph.ledger_rows == ph.ledger_distinct == ph.instances):
            bad.append(
                f"flood {ph.name}: {ph.completed}/{ph.instances} completed, ledger "
                f"{ph.ledger_rows} rows ({ph.ledger_distinct} distinct) {ph.note}"
            )
        if ph.probes == 0 or ph.probes_completed < ph.probes:
            bad.append(f"flood {ph.name}: {ph.probes_completed}/{ph.probes} probes completed")
    if res.signals_left:
        bad.append(f"flood: {res.signals_left} signals left undelivered")
    for role in ROLES:
        if res.peak_conns.get(role, 0) > res.pool_bound.get(role, 0):
            bad.append(
                f"flood: {res.peak_conns.get(role)} {role} sessions, the pools allow "
                f"{res.pool_bound.get(role)}"
            )
    if res.note:
        bad.append(f"flood: {res.note}")
    return bad
