"""The dashboard's ASGI application (Starlette), its guard and how it is served (uvicorn).

Identity: the dashboard connects with one DSN and does everything as that DSN's role
(:mod:`pgdurable.ui.data`); row-level security decides what a viewer sees. The browser gets
pages, never a credential.

:class:`Guard` wraps every request:

- **Host**: bound to a loopback address (the default, 127.0.0.1), only requests naming a
  loopback host are served (a page elsewhere that rebinds its DNS name to 127.0.0.1 gets
  400, not the dashboard).
- **Token** (``--token``, optional): every request, static files included, needs it: once
  as ``?token=…`` (answered by a redirect to the same local path without it, setting an
  HttpOnly, SameSite=Strict cookie that holds an HMAC of it), or as ``Authorization:
  Bearer …``. Compared in constant time.
- **CSRF**: a random per-session token in a cookie (HttpOnly, SameSite=Strict) that every
  form repeats in a hidden field; every POST must carry both, equal (and an ``Origin``, when
  the browser sends one, naming this host). :func:`pgdurable.ui.actions.check_post` checks it.
- **Headers** on every response: a strict Content-Security-Policy (scripts and styles only
  from ``/static``, no inline script, no frames, forms post only here), X-Frame-Options
  DENY, nosniff, the referrer only to this site, no caching.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import psycopg

from pgdurable.config import ServeConfig
from pgdurable.errors import ConfigError

from .base import CSRF_COOKIE, HERE, LOOPBACK_NAMES, TOKEN_COOKIE, UiConfig

__all__ = ["CSRF_COOKIE", "TOKEN_COOKIE", "UiConfig", "check_login", "create_app", "serve_forever"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    ("content-security-policy", CSP),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cache-control", "no-store"),
)
# roles of pgdurable itself: the dashboard never runs as them (docs/security.md, "Roles")
SERVICE_ROLES = {
    "pgdurable_service": "it is a member of pgdurable_owner, which owns df's tables, so it "
    "sees every tenant's instances",
    "pgdurable_step": "it is the session tenants' statements run in and holds no right",
    "pgdurable_owner": "it owns df's tables and sees every tenant's instances",
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def check_login(dsn: str) -> str:
    """Connect once as the dashboard will and return its role; :class:`ConfigError` naming
    the fix when it cannot serve a dashboard (unreachable, a pgdurable service role, no
    ``df`` API)."""
    try:
        with psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, application_name="pgdurable ui"
        ) as conn:
            row = conn.execute(
                "select current_user::text, n.oid is not null,"
                " n.oid is not null and has_schema_privilege(n.oid, 'usage')"
                " from (select 1) one"
                " left join pg_catalog.pg_namespace n on n.nspname = 'df'"
            ).fetchone()
    except psycopg.Error as exc:
        msg = exc.diag.message_primary or str(exc).strip()
        raise ConfigError(f"ui: cannot connect: {msg}") from None
    assert row is not None
    role, installed, usage = row
    if role in SERVICE_ROLES:
        raise ConfigError(
            f"ui: the dashboard shows and does what its DSN's role may, and {role} must not "
            f"be that role: {SERVICE_ROLES[role]}. Give the login of the role whose runs it "
            "should show (--dsn for `pgdurable ui`, --ui-dsn / PGDURABLE_UI_DSN for serve)"
        )
    if not installed:
        raise ConfigError("ui: the df schema is not installed in this database (pgdurable install)")
    if not usage:
        raise ConfigError(
            f"ui: role {role} may not use the df API: an administrator runs "
            f"select df.grant_usage('{role}')"
        )
    return str(role)


def from_serve(config: ServeConfig) -> UiConfig:
    """The dashboard's settings of ``serve --ui-port``."""
    assert config.ui_port is not None
    return UiConfig(
        dsn=config.ui_dsn,
        host=config.ui_host,
        port=config.ui_port,
        read_only=config.ui_read_only,
        token=config.ui_token,
    )


