# ruff: noqa: PT018  (property checks: compound asserts)
"""Hostile input to the SQL side (issue 8, part 2): DSL builders, graph JSON, names, limits.

Every input either works or raises a clear error: a PostgreSQL error with a SQLSTATE of a
user-facing class and a message that names what is wrong; never an internal error (XX000),
a stack depth overflow (54001), a crash, a hang or a partial write. Names (result names,
labels, signal names, var names, cron strings, URLs) are stored verbatim and stay inert.

Each attempt runs inside a savepoint of the rolled-back ``tx`` transaction, so a raised error
does not abort the test transaction, and the row counts of df.instances, df.nodes,
pgdurable.runs and pgdurable.tasks are compared before and after: a failed df.start writes
nothing, a successful one writes exactly one instance, its nodes, one run and one task.

Budget: every hypothesis test keeps max_examples small and a statement_timeout turns a hang
into a failure (57014) instead of a stuck CI job.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from pgdurable.sanitize import visible
from tests.fix_sql import become, mkrole

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

Conn = psycopg.Connection[Any]

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

ID_RE = re.compile(r"^[0-9a-f]{8}$")
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NODE_TYPES = [
    "SQL",
    "THEN",
    "IF",
    "LOOP",
    "JOIN",
    "RACE",
    "BREAK",
    "SLEEP",
    "WAIT_SCHEDULE",
    "SIGNAL",
    "HTTP",
    "HTTP_MULTIPART",
]
CHILD_KEYS = ("condition_node", "left_node", "right_node")

# ---------------------------------------------------------------------------------------
# hostile text

INJECTIONS = [
    "'; drop table df.instances; --",
    "x'); delete from df.nodes; --",
    '"; drop schema df cascade; --',
    "$$; drop table df.vars; $$",
    "$x$ select 1 $x$",
    "{sys_instance_id}",
    "{x}'{y}",
    "$a.*",
    "\\'; select pg_sleep(100); --",
    "E'\\x27'",
    "/* unterminated",
    "*/ select 1 --",
    "1; select pg_terminate_backend(pg_backend_pid())",
    "%s %L %I %%",
    "\\u0000",
    "null",
    "{}",
    '{"node_type":"SQL","query":"x"}',
    '{"_partial_if":true}',
    "OK",
]
UNICODE = ["ünïcödé", "名前", "🙂🙃", "\u200b", "\u202e reversed", "a\u0301", "\ufeffbom", "Ω≈ç√"]

# PostgreSQL text cannot hold NUL; lone surrogates cannot be encoded. Everything else goes.
any_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=80
)
hostile_text = st.one_of(
    any_text,
    st.sampled_from(INJECTIONS + UNICODE),
    st.text(alphabet=st.sampled_from("'\"\\$*/-;{}()[],: \n\t%"), max_size=40),
    st.integers(1000, 20000).map(lambda n: "ü" * n),  # large (toasted) values
)
identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)


# ---------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def user(tx: Conn) -> str:
    tx.execute("set local statement_timeout = '20s'")
    role = mkrole(tx, http=True)
    become(tx, role)
    return role


def counts(conn: Conn, role: str) -> tuple[int, ...]:
    """Rows of the four tables a df.start writes (engine tables need the test's superuser)."""
    conn.execute("reset role")
    row = conn.execute(
        "select (select count(*) from df.instances), (select count(*) from df.nodes),"
        " (select count(*) from pgdurable.runs), (select count(*) from pgdurable.tasks)"
    ).fetchone()
    become(conn, role)
    assert row is not None
    return tuple(row)


def assert_clear(exc: psycopg.Error) -> None:
    """A clear error: a user-facing SQLSTATE and a non-empty message."""
    state = exc.sqlstate
    assert state is not None, f"no SQLSTATE: {exc}"
    assert not state.startswith("XX"), f"internal error {state}: {exc}"
    assert state not in ("54001", "57P01", "57P02", "57P03", "57014"), f"{state}: {exc}"
    assert exc.diag.message_primary, f"{state} without a message"


def attempt(
    conn: Conn, query: str, params: tuple[Any, ...] = ()
) -> tuple[Any, psycopg.Error | None]:
    """Run query in a savepoint; return (value, None) or (None, error) after rolling back."""
    conn.execute("savepoint h")
    try:
        row = conn.execute(query, params).fetchone()
    except psycopg.Error as exc:
        conn.execute("rollback to savepoint h")
        assert_clear(exc)
        return None, exc
    conn.execute("release savepoint h")
    return (row[0] if row else None), None


def start(
    conn: Conn, role: str, graph: str, label: str | None = None
) -> tuple[str | None, psycopg.Error | None]:
    """df.start in a savepoint; check it wrote all (one instance) or nothing."""
    before = counts(conn, role)
    iid, err = attempt(conn, "select df.start(%s, %s)", (graph, label))
    after = counts(conn, role)
    if err is not None:
        assert after == before, f"failed df.start left rows: {before} -> {after} ({err})"
        return None, err
    assert isinstance(iid, str) and ID_RE.match(iid), iid
    n = conn.execute("select count(*) from df.nodes where instance_id = %s", (iid,)).fetchone()
    assert n is not None
    assert after == (before[0] + 1, before[1] + n[0], before[2] + 1, before[3] + 1)
    return iid, None


def node_count(conn: Conn, iid: str) -> int:
    row = conn.execute("select count(*) from df.nodes where instance_id = %s", (iid,)).fetchone()
    assert row is not None
    return int(row[0])


def walk_count(g: Any) -> int:
    """Nodes df.start would write for g: objects reachable through the child keys."""
    if not isinstance(g, dict):
        return 0
    n = 1 + sum(walk_count(g.get(k)) for k in CHILD_KEYS)
    extra = g.get("extra_nodes")
    if isinstance(extra, list):
        n += sum(walk_count(e) for e in extra if isinstance(e, dict))
    return n


def explain(conn: Conn, text: str) -> str:
    value, err = attempt(conn, "select df.explain(%s)", (text,))
    assert err is None, f"df.explain raised on graph JSON: {err}"
    assert isinstance(value, str)
    return value


# ---------------------------------------------------------------------------------------
# graph strategies


def _cfg(d: dict[str, Any]) -> str:
    return json.dumps(d, ensure_ascii=False)


nonblank = any_text.filter(lambda s: s.strip() != "")
leaf_nodes = st.one_of(
    # a SQL step may not refer to a name no step defines (35_references.sql): a $ followed
    # by a letter is left out of the texts every valid graph may hold (the hostile texts
    # with it are tested by test_sql_and_as_store_text_verbatim)
    st.builds(
        lambda q: {"node_type": "SQL", "query": q},
        nonblank.filter(lambda q: not re.search(r"\$[A-Za-z_]", q)),
    ),
    st.builds(lambda s: {"node_type": "SLEEP", "query": str(s)}, st.integers(0, 10**6)),
    st.builds(
        lambda v: {"node_type": "BREAK", "query": _cfg({"break_value": v})}, st.none() | any_text
    ),
    st.builds(
        lambda c: {"node_type": "WAIT_SCHEDULE", "query": _cfg({"cron_expr": c})},
        st.sampled_from(["* * * * *", "0 9 * * MON-FRI", "@daily"]),
    ),
    st.builds(
        lambda n, t: {
            "node_type": "SIGNAL",
            "query": _cfg({"signal_name": n, "timeout_seconds": t}),
        },
        nonblank,
        st.none() | st.integers(1, 10**6),
    ),
    st.builds(
        lambda u, m: {
            "node_type": "HTTP",
            "query": _cfg(
                {"url": u, "method": m, "body": None, "headers": None, "timeout_seconds": 30}
            ),
        },
        st.sampled_from(["https://example.com/x", "http://h/{v}?q=$r.c"]),
        st.sampled_from(["GET", "POST"]),
    ),
)


def _named(g: dict[str, Any], name: str | None) -> dict[str, Any]:
    return g if name is None else {**g, "result_name": name}


def _composites(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.builds(
            lambda a, b, t: {"node_type": t, "left_node": a, "right_node": b},
            children,
            children,
            st.sampled_from(["THEN", "RACE", "JOIN"]),
        ),
        st.builds(
            lambda a, b, c: {
                "node_type": "JOIN",
                "left_node": a,
                "right_node": b,
                "extra_nodes": [c],
            },
            children,
            children,
            children,
        ),
        st.builds(
            lambda c, a, b: {
                "node_type": "IF",
                "condition_node": c,
                "left_node": a,
                "right_node": b,
            },
            children,
            children,
            children,
        ),
        st.builds(
            lambda n, a, b: {
                "node_type": "IF",
                "query": _cfg({"condition_type": "result_has_rows", "result_name": n}),
                "left_node": a,
                "right_node": b,
            },
            identifiers,
            children,
            children,
        ),
        st.builds(lambda a: {"node_type": "LOOP", "left_node": a}, children),
        st.builds(
            lambda a, c: {"node_type": "LOOP", "left_node": a, "condition_node": c},
            children,
            children,
        ),
    ).flatmap(lambda g: st.builds(_named, st.just(g), st.none() | identifiers))


valid_graphs = st.recursive(leaf_nodes, _composites, max_leaves=25)

# junk: any mix of known/unknown types, missing/extra keys and wrong value types
junk_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
    st.just([]),
    st.just({}),
)
junk_type = st.one_of(
    st.sampled_from(NODE_TYPES), st.sampled_from(["sql", "FOO", "", " SQL"]), junk_scalar
)


