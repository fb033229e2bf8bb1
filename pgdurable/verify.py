"""``pgdurable verify``: a crash verifier for the guarantees of SPEC §5 (issue 8, "Prove it").

On a scratch database (by default an embedded PostgreSQL 18 in a temporary directory, so the
tool may restart the server; with ``--dsn`` a scratch database on that server, PostgreSQL
restarts skipped and reported as such) it runs ``pgdurable serve`` as a subprocess and a mixed
workload — SQL steps that each insert one ledger row keyed by (instance, step tag), joins,
races, a loop with break, sleeps, signals (some sent before the wait, one never waited for) and
HTTP steps to a local HTTP server that records every request with its ``Idempotency-Key`` —
while injecting faults at random points:

    kill_worker        SIGKILL one worker (the supervisor restarts it)
    kill_supervisor    SIGKILL the supervisor (its workers notice and exit), start serve again
    pg_restart_fast    pg_ctl stop -m fast, start
    pg_restart_immediate  pg_ctl stop -m immediate (crash, WAL recovery), start
    sigstop_worker     SIGSTOP a worker past its lease (lease 3 s), SIGCONT 5 s later
    http_cut           the HTTP endpoint answers 503 or stops listening for 1-4 s

Then :func:`check` reads the database and reports violations:

    not_terminal       an instance not completed/failed/cancelled after the settle phase
    unexpected_status  an instance not completed, except an HTTP-kind instance failed by an HTTP
                       node while the endpoint was cut
    duplicate_effect   a SQL step's ledger row more than once (or a loop's totals off)
    missing_effect     a completed SQL step without its ledger row
    phantom_effect     a ledger row of a step that is not completed (ran but not recorded)
    http_lost          a completed HTTP node with no request received
    http_key_changed   requests of one HTTP node with different Idempotency-Keys
    http_key_shared    two HTTP nodes sharing one Idempotency-Key
    signal_lost        a sent signal neither consumed by a wait nor left in the inbox
    signal_duplicated  a signal consumed twice (or consumed and still in the inbox)
    stuck_node         a node still 'running' in a terminal instance
    stuck_task         an engine task row left for a terminal instance

The checker reads only the database and what the tool recorded, so tests feed it hand-written
states (tests/acceptance/test_verify.py) to prove it can fail.

Over 500 lines: workload, fault injector, soak watch, checker and report live together
because they share one run's records; the checker is the piece to split out first.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import schema as schema_mod
from .embedded import EmbeddedPostgres

try:  # finds serve's worker processes; in the 'test' extra, not a runtime dependency
    import psutil  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    psutil = None

TERMINAL = ("completed", "failed", "cancelled")
LEDGER = "verify_ledger"
LABEL_PREFIX = "verify:"
LEASE_SECONDS = 3
LOOP_TOTALS = {"la": 3, "lb": 2}  # the loop template: 3 body runs of 'la', 2 of 'lb'
FAULT_KINDS = (
    "kill_worker",
    "kill_supervisor",
    "pg_restart_fast",
    "pg_restart_immediate",
    "sigstop_worker",
    "http_cut",
)
FAULT_WEIGHTS = (3.0, 1.0, 1.0, 1.0, 1.5, 1.0)
LEDGER_RE = re.compile(r"insert into verify_ledger values \('\{sys_instance_id\}', '([^']+)'\)")


# -- the workload --------------------------------------------------------------------------


def _l(tag: str) -> str:
    """A SQL step with one side effect: a ledger row (instance, tag)."""
    return f"df.sql('insert into {LEDGER} values (''{{sys_instance_id}}'', ''{tag}'')')"  # noqa: S608


def _http(url: str, tag: str) -> str:
    return f"df.http('{url}/{{sys_instance_id}}/{tag}', 'POST', 'verify', null, 10)"


_LOOP_A = (
    f"df.sql('insert into {LEDGER} select ''{{sys_instance_id}}'', ''la'' returning "  # noqa: S608
    f"(select count(*) + 1 from {LEDGER} where instance = ''{{sys_instance_id}}'' "
    f"and step = ''la'')') |=> 'n'"
)


def templates(url: str) -> dict[str, str]:
    """Workflow kinds → DSL expression. Every non-loop ledger tag occurs once per instance."""
    return {
        "chain": " ~> ".join(_l(f"c{k}") for k in range(6)),
        "join": f"df.join({_l('j0')} ~> {_l('j1')}, {_l('j2')} ~> {_l('j3')}) ~> {_l('j4')}",
        "race": (
            f"df.race({_l('r0')} ~> {_l('r1')}, df.sleep(600)) ~> "
            f"df.join3({_l('r2')}, df.race({_l('r3')}, df.sleep(600)), "
            f"df.sleep(1) ~> {_l('r4')}) ~> {_l('r5')}"
        ),
        "sleep": f"{_l('s0')} ~> df.sleep(1) ~> {_l('s1')} ~> df.sleep(2) ~> {_l('s2')}",
        "loop": (
            f"{_l('l0')} ~> df.loop({_LOOP_A} ~> df.if(df.sql('select $n >= 3'), "
            f"df.break('done'), {_l('lb')})) ~> {_l('l1')}"
        ),
        "signal": (
            f"{_l('g0')} ~> df.wait_for_signal('go') ~> {_l('g1')} ~> "
            f"df.wait_for_signal('go2') ~> {_l('g2')}"
        ),
        "http": (
            f"{_l('h0')} ~> {_http(url, 'h1')} ~> {_l('h1')} ~> "
            f"df.join({_http(url, 'h2')}, {_l('h2')}) ~> {_l('h3')}"
        ),
    }


KIND_WEIGHTS = {
    "chain": 2,
    "join": 1.5,
    "race": 1,
    "sleep": 1,
    "loop": 1,
    "signal": 1.5,
    "http": 1.5,
}


def setup_database(admin_dsn: str, tenant: str) -> None:
    """Install df (idempotent), the ledger table and the tenant role's grants."""
    schema_mod.install(admin_dsn)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if not conn.execute("select 1 from pg_roles where rolname = %s", (tenant,)).fetchone():
            conn.execute(sql.SQL("create role {} login").format(sql.Identifier(tenant)))
        conn.execute(
            f"create table if not exists public.{LEDGER} (instance text not null, "
            "step text not null, at timestamptz not null default clock_timestamp())"
        )
        conn.execute(
            sql.SQL("grant all on public.{} to {}").format(
                sql.Identifier(LEDGER), sql.Identifier(tenant)
            )
        )
        conn.execute("select df.grant_usage(%s, include_http => true)", (tenant,))


