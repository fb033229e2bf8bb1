"""Acceptance tier: ``pgdurable serve`` as a real subprocess (STYLE B18).

``serve_factory(db, **env)`` starts ``python -m pgdurable serve`` against the test's
fresh database and returns a :class:`Serve` handle (:class:`pgdurable.harness.Serve`: SIGKILL
a worker, the supervisor or everything, restart, stop, logs); every process is killed at
teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pgdurable import harness
from tests.fix_db import TestDB

ROOT = Path(__file__).resolve().parents[2]


class Serve(harness.Serve):
    """serve against a test database: logged in as pgdurable_service (not the superuser, not
    the installer), 2 workers, lease 5 s, HTTP allowed to 127.0.0.1 and localhost; ``env``
    overrides any of it."""

    def __init__(self, db: TestDB, env: dict[str, str], log_path: Path) -> None:
        super().__init__(
            db.service_dsn,
            log_path,
            workers=2,
            lease_seconds=5,
            http_allow="127.0.0.1,localhost",
            env=env,
            cwd=ROOT,
        )
        self.db = db


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def make(db: TestDB, **env: str) -> Serve:
        s = Serve(db, env, log_path=tmp_path / f"serve{len(started)}.log")
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.cleanup()
