"""Install, upgrade and uninstall the ``df`` schema and the engine schema (docs/decisions.md D1).

Install applies ``pgdurable/sql/schema/*.sql`` (the current schema, one truth) in
one transaction under an advisory lock, then records the version in
``<engine>.migrations`` and marks ``<engine>._worker_ready.schema_version``. It runs as
an administrator (a superuser, or a managed cloud's admin role: no superuser needed):
it makes pgdurable's roles (:mod:`pgdurable.roles`) and creates every object as
``pgdurable_owner``; the operators alone are the administrator's (``pg_catalog`` needs a
superuser; otherwise they go to ``public``). Then it makes ``transaction_mode => 'new'``
work where it may (:func:`ensure_new_mode`: the dblink extension, in a schema of the owner's)
and says clearly, with the statement to run, where it may not.
Upgrade applies the forward-only ``sql/migrations/<from>-<to>.sql`` files between
the recorded version and :data:`SCHEMA_VERSION` (docs/schema-changes.md: how a schema change
is written and released). Every step is idempotent: a
second install is an upgrade with nothing to do. ``serve`` calls :func:`install`
at start, so several services starting together serialise on the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import __version__
from .online_indexes import ONLINE_INDEXES, ensure_online_indexes
from .roles import OWNER_ROLE, InstallError, ensure_launcher, ensure_roles

__all__ = [
    "ONLINE_INDEXES",
    "InstallError",
    "InstallResult",
    "ensure_online_indexes",
    "install",
    "installed_version",
    "uninstall",
]
from .sql import MIGRATIONS_DIR, schema_parts

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 6
"""The schema version this package installs and expects."""

LAUNCHER_SINCE = 3
"""The schema version that brought ``<engine>.launcher`` (an upgrade to an older one, as the
migration tests make, has no launcher to ensure)."""

ENGINE_SCHEMA_DEFAULT = "pgdurable"
# Advisory lock key of install/upgrade/uninstall: 'PGDI' as an int, fixed forever so that
# two package versions serialise against each other too.
INSTALL_LOCK_KEY = 0x50474449
# A migration meets running work (a rolling upgrade): df.start, checkpoints and the migration
# lock the same tables in different orders, so it waits for a lock at most this long (under
# PostgreSQL's deadlock_timeout, 1 s by default: the migration gives up before anyone's
# deadlock check runs, and nobody else's transaction is the one aborted), then rolls back and
# tries again, up to MIGRATION_TRIES times.
MIGRATION_LOCK_TIMEOUT = "500ms"
MIGRATION_TRIES = 60


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` did."""

    from_version: int
    to_version: int
    operator_schema: str
    dblink_schema: str | None = None
    """Where the dblink extension that ``transaction_mode => 'new'`` uses is (None: missing)."""
    new_mode_problem: str | None = None
    """Why ``transaction_mode => 'new'`` cannot work here, with what to run; None when it can."""

    @property
    def changed(self) -> bool:
        return self.from_version != self.to_version


def render(text: str, *, engine: str, op_schema: str) -> str:
    """Substitute the schema placeholders of a schema/migration file."""
    return (
        text.replace("@engine@", engine)
        .replace("@opschema@", op_schema)
        .replace("@version@", __version__)
    )


def installed_version(conn: psycopg.Connection[Any], engine: str = ENGINE_SCHEMA_DEFAULT) -> int:
    """The recorded schema version, 0 when nothing is installed."""
    row = conn.execute("select to_regclass(%s) is not null", (f"{engine}.migrations",)).fetchone()
    if not row or not row[0]:
        return 0
    got = conn.execute(
        sql.SQL("select coalesce(max(version), 0) from {}.migrations").format(
            sql.Identifier(engine)
        )
    ).fetchone()
    return int(got[0]) if got else 0


def _operator_schema(conn: psycopg.Connection[Any], requested: str | None) -> str:
    if requested:
        return requested
    row = conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()
    return "pg_catalog" if row and row[0] else "public"


_BLOCK_START = re.compile(r"^create (function|view) ", re.IGNORECASE)


def definitions_of(path: Path) -> str:
    """The ``create function`` / ``create view`` statements of a schema file, as ``create or
    replace``: what a migration's ``-- @definitions-of <file>`` line stands for, so a
    migration re-applies the current definitions instead of copying them (one truth)."""
    out: list[str] = []
    block: list[str] | None = None
    view = False
    for line in path.read_text().splitlines():
        if block is None:
            m = _BLOCK_START.match(line)
            if not m:
                continue
            view = m.group(1).lower() == "view"
            block = [_BLOCK_START.sub(lambda mm: f"create or replace {mm.group(1)} ", line)]
        else:
            block.append(line)
        end = line.rstrip()
        if end.endswith(";") if view else end.endswith(("$$;", "$f$;")):
            out.append("\n".join(block))
            block = None
    return "\n\n".join(out) + "\n"


