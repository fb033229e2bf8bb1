"""graph/compile.py: df.nodes rows and graph values → CompiledGraph."""

from __future__ import annotations

import json

import pytest

from pgdurable.graph._abc import COND_IF_ROWS, IF, JOIN, LOOP, NONE, SQL, THEN
from pgdurable.graph.compile import compile_rows, compile_value
from tests.graphs import brk, if_, if_rows, join, loop, race, sql, then


def row(id, node_type, query=None, result_name=None, left=None, right=None):
    return {
        "id": id,
        "node_type": node_type,
        "query": query,
        "result_name": result_name,
        "left_node": left,
        "right_node": right,
    }


def test_preorder_child_order():
    # IF: condition first, then left, right; JOIN3: left, right, extra
    g = compile_value(
        if_(sql("c"), join(sql("a"), sql("b"), sql("e"), name="j"), sql("z"), name="i")
    )
    assert g.result_names == ("i", "c", "j", "a", "b", "e", "z")
    assert g.node_ids == tuple(f"n{i}" for i in range(7))
    assert g.types == (IF, SQL, JOIN, SQL, SQL, SQL, SQL)
    assert g.cond == (1, NONE, NONE, NONE, NONE, NONE, NONE)
    assert g.left == (2, NONE, 3, NONE, NONE, NONE, NONE)
    assert g.right == (6, NONE, 4, NONE, NONE, NONE, NONE)
    assert g.extra == (NONE, NONE, 5, NONE, NONE, NONE, NONE)
    assert g.parent == (NONE, 0, 0, 2, 2, 2, 0)
    assert g.end == (7, 2, 6, 4, 5, 6, 7)
    assert len(g) == 7


def test_rows_in_any_order_and_as_tuples():
    rows = [
        ("b", "SQL", "select 2", None, None, None),
        ("r", "THEN", None, "out", "a", "b"),
        ("a", "SQL", "select 1", None, None, None, "extra column ignored"),
    ]
    g = compile_rows(rows, "r")
    assert g.node_ids == ("r", "a", "b")
    assert g.result_names == ("out", None, None)
    assert g.types == (THEN, SQL, SQL)


def test_if_rows_loop_condition_join3_queries():
    rows = [
        row("l", "LOOP", json.dumps({"condition_node": "c"}), left="i"),
        row("c", "SQL", "select true"),
        row(
            "i", "IF", '{"condition_type":"result_has_rows","result_name":"x"}', left="j", right="s"
        ),
        row("j", "JOIN", '{"extra_nodes":["e"]}', left="a", right="b"),
        row("a", "SQL", "1"),
        row("b", "SQL", "2"),
        row("e", "SQL", "3"),
        row("s", "SLEEP", "1"),
    ]
    g = compile_rows(rows, "l")
    assert g.node_ids == ("l", "c", "i", "j", "a", "b", "e", "s")
    assert g.cond[0] == 1
    assert g.cond[2] == COND_IF_ROWS
    assert g.extra[3] == 6
    assert g.types[0] == LOOP


def test_loop_without_condition_and_null_query():
    g = compile_value(loop(then(sql(), brk())))
    assert g.cond[0] == NONE
    g = compile_rows([row("l", "LOOP", None, left="a"), row("a", "SQL", "1")], "l")
    assert g.cond == (NONE, NONE)


def test_compile_value_accepts_text_and_matches_rows():
    value = race(if_rows(sql(), sql()), loop(sql(), sql()))
    assert compile_value(json.dumps(value)) == compile_value(value)


def test_deep_chain_compiles_iteratively():
    g = sql()
    for _ in range(9_999):
        g = then(g, sql())
    cg = compile_value(g)
    assert len(cg) == 19_999
    assert cg.end[0] == 19_999


@pytest.mark.parametrize(
    ("rows", "root", "message"),
    [
        ([row("a", "SQL", "1")], "zz", "root 'zz' is not a node"),
        ([row("a", "SQL", "1"), row("a", "SQL", "2")], "a", "node 'a': duplicate id"),
        ([row("a", "NOPE")], "a", "node 'a': unknown node_type 'NOPE'"),
        (
            [row("a", "THEN", left="b", right="x"), row("b", "SQL", "1")],
            "a",
            "node 'a' \\(THEN\\): child 'x' is not a node",
        ),
        (
            [row("a", "THEN", left="b", right="a"), row("b", "SQL", "1")],
            "a",
            "cycle through node 'a'",
        ),
        (
            [row("a", "THEN", left="b", right="b"), row("b", "SQL", "1")],
            "a",
            "second parent for node 'b'",
        ),
        ([row("a", "SQL", "1"), row("b", "SQL", "1")], "a", "node 'b' is not reachable"),
        ([row("a", "SQL", "1", left="a")], "a", "node 'a' \\(SQL\\): a leaf must have no"),
        ([row("a", "THEN", left="b"), row("b", "SQL", "1")], "a", "right_node is missing"),
        ([row("a", "RACE", right="b"), row("b", "SQL", "1")], "a", "left_node is missing"),
        (
            [row("a", "LOOP", left="b", right="b"), row("b", "SQL", "1")],
            "a",
            "a LOOP has no right_node",
        ),
        (
            [row("a", "IF", None, left="b", right="c"), row("b", "SQL", "1"), row("c", "SQL", "1")],
            "a",
            "node 'a' \\(IF\\): query must name a condition_node",
        ),
        (
            [
                row("a", "IF", "{bad", left="b", right="c"),
                row("b", "SQL", "1"),
                row("c", "SQL", "1"),
            ],
            "a",
            "query is not valid JSON",
        ),
        (
            [
                row("a", "IF", "[1]", left="b", right="c"),
                row("b", "SQL", "1"),
                row("c", "SQL", "1"),
            ],
            "a",
            "query is not a JSON object",
        ),
        (
            [row("a", "LOOP", '{"x":1}', left="b"), row("b", "SQL", "1")],
            "a",
            "query must be NULL or",
        ),
        (
            [
                row("a", "JOIN", '{"extra_nodes":[]}', left="b", right="c"),
                row("b", "SQL", "1"),
                row("c", "SQL", "1"),
            ],
            "a",
            "extra_nodes must be a list of exactly one",
        ),
        (
            [
                row("a", "THEN", "x", left="b", right="c"),
                row("b", "SQL", "1"),
                row("c", "SQL", "1"),
            ],
            "a",
            "query must be NULL",
        ),
        ([{"id": "a"}], "a", "lacks column 'node_type'"),
        ([("a", "SQL")], "a", "fewer than 6 columns"),
        ([(1, "SQL", None, None, None, None)], "a", "id must be a string"),
    ],
)
def test_compile_rows_rejects(rows, root, message):
    with pytest.raises(ValueError, match=message):
        compile_rows(rows, root)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{nope", "graph: not valid JSON"),
        ("[1]", "graph: a graph value must be a JSON object"),
        ({"_partial_if": True, "condition": {}, "then_branch": {}}, "partial IF"),
        (
            {"node_type": "THEN", "left_node": sql(), "right_node": 5},
            "right_node of node 'n0': a graph value must be a JSON object",
        ),
        (
            {"node_type": "JOIN", "left_node": sql(), "right_node": sql(), "extra_nodes": []},
            "extra_nodes must hold exactly one graph",
        ),
        ({"node_type": "THEN", "left_node": sql()}, "node 'n0' \\(THEN\\): right_node is missing"),
    ],
)
def test_compile_value_rejects(value, message):
    with pytest.raises(ValueError, match=message):
        compile_value(value)
