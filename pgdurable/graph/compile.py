"""Stored graphs → :class:`CompiledGraph`, the flat integer arrays both schedulers read.

``df.start`` flattens a graph value into ``df.nodes`` rows (ARCHITECTURE.md §2);
:func:`compile_rows` turns those rows back into a tree indexed by pre-order
position from the root, with the child order ``condition_node, left_node,
right_node, extra_nodes`` — the same order ``df.start`` assigns ids in, so index
order and id order agree. :func:`compile_value` compiles a graph value
(ARCHITECTURE.md §1) directly, naming nodes ``n0``, ``n1``, … in that same
pre-order: handy for tests and benchmarks, and the two paths share one
validation (``compile_value`` flattens to rows first).

Everything is validated; a malformed graph raises :class:`ValueError` naming
the offending node. All walks are iterative: benchmark graphs nest 10,000 deep.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pgdurable.graph._abc import (
    COND_IF_ROWS,
    IF,
    JOIN,
    LEAF_TYPES,
    LOOP,
    NODE_TYPE_CODES,
    NONE,
    RACE,
    RETRY,
    THEN,
)

ROW_FIELDS = ("id", "node_type", "query", "result_name", "left_node", "right_node")
"""The ``df.nodes`` columns :func:`compile_rows` reads (tuple rows use this order)."""

_TYPE_NAMES = {code: name for name, code in NODE_TYPE_CODES.items()}


@dataclass(frozen=True)
class CompiledGraph:
    """One instance's graph as parallel tuples indexed by pre-order position (root = 0).

    Child links hold indices or :data:`~pgdurable.graph._abc.NONE`; ``cond`` may also
    be :data:`~pgdurable.graph._abc.COND_IF_ROWS`. Because indices are pre-order, a
    child's index is always greater than its parent's and the subtree of node ``i``
    is exactly ``range(i, end[i])``.
    """

    node_ids: tuple[str, ...]
    """The ``df.nodes.id`` of each node."""
    types: tuple[int, ...]
    """Node type codes (``_abc.SQL`` …)."""
    left: tuple[int, ...]
    """THEN first, IF then-arm, LOOP body, JOIN/RACE first branch."""
    right: tuple[int, ...]
    """THEN second, IF else-arm, JOIN/RACE second branch."""
    cond: tuple[int, ...]
    """IF/LOOP condition node, NONE, or COND_IF_ROWS for an IF built by ``df.if_rows``."""
    extra: tuple[int, ...]
    """JOIN3 third branch, else NONE."""
    parent: tuple[int, ...]
    """Parent index, NONE for the root."""
    result_names: tuple[str | None, ...]
    """``df.as`` names."""
    end: tuple[int, ...]
    """One past the last index of each node's subtree (derived; see the class docstring)."""
    attempts: tuple[int, ...]
    """RETRY: max_attempts (≥ 1, from its config); every other node: 0."""

    def __len__(self) -> int:
        return len(self.types)


def _label(node_id: str, node_type: str | None = None) -> str:
    return f"node {node_id!r}" if node_type is None else f"node {node_id!r} ({node_type})"


def _query_object(node_id: str, node_type: str, query: Any) -> dict[str, Any] | None:
    """The JSON object stored in a composite's ``query`` (NULL → None)."""
    if query is None:
        return None
    if isinstance(query, str):
        try:
            query = json.loads(query)
        except ValueError:
            raise ValueError(f"{_label(node_id, node_type)}: query is not valid JSON") from None
        except RecursionError:
            # valid JSON nested deeper than Python parses (df.start refuses such configs)
            raise ValueError(f"{_label(node_id, node_type)}: query nests too deeply") from None
    if not isinstance(query, dict):
        raise ValueError(f"{_label(node_id, node_type)}: query is not a JSON object")
    return query


def _as_row(row: Mapping[str, Any] | Sequence[Any]) -> tuple[Any, ...]:
    if isinstance(row, Mapping):
        try:
            return tuple(row[k] for k in ROW_FIELDS)
        except KeyError as exc:
            raise ValueError(f"row {row!r} lacks column {exc.args[0]!r}") from None
    if len(row) < len(ROW_FIELDS):
        raise ValueError(f"row {tuple(row)!r} has fewer than {len(ROW_FIELDS)} columns")
    return tuple(row[: len(ROW_FIELDS)])


