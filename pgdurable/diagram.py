"""Graph pictures for ``pgdurable explain --format mermaid|dot`` (pure functions, no I/O).

Two sources become one :class:`Diagram`:

- a live instance: the rows of ``df.instance_nodes(id)`` (:func:`from_rows`); each node is
  coloured by its *inferred* status (ARCHITECTURE §4), so skipped arms read as skipped;
- a DSL expression (dry run): the graph JSON value of ARCHITECTURE §1 (:func:`from_graph`);
  ids are assigned in the same pre-order as ``df.start`` (``condition, left, right,
  extra``), prefixed ``n`` because they are not stored ids.

Edges carry the child's role: ``first``/``then`` (THEN), ``condition``/``then``/``else``
(IF), ``body``/``while`` (LOOP), ``branch k`` (JOIN, RACE).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .sanitize import visible

# Fill colours by status (mermaid classDef and dot fillcolor share them).
STATUS_COLOURS = {
    "completed": "#b7e4c7",
    "failed": "#f4a6a6",
    "running": "#ffe08a",
    "pending": "#e9ecef",
    "skipped": "#ffffff",
}
# How a node type is drawn in dot (composites stand out from the steps that do work).
DOT_SHAPES = {
    "THEN": "circle",
    "IF": "diamond",
    "LOOP": "hexagon",
    "JOIN": "trapezium",
    "RACE": "invtrapezium",
    "RETRY": "octagon",
}
# Longest label text; SQL is cut with an ellipsis so pictures stay legible.
LABEL_MAX = 60


@dataclass
class Node:
    """One node of a picture: what it is, how it is labelled and where its children are."""

    id: str
    type: str
    label: str
    status: str | None = None
    children: list[tuple[str, str]] = field(default_factory=list)  # (role, child id)


@dataclass
class Diagram:
    """A graph to draw: nodes by id (pre-order) and the root."""

    root: str
    nodes: dict[str, Node]
    title: str = ""

    def edges(self) -> Iterable[tuple[str, str, str]]:
        for node in self.nodes.values():
            for role, child in node.children:
                yield node.id, child, role


# -- labels ------------------------------------------------------------------------------


def _cfg(query: str | None) -> dict[str, Any]:
    try:
        out = json.loads(query or "")
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def _cut(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip())
    return text if len(text) <= LABEL_MAX else text[: LABEL_MAX - 1] + "…"


def label(node_type: str, query: str | None, name: str | None, n_children: int = 0) -> str:
    """The one-line label of a node (the same words as ``df.explain``); tenants' text in it
    (queries, names, URLs) shows its control characters escaped (:mod:`pgdurable.sanitize`),
    so a label is one line of the picture and sends nothing to a terminal."""
    cfg = _cfg(query)
    if node_type == "SQL":
        text = "SQL: " + _cut(query or "")
    elif node_type == "SLEEP":
        text = f"SLEEP {(query or '').strip()}s"
    elif node_type == "WAIT_SCHEDULE":
        text = f"WAIT '{cfg.get('cron_expr', '?')}'"
    elif node_type == "SIGNAL":
        text = f"SIGNAL '{cfg.get('signal_name', '?')}'"
        if cfg.get("timeout_seconds") is not None:
            text += f" (timeout {cfg['timeout_seconds']}s)"
    elif node_type in ("HTTP", "HTTP_MULTIPART"):
        text = f"HTTP {str(cfg.get('method', '?')).upper()} {_cut(str(cfg.get('url', '?')))}"
        if node_type == "HTTP_MULTIPART":
            text += " (multipart)"
    elif node_type == "BREAK":
        text = "BREAK" + (f" {cfg['break_value']}" if cfg.get("break_value") is not None else "")
    elif node_type == "LOOP":
        text = "LOOP (while)" if "condition_node" in cfg else "LOOP (infinite)"
    elif node_type == "IF":
        text = (
            "IF"
            if "condition_node" in cfg or not cfg
            else f"IF has rows: {cfg.get('result_name', '?')}"
        )
    elif node_type == "JOIN":
        text = f"JOIN ({n_children})"
    elif node_type == "RETRY":
        text = f"RETRY (up to {cfg.get('max_attempts', '?')} attempts)"
    elif node_type == "FOREACH":
        # its body runs as child instances, drawn with them, not here (docs/foreach.md)
        text = (
            f"FOREACH (max_parallel {cfg.get('max_parallel', '?')}): "
            f"{_cut(str(cfg.get('rows', '?')))}"
        )
    else:
        text = node_type
    if name:
        text += f" |=> '{name}'"
    return visible(text)


def _roles(node_type: str, n: int) -> list[str]:
    if node_type == "THEN":
        return ["first", "then"]
    if node_type == "IF":
        return ["condition", "then", "else"]
    if node_type == "LOOP":
        return ["body", "while"]
    if node_type == "RETRY":
        return ["attempt"]
    return [f"branch {k + 1}" for k in range(n)]


# -- sources -----------------------------------------------------------------------------


def from_rows(rows: Iterable[Mapping[str, Any]], root: str, title: str = "") -> Diagram:
    """From ``df.instance_nodes`` rows (mappings with its column names)."""
    nodes: dict[str, Node] = {}
    for r in rows:
        ntype = str(r["node_type"])
        cfg = _cfg(r.get("query")) if ntype in ("IF", "LOOP", "JOIN") else {}
        if ntype == "IF":
            kids = [cfg.get("condition_node"), r.get("left_node"), r.get("right_node")]
        elif ntype == "LOOP":
            kids = [r.get("left_node"), cfg.get("condition_node")]
        elif ntype == "RETRY":
            kids = [r.get("left_node")]
        else:
            kids = [r.get("left_node"), r.get("right_node"), *cfg.get("extra_nodes", [])]
        roles = _roles(ntype, len(kids))
        children = [(role, str(k)) for role, k in zip(roles, kids, strict=True) if k]
        nodes[str(r["node_id"])] = Node(
            id=str(r["node_id"]),
            type=ntype,
            label=label(ntype, r.get("query"), r.get("result_name"), len(children)),
            status=r.get("inferred_status") or r.get("status"),
            children=children,
        )
    # unreachable ids (hand-edited rows) are left out of edges rather than drawn dangling
    for node in nodes.values():
        node.children = [(role, c) for role, c in node.children if c in nodes]
    return Diagram(root=root, nodes=nodes, title=title)


def from_graph(value: str | Mapping[str, Any], title: str = "") -> Diagram:
    """From a graph JSON value (ARCHITECTURE §1); plain SQL text becomes one SQL node."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            parsed = {"node_type": "SQL", "query": value}
        value = parsed
    nodes: dict[str, Node] = {}
    # iterative pre-order (graphs may be 256 deep): (graph, id)
    counter = 0

    def new_id() -> str:
        nonlocal counter
        counter += 1
        return f"n{counter - 1}"

    root = new_id()
    stack: list[tuple[Mapping[str, Any], str]] = [(value, root)]
    while stack:
        g, gid = stack.pop()
        ntype = str(g.get("node_type", "?"))
        if ntype == "IF":
            kids = [g.get("condition_node"), g.get("left_node"), g.get("right_node")]
        elif ntype == "LOOP":
            kids = [g.get("left_node"), g.get("condition_node")]
        elif ntype == "RETRY":
            kids = [g.get("left_node")]
        else:
            kids = [g.get("left_node"), g.get("right_node"), *(g.get("extra_nodes") or [])]
        roles = _roles(ntype, len(kids))
        # ids in df.start's pre-order: condition, left, right, extra
        order = [
            g.get("condition_node"),
            g.get("left_node"),
            g.get("right_node"),
            *(g.get("extra_nodes") or []),
        ]
        ids = {id(k): new_id() for k in order if isinstance(k, Mapping)}
        children = [
            (role, ids[id(k)])
            for role, k in zip(roles, kids, strict=True)
            if isinstance(k, Mapping)
        ]
        query = g.get("query")
        if ntype in ("IF", "LOOP") and isinstance(g.get("condition_node"), Mapping):
            query = json.dumps({"condition_node": "?"})
        nodes[gid] = Node(
            id=gid,
            type=ntype,
            label=label(ntype, query, g.get("result_name"), len(children)),
            children=children,
        )
        # push in reverse pre-order so the condition is expanded first (ids are already
        # fixed; this only keeps `nodes` in pre-order)
        for k in reversed(order):
            if isinstance(k, Mapping):
                stack.append((k, ids[id(k)]))
    return Diagram(root=root, nodes=nodes, title=title)


