"""diagram: graph values and instance rows become mermaid / dot pictures (pure)."""

from __future__ import annotations

import json

from pgdurable import diagram


def sql(q, name=None):
    g = {"node_type": "SQL", "query": q}
    if name:
        g["result_name"] = name
    return g


GRAPH = {
    "node_type": "THEN",
    "left_node": sql("select 1", "a"),
    "right_node": {
        "node_type": "IF",
        "condition_node": sql("select $a > 0"),
        "left_node": sql('select "x"'),
        "right_node": {"node_type": "SLEEP", "query": "5"},
    },
}


def test_from_graph_preorder_ids_and_roles():
    d = diagram.from_graph(json.dumps(GRAPH))
    assert d.root == "n0"
    assert [(n.id, n.label) for n in d.nodes.values()] == [
        ("n0", "THEN"),
        ("n1", "SQL: select 1 |=> 'a'"),
        ("n2", "IF"),
        ("n3", "SQL: select $a > 0"),
        ("n4", 'SQL: select "x"'),
        ("n5", "SLEEP 5s"),
    ]
    assert list(d.edges()) == [
        ("n0", "n1", "first"),
        ("n0", "n2", "then"),
        ("n2", "n3", "condition"),
        ("n2", "n4", "then"),
        ("n2", "n5", "else"),
    ]


def test_plain_sql_is_one_node():
    d = diagram.from_graph("select 42")
    assert [n.label for n in d.nodes.values()] == ["SQL: select 42"]


def test_mermaid_escapes_and_colours():
    rows = [
        {
            "node_id": "aaaaaaaa",
            "node_type": "IF",
            "query": '{"condition_node":"bbbbbbbb"}',
            "result_name": None,
            "left_node": "cccccccc",
            "right_node": "dddddddd",
            "status": "completed",
            "inferred_status": "completed",
        },
        {
            "node_id": "bbbbbbbb",
            "node_type": "SQL",
            "query": "select 1 < 2",
            "result_name": None,
            "left_node": None,
            "right_node": None,
            "status": "completed",
            "inferred_status": "completed",
        },
        {
            "node_id": "cccccccc",
            "node_type": "SQL",
            "query": 'select "q"',
            "result_name": None,
            "left_node": None,
            "right_node": None,
            "status": "failed",
            "inferred_status": "failed",
        },
        {
            "node_id": "dddddddd",
            "node_type": "SQL",
            "query": "select 3",
            "result_name": None,
            "left_node": None,
            "right_node": None,
            "status": "pending",
            "inferred_status": "skipped",
        },
    ]
    d = diagram.from_rows(rows, "aaaaaaaa", title="instance aaaaaaaa (failed)")
    out = diagram.mermaid(d).splitlines()
    assert out[:3] == [
        "%% instance aaaaaaaa (failed)",
        "flowchart TD",
        '    aaaaaaaa{{"completed: IF"}}:::completed',
    ]
    assert '    bbbbbbbb["completed: SQL: select 1 #lt; 2"]:::completed' in out
    assert '    cccccccc["failed: SQL: select #quot;q#quot;"]:::failed' in out
    assert '    dddddddd["skipped: SQL: select 3"]:::skipped' in out
    assert "    aaaaaaaa -->|condition| bbbbbbbb" in out
    assert "    classDef skipped fill:#ffffff,stroke:#555,stroke-dasharray: 4 3" in out
    assert not any("classDef running" in line for line in out)  # only used statuses
    dot = diagram.dot(d)
    assert '"cccccccc" [label="SQL: select \\"q\\"", fillcolor="#f4a6a6", xlabel="failed"];' in dot
    assert 'style="rounded,filled,dashed"' in dot
    assert '"aaaaaaaa" -> "dddddddd" [label="else"]' in dot


def test_join3_loop_and_long_labels():
    g = {
        "node_type": "LOOP",
        "left_node": {
            "node_type": "JOIN",
            "left_node": sql("select " + "x" * 100),
            "right_node": sql("b"),
            "extra_nodes": [sql("c")],
        },
    }
    d = diagram.from_graph(g)
    labels = [n.label for n in d.nodes.values()]
    assert labels[0] == "LOOP (infinite)"
    assert labels[1] == "JOIN (3)"
    assert len(labels[2]) == len("SQL: ") + diagram.LABEL_MAX
    assert labels[2].endswith("…")
    assert [r for _, _, r in d.edges()] == ["body", "branch 1", "branch 2", "branch 3"]
    assert diagram.to_json(d)["nodes"][1]["children"][2] == {"role": "branch 3", "id": "n4"}


def test_retry_is_drawn_with_its_one_child():
    g = {"node_type": "RETRY", "query": json.dumps({"max_attempts": 4}), "left_node": sql("x")}
    d = diagram.from_graph(g)
    assert d.nodes["n0"].label == "RETRY (up to 4 attempts)"
    assert list(d.edges()) == [("n0", "n1", "attempt")]
    rows = [
        {
            "node_id": "r",
            "node_type": "RETRY",
            "query": g["query"],
            "left_node": "s",
            "right_node": None,
            "result_name": None,
            "status": "running",
        },
        {
            "node_id": "s",
            "node_type": "SQL",
            "query": "x",
            "left_node": None,
            "right_node": None,
            "result_name": None,
            "status": "failed",
        },
    ]
    assert list(diagram.from_rows(rows, "r").edges()) == [("r", "s", "attempt")]
    assert "octagon" in diagram.dot(d)


def test_foreach_is_a_step_labelled_with_its_rows_query():
    cfg = {"rows": "select id\n  from orders", "body": sql("x"), "max_parallel": 5}
    d = diagram.from_graph({"node_type": "FOREACH", "query": json.dumps(cfg)})
    assert d.nodes["n0"].label == "FOREACH (max_parallel 5): select id from orders"
    assert list(d.edges()) == []  # its body runs as child instances, not drawn here
