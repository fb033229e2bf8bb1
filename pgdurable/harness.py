"""Real parts for running pgdurable from the outside: ``serve`` as a subprocess, a loopback HTTP
server that records what it receives, and a DSN helper.

One implementation for every caller that drives a real ``pgdurable serve``: ``pgdurable
verify`` (kills and restarts it under faults), the benchmarks in ``bench/`` (measure it) and
the acceptance tests (``serve_factory`` in tests/acceptance/conftest.py).

- :func:`dsn_with`: the same server with another database and/or user.
- :class:`Serve`: ``python -m pgdurable serve`` with its environment, a log file, the worker
  processes it forked (psutil), SIGKILL of one worker, of the supervisor or of everything,
  restart, a graceful stop, and cleanup of every process it started.
- :class:`HttpRecorder`: a threaded HTTP/1.1 server on 127.0.0.1 that records every request
  (method, path, headers, body, Idempotency-Key) and answers ``200 {"ok": true}``; it can be
  cut (503, or the listening socket closed) for a while, and a subclass may answer by path.

psutil is in the ``test``, ``ui`` and ``bench`` extras, not a runtime dependency: this module
imports without it and :class:`Serve` raises a clear error when it is needed and missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg

try:  # finds serve's worker processes; in the 'test' extra, not a runtime dependency
    import psutil  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    psutil = None


def dsn_with(dsn: str, *, dbname: str | None = None, user: str | None = None) -> str:
    """``dsn`` with its database and/or user replaced (everything else, password included,
    kept: the harnesses log in over trust or ``~/.pgpass``)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    if dbname:
        info["dbname"] = dbname
    if user:
        info["user"] = user
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


class ServeError(RuntimeError):
    """serve did not do what the harness waited for; the message ends with its log's tail."""


def have_psutil() -> bool:
    """Whether psutil (which :class:`Serve` needs) is installed."""
    return psutil is not None


def _need_psutil() -> Any:
    if psutil is None:
        raise RuntimeError(
            "running pgdurable serve under a harness needs psutil (pip install psutil)"
        )
    return psutil


