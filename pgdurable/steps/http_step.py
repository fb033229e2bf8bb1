"""Run ``HTTP`` and ``HTTP_MULTIPART`` nodes from the worker, under the service's HTTP policy.

Owns: the policy (:class:`HttpPolicy`, SPEC D12, §9 allow-list patterns), the URL gate
(:func:`check_url`), the per-process client (:func:`make_client`) and the request itself
(:func:`run_http`, SPEC §3.8 and §3.2's result envelope). No database access here: the worker
substitutes the node's config, calls :func:`run_http` and checkpoints what it returns.

Delivery is at-least-once (D4): a crash between the response and the checkpoint repeats the
request, so every request carries ``Idempotency-Key`` (stable per instance and node, chosen by
the caller) for servers that deduplicate.

Address checks happen twice under ``public``: :func:`check_url` resolves the host up front so the
step fails with a clear message before anything is sent, and the client's network backend
resolves again at connect time and connects only to the address it just checked. The second
check is the one that counts: it closes the DNS-rebinding gap between the first lookup and
httpx's own (a name that answers 8.8.8.8 once and 127.0.0.1 the next time).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import ipaddress
import logging
import re
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import httpcore
import httpx
import orjson

from pgdurable import __version__
from pgdurable.errors import ConfigError, HttpStepError

logger = logging.getLogger(__name__)

PolicyMode = Literal["deny-all", "public", "allow-list"]
NodeType = Literal["HTTP", "HTTP_MULTIPART"]

MODE_DEFAULT: Final[PolicyMode] = "public"
ALLOW_DEFAULT: Final[tuple[str, ...]] = ()
MAX_REQUEST_BYTES_DEFAULT: Final = 10 * 1024 * 1024
MAX_RESPONSE_BYTES_DEFAULT: Final = 10 * 1024 * 1024
MAX_TIMEOUT_SECONDS_DEFAULT: Final = 300.0

# df.http / df.http_multipart default timeout_seconds (SPEC §3 table); used when a stored
# config has none.
TIMEOUT_SECONDS_DEFAULT: Final = 30.0
# 5xx failures quote at most this much of the response body (SPEC §3.8).
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
# Idempotency-Key / User-Agent are ours (D4, §3.8). Dropped with a debug log.
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
_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")

_TEXTUAL_SUBTYPES: Final = frozenset(
    {
        "json",
        "xml",
        "javascript",
        "x-javascript",
        "ecmascript",
        "x-ecmascript",
        "x-www-form-urlencoded",
        "graphql",
        "yaml",
        "x-yaml",
    }
)

# Blocked under ``public`` (D12). The metadata address sits inside link-local; it is listed
# first so the message names it.
_BLOCKED_NETWORKS: Final[tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...]] = (
    (ipaddress.ip_network("169.254.169.254/32"), "cloud metadata"),
    (ipaddress.ip_network("0.0.0.0/8"), "this-network"),
    (ipaddress.ip_network("10.0.0.0/8"), "private"),
    (ipaddress.ip_network("100.64.0.0/10"), "carrier-grade NAT"),
    (ipaddress.ip_network("127.0.0.0/8"), "loopback"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local"),
    (ipaddress.ip_network("172.16.0.0/12"), "private"),
    (ipaddress.ip_network("192.168.0.0/16"), "private"),
    (ipaddress.ip_network("::/128"), "unspecified"),
    (ipaddress.ip_network("::1/128"), "loopback"),
    (ipaddress.ip_network("fe80::/10"), "link-local"),
    (ipaddress.ip_network("fc00::/7"), "unique-local"),
)
# NAT64 well-known prefix: the last 32 bits are an IPv4 address and are checked as such.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class HttpPolicy:
    """Where HTTP steps may connect and how much they may move (D12).

    Set from the service's configuration (CLI / ``PGDURABLE_*`` env), never from SQL.
    """

    mode: PolicyMode = MODE_DEFAULT
    """``deny-all`` blocks every request; ``public`` admits any host whose every DNS answer is a
    public address (bare IP literals rejected); ``allow-list`` admits only hosts matching
    :attr:`allow`, whatever they resolve to. Defaults to ``"public"``."""

    allow: tuple[str, ...] = ALLOW_DEFAULT
    """Host patterns for ``allow-list``: ``api.example.com`` (exact), ``*.example.com``
    (subdomains only), either with an optional ``:port`` (no port = any port); IP literals such
    as ``127.0.0.1:8080`` or ``[::1]`` and ``localhost`` may be named explicitly.
    Defaults to ``()``."""

    max_request_bytes: int = MAX_REQUEST_BYTES_DEFAULT
    """Largest request body sent (after multipart encoding). Defaults to 10 MiB."""

    max_response_bytes: int = MAX_RESPONSE_BYTES_DEFAULT
    """Largest response body read (after content decoding); larger fails the step.
    Defaults to 10 MiB."""

    max_timeout_seconds: float = MAX_TIMEOUT_SECONDS_DEFAULT
    """Ceiling on a node's ``timeout_seconds``; larger values are lowered to it.
    Defaults to 300."""

    def validate(self) -> None:
        """Raise :class:`~pgdurable.errors.ConfigError` naming the first invalid field."""
        if self.mode not in get_args(PolicyMode):
            raise ConfigError(
                f"http policy mode {self.mode!r} is invalid: use one of 'deny-all', 'public', "
                "'allow-list'"
            )
        if not isinstance(self.allow, tuple) or not all(isinstance(p, str) for p in self.allow):
            raise ConfigError(f"http policy allow must be a tuple of strings, got {self.allow!r}")
        for pattern in self.allow:
            try:
                _parse_pattern(pattern)
            except ValueError as exc:
                raise ConfigError(
                    f"http policy allow pattern {pattern!r} is invalid: {exc}"
                ) from None
        if self.mode == "allow-list" and not self.allow:
            raise ConfigError(
                "http policy allow is empty but mode is 'allow-list': give at least one host "
                "pattern, or use mode 'deny-all'"
            )
        if self.mode != "allow-list" and self.allow:
            # Ignoring the list would silently widen (public) or be a no-op (deny-all): refuse.
            raise ConfigError(
                f"http policy allow {list(self.allow)!r} is set but mode is {self.mode!r}: "
                "set mode 'allow-list' to use it"
            )
        for name in ("max_request_bytes", "max_response_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"http policy {name} must be a positive integer, got {value!r}")
        timeout = self.max_timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigError(
                f"http policy max_timeout_seconds must be a positive number, got {timeout!r}"
            )

    @classmethod
    def from_strings(
        cls,
        mode: str | None,
        allow_csv_or_list: str | Iterable[str] | None = None,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES_DEFAULT,
        max_response_bytes: int = MAX_RESPONSE_BYTES_DEFAULT,
        max_timeout_seconds: float = MAX_TIMEOUT_SECONDS_DEFAULT,
    ) -> HttpPolicy:
        """Build and validate a policy from CLI/env text.

        ``mode`` is case-insensitive; empty or ``None`` means ``allow-list`` when patterns are
        given, else ``public``. Patterns come as one comma/whitespace-separated string or as a
        list of such strings (repeated ``--http-allow``); they are lower-cased.
        """
        if allow_csv_or_list is None:
            chunks: list[str] = []
        elif isinstance(allow_csv_or_list, str):
            chunks = [allow_csv_or_list]
        else:
            chunks = list(allow_csv_or_list)
        allow = tuple(p.lower() for chunk in chunks for p in re.split(r"[,\s]+", chunk) if p)
        text = (mode or "").strip().lower().replace("_", "-")
        if not text:
            text = "allow-list" if allow else MODE_DEFAULT
        policy = cls(
            mode=text,  # type: ignore[arg-type]  # checked by validate()
            allow=allow,
            max_request_bytes=max_request_bytes,
            max_response_bytes=max_response_bytes,
            max_timeout_seconds=max_timeout_seconds,
        )
        policy.validate()
        return policy


@dataclass(frozen=True)
class _Pattern:
    host: str  # normalised host, or the suffix after "*." when wildcard
    wildcard: bool
    port: int | None


def _parse_pattern(pattern: str) -> _Pattern:
    """Parse one allow-list pattern; ValueError says what is wrong."""
    text = pattern.strip().lower()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("a bracketed IPv6 address must look like [::1] or [::1]:8080")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text  # a bare IPv6 address (several colons) or a host without port
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
        port = int(port_text)
    host = host.rstrip(".")
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if not host:
        raise ValueError("the host is empty")
    if not host.isascii():
        raise ValueError("use the punycode (xn--…) form of an internationalised host name")
    literal = _ip_literal(host)
    if literal is not None:
        if wildcard:
            raise ValueError("'*.' applies to host names, not IP addresses")
        return _Pattern(literal, False, port)
    if ":" in host or not _HOSTNAME.fullmatch(host):
        raise ValueError(
            "expected a host name (api.example.com), *.domain, or an IP address, "
            "each with an optional :port"
        )
    return _Pattern(host, wildcard, port)


def _ip_literal(host: str) -> str | None:
    """The canonical text of ``host`` if it is an IP address literal, else None."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return None


