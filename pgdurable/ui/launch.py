"""A detached ``pgdurable ui`` beside the embedded PostgreSQL (``make demo``).

``pgdurable demo`` on the embedded server starts the dashboard for the tour's role as a
process of its own session (it outlives the demo), records ``<pid> <port>`` in
``<state dir>/ui.pid`` (``.pgdurable/ui.pid``) and its output in ``ui.log``;
``make embedded-stop`` stops it with the server (:func:`stop_detached`). Running the demo
again replaces it. Imports nothing beyond the standard library and psutil, so
``embedded-stop`` works without the ``ui`` extra.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import psutil  # type: ignore[import-untyped]

__all__ = ["DEFAULT_PORT", "start_detached", "stop_detached"]

DEFAULT_PORT = 8080
READY_TIMEOUT = 20.0


def _pidfile(state_dir: Path) -> Path:
    return state_dir / "ui.pid"


def _ours(pid: int) -> bool:
    """Whether ``pid`` is a ``pgdurable ui`` process (not a recycled pid)."""
    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "pgdurable" in cmd and "ui" in cmd


def stop_detached(state_dir: Path) -> bool:
    """Stop the dashboard recorded in ``state_dir``; True when one was running."""
    pf = _pidfile(state_dir)
    try:
        pid = int(pf.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    running = _ours(pid)
    if running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(timeout=10)
    pf.unlink(missing_ok=True)
    return running


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int) -> int:
    import socket

    if _free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_detached(dsn: str, state_dir: Path, port: int = DEFAULT_PORT) -> str:
    """Start the dashboard for ``dsn`` in the background; return its URL once it answers.
    Raises RuntimeError (with the end of its log) when it does not start."""
    state_dir.mkdir(parents=True, exist_ok=True)
    stop_detached(state_dir)
    port = _pick_port(port)
    log_path = state_dir / "ui.log"
    env = dict(os.environ, PGDURABLE_UI_DSN=dsn)  # not on the command line (ps shows it)
    for name in ("PGDURABLE_UI_TOKEN", "PGDURABLE_UI_READ_ONLY", "PGDURABLE_UI_HOST"):
        env.pop(name, None)
    # a session of its own, no Popen object (nothing to wait for: it outlives this process)
    pid = os.posix_spawn(
        sys.executable,
        [sys.executable, "-m", "pgdurable", "ui", "--host", "127.0.0.1", "--port", str(port)],
        env,
        setsid=True,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
    )
    _pidfile(state_dir).write_text(f"{pid} {port}\n")
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _pidfile(state_dir).unlink(missing_ok=True)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"the dashboard exited (status {os.waitstatus_to_exitcode(status)}):\n{tail}"
            )
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(0.2)
    stop_detached(state_dir)
    raise RuntimeError(
        f"the dashboard did not answer on {url} within {READY_TIMEOUT:.0f}s (its log: {log_path})"
    )
