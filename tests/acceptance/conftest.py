"""Acceptance tier: ``pgdurable serve`` as a real subprocess (STYLE B18).

``serve_factory(db, **env)`` starts ``python -m pgdurable serve`` against the test's
fresh database and returns a :class:`Serve` handle that can SIGKILL workers or the
supervisor and restart; every process is killed at teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.fix_db import TestDB

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Serve:
    db: TestDB
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _all: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> Serve:
        env = dict(os.environ)
        env.update(
            {
                # serve logs in as pgdurable_service (not the superuser, not the installer)
                "PGDURABLE_DSN": self.db.service_dsn,
                "PGDURABLE_WORKERS": "2",
                "PGDURABLE_LEASE_SECONDS": "5",
                "PGDURABLE_HTTP_POLICY": "allow-list",
                "PGDURABLE_HTTP_ALLOW": "127.0.0.1,localhost",
            }
        )
        env.update(self.env)
        assert self.log_path is not None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgdurable", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self._all.append(self.proc)
        return self

    def workers(self) -> list[int]:
        assert self.proc is not None
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def wait_workers(self, n: int, timeout: float = 30) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.workers()
            if len(pids) >= n:
                return pids
            time.sleep(0.05)
        raise AssertionError(f"serve did not fork {n} workers in {timeout}s:\n{self.log()}")

    def kill_worker(self) -> int:
        pid = self.wait_workers(1)[0]
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every worker (a host crash)."""
        assert self.proc is not None
        for pid in self.workers():
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path else ""

    def cleanup(self) -> None:
        for p in self._all:
            if p.poll() is None:
                try:
                    for c in psutil.Process(p.pid).children(recursive=True):
                        c.kill()
                except psutil.NoSuchProcess:
                    pass
                p.kill()
                p.wait()


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[object]:
    started: list[Serve] = []

    def make(db: TestDB, **env: str) -> Serve:
        s = Serve(db, env, log_path=tmp_path / f"serve{len(started)}.log")
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.cleanup()
