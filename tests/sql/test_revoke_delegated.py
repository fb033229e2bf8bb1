"""df.revoke_usage run by a delegated admin (given df.grant_usage(admin, with_grant => true),
without include_http): it revokes what that admin may revoke, and does not fail on what it
never held (df.http, the runners' schema)."""

from __future__ import annotations

import psycopg
import pytest

from tests.fix_sql import one


def has(conn, kind, role, obj, priv):
    return one(conn, f"select has_{kind}_privilege(%s, %s, %s)", (role, obj, priv))


def notices_of(conn) -> list[tuple[str, str, str]]:
    """(severity, message, hint) of the notices CONN receives from now on."""
    got: list[tuple[str, str, str]] = []
    conn.add_notice_handler(
        lambda d: got.append((d.severity or "", d.message_primary or "", d.message_hint or ""))
    )
    return got


def test_delegated_admin_revokes_what_it_granted(db):
    boss = db.create_role("rb", grant=False)
    worker = db.create_role("rw", grant=False)
    with psycopg.connect(db.install_dsn, autocommit=True) as admin:
        admin.execute("select df.grant_usage(%s, with_grant => true)", (boss,))
        assert not has(admin, "function", boss, "df.http(text,text,text,jsonb,integer)", "execute")
    with db.connect(boss) as cb:
        cb.execute("select df.grant_usage(%s)", (worker,))
    with db.connect(worker) as cw:
        assert one(cw, "select df.start('select 1')")
    with db.connect(boss) as cb:
        cb.execute("select df.revoke_usage(%s)", (worker,))  # no "permission denied for http"
    with db.connect() as su:
        assert not has(su, "schema", worker, "df", "usage")
        assert not has(su, "table", worker, "df.instances", "select")
        assert not one(
            su, "select has_column_privilege(%s, 'df.instances', 'status', 'update')", (worker,)
        )
        assert not has(su, "function", worker, "pgdurable._enqueue_v1(varchar,jsonb)", "execute")
        assert not has(su, "schema", worker, "pgdurable", "usage")
    with (
        db.connect(worker) as cw,
        pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="permission denied for schema df"
        ),
    ):
        cw.execute("select df.start('select 1')")


def test_delegated_admin_leaves_others_grants_and_says_who_drops_the_runner(db):
    boss = db.create_role("rb", grant=False)
    worker = db.create_role("rw", grant=False)
    kept = db.create_role("rk", http=True)  # granted by the installer, with HTTP
    with psycopg.connect(db.install_dsn, autocommit=True) as admin:
        admin.execute("select df.grant_usage(%s, with_grant => true)", (boss,))
    with db.connect(boss) as cb:
        # grants of another grantor are not its to revoke: nothing changes, nothing fails
        cb.execute("select df.revoke_usage(%s)", (kept,))
    with db.connect() as su:
        assert has(su, "schema", kept, "df", "usage")
        assert has(su, "function", kept, "df.http(text,text,text,jsonb,integer)", "execute")
        assert one(su, "select pgdurable._runner_ok_v1(%s::regrole::oid)", (kept,))

    # worker: USAGE from boss only, and a runner an administrator made
    with db.connect(boss) as cb:
        cb.execute("select df.grant_usage(%s)", (worker,))
    with psycopg.connect(db.install_dsn, autocommit=True) as admin:
        admin.execute("select df.grant_usage(%s)", (worker,))
        admin.execute(f'revoke usage on schema df from "{worker}"')  # the installer's own
    with db.connect() as su:
        assert has(su, "schema", worker, "df", "usage")  # boss's grant
        assert one(su, "select pgdurable._runner_ok_v1(%s::regrole::oid)", (worker,))
    with db.connect(boss) as cb:
        notes = notices_of(cb)
        cb.execute("select df.revoke_usage(%s)", (worker,))
    warnings = [n for n in notes if n[0] == "WARNING"]
    assert len(warnings) == 1, notes
    assert f'the step runner of "{worker}" stays: "{boss}" may not drop it' in warnings[0][1]
    assert f"select df.revoke_usage('{worker}')" in warnings[0][2]
    with db.connect() as su:
        assert not has(su, "schema", worker, "df", "usage")
    # the installer finishes the job
    with psycopg.connect(db.install_dsn, autocommit=True) as admin:
        admin.execute("select df.revoke_usage(%s)", (worker,))
        assert not one(admin, "select pgdurable._runner_ok_v1(%s::regrole::oid)", (worker,))
