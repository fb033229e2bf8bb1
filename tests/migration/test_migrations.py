"""One schema truth: a fresh install equals the oldest released schema plus every
migration, compared catalog object by catalog object (never file text: a comment in
schema/*.sql changes nothing a database has); released files are frozen by their checksums
(tests/migration/released.py, docs/schema-changes.md)."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid

import psycopg
import pytest
from psycopg import sql

from pgdurable import schema
from pgdurable.sql import MIGRATIONS_DIR

from . import released

SCHEMAS = ("df", "pgdurable", "pgdurable_exec")

# Every catalog fact a migration could get wrong, one text line each, spelled out so a failure
# names what differs. Function bodies are the one place the server keeps source text as
# written: BODIES has them, compared without their comments and with whitespace collapsed
# (a comment edited in schema/*.sql changes nothing a database does).
CATALOG = """
with ns as (select oid, nspname from pg_namespace where nspname = any(%(s)s))
select 'nsp ' || n.nspname || ' owner=' || pg_get_userbyid(n.nspowner)
       || ' acl=' || coalesce(n.nspacl::text, '')
from pg_namespace n join ns on ns.oid = n.oid
union all
select 'rel ' || ns.nspname || '.' || c.relname || ' ' || c.relkind::text
       || ' owner=' || pg_get_userbyid(c.relowner) || ' rls=' || c.relrowsecurity::text
       || ' force=' || c.relforcerowsecurity::text || ' persistence=' || c.relpersistence::text
       || ' options=' || coalesce(c.reloptions::text, '') || ' acl=' || coalesce(c.relacl::text, '')
from pg_class c join ns on ns.oid = c.relnamespace
union all
select 'view ' || ns.nspname || '.' || c.relname || ' ' || pg_get_viewdef(c.oid)
from pg_class c join ns on ns.oid = c.relnamespace where c.relkind in ('v', 'm')
union all
select 'col ' || ns.nspname || '.' || c.relname || '.' || a.attname || ' #' || a.attnum::text
       || ' ' || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull::text
       || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
       || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
       || ' collation=' || coalesce(nullif(a.attcollation, 0)::regcollation::text, '')
       || ' acl=' || coalesce(a.attacl::text, '')
from pg_attribute a join pg_class c on c.oid = a.attrelid join ns on ns.oid = c.relnamespace
left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
where a.attnum > 0 and not a.attisdropped
union all
select 'con ' || ns.nspname || ' ' || coalesce(conrelid::regclass::text, '') || ' ' || conname
       || ' ' || pg_get_constraintdef(k.oid)
from pg_constraint k join ns on ns.oid = k.connamespace
union all
select 'idx ' || pg_get_indexdef(i.indexrelid)
from pg_index i join pg_class c on c.oid = i.indrelid join ns on ns.oid = c.relnamespace
union all
select 'pol ' || p.polrelid::regclass::text || ' ' || p.polname || ' ' || p.polcmd::text
       || ' permissive=' || p.polpermissive::text
       || ' to=' || (select string_agg(case r when 0 then 'public' else r::regrole::text end, ',')
                     from unnest(p.polroles) r)
       || ' using=' || coalesce(pg_get_expr(p.polqual, p.polrelid), '')
       || ' check=' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '')
from pg_policy p join pg_class c on c.oid = p.polrelid join ns on ns.oid = c.relnamespace
union all
select 'trg ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
from pg_trigger t join pg_class c on c.oid = t.tgrelid join ns on ns.oid = c.relnamespace
where not t.tgisinternal
union all
select 'evt ' || e.evtname || ' ' || e.evtevent || ' ' || e.evtfoid::regproc::text
from pg_event_trigger e join pg_proc p on p.oid = e.evtfoid join ns on ns.oid = p.pronamespace
union all
select 'fun ' || ns.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid)
       || ') kind=' || p.prokind::text
       || ' args=' || pg_get_function_arguments(p.oid)
       || ' returns=' || coalesce(pg_get_function_result(p.oid), '')
       || ' lang=' || (select lanname from pg_language where oid = p.prolang)
       || ' volatile=' || p.provolatile::text || ' strict=' || p.proisstrict::text
       || ' definer=' || p.prosecdef::text || ' leakproof=' || p.proleakproof::text
       || ' parallel=' || p.proparallel::text || ' cost=' || p.procost::text
       || ' rows=' || p.prorows::text || ' config=' || coalesce(p.proconfig::text, '')
       || ' owner=' || pg_get_userbyid(p.proowner) || ' acl=' || coalesce(p.proacl::text, '')