def _junk_node(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    child = st.one_of(children, junk_scalar)
    return st.fixed_dictionaries(
        {"node_type": junk_type},
        optional={
            "query": st.one_of(
                junk_scalar,
                st.sampled_from(
                    [
                        "30",
                        " 7 ",
                        "-1",
                        '{"cron_expr":"* * * * *"}',
                        '{"signal_name":""}',
                        '{"condition_node":"abcd1234"}',
                        '{"url":1,"method":"GET"}',
                        '{"condition_type":"result_has_rows","result_name":"a b"}',
                    ]
                ),
            ),
            "result_name": st.one_of(identifiers, junk_scalar),
            "condition_node": child,
            "left_node": child,
            "right_node": child,
            "extra_nodes": st.one_of(st.lists(child, max_size=3), junk_scalar),
            "unexpected": junk_scalar,
        },
    )


junk_graphs = st.one_of(
    st.recursive(leaf_nodes | st.builds(dict), _junk_node, max_leaves=15),
    # a valid graph with one key of one node replaced
    st.tuples(
        valid_graphs,
        st.sampled_from(
            [
                "node_type",
                "query",
                "result_name",
                "left_node",
                "right_node",
                "condition_node",
                "extra_nodes",
            ]
        ),
        junk_scalar,
    ).map(lambda t: {**t[0], t[1]: t[2]}),
)


# ---------------------------------------------------------------------------------------
# graph JSON through df.start and df.explain


@SETTINGS
@given(g=valid_graphs)
def test_valid_graphs_start_with_exact_node_rows(tx: Conn, user: str, g: dict[str, Any]) -> None:
    text = json.dumps(g, ensure_ascii=False)
    iid, err = start(tx, user, text)
    assert err is None, f"valid graph rejected: {err}"
    assert iid is not None
    expected = walk_count(g)
    assert node_count(tx, iid) == expected
    # the flattened rows keep the types and names of the value
    rows = tx.execute(
        "select node_type, result_name from df.nodes where instance_id = %s", (iid,)
    ).fetchall()

    def collect(n: Any, out: list[tuple[str, str | None]]) -> None:
        if isinstance(n, dict):
            out.append((n["node_type"], n.get("result_name")))
            for k in CHILD_KEYS:
                collect(n.get(k), out)
            for e in n.get("extra_nodes") or []:
                collect(e, out)

    want: list[tuple[str, str | None]] = []
    collect(g, want)
    assert sorted(rows, key=repr) == sorted(want, key=repr)
    assert explain(tx, text).startswith(f"Dry run (not started): {expected} nodes")


@SETTINGS
@given(g=junk_graphs)
def test_random_graph_json_works_or_fails_cleanly(tx: Conn, user: str, g: Any) -> None:
    text = json.dumps(g, ensure_ascii=False)
    iid, err = start(tx, user, text)
    out = explain(tx, text)
    if err is None:
        assert iid is not None
        assert node_count(tx, iid) == walk_count(g)
        assert out.startswith(f"Dry run (not started): {walk_count(g)} nodes"), out[:200]
    else:
        # graph errors are invalid_parameter_value or program_limit_exceeded, and explain
        # reports the same problem instead of raising
        assert err.sqlstate in ("22023", "54000"), err
        assert out.startswith("Invalid durable function graph: root:"), out[:200]
        # the same text, with control characters shown visibly (pgdurable/sanitize.py)
        assert visible(err.diag.message_primary) in out


@SETTINGS
@given(v=st.one_of(junk_scalar, st.lists(junk_scalar, max_size=3), hostile_text))
def test_non_graph_values_are_sql_or_rejected(tx: Conn, user: str, v: Any) -> None:
    # a JSON value that is not an object with node_type: auto-wrapped as one SQL step
    text = v if isinstance(v, str) else json.dumps(v)
    if not text.strip(" "):
        return  # an empty SQL node is rejected: covered by test_empty_sql_is_rejected
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "node_type" in parsed:
        return  # a graph: covered by the graph tests
    iid, err = start(tx, user, text)
    if err is None:
        assert iid is not None
        q = tx.execute(
            "select node_type, query from df.nodes where instance_id = %s", (iid,)
        ).fetchall()
        assert q == [("SQL", text)]
    else:
        assert err.sqlstate == "22023"


def test_empty_sql_is_rejected(tx: Conn, user: str) -> None:
    for text in ("", "   "):
        _, err = start(tx, user, text)
        assert err is not None and err.sqlstate == "22023"
        assert "non-empty query" in str(err)


def _nest(depth: int, kind: str) -> dict[str, Any]:
    g: dict[str, Any] = {"node_type": "SQL", "query": "select 1"}
    for _ in range(depth - 1):
        leaf = {"node_type": "SQL", "query": "select 2"}
        if kind == "LOOP":
            g = {"node_type": "LOOP", "left_node": g}
        elif kind == "THEN":
            g = {"node_type": "THEN", "left_node": leaf, "right_node": g}
        elif kind == "IF":
            g = {"node_type": "IF", "condition_node": g, "left_node": leaf, "right_node": leaf}
        else:
            g = {"node_type": "JOIN", "left_node": leaf, "right_node": leaf, "extra_nodes": [g]}
    return g


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    depth=st.sampled_from([1, 2, 255, 256, 257, 258, 259, 300, 600]),
    kind=st.sampled_from(["LOOP", "THEN", "IF", "JOIN"]),
)
def test_depth_limit_is_exact(tx: Conn, user: str, depth: int, kind: str) -> None:
    g = _nest(depth, kind)
    text = json.dumps(g)
    iid, err = start(tx, user, text)
    if depth <= 257:  # node levels: nesting depth 256 is 257 levels (the root at depth 0)
        assert err is None, err
        assert iid is not None and node_count(tx, iid) == walk_count(g)
    else:
        assert err is not None and err.sqlstate == "54000"
        assert "maximum nesting depth of 256" in str(err)
        assert explain(tx, text).startswith(
            "Invalid durable function graph: root: durable function graph exceeds the maximum "
            "nesting depth of 256"
        )


