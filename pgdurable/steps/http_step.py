"""Run ``HTTP`` and ``HTTP_MULTIPART`` nodes from the worker, under the service's HTTP policy.

Owns the per-process client (:func:`make_client`) and the request itself (:func:`run_http`,
docs/http.md and the result envelope of docs/api.md "Node results"). Where a request may go
is decided by
:mod:`pgdurable.steps.http_policy` alone (:class:`HttpPolicy`, :func:`check_url` and the
connect-time guard), which this module only calls; the response body is read and rendered by
:mod:`pgdurable.steps.http_body`. No database access: :mod:`pgdurable.steps.http_run`
substitutes the node's config, calls :func:`run_http` and the worker checkpoints what it
returns.

Delivery is at-least-once (D4): a crash between the response and the checkpoint repeats the
request, so every request carries ``Idempotency-Key`` (stable per instance and node, chosen by
the caller) for servers that deduplicate.

The one client is shared by every tenant's steps on the worker, so it must carry no state from
one request to the next: its cookie jar stores nothing (:class:`_NoCookieJar`); only the
connection pool is shared. A response is read raw and capped twice as it streams, in bytes
received and in bytes after decoding at most one gzip/deflate layer with bounded output
(:func:`pgdurable.steps.http_body.read_capped`): a few kilobytes of nested gzip cannot
inflate in the worker.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import http.cookiejar
import logging
import re
import secrets
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final, Literal

import httpcore
import httpx

from pgdurable import __version__
from pgdurable.errors import HttpStepError
from pgdurable.steps.http_body import (
    ACCEPT_ENCODING,
    codec,
    is_textual,
    media_type,
    read_capped,
    render_body,
)
from pgdurable.steps.http_policy import GuardedBackend, HttpPolicy, check_url, shown_url
from pgdurable.values import json_bytes

# HttpPolicy: the type of the policy the client and run_http take (defined in http_policy)
__all__ = ["HttpPolicy", "NodeType", "is_textual", "make_client", "render_body", "run_http"]

logger = logging.getLogger(__name__)

NodeType = Literal["HTTP", "HTTP_MULTIPART"]

# df.http / df.http_multipart default timeout_seconds (docs/api.md table); used when a stored
# config has none.
TIMEOUT_SECONDS_DEFAULT: Final = 30.0
# 5xx failures quote at most this much of the response body (docs/http.md).
BODY_PREVIEW_CHARS: Final = 512
USER_AGENT: Final = f"pgdurable/{__version__}"

# Connection pool of the one client per worker process. A JOIN may fan out to hundreds of HTTP
# nodes at once; httpx's default of 100 connections would queue the rest behind the pool
# timeout, so allow more and keep a moderate number idle for reuse against the same hosts.
MAX_CONNECTIONS: Final = 512
MAX_KEEPALIVE_CONNECTIONS: Final = 128
KEEPALIVE_EXPIRY_SECONDS: Final = 30.0

METHODS: Final = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})
MULTIPART_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})

# Request headers the caller may not set: framing and connection management belong to the
# client (a caller-set Content-Length or Transfer-Encoding is how requests get smuggled), and
# Idempotency-Key / User-Agent are ours (D4, docs/http.md). Dropped with a debug log.
_RESERVED_REQUEST_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "idempotency-key",
        "user-agent",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class _RefuseCookies(http.cookiejar.DefaultCookiePolicy):
    """Accept no cookie and return none."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


class _NoCookieJar(http.cookiejar.CookieJar):
    """The worker client's cookie jar: it stores nothing, so it sends nothing.

    The client is shared by every tenant's steps on the worker; a stored ``Set-Cookie`` would
    be sent with another tenant's later request to a matching host (cookies ignore the port,
    and without a public-suffix list ``Domain=co.uk`` matches every ``*.co.uk``). A workflow
    that needs a cookie passes it on explicitly, from ``$resp.headers`` into a ``Cookie``
    header of its own next request (docs/http.md shows how).
    """

    def __init__(self) -> None:
        super().__init__(policy=_RefuseCookies())

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


