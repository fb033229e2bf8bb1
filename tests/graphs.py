"""Graph-value builders for scheduler tests and benchmarks (nested dicts, ARCHITECTURE §1).

Leaves take an optional ``name`` (stored as ``result_name``) so tests can find
their index with :func:`idx`.
"""

from __future__ import annotations

import json
from typing import Any

from pgdurable.graph.compile import CompiledGraph

G = dict[str, Any]


def _leaf(node_type: str, query: str, name: str | None) -> G:
    g: G = {"node_type": node_type, "query": query}
    if name is not None:
        g["result_name"] = name
    return g


def sql(name: str | None = None) -> G:
    return _leaf("SQL", "select 1", name)


def brk(name: str | None = None) -> G:
    return _leaf("BREAK", json.dumps({"break_value": None}), name)


def sleep(name: str | None = None) -> G:
    return _leaf("SLEEP", "1", name)


def _named(g: G, name: str | None) -> G:
    if name is not None:
        g["result_name"] = name
    return g


def then(a: G, b: G, name: str | None = None) -> G:
    return _named({"node_type": "THEN", "left_node": a, "right_node": b}, name)


def if_(c: G, a: G, b: G, name: str | None = None) -> G:
    return _named({"node_type": "IF", "condition_node": c, "left_node": a, "right_node": b}, name)


def if_rows(a: G, b: G, name: str | None = None, result: str = "r") -> G:
    q = json.dumps({"condition_type": "result_has_rows", "result_name": result})
    return _named({"node_type": "IF", "query": q, "left_node": a, "right_node": b}, name)


def loop(body: G, cond: G | None = None, name: str | None = None) -> G:
    g: G = {"node_type": "LOOP", "left_node": body}
    if cond is not None:
        g["condition_node"] = cond
    return _named(g, name)


def join(a: G, b: G, c: G | None = None, name: str | None = None) -> G:
    g: G = {"node_type": "JOIN", "left_node": a, "right_node": b}
    if c is not None:
        g["extra_nodes"] = [c]
    return _named(g, name)


def race(a: G, b: G, name: str | None = None) -> G:
    return _named({"node_type": "RACE", "left_node": a, "right_node": b}, name)


def retry(child: G, attempts: int = 3, name: str | None = None) -> G:
    q = json.dumps(
        {
            "max_attempts": attempts,
            "initial_delay_seconds": 1,
            "backoff": 2,
            "max_delay_seconds": 60,
        }
    )
    return _named({"node_type": "RETRY", "query": q, "left_node": child}, name)


def idx(graph: CompiledGraph, name: str) -> int:
    """Index of the node whose result_name is ``name``."""
    return graph.result_names.index(name)
