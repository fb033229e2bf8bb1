"""Through a real ``pgdurable serve``: what df.instance_nodes and df.explain show describes the
current iteration of a loop, a decided RACE's loser ends (a LOOP included) and reads as
skipped, and a graph at the maximum nesting depth runs.

The same situations step by step, on both scheduler twins, are in tests/sql/test_iterations.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from pgdurable.cli import main as cli_main
from tests import fix_db
from tests.acceptance.conftest import module_env
from tests.acceptance.test_http import BASE_ENV, Env, finish, start
from tests.fix_db import Server

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def env(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    def make_role(tdb: fix_db.TestDB) -> str:
        role = tdb.create_role("iter")
        with tdb.connect() as conn:
            conn.execute("create table public.it (x int)")
            conn.execute(f'grant select, insert on public.it to "{role}"')
        return role

    with module_env(server, tmp_path_factory.mktemp("serve"), BASE_ENV, make_role) as e:
        yield e


def nodes(db: fix_db.TestDB, role: str, iid: str) -> list[dict[str, Any]]:
    with db.connect(role) as conn:
        cur = conn.execute(
            "select node_id, node_type, query, status, inferred_status, "
            "inferred_status_from_ancestor_id from df.instance_nodes(%s)",
            (iid,),
        )
        cols = [d.name for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def explain(db: fix_db.TestDB, role: str, iid: str) -> str:
    with db.connect(role) as conn:
        return str(conn.execute("select df.explain(%s)", (iid,)).fetchone()[0])


def wait_for(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_loops_second_iteration_shows_its_running_wait(env: Env) -> None:
    # the workflow: iteration 1 takes the else arm (inserts), iteration 2 the then
    # arm, and waits for 'go'
    iid = start(
        env.db,
        env.role,
        """@> ( df.sql('select 1')
        ~> df.if(df.sql('select (select count(*) from public.it) >= 1'),
                 df.wait_for_signal('go', 60) ~> df.break('{}'),
                 df.sql('insert into public.it values (1)')) )""",
    )

    def waiting() -> dict[str, Any] | None:
        sig = next(n for n in nodes(env.db, env.role, iid) if n["node_type"] == "SIGNAL")
        return sig if sig["status"] == "running" else None

    sig = wait_for("the SIGNAL to wait", waiting)
    with env.db.connect() as conn:
        assert conn.execute("select count(*) from public.it").fetchone()[0] == 1
    rows = {n["node_id"]: n for n in nodes(env.db, env.role, iid)}
    assert sig["inferred_status"] == "running"
    assert sig["inferred_status_from_ancestor_id"] is None
    if_id = next(n["node_id"] for n in rows.values() if n["node_type"] == "IF")
    ins = next(n for n in rows.values() if "insert" in (n["query"] or ""))
    # the insert ran in iteration 1; in this iteration the IF did not take its arm
    assert (ins["status"], ins["inferred_status"]) == ("completed", "skipped")
    assert ins["inferred_status_from_ancestor_id"] == if_id
    assert rows[if_id]["inferred_status"] == "running"
    text = explain(env.db, env.role, iid)
    assert "⏳ SIGNAL 'go' (timeout 60s)" in text, text
    assert "⊘ SIGNAL" not in text, text
    assert "else: ⊘ SQL: insert into public.it values (1)" in text, text
    # the CLI's pictures colour nodes by the same inferred status
    res = CliRunner().invoke(
        cli_main,
        [
            "explain",
            iid,
            "--format",
            "mermaid",
            "--dsn",
            env.db.server.dsn(env.db.name, user=env.role),
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert f"{sig['node_id']}[\"running: SIGNAL 'go' (timeout 60s)\"]:::running" in res.output, (
        res.output
    )
    assert (
        f'{ins["node_id"]}["skipped: SQL: insert into public.it values (1)"]:::skipped'
        in res.output
    ), res.output
    # the approval arrives: the break ends the loop
    with env.db.connect(env.role) as conn:
        conn.execute("select df.signal(%s, 'go')", (iid,))
    status, result, err = finish(env.db, env.role, iid)
    assert status == "completed", err
    assert result == {}
    final = nodes(env.db, env.role, iid)
    assert [n for n in final if n["status"] == "running"] == []
    assert next(n for n in final if n["node_type"] == "SIGNAL")["inferred_status"] == "completed"


def test_a_race_decided_against_a_loop_ends_the_loop(env: Env) -> None:
    # branch 2 loops (one iteration per second) until branch 1's sleep wins the RACE
    iid = start(
        env.db,
        env.role,
        "df.race(df.sleep(2) ~> df.sql('select ''won'' as w'), @> df.sql('select 1'))",
    )
    status, result, err = finish(env.db, env.role, iid)
    assert status == "completed", err
    assert result["rows"] == [{"w": "won"}]
    rows = nodes(env.db, env.role, iid)
    race = next(n for n in rows if n["node_type"] == "RACE")
    loop = next(n for n in rows if n["node_type"] == "LOOP")
    # every node of the loser is terminal, the LOOP included (D17), and reads as skipped
    assert [n for n in rows if n["status"] == "running"] == []
    assert loop["status"] == "failed"
    assert (loop["inferred_status"], loop["inferred_status_from_ancestor_id"]) == (
        "skipped",
        race["node_id"],
    )
    with env.db.connect(env.role) as conn:
        res = conn.execute(
            "select result #>> '{}' from df.nodes where instance_id = %s and id = %s",
            (iid, loop["node_id"]),
        ).fetchone()[0]
    assert res.startswith("cancelled: "), res
    text = explain(env.db, env.role, iid)
    assert "branch 2: ⊘ LOOP (infinite)" in text, text
    assert "✓ RACE" in text, text
    # the loop's step, however it stood when the RACE was decided, is not shown as running
    assert "⏳" not in text, text


def test_a_graph_nested_exactly_256_deep_runs_and_257_is_refused(env: Env) -> None:
    def chain(depth: int) -> dict[str, Any]:
        # a THEN per level, its first step a SQL leaf: the deepest node is `depth` below the
        # root (root at depth 0)
        g: dict[str, Any] = {"node_type": "SQL", "query": f"select {depth} as deepest"}
        for k in range(depth):
            g = {
                "node_type": "THEN",
                "left_node": {"node_type": "SQL", "query": f"select {k}"},
                "right_node": g,
            }
        return g

    iid = start(env.db, env.role, "%s", (json.dumps(chain(256)),))
    status, result, err = finish(env.db, env.role, iid, timeout=120)
    assert status == "completed", err
    assert result["rows"] == [{"deepest": 256}]
    with env.db.connect(env.role) as conn:
        assert (
            conn.execute("select count(*) from df.nodes where instance_id = %s", (iid,)).fetchone()[
                0
            ]
            == 2 * 256 + 1
        )
        with pytest.raises(
            psycopg.errors.ProgramLimitExceeded, match="maximum nesting depth of 256"
        ):
            conn.execute("select df.start(%s)", (json.dumps(chain(257)),))
