"""df.start inside a SECURITY DEFINER function submits as the function's owner (pg_durable's
behaviour): the owner is `submitted_by`, its vars are the snapshot, its runner runs the steps,
and the superuser gate applies to it. The proof that the owner wrote the instance is the
row's xmin, a transaction id this very transaction holds (`pgdurable._written_here_v1`): a
pending instance written earlier cannot be enqueued by anyone else."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from tests.fix_sql import one


def definer(db, owner: str, body: str, name: str = "kick") -> str:
    """public.<name>() owned by OWNER, SECURITY DEFINER, running BODY; EXECUTE to PUBLIC."""
    with db.connect() as su:
        su.execute(
            sql.SQL("grant create, usage on schema public to {}").format(sql.Identifier(owner))
        )
    with db.connect(owner) as conn:
        conn.execute(f"""
            create function public.{name}() returns text language plpgsql security definer
            set search_path = pg_catalog, public as $f$ {body} $f$""")
    return f"public.{name}()"


def test_definer_start_submits_as_the_owner(db):
    owner = db.create_role("own")
    caller = db.create_role("clr")  # granted too: it must still not become the submitter
    with db.connect(owner) as conn:
        conn.execute("select df.setvar('who', 'the owner')")
    with db.connect(caller) as conn:
        conn.execute("select df.setvar('who', 'the caller')")
    fn = definer(db, owner, "begin return df.start('select ''{who}'' as v', 'via definer'); end")
    with db.connect(caller) as conn:
        iid = one(conn, f"select {fn}")
        assert iid
        # the caller does not see it: it is the owner's
        assert one(conn, "select count(*) from df.instances where id = %s", (iid,)) == 0
    with db.connect(owner) as conn:
        assert (
            one(conn, "select submitted_by::text from df.instances where id = %s", (iid,)) == owner
        )
        assert one(conn, "select df.status(%s)", (iid,)) == "pending"
    with db.connect() as su:
        assert (
            one(su, "select vars->>'who' from pgdurable.runs where instance_id = %s", (iid,))
            == "the owner"
        )
        assert (
            one(su, "select submitted_by::text from pgdurable.tasks where instance_id = %s", (iid,))
            == owner
        )


def test_definer_start_in_a_subtransaction_and_by_an_ungranted_caller(db):
    """The row is written by a subtransaction (an EXCEPTION block); the caller holds no
    pgdurable grant at all: the owner's rights are what count."""
    owner = db.create_role("own")
    caller = db.create_role("clr", grant=False)
    fn = definer(
        db,
        owner,
        """
        declare v text;
        begin
            begin
                v := df.start('select 1');
            exception when others then
                raise;
            end;
            return v;
        end""",
    )
    with db.connect(caller) as conn:
        iid = one(conn, f"select {fn}")
    with db.connect() as su:
        assert one(su, "select submitted_by::text from df.instances where id = %s", (iid,)) == owner
        assert one(su, "select count(*) from pgdurable.tasks where instance_id = %s", (iid,)) == 1


def test_superuser_owned_definer_is_refused(db):
    superuser = db.create_role("su", superuser=True, grant=False)
    caller = db.create_role("clr")
    with db.connect(superuser) as conn:
        conn.execute("""
            create function public.su_kick() returns text language plpgsql security definer
            set search_path = pg_catalog, public
            as $f$ begin return df.start('select 1'); end $f$""")
    with (
        db.connect(caller) as conn,
        pytest.raises(
            psycopg.errors.InsufficientPrivilege,
            match=f'superuser "{superuser}" cannot submit durable functions while '
            "pg_durable.enable_superuser_instances is off",
        ),
    ):
        conn.execute("select public.su_kick()")
    with db.connect() as su:
        assert one(su, "select count(*) from df.instances") == 0


def test_owner_without_runner_is_named(db):
    owner = db.create_role("own")
    caller = db.create_role("clr")
    fn = definer(db, owner, "begin return df.start('select 1'); end")
    with db.connect() as su:
        oid = one(su, "select oid from pg_roles where rolname = %s", (owner,))
        su.execute(f"drop function pgdurable_exec.step_{oid}(text, text, bigint)")
    with db.connect(caller) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
        conn.execute(f"select {fn}")
    msg = str(exc.value)
    assert f'role "{owner}" cannot submit durable functions: it has no step runner' in msg
    assert f'for session role "{caller}"' in msg
    assert f"select df.grant_usage('{owner}')" in (exc.value.diag.message_hint or "")


def test_new_mode_in_a_definer_is_refused_clearly(db):
    owner = db.create_role("own")
    caller = db.create_role("clr")
    fn = definer(db, owner, "begin return df.start('select 1', transaction_mode => 'new'); end")
    with (
        db.connect(caller) as conn,
        pytest.raises(
            psycopg.errors.FeatureNotSupported,
            match=r"df.start\(transaction_mode => 'new'\) cannot be called inside a SECURITY "
            f'DEFINER function \\(it runs as "{owner}" for session role "{caller}"\\)',
        ),
    ):
        conn.execute(f"select {fn}")


def test_an_earlier_pending_instance_cannot_be_enqueued_by_another_role(db):
    """What lets the definer's start through is that this transaction wrote the row: a
    pending instance the owner wrote by hand earlier stays out of another role's reach."""
    owner = db.create_role("own")
    other = db.create_role("oth")
    with db.connect(owner, autocommit=False) as conn:
        conn.execute("""
            insert into df.instances (id, label, root_node, submitted_by)
            values ('0000abcd', 'raw', '0000beef', current_user::regrole)""")
        conn.execute("""
            insert into df.nodes (id, instance_id, node_type, query, submitted_by)
            values ('0000beef', '0000abcd', 'SQL', 'select 1', current_user::regrole)""")
        conn.commit()
    with (
        db.connect(other) as conn,
        pytest.raises(
            psycopg.errors.NoDataFound, match="Instance 0000abcd not found or access denied"
        ),
    ):
        conn.execute("""select pgdurable._enqueue_v1('0000abcd', '{"k": "injected"}')""")
    with db.connect(owner) as conn:
        conn.execute("select pgdurable._enqueue_v1('0000abcd', '{}')")  # its owner may
