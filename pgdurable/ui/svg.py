"""Server-rendered SVG for the dashboard: a run's graph and the completions chart.

Pure functions, no I/O. Every piece of tenants' text (labels, queries, result names) is
passed through :func:`html.escape` here, where the markup is built: the strings returned are
safe to insert into a page as they are (the templates mark them safe).

The graph is the tree :func:`pgdurable.diagram.from_rows` builds from ``df.instance_nodes``
(``left_node``/``right_node`` plus the ``condition_node`` of an IF or LOOP and the
``extra_nodes`` of a JOIN, read from the node's ``query`` JSON, ARCHITECTURE §2), laid out
as a nested flow chart (:func:`graph_svg`), top to bottom:

- a chain of THENs (``a ~> b ~> c``, nested either way) is one column: its steps one below
  the other, each THEN a small circle on the arrow between its two sides;
- JOIN and RACE are frames with their branches side by side (a RACE's winner marked);
- IF is a frame with its condition on top and the two arms side by side below it;
- LOOP is a frame with its body (and its ``while`` condition under it);
- every other node is a box: its type and status, its query or config, its duration.

Every node, composite or not, is one ``<g class="node st-<status> t-<type>">`` inside a link
to ``?node=<id>``. Sizes are computed bottom-up and positions top-down; chains are walked
iteratively, and frames nested deeper than :data:`MAX_NESTING` (a stored graph has at most
257 levels) are drawn as boxes, so no graph can exhaust the stack.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgdurable import diagram

__all__ = ["COMPOSITES", "MAX_DRAWN", "GraphNode", "completions_chart", "graph_svg"]

#: Node types that only arrange others: drawn as frames (THEN: as a circle on an arrow).
COMPOSITES = frozenset({"THEN", "IF", "LOOP", "JOIN", "RACE", "RETRY"})
#: More nodes than this are not drawn (the page's step table still lists them all).
MAX_DRAWN = 1500
#: Frames nested deeper than this are drawn as boxes.
MAX_NESTING = 300

# geometry (px)
LEAF_W, LEAF_H = 176, 50
ARROW_H = 30  # between two steps of a chain (the THEN circle sits on it)
THEN_R = 6
PAD = 10  # inside a frame
HEAD_H = 20  # a frame's title line
GAP_W = 14  # between branches side by side
ROLE_H = 14  # a role label above a branch (then / else / while / winner)
MARGIN = 12  # around the picture
LABEL_CHARS = 27  # characters of a label that fit a box


@dataclass
class GraphNode:
    """One node to draw: what :mod:`pgdurable.diagram` knows plus the run's details."""

    id: str
    type: str
    label: str
    status: str
    children: list[tuple[str, str]] = field(default_factory=list)  # (role, child id)
    meta: str = ""  # one short line: duration, iteration, winner, …
    winner: bool = False  # the branch that won its RACE
    abandoned: bool = False


def _cut(text: str, n: int = LABEL_CHARS) -> str:
    text = re.sub(r"\s+", " ", text.strip())
    return text if len(text) <= n else text[: n - 1] + "…"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class _Block:
    """A laid-out subtree: its size, and how to draw it with its top-left corner at x, y."""

    w: float
    h: float
    draw: Callable[[float, float], None]


