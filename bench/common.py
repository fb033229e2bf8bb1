"""What every benchmark in bench/ shares: the PostgreSQL under test, serve, progress, CPU.

- :class:`Server`: ``--dsn`` or an embedded PostgreSQL 18 of our own; fresh databases on it;
  :func:`make_tenant`: the benchmark's tenant role in one of them.
- :func:`start_serve` / :func:`worker_procs`: ``python -m pgdurable serve`` through the one
  process wrapper (:class:`pgdurable.harness.Serve`), and its workers as psutil processes.
- :class:`Progress`: one status line on stderr.
- :func:`cpu_seconds` / :func:`cpu_delta`: user + system CPU of a set of processes;
  :func:`process_clock`: now, on the clock of a process's start time.
- :func:`interrupt`: a SIGTERM handler that unwinds like ^C.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from pgdurable.embedded import EmbeddedPostgres
from pgdurable.harness import Serve, dsn_with

ROOT = Path(__file__).resolve().parents[1]
TENANT = "pgdurable_bench"
# how often a benchmark polls progress; each poll is one (subtracted) transaction
POLL_S = 0.25
LEAF_TYPES = ("SQL", "HTTP", "HTTP_MULTIPART")
TERMINAL = ("completed", "failed", "cancelled")


# -- progress -------------------------------------------------------------------------


class Progress:
    """One status line on stderr: rewritten in place on a terminal, throttled lines otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, msg: str, *, force: bool = True) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + msg)
            if force:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif force or now - self.last >= 2.0:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
            self.last = now

    def tick(self, msg: str) -> None:
        self(msg, force=False)


# -- the server -----------------------------------------------------------------------


class Server:
    """The PostgreSQL under test: ``--dsn`` or an embedded PostgreSQL 18 of our own."""

    def __init__(self, dsn: str | None, profile: bool) -> None:
        self.tmp: Path | None = None
        self.embedded: EmbeddedPostgres | None = None
        if dsn:
            self.admin_dsn = dsn
        else:
            self.tmp = Path(tempfile.mkdtemp(prefix="pgdurable-bench-"))
            settings = {"max_connections": "300"}
            if profile:
                settings["shared_preload_libraries"] = "'pg_stat_statements'"
                # the statements inside the engine's functions too (a checkpoint's parts)
                settings["pg_stat_statements.track"] = "all"
                # and how often each was planned (a plan per call: a custom plan, or a
                # cached one invalidated)
                settings["pg_stat_statements.track_planning"] = "on"
            # everything else stays at PostgreSQL's defaults (fsync, synchronous_commit on)
            self.embedded = EmbeddedPostgres(self.tmp / "data", settings=settings)
            self.admin_dsn = self.embedded.start()
        with self.admin() as conn:
            row = conn.execute(
                "select current_setting('server_version'), "
                "current_setting('synchronous_commit'), current_setting('fsync'), "
                "current_setting('shared_buffers'), "
                "current_setting('shared_preload_libraries')"
            ).fetchone()
        assert row is not None
        self.version, self.sync_commit, self.fsync, self.shared_buffers, preload = row
        self.has_pgss = "pg_stat_statements" in preload

    def admin(self, dbname: str | None = None) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname) if dbname else self.admin_dsn, autocommit=True)

    def dsn(self, dbname: str, user: str | None = None) -> str:
        return dsn_with(self.admin_dsn, dbname=dbname, user=user)

    def fresh_db(self, name: str) -> str:
        with self.admin() as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_db(self, name: str) -> None:
        with contextlib.suppress(psycopg.Error), self.admin() as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )

    def xact_commit(self, dbname: str) -> int:
        with self.admin() as conn:
            row = conn.execute(
                "select xact_commit from pg_stat_database where datname = %s", (dbname,)
            ).fetchone()
        return int(row[0]) if row else 0

    def postgres_pids(self, dbname: str | None = None) -> list[psutil.Process]:
        """The processes of this server: its postmaster and children; with ``dbname``, of the
        children only the backends of that database and the server's own processes (walwriter,
        checkpointer…: no database). A shared box runs other clusters, and other databases of
        this one (other sessions' benchmarks, a soak): their CPU is not this run's."""
        keep: set[int] | None = None
        with self.admin() as conn:
            row = conn.execute("select pg_backend_pid()").fetchone()
            if dbname is not None:
                keep = {
                    int(r[0])
                    for r in conn.execute(
                        "select pid from pg_stat_activity where datname = %s or datname is null",
                        (dbname,),
                    ).fetchall()
                }
        assert row is not None
        try:
            post = psutil.Process(int(row[0])).parent()
            if post is None:
                return []
            kids = post.children()
        except psutil.Error:
            names = ("postgres", "postmaster")
            return [p for p in psutil.process_iter(["name"]) if p.info["name"] in names]
        return [post, *(k for k in kids if keep is None or k.pid in keep)]

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.destroy()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def make_tenant(server: Server, dsn: str, http: bool) -> str:
    """The benchmark's tenant role (LOGIN, df usage, HTTP when ``http``) in the database of
    ``dsn``; its DSN there."""
    with server.admin() as conn:
        if not conn.execute("select 1 from pg_roles where rolname = %s", (TENANT,)).fetchone():
            conn.execute(sql.SQL("create role {} login").format(sql.Identifier(TENANT)))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select df.grant_usage(%s, include_http => %s)", (TENANT, http))
    return dsn_with(dsn, user=TENANT)


# -- serve ----------------------------------------------------------------------------


def start_serve(
    dsn: str, workers: int, log_path: Path, env: Mapping[str, str] | None = None
) -> Serve:
    """``python -m pgdurable serve`` on ``dsn`` with ``workers`` workers, started."""
    return Serve(dsn, log_path, workers=workers, env=env, cwd=ROOT).start()


def worker_procs(serve: Serve, timeout: float = 60) -> list[psutil.Process]:
    """serve's workers once all have forked (:class:`pgdurable.harness.ServeError` if not)."""
    return [psutil.Process(pid) for pid in serve.wait_workers(timeout=timeout)]


# -- CPU ------------------------------------------------------------------------------


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    """pid -> user + system CPU seconds so far (processes gone meanwhile left out)."""
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def process_clock() -> float:
    """Now, on the clock of psutil's ``create_time()``: the boot time plus the seconds since
    boot. Not ``time.time()``: psutil counts a process's start from the boot time the kernel
    recorded, and the wall clock drifts away from that as NTP corrects it (seen here: a process
    started a moment ago dated a second in the past). Compared with ``time.time()``, serve's
    first backends looked older than the run and their CPU was left out."""
    with open("/proc/uptime") as f:
        return psutil.boot_time() + float(f.read().split()[0])


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`cpu_seconds` samples (new pids count from 0)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM (CI timeouts, kill) unwinds like ^C, so serve and the embedded server stop."""
    raise KeyboardInterrupt