def _is_bare_ip(host: str) -> bool:
    """True for any IP literal the resolver would accept, incl. ``127.1`` and ``2130706433``."""
    if _ip_literal(host) is not None:
        return True
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def blocked_reason(address: str) -> str | None:
    """Why ``address`` may not be reached under ``public`` (e.g. ``"loopback"``), or None.

    IPv4-mapped, 6to4 and NAT64 IPv6 addresses are unwrapped and judged by their IPv4 address.
    Anything else that is not globally routable (multicast, reserved, documentation, …) is
    blocked as ``"non-public"``.
    """
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return blocked_reason(str(embedded))
    for network, reason in _BLOCKED_NETWORKS:
        if ip.version == network.version and ip in network:
            return reason
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global:
        return "non-public"
    return None


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA) host as httpx will connect to it, no trailing dot, no brackets
    port: int  # effective port


def _parse_url(url: str) -> _Target:
    """Parse ``url`` the way httpx will (no parser differential); HttpStepError if unusable."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError) as exc:
        raise HttpStepError(f"invalid URL {_shown(url)!r}: {exc}") from None
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https"):
        raise HttpStepError(
            f"unsupported URL scheme {scheme!r} in {_shown(url)!r}: use http or https"
        )
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise HttpStepError(f"invalid URL {_shown(url)!r}: it has no host")
    port = parsed.port if parsed.port is not None else (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise HttpStepError(f"invalid URL {_shown(url)!r}: port {port} is out of range")
    return _Target(scheme, _ip_literal(host) or host, port)


def _shown(url: str) -> str:
    """``url`` for messages, without a password in its userinfo."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError):
        return url
    if parsed.password:
        return str(parsed.copy_with(password="***"))
    return url