class _Drawing:
    def __init__(self, nodes: Mapping[str, GraphNode], href: str, selected: str | None):
        self.nodes = nodes
        self.href = href
        self.selected = selected
        self.out: list[str] = []
        self.seen: set[str] = set()

    # -- pieces ----------------------------------------------------------------------

    def _open(self, n: GraphNode, extra: str = "") -> None:
        cls = [
            "node",
            f"st-{n.status}",
            f"t-{n.type}",
            "composite" if n.type in COMPOSITES else "leaf",
            *extra.split(),
        ]
        if n.winner:
            cls.append("winner")
        if n.abandoned:
            cls.append("abandoned")
        if n.id == self.selected:
            cls.append("selected")
        tip = f"{n.id} {n.type} ({n.status})\n{n.label}" + (f"\n{n.meta}" if n.meta else "")
        self.out.append(
            f'<a class="node-link" href="{_e(self.href)}?node={_e(n.id)}#node">'
            f'<g class="{_e(" ".join(cls))}" data-node="{_e(n.id)}" '
            f'data-status="{_e(n.status)}" data-type="{_e(n.type)}">'
            f"<title>{_e(tip)}</title>"
        )

    def _text(self, cls: str, x: float, y: float, text: str, anchor: str = "middle") -> None:
        self.out.append(
            f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{_e(text)}</text>'
        )

    def _arrow(self, x: float, y1: float, y2: float) -> None:
        self.out.append(
            f'<path class="edge" d="M{x:.1f},{y1:.1f} V{y2 - 4:.1f}"/>'
            f'<path class="arrow" d="M{x - 4:.1f},{y2 - 6:.1f} L{x:.1f},{y2:.1f} '
            f'L{x + 4:.1f},{y2 - 6:.1f} Z"/>'
        )

    # -- blocks ----------------------------------------------------------------------

    def block(self, nid: str, depth: int = 0) -> _Block:
        n = self.nodes[nid]
        self.seen.add(nid)
        kids = [(r, c) for r, c in n.children if c in self.nodes and c not in self.seen]
        if not kids or depth > MAX_NESTING:
            return self.leaf(n)
        if n.type == "THEN" and len(kids) == 2:
            return self.chain(nid, depth)
        blocks = [(self._role(n, role, c), self.block(c, depth + 1)) for role, c in kids]
        if n.type == "IF" and kids[0][0] == "condition":
            return self.frame(n, [blocks[0]], blocks[1:])
        if n.type == "LOOP":
            return self.frame(n, *[[b] for b in blocks])
        return self.frame(n, blocks)

    def _role(self, n: GraphNode, role: str, child: str) -> str:
        """The label above a branch: an IF's arm, a LOOP's while, a RACE's winner."""
        if n.type == "IF" and role in ("then", "else"):
            return role
        if n.type == "LOOP" and role == "while":
            return role
        if n.type == "RACE" and self.nodes[child].winner:
            return "winner"
        return ""

    def leaf(self, n: GraphNode) -> _Block:
        def draw(x: float, y: float) -> None:
            self._open(n)
            self.out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{LEAF_W}" height="{LEAF_H}" rx="6"/>'
            )
            cx = x + LEAF_W / 2
            label = n.label.split(": ", 1)[1] if n.label.startswith("SQL: ") else n.label
            self._text("n-type", cx, y + 14, f"{n.type} · {n.status}")
            self._text("n-label", cx, y + 29, _cut(label))
            if n.meta:
                self._text("n-meta", cx, y + 43, _cut(n.meta, 34))
            self.out.append("</g></a>")

        return _Block(LEAF_W, LEAF_H, draw)

    def chain(self, nid: str, depth: int) -> _Block:
        """A THEN chain, flattened: [block, THEN id, block, THEN id, block, …]."""
        items: list[_Block | str] = []
        stack: list[tuple[str, bool]] = [(nid, False)]  # (id, is the THEN's own circle)
        while stack:
            x, circle = stack.pop()
            n = self.nodes[x]
            kids = [c for _, c in n.children if c in self.nodes and c not in self.seen]
            if circle:
                items.append(x)
            elif n.type == "THEN" and len(kids) == 2:
                self.seen.add(x)
                stack += [(kids[1], False), (x, True), (kids[0], False)]
            else:
                items.append(self.block(x, depth + 1))
        blocks = [b for b in items if isinstance(b, _Block)]
        w = max(b.w for b in blocks)
        h = sum(b.h for b in blocks) + ARROW_H * (len(blocks) - 1)

        def draw(x: float, y: float) -> None:
            cx = x + w / 2
            top = y
            pending: list[str] = []
            for item in items:
                if isinstance(item, str):
                    pending.append(item)
                    continue
                if top > y:  # the arrow from the previous step, with its THEN circle(s)
                    self._arrow(cx, top - ARROW_H, top)
                    for k, tid in enumerate(pending):
                        cy = top - ARROW_H / 2 - (len(pending) - 1 - 2 * k) * (THEN_R + 1)
                        self._open(self.nodes[tid], "then")
                        self.out.append(
                            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{THEN_R}"/></g></a>'
                        )
                    pending = []
                item.draw(x + (w - item.w) / 2, top)
                top += item.h + ARROW_H

        return _Block(w, h, draw)

    def frame(self, n: GraphNode, *rows: list[tuple[str, _Block]]) -> _Block:
        """A composite's frame: its title, then rows of blocks side by side (each with its
        label above it, if any), a fork of arrows from one row to the next."""
        label_h = [ROLE_H if any(lab for lab, _ in row) else 0 for row in rows]
        widths = [sum(b.w for _, b in row) + GAP_W * (len(row) - 1) for row in rows]
        heights = [max(b.h for _, b in row) + lh for row, lh in zip(rows, label_h, strict=True)]
        w = max(max(widths) + 2 * PAD, 2 * PAD + 90)
        h = HEAD_H + sum(heights) + ARROW_H * (len(rows) - 1) + PAD

        def draw(x: float, y: float) -> None:
            self._open(n, "frame")
            self.out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="10"/>'
            )
            title = n.type + (f" · {n.meta}" if n.meta else "")
            self._text("n-head", x + PAD, y + 14, _cut(title, int(w / 7)), anchor="start")
            self.out.append("</g></a>")
            top = y + HEAD_H
            prev: list[float] = []
            for row, rw, rh, lh in zip(rows, widths, heights, label_h, strict=True):
                left = x + (w - rw) / 2
                centres = []
                for lab, b in row:
                    centres.append(left + b.w / 2)
                    if lab:
                        self._text(f"role role-{lab}", left + b.w / 2, top + 10, lab)
                    b.draw(left, top + lh)
                    left += b.w + GAP_W
                for c in centres if prev else []:  # a fork from the row above
                    self.out.append(
                        f'<path class="edge" d="M{prev[0]:.1f},'
                        f"{top - ARROW_H:.1f} C{prev[0]:.1f},{top - 8:.1f} "
                        f'{c:.1f},{top - ARROW_H + 8:.1f} {c:.1f},{top:.1f}"/>'
                    )
                prev = centres
                top += rh + ARROW_H

        return _Block(w, h, draw)