def make_client(policy: HttpPolicy) -> httpx.AsyncClient:
    """The HTTP client of one worker process (create it after fork, close it at shutdown).

    Never follows redirects, ignores proxy/CA environment variables (``trust_env=False``: the
    policy, not the environment, decides where requests go), enforces the policy's address
    rules at connect time and keeps no cookies. Only connections are pooled.
    """
    policy.validate()
    limits = httpx.Limits(
        max_connections=MAX_CONNECTIONS,
        max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
        keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
    )
    # one TLS context (loading the CA bundle is most of what making a client costs): the
    # transport's, handed to the guarded pool below
    ssl_context = httpx.create_ssl_context(trust_env=False)
    transport = httpx.AsyncHTTPTransport(
        verify=ssl_context, limits=limits, trust_env=False, retries=0
    )
    # httpx has no public hook for the network backend; its transport keeps the httpcore pool
    # in ``_pool`` (stable since httpx 0.18). Replace it with an identical pool that uses our
    # guarded backend, and fail loudly rather than run unguarded if that layout ever changes.
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise RuntimeError("unsupported httpx version: cannot install the HTTP policy guard")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        retries=0,
        network_backend=GuardedBackend(policy),
    )
    client = httpx.AsyncClient(
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(TIMEOUT_SECONDS_DEFAULT),
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING},
        cookies=_NoCookieJar(),
    )
    if not isinstance(client.cookies.jar, _NoCookieJar):
        raise RuntimeError("unsupported httpx version: cannot install the empty cookie jar")
    return client


def _timeout(value: object, policy: HttpPolicy) -> float:
    if value is None:
        seconds = TIMEOUT_SECONDS_DEFAULT
    elif isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise HttpStepError(f"http timeout_seconds must be a positive number, got {value!r}")
    else:
        try:
            seconds = float(value)
        except ValueError:
            raise HttpStepError(
                f"http timeout_seconds must be a positive number, got {value!r}"
            ) from None
        if not seconds > 0 or seconds != seconds:
            raise HttpStepError(f"http timeout_seconds must be a positive number, got {value!r}")
    if seconds > policy.max_timeout_seconds:
        logger.debug(
            "http timeout %ss lowered to the policy cap %ss",
            seconds,
            policy.max_timeout_seconds,
            extra={"event": "http.timeout.capped"},
        )
        return float(policy.max_timeout_seconds)
    return seconds


def _request_headers(raw: object, *, multipart: bool) -> list[tuple[bytes, bytes]]:
    """The caller's headers: string values of a JSON object only (docs/http.md)."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        logger.debug(
            "http headers ignored: not a JSON object (%s)",
            type(raw).__name__,
            extra={"event": "http.header.dropped"},
        )
        return []
    out: list[tuple[bytes, bytes]] = []
    for name, value in raw.items():
        if not isinstance(value, str):
            logger.debug(
                "http header %r dropped: its value is not a string",
                name,
                extra={"event": "http.header.dropped"},
            )
            continue
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise HttpStepError(f"http header name {name!r} is not a valid HTTP header name")
        if any(c in value for c in "\r\n\0"):
            raise HttpStepError(
                f"http header {name!r} has a line break or NUL in its value, which HTTP forbids"
            )
        lower = name.lower()
        if lower in _RESERVED_REQUEST_HEADERS or (multipart and lower == "content-type"):
            logger.debug(
                "http header %r dropped: pgdurable sets it",
                name,
                extra={"event": "http.header.dropped"},
            )
            continue
        out.append((name.encode("ascii"), value.encode("utf-8")))
    return out


def _request_body(raw: object) -> bytes | None:
    """The body verbatim: text as UTF-8; any other JSON value as its JSON text."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw.encode("utf-8")
    try:
        return json_bytes(raw)  # numbers exactly as written (12.50 stays 12.50)
    except ValueError as exc:
        raise HttpStepError(f"http body cannot be sent as JSON: {exc}") from None