# -- the HTTP endpoint ---------------------------------------------------------------------


class HttpRecorder:
    """A local HTTP server that records (path, Idempotency-Key) of every request it reads.

    ``cut(seconds, hard)``: answer 503 (soft) or close the listening socket (hard) for a while.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.mode = "up"
        self.port = 0
        self.srv: ThreadingHTTPServer | None = None
        self._bind()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        rec = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                with rec.lock:
                    rec.requests.append((self.path, self.headers.get("Idempotency-Key")))
                code, body = (503, b"cut") if rec.mode == "503" else (200, b'{"ok": true}')
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return H

    def _bind(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.srv = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True, name="verify-http").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _close(self) -> None:
        if self.srv is not None:
            self.srv.shutdown()
            self.srv.server_close()
            self.srv = None

    def cut(self, seconds: float, hard: bool) -> None:
        if hard:
            self.mode = "down"
            self._close()
            time.sleep(seconds)
            self._bind()
        else:
            self.mode = "503"
            time.sleep(seconds)
        self.mode = "up"

    def close(self) -> None:
        self._close()


# -- serve ---------------------------------------------------------------------------------


class Serve:
    """``python -m pgdurable serve`` as a subprocess (started again after each kill)."""

    def __init__(self, dsn: str, log_path: Path, workers: int = 2) -> None:
        self.dsn = dsn
        self.log_path = log_path
        self.workers_n = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            {
                "PGDURABLE_DSN": self.dsn,
                "PGDURABLE_WORKERS": str(self.workers_n),
                "PGDURABLE_LEASE_SECONDS": str(LEASE_SECONDS),
                "PGDURABLE_HTTP_POLICY": "allow-list",
                "PGDURABLE_HTTP_ALLOW": "127.0.0.1",
            }
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgdurable", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def workers(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            pids = [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []
        return pids

    def wait_workers(self, timeout: float = 30) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.workers()
            if pids:
                return pids
            if self.proc is not None and self.proc.poll() is not None:
                return []
            time.sleep(0.1)
        return []

    def kill_supervisor(self) -> None:
        assert self.proc is not None
        self.workers()
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # stragglers: orphaned workers of killed supervisors, seen or not (a worker forked
        # just before its supervisor was killed never showed up as a child)
        for p in self.leftovers():
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.kill()

    def leftovers(self) -> list[Any]:
        """Processes of this run's serves still alive: ours by their PGDURABLE_DSN (the scratch
        database's name carries the tool's pid), not by a pid that may have been reused."""
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if (
                    p.pid != os.getpid()
                    and p.environ().get("PGDURABLE_DSN") == self.dsn
                    and p.status() != psutil.STATUS_ZOMBIE
                ):
                    out.append(p)
        return out


# -- what the tool recorded ----------------------------------------------------------------


@dataclass
class SentSignal:
    instance_id: str
    name: str
    token: str
    certain: bool = True  # False: the call failed mid-way; it may or may not have committed


@dataclass
class Violation:
    kind: str
    instance_id: str | None
    detail: str


@dataclass
class Stats:
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    steps: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    samples: list[tuple[float, float, int, int, int]] = field(default_factory=list)
    """Soak watch: (t seconds, worker RSS MB, connections to the db, dead tuples, kB)."""
    holders: list[Counter[str]] = field(default_factory=list)
    """Soak watch, one per sample: the connections to the db by holder (HOLDERS)."""


HOLDERS = (
    "running serve",
    "orphaned workers",
    "client gone",
    "supervisor heartbeat",
    "verify itself",
    "other",
)
"""Who holds a connection, from its application_name ("pgdurable worker/step <pid>", "pgdurable
listener <pid>", …): a worker of the serve now running, a worker still alive whose supervisor
was killed, a worker pid that no longer exists (the server has not noticed), the rest."""


def holder_of(app: str, current: set[int]) -> tuple[str, int | None]:
    """(holder, worker pid) of one connection; ``current``: the running serve's workers."""
    parts = app.split()
    if (
        len(parts) == 3
        and parts[0] == "pgdurable"
        and parts[1] in ("worker", "listener", "step")
        and parts[2].isdigit()
    ):
        pid = int(parts[2])
        if pid in current:
            return "running serve", pid
        alive = psutil is not None and psutil.pid_exists(pid)
        if alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        return ("orphaned workers" if alive else "client gone"), pid
    if app == "pgdurable supervisor":
        return "supervisor heartbeat", None
    if app == "pgdurable verify":
        return "verify itself", None
    return "other", None


# -- the checker ---------------------------------------------------------------------------


def check(
    conn: psycopg.Connection[Any],
    sent: list[SentSignal],
    http_requests: list[tuple[str, str | None]],
    *,
    http_cut: bool,
    label_prefix: str = LABEL_PREFIX,
    stats: Stats | None = None,
) -> list[Violation]:
    """Every violation of SPEC §5 visible in the database (``conn``: a superuser session of
    the df database) for the instances labelled ``label_prefix<kind>:<n>``."""
    st = stats or Stats()
    out: list[Violation] = []
    inst = conn.execute(
        "select id, label, status from df.instances where label like %s", (label_prefix + "%",)
    ).fetchall()
    ids = [r[0] for r in inst]
    kind_of = {r[0]: r[1][len(label_prefix) :].split(":")[0] for r in inst}
    status_of = {r[0]: r[2] for r in inst}
    nodes: dict[str, list[tuple[str, str, str, str, Any]]] = defaultdict(list)
    for iid, nid, ntype, query, status, result in conn.execute(
        "select instance_id, id, node_type, query, status, result from df.nodes "
        "where instance_id = any(%s)",
        (ids,),
    ):
        nodes[iid].append((nid, ntype, query, status, result))
    ledger: dict[str, Counter[str]] = defaultdict(Counter)
    for iid, step, n in conn.execute(
        f"select instance, step, count(*) from public.{LEDGER} group by 1, 2"  # noqa: S608 (a constant)
    ):
        ledger[iid][step] = n
    tasks = dict(
        conn.execute(
            "select instance_id, count(*) from pgdurable.tasks "
            "where instance_id = any(%s) group by 1",
            (ids,),
        ).fetchall()
    )
    inbox: Counter[tuple[str, str]] = Counter()
    for iid, tok in conn.execute(
        "select instance_id, data->>'tok' from pgdurable.signals where instance_id = any(%s)",
        (ids,),
    ):
        inbox[(iid, tok)] += 1

    for iid in ids:
        status, kind = status_of[iid], kind_of[iid]
        st.statuses[status] += 1
        ns = nodes[iid]
        failed_http = [n for n in ns if n[3] == "failed" and n[1] in ("HTTP", "HTTP_MULTIPART")]
        if status not in TERMINAL:
            out.append(Violation("not_terminal", iid, f"{kind} instance still {status}"))
        elif status != "completed" and not (
            status == "failed" and kind == "http" and failed_http and http_cut
        ):
            errs = [f"{n[1]} {n[0]}: {json.dumps(n[4])[:160]}" for n in ns if n[3] == "failed"]
            out.append(Violation("unexpected_status", iid, f"{kind} {status}: {errs}"))
        if status in TERMINAL:
            for nid, ntype, _q, nstatus, _r in ns:
                if nstatus == "running":
                    out.append(Violation("stuck_node", iid, f"{ntype} node {nid} still running"))
            if tasks.get(iid):
                out.append(Violation("stuck_task", iid, f"{tasks[iid]} task row(s) left"))
        # side effects: exactly once per completed step, never for a step not completed
        tags: dict[str, str] = {}
        for _nid, ntype, query, nstatus, _r in ns:
            m = LEDGER_RE.search(query or "") if ntype == "SQL" else None
            if m:
                tags[m.group(1)] = nstatus
                if nstatus == "completed":
                    st.steps["sql steps completed"] += 1
        got = ledger.get(iid, Counter())
        for tag, nstatus in tags.items():
            if kind == "loop" and tag in LOOP_TOTALS:
                continue  # a loop body step runs once per iteration: totals checked below
            n = got.get(tag, 0)
            if nstatus == "completed" and n > 1:
                out.append(Violation("duplicate_effect", iid, f"step {tag} applied {n} times"))
            elif nstatus == "completed" and n == 0:
                out.append(Violation("missing_effect", iid, f"completed step {tag} has no row"))
            elif nstatus != "completed" and n > 0:
                out.append(
                    Violation(
                        "phantom_effect", iid, f"step {tag} is {nstatus} but applied {n} times"
                    )
                )
        for tag, want in LOOP_TOTALS.items() if kind == "loop" else ():
            n = got.get(tag, 0)
            if (status == "completed" and n != want) or n > want:
                out.append(
                    Violation(
                        "duplicate_effect" if n > want else "missing_effect",
                        iid,
                        f"loop step {tag} applied {n} times, expected {want}",
                    )
                )
        for tag, n in got.items():
            if tag not in tags and not (kind == "loop" and tag in LOOP_TOTALS):
                out.append(Violation("phantom_effect", iid, f"ledger row {tag} x{n}: no step"))
        # signals consumed by waits (tokens)
        for _nid, ntype, _q, nstatus, _result in ns:
            if ntype == "SIGNAL" and nstatus == "completed":
                st.steps["signal waits completed"] += 1

    # HTTP: at-least-once per completed node, one stable key per node, keys never shared
    by_path: dict[str, set[str | None]] = defaultdict(set)
    count_path: Counter[str] = Counter()
    for path, key in http_requests:
        by_path[path].add(key)
        count_path[path] += 1
    st.steps["http requests received"] += len(http_requests)
    st.steps["http nodes retried (>1 request)"] += sum(1 for n in count_path.values() if n > 1)
    owner_of_key: dict[str | None, str] = {}
    for path, keys in by_path.items():
        iid = path.strip("/").split("/")[0]
        if len(keys) > 1:
            out.append(Violation("http_key_changed", iid, f"{path}: keys {sorted(map(str, keys))}"))
        for key in keys:
            if key is None:
                out.append(Violation("http_key_changed", iid, f"{path}: no Idempotency-Key"))
            elif owner_of_key.setdefault(key, path) != path:
                out.append(
                    Violation(
                        "http_key_shared", iid, f"{path} and {owner_of_key[key]} share key {key}"
                    )
                )
    for iid in ids:
        for nid, ntype, query, nstatus, _r in nodes[iid]:
            if ntype == "HTTP" and nstatus == "completed":
                st.steps["http steps completed"] += 1
                url = json.loads(query)["url"].replace("{sys_instance_id}", iid)
                path = "/" + url.split("/", 3)[3]
                if count_path.get(path, 0) == 0:
                    out.append(
                        Violation(
                            "http_lost", iid, f"HTTP node {nid} completed, no request to {path}"
                        )
                    )
            elif ntype == "HTTP" and nstatus == "failed":
                st.steps["http steps failed (endpoint cut)"] += 1

    # signals (D6): every certainly sent signal is consumed by exactly one wait, or is still in
    # the inbox. The engine empties the inbox of an instance when it ends, so an unconsumed
    # signal of a terminal instance is lost only if a wait of that name is left unfulfilled;
    # otherwise it was discarded with the instance (no wait would ever take it: counted).
    consumed: Counter[tuple[str, str]] = Counter()
    open_waits: set[tuple[str, str]] = set()
    for iid in ids:
        for _nid, ntype, query, nstatus, result in nodes[iid]:
            if ntype != "SIGNAL":
                continue
            if nstatus == "completed" and isinstance(result, dict):
                data = result.get("data")
                if isinstance(data, dict) and "tok" in data:
                    consumed[(iid, data["tok"])] += 1
            elif nstatus != "completed":
                open_waits.add((iid, json.loads(query)["signal_name"]))
    st.steps["signals sent"] += sum(1 for s in sent if s.certain)
    st.steps["signals consumed"] += sum(consumed.values())
    st.steps["signals left in inbox"] += sum(inbox.values())
    discarded = 0
    for s in sent:
        k = (s.instance_id, s.token)
        n = consumed[k] + inbox[k]
        if n > 1:
            out.append(
                Violation(
                    "signal_duplicated",
                    s.instance_id,
                    f"signal {s.name} ({s.token}) consumed {consumed[k]}x, in inbox {inbox[k]}x",
                )
            )
        elif n == 0 and s.certain:
            terminal = status_of.get(s.instance_id) in TERMINAL
            if terminal and (s.instance_id, s.name) not in open_waits:
                discarded += 1
            else:
                out.append(
                    Violation(
                        "signal_lost",
                        s.instance_id,
                        f"signal {s.name} ({s.token}) neither consumed nor in the "
                        f"inbox (instance {status_of.get(s.instance_id)})",
                    )
                )
    st.steps["signals discarded at end (no wait)"] += discarded
    return out


# -- the run -------------------------------------------------------------------------------


class Run:
    def __init__(
        self, faults: int, duration: float, seed: int, dsn: str | None, workdir: Path, echo: Any
    ) -> None:
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

    # connections ---------------------------------------------------------------------
    def _dsn(self, dbname: str, user: str | None = None) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.server_dsn)
        info["dbname"] = dbname
        if user:
            info["user"] = user
        return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]

    def connect(self, tenant: bool = False) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self._dsn(self.dbname, self.tenant if tenant else None),
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
        setup_database(self._dsn(self.dbname), self.tenant)
        self.http = HttpRecorder()
        self.exprs = templates(self.http.url)
        self.serve = Serve(self._dsn(self.dbname), self.workdir / "serve.log")
        self.serve.start()
        if not self.serve.wait_workers(60):
            raise RuntimeError("serve did not start:\n" + self.serve_log())

    def serve_log(self) -> str:
        p = self.workdir / "serve.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def teardown(self, keep: bool) -> None:
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            running = set(self.serve.workers())
            if self.serve.proc is not None:
                running.add(self.serve.proc.pid)
            stray = [p.pid for p in self.serve.leftovers() if p.pid not in running]
            if stray:
                self.stats.notes.append(
                    f"{len(stray)} orphaned worker(s) of killed "
                    f"supervisors still running at teardown (killed): "
                    f"{stray[:10]}"
                )
        with contextlib.suppress(Exception):
            self.serve.stop()
        with contextlib.suppress(Exception):
            self.http.close()
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
        label = f"{LABEL_PREFIX}{kind}:{self.started}"
        self.started += 1
        try:
            with self.connect(tenant=True) as conn:
                iid = conn.execute(f"select df.start({self.exprs[kind]}, %s)", (label,)).fetchone()[
                    0
                ]  # type: ignore[index]
        except psycopg.OperationalError:
            return  # maybe committed: found by its label at the end (signals sent at settle)
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

    # faults ----------------------------------------------------------------------------
    def fault(self, kind: str) -> bool:
        if kind == "kill_worker":
            pids = [p for p in self.serve.wait_workers(10) if p not in self.stopped]
            if not pids:
                return False
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.rng.choice(pids), signal.SIGKILL)
        elif kind == "kill_supervisor":
            self.serve.kill_supervisor()
            time.sleep(self.rng.uniform(0, 1.5))
            self.serve.start()
            self.serve.wait_workers(30)
        elif kind.startswith("pg_restart"):
            if self.emb is None:
                self.stats.skipped[kind] += 1
                return False
            self.emb.stop("fast" if kind == "pg_restart_fast" else "immediate")
            time.sleep(self.rng.uniform(0, 2))
            self.emb.start()
        elif kind == "sigstop_worker":
            pids = [p for p in self.serve.wait_workers(10) if p not in self.stopped]
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
        kinds = [k for k in FAULT_KINDS if not (self.emb is None and k.startswith("pg_"))]
        weights = [w for k, w in zip(FAULT_KINDS, FAULT_WEIGHTS, strict=True) if k in kinds]
        if self.emb is None:
            self.stats.skipped.update(k for k in FAULT_KINDS if k.startswith("pg_"))
            self.stats.notes.append(
                "--dsn: PostgreSQL restarts skipped (the tool cannot restart an external server)"
            )
        self.pump(10)
        last_report = t0
        while sum(self.stats.faults.values()) < self.n_faults and time.monotonic() < deadline:
            self.pump(10)
            time.sleep(self.rng.uniform(0.2, 1.0))
            kind = self.rng.choices(kinds, weights)[0]
            if self.fault(kind):
                self.stats.faults[kind] += 1
            if self.serve.proc is not None and self.serve.proc.poll() is not None:
                self.stats.notes.append(
                    f"serve exited on its own (rc {self.serve.proc.returncode}"
                    f") at t={time.monotonic() - t0:.0f}s; started again"
                )
                self.serve.start()
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
            f"fault phase {time.monotonic() - t0:.0f}s, {self.started} instances started"
        )
        return self.settle(t0)

    def sample(self, t: float) -> None:
        """Soak watch: workers' memory, connections (and who holds them), table bloat."""
        rss = 0.0
        current = set(self.serve.workers())
        for pid in current:
            with contextlib.suppress(Exception):
                rss += psutil.Process(pid).memory_info().rss / 2**20
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
        with self.connect() as conn:
            return check(
                conn, self.sent, list(self.http.requests), http_cut=self.http_cut, stats=self.stats
            )


