"""The claim (``_claim_v2``, 50_engine.sql): three quarters of a claim go to the longest-waiting
tasks and a quarter to the newest, so a workflow started behind a flood is picked up at once
and the oldest are never starved; ``_claim_v1``, the claim older packages' workers call during
a rolling upgrade, leaves instances with a newer node type alone (docs/operating.md)."""

from __future__ import annotations

from tests.fix_sql import one

E = "pgdurable"


def backlog(conn, n: int) -> list[str]:
    """``n`` one-step instances, due one second apart, oldest first (serve is not running)."""
    ids = [one(conn, "select df.start('select 1')") for _ in range(n)]
    return ids


def age(admin, ids: list[str]) -> None:
    """Make ``ids`` due in their list order: the first the longest ago."""
    for k, iid in enumerate(ids):
        admin.execute(
            f"update {E}.tasks set due_at = now() - make_interval(secs => %s) "
            "where instance_id = %s",
            (len(ids) - k + 10, iid),
        )


def claimed(admin, fn: str, limit: int) -> list[str]:
    rows = admin.execute(f"select instance_id from {E}.{fn}('t', %s, 30)", (limit,)).fetchall()
    return [r[0] for r in rows]


def test_a_claim_takes_the_newest_quarter_besides_the_oldest(db):
    role = db.create_role("cl")
    with db.connect(role) as conn, db.connect() as admin:
        ids = backlog(conn, 40)
        age(admin, ids)
        got = claimed(admin, "_claim_v2", 8)
        assert len(got) == 8
        # six of the oldest, in age order, and the two newest
        assert set(got) == set(ids[:6]) | set(ids[-2:]), (got, ids)


def test_a_claim_of_one_is_not_starved_by_new_work(db):
    """Claims of one task each while new work keeps arriving: the oldest is taken soon (a
    quarter of such claims go to the newest, at random)."""
    role = db.create_role("cs")
    with db.connect(role) as conn, db.connect() as admin:
        ids = backlog(conn, 3)
        age(admin, ids)
        oldest = ids[0]
        taken = []
        for _ in range(40):
            one(conn, "select df.start('select 1')")  # the newest, every time
            taken += claimed(admin, "_claim_v2", 1)
            if oldest in taken:
                break
        assert oldest in taken, f"40 claims of one never took the oldest task: {taken}"
        # and some of those claims of one took the newest (a quarter, at random): over many
        newest_hits = 0
        for _ in range(60):
            newest = one(conn, "select df.start('select 1')")
            newest_hits += claimed(admin, "_claim_v2", 1) == [newest]
        assert 3 <= newest_hits <= 35, newest_hits


def test_an_old_workers_claim_leaves_newer_node_types_alone(db):
    role = db.create_role("co")
    with db.connect(role) as conn, db.connect() as admin:
        retry = one(conn, "select df.start(df.retry(df.sql('select 1')))")
        each = one(conn, "select df.start(df.foreach('select 1 as x', 'select $item.x'))")
        nested = one(conn, "select df.start(df.sql('select 1') ~> df.retry('select 2'))")
        plain = one(conn, "select df.start('select 1' ~> 'select 2')")
        assert claimed(admin, "_claim_v1", 10) == [plain]
        assert sorted(claimed(admin, "_claim_v2", 10)) == sorted([retry, each, nested])