def _quote(value: str) -> str:
    """Quote a multipart name/filename the way browsers do (WHATWG), so it cannot break out."""
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _multipart(parts: object, cap: int) -> tuple[bytes, str]:
    """Encode ``parts`` as multipart/form-data; returns (body, Content-Type)."""
    if not isinstance(parts, list) or not parts:
        raise HttpStepError("http_multipart parts must be a non-empty JSON array of objects")
    decoded: list[tuple[bytes, bytes | None, bytes | None, bytes]] = []
    size = 0
    for index, part in enumerate(parts):
        if not isinstance(part, Mapping):
            raise HttpStepError(f"http_multipart part {index} is not a JSON object: {part!r:.80}")
        name, data_b64 = part.get("name"), part.get("data_b64")
        filename, content_type = part.get("filename"), part.get("content_type")
        if not isinstance(name, str) or not name:
            raise HttpStepError(f"http_multipart part {index} needs a non-empty string 'name'")
        if not isinstance(data_b64, str):
            raise HttpStepError(f"http_multipart part {name!r} needs a base64 string 'data_b64'")
        if filename is not None and not isinstance(filename, str):
            raise HttpStepError(f"http_multipart part {name!r}: 'filename' must be a string")
        if content_type is not None and (
            not isinstance(content_type, str) or any(c in content_type for c in "\r\n\0")
        ):
            raise HttpStepError(
                f"http_multipart part {name!r}: 'content_type' must be a one-line string"
            )
        compact = "".join(data_b64.split())
        size += len(compact) * 3 // 4
        if size > cap:
            raise HttpStepError(
                f"http_multipart request body exceeds the {cap}-byte request cap "
                "(max_request_bytes)"
            )
        try:
            data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise HttpStepError(
                f"http_multipart part {name!r}: data_b64 is not valid base64"
            ) from None
        if not content_type and filename is not None:
            content_type = "application/octet-stream"
        decoded.append(
            (
                _quote(name).encode("utf-8"),
                None if filename is None else _quote(filename).encode("utf-8"),
                content_type.encode("utf-8") if content_type else None,
                data,
            )
        )
    boundary = b""
    while not boundary or any(boundary in data for *_, data in decoded):
        boundary = b"pgdurable-" + secrets.token_hex(16).encode("ascii")
    body = bytearray()
    for name_b, filename_b, type_b, data in decoded:
        body += b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name_b + b'"'
        if filename_b is not None:
            body += b'; filename="' + filename_b + b'"'
        body += b"\r\n"
        if type_b is not None:
            body += b"Content-Type: " + type_b + b"\r\n"
        body += b"\r\n" + data + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return bytes(body), "multipart/form-data; boundary=" + boundary.decode("ascii")


#: The longest Retry-After honoured (seconds, as df.sleep's longest): a due time stays inside
#: PostgreSQL's timestamp range whatever a server says.
RETRY_AFTER_MAX = 10_000_000_000


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header as seconds from now (RFC 9110: delay-seconds or an HTTP-date),
    None when absent or unreadable; a date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), RETRY_AFTER_MAX))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP-date is GMT; one without a zone is not one
    wait = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, wait), float(RETRY_AFTER_MAX))