def render(stats: Stats, violations: list[Violation], seed: int) -> str:
    lines = [f"pgdurable verify (seed {seed})", "", "faults injected"]
    for k in FAULT_KINDS:
        extra = "  (skipped: --dsn, external server)" if stats.skipped[k] else ""
        lines.append(f"  {k:<34}{stats.faults[k]:>6}{extra}")
    lines.append(f"  {'total':<34}{sum(stats.faults.values()):>6}")
    lines += ["", "instances by status"]
    for k in ("completed", "failed", "cancelled", "running", "pending"):
        if stats.statuses[k] or k in ("completed", "failed"):
            lines.append(f"  {k:<34}{stats.statuses[k]:>6}")
    lines += ["", "steps"]
    for k, v in stats.steps.items():
        lines.append(f"  {k:<34}{v:>6}")
    lines += ["", "violations by kind"]
    by_kind = Counter(v.kind for v in violations)
    for k in (
        "not_terminal",
        "unexpected_status",
        "duplicate_effect",
        "missing_effect",
        "phantom_effect",
        "http_lost",
        "http_key_changed",
        "http_key_shared",
        "signal_lost",
        "signal_duplicated",
        "stuck_node",
        "stuck_task",
    ):
        lines.append(f"  {k:<34}{by_kind[k]:>6}")
    if violations:
        lines += ["", "violations (first 50)"]
        lines += [f"  {v.kind} {v.instance_id}: {v.detail}" for v in violations[:50]]
    if stats.samples:
        lines += ["", "soak watch (first / max / last sample; the last after the settle phase)"]
        for i, name in (
            (1, "worker RSS MB (all workers)"),
            (2, "connections to the db"),
            (3, "dead tuples in df + engine"),
            (4, "df + engine size kB"),
        ):
            vals = [smp[i] for smp in stats.samples]
            lines.append(f"  {name:<34}{vals[0]:>8.0f} {max(vals):>8.0f} {vals[-1]:>8.0f}")
        if stats.holders:
            lines.append("  connections by holder")
            for name in (*HOLDERS, "orphaned worker processes"):
                vals = [h[name] for h in stats.holders]
                if any(vals):
                    lines.append(
                        f"    {name:<32}{vals[0]:>8.0f} {max(vals):>8.0f} {vals[-1]:>8.0f}"
                    )
    if stats.notes:
        lines += ["", "notes"] + [f"  {n}" for n in stats.notes]
    lines += ["", f"violations: {len(violations)}"]
    return "\n".join(lines)


