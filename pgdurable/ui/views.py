"""The dashboard's pages and actions (Starlette endpoints).

Pages: the runs list (``/``), a run (``/runs/<id>``), a new run (``/new``), the system
(``/system``). Actions are HTML forms POSTing here (they work without JavaScript); each
checks the CSRF token and the read-only switch (:func:`pgdurable.ui.actions.check_post`; the
actions are pgdurable/ui/actions.py), makes one ``df`` call
as the dashboard's role and redirects back to the run, a local path built from the
validated instance id (never from the request). A database error is shown on a page with
its SQLSTATE, never as a traceback.

Live pages mark a region ``<div id="live" data-poll=…>``; ``static/ui.js`` polls it with an
``X-Live: 1`` request, answered with that region alone (:func:`_page`) and an
``X-Live-Final: 1`` header once the run has finished, when polling stops.

Templates are Jinja2 with autoescaping: every value of a tenant (labels, queries, results,
errors, signal names) is escaped; the only markup passed through unescaped is the SVG that
:mod:`pgdurable.ui.svg` builds with every text escaped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import jinja2
import psycopg
from markupsafe import Markup
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from pgdurable import diagram

from . import data, svg
from .base import HERE, UiConfig

STATUSES = ("pending", "running", "completed", "failed", "cancelled")
INSTANCE_ID = re.compile(r"^[0-9a-f]{8}$")
#: Largest form body accepted (signal data is capped by the database, 10 MiB by default).
FORM_MAX_BYTES = 16 * 1024 * 1024
#: Labels' recent runs shown in a group's colour strip.
STRIP_RUNS = 40
#: Signal names offered the one-click approval.
APPROVAL = re.compile(r"approv", re.IGNORECASE)
APPROVE_DATA = '{"approved": true}'

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its name
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["utc"] = data.utc
_env.filters["duration"] = lambda ms: "" if ms is None else svg.duration_text(float(ms))
_env.globals["STATUSES"] = STATUSES


class PageError(Exception):
    """Shown to the viewer as a page with ``status``."""

    def __init__(
        self, status: int, title: str, detail: str = "", sqlstate: str | None = None
    ) -> None:
        super().__init__(title)
        self.status, self.title, self.detail, self.sqlstate = status, title, detail, sqlstate


def _config(request: Request) -> UiConfig:
    return request.app.state.config  # type: ignore[no-any-return]


def _conn(request: Request) -> Any:
    return request.app.state.pool.connection()


def _page(
    request: Request, name: str, ctx: dict[str, Any], *, status: int = 200, final: bool = False
) -> Response:
    cfg = _config(request)
    full = {
        "request": request,
        "read_only": cfg.read_only,
        "csrf": request.state.csrf,
        "role": ctx.pop("role", ""),
        "poll": None,
        "poll_min": 1000,
        "flash": None,
        "final": final,
    } | ctx
    tmpl = _env.get_template(name)
    headers = {"x-live-final": "1" if final else "0"}
    if full["poll"] and "live" in tmpl.blocks:
        # the live region, rendered once; its hash tells the poller whether it changed
        live = "".join(tmpl.blocks["live"](tmpl.new_context(full)))
        version = hashlib.sha256(live.encode()).hexdigest()[:20]
        headers["x-live-version"] = version
        if request.headers.get("x-live") == "1":
            return HTMLResponse(live, status_code=status, headers=headers)
        full |= {"live_html": Markup(live), "live_version": version}
    return HTMLResponse(tmpl.render(full), status_code=status, headers=headers)


def _db_error(exc: psycopg.Error, title: str) -> PageError:
    diag = exc.diag
    msg = diag.message_primary or str(exc).strip()
    if diag.message_detail:
        msg += f" ({diag.message_detail})"
    if diag.message_hint:
        msg += f" Hint: {diag.message_hint}"
    state = diag.sqlstate
    status = (
        404
        if state == "P0002"
        else 403
        if state == "42501"
        else 400
        if state and state[:2] in ("22", "42", "54", "P0")
        else 500
    )
    return PageError(status, title, msg, state)


# -- pages -------------------------------------------------------------------------------


def _query(request: Request, **changes: str | None) -> str:
    params = {k: v for k, v in request.query_params.items() if k != "token"}
    params.update({k: v for k, v in changes.items() if v is not None})
    for k, v in changes.items():
        if v is None:
            params.pop(k, None)
    params = {k: v for k, v in params.items() if v}
    return "?" + urlencode(params) if params else ""


async def runs_page(request: Request) -> Response:
    status = request.query_params.get("status") or None
    label = request.query_params.get("label")
    label = label if label else None
    after = request.query_params.get("after") or None
    if status is not None and status not in STATUSES:
        raise PageError(400, "unknown status", f"status must be one of {', '.join(STATUSES)}")
    async with _conn(request) as conn:
        role = await data.whoami(conn)
        try:
            page = await data.list_runs(conn, status, label, after)
        except psycopg.Error as exc:
            raise _db_error(exc, "cannot list the runs") from None
    groups: dict[str | None, list[data.Run]] = {}
    for run in page.runs:  # newest first, so groups are ordered by their newest run
        groups.setdefault(run.label, []).append(run)
    return _page(
        request,
        "runs.html",
        {
            "role": role,
            "groups": list(groups.items()),
            "status": status or "",
            "label": label or "",
            "after": after,
            "next_cursor": page.next_cursor,
            "older": _query(request, after=page.next_cursor) if page.next_cursor else None,
            "newest": _query(request, after=None) if after else None,
            "poll": request.url.path + _query(request),
            "strip": STRIP_RUNS,
            "labels": sorted({r.label for r in page.runs if r.label}),
        },
    )


def _valid_id(iid: str) -> str:
    if not INSTANCE_ID.match(iid):
        raise PageError(404, "no such run", "an instance id is 8 lowercase hex digits")
    return iid


async def run_page(request: Request) -> Response:
    iid = _valid_id(request.path_params["iid"])
    selected = request.query_params.get("node") or None
    async with _conn(request) as conn, data.snapshot(conn):
        role = await data.whoami(conn)
        run = await data.get_run(conn, iid)
        if run is None:
            raise PageError(
                404, f"run {iid} not found", f"no instance {iid} is visible to role {role}"
            )
        rows, details = await data.nodes(conn, iid)
        node = await data.node_detail(conn, iid, selected) if selected else None
        result = await data.run_result(conn, iid) if run.status == "completed" else None
        error = await data.run_error(conn, iid) if run.status == "failed" else None
        can_restart = run.status in ("failed", "cancelled") and await data.restart_available(conn)
        runs = await data.runs(conn, iid)
    graph = svg.from_rows(rows, run.root_node or "", details)
    drawn = (
        Markup(svg.graph_svg(graph, run.root_node or "", href=f"/runs/{iid}", selected=selected))
        if run.root_node and len(graph) <= svg.MAX_DRAWN
        else None
    )
    waits = []
    if not run.finished:
        for r in rows:
            st = r["inferred_status"] or r["status"]
            if r["node_type"] == "SIGNAL" and st == "running":
                cfg = _json_obj(r["query"])
                name = str(cfg.get("signal_name", ""))
                waits.append(
                    {
                        "node_id": r["node_id"],
                        "name": name,
                        "approval": bool(APPROVAL.search(name)),
                        "timeout": cfg.get("timeout_seconds"),
                    }
                )
    steps = [
        {
            "id": r["node_id"],
            "type": r["node_type"],
            "label": diagram.label(r["node_type"], r["query"], r["result_name"]),
            "status": r["inferred_status"] or r["status"],
            "details": details[r["node_id"]],
            "meta": graph[r["node_id"]].meta if r["node_id"] in graph else "",
            "queue_ms": _queue_ms(details[r["node_id"]]),
        }
        for r in rows
    ]
    flash = FLASH.get(request.query_params.get("done", ""))
    return _page(
        request,
        "run.html",
        {
            "role": role,
            "run": run,
            "graph": drawn,
            "n_nodes": len(rows),
            "steps": steps,
            "node": node,
            "node_label": diagram.label(
                node.row["node_type"], node.row["query"], node.row["result_name"]
            )
            if node
            else "",
            "node_queue_ms": _queue_ms(node.details) if node else None,
            "selected": selected,
            "result": result,
            "error": error,
            "waits": waits,
            "can_restart": can_restart,
            "runs": runs if len(runs) > 1 else [],
            "flash": flash,
            "approve_data": APPROVE_DATA,
            "poll": request.url.path + _query(request, done=None),
            "max_drawn": svg.MAX_DRAWN,
        },
        final=run.finished,
    )


FLASH = {
    "cancelled": "Cancel requested: the run stops as its steps notice.",
    "signalled": "Signal sent.",
    "restarted": "Restart requested.",
    "started": "Run started.",
}


def _json_obj(text: str | None) -> dict[str, Any]:
    try:
        out = json.loads(text or "")
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def _queue_ms(det: Mapping[str, Any]) -> float | None:
    try:
        q = datetime.fromisoformat(str(det["queued_at"]))
        s = datetime.fromisoformat(str(det["started_at"]))
    except (KeyError, ValueError, TypeError):
        return None
    ms = (s - q).total_seconds() * 1000
    return ms if ms >= 0 else None


async def download_node_result(request: Request) -> Response:
    iid = _valid_id(request.path_params["iid"])
    nid = request.path_params["nid"]
    if not INSTANCE_ID.match(nid):
        raise PageError(404, "no such node")
    async with _conn(request) as conn:
        text = await data.node_result_text(conn, iid, nid)
    if text is None:
        raise PageError(
            404,
            f"node {nid} of run {iid} has no result",
            "it has not finished, or the run is not visible to this role",
        )
    return _download(text, f"{iid}-{nid}-result.json")


async def download_run_result(request: Request) -> Response:
    iid = _valid_id(request.path_params["iid"])
    async with _conn(request) as conn:
        text = await data.run_result_text(conn, iid)
    if text is None:
        raise PageError(
            404,
            f"run {iid} has no result",
            "it has not completed, or it is not visible to this role",
        )
    return _download(text, f"{iid}-result.json")


def _download(text: str, filename: str) -> Response:
    return Response(
        text,
        media_type="application/json",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


async def system_page(request: Request) -> Response:
    async with _conn(request) as conn, data.snapshot(conn):
        role = await data.whoami(conn)
        view = await data.system(conn)
    now = datetime.now(UTC)
    return _page(
        request,
        "system.html",
        {
            "role": role,
            "view": view,
            "now": now,
            "chart": Markup(svg.completions_chart(view.per_minute)),
            "finished_last_hour": sum(sum(m.values()) for m in view.per_minute),
            "total": sum(view.counts.values()),
            # the workers' heartbeats change it every few seconds: poll less often
            "poll": request.url.path,
            "poll_min": 5000,
        },
    )


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


# -- errors ------------------------------------------------------------------------------


async def _page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    return _error_page(request, exc.status, exc.title, exc.detail, exc.sqlstate)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error_page(request, exc.status_code, str(exc.detail))


async def _pool_error(request: Request, exc: Exception) -> Response:
    return _error_page(
        request,
        503,
        "cannot reach the database",
        "the dashboard's connections to PostgreSQL are not answering; "
        "this page retries when reloaded",
    )


async def _psycopg_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, psycopg.Error)
    err = _db_error(exc, "database error")
    if isinstance(exc, psycopg.OperationalError):
        err.status = 503
    return _error_page(request, err.status, err.title, err.detail, err.sqlstate)


def _error_page(
    request: Request, status: int, title: str, detail: str = "", sqlstate: str | None = None
) -> Response:
    csrf = getattr(request.state, "csrf", "")
    request.state.csrf = csrf
    return _page(
        request,
        "error.html",
        {"title": title, "detail": detail, "sqlstate": sqlstate, "status": status},
        status=status,
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    PageError: _page_error,
    HTTPException: _http_error,
    PoolTimeout: _pool_error,
    psycopg.Error: _psycopg_error,
}