async def run_http(
    client: httpx.AsyncClient,
    policy: HttpPolicy,
    node_type: NodeType,
    config: dict[str, Any],
    idempotency_key: str,
    *,
    fail_on_429: bool = False,
) -> dict[str, Any]:
    """Run one HTTP node and return its result envelope (docs/api.md "Node results").

    ``config`` is the node's substituted config. Returns
    ``{"status", "body", "encoding", "headers", "ok", "duration_ms"}`` for 1xx to 4xx responses
    (``ok`` true for 2xx only); raises :class:`~pgdurable.errors.HttpStepError` for a policy
    refusal, invalid config, a cap, a timeout, a transport error or a 5xx status, and with
    ``fail_on_429`` (the node is inside a df.retry) for a 429; the error carries the
    response's Retry-After.
    """
    if not isinstance(config, Mapping):
        raise HttpStepError(f"{node_type} config must be a JSON object, got {config!r:.80}")
    url = config.get("url")
    if not isinstance(url, str) or not url:
        raise HttpStepError(f"{node_type} config needs a non-empty string 'url', got {url!r}")
    shown = shown_url(url)
    multipart = node_type == "HTTP_MULTIPART"
    method = config.get("method") or "POST"
    allowed = MULTIPART_METHODS if multipart else METHODS
    if not isinstance(method, str) or method.upper() not in allowed:
        raise HttpStepError(
            f"http method {method!r} is not supported for {node_type}: use one of "
            f"{', '.join(sorted(allowed))}"
        )
    method = method.upper()
    timeout = _timeout(config.get("timeout_seconds"), policy)
    headers = _request_headers(config.get("headers"), multipart=multipart)
    content: bytes | None
    if multipart:
        content, content_type = _multipart(config.get("parts"), policy.max_request_bytes)
        headers.append((b"Content-Type", content_type.encode("ascii")))
    else:
        content = _request_body(config.get("body"))
    if content is not None and len(content) > policy.max_request_bytes:
        raise HttpStepError(
            f"request body of {len(content)} bytes for {shown!r} exceeds the "
            f"{policy.max_request_bytes}-byte request cap (max_request_bytes)"
        )
    if not isinstance(client.cookies.jar, _NoCookieJar) or len(client.cookies.jar):
        # the shared client must not carry one tenant's cookies into another's request
        raise HttpStepError("the worker's HTTP client keeps cookies: build it with make_client")
    headers.append((b"Idempotency-Key", idempotency_key.encode("utf-8")))
    headers.append((b"User-Agent", USER_AGENT.encode("ascii")))
    await check_url(policy, url)

    started = time.monotonic()
    try:
        # httpx's timeout bounds each phase; asyncio.timeout bounds the whole exchange, so a
        # server dripping one byte per second cannot hold the step past timeout_seconds.
        async with asyncio.timeout(timeout):
            async with client.stream(
                method,
                url,
                content=content,
                headers=headers,
                timeout=httpx.Timeout(timeout),
                follow_redirects=False,
            ) as response:
                body = await read_capped(response, policy.max_response_bytes, shown)
    except TimeoutError:
        raise HttpStepError(f"{method} {shown!r} timed out after {timeout:g}s") from None
    except httpx.TimeoutException as exc:
        raise HttpStepError(
            f"{method} {shown!r} timed out after {timeout:g}s ({type(exc).__name__})"
        ) from None
    except httpx.ConnectError as exc:
        raise HttpStepError(
            f"{method} {shown!r} could not connect: {exc or 'connection failed'}"
        ) from None
    except httpx.HTTPError as exc:
        raise HttpStepError(f"{method} {shown!r} failed: {type(exc).__name__}: {exc}") from None
    duration_ms = round((time.monotonic() - started) * 1000)

    status = response.status_code
    text, encoding = render_body(body, response.headers.get("content-type"))
    if status >= 500 or (status == 429 and fail_on_429):
        preview = body.decode(codec(media_type(response.headers.get("content-type"))[1]), "replace")
        preview = preview.replace("\0", "")[:BODY_PREVIEW_CHARS] or "(empty body)"
        err = HttpStepError(
            f"{method} {shown!r} returned HTTP {status} {response.reason_phrase}: {preview}"
        )
        err.retry_after = retry_after_seconds(response.headers.get("retry-after"))
        raise err
    response_headers: dict[str, str] = {}
    for name, value in response.headers.multi_items():
        key = name.lower()
        response_headers[key] = (
            f"{response_headers[key]}, {value}" if key in response_headers else value
        )
    return {
        "status": status,
        "body": text,
        "encoding": encoding,
        "headers": response_headers,
        "ok": 200 <= status < 300,
        "duration_ms": duration_ms,
    }