def expand(text: str) -> str:
    """A migration's text with its ``-- @definitions-of <file>`` (the file's functions and
    views, as create or replace) and ``-- @include <file>`` (the whole file) lines expanded."""
    from .sql import SCHEMA_DIR

    text = re.sub(
        r"^-- @definitions-of (\S+)$",
        lambda m: definitions_of(SCHEMA_DIR / m.group(1)),
        text,
        flags=re.MULTILINE,
    )
    return re.sub(
        r"^-- @include (\S+)$",
        lambda m: (SCHEMA_DIR / m.group(1)).read_text(),
        text,
        flags=re.MULTILINE,
    )


def _migrations() -> dict[int, Path]:
    out: dict[int, Path] = {}
    for path in MIGRATIONS_DIR.glob("*.sql"):
        m = re.fullmatch(r"(\d+)-(\d+)\.sql", path.name)
        if not m or int(m.group(2)) != int(m.group(1)) + 1:
            raise RuntimeError(f"migration file {path.name!r} is not named <n>-<n+1>.sql")
        out[int(m.group(1))] = path
    return out


def install(
    dsn: str,
    *,
    engine: str = ENGINE_SCHEMA_DEFAULT,
    operator_schema: str | None = None,
    target_version: int = SCHEMA_VERSION,
) -> InstallResult:
    """Install or upgrade to ``target_version``; returns what changed, and whether
    ``transaction_mode => 'new'`` works (:func:`ensure_new_mode`: dblink created where this
    role may, a warning logged with the statement to run where it may not)."""
    for attempt in range(1, MIGRATION_TRIES + 1):
        try:
            res = _install(
                dsn, engine=engine, operator_schema=operator_schema, target_version=target_version
            )
            break
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            if attempt == MIGRATION_TRIES:
                raise InstallError(
                    f"the migration could not take its locks in {MIGRATION_TRIES} tries "
                    f"({MIGRATION_LOCK_TIMEOUT} each; running work kept them): "
                    f"{str(exc).splitlines()[0]}; try again, or stop the serves first"
                ) from None
            logger.info(
                "the migration waited %s for a lock held by running work; trying again (%d/%d)",
                MIGRATION_LOCK_TIMEOUT,
                attempt,
                MIGRATION_TRIES,
            )
            time.sleep(min(0.05 * attempt, 1.0))
    if res.to_version != SCHEMA_VERSION:
        return res
    ensure_online_indexes(dsn, engine)  # (pgdurable/online_indexes.py)
    schema_name, problem = ensure_new_mode(dsn, engine)
    return dataclasses.replace(res, dblink_schema=schema_name, new_mode_problem=problem)


def dblink_schema_name(engine: str = ENGINE_SCHEMA_DEFAULT) -> str:
    """The schema install creates dblink in: the engine owner's, no USAGE for anyone else."""
    return f"{engine}_dblink"


