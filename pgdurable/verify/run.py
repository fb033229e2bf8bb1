"""The verifier's fault run: serve under a mixed workload while faults are injected at random.

:class:`Run` makes a scratch database (on its own embedded PostgreSQL 18, or on ``--dsn``'s
server, where PostgreSQL restarts are skipped), starts ``pgdurable serve``
(:class:`pgdurable.harness.Serve`) and an HTTP endpoint (:class:`pgdurable.harness.HttpRecorder`),
keeps about ten instances of the workload in flight, sends their signals (some before the
wait, one never waited for), starts a quarter of them twice with one idempotency key (half of
those from two threads at once, a call that fails mid-way is repeated), fixes each failed
``restart`` instance's missing table and calls df.restart (:mod:`.features`), and
injects faults (:data:`FAULT_KINDS`):

    kill_worker           SIGKILL one worker (the supervisor restarts it)
    kill_supervisor       SIGKILL the supervisor (its workers notice and exit), start serve again
    pg_restart_fast       pg_ctl stop -m fast, start
    pg_restart_immediate  pg_ctl stop -m immediate (crash, WAL recovery), start
    sigstop_worker        SIGSTOP a worker past its lease (lease 3 s), SIGCONT 5 s later
    http_cut              the HTTP endpoint answers 503 or stops listening for 1-4 s
    conn_reset, ambiguous_commit, stall, partition
                          network faults between a serve and PostgreSQL, through the proxy
                          each serve reaches the database by (:mod:`.network`)

With ``serves=2`` two serves run on the same database, each through its own proxy, and every
process or network fault hits one of them at random. The first faults of a run are one of each
kind (in random order), so even a short run has every kind; then kinds are drawn by weight.
It then settles (every instance terminal) and hands the database to the checker. Every 15 s a soak
watch samples the workers' memory, the connections to the database (by holder:
:func:`holder_of`) and table bloat.

(Over 500 lines: setup, workload pump, fault injection and settle share one run's state; the
client side of keyed starts and restarts is in :mod:`.features`.)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgdurable.embedded import EmbeddedPostgres
from pgdurable.harness import HttpRecorder, Serve, ServeError, dsn_with

from . import features
from .checker import SentSignal, Stats, Violation, check
from .network import NET_KINDS, NetFaults
from .proxy import ARM_TIMEOUT, COMMIT_REPLY_TIMEOUT
from .watch import holder_of, log_evidence
from .workload import (
    KIND_WEIGHTS,
    LABEL_PREFIX,
    restart_template,
    setup_database,
    templates,
)

LEASE_SECONDS = 3
FAULT_KINDS = (
    "kill_worker",
    "kill_supervisor",
    "pg_restart_fast",
    "pg_restart_immediate",
    "sigstop_worker",
    "http_cut",
    *NET_KINDS,
)
FAULT_WEIGHTS = (3.0, 1.0, 1.0, 1.0, 1.5, 1.0, 1.5, 1.5, 1.0, 0.7)


class Run:
    """One verifier run: its scratch database, serve, HTTP endpoint, workload and faults."""

    def __init__(
        self,
        faults: int,
        duration: float,
        seed: int,
        dsn: str | None,
        workdir: Path,
        echo: Any,
        *,
        serves: int = 1,
        kinds: tuple[str, ...] = FAULT_KINDS,
    ) -> None:
        unknown = [k for k in kinds if k not in FAULT_KINDS]
        if unknown or not kinds:
            raise ValueError(
                f"unknown fault kind(s) {unknown}; the kinds are {', '.join(FAULT_KINDS)}"
            )
        if serves not in (1, 2):
            raise ValueError(f"serves must be 1 or 2, not {serves}")
        self.n_serves = serves
        self.kinds = kinds
        self.serves: list[Serve] = []
        self.net: NetFaults | None = None
        self.net_results: list[tuple[str, bool]] = []  # (kind, happened) of network faults
        self.n_faults = faults
        self.duration = duration
        self.rng = random.Random(seed)
        self.seed = seed
        self.workdir = workdir
        self.echo = echo
        self.stats = Stats()
        self.sent: list[SentSignal] = []
        self.pending_signals: list[tuple[float, str, str]] = []  # (due, instance, name)
        self.ids: dict[str, str] = {}  # instance id -> kind
        self.started = 0
        self.http_cut = False
        self.stopped: set[int] = set()
        self.emb: EmbeddedPostgres | None = None
        self.dbname = f"pgdurable_verify_{os.getpid()}"
        self.tenant = f"pgdurable_verify_{os.getpid()}"
        self.external = dsn
        self.bg: list[threading.Thread] = []
        self.keyed: dict[str, list[str | None]] = {}  # idempotency key -> id each call returned
        self.restarted: set[str] = set()  # instances df.restart was called for

    # connections ---------------------------------------------------------------------
    def connect(self, tenant: bool = False) -> psycopg.Connection[Any]:
        return psycopg.connect(
            dsn_with(self.server_dsn, dbname=self.dbname, user=self.tenant if tenant else None),
            autocommit=True,
            connect_timeout=3,
            application_name="pgdurable verify",
        )

    # setup / teardown ------------------------------------------------------------------
    def setup(self) -> None:
        if self.external:
            self.server_dsn = self.external
        else:
            self.emb = EmbeddedPostgres(self.workdir / "pg18", settings={"max_connections": "200"})
            self.server_dsn = self.emb.start()
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(
                    sql.Identifier(self.dbname)
                )
            )
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(self.dbname)))
        db_dsn = dsn_with(self.server_dsn, dbname=self.dbname)
        setup_database(db_dsn, self.tenant)
        self.http = HttpRecorder()
        self.exprs = templates(self.http.url)
        self.net = NetFaults(self.server_dsn, self.n_serves, self.rng, LEASE_SECONDS)
        for i in range(self.n_serves):
            log = self.workdir / ("serve.log" if i == 0 else f"serve{i + 1}.log")
            serve = Serve(self.net.dsn(i, db_dsn), log, lease_seconds=LEASE_SECONDS)
            self.serves.append(serve)
            serve.start()
        for serve in self.serves:
            serve.wait_workers(1, timeout=60)

    @property
    def serve(self) -> Serve:
        """The first serve (the only one unless ``serves=2``)."""
        return self.serves[0]

    def live_workers(self, serve: Serve, timeout: float) -> list[int]:
        """A serve's workers once it has one (none if it has none within ``timeout``)."""
        try:
            return serve.wait_workers(1, timeout=timeout)
        except ServeError:
            return []

    def teardown(self, keep: bool) -> None:
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for serve in self.serves:
            with contextlib.suppress(Exception):
                running = set(serve.workers())
                if serve.proc is not None:
                    running.add(serve.proc.pid)
                stray = [p.pid for p in serve.leftovers() if p.pid not in running]
                if stray:
                    self.stats.notes.append(
                        f"{len(stray)} orphaned worker(s) of killed "
                        f"supervisors still running at teardown (killed): "
                        f"{stray[:10]}"
                    )
            with contextlib.suppress(Exception):
                serve.stop(30, strict=False)
            with contextlib.suppress(Exception):
                serve.kill_leftovers()
        with contextlib.suppress(Exception):
            self.http.close()
        if self.net is not None:
            with contextlib.suppress(Exception):
                self.net.close()
        if keep:
            if self.emb is not None:
                self.emb.stop("fast")
            return
        if self.external:
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(self.server_dsn, autocommit=True) as conn,
            ):
                conn.execute(
                    sql.SQL("drop database if exists {} with (force)").format(
                        sql.Identifier(self.dbname)
                    )
                )
                conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(self.tenant)))
        if self.emb is not None:
            self.emb.destroy()

    # workload --------------------------------------------------------------------------
    def start_instance(self) -> None:
        kinds = list(KIND_WEIGHTS)
        kind = self.rng.choices(kinds, [KIND_WEIGHTS[k] for k in kinds])[0]
        n = self.started
        label = f"{LABEL_PREFIX}{kind}:{n}"
        self.started += 1
        expr = restart_template(n) if kind == "restart" else self.exprs[kind]
        iid: str | None
        if self.rng.random() < 0.25:
            iid = features.keyed_start(self, expr, label, f"verify-{self.seed}-{n}")
        else:
            try:
                with self.connect(tenant=True) as conn:
                    iid = conn.execute(f"select df.start({expr}, %s)", (label,)).fetchone()[0]  # type: ignore[index]
            except psycopg.OperationalError:
                return  # maybe committed: found by its label at the end (signals sent at settle)
        if iid is None:
            return
        self.ids[iid] = kind
        if kind == "signal":
            now = time.monotonic()
            early = self.rng.random() < 0.5  # before the wait registers, most likely
            self.pending_signals.append(
                (now if early else now + self.rng.uniform(0.5, 4), iid, "go")
            )
            self.pending_signals.append((now + self.rng.uniform(0, 6), iid, "go2"))
            self.pending_signals.append((now, iid, "extra"))  # never waited for: stays

    def send_signal(self, iid: str, name: str) -> bool:
        """True when done (sent, or refused because the instance is terminal)."""
        tok = uuid.uuid4().hex[:12]
        try:
            conn = self.connect(tenant=True)
        except psycopg.OperationalError:
            return False
        try:
            with conn:
                conn.execute("select df.signal(%s, %s, %s)", (iid, name, json.dumps({"tok": tok})))
            self.sent.append(SentSignal(iid, name, tok))
            return True
        except psycopg.Error as exc:
            # refused, the instance is terminal: SQLSTATE 55000, an OperationalError subclass,
            # so tested first (else the settle phase retried it until its timeout)
            if "signals can only be sent" in str(exc):
                return True
            if isinstance(exc, psycopg.OperationalError):
                self.sent.append(SentSignal(iid, name, tok, certain=False))
                return False
            raise

    def pump(self, inflight: int) -> None:
        now = time.monotonic()
        due = [p for p in self.pending_signals if p[0] <= now]
        for p in due:
            if self.send_signal(p[1], p[2]):
                self.pending_signals.remove(p)
        try:
            with self.connect() as conn:
                live = conn.execute(
                    "select count(*) from df.instances where label like %s "
                    "and status not in ('completed', 'failed', 'cancelled')",
                    (LABEL_PREFIX + "%",),
                ).fetchone()[0]  # type: ignore[index]
        except psycopg.OperationalError:
            return
        for _ in range(max(0, inflight - live)):
            self.start_instance()
        features.restart_failed(self)

    # faults ----------------------------------------------------------------------------
    def fault(self, kind: str) -> bool | None:
        """Inject one fault: whether it happened; None for a network fault, whose outcome
        comes later (:attr:`net_results`)."""
        i = self.rng.randrange(len(self.serves))
        serve = self.serves[i]
        if kind in NET_KINDS:
            assert self.net is not None

            def report(happened: bool) -> None:
                self.net_results.append((kind, happened))  # from a proxy's thread

            self.net.fault(kind, i, report)
            return None
        if kind == "kill_worker":
            pids = [p for p in self.live_workers(serve, 10) if p not in self.stopped]
            if not pids:
                return False
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.rng.choice(pids), signal.SIGKILL)
        elif kind == "kill_supervisor":
            serve.kill_supervisor()
            time.sleep(self.rng.uniform(0, 1.5))
            serve.start()
            self.live_workers(serve, 30)
        elif kind.startswith("pg_restart"):
            if self.emb is None:
                self.stats.skipped[kind] += 1
                return False
            self.emb.stop("fast" if kind == "pg_restart_fast" else "immediate")
            time.sleep(self.rng.uniform(0, 2))
            dsn = self.emb.start()
            if dsn != self.server_dsn:
                # its port was taken while it was down (another process's connection got it:
                # EmbeddedPostgres.start picks another): the proxies and this run's own
                # connections follow it, or every serve would knock at the old port until the end
                self.server_dsn = dsn
                if self.net is not None:
                    self.net.retarget(self.emb.port)
        elif kind == "sigstop_worker":
            pids = [p for p in self.live_workers(serve, 10) if p not in self.stopped]
            if not pids:
                return False
            pid = self.rng.choice(pids)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            self.stopped.add(pid)

            def resume() -> None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                self.stopped.discard(pid)

            timer = threading.Timer(LEASE_SECONDS + 2, resume)
            timer.start()
            self.bg.append(timer)
        elif kind == "http_cut":
            if any(t.name == "http_cut" and t.is_alive() for t in self.bg):
                return False
            self.http_cut = True
            t = threading.Thread(
                target=self.http.cut,
                name="http_cut",
                args=(self.rng.uniform(1, 4), self.rng.random() < 0.5),
                daemon=True,
            )
            t.start()
            self.bg.append(t)
        return True

    def run(self) -> list[Violation]:
        t0 = time.monotonic()
        deadline = t0 + self.duration
        kinds = [k for k in self.kinds if not (self.emb is None and k.startswith("pg_"))]
        weights = [w for k, w in zip(FAULT_KINDS, FAULT_WEIGHTS, strict=True) if k in kinds]
        if self.emb is None:
            self.stats.skipped.update(k for k in self.kinds if k.startswith("pg_"))
            self.stats.notes.append(
                "--dsn: PostgreSQL restarts skipped (the tool cannot restart an external server)"
            )
        self.pump(10)
        last_report = t0
        first_round = self.rng.sample(kinds, len(kinds))  # one of each kind first
        retries: Counter[str] = Counter()
        missed: Counter[str] = Counter()  # drawn but not injected (no trigger, no worker)
        while sum(self.stats.faults.values()) < self.n_faults and time.monotonic() < deadline:
            self.pump(10)
            time.sleep(self.rng.uniform(0.2, 1.0))
            kind = first_round.pop(0) if first_round else self.rng.choices(kinds, weights)[0]
            happened = self.fault(kind)
            outcomes = [(kind, happened)] if happened is not None else []
            while self.net_results:
                outcomes.append(self.net_results.pop(0))
            for k, ok in outcomes:
                if ok:
                    self.stats.faults[k] += 1
                    continue
                missed[k] += 1
                if k not in self.stats.faults and retries[k] < 3:
                    retries[k] += 1  # not injected (no trigger came in time): again later
                    first_round.append(k)
            for n, serve in enumerate(self.serves, 1):
                if serve.proc is not None and serve.proc.poll() is not None:
                    self.stats.notes.append(
                        f"serve {n} exited on its own (rc {serve.proc.returncode}"
                        f") at t={time.monotonic() - t0:.0f}s; started again"
                    )
                    serve.start()
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                self.sample(last_report - t0)
                conns = (
                    f" connections={self.stats.samples[-1][2]} orphaned workers="
                    f"{self.stats.holders[-1]['orphaned worker processes']}"
                    if self.stats.samples
                    else ""
                )
                self.echo(
                    f"  t={last_report - t0:4.0f}s faults={sum(self.stats.faults.values())}"
                    f" instances={self.started}{conns}",
                    err=True,
                )
        self.stats.notes.append(
            f"fault phase {time.monotonic() - t0:.0f}s, {self.started} instances started, "
            f"{self.n_serves} serve(s)"
        )
        # network faults still armed: their outcome within the arm's timeout
        wait_until = time.monotonic() + ARM_TIMEOUT + COMMIT_REPLY_TIMEOUT + 1
        while time.monotonic() < wait_until and self.net is not None and self.net.pending():
            time.sleep(0.2)
        for k, ok in self.net_results:
            if ok:
                self.stats.faults[k] += 1
            else:
                missed[k] += 1
        self.net_results.clear()
        if missed:
            self.stats.notes.append(
                "faults drawn but not injected (no worker to hit, no statement or COMMIT "
                "within 5 s, a partition on): " + ", ".join(f"{k} {v}" for k, v in missed.items())
            )
        if self.net is not None:
            seen = self.net.counts()
            self.stats.notes.append(
                "proxies: "
                + ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))
                + " (connections made, refused while partitioned, dropped commit replies)"
            )
        return self.settle(t0)

    def sample(self, t: float) -> None:
        """Soak watch: workers' memory, connections (and who holds them), table bloat."""
        rss = 0.0
        kids = [k for serve in self.serves for k in serve.children()]
        current = {k.pid for k in kids}
        for k in kids:
            with contextlib.suppress(Exception):
                rss += k.memory_info().rss / 2**20
        with contextlib.suppress(psycopg.Error), self.connect() as conn:
            holders: Counter[str] = Counter()
            orphans: set[int] = set()
            for (app,) in conn.execute(
                "select coalesce(application_name, '') from "
                "pg_stat_activity where datname = current_database()"
            ):
                who, wpid = holder_of(app, current)
                holders[who] += 1
                if who == "orphaned workers" and wpid is not None:
                    orphans.add(wpid)
            holders["orphaned worker processes"] = len(orphans)
            row = conn.execute(
                "select (select count(*) from pg_stat_activity where datname = current_database()),"
                " (select coalesce(sum(n_dead_tup), 0) from pg_stat_user_tables"
                "   where schemaname in ('df', 'pgdurable')),"
                " (select coalesce(sum(pg_total_relation_size(relid)), 0) / 1024"
                "   from pg_stat_user_tables where schemaname in ('df', 'pgdurable'))"
            ).fetchone()
            if row:
                self.stats.samples.append((t, rss, int(row[0]), int(row[1]), int(row[2])))
                self.stats.holders.append(holders)

    def settle(self, t0: float, timeout: float = 240) -> list[Violation]:
        for t in self.bg:
            t.join(timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            for p in list(self.pending_signals):
                if self.send_signal(p[1], p[2]):
                    self.pending_signals.remove(p)
            if features.restart_failed(self):
                continue  # restarted: running again
            with self.connect() as conn:
                rows = conn.execute(
                    "select i.id, i.label, i.status from df.instances i where label like %s "
                    "and status not in ('completed', 'failed', 'cancelled')",
                    (LABEL_PREFIX + "%",),
                ).fetchall()
                if not rows and not self.pending_signals:
                    break
                # instances whose start call failed mid-way (found by label) and waits whose
                # signal may not have committed: send what a pending wait still needs
                for iid, label, _status in rows:
                    if ":signal:" not in label:
                        continue
                    for name in ("go", "go2"):
                        waiting = conn.execute(
                            "select 1 from df.nodes where instance_id = %s and node_type = "
                            "'SIGNAL' and status <> 'completed' and case when node_type = "
                            "'SIGNAL' then query::jsonb->>'signal_name' end = %s",
                            (iid, name),
                        ).fetchone()
                        queued = conn.execute(
                            "select 1 from pgdurable.signals where instance_id = %s and name = %s",
                            (iid, name),
                        ).fetchone()
                        pend = any(p[1] == iid and p[2] == name for p in self.pending_signals)
                        if waiting and not queued and not pend:
                            self.pending_signals.append((now, iid, name))
            time.sleep(1)
        self.stats.notes.append(f"settled at t={time.monotonic() - t0:.0f}s")
        self.sample(time.monotonic() - t0)  # the watch's last sample: after the settle phase
        self.log_evidence()
        with self.connect() as conn:
            return check(
                conn,
                self.sent,
                self.http_requests(),
                http_cut=self.http_cut,
                stats=self.stats,
                keyed=self.keyed,
            )

    def log_evidence(self) -> None:
        """Takeovers and fenced checkpoints, from serve's logs (:func:`log_evidence`)."""
        self.stats.steps.update(log_evidence([serve.log_path for serve in self.serves]))

    def http_requests(self) -> list[tuple[str, str | None]]:
        """(path, Idempotency-Key) of every request the endpoint received."""
        with self.http.lock:
            return [(r.path, r.idempotency_key) for r in self.http.requests]
