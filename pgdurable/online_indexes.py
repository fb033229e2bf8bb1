"""Indexes built CONCURRENTLY after a migration has committed (docs/schema-changes.md): an
index on a table that running serves write all the time cannot go into the migration itself,
where a plain CREATE INDEX waits for every writer while the migration holds other tables.
:func:`pgdurable.schema.install` calls :func:`ensure_online_indexes` every time; a fresh
install makes these indexes with its tables (00_tables.sql)."""

from __future__ import annotations

import contextlib
import logging

import psycopg
from psycopg import sql

from .roles import OWNER_ROLE

logger = logging.getLogger(__name__)

# Indexes of the current schema that a migration leaves to be built once it has committed,
# CONCURRENTLY: a plain CREATE INDEX takes a SHARE lock, which running serves' writes hold off,
# inside a migration that holds other tables meanwhile (a rolling upgrade's migration then
# timed out 60 times running). A fresh install makes them with its tables (00_tables.sql).
ONLINE_INDEXES = {
    "tasks_owner_idx": "on {}.tasks (instance_id, lease_owner) where lease_owner is not null",
}


def ensure_online_indexes(dsn: str, engine: str) -> None:
    """Build :data:`ONLINE_INDEXES` that are missing (or left invalid by an interrupted
    build), concurrently, as the engine's owner: running serves keep writing meanwhile.
    :func:`pgdurable.schema.install` calls it every time, serve's start included (a catalog
    look when they are there). A login that cannot logs a warning: what uses the index
    works without it, only slower, and ``pgdurable upgrade`` builds it."""
    with psycopg.connect(
        dsn,
        autocommit=True,
        application_name="pgdurable install",
        options="-c search_path=pg_catalog,pg_temp",
    ) as conn:
        for name, definition in ONLINE_INDEXES.items():
            row = conn.execute(
                "select i.indisvalid from pg_catalog.pg_index i "
                "join pg_catalog.pg_class c on c.oid operator(pg_catalog.=) i.indexrelid "
                "join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace "
                "where n.nspname operator(pg_catalog.=) %s "
                "and c.relname operator(pg_catalog.=) %s",
                (engine, name),
            ).fetchone()
            if row is not None and row[0]:
                continue
            index = sql.Identifier(engine, name)
            try:
                conn.execute(sql.SQL("set role {}").format(sql.Identifier(OWNER_ROLE)))
                if row is not None:  # an earlier build was interrupted
                    conn.execute(sql.SQL("drop index concurrently if exists {}").format(index))
                conn.execute(
                    sql.SQL("create index concurrently if not exists {} ").format(
                        sql.Identifier(name)
                    )
                    + sql.SQL(definition).format(sql.Identifier(engine))
                )
                logger.info("built index %s.%s", engine, name)
            except psycopg.Error as exc:
                logger.warning(
                    "could not build index %s.%s (%s); the claim works without it, only "
                    "slower; `pgdurable upgrade` as an administrator builds it",
                    engine,
                    name,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("reset role")
