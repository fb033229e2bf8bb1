"""pgdurable's own database roles: their names, how install makes them, how serve logs in.

Three roles, cluster-wide (docs/security.md "Roles"):

- ``pgdurable_owner`` (NOLOGIN) owns ``df``, the engine schema and the runners' schema;
  the SECURITY DEFINER helpers run as it. Nothing logs in as it.
- ``pgdurable_service`` (LOGIN, member of the owner and of the step role) claims work,
  checkpoints, fires timers and signals, and cancels step backends. It never runs a
  tenant's statement.
- ``pgdurable_step`` (LOGIN, member of nothing, owns nothing) is the session a tenant's
  statement runs in, inside the tenant's runner. Code PostgreSQL runs later in that session
  (at COMMIT) runs as this role, which can call nothing without the per-connection step
  capability the service registered for it.

``pgdurable install`` (an administrator: a superuser, or a managed cloud's admin role with
CREATEROLE) creates them; where it lacks a right it stops with the statements to run.
``serve`` logs in as the service and step roles, never as the administrator.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import psycopg
from psycopg import sql

from .errors import ConfigError

logger = logging.getLogger(__name__)

OWNER_ROLE = "pgdurable_owner"
SERVICE_ROLE = "pgdurable_service"
STEP_ROLE = "pgdurable_step"
ALL_ROLES = (OWNER_ROLE, SERVICE_ROLE, STEP_ROLE)

_ROLE_OPTIONS = {
    OWNER_ROLE: "nologin",
    SERVICE_ROLE: "login",
    STEP_ROLE: "login noinherit",
}


class InstallError(RuntimeError):
    """Install cannot go on without an administrator's statement (which it names)."""


def dsn_as(dsn: str, user: str) -> str:
    """The same server and database, logged in as ``user`` (password left to libpq:
    ``~/.pgpass`` or trust; pass an explicit DSN where a password is needed)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    if info.get("user") != user:
        info.pop("password", None)
    info["user"] = user
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def dsn_user(dsn: str) -> str | None:
    user = psycopg.conninfo.conninfo_to_dict(dsn).get("user")
    return str(user) if user else None


def _one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def ensure_roles(conn: psycopg.Connection[Any]) -> None:
    """Create the three roles and the memberships the engine needs, as the connected admin.

    Inside the caller's transaction. Raises :class:`InstallError` naming the statements an
    administrator must run where this role lacks a right (no CREATEROLE, no ADMIN OPTION).
    """
    me = _one(conn, "select current_user::text")
    is_super = bool(
        _one(conn, "select rolsuper from pg_catalog.pg_roles where rolname = current_user")
    )
    version = conn.info.server_version // 10000
    todo: list[str] = []
    for role in ALL_ROLES:
        if _one(conn, "select count(*) from pg_catalog.pg_roles where rolname = %s", (role,)):
            continue
        stmt = sql.SQL("create role {} " + _ROLE_OPTIONS[role]).format(sql.Identifier(role))
        try:
            with conn.transaction():
                conn.execute(stmt)
            logger.info("created role %s", role)
        except psycopg.errors.DuplicateObject:
            pass  # another install made it meanwhile
        except psycopg.errors.InsufficientPrivilege:
            todo.append(stmt.as_string(conn) + ";")
    if todo:
        raise InstallError(
            f"role {me!r} cannot create pgdurable's roles (it needs CREATEROLE); as an "
            "administrator run:\n  "
            + "\n  ".join(todo)
            + "\nthen give the LOGIN roles passwords (ALTER ROLE ... PASSWORD) and install again"
        )
    check_step_role(conn)
    # the admin acts as the owner to create the engine's objects; the service inherits it
    # (its tables, past RLS) and the step role (to cancel step backends)
    grants = [] if is_super else [(OWNER_ROLE, me)]
    grants += [(OWNER_ROLE, SERVICE_ROLE), (STEP_ROLE, SERVICE_ROLE)]
    for role, member in grants:
        if version < 16 and _one(
            conn, "select pg_catalog.pg_has_role(%s, %s, 'USAGE')", (member, role)
        ):
            continue
        opts = " with inherit true, set true" if version >= 16 else ""
        stmt = sql.SQL("grant {} to {}" + opts).format(sql.Identifier(role), sql.Identifier(member))
        try:
            with conn.transaction():
                conn.execute(stmt)
        except psycopg.errors.InsufficientPrivilege as exc:
            todo.append(f"{stmt.as_string(conn)};  -- {exc.diag.message_primary}")
    if todo:
        raise InstallError(
            f"role {me!r} cannot grant pgdurable's role memberships; as an administrator "
            "run:\n  " + "\n  ".join(todo) + "\nthen install again"
        )


def ensure_launcher(conn: psycopg.Connection[Any], engine: str) -> str:
    """The launcher role of this install ('new'-mode starts), made once: LOGIN with a random
    password kept in ``<engine>.launcher`` (readable by the owner alone), member of nothing,
    allowed to call ``<engine>._launch_v1`` only. Returns its name."""
    eng = sql.Identifier(engine)
    row = conn.execute(sql.SQL("select l.rolname::text from {}.launcher l").format(eng)).fetchone()
    name = str(row[0]) if row else ""
    if not name or not _one(
        conn, "select count(*) from pg_catalog.pg_roles where rolname = %s", (name,)
    ):
        name = f"pgdurable_launcher_{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(32)
        # the server gets a SCRAM verifier, never the password (statement logs show this text)
        verifier = conn.pgconn.encrypt_password(
            password.encode(), name.encode(), b"scram-sha-256"
        ).decode()
        try:
            conn.execute(
                sql.SQL("create role {} login password {}").format(
                    sql.Identifier(name), sql.Literal(verifier)
                )
            )
        except psycopg.errors.InsufficientPrivilege:
            raise InstallError(
                f"cannot create the launcher role {name!r} (CREATEROLE needed); "
                "run pgdurable install as an administrator"
            ) from None
        conn.execute(
            sql.SQL(
                "insert into {}.launcher (rolname, password) values (%s, %s) "
                "on conflict (sentinel) do update set rolname = excluded.rolname, "
                "password = excluded.password"
            ).format(eng),
            (name, password),
        )
        logger.info("created the launcher role %s", name)
    conn.execute(sql.SQL("grant usage on schema {} to {}").format(eng, sql.Identifier(name)))
    conn.execute(
        sql.SQL("grant execute on function {}._launch_v1(oid, text, text, text) to {}").format(
            eng, sql.Identifier(name)
        )
    )
    return name


def check_step_role(conn: psycopg.Connection[Any], role: str = STEP_ROLE) -> None:
    """Refuse a step role that holds anything a tenant's leftover code could use."""
    row = conn.execute(
        """
        select r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb,
               (select pg_catalog.string_agg(g.rolname, ', ')
                from pg_catalog.pg_auth_members m
                join pg_catalog.pg_roles g on g.oid = m.roleid
                where m.member = r.oid),
               exists (select 1 from pg_catalog.pg_class c where c.relowner = r.oid)
               or exists (select 1 from pg_catalog.pg_proc p where p.proowner = r.oid)
               or exists (select 1 from pg_catalog.pg_namespace n where n.nspowner = r.oid)
        from pg_catalog.pg_roles r where r.rolname = %s
        """,
        (role,),
    ).fetchone()
    if row is None:
        raise InstallError(f"role {role!r} does not exist; run pgdurable install first")
    problems = []
    if row[0]:
        problems.append("is a superuser")
    if row[1]:
        problems.append("has BYPASSRLS")
    if row[2] or row[3]:
        problems.append("has CREATEROLE or CREATEDB")
    if row[4]:
        problems.append(f"is a member of {row[4]}")
    if row[5]:
        problems.append("owns objects in this database")
    if problems:
        raise InstallError(
            f"role {role!r}, which runs tenants' statements, {' and '.join(problems)}; it must "
            f"hold nothing: ALTER ROLE {role} NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB, "
            "revoke its memberships and reassign what it owns"
        )


