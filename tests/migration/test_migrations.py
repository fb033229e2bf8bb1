"""One schema truth (STYLE B3): a fresh install equals the oldest released schema plus every
migration, compared catalog object by catalog object."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgdurable import schema
from pgdurable.sql import BASELINE_DIR, MIGRATIONS_DIR

SCHEMAS = ("df", "pgdurable", "pgdurable_exec")

CATALOG = """
select 'rel ' || c.relname || ' ' || c.relkind::text || ' rls=' || c.relrowsecurity::text
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname = any(%(s)s)
union all
select 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || ' notnull=' || a.attnotnull::text || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
from pg_attribute a join pg_class c on c.oid = a.attrelid
join pg_namespace n on n.oid = c.relnamespace
left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
where n.nspname = any(%(s)s) and a.attnum > 0 and not a.attisdropped
union all
select 'con ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
from pg_constraint where connamespace = any(select oid from pg_namespace where nspname = any(%(s)s))
union all
select 'idx ' || indexrelid::regclass::text || ' ' || pg_get_indexdef(indexrelid)
from pg_index i join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
where n.nspname = any(%(s)s)
union all
select 'pol ' || polrelid::regclass::text || ' ' || polname || ' ' || polcmd::text || ' '
       || coalesce(pg_get_expr(polqual, polrelid), '') || ' ' || coalesce(pg_get_expr(polwithcheck, polrelid), '')
from pg_policy
union all
select 'fun ' || n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid)
       || ') ' || md5(pg_get_functiondef(p.oid)) || ' acl=' || coalesce(p.proacl::text, '')
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname = any(%(s)s) and p.prokind in ('f', 'p')
union all
select 'op ' || o.oprname || ' ' || o.oprleft::regtype || ' ' || o.oprright::regtype || ' '
       || o.oprcode::regproc::text
from pg_operator o where o.oprcode::regproc::text like 'df.%%'
union all
select 'acl ' || c.relname || ' ' || coalesce(c.relacl::text, '')
from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = any(%(s)s)
order by 1
"""


def catalog(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(CATALOG, {"s": list(SCHEMAS)}).fetchall()
    # constraint/index names embed no oids; strip volatile whitespace only. Each install has
    # a launcher role of its own (random name, roles.ensure_launcher): one name for all
    return [
        re.sub(r"pgdurable_launcher_[0-9a-f]{8}", "pgdurable_launcher_X", re.sub(r"\s+", " ", r[0]))
        for r in rows
    ]


def baselines() -> dict[int, Path]:
    return {int(p.stem[1:]): p for p in BASELINE_DIR.glob("v*.sql")}


@pytest.fixture
def two_dbs(server):
    names = [f"m_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        for n in names:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(n)))
    yield [server.dsn(n) for n in names]
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        for n in names:
            conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(n)))


def test_oldest_baseline_plus_migrations_equals_fresh_install(two_dbs):
    fresh, migrated = two_dbs
    schema.install(fresh)
    oldest = min(baselines())
    text = baselines()[oldest].read_text()
    with psycopg.connect(migrated) as conn:
        conn.execute(schema.render(text, engine="pgdurable", op_schema="pg_catalog").encode())
        conn.execute(
            "insert into pgdurable.migrations (version, package) values (%s, 'baseline')", (oldest,)
        )
        conn.execute("insert into pgdurable._worker_ready (schema_version) values (%s)", (oldest,))
    res = schema.install(migrated)
    assert res.to_version == schema.SCHEMA_VERSION
    assert catalog(migrated) == catalog(fresh)


def test_the_current_version_has_a_frozen_baseline():
    """Releasing version N freezes schema/*.sql into baseline/vN.sql (make schema-freeze)."""
    assert schema.SCHEMA_VERSION in baselines(), (
        "schema.SCHEMA_VERSION has no baseline: run `make schema-freeze` when releasing"
    )


def test_baseline_of_current_version_matches_schema_files():
    """Editing schema/*.sql without bumping the version (and writing a migration) fails here."""
    current = "".join(p.read_text() for p in sorted((BASELINE_DIR.parent / "schema").glob("*.sql")))
    assert baselines()[schema.SCHEMA_VERSION].read_text() == current, (
        "pgdurable/sql/schema changed after the version was frozen: bump SCHEMA_VERSION, add "
        "migrations/<n>-<n+1>.sql and freeze the new baseline"
    )


def test_migration_files_are_named_by_version_pairs():
    for path in MIGRATIONS_DIR.glob("*"):
        m = re.fullmatch(r"(\d+)-(\d+)\.sql", path.name)
        assert m, path.name
        assert int(m.group(2)) == int(m.group(1)) + 1, path.name


def test_install_is_idempotent_and_records_version(db):
    res = schema.install(db.dsn)
    assert not res.changed
    with psycopg.connect(db.dsn) as conn:
        v = conn.execute("select schema_version from pgdurable._worker_ready").fetchone()[0]
        assert v == schema.SCHEMA_VERSION
        assert conn.execute("select df.version()").fetchone()[0].endswith("(df API 0.2.6)")