def ensure_new_mode(dsn: str, engine: str = ENGINE_SCHEMA_DEFAULT) -> tuple[str | None, str | None]:
    """Make ``transaction_mode => 'new'`` work where this login may: create the dblink
    extension in :func:`dblink_schema_name` (a schema of ``pgdurable_owner`` on which no other
    role has USAGE: tenants gain no dblink function they did not have, and none can put
    look-alikes there), then ask the database whether a launch session opens
    (``<engine>._new_mode_check_v1``, as the engine's owner, exactly as a 'new' start would).

    Returns (the schema dblink is in or None, the problem or None). A problem is logged as a
    warning naming what an administrator must run; install goes on: caller mode works.
    """
    dbl = dblink_schema_name(engine)
    reason = ""
    with psycopg.connect(
        dsn,
        autocommit=False,
        application_name="pgdurable install",
        options="-c search_path=pg_catalog,pg_temp",
    ) as conn:
        me, is_super = conn.execute(
            "select current_user::text, rolsuper from pg_catalog.pg_roles "
            "where rolname = current_user"
        ).fetchone() or ("?", False)
        where = _dblink_where(conn)
        if where is None:
            if not conn.execute(
                "select count(*) from pg_catalog.pg_available_extensions where name = 'dblink'"
            ).fetchone()[0]:  # type: ignore[index]
                reason = (
                    "this PostgreSQL server has no dblink extension to install (it comes "
                    "with PostgreSQL's contrib modules, e.g. the postgresql-contrib package)"
                )
            else:
                # the schema first, on its own: where dblink cannot be made now, an
                # administrator's statement then only needs to create the extension in it
                with contextlib.suppress(psycopg.Error), conn.transaction():
                    if not conn.execute(
                        "select count(*) from pg_catalog.pg_namespace where nspname = %s", (dbl,)
                    ).fetchone()[0]:  # type: ignore[index]
                        conn.execute(
                            sql.SQL("create schema {} authorization {}").format(
                                sql.Identifier(dbl), sql.Identifier(OWNER_ROLE)
                            )
                        )
                        conn.execute(
                            sql.SQL("revoke all on schema {} from public").format(
                                sql.Identifier(dbl)
                            )
                        )
                try:
                    with conn.transaction():
                        conn.execute(
                            sql.SQL("create extension if not exists dblink schema {}").format(
                                sql.Identifier(dbl)
                            )
                        )
                    logger.info(
                        "created the dblink extension in schema %s (transaction_mode 'new')", dbl
                    )
                except psycopg.Error as exc:
                    reason = (
                        f"role {me!r}{' (a superuser)' if is_super else ''} could not: "
                        f"{exc.diag.message_primary or str(exc).strip()}"
                    )
                where = _dblink_where(conn)
        conn.commit()
        try:
            row = conn.execute(
                sql.SQL("select {}._new_mode_check_v1()").format(sql.Identifier(engine))
            ).fetchone()
            problem = row[0] if row else None
        except psycopg.Error as exc:
            problem = f"could not check it: {exc.diag.message_primary or str(exc).strip()}"
        conn.rollback()
    if problem:
        if not problem.startswith("transaction_mode 'new'"):
            problem = f"transaction_mode 'new' is unavailable: {problem}"
        if reason:
            problem += f" [pgdurable install did not create dblink: {reason}]"
        logger.warning("%s", problem, extra={"event": "install.new_mode_unavailable"})
    else:
        logger.info("transaction_mode 'new' is ready (dblink in schema %s)", where)
    return where, problem