def _matches(pattern: _Pattern, target: _Target) -> bool:
    if pattern.port is not None and pattern.port != target.port:
        return False
    if pattern.wildcard:
        return target.host.endswith("." + pattern.host)
    return target.host == pattern.host


async def _resolve_checked(host: str, port: int, shown_url: str) -> list[str]:
    """Resolve ``host`` and return its addresses; HttpStepError if any answer is blocked."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HttpStepError(
            f"could not resolve host {host!r} for {shown_url!r}: {exc.strerror or exc}"
        ) from None
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0]).partition("%")[0]
        reason = blocked_reason(address)
        if reason is not None:
            raise HttpStepError(
                f"host {host!r} resolves to a blocked address {address} ({reason}) for "
                f"{shown_url!r}: the public http policy only reaches public addresses; use the "
                "allow-list policy to name internal hosts"
            )
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise HttpStepError(f"could not resolve host {host!r} for {shown_url!r}: no addresses")
    return addresses


def _disabled(shown_url: str) -> HttpStepError:
    return HttpStepError(
        f"outbound HTTP requests are disabled by the service's http policy 'deny-all'; "
        f"{shown_url!r} was not requested (start pgdurable serve with --http-policy public or "
        "allow-list to enable them)"
    )


async def check_url(policy: HttpPolicy, url: str) -> None:
    """Raise :class:`~pgdurable.errors.HttpStepError` unless ``policy`` admits ``url``.

    Checks the scheme, then the mode: ``deny-all`` refuses, ``allow-list`` matches the host and
    effective port against the patterns, ``public`` rejects IP literals and resolves the host
    with the running loop's resolver, refusing it if any answer is a blocked address.
    """
    target = _parse_url(url)
    shown = _shown(url)
    if policy.mode == "deny-all":
        raise _disabled(shown)
    if policy.mode == "allow-list":
        patterns = [_parse_pattern(p) for p in policy.allow]
        if not any(_matches(p, target) for p in patterns):
            raise HttpStepError(
                f"host {target.host!r} (port {target.port}) of {shown!r} is not in the allowed "
                f"hosts list {list(policy.allow)!r}: add it to the service's --http-allow"
            )
        return
    if _is_bare_ip(target.host):
        raise HttpStepError(
            f"bare IP address {target.host!r} in {shown!r} is not allowed under the public http "
            "policy: use a host name, or name the address in an allow-list policy"
        )
    await _resolve_checked(target.host, target.port, shown)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Network backend that applies the policy's address rules at connect time.

    Under ``public`` it resolves the host itself, refuses if any answer is blocked and connects
    to the checked addresses in order, so a second DNS answer can never differ from the one
    checked. TLS still verifies and sends SNI for the host name (httpcore passes it to
    ``start_tls`` separately).
    """

    def __init__(self, policy: HttpPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's backend interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        shown = f"{host}:{port}"
        if self._policy.mode == "deny-all":
            raise _disabled(shown)
        if self._policy.mode != "public":
            return await self._inner.connect_tcp(
                host,
                port,
                timeout=timeout,
                local_address=local_address,
                socket_options=socket_options,
            )
        addresses = await _resolve_checked(host, port, shown)
        last: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None  # _resolve_checked returns at least one address
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's backend interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise HttpStepError(f"unix socket {path!r}: HTTP steps only use TCP")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def make_client(policy: HttpPolicy) -> httpx.AsyncClient:
    """The HTTP client of one worker process (create it after fork, close it at shutdown).

    Never follows redirects, ignores proxy/CA environment variables (``trust_env=False``: the
    policy, not the environment, decides where requests go) and enforces the policy's address
    rules at connect time.
    """
    policy.validate()
    limits = httpx.Limits(
        max_connections=MAX_CONNECTIONS,
        max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
        keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
    )
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False, retries=0)
    # httpx has no public hook for the network backend; its transport keeps the httpcore pool
    # in ``_pool`` (stable since httpx 0.18). Replace it with an identical pool that uses our
    # guarded backend, and fail loudly rather than run unguarded if that layout ever changes.
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise RuntimeError("unsupported httpx version: cannot install the HTTP policy guard")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        retries=0,
        network_backend=_GuardedBackend(policy),
    )
    return httpx.AsyncClient(
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(TIMEOUT_SECONDS_DEFAULT),
        headers={"User-Agent": USER_AGENT},
    )