from pg_proc p join ns on ns.oid = p.pronamespace
where p.prokind in ('f', 'p', 'w')
union all
select 'agg ' || p.oid::regprocedure::text || ' owner=' || pg_get_userbyid(p.proowner)
from pg_proc p join ns on ns.oid = p.pronamespace where p.prokind = 'a'
union all
select 'typ ' || ns.nspname || '.' || t.typname || ' ' || t.typtype::text
       || ' owner=' || pg_get_userbyid(t.typowner)
       || coalesce(' labels=' || (select string_agg(enumlabel::text, ',' order by enumsortorder)
                                  from pg_enum where enumtypid = t.oid), '')
       || ' acl=' || coalesce(t.typacl::text, '')
from pg_type t join ns on ns.oid = t.typnamespace
where t.typtype <> 'b' and not exists (select 1 from pg_class c where c.reltype = t.oid)
union all
select 'seq ' || s.seqrelid::regclass::text || ' ' || format_type(s.seqtypid, null)
       || ' ' || s.seqstart || ' ' || s.seqincrement || ' ' || s.seqmin || ' ' || s.seqmax
       || ' cycle=' || s.seqcycle::text
from pg_sequence s join pg_class c on c.oid = s.seqrelid join ns on ns.oid = c.relnamespace
union all
select 'op ' || n.nspname || '.' || o.oprname || ' ' || o.oprleft::regtype::text || ' '
       || o.oprright::regtype::text || ' ' || o.oprcode::regproc::text
       || ' owner=' || pg_get_userbyid(o.oprowner)
       || ' comment=' || coalesce(obj_description(o.oid, 'pg_operator'), '')
from pg_operator o join pg_namespace n on n.oid = o.oprnamespace
join pg_proc p on p.oid = o.oprcode join ns on ns.oid = p.pronamespace
union all
select 'dacl ' || pg_get_userbyid(a.defaclrole) || ' ' || coalesce(ns.nspname, '*') || ' '
       || a.defaclobjtype::text || ' ' || a.defaclacl::text
