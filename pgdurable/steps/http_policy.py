"""The HTTP egress policy: where an HTTP step may connect (docs/decisions.md D12).

Security-critical and meant to be reviewed on its own. Owns :class:`HttpPolicy` (set from the
service's configuration, never from SQL), the URL gate :func:`check_url`, the address rules of
the ``public`` mode (:func:`blocked_reason`) and :class:`GuardedBackend`, the network backend
that applies those rules again at connect time. The request and the response are
:mod:`pgdurable.steps.http_step`'s business.

Address checks happen twice under ``public``: :func:`check_url` resolves the host up front so the
step fails with a clear message before anything is sent, and the client's network backend
resolves again at connect time and connects only to the address it just checked. The second
check is the one that counts: it closes the DNS-rebinding gap between the first lookup and
httpx's own (a name that answers 8.8.8.8 once and 127.0.0.1 the next time). Both use the running
event loop's resolver (``loop.getaddrinfo``), which is also how the tests substitute DNS.

``public`` admits an address only when it is a public IPv4 address or an IPv6 *global unicast*
address (2000::/3) outside every special range below. The ranges are listed explicitly rather
than left to :attr:`ipaddress.IPv6Address.is_global`, which (Python 3.11) calls NAT64,
IPv4-mapped, IPv4-compatible, site-local and multicast addresses global.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import httpcore
import httpx

from pgdurable.errors import ConfigError, HttpStepError
from pgdurable.sanitize import mask_userinfo

PolicyMode = Literal["deny-all", "public", "allow-list"]

MODE_DEFAULT: Final[PolicyMode] = "public"
ALLOW_DEFAULT: Final[tuple[str, ...]] = ()
MAX_REQUEST_BYTES_DEFAULT: Final = 10 * 1024 * 1024
MAX_RESPONSE_BYTES_DEFAULT: Final = 10 * 1024 * 1024
MAX_TIMEOUT_SECONDS_DEFAULT: Final = 300.0

_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(*pairs: tuple[str, str]) -> tuple[tuple[_Network, str], ...]:
    return tuple((ipaddress.ip_network(net), reason) for net, reason in pairs)


# IPv4 addresses blocked under ``public``, first match wins (so the metadata address, inside
# link-local, is named as such). Anything else ``ipaddress`` calls non-global is blocked too.
_BLOCKED_V4: Final = _networks(
    ("169.254.169.254/32", "cloud metadata"),
    ("255.255.255.255/32", "broadcast"),
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)

# IPv6 ranges blocked under ``public``, first match wins. The IPv4-embedding forms are blocked
# whatever IPv4 address they carry: a host may translate or tunnel them to an internal IPv4
# address (a local NAT64 gateway, the kernel's mapped-address handling, a 6to4/Teredo relay).
_BLOCKED_V6: Final = _networks(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::ffff:0:0:0/96", "IPv4-translated"),
    ("::/96", "IPv4-compatible"),  # after :: and ::1, which it contains
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard"),
    ("2001::/32", "Teredo"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("fc00::/7", "unique-local"),
    ("ff00::/8", "multicast"),
)
# The only IPv6 space ``public`` reaches; 6to4 inside it is judged by the IPv4 it embeds.
_GLOBAL_UNICAST_V6: Final = ipaddress.ip_network("2000::/3")
_SIX_TO_FOUR: Final = ipaddress.ip_network("2002::/16")


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
    """Largest response body read, counted both as received and after content decoding; more
    of either fails the step. Defaults to 10 MiB."""

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

    IPv4: the special ranges of :data:`_BLOCKED_V4`, then anything ``ipaddress`` calls
    non-global. IPv6: the ranges of :data:`_BLOCKED_V6` (every IPv4-embedding form included,
    whatever IPv4 address it carries), then anything outside global unicast 2000::/3, then 6to4
    (2002::/16) embedding a blocked IPv4 address, then anything ``ipaddress`` calls non-global.
    A zone id (``fe80::1%eth0``) is ignored.
    """
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv4Address):
        for network, reason in _BLOCKED_V4:
            if ip in network:
                return reason
    else:
        for network, reason in _BLOCKED_V6:
            if ip in network:
                return reason
        if ip not in _GLOBAL_UNICAST_V6:
            return "not IPv6 global unicast"
        if ip in _SIX_TO_FOUR:
            assert ip.sixtofour is not None  # every 2002::/16 address embeds one
            inner = blocked_reason(str(ip.sixtofour))
            if inner is not None:
                return f"6to4 of a {inner} address"
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
        raise HttpStepError(f"invalid URL {shown_url(url)!r}: {exc}") from None
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https"):
        raise HttpStepError(
            f"unsupported URL scheme {scheme!r} in {shown_url(url)!r}: use http or https"
        )
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise HttpStepError(f"invalid URL {shown_url(url)!r}: it has no host")
    port = parsed.port if parsed.port is not None else (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise HttpStepError(f"invalid URL {shown_url(url)!r}: port {port} is out of range")
    return _Target(scheme, _ip_literal(host) or host, port)


def shown_url(url: str) -> str:
    """``url`` for messages, without a password in its userinfo."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError):
        # unparsable: mask by pattern, not by a parser that just refused it
        return mask_userinfo(url) if isinstance(url, str) else url
    if parsed.password:
        return str(parsed.copy_with(password="***"))
    return url


def _matches(pattern: _Pattern, target: _Target) -> bool:
    if pattern.port is not None and pattern.port != target.port:
        return False
    if pattern.wildcard:
        return target.host.endswith("." + pattern.host)
    return target.host == pattern.host


async def _resolve_checked(host: str, port: int, shown: str) -> list[str]:
    """Resolve ``host`` and return its addresses; HttpStepError if any answer is blocked."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HttpStepError(
            f"could not resolve host {host!r} for {shown!r}: {exc.strerror or exc}"
        ) from None
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0]).partition("%")[0]
        reason = blocked_reason(address)
        if reason is not None:
            raise HttpStepError(
                f"host {host!r} resolves to a blocked address {address} ({reason}) for "
                f"{shown!r}: the public http policy only reaches public addresses; use the "
                "allow-list policy to name internal hosts"
            )
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise HttpStepError(f"could not resolve host {host!r} for {shown!r}: no addresses")
    return addresses


def _disabled(shown: str) -> HttpStepError:
    # "df.http() is disabled": pg_durable's text for the same refusal, which scripts match
    return HttpStepError(
        "df.http() is disabled: outbound HTTP requests are disabled by the service's http "
        "policy 'deny-all'; "
        f"{shown!r} was not requested (start pgdurable serve with --http-policy public or "
        "allow-list to enable them)"
    )


async def check_url(policy: HttpPolicy, url: str) -> None:
    """Raise :class:`~pgdurable.errors.HttpStepError` unless ``policy`` admits ``url``.

    Checks the scheme, then the mode: ``deny-all`` refuses, ``allow-list`` matches the host and
    effective port against the patterns, ``public`` rejects IP literals and resolves the host
    with the running loop's resolver, refusing it if any answer is a blocked address.
    """
    target = _parse_url(url)
    shown = shown_url(url)
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


class GuardedBackend(httpcore.AsyncNetworkBackend):
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
