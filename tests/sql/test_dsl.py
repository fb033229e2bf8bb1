"""The DSL functions of pgdurable/sql/schema/10_dsl.sql (docs/api.md, ARCHITECTURE.md §1).

Every DSL call returns a graph value: text holding one compact JSON object. These tests
build values on a rolled-back connection (``tx``) and check their exact shape, the NULL
rules, auto-wrap and every build-time error text.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from psycopg import errors

from pgdurable.cron import validate as cron_validate
from tests.fix_sql import one

Conn = psycopg.Connection[Any]


def graph(tx: Conn, query: str, *params: object) -> Any:
    text = one(tx, query, params, strict=True)
    assert isinstance(text, str)
    return json.loads(text)


def fails(
    tx: Conn, query: str, *params: object, exc: type[psycopg.Error] = errors.InvalidParameterValue
) -> str:
    """Run ``query`` in a savepoint, expect ``exc``; return message (+ hint)."""
    with pytest.raises(exc) as info, tx.transaction():
        tx.execute(query, params or None)
    diag = info.value.diag
    return f"{diag.message_primary}\n{diag.message_hint or ''}"


def sql(q: str) -> dict[str, Any]:
    return {"node_type": "SQL", "query": q}


# ---------------------------------------------------------------------------------------
# leaves


def test_sql_node_is_compact_json(tx: Conn) -> None:
    assert one(tx, "select df.sql('select 1')") == '{"node_type":"SQL","query":"select 1"}'


def test_sql_node_escapes_text(tx: Conn) -> None:
    q = "select 'a\"b\\c', E'\\n', 'ünï'"
    got = one(tx, "select df.sql(%s)", (q,))
    assert json.loads(got) == sql(q)


def test_sql_is_explicit_even_for_json_text(tx: Conn) -> None:
    text = '{"node_type":"SLEEP","query":"1"}'
    assert graph(tx, "select df.sql(%s)", text) == sql(text)


def test_sleep(tx: Conn) -> None:
    assert one(tx, "select df.sleep(30)") == '{"node_type":"SLEEP","query":"30"}'
    assert graph(tx, "select df.sleep(0)") == {"node_type": "SLEEP", "query": "0"}
    assert graph(tx, "select df.sleep(10000000000)")["query"] == "10000000000"


def test_break(tx: Conn) -> None:
    g = graph(tx, "select df.break()")
    assert g == {"node_type": "BREAK", "query": '{"break_value":null}'}
    g = graph(tx, "select df.break('done')")
    assert json.loads(g["query"]) == {"break_value": "done"}
    # the value is a literal: stored as text, interpreted (JSON or string) by the worker
    g = graph(tx, """select df.break('{"a": 1}')""")
    assert json.loads(g["query"]) == {"break_value": '{"a": 1}'}
    assert graph(tx, "select df.break(null)") == graph(tx, "select df.break()")


def test_wait_for_schedule(tx: Conn) -> None:
    g = graph(tx, "select df.wait_for_schedule('*/5 * * * *')")
    assert g == {"node_type": "WAIT_SCHEDULE", "query": '{"cron_expr":"*/5 * * * *"}'}


def test_wait_for_signal(tx: Conn) -> None:
    assert graph(tx, "select df.wait_for_signal('go')") == {
        "node_type": "SIGNAL",
        "query": '{"signal_name":"go","timeout_seconds":null}',
    }
    assert json.loads(graph(tx, "select df.wait_for_signal('go', 60)")["query"]) == {
        "signal_name": "go",
        "timeout_seconds": 60,
    }
    # NULL timeout (the default) means no timeout
    assert graph(tx, "select df.wait_for_signal('go', null)") == graph(
        tx, "select df.wait_for_signal('go')"
    )


def test_http_defaults(tx: Conn) -> None:
    g = graph(tx, "select df.http('https://api.example.com/x')")
    assert g["node_type"] == "HTTP"
    assert g["query"] == (
        '{"url":"https://api.example.com/x","method":"POST","body":null,'
        '"headers":null,"timeout_seconds":30}'
    )


def test_http_all_arguments(tx: Conn) -> None:
    g = graph(
        tx,
        """select df.http('http://h/p?q=1', 'patch', '{"k": "$r.x"}',
                                     '{"Accept": "application/json"}', 300)""",
    )
    cfg = json.loads(g["query"])
    assert list(cfg) == ["url", "method", "body", "headers", "timeout_seconds"]
    assert cfg == {
        "url": "http://h/p?q=1",
        "method": "PATCH",
        "body": '{"k": "$r.x"}',
        "headers": {"Accept": "application/json"},
        "timeout_seconds": 300,
    }


@pytest.mark.parametrize("method", ["get", "Post", "PUT", "delete", "pAtCh"])
def test_http_methods_any_case_stored_upper(tx: Conn, method: str) -> None:
    g = graph(tx, "select df.http('https://h', %s)", method)
    assert json.loads(g["query"])["method"] == method.upper()


def test_http_named_arguments(tx: Conn) -> None:
    g = graph(tx, "select df.http(url => 'https://h', method => 'GET', timeout_seconds => 5)")
    assert json.loads(g["query"])["timeout_seconds"] == 5


def test_http_scheme_check_skipped_for_placeholders(tx: Conn) -> None:
    g = graph(tx, "select df.http('{base_url}/items', 'GET')")
    assert json.loads(g["query"])["url"] == "{base_url}/items"


def test_http_scheme_any_case(tx: Conn) -> None:
    assert graph(tx, "select df.http('HTTPS://h')")["node_type"] == "HTTP"


def test_http_multipart(tx: Conn) -> None:
    parts = '[{"name": "f", "data_b64": "aGk=", "filename": "a.txt"}]'
    g = graph(
        tx,
        "select df.http_multipart('https://h/up', 'put', %s::jsonb, "
        """'{"X-A": "1"}')""",
        parts,
    )
    assert g["node_type"] == "HTTP_MULTIPART"
    cfg = json.loads(g["query"])
    assert list(cfg) == ["url", "method", "parts", "headers", "timeout_seconds"]
    assert cfg == {
        "url": "https://h/up",
        "method": "PUT",
        "parts": json.loads(parts),
        "headers": {"X-A": "1"},
        "timeout_seconds": 30,
    }
    g = graph(tx, "select df.http_multipart('https://h', parts => %s::jsonb)", parts)
    assert json.loads(g["query"])["method"] == "POST"


# ---------------------------------------------------------------------------------------
# composers


def test_seq(tx: Conn) -> None:
    assert one(tx, "select df.seq('select 1', 'select 2')") == (
        '{"node_type":"THEN","left_node":{"node_type":"SQL","query":"select 1"},'
        '"right_node":{"node_type":"SQL","query":"select 2"}}'
    )


@pytest.mark.parametrize(
    ("func", "node_type"), [("join", "JOIN"), ("race", "RACE"), ("seq", "THEN")]
)
def test_binary_composers(tx: Conn, func: str, node_type: str) -> None:
    g = graph(tx, f"select df.{func}('a', df.sleep(1))")
    assert g == {
        "node_type": node_type,
        "left_node": sql("a"),
        "right_node": {"node_type": "SLEEP", "query": "1"},
    }


def test_join3(tx: Conn) -> None:
    g = graph(tx, "select df.join3('a', 'b', 'c')")
    assert g == {
        "node_type": "JOIN",
        "left_node": sql("a"),
        "right_node": sql("b"),
        "extra_nodes": [sql("c")],
    }


def test_if(tx: Conn) -> None:
    text = one(tx, "select df.if('select true', 'a', 'b')")
    assert text == (
        '{"node_type":"IF","condition_node":{"node_type":"SQL","query":"select true"},'
        '"left_node":{"node_type":"SQL","query":"a"},'
        '"right_node":{"node_type":"SQL","query":"b"}}'
    )


def test_if_condition_is_any_node(tx: Conn) -> None:
    g = graph(tx, "select df.if(df.seq('a', 'b'), 'c', df.sleep(1))")
    assert g["condition_node"]["node_type"] == "THEN"
    assert "query" not in g


def test_if_rows(tx: Conn) -> None:
    g = graph(tx, "select df.if_rows('found', 'a', 'b')")
    assert g == {
        "node_type": "IF",
        "query": '{"condition_type":"result_has_rows","result_name":"found"}',
        "left_node": sql("a"),
        "right_node": sql("b"),
    }


def test_loop(tx: Conn) -> None:
    assert graph(tx, "select df.loop('a')") == {"node_type": "LOOP", "left_node": sql("a")}
    assert graph(tx, "select df.loop('a', null)") == graph(tx, "select df.loop('a')")
    assert graph(tx, "select df.loop('a', 'select false')") == {
        "node_type": "LOOP",
        "condition_node": sql("select false"),
        "left_node": sql("a"),
    }


def test_as_leaf_and_key_order(tx: Conn) -> None:
    assert one(tx, "select df.as('select 1', 'r')") == (
        '{"node_type":"SQL","query":"select 1","result_name":"r"}'
    )


def test_as_composite_keeps_children_text(tx: Conn) -> None:
    inner = one(tx, "select df.seq(df.as('a', 'x'), 'b')")
    text = one(tx, "select df.as(%s, 'y')", (inner,))
    assert text == (
        '{"node_type":"THEN","result_name":"y","left_node":'
        '{"node_type":"SQL","query":"a","result_name":"x"},'
        '"right_node":{"node_type":"SQL","query":"b"}}'
    )


def test_as_renames(tx: Conn) -> None:
    g = graph(tx, "select df.as(df.as(df.sleep(1), 'a'), 'b')")
    assert g == {"node_type": "SLEEP", "query": "1", "result_name": "b"}
    assert one(tx, "select df.as(df.as('q', 'a'), 'b')").count("result_name") == 1


def test_as_on_hand_written_json(tx: Conn) -> None:
    text = '  {"query" : "q", "result_name": "old", "node_type": "SQL"}  '
    assert one(tx, "select df.as(%s, 'new')", (text,)) == (
        '{"node_type":"SQL","query":"q","result_name":"new"}'
    )


# df.as splices the name into the DSL's own output without parsing (fast path) and
# re-emits anything else from json_each (general path); both must give the same shape.
AS_CASES = [
    "df.sql('select 1')",
    "df.sql('q\"\\\\ ü {x}')",
    "df.as(df.sql('q\"\\\\'), 'old')",
    "df.sleep(3)",
    'df.break(\'{"a": "b"}\')',
    "df.seq(df.as('a', 'x'), 'b')",
    "df.as(df.seq('a', 'b'), 'old')",
    "df.if_rows('r', 'a', 'b')",
    "df.as(df.if_rows('r', 'a', 'b'), 'old')",
    "df.if('c', 't', 'e')",
    "df.loop('a', 'c')",
    "df.join3('a', 'b', 'c')",
    "df.sql(repeat('x\"\\\\', 3000))",  # query longer than the fast path's prefix
    "df.as(df.sql(repeat('x', 5000)), 'old')",
    "df.seq(df.sql(repeat('x', 5000)), 'b')",
]


@pytest.mark.parametrize("expr", AS_CASES)
def test_as_shapes(tx: Conn, expr: str) -> None:
    src_text = one(tx, f"select {expr}")
    src = json.loads(src_text)
    names = src_text.count('"result_name"') + (0 if "result_name" in src else 1)
    fast = one(tx, f"select df.as({expr}, 'n')")
    # the general path, forced by a non-canonical prefix (whitespace inside the object)
    slow = one(tx, f"select df.as(regexp_replace({expr}, '^\\{{', '{{ '), 'n')")
    for text in (fast, slow):
        got = json.loads(text)
        assert got == {**src, "result_name": "n"}
        assert text.count('"result_name":"n"') == 1
        assert text.replace(" ", "").count('"result_name"') == names
        keys = list(got)
        assert keys.index("result_name") == (2 if "query" in got else 1)
    assert json.loads(fast) == json.loads(slow)


def test_as_op_is_as(tx: Conn) -> None:
    assert one(tx, "select df.as_op('q', 'n')") == one(tx, "select df.as('q', 'n')")


def test_if_then_op_partial(tx: Conn) -> None:
    g = graph(tx, "select df.if_then_op('c', 't')")
    assert g == {"_partial_if": True, "condition": sql("c"), "then_branch": sql("t")}


def test_if_else_op_completes_partial(tx: Conn) -> None:
    assert one(tx, "select df.if_else_op(df.if_then_op('c', 't'), 'e')") == one(
        tx, "select df.if('c', 't', 'e')"
    )


def test_loop_op_is_loop(tx: Conn) -> None:
    assert one(tx, "select df.loop_op('b')") == one(tx, "select df.loop('b')")


def test_nested_graph_shapes(tx: Conn) -> None:
    g = graph(
        tx,
        """
        select df.seq(df.as('select 1 as n', 'first'),
                      df.loop(df.if_rows('first',
                                         df.join3(df.http('https://h'),
                                                  df.wait_for_signal('s', 5),
                                                  df.race(df.sleep(1), 'select 2')),
                                         df.break('{"done": true}')),
                              df.wait_for_schedule('@hourly')))""",
    )
    assert g["node_type"] == "THEN"
    assert g["left_node"] == {**sql("select 1 as n"), "result_name": "first"}
    loop = g["right_node"]
    assert loop["node_type"] == "LOOP"
    assert loop["condition_node"]["node_type"] == "WAIT_SCHEDULE"
    if_ = loop["left_node"]
    assert [if_["left_node"]["node_type"], if_["right_node"]["node_type"]] == ["JOIN", "BREAK"]
    join = if_["left_node"]
    assert [
        join["left_node"]["node_type"],
        join["right_node"]["node_type"],
        join["extra_nodes"][0]["node_type"],
    ] == ["HTTP", "SIGNAL", "RACE"]


def test_long_chain_builds(tx: Conn) -> None:
    text = one(
        tx,
        """
        select g from (select 1) s, lateral (
            with recursive c(i, g) as (
                select 0, df.sql('select 0')
                union all
                select i + 1, df.seq(g, 'select ' || (i + 1)) from c where i < 500)
            select g from c order by i desc limit 1) x""",
    )
    g = json.loads(text)
    depth = 0
    while g["node_type"] == "THEN":
        assert g["right_node"] == sql(f"select {500 - depth}")
        g = g["left_node"]
        depth += 1
    assert depth == 500
    assert g == sql("select 0")


# ---------------------------------------------------------------------------------------
# auto-wrap


def test_autowrap_sql_text(tx: Conn) -> None:
    assert graph(tx, "select df.seq('select 1', 'update t set x = 1')")["right_node"] == sql(
        "update t set x = 1"
    )


def test_autowrap_node_json_as_is(tx: Conn) -> None:
    node = '  {"node_type": "SLEEP", "query": "5"}\n'
    text = one(tx, "select df.seq(%s, 'b')", (node,))
    assert text.startswith('{"node_type":"THEN","left_node":{"node_type": "SLEEP", "query": "5"},')
    assert json.loads(text)["left_node"] == {"node_type": "SLEEP", "query": "5"}


@pytest.mark.parametrize(
    "text",
    [
        '{"no_node_type": 1}',  # a JSON object without node_type
        '{"node_type": "SQL"',  # not valid JSON
        "{broken",
        "[1, 2]",  # JSON but not an object
        '"SQL"',
        "ok",  # helper texts are matched exactly
        "OK ",
        "Completed",
    ],
)
def test_autowrap_anything_else_is_sql(tx: Conn, text: str) -> None:
    assert graph(tx, "select df.seq(%s, 'b')", text)["left_node"] == sql(text)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('{"node_type": "FOO"}', "FOO"),
        ('{"node_type":"sql","query":"x"}', "sql"),  # node types are upper case
        ('{"node_type": 5}', "5"),
        ('{"node_type": null}', "null"),
        ('{"node_type": ["SQL"]}', '["SQL"]'),
    ],
)
def test_autowrap_unknown_node_type(tx: Conn, text: str, shown: str) -> None:
    msg = fails(tx, "select df.seq(%s, 'b')", text)
    assert f"Unknown node_type '{shown}'" in msg


@pytest.mark.parametrize(
    "call",
    [
        "df.seq(%s, 'b')",
        "df.seq('a', %s)",
        "df.join(%s, 'b')",
        "df.race('a', %s)",
        "df.join3('a', 'b', %s)",
        "df.if(%s, 'a', 'b')",
        "df.if('c', %s, 'b')",
        "df.if('c', 'a', %s)",
        "df.if_rows('r', %s, 'b')",
        "df.loop(%s)",
        "df.loop('b', %s)",
        "df.as(%s, 'n')",
        "df.if_then_op(%s, 't')",
        "df.if_then_op('c', %s)",
        "df.if_else_op(df.if_then_op('c', 't'), %s)",
        "df.sql(%s)",
    ],
)
@pytest.mark.parametrize("helper_text", ["OK", "completed", "failed", "cancelled"])
def test_helper_output_cannot_be_a_step(tx: Conn, call: str, helper_text: str) -> None:
    msg = fails(tx, f"select {call}", helper_text)
    assert "cannot be used as a workflow step" in msg
    assert f"'{helper_text}'" in msg


def test_partial_if_cannot_be_a_node(tx: Conn) -> None:
    msg = fails(tx, "select df.seq(df.if_then_op('c', 't'), 'b')")
    assert "incomplete IF" in msg
    assert "!>" in msg
    assert "c ?> (a ~> b) !> e" in msg
    msg = fails(tx, "select df.if_then_op(df.if_then_op('c', 't'), 'b')")
    assert "incomplete IF" in msg


@pytest.mark.parametrize("left", ["'select 1'", "df.sleep(1)", """'{"_partial_if": false}'"""])
def test_if_else_op_needs_a_partial(tx: Conn, left: str) -> None:
    msg = fails(tx, f"select df.if_else_op({left}, 'e')")
    assert '!> needs "condition ?> then_branch" on its left' in msg


def test_if_else_op_names_what_it_got(tx: Conn) -> None:
    assert "got a SLEEP node" in fails(tx, "select df.if_else_op(df.sleep(1), 'e')")
    assert "got SQL text 'select 42'" in fails(tx, "select df.if_else_op('select 42', 'e')")


# ---------------------------------------------------------------------------------------
# NULL rules (docs/api.md "NULL arguments": a NULL operand gives a NULL graph)


@pytest.mark.parametrize(
    "call",
    [
        "df.sql(null)",
        "df.seq(null, 'b')",
        "df.seq('a', null)",
        "df.join(null, 'b')",
        "df.join('a', null)",
        "df.join3('a', 'b', null)",
        "df.race(null, 'b')",
        "df.race('a', null)",
        "df.if(null, 'a', 'b')",
        "df.if('c', null, 'b')",
        "df.if('c', 'a', null)",
        "df.if_rows(null, 'a', 'b')",
        "df.if_rows('r', 'a', null)",
        "df.loop(null)",
        "df.loop(null, 'c')",
        "df.as(null, 'n')",
        "df.as('q', null)",
        "df.as_op(null, 'n')",
        "df.loop_op(null)",
        "df.if_then_op(null, 't')",
        "df.if_else_op(null, 'e')",
        "df.if_else_op(df.if_then_op('c', 't'), null)",
        "df.sleep(null)",
        "df.wait_for_schedule(null)",
        "df.wait_for_signal(null)",
        "df.wait_for_signal(null, 5)",
        "df.http(null)",
        "df.http('https://h', null)",
        "df.http('https://h', 'GET', timeout_seconds => null)",
        "df.http_multipart(null)",
        "df.http_multipart('https://h', null, '[{}]')",
        "df.http_multipart('https://h', 'POST', '[{}]', timeout_seconds => null)",
    ],
)
def test_null_operand_gives_null(tx: Conn, call: str) -> None:
    assert one(tx, f"select {call}", strict=True) is None


def test_null_in_optional_parameters_means_absent(tx: Conn) -> None:
    # parameters whose default is NULL are not operands: NULL there is the default
    assert one(tx, "select df.break(null)") is not None
    assert one(tx, "select df.loop('a', null)") is not None
    assert one(tx, "select df.wait_for_signal('s', null)") is not None
    assert one(tx, "select df.http('https://h', 'POST', null, null)") is not None
    assert one(tx, "select df.http_multipart('https://h', 'POST', '[{}]', null)") is not None


def test_strictness_and_volatility_in_catalog(tx: Conn) -> None:
    rows = dict(
        tx.execute("""
        select p.proname, p.proisstrict::text || ' ' || p.provolatile::text
        from pg_proc p where p.pronamespace = 'df'::regnamespace
          and p.proname in ('sql', 'seq', 'as', 'as_op', 'join', 'join3', 'race', 'if',
                            'if_rows', 'if_then_op', 'if_else_op', 'loop', 'loop_op', 'break',
                            'sleep', 'wait_for_schedule', 'wait_for_signal', 'http',
                            'http_multipart')""").fetchall()
    )
    assert len(rows) == 19
    for name, flags in rows.items():
        strict, volatility = flags.split()
        assert volatility == "i", name
        # functions with optional parameters apply the NULL rule by hand; so do the operator
        # helpers that pg_durable declares not strict (NULL in, NULL out all the same)
        expected = name not in (
            "loop",
            "break",
            "wait_for_signal",
            "http",
            "http_multipart",
            "as_op",
            "if_then_op",
            "if_else_op",
        )
        assert strict == str(expected).lower(), name


# ---------------------------------------------------------------------------------------
# build-time checks and their texts


@pytest.mark.parametrize("name", ["1abc", "a-b", "", "a b", "é", "$x", "x.y"])
def test_as_rejects_bad_identifiers(tx: Conn, name: str) -> None:
    msg = fails(tx, "select df.as('q', %s)", name)
    assert "not a valid identifier" in msg
    assert f"'{name}'" in msg


@pytest.mark.parametrize("name", ["a", "_", "Order_Total9", "_1"])
def test_as_accepts_identifiers(tx: Conn, name: str) -> None:
    assert graph(tx, "select df.as('q', %s)", name)["result_name"] == name


def test_if_rows_checks_the_name(tx: Conn) -> None:
    msg = fails(tx, "select df.if_rows('no good', 'a', 'b')")
    assert "not a valid identifier" in msg
    assert "'no good'" in msg


def test_sleep_negative(tx: Conn) -> None:
    msg = fails(tx, "select df.sleep(-5)")
    assert "seconds must be >= 0" in msg
    assert "-5" in msg


def test_signal_name_empty(tx: Conn) -> None:
    assert "signal name must not be empty" in fails(tx, "select df.wait_for_signal('')")


@pytest.mark.parametrize("timeout", [0, -3])
def test_signal_timeout_positive(tx: Conn, timeout: int) -> None:
    msg = fails(tx, "select df.wait_for_signal('s', %s)", timeout)
    assert "timeout_seconds must be > 0" in msg
    assert f"got {timeout}" in msg


@pytest.mark.parametrize(
    "url",
    ["ftp://h/x", "file:///etc/passwd", "h.example.com/x", "", "javascript:alert(1)", "https:/h"],
)
@pytest.mark.parametrize("func", ["http", "http_multipart"])
def test_http_scheme(tx: Conn, func: str, url: str) -> None:
    msg = fails(
        tx,
        f"select df.{func}(%s, parts => '[{{}}]')"
        if func == "http_multipart"
        else f"select df.{func}(%s)",
        url,
    )
    assert "unsupported URL scheme" in msg
    assert f"'{url}'" in msg


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "get ", "CONNECT", ""])
def test_http_method(tx: Conn, method: str) -> None:
    msg = fails(tx, "select df.http('https://h', %s)", method)
    assert "unsupported HTTP method" in msg
    assert f"'{method}'" in msg
    assert "GET, POST, PUT, DELETE, PATCH" in msg


@pytest.mark.parametrize("method", ["GET", "delete"])
def test_http_multipart_method(tx: Conn, method: str) -> None:
    msg = fails(tx, "select df.http_multipart('https://h', %s, '[{}]')", method)
    assert "unsupported HTTP method" in msg
    assert f"'{method}'" in msg
    assert "POST, PUT, PATCH" in msg


@pytest.mark.parametrize("timeout", [0, -1, 301, 100000])
@pytest.mark.parametrize("func", ["http", "http_multipart"])
def test_http_timeout(tx: Conn, func: str, timeout: int) -> None:
    msg = fails(
        tx,
        f"select df.{func}('https://h', parts => '[{{}}]', timeout_seconds => %s)"
        if func == "http_multipart"
        else f"select df.{func}('https://h', timeout_seconds => %s)",
        timeout,
    )
    assert "timeout_seconds must be between 1 and 300" in msg
    assert f"got {timeout}" in msg
    assert "caps HTTP timeouts at 300 seconds" in msg


def test_http_timeout_bounds_accepted(tx: Conn) -> None:
    assert one(tx, "select df.http('https://h', timeout_seconds => 1)") is not None
    assert one(tx, "select df.http('https://h', timeout_seconds => 300)") is not None


@pytest.mark.parametrize("headers", ['["a"]', '"x"', "5", "null"])
def test_http_headers_must_be_object(tx: Conn, headers: str) -> None:
    msg = fails(tx, "select df.http('https://h', 'GET', null, %s::jsonb)", headers)
    assert "headers must be a JSON object" in msg
    assert headers in msg
    msg = fails(tx, "select df.http_multipart('https://h', 'POST', '[{}]', %s::jsonb)", headers)
    assert "headers must be a JSON object" in msg


@pytest.mark.parametrize("parts", ["[]", '{"name": "a"}', '"x"', "null"])
def test_multipart_parts_non_empty_array(tx: Conn, parts: str) -> None:
    msg = fails(tx, "select df.http_multipart('https://h', 'POST', %s::jsonb)", parts)
    assert "parts must be a non-empty JSON array" in msg
    assert f"got {parts}" in msg


def test_multipart_parts_missing(tx: Conn) -> None:
    msg = fails(tx, "select df.http_multipart('https://h')")
    assert "parts must be a non-empty JSON array, got NULL" in msg


VALID_CRON = [
    "* * * * *",
    "*/15 * * * *",
    "0 9 * * 1-5",
    "0 9 * * MON-FRI",
    "0 0 1 1 *",
    "59 23 31 12 7",
    "0 0 * * 0",
    "0,30 9-17/2 * * mon,wed,fri",
    "10-50/20 * * * *",
    "5/15 * * * *",
    "0 12 * JAN,jul *",
    "0 0 1 jan-mar *",
    "  0   0 * * *  ",
    "0\t0 * * *",
    "@hourly",
    "@daily",
    "@midnight",
    "@weekly",
    "@monthly",
    "@yearly",
    "@annually",
    "@DAILY",
    " @daily ",
    "0 0 * * sun-sat",
    "* * * * 7",
    "*/1 * * * *",
]


@pytest.mark.parametrize("expr", VALID_CRON)
def test_cron_valid(tx: Conn, expr: str) -> None:
    g = graph(tx, "select df.wait_for_schedule(%s)", expr)
    assert json.loads(g["query"]) == {"cron_expr": expr}
    cron_validate(expr)  # what the build-time check accepts, the worker accepts


@pytest.mark.parametrize(
    ("expr", "needles"),
    [
        ("", ["expected 5 fields, got 0"]),
        ("* * * *", ["expected 5 fields, got 4"]),
        ("0 * * * * *", ["expected 5 fields, got 6"]),
        ("0 0 * * * 2025", ["expected 5 fields, got 6"]),
        ("60 * * * *", ["minute value 60 is out of range 0-59"]),
        ("* 24 * * *", ["hour value 24 is out of range 0-23"]),
        ("* * 0 * *", ["day-of-month value 0 is out of range 1-31"]),
        ("* * 32 * *", ["day-of-month value 32 is out of range 1-31"]),
        ("* * * 13 *", ["month value 13 is out of range 1-12"]),
        ("* * * 0 *", ["month value 0 is out of range 1-12"]),
        ("* * * * 8", ["day-of-week value 8 is out of range 0-7"]),
        ("* * * FOO *", ["month value 'FOO'", "JAN-DEC"]),
        ("* * * * MOO", ["day-of-week value 'MOO'", "SUN-SAT"]),
        ("* * MON * *", ["day-of-month value 'MON' is not a number"]),
        ("x * * * *", ["minute value 'x' is not a number"]),
        ("5-1 * * * *", ["minute range '5-1' is backwards"]),
        ("* * * * FRI-MON", ["day-of-week range 'FRI-MON' is backwards"]),
        ("*/0 * * * *", ["minute step in '*/0' must be a positive number"]),
        ("*/ * * * *", ["minute step in '*/'"]),
        ("*/x * * * *", ["minute step in '*/x'"]),
        ("1/2/3 * * * *", ["minute item '1/2/3' is malformed"]),
        ("1,,2 * * * *", ["minute item '' is malformed"]),
        ("1- * * * *", ["minute value '1-' is not a number"]),
        ("-1 * * * *", ["minute value '-1'"]),
        ("* * L * *", ["day-of-month value 'L'"]),
        ("* * * * 5#2", ["day-of-week value '5#2'"]),
        ("? * * * *", ["minute value '?'"]),
        ("99999 * * * *", ["minute value '99999' is not a number"]),
        ("@reboot", ["unknown macro"]),
        ("@every 5m", ["unknown macro"]),
    ],
)
def test_cron_invalid(tx: Conn, expr: str, needles: list[str]) -> None:
    msg = fails(tx, "select df.wait_for_schedule(%s)", expr)
    assert f"invalid cron expression '{expr}'" in msg
    for needle in needles:
        assert needle in msg


# ---------------------------------------------------------------------------------------
# purity: building graphs stores nothing and works with any search_path


def test_building_graphs_stores_nothing(tx: Conn) -> None:
    def counts() -> tuple[int, int]:
        row = tx.execute(
            "select (select count(*) from df.instances), (select count(*) from df.nodes)"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    before = counts()
    one(
        tx,
        """select df.seq(df.as('select 1', 'a'),
                             df.join3(df.http('https://h'), df.sleep(1),
                                      df.loop(df.if_rows('a', df.break(), 'x'),
                                              df.wait_for_signal('s'))))""",
    )
    one(tx, "select df.race(df.wait_for_schedule('@daily'), df.if('c', 't', 'e'))")
    assert counts() == before


def test_any_search_path(tx: Conn) -> None:
    tx.execute("create schema dsl_trap")
    # look-alike functions a caller's search_path could put first
    tx.execute(
        "create function dsl_trap.to_json(text) returns json language sql "
        "as $$ select '\"trap\"'::json $$"
    )
    tx.execute(
        "create function dsl_trap.btrim(text, text) returns text language sql "
        "as $$ select 'trap' $$"
    )
    tx.execute("set local search_path = dsl_trap, pg_catalog")
    assert graph(tx, "select df.as(df.seq('a', df.sleep(1)), 'x')")["left_node"] == sql("a")
    tx.execute("set local search_path = ''")
    assert graph(tx, "select df.http('https://h')")["node_type"] == "HTTP"
    assert graph(tx, "select df.wait_for_schedule('0 9 * * MON-FRI')")["node_type"] == (
        "WAIT_SCHEDULE"
    )