from pg_default_acl a left join ns on ns.oid = a.defaclnamespace
where a.defaclnamespace = 0 or ns.oid is not null
union all
select 'cmt ' || i.type || ' ' || i.identity || ' ' || d.description
from pg_description d cross join lateral pg_identify_object(d.classoid, d.objoid, d.objsubid) i
where i.schema = any(%(s)s)
union all
select 'ext ' || x.extname || ' ' || x.extversion || ' in ' || x.extnamespace::regnamespace::text
from pg_extension x where x.extname <> 'plpgsql'
order by 1
"""

BODIES = """
select 'src ' || n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid)
       || ')', case when p.prosqlbody is null then p.prosrc else pg_get_functiondef(p.oid) end
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname = any(%(s)s) and p.prokind in ('f', 'p', 'w')
"""

# a body's tokens: comments, quoted literals and identifiers, dollar-quoted strings, whitespace
_SQL_TOKEN = re.compile(
    r"(?P<comment>--[^\n]*|/\*.*?\*/)"
    r"|(?P<literal>[Ee]?'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$(?P<tag>[A-Za-z_]\w*|)\$.*?\$(?P=tag)\$)"
    r"|(?P<space>\s+)"
    r"|(?P<other>[^\s'\"$/-]+|.)",
    re.DOTALL,
)


def code_of(body: str) -> str:
    """A function body without its comments, whitespace outside literals collapsed."""
    out: list[str] = []
    for m in _SQL_TOKEN.finditer(body):
        if m.group("comment") or m.group("space"):
            if out and out[-1] != " ":
                out.append(" ")
        else:
            out.append(m.group(0))
    return "".join(out).strip()


# tables whose rows a migration must seed as an install does (the rest start empty)
SEEDED = """
select 'rows ' || t || ' ' || n from (
  select 'pgdurable.locks' as t, string_agg(name, ',' order by name) as n from pgdurable.locks
  union all select 'pgdurable._worker_ready', string_agg(schema_version::text, ',')
            from pgdurable._worker_ready
  union all select 'pgdurable.launcher', count(*)::text from pgdurable.launcher
) x order by 1
"""


def catalog(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(CATALOG, {"s": list(SCHEMAS)}).fetchall()
        rows += conn.execute(SEEDED).fetchall()
        for fn, body in conn.execute(BODIES, {"s": list(SCHEMAS)}).fetchall():
            rows.append((f"{fn} {hashlib.md5(code_of(body).encode()).hexdigest()}",))
        # every other table starts empty in both
        for (t,) in conn.execute(
            "select c.oid::regclass::text from pg_class c join pg_namespace n "
            "on n.oid = c.relnamespace where n.nspname = any(%s) and c.relkind in ('r', 'p') "
            "and c.relname not in ('locks', '_worker_ready', 'launcher', 'migrations') "
            "order by 1",
            (list(SCHEMAS),),
        ).fetchall():
            n = conn.execute(sql.SQL("select count(*) from {}").format(sql.SQL(t))).fetchone()
            rows.append((f"rows {t} {n[0] if n else '?'}",))
    # each install has a launcher role of its own (random name, roles.ensure_launcher)
    return sorted(
        re.sub(r"pgdurable_launcher_[0-9a-f]{8}", "pgdurable_launcher_X", re.sub(r"\s+", " ", r[0]))
        for r in rows
    )


# What a released migration got wrong, repaired by a later migration (never in the released
# file: databases in the wild ran it). Tolerated only until the version named, so the repair
# cannot be forgotten: (repaired in version, the wrong line as a pattern, what it should be).
REPAIRED_LATER = [
    # 3-4.sql grants INSERT (idempotency_key) to every role that may insert df.instances'
    # other columns, and has_column_privilege says yes for the predefined pg_write_all_data
    # (PG 14+): a redundant grant (that role may write every table), not what an install makes.
    # The next migration repairs it with
    #   revoke insert (idempotency_key) on df.instances from pg_write_all_data;
    # (under `if pg_catalog.to_regrole('pg_write_all_data') is not null`).
    (
        5,
        r"^(col df\.instances\.idempotency_key .* acl=)\{pg_write_all_data=a/pgdurable_owner\}$",
        r"\1",
    ),
]


def repaired(lines: list[str]) -> list[str]:
    out = lines
    for version, wrong, right in REPAIRED_LATER:
        if version > schema.SCHEMA_VERSION:
            out = [re.sub(wrong, right, line) for line in out]
    return out


def assert_same_catalog(got: list[str], want: list[str], what: str) -> None:
    got = repaired(got)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        pytest.fail(
            f"{what} differs from a fresh install.\n"
            "only in the fresh install:\n  "
            + "\n  ".join(missing or ["-"])
            + f"\nonly in {what}:\n  "
            + "\n  ".join(extra or ["-"])
        )
    assert got == want  # duplicates too


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


# ------------------------------------------------------------------ v1 + migrations = install


def test_oldest_baseline_plus_migrations_equals_fresh_install(two_dbs):
    fresh, migrated = two_dbs
    schema.install(fresh)
    released.install_at(migrated, released.OLDEST)
    res = schema.install(migrated)
    assert (res.from_version, res.to_version) == (released.OLDEST, schema.SCHEMA_VERSION)
    assert_same_catalog(catalog(migrated), catalog(fresh), "v1 + every migration")


@pytest.mark.parametrize("version", sorted(released.GIT_BLOBS))
def test_each_released_schema_upgrades_to_a_fresh_install(two_dbs, version):
    """A database made by the package of released version N (its schema from git history)
    upgrades to exactly what a fresh install has; the path real installations take."""
    fresh, old = two_dbs
    if not released.install_released(old, version):
        pytest.skip(
            f"no git history for released schema version {version} here (a shallow clone or "
            "an unpacked sdist): `git fetch --unshallow` runs this test"
        )
    schema.install(fresh)
    res = schema.install(old)
    assert (res.from_version, res.to_version) == (version, schema.SCHEMA_VERSION)
    assert_same_catalog(catalog(old), catalog(fresh), f"released v{version} upgraded")


def test_install_at_stops_at_the_version_asked(two_dbs):
    db, _ = two_dbs
    released.install_at(db, 2)
    with psycopg.connect(db) as conn:
        assert schema.installed_version(conn) == 2
        # version 3's tables are not there yet
        assert conn.execute("select to_regclass('pgdurable.launcher')").fetchone() == (None,)


def test_a_fresh_install_cannot_claim_an_older_version(two_dbs):
    db, _ = two_dbs
    with pytest.raises(ValueError, match="a fresh install makes schema version"):
        schema.install(db, target_version=schema.SCHEMA_VERSION - 1)
    with psycopg.connect(db) as conn:
        assert schema.installed_version(conn) == 0


def test_function_bodies_compare_without_comments():
    body = """
    begin  -- a comment
        /* a block
           comment */ return 'it''s -- no comment' || $x$ -- kept $x$ || "a--b";
    end"""
    assert (
        code_of(body) == """begin return 'it''s -- no comment' || $x$ -- kept $x$ || "a--b"; end"""
    )
    assert code_of(body.replace("a comment", "another")) == code_of(body)
    assert code_of(body.replace("return", "return  1 +")) != code_of(body)
    assert code_of("select $1 - 1") == "select $1 - 1"


def test_catalog_comparison_sees_a_changed_function(two_dbs):
    """The comparison is not blind: a config, a grant or a body that differ are found."""
    a, b = two_dbs
    schema.install(a)
    schema.install(b)
    want = catalog(a)
    with psycopg.connect(b) as conn:
        conn.execute("alter function df.status(text) set work_mem = '1MB'")
        conn.execute("grant select on pgdurable.locks to public")
        # a body changed in code, not in a comment
        (ddl,) = conn.execute(
            "select pg_get_functiondef('df.cancel(text,text)'::regprocedure)"
        ).fetchone()
        conn.execute("set role pgdurable_owner")
        conn.execute(re.sub(r"(?m)^(\s*)begin$", r"\1begin\n perform 1;", ddl, count=1))
    got = catalog(b)
    with pytest.raises(pytest.fail.Exception) as err:
        assert_same_catalog(got, want, "the altered database")
    assert "work_mem=1MB" in str(err.value)
    assert "pgdurable.locks" in str(err.value)
    assert "src df.cancel(instance_id text, reason text)" in str(err.value)


# ------------------------------------------------------------------ released files are frozen


def test_released_files_are_unchanged():
    """baseline/v1.sql and the migrations of released versions are as they were released
    (pgdurable/sql/released.sha256): any byte, comments and whitespace included."""
    problems = released.problems()
    assert not problems, "\n".join(problems)


def test_every_released_version_up_to_the_current_one():
    versions = released.released_versions()
    assert versions, "baseline/v1.sql is not recorded in pgdurable/sql/released.sha256"
    assert versions[-1] <= schema.SCHEMA_VERSION, (
        f"version {versions[-1]} is released but the package's SCHEMA_VERSION is "
        f"{schema.SCHEMA_VERSION}"
    )
    # every migration the package has up to SCHEMA_VERSION, none beyond it
    want = {f"{v}-{v + 1}.sql" for v in range(released.OLDEST, schema.SCHEMA_VERSION)}
    assert {p.name for p in MIGRATIONS_DIR.glob("*")} == want


def released_copy(tmp_path):
    """A copy of pgdurable/sql whose record says its files are released as they are now (the
    tests of the guard itself do not depend on the real files being intact)."""
    sql_dir = tmp_path / "sql"
    shutil.copytree(released.SQL_DIR, sql_dir)
    sums = sql_dir / released.SUMS.name
    sums.write_text(
        "".join(f"{released.sha256(sql_dir / f)}  {f}\n" for f in released.recorded(sums))
    )
    assert released.problems(sql_dir) == []
    return sql_dir


def test_a_comment_edit_of_a_released_migration_is_named(tmp_path):
    sql_dir = released_copy(tmp_path)
    path = sql_dir / released.released_file(2)
    path.write_text(path.read_text() + "-- a harmless comment\n")
    [problem] = released.problems(sql_dir)
    assert "released migrations/1-2.sql changed" in problem
    assert "git checkout -- pgdurable/sql/migrations/1-2.sql" in problem
    (sql_dir / "baseline" / "v1.sql").unlink()
    assert any("released baseline/v1.sql is gone" in p for p in released.problems(sql_dir))


def test_freeze_records_once_and_refuses_to_change(tmp_path):
    sql_dir = released_copy(tmp_path)
    sums = sql_dir / "released.sha256"
    top = released.released_versions(sums)[-1]
    before = sums.read_text()
    # a released version again, unchanged: nothing to do
    assert "already released" in released.freeze(top, sql_dir)
    assert sums.read_text() == before
    # the next version: its migration is recorded, once
    nxt = sql_dir / released.released_file(top + 1)
    nxt.write_text("-- the next version\n")
    assert "recorded" in released.freeze(top + 1, sql_dir)
    assert released.released_versions(sums)[-1] == top + 1
    assert released.problems(sql_dir) == []
    # changed after release: refused, naming the file and what to do
    nxt.write_text("-- the next version, edited\n")
    with pytest.raises(ValueError, match=r"refusing to freeze.*git checkout --"):
        released.freeze(top + 1, sql_dir)
    assert "changed" in released.problems(sql_dir)[0]
    # a version whose predecessor is not released: refused
    (sql_dir / released.released_file(top + 3)).write_text("--\n")
    with pytest.raises(ValueError, match="is not released"):
        released.freeze(top + 3, sql_dir)


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


def test_an_online_index_missing_or_invalid_is_built_by_the_next_install(db, caplog):
    """schema.ONLINE_INDEXES are built CONCURRENTLY once a migration has committed (a plain
    CREATE INDEX in the migration waited on running serves' writes): one missing (a build
    interrupted) or left invalid is built by the next install, even when the schema is
    current; a login that may not build it says so and goes on."""

    def state() -> bool | None:
        with psycopg.connect(db.dsn) as conn:
            row = conn.execute(
                "select i.indisvalid from pg_index i join pg_class c on c.oid = i.indexrelid "
                "where c.relname = 'tasks_owner_idx' "
                "and c.relnamespace = 'pgdurable'::regnamespace"
            ).fetchone()
        return None if row is None else bool(row[0])

    assert state() is True
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("drop index pgdurable.tasks_owner_idx")
    schema.install(db.dsn)
    assert state() is True
    # an invalid one (as an interrupted CREATE INDEX CONCURRENTLY leaves it) is made again
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(
            "update pg_index set indisvalid = false "
            "where indexrelid = 'pgdurable.tasks_owner_idx'::regclass"
        )
    assert state() is False
    schema.install(db.dsn)
    assert state() is True
    # a login that may not build it (a tenant's) warns and goes on; serve's own builds it
    # (pgdurable_service acts as the engine's owner: docs/security.md)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("drop index pgdurable.tasks_owner_idx")
    schema.ensure_online_indexes(db.dsn_as(db.create_role("oi")), "pgdurable")
    assert state() is None
    assert "could not build index pgdurable.tasks_owner_idx" in caplog.text
    schema.ensure_online_indexes(db.service_dsn, "pgdurable")
    assert state() is True
