"""A rolling upgrade: an older package's ``serve`` keeps running while this package upgrades
the schema, this package's serve starts beside it, then the old one goes (SIGTERM, or
``kill -9`` of its whole process group). Nothing may be stuck and nothing may run twice.

The old package is a released one, taken from git history (tests/migration/released.py:
:func:`~tests.migration.released.package_commit`, :func:`~tests.migration.released.export_package`)
and run from its own tree with ``PYTHONPATH`` and this venv's dependencies; it has no compiled
scheduler, so its pure-Python twin runs (``PGDURABLE_IMPL=python``). Parametrised over the
previous released schema version and the latest released one; "new" is this checkout, whose
``SCHEMA_VERSION`` may equal the latest released version (then the schema upgrade has nothing
to do and only the package changes) or be one past it (an unreleased version being opened).
Versions are derived, never written down. A shallow clone skips, saying how to get history.

The workload (one workflow per instance, several started every second from before the
upgrade until after the old serve is gone): SQL steps that each insert one row keyed by
instance and step into an exactly-once ledger: a chain, a JOIN whose right branch sleeps, a
wait for a signal the test sends a moment later, a three-iteration loop (each iteration
keyed by its own number), a last step. Asserted at the end: every instance completed; every
ledger key exactly once and no other key; no task left in the engine (so no lease); no
process of the old serve left; the schema at this package's version.

A second test pins what docs/operating.md says of a workflow using a node type the old
package lacks (the node types each package knows are asked of it): the old serve fails it
naming the type, and ``df.restart`` on the new serve completes it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql

from pgdurable import harness, schema
from tests import fix_db
from tests.fix_db import Server
from tests.migration import released

from .conftest import ROOT

# slow: two serves, a real upgrade and the drain of a few hundred instances (~40-70 s each)
pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

VERSIONS = released.released_versions()
OLD = VERSIONS[-2:]  # the previous released version and the latest one
TAG = "PGDURABLE_ROLLING_UPGRADE_SERVE"  # in the old serve's environment: finds its processes

LOOPS = 3
KEYS = ["a", "b", "j1", "j2", "sig", *(f"loop{i}" for i in range(1, LOOPS + 1)), "end"]
START_EVERY = 0.1  # seconds between two starts of the workload
SIGNAL_AFTER = 1.0  # seconds after its start an instance gets its signal


def ins(key: str) -> str:
    """A SQL step that writes the ledger row (instance, key)."""
    return f"df.sql('insert into public.ledger values (''{{sys_instance_id}}'', ''{key}'')')"


WORKFLOW = " ~> ".join(
    [
        ins("a"),
        ins("b"),
        f"df.join({ins('j1')}, df.sleep(1) ~> {ins('j2')})",
        "df.wait_for_signal('go')",
        ins("sig"),
        "df.as(df.sql('select 0 as c'), 'c')",
        # each iteration writes its own key: a re-run iteration writes it twice
        "df.loop(df.as(df.sql('insert into public.ledger values (''{sys_instance_id}'', "
        "''loop'' || ($c + 1)) returning $c + 1 as c'), 'c'), "
        f"df.sql('select $c < {LOOPS}'))",
        ins("end"),
    ]
)


@contextlib.contextmanager
def empty_db(server: Server) -> Iterator[fix_db.TestDB]:
    """A new, empty database owned by the cloud-style administrator (no pgdurable in it:
    the old package installs it), dropped afterwards with the roles made through it."""
    name = f"u_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.install_dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    tdb = fix_db.TestDB(server, name)
    try:
        yield tdb
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )
            for role in tdb.roles:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def pgdurable_cli(tree: Path, *args: str, pythonpath: Path | None = None) -> str:
    """``python -m pgdurable ARGS`` run from ``tree`` (this checkout or an old package's
    tree); its output. Fails the test, with the output, when it fails."""
    env = dict(os.environ)
    env.pop("PGDURABLE_DSN", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
        env["PGDURABLE_IMPL"] = "python"
    res = subprocess.run(
        [sys.executable, "-m", "pgdurable", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"pgdurable {' '.join(args[:1])} from {tree} failed:\n{out}"
    return out


def processes_tagged(tag: str) -> list[Any]:
    """Live processes (not zombies) whose environment carries ``TAG=tag``."""
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


class Workload:
    """Starts :data:`WORKFLOW` every :data:`START_EVERY` s (as the tenant) and signals each
    instance :data:`SIGNAL_AFTER` s after its start, in a thread, until :meth:`stop_starting`;
    then :meth:`signal_all` signals the rest."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.ids: list[str] = []
        self.started_at: dict[str, float] = {}
        self.signalled: set[str] = set()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)

    def __enter__(self) -> Workload:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_starting()

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    iid = conn.execute("select df.start(" + WORKFLOW + ")").fetchone()[0]  # type: ignore[index]
                    self.ids.append(iid)
                    self.started_at[iid] = time.monotonic()
                    self._signal_due(conn, SIGNAL_AFTER)
                    self._stop.wait(START_EVERY)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def _signal_due(self, conn: psycopg.Connection[Any], age: float) -> None:
        now = time.monotonic()
        for iid in list(self.ids):
            if iid not in self.signalled and now - self.started_at[iid] >= age:
                conn.execute("select df.signal(%s, 'go')", (iid,))
                self.signalled.add(iid)

    def stop_starting(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self.errors, f"the workload failed: {self.errors[0]!r}"

    def signal_all(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self._signal_due(conn, 0)


def completed(db: fix_db.TestDB) -> int:
    with db.connect() as conn:
        row = conn.execute("select count(*) from df.instances where status = 'completed'")
        return int(row.fetchone()[0])  # type: ignore[index]


def wait_for(what: str, check: Any, timeout: float, serves: list[harness.Serve]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.log_path.name}:\n{s.log(3000)}" for s in serves)
            pytest.fail(f"timed out ({timeout:g} s) waiting for {what}\n{logs}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def old_trees(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Each old version's package tree, exported once per module."""
    out: dict[int, Path] = {}
    for v in OLD:
        try:
            commit = released.package_commit(v)
        except released.NoHistory as exc:
            pytest.skip(f"no released package of schema version {v} here: {exc}")
        out[v] = released.export_package(commit, tmp_path_factory.mktemp(f"pgdurable-v{v}"))
    return out


@pytest.mark.parametrize("stop", ["sigterm", "kill-group"])
@pytest.mark.parametrize("old", OLD, ids=[f"old-v{v}" for v in OLD])
def test_rolling_upgrade(
    server: Server, old_trees: dict[int, Path], tmp_path: Path, old: int, stop: str
) -> None:
    tree = old_trees[old]
    tag = uuid.uuid4().hex
    serves: list[harness.Serve] = []
    with empty_db(server) as db:
        # 1. installed as a user of the old package did: its own install command
        out = pgdurable_cli(tree, "install", "--dsn", db.install_dsn, pythonpath=tree)
        assert f"schema version {old}" in out, out
        role = db.create_role("upg")
        with db.connect() as conn:
            conn.execute("create table public.ledger (instance text not null, k text not null)")
            conn.execute(sql.SQL("grant all on public.ledger to {}").format(sql.Identifier(role)))
        old_serve = harness.Serve(
            db.service_dsn,
            tmp_path / "old-serve.log",
            workers=2,
            lease_seconds=5,
            env={"PYTHONPATH": str(tree), "PGDURABLE_IMPL": "python", TAG: tag},
            cwd=tree,
            new_session=True,
        )
        serves.append(old_serve)
        try:
            old_serve.start()
            old_serve.wait_workers(2)
            # the old package runs (its own tree, its own schema version)
            assert f"schema version {old} ready" in old_serve.log(), old_serve.log()
            assert all(Path(p.cwd()) == tree for p in old_serve.children()), (
                "the old serve's workers do not run the old tree"
            )
            with Workload(db.dsn_as(role)) as work:
                # 2. the old serve works alone for a while: instances finish, others wait
                wait_for(
                    "the old serve to complete instances", lambda: completed(db) >= 5, 60, serves
                )
                # 3. the schema upgraded by this package while the old serve runs
                out = pgdurable_cli(ROOT, "upgrade", "--dsn", db.install_dsn)
                with db.connect() as conn:
                    assert schema.installed_version(conn) == schema.SCHEMA_VERSION, out
                done_at_upgrade = completed(db)
                started = {"before the upgrade": len(work.ids)}
                time.sleep(3)  # the old serve on the new schema, starts going on
                wait_for(
                    "the old serve to complete instances on the upgraded schema",
                    lambda: completed(db) > done_at_upgrade,
                    60,
                    serves,
                )
                # 4. this package's serve beside the old one
                new_serve = harness.Serve(
                    db.service_dsn,
                    tmp_path / "new-serve.log",
                    workers=2,
                    lease_seconds=5,
                    cwd=ROOT,
                )
                serves.append(new_serve)
                new_serve.start()
                new_serve.wait_workers(2)
                time.sleep(3)
                old_pids = [old_serve.proc.pid, *old_serve.workers()]  # type: ignore[union-attr]
                started["with both serves"] = len(work.ids)
                # 5. the old serve goes
                if stop == "sigterm":
                    rc = old_serve.stop(timeout=60)
                    assert rc == 0, f"old serve exited {rc} on SIGTERM:\n{old_serve.log()}"
                else:
                    old_serve.kill_group()
                time.sleep(3)  # starts go on with the new serve alone
            work.signal_all()
            ids = work.ids
            # 6. everything finishes
            with db.connect() as conn:

                def finished() -> bool:
                    row = conn.execute(
                        "select count(*) from df.instances where id = any(%s) "
                        "and status in ('completed', 'failed', 'cancelled')",
                        (ids,),
                    ).fetchone()
                    return int(row[0]) == len(ids)  # type: ignore[index]

                wait_for(f"{len(ids)} instances to finish", finished, 120, serves)
                statuses = dict(
                    conn.execute(
                        "select status, count(*) from df.instances where id = any(%s) group by 1",
                        (ids,),
                    ).fetchall()
                )
                assert statuses == {"completed": len(ids)}, (
                    statuses,
                    conn.execute(
                        "select id, df.error(id)::text from df.instances "
                        "where id = any(%s) and status <> 'completed' limit 5",
                        (ids,),
                    ).fetchall(),
                    [s.log(3000) for s in serves],
                )
                dup = conn.execute(
                    "select instance, k, count(*) from public.ledger group by 1, 2 "
                    "having count(*) <> 1 order by 1, 2 limit 10"
                ).fetchall()
                assert dup == [], f"steps ran more than once: {dup}"
                got = conn.execute(
                    "select count(*), count(distinct instance), "
                    "count(*) filter (where k <> all(%s) or instance <> all(%s)) "
                    "from public.ledger",
                    (KEYS, ids),
                ).fetchone()
                assert got == (len(ids) * len(KEYS), len(ids), 0), (
                    f"ledger (rows, instances, unexpected rows) is {got}, wanted "
                    f"{len(ids) * len(KEYS)} rows of {len(ids)} instances"
                )
                left = conn.execute("select count(*) from pgdurable.tasks").fetchone()
                assert left == (0,), f"{left} tasks (with their leases) left in the engine"
            assert processes_tagged(tag) == [], "a process of the old serve is left"
            assert all(not psutil.pid_exists(p) or _zombie(p) for p in old_pids)
            assert new_serve.running(), new_serve.log()
            # the workload spanned the whole upgrade: instances started before it, with both
            # serves and after the old one was gone
            started["in all"] = len(ids)
            counts = list(started.values())
            assert 0 < counts[0] < counts[1] < counts[2], started
        finally:
            for s in serves:
                s.cleanup()
            for p in processes_tagged(tag):
                with contextlib.suppress(psutil.Error):
                    p.kill()


def _zombie(pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return True


# A workflow of each node type a version brought, for the test below: a version that adds a
# node type adds its example here (the test says so when one is missing), and the type to
# _claim_v1's list of types an older worker leaves alone (50_engine.sql).
NEW_NODE_EXAMPLES = {
    "RETRY": "df.retry(df.sql('select 1 as x'))",  # schema version 5
    "FOREACH": "df.foreach('select 1 as x', df.sql('select $item.x as x'))",  # version 6
}


def node_types(tree: Path | None) -> set[str]:
    """The node types the package in ``tree`` (None: this checkout) knows."""
    env = dict(os.environ)
    if tree is not None:
        env.update(PYTHONPATH=str(tree), PGDURABLE_IMPL="python")
    res = subprocess.run(
        [sys.executable, "-c", "from pgdurable.graph import _abc; print(*_abc.NODE_TYPE_CODES)"],
        cwd=tree or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(res.stdout.split())


@pytest.mark.parametrize("old", OLD, ids=[f"old-v{v}" for v in OLD])
def test_an_old_serve_leaves_a_newer_node_type_to_the_new_serve(
    server: Server, old_trees: dict[int, Path], tmp_path: Path, old: int
) -> None:
    """What docs/operating.md, "Rolling upgrade", says of a workflow that uses a node type
    the old package does not know, started while only an old serve runs on the upgraded
    schema: the old workers never take it (it waits, pending, nothing failed), and the new
    serve runs it to completion once it starts."""
    tree = old_trees[old]
    new_types = sorted(node_types(None) - node_types(tree))
    if not new_types:
        pytest.skip(f"the package of schema version {old} knows every node type this one has")
    missing = [t for t in new_types if t not in NEW_NODE_EXAMPLES]
    assert not missing, f"add an example workflow of {missing} to NEW_NODE_EXAMPLES"
    with empty_db(server) as db:
        pgdurable_cli(tree, "install", "--dsn", db.install_dsn, pythonpath=tree)
        role = db.create_role("upg")
        old_serve = harness.Serve(
            db.service_dsn,
            tmp_path / "old-serve.log",
            workers=1,
            env={"PYTHONPATH": str(tree), "PGDURABLE_IMPL": "python"},
            cwd=tree,
        )
        new_serve = harness.Serve(db.service_dsn, tmp_path / "new-serve.log", workers=1, cwd=ROOT)
        try:
            old_serve.start()
            old_serve.wait_workers(1)
            pgdurable_cli(ROOT, "upgrade", "--dsn", db.install_dsn)
            with db.connect(role) as conn:
                ids = {
                    t: conn.execute(f"select df.start({NEW_NODE_EXAMPLES[t]})").fetchone()[0]  # type: ignore[index]
                    for t in new_types
                }
                # a plain workflow beside them: the old serve is alive and claiming
                plain = conn.execute("select df.start('select 1 as x')").fetchone()[0]  # type: ignore[index]
                assert conn.execute("select df.await_instance(%s, 60)", (plain,)).fetchone() == (
                    "completed",
                ), old_serve.log()
                time.sleep(3)  # several claim rounds of the old serve
                for t, iid in ids.items():
                    status = conn.execute(
                        "select status from df.instances where id = %s", (iid,)
                    ).fetchone()
                    assert status == ("pending",), (t, status, old_serve.log())
            assert "unknown node_type" not in old_serve.log()
            assert old_serve.stop(timeout=60) == 0, old_serve.log()
            new_serve.start()
            new_serve.wait_workers(1)
            with db.connect(role) as conn:
                for t, iid in ids.items():
                    status = conn.execute("select df.await_instance(%s, 60)", (iid,)).fetchone()
                    assert status == ("completed",), (t, status, new_serve.log())
                    runs = conn.execute(
                        "select count(*) from df.instance_runs(%s)", (iid,)
                    ).fetchone()
                    assert runs == (1,), (t, runs)
        finally:
            old_serve.cleanup()
            new_serve.cleanup()


def test_a_package_older_than_the_schema_says_so_in_one_line(db: fix_db.TestDB) -> None:
    """serve, install and upgrade of a package older than the database's schema (an old
    serve restarted after the upgrade) refuse with one line naming both versions."""
    newer = schema.SCHEMA_VERSION + 1
    with db.connect() as conn:
        conn.execute(
            "insert into pgdurable.migrations (version, package) values (%s, 'newer')", (newer,)
        )
    want = (
        f"Error: database has pgdurable schema version {newer}, newer than this package's "
        f"{schema.SCHEMA_VERSION}; upgrade the package"
    )
    for args in (
        ["serve", "--dsn", db.service_dsn],
        ["install", "--dsn", db.install_dsn],
        ["upgrade", "--dsn", db.install_dsn],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "pgdurable", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 1, (args[0], res.stdout, res.stderr)
        assert "Traceback" not in res.stderr, (args[0], res.stderr)
        assert want in res.stderr.splitlines(), (args[0], res.stderr)
