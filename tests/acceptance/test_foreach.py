"""df.foreach end to end through `pgdurable serve` (docs/foreach.md).

Bodies record their effect in ``public.ledger`` (one row per committed run of a body step,
with the row's value and the time): a body's effect must be there exactly once, whatever
fails, is cancelled, restarted or killed. One database and one serve per PostgreSQL server
for the module; the crash test kills that serve's workers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import fix_db
from tests.acceptance.conftest import Env, module_env
from tests.acceptance.test_http import BASE_ENV
from tests.acceptance.test_restart import admin, restart, start, wait_status
from tests.fix_db import Server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    def make_role(tdb: fix_db.TestDB) -> str:
        role = tdb.create_role("fe")
        with tdb.connect() as conn:
            conn.execute(
                "create table public.ledger (tag text not null, v bigint, "
                "at timestamptz not null default clock_timestamp())"
            )
            conn.execute("create table public.src (tag text not null, v bigint not null)")
            conn.execute(f'grant select, insert, delete on public.ledger, public.src to "{role}"')
        return role

    with module_env(server, tmp_path_factory.mktemp("serve"), BASE_ENV, make_role) as e:
        yield e


def ledger(env: Env, tag: str) -> list[int]:
    """The v of every ledger row of ``tag``, sorted (duplicates kept)."""
    with env.db.connect() as conn:
        rows = conn.execute(
            "select v from public.ledger where tag = %s order by v", (tag,)
        ).fetchall()
    return [int(r[0]) for r in rows]


def source(env: Env, tag: str, n: int) -> None:
    admin(
        env,
        f"insert into public.src select '{tag}', g from generate_series(1, {n}) g",
    )


def result(env: Env, iid: str) -> Any:
    with env.db.connect(env.role) as conn:
        return json.loads(conn.execute("select df.result(%s)", (iid,)).fetchone()[0])


def error(env: Env, iid: str) -> dict[str, Any]:
    with env.db.connect(env.role) as conn:
        return dict(conn.execute("select df.error(%s)", (iid,)).fetchone()[0])


def children(env: Env, iid: str) -> list[tuple[str, str, str]]:
    """(id, status, label) of the instance's FOREACH bodies, by row number."""
    with env.db.connect(env.role) as conn:
        rows = conn.execute(
            "select id, status, label from df.instances where label like %s",
            (f"{iid} foreach % row %",),
        ).fetchall()
    return sorted(
        ((str(a), str(b), str(c)) for a, b, c in rows), key=lambda r: int(r[2].rsplit(" ", 1)[1])
    )


def body(tag: str, extra: str = "") -> str:
    """A body step: the row's v into the ledger, returning it."""
    return (
        f"df.sql('insert into public.ledger (tag, v) values (''{tag}'', $item.v{extra}) "
        "returning v')"
    )


def test_rows_run_their_bodies_in_order(env: Env) -> None:
    source(env, "order", 25)
    iid = start(
        env,
        f"df.foreach('select v from public.src where tag = ''order'' order by v desc', "
        f"{body('order')}, 4)",
    )
    assert wait_status(env, iid) == "completed"
    assert ledger(env, "order") == list(range(1, 26))  # each row's body once
    res = result(env, iid)
    assert res["row_count"] == 25
    # in the rows' order (descending), each body's own result
    assert [r["rows"][0]["v"] for r in res["rows"]] == list(range(25, 0, -1))
    kids = children(env, iid)
    assert len(kids) == 25 and all(k[1] == "completed" for k in kids)
    with env.db.connect(env.role) as conn:
        text = conn.execute("select df.explain(%s)", (iid,)).fetchone()[0]
        (det,) = conn.execute(
            "select status_details from df.instance_nodes(%s) where node_type = 'FOREACH'",
            (iid,),
        ).fetchone()
    assert "✓ FOREACH (25/25 rows done, 0 running, max_parallel 4)" in text, text
    assert json.loads(det)["progress"] == "25/25"


def test_zero_rows_completes_at_once(env: Env) -> None:
    iid = start(
        env, f"df.foreach('select v from public.src where false', {body('none')}) "
        "~> df.sql('select 1 as after')"
    )
    assert wait_status(env, iid) == "completed"
    with env.db.connect(env.role) as conn:
        (res,) = conn.execute(
            "select result from df.instance_nodes(%s) where node_type = 'FOREACH'", (iid,)
        ).fetchone()
    assert json.loads(res) == {"rows": [], "row_count": 0}
    assert children(env, iid) == []