def _children(
    node_id: str, type_name: str, code: int, query: Any, left: str | None, right: str | None
) -> tuple[str | None, str | None, str | None, str | None, bool]:
    """(condition, left, right, extra, if_rows) child ids of one row, with shape checks."""
    label = _label(node_id, type_name)
    cond_id: str | None = None
    extra_id: str | None = None
    if_rows = False
    if code in LEAF_TYPES:
        if left is not None or right is not None:
            raise ValueError(f"{label}: a leaf must have no left_node/right_node")
        return None, None, None, None, False
    if left is None:
        raise ValueError(f"{label}: left_node is missing")
    if code in (LOOP, RETRY):
        if right is not None:
            raise ValueError(f"{label}: a {type_name} has no right_node")
    elif right is None:
        raise ValueError(f"{label}: right_node is missing")
    obj = _query_object(node_id, type_name, query) if code in (IF, LOOP, JOIN) else None
    if code in (THEN, RACE) and query is not None:
        raise ValueError(f"{label}: query must be NULL")
    if code == IF:
        if obj is None:
            raise ValueError(f"{label}: query must name a condition_node or be an if_rows config")
        if obj.get("condition_type") == "result_has_rows":
            if_rows = True
        elif isinstance(obj.get("condition_node"), str):
            cond_id = obj["condition_node"]
        else:
            raise ValueError(f"{label}: query must name a condition_node or be an if_rows config")
    elif code == LOOP and obj is not None:
        if not isinstance(obj.get("condition_node"), str):
            raise ValueError(f'{label}: query must be NULL or {{"condition_node": id}}')
        cond_id = obj["condition_node"]
    elif code == JOIN and obj is not None:
        extras = obj.get("extra_nodes")
        if not (isinstance(extras, list) and len(extras) == 1 and isinstance(extras[0], str)):
            raise ValueError(f"{label}: extra_nodes must be a list of exactly one node id")
        extra_id = extras[0]
    return cond_id, left, right, extra_id, if_rows


RETRY_MAX_ATTEMPTS = 2**31 - 1
"""df.retry's max_attempts is an integer: at most this."""


def _max_attempts(node_id: str, query: Any) -> int:
    """A RETRY's max_attempts, from its config (the rest of it is the worker's: delays)."""
    label = _label(node_id, "RETRY")
    obj = _query_object(node_id, "RETRY", query)
    n = None if obj is None else obj.get("max_attempts")
    if type(n) is not int or not 1 <= n <= RETRY_MAX_ATTEMPTS:
        raise ValueError(
            f"{label}: query must be a retry config with max_attempts a whole number "
            f"from 1 to {RETRY_MAX_ATTEMPTS}, got {n!r}"
        )
    return n


