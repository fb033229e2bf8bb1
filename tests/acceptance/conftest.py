"""Acceptance tier: ``pgdurable serve`` as a real subprocess.

``serve_factory(db, **env)`` starts ``python -m pgdurable serve`` against the test's
fresh database and returns a :class:`Serve` handle (:class:`pgdurable.harness.Serve`: SIGKILL
a worker, the supervisor or everything, restart, stop, logs); every process is killed at
teardown. :func:`module_env` is the same for a module that shares one database, one serve and
one tenant role between its tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgdurable import harness
from tests.fix_db import Server, TestDB, fresh_db

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


@dataclass
class Env:
    """A module's shared database, its running serve and the tenant role its tests use."""

    db: TestDB
    serve: Serve
    role: str


@contextlib.contextmanager
def module_env(
    server: Server, log_dir: Path, env: Mapping[str, str], make_role: Callable[[TestDB], str]
) -> Iterator[Env]:
    """A fresh database (owned by the superuser), ``make_role(db)``'s role, then serve with
    ``env`` and its two workers up; everything killed and dropped afterwards."""
    with fresh_db(server, owner_superuser=True) as tdb:
        s = Serve(tdb, dict(env), log_path=log_dir / "serve.log")
        try:
            role = make_role(tdb)
            s.start()
            s.wait_workers(2)
            yield Env(tdb, s, role)
        finally:
            s.cleanup()