class Serve:
    """``python -m pgdurable serve`` as a subprocess.

    ``dsn`` is what serve logs in with (``PGDURABLE_DSN``). The environment is the caller's
    plus ``PGDURABLE_WORKERS``, ``PGDURABLE_HTTP_POLICY=allow-list`` with ``http_allow``,
    ``PGDURABLE_LEASE_SECONDS`` when ``lease_seconds`` is given, then ``env`` (which wins).
    ``cwd`` is where it runs (``python -m`` imports the package found there first: an older
    package's tree runs that package). ``new_session``: serve leads a process group of its
    own, which :meth:`kill_group` kills whole (its workers stay in it).
    Output goes to ``log_path`` (appended across restarts). :meth:`start` may be called again
    after a kill or a stop: :attr:`proc` is the latest process, :attr:`starts` counts them.
    """

    def __init__(
        self,
        dsn: str,
        log_path: Path,
        *,
        workers: int = 2,
        env: Mapping[str, str] | None = None,
        lease_seconds: float | None = None,
        http_allow: str = "127.0.0.1",
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.log_path = log_path
        self.cwd = cwd
        self.new_session = new_session
        self.env: dict[str, str] = {
            "PGDURABLE_DSN": dsn,
            "PGDURABLE_WORKERS": str(workers),
            "PGDURABLE_HTTP_POLICY": "allow-list",
            "PGDURABLE_HTTP_ALLOW": http_allow,
        }
        if lease_seconds is not None:
            self.env["PGDURABLE_LEASE_SECONDS"] = f"{lease_seconds:g}"
        self.env.update(env or {})
        self.dsn = self.env["PGDURABLE_DSN"]
        try:
            self.n_workers = int(self.env["PGDURABLE_WORKERS"])
        except ValueError:  # a test of a bad value: wait_workers() then needs its n
            self.n_workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started: list[subprocess.Popen[bytes]] = []

    # -- processes ------------------------------------------------------------------------
    def start(self) -> Serve:
        """Start serve (again); returns self."""
        env = dict(os.environ)
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgdurable", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=self.new_session,
            )
        self.started.append(self.proc)
        self.starts += 1
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[Any]:
        """The supervisor's live workers as psutil processes: its children forked without an
        exec (their command line is the supervisor's). A short-lived child of another kind
        (a library looking something up with a subprocess while serve starts) is not one: a
        test once took such a pid for its worker and found it gone."""
        ps = _need_psutil()
        if self.proc is None:
            return []
        try:
            parent = ps.Process(self.proc.pid)
            cmdline = parent.cmdline()
            kids = parent.children()
        except ps.NoSuchProcess:
            return []
        out = []
        for c in kids:
            try:
                if c.cmdline() == cmdline:
                    out.append(c)
            except ps.Error:
                continue  # gone meanwhile
        return out

    def workers(self) -> list[int]:
        """The pids of the worker processes the running supervisor forked."""
        return [c.pid for c in self.children()]

    def wait_workers(self, n: int | None = None, timeout: float = 30) -> list[int]:
        """Wait until the supervisor has ``n`` workers (default: as many as configured);
        their pids. :class:`ServeError` if serve exits first or ``timeout`` passes."""
        want = self.n_workers if n is None else n
        deadline = time.monotonic() + timeout
        while True:
            pids = self.workers()
            if len(pids) >= want:
                return pids
            if self.proc is None or self.proc.poll() is not None:
                rc = None if self.proc is None else self.proc.returncode
                raise ServeError(
                    f"serve exited (rc {rc}) before forking {want} workers:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise ServeError(
                    f"serve did not fork {want} workers in {timeout:g}s:\n{self.log()}"
                )
            time.sleep(0.05)

    def kill_worker(self) -> int:
        """SIGKILL one worker (the supervisor forks a new one); its pid."""
        pid = self.wait_workers(1)[0]
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_supervisor(self) -> None:
        """SIGKILL the supervisor alone: its workers notice and exit by themselves."""
        assert self.proc is not None, "serve was never started"
        self.proc.kill()
        self.proc.wait()

    def kill_all(self) -> None:
        """SIGKILL every worker and the supervisor (a host crash)."""
        assert self.proc is not None, "serve was never started"
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()

    def kill_group(self) -> None:
        """SIGKILL serve's whole process group at once (``kill -9 -PGID``: the supervisor and
        every worker in the same instant); needs ``new_session``."""
        assert self.proc is not None, "serve was never started"
        assert self.new_session, "kill_group needs a serve started with new_session=True"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 60, *, strict: bool = True) -> int:
        """SIGTERM (a graceful drain) and wait; serve's exit code. Not stopped within
        ``timeout``: the whole tree is killed, then :class:`ServeError` when ``strict``,
        else the kill's exit code."""
        assert self.proc is not None, "serve was never started"
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_tree(self.proc)
            if strict:
                raise ServeError(
                    f"serve did not stop within {timeout:g}s of SIGTERM (killed):\n{self.log()}"
                ) from None
            return self.proc.returncode

    def leftovers(self) -> list[Any]:
        """Live processes of this serve's runs, the current one's included: found by their
        ``PGDURABLE_DSN``, not by pids that may have been reused. A worker forked just before
        its supervisor was SIGKILLed never shows up as a child; this finds it too."""
        ps = _need_psutil()
        out = []
        for p in ps.process_iter():
            with contextlib.suppress(ps.Error):
                if (
                    p.pid != os.getpid()
                    and p.environ().get("PGDURABLE_DSN") == self.dsn
                    and p.status() != ps.STATUS_ZOMBIE
                ):
                    out.append(p)
        return out

    def kill_leftovers(self) -> None:
        """SIGKILL (after SIGCONT, should one be stopped) every process :meth:`leftovers`
        finds."""
        ps = _need_psutil()
        for p in self.leftovers():
            with contextlib.suppress(ps.Error, ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.kill()

    def cleanup(self) -> None:
        """Kill every process this handle started that still runs, and its children."""
        for p in self.started:
            if p.poll() is None:
                self._kill_tree(p)

    @staticmethod
    def _kill_tree(p: subprocess.Popen[bytes]) -> None:
        ps = _need_psutil()
        with contextlib.suppress(ps.NoSuchProcess):
            for c in ps.Process(p.pid).children(recursive=True):
                with contextlib.suppress(ps.NoSuchProcess):
                    c.kill()
        p.kill()
        p.wait()

    def log(self, tail: int = 6000) -> str:
        """The last ``tail`` characters of serve's output."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]


# -- the loopback HTTP server -------------------------------------------------------------


@dataclass
class Request:
    """One request the recorder read."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it was read
    idempotency_key: str | None = None


@dataclass
class Reply:
    """An answer: status, body, Content-Type (None: no such header), more headers."""

    status: int = 200
    body: bytes = b'{"ok": true}'
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a wide join connects all at once


class HttpRecorder:
    """A threaded HTTP/1.1 server on 127.0.0.1 (an ephemeral port) that records every request.

    Every request is read whole and appended to :attr:`requests` (under :attr:`lock`), then
    answered by :meth:`answer` (``200 {"ok": true}``; override it to answer by path, or to
    write the response yourself and return None). :meth:`cut` makes the endpoint fail for a
    while. ``record=False`` keeps no log (a load generator's target). ``protocol``:
    ``HTTP/1.1`` keeps connections alive (the worker's client reuses them); ``HTTP/1.0``
    closes each after its response. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, *, record: bool = True, protocol: str = "HTTP/1.1") -> None:
        self.record = record
        self.protocol = protocol
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # set at close: handlers waiting on it return
        self.mode = "up"  # "up", "503" or "down"
        self.port = 0
        self.srv: ThreadingHTTPServer | None = None
        self._bind()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hits(self, prefix: str) -> list[Request]:
        """The recorded requests whose path starts with ``prefix``."""
        with self.lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def answer(self, handler: BaseHTTPRequestHandler, req: Request) -> Reply | None:
        """The reply to ``req``; a subclass may write to ``handler`` itself and return None."""
        return Reply()

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        handler.send_response(reply.status)
        if reply.content_type:
            handler.send_header("Content-Type", reply.content_type)
        for k, v in reply.headers:
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(reply.body)))
        handler.end_headers()
        with contextlib.suppress(OSError):  # the client may have gone (a killed worker)
            handler.wfile.write(reply.body)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = rec.protocol

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                req = Request(
                    self.command,
                    self.path,
                    dict(self.headers.items()),
                    body,
                    time.monotonic(),
                    self.headers.get("Idempotency-Key"),
                )
                if rec.record:
                    with rec.lock:
                        rec.requests.append(req)
                if rec.mode == "503":
                    reply: Reply | None = Reply(503, b"cut", "text/plain")
                else:
                    reply = rec.answer(self, req)
                if reply is not None:
                    rec.send(self, reply)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def _bind(self) -> None:
        # the same port again after a hard cut: the old socket may linger a moment
        deadline = time.monotonic() + 10
        while True:
            try:
                self.srv = _LoopbackServer(("127.0.0.1", self.port), self._handler())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True, name="http-recorder").start()

    def _unbind(self) -> None:
        if self.srv is not None:
            self.srv.shutdown()
            self.srv.server_close()
            self.srv = None

    def cut(self, seconds: float, hard: bool) -> None:
        """For ``seconds``: answer 503 (soft) or stop listening (hard); blocks that long."""
        if hard:
            self.mode = "down"
            self._unbind()
            time.sleep(seconds)
            self._bind()
        else:
            self.mode = "503"
            time.sleep(seconds)
        self.mode = "up"

    def close(self) -> None:
        self.stopping.set()
        self._unbind()

    def __enter__(self) -> HttpRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