def compile_rows(rows: Iterable[Mapping[str, Any] | Sequence[Any]], root_id: str) -> CompiledGraph:
    """Compile ``df.nodes`` rows (dicts, or tuples in :data:`ROW_FIELDS` order).

    Raises ValueError naming the node for an unknown type or child id, a wrong
    child count, a malformed composite ``query``, a cycle, a node with two
    parents, or a row not reachable from ``root_id``.
    """
    by_id: dict[str, tuple[Any, ...]] = {}
    for raw in rows:
        row = _as_row(raw)
        node_id = row[0]
        if not isinstance(node_id, str):
            raise ValueError(f"row {row!r}: id must be a string")
        if node_id in by_id:
            raise ValueError(f"{_label(node_id)}: duplicate id")
        by_id[node_id] = row
    if root_id not in by_id:
        raise ValueError(f"root {root_id!r} is not a node of this graph")

    ids: list[str] = []
    types: list[int] = []
    names: list[str | None] = []
    attempts: list[int] = []
    parent: list[int] = []
    # child ids per index, resolved to indices once every node has one
    kids: list[tuple[str | None, str | None, str | None, str | None, bool]] = []
    index: dict[str, int] = {}
    # explicit DFS stack of (node id, parent index); children are pushed in reverse
    # so they pop in condition, left, right, extra order: indices come out pre-order
    stack: list[tuple[str, int]] = [(root_id, NONE)]
    while stack:
        node_id, par = stack.pop()
        if node_id not in by_id:
            owner = ids[par]
            raise ValueError(
                f"{_label(owner, _TYPE_NAMES[types[par]])}: child {node_id!r} "
                "is not a node of this graph"
            )
        if node_id in index:
            # reached twice: either one of its own descendants points back at it, or
            # two parents share it; both break the tree the scheduler relies on
            anc = par
            while anc != NONE and ids[anc] != node_id:
                anc = parent[anc]
            what = "cycle through" if anc != NONE else "second parent for"
            raise ValueError(f"{what} {_label(node_id)} (from {ids[par]!r})")
        _, type_name, query, result_name, left, right = by_id[node_id]
        code = NODE_TYPE_CODES.get(type_name) if isinstance(type_name, str) else None
        if code is None:
            raise ValueError(f"{_label(node_id)}: unknown node_type {type_name!r}")
        child = _children(node_id, type_name, code, query, left, right)
        index[node_id] = len(ids)
        ids.append(node_id)
        types.append(code)
        names.append(result_name)
        attempts.append(_max_attempts(node_id, query) if code == RETRY else 0)
        parent.append(par)
        kids.append(child)
        me = index[node_id]
        for cid in reversed(child[:4]):
            if cid is not None:
                stack.append((cid, me))

    if len(ids) != len(by_id):
        stray = sorted(set(by_id) - set(index))[0]
        raise ValueError(f"{_label(stray)} is not reachable from root {root_id!r}")

    def at(cid: str | None) -> int:
        return NONE if cid is None else index[cid]

    n = len(ids)
    end = list(range(1, n + 1))
    for i in range(n - 1, 0, -1):  # children first: a parent's range covers its children's
        p = parent[i]
        if end[i] > end[p]:
            end[p] = end[i]
    return CompiledGraph(
        node_ids=tuple(ids),
        types=tuple(types),
        left=tuple(at(k[1]) for k in kids),
        right=tuple(at(k[2]) for k in kids),
        cond=tuple(COND_IF_ROWS if k[4] else at(k[0]) for k in kids),
        extra=tuple(at(k[3]) for k in kids),
        parent=tuple(parent),
        result_names=tuple(names),
        end=tuple(end),
        attempts=tuple(attempts),
    )


def compile_value(graph_json: str | Mapping[str, Any]) -> CompiledGraph:
    """Compile a nested graph value (ARCHITECTURE.md §1), naming nodes ``n0``, ``n1``, …

    The value is flattened exactly as ``df.start`` stores it, then handed to
    :func:`compile_rows`, so both entry points accept and reject the same graphs.
    """
    rows: list[dict[str, Any]] = []
    # stack of (graph object, slot to receive its id); pre-order like compile_rows
    stack: list[tuple[Any, tuple[dict[str, Any], str] | None]] = [(graph_json, None)]
    while stack:
        obj, slot = stack.pop()
        where = "graph" if slot is None else f"{slot[1]} of node {slot[0]['id']!r}"
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except ValueError:
                raise ValueError(f"{where}: not valid JSON") from None
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: a graph value must be a JSON object")
        if obj.get("_partial_if"):
            raise ValueError(f"{where}: a partial IF (?> without !>) is not a graph")
        node_id = f"n{len(rows)}"
        row: dict[str, Any] = {
            "id": node_id,
            "node_type": obj.get("node_type"),
            "query": obj.get("query"),
            "result_name": obj.get("result_name"),
            "left_node": None,
            "right_node": None,
        }
        rows.append(row)
        if slot is not None:
            target, key = slot
            if key == "condition_node":
                target["query"] = json.dumps({"condition_node": node_id})
            elif key == "extra_nodes":
                target["query"] = json.dumps({"extra_nodes": [node_id]})
            else:
                target[key] = node_id
        extras = obj.get("extra_nodes")
        if extras is not None and not (isinstance(extras, list) and len(extras) == 1):
            raise ValueError(f"{_label(node_id)}: extra_nodes must hold exactly one graph")
        children = [
            ("condition_node", obj.get("condition_node")),
            ("left_node", obj.get("left_node")),
            ("right_node", obj.get("right_node")),
            ("extra_nodes", extras[0] if extras else None),
        ]
        for key, child in reversed(children):
            if child is not None:
                stack.append((child, (row, key)))
    return compile_rows(rows, "n0")
