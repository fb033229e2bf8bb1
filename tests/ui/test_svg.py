"""The dashboard's server-rendered SVG (pgdurable/ui/svg.py): pure functions, no database.

The rows are shaped like ``df.instance_nodes``' (ids, types, left/right, the IF/LOOP/JOIN
config in ``query``), built here from small specs, so the layout's rules can be checked on
graphs no test workflow would reach: 1,500 steps in one chain, frames nested 300 deep.
"""

from __future__ import annotations

import itertools
import json
import sys
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from pgdurable.ui import svg

NS = {"s": "http://www.w3.org/2000/svg"}
HOSTILE = "<script>alert(1)</script> \" ' & </svg><g onload=x>"


class Rows:
    """Builds df.instance_nodes-shaped rows from nested specs:
    ``("SQL", "select 1")``, ``("THEN", a, b)``, ``("JOIN", a, b[, c])``, ``("RACE", a, b)``,
    ``("IF", cond, then, else)``, ``("LOOP", body[, cond])``."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.ids = (f"{n:08x}" for n in itertools.count(1))
        self.status: dict[str, str] = {}

    def add(self, spec: tuple[Any, ...], status: str = "completed") -> str:
        nid = next(self.ids)
        kind, *args = spec
        row: dict[str, Any] = {
            "node_id": nid,
            "node_type": kind,
            "query": None,
            "result_name": None,
            "left_node": None,
            "right_node": None,
            "status": status,
            "inferred_status": status,
        }
        self.rows.append(row)
        if kind in ("SQL", "SLEEP", "SIGNAL"):
            row["query"] = args[0]
        elif kind == "IF":
            row["query"] = json.dumps({"condition_node": self.add(args[0], status)})
            row["left_node"], row["right_node"] = self.add(args[1]), self.add(args[2], "skipped")
        elif kind == "LOOP":
            row["left_node"] = self.add(args[0])
            if len(args) > 1:
                row["query"] = json.dumps({"condition_node": self.add(args[1])})
        else:
            row["left_node"], row["right_node"] = self.add(args[0]), self.add(args[1])
            if len(args) > 2:
                row["query"] = json.dumps({"extra_nodes": [self.add(args[2])]})
        return nid

    def draw(
        self,
        spec: tuple[Any, ...],
        selected: str | None = None,
        details: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[str, ET.Element]:
        root = self.add(spec)
        nodes = svg.from_rows(self.rows, root, details or {})
        out = svg.graph_svg(nodes, root, href="/runs/0000abcd", selected=selected)
        return out, ET.fromstring(out)


def _groups(tree: ET.Element) -> list[ET.Element]:
    return tree.findall(".//s:g[@data-node]", NS)


def test_every_node_is_drawn_once_with_its_status_and_type() -> None:
    r = Rows()
    spec = (
        "THEN",
        ("SQL", "select 1"),
        (
            "THEN",
            ("JOIN", ("SQL", "a"), ("SQL", "b"), ("SQL", "c")),
            (
                "THEN",
                ("IF", ("SQL", "select true"), ("SQL", "yes"), ("SQL", "no")),
                ("LOOP", ("RACE", ("SQL", "x"), ("SLEEP", "5")), ("SQL", "select false")),
            ),
        ),
    )
    _, tree = r.draw(spec)
    groups = _groups(tree)
    assert sorted(g.get("data-node") for g in groups) == sorted(x["node_id"] for x in r.rows)
    by_id = {x["node_id"]: x for x in r.rows}
    for g in groups:
        row = by_id[g.get("data-node")]
        classes = g.get("class", "").split()
        assert f"st-{row['inferred_status']}" in classes
        assert f"t-{row['node_type']}" in classes
        assert g.get("data-status") == row["inferred_status"]
        shape = "circle" if row["node_type"] == "THEN" else "rect"
        assert g.find(f"s:{shape}", NS) is not None, row
    # every node links to its own panel on the run page
    links = tree.findall(".//s:a", NS)
    assert sorted(a.get("href") for a in links) == sorted(
        f"/runs/0000abcd?node={x['node_id']}#node" for x in r.rows
    )


def _leaf_boxes(tree: ET.Element) -> list[tuple[float, float, float, float]]:
    out = []
    for g in _groups(tree):
        if "leaf" in g.get("class", "").split():
            rect = g.find("s:rect", NS)
            assert rect is not None
            out.append(tuple(float(rect.get(k, "0")) for k in ("x", "y", "width", "height")))
    return out  # type: ignore[return-value]


def test_leaf_boxes_never_overlap_and_stay_inside_the_picture() -> None:
    r = Rows()
    spec = (
        "JOIN",
        ("THEN", ("SQL", "1"), ("RACE", ("SQL", "2"), ("THEN", ("SQL", "3"), ("SQL", "4")))),
        (
            "IF",
            ("JOIN", ("SQL", "c1"), ("SQL", "c2")),
            ("SQL", "t"),
            ("LOOP", ("THEN", ("SQL", "b1"), ("SQL", "b2")), ("SQL", "w")),
        ),
        ("SQL", "last"),
    )
    out, tree = r.draw(spec)
    boxes = _leaf_boxes(tree)
    assert len(boxes) == sum(1 for x in r.rows if x["node_type"] in ("SQL", "SLEEP"))
    for (x1, y1, w1, h1), (x2, y2, w2, h2) in itertools.combinations(boxes, 2):
        assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1, (
            (x1, y1),
            (x2, y2),
        )
    width, height = float(tree.get("width", 0)), float(tree.get("height", 0))
    for x, y, w, h in boxes:
        assert min(x, y) >= 0
        assert x + w <= width
        assert y + h <= height
    frames = [g for g in _groups(tree) if "frame" in g.get("class", "").split()]
    assert {g.get("data-type") for g in frames} == {"JOIN", "RACE", "IF", "LOOP"}
    assert out.count('class="role role-then"') == 1
    assert out.count('class="role role-while"') == 1


def test_tenant_text_is_escaped_everywhere() -> None:
    r = Rows()
    out, tree = r.draw(
        (
            "THEN",
            ("SQL", HOSTILE),
            ("SIGNAL", json.dumps({"signal_name": HOSTILE, "timeout_seconds": None})),
        )
    )
    assert "<script>" not in out
    assert "onload" not in "".join(e.tag for e in tree.iter())
    assert all(
        e.tag.split("}")[1] in ("svg", "a", "g", "title", "rect", "circle", "text", "path")
        for e in tree.iter()
    )
    texts = " ".join("".join(e.itertext()) for e in tree.iter(f"{{{NS['s']}}}title"))
    assert "<script>alert(1)</script>" in texts  # shown as text, whole, in the tooltip


def test_the_selected_node_and_the_race_winner_are_marked() -> None:
    r = Rows()
    root_spec = ("RACE", ("SQL", "fast"), ("SLEEP", "60"))
    rows_before = len(r.rows)
    root = r.add(root_spec)
    winner = r.rows[rows_before + 1]["node_id"]
    details = {root: {"winner": winner, "duration_ms": 12}}
    nodes = svg.from_rows(r.rows, root, details)
    tree = ET.fromstring(svg.graph_svg(nodes, root, href="/runs/x", selected=winner))
    won = [g for g in _groups(tree) if "winner" in g.get("class", "").split()]
    assert [g.get("data-node") for g in won] == [winner]
    assert "selected" in won[0].get("class", "").split()
    head = tree.find(".//s:text[@class='n-head']", NS)
    assert head is not None
    assert head.text == f"RACE · 12 ms · winner {winner}"


def test_a_long_chain_and_deep_nesting_render_without_recursion() -> None:
    r = Rows()
    spec: tuple[Any, ...] = ("SQL", "step 0")
    for k in range(1, 750):
        spec = ("THEN", spec, ("SQL", f"step {k}"))
    _, tree = r.draw(spec)
    assert len(_groups(tree)) == 1499
    boxes = _leaf_boxes(tree)
    assert len({x for x, _, _, _ in boxes}) == 1  # one column
    assert sorted(y for _, y, _, _ in boxes) == [y for _, y, _, _ in boxes]  # in order
    deep = Rows()
    spec = ("SQL", "inner")
    for _ in range(300):
        spec = ("JOIN", spec, ("SQL", "x"))
    limit = sys.getrecursionlimit()
    _, tree = deep.draw(spec)
    assert sys.getrecursionlimit() == limit
    assert len(_groups(tree)) == len(deep.rows)


def test_node_meta_says_what_the_details_say() -> None:
    assert svg.node_meta("SQL", "completed", {"duration_ms": 1500}) == "1.5 s"
    assert (
        svg.node_meta("SQL", "running", {"started_at": "2026-01-02T03:04:05+00:00"})
        == "since 03:04:05 UTC"
    )
    assert svg.node_meta("LOOP", "running", {"iteration": 7}) == "iteration 7"
    assert (
        svg.node_meta("IF", "completed", {"branch": "else", "duration_ms": 3}) == "3 ms · took else"
    )
    assert svg.node_meta("SQL", "pending", {}) == ""


def test_completions_chart_stacks_statuses_per_minute() -> None:
    per = [{} for _ in range(60)]
    per[0] = {"completed": 4, "failed": 1}
    per[59] = {"cancelled": 2}
    tree = ET.fromstring(svg.completions_chart(per))
    bars = tree.findall(".//s:rect", NS)
    assert sorted(b.get("class") for b in bars) == [
        "bar st-cancelled",
        "bar st-completed",
        "bar st-failed",
    ]
    heights = {b.get("class"): float(b.get("height", 0)) for b in bars}
    assert heights["bar st-completed"] == pytest.approx(4 * heights["bar st-failed"])
    xs = {b.get("class"): float(b.get("x", 0)) for b in bars}
    assert xs["bar st-cancelled"] < xs["bar st-completed"]  # an hour ago is on the left
    assert "5" in [t.text for t in tree.findall(".//s:text", NS)]  # the peak