def check_serve_ui(config: ServeConfig) -> str:
    """What ``serve --ui-port`` checks before it forks anything (so a mistake stops serve
    with one message instead of a dashboard process failing over and over): the ``ui``
    extra is installed, the settings are valid, the port is free and the login may serve
    a dashboard (:func:`check_login`). Returns the dashboard's role."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"ui_port: the dashboard needs the ui extra ({', '.join(missing)} "
            "missing): pip install 'pgdurable[ui]'"
        )
    ui = from_serve(config).validate()
    if not port_free(ui.host, ui.port):
        raise ConfigError(f"ui_port: port {ui.port} on {ui.host} is in use")
    return check_login(ui.dsn)


def _token_mac(token: str) -> str:
    return hmac.new(token.encode(), b"pgdurable ui session", hashlib.sha256).hexdigest()


class Guard:
    """ASGI middleware: Host check, token, CSRF cookie, security headers (module doc)."""

    def __init__(self, app: ASGIApp, config: UiConfig) -> None:
        self.app = app
        self.config = config
        self.mac = _token_mac(config.token) if config.token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import MutableHeaders
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse, RedirectResponse

        request = Request(scope)
        extra_cookies: list[str] = []

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    if name not in headers:
                        headers[name] = value
                for cookie in extra_cookies:
                    headers.append("set-cookie", cookie)
            await send(message)

        if (
            self.config.loopback
            and _hostname(request.headers.get("host", "")) not in LOOPBACK_NAMES
        ):
            await PlainTextResponse(
                "unexpected Host header: this dashboard answers only "
                "to requests for its loopback address",
                400,
            )(scope, receive, send_with_headers)
            return
        if self.mac is not None and self.config.token is not None:
            given = request.query_params.get("token")
            if given is not None and hmac.compare_digest(
                given.encode(), self.config.token.encode()
            ):
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                # a local path only: never a scheme or another host (no open redirect)
                target = "/" + request.url.path.lstrip("/\\")
                if rest:
                    target += "?" + urlencode(rest)
                extra_cookies.append(_cookie(TOKEN_COOKIE, self.mac))
                await RedirectResponse(target, 303)(scope, receive, send_with_headers)
                return
            auth = request.headers.get("authorization", "")
            bearer = auth[7:] if auth.lower().startswith("bearer ") else ""
            cookie = request.cookies.get(TOKEN_COOKIE, "")
            if not (
                hmac.compare_digest(cookie.encode(), self.mac.encode())
                or (bearer and hmac.compare_digest(bearer.encode(), self.config.token.encode()))
            ):
                await PlainTextResponse(
                    "this dashboard needs its token: open it once as /?token=<token> "
                    "(or send Authorization: Bearer <token>)",
                    401,
                )(scope, receive, send_with_headers)
                return
        csrf = request.cookies.get(CSRF_COOKIE, "")
        if len(csrf) < 32 or not csrf.replace("-", "").replace("_", "").isalnum():
            csrf = secrets.token_urlsafe(32)
            extra_cookies.append(_cookie(CSRF_COOKIE, csrf))
            scope.setdefault("state", {})["csrf_new"] = True
        scope.setdefault("state", {})["csrf"] = csrf
        await self.app(scope, receive, send_with_headers)


def _cookie(name: str, value: str) -> str:
    return f"{name}={value}; Path=/; HttpOnly; SameSite=Strict"


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(config: UiConfig) -> Any:
    """The Starlette application for ``config`` (a connection pool opened at startup)."""
    from psycopg_pool import AsyncConnectionPool
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from . import actions, views

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        # timestamps in UTC; no statement of the dashboard runs forever
        await conn.execute("set timezone = 'UTC'")
        await conn.execute("set statement_timeout = '30s'")

    pool = AsyncConnectionPool(
        config.dsn,
        min_size=1,
        max_size=4,
        open=False,
        configure=configure,
        timeout=10,
        kwargs={"autocommit": True, "application_name": "pgdurable ui"},
    )

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await pool.open(wait=False)
        try:
            yield
        finally:
            await pool.close()

    routes = [
        Route("/", views.runs_page),
        Route("/runs/{iid}", views.run_page),
        Route("/runs/{iid}/result.json", views.download_run_result),
        Route("/runs/{iid}/nodes/{nid}/result.json", views.download_node_result),
        Route("/runs/{iid}/cancel", actions.cancel, methods=["POST"]),
        Route("/runs/{iid}/signal", actions.signal, methods=["POST"]),
        Route("/runs/{iid}/restart", actions.restart, methods=["POST"]),
        Route("/new", actions.new_page, methods=["GET", "POST"]),
        Route("/system", views.system_page),
        Route("/healthz", views.healthz),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(Guard, config=config)],
        exception_handlers=views.EXCEPTION_HANDLERS,
    )
    app.state.config = config
    app.state.pool = pool
    return app


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def serve_forever(config: UiConfig) -> None:
    """Run the dashboard until SIGTERM/SIGINT (uvicorn's own handlers)."""
    import uvicorn

    uvicorn.run(
        create_app(config),
        host=config.host.strip("[]"),
        port=config.port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        lifespan="on",
    )