def _wide(n: int) -> dict[str, Any]:
    """A graph of exactly n nodes (n odd: a balanced JOIN tree; n even: a LOOP on top)."""
    leaves = (n + 1) // 2 if n % 2 else n // 2
    level: list[dict[str, Any]] = [
        {"node_type": "SQL", "query": f"select {i}"} for i in range(leaves)
    ]
    while len(level) > 1:
        nxt = [
            {"node_type": "JOIN", "left_node": level[i], "right_node": level[i + 1]}
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    g = level[0]
    if n % 2 == 0:
        g = {"node_type": "LOOP", "left_node": g}
    assert walk_count(g) == n
    return g


@pytest.mark.parametrize("n", [10_000, 10_001])
def test_node_limit_is_exact(tx: Conn, user: str, n: int) -> None:
    iid, err = start(tx, user, json.dumps(_wide(n)))
    if n <= 10_000:
        assert err is None, err
        assert iid is not None and node_count(tx, iid) == n
    else:
        assert err is not None and err.sqlstate == "54000"
        assert "more than 10000 nodes" in str(err)


def test_huge_fanout_is_bounded(tx: Conn, user: str) -> None:
    # 50,000 junk extra_nodes entries: rejected quickly, nothing written
    g = {
        "node_type": "JOIN",
        "left_node": {"node_type": "SQL", "query": "a"},
        "right_node": {"node_type": "SQL", "query": "b"},
        "extra_nodes": [{"node_type": "SQL", "query": "c"}] * 50_000,
    }
    t0 = time.monotonic()
    _, err = start(tx, user, json.dumps(g))
    assert err is not None and err.sqlstate == "54000", err
    assert time.monotonic() - t0 < 15


# ---------------------------------------------------------------------------------------
# DSL builders


def _graph_of(value: Any) -> dict[str, Any]:
    assert isinstance(value, str)
    g = json.loads(value)
    assert isinstance(g, dict) and g["node_type"] in NODE_TYPES
    return g


@SETTINGS
@given(q=hostile_text, name=st.one_of(identifiers, hostile_text))
@example(q="{A}", name="a")  # found by hypothesis: a {var} nobody set is refused at df.start
@example(q="select $b", name="a")
def test_sql_and_as_store_text_verbatim(tx: Conn, user: str, q: str, name: str) -> None:
    value, err = attempt(tx, "select df.as(df.sql(%s), %s)", (q, name))
    if err is not None:
        assert err.sqlstate == "22023"
        assert ("not a valid identifier" in str(err) and not IDENT_RE.match(name)) or (
            "cannot be used as a workflow step" in str(err) and q in ("OK",)
        ), err
        return
    assert IDENT_RE.match(name)
    g = _graph_of(value)
    assert g == {"node_type": "SQL", "query": q, "result_name": name}
    if q.strip():
        iid, serr = start(tx, user, value)
        if serr is not None:
            # the two refusals (35_references.sql), each naming what is missing: a $ref no step
            # defines, or a {var} df.setvar never set
            msg = serr.diag.message_primary or ""
            assert serr.sqlstate == "22023", serr
            if m := re.match(r"unknown reference \$(\w+) in step ", msg):
                assert m.group(1) != name, serr
                assert "$" + m.group(1) in q, serr
            else:
                m = re.match(r"unknown variable \{([^}]+)\} in step ", msg)
                assert m, serr
                assert "{" + m.group(1) + "}" in q, serr
            return
        assert iid is not None
        assert tx.execute(
            "select query, result_name from df.nodes where instance_id = %s", (iid,)
        ).fetchall() == [(q, name)]


@SETTINGS
@given(
    a=hostile_text,
    b=hostile_text,
    op=st.sampled_from(
        [
            "df.seq(%s, %s)",
            "df.join(%s, %s)",
            "df.race(%s, %s)",
            "%s::text ~> %s::text",
            "%s::text & %s::text",
            "%s::text | %s::text",
            "df.loop(%s, %s)",
            "df.if(%s, %s, 'select 0')",
            "%s::text ?> %s::text !> 'select 0'",
            "df.if_rows('r', %s, %s)",
            "df.join3(%s, %s, 'select 0')",
        ]
    ),
)
def test_composers_accept_any_text(tx: Conn, user: str, a: str, b: str, op: str) -> None:
    value, err = attempt(tx, "select " + op, (a, b))
    if err is not None:
        assert err.sqlstate == "22023", err
        return
    g = _graph_of(value)
    iid, serr = start(tx, user, value)
    if serr is None:
        assert iid is not None and node_count(tx, iid) == walk_count(g)
    else:
        # only an operand that was itself an (invalid) graph or an empty step may fail here
        assert serr.sqlstate in ("22023", "54000"), serr


@SETTINGS
@given(name=hostile_text, timeout=st.none() | st.integers(-(2**31), 2**31 - 1))
# JSON numbers are kept exact (jsonb numeric): '1E100' comes back as 10**100, not 1e+100
@example(name="1E100", timeout=None)
@example(name="0.1", timeout=None)
@example(name="NaN", timeout=None)  # not JSON: stored as the text
def test_wait_for_signal_names(tx: Conn, user: str, name: str, timeout: int | None) -> None:
    value, err = attempt(tx, "select df.wait_for_signal(%s, %s)", (name, timeout))
    if err is not None:
        assert err.sqlstate == "22023"
        assert name == "" or (timeout is not None and timeout <= 0)
        return
    cfg = json.loads(_graph_of(value)["query"])
    assert cfg == {"signal_name": name, "timeout_seconds": timeout}
    iid, serr = start(tx, user, value)
    assert serr is None, serr
    assert iid is not None
    # a signal with the same hostile name (and data) is stored verbatim and stays inert
    ok, sigerr = attempt(tx, "select df.signal(%s, %s, %s)", (iid, name, name))
    assert sigerr is None and ok == "OK", sigerr
    tx.execute("reset role")
    row = tx.execute(
        "select name, data::text from pgdurable.signals where instance_id = %s", (iid,)
    ).fetchone()
    become(tx, user)
    assert row is not None and row[0] == name

    # compare exact values: jsonb keeps numbers as numeric, so parse both sides' numbers as
    # Decimal (a float parse turned '1E100' into 1e+100, which 10**100 is not)
    # and NaN/Infinity are not JSON (PostgreSQL refuses them): the data is then that text
    def not_json(constant: str) -> Any:
        raise ValueError(constant)

    try:
        parsed = json.loads(name, parse_float=Decimal, parse_constant=not_json)
    except ValueError:
        parsed = name
    assert json.loads(row[1], parse_float=Decimal) == parsed


@SETTINGS
@given(v=st.none() | hostile_text, seconds=st.integers(-(2**63), 2**63 - 1))
def test_break_and_sleep(tx: Conn, user: str, v: str | None, seconds: int) -> None:
    value, err = attempt(tx, "select df.break(%s)", (v,))
    assert err is None, err
    assert json.loads(_graph_of(value)["query"]) == {"break_value": v}
    value, err = attempt(tx, "select df.sleep(%s)", (seconds,))
    if seconds < 0 or seconds > 10_000_000_000:  # ~317 years at most (a due time must exist)
        assert err is not None and err.sqlstate == "22023"
    else:
        assert err is None and _graph_of(value)["query"] == str(seconds)


cron_field = st.one_of(
    st.sampled_from(
        [
            "*",
            "*/5",
            "0",
            "59",
            "60",
            "1-5",
            "5-1",
            "MON-FRI",
            "jan",
            "SUN,SAT",
            "L",
            "5L",
            "5#2",
            "?",
            "*/0",
            "1/",
            "/1",
            "-",
            "1--2",
            "7",
            "8",
            "99999",
            "1,",
            ",1",
            "*/*",
            "a-b",
            "0-0/1",
        ]
    ),
    st.text(alphabet=st.sampled_from("0123456789*/-,LW#?ABCDEFMNOSTUJ"), min_size=1, max_size=6),
)
cron_exprs = st.one_of(
    st.lists(cron_field, min_size=0, max_size=7).map(" ".join),
    st.sampled_from(
        [
            "@daily",
            "@HOURLY",
            "@reboot",
            "@",
            "@every 5m",
            " * * * * * ",
            "*\t*\n*  * *",
            "0 0 30 2 *",
            "0 0 31 4 *",
        ]
    ),
    hostile_text,
)


@SETTINGS
@given(expr=cron_exprs)
def test_cron_strings(tx: Conn, user: str, expr: str) -> None:
    from pgdurable.cron import validate

    value, err = attempt(tx, "select df.wait_for_schedule(%s)", (expr,))
    if err is not None:
        assert err.sqlstate == "22023"
        assert "invalid cron expression" in str(err)
        return
    assert json.loads(_graph_of(value)["query"]) == {"cron_expr": expr}
    # what SQL accepts, the worker's parser accepts too: a schedule that never fires (an
    # impossible day-of-month/month pair) is refused by df.wait_for_schedule already
    validate(expr)
    iid, serr = start(tx, user, value)
    assert serr is None and iid is not None, serr


urls = st.one_of(
    st.sampled_from(
        [
            "http://example.com",
            "https://h/x?a=1&b='2'",
            "HTTPS://H",
            "ftp://x",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "http://{host}/x",
            "http://127.0.0.1/",
            "http://[::1]/",
            "//h/x",
            "http:/x",
            "",
            "http://h/'; drop table df.instances; --",
            "https://ü.example/🙂",
        ]
    ),
    st.builds(lambda s, t: s + t, st.sampled_from(["http://", "https://", ""]), hostile_text),
)
headers = st.one_of(
    st.none(),
    st.dictionaries(hostile_text, st.one_of(hostile_text, st.integers(), st.none()), max_size=3),
    st.sampled_from([[], "x", 1, True, [{"a": "b"}]]),
)


@SETTINGS
@given(
    url=urls,
    method=st.one_of(
        st.sampled_from(["get", "POST", "Put", "DELETE", "patch", "HEAD", "TRACE", "", "G ET"]),
        hostile_text,
    ),
    body=st.none() | hostile_text,
    hdrs=headers,
    timeout=st.integers(-5, 400) | st.sampled_from([-(2**31), 2**31 - 1]),
    multipart=st.booleans(),
    parts=st.one_of(
        st.none(),
        st.just([]),
        st.just({}),
        st.lists(
            st.fixed_dictionaries({"name": hostile_text, "data_b64": hostile_text}), max_size=2
        ),
    ),
)
def test_http_arguments(
    tx: Conn,
    user: str,
    url: str,
    method: str,
    body: str | None,
    hdrs: Any,
    timeout: int,
    multipart: bool,
    parts: Any,
) -> None:
    jh = None if hdrs is None else json.dumps(hdrs)
    if multipart:
        q = "select df.http_multipart(%s, %s, %s::jsonb, %s::jsonb, %s)"
        params: tuple[Any, ...] = (
            url,
            method,
            None if parts is None else json.dumps(parts),
            jh,
            timeout,
        )
    else:
        q = "select df.http(%s, %s, %s, %s::jsonb, %s)"
        params = (url, method, body, jh, timeout)
    value, err = attempt(tx, q, params)
    if err is not None:
        assert err.sqlstate == "22023", err
        msg = str(err)
        assert any(
            s in msg
            for s in (
                "unsupported URL scheme",
                "unsupported HTTP method",
                "headers must be a JSON object",
                "timeout_seconds",
                "parts must be a non-empty JSON array",
            )
        ), msg
        return
    g = _graph_of(value)
    cfg = json.loads(g["query"])
    assert cfg["url"] == url
    assert cfg["method"] == method.upper()
    assert cfg["headers"] == hdrs
    assert 1 <= cfg["timeout_seconds"] <= 300
    assert "{" in url or url.lower().startswith(("http://", "https://"))
    iid, serr = start(tx, user, value)
    assert serr is None and iid is not None, serr


# ---------------------------------------------------------------------------------------
# names stay inert


@SETTINGS
@given(
    label=st.none() | any_text | st.sampled_from(INJECTIONS + UNICODE),
    name=hostile_text,
    value=hostile_text,
    reason=hostile_text,
)
def test_labels_vars_and_reasons_are_stored_verbatim(
    tx: Conn, user: str, label: str | None, name: str, value: str, reason: str
) -> None:
    ok, err = attempt(tx, "select df.setvar(%s, %s)", (name, value))
    if name == "":
        assert err is not None and err.sqlstate == "22023" and "non-empty" in str(err)
        name = "v"
        ok, err = attempt(tx, "select df.setvar(%s, %s)", (name, value))
    assert err is None and ok == "OK", err
    assert attempt(tx, "select df.getvar(%s)", (name,)) == (value, None)
    iid, serr = start(tx, user, "select {" + name + "}", label)
    if serr is not None:
        # the one refusal: a {var} inside it that is not the variable (a name holding braces
        # encloses another, such as {A in {{A}), named in the error (35_references.sql)
        m = re.match(r"unknown variable \{(\w+)\} in step ", serr.diag.message_primary or "")
        assert serr.sqlstate == "22023" and m, serr
        assert m.group(1) != name and "{" + m.group(1) + "}" in "{" + name + "}", serr
        return
    assert iid is not None
    row = tx.execute("select label, status from df.instances where id = %s", (iid,)).fetchone()
    assert row == (label, "pending")
    tx.execute("reset role")
    snap = tx.execute("select vars from pgdurable.runs where instance_id = %s", (iid,)).fetchone()
    become(tx, user)
    assert snap is not None and snap[0][name] == value
    out, cerr = attempt(tx, "select df.cancel(%s, %s)", (iid, reason))
    assert cerr is None and out == f"Instance {iid} cancelled: {reason}", cerr
    assert tx.execute("select status from df.instances where id = %s", (iid,)).fetchone() == (
        "cancelled",
    )
    # the tables the payloads aimed at are all still there
    assert (
        tx.execute(
            "select count(*) from pg_tables where schemaname in ('df', 'pgdurable')"
        ).fetchone()[0]
        >= 7
    )  # type: ignore[index]


# regression guard: an over-long label used to fail with an index-row-size error
def test_long_label_error_names_the_label(tx: Conn, user: str) -> None:
    rnd = random.Random(8)  # 4 kB that pglz cannot shrink below the btree limit
    label = "".join(rnd.choice(string.ascii_letters + string.digits) for _ in range(4000))
    iid, err = start(tx, user, "select 1", label)
    if err is not None:
        msg = err.diag.message_primary or ""
        assert "index row" not in msg and "label" in msg, err
    else:
        assert tx.execute("select label from df.instances where id = %s", (iid,)).fetchone() == (
            label,
        )


@pytest.mark.parametrize("payload", [p for p in INJECTIONS + UNICODE if not IDENT_RE.match(p)])
def test_injection_through_result_names_is_refused(tx: Conn, user: str, payload: str) -> None:
    for q in (
        "select df.as('select 1', %s)",
        "select 'select 1' |=> %s",
        "select df.if_rows(%s, 'a', 'b')",
    ):
        value, err = attempt(tx, q, (payload,))
        assert err is not None and err.sqlstate == "22023", (q, payload, value)
        assert "not a valid identifier" in str(err)
    g = json.dumps({"node_type": "SQL", "query": "x", "result_name": payload})
    _, err = start(tx, user, g)
    assert err is not None and "not a valid identifier" in str(err)


# ---------------------------------------------------------------------------------------
# bugs found by this module (kept failing until fixed)


# regression guard: a deeply nested operand used to raise 54001 'stack depth limit exceeded'
@pytest.mark.parametrize(
    "fn", ["select df.seq(%s, 'b')", "select df.if_else_op(%s, 'b')", "select df.join(%s, 'b')"]
)
def test_deep_non_node_json_operand(tx: Conn, user: str, fn: str) -> None:
    arg = '{"a":' + "[" * 200_000 + "]" * 200_000 + "}"
    attempt(tx, fn, (arg,))  # assert_clear fails on 54001


# regression guard: a node-looking text whose JSON does not parse used to become ONE SQL node,
# silently dropping the rest of the graph
@pytest.mark.parametrize("case", ["deep", "nul", "fastpath"])
def test_unparseable_graph_is_not_a_sql_step(tx: Conn, user: str, case: str) -> None:
    if case == "deep":  # 100,000 nested LOOPs: past the depth limit, must say so
        text = (
            '{"node_type":"LOOP","left_node":' * 100_000
            + '{"node_type":"SQL","query":"x"}'
            + "}" * 100_000
        )
    elif case == "nul":  # jsonb cannot hold \u0000
        text = json.dumps(
            {
                "node_type": "THEN",
                "left_node": {"node_type": "SQL", "query": "a\0"},
                "right_node": {"node_type": "SQL", "query": "b"},
            }
        )
    else:  # the DSL fast path embeds a node-looking operand unparsed
        text = tx.execute("""select df.seq('{"node_type":"SQL",oops', 'select 1')""").fetchone()[0]  # type: ignore[index]
    iid, err = start(tx, user, text)
    assert err is not None, (
        f"df.start accepted it as {node_count(tx, iid or '')} node(s): "
        f"{tx.execute('select node_type from df.nodes where instance_id = %s', (iid,)).fetchall()}"
    )


# regression guard: hand-written leaf configs used to be checked only structurally
@pytest.mark.parametrize(
    "node",
    [
        {"node_type": "WAIT_SCHEDULE", "query": '{"cron_expr":"bogus"}'},
        {"node_type": "HTTP", "query": '{"url":"ftp://x","method":"GET","timeout_seconds":30}'},
        {"node_type": "HTTP", "query": '{"url":"http://x","method":"FROB","timeout_seconds":30}'},
        {"node_type": "HTTP", "query": '{"url":"http://x","method":"GET","timeout_seconds":-5}'},
        {
            "node_type": "HTTP_MULTIPART",
            "query": '{"url":"http://x","method":"GET","parts":[],"timeout_seconds":30}',
        },
        {"node_type": "SIGNAL", "query": '{"signal_name":"s","timeout_seconds":"abc"}'},
        {"node_type": "SLEEP", "query": "99999999999999999999999"},
    ],
)
def test_hand_written_leaf_configs_are_validated(tx: Conn, user: str, node: dict[str, Any]) -> None:
    _, err = start(tx, user, json.dumps(node))
    assert err is not None and err.sqlstate == "22023"


# regression guard: a ')' in the input used to close the expression and let further
# statements run in a dry run; the expression is now evaluated through a cursor
def test_explain_dry_run_runs_one_expression_only(tx: Conn, user: str) -> None:
    payload = "df.sql('x')); select df.setvar('pwned', '1'); select (df.sql('y')"
    attempt(tx, "select df.explain(%s)", (payload,))
    assert tx.execute("select df.getvar('pwned')").fetchone() == (None,)


# regression guard: rejecting a graph nested far past 256 used to cost O(256 x input size)
def test_too_deep_graph_is_rejected_quickly(tx: Conn, user: str) -> None:
    n = 10_000
    text = '{"node_type":"LOOP","left_node":' * n + '{"node_type":"SQL","query":"x"}' + "}" * n
    tx.execute("set local statement_timeout = '3s'")
    _, err = start(tx, user, text)
    assert err is not None and err.sqlstate == "54000", err