def _timeout(value: object, policy: HttpPolicy) -> float:
    if value is None:
        seconds = TIMEOUT_SECONDS_DEFAULT
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
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
    """The caller's headers: string values of a JSON object only (SPEC §3.8)."""
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
    return orjson.dumps(raw)


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


def _media_type(content_type: str | None) -> tuple[str, str | None]:
    """(lower-case media type, charset or None) of a Content-Type header."""
    if not content_type:
        return "", None
    media, *params = content_type.split(";")
    charset = None
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"') or None
    return media.strip().lower(), charset


def is_textual(media_type: str) -> bool:
    """Whether a response of this media type is returned as text (SPEC §3.8)."""
    if media_type.startswith("text/") or media_type.endswith(("+json", "+xml", "+yaml")):
        return True
    return media_type.partition("/")[2] in _TEXTUAL_SUBTYPES


def _codec(charset: str | None) -> str:
    if charset:
        try:
            return codecs.lookup(charset).name
        except LookupError:
            pass
    return "utf-8"


def render_body(body: bytes, content_type: str | None) -> tuple[str, Literal["text", "base64"]]:
    """(body, encoding): text for textual media types or NUL-free UTF-8 bytes, else base64.

    Textual bodies are decoded with their charset (UTF-8 by default), undecodable bytes
    replaced. Text containing NUL is base64 too: jsonb cannot store ``\\u0000``.
    """
    media, charset = _media_type(content_type)
    if is_textual(media):
        text = body.decode(_codec(charset), "replace")
        if "\0" not in text:
            return text, "text"
    elif b"\0" not in body:
        try:
            return body.decode("utf-8"), "text"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode("ascii"), "base64"


async def _read_capped(response: httpx.Response, cap: int, shown: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise HttpStepError(
            f"response from {shown!r} declares {declared} bytes, over the {cap}-byte response "
            "cap (max_response_bytes)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > cap:
            raise HttpStepError(
                f"response from {shown!r} exceeds the {cap}-byte response cap "
                "(max_response_bytes); reading stopped"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def run_http(
    client: httpx.AsyncClient,
    policy: HttpPolicy,
    node_type: NodeType,
    config: dict[str, Any],
    idempotency_key: str,
) -> dict[str, Any]:
    """Run one HTTP node and return its result envelope (SPEC §3.2).

    ``config`` is the node's substituted config. Returns
    ``{"status", "body", "encoding", "headers", "ok", "duration_ms"}`` for 1xx to 4xx responses
    (``ok`` true for 2xx only); raises :class:`~pgdurable.errors.HttpStepError` for a policy
    refusal, invalid config, a cap, a timeout, a transport error or a 5xx status.
    """
    if not isinstance(config, Mapping):
        raise HttpStepError(f"{node_type} config must be a JSON object, got {config!r:.80}")
    url = config.get("url")
    if not isinstance(url, str) or not url:
        raise HttpStepError(f"{node_type} config needs a non-empty string 'url', got {url!r}")
    shown = _shown(url)
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
                body = await _read_capped(response, policy.max_response_bytes, shown)
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
    if status >= 500:
        preview = body.decode(
            _codec(_media_type(response.headers.get("content-type"))[1]), "replace"
        )
        preview = preview.replace("\0", "")[:BODY_PREVIEW_CHARS] or "(empty body)"
        raise HttpStepError(
            f"{method} {shown!r} returned HTTP {status} {response.reason_phrase}: {preview}"
        )
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