def main(
    faults: int, duration: float, seed: int | None, dsn: str | None, keep: bool, echo: Any
) -> int:
    """Run the verifier; print the table; return the number of violations."""
    if psutil is None:
        raise RuntimeError("pgdurable verify needs psutil (pip install 'pgdurable[test]')")
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    workdir = Path(tempfile.mkdtemp(prefix="pgdurable-verify-"))
    run = Run(faults, duration, seed, dsn, workdir, echo)
    echo(
        f"pgdurable verify: seed {seed}, up to {faults} faults in {duration:.0f}s, "
        f"work dir {workdir}",
        err=True,
    )
    violations: list[Violation] = []
    crashed: BaseException | None = None
    try:
        run.setup()
        violations = run.run()
    except BaseException as exc:
        crashed = exc
        raise
    finally:
        # a run that could not finish keeps its evidence and still prints what it measured
        keep_it = keep or bool(violations) or crashed is not None
        if crashed is not None:
            run.stats.notes.append(f"the run did not finish: {crashed!r}")
            echo(render(run.stats, violations, seed), err=True)
        run.teardown(keep_it)
        if keep_it:
            run.stats.notes.append(
                f"evidence kept in {workdir} (serve.log, pg18/ data dir, database {run.dbname})"
            )
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    echo(render(run.stats, violations, seed))
    return len(violations)