def _dblink_where(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute(
        "select n.nspname::text from pg_catalog.pg_extension e "
        "join pg_catalog.pg_namespace n on n.oid = e.extnamespace "
        "where e.extname = 'dblink'"
    ).fetchone()
    return str(row[0]) if row else None


def _install(
    dsn: str,
    *,
    engine: str,
    operator_schema: str | None,
    target_version: int,
) -> InstallResult:
    # search_path fixed whatever the database or role defaults say (its owner may set them)
    with psycopg.connect(
        dsn,
        autocommit=False,
        application_name="pgdurable install",
        options="-c search_path=pg_catalog,pg_temp",
    ) as conn:
        op_schema = _operator_schema(conn, operator_schema)
        # up to date: no lock at all (serve's start lands here; a lock any role can take
        # must not keep the service from starting)
        seen = installed_version(conn, engine)
        if seen == target_version:
            conn.rollback()
            return InstallResult(target_version, target_version, op_schema)
        _install_lock(conn, engine, exists=seen > 0)
        current = installed_version(conn, engine)  # again, under the lock
        if current > target_version:
            # an older package during a rolling upgrade (docs/operating.md): the CLI prints
            # this line, not a traceback
            raise InstallError(
                f"database has pgdurable schema version {current}, newer than this package's "
                f"{target_version}; upgrade the package"
            )
        if current == target_version:
            conn.rollback()  # nothing to do: no rights needed (serve's own login lands here)
            return InstallResult(current, current, op_schema)
        ensure_roles(conn)
        if current == 0:
            if target_version != SCHEMA_VERSION:
                # the schema files are the current version: an older one is reached only
                # by upgrading a database that has it
                raise ValueError(
                    f"a fresh install makes schema version {SCHEMA_VERSION}, not "
                    f"{target_version}: older versions exist only as upgrades from them"
                )
            for name in ("df", engine, engine + "_exec"):
                conn.execute(
                    sql.SQL("create schema if not exists {} authorization {}").format(
                        sql.Identifier(name), sql.Identifier(OWNER_ROLE)
                    )
                )
            for part in schema_parts():
                # every object belongs to the owner role; the operators to the admin
                as_owner = "operators" not in part.name
                if as_owner:
                    conn.execute(sql.SQL("set local role {}").format(sql.Identifier(OWNER_ROLE)))
                conn.execute(render(part.read_text(), engine=engine, op_schema=op_schema).encode())
                conn.execute("reset role")
            current = target_version
            ensure_launcher(conn, engine)
            _record(conn, engine, current)
            logger.info("installed pgdurable schema version %d", current)
            conn.commit()
            return InstallResult(0, current, op_schema)
        start = current
        migrations = _migrations()
        # running work shares these tables: give way rather than deadlock it (install())
        conn.execute(f"set local lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'")
        while current < target_version:
            path = migrations.get(current)
            if path is None:
                raise RuntimeError(f"no migration from schema version {current}")
            text = expand(path.read_text())
            # a migration runs as the owner role, unless it says it needs the installer
            # (2-3.sql hands every object of older versions over to the owner role; before
            # it, the installer owned everything)
            if current >= 3 and "-- run-as: installer" not in text.split("\n", 1)[0]:
                conn.execute(sql.SQL("set local role {}").format(sql.Identifier(OWNER_ROLE)))
            conn.execute(render(text, engine=engine, op_schema=op_schema).encode())
            conn.execute("reset role")
            current += 1
            _record(conn, engine, current)
            logger.info("migrated pgdurable schema to version %d", current)
        if current >= LAUNCHER_SINCE:
            ensure_launcher(conn, engine)
        conn.commit()
        return InstallResult(start, current, op_schema)


def _install_lock(conn: psycopg.Connection[Any], engine: str, *, exists: bool) -> None:
    """Serialise installs and upgrades. Once the schema exists: a lock on its migrations
    table, which only its owner's members may take; before (a first install): the advisory
    key, bounded, since any role can hold an advisory key."""
    if exists:
        conn.execute(
            sql.SQL("lock table {}.migrations in share row exclusive mode").format(
                sql.Identifier(engine)
            )
        )
        return
    conn.execute("set local lock_timeout = '30s'")
    try:
        conn.execute("select pg_advisory_xact_lock(%s)", (INSTALL_LOCK_KEY,))
    except psycopg.errors.LockNotAvailable:
        raise InstallError(
            f"another session has held pgdurable's install lock (advisory key "
            f"{INSTALL_LOCK_KEY}) for 30 s: another install running, or a role holding the "
            "key; see pg_locks"
        ) from None
    conn.execute("set local lock_timeout = 0")


def _record(conn: psycopg.Connection[Any], engine: str, version: int) -> None:
    conn.execute(
        sql.SQL("insert into {}.migrations (version, package) values (%s, %s)").format(
            sql.Identifier(engine)
        ),
        (version, __version__),
    )
    conn.execute(
        sql.SQL(
            "insert into {}._worker_ready (sentinel, schema_version) values (true, %s) "
            "on conflict (sentinel) do update set schema_version = excluded.schema_version, "
            "initialized_at = now()"
        ).format(sql.Identifier(engine)),
        (version,),
    )


def uninstall(dsn: str, *, engine: str = ENGINE_SCHEMA_DEFAULT) -> None:
    """Drop df, the engine schemas, the operators (they depend on df functions) and this
    install's launcher role (the three shared roles stay: other databases may use them)."""
    with psycopg.connect(dsn, autocommit=False, application_name="pgdurable uninstall") as conn:
        conn.execute("select pg_advisory_xact_lock(%s)", (INSTALL_LOCK_KEY,))
        launcher = None
        if conn.execute("select to_regclass(%s)", (f"{engine}.launcher",)).fetchone() != (None,):
            row = conn.execute(
                sql.SQL("select rolname::text from {}.launcher").format(sql.Identifier(engine))
            ).fetchone()
            launcher = row[0] if row else None
        conn.execute("drop schema if exists df cascade")
        conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(engine)))
        conn.execute(
            sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(engine + "_exec"))
        )
        if launcher:
            conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(launcher)))
        # the schema install made for dblink, with the extension when it is there (created by
        # a superuser, only one may drop it: then both stay, with a warning)
        dbl = dblink_schema_name(engine)
        try:
            with conn.transaction():
                conn.execute(
                    sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(dbl))
                )
        except psycopg.errors.InsufficientPrivilege as exc:
            logger.warning(
                "schema %s (the dblink extension) stays: %s; a superuser may run "
                "DROP SCHEMA %s CASCADE",
                dbl,
                exc.diag.message_primary,
                dbl,
                extra={"event": "uninstall.dblink_kept"},
            )
        conn.commit()