# -- renderers ---------------------------------------------------------------------------


def _mermaid_text(text: str) -> str:
    # inside ["..."]: quotes as entity codes, and `<` so SQL never reads as an HTML tag
    return text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;")


def mermaid(d: Diagram) -> str:
    """A mermaid ``flowchart`` (top-down); statuses are classes with fill colours."""
    lines = ["flowchart TD"]
    if d.title:
        lines.insert(0, f"%% {d.title}")
    shapes = {
        "IF": ('{{"', '"}}'),
        "THEN": ('(["', '"])'),
        "LOOP": ('[["', '"]]'),
        "JOIN": ('[/"', '"\\]'),
        "RACE": ('[\\"', '"/]'),
    }
    used: set[str] = set()
    for node in d.nodes.values():
        left, right = shapes.get(node.type, ('["', '"]'))
        mark = f"{node.status}: " if node.status else ""
        line = f"    {node.id}{left}{_mermaid_text(mark + node.label)}{right}"
        if node.status in STATUS_COLOURS:
            line += f":::{node.status}"
            used.add(node.status)
        lines.append(line)
    for src, dst, role in d.edges():
        lines.append(f"    {src} -->|{_mermaid_text(role)}| {dst}")
    for status in STATUS_COLOURS:
        if status in used:
            dash = ",stroke-dasharray: 4 3" if status == "skipped" else ""
            lines.append(f"    classDef {status} fill:{STATUS_COLOURS[status]},stroke:#555{dash}")
    return "\n".join(lines)


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def dot(d: Diagram) -> str:
    """A Graphviz ``digraph``; statuses are fill colours (skipped nodes dashed)."""
    lines = [
        "digraph pgdurable {",
        "    rankdir=TB;",
        '    node [shape=box, style="rounded,filled", fillcolor="#ffffff", '
        'fontname="Helvetica", fontsize=11];',
        '    edge [fontname="Helvetica", fontsize=9];',
    ]
    if d.title:
        lines.append(f'    label="{_dot_text(d.title)}"; labelloc=t;')
    for node in d.nodes.values():
        attrs = [f'label="{_dot_text(node.label)}"']
        if node.type in DOT_SHAPES:
            attrs.append(f"shape={DOT_SHAPES[node.type]}")
            if node.type == "THEN":
                attrs[0] = 'label="→"'
                attrs.append(f'tooltip="{_dot_text(node.label)}"')
        if node.status in STATUS_COLOURS:
            attrs.append(f'fillcolor="{STATUS_COLOURS[node.status]}"')
            if node.status == "skipped":
                attrs.append('style="rounded,filled,dashed"')
        if node.status:
            attrs.append(f'xlabel="{node.status}"')
        lines.append(f'    "{node.id}" [{", ".join(attrs)}];')
    for src, dst, role in d.edges():
        lines.append(f'    "{src}" -> "{dst}" [label="{_dot_text(role)}"];')
    lines.append("}")
    return "\n".join(lines)


def to_json(d: Diagram) -> dict[str, Any]:
    """The diagram as plain data (``explain --json``)."""
    return {
        "root": d.root,
        "title": d.title,
        "nodes": [
            {
                "id": n.id,
                "type": n.type,
                "label": n.label,
                "status": n.status,
                "children": [{"role": r, "id": c} for r, c in n.children],
            }
            for n in d.nodes.values()
        ],
    }