def service_dsns(dsn: str, step_dsn: str | None) -> tuple[str, str]:
    """The service's and the step sessions' DSNs from what serve was given.

    ``dsn`` logging in as another role than the service (an administrator, as in
    development with trust authentication) is used for install only: the service then logs
    in as ``pgdurable_service`` on the same server.
    """
    service = dsn if dsn_user(dsn) == SERVICE_ROLE else dsn_as(dsn, SERVICE_ROLE)
    step = step_dsn or dsn_as(service, STEP_ROLE)
    return service, step


def check_logins(service_dsn: str, step_dsn: str) -> None:
    """Connect as both roles and refuse to run with rights a session must not hold."""
    try:
        with psycopg.connect(service_dsn, connect_timeout=10) as conn:
            row = conn.execute(
                "select current_user::text, rolsuper from pg_catalog.pg_roles "
                "where rolname = current_user"
            ).fetchone()
    except psycopg.OperationalError as exc:
        raise ConfigError(
            f"cannot log in as the service role ({dsn_user(service_dsn)}): "
            f"{str(exc).strip()}; give it a password (ALTER ROLE "
            f"{SERVICE_ROLE} PASSWORD ...) and pass --dsn with it"
        ) from None
    assert row is not None
    if row[1]:
        raise ConfigError(
            f"the service logs in as {row[0]!r}, a superuser: serve runs as "
            f"{SERVICE_ROLE}, which pgdurable install creates"
        )
    try:
        with psycopg.connect(step_dsn, connect_timeout=10) as conn:
            user = _one(conn, "select current_user::text")
            try:
                check_step_role(conn, user)
            except InstallError as exc:
                raise ConfigError(str(exc)) from None
    except psycopg.OperationalError as exc:
        raise ConfigError(
            f"cannot log in as the step role ({dsn_user(step_dsn)}): "
            f"{str(exc).strip()}; give it a password (ALTER ROLE {STEP_ROLE} "
            "PASSWORD ...) and pass --step-dsn with it"
        ) from None