def graph_svg(
    nodes: Mapping[str, GraphNode], root: str, *, href: str, selected: str | None = None
) -> str:
    """The run's graph as an ``<svg>`` element (module doc). ``href`` is the run page's
    path; each node links to ``href?node=<id>``."""
    d = _Drawing(nodes, href, selected)
    if root not in nodes:
        return ""
    top = d.block(root)
    width, height = top.w + 2 * MARGIN, top.h + 2 * MARGIN
    top.draw(MARGIN, MARGIN)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" role="img" '
        f'aria-label="the run\'s graph" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}">' + "".join(d.out) + "</svg>"
    )


def from_rows(
    rows: Sequence[Mapping[str, Any]], root: str, details: Mapping[str, Mapping[str, Any]]
) -> dict[str, GraphNode]:
    """GraphNodes from ``df.instance_nodes`` rows (mappings with its column names) and each
    node's parsed ``status_details`` (``details``)."""
    d = diagram.from_rows(rows, root)
    winners = {str(det.get("winner")) for det in details.values() if det.get("winner")}
    out: dict[str, GraphNode] = {}
    for nid, node in d.nodes.items():
        det = details.get(nid, {})
        status = str(node.status or "pending")
        out[nid] = GraphNode(
            id=nid,
            type=node.type,
            label=node.label,
            status=status,
            children=node.children,
            meta=node_meta(node.type, status, det),
            winner=nid in winners,
            abandoned=bool(det.get("abandoned")),
        )
    return out


def duration_text(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.0f} ms"
    s = ms / 1000
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def node_meta(node_type: str, status: str, det: Mapping[str, Any]) -> str:
    """One line of what the details say: duration (or, running, since when), loop
    iteration, RACE winner, IF arm. Nothing that changes by itself between two reads (the
    page's live updates compare it)."""
    parts = []
    ms = det.get("duration_ms")
    started = _when(det.get("started_at"))
    if isinstance(ms, int | float) and not isinstance(ms, bool):
        parts.append(duration_text(float(ms)))
    elif status == "running" and started is not None:
        parts.append(f"since {started.astimezone(UTC):%H:%M:%S} UTC")
    if node_type == "LOOP" and isinstance(det.get("iteration"), int):
        parts.append(f"iteration {det['iteration']}")
    if node_type == "RETRY" and isinstance(det.get("attempt"), int):
        parts.append(f"attempt {det['attempt']}/{det.get('max_attempts', '?')}")
    if node_type == "RACE" and det.get("winner"):
        parts.append(f"winner {det['winner']}")
    if node_type == "IF" and det.get("branch") in ("then", "else"):
        parts.append(f"took {det['branch']}")
    return " · ".join(parts)


def completions_chart(per_minute: Sequence[Mapping[str, int]], *, minutes: int = 60) -> str:
    """A bar chart of instances finished per minute over the last ``minutes`` minutes,
    stacked by status (completed, failed, cancelled). ``per_minute[k]`` counts the minute
    ``k`` minutes before the current one (index 0 = the current minute)."""
    w, h, left, bottom, top = 720, 200, 40, 24, 12
    plot_w, plot_h = w - left - 8, h - bottom - top
    peak = max([sum(b.values()) for b in per_minute] + [1])
    bar_w = plot_w / minutes
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'aria-label="instances finished per minute, last hour" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}">',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{w - 8}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
        f'<text class="tick" x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>',
        f'<text class="tick" x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for k in range(minutes):
        counts = per_minute[k] if k < len(per_minute) else {}
        x = left + (minutes - 1 - k) * bar_w
        y = float(top + plot_h)
        for status in ("completed", "failed", "cancelled"):
            n = int(counts.get(status, 0))
            if not n:
                continue
            bh = plot_h * n / peak
            y -= bh
            out.append(
                f'<rect class="bar st-{status}" x="{x + 1:.1f}" y="{y:.1f}" '
                f'width="{max(bar_w - 2, 1):.1f}" height="{bh:.1f}">'
                f"<title>{n} {status}, {k} min ago</title></rect>"
            )
    for k, text in ((minutes - 1, f"-{minutes - 1} min"), (30, "-30 min"), (0, "now")):
        x = left + (minutes - 1 - k) * bar_w + bar_w / 2
        out.append(f'<text class="tick" x="{x:.1f}" y="{h - 6}" text-anchor="middle">{text}</text>')
    out.append("</svg>")
    return "".join(out)
