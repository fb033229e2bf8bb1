"""df.start(…, idempotency_key => k): one instance per role and key, whatever its status, for as
long as it exists; concurrent starts with one key make one instance; roles never see each
other's keys (00_tables.sql, 30_control.sql)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from tests.fix_sql import one


def count(conn, role):
    with conn.cursor() as cur:
        return cur.execute(
            "select count(*) from df.instances where submitted_by = %s::regrole", (role,)
        ).fetchone()[0]


def test_a_key_starts_one_instance_and_returns_it_after(db):
    alice, bob = db.create_role("ka"), db.create_role("kb")
    with db.connect(alice) as a, db.connect(bob) as b:
        first = one(a, "select df.start('select 1', idempotency_key => 'order-42')")
        assert (
            one(a, "select df.start('select 2', 'other label', idempotency_key => 'order-42')")
            == first
        )
        assert count(a, alice) == 1
        # whatever its status: a finished (here: cancelled) instance still answers for its key
        one(a, "select df.cancel(%s)", (first,))
        assert one(a, "select df.start('select 1', idempotency_key => 'order-42')") == first
        # the key is shown, to its owner only
        assert a.execute(
            "select idempotency_key, status from df.instance_info(%s)", (first,)
        ).fetchone() == ("order-42", "cancelled")
        assert b.execute("select * from df.instance_info(%s)", (first,)).fetchall() == []
        # another role's key is its own: the same text starts a new instance for bob
        second = one(b, "select df.start('select 1', idempotency_key => 'order-42')")
        assert second != first
        # no key: a new instance every time
        assert one(a, "select df.start('select 1')") != one(a, "select df.start('select 1')")
        assert count(a, alice) == 3


def test_bad_keys_are_refused(db):
    role = db.create_role("kx")
    with db.connect(role) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="must not be empty"):
            conn.execute("select df.start('select 1', idempotency_key => '')")
        with pytest.raises(
            psycopg.errors.InvalidParameterValue,
            match=r"idempotency_key is too long \(513 bytes; at most 512\)",
        ):
            conn.execute("select df.start('select 1', idempotency_key => repeat('k', 513))")
        assert count(conn, role) == 0


def test_concurrent_starts_with_one_key_make_one_instance(db):
    role = db.create_role("kc")
    barrier = threading.Barrier(4)
    got: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with db.connect(role, autocommit=False) as conn:
                barrier.wait(timeout=10)
                got.append(one(conn, "select df.start('select 1', idempotency_key => 'once')"))
                conn.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert len(got) == 4
    assert len(set(got)) == 1, got
    with db.connect(role) as conn:
        assert count(conn, role) == 1


def test_a_key_given_inside_a_rolled_back_transaction_is_free_again(db):
    role = db.create_role("kr")
    with db.connect(role, autocommit=False) as conn:
        one(conn, "select df.start('select 1', idempotency_key => 'k')")
        conn.rollback()
        iid = one(conn, "select df.start('select 1', idempotency_key => 'k')")
        conn.commit()
        assert count(conn, role) == 1
        assert one(conn, "select idempotency_key from df.instances where id = %s", (iid,)) == "k"
