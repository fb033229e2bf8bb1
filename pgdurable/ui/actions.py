"""The dashboard's actions: cancel, signal, restart and start a run (HTML forms POSTing here).

Each action checks the read-only switch, the CSRF token and the Origin (:func:`check_post`),
makes one ``df`` call as the dashboard's role and redirects back to the run, a local path
built from the validated instance id (never from the request). The pages are
pgdurable/ui/views.py.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs, urlsplit

import psycopg
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from . import data
from .base import CSRF_COOKIE
from .views import (
    APPROVE_DATA,
    FORM_MAX_BYTES,
    INSTANCE_ID,
    PageError,
    _config,
    _conn,
    _db_error,
    _page,
    _valid_id,
)

# -- the actions -----------------------------------------------------------------------------


async def check_post(request: Request) -> dict[str, str]:
    """The form of an action POST, after the read-only, CSRF and Origin checks."""
    if _config(request).read_only:
        raise PageError(
            403,
            "this dashboard is read-only",
            "it was started with --read-only: it shows runs and changes nothing",
        )
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc.lower() != host.lower():
            raise PageError(
                403, "cross-origin form refused", "this form was sent from another site"
            )
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise PageError(
            415, "unsupported form encoding", "actions take application/x-www-form-urlencoded forms"
        )
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX_BYTES:
            raise PageError(413, "form too large", f"at most {FORM_MAX_BYTES // (1024 * 1024)} MiB")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise PageError(400, "malformed form") from None
    form = {k: v[0] for k, v in fields.items()}
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = form.get("csrf", "")
    if not cookie or not given or not hmac.compare_digest(cookie.encode(), given.encode()):
        raise PageError(
            403,
            "CSRF check failed",
            "the form's token does not match this browser's session: reload "
            "the page and submit again",
        )
    return form


def _back(iid: str, done: str) -> RedirectResponse:
    return RedirectResponse(f"/runs/{iid}?done={done}", status_code=303)


async def cancel(request: Request) -> Response:
    iid = _valid_id(request.path_params["iid"])
    form = await check_post(request)
    reason = form.get("reason", "").strip() or "Cancelled from the dashboard"
    async with _conn(request) as conn:
        try:
            await data.cancel(conn, iid, reason)
        except psycopg.Error as exc:
            raise _db_error(exc, f"could not cancel run {iid}") from None
    return _back(iid, "cancelled")


async def signal(request: Request) -> Response:
    iid = _valid_id(request.path_params["iid"])
    form = await check_post(request)
    name = form.get("name", "").strip()
    payload = form.get("data", "").strip() or "{}"
    if not name:
        raise PageError(400, "no signal name", "name the signal to send")
    try:
        json.loads(payload)
    except ValueError as exc:
        raise PageError(
            400, "signal data is not JSON", f'{exc}; e.g. {APPROVE_DATA} or "a string"'
        ) from None
    async with _conn(request) as conn:
        try:
            await data.signal(conn, iid, name, payload)
        except psycopg.Error as exc:
            raise _db_error(exc, f"could not signal run {iid}") from None
    return _back(iid, "signalled")


async def restart(request: Request) -> Response:
    iid = _valid_id(request.path_params["iid"])
    await check_post(request)
    async with _conn(request) as conn:
        if not await data.restart_available(conn):
            raise PageError(
                404, "restart is not available", "this database's df API has no df.restart(text)"
            )
        try:
            out = await data.restart(conn, iid)
        except psycopg.Error as exc:
            raise _db_error(exc, f"could not restart run {iid}") from None
    target = out if INSTANCE_ID.match(out or "") else iid
    return _back(target, "restarted")


async def new_page(request: Request) -> Response:
    cfg = _config(request)
    expr, label, problem = "", "", None
    async with _conn(request) as conn:
        role = await data.whoami(conn)
        if request.method == "POST":
            form = await check_post(request)
            expr = form.get("expr", "")
            label = form.get("label", "")
            if not expr.strip():
                problem = PageError(400, "no expression", "write a DSL expression to start")
            else:
                try:
                    iid = await data.start(conn, expr, label.strip() or None)
                except psycopg.Error as exc:
                    problem = _db_error(exc, "could not start the run")
                except ValueError as exc:
                    problem = PageError(400, "could not start the run", str(exc))
                else:
                    return _back(iid, "started")
    if cfg.read_only:
        raise PageError(
            403,
            "this dashboard is read-only",
            "it was started with --read-only: it cannot start runs",
        )
    return _page(
        request,
        "new.html",
        {"role": role, "expr": expr, "label": label, "problem": problem},
        status=problem.status if problem else 200,
    )
