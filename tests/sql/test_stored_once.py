"""Results stored once, signal data capped, graphs the worker cannot run refused (issue 20, 3-5).

- Composites hold references, not copies (ARCHITECTURE §4): every reader (df.result,
  df.instance_nodes, df.explain, df.list_instances, df.instance_info, df.instance_executions)
  shows exactly what it showed when composites stored copies. Checked by writing one graph's
  outcome twice, as copies (rows of older versions) and as references, and comparing.
- df.signal refuses data over pg_durable.max_signal_bytes (10 MiB) at once, never more than
  64 MiB whatever a session sets, and data nested deeper than 256 levels; the engine helper
  checks the same when called directly.
- df.start refuses what the worker could not run: a sleep past ~317 years, a schedule that never
  fires, configs nested deeper than the worker parses (the if_rows config 2,000 deep).

Worker writes are simulated by updating df.nodes / df.instances as the table owner.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgdurable import cron
from tests.fix_sql import one

Conn = psycopg.Connection[Any]


def as_owner(tx: Conn, role: str) -> Any:
    class _Owner:
        def __enter__(self) -> None:
            tx.execute("reset role")

        def __exit__(self, *exc: object) -> None:
            tx.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))

    return _Owner()


# -- 3. references resolve to exactly what copies showed ----------------------------------------

GRAPH = """df.join3(
    df.seq('select 1 as a', df.if(df.sql('select true as c'),
                                  df.seq('select 2 as t1', 'select 3 as t2'),
                                  'select 4 as e')),
    df.as(df.race('select 5 as r1', 'select 6 as r2'), 'race'),
    df.join(df.loop(df.seq('select 7 as body', df.break('{"done": 1}'))), 'select 8 as z'))"""
# pre-order (df.start hands ids out sorted along it)
TYPES = [
    "JOIN",
    "THEN",
    "SQL",
    "IF",
    "SQL",
    "THEN",
    "SQL",
    "SQL",
    "SQL",
    "RACE",
    "SQL",
    "SQL",
    "JOIN",
    "LOOP",
    "THEN",
    "SQL",
    "BREAK",
    "SQL",
]


def env(col: str, v: Any) -> dict[str, Any]:
    return {"rows": [{col: v}], "row_count": 1, "columns": [col]}


# leaf values (position -> value); 8 (else arm) never ran, 11 lost the race
LEAVES = {
    2: env("a", 1),
    4: env("c", True),
    6: env("t1", 2),
    7: env("t2", 3),
    10: env("r1", 5),
    15: env("body", 7),
    16: {"done": 1},
    17: env("z", 8),
}
# composites: position -> ("from", source) or ("of", [sources])
REFS: dict[int, tuple[str, Any]] = {
    5: ("from", 7),
    3: ("from", 5),
    1: ("from", 3),
    9: ("from", 10),
    14: ("from", 16),
    13: ("from", 16),
    12: ("of", [13, 17]),
    0: ("of", [1, 9, 12]),
}


def value_at(pos: int) -> Any:
    if pos in LEAVES:
        return LEAVES[pos]
    how, src = REFS[pos]
    return value_at(src) if how == "from" else [value_at(s) for s in src]


def write_outcome(tx: Conn, iid: str, *, refs: bool) -> list[str]:
    ids = [
        r[0]
        for r in tx.execute("select id from df.nodes where instance_id = %s order by id", (iid,))
    ]
    types = [
        r[0]
        for r in tx.execute(
            "select node_type from df.nodes where instance_id = %s order by id", (iid,)
        )
    ]
    assert types == TYPES
    for pos, nid in enumerate(ids):
        details: dict[str, Any] = {
            "gen": 1,
            "execution_id": f"{iid}::1",
            "started_at": "2026-01-01T00:00:00+00:00",
            "finished_at": "2026-01-01T00:00:01+00:00",
        }
        if pos == 8:
            status, result = "pending", None
        elif pos == 11:
            status, result = (
                "failed",
                "cancelled: abandoned (lost a RACE, a sibling failed, or a break)",
            )
            details["abandoned"] = True
        elif pos in LEAVES:
            status, result = "completed", LEAVES[pos]
            if refs:
                details["result_bytes"] = len(json.dumps(result, separators=(",", ":")))
        else:
            status = "completed"
            how, src = REFS[pos]
            if refs:
                result = None
                details["result_from"] = ids[src] if how == "from" else None
                details["result_of"] = [ids[s] for s in src] if how == "of" else None
            else:
                result = value_at(pos)
        if TYPES[pos] == "IF":
            details["branch"] = "then"
        if TYPES[pos] == "RACE":
            details["winner"] = ids[10]
        tx.execute(
            "update df.nodes set status = %s, result = %s, status_details = %s "
            "where instance_id = %s and id = %s",
            (status, None if result is None else json.dumps(result), json.dumps(details), iid, nid),
        )
    tx.execute(
        "update df.instances set status = 'completed', completed_at = now() where id = %s", (iid,)
    )
    return ids


def readers(tx: Conn, iid: str) -> dict[str, Any]:
    """What every reader shows, node ids replaced by pre-order positions."""
    ids = [
        r[0]
        for r in tx.execute("select id from df.nodes where instance_id = %s order by id", (iid,))
    ]
    pos = {nid: str(i) for i, nid in enumerate(ids)}

    def norm(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        for nid, p in pos.items():
            text = text.replace(nid, f"<{p}>")
        return text.replace(iid, "<iid>")

    nodes = [
        tuple(norm(c) for c in r)
        for r in tx.execute(
            "select node_id, node_type, query, result_name, left_node, right_node, status, result, "
            "status_details, inferred_status, inferred_status_from_ancestor_id "
            "from df.instance_nodes(%s)",
            (iid,),
        ).fetchall()
    ]
    legacy = [
        tuple(norm(c) for c in r[:-1])
        for r in tx.execute("select * from df.instance_nodes(%s, 100)", (iid,)).fetchall()
    ]
    return {
        "result": one(tx, "select df.result(%s)", (iid,)),
        "nodes": nodes,
        "legacy": legacy,
        "explain": norm(one(tx, "select df.explain(%s)", (iid,))),
        "list": one(tx, "select output from df.list_instances() where instance_id = %s", (iid,)),
        "paged": one(
            tx,
            "select output from df.list_instances(null, 100, null, null) where instance_id = %s",
            (iid,),
        ),
        "info": one(tx, "select output from df.instance_info(%s)", (iid,)),
        "executions": one(tx, "select output from df.instance_executions(%s)", (iid,)),
    }


def test_references_read_exactly_like_copies(tx, user):
    copies = one(tx, f"select df.start({GRAPH})")
    refs = one(tx, f"select df.start({GRAPH})")
    with as_owner(tx, user):
        write_outcome(tx, copies, refs=False)
        ids = write_outcome(tx, refs, refs=True)
        # the reference layout holds each value once: no composite row has one
        assert (
            one(
                tx,
                "select count(*) from df.nodes where instance_id = %s and node_type in "
                "('THEN', 'IF', 'RACE', 'LOOP', 'JOIN') and result is not null",
                (refs,),
            )
            == 0
        )
    a, b = readers(tx, copies), readers(tx, refs)
    assert json.loads(a["result"]) == value_at(0)
    for key in a:
        assert a[key] == b[key], key
    # the worker's own keys never show
    assert not any("result_from" in str(r) or "result_bytes" in str(r) for r in b["nodes"])
    # a single node, resolved as the worker stored it
    with as_owner(tx, user):
        assert one(tx, "select df._node_result(%s, %s)", (refs, ids[12])) == [
            {"done": 1},
            env("z", 8),
        ]
        assert one(tx, "select df._node_result(%s, %s)", (refs, ids[8])) is None


def test_a_composite_not_completed_shows_its_own_result(tx, user):
    # a LOOP re-ran its body: the THEN is running again (its reference from the earlier
    # iteration stays in status_details, its result is NULL): it reads NULL, as before
    iid = one(tx, f"select df.start({GRAPH})")
    with as_owner(tx, user):
        ids = write_outcome(tx, iid, refs=True)
        tx.execute(
            "update df.nodes set status = 'running' where instance_id = %s and id = %s",
            (iid, ids[14]),
        )
        tx.execute(
            "update df.nodes set status = 'failed', result = '\"boom\"' "
            "where instance_id = %s and id = %s",
            (iid, ids[13]),
        )
    rows = dict(tx.execute("select node_id, result from df.instance_nodes(%s)", (iid,)).fetchall())
    assert rows[ids[14]] is None
    assert json.loads(rows[ids[13]]) == "boom"
    # the JOIN above them still refers to them: its value shows what they hold now
    assert json.loads(rows[ids[12]]) == ["boom", env("z", 8)]


def test_references_that_do_not_end_read_null(tx, user):
    iid = one(tx, "select df.start(df.seq('select 1', 'select 2'))")
    with as_owner(tx, user):
        root = one(tx, "select root_node from df.instances where id = %s", (iid,))
        tx.execute(
            "update df.nodes set status = 'completed', status_details = "
            "jsonb_build_object('result_from', id) where instance_id = %s",
            (iid,),
        )
        tx.execute("update df.instances set status = 'completed' where id = %s", (iid,))
    assert one(tx, "select df.result(%s)", (iid,)) is None
    assert one(tx, "select df._node_result(%s, %s)", (iid, root)) is None


# -- 4. signal data is capped -------------------------------------------------------------------


def waiting(tx: Conn, user: str) -> str:
    iid = one(tx, "select df.start(df.wait_for_signal('go'))")
    with as_owner(tx, user):
        tx.execute(
            "insert into pgdurable.runs (instance_id, vars) values (%s, '{}') "
            "on conflict do nothing",
            (iid,),
        )
    return str(iid)


def refused(
    tx: Conn, query: str, params: tuple[Any, ...], exc: type[Exception], match: str
) -> psycopg.Error:
    tx.execute("savepoint refused")
    with pytest.raises(exc, match=match) as info:
        tx.execute(query, params)
    tx.execute("rollback to savepoint refused")
    return info.value  # type: ignore[return-value]


def test_df_signal_refuses_oversize_data_at_once(tx, user):
    iid = waiting(tx, user)
    big = json.dumps({"blob": "x" * (40 * 2**20)})
    err = refused(
        tx,
        "select df.signal(%s, 'go', %s)",
        (iid, big),
        psycopg.errors.ProgramLimitExceeded,
        rf"df.signal: data is {len(big)} bytes, over the limit of 10485760 bytes",
    )
    assert "pg_durable.max_signal_bytes" in (err.diag.message_hint or "")
    # checked before anything else: even for an instance the caller cannot see
    refused(
        tx,
        "select df.signal('abcdef01', 'go', %s)",
        (big,),
        psycopg.errors.ProgramLimitExceeded,
        "over the limit",
    )
    # the engine helper any granted role may call directly checks the stored form
    refused(
        tx,
        "select pgdurable._signal_v1(%s, 'go', %s::jsonb)",
        (iid, big),
        psycopg.errors.ProgramLimitExceeded,
        "over the limit of 10485760 bytes",
    )
    # the setting lowers it; a session cannot raise it past one checkpoint's bound (64 MiB)
    tx.execute("set local pg_durable.max_signal_bytes = 100")
    refused(
        tx,
        "select df.signal(%s, 'go', %s)",
        (iid, json.dumps("y" * 100)),
        psycopg.errors.ProgramLimitExceeded,
        "over the limit of 100 bytes",
    )
    tx.execute("set local pg_durable.max_signal_bytes = 0")
    refused(
        tx,
        "select df.signal(%s, 'go', %s)",
        (iid, json.dumps("z" * (64 * 2**20))),
        psycopg.errors.ProgramLimitExceeded,
        "over the limit of 67108864 bytes",
    )
    tx.execute("reset pg_durable.max_signal_bytes")
    assert one(tx, "select df.signal(%s, 'go', %s)", (iid, json.dumps("w" * 2**20))) == "OK"
    with as_owner(tx, user):
        assert one(tx, "select count(*) from pgdurable.signals where instance_id = %s", (iid,)) == 1


def test_df_signal_refuses_data_nested_deeper_than_the_worker_reads(tx, user):
    iid = waiting(tx, user)
    refused(
        tx,
        "select df.signal(%s, 'go', %s)",
        (iid, "[" * 300 + "]" * 300),
        psycopg.errors.ProgramLimitExceeded,
        "nests deeper than 256 levels",
    )
    assert one(tx, "select df.signal(%s, 'go', %s)", (iid, "[" * 200 + "]" * 200)) == "OK"


# -- 5. df.start refuses what the worker cannot run ---------------------------------------------


def test_sleep_is_bounded(tx, user):
    assert json.loads(one(tx, "select df.sleep(10000000000)"))["query"] == "10000000000"
    refused(
        tx,
        "select df.sleep(10000000001)",
        (),
        psycopg.errors.InvalidParameterValue,
        r"at most 10000000000 \(about 317 years\), got 10000000001",
    )
    refused(
        tx,
        "select df.start(df.sleep(10000000000000))",
        (),
        psycopg.errors.InvalidParameterValue,
        "at most 10000000000",
    )
    # the same graph written by hand
    refused(
        tx,
        "select df.start(%s)",
        (json.dumps({"node_type": "SLEEP", "query": "10000000000000"}),),
        psycopg.errors.InvalidParameterValue,
        r"at most 10000000000 .*\(at root\)",
    )
    refused(
        tx,
        "select df.start(%s)",
        (json.dumps({"node_type": "SLEEP", "query": "99999999999999999999999"}),),
        psycopg.errors.InvalidParameterValue,
        r"invalid number .*\(at root\)",
    )


DEEP = "[" * 2000 + "]" * 2000


@pytest.mark.parametrize(
    "node",
    [
        {
            "node_type": "IF",
            "query": f'{{"condition_type": "result_has_rows", "result_name": "r", "pad": {DEEP}}}',
            "left_node": {"node_type": "SQL", "query": "select 1"},
            "right_node": {"node_type": "SQL", "query": "select 2"},
        },
        {"node_type": "SIGNAL", "query": f'{{"signal_name": "go", "pad": {DEEP}}}'},
        {"node_type": "BREAK", "query": f'{{"break_value": null, "pad": {DEEP}}}'},
        {"node_type": "WAIT_SCHEDULE", "query": f'{{"cron_expr": "@daily", "pad": {DEEP}}}'},
    ],
    ids=["if_rows", "signal", "break", "wait_schedule"],
)
def test_configs_nested_deeper_than_the_worker_parses_are_refused(tx, user, node):
    text = json.dumps(node)
    refused(
        tx,
        "select df.start(%s)",
        (text,),
        psycopg.errors.ProgramLimitExceeded,
        r"nests deeper than 64 levels \(at root\)",
    )
    out = one(tx, "select df.explain(%s)", (text,))
    assert out.startswith("Invalid durable function graph: root: the config of"), out
    # 63 levels still pass (no builder writes more than 3)
    node = dict(node, query=node["query"].replace(DEEP, "[" * 62 + "]" * 62))
    assert one(tx, "select df.start(%s)", (json.dumps(node),))


def test_a_schedule_that_never_fires_is_refused(tx, user):
    refused(
        tx,
        "select df.wait_for_schedule('0 3 31 2 *')",
        (),
        psycopg.errors.InvalidParameterValue,
        r"invalid cron expression '0 3 31 2 \*': it never fires \(no month it names has "
        r"a day 31\)",
    )
    refused(
        tx,
        "select df.start(%s)",
        (json.dumps({"node_type": "WAIT_SCHEDULE", "query": '{"cron_expr": "0 0 30 2 *"}'}),),
        psycopg.errors.InvalidParameterValue,
        r"it never fires .*\(at root\)",
    )
    # either day-of-month or day-of-week fires (both restricted): accepted, as cronsim does
    assert one(tx, "select df.wait_for_schedule('0 0 31 2 1')")
    assert one(tx, "select df.wait_for_schedule('0 0 29 2 *')")


def test_schedules_df_accepts_are_the_ones_the_worker_can_run(tx, user):
    # every day-of-month/month/day-of-week shape near the month ends, against cronsim
    doms = ["29", "30", "31", "30-31", "31/5", "*/30", "1,31", "30,31", "*"]
    months = ["2", "4", "2,4", "4-6/2", "2/6", "FEB", "feb-apr/2", "*", "11-12"]
    dows = ["*", "1", "*/2", "MON-FRI"]
    checked = 0
    for dom, month, dow in itertools.product(doms, months, dows):
        expr = f"0 0 {dom} {month} {dow}"
        tx.execute("savepoint cron")
        problem = None
        try:
            tx.execute("select df.wait_for_schedule(%s)", (expr,))
        except psycopg.errors.InvalidParameterValue as exc:
            problem = str(exc)
        tx.execute("rollback to savepoint cron")
        accepted = problem is None
        assert accepted or "never fires" in str(problem), (expr, problem)
        try:
            cron.validate(expr)
            runs = True
        except ValueError:
            runs = False
        assert accepted == runs, expr
        checked += 1
    assert checked == len(doms) * len(months) * len(dows)


def test_a_task_given_back_backs_off_with_its_attempts(tx, user):
    # what the worker does after an error that is not deterministic: the task comes back later
    # each time (0.1 s doubling, at most 30 s), never first in line again at once
    iid = one(tx, "select df.start(df.seq('select 1', 'select 2'))")
    with as_owner(tx, user):
        tx.execute("set local pg_durable.fake_now = '2026-01-01 00:00:00+00'")
        root = one(tx, "select root_node from df.instances where id = %s", (iid,))
        delays = []
        for attempts in (1, 3, 8, 10, 50):
            tx.execute(
                "update pgdurable.tasks set lease_owner = 'w', attempts = %s, "
                "due_at = pgdurable.clock() where instance_id = %s",
                (attempts, iid),
            )
            tx.execute("select pgdurable._release_v1('w', %s, %s)", (iid, root))
            delays.append(
                float(
                    one(
                        tx,
                        "select extract(epoch from due_at - pgdurable.clock()) "
                        "from pgdurable.tasks where instance_id = %s "
                        "and lease_owner is null",
                        (iid,),
                    )
                )
            )
        assert delays == pytest.approx([0.2, 0.8, 25.6, 30.0, 30.0])
        # a shutdown gives everything back as it is
        tx.execute("update pgdurable.tasks set lease_owner = 'w', due_at = pgdurable.clock()")
        tx.execute("select pgdurable._release_v1('w', null, null)")
        assert one(
            tx,
            "select due_at = pgdurable.clock() from pgdurable.tasks where instance_id = %s",
            (iid,),
        )
